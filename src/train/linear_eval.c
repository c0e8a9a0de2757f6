/* Linear evaluation on precomputed features: a linear classifier (PyTorch
 * nn.Linear layout, weight N(0, 0.01) and bias 0 as DINO's and MoCo's
 * main_lincls.py) trained with kd's SGD (kd_optim), cross-entropy through
 * the autograd graph, and the warm-up-free cosine schedule (kd_sched) per
 * step; each epoch's order is a Fisher-Yates shuffle keyed by (seed,
 * epoch). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd/eval.h"
#include "train/train_impl.h"

#define KD__LINEAR_TAG 0x4c494e454152ull /* "LINEAR" */

kd_linear_cfg kd_linear_defaults(void) {
    kd_linear_cfg c = {.epochs = 100, .batch_size = 256, .lr = 0.1, .momentum = 0.9, .weight_decay = 0.0, .seed = 0};
    return c;
}

/* Mean cross-entropy, top-1 and top-5 hits of the classifier on (x, y). */
static kd_status kd__linear_test(kd_graph *g, kd_tensor *W, kd_tensor *B, const float *x, const int32_t *y, int64_t n,
                                 int64_t dim, int64_t block, double *loss, int64_t *h1, int64_t *h5) {
    int was = kd_graph_set_grad_enabled(g, 0);
    double lsum = 0;
    kd_status s = KD_OK;
    for (int64_t i0 = 0; i0 < n && s == KD_OK; i0 += block) {
        int64_t m = n - i0 < block ? n - i0 : block;
        kd_graph_reset(g);
        int64_t xs[2] = {m, dim};
        kd_tensor *xt = kd_graph_wrap(g, KD_F32, 2, xs, (void *)(x + i0 * dim));
        kd_tensor *yt = kd_graph_wrap(g, KD_I32, 1, &m, (void *)(y + i0));
        kd_tensor *logits = kd_linear(g, xt, W, B);
        kd_tensor *ce = kd_cross_entropy(g, logits, yt, 0.0f);
        if ((s = kd_graph_status(g)) != KD_OK) break;
        lsum += (double)kd_f32(ce)[0] * (double)m;
        kd__count_hits(kd_f32(logits), y + i0, m, logits->shape[1], h1, h5, NULL);
    }
    kd_graph_set_grad_enabled(g, was);
    *loss = lsum / (double)n;
    return s;
}

