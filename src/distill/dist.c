/* DIST: Knowledge Distillation from A Stronger Teacher (Huang et al.,
 * NeurIPS 2022), from the official code (hunto/DIST_KD README and
 * hunto/image_classification_sota lib/models/losses/dist_kd.py):
 *
 *     y = softmax(z / tau) for both nets, (N, K)
 *     inter = 1 - mean_i pearson(y_s[i, :], y_t[i, :])   (rows: per sample)
 *     intra = 1 - mean_j pearson(y_s[:, j], y_t[:, j])   (columns: per class)
 *     term  = tau^2 * (beta * inter + gamma * intra)
 *
 * with pearson(a, b) = cosine of the centred vectors,
 * (a' . b') / (|a'| |b'| + eps), eps 1e-8, as the official cosine_similarity.
 * Composition (METHODS.md section 17, CIFAR-100): CE weight 1 (gamma), no
 * plain KL (alpha 0) and weight 2 on the DIST term (beta); the inner weights
 * and temperature are the settings dist.beta, dist.gamma, dist.tau.
 *
 * The whole term is one kd_function over (student logits, teacher logits),
 * double accumulation; the softmaxes are saved for the backward. Like
 * torch.norm's backward, a zero-norm centred vector contributes no
 * gradient through its norm. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "distill/methods.h"

typedef struct {
    float beta;  /* inter-class (per-sample rows) weight */
    float gamma; /* intra-class (per-class columns) weight */
    float tau;   /* temperature */
    float eps;   /* added to the product of norms in the cosine */
} kd__dist_args;

static const kd_method_arg kd__dist_arg_table[] = {
    KD__ARG(kd__dist_args, beta, KD_ARG_FLOAT, "1",
            "weight of the inter-class relation (Pearson over each sample's row)"),
    KD__ARG(kd__dist_args, gamma, KD_ARG_FLOAT, "1",
            "weight of the intra-class relation (Pearson over each class column)"),
    KD__ARG(kd__dist_args, tau, KD_ARG_FLOAT, "4", "temperature of both softmaxes; the term is multiplied by tau^2"),
    KD__ARG(kd__dist_args, eps, KD_ARG_FLOAT, "1e-8", "added to |a||b| in the cosine of the centred vectors"),
};

typedef struct {
    double beta, gamma, tau, eps;
    int64_t n, k;
} kd__dist_fn_params;

/* Row-wise softmax of z / tau, (n, k) float -> double. */
static void kd__dist_softmax(const float *z, int64_t n, int64_t k, double tau, double *y) {
    for (int64_t i = 0; i < n; i++) {
        const float *zr = z + i * k;
        double *yr = y + i * k, m = -INFINITY, s = 0;
        for (int64_t j = 0; j < k; j++) m = fmax(m, (double)zr[j] / tau);
        for (int64_t j = 0; j < k; j++) s += (yr[j] = exp((double)zr[j] / tau - m));
        for (int64_t j = 0; j < k; j++) yr[j] /= s;
    }
}

/* Pearson correlation of a and b, len elements each with the given stride;
 * with ga/gb non-NULL, adds w * d pearson / d a (and / d b) into them (same
 * stride). */
static double kd__dist_pearson(const double *a, const double *b, int64_t len, int64_t stride, double eps, double w,
                               double *ga, double *gb) {
    double ma = 0, mb = 0;
    for (int64_t e = 0; e < len; e++) {
        ma += a[e * stride];
        mb += b[e * stride];
    }
    ma /= (double)len;
    mb /= (double)len;
    double dot = 0, aa = 0, bb = 0;
    for (int64_t e = 0; e < len; e++) {
        double x = a[e * stride] - ma, y = b[e * stride] - mb;
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    double na = sqrt(aa), nb = sqrt(bb), den = na * nb + eps, c = dot / den;
    if (!ga && !gb) return c;
    /* d c / d a' = b' / den - dot nb a' / (na den^2), and the same with a
     * and b swapped. Centring (d / d a = d / d a' - mean(d / d a')) changes
     * nothing: a' and b' both have mean zero, so this gradient does too. */
    double ka = na > 0 ? dot * nb / (na * den * den) : 0.0, kb = nb > 0 ? dot * na / (nb * den * den) : 0.0;
    for (int64_t e = 0; e < len; e++) {
        double x = a[e * stride] - ma, y = b[e * stride] - mb;
        if (ga) ga[e * stride] += w * (y / den - ka * x);
        if (gb) gb[e * stride] += w * (x / den - kb * y);
    }
    return c;
}

static kd_status kd__dist_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                              void **saved) {
    (void)n_in;
    const kd__dist_fn_params *p = params;
    int64_t n = p->n, k = p->k;
    double *y = kd_function_alloc(g, (size_t)(2 * n * k + 1) * sizeof *y);
    if (!y) return kd_graph_status(g);
    double *ys = y, *yt = y + n * k;
    kd__dist_softmax(kd_f32(in[0]), n, k, p->tau, ys);
    kd__dist_softmax(kd_f32(in[1]), n, k, p->tau, yt);
    double rows = 0, cols = 0;
    for (int64_t i = 0; i < n; i++) rows += kd__dist_pearson(ys + i * k, yt + i * k, k, 1, p->eps, 0, NULL, NULL);
    for (int64_t j = 0; j < k; j++) cols += kd__dist_pearson(ys + j, yt + j, n, k, p->eps, 0, NULL, NULL);
    double inter = 1.0 - rows / (double)n, intra = 1.0 - cols / (double)k;
    kd_f32(out)[0] = (float)(p->tau * p->tau * (p->beta * inter + p->gamma * intra));
    *saved = y;
    return KD_OK;
}

