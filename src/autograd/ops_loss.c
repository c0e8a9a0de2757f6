/*
 * ops_loss.c: row-wise ops over the last axis and the losses, in plain C:
 * softmax (on the backend's softmax kernels), log_softmax, l2_normalize,
 * cross_entropy (with label smoothing),
 * kl_div (DistillKL) and mse. Rows run in parallel; every reduction to a
 * scalar sums per-row (or per-block) values in a fixed order, in double.
 */
#include "autograd/autograd_impl.h"

#include <math.h>
#include <string.h>

#define SHP(t, buf) kd_shape_str((t), (buf), sizeof(buf))

/* Rows of the last axis: (R, C). */
static void kd__rows(const kd_tensor *t, int64_t *R, int64_t *C) {
    *C = t->ndim ? t->shape[t->ndim - 1] : 1;
    *R = *C ? kd_tensor_numel(t) / *C : 0;
}

/* log(sum(exp(x))) of one row, stable. */
static float kd__lse(const float *x, int64_t C) {
    float m = -INFINITY;
    for (int64_t c = 0; c < C; c++) m = x[c] > m ? x[c] : m;
    if (m == -INFINITY) return m;
    double s = 0;
    for (int64_t c = 0; c < C; c++) s += exp((double)(x[c] - m));
    return m + (float)log(s);
}

/* Sums v[0..n) in order, in double. */
static double kd__sum_ordered(const double *v, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += v[i];
    return s;
}

static int kd__check_rows(kd_graph *g, const char *name, kd_tensor *x) {
    char bx[96];
    if (!kd__check_f32(g, name, "input", x)) return 0;
    if (x->ndim < 1) {
        kd__fail(g, kd_error(KD_ERR_SHAPE, "%s: input %s needs at least one axis", name,
                             SHP(x, bx)));
        return 0;
    }
    return 1;
}

/* ------------------------------------------------- softmax, log_softmax */

