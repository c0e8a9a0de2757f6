/* CRD: Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR
 * 2020) as RepDistiller's official code runs it (crd/criterion.py CRDLoss,
 * crd/memory.py ContrastMemory, dataset/cifar100.py
 * CIFAR100InstanceSample, train_student.py for the wiring):
 *
 *     v1 = normalise(embed_s(feat_s[-1])),  v2 = normalise(embed_t(feat_t[-1]))
 *     scores of v1 against the teacher's bank memory_v2 and of v2 against
 *     the student's bank memory_v1, both at the K+1 sampled indices;
 *     term = ContrastLoss(student side) + ContrastLoss(teacher side)
 *
 * with L = 1 * CE + 0.8 * term (CRD+KD: alpha 1 as well). Both embeddings
 * are trainable (the teacher's features carry no gradient, its embedding
 * does). The banks (N x feat_dim each, initialised uniform in
 * +-1/sqrt(feat_dim / 3)) move after each step: m[i] <- normalise(nce_m
 * m[i] + (1 - nce_m) v[i]) at the batch's own dataset indices. The
 * normalisers Z are set on the first batch and then frozen; they live in
 * "contrast.params" = [K, T, Z_v1, Z_v2, momentum] as in the official
 * buffer, so the whole state is in the checkpoint.
 *
 * The sampler (crd_sampler.c) draws the positive (the image itself in
 * "exact" mode, a random image of its class in "relax" mode) and K negatives
 * from the other classes per sample, from the stream (seed, global step,
 * sample): a resumed run draws what the uninterrupted run drew. The loss of
 * each side is one fused gather-and-dot (crd_nce.c) that never builds the
 * (B, K+1, D) tensors of the official code.
 *
 * mode=queue (RepDistiller issue #40: the author's advice for big data) keeps
 * instead a FIFO of the last K embeddings of each side (MoCo's queue): the
 * positive of a sample is the other model's embedding of the same image in
 * this step, its negatives every queue entry; memory is 2 K D floats
 * whatever N is. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/crd.h"
#include "kd/dist.h"
#include "distill/methods.h"

enum { KD__CRD_EXACT = 0, KD__CRD_RELAX, KD__CRD_QUEUE };

typedef struct {
    int feat_dim;
    int nce_k;
    float nce_t;
    float nce_m;
    int mode;
} kd__crd_args;

static const kd_method_arg kd__crd_arg_table[] = {
    KD__ARG(kd__crd_args, feat_dim, KD_ARG_INT, "128", "embedding size of both sides (RepDistiller --feat_dim)"),
    KD__ARG(kd__crd_args, nce_k, KD_ARG_INT, "16384", "negatives per sample (--nce_k); the queue length in queue mode"),
    KD__ARG(kd__crd_args, nce_t, KD_ARG_FLOAT, "0.07", "temperature of the scores (--nce_t)"),
    KD__ARG(kd__crd_args, nce_m, KD_ARG_FLOAT, "0.5", "momentum of the memory-bank update (--nce_m)"),
    KD__ARG_CHOICE(kd__crd_args, mode, "exact|relax|queue", "exact",
                   "positive: the image itself (exact) or a random image of its class (relax), negatives from "
                   "other classes in N-row banks; queue: a FIFO of the last nce_k embeddings, memory independent "
                   "of the training-set size"),
};

typedef struct {
    kd_linear_layer embed_s, embed_t;
    int64_t d_s, d_t;
    kd_tensor *mem_v1, *mem_v2; /* banks (N, D) or queues (K, D) */
    kd_tensor *params;          /* (5): K, T, Z_v1, Z_v2, momentum */
    kd_tensor *queue_ptr;       /* queue mode: (1) I64, the next row to write */
    kd__crd_sampler sampler;
    int64_t n_data;
    /* What the step leaves for after_step (graph tensors, valid until the
     * next kd_graph_reset). */
    kd_tensor *v1, *v2;
    const int64_t *index;
    int64_t batch;
    /* Tests: a fixed draw instead of the sampler's. */
    kd__crd_draw_fn draw;
    void *draw_user;
} kd__crd_state;

void kd__crd_set_draw(kd_method *m, kd__crd_draw_fn fn, void *user) {
    kd__crd_state *st = kd_method_state(m);
    st->draw = fn;
    st->draw_user = user;
}

