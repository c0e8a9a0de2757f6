/* Internal helpers for the method files: everything a method's setup, term and
 * step may call besides the public kd/distill.h. */
#ifndef KD_DISTILL_METHOD_IMPL_H
#define KD_DISTILL_METHOD_IMPL_H

#include <stddef.h>

#include "kd/autograd.h"
#include "kd/distill.h"
#include "kd/nn.h"

/* A method's settings table row: KD__ARG(struct, field, type, "default", "help"). */
#define KD__ARG(st, field, type, def, help) {#field, type, offsetof(st, field), def, help, NULL}
#define KD__ARG_CHOICE(st, field, choices, def, help) \
    {#field, KD_ARG_CHOICE, offsetof(st, field), def, help, choices}
#define KD__ARGS(table) (table), (int)(sizeof(table) / sizeof((table)[0]))

/* Deterministic initialisation stream of the method's modules: the run seed
 * and a key derived from the method name and `what`. */
void kd__method_rng(const kd_method *m, const char *what, kd_rng *r);

/* "(N, C, H, W)" of a shape, for error messages. */
const char *kd__shape_text(int ndim, const int64_t *shape, char *buf, size_t n);

/* KD_ERR_INVALID naming `what` unless in[0..n_in-1] are contiguous: for the
 * kd_functions that index their inputs as row-major arrays. */
kd_status kd__need_contiguous(const char *what, kd_tensor *const *in, int n_in);

/* Feature index k (negative counts from the end) on both nets: KD_ERR_INVALID
 * naming the setting ("rkd.feat") and the net where it is out of range; the
 * resolved indices go to *ks and *kt where they are not NULL. */
kd_status kd__feat_indices(const kd_method_shapes *shp, int k, const char *setting, int *ks, int *kt);

/* Feature k of student and teacher in a step (kd_method_feat, strided), which
 * must be there and have one batch size; errors name the setting. */
kd_status kd__feat_pair(kd_step_ctx *ctx, int k, const char *setting, kd_tensor **fs, kd_tensor **ft);

/* PyTorch's F.adaptive_avg_pool2d of x (N, C, H, W) to (N, C, oh, ow),
 * differentiable (feat_pool.c). */
kd_tensor *kd__adaptive_avgpool2d(kd_graph *g, kd_tensor *x, int64_t oh, int64_t ow);

/* RepDistiller's pairs of feature maps (AT, VID, NST): zip(feat_s[1:-1],
 * feat_t[1:-1]), the shorter list deciding their number, where the map with
 * the larger height is adaptive-average-pooled to (h, h), h the other's
 * height (feat_pool.c). kd__map_pairs checks at setup that there is at least
 * one pair and that every pair meets after the pooling (KD_ERR_SHAPE naming
 * the method and both shapes), and gives their number. kd__map_pairs_term is
 * the term of a step: the sum over pairs i < n_pairs (feature i + 1) of
 * loss(m, ctx, i, x_s, x_t, &l) on the pooled student map x_s and teacher
 * map x_t (helper/loops.py sums the per-pair losses). */
typedef kd_status (*kd__map_pair_loss)(kd_method *m, kd_step_ctx *ctx, int i, kd_tensor *xs, kd_tensor *xt,
                                       kd_tensor **loss);
kd_status kd__map_pairs(const kd_method *m, const kd_method_shapes *shp, int *n_pairs);
kd_status kd__map_pairs_term(kd_method *m, kd_step_ctx *ctx, int n_pairs, kd__map_pair_loss loss, kd_tensor **out);

/* The linear warm-up of a term over `warmup` epochs with 0-based epochs,
 * min(1, (epoch + 1) / warmup), so that the first epoch already has 1 /
 * warmup (mdistiller's DKD counts epochs from 1); warmup 0 is no ramp. Returns
 * the term scaled by it. */
static inline kd_tensor *kd__warmup(kd_graph *g, kd_tensor *term, int epoch, int warmup) {
    double ramp = warmup > 0 ? (double)(epoch + 1) / (double)warmup : 1.0;
    return ramp < 1.0 ? kd_scale(g, term, (float)ramp) : term;
}

/* Elements per sample of the last feature of n (feat[-1] flattened). */
static inline int64_t kd__last_feat_dim(const kd_net_shapes *n) {
    int64_t d = 1;
    for (int i = 1; i < n->feat_ndim[n->n_feat - 1]; i++) d *= n->feat[n->n_feat - 1][i];
    return d;
}

/* RepDistiller's LinearEmbed / Embed: l(f) of f (N, ...) viewed (N, d), then,
 * when normalize, divided by its row norm (at least eps); NULL f gives NULL. */
static inline kd_tensor *kd__linear_embed(kd_graph *g, const kd_linear_layer *l, kd_tensor *f, int64_t d,
                                          int normalize, float eps) {
    if (!f) return NULL;
    int64_t s2[2] = {f->shape[0], d};
    kd_tensor *e = kd_linear_layer_forward(g, l, f->ndim == 2 ? f : kd_reshape(g, f, 2, s2));
    return normalize ? kd_l2_normalize(g, e, eps) : e;
}

#endif
