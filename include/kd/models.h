/*
 * kd/models.h: the registry of named architectures.
 *
 * Every model returns its logits and the feature list that distillers use,
 * with RepDistiller's indexing: feat[0] = stem output, feat[1..n_feat-2] =
 * stage outputs, feat[n_feat-2] = last feature map, feat[n_feat-1] = pooled
 * penultimate embedding (N, feat_dim). preact[k] holds the pre-activation
 * version of feat[k] where the architecture defines one (else feat[k]).
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
