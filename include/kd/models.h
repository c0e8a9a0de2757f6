/*
 * kd/models.h: the registry of named architectures.
 *
 * Every model returns its logits and the feature list that distillers use,
 * with RepDistiller's indexing: feat[0] = stem output, feat[1..n_feat-2] =
 * stage outputs, feat[n_feat-2] = last feature map, feat[n_feat-1] = pooled
 * penultimate embedding (N, feat_dim). preact[k] holds the pre-activation
 * version of feat[k] where the architecture defines one (else feat[k]).
 *
 * torchvision's ImageNet models (names as in torchvision.models; any input
 * size from 32x32; state_dict names and init as torchvision) index feat[] by
 * output stride:
 *   resnet18/34/50      n_feat 6: [0] stem after the max pool (stride 4),
 *                       [1..4] layer1..layer4 (strides 4, 8, 16, 32; [4] is
 *                       also the final map), [5] pooled (N, 512 or 2048).
 *   mobilenet_v3_large  n_feat 8: [0] stem (stride 2), [1..5] last block at
 *                       strides 2, 4, 8, 16, 32, [6] final 1x1 conv (960),
 *                       [7] pooled (N, 960), the classifier's input.
 *   mobilenet_v3_small  n_feat 7: [0] stem (2), [1..4] strides 4, 8, 16, 32,
 *                       [5] final 1x1 conv (576), [6] pooled (N, 576).
 *   efficientnet_b0     n_feat 8: [0] stem (2), [1..5] features.1, 2, 3, 5, 7
 *                       (strides 2, 4, 8, 16, 32), [6] features.8 (1280),
 *                       [7] pooled (N, 1280).
 * preact[] of the ResNets holds each stage's last sum before the ReLU; of the
 * mobile nets, the final conv's BN output before its activation.
 *
 * Usage:
 *     kd_model *m;
 *     kd_model_cfg cfg = {.in_channels = 1, .num_classes = 10, .seed = 0};
 *     if (kd_model_create("resnet8x4", &cfg, &m) != KD_OK) puts(kd_last_error());
 *     kd_model_out o;
 *     kd_model_forward(m, g, x, 0, &o);   // o.logits (N, 10), o.feat[...]
 *     kd_model_free(m);
 */
#ifndef KD_MODELS_H
#define KD_MODELS_H

#include "kd/autograd.h"
#include "kd/nn.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KD_MAX_FEATS 8

typedef struct {
    kd_tensor *logits; /* (N, num_classes) */
    int n_feat;
    kd_tensor *feat[KD_MAX_FEATS];
    kd_tensor *preact[KD_MAX_FEATS]; /* filled when KD_FWD_PREACT is asked, else NULL */
} kd_model_out;

/* Flags for kd_model_forward. */
enum { KD_FWD_PREACT = 1 };

typedef struct {
    int in_channels;  /* 3 for CIFAR, 1 for MNIST-like data */
    int num_classes;
    uint64_t seed;    /* weight initialisation */
    /* SimCLRv2 fine-tuning from the projection head (google-research/simclr
     * ft_proj_selector): the first head_layers layers of the SimCLRv2 head
     * (Linear(d, d, no bias) -> BN -> ReLU; PyTorch names head.0/head.1,
     * head.3/head.4, as an encoder checkpoint of kd pretrain holds them) sit
     * between the embedding and the classifier. 0 (default), 1 or 2. */
    int head_layers;
} kd_model_cfg;

typedef struct kd_model kd_model;

/* Creates an initialised model; an unknown name fails with KD_ERR_NOT_FOUND
 * and a message listing the known names. */
kd_status kd_model_create(const char *arch, const kd_model_cfg *cfg, kd_model **out);
void kd_model_free(kd_model *m);
kd_status kd_model_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out);
void kd_model_set_training(kd_model *m, int training);
int kd_model_training(const kd_model *m);
const char *kd_model_arch(const kd_model *m);
const kd_model_cfg *kd_model_config(const kd_model *m);
kd_param_list *kd_model_params(kd_model *m);
int64_t kd_model_num_params(const kd_model *m); /* trainable elements */
int64_t kd_model_feat_dim(const kd_model *m);   /* size of feat[n_feat-1] */
/* Names of the registered architectures; *n receives the count. */
const char *const *kd_model_names(int *n);
int kd_model_exists(const char *arch);

#ifdef __cplusplus
}
#endif
#endif /* KD_MODELS_H */
