/* MoCo v2 self-supervised pretraining (He et al., CVPR 2020; Chen et al.,
 * arXiv 2003.04297), as facebookresearch/moco runs it (moco/builder.py,
 * main_moco.py --mlp --aug-plus --cos) with the single-device batch norm of
 * its CIFAR-10 demo:
 *
 *     q = normalise(head_q(encoder_q(view 0)))                  (gradient)
 *     key encoder <- m key + (1 - m) query, every step before the keys
 *     k = normalise(head_k(encoder_k(view 1)))                  (no gradient)
 *     logits = [q.k, q.queue] / tau, label 0:  L = CE
 *     queue <- k (FIFO, K columns)
 *
 * The key encoder is the trainer's EMA copy of the student (ema_student);
 * head_k, the EMA of head, is the method's buffer "head_k.*". Shuffle-BN
 * across GPUs becomes split batch norm on one process: each encoder's batch
 * runs in bn_splits groups (each normalised with its own statistics), and
 * the key encoder's rows are shuffled with a permutation drawn from (seed,
 * step) before the grouping and unshuffled after (moco_cifar's
 * _batch_shuffle_single_gpu). Running statistics are updated group after
 * group (the demo's SplitBatchNorm averages them instead); they only serve
 * evaluation. */
#include <stdlib.h>
#include <string.h>

#include "distill/methods.h"
#include "distill/ssl.h"

typedef struct {
    int K;
    float tau;
    double m;
    int dim;
    int head;
    int bn_splits;
    float blur_p;
    float crop_min;
} kd__moco_args;

static const kd_method_arg kd__moco_arg_table[] = {
    KD__ARG(kd__moco_args, K, KD_ARG_INT, "65536", "queue length: negative keys (--moco-k)"),
    KD__ARG(kd__moco_args, tau, KD_ARG_FLOAT, "0.2", "softmax temperature (--moco-t; 0.2 in v2, 0.07 in v1)"),
    KD__ARG(kd__moco_args, m, KD_ARG_DOUBLE, "0.999", "key-encoder momentum (--moco-m)"),
    KD__ARG(kd__moco_args, dim, KD_ARG_INT, "128", "embedding size (--moco-dim)"),
    KD__ARG_CHOICE(kd__moco_args, head, KD__HEAD_KINDS, "mlp", "projection head: mlp (v2 --mlp) or simclr (3 layers)"),
    KD__ARG(kd__moco_args, bn_splits, KD_ARG_INT, "8",
            "batch-norm groups per batch in place of shuffle-BN (moco_cifar SplitBatchNorm; 1: whole batch)"),
    KD__ARG(kd__moco_args, blur_p, KD_ARG_FLOAT, "0.5", "probability of the Gaussian blur of aug+ (0: the CIFAR demo)"),
    KD__ARG(kd__moco_args, crop_min, KD_ARG_FLOAT, "0.2", "smallest area fraction of the random-resized crop"),
};

typedef struct {
    kd__head head_q, head_k;
    kd__queue queue;
    int64_t d;
    int in_h;
    kd_ssl_aug_cfg aug;
    kd_tensor *k; /* this step's keys (B, dim), for after_step; graph memory */
} kd__moco_state;

static kd_status kd__moco_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__moco_args *a = kd_method_args(m);
    kd__moco_state *st = kd_method_state(m);
    if (a->K < 1) return kd_error(KD_ERR_INVALID, "moco.K %d must be >= 1", a->K);
    if (!(a->m >= 0 && a->m <= 1)) return kd_error(KD_ERR_INVALID, "moco.m %g must be in [0, 1]", (double)a->m);
    if (!(a->tau > 0)) return kd_error(KD_ERR_INVALID, "moco.tau %g must be > 0", (double)a->tau);
    if (a->dim < 1) return kd_error(KD_ERR_INVALID, "moco.dim %d must be >= 1", a->dim);
    if (a->bn_splits < 1) return kd_error(KD_ERR_INVALID, "moco.bn_splits %d must be >= 1", a->bn_splits);
    if (shp->student.n_feat < 1) return kd_error(KD_ERR_SHAPE, "moco: needs the pooled feature feat[-1]");
    st->d = kd__last_feat_dim(&shp->student);
    st->in_h = shp->in_h;
    kd_param_list *pl = kd_method_params(m);
    kd_rng r;
    kd__method_rng(m, "head", &r);
    KD_TRY(kd__head_init(&st->head_q, pl, "head", (kd__head_kind)a->head, st->d, st->d, a->dim, 1, &r));
    kd__method_rng(m, "head", &r); /* param_k.data.copy_(param_q.data) */
    KD_TRY(kd__head_init(&st->head_k, pl, "head_k", (kd__head_kind)a->head, st->d, st->d, a->dim, 0, &r));
    kd__method_rng(m, "queue", &r);
    return kd__queue_init(&st->queue, pl, a->dim, a->K, &r);
}

