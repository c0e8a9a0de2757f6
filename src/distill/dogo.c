/* DoGo: Distill on the Go (Bhat, Arani, Zonooz, 2021), as NeurAI-Lab/DoGo
 * runs it (config/template.yaml, criterion/kl.py, models/simclr.py): two
 * peers learn together from scratch, each with its own self-supervised loss,
 * and each mimics the other's similarity distribution between the two views:
 *
 *     z_k = normalise(head_k(peer_k(view))),  S_k = z_k(view 1) z_k(view 2)^T / tau_kl   (B x B)
 *     P_k = softmax over each row of S_k
 *     L = NT-Xent(z_1; tau) + w_1 KL(P_2 || P_1) + NT-Xent(z_2; tau) + w_2 KL(P_1 || P_2)
 *
 * each KL with the other peer's distribution detached and averaged over all
 * B^2 elements, w_1 = 100 and w_2 = 1. Peer 1 is the student; peer 2 is a
 * whole model the method owns ("peer.*", architecture dogo.peer, the
 * student's by default), trained in the same step: the two losses read
 * disjoint parameters, so one backward over their sum gives each peer the
 * gradient of its own loss, and the optimiser's per-parameter state makes
 * one optimiser over both the paper's two. Heads: Linear(d, 512, no bias) -
 * BN - ReLU - Linear(512, 128) ("head.*" and "peer_head.*"). Both peers are
 * in the run's last.safetensors; encoder.safetensors holds peer 1 with its
 * head. No labels, no teacher. */
#include <math.h>
#include <string.h>

#include "distill/methods.h"
#include "distill/ssl.h"

typedef struct {
    float tau;
    float tau_kl;
    float w1;
    float w2;
    int hidden;
    int dim;
    char peer[KD_METHOD_ARG_STR];
    float strength;
    float blur_p;
    float crop_min;
} kd__dogo_args;

static const kd_method_arg kd__dogo_arg_table[] = {
    KD__ARG(kd__dogo_args, tau, KD_ARG_FLOAT, "0.5", "NT-Xent temperature of each peer's SimCLR loss"),
    KD__ARG(kd__dogo_args, tau_kl, KD_ARG_FLOAT, "0.1", "temperature of the view-to-view similarities S"),
    KD__ARG(kd__dogo_args, w1, KD_ARG_FLOAT, "100", "weight of KL(P_2 || P_1), the student's (peer 1's) mimicry"),
    KD__ARG(kd__dogo_args, w2, KD_ARG_FLOAT, "1", "weight of KL(P_1 || P_2), peer 2's mimicry"),
    KD__ARG(kd__dogo_args, hidden, KD_ARG_INT, "512", "hidden width of both projection heads"),
    KD__ARG(kd__dogo_args, dim, KD_ARG_INT, "128", "output size of both projection heads"),
    KD__ARG(kd__dogo_args, peer, KD_ARG_STRING, "", "architecture of peer 2 (empty: the student's)"),
    KD__ARG(kd__dogo_args, strength, KD_ARG_FLOAT, "1.0", "colour-jitter strength of the SimCLR views"),
    KD__ARG(kd__dogo_args, blur_p, KD_ARG_FLOAT, "0", "probability of the Gaussian blur"),
    KD__ARG(kd__dogo_args, crop_min, KD_ARG_FLOAT, "0.08", "smallest area fraction of the random-resized crop"),
};

typedef struct {
    kd_model *peer;
    kd__head head1, head2;
    int in_h;
    kd_ssl_aug_cfg aug;
} kd__dogo_state;

