/* Evaluation, shared by training runs, kd eval and the feature-based
 * evaluations: a dataset's normalisation statistics (kd_dataset_norm), the
 * top-1/top-5 hit count (torch.topk's tie order; unlabeled rows skipped), the
 * evaluation pass over a dataset in eval mode without gradients
 * (kd__eval_pass, sharded over data-parallel ranks) and top-1 / top-5 /
 * cross-entropy on it (kd_evaluate). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd/dist.h"
#include "kd/train.h"
#include "train/train_impl.h"

void kd_dataset_norm(const kd_dataset *ds, float mean[4], float std[4]) {
    static const float c100m[3] = {0.5071f, 0.4867f, 0.4408f}, c100s[3] = {0.2675f, 0.2565f, 0.2761f};
    static const float c10m[3] = {0.4914f, 0.4822f, 0.4465f}, c10s[3] = {0.2470f, 0.2435f, 0.2616f};
    const char *name = kd_dataset_name(ds);
    int c = kd_dataset_channels(ds);
    for (int i = 0; i < 4; i++) mean[i] = 0.0f, std[i] = 1.0f;
    if (c == 3 && name && (strstr(name, "cifar-100") || strstr(name, "cifar100"))) {
        memcpy(mean, c100m, sizeof c100m);
        memcpy(std, c100s, sizeof c100s);
        return;
    }
    if (c == 3 && name && (strstr(name, "cifar-10") || strstr(name, "cifar10"))) {
        memcpy(mean, c10m, sizeof c10m);
        memcpy(std, c10s, sizeof c10s);
        return;
    }
    /* Images read on demand: statistics of an even sample of up to 2000. */
    if (kd_dataset_is_lazy(ds)) {
        if (kd_dataset_channel_stats(ds, 2000, mean, std) != KD_OK)
            for (int i = 0; i < 4; i++) mean[i] = 0.0f, std[i] = 1.0f;
        return;
    }
    /* Anything else: the dataset's own per-channel statistics. */
    int64_t n = kd_dataset_size(ds), hw = (int64_t)kd_dataset_height(ds) * kd_dataset_width(ds);
    for (int ch = 0; ch < c && ch < 4; ch++) {
        double s = 0, s2 = 0;
        for (int64_t i = 0; i < n; i++) {
            const uint8_t *p = kd_dataset_image(ds, i) + ch * hw;
            uint64_t a = 0, a2 = 0;
            for (int64_t j = 0; j < hw; j++) a += p[j], a2 += (uint64_t)p[j] * p[j];
            s += (double)a;
            s2 += (double)a2;
        }
        double cnt = (double)n * (double)hw, mu = s / cnt / 255.0;
        double var = s2 / cnt / (255.0 * 255.0) - mu * mu;
        mean[ch] = (float)mu;
        std[ch] = var > 1e-12 ? (float)sqrt(var) : 1.0f;
    }
}

/* Top-1 and top-5 hits of logits (n, k) against labels (train_impl.h). */
void kd__count_hits(const float *logits, const int32_t *y, int64_t n, int64_t k, int64_t *top1, int64_t *top5,
                    int64_t *counted) {
    for (int64_t i = 0; i < n; i++) {
        if (y[i] < 0 || y[i] >= k) continue; /* an unlabeled image (-1) */
        if (counted) (*counted)++;
        const float *r = logits + i * k;
        float ly = r[y[i]];
        int64_t rank = 0; /* classes strictly better, ties broken by index as torch.topk does on CPU */
        for (int64_t j = 0; j < k; j++)
            if (r[j] > ly || (r[j] == ly && j < y[i])) rank++;
        if (rank == 0) (*top1)++;
        if (rank < 5) (*top5)++;
    }
}

kd_status kd__eval_pass(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch, const kd_transform_cfg *tf,
                        int sharded, kd__eval_fn fn, void *user) {
    kd_loader_cfg lc = {.batch_size = batch, .shuffle = 0, .num_workers = 1, .transform = *tf};
    if (sharded) {
        lc.shard_rank = kd_dist_rank();
        lc.shard_count = kd_dist_size();
    }
    lc.transform.pad_crop = 0;
    lc.transform.hflip = 0;
    kd_loader *ld = NULL;
    kd_graph *g = NULL;
    KD_TRY(kd_loader_init(&ld, ds, &lc));
    kd_status s = kd_graph_init(&g, be);
    if (s != KD_OK) {
        kd_loader_free(ld);
        return s;
    }
    int was_training = kd_model_training(m);
    kd_model_set_training(m, 0);
    kd_graph_set_grad_enabled(g, 0);
    int C, H, W;
    kd_loader_sample_shape(ld, &C, &H, &W);
    kd_batch b;
    int r = 0;
    s = kd_loader_start_epoch(ld, 0);
    while (s == KD_OK && (r = kd_loader_next(ld, &b)) == 1) {
        if (b.n == 0) continue; /* this rank's share of a short last batch */
        kd_graph_reset(g);
        int64_t xs[4] = {b.n, C, H, W};
        kd_tensor *x = kd_graph_wrap(g, KD_F32, 4, xs, b.x);
        kd_model_out o;
        s = kd_model_forward(m, g, x, 0, &o);
        if (s != KD_OK) break;
        s = fn(user, &b, g, &o);
    }
    if (s == KD_OK && r < 0) s = (kd_status)r;
    kd_model_set_training(m, was_training);
    kd_graph_free(g);
    kd_loader_free(ld);
    return s;
}

typedef struct {
    int64_t h1, h5, seen;
    double lsum;
} kd__eval_acc;

static kd_status kd__eval_acc_batch(void *user, const kd_batch *b, kd_graph *g, const kd_model_out *o) {
    kd__eval_acc *a = user;
    kd_tensor *y = kd_graph_wrap(g, KD_I32, 1, &b->n, b->y);
    kd_tensor *ce = kd_cross_entropy(g, o->logits, y, 0.0f);
    KD_TRY(kd_graph_status(g));
    a->lsum += (double)kd_f32(ce)[0] * (double)b->n;
    kd__count_hits(kd_f32(o->logits), b->y, b->n, o->logits->shape[1], &a->h1, &a->h5, NULL);
    a->seen += b->n;
    return KD_OK;
}

kd_status kd__evaluate(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch, const kd_transform_cfg *tf,
                       int sharded, double *top1, double *top5, double *loss) {
    kd__eval_acc a = {0};
    KD_TRY(kd__eval_pass(m, be, ds, batch, tf, sharded, kd__eval_acc_batch, &a));
    double sums[4] = {(double)a.h1, (double)a.h5, a.lsum, (double)a.seen};
    if (sharded) KD_TRY(kd_dist_allreduce_f64(sums, 4));
    if (sums[3] == 0) return kd_error(KD_ERR_INVALID, "evaluation set '%s' is empty", kd_dataset_name(ds));
    *top1 = 100.0 * sums[0] / sums[3];
    *top5 = 100.0 * sums[1] / sums[3];
    *loss = sums[2] / sums[3];
    return KD_OK;
}

kd_status kd_evaluate(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch,
                      const kd_transform_cfg *tf, double *top1, double *top5, double *loss) {
    return kd__evaluate(m, be, ds, batch, tf, 0, top1, top5, loss);
}
