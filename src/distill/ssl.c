/* What the self-supervised methods share (ssl.h): projection heads, NT-Xent,
 * the soft cross-entropy of SEED and MoCo, the FIFO queue, the views. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/ssl.h"
#include "kd/dist.h"
#include "kd/io.h"

/* A batch norm for (N, C) whose bias is a zero buffer (Keras center=False). */
static kd_status kd__bn_nocenter_init(kd_bn_layer *l, kd_param_list *pl, const char *prefix, int64_t ch,
                                      int trainable) {
    memset(l, 0, sizeof *l);
    KD_TRY(kd_params_new(pl, prefix, "weight", KD_F32, 1, &ch, trainable ? KD_PARAM_NO_DECAY : KD_PARAM_BUFFER,
                         &l->weight));
    KD_TRY(kd_params_new(pl, prefix, "bias", KD_F32, 1, &ch, KD_PARAM_BUFFER, &l->bias));
    KD_TRY(kd_params_new(pl, prefix, "running_mean", KD_F32, 1, &ch, KD_PARAM_BUFFER, &l->running_mean));
    KD_TRY(kd_params_new(pl, prefix, "running_var", KD_F32, 1, &ch, KD_PARAM_BUFFER, &l->running_var));
    KD_TRY(kd_params_new(pl, prefix, "num_batches_tracked", KD_I64, 0, NULL, KD_PARAM_BUFFER,
                         &l->num_batches_tracked));
    kd_init_constant(l->weight, 1.0f);
    kd_init_constant(l->running_var, 1.0f);
    l->eps = 1e-5f;
    l->momentum = 0.1f;
    return KD_OK;
}

/* Marks the tensors registered since `first` as buffers (frozen heads). */
static void kd__freeze_from(kd_param_list *pl, int first) {
    for (int i = first; i < pl->n; i++) {
        pl->items[i].kind = KD_PARAM_BUFFER;
        pl->items[i].t->requires_grad = 0;
    }
}

kd_status kd__head_init(kd__head *h, kd_param_list *pl, const char *prefix, kd__head_kind kind, int64_t in,
                        int64_t hidden, int64_t out, int trainable, kd_rng *r) {
    memset(h, 0, sizeof *h);
    h->kind = kind;
    h->in = in;
    h->out = out;
    int first = pl->n;
    char name[160];
    if (kind == KD__HEAD_DOGO) {
        h->n_lin = 2;
        snprintf(name, sizeof name, "%s.0", prefix);
        KD_TRY(kd_linear_layer_init(&h->lin[0], pl, name, in, hidden, 0));
        snprintf(name, sizeof name, "%s.1", prefix);
        KD_TRY(kd_bn_layer_init(&h->bn[0], pl, name, hidden));
        snprintf(name, sizeof name, "%s.3", prefix);
        KD_TRY(kd_linear_layer_init(&h->lin[1], pl, name, hidden, out, 1));
        kd_linear_layer_default_init(&h->lin[0], r);
        kd_linear_layer_default_init(&h->lin[1], r);
    } else if (kind == KD__HEAD_MLP) {
        h->n_lin = 2;
        snprintf(name, sizeof name, "%s.0", prefix);
        KD_TRY(kd_linear_layer_init(&h->lin[0], pl, name, in, hidden, 1));
        snprintf(name, sizeof name, "%s.2", prefix);
        KD_TRY(kd_linear_layer_init(&h->lin[1], pl, name, hidden, out, 1));
        kd_linear_layer_default_init(&h->lin[0], r);
        kd_linear_layer_default_init(&h->lin[1], r);
    } else {
        h->n_lin = 3;
        int64_t dims[4] = {in, in, in, out};
        for (int k = 0; k < 3; k++) {
            snprintf(name, sizeof name, "%s.%d", prefix, 3 * k);
            KD_TRY(kd_linear_layer_init(&h->lin[k], pl, name, dims[k], dims[k + 1], 0));
            kd_init_normal(h->lin[k].weight, 0.01f, r);
            snprintf(name, sizeof name, "%s.%d", prefix, 3 * k + 1);
            if (k < 2)
                KD_TRY(kd_bn_layer_init(&h->bn[k], pl, name, dims[k + 1]));
            else
                KD_TRY(kd__bn_nocenter_init(&h->bn[k], pl, name, dims[k + 1], trainable));
        }
    }
    if (!trainable) kd__freeze_from(pl, first);
    return KD_OK;
}

kd_tensor *kd__head_forward(kd_graph *g, kd__head *h, kd_tensor *x, int training) {
    if (!x) return NULL;
    x = kd_graph_to_strided(g, x);
    if (x && x->ndim != 2) {
        int64_t s2[2] = {x->shape[0], h->in};
        x = kd_reshape(g, x, 2, s2);
    }
    if (h->kind == KD__HEAD_MLP) return kd_linear_layer_forward(g, &h->lin[1], kd_relu(g, kd_linear_layer_forward(g, &h->lin[0], x)));
    if (h->kind == KD__HEAD_DOGO) {
        x = kd_relu(g, kd_bn_layer_forward(g, &h->bn[0], kd_linear_layer_forward(g, &h->lin[0], x), training));
        return kd_linear_layer_forward(g, &h->lin[1], x);
    }
    for (int k = 0; k < 3; k++) {
        x = kd_linear_layer_forward(g, &h->lin[k], x);
        if (k < 2) {
            x = kd_relu(g, kd_bn_layer_forward(g, &h->bn[k], x, training));
        } else {
            kd_bn_layer nc = h->bn[k];
            nc.bias = NULL; /* center=False: no shift */
            x = kd_bn_layer_forward(g, &nc, x, training);
        }
    }
    return x;
}

