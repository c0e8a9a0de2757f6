/* SimCLRv2's third step: distillation of the fine-tuned big model into a
 * small one on unlabeled data (Chen et al., NeurIPS 2020, section 2 and
 * google-research/simclr tf2/run.py with --train_mode=finetune and a teacher):
 *
 *     L = beta * tau^2 * mean_i CE(softmax(t_i / tau), s_i / tau)      over every image
 *       + labeled_weight * (1/N) sum over the labeled images of CE(s_i, y_i)  (optional)
 *
 * N is the batch size in both terms: the paper's equation 3 sums both over
 * the data, so a labeled image weighs as much in the second as any image in
 * the first, whatever the labeled share (a mean over the batch's few labeled
 * images would weigh each of them B / n_lab times more: 100x with 1% labels).
 *
 * Images without a label (label -1, e.g. outside a `labels` subset) take
 * part in the first term only; the labeled term is off by default (weight 0,
 * as the paper's big-to-small runs), tau 1.0 (big-to-small; 0.1 for
 * self-distillation). Views: the run's crop and flip (the paper distils with
 * crop + flip only). */
#include <string.h>

#include "distill/methods.h"
#include "distill/ssl.h"

typedef struct {
    float tau;
    float labeled_weight;
} kd__simclrv2_args;

static const kd_method_arg kd__simclrv2_arg_table[] = {
    KD__ARG(kd__simclrv2_args, tau, KD_ARG_FLOAT, "1.0",
            "distillation temperature (1.0: big-to-small; 0.1: self-distillation)"),
    KD__ARG(kd__simclrv2_args, labeled_weight, KD_ARG_FLOAT, "0",
            "weight of the cross-entropy summed over the labeled images of the batch, divided by the batch size "
            "(the paper's optional (1 - a) term)"),
};

static kd_status kd__simclrv2_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__simclrv2_args *a = kd_method_args(m);
    (void)shp;
    if (!(a->tau > 0)) return kd_error(KD_ERR_INVALID, "simclrv2.tau %g must be > 0", (double)a->tau);
    return KD_OK;
}

static kd_status kd__simclrv2_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__simclrv2_args *a = kd_method_args(m);
    const kd_distill_cfg *cfg = kd_method_cfg(m);
    kd_graph *g = ctx->g;
    kd_tensor *s = kd_graph_to_strided(g, ctx->s.logits), *t = kd_graph_to_strided(g, ctx->t.logits);
    KD_TRY(kd_graph_status(g));
    if (!s || !t || s->ndim != 2 || t->ndim != 2 || s->shape[0] != t->shape[0] || s->shape[1] != t->shape[1])
        return kd_error(KD_ERR_SHAPE, "simclrv2: the student's and the teacher's logits must have one shape");
    if (cfg->beta != 0) {
        kd_tensor *d = kd__soft_ce(g, kd_scale(g, s, 1.0f / a->tau), t, a->tau);
        KD_TRY(kd_graph_status(g));
        KD_TRY(kd_loss_terms_add(terms, "simclrv2", kd_scale(g, d, cfg->beta * a->tau * a->tau)));
    }
    const kd_tensor *y = ctx->batch->y;
    if (a->labeled_weight != 0 && y) {
        const int64_t N = s->shape[0], C = s->shape[1];
        int64_t n_lab = 0;
        for (int64_t i = 0; i < N; i++) n_lab += ((const int32_t *)y->data)[i] >= 0;
        if (n_lab > 0) { /* -(1/N) sum over labeled rows of log_softmax(s)[i][y_i] */
            kd_tensor *oh = kd_graph_zeros(g, KD_F32, 2, s->shape);
            KD_TRY(kd_graph_status(g));
            for (int64_t i = 0; i < N; i++) {
                int32_t c = ((const int32_t *)y->data)[i];
                if (c >= C)
                    return kd_error(KD_ERR_INVALID, "simclrv2: label %d outside the %lld classes", c, (long long)C);
                if (c >= 0) kd_f32(oh)[i * C + c] = 1.0f;
            }
            kd_tensor *ce = kd_scale(g, kd_sum(g, kd_mul(g, kd_log_softmax(g, s), oh)), -1.0f / (float)N);
            KD_TRY(kd_graph_status(g));
            KD_TRY(kd_loss_terms_add(terms, "ce", kd_scale(g, ce, a->labeled_weight)));
        }
    }
    return KD_OK;
}

const kd_method_def kd__method_simclrv2 = {
    .name = "simclrv2",
    .summary = "SimCLRv2's distillation on unlabeled data: tau^2 CE(softmax(t/tau), s/tau) over every image, plus "
               "an optional CE on the labeled ones (simclrv2.labeled_weight)",
    .paper = "Chen et al.: Big Self-Supervised Models are Strong Semi-Supervised Learners, NeurIPS 2020",
    .gamma = 0.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 1.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_OPTIONAL,
    .views = 1,
    .args = KD__ARGS(kd__simclrv2_arg_table),
    .args_size = sizeof(kd__simclrv2_args),
    .setup = kd__simclrv2_setup,
    .loss = kd__simclrv2_loss,
};
