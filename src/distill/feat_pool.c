/* Feature-map pooling shared by the method files.
 *
 * kd__adaptive_avgpool2d is PyTorch's F.adaptive_avg_pool2d as a kd_function
 * (plain-C forward and backward): output cell (i, j) of (oh, ow) averages the
 * input rows [floor(i H / oh), ceil((i + 1) H / oh)) and the same columns for
 * W, the start_index / end_index rule of aten/src/ATen/native/
 * AdaptiveAveragePooling.cpp. Windows of neighbouring cells may overlap when
 * the size does not divide.
 *
 * kd__map_pairs and kd__map_pairs_term are the pairing of feature maps that
 * RepDistiller's AT, VID and NST share (distiller_zoo/AT.py at_loss,
 * VID.py VIDLoss.forward, NST.py NSTLoss.forward; helper/loops.py sums the
 * per-pair losses): the map with the larger height is adaptive-average-pooled
 * to (h, h), h the other map's height; maps of equal height are left as they
 * are. */
#include <stdio.h>

#include "distill/method_impl.h"

/* ------------------------------------------------ adaptive average pooling */

typedef struct {
    int64_t oh, ow; /* output size */
} kd__apool_params;

/* The window [start, end) of output cell o of n over an input of size in. */
static int64_t kd__apool_start(int64_t o, int64_t in, int64_t n) { return (o * in) / n; }
static int64_t kd__apool_end(int64_t o, int64_t in, int64_t n) { return ((o + 1) * in + n - 1) / n; }

/* y (N, C, oh, ow) = adaptive_avg_pool2d(x (N, C, H, W)); each (n, c) plane in
 * one thread, its window sums in double. */
static kd_status kd__apool_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                               void **saved) {
    (void)g, (void)saved;
    const kd__apool_params *p = params;
    const kd_tensor *x = in[0];
    if (x->ndim != 4 || p->oh < 1 || p->ow < 1) {
        char b[96];
        return kd_error(KD_ERR_SHAPE, "adaptive_avgpool2d: input %s must be (N, C, H, W) and the output size %lldx%lld "
                                      "positive", kd_shape_str(x, b, sizeof b), (long long)p->oh, (long long)p->ow);
    }
    KD_TRY(kd__need_contiguous("adaptive_avgpool2d", in, n_in));
    int64_t NC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3], oh = p->oh, ow = p->ow;
    const float *xd = kd_f32(x);
    float *y = kd_f32(out);
#pragma omp parallel for schedule(static) if (NC * H * W >= 32768)
    for (int64_t r = 0; r < NC; r++) {
        const float *plane = xd + r * H * W;
        for (int64_t i = 0; i < oh; i++) {
            int64_t h0 = kd__apool_start(i, H, oh), h1 = kd__apool_end(i, H, oh);
            for (int64_t j = 0; j < ow; j++) {
                int64_t w0 = kd__apool_start(j, W, ow), w1 = kd__apool_end(j, W, ow);
                double s = 0;
                for (int64_t h = h0; h < h1; h++)
                    for (int64_t w = w0; w < w1; w++) s += plane[h * W + w];
                y[(r * oh + i) * ow + j] = (float)(s / (double)((h1 - h0) * (w1 - w0)));
            }
        }
    }
    return KD_OK;
}

/* dx[window of (i, j)] += dy[i, j] / |window|; each (n, c) plane in one thread. */
static kd_status kd__apool_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                               const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    if (!gin[0]) return KD_OK;
    const kd__apool_params *p = params;
    const kd_tensor *x = in[0];
    int64_t NC = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3], oh = p->oh, ow = p->ow;
    const float *gy = kd_f32(gout);
    float *gx = kd_f32(gin[0]);
#pragma omp parallel for schedule(static) if (NC * H * W >= 32768)
    for (int64_t r = 0; r < NC; r++) {
        float *gplane = gx + r * H * W;
        for (int64_t i = 0; i < oh; i++) {
            int64_t h0 = kd__apool_start(i, H, oh), h1 = kd__apool_end(i, H, oh);
            for (int64_t j = 0; j < ow; j++) {
                int64_t w0 = kd__apool_start(j, W, ow), w1 = kd__apool_end(j, W, ow);
                float v = (float)(gy[(r * oh + i) * ow + j] / (double)((h1 - h0) * (w1 - w0)));
                for (int64_t h = h0; h < h1; h++)
                    for (int64_t w = w0; w < w1; w++) gplane[h * W + w] += v;
            }
        }
    }
    return KD_OK;
}

static const kd_function kd__apool_fn = {"adaptive_avgpool2d", kd__apool_fwd, kd__apool_bwd};

