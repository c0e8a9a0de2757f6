/* DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), as the
 * official code runs it (megvii-research/mdistiller: mdistiller/distillers/
 * DKD.py, mdistiller/engine/cfg.py, configs/cifar100/dkd/):
 *
 *     L = CE(s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)
 *
 * with p = softmax(z / T) of each net and, per sample,
 *     TCKD = KL([p_t(y), sum_{j != y} p_t(j)] || [p_s(y), sum_{j != y} p_s(j)])
 *     NCKD = KL(softmax_{j != y}(t / T) || softmax_{j != y}(s / T))
 * each summed over the batch, times T^2 and divided by the batch size. The
 * official NCKD subtracts 1000 from the target logit before a softmax over
 * all classes; that leaves the target a weight of exp(-1000), zero in float64,
 * so the softmax over the non-target classes here is the same function.
 * Probabilities are formed from log-sum-exps in double, so nothing is
 * divided by an underflowed sum.
 *
 * Time: mdistiller's trainer counts epochs from 1 (engine/trainer.py), so
 * its first epoch already gets weight 1/20; kd's ctx->epoch is 0-based and
 * the warm-up factor is min((epoch + 1) / warmup, 1) (kd__warmup). warmup 0
 * turns the ramp off (mdistiller would divide by zero).
 *
 * Composition: the default step with gamma 1 (CE), alpha 0 (no plain KL) and
 * beta 1 on the term min(...) * (alpha TCKD + beta NCKD); the inner weights
 * and temperature are the settings dkd.alpha, dkd.beta, dkd.T, dkd.warmup.
 * The term is one kd_function over (student logits, teacher logits) with
 * the labels copied into graph memory; it also differentiates with respect
 * to the teacher's logits when they require a gradient. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "distill/methods.h"

typedef struct {
    float alpha;  /* TCKD weight */
    float beta;   /* NCKD weight */
    float T;      /* temperature */
    int warmup;   /* epochs of the linear ramp of the whole DKD term */
} kd__dkd_args;

static const kd_method_arg kd__dkd_arg_table[] = {
    KD__ARG(kd__dkd_args, alpha, KD_ARG_FLOAT, "1",
            "weight of TCKD, the target-vs-rest binary KL (mdistiller DKD.ALPHA)"),
    KD__ARG(kd__dkd_args, beta, KD_ARG_FLOAT, "8",
            "weight of NCKD, the KL among non-target classes (DKD.BETA): 8 for resnet32x4 pairs and "
            "ResNet50->MobileNetV2, 6 for wrn and vgg pairs, 2 for resnet56->resnet20 and resnet110->resnet32"),
    KD__ARG(kd__dkd_args, T, KD_ARG_FLOAT, "4", "temperature of both softmaxes (DKD.T)"),
    KD__ARG(kd__dkd_args, warmup, KD_ARG_INT, "20",
            "epochs over which the DKD term ramps up linearly, min((epoch+1)/warmup, 1) with 0-based epochs "
            "(DKD.WARMUP; 0: no ramp)"),
};

/* Parameter block of the kd_function (copied into the graph). */
typedef struct {
    double alpha, beta, T;
    int64_t n, k;          /* batch, classes */
    const int64_t *labels; /* (n), graph memory */
} kd__dkd_fn_params;

/* Per-row log-probabilities of the DKD decomposition of z / T:
 *   lb[0] = log p(y), lb[1] = log sum_{j != y} p(j),
 *   lq[j] = log softmax_{j != y}(z / T)_j (lq[y] unused),
 *   lp[j] = log softmax(z / T)_j. */
static void kd__dkd_row(const float *z, int64_t k, int64_t y, double invT, double *lp, double *lq, double lb[2]) {
    double m_all = -INFINITY, m_oth = -INFINITY;
    for (int64_t j = 0; j < k; j++) {
        double v = (double)z[j] * invT;
        lp[j] = v;
        if (v > m_all) m_all = v;
        if (j != y && v > m_oth) m_oth = v;
    }
    double s_all = 0, s_oth = 0;
    for (int64_t j = 0; j < k; j++) {
        s_all += exp(lp[j] - m_all);
        if (j != y) s_oth += exp(lp[j] - m_oth);
    }
    double lse_all = m_all + log(s_all), lse_oth = m_oth + log(s_oth);
    lb[0] = lp[y] - lse_all;
    lb[1] = lse_oth - lse_all;
    for (int64_t j = 0; j < k; j++) {
        lq[j] = lp[j] - lse_oth;
        lp[j] -= lse_all;
    }
}

