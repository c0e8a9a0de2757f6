/*
 * swin.c: Swin Transformer (Liu et al. 2021) with torchvision's module names
 * and layout (torchvision/models/swin_transformer.py, v1), so torchvision's
 * and (through tools/convert_esvit.py) EsViT's Swin-T/S weights load.
 *
 * features.0: Conv2d(in, C, patch, stride patch) + LayerNorm (features.0.0,
 * features.0.2), tokens kept as (N, H, W, C); features.1, 3, 5, 7: the stages
 * of SwinTransformerBlock "features.s.b":
 *     x = x + drop_path(proj(W-MSA(norm1(x))))    (attn.qkv, attn.proj,
 *         attn.relative_position_bias_table, buffer attn.relative_position_index)
 *     x = x + drop_path(mlp.3(GELU(mlp.0(norm2(x)))))
 * with shifted windows (shift ws/2) in every odd block, the attention mask of
 * the cyclic shift (-100 between tokens of different regions), the relative
 * position bias indexed as torchvision; features.2, 4, 6: PatchMerging
 * (gather of the 2x2 neighbours x0..x3, norm over 4C, reduction Linear(4C,
 * 2C, no bias)); then norm, average over the tokens, head. Stochastic depth
 * ("row") grows linearly from 0 to stochastic_depth_prob over the blocks.
 * Init as torchvision: every Linear trunc_normal(std 0.02) with zero bias
 * (the model-wide loop runs last, so it also covers the MLPs), the bias
 * tables trunc_normal(0.02), LayerNorm 1 / 0, the patch conv PyTorch's
 * default U(+-1/sqrt(fan_in)).
 *
 * Sizes. torchvision pads a map that the window does not divide; kd refuses
 * it (bad input, one message naming the sizes), except a map that fits in one
 * window on an axis, which is padded with zeros to the window as torchvision
 * does (no shift on that axis). Patch merging pads an odd side with zeros as
 * torchvision. The image must be a multiple of the patch. So on the sizes kd
 * accepts, the outputs are torchvision's (checked on swin_t at 224x224 and
 * the small variants by tests/test_swin.c).
 *
 * Variants (depths, heads, embed, patch, window, stochastic depth):
 *   swin_t      2-2-6-2,  3-6-12-24, 96, 4, 7, 0.2   (torchvision swin_t)
 *   swin_s      2-2-18-2, 3-6-12-24, 96, 4, 7, 0.3   (torchvision swin_s)
 *   swin_b      2-2-18-2, 4-8-16-32, 128, 4, 7, 0.5  (torchvision swin_b)
 *   swin_cifar  2-2-2,    2-4-8,     64, 2, 4, 0.1   for 32x32 (maps 16, 8, 4)
 *   swin_mnist  2-4,      2-4,       64, 2, 7, 0.1   for 28x28 (maps 14, 7)
 * Parameter counts: docs/ARCHITECTURE.md (checked by tests/test_swin.c).
 *
 * Features: feat[0] the patch embedding, feat[1..S] the stage outputs (before
 * merging), the last one after the final norm (the region tokens of EsViT),
 * all laid out (N, C, H, W); feat[S+1] the pooled embedding (N, C_last).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"

#define KD__SWIN_MAXS 4

typedef struct {
    const char *name;
    int nstage, depths[KD__SWIN_MAXS], heads[KD__SWIN_MAXS];
    int64_t embed, patch, window;
    float sd_prob;
} kd__swin_variant;

static const kd__swin_variant kd__swin_variants[] = {
    {"swin_t", 4, {2, 2, 6, 2}, {3, 6, 12, 24}, 96, 4, 7, 0.2f},
    {"swin_s", 4, {2, 2, 18, 2}, {3, 6, 12, 24}, 96, 4, 7, 0.3f},
    {"swin_b", 4, {2, 2, 18, 2}, {4, 8, 16, 32}, 128, 4, 7, 0.5f},
    {"swin_cifar", 3, {2, 2, 2}, {2, 4, 8}, 64, 2, 4, 0.1f},
    {"swin_mnist", 2, {2, 4}, {2, 4}, 64, 2, 7, 0.1f},
};

typedef struct {
    kd_ln_layer norm1, norm2;
    kd_linear_layer qkv, proj, fc1, fc2;
    kd_tensor *bias_table; /* ((2ws-1)^2, heads) */
    kd_tensor *bias_index; /* (ws^4) I64 */
    int64_t dim, heads, shift;
    float sd_prob;
} kd__swin_block;

