/*
 * mobilenetv3.c: torchvision's MobileNetV3 (torchvision/models/mobilenetv3.py),
 * mobilenet_v3_large and mobilenet_v3_small, width 1.0, no dilation.
 *
 * features.0 is the stem (3x3 stride-2 conv + BN + Hardswish), features.1..n
 * the inverted residual blocks of the paper's tables (optional 1x1 expansion,
 * depthwise conv, optional SE with ReLU and Hardsigmoid, 1x1 projection;
 * ReLU or Hardswish), features.n+1 a 1x1 conv to 6x the last width with
 * Hardswish; then global average pooling and the classifier Linear (960 or
 * 576 -> 1280 or 1024), Hardswish, Dropout(0.2), Linear (-> num_classes),
 * named "classifier.0" and "classifier.3". Every batch norm has eps 1e-3 and
 * momentum 0.01. Init as torchvision: conv kaiming_normal(fan_out), conv
 * biases 0, BN 1 / 0, Linear N(0, 0.01) with bias 0.
 *
 * Features, by output stride: feat[0] the stem (stride 2); then one entry per
 * resolution, the output of the last block before the next stride-2 block or
 * of the last block (large: strides 2, 4, 8, 16, 32 -> feat[1..5]; small:
 * strides 4, 8, 16, 32 -> feat[1..4]); then the final map (features.n+1,
 * 960 or 576 channels) and the pooled embedding (N, 960 or 576): n_feat 8
 * (large) or 7 (small). preact of the final map is its BN output before the
 * Hardswish; elsewhere preact = feat (the blocks end without activation).
 */
#include <stdio.h>
#include <stdlib.h>

#include "models/zoo_blocks.h"

typedef struct {
    int in, kernel, exp, out, se, hs, stride;
} kd__mnv3_row;

static const kd__mnv3_row kd__mnv3_large[] = {
    {16, 3, 16, 16, 0, 0, 1},     {16, 3, 64, 24, 0, 0, 2},    {24, 3, 72, 24, 0, 0, 1},
    {24, 5, 72, 40, 1, 0, 2},     {40, 5, 120, 40, 1, 0, 1},   {40, 5, 120, 40, 1, 0, 1},
    {40, 3, 240, 80, 0, 1, 2},    {80, 3, 200, 80, 0, 1, 1},   {80, 3, 184, 80, 0, 1, 1},
    {80, 3, 184, 80, 0, 1, 1},    {80, 3, 480, 112, 1, 1, 1},  {112, 3, 672, 112, 1, 1, 1},
    {112, 5, 672, 160, 1, 1, 2},  {160, 5, 960, 160, 1, 1, 1}, {160, 5, 960, 160, 1, 1, 1},
};

static const kd__mnv3_row kd__mnv3_small[] = {
    {16, 3, 16, 16, 1, 0, 2},    {16, 3, 72, 24, 0, 0, 2},    {24, 3, 88, 24, 0, 0, 1},
    {24, 5, 96, 40, 1, 1, 2},    {40, 5, 240, 40, 1, 1, 1},   {40, 5, 240, 40, 1, 1, 1},
    {40, 5, 120, 48, 1, 1, 1},   {48, 5, 144, 48, 1, 1, 1},   {48, 5, 288, 96, 1, 1, 2},
    {96, 5, 576, 96, 1, 1, 1},   {96, 5, 576, 96, 1, 1, 1},
};

typedef struct {
    kd__cna stem, last;
    int nblocks;
    kd__mbconv *blocks;
    kd_linear_layer fc1, fc2; /* classifier.0, classifier.3 */
    float dropout;
} kd__mnv3;

static void kd__mnv3_free(void *p) {
    kd__mnv3 *r = p;
    if (!r) return;
    free(r->blocks);
    free(r);
}

static kd_status kd__mnv3_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags,
                                  kd_model_out *out) {
    kd__mnv3 *r = m->impl;
    int tr = m->training;
    kd_tensor *emb = kd__mbnet_trunk(g, &r->stem, r->blocks, r->nblocks, &r->last, x, tr, flags, out);
    kd_tensor *z = kd_hardswish(g, kd__classify(m, g, &r->fc1, emb));
    z = kd_dropout(g, z, r->dropout, tr);
    out->logits = kd_linear_layer_forward(g, &r->fc2, z);
    return kd_graph_status(g);
}

static const kd__model_vt kd__mnv3_vt = {kd__mnv3_forward, kd__mnv3_free};

/* arg->depth: 0 large, 1 small. */
kd_status kd__mobilenetv3_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    static const kd__bn_cfg bn = {1e-3f, 0.01f};
    const kd__mnv3_row *rows = arg->depth ? kd__mnv3_small : kd__mnv3_large;
    int nrows = arg->depth ? (int)(sizeof kd__mnv3_small / sizeof *rows)
                           : (int)(sizeof kd__mnv3_large / sizeof *rows);
    int64_t last_channel = arg->depth ? 1024 : 1280;
    kd__mnv3 *r = calloc(1, sizeof *r);
    if (!r) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = r;
    m->vt = &kd__mnv3_vt;
    r->dropout = 0.2f;
    kd_param_list *pl = &m->params;
    KD_TRY(kd__cna_init(&r->stem, pl, "features.0.0", "features.0.1", m->cfg.in_channels,
                        rows[0].in, 3, 2, 1, KD__ACT_HARDSWISH, bn));
    r->blocks = calloc((size_t)nrows, sizeof *r->blocks);
    if (!r->blocks) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    r->nblocks = nrows;
    for (int i = 0; i < nrows; i++) {
        const kd__mnv3_row *w = &rows[i];
        kd__act act = w->hs ? KD__ACT_HARDSWISH : KD__ACT_RELU;
        kd__mbconv_cfg c = {w->in, w->exp, w->out, w->kernel, w->stride,
                            w->se ? kd__make_divisible(w->exp / 4, 8) : 0,
                            act, KD__ACT_RELU, KD__ACT_HARDSIGMOID, 0.0f};
        char prefix[48];
        snprintf(prefix, sizeof prefix, "features.%d", i + 1);
        KD_TRY(kd__mbconv_init(&r->blocks[i], pl, prefix, &c, bn));
    }
    int64_t lin = rows[nrows - 1].out, lout = 6 * lin;
    char cp[48], bp[48];
    snprintf(cp, sizeof cp, "features.%d.0", nrows + 1);
    snprintf(bp, sizeof bp, "features.%d.1", nrows + 1);
    KD_TRY(kd__cna_init(&r->last, pl, cp, bp, lin, lout, 1, 1, 1, KD__ACT_HARDSWISH, bn));
    KD_TRY(kd_linear_layer_init(&r->fc1, pl, "classifier.0", lout, last_channel, 1));
    KD_TRY(kd_linear_layer_init(&r->fc2, pl, "classifier.3", last_channel, m->cfg.num_classes, 1));
    m->feat_dim = lout;
    kd__init_convs_fan_out(pl, rng);
    kd_init_normal(r->fc1.weight, 0.01f, rng);
    kd_init_normal(r->fc2.weight, 0.01f, rng);
    return KD_OK;
}
