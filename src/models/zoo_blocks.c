/*
 * zoo_blocks.c: Conv2dNormActivation, SqueezeExcitation and the inverted
 * residual block shared by the ImageNet-size models (see zoo_blocks.h).
 */
#include "models/zoo_blocks.h"

#include <math.h>
#include <stdio.h>

kd_tensor *kd__act_apply(kd_graph *g, kd__act act, kd_tensor *x) {
    switch (act) {
    case KD__ACT_RELU: return kd_relu(g, x);
    case KD__ACT_HARDSWISH: return kd_hardswish(g, x);
    case KD__ACT_SILU: return kd_silu(g, x);
    case KD__ACT_SIGMOID: return kd_sigmoid(g, x);
    case KD__ACT_HARDSIGMOID: return kd_hardsigmoid(g, x);
    case KD__ACT_NONE: break;
    }
    return x;
}

int64_t kd__make_divisible(double v, int64_t divisor) {
    int64_t nv = (int64_t)(v + (double)divisor / 2.0) / divisor * divisor;
    if (nv < divisor) nv = divisor;
    if ((double)nv < 0.9 * v) nv += divisor; /* never round down by more than 10% */
    return nv;
}

kd_status kd__cna_init(kd__cna *u, kd_param_list *pl, const char *conv_prefix,
                       const char *bn_prefix, int64_t in, int64_t out, int64_t k,
                       int64_t stride, int64_t groups, kd__act act, kd__bn_cfg bn) {
    KD_TRY(kd_conv2d_layer_init(&u->conv, pl, conv_prefix, in, out, k, stride, (k - 1) / 2,
                                groups, 0));
    KD_TRY(kd_bn_layer_init(&u->bn, pl, bn_prefix, out));
    u->bn.eps = bn.eps;
    u->bn.momentum = bn.momentum;
    u->act = act;
    return KD_OK;
}

kd_tensor *kd__cna_forward(kd_graph *g, kd__cna *u, kd_tensor *x, int training,
                           kd_tensor **pre) {
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd_bn_layer_forward(g, &u->bn, kd_conv2d_layer_forward(g, &u->conv, x),
                                       training);
    if (pre) *pre = h;
    kd_tensor *keep[2] = {kd__act_apply(g, u->act, h), pre ? h : NULL};
    kd_graph_scope_end(g, sc, 2, keep);
    return keep[0];
}

kd_status kd__se_init(kd__se *se, kd_param_list *pl, const char *prefix, int64_t ch,
                      int64_t squeeze, kd__act act, kd__act scale_act) {
    char p[128];
    snprintf(p, sizeof p, "%s.fc1", prefix);
    KD_TRY(kd_conv2d_layer_init(&se->fc1, pl, p, ch, squeeze, 1, 1, 0, 1, 1));
    snprintf(p, sizeof p, "%s.fc2", prefix);
    KD_TRY(kd_conv2d_layer_init(&se->fc2, pl, p, squeeze, ch, 1, 1, 0, 1, 1));
    se->act = act;
    se->scale_act = scale_act;
    return KD_OK;
}

kd_tensor *kd__se_forward(kd_graph *g, kd__se *se, kd_tensor *x) {
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *s = kd_global_avgpool(g, x); /* (N, C) */
    if (!s) return NULL;
    int64_t s4[4] = {s->shape[0], s->shape[1], 1, 1};
    s = kd_reshape(g, s, 4, s4);
    s = kd__act_apply(g, se->act, kd_conv2d_layer_forward(g, &se->fc1, s));
    s = kd__act_apply(g, se->scale_act, kd_conv2d_layer_forward(g, &se->fc2, s));
    s = kd_flatten(g, s); /* (N, C) */
    return kd_graph_scope_return(g, sc, kd_mul_channel(g, x, s));
}

