/* ShuffleNetV2 (net size 1) as defined by RepDistiller (models/ShuffleNetv2.py,
 * "ShuffleV2"): 1x1 stem conv to 24 channels + BN + ReLU; three stages with
 * 116, 232, 464 channels, each a stride-2 DownBlock followed by 3, 7, 3
 * BasicBlocks; 1x1 conv to 1024 + BN + ReLU; average pool; Linear.
 * BasicBlock: split the channels in halves (x1, x2); x2 -> 1x1 + BN + ReLU ->
 * depthwise 3x3 + BN -> 1x1 + BN (the pre-activation) -> ReLU; concatenate
 * [x1, branch] and shuffle with 2 groups. The pre-activation feature is
 * [x1, branch before ReLU], unshuffled, as the reference returns it.
 * DownBlock: left = depthwise 3x3/2 + BN -> 1x1 + BN + ReLU; right = 1x1 +
 * BN + ReLU -> depthwise 3x3/2 + BN -> 1x1 + BN + ReLU; concatenate, shuffle.
 * Names: "layer1.0.conv4.weight" (DownBlock), "layer1.1.bn3.bias",
 * "conv2.weight", "bn2.running_mean", "linear.weight". Initialisation is
 * PyTorch's default. The final avg_pool2d(4) is a global average pool here. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

typedef struct {
    int down; /* 1: DownBlock (5 convs), 0: BasicBlock (3 convs) */
    kd_conv2d_layer conv[5];
    kd_bn_layer bn[5];
} kd__sv2_block;

typedef struct {
    kd_conv2d_layer conv1, conv2;
    kd_bn_layer bn1, bn2;
    int n[3]; /* blocks per stage, DownBlock included */
    kd__sv2_block *stage[3];
    kd_linear_layer linear;
} kd__sv2;

static void kd__sv2_free(void *p) {
    kd__sv2 *v = p;
    if (!v) return;
    for (int i = 0; i < 3; i++) free(v->stage[i]);
    free(v);
}

/* A ShuffleNetV2 unit: downsampling (two branches over x) or basic (x split
 * in halves, the second through conv-BN units), concatenated and shuffled.
 * *preact (when preact is not NULL) gets the concatenation before the last
 * ReLU (basic units only). One scope per conv-BN unit; the block's scope
 * keeps its output (and the preact). */
static kd_tensor *kd__sv2_block_forward(kd_graph *g, kd__sv2_block *b, kd_tensor *x, int tr, kd_tensor **preact) {
    kd_tensor *parts[2];
    size_t sc = kd_graph_scope_begin(g);
    if (b->down) {
        kd_tensor *l = kd__conv_bn(g, &b->conv[0], &b->bn[0], x, tr, 0);
        parts[0] = kd__conv_bn(g, &b->conv[1], &b->bn[1], l, tr, 1);
        kd_tensor *r = kd__conv_bn(g, &b->conv[2], &b->bn[2], x, tr, 1);
        r = kd__conv_bn(g, &b->conv[3], &b->bn[3], r, tr, 0);
        parts[1] = kd__conv_bn(g, &b->conv[4], &b->bn[4], r, tr, 1);
        if (preact) *preact = NULL;
        kd_tensor *y = kd_graph_scope_return(g, sc, kd_concat(g, parts, 2, 1));
        return kd_graph_scope_return(g, sc, kd__channel_shuffle(g, y, 2));
    }
    if (!x) return NULL;
    int64_t c = x->shape[1] / 2;
    kd_tensor *x1 = kd_slice(g, x, 1, 0, c), *x2 = kd_slice(g, x, 1, c, x->shape[1]);
    kd_tensor *o = kd__conv_bn(g, &b->conv[0], &b->bn[0], x2, tr, 1);
    o = kd__conv_bn(g, &b->conv[1], &b->bn[1], o, tr, 0);
    kd_tensor *pre = kd__conv_bn(g, &b->conv[2], &b->bn[2], o, tr, 0);
    parts[0] = x1;
    kd_tensor *p = NULL;
    if (preact) {
        parts[1] = pre;
        p = *preact = kd_concat(g, parts, 2, 1);
    }
    parts[1] = kd_relu(g, pre);
    kd_tensor *keep[2] = {kd_concat(g, parts, 2, 1), p};
    kd_graph_scope_end(g, sc, 2, keep);
    keep[0] = kd__channel_shuffle(g, keep[0], 2);
    kd_graph_scope_end(g, sc, 2, keep);
    return keep[0];
}

