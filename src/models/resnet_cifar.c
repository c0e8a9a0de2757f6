/* CIFAR ResNets as defined by RepDistiller (models/resnet.py): resnet8..110,
 * resnet8x4, resnet32x4. BasicBlocks, three stages, depth = 6n + 2. Parameter
 * names match the PyTorch state_dict ("layer1.0.conv1.weight").
 * One deliberate difference: the final AvgPool2d(8) is a global average pool,
 * identical for 32x32 inputs and also valid for 28x28 (MNIST-like) inputs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

typedef struct {
    kd_conv2d_layer conv1, conv2;
    kd_bn_layer bn1, bn2;
    int has_down;
    kd_conv2d_layer down_conv; /* downsample.0 */
    kd_bn_layer down_bn;       /* downsample.1 */
} kd__basic_block;

typedef struct {
    kd_conv2d_layer conv1;
    kd_bn_layer bn1;
    int n; /* blocks per stage */
    kd__basic_block *stage[3];
    kd_linear_layer fc;
} kd__resnet;

static void kd__resnet_free(void *p) {
    kd__resnet *r = p;
    if (!r) return;
    for (int i = 0; i < 3; i++) free(r->stage[i]);
    free(r);
}

/* out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); *preact (when
 * preact is not NULL) gets the sum before the ReLU. Scopes: each conv-BN
 * unit, the residual branch, and the sum (the branch outputs die once added),
 * so a no-grad forward holds at most four block-sized tensors. */
static kd_tensor *kd__block_forward(kd_graph *g, kd__basic_block *b, kd_tensor *x, int training,
                                    kd_tensor **preact) {
    size_t sc = kd_graph_scope_begin(g);
    size_t sb = kd_graph_scope_begin(g);
    kd_tensor *o = kd__conv_bn(g, &b->conv1, &b->bn1, x, training, 1);
    o = kd_graph_scope_return(g, sb, kd__conv_bn(g, &b->conv2, &b->bn2, o, training, 0));
    kd_tensor *res = x;
    if (b->has_down) res = kd__conv_bn(g, &b->down_conv, &b->down_bn, x, training, 0);
    /* Ending sc twice: first keeping the sum (the branch outputs die), then
     * keeping the block's results (the sum dies unless it is the preact). */
    kd_tensor *sum = kd_graph_scope_return(g, sc, kd_add(g, o, res));
    kd_tensor *out = kd_relu(g, sum);
    if (preact) *preact = sum;
    kd_tensor *keep[2] = {out, preact ? sum : NULL};
    kd_graph_scope_end(g, sc, 2, keep);
    return out;
}

static kd_status kd__resnet_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    kd__resnet *r = m->impl;
    int tr = m->training, pa = flags & KD_FWD_PREACT;
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd__conv_bn(g, &r->conv1, &r->bn1, x, tr, 1);
    out->feat[0] = h;
    if (pa) out->preact[0] = h;
    for (int s = 0; s < 3; s++) {
        for (int i = 0; i < r->n; i++) {
            /* Only the last block's pre-activation is a feature. */
            int last = i == r->n - 1;
            h = kd__block_forward(g, &r->stage[s][i], h, tr, pa && last ? &out->preact[1 + s] : NULL);
            if (last) out->feat[1 + s] = h;
            kd__trunk_keep(g, sc, h, out);
        }
    }
    kd_tensor *emb = kd_global_avgpool(g, h);
    out->feat[4] = emb;
    if (pa) out->preact[4] = emb;
    out->n_feat = 5;
    out->logits = kd__classify(m, g, &r->fc, emb);
    return kd_graph_status(g);
}

static const kd__model_vt kd__resnet_vt = {kd__resnet_forward, kd__resnet_free};

static kd_status kd__block_init(kd__basic_block *b, kd_param_list *pl, const char *prefix, int64_t in,
                                int64_t planes, int64_t stride) {
    char p[96];
    snprintf(p, sizeof p, "%s.conv1", prefix);
    KD_TRY(kd_conv2d_layer_init(&b->conv1, pl, p, in, planes, 3, stride, 1, 1, 0));
    snprintf(p, sizeof p, "%s.bn1", prefix);
    KD_TRY(kd_bn_layer_init(&b->bn1, pl, p, planes));
    snprintf(p, sizeof p, "%s.conv2", prefix);
    KD_TRY(kd_conv2d_layer_init(&b->conv2, pl, p, planes, planes, 3, 1, 1, 1, 0));
    snprintf(p, sizeof p, "%s.bn2", prefix);
    KD_TRY(kd_bn_layer_init(&b->bn2, pl, p, planes));
    if (stride != 1 || in != planes) {
        b->has_down = 1;
        snprintf(p, sizeof p, "%s.downsample.0", prefix);
        KD_TRY(kd_conv2d_layer_init(&b->down_conv, pl, p, in, planes, 1, stride, 0, 1, 0));
        snprintf(p, sizeof p, "%s.downsample.1", prefix);
        KD_TRY(kd_bn_layer_init(&b->down_bn, pl, p, planes));
    }
    return KD_OK;
}

kd_status kd__resnet_cifar_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    if ((arg->depth - 2) % 6 != 0)
        return kd_error(KD_ERR_INVALID, "resnet depth %d is not 6n+2", arg->depth);
    kd__resnet *r = calloc(1, sizeof *r);
    if (!r) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = r;
    m->vt = &kd__resnet_vt;
    r->n = (arg->depth - 2) / 6;
    const int *w = arg->widths;
    kd_param_list *pl = &m->params;
    KD_TRY(kd_conv2d_layer_init(&r->conv1, pl, "conv1", m->cfg.in_channels, w[0], 3, 1, 1, 1, 0));
    KD_TRY(kd_bn_layer_init(&r->bn1, pl, "bn1", w[0]));
    int64_t in = w[0];
    for (int s = 0; s < 3; s++) {
        r->stage[s] = calloc((size_t)r->n, sizeof(kd__basic_block));
        if (!r->stage[s]) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
        for (int i = 0; i < r->n; i++) {
            char prefix[64];
            snprintf(prefix, sizeof prefix, "layer%d.%d", s + 1, i);
            int64_t stride = (s > 0 && i == 0) ? 2 : 1;
            KD_TRY(kd__block_init(&r->stage[s][i], pl, prefix, in, w[s + 1], stride));
            in = w[s + 1];
        }
    }
    KD_TRY(kd_linear_layer_init(&r->fc, pl, "fc", in, m->cfg.num_classes, 1));
    m->feat_dim = in;
    /* RepDistiller init: conv kaiming_normal(fan_out, relu); BN 1/0 (done by
     * kd_bn_layer_init); Linear keeps PyTorch's default init. */
    for (int i = 0; i < pl->n; i++) {
        kd_param *p = &pl->items[i];
        if (p->t->ndim == 4) kd_init_kaiming_normal_fan_out(p->t, rng);
    }
    kd_linear_layer_default_init(&r->fc, rng);
    return KD_OK;
}