typedef struct {
    kd_ln_layer norm;
    kd_linear_layer reduction;
} kd__swin_merge;

typedef struct {
    const kd__swin_variant *v;
    kd_conv2d_layer patch;
    kd_ln_layer patch_norm;
    kd__swin_block *blocks; /* all stages, in order */
    kd__swin_merge merge[KD__SWIN_MAXS - 1];
    kd_ln_layer norm;
    kd_linear_layer head;
} kd__swin;

static void kd__swin_free(void *p) {
    kd__swin *s = p;
    if (!s) return;
    free(s->blocks);
    free(s);
}

/* x zero-padded at the end of axis `dim` to `to` (returns x when no padding is needed). */
static kd_tensor *kd__pad_end(kd_graph *g, kd_tensor *x, int dim, int64_t to) {
    if (!x || x->shape[dim] >= to) return x;
    int64_t zs[KD_MAX_DIMS];
    for (int i = 0; i < x->ndim; i++) zs[i] = x->shape[i];
    zs[dim] = to - x->shape[dim];
    kd_tensor *z = kd_graph_zeros(g, KD_F32, x->ndim, zs);
    if (!z) return NULL;
    kd_tensor *parts[2] = {x, z};
    return kd_concat(g, parts, 2, dim);
}

/* Region labels of the cyclic-shift mask along one padded axis of length L. */
static int kd__shift_region(int64_t i, int64_t L, int64_t ws, int64_t shift) {
    if (shift == 0) return 0;
    return i < L - ws ? 0 : (i < L - shift ? 1 : 2);
}

/* The (nW, N, N) additive mask of shifted-window attention: -100
 * between tokens of a window that come from different regions. */
static kd_tensor *kd__swin_mask(kd_graph *g, int64_t pH, int64_t pW, int64_t ws, int64_t sh, int64_t sw) {
    int64_t nh = pH / ws, nw = pW / ws, N = ws * ws;
    int64_t shape[3] = {nh * nw, N, N};
    kd_tensor *m = kd_graph_tensor(g, KD_F32, 3, shape);
    if (!m) return NULL;
    float *p = kd_f32(m);
    int lab[64 * 64];
    int *labels = N <= 64 * 64 ? lab : malloc((size_t)N * sizeof *labels);
    if (!labels) return NULL;
    for (int64_t wy = 0; wy < nh; wy++)
        for (int64_t wx = 0; wx < nw; wx++) {
            for (int64_t i = 0; i < N; i++) {
                int64_t y = wy * ws + i / ws, x = wx * ws + i % ws;
                labels[i] = 3 * kd__shift_region(y, pH, ws, sh) + kd__shift_region(x, pW, ws, sw);
            }
            float *mw = p + (wy * nw + wx) * N * N;
            for (int64_t i = 0; i < N; i++)
                for (int64_t j = 0; j < N; j++) mw[i * N + j] = labels[i] == labels[j] ? 0.0f : -100.0f;
        }
    if (labels != lab) free(labels);
    return m;
}

/* Checks that a (H, W) map is accepted by window size ws: each side a
 * multiple of ws or within one window. */