/* RepDistiller's bank init: uniform in [-stdv, stdv), stdv = 1 / sqrt(D / 3). */
static void kd__crd_init_rows(kd_method *m, const char *what, kd_tensor *t, int64_t D) {
    kd_rng r;
    kd__method_rng(m, what, &r);
    float stdv = 1.0f / sqrtf((float)D / 3.0f), *x = kd_f32(t);
    for (int64_t i = 0; i < kd_tensor_numel(t); i++) x[i] = kd_rng_uniform(&r) * 2.0f * stdv - stdv;
}

/* The sampler's preconditions, checked once at setup so that a bad
 * combination fails before training: every class has images and K fits the
 * negatives of the largest class. */
static kd_status kd__crd_check_classes(const kd__crd_state *st, const kd__crd_args *a) {
    const kd__crd_sampler *s = &st->sampler;
    int big = 0;
    for (int c = 0; c < s->classes; c++) {
        if (kd__crd_class_size(s, c) == 0)
            return kd_error(KD_ERR_INVALID,
                            "crd: class %d of %d has no training image; crd.mode=%s draws positives and negatives by "
                            "class: train on data with every class, or set crd.mode=queue",
                            c, s->classes, a->mode == KD__CRD_RELAX ? "relax" : "exact");
        if (kd__crd_class_size(s, c) > kd__crd_class_size(s, big)) big = c;
    }
    int64_t avail = s->n - kd__crd_class_size(s, big);
    if (a->nce_k > avail)
        return kd_error(KD_ERR_INVALID,
                        "crd.nce_k %d is more than the %lld negatives of class %d (%lld training images, %lld of that "
                        "class): set crd.nce_k to at most %lld, or crd.mode=queue",
                        a->nce_k, (long long)avail, big, (long long)s->n, (long long)kd__crd_class_size(s, big),
                        (long long)avail);
    return KD_OK;
}

static kd_status kd__crd_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__crd_args *a = kd_method_args(m);
    kd__crd_state *st = kd_method_state(m);
    if (a->feat_dim < 1) return kd_error(KD_ERR_INVALID, "crd.feat_dim %d must be >= 1", a->feat_dim);
    if (a->nce_k < 1) return kd_error(KD_ERR_INVALID, "crd.nce_k %d must be >= 1", a->nce_k);
    if (!(a->nce_t > 0)) return kd_error(KD_ERR_INVALID, "crd.nce_t %g must be > 0", (double)a->nce_t);
    if (!(a->nce_m >= 0 && a->nce_m <= 1))
        return kd_error(KD_ERR_INVALID, "crd.nce_m %g must be in [0, 1]", (double)a->nce_m);
    const kd_net_shapes *s = &shp->student, *t = &shp->teacher;
    if (s->n_feat < 1 || t->n_feat < 1)
        return kd_error(KD_ERR_SHAPE, "crd: needs the pooled embedding feat[-1] of both nets");
    if (shp->n_train < 1) return kd_error(KD_ERR_INVALID, "crd: the training set is empty");
    st->n_data = shp->n_train;
    st->d_s = kd__last_feat_dim(s);
    st->d_t = kd__last_feat_dim(t);
    const int64_t D = a->feat_dim;
    kd_param_list *pl = kd_method_params(m);
    KD_TRY(kd_linear_layer_init(&st->embed_s, pl, "embed_s.linear", st->d_s, D, 1));
    KD_TRY(kd_linear_layer_init(&st->embed_t, pl, "embed_t.linear", st->d_t, D, 1));
    kd_rng r;
    kd__method_rng(m, "embed_s", &r);
    kd_linear_layer_default_init(&st->embed_s, &r);
    kd__method_rng(m, "embed_t", &r);
    kd_linear_layer_default_init(&st->embed_t, &r);
    int64_t five = 5;
    KD_TRY(kd_params_new(pl, "contrast", "params", KD_F32, 1, &five, KD_PARAM_BUFFER, &st->params));
    const float p0[5] = {(float)a->nce_k, a->nce_t, -1.0f, -1.0f, a->nce_m};
    memcpy(kd_f32(st->params), p0, sizeof p0);
    if (a->mode == KD__CRD_QUEUE) {
        int64_t qs[2] = {a->nce_k, D}, one = 1;
        KD_TRY(kd_params_new(pl, "contrast", "queue_v1", KD_F32, 2, qs, KD_PARAM_BUFFER, &st->mem_v1));
        KD_TRY(kd_params_new(pl, "contrast", "queue_v2", KD_F32, 2, qs, KD_PARAM_BUFFER, &st->mem_v2));
        KD_TRY(kd_params_new(pl, "contrast", "queue_ptr", KD_I64, 1, &one, KD_PARAM_BUFFER, &st->queue_ptr));
        kd__crd_init_rows(m, "queue_v1", st->mem_v1, D);
        kd__crd_init_rows(m, "queue_v2", st->mem_v2, D);
        return KD_OK;
    }
    if (!shp->train_labels)
        return kd_error(KD_ERR_INVALID, "crd.mode=%s draws by class and needs the training labels "
                                        "(kd_method_shapes.train_labels)",
                        a->mode == KD__CRD_RELAX ? "relax" : "exact");
    KD_TRY(kd__crd_sampler_init(&st->sampler, shp->train_labels, shp->n_train,
                                shp->num_classes > 0 ? shp->num_classes : 1));
    KD_TRY(kd__crd_check_classes(st, a));
    int64_t bs[2] = {shp->n_train, D};
    KD_TRY(kd_params_new(pl, "contrast", "memory_v1", KD_F32, 2, bs, KD_PARAM_BUFFER, &st->mem_v1));
    KD_TRY(kd_params_new(pl, "contrast", "memory_v2", KD_F32, 2, bs, KD_PARAM_BUFFER, &st->mem_v2));
    kd__crd_init_rows(m, "memory_v1", st->mem_v1, D);
    kd__crd_init_rows(m, "memory_v2", st->mem_v2, D);
    return KD_OK;
}

