/*
 * test_ops_transformer.c: the backend kernels behind kd_layernorm, kd_gelu
 * and kd_bmm (ops_norm.c) and kd_softmax (ops_loss.c), and the ops' argument
 * checks.
 *
 * PyTorch references for the ops live in tests/fixtures/ops.safetensors
 * (cases layernorm*, gelu, bmm*, softmax_4d_attn; tools/gen_fixtures.py,
 * run by test_ops_torch on both backends) and their finite-difference cases
 * in test_autograd. This program checks what those small cases do not reach:
 *
 *   - layernorm_forward / layernorm_backward on the Swin-T token width (D =
 *     96, R = 2 x 49 x 3 rows): the "cpu" (oneDNN) kernels against the "ref"
 *     kernels (double sums), with and without gamma/beta, training (row
 *     statistics written) and inference (NULL statistics), accumulate 0 and
 *     1, dx NULL; and that the cpu calls really ran oneDNN primitives.
 *   - gemm_batch on all four transpose combinations, beta 0 and 1, alpha != 1,
 *     leading dimensions and batch strides larger than the matrices, on every
 *     cpu path (oneDNN matmul, sgemm loop, auto) against ref's loop of ref_gemm;
 *     ref's batched gemm against ref_gemm called per matrix.
 *   - eltwise GELU forward and backward, cpu against ref, over [-8, 8].
 *   - softmax_forward / softmax_backward (kd_softmax's kernels) on attention
 *     scores (8, 3, 49, 49): cpu (oneDNN) against ref, rows summing to 1.
 *   - kd_layernorm without gradients (the inference kernel) equals the
 *     training forward; accumulate into a gradient used twice.
 *   - the refusals: bmm with unequal batch dims, inner sizes, ndim < 3;
 *     layernorm with one of gamma/beta, a mismatched gamma, a negative eps.
 *
 * Tolerances: cpu vs ref |diff| <= 2e-5 + 1e-4 |ref|. Layer norm values are
 * O(1) after normalisation and the row sums run over 96 terms; gemm dot
 * products run over K <= 40 terms of magnitude <= 1 (errors ~1e-6).
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/dnnl_backend.h"
#include "kd/autograd.h"
#include "kd/backend.h"

#define ATOL 2e-5
#define RTOL 1e-4

static kd_tensor *tnew(int ndim, const int64_t *shape, float lo, float hi, uint64_t seed) {
    kd_tensor *t = NULL;
    KD_ASSERT_OK(kd_tensor_new(KD_F32, ndim, shape, &t));
    kd_test_fill_uniform(kd_f32(t), kd_tensor_numel(t), lo, hi, seed);
    return t;
}

static kd_tensor *tcopy(const kd_tensor *s) {
    kd_tensor *t = NULL;
    KD_ASSERT_OK(kd_tensor_new(KD_F32, s->ndim, s->shape, &t));
    memcpy(t->data, s->data, kd_tensor_nbytes(s));
    return t;
}

static kd_backend *get_be(const char *name) {
    kd_backend *be = NULL;
    return kd_backend_get(name, &be) == KD_OK ? be : NULL;
}

/* ------------------------------------------------------------ layer norm */

/* One layernorm configuration on ref and cpu: forward (training and
 * inference) and backward with the given accumulate flag, all outputs
 * compared. */