static kd_status kd__swin_check_map(const kd_model *m, int stage, int64_t H, int64_t W, int64_t ws,
                                    int64_t ih, int64_t iw) {
    int okh = H % ws == 0 || H <= ws, okw = W % ws == 0 || W <= ws;
    if (okh && okw) return KD_OK;
    return kd_error(KD_ERR_SHAPE,
                    "%s: a %lldx%lld image gives a %lldx%lld map in stage %d, which the window size %lld "
                    "neither divides nor holds in one window (the maps of every stage must be multiples "
                    "of %lld or at most %lld)",
                    m->arch, (long long)ih, (long long)iw, (long long)H, (long long)W, stage + 1,
                    (long long)ws, (long long)ws, (long long)ws);
}

/* One Swin block on x (B, H, W, C). */
static kd_tensor *kd__swin_block_forward(kd_graph *g, const kd__swin_block *b, kd_tensor *x, int64_t ws,
                                         int training) {
    int64_t B = x->shape[0], H = x->shape[1], W = x->shape[2];
    int64_t pH = H < ws ? ws : H, pW = W < ws ? ws : W;
    int64_t sh = ws >= pH ? 0 : b->shift, sw = ws >= pW ? 0 : b->shift;
    int64_t heads = b->heads, N = ws * ws;

    kd_tensor *h = kd_ln_layer_forward(g, &b->norm1, x);
    h = kd__pad_end(g, kd__pad_end(g, h, 1, pH), 2, pW);
    if (sh || sw) {
        int dims[2] = {1, 2};
        int64_t shifts[2] = {-sh, -sw};
        h = kd_roll(g, h, 2, dims, shifts);
    }
    h = kd_window_partition(g, h, ws); /* (Bw, N, C) */
    kd_tensor *qkv = kd_linear_layer_forward(g, &b->qkv, h);
    kd_tensor *bias = kd_index_select(g, b->bias_table, b->bias_index); /* (N*N, heads) */
    int64_t s3[3] = {N, N, heads};
    int p3[3] = {2, 0, 1};
    bias = kd_permute(g, kd_reshape(g, bias, 3, s3), p3); /* (heads, N, N) */
    kd_tensor *mask = NULL;
    if ((sh || sw) && !(mask = kd__swin_mask(g, pH, pW, ws, sh, sw))) return NULL;
    kd_tensor *o = kd_window_attention(g, qkv, bias, mask, heads); /* (Bw, N, C) */
    o = kd_linear_layer_forward(g, &b->proj, o);
    o = kd_window_reverse(g, o, ws, B, pH, pW);
    if (sh || sw) {
        int dims[2] = {1, 2};
        int64_t shifts[2] = {sh, sw};
        o = kd_roll(g, o, 2, dims, shifts);
    }
    if (pH != H) o = kd_slice(g, o, 1, 0, H);
    if (pW != W) o = kd_slice(g, o, 2, 0, W);
    x = kd_add(g, x, kd_drop_path(g, o, b->sd_prob, training));

    kd_tensor *y = kd_ln_layer_forward(g, &b->norm2, x);
    y = kd_linear_layer_forward(g, &b->fc2, kd_gelu(g, kd_linear_layer_forward(g, &b->fc1, y)));
    return kd_add(g, x, kd_drop_path(g, y, b->sd_prob, training));
}

/* (B, H, W, C) tokens as an (B, C, H, W) map. */
static kd_tensor *kd__tokens_nchw(kd_graph *g, kd_tensor *x) {
    int perm[4] = {0, 3, 1, 2};
    return kd_permute(g, x, perm);
}