/* The K+1 indices of every sample, in graph memory. */
static kd_status kd__crd_indices(kd_method *m, kd_step_ctx *ctx, int64_t **out) {
    const kd__crd_args *a = kd_method_args(m);
    kd__crd_state *st = kd_method_state(m);
    const kd_step_batch *b = ctx->batch;
    if (!b->index || !b->y)
        return kd_error(KD_ERR_INVALID, "crd: the batch needs the dataset index and the label of each image");
    int64_t B = b->n, K = a->nce_k;
    int64_t *idx = kd_function_alloc(ctx->g, sizeof(int64_t) * (size_t)(B * (K + 1)));
    if (!idx) return kd_graph_status(ctx->g);
    if (st->draw) {
        KD_TRY(st->draw(st->draw_user, ctx, K, idx));
    } else {
        const int32_t *y = (const int32_t *)b->y->data;
        uint64_t key = kd_rng_key(0x637264ull /* "crd" */, (uint64_t)ctx->global_step);
        KD_TRY(kd__crd_draw(&st->sampler, kd_method_cfg(m)->seed, key, b->index, y, B, K,
                            a->mode == KD__CRD_RELAX, idx));
    }
    for (int64_t k = 0; k < B * (K + 1); k++)
        if (idx[k] < 0 || idx[k] >= st->n_data)
            return kd_error(KD_ERR_INVALID, "crd: contrast index %lld is outside the %lld bank rows", (long long)idx[k],
                            (long long)st->n_data);
    *out = idx;
    return KD_OK;
}

static kd_status kd__crd_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__crd_args *a = kd_method_args(m);
    kd__crd_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    st->v1 = st->v2 = NULL;
    kd_tensor *fs = kd_method_feat(g, &ctx->s, -1, 0), *ft = kd_method_feat(g, &ctx->t, -1, 0);
    KD_TRY(kd_graph_status(g));
    if (!fs || !ft) return kd_error(KD_ERR_INVALID, "crd: the pooled embeddings feat[-1] are missing");
    char bs[96], bt[96];
    if (fs->shape[0] != ft->shape[0] || kd_tensor_numel(fs) != fs->shape[0] * st->d_s ||
        kd_tensor_numel(ft) != ft->shape[0] * st->d_t || fs->shape[0] != ctx->batch->n)
        return kd_error(KD_ERR_SHAPE, "crd: feat[-1] of the student %s and of the teacher %s do not fit the embeddings "
                                      "(%lld and %lld inputs) and the batch of %lld",
                        kd_shape_str(fs, bs, sizeof bs), kd_shape_str(ft, bt, sizeof bt), (long long)st->d_s,
                        (long long)st->d_t, (long long)ctx->batch->n);
    kd_tensor *v1 = kd__linear_embed(g, &st->embed_s, fs, st->d_s, 1, 0.0f);
    kd_tensor *v2 = kd__linear_embed(g, &st->embed_t, ft, st->d_t, 1, 0.0f);
    KD_TRY(kd_graph_status(g));
    float *pr = kd_f32(st->params);
    kd__crd_nce_params ps = {.K = a->nce_k, .D = a->feat_dim, .n_data = st->n_data, .T = a->nce_t, .z = &pr[2]};
    kd__crd_nce_params pt = ps;
    pt.z = &pr[3];
    ps.bank = kd_f32(st->mem_v2); /* the student's embedding against the teacher's bank */
    pt.bank = kd_f32(st->mem_v1);
    ps.bank_rows = pt.bank_rows = st->mem_v1->shape[0];
    if (a->mode == KD__CRD_QUEUE) {
        ps.pos = kd_f32(v2); /* the other side's embedding of the same image, without gradient */
        pt.pos = kd_f32(v1);
    } else {
        int64_t *idx = NULL;
        KD_TRY(kd__crd_indices(m, ctx, &idx));
        ps.idx = pt.idx = idx;
    }
    kd_tensor *ls, *lt;
    KD_TRY(kd__crd_nce(g, v1, &ps, &ls));
    KD_TRY(kd__crd_nce(g, v2, &pt, &lt));
    *out = kd_add(g, ls, lt);
    st->v1 = v1;
    st->v2 = v2;
    st->index = ctx->batch->index;
    st->batch = ctx->batch->n;
    return kd_graph_status(g);
}

