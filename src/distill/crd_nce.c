/* CRD's NCE loss of one side as one fused kd_function, and the memory-bank
 * update (RepDistiller crd/memory.py ContrastMemory, crd/criterion.py
 * ContrastLoss).
 *
 * The official code gathers weight = memory[idx] as a (B, K+1, D) tensor and
 * multiplies it with v in a bmm: at B = 64, K = 16384, D = 128 that is 537 MB
 * per side in float32, written, read by the bmm, and kept for its backward.
 * Here the gathered tensor never exists. The scores s_ij = row(i, j) . v_i
 * come either from one GEMM of v against every bank row (dense: B x rows
 * floats, used when the bank has at most KD__CRD_DENSE_RATIO (K+1) rows, so
 * that most rows are drawn by many samples of the batch and the GEMM's
 * throughput wins), or from a dot product per drawn row read in place
 * (gather: only B x (K+1) floats, for banks far larger than K). The forward
 * keeps the exponentiated scores for the backward:
 *
 *     d L / d v_i = sum_j g_ij row(i, j),   g_ij = d L / d s_ij,
 *     g_i0 = -(1 / B) (c + eps) / (x_i0 + c + eps) / T,
 *     g_ij =  (1 / B) x_ij / (x_ij + c + eps) / T      (j >= 1),
 *
 * as the transposed GEMM of the B x rows matrix of g_ij (dense) or by reading
 * the rows again (gather). Rows are split over threads by sample i and every
 * sum has a fixed order, so results do not depend on the thread count. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/crd.h"
#include "distill/method_impl.h"

#define KD__CRD_EPS 1e-7 /* ContrastLoss eps */

static const float *kd__crd_row(const kd__crd_nce_params *p, int64_t i, int64_t j) {
    if (j == 0 && p->pos) return p->pos + i * p->D;
    int64_t r = p->idx ? p->idx[i * (p->K + 1) + j] : j - 1;
    return p->bank + r * p->D;
}

static float kd__dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; k++) s += a[k] * b[k];
    return s;
}

/* Whether the scores come from one dense GEMM against every bank row
 * (then read at the drawn indices) rather than from gathered dot products. */
static int kd__crd_dense(const kd__crd_nce_params *p) {
    if (p->path == KD__CRD_NCE_GATHER) return 0;
    if (p->path == KD__CRD_NCE_DENSE || !p->idx) return 1;
    return p->bank_rows <= KD__CRD_DENSE_RATIO * (p->K + 1);
}

/* What the forward keeps for the backward. */
typedef struct {
    float *e;     /* (B, K+1) exp(s / T) */
    float *dense; /* (B, rows) scratch of the dense path (scores, then gradients), or NULL */
} kd__crd_saved;

static kd_status kd__crd_nce_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                                 void **saved) {
    KD_TRY(kd__need_contiguous("crd: embedding", in, n_in));
    const kd__crd_nce_params *p = params;
    int64_t B = in[0]->shape[0], K1 = p->K + 1, D = p->D, R = p->bank_rows;
    const float *v = kd_f32(in[0]);
    kd__crd_saved *sv = kd_function_alloc(g, sizeof *sv);
    float *e = kd_function_alloc(g, sizeof(float) * (size_t)(B * K1));
    double *row_loss = kd_function_alloc(g, sizeof(double) * (size_t)B);
    if (!sv || !e || !row_loss) return kd_graph_status(g);
    sv->e = e;
    sv->dense = NULL;
    const float inv_t = 1.0f / p->T;
    if (kd__crd_dense(p)) {
        /* S = v bank^T (B, rows) in one GEMM, then the drawn entries. */
        float *S = kd_function_alloc(g, sizeof(float) * (size_t)(B * R));
        if (!S) return kd_graph_status(g);
        kd_backend *be = kd_graph_backend(g);
        KD_TRY(be->gemm(be, 0, 1, B, R, D, 1.0f, v, D, p->bank, D, 0.0f, S, R));
        sv->dense = S;
#pragma omp parallel for schedule(static) if (B * K1 >= 65536)
        for (int64_t i = 0; i < B; i++)
            for (int64_t j = 0; j < K1; j++) {
                float s;
                if (j == 0 && p->pos) s = kd__dot(p->pos + i * D, v + i * D, D);
                else s = S[i * R + (p->idx ? p->idx[i * K1 + j] : j - 1)];
                e[i * K1 + j] = expf(s * inv_t);
            }
    } else {
#pragma omp parallel for schedule(static) if (B * K1 * D >= 262144)
        for (int64_t i = 0; i < B; i++)
            for (int64_t j = 0; j < K1; j++)
                e[i * K1 + j] = expf(kd__dot(kd__crd_row(p, i, j), v + i * D, D) * inv_t);
    }
    if (*p->z < 0) {
        double sum = 0;
        for (int64_t k = 0; k < B * K1; k++) sum += e[k];
        *p->z = (float)(sum / (double)(B * K1) * (double)p->n_data);
        kd_log_msg(KD_LOG_DEBUG, "crd: normalization constant %g", (double)*p->z);
    }
    const double z = *p->z, c = (double)p->K / (double)p->n_data;
    /* Per-row sums in parallel, added in row order: the same value under
     * any thread count. */
#pragma omp parallel for schedule(static) if (B * K1 >= 65536)
    for (int64_t i = 0; i < B; i++) {
        double x0 = e[i * K1] / z, li = log(x0 / (x0 + c + KD__CRD_EPS));
        for (int64_t j = 1; j < K1; j++) li += log(c / (e[i * K1 + j] / z + c + KD__CRD_EPS));
        row_loss[i] = li;
    }
    double loss = 0;
    for (int64_t i = 0; i < B; i++) loss += row_loss[i];
    kd_f32(out)[0] = (float)(-loss / (double)B);
    *saved = sv;
    return KD_OK;
}