static kd_status kd__swin_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    (void)flags;
    kd__swin *s = m->impl;
    const kd__swin_variant *v = s->v;
    int tr = m->training;
    memset(out, 0, sizeof *out);
    if (!x || x->ndim != 4) return kd_error(KD_ERR_SHAPE, "%s: the input must be (N, C, H, W)", m->arch);
    int64_t ih = x->shape[2], iw = x->shape[3];
    if (ih % v->patch || iw % v->patch)
        return kd_error(KD_ERR_SHAPE, "%s: a %lldx%lld image is not a multiple of the patch size %lld",
                        m->arch, (long long)ih, (long long)iw, (long long)v->patch);
    {   /* every stage's map, checked before any work */
        int64_t H = ih / v->patch, W = iw / v->patch;
        for (int st = 0; st < v->nstage; st++) {
            KD_TRY(kd__swin_check_map(m, st, H, W, v->window, ih, iw));
            H = (H + 1) / 2;
            W = (W + 1) / 2;
        }
    }
    size_t sc = kd_graph_scope_begin(g);
    kd_tensor *h = kd_conv2d_layer_forward(g, &s->patch, x);
    int perm[4] = {0, 2, 3, 1};
    h = kd_ln_layer_forward(g, &s->patch_norm, kd_permute(g, h, perm)); /* (N, H, W, C) */
    out->feat[0] = out->preact[0] = kd__tokens_nchw(g, h);
    h = kd__trunk_keep(g, sc, h, out);
    int bi = 0;
    for (int st = 0; st < v->nstage; st++) {
        for (int k = 0; k < v->depths[st]; k++, bi++) {
            h = kd__swin_block_forward(g, &s->blocks[bi], h, v->window, tr);
            h = kd__trunk_keep(g, sc, h, out);
        }
        if (st + 1 < v->nstage) {
            out->feat[st + 1] = out->preact[st + 1] = kd__tokens_nchw(g, h);
            h = kd__pad_end(g, kd__pad_end(g, h, 1, h->shape[1] + h->shape[1] % 2), 2,
                            h->shape[2] + h->shape[2] % 2);
            h = kd_patch_merge(g, h);
            h = kd_linear_layer_forward(g, &s->merge[st].reduction, kd_ln_layer_forward(g, &s->merge[st].norm, h));
            h = kd__trunk_keep(g, sc, h, out);
        }
        if (kd_graph_status(g) != KD_OK) return kd_graph_status(g);
    }
    h = kd_ln_layer_forward(g, &s->norm, h);
    kd_tensor *map = kd__tokens_nchw(g, h);
    out->feat[v->nstage] = out->preact[v->nstage] = map;
    kd_tensor *emb = kd_global_avgpool(g, map);
    out->feat[v->nstage + 1] = out->preact[v->nstage + 1] = emb;
    out->n_feat = v->nstage + 2;
    out->logits = kd__classify(m, g, &s->head, emb);
    kd__trunk_keep(g, sc, out->logits, out);
    return kd_graph_status(g);
}

static const kd__model_vt kd__swin_vt = {kd__swin_forward, kd__swin_free};

static void kd__relative_index(kd_tensor *t, int64_t ws) {
    int64_t *p = t->data, N = ws * ws;
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) {
            int64_t dy = i / ws - j / ws + ws - 1, dx = i % ws - j % ws + ws - 1;
            p[i * N + j] = dy * (2 * ws - 1) + dx;
        }
}

