/* Correlation congruence (Peng et al., ICCV 2019) in RepDistiller's form
 * (distiller_zoo/CC.py Correlation, models/util.py LinearEmbed/Embed,
 * train_student.py and helper/loops.py for the wiring,
 * scripts/run_cifar_distill.sh for the weights):
 *
 *     e_s = embed_s(feat_s[-1]),  e_t = embed_t(feat_t[-1])     Linear(d -> feat_dim) each
 *     delta = |e_s - e_t|                                       (N, feat_dim)
 *     term  = mean_i sum_j delta[i, j] * delta[i + 1, j]        i = 0 .. N-2
 *
 * with L = 1 * CE + 0.02 * term. Both embeddings are trainable modules
 * ("embed_s.linear", "embed_t.linear"; the teacher's features carry no
 * gradient, its embedding does). train_student.py builds them as LinearEmbed
 * (no normalisation), the default here; cc.normalize=1 gives RepDistiller's
 * Embed instead (L2-normalised rows, as CRD uses). The correlation is one
 * kd_function (cc_corr). */
#include <math.h>
#include <stdio.h>

#include "distill/methods.h"

typedef struct {
    int feat_dim;  /* embedding size */
    int normalize; /* 1: L2-normalise the embeddings (Embed instead of LinearEmbed) */
} kd__cc_args;

static const kd_method_arg kd__cc_arg_table[] = {
    KD__ARG(kd__cc_args, feat_dim, KD_ARG_INT, "128", "size of the two linear embeddings (RepDistiller --feat_dim)"),
    KD__ARG(kd__cc_args, normalize, KD_ARG_BOOL, "0",
            "L2-normalise the embeddings (RepDistiller's Embed; train_student.py uses LinearEmbed, no normalisation)"),
};

typedef struct {
    kd_linear_layer embed_s; /* (feat_dim, d_s) */
    kd_linear_layer embed_t; /* (feat_dim, d_t) */
    int64_t d_s, d_t;
} kd__cc_state;

static kd_status kd__cc_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__cc_args *a = kd_method_args(m);
    kd__cc_state *st = kd_method_state(m);
    if (a->feat_dim < 1) return kd_error(KD_ERR_INVALID, "cc.feat_dim %d must be >= 1", a->feat_dim);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    if (s->n_feat < 1 || t->n_feat < 1)
        return kd_error(KD_ERR_SHAPE, "cc: needs the pooled embedding feat[-1] of both nets");
    st->d_s = kd__last_feat_dim(s);
    st->d_t = kd__last_feat_dim(t);
    kd_param_list *pl = kd_method_params(m);
    KD_TRY(kd_linear_layer_init(&st->embed_s, pl, "embed_s.linear", st->d_s, a->feat_dim, 1));
    KD_TRY(kd_linear_layer_init(&st->embed_t, pl, "embed_t.linear", st->d_t, a->feat_dim, 1));
    kd_rng r;
    kd__method_rng(m, "embed_s", &r);
    kd_linear_layer_default_init(&st->embed_s, &r);
    kd__method_rng(m, "embed_t", &r);
    kd_linear_layer_default_init(&st->embed_t, &r);
    return KD_OK;
}

/* ------------------------------------------------------------ cc_corr */

/* 0-d mean_{i < N-1} sum_j |a - b|[i, j] |a - b|[i + 1, j] for a, b (N, D). */
static kd_status kd__cc_corr_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                                 void **saved) {
    (void)g, (void)params, (void)n_in, (void)saved;
    int64_t N = in[0]->shape[0], D = in[0]->shape[1];
    const float *a = kd_f32(in[0]), *b = kd_f32(in[1]);
    double s = 0;
    for (int64_t i = 0; i + 1 < N; i++)
        for (int64_t j = 0; j < D; j++)
            s += fabs((double)a[i * D + j] - b[i * D + j]) * fabs((double)a[(i + 1) * D + j] - b[(i + 1) * D + j]);
    kd_f32(out)[0] = (float)(s / (double)(N - 1));
    return KD_OK;
}

static double kd__sign(double x) { return (x > 0) - (x < 0); }

static kd_status kd__cc_corr_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                                 const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)params, (void)saved, (void)n_in, (void)out;
    int64_t N = in[0]->shape[0], D = in[0]->shape[1];
    const float *a = kd_f32(in[0]), *b = kd_f32(in[1]);
    double k = kd_f32(gout)[0] / (double)(N - 1);
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < D; j++) {
            /* d term / d delta[i, j] = (delta[i - 1, j] + delta[i + 1, j]) / (N - 1), each where it exists;
             * d delta / d a = sign(a - b) (0 at 0, as torch.abs), d delta / d b = -sign(a - b). */
            double nb = 0;
            if (i > 0) nb += fabs((double)a[(i - 1) * D + j] - b[(i - 1) * D + j]);
            if (i + 1 < N) nb += fabs((double)a[(i + 1) * D + j] - b[(i + 1) * D + j]);
            double d = k * nb * kd__sign((double)a[i * D + j] - b[i * D + j]);
            if (gin[0]) kd_f32(gin[0])[i * D + j] += (float)d;
            if (gin[1]) kd_f32(gin[1])[i * D + j] -= (float)d;
        }
    return KD_OK;
}

static const kd_function kd__cc_corr_fn = {"cc_corr", kd__cc_corr_fwd, kd__cc_corr_bwd};

static kd_status kd__cc_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__cc_args *a = kd_method_args(m);
    kd__cc_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    kd_tensor *fs = kd_method_feat(g, &ctx->s, -1, 0), *ft = kd_method_feat(g, &ctx->t, -1, 0);
    KD_TRY(kd_graph_status(g));
    if (!fs || !ft) return kd_error(KD_ERR_INVALID, "cc: the pooled embeddings feat[-1] are missing");
    char bs[96], bt[96];
    if (fs->shape[0] != ft->shape[0] || kd_tensor_numel(fs) != fs->shape[0] * st->d_s ||
        kd_tensor_numel(ft) != ft->shape[0] * st->d_t)
        return kd_error(KD_ERR_SHAPE, "cc: feat[-1] of the student %s and of the teacher %s do not fit the embeddings "
                                      "(%lld and %lld inputs)",
                        kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt), (long long)st->d_s,
                        (long long)st->d_t);
    if (fs->shape[0] < 2)
        return kd_error(KD_ERR_SHAPE, "cc: the correlation pairs consecutive samples, so a batch needs at least 2 "
                                      "(got %s)", kd_shape_str(fs, bs, sizeof bs));
    kd_tensor *in[2] = {kd__linear_embed(g, &st->embed_s, fs, st->d_s, a->normalize, 1e-12f),
                        kd__linear_embed(g, &st->embed_t, ft, st->d_t, a->normalize, 1e-12f)};
    KD_TRY(kd_graph_status(g));
    *out = kd_function_apply(g, &kd__cc_corr_fn, NULL, 0, 2, in, 0, NULL);
    return kd_graph_status(g);
}

const kd_method_def kd__method_cc = {
    .name = "cc",
    .summary = "correlation congruence (RepDistiller form): linear embeddings of feat[-1], mean product of "
               "consecutive samples' |e_s - e_t|",
    .paper = "Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang: Correlation Congruence for Knowledge Distillation, ICCV 2019",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 0.02f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__cc_arg_table),
    .args_size = sizeof(kd__cc_args),
    .state_size = sizeof(kd__cc_state),
    .setup = kd__cc_setup,
    .term = kd__cc_term,
};
