/*
 * ops_attention.c: fused multi-head (window) self-attention, Swin's W-MSA.
 *
 * One op instead of the chain permute(qkv) -> slice q, k, v -> scale ->
 * bmm(q, k^T) -> + bias -> + mask -> softmax -> bmm(., v) -> permute: q, k
 * and v are read where the qkv linear wrote them and the output is written
 * in the layout the proj linear reads, so no copy is made. Each (window,
 * head) pair is independent: OpenMP runs them in parallel, each with its own
 * N x N score buffer. The softmax probabilities are saved for the backward
 * (the same memory the unfused chain keeps for its second bmm).
 *
 * Arithmetic follows torchvision's shifted_window_attention: q is scaled
 * first (q * hd^-0.5, rounded to float), then q k^T, + bias, + mask, softmax
 * over the last axis. Dot products accumulate in float in a fixed order, so
 * results do not depend on the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd_impl.h"

#define SHP(t, buf) kd_shape_str((t), (buf), sizeof(buf))

typedef struct {
    int64_t Bw, N, C, heads, hd, nW;
    float scale;
} kd__attn_dims;

/* t (hd x N) = the hd-wide slice at column `off` of N rows of stride ld, transposed. */
static void kd__attn_transpose(const float *src, int64_t ld, int64_t N, int64_t hd, float *t) {
    for (int64_t j = 0; j < N; j++)
        for (int64_t e = 0; e < hd; e++) t[e * N + j] = src[j * ld + e];
}

/* Scores of one (window b, head h) pair into S (N x N), softmax in place.
 * qs receives the scaled q rows (N x hd), kt k transposed (hd x N). The
 * inner loops run over contiguous j or e without a reduction, so they
 * vectorise without reassociating sums (no -ffast-math): each score is
 * the same left-to-right sum over e as a plain dot product. */
static void kd__attn_scores(const kd__attn_dims *d, const float *qkv, const float *bias, const float *mask, int64_t b,
                            int64_t h, float *qs, float *kt, float *S) {
    const int64_t N = d->N, C = d->C, hd = d->hd, ld = 3 * C;
    const float *base = qkv + b * N * ld;
    for (int64_t i = 0; i < N; i++) {
        const float *q = base + i * ld + h * hd;
        for (int64_t e = 0; e < hd; e++) qs[i * hd + e] = q[e] * d->scale;
    }
    kd__attn_transpose(base + C + h * hd, ld, N, hd, kt);
    const float *bh = bias ? bias + h * N * N : NULL;
    const float *mw = mask ? mask + (b % d->nW) * N * N : NULL;
    for (int64_t i = 0; i < N; i++) {
        float *s = S + i * N;
        const float *q = qs + i * hd;
        for (int64_t j = 0; j < N; j++) s[j] = 0.0f;
        for (int64_t e = 0; e < hd; e++) {
            const float qe = q[e], *kr = kt + e * N;
            #pragma omp simd
            for (int64_t j = 0; j < N; j++) s[j] += qe * kr[j];
        }
        if (bh)
            for (int64_t j = 0; j < N; j++) s[j] += bh[i * N + j];
        if (mw)
            for (int64_t j = 0; j < N; j++) s[j] += mw[i * N + j];
        float m = s[0];
        for (int64_t j = 1; j < N; j++) m = s[j] > m ? s[j] : m;
        float sum = 0.0f;
        for (int64_t j = 0; j < N; j++) sum += (s[j] = expf(s[j] - m));
        float inv = 1.0f / sum;
        for (int64_t j = 0; j < N; j++) s[j] *= inv;
    }
}

