/*
 * resnet_imagenet.c: torchvision's ImageNet ResNets (torchvision/models/
 * resnet.py): resnet18 and resnet34 with BasicBlocks, resnet50 with
 * Bottlenecks (expansion 4, stride on the 3x3 conv: "ResNet v1.5").
 *
 * Stem: 7x7 stride-2 conv (no bias) + BN + ReLU + 3x3 stride-2 max pool;
 * four stages of widths 64, 128, 256, 512 (stages 2-4 start with stride 2
 * and a 1x1 conv + BN downsample, as does stage 1 of resnet50 for the
 * channel change); global average pool; fc. Names match the state_dict
 * ("layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias").
 * Init as torchvision: conv kaiming_normal(fan_out, relu), BN 1 / 0, fc
 * PyTorch's default Linear init, zero_init_residual off.
 *
 * Features: feat[0] stem output after the max pool (stride 4), feat[1..4]
 * layer1..layer4 outputs (feat[4] is also the final map), feat[5] pooled
 * embedding (512 or 2048). preact[1..4] are the last block's sums before
 * the ReLU.
 */
#include <stdio.h>
#include <stdlib.h>

#include "models/zoo_blocks.h"

typedef struct {
    kd__cna c1, c2, c3; /* c3 only in a Bottleneck */
    int has_down;
    kd__cna down; /* downsample.0 / downsample.1 */
} kd__rblock;

typedef struct {
    kd__cna stem; /* conv1 / bn1 */
    int bottleneck;
    int n[4];
    kd__rblock *stage[4];
    kd_linear_layer fc;
} kd__resnet_in;

static void kd__resnet_in_free(void *p) {
    kd__resnet_in *r = p;
    if (!r) return;
    for (int i = 0; i < 4; i++) free(r->stage[i]);
    free(r);
}

/* torchvision's BasicBlock / Bottleneck: relu(units(x) + downsample(x));
 * *preact (when preact is not NULL) gets the sum before the ReLU. Each unit
 * is scoped (kd__cna_forward); the block's scope is ended after each unit
 * and after the sum, so only the newest intermediate survives. */
static kd_tensor *kd__rblock_forward(kd_graph *g, kd__rblock *b, int bottleneck, kd_tensor *x,
                                     int tr, kd_tensor **preact) {
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd__cna_forward(g, &b->c1, x, tr, NULL);
    h = kd_graph_scope_return(g, sc, kd__cna_forward(g, &b->c2, h, tr, NULL));
    if (bottleneck) h = kd_graph_scope_return(g, sc, kd__cna_forward(g, &b->c3, h, tr, NULL));
    kd_tensor *res = b->has_down ? kd__cna_forward(g, &b->down, x, tr, NULL) : x;
    kd_tensor *sum = kd_graph_scope_return(g, sc, kd_add(g, h, res));
    kd_tensor *keep[2] = {kd_relu(g, sum), preact ? sum : NULL};
    if (preact) *preact = sum;
    kd_graph_scope_end(g, sc, 2, keep);
    return keep[0];
}

static kd_status kd__resnet_in_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags,
                                       kd_model_out *out) {
    kd__resnet_in *r = m->impl;
    int tr = m->training, pa = flags & KD_FWD_PREACT;
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd_maxpool2d(g, kd__cna_forward(g, &r->stem, x, tr, NULL), 3, 2, 1);
    out->feat[0] = h;
    if (pa) out->preact[0] = h;
    kd__trunk_keep(g, sc, h, out);
    for (int s = 0; s < 4; s++) {
        for (int i = 0; i < r->n[s]; i++) {
            /* Only the last block's pre-activation is a feature. */
            int last = i == r->n[s] - 1;
            h = kd__rblock_forward(g, &r->stage[s][i], r->bottleneck, h, tr,
                                   pa && last ? &out->preact[1 + s] : NULL);
            if (last) out->feat[1 + s] = h;
            kd__trunk_keep(g, sc, h, out);
        }
    }
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[5] = emb;
    if (pa) out->preact[5] = emb;
    out->n_feat = 6;
    out->logits = kd__classify(m, g, &r->fc, emb);
    return kd_graph_status(g);
}
static const kd__model_vt kd__resnet_in_vt = {kd__resnet_in_forward, kd__resnet_in_free};

