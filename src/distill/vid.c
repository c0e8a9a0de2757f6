/* VID: Variational Information Distillation (Ahn, Hu, Damianou, Lawrence,
 * Dai, CVPR 2019) as RepDistiller runs it (distiller_zoo/VID.py VIDLoss;
 * train_student.py builds VIDLoss(C_s, C_t, C_t) for each pair of feat[1:-1],
 * zipped so that the shorter list decides the count; helper/loops.py sums the
 * per-pair losses; beta 1 in scripts/run_cifar_distill.sh).
 *
 * Per pair: the map with the larger height is adaptive-average-pooled to the
 * other's (H, H), as the official code does (kd__map_pairs_term, shared with AT
 * and NST); a regressor of three 1x1 convolutions without bias, C_s -> C_t -> C_t
 * -> C_t with ReLU between, predicts the teacher map's mean; the variance is
 * per teacher channel,
 *     pred_var = log(1 + exp(log_scale)) + eps,
 * log_scale initialised to log(exp(init_pred_var - eps) - 1); the term is
 *     mean over (N, C_t, H, W) of 0.5 * ((mu - t)^2 / pred_var + log(pred_var))
 * summed over the pairs. The modules are named as the official criterion's
 * state_dict (an nn.ModuleList of VIDLoss): "<k>.log_scale",
 * "<k>.regressor.{0,2,4}.weight". Everything is trainable and weight-decayed,
 * as RepDistiller's SGD over trainable_list does. */
#include <math.h>
#include <stdio.h>

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
    KD_TRY(kd__need_contiguous("vid: Gaussian likelihood", in, n_in));
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

static kd_status vid_setup(kd_method *m, const kd_method_shapes *shp) {
    const vid_args *a = kd_method_args(m);
    vid_state *st = kd_method_state(m);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    if (!(a->init_pred_var > a->eps) || !(a->eps >= 0))
        return kd_error(KD_ERR_INVALID, "vid.init_pred_var %g must exceed vid.eps %g (and vid.eps must be >= 0)",
                        (double)a->init_pred_var, (double)a->eps);
    KD_TRY(kd__map_pairs(m, shp, &st->n_pairs));
    double init = log(exp((double)a->init_pred_var - (double)a->eps) - 1.0);
    kd_param_list *pl = kd_method_params(m);
    for (int k = 0; k < st->n_pairs; k++) {
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

/* Pair k's Gaussian negative log-likelihood of the teacher map y under the
 * regressor's prediction from the student map x. */
static kd_status vid_pair_loss(kd_method *m, kd_step_ctx *ctx, int k, kd_tensor *x, kd_tensor *y, kd_tensor **loss) {
    const vid_args *a = kd_method_args(m);
    vid_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    vid_pair *pr = &st->pair[k];
    /* The regressor runs in the backend's blocked layout where it has one
     * (kd_method_feat gives plain maps; a plain-input convolution with a
     * blocked output has no fast kernel in oneDNN). */
    kd_tensor *h = kd_relu(g, kd_conv2d_layer_forward(g, &pr->conv[0], kd_graph_to_blocked(g, x)));
    h = kd_relu(g, kd_conv2d_layer_forward(g, &pr->conv[1], h));
    kd_tensor *mu = kd_conv2d_layer_forward(g, &pr->conv[2], h);
    if (!mu) return kd_graph_status(g);
    if (mu->shape[1] != y->shape[1]) {
        char bt[96];
        return kd_error(KD_ERR_SHAPE, "vid: feat[%d] of the teacher %s has %lld channels, the regressor was built "
                                      "for %lld",
                        k + 1, kd_shape_str(y, bt, sizeof bt), (long long)y->shape[1], (long long)mu->shape[1]);
    }
    vid_nll_params p = {(double)a->eps};
    kd_tensor *in[3] = {mu, y, pr->log_scale};
    *loss = kd_function_apply(g, &vid_nll_fn, &p, sizeof p, 3, in, 0, NULL);
    return kd_graph_status(g);
}

static kd_status vid_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const vid_state *st = kd_method_state(m);
    return kd__map_pairs_term(m, ctx, st->n_pairs, vid_pair_loss, out);
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
