/* Attention transfer (Zagoruyko and Komodakis, ICLR 2017) as RepDistiller
 * runs it (distiller_zoo/AT.py Attention, helper/loops.py for the wiring,
 * scripts/run_cifar_distill.sh for the weights):
 *
 *     at(f)  = normalize(mean_c f^p, viewed (N, H*W))          (F.normalize, eps 1e-12)
 *     term   = sum over the pairs feat[1:-1] of mean((at(f_s) - at(f_t))^2)
 *
 * with p = 2 and L = 1 * CE + 1000 * term. When the heights of a pair differ
 * the larger map is adaptive-average-pooled to (h, h), h the smaller height,
 * before at() (exactly as the official at_loss; kd__map_pairs_term, shared with
 * VID and NST). The channel mean of powers is a kd_function (at_map);
 * normalisation and the mean square are the library's ops. */
#include <math.h>

#include "distill/methods.h"

typedef struct {
    float p; /* power of the attention map */
} kd__at_args;

static const kd_method_arg kd__at_arg_table[] = {
    KD__ARG(kd__at_args, p, KD_ARG_FLOAT, "2",
            "power p of the attention map mean_c f^p (RepDistiller Attention(p=2))"),
};

static kd_status kd__at_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__at_args *a = kd_method_args(m);
    if (!(a->p > 0)) return kd_error(KD_ERR_INVALID, "at.p %g must be > 0", (double)a->p);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    if (s->n_feat != t->n_feat || s->n_feat < 3)
        return kd_error(KD_ERR_SHAPE,
                        "at: the student exposes %d features and the teacher %d; attention transfer pairs "
                        "feat[1:-1] one to one, so both need the same number (at least 3)",
                        s->n_feat, t->n_feat);
    int n;
    return kd__map_pairs(m, shp, &n);
}

/* ------------------------------------------------------------ at_map */

typedef struct {
    float p;
} kd__at_map_params;

static double kd__at_pow(double v, double p) { return p == 2.0 ? v * v : pow(v, p); }

/* a (N, H*W) = mean_c f^p for f (N, C, H, W). */
static kd_status kd__at_map_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                                void **saved) {
    (void)g, (void)saved;
    KD_TRY(kd__need_contiguous("at: attention map", in, n_in));
    const kd__at_map_params *q = params;
    const kd_tensor *f = in[0];
    int64_t N = f->shape[0], C = f->shape[1], L = f->shape[2] * f->shape[3];
    const float *x = kd_f32(f);
    float *y = kd_f32(out);
#pragma omp parallel for schedule(static) if (N * C * L >= 32768)
    for (int64_t n = 0; n < N; n++)
        for (int64_t l = 0; l < L; l++) {
            double s = 0;
            for (int64_t c = 0; c < C; c++) s += kd__at_pow(x[(n * C + c) * L + l], q->p);
            y[n * L + l] = (float)(s / (double)C);
        }
    return KD_OK;
}

static kd_status kd__at_map_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                                const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    if (!gin[0]) return KD_OK;
    const kd__at_map_params *q = params;
    const kd_tensor *f = in[0];
    int64_t N = f->shape[0], C = f->shape[1], L = f->shape[2] * f->shape[3];
    const float *x = kd_f32(f), *gy = kd_f32(gout);
    float *gx = kd_f32(gin[0]);
    /* Each (n, c) plane's gradient is written by one thread. */
#pragma omp parallel for collapse(2) schedule(static) if (N * C * L >= 32768)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t l = 0; l < L; l++) {
                double v = x[(n * C + c) * L + l];
                double dv = q->p == 2.0f ? 2.0 * v : (double)q->p * pow(v, (double)q->p - 1.0);
                gx[(n * C + c) * L + l] += (float)(gy[n * L + l] * dv / (double)C);
            }
    return KD_OK;
}

static const kd_function kd__at_map_fn = {"at_map", kd__at_map_fwd, kd__at_map_bwd};

/* normalize(at_map(f)) (N, H*W). */
static kd_tensor *kd__at_attention(kd_graph *g, kd_tensor *f, float p) {
    kd__at_map_params q = {p};
    int64_t ys[2] = {f->shape[0], f->shape[2] * f->shape[3]};
    return kd_l2_normalize(g, kd_function_apply(g, &kd__at_map_fn, &q, sizeof q, 1, &f, 2, ys), 1e-12f);
}

/* One pair's mean((at(x_s) - at(x_t))^2). */
static kd_status kd__at_pair_loss(kd_method *m, kd_step_ctx *ctx, int i, kd_tensor *xs, kd_tensor *xt,
                                  kd_tensor **loss) {
    (void)i;
    const kd__at_args *a = kd_method_args(m);
    *loss = kd_mse(ctx->g, kd__at_attention(ctx->g, xs, a->p), kd__at_attention(ctx->g, xt, a->p));
    return kd_graph_status(ctx->g);
}

static kd_status kd__at_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    *out = NULL;
    if (ctx->s.n_feat != ctx->t.n_feat || ctx->s.n_feat < 3)
        return kd_error(KD_ERR_SHAPE, "at: the student gives %d features and the teacher %d (need the same, >= 3)",
                        ctx->s.n_feat, ctx->t.n_feat);
    return kd__map_pairs_term(m, ctx, ctx->s.n_feat - 2, kd__at_pair_loss, out);
}

const kd_method_def kd__method_at = {
    .name = "at",
    .summary = "attention transfer: MSE of L2-normalised channel means of f^p over the pairs feat[1:-1]",
    .paper = "Zagoruyko, Komodakis: Paying More Attention to Attention: Improving the Performance of "
             "Convolutional Neural Networks via Attention Transfer, ICLR 2017",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 1000.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__at_arg_table),
    .args_size = sizeof(kd__at_args),
    .setup = kd__at_setup,
    .term = kd__at_term,
};
