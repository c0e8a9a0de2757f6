/* VID: Variational Information Distillation (Ahn, Hu, Damianou, Lawrence,
 * Dai, CVPR 2019) as RepDistiller runs it (distiller_zoo/VID.py VIDLoss;
 * train_student.py builds VIDLoss(C_s, C_t, C_t) for each pair of feat[1:-1],
 * zipped so that the shorter list decides the count; helper/loops.py sums the
 * per-pair losses; beta 1 in scripts/run_cifar_distill.sh).
 *
 * Per pair: the map with the larger height is adaptive-average-pooled to the
 * other's (H, H), as the official code does; a regressor of three 1x1
 * convolutions without bias, C_s -> C_t -> C_t -> C_t with ReLU between,
 * predicts the teacher map's mean; the variance is per teacher channel,
 *     pred_var = log(1 + exp(log_scale)) + eps,
 * log_scale initialised to log(exp(init_pred_var - eps) - 1); the term is
 *     mean over (N, C_t, H, W) of 0.5 * ((mu - t)^2 / pred_var + log(pred_var))
 * summed over the pairs. The modules are named as the official criterion's
 * state_dict (an nn.ModuleList of VIDLoss): "<k>.log_scale",
 * "<k>.regressor.{0,2,4}.weight". Everything is trainable and weight-decayed,
 * as RepDistiller's SGD over trainable_list does. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "distill/methods.h"

typedef struct {
    float init_pred_var; /* initial predicted variance */
    float eps;           /* added to the softplus variance */
} vid_args;

static const kd_method_arg vid_arg_table[] = {
    KD__ARG(vid_args, init_pred_var, KD_ARG_FLOAT, "5.0", "initial variance of the Gaussian (log_scale init)"),
    KD__ARG(vid_args, eps, KD_ARG_FLOAT, "1e-5", "added to softplus(log_scale): pred_var floor"),
};

typedef struct {
    kd_conv2d_layer conv[3]; /* regressor.0, .2, .4: 1x1, no bias */
    kd_tensor *log_scale;    /* (C_t) */
} vid_pair;

typedef struct {
    int n_pairs;                  /* pairs of feat[1:-1] */
    vid_pair pair[KD_MAX_FEATS];
} vid_state;

/* The kd_functions below index their inputs as contiguous row-major arrays. */
static kd_status vid_need_contiguous(const char *what, kd_tensor *const *in, int n_in) {
    for (int i = 0; i < n_in; i++)
        if (!kd_tensor_is_contiguous(in[i])) return kd_error(KD_ERR_INVALID, "%s: input %d is not contiguous", what, i);
    return KD_OK;
}

/* ------------------------------------------------ adaptive average pooling */

/* PyTorch's F.adaptive_avg_pool2d: output cell (oy, ox) averages input rows
 * [floor(oy H / OH), ceil((oy + 1) H / OH)) and the same for columns. */
typedef struct {
    int64_t oh, ow;
} vid_pool_params;

static int64_t vid_pool_start(int64_t o, int64_t in, int64_t out) { return (o * in) / out; }
static int64_t vid_pool_end(int64_t o, int64_t in, int64_t out) { return ((o + 1) * in + out - 1) / out; }

static kd_status vid_pool_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                              void **saved) {
    (void)g, (void)saved;
    KD_TRY(vid_need_contiguous("vid: adaptive_avgpool2d", in, n_in));
    const vid_pool_params *p = params;
    const kd_tensor *x = in[0];
    int64_t NC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    const float *xd = kd_f32(x);
    float *y = kd_f32(out);
    for (int64_t r = 0; r < NC; r++)
        for (int64_t oy = 0; oy < p->oh; oy++) {
            int64_t y0 = vid_pool_start(oy, H, p->oh), y1 = vid_pool_end(oy, H, p->oh);
            for (int64_t ox = 0; ox < p->ow; ox++) {
                int64_t x0 = vid_pool_start(ox, W, p->ow), x1 = vid_pool_end(ox, W, p->ow);
                double s = 0;
                for (int64_t iy = y0; iy < y1; iy++)
                    for (int64_t ix = x0; ix < x1; ix++) s += xd[(r * H + iy) * W + ix];
                y[(r * p->oh + oy) * p->ow + ox] = (float)(s / (double)((y1 - y0) * (x1 - x0)));
            }
        }
    return KD_OK;
}

