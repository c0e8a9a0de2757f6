/* PKT: Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018) as
 * RepDistiller runs it (distiller_zoo/PKT.py cosine_similarity_loss, eps 1e-7,
 * on the pooled embedding feat[-1]; helper/loops.py; beta 30000 in
 * scripts/run_cifar_distill.sh).
 *
 * Rows are divided by (their L2 norm + eps), NaN entries set to 0; the cosine
 * similarities are mapped to [0, 1] by (c + 1) / 2 and each row is normalised
 * to sum 1 (P_s for the student, P_t for the teacher); the term is
 *     mean over (N, N) of P_t * log((P_t + eps) / (P_s + eps)).
 * The teacher features arrive detached (helper/loops.py) and get no gradient.
 * A feature map chosen through pkt.feat is flattened to (N, -1) first (kd's
 * extension; the official code reads the pooled embedding only).
 *
 * One kd_function in double precision. Where the official code's gradient is
 * NaN (a student row of zeros: sqrt's derivative at 0), this one gives 0. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "distill/methods.h"

typedef struct {
    float eps; /* added to the norms and inside the log */
    int feat;  /* feature index (negative from the end) */
} pkt_args;

static const kd_method_arg pkt_arg_table[] = {
    KD__ARG(pkt_args, eps, KD_ARG_FLOAT, "1e-7", "added to row norms and to both probabilities in the log"),
    KD__ARG(pkt_args, feat, KD_ARG_INT, "-1", "feature index (-1: pooled embedding), flattened to (N, -1)"),
};

typedef struct {
    double eps;
} pkt_params;

typedef struct {
    int64_t N, D;
    double *x;    /* (N, D) normalised student rows (NaN entries 0) */
    double *norm; /* (N) student row norms */
    double *s;    /* (N, N) student (c + 1) / 2 */
    double *rs;   /* (N) its row sums */
    double *pt;   /* (N, N) teacher probabilities */
} pkt_saved;

/* Rows of v (N, D) divided by (norm + eps) into x, NaN entries set to 0. */
static void pkt_normalize(const float *v, int64_t N, int64_t D, double eps, double *x, double *norm) {
    for (int64_t i = 0; i < N; i++) {
        double s = 0;
        for (int64_t d = 0; d < D; d++) s += (double)v[i * D + d] * v[i * D + d];
        double nr = sqrt(s);
        if (norm) norm[i] = nr;
        for (int64_t d = 0; d < D; d++) {
            double y = (double)v[i * D + d] / (nr + eps);
            x[i * D + d] = y != y ? 0.0 : y;
        }
    }
}

/* S = (x x^T + 1) / 2 and its row sums. */
static void pkt_similarity(const double *x, int64_t N, int64_t D, double *S, double *rs) {
#pragma omp parallel for schedule(static) if (N * N * D >= 32768)
    for (int64_t i = 0; i < N; i++) {
        double r = 0;
        for (int64_t j = 0; j < N; j++) {
            double c = 0;
            for (int64_t d = 0; d < D; d++) c += x[i * D + d] * x[j * D + d];
            S[i * N + j] = (c + 1.0) / 2.0;
            r += S[i * N + j];
        }
        rs[i] = r;
    }
}

static kd_status pkt_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                         void **saved) {
    (void)n_in;
    const pkt_params *p = params;
    KD_TRY(kd__need_contiguous("pkt", in, 2));
    int64_t N = in[0]->shape[0], Ds = kd_tensor_numel(in[0]) / N, Dt = kd_tensor_numel(in[1]) / N;
    pkt_saved *sv = kd_function_alloc(g, sizeof *sv);
    double *xs = kd_function_alloc(g, (size_t)(N * Ds + N * Dt + 2 * N * N + 3 * N) * sizeof(double));
    if (!sv || !xs) return kd_graph_status(g);
    double *xt = xs + N * Ds, *ss = xt + N * Dt, *pt = ss + N * N, *norm = pt + N * N, *rs = norm + N,
           *rt = rs + N;
    pkt_normalize(kd_f32(in[0]), N, Ds, p->eps, xs, norm);
    pkt_normalize(kd_f32(in[1]), N, Dt, p->eps, xt, NULL);
    pkt_similarity(xs, N, Ds, ss, rs);
    pkt_similarity(xt, N, Dt, pt, rt);
    double acc = 0;
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) {
            double t = pt[i * N + j] /= rt[i], ps = ss[i * N + j] / rs[i];
            acc += t * log((t + p->eps) / (ps + p->eps));
        }
    kd_f32(out)[0] = (float)(acc / (double)(N * N));
    *sv = (pkt_saved){N, Ds, xs, norm, ss, rs, pt};
    *saved = sv;
    return KD_OK;
}