static kd_status kd__crd_nce_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                                 const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)n_in, (void)out;
    if (!gin[0]) return KD_OK;
    const kd__crd_nce_params *p = params;
    const kd__crd_saved *sv = saved;
    const float *e = sv->e;
    int64_t B = in[0]->shape[0], K1 = p->K + 1, D = p->D, R = p->bank_rows;
    const double z = *p->z, c = (double)p->K / (double)p->n_data;
    const double k = (double)kd_f32(gout)[0] / (double)B / (double)p->T;
    float *gv = kd_f32(gin[0]);
#define KD__CRD_G(i, j)                                                                                     \
    ((float)((j) == 0 ? -k * (c + KD__CRD_EPS) / (e[(i) * K1] / z + c + KD__CRD_EPS)                        \
                      : k * (e[(i) * K1 + (j)] / z) / (e[(i) * K1 + (j)] / z + c + KD__CRD_EPS)))
    if (sv->dense) {
        /* G (B, rows): each row's gradients at its drawn indices (distinct
         * within a row; += all the same), then gv += G bank. */
        float *G = sv->dense;
        memset(G, 0, sizeof(float) * (size_t)(B * R));
#pragma omp parallel for schedule(static) if (B * K1 >= 65536)
        for (int64_t i = 0; i < B; i++)
            for (int64_t j = (p->pos ? 1 : 0); j < K1; j++)
                G[i * R + (p->idx ? p->idx[i * K1 + j] : j - 1)] += KD__CRD_G(i, j);
        kd_backend *be = kd_graph_backend(g);
        KD_TRY(be->gemm(be, 0, 0, B, D, R, 1.0f, G, R, p->bank, D, 1.0f, gv, D));
        if (p->pos)
            for (int64_t i = 0; i < B; i++) {
                float g0 = KD__CRD_G(i, 0);
                for (int64_t d = 0; d < D; d++) gv[i * D + d] += g0 * p->pos[i * D + d];
            }
        return KD_OK;
    }
#pragma omp parallel for schedule(static) if (B * K1 * D >= 262144)
    for (int64_t i = 0; i < B; i++) {
        float *gi = gv + i * D;
        for (int64_t j = 0; j < K1; j++) {
            float gij = KD__CRD_G(i, j);
            const float *row = kd__crd_row(p, i, j);
#pragma omp simd
            for (int64_t d = 0; d < D; d++) gi[d] += gij * row[d];
        }
    }
#undef KD__CRD_G
    return KD_OK;
}

static const kd_function kd__crd_nce_fn = {"crd_nce", kd__crd_nce_fwd, kd__crd_nce_bwd};

kd_status kd__crd_nce(kd_graph *g, kd_tensor *v, const kd__crd_nce_params *p, kd_tensor **out) {
    *out = NULL;
    KD_TRY(kd_graph_status(g));
    char b[96];
    if (!v || v->ndim != 2 || v->shape[1] != p->D)
        return kd_error(KD_ERR_SHAPE, "crd: embedding %s is not (B, %lld)",
                        v ? kd_shape_str(v, b, sizeof b) : "(none)", (long long)p->D);
    *out = kd_function_apply(g, &kd__crd_nce_fn, p, sizeof *p, 1, &v, 0, NULL);
    return kd_graph_status(g);
}

kd_status kd__crd_bank_update(float *bank, int64_t D, const int64_t *index, const float *v, int64_t B,
                              float momentum) {
    /* Rows are computed from the old bank first (index_select, then
     * index_copy_), so a repeated index does not see its own update. */
    float *tmp = malloc(sizeof(float) * (size_t)(B * D > 0 ? B * D : 1));
    if (!tmp) return kd_error(KD_ERR_NOMEM, "crd: out of memory updating a memory bank");
    for (int64_t i = 0; i < B; i++) {
        const float *m = bank + index[i] * D;
        float *t = tmp + i * D;
        float ss = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            t[d] = m[d] * momentum + v[i * D + d] * (1.0f - momentum);
            ss += t[d] * t[d];
        }
        float norm = sqrtf(ss);
        for (int64_t d = 0; d < D; d++) t[d] /= norm;
    }
    for (int64_t i = 0; i < B; i++) memcpy(bank + index[i] * D, tmp + i * D, sizeof(float) * (size_t)D);
    free(tmp);
    return KD_OK;
}
