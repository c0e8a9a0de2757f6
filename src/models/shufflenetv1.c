/* ShuffleNet (v1) as defined by RepDistiller (models/ShuffleNetv1.py,
 * "ShuffleV1"): 1x1 stem conv to 24 channels + BN + ReLU; three stages of
 * 4, 8, 4 bottlenecks with outputs 240, 480, 960 and 3 groups. A bottleneck:
 * grouped 1x1 conv to out/4 + BN + ReLU, channel shuffle, depthwise 3x3 +
 * BN + ReLU, grouped 1x1 conv + BN; the first block of every stage has
 * stride 2 and concatenates a 3x3/2 average pool of its input (so its conv
 * branch produces out - in channels), the others add the input; ReLU last.
 * The first bottleneck (24 input channels) uses one group for its first conv.
 * Names: "layer2.0.conv1.weight", "layer2.0.bn3.running_mean", "linear.weight".
 * Initialisation is PyTorch's default (the reference sets none). The final
 * avg_pool2d(4) of a 4x4 map is a global average pool here. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

typedef struct {
    int64_t stride, groups1; /* groups of conv1 and of the shuffle */
    kd_conv2d_layer conv1, conv2, conv3;
    kd_bn_layer bn1, bn2, bn3;
} kd__sv1_block;

typedef struct {
    kd_conv2d_layer conv1;
    kd_bn_layer bn1;
    int n[3];
    kd__sv1_block *stage[3];
    kd_linear_layer linear;
} kd__sv1;

static void kd__sv1_free(void *p) {
    kd__sv1 *v = p;
    if (!v) return;
    for (int i = 0; i < 3; i++) free(v->stage[i]);
    free(v);
}

/* Returns relu(preact); *preact gets the concatenation or sum before it. */
/* relu(bn3(gconv3(shuffle(relu(bn2(dwconv2(relu(bn1(gconv1(x))))))))) (+ x, or
 * concatenated with avgpool(x) when downsampling); *preact (when preact is
 * not NULL) gets the value before the final ReLU. One scope per conv-BN
 * unit; the block's scope keeps its output (and the preact). */
static kd_tensor *kd__sv1_block_forward(kd_graph *g, kd__sv1_block *b, kd_tensor *x, int tr, kd_tensor **preact) {
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *o = kd__conv_bn(g, &b->conv1, &b->bn1, x, tr, 1);
    o = kd_graph_scope_return(g, sc, kd__channel_shuffle(g, o, b->groups1));
    o = kd_graph_scope_return(g, sc, kd__conv_bn(g, &b->conv2, &b->bn2, o, tr, 1));
    o = kd_graph_scope_return(g, sc, kd__conv_bn(g, &b->conv3, &b->bn3, o, tr, 0));
    kd_tensor *pre;
    if (b->stride == 2) {
        kd_tensor *parts[2] = {o, kd_avgpool2d(g, x, 3, 2, 1)};
        pre = kd_concat(g, parts, 2, 1);
    } else {
        pre = kd_add(g, o, x);
    }
    pre = kd_graph_scope_return(g, sc, pre);
    kd_tensor *keep[2] = {kd_relu(g, pre), preact ? pre : NULL};
    if (preact) *preact = pre;
    kd_graph_scope_end(g, sc, 2, keep);
    return keep[0];
}

static kd_status kd__sv1_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    kd__sv1 *v = m->impl;
    int tr = m->training, pa = flags & KD_FWD_PREACT;
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd__conv_bn(g, &v->conv1, &v->bn1, x, tr, 1);
    out->feat[0] = h;
    if (pa) out->preact[0] = h;
    for (int s = 0; s < 3; s++) {
        for (int i = 0; i < v->n[s]; i++) {
            /* Only the last block's pre-activation is a feature. */
            int last = i == v->n[s] - 1;
            h = kd__sv1_block_forward(g, &v->stage[s][i], h, tr, pa && last ? &out->preact[1 + s] : NULL);
            if (last) out->feat[1 + s] = h;
            kd__trunk_keep(g, sc, h, out);
        }
    }
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[4] = emb;
    if (pa) out->preact[4] = emb;
    out->n_feat = 5;
    out->logits = kd__classify(m, g, &v->linear, emb);
    return kd_graph_status(g);
}
static const kd__model_vt kd__sv1_vt = {kd__sv1_forward, kd__sv1_free};

kd_status kd__shufflev1_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    (void)arg;
    static const int64_t out_planes[3] = {240, 480, 960};
    static const int blocks[3] = {4, 8, 4};
    const int64_t groups = 3;
    kd__sv1 *v = calloc(1, sizeof *v);
    if (!v) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = v;
    m->vt = &kd__sv1_vt;
    kd_param_list *pl = &m->params;
    KD_TRY(kd__conv_bn_init(&v->conv1, &v->bn1, pl, "conv1", "bn1", m->cfg.in_channels, 24, 1, 1, 0, 1));
    int64_t in = 24;
    for (int s = 0; s < 3; s++) {
        v->n[s] = blocks[s];
        v->stage[s] = calloc((size_t)blocks[s], sizeof(kd__sv1_block));
        if (!v->stage[s]) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
        for (int i = 0; i < blocks[s]; i++) {
            kd__sv1_block *b = &v->stage[s][i];
            int64_t outc = out_planes[s] - (i == 0 ? in : 0), mid = outc / 4;
            b->stride = i == 0 ? 2 : 1;
            b->groups1 = in == 24 ? 1 : groups;
            char pc[48], pb[48];
            snprintf(pc, sizeof pc, "layer%d.%d.conv1", s + 1, i);
            snprintf(pb, sizeof pb, "layer%d.%d.bn1", s + 1, i);
            KD_TRY(kd__conv_bn_init(&b->conv1, &b->bn1, pl, pc, pb, in, mid, 1, 1, 0, b->groups1));
            snprintf(pc, sizeof pc, "layer%d.%d.conv2", s + 1, i);
            snprintf(pb, sizeof pb, "layer%d.%d.bn2", s + 1, i);
            KD_TRY(kd__conv_bn_init(&b->conv2, &b->bn2, pl, pc, pb, mid, mid, 3, b->stride, 1, mid));
            snprintf(pc, sizeof pc, "layer%d.%d.conv3", s + 1, i);
            snprintf(pb, sizeof pb, "layer%d.%d.bn3", s + 1, i);
            KD_TRY(kd__conv_bn_init(&b->conv3, &b->bn3, pl, pc, pb, mid, outc, 1, 1, 0, groups));
            in = out_planes[s];
        }
    }
    KD_TRY(kd_linear_layer_init(&v->linear, pl, "linear", in, m->cfg.num_classes, 1));
    m->feat_dim = in;
    /* PyTorch's default Conv2d init: U(+-1/sqrt(fan_in)), fan_in = in/groups * k * k. */
    for (int i = 0; i < pl->n; i++) {
        kd_tensor *t = pl->items[i].t;
        if (t->ndim == 4) kd_init_uniform(t, 1.0f / sqrtf((float)kd_fan_in(t)), rng);
    }
    kd_linear_layer_default_init(&v->linear, rng);
    return KD_OK;
}