static kd_tensor *kd__softmax_any(kd_graph *g, kd_tensor *x, int logsm) {
    kd_op op = logsm ? KD_OP_LOG_SOFTMAX : KD_OP_SOFTMAX;
    const char *name = logsm ? "log_softmax" : "softmax";
    if (!g || !kd__ok_inputs(g, name, 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (!kd__check_rows(g, name, x)) return NULL;
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    int64_t R, C;
    kd__rows(x, &R, &C);
    if (!logsm) { /* the backend's kernel (oneDNN's softmax primitive on cpu) */
        kd_status s = R * C > 0 ? g->be->softmax_forward(g->be, x, y) : KD_OK;
        if (s != KD_OK) return kd__fail(g, s);
        kd__record(g, op, y, 1, &x);
        return g->status == KD_OK ? y : NULL;
    }
    const float *xd = kd_f32(x);
    float *yd = kd_f32(y);
#pragma omp parallel for schedule(static) if (R * C >= KD__PAR_MIN)
    for (int64_t r = 0; r < R; r++) {
        const float *xr = xd + r * C;
        float *yr = yd + r * C;
        float l = kd__lse(xr, C);
        for (int64_t c = 0; c < C; c++) yr[c] = xr[c] - l;
    }
    kd__record(g, op, y, 1, &x);
    return g->status == KD_OK ? y : NULL;
}

kd_tensor *kd_softmax(kd_graph *g, kd_tensor *x) { return kd__softmax_any(g, x, 0); }
kd_tensor *kd_log_softmax(kd_graph *g, kd_tensor *x) { return kd__softmax_any(g, x, 1); }

static kd_status kd__softmax_any_backward(kd_graph *g, kd__node *n, int logsm) {
    kd_tensor *x = n->in[0], *y = n->out;
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t R, C;
    kd__rows(x, &R, &C);
    if (!logsm) return R * C > 0 ? g->be->softmax_backward(g->be, y, y->grad, dx, acc) : KD_OK;
    const float *yd = kd_f32(y), *dy = kd_f32(y->grad);
    float *d = kd_f32(dx);
#pragma omp parallel for schedule(static) if (R * C >= KD__PAR_MIN)
    for (int64_t r = 0; r < R; r++) {
        const float *yr = yd + r * C, *gr = dy + r * C;
        float *dr = d + r * C;
        double s = 0;
        /* dx = dy - softmax(x) * sum(dy) */
        for (int64_t c = 0; c < C; c++) s += gr[c];
        for (int64_t c = 0; c < C; c++) {
            float v = gr[c] - expf(yr[c]) * (float)s;
            dr[c] = acc ? dr[c] + v : v;
        }
    }
    return KD_OK;
}

kd_status kd__softmax_backward(kd_graph *g, kd__node *n) {
    return kd__softmax_any_backward(g, n, 0);
}

kd_status kd__log_softmax_backward(kd_graph *g, kd__node *n) {
    return kd__softmax_any_backward(g, n, 1);
}

/* ------------------------------------------------------ cross entropy */

kd_tensor *kd_cross_entropy(kd_graph *g, kd_tensor *logits, const kd_tensor *labels,
                            float label_smoothing) {
    kd_tensor *in[2] = {logits, (kd_tensor *)labels};
    char bx[96], bl[96];
    if (!g || !kd__ok_inputs(g, "cross_entropy", 2, in)) return NULL;
    if (!(logits = in[0] = kd__to_strided(g, logits))) return NULL;
    if (!kd__check_f32(g, "cross_entropy", "logits", logits)) return NULL;
    if (logits->ndim != 2 || logits->shape[0] == 0 || logits->shape[1] == 0)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "cross_entropy: logits %s must be (N, C) with "
                                                  "N, C > 0", SHP(logits, bx)));
    int64_t N = logits->shape[0], C = logits->shape[1];
    if ((labels->dtype != KD_I32 && labels->dtype != KD_I64) || !kd_tensor_is_contiguous(labels))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "cross_entropy: labels must be contiguous "
                                                    "I32 or I64, got %s",
                                    kd_dtype_name(labels->dtype)));
    if (labels->ndim != 1 || labels->shape[0] != N)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "cross_entropy: labels %s do not match logits "
                                                  "%s (expected (%lld))",
                                    SHP(labels, bl), SHP(logits, bx), (long long)N));
    if (!(label_smoothing >= 0.0f && label_smoothing <= 1.0f))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "cross_entropy: label smoothing %g is "
                                                    "outside [0, 1]",
                                    (double)label_smoothing));
    int32_t *lab = kd__scratch(g, (size_t)N * sizeof *lab);
    float *lse = kd__scratch(g, (size_t)N * sizeof *lse);
    double *row = kd__scratch(g, (size_t)N * sizeof *row);
    kd_tensor *y = kd__new(g, KD_F32, 0, NULL);
    if (!lab || !lse || !row || !y) return NULL;
    for (int64_t i = 0; i < N; i++) {
        int64_t v = labels->dtype == KD_I32 ? ((const int32_t *)labels->data)[i]
                                            : ((const int64_t *)labels->data)[i];
        if (v < 0 || v >= C)
            return kd__fail(g, kd_error(KD_ERR_INVALID, "cross_entropy: label %lld at index %lld "
                                                        "is outside [0, %lld) for %lld classes",
                                        (long long)v, (long long)i, (long long)C, (long long)C));
        lab[i] = (int32_t)v;
    }
    const float *x = kd_f32(logits);
    double eps = label_smoothing;