/* Writes the B rows of v into the queue q (K, D) from *ptr on, wrapping. */
static void kd__crd_enqueue(kd_tensor *q, int64_t *ptr, const float *v, int64_t B) {
    int64_t K = q->shape[0], D = q->shape[1];
    for (int64_t i = 0; i < B; i++) {
        memcpy(kd_f32(q) + *ptr * D, v + i * D, sizeof(float) * (size_t)D);
        *ptr = (*ptr + 1) % K;
    }
}

static kd_status kd__crd_after_step(kd_method *m, kd_step_ctx *ctx) {
    (void)ctx;
    const kd__crd_args *a = kd_method_args(m);
    kd__crd_state *st = kd_method_state(m);
    if (!st->v1 || !st->v2) return KD_OK; /* no term this step (beta 0) */
    const float *v1 = kd_f32(st->v1), *v2 = kd_f32(st->v2);
    const int64_t *index = st->index;
    int64_t B = st->batch;
    st->v1 = st->v2 = NULL;
    /* Data parallel: every rank applies the rows of all ranks, in rank
     * order, so the banks (queues) stay identical across ranks. */
    void *g1 = NULL, *g2 = NULL, *gi = NULL;
    if (kd_dist_size() > 1) {
        int64_t n = 0, rb = a->feat_dim * (int64_t)sizeof(float);
        kd_status s = kd_dist_gather_rows(v1, B, rb, "crd's student embeddings", &g1, &n);
        if (s == KD_OK) s = kd_dist_gather_rows(v2, B, rb, "crd's teacher embeddings", &g2, &n);
        if (s == KD_OK && a->mode != KD__CRD_QUEUE)
            s = kd_dist_gather_rows(index, B, sizeof *index, "crd's sample indices", &gi, &n);
        if (s != KD_OK) {
            free(g1);
            free(g2);
            free(gi);
            return s;
        }
        v1 = g1;
        v2 = g2;
        if (gi) index = gi;
        B = n;
    }
    kd_status s = KD_OK;
    if (a->mode == KD__CRD_QUEUE) {
        int64_t *ptr = (int64_t *)st->queue_ptr->data, p1 = *ptr, p2 = *ptr;
        kd__crd_enqueue(st->mem_v1, &p1, v1, B);
        kd__crd_enqueue(st->mem_v2, &p2, v2, B);
        *ptr = p1;
    } else {
        s = kd__crd_bank_update(kd_f32(st->mem_v1), a->feat_dim, index, v1, B, a->nce_m);
        if (s == KD_OK) s = kd__crd_bank_update(kd_f32(st->mem_v2), a->feat_dim, index, v2, B, a->nce_m);
    }
    free(g1);
    free(g2);
    free(gi);
    return s;
}

static void kd__crd_free(kd_method *m) {
    kd__crd_state *st = kd_method_state(m);
    kd__crd_sampler_free(&st->sampler);
}

const kd_method_def kd__method_crd = {
    .name = "crd",
    .summary = "contrastive representation distillation: normalised embeddings of feat[-1] scored against the other "
               "model's memory bank (K negatives from other classes), NCE loss on both sides",
    .paper = "Tian, Krishnan, Isola: Contrastive Representation Distillation, ICLR 2020",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 0.8f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__crd_arg_table),
    .args_size = sizeof(kd__crd_args),
    .state_size = sizeof(kd__crd_state),
    .setup = kd__crd_setup,
    .term = kd__crd_term,
    .after_step = kd__crd_after_step,
    .free = kd__crd_free,
};
