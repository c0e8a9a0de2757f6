/* Matrix products on the cpu backend (dnnl_impl.h): gemm on dnnl_sgemm
 * (row-major) and batched gemm on oneDNN's matmul primitive with a batch
 * dimension or a loop of dnnl_sgemm (kd__cpu_set_bmm_mode). */
#include "backend/cpu/dnnl_impl.h"
#include <string.h>

/* ------------------------------------------------------------------- gemm */

kd_status kd__cpu_gemm(kd_backend *be, int trans_a, int trans_b, int64_t M, int64_t N,
                       int64_t K, float alpha, const float *A, int64_t lda, const float *B,
                       int64_t ldb, float beta, float *C, int64_t ldc) {
    if (M <= 0 || N <= 0 || K <= 0)
        return ref_be()->gemm(be, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    /* dnnl_sgemm is row-major: lda is the row stride of A as stored. */
    return KD_DNNL_CHECK(dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A,
                                    lda, B, ldb, beta, C, ldc));
}

/* ------------------------------------------------------------ batched gemm */

/* How gemm_batch runs (kd__cpu_set_bmm_mode): oneDNN's matmul primitive with
 * a batch dimension (transposes as strides, beta 1 as a sum post-op), or a
 * loop of dnnl_sgemm (parallel over the batch when it has at least as many
 * matrices as threads). KD_CPU_BMM_AUTO takes the matmul primitive unless A
 * is transposed: on Swin's window attention (1536 x (49, 32)/(49, 49),
 * bench_kernels swin, 1 thread) the primitive runs q k^T in ~2.6 ms against
 * ~3.9 ms for the loop and attn @ v in ~2.1 against ~2.5 ms, but a
 * transposed A (the backward's attn^T dC) in ~3.2-4.1 ms against ~2.4 ms. */
static int g_bmm_mode = KD_CPU_BMM_AUTO;

void kd__cpu_set_bmm_mode(int mode) { g_bmm_mode = mode; }

static kd_status gemm_loop(int64_t batch, int trans_a, int trans_b, int64_t M, int64_t N,
                           int64_t K, float alpha, const float *A, int64_t lda, int64_t sa,
                           const float *B, int64_t ldb, int64_t sb, float beta, float *C,
                           int64_t ldc, int64_t sc) {
    if (batch >= kd_get_num_threads() && batch > 1) {
        int bad = 0;
        /* Inside the parallel region each sgemm runs on its own thread. */
#pragma omp parallel for schedule(static) reduction(| : bad)
        for (int64_t i = 0; i < batch; i++)
            bad |= dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A + i * sa,
                              lda, B + i * sb, ldb, beta, C + i * sc, ldc) != dnnl_success;
        return bad ? kd_error(KD_ERR_BACKEND, "oneDNN dnnl_sgemm failed in a batched gemm") : KD_OK;
    }
    for (int64_t i = 0; i < batch; i++)
        KD_TRY(KD_DNNL_CHECK(dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha,
                                        A + i * sa, lda, B + i * sb, ldb, beta, C + i * sc, ldc)));
    return KD_OK;
}

/* Logical (batch, rows, cols) of a row-major operand with leading dimension
 * ld and batch stride bs, stored transposed when `trans`. */
static dnnl_status_t mm_md(dnnl_memory_desc_t *md, int64_t batch, int64_t rows, int64_t cols,
                           int trans, int64_t ld, int64_t bs) {
    dnnl_dims_t dims = {batch, rows, cols};
    dnnl_dims_t strides = {bs, trans ? 1 : ld, trans ? ld : 1};
    return dnnl_memory_desc_init_by_strides(md, 3, dims, dnnl_f32, strides);
}

static kd_status matmul_locked(cpu_state *st, int64_t batch, int trans_a, int trans_b, int64_t M,
                               int64_t N, int64_t K, const float *A, int64_t lda, int64_t sa,
                               const float *B, int64_t ldb, int64_t sb, float beta, float *C,
                               int64_t ldc, int64_t sc, int *use_loop) {
    prim_key k;
    kd__cpu_key_init(&k, PK_MATMUL);
    k.flags = beta != 0.0f;
    int64_t v[12] = {batch, M, N, K, trans_a, trans_b, lda, ldb, ldc, sa, sb, sc};
    memcpy(k.d, v, sizeof v);
    uint64_t h = kd__cpu_key_hash(&k);
    prim_entry *e = kd__cpu_cache_find(st, &k, h);
    if (!e) {
        dnnl_memory_desc_t amd, bmd, cmd;
        dnnl_matmul_desc_t op;
        dnnl_status_t s = mm_md(&amd, batch, M, K, trans_a, lda, sa);
        if (s == dnnl_success) s = mm_md(&bmd, batch, K, N, trans_b, ldb, sb);
        if (s == dnnl_success) s = mm_md(&cmd, batch, M, N, 0, ldc, sc);
        if (s == dnnl_success) s = dnnl_matmul_desc_init(&op, &amd, &bmd, NULL, &cmd);
        KD_TRY(kd__cpu_cache_insert_sum(st, &k, h, s, &op, NULL, beta != 0.0f, &e));
    }
    if (!e->pd) return *use_loop = 1, KD_OK;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, 0));
    exec_arg a[3] = {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}};
    return kd__cpu_entry_execute(st, e, a, 3);
}

kd_status kd__cpu_gemm_batch(kd_backend *be, int64_t batch, int trans_a, int trans_b,
                             int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                             int64_t lda, int64_t sa, const float *B, int64_t ldb, int64_t sb,
                             float beta, float *C, int64_t ldc, int64_t sc) {
    if (batch <= 0 || M <= 0 || N <= 0 || K <= 0 || !A || !B || !C)
        return ref_be()->gemm_batch(be, batch, trans_a, trans_b, M, N, K, alpha, A, lda, sa, B,
                                    ldb, sb, beta, C, ldc, sc);
    int use_loop = g_bmm_mode == KD_CPU_BMM_LOOP || (g_bmm_mode == KD_CPU_BMM_AUTO && trans_a) ||
                   alpha != 1.0f || (beta != 0.0f && beta != 1.0f);
    kd_status s = KD_OK;
    if (!use_loop)
        CPU_RUN_LOCKED(s, matmul_locked(&kd__cpu_st, batch, trans_a, trans_b, M, N, K, A, lda, sa, B,
                                        ldb, sb, beta, C, ldc, sc, &use_loop));
    if (s == KD_OK && use_loop)
        return gemm_loop(batch, trans_a, trans_b, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta,
                         C, ldc, sc);
    return s;
}
