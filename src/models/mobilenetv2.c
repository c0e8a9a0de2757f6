/* MobileNetV2 as defined by RepDistiller (models/mobilenetv2.py, from "Knowledge
 * Distillation via Route Constrained Optimization"); its model_dict names the
 * width-0.5 network "MobileNetV2" (mobile_half). Stem conv 3x3 stride 2 + BN +
 * ReLU to int(32w) channels; seven stages of inverted residual blocks (t, c,
 * n, s) = (1,16,1,1) (T,24,2,1) (T,32,3,2) (T,64,4,2) (T,96,3,1) (T,160,3,2)
 * (T,320,1,1) with c scaled by w; 1x1 conv + BN + ReLU to 1280 channels;
 * average pool; Linear. Every block has the expansion conv, even for t = 1,
 * and the activations are plain ReLU (not ReLU6), as in the reference.
 * Names: "conv1.0.weight", "blocks.2.1.conv.3.weight" (Sequential indices 0/1
 * expand conv/BN, 3/4 depthwise conv/BN, 6/7 project conv/BN),
 * "conv2.1.running_var", "classifier.0.weight". The final AvgPool2d(2,
 * ceil_mode) of a 2x2 map is a global average pool here (also valid on 28x28). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

typedef struct {
    int use_res; /* stride 1 and in == out */
    kd_conv2d_layer expand, dw, project;
    kd_bn_layer bn_expand, bn_dw, bn_project;
} kd__ir_block;

typedef struct {
    kd_conv2d_layer conv1;
    kd_bn_layer bn1;
    int n[7];
    kd__ir_block *stage[7];
    kd_conv2d_layer conv2;
    kd_bn_layer bn2;
    kd_linear_layer classifier;
} kd__mbv2;

static const int kd__mbv2_setting[7][4] = {/* t (0 = T), c, n, s */
                                           {1, 16, 1, 1}, {0, 24, 2, 1},  {0, 32, 3, 2}, {0, 64, 4, 2},
                                           {0, 96, 3, 1}, {0, 160, 3, 2}, {0, 320, 1, 1}};

static void kd__mbv2_free(void *p) {
    kd__mbv2 *v = p;
    if (!v) return;
    for (int i = 0; i < 7; i++) free(v->stage[i]);
    free(v);
}

/* Inverted residual: expand, depthwise, project (each a scoped conv-BN
 * unit), plus x when use_res; the block's scope keeps only its output. */
static kd_tensor *kd__ir_forward(kd_graph *g, kd__ir_block *b, kd_tensor *x, int tr) {
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *o = kd__conv_bn(g, &b->expand, &b->bn_expand, x, tr, 1);
    o = kd_graph_scope_return(g, sc, kd__conv_bn(g, &b->dw, &b->bn_dw, o, tr, 1));
    o = kd_graph_scope_return(g, sc, kd__conv_bn(g, &b->project, &b->bn_project, o, tr, 0));
    return b->use_res ? kd_graph_scope_return(g, sc, kd_add(g, x, o)) : o;
}

static kd_status kd__mbv2_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    kd__mbv2 *v = m->impl;
    int tr = m->training;
    /* Stages after which RepDistiller takes f1..f4. */
    static const int feat_after[7] = {0, 1, 2, 0, 3, 0, 4};
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd__conv_bn(g, &v->conv1, &v->bn1, x, tr, 1);
    out->feat[0] = h;
    for (int s = 0; s < 7; s++) {
        for (int i = 0; i < v->n[s]; i++) {
            h = kd__ir_forward(g, &v->stage[s][i], h, tr);
            if (feat_after[s] && i == v->n[s] - 1) out->feat[feat_after[s]] = h;
            kd__trunk_keep(g, sc, h, out);
        }
    }
    h = kd__conv_bn(g, &v->conv2, &v->bn2, h, tr, 1);
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[5] = emb;
    out->n_feat = 6;
    out->logits = kd__classify(m, g, &v->classifier, emb);
    /* RepDistiller defines no pre-activation features for this network. */
    if (flags & KD_FWD_PREACT)
        for (int k = 0; k < out->n_feat; k++) out->preact[k] = out->feat[k];
    return kd_graph_status(g);
}

static const kd__model_vt kd__mbv2_vt = {kd__mbv2_forward, kd__mbv2_free};

kd_status kd__mobilenetv2_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    int T = arg->widths[0], pct = arg->widths[1];
    if (T < 1 || pct < 1) return kd_error(KD_ERR_INVALID, "mobilenetv2: bad expansion %d or width %d%%", T, pct);
    kd__mbv2 *v = calloc(1, sizeof *v);
    if (!v) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = v;
    m->vt = &kd__mbv2_vt;
    kd_param_list *pl = &m->params;
    /* int(c * width_mult) for the reference's width multipliers. */
    int64_t in = 32 * pct / 100;
    KD_TRY(kd__conv_bn_init(&v->conv1, &v->bn1, pl, "conv1.0", "conv1.1", m->cfg.in_channels, in, 3, 2, 1, 1));
    for (int s = 0; s < 7; s++) {
        int t = kd__mbv2_setting[s][0] ? kd__mbv2_setting[s][0] : T;
        int64_t outc = (int64_t)kd__mbv2_setting[s][1] * pct / 100;
        v->n[s] = kd__mbv2_setting[s][2];
        v->stage[s] = calloc((size_t)v->n[s], sizeof(kd__ir_block));
        if (!v->stage[s]) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
        for (int i = 0; i < v->n[s]; i++) {
            kd__ir_block *b = &v->stage[s][i];
            int64_t stride = i == 0 ? kd__mbv2_setting[s][3] : 1, hid = in * t;
            char pc[48], pb[48];
            b->use_res = stride == 1 && in == outc;
#define KD__IR_NAMES(ci, bi)                                    \
    snprintf(pc, sizeof pc, "blocks.%d.%d.conv.%d", s, i, ci); \
    snprintf(pb, sizeof pb, "blocks.%d.%d.conv.%d", s, i, bi)
            KD__IR_NAMES(0, 1);
            KD_TRY(kd__conv_bn_init(&b->expand, &b->bn_expand, pl, pc, pb, in, hid, 1, 1, 0, 1));
            KD__IR_NAMES(3, 4);
            KD_TRY(kd__conv_bn_init(&b->dw, &b->bn_dw, pl, pc, pb, hid, hid, 3, stride, 1, hid));
            KD__IR_NAMES(6, 7);
            KD_TRY(kd__conv_bn_init(&b->project, &b->bn_project, pl, pc, pb, hid, outc, 1, 1, 0, 1));
#undef KD__IR_NAMES
            in = outc;
        }
    }
    int64_t last = pct > 100 ? 1280 * pct / 100 : 1280;
    KD_TRY(kd__conv_bn_init(&v->conv2, &v->bn2, pl, "conv2.0", "conv2.1", in, last, 1, 1, 0, 1));
    KD_TRY(kd_linear_layer_init(&v->classifier, pl, "classifier.0", last, m->cfg.num_classes, 1));
    m->feat_dim = last;
    /* RepDistiller init: conv N(0, sqrt(2 / (k*k*out))); BN 1/0; Linear
     * N(0, 0.01) with zero bias. */
    for (int i = 0; i < pl->n; i++)
        if (pl->items[i].t->ndim == 4) kd_init_kaiming_normal_fan_out(pl->items[i].t, rng);
    kd_init_normal(v->classifier.weight, 0.01f, rng);
    return KD_OK;
}
