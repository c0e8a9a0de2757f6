/*
 * kd/eval.h: evaluation of a trained network's features (`kd eval --knn`,
 * `kd eval --linear`). The features of an image are the model's pooled
 * embedding, kd_model_out.feat[n_feat - 1] (what its classifier reads),
 * computed in eval mode with the evaluation transform (no crop, no flip).
 *
 *   kNN (DINO's eval_knn.py, METHODS.md section 15): rows L2-normalised,
 *   cosine similarity of each test image to every training image, the k most
 *   similar training images vote for their class with weight exp(sim / T)
 *   (T 0.07); the class with the largest sum is the prediction; top-1 and
 *   top-5 per k (k 20 and 200 by default).
 *   Linear evaluation: the backbone frozen; features computed once with the
 *   evaluation transform; a linear classifier (weight N(0, 0.01), bias 0, as
 *   DINO's and MoCo's) trained with SGD (momentum 0.9, weight decay 0,
 *   cosine schedule per step to 0), test top-1 and top-5.
 *
 * Usage:
 *     float *tr, *te; int64_t d;
 *     kd_extract_features(m, be, train, 256, &tf, &tr, &d);
 *     kd_extract_features(m, be, test, 256, &tf, &te, &d);
 *     kd_l2_normalize_rows(tr, n_train, d);
 *     kd_l2_normalize_rows(te, n_test, d);
 *     kd_knn_cfg kc = {.train = tr, .train_labels = kd_dataset_labels(train), .n_train = n_train,
 *                      .dim = d, .classes = 10, .n_k = 2, .k = {20, 200}, .temperature = 0.07};
 *     kd_knn_result kr;
 *     kd_knn_eval(&kc, te, kd_dataset_labels(test), n_test, &kr);   // kr.top1[0]: k = 20
 *
 * Determinism. The similarity of a (query, training) pair is one dot
 * product summed in a fixed order (eight interleaved partial sums, combined
 * pairwise), whatever the blocking and the thread count; rows are split over
 * threads only. Ties: among equally similar training images the one with the
 * smaller dataset index is the nearer; among classes of equal score the
 * smaller class index ranks first (torch.topk on CPU). So kNN results are
 * identical for any thread count and block size. The linear classifier's
 * data order is drawn from (seed, epoch); its result is bit-identical from
 * run to run for a fixed thread count (as kd's training).
 */
#ifndef KD_EVAL_H
#define KD_EVAL_H

