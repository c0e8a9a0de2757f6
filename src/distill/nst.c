/* NST: Neuron Selectivity Transfer (Huang & Wang, "Like What You Like:
 * Knowledge Distill via Neuron Selectivity Transfer", arXiv 2017) as
 * RepDistiller runs it (distiller_zoo/NST.py NSTLoss on the pairs of
 * feat[1:-1], zipped so that the shorter list decides the count, summed in
 * helper/loops.py; beta 50 in scripts/run_cifar_distill.sh).
 *
 * Per pair: the map with the larger height is adaptive-average-pooled to the
 * other's (H, H); each channel's map, flattened to H*W, is L2-normalised
 * (F.normalize, eps 1e-12); with the polynomial kernel k(a, b) = (a.b)^2 over
 * the channels of one sample,
 *     MMD^2 = mean k(t, t) (detached) + mean k(s, s) - 2 mean k(s, t)
 * where each mean runs over (N, C, C') (full_loss, the official default;
 * nst.full_loss=0 drops the constant teacher term as the official switch
 * does). The term is the sum over the pairs. No module.
 *
 * The kernel means are one kd_function: per-sample Gram matrices from the
 * backend's gemm, their squares summed in double. The teacher maps arrive
 * detached (helper/loops.py) and get no gradient. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "distill/methods.h"

/* F.normalize's eps. */
#define NST_NORMALIZE_EPS 1e-12f

typedef struct {
    int full_loss; /* include the (constant) teacher-teacher kernel mean */
} nst_args;

static const kd_method_arg nst_arg_table[] = {
    KD__ARG(nst_args, full_loss, KD_ARG_BOOL, "1",
            "add the detached mean k(t, t), as the official full_loss (no effect on gradients)"),
};

typedef struct {
    int n_pairs; /* pairs of feat[1:-1] */
} nst_state;

static kd_status nst_need_contiguous(const char *what, kd_tensor *const *in, int n_in) {
    for (int i = 0; i < n_in; i++)
        if (!kd_tensor_is_contiguous(in[i])) return kd_error(KD_ERR_INVALID, "%s: input %d is not contiguous", what, i);
    return KD_OK;
}

/* ------------------------------------------------ adaptive average pooling */

/* PyTorch's F.adaptive_avg_pool2d: output cell (oy, ox) averages input rows
 * [floor(oy H / OH), ceil((oy + 1) H / OH)) and the same for columns. */
typedef struct {
    int64_t oh, ow;
} nst_pool_params;

static int64_t nst_pool_start(int64_t o, int64_t in, int64_t out) { return (o * in) / out; }
static int64_t nst_pool_end(int64_t o, int64_t in, int64_t out) { return ((o + 1) * in + out - 1) / out; }

static kd_status nst_pool_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                              void **saved) {
    (void)g, (void)saved;
    KD_TRY(nst_need_contiguous("nst: adaptive_avgpool2d", in, n_in));
    const nst_pool_params *p = params;
    const kd_tensor *x = in[0];
    int64_t NC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    const float *xd = kd_f32(x);
    float *y = kd_f32(out);
    for (int64_t r = 0; r < NC; r++)
        for (int64_t oy = 0; oy < p->oh; oy++) {
            int64_t y0 = nst_pool_start(oy, H, p->oh), y1 = nst_pool_end(oy, H, p->oh);
            for (int64_t ox = 0; ox < p->ow; ox++) {
                int64_t x0 = nst_pool_start(ox, W, p->ow), x1 = nst_pool_end(ox, W, p->ow);
                double s = 0;
                for (int64_t iy = y0; iy < y1; iy++)
                    for (int64_t ix = x0; ix < x1; ix++) s += xd[(r * H + iy) * W + ix];
                y[(r * p->oh + oy) * p->ow + ox] = (float)(s / (double)((y1 - y0) * (x1 - x0)));
            }
        }
    return KD_OK;
}

static kd_status nst_pool_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                              const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    if (!gin[0]) return KD_OK;
    const nst_pool_params *p = params;
    const kd_tensor *x = in[0];
    int64_t NC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    const float *gy = kd_f32(gout);
    float *gx = kd_f32(gin[0]);
    for (int64_t r = 0; r < NC; r++)
        for (int64_t oy = 0; oy < p->oh; oy++) {
            int64_t y0 = nst_pool_start(oy, H, p->oh), y1 = nst_pool_end(oy, H, p->oh);
            for (int64_t ox = 0; ox < p->ow; ox++) {
                int64_t x0 = nst_pool_start(ox, W, p->ow), x1 = nst_pool_end(ox, W, p->ow);
                float v = (float)(gy[(r * p->oh + oy) * p->ow + ox] / (double)((y1 - y0) * (x1 - x0)));
                for (int64_t iy = y0; iy < y1; iy++)
                    for (int64_t ix = x0; ix < x1; ix++) gx[(r * H + iy) * W + ix] += v;
            }
        }
    return KD_OK;
}

