/* Attention transfer (Zagoruyko and Komodakis, ICLR 2017) as RepDistiller
 * runs it (distiller_zoo/AT.py Attention, helper/loops.py for the wiring,
 * scripts/run_cifar_distill.sh for the weights):
 *
 *     at(f)  = normalize(mean_c f^p, viewed (N, H*W))          (F.normalize, eps 1e-12)
 *     term   = sum over the pairs feat[1:-1] of mean((at(f_s) - at(f_t))^2)
 *
 * with p = 2 and L = 1 * CE + 1000 * term. When the heights of a pair differ
 * the larger map is adaptive-average-pooled to (h, h), h the smaller height,
 * before at() (exactly as the official at_loss). The pooling and the channel
 * mean of powers are one kd_function (at_map); normalisation and the mean
 * square are the library's ops. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "distill/methods.h"

typedef struct {
    float p; /* power of the attention map */
} kd__at_args;

static const kd_method_arg kd__at_arg_table[] = {
    KD__ARG(kd__at_args, p, KD_ARG_FLOAT, "2",
            "power p of the attention map mean_c f^p (RepDistiller Attention(p=2))"),
};

/* The pooled size of each side of pair k: (oh, ow) per side. */
typedef struct {
    int64_t s_out[2], t_out[2];
} kd__at_pair;

/* RepDistiller's at_loss: the taller map is pooled to (h, h), h the other's height. */
static kd__at_pair kd__at_pair_sizes(const int64_t *fs, const int64_t *ft) {
    kd__at_pair q = {{fs[2], fs[3]}, {ft[2], ft[3]}};
    if (fs[2] > ft[2]) q.s_out[0] = q.s_out[1] = ft[2];
    else if (fs[2] < ft[2]) q.t_out[0] = q.t_out[1] = fs[2];
    return q;
}

static kd_status kd__at_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__at_args *a = kd_method_args(m);
    if (!(a->p > 0)) return kd_error(KD_ERR_INVALID, "at.p %g must be > 0", (double)a->p);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    if (s->n_feat != t->n_feat || s->n_feat < 3)
        return kd_error(KD_ERR_SHAPE,
                        "at: the student exposes %d features and the teacher %d; attention transfer pairs "
                        "feat[1:-1] one to one, so both need the same number (at least 3)",
                        s->n_feat, t->n_feat);
    for (int k = 1; k < s->n_feat - 1; k++) {
        char bs[96], bt[96];
        kd__shape_text(s->feat_ndim[k], s->feat[k], bs, sizeof bs);
        kd__shape_text(t->feat_ndim[k], t->feat[k], bt, sizeof bt);
        if (s->feat_ndim[k] != 4 || t->feat_ndim[k] != 4)
            return kd_error(KD_ERR_SHAPE, "at: feat[%d] must be (N, C, H, W) maps on both nets, not %s and %s", k, bs,
                            bt);
        kd__at_pair q = kd__at_pair_sizes(s->feat[k], t->feat[k]);
        if (q.s_out[0] * q.s_out[1] != q.t_out[0] * q.t_out[1])
            return kd_error(KD_ERR_SHAPE,
                            "at: feat[%d] of the student %s and of the teacher %s give attention maps of "
                            "different sizes (%lldx%lld and %lldx%lld)",
                            k, bs, bt, (long long)q.s_out[0], (long long)q.s_out[1], (long long)q.t_out[0],
                            (long long)q.t_out[1]);
    }
    return KD_OK;
}

/* ------------------------------------------------------------ at_map */

typedef struct {
    int64_t oh, ow; /* adaptive-average-pooled size */
    float p;
} kd__at_map_params;

/* PyTorch's adaptive pooling window [start, end) of output cell i of n over an input of size in. */
static int64_t kd__ad_start(int64_t i, int64_t in, int64_t n) { return (i * in) / n; }
static int64_t kd__ad_end(int64_t i, int64_t in, int64_t n) { return ((i + 1) * in + n - 1) / n; }

/* The average of plane (H, W) over the window of output cell (i, j). */
static double kd__ad_cell(const float *plane, int64_t H, int64_t W, const kd__at_map_params *q, int64_t i, int64_t j) {
    int64_t h0 = kd__ad_start(i, H, q->oh), h1 = kd__ad_end(i, H, q->oh);
    int64_t w0 = kd__ad_start(j, W, q->ow), w1 = kd__ad_end(j, W, q->ow);
    double s = 0;
    for (int64_t h = h0; h < h1; h++)
        for (int64_t w = w0; w < w1; w++) s += plane[h * W + w];
    return s / (double)((h1 - h0) * (w1 - w0));
}

static double kd__at_pow(double v, double p) { return p == 2.0 ? v * v : pow(v, p); }