static kd_status vid_pool_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                              const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    if (!gin[0]) return KD_OK;
    const vid_pool_params *p = params;
    const kd_tensor *x = in[0];
    int64_t NC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    const float *gy = kd_f32(gout);
    float *gx = kd_f32(gin[0]);
    for (int64_t r = 0; r < NC; r++)
        for (int64_t oy = 0; oy < p->oh; oy++) {
            int64_t y0 = vid_pool_start(oy, H, p->oh), y1 = vid_pool_end(oy, H, p->oh);
            for (int64_t ox = 0; ox < p->ow; ox++) {
                int64_t x0 = vid_pool_start(ox, W, p->ow), x1 = vid_pool_end(ox, W, p->ow);
                float v = (float)(gy[(r * p->oh + oy) * p->ow + ox] / (double)((y1 - y0) * (x1 - x0)));
                for (int64_t iy = y0; iy < y1; iy++)
                    for (int64_t ix = x0; ix < x1; ix++) gx[(r * H + iy) * W + ix] += v;
            }
        }
    return KD_OK;
}

static const kd_function vid_pool_fn = {"vid_adaptive_avgpool2d", vid_pool_fwd, vid_pool_bwd};

static kd_tensor *vid_pool(kd_graph *g, kd_tensor *x, int64_t oh, int64_t ow) {
    vid_pool_params p = {oh, ow};
    int64_t shape[4] = {x->shape[0], x->shape[1], oh, ow};
    return kd_function_apply(g, &vid_pool_fn, &p, sizeof p, 1, &x, 4, shape);
}

/* ------------------------------------------------ Gaussian negative log-likelihood */

/* in: mu (N, C, H, W), target (N, C, H, W), log_scale (C) -> 0-d
 *     mean 0.5 * ((mu - target)^2 / v_c + log v_c),  v_c = log(1 + exp(log_scale_c)) + eps.
 * The target is a teacher map: it gets a gradient only if it asks for one. */
typedef struct {
    double eps;
} vid_nll_params;

static kd_status vid_nll_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                             void **saved) {
    (void)g, (void)saved;
    KD_TRY(vid_need_contiguous("vid: Gaussian likelihood", in, n_in));
    const vid_nll_params *p = params;
    const kd_tensor *mu = in[0];
    int64_t N = mu->shape[0], C = mu->shape[1], HW = mu->shape[2] * mu->shape[3];
    const float *m = kd_f32(mu), *t = kd_f32(in[1]), *ls = kd_f32(in[2]);
    double acc = 0;
    for (int64_t c = 0; c < C; c++) {
        double v = log(1.0 + exp((double)ls[c])) + p->eps, sq = 0;
        for (int64_t n = 0; n < N; n++) {
            const float *mr = m + (n * C + c) * HW, *tr = t + (n * C + c) * HW;
            for (int64_t i = 0; i < HW; i++) {
                double d = (double)mr[i] - tr[i];
                sq += d * d;
            }
        }
        acc += 0.5 * (sq / v + (double)(N * HW) * log(v));
    }
    kd_f32(out)[0] = (float)(acc / (double)(N * C * HW));
    return KD_OK;
}