static void ln_case(kd_backend *ref, kd_backend *cpu, int affine, int acc, int want_dx) {
    const int64_t xs[3] = {2, 49 * 3, 96}, D = 96, R = 2 * 49 * 3;
    kd_tensor *x = tnew(3, xs, -2.0f, 3.0f, 11), *dy = tnew(3, xs, -1.0f, 1.0f, 12);
    kd_tensor *gamma = affine ? tnew(1, &D, 0.5f, 1.5f, 13) : NULL;
    kd_tensor *beta = affine ? tnew(1, &D, -0.5f, 0.5f, 14) : NULL;
    kd_tensor *y[2], *ym[2], *sm[2], *sr[2], *dx[2], *dg[2], *db[2];
    kd_tensor *dx0 = tnew(3, xs, -1.0f, 1.0f, 15), *dg0 = tnew(1, &D, -1.0f, 1.0f, 16);
    kd_tensor *db0 = tnew(1, &D, -1.0f, 1.0f, 17);
    kd_backend *be[2] = {ref, cpu};
    int before = kd__cpu_primitive_count();
    for (int i = 0; i < 2; i++) {
        y[i] = tnew(3, xs, 0, 0, 1);
        ym[i] = tnew(3, xs, 0, 0, 1);
        sm[i] = tnew(1, &R, 0, 0, 1);
        sr[i] = tnew(1, &R, 0, 0, 1);
        dx[i] = tcopy(dx0);
        dg[i] = tcopy(dg0);
        db[i] = tcopy(db0);
        KD_ASSERT_OK(be[i]->layernorm_forward(be[i], 1e-5f, x, gamma, beta, y[i], sm[i], sr[i]));
        KD_ASSERT_OK(be[i]->layernorm_forward(be[i], 1e-5f, x, gamma, beta, ym[i], NULL, NULL));
        KD_ASSERT_OK(be[i]->layernorm_backward(be[i], 1e-5f, dy, x, gamma, sm[i], sr[i],
                                               want_dx ? dx[i] : NULL, affine ? dg[i] : NULL,
                                               affine ? db[i] : NULL, acc));
    }
    /* Three oneDNN primitives the first time this shape and mode is seen
     * (training forward, inference forward, backward); none afterwards. */
    int made = kd__cpu_primitive_count() - before;
    if (made > 3) fail_msg("cpu layernorm created %d primitives for one configuration", made);
    char what[128];
    const int64_t n = R * D;
#define LN_CMP(name, a, b, cnt)                                                                  \
    do {                                                                                         \
        snprintf(what, sizeof what, "layernorm affine=%d acc=%d dx=%d: %s", affine, acc, want_dx, \
                 name);                                                                          \
        KD_ASSERT_CLOSE(kd_f32(a), kd_f32(b), cnt, ATOL, RTOL, what);                           \
    } while (0)
    LN_CMP("y (cpu vs ref)", y[1], y[0], n);
    LN_CMP("y inference (cpu vs ref)", ym[1], ym[0], n);
    LN_CMP("y inference vs training", ym[0], y[0], n);
    LN_CMP("mean", sm[1], sm[0], R);
    LN_CMP("rstd", sr[1], sr[0], R);
    LN_CMP("dx", dx[1], dx[0], n);
    LN_CMP("dgamma", dg[1], dg[0], D);
    LN_CMP("dbeta", db[1], db[0], D);
#undef LN_CMP
    /* Outputs not asked for are left alone. */
    if (!want_dx && memcmp(dx[1]->data, dx0->data, kd_tensor_nbytes(dx0)))
        fail_msg("cpu layernorm_backward wrote dx though it was not asked for");
    if (!affine && memcmp(dg[1]->data, dg0->data, kd_tensor_nbytes(dg0)))
        fail_msg("cpu layernorm_backward wrote dgamma without gamma");
    /* The ref rows: mean and rstd of row 5 recomputed here, in double. */
    double mu = 0, var = 0;
    const float *xr = kd_f32(x) + 5 * D;
    for (int64_t d = 0; d < D; d++) mu += xr[d];
    mu /= (double)D;
    for (int64_t d = 0; d < D; d++) var += (xr[d] - mu) * (xr[d] - mu);
    var /= (double)D;
    assert_true(fabs(kd_f32(sm[0])[5] - mu) < 1e-6);
    assert_true(fabs(kd_f32(sr[0])[5] - 1.0 / sqrt(var + 1e-5)) < 1e-5);
    kd_tensor *all[] = {x, dy, gamma, beta, dx0, dg0, db0, y[0], y[1], ym[0], ym[1], sm[0], sm[1],
                        sr[0], sr[1], dx[0], dx[1], dg[0], dg[1], db[0], db[1]};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) kd_tensor_free(all[i]);
}