/* a (N, oh*ow) = mean_c adaptive_avg_pool(f)^p for f (N, C, H, W). */
static kd_status kd__at_map_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                                void **saved) {
    (void)g, (void)n_in, (void)saved;
    const kd__at_map_params *q = params;
    const kd_tensor *f = in[0];
    int64_t N = f->shape[0], C = f->shape[1], H = f->shape[2], W = f->shape[3], L = q->oh * q->ow;
    const float *x = kd_f32(f);
    float *y = kd_f32(out);
#pragma omp parallel for schedule(static) if (N * C * H * W >= 32768)
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < q->oh; i++)
            for (int64_t j = 0; j < q->ow; j++) {
                double s = 0;
                for (int64_t c = 0; c < C; c++)
                    s += kd__at_pow(kd__ad_cell(x + (n * C + c) * H * W, H, W, q, i, j), q->p);
                y[n * L + i * q->ow + j] = (float)(s / (double)C);
            }
    return KD_OK;
}

static kd_status kd__at_map_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                                const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    if (!gin[0]) return KD_OK;
    const kd__at_map_params *q = params;
    const kd_tensor *f = in[0];
    int64_t N = f->shape[0], C = f->shape[1], H = f->shape[2], W = f->shape[3], L = q->oh * q->ow;
    const float *x = kd_f32(f), *gy = kd_f32(gout);
    float *gx = kd_f32(gin[0]);
    /* Each (n, c) plane's gradient is written by one thread. */
#pragma omp parallel for collapse(2) schedule(static) if (N * C * H * W >= 32768)
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++) {
            const float *plane = x + (n * C + c) * H * W;
            float *gplane = gx + (n * C + c) * H * W;
            for (int64_t i = 0; i < q->oh; i++)
                for (int64_t j = 0; j < q->ow; j++) {
                    double v = kd__ad_cell(plane, H, W, q, i, j);
                    double dv = q->p == 2.0f ? 2.0 * v : (double)q->p * pow(v, (double)q->p - 1.0);
                    int64_t h0 = kd__ad_start(i, H, q->oh), h1 = kd__ad_end(i, H, q->oh);
                    int64_t w0 = kd__ad_start(j, W, q->ow), w1 = kd__ad_end(j, W, q->ow);
                    double d = gy[n * L + i * q->ow + j] * dv / (double)C / (double)((h1 - h0) * (w1 - w0));
                    for (int64_t h = h0; h < h1; h++)
                        for (int64_t w = w0; w < w1; w++) gplane[h * W + w] += (float)d;
                }
        }
    return KD_OK;
}

static const kd_function kd__at_map_fn = {"at_map", kd__at_map_fwd, kd__at_map_bwd};

/* normalize(at_map(f)) (N, oh*ow). */
static kd_tensor *kd__at_attention(kd_graph *g, kd_tensor *f, const int64_t *osz, float p) {
    kd__at_map_params q = {osz[0], osz[1], p};
    int64_t ys[2] = {f->shape[0], osz[0] * osz[1]};
    return kd_l2_normalize(g, kd_function_apply(g, &kd__at_map_fn, &q, sizeof q, 1, &f, 2, ys), 1e-12f);
}

static kd_status kd__at_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__at_args *a = kd_method_args(m);
    kd_graph *g = ctx->g;
    if (ctx->s.n_feat != ctx->t.n_feat || ctx->s.n_feat < 3)
        return kd_error(KD_ERR_SHAPE, "at: the student gives %d features and the teacher %d (need the same, >= 3)",
                        ctx->s.n_feat, ctx->t.n_feat);
    kd_tensor *sum = NULL;
    for (int k = 1; k < ctx->s.n_feat - 1; k++) {
        kd_tensor *fs = kd_method_feat(g, &ctx->s, k, 0), *ft = kd_method_feat(g, &ctx->t, k, 0);
        KD_TRY(kd_graph_status(g));
        char bs[96], bt[96];
        if (fs->ndim != 4 || ft->ndim != 4 || fs->shape[0] != ft->shape[0])
            return kd_error(KD_ERR_SHAPE, "at: feat[%d] of the student %s and of the teacher %s cannot be paired", k,
                            kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt));
        kd__at_pair q = kd__at_pair_sizes(fs->shape, ft->shape);
        if (q.s_out[0] * q.s_out[1] != q.t_out[0] * q.t_out[1])
            return kd_error(KD_ERR_SHAPE, "at: feat[%d] of the student %s and of the teacher %s give attention maps "
                                          "of different sizes", k, kd_shape_str(fs, bs, sizeof bs),
                            kd_shape_str(ft, bt, sizeof bt));
        kd_tensor *l = kd_mse(g, kd__at_attention(g, fs, q.s_out, a->p), kd__at_attention(g, ft, q.t_out, a->p));
        sum = sum ? kd_add(g, sum, l) : l;
    }
    *out = sum;
    return kd_graph_status(g);
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