/* Both rows of one sample: student (s) and teacher (t) log-probabilities of
 * kd__dkd_row, each (k) in graph memory. */
typedef struct {
    double *lps, *lqs, *lpt, *lqt;
    double lbs[2], lbt[2];
} kd__dkd_rows;

static kd_status kd__dkd_rows_alloc(kd_graph *g, int64_t k, kd__dkd_rows *r) {
    double *w = kd_function_alloc(g, (size_t)(4 * k) * sizeof *w);
    *r = (kd__dkd_rows){0};
    if (!w) return kd_graph_status(g); /* set by the failed allocation */
    r->lps = w, r->lqs = w + k, r->lpt = w + 2 * k, r->lqt = w + 3 * k;
    return KD_OK;
}

/* Sample i of the student logits in[0] and the teacher logits in[1]. */
static void kd__dkd_rows_of(const kd__dkd_fn_params *p, kd_tensor *const *in, int64_t i, kd__dkd_rows *r) {
    int64_t k = p->k, y = p->labels[i];
    kd__dkd_row(kd_f32(in[0]) + i * k, k, y, 1.0 / p->T, r->lps, r->lqs, r->lbs);
    kd__dkd_row(kd_f32(in[1]) + i * k, k, y, 1.0 / p->T, r->lpt, r->lqt, r->lbt);
}

/* p * (log p - log q), 0 where p is 0 (PyTorch's kl_div target convention). */
static double kd__dkd_xlog(double lp, double lq) {
    double p = exp(lp);
    return p > 0 ? p * (lp - lq) : 0.0;
}

static kd_status kd__dkd_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                             void **saved) {
    (void)n_in, (void)saved;
    const kd__dkd_fn_params *p = params;
    int64_t n = p->n, k = p->k;
    kd__dkd_rows r;
    KD_TRY(kd__dkd_rows_alloc(g, k, &r));
    double tckd = 0, nckd = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t y = p->labels[i];
        kd__dkd_rows_of(p, in, i, &r);
        tckd += kd__dkd_xlog(r.lbt[0], r.lbs[0]) + kd__dkd_xlog(r.lbt[1], r.lbs[1]);
        for (int64_t j = 0; j < k; j++)
            if (j != y) nckd += kd__dkd_xlog(r.lqt[j], r.lqs[j]);
    }
    double scale = p->T * p->T / (double)n;
    kd_f32(out)[0] = (float)(scale * (p->alpha * tckd + p->beta * nckd));
    return KD_OK;
}

/* d/dz of the per-row loss alpha TCKD + beta NCKD, z = logits / T:
 *   student: target (p_s(y) - b_t0) alpha; other j: alpha (p_s(j) - b_t1 q_s(j)) + beta (q_s(j) - q_t(j));
 *   teacher: with h_k = log b_tk - log b_sk and r_j = log q_t(j) - log q_s(j),
 *            target alpha b_t0 b_t1 (h_0 - h_1);
 *            other j: alpha p_t(j) b_t0 (h_1 - h_0) + beta q_t(j) (r_j - sum_m q_t(m) r_m). */
static kd_status kd__dkd_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                             const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)saved, (void)n_in, (void)out;
    const kd__dkd_fn_params *p = params;
    int64_t n = p->n, k = p->k;
    kd__dkd_rows r;
    KD_TRY(kd__dkd_rows_alloc(g, k, &r));
    /* Views of r, refilled for each sample by kd__dkd_rows_of. */
    const double *lps = r.lps, *lqs = r.lqs, *lpt = r.lpt, *lqt = r.lqt, *lbs = r.lbs, *lbt = r.lbt;
    /* d loss / d z (z = logits / T) carries T^2 / n; d z / d logits is 1 / T. */
    double c = (double)kd_f32(gout)[0] * p->T / (double)n;
    for (int64_t i = 0; i < n; i++) {
        int64_t y = p->labels[i];
        kd__dkd_rows_of(p, in, i, &r);
        double bt0 = exp(lbt[0]), bt1 = exp(lbt[1]);
        if (gin[0]) {
            float *gs = kd_f32(gin[0]) + i * k;
            for (int64_t j = 0; j < k; j++) {
                double d;
                if (j == y) d = p->alpha * (exp(lps[j]) - bt0);
                else
                    d = p->alpha * (exp(lps[j]) - bt1 * exp(lqs[j])) + p->beta * (exp(lqs[j]) - exp(lqt[j]));
                gs[j] += (float)(c * d);
            }
        }
        if (gin[1]) {
            float *gt = kd_f32(gin[1]) + i * k;
            /* Terms with a zero teacher probability contribute nothing (and
             * their log is -inf): guard each product. */
            double hd = (bt0 > 0 && bt1 > 0) ? (lbt[0] - lbs[0]) - (lbt[1] - lbs[1]) : 0.0;
            double rbar = 0;
            for (int64_t j = 0; j < k; j++) {
                double q = exp(lqt[j]);
                if (j != y && q > 0) rbar += q * (lqt[j] - lqs[j]);
            }
            for (int64_t j = 0; j < k; j++) {
                double d;
                if (j == y) d = p->alpha * bt0 * bt1 * hd;
                else {
                    double q = exp(lqt[j]);
                    d = -p->alpha * exp(lpt[j]) * bt0 * hd + (q > 0 ? p->beta * q * ((lqt[j] - lqs[j]) - rbar) : 0.0);
                }
                gt[j] += (float)(c * d);
            }
        }
    }
    return KD_OK;
}

