/* PAD: Prime-Aware Adaptive Distillation (Zhang et al., ECCV 2020). The paper
 * has no official code; this follows torchdistill's implementation
 * (torchdistill/losses/mid_level.py PADL2Loss, models/wrapper.py
 * VarianceBranch4PAD, configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/
 * pad_l2-resnet18_from_resnet34.yaml):
 *
 *     log_var = BatchNorm1d(Linear(f_s))          var_estimator = Sequential(
 *                                                     Linear(d, d), BatchNorm1d(d))
 *     term = mean over samples and dims of
 *            (f_t - f_s)^2 / (1e-6 + exp(log_var)) + log_var
 *
 * on the pooled embeddings f = feat[-1] (N, d) of both nets; the variance
 * branch reads the student embedding (gradients flow into it through both
 * paths). torchdistill has no regressor: the student and teacher embeddings
 * must have the same width d, else setup refuses the pair with KD_ERR_SHAPE.
 * Module names are torchdistill's ("var_estimator.0.weight",
 * "var_estimator.1.running_mean", ...), so a var_estimator checkpoint maps one
 * to one. Weights: CE 1 (gamma), no plain KL (alpha 0), PAD 1 (beta).
 *
 * Warm-up (pad.warmup_epochs, default 0 = off): the paper reports that the
 * learned variance shrinks and then stabilises and that PAD with a warm-up
 * works best, but gives no schedule that torchdistill implements. With
 * warmup_epochs W > 0 the PAD term's weight ramps linearly as
 * min(1, (epoch + 1) / W) with 0-based epochs (the same ramp as DKD's,
 * kd__warmup), so the first epoch already gets 1/W.
 *
 * The squared-error-over-variance mean is a kd_function over (f_s, log_var,
 * f_t) with double accumulation. */
#include <math.h>
#include <stdint.h>

#include "distill/methods.h"

typedef struct {
    float eps;         /* added to exp(log_var) */
    int warmup_epochs; /* linear ramp of the term's weight; 0: none */
} kd__pad_args;

static const kd_method_arg kd__pad_arg_table[] = {
    KD__ARG(kd__pad_args, eps, KD_ARG_FLOAT, "1e-6", "added to the variance exp(log_var) (PADL2Loss eps)"),
    KD__ARG(kd__pad_args, warmup_epochs, KD_ARG_INT, "0",
            "epochs over which the PAD term's weight ramps linearly, min(1, (epoch+1)/W) with 0-based epochs "
            "(0: off, as torchdistill)"),
};

typedef struct {
    kd_linear_layer linear; /* var_estimator.0: (d, d) + bias */
    kd_bn_layer bn;         /* var_estimator.1: BatchNorm1d(d) */
} kd__pad_state;

typedef struct {
    double eps;
    int64_t n, d;
} kd__pad_fn_params;

/* in[0] f_s (n, d), in[1] log_var (n, d), in[2] f_t (n, d) -> mean of
 * (f_t - f_s)^2 / (eps + exp(log_var)) + log_var. */
static kd_status kd__pad_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                             void **saved) {
    (void)g, (void)n_in, (void)saved;
    const kd__pad_fn_params *p = params;
    const float *fs = kd_f32(in[0]), *lv = kd_f32(in[1]), *ft = kd_f32(in[2]);
    int64_t len = p->n * p->d;
    double acc = 0;
    for (int64_t e = 0; e < len; e++) {
        double r = (double)ft[e] - fs[e];
        acc += r * r / (p->eps + exp((double)lv[e])) + lv[e];
    }
    kd_f32(out)[0] = len ? (float)(acc / (double)len) : 0.0f;
    return KD_OK;
}

static kd_status kd__pad_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                             const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    const kd__pad_fn_params *p = params;
    const float *fs = kd_f32(in[0]), *lv = kd_f32(in[1]), *ft = kd_f32(in[2]);
    int64_t len = p->n * p->d;
    if (!len) return KD_OK;
    double c = (double)kd_f32(gout)[0] / (double)len;
    for (int64_t e = 0; e < len; e++) {
        double r = (double)ft[e] - fs[e], v = exp((double)lv[e]), den = p->eps + v;
        double gr = 2.0 * r / den; /* d / d f_t */
        if (gin[0]) kd_f32(gin[0])[e] -= (float)(c * gr);
        if (gin[1]) kd_f32(gin[1])[e] += (float)(c * (1.0 - r * r * v / (den * den)));
        if (gin[2]) kd_f32(gin[2])[e] += (float)(c * gr);
    }
    return KD_OK;
}