kd_tensor *kd_window_attention(kd_graph *g, kd_tensor *qkv, kd_tensor *bias, const kd_tensor *mask, int64_t heads) {
    char b1[96], b2[96];
    if (!g || !kd__ok_inputs(g, "window_attention", 1, &qkv)) return NULL;
    if (g->status != KD_OK) return NULL;
    if (!(qkv = kd__to_strided(g, qkv))) return NULL;
    if (!kd__check_f32(g, "window_attention", "qkv", qkv)) return NULL;
    if (qkv->ndim != 3 || heads < 1 || qkv->shape[2] % (3 * heads))
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "window_attention: qkv %s must be (B, N, 3 * C) with C a multiple of "
                                                  "%lld heads",
                                    SHP(qkv, b1), (long long)heads));
    kd__attn_dims d = {qkv->shape[0], qkv->shape[1], qkv->shape[2] / 3, heads, qkv->shape[2] / 3 / heads, 1, 0};
    d.scale = (float)pow((double)d.hd, -0.5);
    if (bias) {
        if (!(bias = kd__to_strided(g, bias))) return NULL;
        if (!kd__check_f32(g, "window_attention", "bias", bias)) return NULL;
        if (bias->ndim != 3 || bias->shape[0] != heads || bias->shape[1] != d.N || bias->shape[2] != d.N)
            return kd__fail(g, kd_error(KD_ERR_SHAPE, "window_attention: bias %s must be (%lld, %lld, %lld) for qkv %s",
                                        SHP(bias, b1), (long long)heads, (long long)d.N, (long long)d.N, SHP(qkv, b2)));
    }
    if (mask) {
        if (mask->dtype != KD_F32 || mask->ndim != 3 || mask->shape[1] != d.N || mask->shape[2] != d.N ||
            mask->shape[0] < 1 || d.Bw % mask->shape[0] || !kd_tensor_is_contiguous(mask) ||
            mask->layout != KD_LAYOUT_STRIDED)
            return kd__fail(g, kd_error(KD_ERR_SHAPE, "window_attention: mask %s must be float32 (nW, %lld, %lld) "
                                                      "with nW dividing %lld",
                                        SHP(mask, b1), (long long)d.N, (long long)d.N, (long long)d.Bw));
        d.nW = mask->shape[0];
    }
    int64_t os[3] = {d.Bw, d.N, d.C};
    kd_tensor *y = kd__new(g, KD_F32, 3, os);
    if (!y) return NULL;
    int save = kd_graph_grad_enabled(g) && (kd__needs_grad(g, qkv) || (bias && kd__needs_grad(g, bias)));
    kd_tensor *P = NULL;
    if (save) {
        int64_t ps[4] = {d.Bw, heads, d.N, d.N};
        if (!(P = kd__new(g, KD_F32, 4, ps))) return NULL;
    }
    const int64_t N = d.N, hd = d.hd, C = d.C, pairs = d.Bw * heads;
    const float *X = kd_f32(qkv), *Bd = bias ? kd_f32(bias) : NULL, *M = mask ? kd_f32(mask) : NULL;
    float *Y = kd_f32(y), *Pd = P ? kd_f32(P) : NULL;
    int oom = 0;
#pragma omp parallel if (pairs * N * N * hd >= KD__PAR_MIN)
    {
        float *qs = malloc((size_t)(2 * N * hd + (Pd ? 0 : N * N)) * sizeof *qs);
        if (!qs) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            if (!qs) continue;
            int64_t b = p / heads, h = p % heads;
            float *S = Pd ? Pd + p * N * N : qs + 2 * N * hd;
            kd__attn_scores(&d, X, Bd, M, b, h, qs, qs + N * hd, S);
            const float *base = X + b * N * 3 * C + 2 * C + h * hd;
            for (int64_t i = 0; i < N; i++) {
                float *o = Y + (b * N + i) * C + h * hd;
                for (int64_t e = 0; e < hd; e++) o[e] = 0.0f;
                for (int64_t j = 0; j < N; j++) {
                    const float pij = S[i * N + j], *v = base + j * 3 * C;
                    #pragma omp simd
                    for (int64_t e = 0; e < hd; e++) o[e] += pij * v[e];
                }
            }
        }
        free(qs);
    }
    if (oom) return kd__fail(g, kd_error(KD_ERR_NOMEM, "window_attention: out of memory"));
    kd_tensor *in[3] = {qkv, bias, (kd_tensor *)mask};
    kd__node *n = kd__record(g, KD_OP_WINDOW_ATTENTION, y, 3, in);
    if (n) {
        n->saved[0] = P;
        n->p.dims.d0 = (int)heads;
    }
    return g->status == KD_OK ? y : NULL;
}

/* With P saved: dP = dO v^T, dS = P * (dP - rowsum(P * dP)), dq = scale dS k,
 * dk = dS^T (q scale), dv = P^T dO, dbias[h] = sum over windows of dS. */