static kd_status vid_nll_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                             const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    const vid_nll_params *p = params;
    const kd_tensor *mu = in[0];
    int64_t N = mu->shape[0], C = mu->shape[1], HW = mu->shape[2] * mu->shape[3];
    const float *m = kd_f32(mu), *t = kd_f32(in[1]), *ls = kd_f32(in[2]);
    double scale = (double)kd_f32(gout)[0] / (double)(N * C * HW);
    for (int64_t c = 0; c < C; c++) {
        double e = exp((double)ls[c]), v = log(1.0 + e) + p->eps, sq = 0;
        for (int64_t n = 0; n < N; n++) {
            const float *mr = m + (n * C + c) * HW, *tr = t + (n * C + c) * HW;
            float *gm = gin[0] ? kd_f32(gin[0]) + (n * C + c) * HW : NULL;
            float *gt = gin[1] ? kd_f32(gin[1]) + (n * C + c) * HW : NULL;
            for (int64_t i = 0; i < HW; i++) {
                double d = (double)mr[i] - tr[i];
                sq += d * d;
                if (gm) gm[i] += (float)(scale * d / v);
                if (gt) gt[i] -= (float)(scale * d / v);
            }
        }
        /* d/dv of 0.5 (sq / v + count log v), times dv/dlog_scale = sigmoid(log_scale). */
        if (gin[2])
            kd_f32(gin[2])[c] += (float)(scale * 0.5 * ((double)(N * HW) / v - sq / (v * v)) * (e / (1.0 + e)));
    }
    return KD_OK;
}

static const kd_function vid_nll_fn = {"vid_nll", vid_nll_fwd, vid_nll_bwd};

/* ------------------------------------------------ the method */

/* Whether maps (hs, ws) and (ht, wt) meet after the official pooling: the
 * one with the larger height goes to (H, H) of the other. */
static int vid_poolable(int64_t hs, int64_t ws, int64_t ht, int64_t wt) {
    if (hs > ht) return wt == ht;
    if (hs < ht) return ws == hs;
    return ws == wt;
}

static kd_status vid_setup(kd_method *m, const kd_method_shapes *shp) {
    const vid_args *a = kd_method_args(m);
    vid_state *st = kd_method_state(m);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    char bs[96], bt[96];
    if (!(a->init_pred_var > a->eps) || !(a->eps >= 0))
        return kd_error(KD_ERR_INVALID, "vid.init_pred_var %g must exceed vid.eps %g (and vid.eps must be >= 0)",
                        (double)a->init_pred_var, (double)a->eps);
    int n = (s->n_feat < t->n_feat ? s->n_feat : t->n_feat) - 2;
    if (n < 1)
        return kd_error(KD_ERR_SHAPE,
                        "vid pairs the feature maps feat[1:-1] of both nets, but the student exposes %d features "
                        "and the teacher %d (at least 3 each needed)",
                        s->n_feat, t->n_feat);
    for (int k = 1; k <= n; k++) {
        const int64_t *fs = s->feat[k], *ft = t->feat[k];
        if (s->feat_ndim[k] != 4 || t->feat_ndim[k] != 4 || !vid_poolable(fs[2], fs[3], ft[2], ft[3]))
            return kd_error(KD_ERR_SHAPE,
                            "vid: feat[%d] of the student %s and of the teacher %s cannot be paired (maps whose "
                            "larger one pools to the other's (H, H))",
                            k, kd__shape_text(s->feat_ndim[k], fs, bs, sizeof bs),
                            kd__shape_text(t->feat_ndim[k], ft, bt, sizeof bt));
    }
    st->n_pairs = n;
    double init = log(exp((double)a->init_pred_var - (double)a->eps) - 1.0);
    kd_param_list *pl = kd_method_params(m);
    for (int k = 0; k < n; k++) {
        vid_pair *pr = &st->pair[k];
        int64_t cs = s->feat[k + 1][1], ct = t->feat[k + 1][1];
        char prefix[64], name[96];
        snprintf(prefix, sizeof prefix, "%d", k);
        /* The state_dict order of VIDLoss: its own parameter, then the regressor. */
        KD_TRY(kd_params_new(pl, prefix, "log_scale", KD_F32, 1, &ct, KD_PARAM_WEIGHT, &pr->log_scale));
        kd_init_constant(pr->log_scale, (float)init);
        const int64_t cin[3] = {cs, ct, ct};
        for (int i = 0; i < 3; i++) {
            snprintf(name, sizeof name, "%d.regressor.%d", k, 2 * i);
            KD_TRY(kd_conv2d_layer_init(&pr->conv[i], pl, name, cin[i], ct, 1, 1, 0, 1, 0));
            kd_rng r;
            kd__method_rng(m, name, &r);
            kd_init_uniform(pr->conv[i].weight, (float)(1.0 / sqrt((double)kd_fan_in(pr->conv[i].weight))), &r);
        }
    }
    return KD_OK;
}