static void test_layernorm_kernels(void **state) {
    (void)state;
    kd_backend *ref = get_be("ref"), *cpu = get_be("cpu");
    assert_non_null(ref);
    if (!cpu) {
        skip();
        return;
    }
    int before = kd__cpu_primitive_count();
    for (int affine = 0; affine < 2; affine++)
        for (int acc = 0; acc < 2; acc++)
            for (int want_dx = 0; want_dx < 2; want_dx++) ln_case(ref, cpu, affine, acc, want_dx);
    /* The cpu kernels ran on oneDNN (not the ref fallback): primitives exist. */
    if (kd__cpu_primitive_count() - before < 4)
        fail_msg("cpu layernorm created %d oneDNN primitives; expected its own kernels",
                 kd__cpu_primitive_count() - before);
}

/* ----------------------------------------------------------- batched gemm */

/* C_i = alpha op(A_i) op(B_i) + beta C_i for batch 3 with lda, ldb, ldc two
 * wider than the matrices and batch strides 5 floats past each matrix. */
static void bmm_case(kd_backend *be, kd_backend *ref, int ta, int tb, float alpha, float beta,
                     const char *tag) {
    const int64_t batch = 3, M = 7, N = 9, K = 40;
    const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
    const int64_t lda = ac + 2, ldb = bc + 2, ldc = N + 2;
    const int64_t sa = ar * lda + 5, sb = br * ldb + 5, sc = M * ldc + 5;
    int64_t na = batch * sa, nb = batch * sb, nc = batch * sc;
    kd_tensor *A = tnew(1, &na, -1, 1, 21), *B = tnew(1, &nb, -1, 1, 22);
    kd_tensor *C0 = tnew(1, &nc, -1, 1, 23), *Cg = tcopy(C0), *Cr = tcopy(C0), *Cp = tcopy(C0);
    KD_ASSERT_OK(be->gemm_batch(be, batch, ta, tb, M, N, K, alpha, kd_f32(A), lda, sa, kd_f32(B),
                                ldb, sb, beta, kd_f32(Cg), ldc, sc));
    KD_ASSERT_OK(ref->gemm_batch(ref, batch, ta, tb, M, N, K, alpha, kd_f32(A), lda, sa, kd_f32(B),
                                 ldb, sb, beta, kd_f32(Cr), ldc, sc));
    /* ref's batch is a loop of its own gemm. */
    for (int64_t i = 0; i < batch; i++)
        KD_ASSERT_OK(ref->gemm(ref, ta, tb, M, N, K, alpha, kd_f32(A) + i * sa, lda,
                               kd_f32(B) + i * sb, ldb, beta, kd_f32(Cp) + i * sc, ldc));
    char what[160];
    snprintf(what, sizeof what, "gemm_batch %s ta=%d tb=%d alpha=%g beta=%g", tag, ta, tb,
             (double)alpha, (double)beta);
    KD_ASSERT_CLOSE(kd_f32(Cg), kd_f32(Cr), nc, ATOL, RTOL, what);
    if (memcmp(Cr->data, Cp->data, kd_tensor_nbytes(Cr)) != 0)
        fail_msg("%s: ref gemm_batch differs from ref gemm per matrix", what);
    /* The padding between rows and after each matrix is never written. */
    for (int64_t o = 0; o < nc; o++) {
        int64_t w = o % sc, m = w / ldc, j = w % ldc;
        int inside = m < M && j < N;
        if (!inside && kd_f32(Cg)[o] != kd_f32(C0)[o])
            fail_msg("%s: wrote padding at float %lld", what, (long long)o);
    }
    kd_tensor_free(A);
    kd_tensor_free(B);
    kd_tensor_free(C0);
    kd_tensor_free(Cg);
    kd_tensor_free(Cr);
    kd_tensor_free(Cp);
}