static kd_status kd__rblock_init(kd__rblock *b, kd_param_list *pl, const char *prefix,
                                 int bottleneck, int64_t in, int64_t planes, int64_t stride) {
    static const kd__bn_cfg bn = {1e-5f, 0.1f};
    char cp[96], bp[96];
    int64_t out = bottleneck ? planes * 4 : planes;
#define KD__NAMES(i)                                       \
    snprintf(cp, sizeof cp, "%s.conv%d", prefix, i);       \
    snprintf(bp, sizeof bp, "%s.bn%d", prefix, i)
    if (bottleneck) {
        KD__NAMES(1);
        KD_TRY(kd__cna_init(&b->c1, pl, cp, bp, in, planes, 1, 1, 1, KD__ACT_RELU, bn));
        KD__NAMES(2);
        KD_TRY(kd__cna_init(&b->c2, pl, cp, bp, planes, planes, 3, stride, 1, KD__ACT_RELU, bn));
        KD__NAMES(3);
        KD_TRY(kd__cna_init(&b->c3, pl, cp, bp, planes, out, 1, 1, 1, KD__ACT_NONE, bn));
    } else {
        KD__NAMES(1);
        KD_TRY(kd__cna_init(&b->c1, pl, cp, bp, in, planes, 3, stride, 1, KD__ACT_RELU, bn));
        KD__NAMES(2);
        KD_TRY(kd__cna_init(&b->c2, pl, cp, bp, planes, planes, 3, 1, 1, KD__ACT_NONE, bn));
    }
#undef KD__NAMES
    if (stride != 1 || in != out) {
        b->has_down = 1;
        snprintf(cp, sizeof cp, "%s.downsample.0", prefix);
        snprintf(bp, sizeof bp, "%s.downsample.1", prefix);
        KD_TRY(kd__cna_init(&b->down, pl, cp, bp, in, out, 1, stride, 1, KD__ACT_NONE, bn));
    }
    return KD_OK;
}

/* arg->depth: 18, 34 (BasicBlock) or 50 (Bottleneck); arg->widths: blocks per stage. */
kd_status kd__resnet_imagenet_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    static const kd__bn_cfg bn = {1e-5f, 0.1f};
    kd__resnet_in *r = calloc(1, sizeof *r);
    if (!r) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = r;
    m->vt = &kd__resnet_in_vt;
    r->bottleneck = arg->depth >= 50;
    kd_param_list *pl = &m->params;
    /* The 7x7 stem conv has padding 3 = (7 - 1) / 2, as kd__cna pads. */
    KD_TRY(kd__cna_init(&r->stem, pl, "conv1", "bn1", m->cfg.in_channels, 64, 7, 2, 1,
                        KD__ACT_RELU, bn));
    int64_t in = 64;
    for (int s = 0; s < 4; s++) {
        r->n[s] = arg->widths[s];
        r->stage[s] = calloc((size_t)r->n[s], sizeof(kd__rblock));
        if (!r->stage[s]) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
        int64_t planes = (int64_t)64 << s;
        for (int i = 0; i < r->n[s]; i++) {
            char prefix[64];
            snprintf(prefix, sizeof prefix, "layer%d.%d", s + 1, i);
            int64_t stride = (s > 0 && i == 0) ? 2 : 1;
            KD_TRY(kd__rblock_init(&r->stage[s][i], pl, prefix, r->bottleneck, in, planes,
                                   stride));
            in = r->bottleneck ? planes * 4 : planes;
        }
    }
    KD_TRY(kd_linear_layer_init(&r->fc, pl, "fc", in, m->cfg.num_classes, 1));
    m->feat_dim = in;
    kd__init_convs_fan_out(pl, rng);
    kd_linear_layer_default_init(&r->fc, rng);
    return KD_OK;
}
