/* SimCLR / SimCLRv2 self-supervised pretraining (Chen et al., ICML 2020;
 * Chen et al., NeurIPS 2020), as google-research/simclr tf2/ runs it
 * (objective.py add_contrastive_loss, model.py ProjectionHead, data_util.py):
 *
 *     two views of each image, one forward of the encoder over both (2B rows,
 *     batch norm over all of them), the 3-layer projection head of v2 on the
 *     pooled feature feat[-1], then NT-Xent at temperature tau:
 *     L = CE_a + CE_b (each a mean over B; SimCLR's 2x convention)
 *
 * No teacher and no labels. The head is the method's module "head.*" (PyTorch
 * nn.Sequential names: head.0 Linear, head.1 BatchNorm1d, ...), saved with
 * the encoder by `kd pretrain` in encoder.safetensors. Defaults follow the
 * CIFAR-10 command of the official README (tau 0.5, colour strength 0.5, no
 * blur), the small-image recipe; ImageNet's are tau 0.1, strength 1.0, blur
 * 0.5. */
#include <string.h>

#include "distill/methods.h"
#include "distill/ssl.h"

typedef struct {
    float tau;
    int head;
    int proj_dim;
    float strength;
    float blur_p;
    float crop_min;
} kd__simclr_args;

static const kd_method_arg kd__simclr_arg_table[] = {
    KD__ARG(kd__simclr_args, tau, KD_ARG_FLOAT, "0.5", "NT-Xent temperature (0.5: CIFAR-10 command; 0.1: ImageNet)"),
    KD__ARG_CHOICE(kd__simclr_args, head, KD__HEAD_KINDS, "simclr",
                   "projection head: simclr (v2, 3 layers Linear+BN) or mlp (Linear-ReLU-Linear, v1/MoCo)"),
    KD__ARG(kd__simclr_args, proj_dim, KD_ARG_INT, "128", "output size of the projection head"),
    KD__ARG(kd__simclr_args, strength, KD_ARG_FLOAT, "0.5", "colour-jitter strength s (0.5: CIFAR-10; 1.0: ImageNet)"),
    KD__ARG(kd__simclr_args, blur_p, KD_ARG_FLOAT, "0", "probability of the Gaussian blur (0: CIFAR-10; 0.5: ImageNet)"),
    KD__ARG(kd__simclr_args, crop_min, KD_ARG_FLOAT, "0.08", "smallest area fraction of the random-resized crop"),
};

typedef struct {
    kd__head head;
    int64_t d;
    int in_h;
    kd_ssl_aug_cfg aug; /* the views' augmentation, set by the view hook */
} kd__simclr_state;

static kd_status kd__simclr_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__simclr_args *a = kd_method_args(m);
    kd__simclr_state *st = kd_method_state(m);
    if (!(a->tau > 0)) return kd_error(KD_ERR_INVALID, "simclr.tau %g must be > 0", (double)a->tau);
    if (a->proj_dim < 1) return kd_error(KD_ERR_INVALID, "simclr.proj_dim %d must be >= 1", a->proj_dim);
    if (!(a->strength >= 0)) return kd_error(KD_ERR_INVALID, "simclr.strength %g must be >= 0", (double)a->strength);
    if (shp->student.n_feat < 1) return kd_error(KD_ERR_SHAPE, "simclr: needs the pooled feature feat[-1]");
    st->d = kd__last_feat_dim(&shp->student);
    st->in_h = shp->in_h;
    kd_rng r;
    kd__method_rng(m, "head", &r);
    return kd__head_init(&st->head, kd_method_params(m), "head", (kd__head_kind)a->head, st->d, st->d, a->proj_dim,
                         1, &r);
}

static kd_status kd__simclr_view_transform(const kd_method *m, int view, kd_transform_cfg *tf) {
    (void)view;
    const kd__simclr_args *a = kd_method_args_c(m);
    kd__simclr_state *st = kd_method_state((kd_method *)m); /* the views' config lives in the method */
    return kd__ssl_view("simclr", &st->aug, st->in_h, 1, a->strength, a->blur_p, a->crop_min, tf);
}

/* NT-Xent of the head on ctx->s.feat[-1], the 2B rows of both views. */
static kd_status kd__simclr_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__simclr_args *a = kd_method_args(m);
    kd__simclr_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    kd_tensor *f = kd_method_feat(g, &ctx->s, -1, 0);
    KD_TRY(kd_graph_status(g));
    if (!f || f->shape[0] < 2 || f->shape[0] % 2)
        return kd_error(KD_ERR_SHAPE, "simclr: feat[-1] must hold both views' rows (2B, ...)");
    if (f->shape[0] < 4)
        return kd_error(KD_ERR_INVALID,
                        "simclr: a batch of %lld image(s) leaves no negative pair; NT-Xent needs at least 2 images "
                        "per batch (set batch_size >= 2)",
                        (long long)(f->shape[0] / 2));
    kd_tensor *z = kd__head_forward(g, &st->head, f, kd_method_training(m));
    kd_tensor *l = kd__nt_xent(g, z, a->tau);
    float beta = kd_method_cfg(m)->beta;
    KD_TRY(kd_graph_status(g));
    return kd_loss_terms_add(terms, "simclr", beta == 1.0f ? l : kd_scale(g, l, beta));
}

static kd_status kd__simclr_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    kd_tensor *x;
    memset(&ctx->s, 0, sizeof ctx->s);
    KD_TRY(kd__ssl_stack_views(ctx->g, ctx->batch, "simclr", &x));
    KD_TRY(kd_model_forward(ctx->student, ctx->g, x, 0, &ctx->s));
    return kd_method_loss(m, ctx, terms);
}

const kd_method_def kd__method_simclr = {
    .name = "simclr",
    .summary = "self-supervised pretraining (kd pretrain): two augmented views, SimCLRv2's 3-layer projection head, "
               "NT-Xent contrastive loss; no labels, no teacher",
    .paper = "Chen et al.: A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020; "
             "Big Self-Supervised Models are Strong Semi-Supervised Learners, NeurIPS 2020",
    .gamma = 0.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 1.0f,
    .teacher = KD_TEACHER_NONE,
    .labels = KD_LABELS_ABSENT,
    .views = 2,
    .min_batch = 2,
    .view_transform = kd__simclr_view_transform,
    .args = KD__ARGS(kd__simclr_arg_table),
    .args_size = sizeof(kd__simclr_args),
    .state_size = sizeof(kd__simclr_state),
    .setup = kd__simclr_setup,
    .step = kd__simclr_step,
    .loss = kd__simclr_loss,
};
