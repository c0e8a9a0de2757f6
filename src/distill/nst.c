/* NST: Neuron Selectivity Transfer (Huang & Wang, "Like What You Like:
 * Knowledge Distill via Neuron Selectivity Transfer", arXiv 2017) as
 * RepDistiller runs it (distiller_zoo/NST.py NSTLoss on the pairs of
 * feat[1:-1], zipped so that the shorter list decides the count, summed in
 * helper/loops.py; beta 50 in scripts/run_cifar_distill.sh).
 *
 * Per pair: the map with the larger height is adaptive-average-pooled to the
 * other's (H, H) (kd__map_pairs_term, shared with AT and VID); each channel's
 * map, flattened to H*W, is L2-normalised (F.normalize, eps 1e-12); with the
 * polynomial kernel k(a, b) = (a.b)^2 over the channels of one sample,
 *     MMD^2 = mean k(t, t) (detached) + mean k(s, s) - 2 mean k(s, t)
 * where each mean runs over (N, C, C') (full_loss, the official default;
 * nst.full_loss=0 drops the constant teacher term as the official switch
 * does). The term is the sum over the pairs. No module.
 *
 * The kernel means are one kd_function: per-sample Gram matrices from the
 * backend's gemm, their squares summed in double. The teacher maps arrive
 * detached (helper/loops.py) and get no gradient. */
#include "distill/methods.h"

/* F.normalize's eps. */
#define NST_NORMALIZE_EPS 1e-12f

typedef struct {
    int full_loss; /* include the (constant) teacher-teacher kernel mean */
} nst_args;

static const kd_method_arg nst_arg_table[] = {
    KD__ARG(nst_args, full_loss, KD_ARG_BOOL, "1",
            "add the detached mean k(t, t), as the official full_loss (no effect on gradients)"),
};

typedef struct {
    int n_pairs; /* pairs of feat[1:-1] */
} nst_state;

/* ------------------------------------------------ polynomial-kernel MMD */

/* in: s (N, Cs, L), t (N, Ct, L), rows already normalised -> 0-d
 *     [full] mean k(t, t) + mean k(s, s) - 2 mean k(s, t),  k(a, b) = (a.b)^2.
 * Per sample the dot products are the Gram matrices G = s s^T (Cs, Cs) and
 * X = t s^T (Ct, Cs), from the backend's gemm; their squares are summed in
 * double. The forward keeps G and X for the backward:
 *     d/ds = 4 / (N Cs^2) G s - 4 / (N Ct Cs) X^T t. */
typedef struct {
    int full;
} nst_mmd_params;

typedef struct {
    float *G; /* (N, Cs, Cs) */
    float *X; /* (N, Ct, Cs) */
} nst_mmd_saved;

static double nst_sumsq(const float *a, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * a[i];
    return s;
}

static kd_status nst_mmd_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                             void **saved) {
    KD_TRY(kd__need_contiguous("nst: kernel MMD", in, n_in));
    const nst_mmd_params *p = params;
    kd_backend *be = kd_graph_backend(g);
    int64_t N = in[0]->shape[0], Cs = in[0]->shape[1], Ct = in[1]->shape[1], L = in[0]->shape[2];
    const float *s = kd_f32(in[0]), *t = kd_f32(in[1]);
    nst_mmd_saved *sv = kd_function_alloc(g, sizeof *sv);
    float *buf = kd_function_alloc(g, (size_t)(N * Cs * Cs + N * Ct * Cs + (p->full ? Ct * Ct : 0)) * sizeof(float));
    if (!sv || !buf) return kd_graph_status(g);
    sv->G = buf;
    sv->X = buf + N * Cs * Cs;
    float *tt = sv->X + N * Ct * Cs; /* (Ct, Ct) scratch */
    double ktt = 0, kss = 0, kst = 0;
    for (int64_t n = 0; n < N; n++) {
        const float *sn = s + n * Cs * L, *tn = t + n * Ct * L;
        float *Gn = sv->G + n * Cs * Cs, *Xn = sv->X + n * Ct * Cs;
        KD_TRY(be->gemm(be, 0, 1, Cs, Cs, L, 1.0f, sn, L, sn, L, 0.0f, Gn, Cs));
        KD_TRY(be->gemm(be, 0, 1, Ct, Cs, L, 1.0f, tn, L, sn, L, 0.0f, Xn, Cs));
        kss += nst_sumsq(Gn, Cs * Cs);
        kst += nst_sumsq(Xn, Ct * Cs);
        if (p->full) {
            KD_TRY(be->gemm(be, 0, 1, Ct, Ct, L, 1.0f, tn, L, tn, L, 0.0f, tt, Ct));
            ktt += nst_sumsq(tt, Ct * Ct);
        }
    }
    kd_f32(out)[0] =
        (float)(ktt / (double)(N * Ct * Ct) + kss / (double)(N * Cs * Cs) - 2 * kst / (double)(N * Ct * Cs));
    *saved = sv;
    return KD_OK;
}