#pragma omp parallel for schedule(static) if (N * C >= KD__PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        const float *xr = x + i * C;
        float l = kd__lse(xr, C);
        lse[i] = l;
        double mean_x = 0;
        if (eps > 0) {
            for (int64_t c = 0; c < C; c++) mean_x += xr[c];
            mean_x /= (double)C;
        }
        /* (1 - eps) * (-log p_y) + eps * mean_c(-log p_c) */
        row[i] = (1.0 - eps) * ((double)l - xr[lab[i]]) + eps * ((double)l - mean_x);
    }
    kd_f32(y)[0] = (float)(kd__sum_ordered(row, N) / (double)N);
    kd__node *n = kd__record(g, KD_OP_CROSS_ENTROPY, y, 1, in);
    if (n) {
        n->p.ce.labels = lab;
        n->aux = lse;
        n->p.ce.smoothing = label_smoothing;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__cross_entropy_backward(kd_graph *g, kd__node *n) {
    kd_tensor *logits = n->in[0];
    int acc;
    if (!kd__needs_grad(g, logits)) return KD_OK;
    kd_tensor *dx = kd__grad(g, logits, &acc);
    if (!dx) return g->status;
    int64_t N = logits->shape[0], C = logits->shape[1];
    const float *x = kd_f32(logits), *lse = n->aux;
    const int32_t *lab = n->p.ce.labels;
    float *d = kd_f32(dx);
    float eps = n->p.ce.smoothing, gs = kd_f32(n->out->grad)[0] / (float)N;
    float off = eps / (float)C, hit = 1.0f - eps;
    /* dlogits = (softmax - (1 - eps) * onehot - eps / C) * dy / N */
#pragma omp parallel for schedule(static) if (N * C >= KD__PAR_MIN)
    for (int64_t i = 0; i < N; i++) {
        const float *xr = x + i * C;
        float *dr = d + i * C;
        for (int64_t c = 0; c < C; c++) {
            float v = expf(xr[c] - lse[i]) - off - (c == lab[i] ? hit : 0.0f);
            dr[c] = acc ? dr[c] + gs * v : gs * v;
        }
    }
    return KD_OK;
}

/* ------------------------------------------------------------- kl_div */

kd_tensor *kd_kl_div(kd_graph *g, kd_tensor *student_logits, kd_tensor *teacher_logits,
                     float T) {
    kd_tensor *in[2] = {student_logits, teacher_logits};
    char bs[96], bt[96];
    if (!g || !kd__ok_inputs(g, "kl_div", 2, in)) return NULL;
    if (!(student_logits = in[0] = kd__to_strided(g, student_logits)) ||
        !(teacher_logits = in[1] = kd__to_strided(g, teacher_logits)))
        return NULL;
    if (!kd__check_rows(g, "kl_div", student_logits) ||
        !kd__check_rows(g, "kl_div", teacher_logits))
        return NULL;
    if (!kd_tensor_same_shape(student_logits, teacher_logits))
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "kl_div: student logits %s and teacher logits "
                                                  "%s differ",
                                    SHP(student_logits, bs), SHP(teacher_logits, bt)));
    if (!(T > 0.0f))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "kl_div: temperature %g must be positive",
                                    (double)T));
    int64_t R, C, N = student_logits->shape[0];
    kd__rows(student_logits, &R, &C);
    kd_tensor *lps = kd__new_like(g, student_logits), *lpt = kd__new_like(g, teacher_logits);
    double *row = kd__scratch(g, (size_t)(R ? R : 1) * sizeof *row);
    kd_tensor *y = kd__new(g, KD_F32, 0, NULL);
    if (!lps || !lpt || !row || !y) return NULL;
    const float *s = kd_f32(student_logits), *t = kd_f32(teacher_logits);
    float *ls = kd_f32(lps), *lt = kd_f32(lpt), invT = 1.0f / T;
