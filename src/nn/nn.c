/* Parameter lists with PyTorch names, initialisers, and the conv2d, batch norm
 * and linear layers on top of the autograd ops. */
#include "kd/nn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

kd_status kd_params_new(kd_param_list *pl, const char *prefix, const char *name, kd_dtype dt,
                        int ndim, const int64_t *shape, kd_param_kind kind, kd_tensor **out) {
    *out = NULL;
    if (pl->n == pl->cap) {
        int cap = pl->cap ? pl->cap * 2 : 64;
        kd_param *items = realloc(pl->items, (size_t)cap * sizeof *items);
        if (!items) return kd_error(KD_ERR_NOMEM, "out of memory growing a parameter list");
        pl->items = items;
        pl->cap = cap;
    }
    kd_param *p = &pl->items[pl->n];
    memset(p, 0, sizeof *p);
    int w = (prefix && prefix[0]) ? snprintf(p->name, sizeof p->name, "%s.%s", prefix, name)
                                  : snprintf(p->name, sizeof p->name, "%s", name);
    if (w < 0 || (size_t)w >= sizeof p->name)
        return kd_error(KD_ERR_INVALID, "parameter name '%s.%s' is too long", prefix, name);
    KD_TRY(kd_tensor_new(dt, ndim, shape, &p->t));
    p->kind = kind;
    if (kind != KD_PARAM_BUFFER) {
        kd_status s = kd_tensor_require_grad(p->t);
        if (s != KD_OK) {
            kd_tensor_free(p->t);
            return s;
        }
    }
    pl->n++;
    *out = p->t;
    return KD_OK;
}

kd_param *kd_params_find(const kd_param_list *pl, const char *name) {
    for (int i = 0; i < pl->n; i++)
        if (strcmp(pl->items[i].name, name) == 0) return &pl->items[i];
    return NULL;
}

int64_t kd_params_count(const kd_param_list *pl) {
    int64_t n = 0;
    for (int i = 0; i < pl->n; i++)
        if (pl->items[i].kind != KD_PARAM_BUFFER) n += kd_tensor_numel(pl->items[i].t);
    return n;
}

void kd_params_zero_grad(kd_param_list *pl) {
    for (int i = 0; i < pl->n; i++) {
        kd_tensor *t = pl->items[i].t;
        if (t->grad) memset(t->grad->data, 0, kd_tensor_nbytes(t->grad));
    }
}

kd_status kd_params_copy(kd_param_list *dst, const kd_param_list *src) {
    for (int i = 0; i < dst->n; i++) {
        kd_param *d = &dst->items[i];
        kd_param *s = kd_params_find(src, d->name);
        if (!s) return kd_error(KD_ERR_NOT_FOUND, "no parameter '%s' to copy from", d->name);
        if (!kd_tensor_same_shape(s->t, d->t) || s->t->dtype != d->t->dtype)
            return kd_error(KD_ERR_SHAPE, "parameter '%s' differs in shape or dtype", d->name);
        memcpy(d->t->data, s->t->data, kd_tensor_nbytes(d->t));
    }
    return KD_OK;
}

kd_status kd_params_borrow(kd_param_list *pl, const char *prefix, const kd_param_list *src) {
    for (int i = 0; i < src->n; i++) {
        if (pl->n == pl->cap) {
            int cap = pl->cap ? pl->cap * 2 : 64;
            kd_param *items = realloc(pl->items, (size_t)cap * sizeof *items);
            if (!items) return kd_error(KD_ERR_NOMEM, "out of memory growing a parameter list");
            pl->items = items;
            pl->cap = cap;
        }
        kd_param *p = &pl->items[pl->n];
        *p = src->items[i];
        int w = snprintf(p->name, sizeof p->name, "%s.%s", prefix, src->items[i].name);
        if (w < 0 || (size_t)w >= sizeof p->name)
            return kd_error(KD_ERR_INVALID, "parameter name '%s.%s' is too long", prefix, src->items[i].name);
        p->borrowed = 1;
        pl->n++;
    }
    return KD_OK;
}