kd_status kd__window_attention_backward(kd_graph *g, kd__node *n) {
    kd_tensor *qkv = n->in[0], *bias = n->in[1];
    const kd_tensor *P = n->saved[0];
    int64_t heads = n->p.dims.d0;
    kd__attn_dims d = {qkv->shape[0], qkv->shape[1], qkv->shape[2] / 3, heads, qkv->shape[2] / 3 / heads, 1, 0};
    d.scale = (float)pow((double)d.hd, -0.5);
    const int64_t N = d.N, hd = d.hd, C = d.C, pairs = d.Bw * heads, ld = 3 * C;
    int need_x = kd__needs_grad(g, qkv), need_b = bias && kd__needs_grad(g, bias);
    if (!need_x && !need_b) return KD_OK;
    if (!P) return kd_error(KD_ERR_INTERNAL, "window_attention: no saved probabilities");
    /* dS of every pair, kept for the bias gradient's ordered reduction. */
    kd_tensor *dst = kd__tmp_like(g, P);
    if (!dst) return g->status;
    float *dS = kd_f32(dst);
    const float *X = kd_f32(qkv), *Pd = kd_f32(P), *dY = kd_f32(n->out->grad);
    int acc = 0;
    kd_tensor *dx = need_x ? kd__grad(g, qkv, &acc) : NULL;
    if (need_x && !dx) return g->status;
    float *dX = dx ? kd_f32(dx) : NULL;
    int oom = 0;
#pragma omp parallel if (pairs * N * N * hd >= KD__PAR_MIN)
    {
        float *qs = malloc((size_t)(2 * N * hd + N * N + 3 * hd) * sizeof *qs);
        if (!qs) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            if (!qs) continue;
            int64_t b = p / heads, h = p % heads;
            const float *S = Pd + p * N * N, *base = X + b * N * ld;
            float *vt = qs + N * hd, *dp = vt + N * hd, *ds = dS + p * N * N;
            kd__attn_transpose(base + 2 * C + h * hd, ld, N, hd, vt);
            for (int64_t i = 0; i < N; i++) { /* dP and dS, row i */
                const float *go = dY + (b * N + i) * C + h * hd;
                float *dr = dp + i * N;
                for (int64_t j = 0; j < N; j++) dr[j] = 0.0f;
                for (int64_t e = 0; e < hd; e++) {
                    const float ge = go[e], *vr = vt + e * N;
                    #pragma omp simd
                    for (int64_t j = 0; j < N; j++) dr[j] += ge * vr[j];
                }
                float dot = 0.0f;
                for (int64_t j = 0; j < N; j++) dot += dr[j] * S[i * N + j];
                for (int64_t j = 0; j < N; j++) ds[i * N + j] = S[i * N + j] * (dr[j] - dot);
            }
            if (!dX) continue;
            for (int64_t i = 0; i < N; i++) {
                const float *q = base + i * ld + h * hd;
                for (int64_t e = 0; e < hd; e++) qs[i * hd + e] = q[e] * d.scale;
            }
            float *gb = dX + b * N * ld;
            for (int64_t i = 0; i < N; i++) { /* dq_i = scale sum_j dS_ij k_j */
                float *dq = gb + i * ld + h * hd;
                float *t = qs + 2 * N * hd + N * N;
                for (int64_t e = 0; e < hd; e++) t[e] = 0.0f;
                for (int64_t j = 0; j < N; j++) {
                    const float a = ds[i * N + j], *k = base + j * ld + C + h * hd;
                    #pragma omp simd
                    for (int64_t e = 0; e < hd; e++) t[e] += a * k[e];
                }
                for (int64_t e = 0; e < hd; e++) dq[e] = (acc ? dq[e] : 0.0f) + d.scale * t[e];
            }
            for (int64_t j = 0; j < N; j++) { /* dk_j = sum_i dS_ij qs_i, dv_j = sum_i P_ij dO_i */
                float *dk = gb + j * ld + C + h * hd, *dv = gb + j * ld + 2 * C + h * hd;
                float *tk = qs + 2 * N * hd + N * N + hd, *tv = tk + hd;
                for (int64_t e = 0; e < hd; e++) tk[e] = tv[e] = 0.0f;
                for (int64_t i = 0; i < N; i++) {
                    const float a = ds[i * N + j], pp = S[i * N + j], *q = qs + i * hd;
                    const float *go = dY + (b * N + i) * C + h * hd;
#pragma omp simd
                    for (int64_t e = 0; e < hd; e++) {
                        tk[e] += a * q[e];
                        tv[e] += pp * go[e];
                    }
                }
                for (int64_t e = 0; e < hd; e++) {
                    dk[e] = (acc ? dk[e] : 0.0f) + tk[e];
                    dv[e] = (acc ? dv[e] : 0.0f) + tv[e];
                }
            }
        }
        free(qs);
    }
    if (oom) {
        kd__tmp_free(g, dst);
        return kd_error(KD_ERR_NOMEM, "window_attention: out of memory in the backward");
    }
    if (need_b) { /* dbias[h][i][j] = sum over b of dS[b, h, i, j], b in order */
        int bacc;
        kd_tensor *db = kd__grad(g, bias, &bacc);
        if (!db) {
            kd__tmp_free(g, dst);
            return g->status;
        }
        float *D = kd_f32(db);
        const int64_t NN = N * N;
#pragma omp parallel for schedule(static) if (pairs * NN >= KD__PAR_MIN)
        for (int64_t t = 0; t < heads * NN; t++) {
            int64_t h = t / NN, ij = t % NN;
            float s = 0.0f;
            for (int64_t b = 0; b < d.Bw; b++) s += dS[(b * heads + h) * NN + ij];
            D[t] = (bacc ? D[t] : 0.0f) + s;
        }
    }
    kd__tmp_free(g, dst);
    return KD_OK;
}