#pragma omp parallel for schedule(static) if (R * C >= KD__PAR_MIN)
    for (int64_t r = 0; r < R; r++) {
        float *a = ls + r * C, *b = lt + r * C;
        for (int64_t c = 0; c < C; c++) {
            a[c] = s[r * C + c] * invT;
            b[c] = t[r * C + c] * invT;
        }
        float la = kd__lse(a, C), lb = kd__lse(b, C);
        double k = 0;
        for (int64_t c = 0; c < C; c++) {
            a[c] -= la;
            b[c] -= lb;
            k += (double)expf(b[c]) * ((double)b[c] - a[c]);
        }
        row[r] = k;
    }
    kd_f32(y)[0] = N ? (float)(kd__sum_ordered(row, R) * T * T / (double)N) : 0.0f;
    kd__node *n = kd__record(g, KD_OP_KL_DIV, y, 2, in);
    if (n) {
        n->p.f.a = T;
        n->saved[0] = lps;
        n->saved[1] = lpt;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__kl_div_backward(kd_graph *g, kd__node *n) {
    kd_tensor *s = n->in[0], *t = n->in[1];
    int ns = kd__needs_grad(g, s), nt = kd__needs_grad(g, t), as = 0, at = 0;
    kd_tensor *ds = NULL, *dt = NULL;
    if (ns && !(ds = kd__grad(g, s, &as))) return g->status;
    if (nt && !(dt = kd__grad(g, t, &at))) return g->status;
    int64_t R, C, N = s->shape[0];
    kd__rows(s, &R, &C);
    float T = n->p.f.a, gk = kd_f32(n->out->grad)[0] * T / (float)N;
    const float *ls = kd_f32(n->saved[0]), *lt = kd_f32(n->saved[1]);
    float *dsd = ds ? kd_f32(ds) : NULL, *dtd = dt ? kd_f32(dt) : NULL;
    /* d/ds = T/N (p_s - p_t);  d/dt = T/N p_t (r - sum(p_t r)), r = log p_t - log p_s */
#pragma omp parallel for schedule(static) if (R * C >= KD__PAR_MIN)
    for (int64_t r = 0; r < R; r++) {
        const float *a = ls + r * C, *b = lt + r * C;
        if (dsd) {
            float *d = dsd + r * C;
            for (int64_t c = 0; c < C; c++) {
                float v = gk * (expf(a[c]) - expf(b[c]));
                d[c] = as ? d[c] + v : v;
            }
        }
        if (dtd) {
            double m = 0;
            for (int64_t c = 0; c < C; c++) m += (double)expf(b[c]) * ((double)b[c] - a[c]);
            float *d = dtd + r * C;
            for (int64_t c = 0; c < C; c++) {
                float v = gk * expf(b[c]) * ((b[c] - a[c]) - (float)m);
                d[c] = at ? d[c] + v : v;
            }
        }
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- mse */

#define KD__MSE_BLOCK 4096

kd_tensor *kd_mse(kd_graph *g, kd_tensor *a, kd_tensor *b) {
    kd_tensor *in[2] = {a, b};
    char ba[96], bb[96];
    if (!g || !kd__ok_inputs(g, "mse", 2, in)) return NULL;
    if (!(a = in[0] = kd__to_strided(g, a)) || !(b = in[1] = kd__to_strided(g, b))) return NULL;
    if (!kd__check_f32(g, "mse", "a", a) || !kd__check_f32(g, "mse", "b", b)) return NULL;
    if (!kd_tensor_same_shape(a, b))
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "mse: shapes %s and %s differ", SHP(a, ba),
                                    SHP(b, bb)));
    int64_t n = kd_tensor_numel(a), nb = (n + KD__MSE_BLOCK - 1) / KD__MSE_BLOCK;
    double *part = kd__scratch(g, (size_t)(nb ? nb : 1) * sizeof *part);
    kd_tensor *y = kd__new(g, KD_F32, 0, NULL);
    if (!part || !y) return NULL;
    const float *x0 = kd_f32(a), *x1 = kd_f32(b);
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN)
    for (int64_t k = 0; k < nb; k++) {
        int64_t lo = k * KD__MSE_BLOCK, hi = lo + KD__MSE_BLOCK < n ? lo + KD__MSE_BLOCK : n;
        double s = 0;
        for (int64_t i = lo; i < hi; i++) {
            double d = (double)x0[i] - x1[i];
            s += d * d;
        }
        part[k] = s;
    }
    kd_f32(y)[0] = n ? (float)(kd__sum_ordered(part, nb) / (double)n) : NAN;
    kd__record(g, KD_OP_MSE, y, 2, in);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__mse_backward(kd_graph *g, kd__node *n) {
    kd_tensor *a = n->in[0], *b = n->in[1];
    int64_t cnt = kd_tensor_numel(a);
    float k = 2.0f * kd_f32(n->out->grad)[0] / (float)(cnt ? cnt : 1);
    const float *x0 = kd_f32(a), *x1 = kd_f32(b);
    for (int side = 0; side < 2; side++) {
        kd_tensor *x = n->in[side];
        int acc;
        if (!kd__needs_grad(g, x)) continue;
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        float *d = kd_f32(dx), s = side ? -k : k;
#pragma omp parallel for schedule(static) if (cnt >= KD__PAR_MIN)
        for (int64_t i = 0; i < cnt; i++) {
            float v = s * (x0[i] - x1[i]);
            d[i] = acc ? d[i] + v : v;
        }
    }
    return KD_OK;
}

/* -------------------------------------------------------- l2_normalize */

kd_tensor *kd_l2_normalize(kd_graph *g, kd_tensor *x, float eps) {
    if (!g || !kd__ok_inputs(g, "l2_normalize", 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (!kd__check_rows(g, "l2_normalize", x)) return NULL;
    if (!(eps >= 0.0f))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "l2_normalize: eps %g is negative",
                                    (double)eps));
    int64_t R, C;
    kd__rows(x, &R, &C);
    kd_tensor *y = kd__new_like(g, x);
    float *norm = kd__scratch(g, (size_t)(R ? R : 1) * sizeof *norm);
    if (!y || !norm) return NULL;
    const float *xd = kd_f32(x);
    float *yd = kd_f32(y);
#pragma omp parallel for schedule(static) if (R * C >= KD__PAR_MIN)
    for (int64_t r = 0; r < R; r++) {
        const float *xr = xd + r * C;
        double s = 0;
        for (int64_t c = 0; c < C; c++) s += (double)xr[c] * xr[c];
        float nr = (float)sqrt(s), den = nr > eps ? nr : eps;
        norm[r] = nr;
        for (int64_t c = 0; c < C; c++) yd[r * C + c] = xr[c] / den;
    }
    kd__node *n = kd__record(g, KD_OP_L2_NORMALIZE, y, 1, &x);
    if (n) {
        n->p.f.a = eps;
        n->aux = norm;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__l2_normalize_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *y = n->out;
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t R, C;
    kd__rows(x, &R, &C);
    const float *norm = n->aux;
    const float *yd = kd_f32(y), *dy = kd_f32(y->grad);
    float *d = kd_f32(dx), eps = n->p.f.a;
    /* norm > eps: dx = (dy - y (y . dy)) / norm; else the denominator is the
     * constant eps and dx = dy / eps. */
#pragma omp parallel for schedule(static) if (R * C >= KD__PAR_MIN)
    for (int64_t r = 0; r < R; r++) {
        const float *yr = yd + r * C, *gr = dy + r * C;
        float *dr = d + r * C;
        double dot = 0;
        int clamped = !(norm[r] > eps);
        if (!clamped)
            for (int64_t c = 0; c < C; c++) dot += (double)yr[c] * gr[c];
        float inv = 1.0f / (clamped ? eps : norm[r]);
        for (int64_t c = 0; c < C; c++) {
            float v = (gr[c] - yr[c] * (float)dot) * inv;
            dr[c] = acc ? dr[c] + v : v;
        }
    }
    return KD_OK;
}