static kd_status kd__moco_view_transform(const kd_method *m, int view, kd_transform_cfg *tf) {
    (void)view;
    const kd__moco_args *a = kd_method_args_c(m);
    kd__moco_state *st = kd_method_state((kd_method *)m);
    return kd__ssl_view("moco", &st->aug, st->in_h, 0, 0.0f, a->blur_p, a->crop_min, tf);
}

/* The loss on the query features ctx->s.feat[-1] and the key features
 * ctx->t.feat[-1] (the key encoder's, no gradient). */
static kd_status kd__moco_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__moco_args *a = kd_method_args(m);
    kd__moco_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    st->k = NULL;
    kd_tensor *fq = kd_method_feat(g, &ctx->s, -1, 0), *fk = kd_method_feat(g, &ctx->t, -1, 0);
    KD_TRY(kd_graph_status(g));
    if (!fq || !fk || fq->shape[0] != fk->shape[0])
        return kd_error(KD_ERR_SHAPE, "moco: the query and key features feat[-1] must have one batch size");
    int training = kd_method_training(m);
    kd_tensor *q = kd_l2_normalize(g, kd__head_forward(g, &st->head_q, fq, training), 1e-12f);
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *k = kd_l2_normalize(g, kd__head_forward(g, &st->head_k, fk, training), 1e-12f);
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(kd_graph_status(g));
    kd_tensor *parts[2] = {kd__ssl_rowdot(g, q, k), kd_matmul(g, q, st->queue.q)};
    kd_tensor *logits = kd_scale(g, kd_concat(g, parts, 2, 1), 1.0f / a->tau);
    int64_t B = q->shape[0];
    kd_tensor *labels = kd_graph_zeros(g, KD_I32, 1, &B);
    kd_tensor *l = kd_cross_entropy(g, logits, labels, 0.0f);
    float beta = kd_method_cfg(m)->beta;
    KD_TRY(kd_graph_status(g));
    st->k = k;
    return kd_loss_terms_add(terms, "moco", beta == 1.0f ? l : kd_scale(g, l, beta));
}

/* feat[-1] of `model` on x, its batch in `splits` groups of (nearly) equal
 * size, each a forward of its own (split batch norm); perm (may be NULL)
 * gathers the rows before and scatters them back after. */
static kd_status kd__split_forward(kd_graph *g, kd_model *model, kd_tensor *x, int splits, const int64_t *perm,
                                   kd_tensor **out) {
    const int64_t B = x->shape[0];
    if (splits > B) splits = (int)B;
    x = kd_graph_to_strided(g, x);
    KD_TRY(kd_graph_status(g));
    if (perm) { /* keys only: no gradient flows through the shuffle */
        kd_tensor *y = kd_graph_tensor(g, KD_F32, x->ndim, x->shape);
        KD_TRY(kd_graph_status(g));
        const int64_t row = kd_tensor_numel(x) / B;
        for (int64_t i = 0; i < B; i++)
            memcpy(kd_f32(y) + i * row, kd_f32(x) + perm[i] * row, sizeof(float) * (size_t)row);
        x = y;
    }
    kd_tensor **parts = kd_function_alloc(g, sizeof(kd_tensor *) * (size_t)splits);
    if (!parts) return kd_graph_status(g);
    for (int s = 0; s < splits; s++) {
        int64_t lo = B * s / splits, hi = B * (s + 1) / splits;
        kd_tensor *xs = splits == 1 ? x : kd_slice(g, x, 0, lo, hi);
        kd_model_out o;
        KD_TRY(kd_model_forward(model, g, xs, 0, &o));
        parts[s] = kd_method_feat(g, &o, -1, 0);
        KD_TRY(kd_graph_status(g));
    }
    kd_tensor *f = splits == 1 ? parts[0] : kd_concat(g, parts, splits, 0);
    KD_TRY(kd_graph_status(g));
    if (perm) {
        kd_tensor *y = kd_graph_tensor(g, KD_F32, f->ndim, f->shape);
        KD_TRY(kd_graph_status(g));
        const int64_t row = kd_tensor_numel(f) / B;
        for (int64_t i = 0; i < B; i++)
            memcpy(kd_f32(y) + perm[i] * row, kd_f32(f) + i * row, sizeof(float) * (size_t)row);
        f = y;
    }
    *out = f;
    return KD_OK;
}

