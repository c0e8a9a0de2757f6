/*
 * efficientnet.c: torchvision's EfficientNet-B0 (torchvision/models/
 * efficientnet.py, width and depth multipliers 1.0).
 *
 * features.0: 3x3 stride-2 conv + BN + SiLU (32 channels); features.1..7:
 * stages of MBConv blocks (expand ratio, kernel, stride, out, layers) =
 * (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3)
 * (6,5,2,192,4) (6,3,1,320,1), block "features.s.b": optional 1x1 expansion,
 * depthwise conv, SE (squeeze = max(1, block input / 4), SiLU, sigmoid), 1x1
 * projection, residual with stochastic depth ("row", p = 0.2 * block / 16,
 * identity in eval); features.8: 1x1 conv to 1280 + BN + SiLU; global average
 * pooling; classifier Dropout(0.2), Linear ("classifier.1"). Batch norm is
 * PyTorch's default for B0 (eps 1e-5, momentum 0.1; torchvision uses
 * eps 1e-3 / momentum 0.01 only for B5-B7 and V2). Init as torchvision: conv
 * kaiming_normal(fan_out), conv biases 0, BN 1 / 0, Linear
 * U(+-1/sqrt(out_features)) with bias 0.
 *
 * Features, by output stride: feat[0] the stem (stride 2, 32 channels),
 * feat[1..5] the outputs of features.1, 2, 3, 5, 7 (strides 2, 4, 8, 16, 32:
 * the last block before each stride-2 block and the last block), feat[6] the
 * final map (features.8, 1280 channels), feat[7] the pooled embedding
 * (N, 1280). preact[6] is features.8's BN output before the SiLU; elsewhere
 * preact = feat.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "models/zoo_blocks.h"

typedef struct {
    int ratio, kernel, stride, in, out, layers;
} kd__effnet_stage;

static const kd__effnet_stage kd__effnet_b0[] = {
    {1, 3, 1, 32, 16, 1},  {6, 3, 2, 16, 24, 2},  {6, 5, 2, 24, 40, 2},   {6, 3, 2, 40, 80, 3},
    {6, 5, 1, 80, 112, 3}, {6, 5, 2, 112, 192, 4}, {6, 3, 1, 192, 320, 1},
};
#define KD__EFF_NSTAGE ((int)(sizeof kd__effnet_b0 / sizeof kd__effnet_b0[0]))

typedef struct {
    kd__cna stem, last;
    int nblocks;
    kd__mbconv *blocks;
    kd_linear_layer fc; /* classifier.1 */
    float dropout;
} kd__effnet;

static void kd__effnet_free(void *p) {
    kd__effnet *r = p;
    if (!r) return;
    free(r->blocks);
    free(r);
}

static kd_status kd__effnet_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags,
                                    kd_model_out *out) {
    kd__effnet *r = m->impl;
    int tr = m->training;
    kd_tensor *emb = kd__mbnet_trunk(g, &r->stem, r->blocks, r->nblocks, &r->last, x, tr, flags, out);
    out->logits = kd__classify(m, g, &r->fc, kd_dropout(g, emb, r->dropout, tr));
    return kd_graph_status(g);
}

static const kd__model_vt kd__effnet_vt = {kd__effnet_forward, kd__effnet_free};

kd_status kd__efficientnet_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    static const kd__bn_cfg bn = {1e-5f, 0.1f};
    (void)arg;
    kd__effnet *r = calloc(1, sizeof *r);
    if (!r) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = r;
    m->vt = &kd__effnet_vt;
    r->dropout = 0.2f;
    kd_param_list *pl = &m->params;
    const kd__effnet_stage *st = kd__effnet_b0;
    KD_TRY(kd__cna_init(&r->stem, pl, "features.0.0", "features.0.1", m->cfg.in_channels,
                        kd__make_divisible(st[0].in, 8), 3, 2, 1, KD__ACT_SILU, bn));
    int total = 0;
    for (int s = 0; s < KD__EFF_NSTAGE; s++) total += st[s].layers;
    r->blocks = calloc((size_t)total, sizeof *r->blocks);
    if (!r->blocks) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    int id = 0;
    int64_t cout = 0;
    for (int s = 0; s < KD__EFF_NSTAGE; s++) {
        for (int b = 0; b < st[s].layers; b++, id++) {
            int64_t cin = kd__make_divisible(b ? st[s].out : st[s].in, 8);
            cout = kd__make_divisible(st[s].out, 8);
            kd__mbconv_cfg c = {cin, kd__make_divisible((double)cin * st[s].ratio, 8), cout,
                                st[s].kernel, b ? 1 : st[s].stride, cin / 4 > 1 ? cin / 4 : 1,
                                KD__ACT_SILU, KD__ACT_SILU, KD__ACT_SIGMOID,
                                (float)(0.2 * (double)id / (double)total)};
            char prefix[48];
            snprintf(prefix, sizeof prefix, "features.%d.%d", s + 1, b);
            KD_TRY(kd__mbconv_init(&r->blocks[id], pl, prefix, &c, bn));
        }
    }
    r->nblocks = total;
    int64_t lout = 4 * cout;
    char cp[48], bp[48];
    snprintf(cp, sizeof cp, "features.%d.0", KD__EFF_NSTAGE + 1);
    snprintf(bp, sizeof bp, "features.%d.1", KD__EFF_NSTAGE + 1);
    KD_TRY(kd__cna_init(&r->last, pl, cp, bp, cout, lout, 1, 1, 1, KD__ACT_SILU, bn));
    KD_TRY(kd_linear_layer_init(&r->fc, pl, "classifier.1", lout, m->cfg.num_classes, 1));
    m->feat_dim = lout;
    kd__init_convs_fan_out(pl, rng);
    kd_init_uniform(r->fc.weight, 1.0f / sqrtf((float)m->cfg.num_classes), rng);
    return KD_OK;
}