static kd_status kd__sv2_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    kd__sv2 *v = m->impl;
    int tr = m->training, pa = flags & KD_FWD_PREACT;
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd__conv_bn(g, &v->conv1, &v->bn1, x, tr, 1);
    out->feat[0] = h;
    if (pa) out->preact[0] = h;
    for (int s = 0; s < 3; s++) {
        for (int i = 0; i < v->n[s]; i++) {
            /* Only the last block's pre-activation is a feature. */
            int last = i == v->n[s] - 1;
            h = kd__sv2_block_forward(g, &v->stage[s][i], h, tr, pa && last ? &out->preact[1 + s] : NULL);
            if (last) out->feat[1 + s] = h;
            kd__trunk_keep(g, sc, h, out);
        }
    }
    h = kd__conv_bn(g, &v->conv2, &v->bn2, h, tr, 1);
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[4] = emb;
    if (pa) out->preact[4] = emb;
    out->n_feat = 5;
    out->logits = kd__classify(m, g, &v->linear, emb);
    return kd_graph_status(g);
}
static const kd__model_vt kd__sv2_vt = {kd__sv2_forward, kd__sv2_free};

kd_status kd__shufflev2_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    (void)arg;
    static const int64_t out_ch[4] = {116, 232, 464, 1024};
    static const int blocks[3] = {3, 7, 3};
    kd__sv2 *v = calloc(1, sizeof *v);
    if (!v) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = v;
    m->vt = &kd__sv2_vt;
    kd_param_list *pl = &m->params;
    KD_TRY(kd__conv_bn_init(&v->conv1, &v->bn1, pl, "conv1", "bn1", m->cfg.in_channels, 24, 1, 1, 0, 1));
    int64_t in = 24;
    for (int s = 0; s < 3; s++) {
        v->n[s] = blocks[s] + 1;
        v->stage[s] = calloc((size_t)v->n[s], sizeof(kd__sv2_block));
        if (!v->stage[s]) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
        for (int i = 0; i < v->n[s]; i++) {
            kd__sv2_block *b = &v->stage[s][i];
            /* (in, out, kernel, stride, groups) of each conv. */
            int64_t spec[5][5];
            int nconv;
            if (i == 0) {
                int64_t mid = out_ch[s] / 2;
                int64_t d[5][5] = {{in, in, 3, 2, in},
                                   {in, mid, 1, 1, 1},
                                   {in, mid, 1, 1, 1},
                                   {mid, mid, 3, 2, mid},
                                   {mid, mid, 1, 1, 1}};
                memcpy(spec, d, sizeof d);
                nconv = 5;
                b->down = 1;
            } else {
                int64_t c = out_ch[s] / 2;
                int64_t d[3][5] = {{c, c, 1, 1, 1}, {c, c, 3, 1, c}, {c, c, 1, 1, 1}};
                memcpy(spec, d, sizeof d);
                nconv = 3;
            }
            for (int k = 0; k < nconv; k++) {
                char pc[48], pb[48];
                snprintf(pc, sizeof pc, "layer%d.%d.conv%d", s + 1, i, k + 1);
                snprintf(pb, sizeof pb, "layer%d.%d.bn%d", s + 1, i, k + 1);
                int64_t *q = spec[k];
                KD_TRY(kd__conv_bn_init(&b->conv[k], &b->bn[k], pl, pc, pb, q[0], q[1], q[2], q[3], q[2] / 2, q[4]));
            }
            in = out_ch[s];
        }
    }
    KD_TRY(kd__conv_bn_init(&v->conv2, &v->bn2, pl, "conv2", "bn2", in, out_ch[3], 1, 1, 0, 1));
    KD_TRY(kd_linear_layer_init(&v->linear, pl, "linear", out_ch[3], m->cfg.num_classes, 1));
    m->feat_dim = out_ch[3];
    /* PyTorch's default Conv2d init: U(+-1/sqrt(fan_in)), fan_in = in/groups * k * k. */
    for (int i = 0; i < pl->n; i++) {
        kd_tensor *t = pl->items[i].t;
        if (t->ndim == 4) kd_init_uniform(t, 1.0f / sqrtf((float)kd_fan_in(t)), rng);
    }
    kd_linear_layer_default_init(&v->linear, rng);
    return KD_OK;
}