#include "kd/train.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The pooled embedding of every sample of ds, in dataset order: *feat
 * (malloc'd, (N, *dim) row-major float32). tf: the evaluation transform
 * (normalisation, output size; its crop and flip are not applied); m runs in
 * eval mode with gradients off (its mode is restored after). */
kd_status kd_extract_features(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch,
                              const kd_transform_cfg *tf, float **feat, int64_t *dim);

/* x[i] /= max(||x[i]||, 1e-12) for each of the n rows (F.normalize); a row
 * holding a NaN or an infinity is KD_ERR_NUMERIC naming the row. */
kd_status kd_l2_normalize_rows(float *x, int64_t n, int64_t dim);

#define KD_KNN_MAX_K 16
/* kd_eval_cfg.ckpt naming no file: the architecture `arch` at random
 * initialisation (the seed), the baseline of self-supervised evaluation. */
#define KD_EVAL_RANDOM_INIT "random"

typedef struct {
    const float *train;          /* (n_train, dim), rows L2-normalised */
    const int32_t *train_labels; /* (n_train), each in [0, classes) */
    int64_t n_train;
    int64_t dim;
    int classes;
    int n_k;                     /* neighbour counts asked for, 1..KD_KNN_MAX_K */
    int k[KD_KNN_MAX_K];         /* each in [1, n_train] */
    double temperature;          /* > 0; DINO: 0.07 */
    /* Blocking (0: defaults 256 and 1024): the similarities are computed for
     * query_block test rows at a time against train_block training rows, so
     * memory is bounded by query_block * (max k + classes * n_k) whatever the
     * sizes. Results do not depend on them. */
    int64_t query_block, train_block;
} kd_knn_cfg;

/* KD_ERR_INVALID naming the value: no k, a k < 1 or > n_train ("k 200 is
 * larger than the training set (128 images)"), temperature <= 0, a label
 * outside [0, classes), dim < 1. */
kd_status kd_knn_check(const kd_knn_cfg *c);

/* The weighted votes: scores[(i * n_k + j) * classes + y] = sum of
 * exp(sim / T) (double) over the k[j] training images nearest to query row
 * i whose label is y. neighbors (optional, (n_query, max k)): their dataset
 * indices, nearest first. */
kd_status kd_knn_scores(const kd_knn_cfg *c, const float *query, int64_t n_query, double *scores,
                        int64_t *neighbors);

typedef struct {
    double top1[KD_KNN_MAX_K], top5[KD_KNN_MAX_K]; /* percent, per k[j] */
} kd_knn_result;

/* Top-1 and top-5 accuracy (percent) of the kNN vote on the n_query rows. */
kd_status kd_knn_eval(const kd_knn_cfg *c, const float *query, const int32_t *query_labels, int64_t n_query,
                      kd_knn_result *res);

typedef struct {
    int epochs;          /* default 100 (DINO, MoCo) */
    int batch_size;      /* default 256 */
    double lr;           /* default 0.1 (SimCLR's linear evaluation: 0.1 x B / 256) */
    double momentum;     /* 0.9 */
    double weight_decay; /* 0 */
    uint64_t seed;       /* initialisation and data order */
} kd_linear_cfg;

kd_linear_cfg kd_linear_defaults(void);

typedef struct {
    double top1, top5, test_loss; /* percent; mean cross-entropy */
    double train_loss;            /* mean cross-entropy of the last epoch */
} kd_linear_result;

/* Trains a linear classifier (classes x dim, with bias) on the training
 * features and reports it on the test features. epoch_loss (optional,
 * (epochs)): each epoch's mean training loss; weight (classes, dim) and bias
 * (classes), optional: the classifier. */
kd_status kd_linear_eval(const kd_linear_cfg *c, kd_backend *be, const float *train, const int32_t *train_labels,
                         int64_t n_train, const float *test, const int32_t *test_labels, int64_t n_test,
                         int64_t dim, int classes, double *epoch_loss, float *weight, float *bias,
                         kd_linear_result *res);

/* -------------------------------------------------------------- the run */

typedef enum { KD_EVAL_KNN = 1, KD_EVAL_LINEAR = 2 } kd_eval_mode;

typedef struct {
    kd_eval_mode mode;
    char ckpt[512];   /* KD_EVAL_RANDOM_INIT: arch at random initialisation (seed) */
    char arch[48];    /* empty: the checkpoint's own */
    char data[512];
    char out[512];    /* run directory */
    char labels[512]; /* linear: a label subset of the training set (kd_dataset_label_subset); "" all */
    char backend[16];
    int eval_batch;   /* feature extraction batch */
    int threads;      /* 0: all cores */
    int n_k, k[KD_KNN_MAX_K];
    double temperature;
    kd_linear_cfg linear;
} kd_eval_cfg;

/* kNN with k 20 and 200, T 0.07; linear defaults; Fashion-MNIST; cpu; batch 256. */
void kd_eval_cfg_defaults(kd_eval_cfg *c);

typedef struct {
    kd_knn_result knn;
    kd_linear_result linear;
    int64_t n_train, n_test, dim;
    double feature_s, wall_s;
    int config_error; /* refused before any feature was computed: a bad setting or checkpoint
                         architecture, a k larger than the training set, a label subset the data
                         cannot give, an existing result in out (a bad command line) */
} kd_eval_result;

/* Evaluates c->ckpt's features on c->data and writes the run directory
 * c->out: config.yaml (the settings), metrics.jsonl (kNN: one record per k;
 * linear: one per epoch, then the test record), summary.json (accuracies,
 * sizes, times, versions) and, with a label subset, labels.txt; each file
 * atomically. An out that already holds summary.json is refused. */
kd_status kd_eval_run(const kd_eval_cfg *c, kd_eval_result *res);

#ifdef __cplusplus
}
#endif
#endif /* KD_EVAL_H */
