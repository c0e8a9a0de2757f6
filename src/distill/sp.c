/* Similarity-preserving distillation (Tung and Mori, ICCV 2019) as RepDistiller
 * runs it (distiller_zoo/SP.py Similarity, helper/loops.py for the wiring:
 * g_s = [feat_s[-2]], scripts/run_cifar_distill.sh for the weights):
 *
 *     G(f)  = normalize(f f^T) row-wise, f viewed (N, -1)       (F.normalize, eps 1e-12)
 *     term  = sum((G(f_t) - G(f_s))^2) / N^2
 *
 * on the last feature map, with L = 1 * CE + 3000 * term. Composed from the
 * library's ops (matmul, l2_normalize, mse: the mean over the N x N entries is
 * the official sum / N^2). */
#include <stdio.h>

#include "distill/methods.h"

typedef struct {
    int layer; /* feature index (negative counts from the end) */
} kd__sp_args;

static const kd_method_arg kd__sp_arg_table[] = {
    KD__ARG(kd__sp_args, layer, KD_ARG_INT, "-2",
            "feature index on both nets (RepDistiller uses feat[-2], the last map; negative counts from the end)"),
};

static kd_status kd__sp_setup(kd_method *m, const kd_method_shapes *shp) {
    const kd__sp_args *a = kd_method_args(m);
    return kd__feat_indices(shp, a->layer, "sp.layer", NULL, NULL);
}

/* Row-normalised Gram matrix (N, N) of f viewed (N, -1). */
static kd_tensor *kd__sp_gram(kd_graph *g, kd_tensor *f) {
    if (!f) return NULL;
    int64_t n = f->shape[0], d = kd_tensor_numel(f) / (n ? n : 1);
    int64_t s2[2] = {n, d};
    kd_tensor *x = kd_reshape(g, f, 2, s2);
    return kd_l2_normalize(g, kd_matmul(g, x, kd_transpose(g, x, 0, 1)), 1e-12f);
}

static kd_status kd__sp_term(kd_method *m, kd_step_ctx *ctx, kd_tensor **out) {
    const kd__sp_args *a = kd_method_args(m);
    kd_graph *g = ctx->g;
    kd_tensor *fs, *ft;
    KD_TRY(kd__feat_pair(ctx, a->layer, "sp.layer", &fs, &ft));
    *out = kd_mse(g, kd__sp_gram(g, ft), kd__sp_gram(g, fs));
    return kd_graph_status(g);
}

const kd_method_def kd__method_sp = {
    .name = "sp",
    .summary = "similarity preserving: squared difference of row-normalised batch Gram matrices of feat[-2]",
    .paper = "Tung, Mori: Similarity-Preserving Knowledge Distillation, ICCV 2019",
    .gamma = 1.0f,
    .alpha = 0.0f,
    .beta = 3000.0f,
    .T = 4.0f,
    .teacher = KD_TEACHER_FROZEN,
    .labels = KD_LABELS_REQUIRED,
    .views = 1,
    .args = KD__ARGS(kd__sp_arg_table),
    .args_size = sizeof(kd__sp_args),
    .setup = kd__sp_setup,
    .term = kd__sp_term,
};