static const kd_function kd__pad_fn = {"pad_l2", kd__pad_fwd, kd__pad_bwd};

static kd_status kd__pad_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__pad_args *a = kd_method_args(m);
    kd__pad_state *st = kd_method_state(m);
    if (!(a->eps > 0)) return kd_error(KD_ERR_INVALID, "pad.eps %g must be > 0", (double)a->eps);
    if (a->warmup_epochs < 0)
        return kd_error(KD_ERR_INVALID, "pad.warmup_epochs %d must be >= 0 (0: off)", a->warmup_epochs);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    if (s->n_feat < 1 || t->n_feat < 1)
        return kd_error(KD_ERR_SHAPE, "pad needs the pooled embedding feat[-1] of both nets");
    int ks = s->n_feat - 1, kt = t->n_feat - 1;
    char b1[96], b2[96];
    if (s->feat_ndim[ks] != 2 || t->feat_ndim[kt] != 2 || s->feat[ks][1] != t->feat[kt][1])
        return kd_error(KD_ERR_SHAPE,
                        "pad: the student's pooled embedding feat[-1] %s and the teacher's %s must have the same "
                        "width (the variance branch has no regressor, as torchdistill's VarianceBranch4PAD)",
                        kd__shape_text(s->feat_ndim[ks], s->feat[ks], b1, sizeof b1),
                        kd__shape_text(t->feat_ndim[kt], t->feat[kt], b2, sizeof b2));
    int64_t d = s->feat[ks][1];
    kd_param_list *pl = kd_method_params(m);
    KD_TRY(kd_linear_layer_init(&st->linear, pl, "var_estimator.0", d, d, 1));
    KD_TRY(kd_bn_layer_init(&st->bn, pl, "var_estimator.1", d));
    kd_rng r;
    kd__method_rng(m, "var_estimator", &r);
    kd_linear_layer_default_init(&st->linear, &r);
    return KD_OK;
}

static kd_status kd__pad_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__pad_args *a = kd_method_args(m);
    kd__pad_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    *out = NULL;
    kd_tensor *fs = kd_method_feat(g, &ctx->s, -1, 0), *ft = kd_method_feat(g, &ctx->t, -1, 0);
    if (!fs || !ft) return kd_error(KD_ERR_INVALID, "pad needs the pooled embedding feat[-1] of both nets");
    char b1[96], b2[96];
    if (fs->ndim != 2 || ft->ndim != 2 || fs->shape[0] != ft->shape[0] || fs->shape[1] != ft->shape[1] ||
        fs->shape[1] != st->linear.weight->shape[1])
        return kd_error(KD_ERR_SHAPE, "pad: student embedding %s and teacher embedding %s do not match the (N, %lld) "
                                      "the variance branch was built for",
                        kd__shape_text(fs->ndim, fs->shape, b1, sizeof b1),
                        kd__shape_text(ft->ndim, ft->shape, b2, sizeof b2), (long long)st->linear.weight->shape[1]);
    kd_tensor *lv = kd_bn_layer_forward(g, &st->bn, kd_linear_layer_forward(g, &st->linear, fs),
                                        kd_method_training(m));
    kd__pad_fn_params p = {a->eps, fs->shape[0], fs->shape[1]};
    kd_tensor *in[3] = {fs, lv, ft};
    kd_tensor *loss = kd_function_apply(g, &kd__pad_fn, &p, sizeof p, 3, in, 0, NULL);
    *out = kd__warmup(g, loss, ctx->epoch, a->warmup_epochs);
    return kd_graph_status(g);
}

const kd_method_def kd__method_pad = {
    .name = "pad",
    .summary = "prime-aware adaptive distillation: embedding L2 weighted by a learned per-dimension variance",
    .paper = "Zhang, Lan, Dai, Zeng, Bai, Chang, Wei: Prime-Aware Adaptive Distillation, ECCV 2020",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__pad_arg_table),
    .args_size = sizeof(kd__pad_args),
    .state_size = sizeof(kd__pad_state),
    .setup = kd__pad_setup,
    .term = kd__pad_term,
};
