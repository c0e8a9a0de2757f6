/* RKD: Relational Knowledge Distillation (Park, Kim, Lu, Cho, CVPR 2019) as
 * RepDistiller runs it (distiller_zoo/RKD.py RKDLoss(w_d=25, w_a=50) on the
 * pooled embedding feat[-1], flattened to (N, D); helper/loops.py; beta 1 in
 * scripts/run_cifar_distill.sh).
 *
 * Distance term: pdist(e) = sqrt(clamp(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, min=eps))
 * with a zero diagonal, divided by the mean of its positive entries; smooth-L1
 * (beta 1, mean over N^2) between student and teacher. Angle term: at every
 * vertex i, the unit vectors F.normalize(e_j - e_i) (eps 1e-12) and the
 * cosines between them, an (N, N, N) tensor; smooth-L1 (mean over N^3)
 * between student and teacher. Term = w_d * distance + w_a * angle. The
 * teacher side runs under no_grad in the official code: it gets no gradient.
 *
 * One kd_function computes both terms in double precision from the Gram
 * matrix G = e e^T: (e_j - e_i).(e_k - e_i) = (G_jk - G_ik) - (G_ij - G_ii),
 * which is the official bmm of normalised differences in O(N^2 D + N^3)
 * instead of O(N^3 D), exact (zero) for coincident samples as the official
 * code is. Parallel loops write disjoint outputs, so results do not depend on
 * the thread count. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "distill/methods.h"

/* F.normalize's eps (fixed in the official code). */
#define RKD_NORMALIZE_EPS 1e-12

typedef struct {
    float w_dist;  /* weight of the distance term (w_d) */
    float w_angle; /* weight of the angle term (w_a) */
    float eps;     /* pdist clamp of the squared distances */
    int feat;      /* feature index (negative from the end), flattened to (N, -1) */
} rkd_args;

static const kd_method_arg rkd_arg_table[] = {
    KD__ARG(rkd_args, w_dist, KD_ARG_FLOAT, "25", "weight of the distance term (RKDLoss w_d)"),
    KD__ARG(rkd_args, w_angle, KD_ARG_FLOAT, "50", "weight of the angle term (RKDLoss w_a)"),
    KD__ARG(rkd_args, eps, KD_ARG_FLOAT, "1e-12", "pdist: squared distances are clamped to at least eps"),
    KD__ARG(rkd_args, feat, KD_ARG_INT, "-1", "feature index (-1: pooled embedding), flattened to (N, -1)"),
};

typedef struct {
    double w_d, w_a, eps;
} rkd_params;

/* What the forward keeps for the backward (graph arena). */
typedef struct {
    int64_t N, D;
    double *gs, *gt; /* (N, N) Gram matrices of student and teacher */
    double *ns;      /* (N, N) student norms |e_j - e_i| */
    double *us, *ut; /* (N, N) 1 / max(norm, eps) of student and teacher */
    double *r;       /* (N, N) student pdist (zero diagonal) */
    double *td;      /* (N, N) teacher pdist / its mean */
    double mean;     /* mean of the student's positive distances */
    int64_t P;       /* how many there are */
} rkd_saved;

static double rkd_huber(double x) { return fabs(x) < 1.0 ? 0.5 * x * x : fabs(x) - 0.5; }
static double rkd_huber_grad(double x) { return fabs(x) < 1.0 ? x : (x > 0) - (x < 0); }

/* G = x x^T for x (N, D) float32. Each entry is summed in one order, so G is
 * exactly symmetric. */
static void rkd_gram(const float *x, int64_t N, int64_t D, double *G) {
#pragma omp parallel for schedule(static) if (N * N * D >= 32768)
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) {
            const float *a = x + i * D, *b = x + j * D;
            double s = 0;
            for (int64_t d = 0; d < D; d++) s += (double)a[d] * b[d];
            G[i * N + j] = s;
        }
}