kd_status kd__mbconv_init(kd__mbconv *b, kd_param_list *pl, const char *prefix,
                          const kd__mbconv_cfg *c, kd__bn_cfg bn) {
    char cp[128], bp[128];
    int j = 0;
    b->has_expand = c->expanded != c->in;
    if (b->has_expand) {
        snprintf(cp, sizeof cp, "%s.block.%d.0", prefix, j);
        snprintf(bp, sizeof bp, "%s.block.%d.1", prefix, j++);
        KD_TRY(kd__cna_init(&b->expand, pl, cp, bp, c->in, c->expanded, 1, 1, 1, c->act, bn));
    }
    snprintf(cp, sizeof cp, "%s.block.%d.0", prefix, j);
    snprintf(bp, sizeof bp, "%s.block.%d.1", prefix, j++);
    KD_TRY(kd__cna_init(&b->dw, pl, cp, bp, c->expanded, c->expanded, c->kernel, c->stride,
                        c->expanded, c->act, bn));
    b->has_se = c->squeeze > 0;
    if (b->has_se) {
        snprintf(cp, sizeof cp, "%s.block.%d", prefix, j++);
        KD_TRY(kd__se_init(&b->se, pl, cp, c->expanded, c->squeeze, c->se_act, c->se_scale_act));
    }
    snprintf(cp, sizeof cp, "%s.block.%d.0", prefix, j);
    snprintf(bp, sizeof bp, "%s.block.%d.1", prefix, j);
    KD_TRY(kd__cna_init(&b->project, pl, cp, bp, c->expanded, c->out, 1, 1, 1, KD__ACT_NONE, bn));
    b->use_res = c->stride == 1 && c->in == c->out;
    b->sd_prob = c->sd_prob;
    b->stride = (int)c->stride;
    return KD_OK;
}

kd_tensor *kd__mbconv_forward(kd_graph *g, kd__mbconv *b, kd_tensor *x, int training) {
    /* The block's scope is ended after each unit (keeping the newest h) and
     * at the end (keeping the output). */
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = x;
    if (b->has_expand) h = kd__cna_forward(g, &b->expand, h, training, NULL);
    h = kd_graph_scope_return(g, sc, kd__cna_forward(g, &b->dw, h, training, NULL));
    if (b->has_se) h = kd_graph_scope_return(g, sc, kd__se_forward(g, &b->se, h));
    h = kd_graph_scope_return(g, sc, kd__cna_forward(g, &b->project, h, training, NULL));
    if (!b->use_res || !h) return h;
    if (training && b->sd_prob > 0.0f) {
        /* StochasticDepth(p, "row"): each sample's branch is kept with
         * probability 1 - p and then scaled by 1 / (1 - p); the mask is a
         * dropout of a (N, 1) tensor of ones on the graph's dropout stream. */
        int64_t s2[2] = {h->shape[0], 1};
        kd_tensor *ones = kd_graph_tensor(g, KD_F32, 2, s2);
        if (!ones) return NULL;
        for (int64_t i = 0; i < s2[0]; i++) kd_f32(ones)[i] = 1.0f;
        h = kd_mul_channel(g, h, kd_dropout(g, ones, b->sd_prob, 1));
    }
    return kd_graph_scope_return(g, sc, kd_add(g, h, x));
}

void kd__init_convs_fan_out(kd_param_list *pl, kd_rng *r) {
    for (int i = 0; i < pl->n; i++) {
        kd_param *p = &pl->items[i];
        if (p->t->ndim == 4) kd_init_kaiming_normal_fan_out(p->t, r);
    }
}

kd_tensor *kd__mbnet_trunk(kd_graph *g, kd__cna *stem, kd__mbconv *blocks, int nblocks, kd__cna *last_unit,
                           kd_tensor *x, int training, int flags, kd_model_out *out) {
    int k = 0;
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd__cna_forward(g, stem, x, training, NULL);
    out->feat[k++] = h;
    for (int i = 0; i < nblocks; i++) {
        h = kd__mbconv_forward(g, &blocks[i], h, training);
        if (i == nblocks - 1 || blocks[i + 1].stride == 2) out->feat[k++] = h;
        kd__trunk_keep(g, sc, h, out);
    }
    kd_tensor *pre = NULL;
    h = kd__cna_forward(g, last_unit, h, training, &pre);
    int last = k;
    out->feat[k++] = h;
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[k++] = emb;
    out->n_feat = k;
    if (flags & KD_FWD_PREACT) {
        for (int i = 0; i < k; i++) out->preact[i] = out->feat[i];
        out->preact[last] = pre;
    }
    return emb;
}