static kd_status kd__moco_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__moco_args *a = kd_method_args(m);
    kd__moco_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    if (ctx->batch->n_views != 2 || !ctx->ema)
        return kd_error(KD_ERR_INVALID, "moco needs 2 views of each image and the key encoder (ema_student)");
    const int64_t B = ctx->batch->n;
    memset(&ctx->s, 0, sizeof ctx->s);
    memset(&ctx->t, 0, sizeof ctx->t);
    kd_tensor *fq;
    KD_TRY(kd__split_forward(g, ctx->student, ctx->batch->x[0], a->bn_splits, NULL, &fq));
    /* The momentum update of the key encoder, before the keys (builder.py). */
    KD_TRY(kd_ema_update(kd_model_params(ctx->ema), kd_model_params(ctx->student), a->m));
    kd__head_ema(&st->head_k, &st->head_q, a->m);
    int64_t *perm = kd_function_alloc(g, sizeof(int64_t) * (size_t)B);
    if (!perm) return kd_graph_status(g);
    kd_rng r;
    kd_rng_init(&r, kd_method_cfg(m)->seed, kd_rng_key(0x6d6f636full /* "moco" */, (uint64_t)ctx->global_step));
    for (int64_t i = 0; i < B; i++) perm[i] = i;
    for (int64_t i = B - 1; i > 0; i--) {
        int64_t j = kd_rng_below(&r, (uint32_t)(i + 1)), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    int prev = kd_graph_set_grad_enabled(g, 0);
    int was = kd_model_training(ctx->ema);
    kd_model_set_training(ctx->ema, 1); /* the key encoder normalises with batch statistics */
    kd_tensor *fk = NULL;
    kd_status s = kd__split_forward(g, ctx->ema, ctx->batch->x[1], a->bn_splits, perm, &fk);
    kd_model_set_training(ctx->ema, was);
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(s);
    ctx->s.n_feat = ctx->t.n_feat = 1;
    ctx->s.feat[0] = ctx->s.preact[0] = fq;
    ctx->t.feat[0] = ctx->t.preact[0] = fk;
    return kd_method_loss(m, ctx, terms);
}

static kd_status kd__moco_after_step(kd_method *m, kd_step_ctx *ctx) {
    (void)ctx;
    kd__moco_state *st = kd_method_state(m);
    if (!st->k) return KD_OK;
    kd_tensor *k = st->k;
    st->k = NULL;
    return kd__queue_push(&st->queue, kd_f32(k), k->shape[0]);
}

const kd_method_def kd__method_moco = {
    .name = "moco",
    .summary = "self-supervised pretraining (kd pretrain): MoCo v2, a momentum key encoder (EMA), a queue of "
               "negative keys, InfoNCE at tau 0.2; split batch norm in place of shuffle-BN",
    .paper = "He et al.: Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020; Chen et al.: "
             "Improved Baselines with Momentum Contrastive Learning, 2020",
    .gamma = 0.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 1.0f,
    .teacher = KD_TEACHER_NONE,
    .labels = KD_LABELS_ABSENT,
    .views = 2,
    .min_batch = 2,
    .view_transform = kd__moco_view_transform,
    .ema_student = 1,
    .args = KD__ARGS(kd__moco_arg_table),
    .args_size = sizeof(kd__moco_args),
    .state_size = sizeof(kd__moco_state),
    .setup = kd__moco_setup,
    .step = kd__moco_step,
    .loss = kd__moco_loss,
    .after_step = kd__moco_after_step,
};