/* |x_i - x_j|^2 from the Gram matrix, zero for coincident rows. */
static double rkd_sqdist(const double *G, int64_t N, int64_t i, int64_t j) {
    return (G[i * N + i] - G[i * N + j]) + (G[j * N + j] - G[i * N + j]);
}

/* n_ij = |x_j - x_i| (diagonal 0) into n (may be NULL) and u_ij = 1 / max(n_ij, eps)
 * (F.normalize's denominator) into u. */
static void rkd_norms(const double *G, int64_t N, double *n, double *u) {
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) {
            double v = i == j ? 0.0 : sqrt(fmax(rkd_sqdist(G, N, i, j), 0.0));
            if (n) n[i * N + j] = v;
            u[i * N + j] = 1.0 / fmax(v, RKD_NORMALIZE_EPS);
        }
}

/* pdist(squared=False): sqrt(clamp(q, eps)), zero diagonal; the mean of the
 * positive entries and their count. */
static void rkd_pdist(const double *G, int64_t N, double eps, double *r, double *mean, int64_t *P) {
    double s = 0;
    int64_t p = 0;
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) {
            double v = i == j ? 0.0 : sqrt(fmax(rkd_sqdist(G, N, i, j), eps));
            r[i * N + j] = v;
            if (v > 0) s += v, p++;
        }
    *mean = p ? s / (double)p : 0.0;
    *P = p;
}

/* (x_j - x_i).(x_k - x_i) and the cosine at vertex i. */
static double rkd_dot(const double *G, int64_t N, int64_t i, int64_t j, int64_t k) {
    return (G[j * N + k] - G[i * N + k]) - (G[i * N + j] - G[i * N + i]);
}
static double rkd_angle(const double *G, const double *u, int64_t N, int64_t i, int64_t j, int64_t k) {
    return rkd_dot(G, N, i, j, k) * u[i * N + j] * u[i * N + k];
}

static kd_status rkd_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                         void **saved) {
    (void)n_in;
    const rkd_params *p = params;
    const kd_tensor *s = in[0], *t = in[1];
    KD_TRY(kd__need_contiguous("rkd", in, 2));
    int64_t N = s->shape[0], Ds = kd_tensor_numel(s) / N, Dt = kd_tensor_numel(t) / N;
    rkd_saved *sv = kd_function_alloc(g, sizeof *sv);
    double *buf = kd_function_alloc(g, (size_t)(7 * N * N + N) * sizeof(double));
    if (!sv || !buf) return kd_graph_status(g);
    double *part = buf + 7 * N * N; /* (N) per-vertex partial sums of the angle term */
    sv->N = N;
    sv->D = Ds;
    sv->gs = buf;
    sv->gt = buf + N * N;
    sv->ns = buf + 2 * N * N;
    sv->us = buf + 3 * N * N;
    sv->ut = buf + 4 * N * N;
    sv->r = buf + 5 * N * N;
    sv->td = buf + 6 * N * N;
    rkd_gram(kd_f32(s), N, Ds, sv->gs);
    rkd_gram(kd_f32(t), N, Dt, sv->gt);
    rkd_norms(sv->gs, N, sv->ns, sv->us);
    rkd_norms(sv->gt, N, NULL, sv->ut);
    /* Distances: the teacher's into td (then normalised), the student's into r. */
    double tmean;
    int64_t tP;
    rkd_pdist(sv->gt, N, p->eps, sv->td, &tmean, &tP);
    rkd_pdist(sv->gs, N, p->eps, sv->r, &sv->mean, &sv->P);
    if (sv->P == 0 || tP == 0)
        return kd_error(KD_ERR_INVALID,
                        "rkd: the batch of %lld has no two distinct samples (the mean distance is undefined)",
                        (long long)N);
    double ld = 0;
    for (int64_t i = 0; i < N * N; i++) {
        sv->td[i] /= tmean;
        ld += rkd_huber(sv->r[i] / sv->mean - sv->td[i]);
    }
    ld /= (double)(N * N);
    /* Angles: one partial sum per vertex, added in order. */
#pragma omp parallel for schedule(static) if (N * N * N >= 32768)
    for (int64_t i = 0; i < N; i++) {
        double acc = 0;
        for (int64_t j = 0; j < N; j++)
            for (int64_t k = 0; k < N; k++)
                acc += rkd_huber(rkd_angle(sv->gs, sv->us, N, i, j, k) - rkd_angle(sv->gt, sv->ut, N, i, j, k));
        part[i] = acc;
    }
    double la = 0;
    for (int64_t i = 0; i < N; i++) la += part[i];
    la /= (double)(N * N * N);
    kd_f32(out)[0] = (float)(p->w_d * ld + p->w_a * la);
    *saved = sv;
    return KD_OK;
}