kd_status kd_linear_eval(const kd_linear_cfg *c, kd_backend *be, const float *train, const int32_t *train_labels,
                         int64_t n_train, const float *test, const int32_t *test_labels, int64_t n_test,
                         int64_t dim, int classes, double *epoch_loss, float *weight, float *bias,
                         kd_linear_result *res) {
    memset(res, 0, sizeof *res);
    if (c->epochs < 1) return kd_error(KD_ERR_INVALID, "linear evaluation: epochs must be >= 1, got %d", c->epochs);
    if (c->batch_size < 1)
        return kd_error(KD_ERR_INVALID, "linear evaluation: batch_size must be >= 1, got %d", c->batch_size);
    if (!(c->lr > 0) || !isfinite(c->lr))
        return kd_error(KD_ERR_INVALID, "linear evaluation: lr must be > 0, got %g", c->lr);
    if (n_train < 1 || n_test < 1 || dim < 1 || classes < 1)
        return kd_error(KD_ERR_INVALID, "linear evaluation: %lld training and %lld test rows of %lld features, %d classes",
                        (long long)n_train, (long long)n_test, (long long)dim, classes);
    for (int64_t i = 0; i < n_train; i++)
        if (train_labels[i] < 0 || train_labels[i] >= classes)
            return kd_error(KD_ERR_INVALID, "linear evaluation: training image %lld has label %d, outside [0, %d)",
                            (long long)i, train_labels[i], classes);
    for (int64_t i = 0; i < n_test; i++)
        if (test_labels[i] < 0 || test_labels[i] >= classes)
            return kd_error(KD_ERR_INVALID, "linear evaluation: test image %lld has label %d, outside [0, %d)",
                            (long long)i, test_labels[i], classes);
    const int64_t B = c->batch_size < n_train ? c->batch_size : n_train;
    kd_param_list pl = {0};
    kd_tensor *W = NULL, *Bias = NULL;
    kd_optim *opt = NULL;
    kd_graph *g = NULL;
    int64_t *perm = malloc((size_t)n_train * sizeof *perm);
    float *xb = malloc((size_t)(B * dim) * sizeof *xb);
    int32_t *yb = malloc((size_t)B * sizeof *yb);
    kd_status s = (perm && xb && yb) ? KD_OK : kd_error(KD_ERR_NOMEM, "linear evaluation: out of memory");
    int64_t ws[2] = {classes, dim}, bs = classes;
    if (s == KD_OK) s = kd_params_new(&pl, "", "weight", KD_F32, 2, ws, KD_PARAM_WEIGHT, &W);
    if (s == KD_OK) s = kd_params_new(&pl, "", "bias", KD_F32, 1, &bs, KD_PARAM_NO_DECAY, &Bias);
    if (s == KD_OK) {
        kd_rng r;
        kd_rng_init(&r, c->seed, kd_rng_key(KD__LINEAR_TAG, 0));
        kd_init_normal(W, 0.01f, &r);
        kd_init_constant(Bias, 0.0f);
        kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_SGD);
        oc.lr = c->lr;
        oc.momentum = c->momentum;
        oc.weight_decay = c->weight_decay;
        kd_param_group grp = {"", &pl, 1.0f};
        s = kd_optim_init(&opt, &grp, 1, &oc);
    }
    if (s == KD_OK) s = kd_graph_init(&g, be);
    const int64_t steps = (n_train + B - 1) / B;
    kd_sched sch = {.kind = KD_SCHED_COSINE, .base_lr = (float)c->lr, .epochs = c->epochs};
    double lsum = 0;
    for (int epoch = 0; s == KD_OK && epoch < c->epochs; epoch++) {
        for (int64_t i = 0; i < n_train; i++) perm[i] = i;
        kd_rng r;
        kd_rng_init(&r, c->seed, kd_rng_key(KD__LINEAR_TAG, (uint64_t)epoch + 1));
        for (int64_t i = n_train - 1; i > 0; i--) {
            int64_t j = (int64_t)kd_rng_below(&r, (uint32_t)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        lsum = 0;
        for (int64_t step = 0; s == KD_OK && step < steps; step++) {
            int64_t i0 = step * B, m = n_train - i0 < B ? n_train - i0 : B;
            for (int64_t i = 0; i < m; i++) {
                memcpy(xb + i * dim, train + perm[i0 + i] * dim, (size_t)dim * sizeof *xb);
                yb[i] = train_labels[perm[i0 + i]];
            }
            kd_graph_reset(g);
            int64_t xs[2] = {m, dim};
            kd_tensor *xt = kd_graph_wrap(g, KD_F32, 2, xs, xb);
            kd_tensor *yt = kd_graph_wrap(g, KD_I32, 1, &m, yb);
            kd_tensor *loss = kd_cross_entropy(g, kd_linear(g, xt, W, Bias), yt, 0.0f);
            kd_optim_zero_grad(opt);
            s = kd_backward(g, loss);
            if (s != KD_OK) break;
            double l = (double)kd_f32(loss)[0];
            if (!isfinite(l)) {
                s = kd_error(KD_ERR_NUMERIC, "linear evaluation: the loss is %g at epoch %d, step %lld; lower lr (%g)",
                             l, epoch, (long long)step, c->lr);
                break;
            }
            lsum += l * (double)m;
            kd_optim_set_lr(opt, kd_sched_lr(&sch, epoch, step, steps));
            s = kd_optim_step(opt);
        }
        if (s == KD_OK && epoch_loss) epoch_loss[epoch] = lsum / (double)n_train;
    }
    if (s == KD_OK) {
        res->train_loss = lsum / (double)n_train;
        int64_t h1 = 0, h5 = 0;
        s = kd__linear_test(g, W, Bias, test, test_labels, n_test, dim, 1024, &res->test_loss, &h1, &h5);
        res->top1 = 100.0 * (double)h1 / (double)n_test;
        res->top5 = 100.0 * (double)h5 / (double)n_test;
    }
    if (s == KD_OK && weight) memcpy(weight, kd_f32(W), (size_t)(classes * dim) * sizeof *weight);
    if (s == KD_OK && bias) memcpy(bias, kd_f32(Bias), (size_t)classes * sizeof *bias);
    kd_graph_free(g);
    kd_optim_free(opt);
    kd_params_free(&pl);
    free(perm);
    free(xb);
    free(yb);
    return s;
}
