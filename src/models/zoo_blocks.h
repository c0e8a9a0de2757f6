/*
 * zoo_blocks.h: building blocks of the ImageNet-size models (torchvision's
 * resnet, mobilenetv3, efficientnet), internal to src/models.
 *
 *   kd__cna     Conv2dNormActivation: conv (no bias) + batch norm + activation.
 *   kd__se      SqueezeExcitation: global average pool, fc1 (1x1 conv with
 *               bias), activation, fc2 (1x1 conv with bias), scale activation,
 *               channel-wise product with the input.
 *   kd__mbconv  the inverted residual block of MobileNetV3 and EfficientNet:
 *               optional 1x1 expansion, depthwise kxk, optional SE, 1x1
 *               projection without activation, residual when the shapes allow,
 *               optional stochastic depth ("row" mode) in training.
 * Names follow the torchvision state_dict: a kd__cna registers
 * "<conv_prefix>.weight" and "<bn_prefix>.{weight,bias,running_mean,...}".
 */
#ifndef KD_ZOO_BLOCKS_H
#define KD_ZOO_BLOCKS_H

#include "models/model_impl.h"

typedef enum {
    KD__ACT_NONE = 0,
    KD__ACT_RELU,
    KD__ACT_HARDSWISH,
    KD__ACT_SILU,
    KD__ACT_SIGMOID,
    KD__ACT_HARDSIGMOID
} kd__act;

/* Batch-norm hyper-parameters of a model family. */
typedef struct {
    float eps, momentum;
} kd__bn_cfg;

typedef struct {
    kd_conv2d_layer conv;
    kd_bn_layer bn;
    kd__act act;
} kd__cna;

typedef struct {
    kd_conv2d_layer fc1, fc2; /* (S, C, 1, 1) + bias (S); (C, S, 1, 1) + bias (C) */
    kd__act act, scale_act;
} kd__se;

typedef struct {
    int has_expand, has_se, use_res;
    kd__cna expand, dw, project;
    kd__se se;
    float sd_prob; /* stochastic depth drop probability (0: none) */
    int stride;
} kd__mbconv;

/* y = act(x) for one of the activations above. */
kd_tensor *kd__act_apply(kd_graph *g, kd__act act, kd_tensor *x);

/* Padding (k - 1) / 2 as torchvision. groups = out channels for depthwise. */
kd_status kd__cna_init(kd__cna *u, kd_param_list *pl, const char *conv_prefix,
                       const char *bn_prefix, int64_t in, int64_t out, int64_t k,
                       int64_t stride, int64_t groups, kd__act act, kd__bn_cfg bn);
/* *pre (may be NULL) receives the batch-norm output before the activation. */
kd_tensor *kd__cna_forward(kd_graph *g, kd__cna *u, kd_tensor *x, int training,
                           kd_tensor **pre);

kd_status kd__se_init(kd__se *se, kd_param_list *pl, const char *prefix, int64_t ch,
                      int64_t squeeze, kd__act act, kd__act scale_act);
kd_tensor *kd__se_forward(kd_graph *g, kd__se *se, kd_tensor *x);

/* One inverted residual block registered under `prefix` ("features.3" or
 * "features.2.1"): its layers are "<prefix>.block.<j>" with j counting the
 * present ones (expand, depthwise, SE, project), as torchvision numbers them. */
typedef struct {
    int64_t in, expanded, out, kernel, stride, squeeze; /* squeeze 0: no SE */
    kd__act act, se_act, se_scale_act;
    float sd_prob;
} kd__mbconv_cfg;

kd_status kd__mbconv_init(kd__mbconv *b, kd_param_list *pl, const char *prefix,
                          const kd__mbconv_cfg *c, kd__bn_cfg bn);
kd_tensor *kd__mbconv_forward(kd_graph *g, kd__mbconv *b, kd_tensor *x, int training);

/* The shared MobileNetV3 / EfficientNet trunk: stem, the inverted-residual
 * blocks, the last 1x1 conv unit and global average pooling. Fills
 * out->feat (stem, each stage's output before a stride-2 block and the last
 * block, the last conv map, the pooled embedding), out->n_feat and, with
 * KD_FWD_PREACT, out->preact (the last conv unit's pre-activation). Returns
 * the pooled embedding (N, C). */
kd_tensor *kd__mbnet_trunk(kd_graph *g, kd__cna *stem, kd__mbconv *blocks, int nblocks, kd__cna *last_unit,
                           kd_tensor *x, int training, int flags, kd_model_out *out);

/* torchvision's _make_divisible(v, divisor) with min_value = divisor. */
int64_t kd__make_divisible(double v, int64_t divisor);

/* torchvision's init of every conv weight: kaiming_normal_(mode="fan_out")
 * (gain sqrt(2)); conv biases 0; batch norm 1 / 0 (kd_bn_layer_init).
 * Walks the parameter list: 4-d tensors are conv weights. */
void kd__init_convs_fan_out(kd_param_list *pl, kd_rng *r);

/* Constructors of the ImageNet-size architectures (registry.c). */
kd_status kd__resnet_imagenet_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
kd_status kd__mobilenetv3_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
kd_status kd__efficientnet_build(kd_model *m, const kd__arch_arg *arg, kd_rng *r);

#endif /* KD_ZOO_BLOCKS_H */
