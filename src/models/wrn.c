/* Wide ResNets as defined by RepDistiller (models/wrn.py): pre-activation
 * blocks, widths 16, 16k, 32k, 64k, depth = 6n + 4. Names follow the PyTorch
 * state_dict ("block1.layer.0.bn1.weight", "convShortcut.weight"). The final
 * avg_pool2d(8) is a global average pool (the same on 32x32 inputs). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

typedef struct {
    kd_bn_layer bn1, bn2;
    kd_conv2d_layer conv1, conv2;
    int equal_in_out;
    kd_conv2d_layer shortcut; /* convShortcut when !equal_in_out */
} kd__wrn_block;

typedef struct {
    kd_conv2d_layer conv1;
    int n;
    kd__wrn_block *stage[3];
    kd_bn_layer bn1;
    kd_linear_layer fc;
} kd__wrn;

static void kd__wrn_free(void *p) {
    kd__wrn *w = p;
    if (!w) return;
    for (int i = 0; i < 3; i++) free(w->stage[i]);
    free(w);
}

/* Pre-activation block: act = relu(bn1(x)); out = conv2(relu(bn2(conv1(act))))
 * + (x or shortcut(act)). Scopes: bn-relu, the residual branch (one
 * conv-bn-relu unit inside), and the block, which keeps only its output. */
static kd_tensor *kd__wrn_block_forward(kd_graph *g, kd__wrn_block *b, kd_tensor *x, int tr) {
    size_t sc = kd_graph_scope_begin(g);
    size_t su = kd_graph_scope_begin(g);
    kd_tensor *act = kd_graph_scope_return(g, su, kd_relu(g, kd_bn_layer_forward(g, &b->bn1, x, tr)));
    size_t sb = kd_graph_scope_begin(g);
    size_t sr = kd_graph_scope_begin(g);
    kd_tensor *o = kd_bn_layer_forward(g, &b->bn2, kd_conv2d_layer_forward(g, &b->conv1, act), tr);
    o = kd_graph_scope_return(g, sr, kd_relu(g, o));
    o = kd_graph_scope_return(g, sb, kd_conv2d_layer_forward(g, &b->conv2, o));
    kd_tensor *res = b->equal_in_out ? x : kd_conv2d_layer_forward(g, &b->shortcut, act);
    return kd_graph_scope_return(g, sc, kd_add(g, res, o));
}

static kd_status kd__wrn_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    kd__wrn *w = m->impl;
    int tr = m->training;
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd_conv2d_layer_forward(g, &w->conv1, x);
    out->feat[0] = h;
    for (int s = 0; s < 3; s++) {
        for (int i = 0; i < w->n; i++) {
            h = kd__wrn_block_forward(g, &w->stage[s][i], h, tr);
            if (i == w->n - 1) out->feat[1 + s] = h;
            kd__trunk_keep(g, sc, h, out);
        }
    }
    size_t su = kd_graph_scope_begin(g);
    kd_tensor *act = kd_graph_scope_return(g, su, kd_relu(g, kd_bn_layer_forward(g, &w->bn1, h, tr)));
    kd_tensor *emb = kd_global_avgpool(g, act);
    out->feat[4] = emb;
    out->n_feat = 5;
    out->logits = kd__classify(m, g, &w->fc, emb);
    if (flags & KD_FWD_PREACT) {
        /* As RepDistiller: the next BN applied to each stage output (this
         * runs those BNs again, updating running statistics in training mode,
         * exactly as the reference does). */
        out->preact[0] = out->feat[0];
        out->preact[1] = kd_bn_layer_forward(g, &w->stage[1][0].bn1, out->feat[1], tr);
        out->preact[2] = kd_bn_layer_forward(g, &w->stage[2][0].bn1, out->feat[2], tr);
        out->preact[3] = kd_bn_layer_forward(g, &w->bn1, out->feat[3], tr);
        out->preact[4] = emb;
    }
    return kd_graph_status(g);
}

static const kd__model_vt kd__wrn_vt = {kd__wrn_forward, kd__wrn_free};

kd_status kd__wrn_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    if ((arg->depth - 4) % 6 != 0)
        return kd_error(KD_ERR_INVALID, "wrn depth %d is not 6n+4", arg->depth);
    kd__wrn *w = calloc(1, sizeof *w);
    if (!w) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = w;
    m->vt = &kd__wrn_vt;
    w->n = (arg->depth - 4) / 6;
    int k = arg->widths[0];
    int64_t ch[4] = {16, 16 * k, 32 * k, 64 * k};
    kd_param_list *pl = &m->params;
    KD_TRY(kd_conv2d_layer_init(&w->conv1, pl, "conv1", m->cfg.in_channels, ch[0], 3, 1, 1, 1, 0));
    for (int s = 0; s < 3; s++) {
        w->stage[s] = calloc((size_t)w->n, sizeof(kd__wrn_block));
        if (!w->stage[s]) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
        for (int i = 0; i < w->n; i++) {
            kd__wrn_block *b = &w->stage[s][i];
            int64_t in = i == 0 ? ch[s] : ch[s + 1], out = ch[s + 1];
            int64_t stride = (i == 0 && s > 0) ? 2 : 1;
            char p[96];
            snprintf(p, sizeof p, "block%d.layer.%d.bn1", s + 1, i);
            KD_TRY(kd_bn_layer_init(&b->bn1, pl, p, in));
            snprintf(p, sizeof p, "block%d.layer.%d.conv1", s + 1, i);
            KD_TRY(kd_conv2d_layer_init(&b->conv1, pl, p, in, out, 3, stride, 1, 1, 0));
            snprintf(p, sizeof p, "block%d.layer.%d.bn2", s + 1, i);
            KD_TRY(kd_bn_layer_init(&b->bn2, pl, p, out));
            snprintf(p, sizeof p, "block%d.layer.%d.conv2", s + 1, i);
            KD_TRY(kd_conv2d_layer_init(&b->conv2, pl, p, out, out, 3, 1, 1, 1, 0));
            b->equal_in_out = in == out;
            if (!b->equal_in_out) {
                snprintf(p, sizeof p, "block%d.layer.%d.convShortcut", s + 1, i);
                KD_TRY(kd_conv2d_layer_init(&b->shortcut, pl, p, in, out, 1, stride, 0, 1, 0));
            }
        }
    }
    KD_TRY(kd_bn_layer_init(&w->bn1, pl, "bn1", ch[3]));
    KD_TRY(kd_linear_layer_init(&w->fc, pl, "fc", ch[3], m->cfg.num_classes, 1));
    m->feat_dim = ch[3];
    /* RepDistiller init: conv N(0, sqrt(2 / (k*k*out))); BN 1/0; fc bias 0. */
    for (int i = 0; i < pl->n; i++) {
        kd_param *p = &pl->items[i];
        if (p->t->ndim == 4) kd_init_kaiming_normal_fan_out(p->t, rng);
    }
    kd_linear_layer_default_init(&w->fc, rng);
    kd_init_constant(w->fc.bias, 0.0f);
    return KD_OK;
}