static kd_status vid_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const vid_args *a = kd_method_args(m);
    vid_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    kd_tensor *total = NULL;
    *out = NULL;
    for (int k = 0; k < st->n_pairs; k++) {
        kd_tensor *fs = kd_method_feat(g, &ctx->s, k + 1, 0), *ft = kd_method_feat(g, &ctx->t, k + 1, 0);
        if (!fs || !ft) return kd_error(KD_ERR_INVALID, "vid: feat[%d] is missing", k + 1);
        char bs[96], bt[96];
        if (fs->ndim != 4 || ft->ndim != 4 || fs->shape[0] != ft->shape[0])
            return kd_error(KD_ERR_SHAPE, "vid: feat[%d] student %s and teacher %s are not maps of one batch", k + 1,
                            kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt));
        /* Pool the map with the larger height to the other's (H, H). */
        int64_t hs = fs->shape[2], ht = ft->shape[2];
        kd_tensor *x = hs > ht ? vid_pool(g, fs, ht, ht) : fs;
        kd_tensor *y = hs < ht ? vid_pool(g, ft, hs, hs) : ft;
        if (!x || !y) return kd_graph_status(g);
        if (x->shape[2] != y->shape[2] || x->shape[3] != y->shape[3])
            return kd_error(KD_ERR_SHAPE, "vid: feat[%d] student %s and teacher %s cannot be pooled to one size",
                            k + 1, kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt));
        vid_pair *pr = &st->pair[k];
        /* The regressor runs in the backend's blocked layout where it has one
         * (kd_method_feat gives plain maps; a plain-input convolution with a
         * blocked output has no fast kernel in oneDNN). */
        kd_tensor *h = kd_relu(g, kd_conv2d_layer_forward(g, &pr->conv[0], kd_graph_to_blocked(g, x)));
        h = kd_relu(g, kd_conv2d_layer_forward(g, &pr->conv[1], h));
        kd_tensor *mu = kd_conv2d_layer_forward(g, &pr->conv[2], h);
        if (!mu) return kd_graph_status(g);
        if (mu->shape[1] != y->shape[1])
            return kd_error(KD_ERR_SHAPE, "vid: feat[%d] of the teacher %s has %lld channels, the regressor was "
                                          "built for %lld",
                            k + 1, kd_shape_str(ft, bt, sizeof bt), (long long)y->shape[1],
                            (long long)mu->shape[1]);
        vid_nll_params p = {(double)a->eps};
        kd_tensor *in[3] = {mu, y, pr->log_scale};
        kd_tensor *l = kd_function_apply(g, &vid_nll_fn, &p, sizeof p, 3, in, 0, NULL);
        total = total ? kd_add(g, total, l) : l;
    }
    *out = total;
    return kd_graph_status(g);
}

const kd_method_def kd__method_vid = {
    .name = "vid",
    .summary = "VID: per feat[1:-1] pair, Gaussian likelihood of the teacher map under a 1x1-conv regressor",
    .paper = "Ahn, Hu, Damianou, Lawrence, Dai: Variational Information Distillation for Knowledge Transfer, "
             "CVPR 2019",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(vid_arg_table),
    .args_size = sizeof(vid_args),
    .state_size = sizeof(vid_state),
    .setup = vid_setup,
    .term = vid_term,
};