static kd_status kd__dogo_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__dogo_args *a = kd_method_args(m);
    kd__dogo_state *st = kd_method_state(m);
    if (!(a->tau > 0) || !(a->tau_kl > 0))
        return kd_error(KD_ERR_INVALID, "dogo.tau %g and dogo.tau_kl %g must be > 0", (double)a->tau, (double)a->tau_kl);
    if (a->hidden < 1 || a->dim < 1)
        return kd_error(KD_ERR_INVALID, "dogo.hidden %d and dogo.dim %d must be >= 1", a->hidden, a->dim);
    if (shp->student.n_feat < 1) return kd_error(KD_ERR_SHAPE, "dogo: needs the pooled feature feat[-1]");
    const char *arch = a->peer[0] ? a->peer : shp->student_arch;
    if (!arch) return kd_error(KD_ERR_INVALID, "dogo: set dogo.peer, the architecture of peer 2");
    st->in_h = shp->in_h;
    kd_rng r;
    kd_model_cfg mc = {.in_channels = shp->in_channels, .num_classes = shp->num_classes,
                       .seed = kd_rng_key(kd_method_cfg(m)->seed, 0x646f676full)};
    kd_status s = kd_model_create(arch, &mc, &st->peer);
    if (s != KD_OK) return kd_error(s == KD_ERR_NOT_FOUND ? KD_ERR_INVALID : s, "dogo.peer: %s", kd_last_error());
    kd_param_list *pl = kd_method_params(m);
    KD_TRY(kd_params_borrow(pl, "peer", kd_model_params(st->peer)));
    /* The peer's feature size, from a probe forward like the student's. */
    kd_graph *g = NULL;
    KD_TRY(kd_graph_init(&g, kd_backend_default()));
    int64_t xs[4] = {2, shp->in_channels, shp->in_h, shp->in_w};
    kd_tensor *x = kd_graph_zeros(g, KD_F32, 4, xs);
    kd_model_out o;
    int prev = kd_graph_set_grad_enabled(g, 0);
    s = x ? kd_model_forward(st->peer, g, x, 0, &o) : kd_graph_status(g);
    int64_t d2 = 0;
    if (s == KD_OK) {
        kd_tensor *f = o.feat[o.n_feat - 1];
        d2 = kd_tensor_numel(f) / f->shape[0];
    }
    kd_graph_set_grad_enabled(g, prev);
    kd_graph_free(g);
    KD_TRY(s);
    kd__method_rng(m, "head", &r);
    KD_TRY(kd__head_init(&st->head1, pl, "head", KD__HEAD_DOGO, kd__last_feat_dim(&shp->student), a->hidden, a->dim,
                         1, &r));
    kd__method_rng(m, "peer_head", &r);
    return kd__head_init(&st->head2, pl, "peer_head", KD__HEAD_DOGO, d2, a->hidden, a->dim, 1, &r);
}

static void kd__dogo_free(kd_method *m) {
    kd__dogo_state *st = kd_method_state(m);
    kd_model_free(st->peer);
    st->peer = NULL;
}

static kd_status kd__dogo_view_transform(const kd_method *m, int view, kd_transform_cfg *tf) {
    (void)view;
    const kd__dogo_args *a = kd_method_args_c(m);
    kd__dogo_state *st = kd_method_state((kd_method *)m);
    return kd__ssl_view("dogo", &st->aug, st->in_h, 1, a->strength, a->blur_p, a->crop_min, tf);
}

/* P = softmax(S) of one peer's normalised z (2B, D): S = z_a z_b^T / tau. */
static kd_tensor *kd__dogo_sim(kd_graph *g, kd_tensor *z, float tau) {
    const int64_t B = z->shape[0] / 2;
    return kd_scale(g, kd_linear(g, kd_slice(g, z, 0, 0, B), kd_slice(g, z, 0, B, 2 * B), NULL), 1.0f / tau);
}

/* KL(softmax(s_t) || softmax(s)) averaged over all elements, s_t detached. */
static kd_tensor *kd__dogo_kl(kd_graph *g, kd_tensor *s, kd_tensor *s_t) {
    int prev = kd_graph_set_grad_enabled(g, 0);
    kd_tensor *p = kd_softmax(g, s_t), *lp = kd_log_softmax(g, s_t);
    kd_tensor *c = kd_sum(g, kd_mul(g, p, lp)); /* sum p log p: no gradient */
    kd_graph_set_grad_enabled(g, prev);
    if (!p || !c) return NULL;
    float n = (float)kd_tensor_numel(s);
    kd_tensor *cross = kd_sum(g, kd_mul(g, p, kd_log_softmax(g, s)));
    return kd_scale(g, kd_add(g, kd_scale(g, cross, -1.0f), c), 1.0f / n);
}