static kd_status nst_mmd_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                             const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)params, (void)n_in, (void)out;
    if (!gin[0]) return KD_OK; /* the teacher maps arrive detached */
    const nst_mmd_saved *sv = saved;
    kd_backend *be = kd_graph_backend(g);
    int64_t N = in[0]->shape[0], Cs = in[0]->shape[1], Ct = in[1]->shape[1], L = in[0]->shape[2];
    const float *s = kd_f32(in[0]), *t = kd_f32(in[1]);
    float *gs = kd_f32(gin[0]);
    double gy = kd_f32(gout)[0];
    float css = (float)(4.0 * gy / (double)(N * Cs * Cs)), cst = (float)(-4.0 * gy / (double)(N * Ct * Cs));
    for (int64_t n = 0; n < N; n++) {
        const float *sn = s + n * Cs * L, *tn = t + n * Ct * L;
        float *gn = gs + n * Cs * L;
        KD_TRY(be->gemm(be, 0, 0, Cs, L, Cs, css, sv->G + n * Cs * Cs, Cs, sn, L, 1.0f, gn, L));
        KD_TRY(be->gemm(be, 1, 0, Cs, L, Ct, cst, sv->X + n * Ct * Cs, Cs, tn, L, 1.0f, gn, L));
    }
    return KD_OK;
}

static const kd_function nst_mmd_fn = {"nst_mmd", nst_mmd_fwd, nst_mmd_bwd};

/* ------------------------------------------------ the method */

static kd_status nst_setup(kd_method *m, const kd_method_shapes *shp) {
    nst_state *st = kd_method_state(m);
    return kd__map_pairs(m, shp, &st->n_pairs);
}

/* (N, C, H, W) -> (N, C, H*W) with L2-normalised rows. */
static kd_tensor *nst_rows(kd_graph *g, kd_tensor *x) {
    int64_t shape[3] = {x->shape[0], x->shape[1], x->shape[2] * x->shape[3]};
    return kd_l2_normalize(g, kd_reshape(g, x, 3, shape), NST_NORMALIZE_EPS);
}

/* One pair's kernel MMD. */
static kd_status nst_pair_loss(kd_method *m, kd_step_ctx *ctx, int i, kd_tensor *x, kd_tensor *y, kd_tensor **loss) {
    (void)i;
    const nst_args *a = kd_method_args(m);
    nst_mmd_params p = {a->full_loss};
    kd_tensor *in[2] = {nst_rows(ctx->g, x), nst_rows(ctx->g, y)};
    *loss = kd_function_apply(ctx->g, &nst_mmd_fn, &p, sizeof p, 2, in, 0, NULL);
    return kd_graph_status(ctx->g);
}

static kd_status nst_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const nst_state *st = kd_method_state(m);
    return kd__map_pairs_term(m, ctx, st->n_pairs, nst_pair_loss, out);
}

const kd_method_def kd__method_nst = {
    .name = "nst",
    .summary = "NST: polynomial-kernel MMD between channel-normalised maps of feat[1:-1] pairs",
    .paper = "Huang, Wang: Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, arXiv 2017",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 50.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(nst_arg_table),
    .args_size = sizeof(nst_args),
    .state_size = sizeof(nst_state),
    .setup = nst_setup,
    .term = nst_term,
};
