/* VGG with batch norm as defined by RepDistiller (models/vgg.py, the *_bn
 * variants its model_dict names vgg8, vgg11, vgg13, vgg16, vgg19): five
 * blocks of 3x3 conv (with bias) + BN, ReLU between convs and after each
 * block, 2x2 max pooling after blocks 0..2 (and after block 3 only for 64x64
 * inputs, as the reference), adaptive average pool and one Linear(512, C).
 * Names follow the PyTorch state_dict: "block1.3.weight" is the second conv of
 * block 1 (Sequential index 3*i for conv i, 3*i+1 for its BN),
 * "classifier.weight". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

#define KD__VGG_MAX_CONVS 4

typedef struct {
    int n; /* convs in this block */
    kd_conv2d_layer conv[KD__VGG_MAX_CONVS];
    kd_bn_layer bn[KD__VGG_MAX_CONVS];
} kd__vgg_block;

typedef struct {
    kd__vgg_block block[5];
    kd_linear_layer classifier; /* (C, 512) */
} kd__vgg;

/* Channels per block and convs per block (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E'). */
static const struct {
    int depth;
    int convs[5];
} kd__vgg_cfgs[] = {
    {8, {1, 1, 1, 1, 1}},  {11, {1, 1, 2, 2, 2}}, {13, {2, 2, 2, 2, 2}},
    {16, {2, 2, 3, 3, 3}}, {19, {2, 2, 4, 4, 4}},
};
static const int64_t kd__vgg_width[5] = {64, 128, 256, 512, 512};

/* Block b without its final ReLU (the reference drops the last layer of
 * each Sequential). Each conv-BN(-ReLU) unit has its own scope, and the
 * block's scope keeps only its output. */
static kd_tensor *kd__vgg_block_forward(kd_graph *g, kd__vgg_block *b, kd_tensor *x, int tr) {
    size_t sc = kd_graph_scope_begin(g);
    for (int i = 0; i < b->n; i++) {
        x = kd__conv_bn(g, &b->conv[i], &b->bn[i], x, tr, i + 1 < b->n);
        kd_graph_scope_end(g, sc, 1, &x);
    }
    return x;
}

static kd_status kd__vgg_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    kd__vgg *v = m->impl;
    int tr = m->training, pa = flags & KD_FWD_PREACT;
    int64_t h_in = x->shape[2];
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd_relu(g, kd__vgg_block_forward(g, &v->block[0], x, tr));
    out->feat[0] = h;
    if (pa) out->preact[0] = h;
    kd__trunk_keep(g, sc, h, out);
    for (int b = 1; b < 5; b++) {
        if (b < 4 || h_in == 64) h = kd__trunk_keep(g, sc, kd_maxpool2d(g, h, 2, 2, 0), out);
        kd_tensor *pre = kd__vgg_block_forward(g, &v->block[b], h, tr);
        h = kd_relu(g, pre);
        out->feat[b] = h;
        if (pa) out->preact[b] = pre;
        kd__trunk_keep(g, sc, h, out);
    }
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[5] = emb;
    if (pa) out->preact[5] = emb;
    out->n_feat = 6;
    out->logits = kd__classify(m, g, &v->classifier, emb);
    return kd_graph_status(g);
}

static const kd__model_vt kd__vgg_vt = {kd__vgg_forward, free};

kd_status kd__vgg_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    int row = -1;
    for (int i = 0; i < (int)(sizeof kd__vgg_cfgs / sizeof kd__vgg_cfgs[0]); i++)
        if (kd__vgg_cfgs[i].depth == arg->depth) row = i;
    if (row < 0) return kd_error(KD_ERR_INVALID, "vgg depth %d is not 8, 11, 13, 16 or 19", arg->depth);
    kd__vgg *v = calloc(1, sizeof *v);
    if (!v) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = v;
    m->vt = &kd__vgg_vt;
    kd_param_list *pl = &m->params;
    int64_t in = m->cfg.in_channels;
    for (int b = 0; b < 5; b++) {
        kd__vgg_block *blk = &v->block[b];
        blk->n = kd__vgg_cfgs[row].convs[b];
        for (int i = 0; i < blk->n; i++) {
            char pc[32], pb[32];
            snprintf(pc, sizeof pc, "block%d.%d", b, 3 * i);
            snprintf(pb, sizeof pb, "block%d.%d", b, 3 * i + 1);
            KD_TRY(kd_conv2d_layer_init(&blk->conv[i], pl, pc, in, kd__vgg_width[b], 3, 1, 1, 1, 1));
            KD_TRY(kd_bn_layer_init(&blk->bn[i], pl, pb, kd__vgg_width[b]));
            in = kd__vgg_width[b];
        }
    }
    KD_TRY(kd_linear_layer_init(&v->classifier, pl, "classifier", in, m->cfg.num_classes, 1));
    m->feat_dim = in;
    /* RepDistiller init: conv N(0, sqrt(2 / (k*k*out))) with zero bias; BN
     * 1/0; Linear N(0, 0.01) with zero bias. Biases start at zero already. */
    for (int i = 0; i < pl->n; i++)
        if (pl->items[i].t->ndim == 4) kd_init_kaiming_normal_fan_out(pl->items[i].t, rng);
    kd_init_normal(v->classifier.weight, 0.01f, rng);
    return KD_OK;
}
