/* The CIFAR bottleneck ResNet as defined by RepDistiller (models/resnetv2.py,
 * "ResNet50"): 3x3 stem conv to 64 channels + BN + ReLU (no max pool); four
 * stages of bottlenecks (1x1 to planes, 3x3 with the stage's stride, 1x1 to
 * 4*planes, each with BN; ReLU after the residual sum) with planes 64, 128,
 * 256, 512 and strides 1, 2, 2, 2; a 1x1 conv + BN shortcut where the shape
 * changes; adaptive average pool; Linear(2048, C).
 * Names: "layer3.0.conv2.weight", "layer3.0.shortcut.0.weight" (conv),
 * "layer3.0.shortcut.1.running_var" (BN), "linear.weight". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

#define KD__BOTTLENECK_EXPANSION 4

typedef struct {
    kd_conv2d_layer conv1, conv2, conv3;
    kd_bn_layer bn1, bn2, bn3;
    int has_shortcut;
    kd_conv2d_layer sc_conv; /* shortcut.0 */
    kd_bn_layer sc_bn;       /* shortcut.1 */
} kd__bottleneck;

typedef struct {
    kd_conv2d_layer conv1;
    kd_bn_layer bn1;
    int n[4];
    kd__bottleneck *stage[4];
    kd_linear_layer linear;
} kd__resnetv2;

static void kd__resnetv2_free(void *p) {
    kd__resnetv2 *r = p;
    if (!r) return;
    for (int i = 0; i < 4; i++) free(r->stage[i]);
    free(r);
}

/* Returns relu(branch + shortcut); *preact gets the sum. */
/* relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x));
 * *preact (when preact is not NULL) gets the sum before the ReLU. One scope
 * per conv-BN unit, one for the residual branch, and the block's scope
 * (ended twice: keeping the sum, then the results). */
static kd_tensor *kd__bottleneck_forward(kd_graph *g, kd__bottleneck *b, kd_tensor *x, int tr, kd_tensor **preact) {
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *o = kd__conv_bn(g, &b->conv1, &b->bn1, x, tr, 1);
    o = kd_graph_scope_return(g, sc, kd__conv_bn(g, &b->conv2, &b->bn2, o, tr, 1));
    o = kd_graph_scope_return(g, sc, kd__conv_bn(g, &b->conv3, &b->bn3, o, tr, 0));
    kd_tensor *res = b->has_shortcut ? kd__conv_bn(g, &b->sc_conv, &b->sc_bn, x, tr, 0) : x;
    kd_tensor *sum = kd_graph_scope_return(g, sc, kd_add(g, o, res));
    kd_tensor *keep[2] = {kd_relu(g, sum), preact ? sum : NULL};
    if (preact) *preact = sum;
    kd_graph_scope_end(g, sc, 2, keep);
    return keep[0];
}

static kd_status kd__resnetv2_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    kd__resnetv2 *r = m->impl;
    int tr = m->training, pa = flags & KD_FWD_PREACT;
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd__conv_bn(g, &r->conv1, &r->bn1, x, tr, 1);
    out->feat[0] = h;
    if (pa) out->preact[0] = h;
    for (int s = 0; s < 4; s++) {
        for (int i = 0; i < r->n[s]; i++) {
            /* Only the last block's pre-activation is a feature. */
            int last = i == r->n[s] - 1;
            h = kd__bottleneck_forward(g, &r->stage[s][i], h, tr, pa && last ? &out->preact[1 + s] : NULL);
            if (last) out->feat[1 + s] = h;
            kd__trunk_keep(g, sc, h, out);
        }
    }
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[5] = emb;
    if (pa) out->preact[5] = emb;
    out->n_feat = 6;
    out->logits = kd__classify(m, g, &r->linear, emb);
    return kd_graph_status(g);
}
static const kd__model_vt kd__resnetv2_vt = {kd__resnetv2_forward, kd__resnetv2_free};

kd_status kd__resnetv2_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    static const int64_t planes[4] = {64, 128, 256, 512};
    kd__resnetv2 *r = calloc(1, sizeof *r);
    if (!r) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = r;
    m->vt = &kd__resnetv2_vt;
    kd_param_list *pl = &m->params;
    KD_TRY(kd__conv_bn_init(&r->conv1, &r->bn1, pl, "conv1", "bn1", m->cfg.in_channels, 64, 3, 1, 1, 1));
    int64_t in = 64;
    for (int s = 0; s < 4; s++) {
        r->n[s] = arg->widths[s];
        if (r->n[s] < 1) return kd_error(KD_ERR_INVALID, "%s: stage %d has no blocks", m->arch, s + 1);
        r->stage[s] = calloc((size_t)r->n[s], sizeof(kd__bottleneck));
        if (!r->stage[s]) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
        for (int i = 0; i < r->n[s]; i++) {
            kd__bottleneck *b = &r->stage[s][i];
            int64_t p = planes[s], outc = KD__BOTTLENECK_EXPANSION * p;
            int64_t stride = (i == 0 && s > 0) ? 2 : 1;
            char pc[48], pb[48];
#define KD__BN_NAMES(cn, bn)                                         \
    snprintf(pc, sizeof pc, "layer%d.%d.%s", s + 1, i, cn); \
    snprintf(pb, sizeof pb, "layer%d.%d.%s", s + 1, i, bn)
            KD__BN_NAMES("conv1", "bn1");
            KD_TRY(kd__conv_bn_init(&b->conv1, &b->bn1, pl, pc, pb, in, p, 1, 1, 0, 1));
            KD__BN_NAMES("conv2", "bn2");
            KD_TRY(kd__conv_bn_init(&b->conv2, &b->bn2, pl, pc, pb, p, p, 3, stride, 1, 1));
            KD__BN_NAMES("conv3", "bn3");
            KD_TRY(kd__conv_bn_init(&b->conv3, &b->bn3, pl, pc, pb, p, outc, 1, 1, 0, 1));
            if (stride != 1 || in != outc) {
                b->has_shortcut = 1;
                KD__BN_NAMES("shortcut.0", "shortcut.1");
                KD_TRY(kd__conv_bn_init(&b->sc_conv, &b->sc_bn, pl, pc, pb, in, outc, 1, stride, 0, 1));
            }
#undef KD__BN_NAMES
            in = outc;
        }
    }
    KD_TRY(kd_linear_layer_init(&r->linear, pl, "linear", in, m->cfg.num_classes, 1));
    m->feat_dim = in;
    /* RepDistiller init: conv kaiming_normal(fan_out, relu); BN 1/0; Linear
     * keeps PyTorch's default init. */
    for (int i = 0; i < pl->n; i++)
        if (pl->items[i].t->ndim == 4) kd_init_kaiming_normal_fan_out(pl->items[i].t, rng);
    kd_linear_layer_default_init(&r->linear, rng);
    return KD_OK;
}