static void kd__ema_t(kd_tensor *k, const kd_tensor *q, float m, float a) {
    if (!k || !q) return;
    float *d = kd_f32(k);
    const float *x = kd_f32(q);
    for (int64_t j = 0; j < kd_tensor_numel(k); j++) d[j] = d[j] * m + a * x[j];
}

void kd__head_ema(kd__head *k, const kd__head *q, double momentum) {
    const float m = (float)momentum, a = (float)(1.0 - momentum);
    for (int i = 0; i < k->n_lin; i++) {
        kd__ema_t(k->lin[i].weight, q->lin[i].weight, m, a);
        kd__ema_t(k->lin[i].bias, q->lin[i].bias, m, a);
        if (k->kind == KD__HEAD_SIMCLR) {
            kd__ema_t(k->bn[i].weight, q->bn[i].weight, m, a);
            if (i < 2) kd__ema_t(k->bn[i].bias, q->bn[i].bias, m, a);
        }
    }
}

kd_status kd__head_load(kd__head *h, const kd_param_list *pl, const char *prefix, const char *path,
                        const char *who, const char *setting) {
    kd_st_file *f = NULL;
    KD_TRY(kd_st_open(path, &f));
    size_t plen = strlen(prefix);
    kd_status s = KD_OK;
    const char *kind = kd_st_meta(f, "head"), *want = h->kind == KD__HEAD_SIMCLR ? "simclr" : "mlp";
    if (kind && strcmp(kind, want)) {
        s = kd_error(KD_ERR_INVALID, "%s: the teacher checkpoint %s has a '%s' projection head, the setting asks for "
                                     "'%s': set %s=%s",
                     who, path, kind, want, setting, kind);
        kd_st_close(f);
        return s;
    }
    for (int i = 0; i < pl->n && s == KD_OK; i++) {
        const char *name = pl->items[i].name;
        if (strncmp(name, prefix, plen) != 0 || name[plen] != '.') continue;
        /* The file names the head "head.*" whatever the method calls it. */
        char key[200];
        snprintf(key, sizeof key, "head%s", name + plen);
        const kd_st_entry *e = kd_st_find(f, key);
        kd_tensor *t = pl->items[i].t;
        if (!e) {
            s = kd_error(KD_ERR_INVALID,
                         "%s needs the teacher's projection head, but %s has no tensor %s: give a checkpoint "
                         "written by kd pretrain (encoder.safetensors) or converted from PyTorch with its head",
                         who, path, key);
        } else if (e->dtype != t->dtype || (int64_t)e->nbytes != kd_tensor_numel(t) * (int64_t)kd_dtype_size(t->dtype)) {
            char a[96];
            s = kd_error(KD_ERR_SHAPE, "%s: tensor %s of %s does not fit the head: kd expects %s", who, key, path,
                         kd_shape_str(t, a, sizeof a));
        } else {
            memcpy(t->data, e->data, e->nbytes);
        }
    }
    kd_st_close(f);
    return s;
}

kd_tensor *kd__nt_xent(kd_graph *g, kd_tensor *z, float tau) {
    if (!z) return NULL;
    z = kd_graph_to_strided(g, z);
    if (!z) return NULL;
    const int64_t n2 = z->shape[0], B = n2 / 2;
    kd_tensor *zn = kd_l2_normalize(g, z, 1e-12f);
    kd_tensor *sim = kd_scale(g, kd_linear(g, zn, zn, NULL), 1.0f / tau); /* (2B, 2B) */
    int64_t sh[2] = {n2, n2};
    kd_tensor *mask = kd_graph_zeros(g, KD_F32, 2, sh);
    int64_t ls = n2;
    kd_tensor *labels = kd_graph_tensor(g, KD_I32, 1, &ls);
    if (!mask || !labels || !sim) return NULL;
    for (int64_t i = 0; i < n2; i++) {
        kd_f32(mask)[i * n2 + i] = -1e9f;
        ((int32_t *)labels->data)[i] = (int32_t)(i < B ? i + B : i - B);
    }
    kd_tensor *ce = kd_cross_entropy(g, kd_add(g, sim, mask), labels, 0.0f);
    return kd_scale(g, ce, 2.0f);
}

kd_tensor *kd__soft_ce(kd_graph *g, kd_tensor *s_logits, kd_tensor *t_logits, float t_temp) {
    if (!s_logits || !t_logits) return NULL;
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *p = kd_softmax(g, kd_scale(g, t_logits, 1.0f / t_temp));
    kd_graph_set_grad_enabled(g, prev);
    kd_tensor *ls = kd_log_softmax(g, s_logits);
    if (!ls || !p) return NULL;
    return kd_scale(g, kd_sum(g, kd_mul(g, ls, p)), -1.0f / (float)s_logits->shape[0]);
}