static void test_gemm_batch(void **state) {
    (void)state;
    kd_backend *ref = get_be("ref"), *cpu = get_be("cpu");
    assert_non_null(ref);
    static const float ab[3][2] = {{1.0f, 0.0f}, {1.0f, 1.0f}, {0.5f, -0.25f}};
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int k = 0; k < 3; k++) {
                bmm_case(ref, ref, ta, tb, ab[k][0], ab[k][1], "ref");
                if (!cpu) continue;
                kd__cpu_set_bmm_mode(KD_CPU_BMM_MATMUL);
                bmm_case(cpu, ref, ta, tb, ab[k][0], ab[k][1], "cpu matmul");
                kd__cpu_set_bmm_mode(KD_CPU_BMM_LOOP);
                bmm_case(cpu, ref, ta, tb, ab[k][0], ab[k][1], "cpu sgemm loop");
                kd__cpu_set_bmm_mode(KD_CPU_BMM_AUTO);
                bmm_case(cpu, ref, ta, tb, ab[k][0], ab[k][1], "cpu auto");
            }
    if (!cpu) skip();
}

/* ----------------------------------------------------------------- GELU */

static void test_gelu_kernels(void **state) {
    (void)state;
    kd_backend *ref = get_be("ref"), *cpu = get_be("cpu");
    assert_non_null(ref);
    if (!cpu) {
        skip();
        return;
    }
    int64_t n = 4001;
    kd_tensor *x = tnew(1, &n, 0, 0, 1), *dy = tnew(1, &n, -1, 1, 31);
    for (int64_t i = 0; i < n; i++) kd_f32(x)[i] = -8.0f + 16.0f * (float)i / (float)(n - 1);
    kd_tensor *y[2], *dx[2];
    kd_backend *be[2] = {ref, cpu};
    for (int b = 0; b < 2; b++) {
        y[b] = tnew(1, &n, 0, 0, 1);
        dx[b] = tnew(1, &n, 0.5f, 0.5f, 1);
        KD_ASSERT_OK(be[b]->eltwise_forward(be[b], KD_ELTWISE_GELU, 0.0f, x, y[b]));
        KD_ASSERT_OK(be[b]->eltwise_backward(be[b], KD_ELTWISE_GELU, 0.0f, dy, x, dx[b], 1));
    }
    /* Known values: GELU(0) = 0, GELU(x) -> x for large x, -> 0 for very negative x. */
    assert_true(fabsf(kd_f32(y[0])[n / 2]) == 0.0f);
    assert_true(fabsf(kd_f32(y[0])[n - 1] - 8.0f) < 1e-6f);
    assert_true(fabsf(kd_f32(y[0])[0]) < 1e-6f);
    KD_ASSERT_CLOSE(kd_f32(y[1]), kd_f32(y[0]), n, 1e-6, 1e-5, "gelu forward cpu vs ref");
    KD_ASSERT_CLOSE(kd_f32(dx[1]), kd_f32(dx[0]), n, 1e-6, 1e-5, "gelu backward (acc) cpu vs ref");
    for (int b = 0; b < 2; b++) {
        kd_tensor_free(y[b]);
        kd_tensor_free(dx[b]);
    }
    kd_tensor_free(x);
    kd_tensor_free(dy);
}

/* -------------------------------------------------------------- softmax */

/* Attention scores (8, 3, 49, 49): cpu (oneDNN's softmax primitive) against
 * ref (double row sums), forward and backward with accumulate 0 and 1. */