static kd_status pkt_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                         const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)n_in, (void)out;
    if (!gin[0]) return KD_OK; /* the teacher side arrives detached */
    const pkt_params *p = params;
    const pkt_saved *sv = saved;
    int64_t N = sv->N, D = sv->D;
    double scale = (double)kd_f32(gout)[0] / (double)(N * N);
    double *dS = kd_function_alloc(g, (size_t)(N * N + N * D) * sizeof(double));
    if (!dS) return kd_graph_status(g);
    double *dX = dS + N * N;
    /* P_s = S / rowsum(S): dL/dP_s = -P_t / (P_s + eps) / N^2, then through the row normalisation. */
    for (int64_t i = 0; i < N; i++) {
        double r = sv->rs[i], dot = 0;
        for (int64_t j = 0; j < N; j++) {
            double ps = sv->s[i * N + j] / r, gp = -scale * sv->pt[i * N + j] / (ps + p->eps);
            dS[i * N + j] = gp / r;
            dot += gp * sv->s[i * N + j];
        }
        for (int64_t j = 0; j < N; j++) dS[i * N + j] -= dot / (r * r);
    }
    /* S = (X X^T + 1) / 2: dX_i = 0.5 sum_j (dS_ij + dS_ji) X_j. */
    const double *X = sv->x;
#pragma omp parallel for schedule(static) if (N * N * D >= 32768)
    for (int64_t i = 0; i < N; i++)
        for (int64_t d = 0; d < D; d++) {
            double s = 0;
            for (int64_t j = 0; j < N; j++) s += (dS[i * N + j] + dS[j * N + i]) * X[j * D + d];
            dX[i * D + d] = 0.5 * s;
        }
    /* X = v / (|v| + eps), entries set to 0 (NaN) pass no gradient. */
    const float *v = kd_f32(in[0]);
    float *gv = kd_f32(gin[0]);
    for (int64_t i = 0; i < N; i++) {
        double nr = sv->norm[i], den = nr + p->eps, dot = 0;
        int nan_row = !(nr == nr) || isinf(nr);
        for (int64_t d = 0; d < D; d++) {
            double y = (double)v[i * D + d] / den;
            if (y != y) dX[i * D + d] = 0;
            dot += dX[i * D + d] * v[i * D + d];
        }
        if (nan_row) continue;
        for (int64_t d = 0; d < D; d++) {
            double gx = dX[i * D + d] / den;
            if (nr > 0) gx -= dot * v[i * D + d] / (den * den * nr);
            gv[i * D + d] += (float)gx;
        }
    }
    return KD_OK;
}

static const kd_function pkt_fn = {"pkt", pkt_fwd, pkt_bwd};

static kd_status pkt_setup(kd_method *m, const kd_method_shapes *shp) {
    const pkt_args *a = kd_method_args(m);
    KD_TRY(kd__feat_indices(shp, a->feat, "pkt.feat", NULL, NULL));
    if (!(a->eps > 0)) return kd_error(KD_ERR_INVALID, "pkt.eps %g must be > 0", (double)a->eps);
    return KD_OK;
}

static kd_status pkt_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const pkt_args *a = kd_method_args(m);
    kd_graph *g = ctx->g;
    kd_tensor *fs, *ft;
    *out = NULL;
    KD_TRY(kd__feat_pair(ctx, a->feat, "pkt.feat", &fs, &ft));
    pkt_params p = {a->eps};
    kd_tensor *in[2] = {fs, ft};
    *out = kd_function_apply(g, &pkt_fn, &p, sizeof p, 2, in, 0, NULL);
    return kd_graph_status(g);
}

const kd_method_def kd__method_pkt = {
    .name = "pkt",
    .summary = "PKT: KL between teacher and student cosine-similarity distributions of feat[-1]",
    .paper = "Passalis, Tefas: Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 30000.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(pkt_arg_table),
    .args_size = sizeof(pkt_args),
    .setup = pkt_setup,
    .term = pkt_term,
};