kd_status kd__queue_init(kd__queue *q, kd_param_list *pl, int64_t dim, int64_t K, kd_rng *r) {
    int64_t qs[2] = {dim, K}, one = 1;
    KD_TRY(kd_params_new(pl, "", "queue", KD_F32, 2, qs, KD_PARAM_BUFFER, &q->q));
    KD_TRY(kd_params_new(pl, "", "queue_ptr", KD_I64, 1, &one, KD_PARAM_BUFFER, &q->ptr));
    float *x = kd_f32(q->q);
    for (int64_t i = 0; i < dim * K; i++) x[i] = kd_rng_normal(r);
    for (int64_t k = 0; k < K; k++) { /* nn.functional.normalize(queue, dim=0) */
        double ss = 0;
        for (int64_t d = 0; d < dim; d++) ss += (double)x[d * K + k] * x[d * K + k];
        float nrm = (float)sqrt(ss);
        if (nrm < 1e-12f) nrm = 1e-12f;
        for (int64_t d = 0; d < dim; d++) x[d * K + k] /= nrm;
    }
    return KD_OK;
}

static void kd__queue_put(kd__queue *q, const float *keys, int64_t B) {
    const int64_t D = q->q->shape[0], K = q->q->shape[1];
    int64_t *ptr = (int64_t *)q->ptr->data, p = *ptr;
    float *x = kd_f32(q->q);
    for (int64_t i = 0; i < B; i++) {
        for (int64_t d = 0; d < D; d++) x[d * K + p] = keys[i * D + d];
        p = (p + 1) % K;
    }
    *ptr = p;
}

kd_status kd__queue_push(kd__queue *q, const float *keys, int64_t B) {
    if (kd_dist_size() <= 1) {
        kd__queue_put(q, keys, B);
        return KD_OK;
    }
    /* concat_all_gather: every rank enqueues the keys of all ranks, in rank
     * order, so the queues stay identical across ranks. */
    void *all = NULL;
    int64_t n = 0;
    KD_TRY(kd_dist_gather_rows(keys, B, q->q->shape[0] * (int64_t)sizeof(float), "the queue's keys", &all, &n));
    kd__queue_put(q, all, n);
    free(all);
    return KD_OK;
}

void kd__ssl_views_cfg(kd_ssl_aug_cfg *out, int size, int simclr, float strength, float blur_p, float crop_min,
                       const kd_transform_cfg *base) {
    kd_ssl_aug_cfg c = kd_ssl_aug_cfg_mocov2(size);
    if (simclr) c.jitter = (kd_jitter_cfg){0.8f * strength, 0.8f * strength, 0.8f * strength, 0.2f * strength};
    c.scale[0] = crop_min;
    c.blur_p = blur_p;
    c.blur_kernel = 0;
    if (blur_p > 0 && simclr) { /* SimCLR: kernel size / 10, odd */
        int k = size / 10;
        c.blur_kernel = k % 2 ? k : k + 1;
    }
    c.normalize = base->normalize;
    for (int k = 0; k < 3; k++) {
        c.mean[k] = base->mean[k];
        c.std[k] = base->std[k] != 0.0f ? base->std[k] : 1.0f;
    }
    *out = c;
}

kd_status kd__ssl_view(const char *who, kd_ssl_aug_cfg *aug, int in_h, int simclr, float strength, float blur_p,
                       float crop_min, kd_transform_cfg *tf) {
    int size = tf->out_h ? tf->out_h : in_h;
    if (size < 1) return kd_error(KD_ERR_INVALID, "%s: the images differ in size; set image_size", who);
    kd__ssl_views_cfg(aug, size, simclr, strength, blur_p, crop_min, tf);
    tf->ssl = aug;
    tf->out_h = tf->out_w = aug->size;
    tf->pad_crop = 0;
    tf->hflip = 0;
    tf->geometry = NULL;
    return KD_OK;
}

kd_tensor *kd__ssl_rowdot(kd_graph *g, kd_tensor *a, kd_tensor *b) {
    int64_t os[2] = {a->shape[1], 1};
    kd_tensor *ones = kd_graph_tensor(g, KD_F32, 2, os);
    if (!ones) return NULL;
    for (int64_t i = 0; i < os[0]; i++) kd_f32(ones)[i] = 1.0f;
    return kd_matmul(g, kd_mul(g, a, b), ones);
}

kd_status kd__ssl_stack_views(kd_graph *g, const kd_step_batch *b, const char *who, kd_tensor **x) {
    *x = NULL;
    if (b->n_views != 2)
        return kd_error(KD_ERR_INVALID, "%s needs 2 views of each image (the batch has %d)", who, b->n_views);
    kd_tensor *v[2] = {kd_graph_to_strided(g, b->x[0]), kd_graph_to_strided(g, b->x[1])};
    if (v[0] && v[1]) *x = kd_concat(g, v, 2, 0);
    return kd_graph_status(g);
}