static void test_softmax_kernels(void **state) {
    (void)state;
    kd_backend *ref = get_be("ref"), *cpu = get_be("cpu");
    assert_non_null(ref);
    if (!cpu) {
        skip();
        return;
    }
    const int64_t s[4] = {8, 3, 49, 49};
    kd_tensor *x = tnew(4, s, -6, 6, 51), *dy = tnew(4, s, -1, 1, 52);
    kd_tensor *y[2], *dx[2][2];
    kd_backend *be[2] = {ref, cpu};
    int before = kd__cpu_primitive_count();
    for (int b = 0; b < 2; b++) {
        y[b] = tnew(4, s, 0, 0, 1);
        KD_ASSERT_OK(be[b]->softmax_forward(be[b], x, y[b]));
        for (int acc = 0; acc < 2; acc++) {
            dx[b][acc] = tnew(4, s, 0.25f, 0.25f, 1);
            KD_ASSERT_OK(be[b]->softmax_backward(be[b], y[b], dy, dx[b][acc], acc));
        }
    }
    if (kd__cpu_primitive_count() - before < 1)
        fail_msg("cpu softmax created no oneDNN primitive");
    int64_t n = kd_tensor_numel(x);
    KD_ASSERT_CLOSE(kd_f32(y[1]), kd_f32(y[0]), n, 1e-6, 1e-5, "softmax forward cpu vs ref");
    KD_ASSERT_CLOSE(kd_f32(dx[1][0]), kd_f32(dx[0][0]), n, 1e-6, 1e-5, "softmax backward cpu vs ref");
    KD_ASSERT_CLOSE(kd_f32(dx[1][1]), kd_f32(dx[0][1]), n, 1e-6, 1e-5,
                    "softmax backward (accumulate) cpu vs ref");
    /* Rows sum to 1; accumulate adds exactly the fresh gradient to 0.25. */
    for (int64_t r = 0; r < n / 49; r++) {
        double sum = 0;
        for (int64_t c = 0; c < 49; c++) sum += kd_f32(y[1])[r * 49 + c];
        if (fabs(sum - 1.0) > 1e-5) fail_msg("cpu softmax row %lld sums to %.8f", (long long)r, sum);
    }
    for (int64_t i = 0; i < n; i++)
        if (fabsf(kd_f32(dx[0][1])[i] - 0.25f - kd_f32(dx[0][0])[i]) > 1e-6f)
            fail_msg("ref softmax_backward accumulate differs at %lld", (long long)i);
    for (int b = 0; b < 2; b++) {
        kd_tensor_free(y[b]);
        kd_tensor_free(dx[b][0]);
        kd_tensor_free(dx[b][1]);
    }
    kd_tensor_free(x);
    kd_tensor_free(dy);
}

/* ------------------------------------------------------ autograd layer */

/* kd_layernorm without gradients runs the inference kernel; its output
 * equals the training forward's. A tensor that feeds both operands of one
 * bmm and one operand of another gets the sum of the three gradients. */
static void test_ops_graph(void **state) {
    (void)state;
    const char *names[2] = {"ref", "cpu"};
    for (int b = 0; b < 2; b++) {
        kd_backend *be = get_be(names[b]);
        if (!be) continue;
        kd_graph *g = NULL;
        KD_ASSERT_OK(kd_graph_init(&g, be));
        const int64_t xs[3] = {4, 49, 32}, D = 32;
        kd_tensor *x = tnew(3, xs, -2, 2, 41), *gm = tnew(1, &D, 0.5f, 1.5f, 42);
        kd_tensor *bt = tnew(1, &D, -1, 1, 43);
        KD_ASSERT_OK(kd_tensor_require_grad(x));
        kd_tensor *y1 = kd_layernorm(g, x, gm, bt, 1e-5f);
        kd_graph_set_grad_enabled(g, 0);
        kd_tensor *y0 = kd_layernorm(g, x, gm, bt, 1e-5f);
        kd_graph_set_grad_enabled(g, 1);
        assert_non_null(y1);
        assert_non_null(y0);
        KD_ASSERT_CLOSE(kd_f32(y0), kd_f32(y1), kd_tensor_numel(y1), 1e-6, 1e-6,
                        "layernorm no-grad vs training forward");
        /* x feeds both operands of one bmm and the b operand of another:
         * d/dx sum(x x^T + z x^T) = 2 colsum(x) + colsum(z) in every row. */
        kd_tensor *z = tnew(3, xs, -1, 1, 44);
        kd_tensor *s = kd_add(g, kd_bmm(g, x, x, 0, 1), kd_bmm(g, z, x, 0, 1));
        KD_ASSERT_OK(kd_backward(g, kd_sum(g, s)));
        assert_non_null(x->grad);
        const int64_t L = 49;
        for (int64_t i = 0; i < 4; i++)
            for (int64_t d = 0; d < D; d++) {
                double want = 0;
                for (int64_t m = 0; m < L; m++)
                    want += 2.0 * kd_f32(x)[(i * L + m) * D + d] + kd_f32(z)[(i * L + m) * D + d];
                for (int64_t m = 0; m < L; m++) {
                    float got = kd_f32(x->grad)[(i * L + m) * D + d];
                    if (fabs(got - want) > 1e-4 + 1e-5 * fabs(want))
                        fail_msg("%s: d/dx[%lld, %lld, %lld] = %g, want %g", names[b],
                                 (long long)i, (long long)m, (long long)d, got, want);
                }
            }
        kd_tensor_free(z);
        kd_tensor_free(x);
        kd_tensor_free(gm);
        kd_tensor_free(bt);
        kd_graph_free(g);
    }
}