void kd_params_free(kd_param_list *pl) {
    for (int i = 0; i < pl->n; i++)
        if (!pl->items[i].borrowed) kd_tensor_free(pl->items[i].t);
    free(pl->items);
    memset(pl, 0, sizeof *pl);
}

/* ------------------------------------------------------------- initialisers */

int64_t kd_fan_in(const kd_tensor *w) {
    int64_t f = 1;
    for (int i = 1; i < w->ndim; i++) f *= w->shape[i];
    return f;
}

void kd_init_normal(kd_tensor *w, float std, kd_rng *r) {
    float *p = kd_f32(w);
    int64_t n = kd_tensor_numel(w);
    for (int64_t i = 0; i < n; i++) p[i] = std * kd_rng_normal(r);
}

void kd_init_trunc_normal(kd_tensor *w, float std, kd_rng *r) {
    float *p = kd_f32(w);
    int64_t n = kd_tensor_numel(w);
    for (int64_t i = 0; i < n; i++) {
        float v;
        do v = std * kd_rng_normal(r);
        while (v < -2.0f || v > 2.0f);
        p[i] = v;
    }
}

void kd_init_kaiming_normal_fan_out(kd_tensor *w, kd_rng *r) {
    /* fan_out = out_channels * receptive field; gain sqrt(2) for ReLU. */
    int64_t fan_out = w->shape[0];
    for (int i = 2; i < w->ndim; i++) fan_out *= w->shape[i];
    kd_init_normal(w, sqrtf(2.0f / (float)fan_out), r);
}

void kd_init_uniform(kd_tensor *w, float bound, kd_rng *r) {
    float *p = kd_f32(w);
    int64_t n = kd_tensor_numel(w);
    for (int64_t i = 0; i < n; i++) p[i] = bound * (2.0f * kd_rng_uniform(r) - 1.0f);
}

void kd_init_constant(kd_tensor *w, float v) {
    float *p = kd_f32(w);
    int64_t n = kd_tensor_numel(w);
    for (int64_t i = 0; i < n; i++) p[i] = v;
}

/* ------------------------------------------------------------------ layers */

kd_status kd_conv2d_layer_init(kd_conv2d_layer *l, kd_param_list *pl, const char *prefix,
                               int64_t in_ch, int64_t out_ch, int64_t kernel, int64_t stride,
                               int64_t pad, int64_t groups, int bias) {
    memset(l, 0, sizeof *l);
    if (groups < 1 || in_ch % groups || out_ch % groups)
        return kd_error(KD_ERR_INVALID, "%s: channels %lld -> %lld not divisible by %lld groups",
                        prefix, (long long)in_ch, (long long)out_ch, (long long)groups);
    int64_t ws[4] = {out_ch, in_ch / groups, kernel, kernel};
    KD_TRY(kd_params_new(pl, prefix, "weight", KD_F32, 4, ws, KD_PARAM_WEIGHT, &l->weight));
    if (bias) KD_TRY(kd_params_new(pl, prefix, "bias", KD_F32, 1, &out_ch, KD_PARAM_NO_DECAY, &l->bias));
    l->p = (kd_conv2d_params){{stride, stride}, {pad, pad}, {1, 1}, groups, 0};
    return KD_OK;
}

kd_tensor *kd_conv2d_layer_forward(kd_graph *g, const kd_conv2d_layer *l, kd_tensor *x) {
    return kd_conv2d(g, x, l->weight, l->bias, &l->p);
}

kd_status kd_bn_layer_init(kd_bn_layer *l, kd_param_list *pl, const char *prefix, int64_t ch) {
    memset(l, 0, sizeof *l);
    KD_TRY(kd_params_new(pl, prefix, "weight", KD_F32, 1, &ch, KD_PARAM_NO_DECAY, &l->weight));
    KD_TRY(kd_params_new(pl, prefix, "bias", KD_F32, 1, &ch, KD_PARAM_NO_DECAY, &l->bias));
    KD_TRY(kd_params_new(pl, prefix, "running_mean", KD_F32, 1, &ch, KD_PARAM_BUFFER, &l->running_mean));
    KD_TRY(kd_params_new(pl, prefix, "running_var", KD_F32, 1, &ch, KD_PARAM_BUFFER, &l->running_var));
    KD_TRY(kd_params_new(pl, prefix, "num_batches_tracked", KD_I64, 0, NULL, KD_PARAM_BUFFER,
                         &l->num_batches_tracked));
    kd_init_constant(l->weight, 1.0f);
    kd_init_constant(l->running_var, 1.0f);
    l->eps = 1e-5f;
    l->momentum = 0.1f;
    return KD_OK;
}