kd_status kd__swin_build(kd_model *m, const kd__arch_arg *arg, kd_rng *rng) {
    int nv = (int)(sizeof kd__swin_variants / sizeof kd__swin_variants[0]);
    if (arg->depth < 0 || arg->depth >= nv) return kd_error(KD_ERR_INVALID, "%s: no such Swin variant", m->arch);
    const kd__swin_variant *v = &kd__swin_variants[arg->depth];
    kd__swin *s = calloc(1, sizeof *s);
    if (!s) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    m->impl = s;
    m->vt = &kd__swin_vt;
    s->v = v;
    int total = 0;
    for (int st = 0; st < v->nstage; st++) total += v->depths[st];
    s->blocks = calloc((size_t)total, sizeof *s->blocks);
    if (!s->blocks) return kd_error(KD_ERR_NOMEM, "out of memory building %s", m->arch);
    kd_param_list *pl = &m->params;
    int64_t ws = v->window, C = v->embed;
    KD_TRY(kd_conv2d_layer_init(&s->patch, pl, "features.0.0", m->cfg.in_channels, C, v->patch, v->patch, 0, 1, 1));
    KD_TRY(kd_ln_layer_init(&s->patch_norm, pl, "features.0.2", C));
    int bi = 0;
    char pre[96];
    for (int st = 0; st < v->nstage; st++) {
        for (int k = 0; k < v->depths[st]; k++, bi++) {
            kd__swin_block *b = &s->blocks[bi];
            b->dim = C;
            b->heads = v->heads[st];
            b->shift = k % 2 ? ws / 2 : 0;
            b->sd_prob = total > 1 ? v->sd_prob * (float)bi / (float)(total - 1) : 0.0f;
            if (C % b->heads) return kd_error(KD_ERR_INVALID, "%s: %lld channels in %lld heads", m->arch, (long long)C, (long long)b->heads);
            int f = 2 * st + 1;
            snprintf(pre, sizeof pre, "features.%d.%d.norm1", f, k);
            KD_TRY(kd_ln_layer_init(&b->norm1, pl, pre, C));
            snprintf(pre, sizeof pre, "features.%d.%d.attn", f, k);
            int64_t ts[2] = {(2 * ws - 1) * (2 * ws - 1), b->heads}, is = ws * ws * ws * ws;
            KD_TRY(kd_params_new(pl, pre, "relative_position_bias_table", KD_F32, 2, ts, KD_PARAM_WEIGHT, &b->bias_table));
            KD_TRY(kd_params_new(pl, pre, "relative_position_index", KD_I64, 1, &is, KD_PARAM_BUFFER, &b->bias_index));
            kd__relative_index(b->bias_index, ws);
            snprintf(pre, sizeof pre, "features.%d.%d.attn.qkv", f, k);
            KD_TRY(kd_linear_layer_init(&b->qkv, pl, pre, C, 3 * C, 1));
            snprintf(pre, sizeof pre, "features.%d.%d.attn.proj", f, k);
            KD_TRY(kd_linear_layer_init(&b->proj, pl, pre, C, C, 1));
            snprintf(pre, sizeof pre, "features.%d.%d.norm2", f, k);
            KD_TRY(kd_ln_layer_init(&b->norm2, pl, pre, C));
            snprintf(pre, sizeof pre, "features.%d.%d.mlp.0", f, k);
            KD_TRY(kd_linear_layer_init(&b->fc1, pl, pre, C, 4 * C, 1));
            snprintf(pre, sizeof pre, "features.%d.%d.mlp.3", f, k);
            KD_TRY(kd_linear_layer_init(&b->fc2, pl, pre, 4 * C, C, 1));
        }
        if (st + 1 < v->nstage) {
            snprintf(pre, sizeof pre, "features.%d.reduction", 2 * st + 2);
            KD_TRY(kd_linear_layer_init(&s->merge[st].reduction, pl, pre, 4 * C, 2 * C, 0));
            snprintf(pre, sizeof pre, "features.%d.norm", 2 * st + 2);
            KD_TRY(kd_ln_layer_init(&s->merge[st].norm, pl, pre, 4 * C));
            C *= 2;
        }
    }
    KD_TRY(kd_ln_layer_init(&s->norm, pl, "norm", C));
    KD_TRY(kd_linear_layer_init(&s->head, pl, "head", C, m->cfg.num_classes, 1));
    m->feat_dim = C;
    /* torchvision's init: the patch conv keeps PyTorch's default, then every
     * Linear weight trunc_normal(0.02) and bias 0; the bias tables trunc_normal(0.02). */
    float bound = 1.0f / sqrtf((float)kd_fan_in(s->patch.weight));
    kd_init_uniform(s->patch.weight, bound, rng);
    kd_init_uniform(s->patch.bias, bound, rng);
    for (int i = 0; i < pl->n; i++) {
        kd_param *p = &pl->items[i];
        size_t L = strlen(p->name);
        if (p->t->ndim == 2) kd_init_trunc_normal(p->t, 0.02f, rng);
        else if (L > 5 && strcmp(p->name + L - 5, ".bias") == 0 && strncmp(p->name, "features.0.0", 12) != 0 &&
                 !strstr(p->name, "norm"))
            kd_init_constant(p->t, 0.0f);
    }
    return KD_OK;
}