static const kd_function kd__dkd_fn = {"dkd", kd__dkd_fwd, kd__dkd_bwd};

static kd_status kd__dkd_setup(kd_method *m, const kd_method_shapes *shp) {
    (void)shp;
    const kd__dkd_args *a = kd_method_args(m);
    if (!(a->T > 0)) return kd_error(KD_ERR_INVALID, "dkd.T %g must be > 0", (double)a->T);
    if (a->warmup < 0) return kd_error(KD_ERR_INVALID, "dkd.warmup %d must be >= 0 (0: no warm-up)", a->warmup);
    return KD_OK;
}

static kd_status kd__dkd_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__dkd_args *a = kd_method_args(m);
    kd_graph *g = ctx->g;
    kd_tensor *s = ctx->s.logits, *t = ctx->t.logits, *yt = ctx->batch->y;
    char b1[96], b2[96];
    *out = NULL;
    if (!t) return kd_error(KD_ERR_INVALID, "dkd needs the teacher's logits");
    if (!yt) return kd_error(KD_ERR_INVALID, "dkd needs labels");
    if (s->ndim != 2 || t->ndim != 2 || s->shape[0] != t->shape[0] || s->shape[1] != t->shape[1])
        return kd_error(KD_ERR_SHAPE, "dkd: student logits %s and teacher logits %s differ",
                        kd__shape_text(s->ndim, s->shape, b1, sizeof b1),
                        kd__shape_text(t->ndim, t->shape, b2, sizeof b2));
    int64_t n = s->shape[0], k = s->shape[1];
    if (k < 2)
        return kd_error(KD_ERR_SHAPE, "dkd needs at least 2 classes (logits %s)",
                        kd__shape_text(2, s->shape, b1, sizeof b1));
    if (yt->ndim != 1 || yt->shape[0] != n || (yt->dtype != KD_I32 && yt->dtype != KD_I64))
        return kd_error(KD_ERR_SHAPE, "dkd: labels %s do not match logits %s (expected (%lld) integers)",
                        kd__shape_text(yt->ndim, yt->shape, b1, sizeof b1), kd__shape_text(2, s->shape, b2, sizeof b2),
                        (long long)n);
    int64_t *lab = kd_function_alloc(g, (size_t)(n ? n : 1) * sizeof *lab);
    if (!lab) return kd_graph_status(g);
    for (int64_t i = 0; i < n; i++) {
        lab[i] = yt->dtype == KD_I32 ? ((const int32_t *)yt->data)[i] : ((const int64_t *)yt->data)[i];
        if (lab[i] < 0 || lab[i] >= k)
            return kd_error(KD_ERR_INVALID, "dkd: label %lld of sample %lld is outside 0..%lld", (long long)lab[i],
                            (long long)i, (long long)(k - 1));
    }
    kd__dkd_fn_params p = {a->alpha, a->beta, a->T, n, k, lab};
    kd_tensor *in[2] = {s, t};
    kd_tensor *loss = kd_function_apply(g, &kd__dkd_fn, &p, sizeof p, 2, in, 0, NULL);
    *out = kd__warmup(g, loss, ctx->epoch, a->warmup);
    return kd_graph_status(g);
}

const kd_method_def kd__method_dkd = {
    .name = "dkd",
    .summary = "decoupled KD: CE + ramp * (alpha target-class KL + beta non-target-class KL) at temperature T",
    .paper = "Zhao, Cui, Song, Qiu, Liang: Decoupled Knowledge Distillation, CVPR 2022",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 1.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__dkd_arg_table),
    .args_size = sizeof(kd__dkd_args),
    .setup = kd__dkd_setup,
    .term = kd__dkd_term,
};
