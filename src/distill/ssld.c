/* SSLD: Simple Semi-supervised Label Distillation (PaddleClas, ppcls/loss/
 * dmlloss.py DMLLoss and distillationloss.py; docs .../ssld.md):
 *
 *     p = softmax(logits) (no temperature),  kl(a, b) = sum_c b log((b + 1e-12) / (a + 1e-12))
 *     L = mean over the batch of (kl(p_s, p_t) + kl(p_t, p_s)) / 2
 *
 * with weight 1 and no ground-truth term, so labels are optional: SSLD
 * distils on the labeled images and unlabeled ones the teacher selected. The
 * teacher's parameters are frozen, but by default it normalises with batch
 * statistics (PaddleClas keeps it in train mode: its docs report better
 * students); ssld.teacher_bn=eval uses its running statistics. */
#include <string.h>

#include "distill/methods.h"

enum { KD__SSLD_BN_TRAIN = 0, KD__SSLD_BN_EVAL };

typedef struct {
    int teacher_bn;
} kd__ssld_args;

static const kd_method_arg kd__ssld_arg_table[] = {
    KD__ARG_CHOICE(kd__ssld_args, teacher_bn, "train|eval", "train",
                   "the frozen teacher's batch norm: batch statistics (train, PaddleClas) or running ones (eval)"),
};

/* Row-wise softmax + 1e-12, and its log. */
static kd_tensor *kd__ssld_log_eps(kd_graph *g, kd_tensor *p) {
    kd_tensor *e = kd_graph_tensor(g, KD_F32, 2, p->shape);
    if (!e) return NULL;
    for (int64_t i = 0; i < kd_tensor_numel(e); i++) kd_f32(e)[i] = 1e-12f;
    return kd_log(g, kd_add(g, p, e));
}

static kd_status kd__ssld_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    kd_graph *g = ctx->g;
    kd_tensor *s = kd_graph_to_strided(g, ctx->s.logits), *t = kd_graph_to_strided(g, ctx->t.logits);
    KD_TRY(kd_graph_status(g));
    if (!s || !t || s->ndim != 2 || t->ndim != 2 || s->shape[0] != t->shape[0] || s->shape[1] != t->shape[1])
        return kd_error(KD_ERR_SHAPE, "ssld: the student's and the teacher's logits must have one shape");
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *pt = kd_softmax(g, t);
    kd_tensor *lt = pt ? kd__ssld_log_eps(g, pt) : NULL;
    kd_graph_set_grad_enabled(g, prev);
    kd_tensor *ps = kd_softmax(g, s);
    kd_tensor *ls = ps ? kd__ssld_log_eps(g, ps) : NULL;
    KD_TRY(kd_graph_status(g));
    /* kl(s, t) + kl(t, s) = sum (p_t - p_s)(log(p_t + e) - log(p_s + e)) */
    kd_tensor *d = kd_add(g, pt, kd_scale(g, ps, -1.0f));
    kd_tensor *l = kd_add(g, lt, kd_scale(g, ls, -1.0f));
    kd_tensor *sum = kd_sum(g, kd_mul(g, d, l));
    float beta = kd_method_cfg(m)->beta;
    kd_tensor *loss = kd_scale(g, sum, beta * 0.5f / (float)s->shape[0]);
    KD_TRY(kd_graph_status(g));
    return kd_loss_terms_add(terms, "ssld", loss);
}

static kd_status kd__ssld_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__ssld_args *a = kd_method_args(m);
    kd_graph *g = ctx->g;
    if (!ctx->teacher) return kd_error(KD_ERR_INVALID, "ssld needs a teacher");
    memset(&ctx->s, 0, sizeof ctx->s);
    memset(&ctx->t, 0, sizeof ctx->t);
    kd_tensor *x = ctx->batch->x[0];
    int prev = kd_graph_set_grad_enabled(g, 0);
    int was = kd_model_training(ctx->teacher);
    kd_model_set_training(ctx->teacher, a->teacher_bn == KD__SSLD_BN_TRAIN && kd_method_training(m));
    kd_status s = kd_model_forward(ctx->teacher, g, x, 0, &ctx->t);
    kd_model_set_training(ctx->teacher, was);
    kd_graph_set_grad_enabled(g, prev);
    KD_TRY(s);
    KD_TRY(kd_model_forward(ctx->student, g, x, 0, &ctx->s));
    return kd_method_loss(m, ctx, terms);
}

const kd_method_def kd__method_ssld = {
    .name = "ssld",
    .summary = "label distillation on labeled and unlabeled images: symmetric KL / 2 between the softmaxes (no "
               "temperature, no ground-truth term); the teacher normalises with batch statistics by default",
    .paper = "Cui et al. (PaddleClas): Beyond Self-Supervision: A Simple Yet Effective Network Distillation "
             "Alternative to Improve Backbones (SSLD), 2021",
    .gamma = 0.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 1.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_OPTIONAL,
    .views = 1,
    .args = KD__ARGS(kd__ssld_arg_table),
    .args_size = sizeof(kd__ssld_args),
    .step = kd__ssld_step,
    .loss = kd__ssld_loss,
};