static kd_status rkd_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                         const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)n_in, (void)out;
    if (!gin[0]) return KD_OK; /* the teacher side is under no_grad */
    const rkd_params *p = params;
    const rkd_saved *sv = saved;
    int64_t N = sv->N, D = sv->D;
    double gy = kd_f32(gout)[0];
    /* H = dL/dG + (dL/dG)^T; the gradient of the input is H x. */
    double *H = kd_function_alloc(g, (size_t)(4 * N * N) * sizeof(double));
    if (!H) return kd_graph_status(g);
    double *R = H + N * N;     /* R_ij = sum_k dL/dD_ijk */
    double *A = H + 2 * N * N; /* A_jk = sum_i dL/dD_ijk */
    double *V = H + 3 * N * N; /* (dL/dn_ij) / n_ij */
    memset(H, 0, (size_t)(N * N) * sizeof(double));
    const double *G = sv->gs, *n = sv->ns, *u = sv->us;

    /* Distance term: d = r / mean; r = sqrt(clamp(q, eps)), q = G_kk + G_ll - 2 G_kl. */
    double cd = gy * p->w_d / (double)(N * N), m = sv->mean, gr = 0;
    for (int64_t i = 0; i < N * N; i++) gr += rkd_huber_grad(sv->r[i] / m - sv->td[i]) * cd * sv->r[i];
    gr /= m * m * (double)sv->P;
    for (int64_t k = 0; k < N; k++)
        for (int64_t l = 0; l < N; l++) {
            double r = sv->r[k * N + l];
            if (k == l || r <= 0 || rkd_sqdist(G, N, k, l) < p->eps) continue; /* zero diagonal, clamped */
            double dr = rkd_huber_grad(r / m - sv->td[k * N + l]) * cd / m - gr;
            double dq = dr * 0.5 / r;
            H[k * N + k] += 2 * dq;
            H[l * N + l] += 2 * dq;
            H[k * N + l] -= 2 * dq;
            H[l * N + k] -= 2 * dq;
        }

    /* Angle term: a_ijk = D_ijk u_ij u_ik with D_ijk = (G_jk - G_ik) - (G_ij - G_ii),
     * u_ij = 1 / max(n_ij, eps). dD_ijk = ga_ijk u_ij u_ik (symmetric in j, k). */
    double ca = gy * p->w_a / (double)(N * N * N);
    const double *Gt = sv->gt, *ut = sv->ut;
    /* Per vertex i: R_ij, and the norms' share through u_ij. */
