/*
 * kd/nn.h: parameters with PyTorch-style dotted names, and the standard layers
 * (conv2d, batch norm, linear) built on the autograd ops.
 *
 * A kd_param_list owns every tensor of a model: trainable parameters
 * ("layer1.0.conv1.weight") and buffers ("layer1.0.bn1.running_mean",
 * "...num_batches_tracked"), in registration order, which is the order of
 * the PyTorch state_dict of the same architecture.
 *
 * Usage:
 *     kd_param_list pl = {0};
 *     kd_conv2d_layer c;
 *     kd_conv2d_layer_init(&c, &pl, "conv1", 3, 16, 3, 1, 1, 1, 0);
 *     kd_tensor *y = kd_conv2d_layer_forward(g, &c, x);
 *     kd_params_free(&pl);
 */
#ifndef KD_NN_H
#define KD_NN_H

#include "kd/autograd.h"
#include "kd/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    KD_PARAM_WEIGHT = 0, /* trainable, weight decay applies */
    KD_PARAM_NO_DECAY,   /* trainable; bias and norm parameters (no decay where recipes say so) */
    KD_PARAM_BUFFER      /* not trainable: running statistics, counters */
} kd_param_kind;

typedef struct {
    char name[128];
    kd_tensor *t;
    kd_param_kind kind;
    int borrowed; /* 1: t belongs to another list (kd_params_borrow); kd_params_free leaves it */
} kd_param;

typedef struct {
    kd_param *items;
    int n, cap;
} kd_param_list;

/* Creates a zeroed tensor, registers it under `prefix.name` (or `name` when
 * prefix is empty) and returns it in *out. Trainable tensors get a grad. */
kd_status kd_params_new(kd_param_list *pl, const char *prefix, const char *name, kd_dtype dt,
                        int ndim, const int64_t *shape, kd_param_kind kind, kd_tensor **out);
kd_param *kd_params_find(const kd_param_list *pl, const char *name);
/* Lists every tensor of src in pl as `prefix.name` without copying (the
 * tensors stay src's: a method that trains a whole model of its own, DoGo's
 * peer, makes it part of its parameters and checkpoint this way); src must
 * outlive pl's use of them. */
kd_status kd_params_borrow(kd_param_list *pl, const char *prefix, const kd_param_list *src);
/* Number of trainable elements (PyTorch's sum(p.numel() for p in parameters())). */
int64_t kd_params_count(const kd_param_list *pl);
void kd_params_zero_grad(kd_param_list *pl);
/* Copies values (not grads) from src to dst by name; shapes must match. */
kd_status kd_params_copy(kd_param_list *dst, const kd_param_list *src);
void kd_params_free(kd_param_list *pl);
/* Exponential moving average of the trainable tensors, matched by name:
 * ema = momentum * ema + (1 - momentum) * src, bit-exact with MoCo's
 * param_k.data * m + param_q.data * (1. - m) and DINO's
 * param_k.mul_(m).add_((1 - m) * param_q) in float32; buffers (running
 * statistics) are left to the EMA model's own forwards, as MoCo and DINO do. */
kd_status kd_ema_update(kd_param_list *ema, const kd_param_list *src, double momentum);

/* ----------------------------------------------------------- initialisers */

/* PyTorch nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'). */
void kd_init_kaiming_normal_fan_out(kd_tensor *w, kd_rng *r);
/* N(0, std). */
void kd_init_normal(kd_tensor *w, float std, kd_rng *r);
/* U(-bound, bound): PyTorch's default Linear/Conv init uses 1/sqrt(fan_in). */
void kd_init_uniform(kd_tensor *w, float bound, kd_rng *r);
void kd_init_constant(kd_tensor *w, float v);
/* PyTorch nn.init.trunc_normal_(w, std=std, a=-2, b=2): N(0, std) redrawn
 * outside the absolute bounds [-2, 2] (ViT, Swin and DINO use std 0.02). */
void kd_init_trunc_normal(kd_tensor *w, float std, kd_rng *r);
/* fan_in of a weight (O, I, KH, KW) or (O, I). */
int64_t kd_fan_in(const kd_tensor *w);

/* ---------------------------------------------------------------- layers */

typedef struct {
    kd_tensor *weight; /* (O, I/groups, K, K) */
    kd_tensor *bias;   /* (O) or NULL */
    kd_conv2d_params p;
} kd_conv2d_layer;

/* PyTorch default init (kaiming uniform a=sqrt(5), bias U(+-1/sqrt(fan_in)))
 * is applied by the model constructor; this only allocates. */
kd_status kd_conv2d_layer_init(kd_conv2d_layer *l, kd_param_list *pl, const char *prefix,
                               int64_t in_ch, int64_t out_ch, int64_t kernel, int64_t stride,
                               int64_t pad, int64_t groups, int bias);
kd_tensor *kd_conv2d_layer_forward(kd_graph *g, const kd_conv2d_layer *l, kd_tensor *x);

typedef struct {
    kd_tensor *weight, *bias;              /* (C) gamma, beta */
    kd_tensor *running_mean, *running_var; /* (C) */
    kd_tensor *num_batches_tracked;        /* I64 scalar, as in PyTorch */
    float eps, momentum;
} kd_bn_layer;

/* weight = 1, bias = 0, running_var = 1, eps 1e-5, momentum 0.1. */
kd_status kd_bn_layer_init(kd_bn_layer *l, kd_param_list *pl, const char *prefix, int64_t ch);
/* Training mode uses batch statistics and updates the running ones. */
kd_tensor *kd_bn_layer_forward(kd_graph *g, kd_bn_layer *l, kd_tensor *x, int training);

typedef struct {
    kd_tensor *weight; /* (out, in) */
    kd_tensor *bias;   /* (out) or NULL */
} kd_linear_layer;

kd_status kd_linear_layer_init(kd_linear_layer *l, kd_param_list *pl, const char *prefix,
                               int64_t in, int64_t out, int bias);
kd_tensor *kd_linear_layer_forward(kd_graph *g, const kd_linear_layer *l, kd_tensor *x);

/* nn.LayerNorm(ch) over the last axis: weight 1, bias 0 (both no decay). */
typedef struct {
    kd_tensor *weight, *bias; /* (C) */
    float eps;                /* 1e-5 as PyTorch */
} kd_ln_layer;

kd_status kd_ln_layer_init(kd_ln_layer *l, kd_param_list *pl, const char *prefix, int64_t ch);
kd_tensor *kd_ln_layer_forward(kd_graph *g, const kd_ln_layer *l, kd_tensor *x);
/* PyTorch default Linear init: weight and bias U(+-1/sqrt(in)). */
void kd_linear_layer_default_init(kd_linear_layer *l, kd_rng *r);

#ifdef __cplusplus
}
#endif
#endif /* KD_NN_H */