static const kd_function nst_pool_fn = {"nst_adaptive_avgpool2d", nst_pool_fwd, nst_pool_bwd};

static kd_tensor *nst_pool(kd_graph *g, kd_tensor *x, int64_t oh, int64_t ow) {
    nst_pool_params p = {oh, ow};
    int64_t shape[4] = {x->shape[0], x->shape[1], oh, ow};
    return kd_function_apply(g, &nst_pool_fn, &p, sizeof p, 1, &x, 4, shape);
}

/* ------------------------------------------------ polynomial-kernel MMD */

/* in: s (N, Cs, L), t (N, Ct, L), rows already normalised -> 0-d
 *     [full] mean k(t, t) + mean k(s, s) - 2 mean k(s, t),  k(a, b) = (a.b)^2.
 * Per sample the dot products are the Gram matrices G = s s^T (Cs, Cs) and
 * X = t s^T (Ct, Cs), from the backend's gemm; their squares are summed in
 * double. The forward keeps G and X for the backward:
 *     d/ds = 4 / (N Cs^2) G s - 4 / (N Ct Cs) X^T t. */
typedef struct {
    int full;
} nst_mmd_params;

typedef struct {
    float *G; /* (N, Cs, Cs) */
    float *X; /* (N, Ct, Cs) */
} nst_mmd_saved;

static double nst_sumsq(const float *a, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * a[i];
    return s;
}

static kd_status nst_mmd_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                             void **saved) {
    KD_TRY(nst_need_contiguous("nst: kernel MMD", in, n_in));
    const nst_mmd_params *p = params;
    kd_backend *be = kd_graph_backend(g);
    int64_t N = in[0]->shape[0], Cs = in[0]->shape[1], Ct = in[1]->shape[1], L = in[0]->shape[2];
    const float *s = kd_f32(in[0]), *t = kd_f32(in[1]);
    nst_mmd_saved *sv = kd_function_alloc(g, sizeof *sv);
    float *buf = kd_function_alloc(g, (size_t)(N * Cs * Cs + N * Ct * Cs + (p->full ? Ct * Ct : 0)) * sizeof(float));
    if (!sv || !buf) return kd_graph_status(g);
    sv->G = buf;
    sv->X = buf + N * Cs * Cs;
    float *tt = sv->X + N * Ct * Cs; /* (Ct, Ct) scratch */
    double ktt = 0, kss = 0, kst = 0;
    for (int64_t n = 0; n < N; n++) {
        const float *sn = s + n * Cs * L, *tn = t + n * Ct * L;
        float *Gn = sv->G + n * Cs * Cs, *Xn = sv->X + n * Ct * Cs;
        KD_TRY(be->gemm(be, 0, 1, Cs, Cs, L, 1.0f, sn, L, sn, L, 0.0f, Gn, Cs));
        KD_TRY(be->gemm(be, 0, 1, Ct, Cs, L, 1.0f, tn, L, sn, L, 0.0f, Xn, Cs));
        kss += nst_sumsq(Gn, Cs * Cs);
        kst += nst_sumsq(Xn, Ct * Cs);
        if (p->full) {
            KD_TRY(be->gemm(be, 0, 1, Ct, Ct, L, 1.0f, tn, L, tn, L, 0.0f, tt, Ct));
            ktt += nst_sumsq(tt, Ct * Ct);
        }
    }
    kd_f32(out)[0] =
        (float)(ktt / (double)(N * Ct * Ct) + kss / (double)(N * Cs * Cs) - 2 * kst / (double)(N * Ct * Cs));
    *saved = sv;
    return KD_OK;
}

static kd_status nst_mmd_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                             const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)params, (void)n_in, (void)out;
    if (!gin[0]) return KD_OK; /* the teacher maps arrive detached */
    const nst_mmd_saved *sv = saved;
    kd_backend *be = kd_graph_backend(g);
    int64_t N = in[0]->shape[0], Cs = in[0]->shape[1], Ct = in[1]->shape[1], L = in[0]->shape[2];
    const float *s = kd_f32(in[0]), *t = kd_f32(in[1]);
    float *gs = kd_f32(gin[0]);
    double gy = kd_f32(gout)[0];
    float css = (float)(4.0 * gy / (double)(N * Cs * Cs)), cst = (float)(-4.0 * gy / (double)(N * Ct * Cs));
    for (int64_t n = 0; n < N; n++) {
        const float *sn = s + n * Cs * L, *tn = t + n * Ct * L;
        float *gn = gs + n * Cs * L;
        KD_TRY(be->gemm(be, 0, 0, Cs, L, Cs, css, sv->G + n * Cs * Cs, Cs, sn, L, 1.0f, gn, L));
        KD_TRY(be->gemm(be, 1, 0, Cs, L, Ct, cst, sv->X + n * Ct * Cs, Cs, tn, L, 1.0f, gn, L));
    }
    return KD_OK;
}