/* --------------------------------------------------------------- refusals */

static kd_status try_bmm(const int64_t *as, int an, const int64_t *bs, int bn, int ta, int tb) {
    kd_backend *be = get_be("ref");
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    kd_tensor *a = kd_graph_tensor(g, KD_F32, an, as), *b = kd_graph_tensor(g, KD_F32, bn, bs);
    memset(a->data, 0, kd_tensor_nbytes(a));
    memset(b->data, 0, kd_tensor_nbytes(b));
    kd_tensor *y = kd_bmm(g, a, b, ta, tb);
    kd_status s = kd_graph_status(g);
    if ((y == NULL) != (s != KD_OK)) fail_msg("bmm: output and status disagree");
    kd_graph_free(g);
    return s;
}

static kd_status try_ln(int64_t D, int64_t gD, int with_gamma, int with_beta, float eps) {
    kd_backend *be = get_be("ref");
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    int64_t xs[2] = {3, D};
    kd_tensor *x = kd_graph_tensor(g, KD_F32, 2, xs);
    kd_tensor *gm = kd_graph_tensor(g, KD_F32, 1, &gD), *bt = kd_graph_tensor(g, KD_F32, 1, &gD);
    memset(x->data, 0, kd_tensor_nbytes(x));
    kd_tensor *y = kd_layernorm(g, x, with_gamma ? gm : NULL, with_beta ? bt : NULL, eps);
    kd_status s = kd_graph_status(g);
    if ((y == NULL) != (s != KD_OK)) fail_msg("layernorm: output and status disagree");
    kd_graph_free(g);
    return s;
}

static void test_refusals(void **state) {
    (void)state;
    const int64_t a3[3] = {2, 4, 5}, b3[3] = {2, 5, 6}, b3x[3] = {3, 5, 6}, a2[2] = {4, 5};
    const int64_t b2[2] = {5, 6}, bt3[3] = {2, 6, 5};
    assert_int_equal(try_bmm(a3, 3, b3, 3, 0, 0), KD_OK);
    assert_int_equal(try_bmm(a3, 3, bt3, 3, 0, 1), KD_OK);
    ASSERT_ERR(try_bmm(a3, 3, b3x, 3, 0, 0), KD_ERR_SHAPE, "equal batch");
    ASSERT_ERR(try_bmm(a2, 2, b2, 2, 0, 0), KD_ERR_SHAPE, ">= 3");
    ASSERT_ERR(try_bmm(a3, 3, b3, 3, 0, 1), KD_ERR_SHAPE, "inner sizes 5 and 6 differ");
    ASSERT_ERR(try_bmm(a3, 3, b3, 3, 1, 0), KD_ERR_SHAPE, "(transposed)");
    assert_int_equal(try_ln(8, 8, 1, 1, 1e-5f), KD_OK);
    assert_int_equal(try_ln(8, 8, 0, 0, 0.0f), KD_OK);
    ASSERT_ERR(try_ln(8, 8, 1, 0, 1e-5f), KD_ERR_INVALID, "both be NULL");
    ASSERT_ERR(try_ln(8, 7, 1, 1, 1e-5f), KD_ERR_SHAPE, "weight (7)");
    ASSERT_ERR(try_ln(8, 8, 1, 1, -1e-3f), KD_ERR_INVALID, "eps");
    ASSERT_ERR(try_ln(8, 8, 1, 1, NAN), KD_ERR_INVALID, "eps");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layernorm_kernels),
        cmocka_unit_test(test_gemm_batch),
        cmocka_unit_test(test_gelu_kernels),
        cmocka_unit_test(test_softmax_kernels),
        cmocka_unit_test(test_ops_graph),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