kd_tensor *kd__adaptive_avgpool2d(kd_graph *g, kd_tensor *x, int64_t oh, int64_t ow) {
    kd__apool_params p = {oh, ow};
    /* A bad input or size is refused by the forward (with the graph's sticky status). */
    int ok = x && x->ndim == 4 && oh > 0 && ow > 0;
    int64_t shape[4] = {ok ? x->shape[0] : 0, ok ? x->shape[1] : 0, oh, ow};
    return kd_function_apply(g, &kd__apool_fn, &p, sizeof p, 1, &x, ok ? 4 : 0, shape);
}

/* ------------------------------------------------ RepDistiller's map pairs */

/* Output sizes (oh, ow) of the student map fs and the teacher map ft, both
 * (N, C, H, W), after the pooling of the taller one; whether they then meet. */
static int kd__map_sizes(const int64_t *fs, const int64_t *ft, int64_t so[2], int64_t to[2]) {
    so[0] = fs[2], so[1] = fs[3], to[0] = ft[2], to[1] = ft[3];
    if (fs[2] > ft[2]) so[0] = so[1] = ft[2];
    else if (fs[2] < ft[2]) to[0] = to[1] = fs[2];
    return so[0] == to[0] && so[1] == to[1];
}

kd_status kd__map_pairs(const kd_method *m, const kd_method_shapes *shp, int *n_pairs) {
    const char *method = kd_method_get_def(m)->name;
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    int n = (s->n_feat < t->n_feat ? s->n_feat : t->n_feat) - 2;
    *n_pairs = 0;
    if (n < 1)
        return kd_error(KD_ERR_SHAPE,
                        "%s pairs the feature maps feat[1:-1] of both nets, but the student exposes %d features "
                        "and the teacher %d (at least 3 each needed)",
                        method, s->n_feat, t->n_feat);
    for (int k = 1; k <= n; k++) {
        int64_t so[2], to[2];
        if (s->feat_ndim[k] != 4 || t->feat_ndim[k] != 4 || !kd__map_sizes(s->feat[k], t->feat[k], so, to)) {
            char bs[96], bt[96];
            return kd_error(KD_ERR_SHAPE,
                            "%s: feat[%d] of the student %s and of the teacher %s cannot be paired (maps whose "
                            "larger one pools to the other's (H, H))",
                            method, k, kd__shape_text(s->feat_ndim[k], s->feat[k], bs, sizeof bs),
                            kd__shape_text(t->feat_ndim[k], t->feat[k], bt, sizeof bt));
        }
    }
    *n_pairs = n;
    return KD_OK;
}

/* Pair k (feature index) of a step: both maps, the taller one pooled. */
static kd_status kd__map_pair(kd_step_ctx *ctx, const char *method, int k, kd_tensor **xs, kd_tensor **xt) {
    kd_graph *g = ctx->g;
    *xs = *xt = NULL;
    kd_tensor *fs = kd_method_feat(g, &ctx->s, k, 0), *ft = kd_method_feat(g, &ctx->t, k, 0);
    KD_TRY(kd_graph_status(g));
    if (!fs || !ft) return kd_error(KD_ERR_INVALID, "%s: feat[%d] is missing", method, k);
    int64_t so[2], to[2];
    if (fs->ndim != 4 || ft->ndim != 4 || fs->shape[0] != ft->shape[0] ||
        !kd__map_sizes(fs->shape, ft->shape, so, to)) {
        char bs[96], bt[96];
        return kd_error(KD_ERR_SHAPE,
                        "%s: feat[%d] of the student %s and of the teacher %s cannot be paired (maps of one batch "
                        "whose larger one pools to the other's (H, H))",
                        method, k, kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt));
    }
    *xs = fs->shape[2] > ft->shape[2] ? kd__adaptive_avgpool2d(g, fs, so[0], so[1]) : fs;
    *xt = fs->shape[2] < ft->shape[2] ? kd__adaptive_avgpool2d(g, ft, to[0], to[1]) : ft;
    return kd_graph_status(g);
}

kd_status kd__map_pairs_term(kd_method *m, kd_step_ctx *ctx, int n_pairs, kd__map_pair_loss loss, kd_tensor **out) {
    kd_graph *g = ctx->g;
    kd_tensor *sum = NULL;
    *out = NULL;
    for (int i = 0; i < n_pairs; i++) {
        kd_tensor *xs, *xt, *l = NULL;
        KD_TRY(kd__map_pair(ctx, kd_method_get_def(m)->name, i + 1, &xs, &xt));
        KD_TRY(loss(m, ctx, i, xs, xt, &l));
        sum = sum ? kd_add(g, sum, l) : l;
    }
    *out = sum;
    return kd_graph_status(g);
}