/* Softmax backward of one net: gin += gout * y (G - sum(G y)) / tau, row-wise. */
static void kd__dist_softmax_bwd(const double *y, const double *G, int64_t n, int64_t k, double scale, float *gin) {
    for (int64_t i = 0; i < n; i++) {
        const double *yr = y + i * k, *gr = G + i * k;
        double dot = 0;
        for (int64_t j = 0; j < k; j++) dot += gr[j] * yr[j];
        for (int64_t j = 0; j < k; j++) gin[i * k + j] += (float)(scale * yr[j] * (gr[j] - dot));
    }
}

static kd_status kd__dist_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                              const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)in, (void)n_in, (void)out;
    const kd__dist_fn_params *p = params;
    int64_t n = p->n, k = p->k;
    const double *ys = saved, *yt = ys + n * k;
    double *G = kd_function_alloc(g, (size_t)(2 * n * k + 1) * sizeof *G);
    if (!G) return kd_graph_status(g);
    double *Gs = G, *Gt = G + n * k;
    memset(G, 0, (size_t)(2 * n * k) * sizeof *G);
    double t2 = p->tau * p->tau, wr = -t2 * p->beta / (double)n, wc = -t2 * p->gamma / (double)k;
    for (int64_t i = 0; i < n; i++)
        kd__dist_pearson(ys + i * k, yt + i * k, k, 1, p->eps, wr, Gs + i * k, Gt + i * k);
    for (int64_t j = 0; j < k; j++) kd__dist_pearson(ys + j, yt + j, n, k, p->eps, wc, Gs + j, Gt + j);
    double scale = (double)kd_f32(gout)[0] / p->tau;
    if (gin[0]) kd__dist_softmax_bwd(ys, Gs, n, k, scale, kd_f32(gin[0]));
    if (gin[1]) kd__dist_softmax_bwd(yt, Gt, n, k, scale, kd_f32(gin[1]));
    return KD_OK;
}

static const kd_function kd__dist_fn = {"dist", kd__dist_fwd, kd__dist_bwd};

static kd_status kd__dist_setup(kd_method *m, const kd_method_shapes *shp) {
    (void)shp;
    const kd__dist_args *a = kd_method_args(m);
    if (!(a->tau > 0)) return kd_error(KD_ERR_INVALID, "dist.tau %g must be > 0", (double)a->tau);
    if (!(a->eps >= 0)) return kd_error(KD_ERR_INVALID, "dist.eps %g must be >= 0", (double)a->eps);
    return KD_OK;
}

static kd_status kd__dist_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__dist_args *a = kd_method_args(m);
    kd_tensor *s = ctx->s.logits, *t = ctx->t.logits;
    char b1[96], b2[96];
    *out = NULL;
    if (!t) return kd_error(KD_ERR_INVALID, "dist needs the teacher's logits");
    if (s->ndim != 2 || t->ndim != 2 || s->shape[0] != t->shape[0] || s->shape[1] != t->shape[1])
        return kd_error(KD_ERR_SHAPE, "dist: student logits %s and teacher logits %s differ",
                        kd__shape_text(s->ndim, s->shape, b1, sizeof b1),
                        kd__shape_text(t->ndim, t->shape, b2, sizeof b2));
    kd__dist_fn_params p = {a->beta, a->gamma, a->tau, a->eps, s->shape[0], s->shape[1]};
    kd_tensor *in[2] = {s, t};
    *out = kd_function_apply(ctx->g, &kd__dist_fn, &p, sizeof p, 2, in, 0, NULL);
    return kd_graph_status(ctx->g);
}

const kd_method_def kd__method_dist = {
    .name = "dist",
    .summary = "DIST: tau^2 (beta inter-class + gamma intra-class) Pearson-correlation relations of softmax(z/tau)",
    .paper = "Huang, You, Wang, Qian, Xu: Knowledge Distillation from A Stronger Teacher, NeurIPS 2022",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 2.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__dist_arg_table),
    .args_size = sizeof(kd__dist_args),
    .setup = kd__dist_setup,
    .term = kd__dist_term,
};