static const kd_function nst_mmd_fn = {"nst_mmd", nst_mmd_fwd, nst_mmd_bwd};

/* ------------------------------------------------ the method */

/* Whether maps (hs, ws) and (ht, wt) meet after the official pooling: the
 * one with the larger height goes to (H, H) of the other. */
static int nst_poolable(int64_t hs, int64_t ws, int64_t ht, int64_t wt) {
    if (hs > ht) return wt == ht;
    if (hs < ht) return ws == hs;
    return ws == wt;
}

static kd_status nst_setup(kd_method *m, const kd_method_shapes *shp) {
    nst_state *st = kd_method_state(m);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    char bs[96], bt[96];
    int n = (s->n_feat < t->n_feat ? s->n_feat : t->n_feat) - 2;
    if (n < 1)
        return kd_error(KD_ERR_SHAPE,
                        "nst pairs the feature maps feat[1:-1] of both nets, but the student exposes %d features "
                        "and the teacher %d (at least 3 each needed)",
                        s->n_feat, t->n_feat);
    for (int k = 1; k <= n; k++) {
        const int64_t *fs = s->feat[k], *ft = t->feat[k];
        if (s->feat_ndim[k] != 4 || t->feat_ndim[k] != 4 || !nst_poolable(fs[2], fs[3], ft[2], ft[3]))
            return kd_error(KD_ERR_SHAPE,
                            "nst: feat[%d] of the student %s and of the teacher %s cannot be paired (maps whose "
                            "larger one pools to the other's (H, H))",
                            k, kd__shape_text(s->feat_ndim[k], fs, bs, sizeof bs),
                            kd__shape_text(t->feat_ndim[k], ft, bt, sizeof bt));
    }
    st->n_pairs = n;
    return KD_OK;
}

/* (N, C, H, W) -> (N, C, H*W) with L2-normalised rows. */
static kd_tensor *nst_rows(kd_graph *g, kd_tensor *x) {
    int64_t shape[3] = {x->shape[0], x->shape[1], x->shape[2] * x->shape[3]};
    return kd_l2_normalize(g, kd_reshape(g, x, 3, shape), NST_NORMALIZE_EPS);
}

static kd_status nst_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const nst_args *a = kd_method_args(m);
    nst_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    kd_tensor *total = NULL;
    *out = NULL;
    for (int k = 0; k < st->n_pairs; k++) {
        kd_tensor *fs = kd_method_feat(g, &ctx->s, k + 1, 0), *ft = kd_method_feat(g, &ctx->t, k + 1, 0);
        if (!fs || !ft) return kd_error(KD_ERR_INVALID, "nst: feat[%d] is missing", k + 1);
        char bs[96], bt[96];
        if (fs->ndim != 4 || ft->ndim != 4 || fs->shape[0] != ft->shape[0])
            return kd_error(KD_ERR_SHAPE, "nst: feat[%d] student %s and teacher %s are not maps of one batch", k + 1,
                            kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt));
        int64_t hs = fs->shape[2], ht = ft->shape[2];
        kd_tensor *x = hs > ht ? nst_pool(g, fs, ht, ht) : fs;
        kd_tensor *y = hs < ht ? nst_pool(g, ft, hs, hs) : ft;
        if (!x || !y) return kd_graph_status(g);
        if (x->shape[2] != y->shape[2] || x->shape[3] != y->shape[3])
            return kd_error(KD_ERR_SHAPE, "nst: feat[%d] student %s and teacher %s cannot be pooled to one size",
                            k + 1, kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt));
        nst_mmd_params p = {a->full_loss};
        kd_tensor *in[2] = {nst_rows(g, x), nst_rows(g, y)};
        kd_tensor *l = kd_function_apply(g, &nst_mmd_fn, &p, sizeof p, 2, in, 0, NULL);
        total = total ? kd_add(g, total, l) : l;
    }
    *out = total;
    return kd_graph_status(g);
}

const kd_method_def kd__method_nst = {
    .name = "nst",
    .summary = "NST: polynomial-kernel MMD between channel-normalised maps of feat[1:-1] pairs",
    .paper = "Huang, Wang: Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, arXiv 2017",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 50.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(nst_arg_table),
    .args_size = sizeof(nst_args),
    .state_size = sizeof(nst_state),
    .setup = nst_setup,
    .term = nst_term,
};