kd_tensor *kd_bn_layer_forward(kd_graph *g, kd_bn_layer *l, kd_tensor *x, int training) {
    kd_bn_params p = {l->eps, l->momentum, training};
    kd_tensor *y = kd_batchnorm(g, x, l->weight, l->bias, l->running_mean, l->running_var, &p);
    if (y && training) ((int64_t *)l->num_batches_tracked->data)[0] += 1;
    return y;
}

kd_status kd_linear_layer_init(kd_linear_layer *l, kd_param_list *pl, const char *prefix,
                               int64_t in, int64_t out, int bias) {
    memset(l, 0, sizeof *l);
    int64_t ws[2] = {out, in};
    KD_TRY(kd_params_new(pl, prefix, "weight", KD_F32, 2, ws, KD_PARAM_WEIGHT, &l->weight));
    if (bias) KD_TRY(kd_params_new(pl, prefix, "bias", KD_F32, 1, &out, KD_PARAM_NO_DECAY, &l->bias));
    return KD_OK;
}

void kd_linear_layer_default_init(kd_linear_layer *l, kd_rng *r) {
    float bound = 1.0f / sqrtf((float)l->weight->shape[1]);
    kd_init_uniform(l->weight, bound, r);
    if (l->bias) kd_init_uniform(l->bias, bound, r);
}

kd_tensor *kd_linear_layer_forward(kd_graph *g, const kd_linear_layer *l, kd_tensor *x) {
    return kd_linear(g, x, l->weight, l->bias);
}

kd_status kd_ema_update(kd_param_list *ema, const kd_param_list *src, double momentum) {
    if (!(momentum >= 0 && momentum <= 1))
        return kd_error(KD_ERR_INVALID, "EMA momentum %g must be in [0, 1]", momentum);
    const float m = (float)momentum, a = (float)(1.0 - momentum);
    for (int i = 0; i < ema->n; i++) {
        kd_param *e = &ema->items[i];
        if (e->kind == KD_PARAM_BUFFER) continue;
        /* Copies of one architecture list their tensors in the same order. */
        const kd_param *p = i < src->n && !strcmp(src->items[i].name, e->name) ? &src->items[i]
                                                                               : kd_params_find(src, e->name);
        if (!p || kd_tensor_numel(p->t) != kd_tensor_numel(e->t))
            return kd_error(KD_ERR_SHAPE, "EMA: the source has no tensor '%s' of %lld elements", e->name,
                            (long long)kd_tensor_numel(e->t));
        float *d = kd_f32(e->t);
        const float *x = kd_f32(p->t);
        const int64_t n = kd_tensor_numel(e->t);
        for (int64_t j = 0; j < n; j++) d[j] = d[j] * m + a * x[j];
    }
    return KD_OK;
}

kd_status kd_ln_layer_init(kd_ln_layer *l, kd_param_list *pl, const char *prefix, int64_t ch) {
    memset(l, 0, sizeof *l);
    KD_TRY(kd_params_new(pl, prefix, "weight", KD_F32, 1, &ch, KD_PARAM_NO_DECAY, &l->weight));
    KD_TRY(kd_params_new(pl, prefix, "bias", KD_F32, 1, &ch, KD_PARAM_NO_DECAY, &l->bias));
    kd_init_constant(l->weight, 1.0f);
    l->eps = 1e-5f;
    return KD_OK;
}

kd_tensor *kd_ln_layer_forward(kd_graph *g, const kd_ln_layer *l, kd_tensor *x) {
    return kd_layernorm(g, x, l->weight, l->bias, l->eps);
}