/* The loss on the peers' pooled features of both views: ctx->s.feat[-1]
 * (student, 2B rows) and ctx->t.feat[-1] (peer 2, 2B rows). */
static kd_status kd__dogo_loss(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    const kd__dogo_args *a = kd_method_args(m);
    kd__dogo_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    kd_tensor *f1 = kd_method_feat(g, &ctx->s, -1, 0), *f2 = kd_method_feat(g, &ctx->t, -1, 0);
    KD_TRY(kd_graph_status(g));
    if (!f1 || !f2 || f1->shape[0] != f2->shape[0] || f1->shape[0] % 2)
        return kd_error(KD_ERR_SHAPE, "dogo: both peers' feat[-1] must hold the 2B rows of both views");
    if (f1->shape[0] < 4)
        return kd_error(KD_ERR_INVALID, "dogo: NT-Xent needs at least 2 images per batch");
    int tr = kd_method_training(m);
    kd_tensor *z1 = kd_l2_normalize(g, kd__head_forward(g, &st->head1, f1, tr), 1e-12f);
    kd_tensor *z2 = kd_l2_normalize(g, kd__head_forward(g, &st->head2, f2, tr), 1e-12f);
    KD_TRY(kd_graph_status(g));
    kd_tensor *s1 = kd__dogo_sim(g, z1, a->tau_kl), *s2 = kd__dogo_sim(g, z2, a->tau_kl);
    kd_tensor *ssl1 = kd__nt_xent(g, z1, a->tau), *ssl2 = kd__nt_xent(g, z2, a->tau);
    kd_tensor *kl1 = kd__dogo_kl(g, s1, s2), *kl2 = kd__dogo_kl(g, s2, s1);
    KD_TRY(kd_graph_status(g));
    float beta = kd_method_cfg(m)->beta;
    KD_TRY(kd_loss_terms_add(terms, "ssl1", kd_scale(g, ssl1, beta)));
    KD_TRY(kd_loss_terms_add(terms, "kl1", kd_scale(g, kl1, beta * a->w1)));
    KD_TRY(kd_loss_terms_add(terms, "ssl2", kd_scale(g, ssl2, beta)));
    KD_TRY(kd_loss_terms_add(terms, "kl2", kd_scale(g, kl2, beta * a->w2)));
    return kd_graph_status(g);
}

static kd_status kd__dogo_step(kd_method *m, kd_step_ctx *ctx, kd_loss_terms *terms) {
    kd__dogo_state *st = kd_method_state(m);
    kd_graph *g = ctx->g;
    kd_tensor *x;
    memset(&ctx->s, 0, sizeof ctx->s);
    memset(&ctx->t, 0, sizeof ctx->t);
    KD_TRY(kd__ssl_stack_views(g, ctx->batch, "dogo", &x));
    KD_TRY(kd_model_forward(ctx->student, g, x, 0, &ctx->s));
    kd_model_set_training(st->peer, kd_method_training(m));
    KD_TRY(kd_model_forward(st->peer, g, x, 0, &ctx->t));
    return kd_method_loss(m, ctx, terms);
}

const kd_method_def kd__method_dogo = {
    .name = "dogo",
    .summary = "two peers trained together from scratch without labels: each its own SimCLR loss plus the KL to the "
               "other's view-to-view similarity distribution (weights 100 and 1)",
    .paper = "Bhat, Arani, Zonooz: Distill on the Go: Online knowledge distillation in self-supervised learning, "
             "CVPR Workshops 2021",
    .gamma = 0.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 1.0f,
    .teacher = KD_TEACHER_NONE,
    .labels = KD_LABELS_ABSENT,
    .views = 2,
    .min_batch = 2,
    .view_transform = kd__dogo_view_transform,
    .args = KD__ARGS(kd__dogo_arg_table),
    .args_size = sizeof(kd__dogo_args),
    .state_size = sizeof(kd__dogo_state),
    .setup = kd__dogo_setup,
    .step = kd__dogo_step,
    .loss = kd__dogo_loss,
    .free = kd__dogo_free,
};