#pragma omp parallel for schedule(static) if (N * N * N >= 32768)
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) {
            double rs = 0, du = 0, uj = u[i * N + j];
            for (int64_t k = 0; k < N; k++) {
                double uk = u[i * N + k], a = rkd_dot(G, N, i, j, k) * uj * uk;
                double ga = rkd_huber_grad(a - rkd_angle(Gt, ut, N, i, j, k)) * ca;
                rs += ga * uj * uk;
                du += 2 * ga * a / uj;
            }
            R[i * N + j] = rs;
            /* u = 1 / n where n >= eps (else the constant 1 / eps). */
            double nij = n[i * N + j];
            V[i * N + j] = (i != j && nij >= RKD_NORMALIZE_EPS) ? -du / (nij * nij) / nij : 0.0;
        }
    /* Norms: n_ij^2 = G_ii + G_jj - 2 G_ij. */
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < N; j++) {
            double v = V[i * N + j];
            if (v == 0) continue;
            H[i * N + i] += v;
            H[j * N + j] += v;
            H[i * N + j] -= v;
            H[j * N + i] -= v;
        }
    /* The D terms: dG_jk += dD_ijk, dG_ik -= dD_ijk, dG_ij -= dD_ijk, dG_ii += dD_ijk,
     * summed: dG_ij -= 2 R_ij (dD symmetric in j, k), dG_ii += sum_j R_ij, dG_jk += A_jk. */
    for (int64_t x = 0; x < N; x++)
        for (int64_t y = 0; y < N; y++) H[x * N + y] -= 2 * (R[x * N + y] + R[y * N + x]);
    for (int64_t i = 0; i < N; i++) {
        double s = 0;
        for (int64_t j = 0; j < N; j++) s += R[i * N + j];
        H[i * N + i] += 2 * s;
    }
#pragma omp parallel for schedule(static) if (N * N * N >= 32768)
    for (int64_t j = 0; j < N; j++) {
        double *Aj = A + j * N;
        for (int64_t k = 0; k < N; k++) Aj[k] = 0;
        for (int64_t i = 0; i < N; i++) {
            double uj = u[i * N + j];
            for (int64_t k = 0; k < N; k++) {
                double uk = u[i * N + k], a = rkd_dot(G, N, i, j, k) * uj * uk;
                Aj[k] += rkd_huber_grad(a - rkd_angle(Gt, ut, N, i, j, k)) * ca * uj * uk;
            }
        }
    }
    for (int64_t x = 0; x < N; x++)
        for (int64_t y = 0; y < N; y++) H[x * N + y] += A[x * N + y] + A[y * N + x];

    /* dx = H x. */
    const float *x = kd_f32(in[0]);
    float *gx = kd_f32(gin[0]);
#pragma omp parallel for schedule(static) if (N * N * D >= 32768)
    for (int64_t i = 0; i < N; i++)
        for (int64_t d = 0; d < D; d++) {
            double s = 0;
            for (int64_t j = 0; j < N; j++) s += H[i * N + j] * x[j * D + d];
            gx[i * D + d] += (float)s;
        }
    return KD_OK;
}

static const kd_function rkd_fn = {"rkd", rkd_fwd, rkd_bwd};

static kd_status rkd_setup(kd_method *m, const kd_method_shapes *shp) {
    const rkd_args *a = kd_method_args(m);
    KD_TRY(kd__feat_indices(shp, a->feat, "rkd.feat", NULL, NULL));
    if (!(a->eps >= 0)) return kd_error(KD_ERR_INVALID, "rkd.eps %g must be >= 0", (double)a->eps);
    return KD_OK;
}

static kd_status rkd_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const rkd_args *a = kd_method_args(m);
    kd_graph *g = ctx->g;
    kd_tensor *fs, *ft;
    *out = NULL;
    KD_TRY(kd__feat_pair(ctx, a->feat, "rkd.feat", &fs, &ft));
    rkd_params p = {a->w_dist, a->w_angle, a->eps};
    kd_tensor *in[2] = {fs, ft};
    *out = kd_function_apply(g, &rkd_fn, &p, sizeof p, 2, in, 0, NULL);
    return kd_graph_status(g);
}

const kd_method_def kd__method_rkd = {
    .name = "rkd",
    .summary = "RKD: smooth-L1 on normalised pairwise distances (x25) and triplet angles (x50) of feat[-1]",
    .paper = "Park, Kim, Lu, Cho: Relational Knowledge Distillation, CVPR 2019",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(rkd_arg_table),
    .args_size = sizeof(rkd_args),
    .setup = rkd_setup,
    .term = rkd_term,
};
