/* LSKD: Logit Standardization in Knowledge Distillation (Sun et al., CVPR
 * 2024), vanilla KD with the official pre-process
 * (sunshangquan/logit-standardization-KD: mdistiller/distillers/KD.py,
 * tools/train.py, mdistiller/engine/cfg.py):
 *
 *     z' = (z - mean(z)) / (std(z) + 1e-7)    per sample, both nets,
 *                                             std unbiased (torch .std)
 *     term = KL(softmax(z'_t / T) || softmax(z'_s / T)) * T^2, batch mean
 *
 * standardising first, then dividing by the base temperature T (2), as
 * kd_loss in KD.py. The published CIFAR-100 weights (--logit-stand
 * --base-temp 2 --kd-weight 9, CE_WEIGHT 0.1 of cfg.py) are gamma 0.1 on CE,
 * alpha 0 (no plain KL) and beta 9 on this term. The standardisation is a
 * kd_function (one row per sample, double accumulation); the KL is kd's
 * kl_div op. For constant logits (std 0) the gradient through the std is
 * taken as 0 where PyTorch would give NaN. */
#include <math.h>
#include <stdint.h>

#include "distill/methods.h"

typedef struct {
    float T;   /* base temperature applied after standardisation */
    float eps; /* added to the std */
} kd__lskd_args;

static const kd_method_arg kd__lskd_arg_table[] = {
    KD__ARG(kd__lskd_args, T, KD_ARG_FLOAT, "2", "base temperature after the Z-score (--base-temp; the term has T^2)"),
    KD__ARG(kd__lskd_args, eps, KD_ARG_FLOAT, "1e-7", "added to the unbiased std of each sample's logits"),
};

typedef struct {
    double eps;
    int64_t n, k;
} kd__lskd_fn_params;

/* Mean and unbiased std of one row. */
static void kd__lskd_moments(const float *z, int64_t k, double *mean, double *std) {
    double m = 0, v = 0;
    for (int64_t j = 0; j < k; j++) m += z[j];
    m /= (double)k;
    for (int64_t j = 0; j < k; j++) v += ((double)z[j] - m) * ((double)z[j] - m);
    *mean = m;
    *std = sqrt(v / (double)(k - 1));
}

static kd_status kd__lskd_fwd(kd_graph *g, const void *params, kd_tensor *const *in, int n_in, kd_tensor *out,
                              void **saved) {
    (void)g, (void)n_in, (void)saved;
    const kd__lskd_fn_params *p = params;
    const float *z = kd_f32(in[0]);
    float *y = kd_f32(out);
    for (int64_t i = 0; i < p->n; i++) {
        double m, sd;
        kd__lskd_moments(z + i * p->k, p->k, &m, &sd);
        for (int64_t j = 0; j < p->k; j++) y[i * p->k + j] = (float)(((double)z[i * p->k + j] - m) / (sd + p->eps));
    }
    return KD_OK;
}

/* y = c / (s + eps), c = z - mean, s = sqrt(sum c^2 / (k - 1)):
 * d L / d z = (g - mean(g)) / D - (sum g c) / D^2 * c / ((k - 1) s), D = s + eps. */
static kd_status kd__lskd_bwd(kd_graph *g, const void *params, void *saved, kd_tensor *const *in, int n_in,
                              const kd_tensor *out, const kd_tensor *gout, kd_tensor *const *gin) {
    (void)g, (void)saved, (void)n_in, (void)out;
    const kd__lskd_fn_params *p = params;
    const float *z = kd_f32(in[0]), *gy = kd_f32(gout);
    if (!gin[0]) return KD_OK;
    float *gz = kd_f32(gin[0]);
    int64_t k = p->k;
    for (int64_t i = 0; i < p->n; i++) {
        const float *zr = z + i * k, *gr = gy + i * k;
        double m, sd;
        kd__lskd_moments(zr, k, &m, &sd);
        double D = sd + p->eps, gm = 0, gc = 0;
        for (int64_t j = 0; j < k; j++) {
            gm += gr[j];
            gc += (double)gr[j] * ((double)zr[j] - m);
        }
        gm /= (double)k;
        double ks = sd > 0 ? gc / (D * D * (double)(k - 1) * sd) : 0.0;
        for (int64_t j = 0; j < k; j++) gz[i * k + j] += (float)((gr[j] - gm) / D - ks * ((double)zr[j] - m));
    }
    return KD_OK;
}

static const kd_function kd__lskd_fn = {"logit_standardize", kd__lskd_fwd, kd__lskd_bwd};

/* The Z-scored logits of one net, (n, k). */
static kd_tensor *kd__lskd_standardize(kd_graph *g, kd_tensor *z, double eps) {
    kd__lskd_fn_params p = {eps, z->shape[0], z->shape[1]};
    return kd_function_apply(g, &kd__lskd_fn, &p, sizeof p, 1, &z, 2, z->shape);
}

static kd_status kd__lskd_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__lskd_args *a = kd_method_args(m);
    if (!(a->T > 0)) return kd_error(KD_ERR_INVALID, "lskd.T %g must be > 0", (double)a->T);
    if (!(a->eps >= 0)) return kd_error(KD_ERR_INVALID, "lskd.eps %g must be >= 0", (double)a->eps);
    if (shp->student.num_classes && shp->student.num_classes < 2)
        return kd_error(KD_ERR_SHAPE, "lskd needs at least 2 classes to standardise logits (student has %lld)",
                        (long long)shp->student.num_classes);
    return KD_OK;
}

static kd_status kd__lskd_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__lskd_args *a = kd_method_args(m);
    kd_graph *g = ctx->g;
    kd_tensor *s = ctx->s.logits, *t = ctx->t.logits;
    char b1[96], b2[96];
    *out = NULL;
    if (!t) return kd_error(KD_ERR_INVALID, "lskd needs the teacher's logits");
    if (s->ndim != 2 || t->ndim != 2 || s->shape[0] != t->shape[0] || s->shape[1] != t->shape[1] || s->shape[1] < 2)
        return kd_error(KD_ERR_SHAPE, "lskd: student logits %s and teacher logits %s must be the same (N, K), K >= 2",
                        kd__shape_text(s->ndim, s->shape, b1, sizeof b1),
                        kd__shape_text(t->ndim, t->shape, b2, sizeof b2));
    kd_tensor *zs = kd__lskd_standardize(g, s, a->eps), *zt = kd__lskd_standardize(g, t, a->eps);
    *out = kd_kl_div(g, zs, zt, a->T);
    return kd_graph_status(g);
}

const kd_method_def kd__method_lskd = {
    .name = "lskd",
    .summary = "KD on Z-scored logits: (z - mean) / (std + 1e-7) for both nets, then KL at base temperature T",
    .paper = "Sun, Ren, Li, Wang, Cao: Logit Standardization in Knowledge Distillation, CVPR 2024",
    .gamma = 0.1f,
    .alpha = 0.0f,
    .beta = 9.0f,
    .T = 2.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__lskd_arg_table),
    .args_size = sizeof(kd__lskd_args),
    .setup = kd__lskd_setup,
    .term = kd__lskd_term,
};
