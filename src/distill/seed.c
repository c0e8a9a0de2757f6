/* SEED: Self-supervised Distillation for Visual Representation (Fang et
 * al., ICLR 2021), as jacobswan1/SEED runs it (seed/builder.py SEED.forward,
 * main.py, tools/opts.py):
 *
 *     z_s = normalise(head_s(student(x)))          (gradient; head Linear-ReLU-Linear)
 *     z_t = normalise(head_t(teacher(x)))          (frozen teacher with its own head, eval)
 *     logits_s = [z_s.z_t, z_s.queue] / tau_s,  p_t = softmax([z_t.z_t, z_t.queue] / tau_t)
 *     L = -(1/B) sum p_t log_softmax(logits_s);  queue <- z_t (FIFO)
 *
 * Student and teacher see the same augmented image (MoCo v2's aug+). No
 * labels. The teacher's head comes from the teacher checkpoint's "head.*"
 * tensors (kd pretrain writes them in encoder.safetensors; seed.teacher_head
 * names its kind), loaded by the prepare hook; it is the method's buffer
 * "teacher_head.*". The student's head "head.*" is trainable. The step is
 * the default one (teacher forward without gradient, student forward) with
 * this loss hook. */
#include <string.h>

#include "distill/methods.h"
#include "distill/ssl.h"

typedef struct {
    int K;
    float tau_s;
    float tau_t;
    int dim;
    int teacher_head;
    float blur_p;
    float crop_min;
} kd__seed_args;

static const kd_method_arg kd__seed_arg_table[] = {
    KD__ARG(kd__seed_args, K, KD_ARG_INT, "65536", "queue length (--queue)"),
    KD__ARG(kd__seed_args, tau_s, KD_ARG_FLOAT, "0.2", "student temperature (--temp)"),
    KD__ARG(kd__seed_args, tau_t, KD_ARG_FLOAT, "0.0001", "teacher temperature (--dist-t)"),
    KD__ARG(kd__seed_args, dim, KD_ARG_INT, "128", "embedding size of both heads"),
    KD__ARG_CHOICE(kd__seed_args, teacher_head, KD__HEAD_KINDS, "simclr",
                   "the kind of the teacher's projection head: simclr (kd pretrain --method simclr) or mlp (MoCo v2)"),
    KD__ARG(kd__seed_args, blur_p, KD_ARG_FLOAT, "0.5", "probability of the Gaussian blur of aug+"),
    KD__ARG(kd__seed_args, crop_min, KD_ARG_FLOAT, "0.2", "smallest area fraction of the random-resized crop"),
};

typedef struct {
    kd__head head_s, head_t;
    kd__queue queue;
    int64_t d_s, d_t;
    int in_h;
    kd_ssl_aug_cfg aug;
    kd_tensor *zt; /* this step's teacher embeddings, for after_step */
} kd__seed_state;

static kd_status kd__seed_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__seed_args *a = kd_method_args(m);
    kd__seed_state *st = kd_method_state(m);
    if (a->K < 1) return kd_error(KD_ERR_INVALID, "seed.K %d must be >= 1", a->K);
    if (!(a->tau_s > 0) || !(a->tau_t > 0))
        return kd_error(KD_ERR_INVALID, "seed.tau_s %g and seed.tau_t %g must be > 0", (double)a->tau_s,
                        (double)a->tau_t);
    if (a->dim < 1) return kd_error(KD_ERR_INVALID, "seed.dim %d must be >= 1", a->dim);
    if (shp->student.n_feat < 1 || shp->teacher.n_feat < 1)
        return kd_error(KD_ERR_SHAPE, "seed: needs the pooled feature feat[-1] of both nets");
    st->d_s = kd__last_feat_dim(&shp->student);
    st->d_t = kd__last_feat_dim(&shp->teacher);
    st->in_h = shp->in_h;
    kd_param_list *pl = kd_method_params(m);
    kd_rng r;
    kd__method_rng(m, "head", &r);
    KD_TRY(kd__head_init(&st->head_s, pl, "head", KD__HEAD_MLP, st->d_s, st->d_s, a->dim, 1, &r));
    kd__method_rng(m, "teacher_head", &r);
    KD_TRY(kd__head_init(&st->head_t, pl, "teacher_head", (kd__head_kind)a->teacher_head, st->d_t, st->d_t, a->dim,
                         0, &r));
    kd__method_rng(m, "queue", &r);
    return kd__queue_init(&st->queue, pl, a->dim, a->K, &r);
}

