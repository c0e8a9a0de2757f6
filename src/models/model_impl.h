/* Internal: the model object shared by the architecture files and the registry. */
#ifndef KD_MODEL_IMPL_H
#define KD_MODEL_IMPL_H

#include "kd/models.h"

typedef struct {
    kd_status (*forward)(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out);
    void (*free_impl)(void *impl);
} kd__model_vt;

struct kd_model {
    char arch[48];
    kd_model_cfg cfg;
    kd_param_list params; /* owns every tensor, in state_dict order */
    int training;
    int64_t feat_dim;
    const kd__model_vt *vt;
    void *impl;
    /* cfg.head_layers layers of the SimCLRv2 head before the classifier. */
    kd_linear_layer neck_lin[2];
    kd_bn_layer neck_bn[2];
};

/* The classifier of every architecture: fc(emb), after the projection-head
 * layers of cfg.head_layers when there are any (kd_model_cfg). */
kd_tensor *kd__classify(kd_model *m, kd_graph *g, const kd_linear_layer *fc, kd_tensor *emb);

/* Constructors: fill m->params, m->impl, m->vt, m->feat_dim. `arg` comes from
 * the registry row (e.g. depth and widths). */
typedef struct {
    int depth;
    int widths[4];
} kd__arch_arg;

kd_status kd__resnet_cifar_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
kd_status kd__wrn_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
/* depth 8, 11, 13, 16 or 19 (RepDistiller's vgg*_bn). */
kd_status kd__vgg_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
/* widths[0] = expansion T, widths[1] = width multiplier in percent. */
kd_status kd__mobilenetv2_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
kd_status kd__shufflev1_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
kd_status kd__shufflev2_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
/* widths = bottleneck blocks per stage (3, 4, 6, 3 for ResNet50). */
kd_status kd__resnetv2_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
/* depth = index of the variant in swin.c's table (swin_t, swin_s, swin_b, swin_cifar, swin_mnist). */
kd_status kd__swin_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);

/* Helpers shared by the architecture files. */

/* bn(conv(x)), followed by ReLU when relu != 0, in its own scope: the
 * conv output (and with ReLU the BN output) is released at once unless a
 * backward rule reads it. */
static inline kd_tensor *kd__conv_bn(kd_graph *g, const kd_conv2d_layer *c, kd_bn_layer *b, kd_tensor *x,
                                     int training, int relu) {
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *y = kd_bn_layer_forward(g, b, kd_conv2d_layer_forward(g, c, x), training);
    return kd_graph_scope_return(g, sc, relu ? kd_relu(g, y) : y);
}

/* Ends the trunk scope `sc` (begun before the first layer) keeping h and
 * every feature recorded in out so far (feat[], preact[]). Called after
 * each block of a chain h = block(h), it releases the previous h and the
 * block's leftovers, so the chain holds only its newest output. Returns h. */
static inline kd_tensor *kd__trunk_keep(kd_graph *g, size_t sc, kd_tensor *h, const kd_model_out *out) {
    kd_tensor *keep[1 + 2 * KD_MAX_FEATS];
    int n = 0;
    keep[n++] = h;
    for (int k = 0; k < KD_MAX_FEATS; k++) {
        keep[n++] = out->feat[k];
        keep[n++] = out->preact[k];
    }
    kd_graph_scope_end(g, sc, n, keep);
    return h;
}

/* Registers a bias-free conv and the batch norm that follows it, under their
 * full state_dict prefixes. */
static inline kd_status kd__conv_bn_init(kd_conv2d_layer *c, kd_bn_layer *b, kd_param_list *pl,
                                         const char *conv_name, const char *bn_name, int64_t in,
                                         int64_t out, int64_t k, int64_t stride, int64_t pad,
                                         int64_t groups) {
    KD_TRY(kd_conv2d_layer_init(c, pl, conv_name, in, out, k, stride, pad, groups, 0));
    return kd_bn_layer_init(b, pl, bn_name, out);
}

/* ShuffleNet channel shuffle (N, C, H, W) -> view (N, g, C/g, H*W) ->
 * swap axes 1, 2 -> (N, C, H, W), as x.view(N,g,C//g,H,W).permute(0,2,1,3,4). */
static inline kd_tensor *kd__channel_shuffle(kd_graph *g, kd_tensor *x, int64_t groups) {
    if (!x || groups == 1) return x;
    int64_t n = x->shape[0], c = x->shape[1], h = x->shape[2], w = x->shape[3];
    int64_t sv[4] = {n, groups, c / groups, h * w}, s4[4] = {n, c, h, w};
    return kd_reshape(g, kd_transpose(g, kd_reshape(g, x, 4, sv), 1, 2), 4, s4);
}

#endif