static kd_status kd__seed_prepare(kd_method *m, const kd_prepare_ctx *ctx) {
    kd__seed_state *st = kd_method_state(m);
    if (!ctx->teacher_ckpt)
        return kd_error(KD_ERR_INVALID, "seed: needs the teacher checkpoint (teacher_ckpt) with its projection head");
    return kd__head_load(&st->head_t, kd_method_params(m), "teacher_head", ctx->teacher_ckpt, "seed",
                         "seed.teacher_head");
}

static kd_status kd__seed_view_transform(const kd_method *m, int view, kd_transform_cfg *tf) {
    (void)view;
    const kd__seed_args *a = kd_method_args_c(m);
    kd__seed_state *st = kd_method_state((kd_method *)m);
    return kd__ssl_view("seed", &st->aug, st->in_h, 0, 0.0f, a->blur_p, a->crop_min, tf);
}

static kd_status kd__seed_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__seed_args *a = kd_method_args(m);
    kd__seed_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    st->zt = NULL;
    kd_tensor *fs = kd_method_feat(g, &ctx->s, -1, 0), *ft = kd_method_feat(g, &ctx->t, -1, 0);
    KD_TRY(kd_graph_status(g));
    if (!fs || !ft || fs->shape[0] != ft->shape[0])
        return kd_error(KD_ERR_SHAPE, "seed: the student's and the teacher's feat[-1] must have one batch size");
    kd_tensor *zs = kd_l2_normalize(g, kd__head_forward(g, &st->head_s, fs, kd_method_training(m)), 1e-12f);
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *zt = kd_l2_normalize(g, kd__head_forward(g, &st->head_t, ft, 0), 1e-12f);
    kd_tensor *pt[2] = {kd__ssl_rowdot(g, zt, zt), kd_matmul(g, zt, st->queue.q)};
    kd_tensor *lt = kd_concat(g, pt, 2, 1);
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(kd_graph_status(g));
    kd_tensor *ps[2] = {kd__ssl_rowdot(g, zs, zt), kd_matmul(g, zs, st->queue.q)};
    kd_tensor *ls = kd_scale(g, kd_concat(g, ps, 2, 1), 1.0f / a->tau_s);
    kd_tensor *l = kd__soft_ce(g, ls, lt, a->tau_t);
    float beta = kd_method_cfg(m)->beta;
    KD_TRY(kd_graph_status(g));
    st->zt = zt;
    return kd_loss_terms_add(terms, "seed", beta == 1.0f ? l : kd_scale(g, l, beta));
}

static kd_status kd__seed_after_step(kd_method *m, kd_step_ctx *ctx) {
    (void)ctx;
    kd__seed_state *st = kd_method_state(m);
    if (!st->zt) return KD_OK;
    kd_tensor *zt = st->zt;
    st->zt = NULL;
    return kd__queue_push(&st->queue, kd_f32(zt), zt->shape[0]);
}

const kd_method_def kd__method_seed = {
    .name = "seed",
    .summary = "label-free distillation: the student's embedding mimics the self-supervised teacher's similarity "
               "distribution over a queue of teacher embeddings (tau_s 0.2, tau_t 1e-4)",
    .paper = "Fang et al.: SEED: Self-supervised Distillation for Visual Representation, ICLR 2021",
    .gamma = 0.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 1.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_ABSENT,
    .views = 1,
    .view_transform = kd__seed_view_transform,
    .args = KD__ARGS(kd__seed_arg_table),
    .args_size = sizeof(kd__seed_args),
    .state_size = sizeof(kd__seed_state),
    .setup = kd__seed_setup,
    .loss = kd__seed_loss,
    .after_step = kd__seed_after_step,
    .prepare = kd__seed_prepare,
};
