/* Features of a dataset (the pooled embedding, through the evaluation pass
 * of kd_evaluate) and kNN classification on them (DINO's eval_knn.py):
 * cosine similarity, the k nearest training images, votes exp(sim / T).
 * Blocked so that memory stays bounded, split over threads by query row
 * only, so the result does not depend on the thread count (kd/eval.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd/eval.h"
#include "train/train_impl.h"

/* ------------------------------------------------------------- features */

typedef struct {
    float *feat;
    int64_t n, dim;
} kd__feat_ctx;

static kd_status kd__feat_batch(void *user, const kd_batch *b, kd_graph *g, const kd_model_out *o) {
    kd__feat_ctx *fc = user;
    if (o->n_feat < 1) return kd_error(KD_ERR_INVALID, "the model returns no features");
    kd_tensor *f = kd_graph_to_strided(g, o->feat[o->n_feat - 1]);
    KD_TRY(kd_graph_status(g));
    int64_t d = kd_tensor_numel(f) / b->n;
    if (fc->dim == 0) {
        fc->dim = d;
        fc->feat = malloc((size_t)(fc->n * d) * sizeof *fc->feat);
        if (!fc->feat) return kd_error(KD_ERR_NOMEM, "out of memory for %lld features of %lld values", (long long)fc->n,
                                       (long long)d);
    }
    if (d != fc->dim) return kd_error(KD_ERR_SHAPE, "feature size changed from %lld to %lld", (long long)fc->dim, (long long)d);
    for (int64_t i = 0; i < b->n; i++)
        memcpy(fc->feat + b->index[i] * d, kd_f32(f) + i * d, (size_t)d * sizeof(float));
    return KD_OK;
}

kd_status kd_extract_features(kd_model *m, kd_backend *be, const kd_dataset *ds, int batch,
                              const kd_transform_cfg *tf, float **feat, int64_t *dim) {
    *feat = NULL;
    *dim = 0;
    kd__feat_ctx fc = {NULL, kd_dataset_size(ds), 0};
    kd_status s = kd__eval_pass(m, be, ds, batch, tf, 0, kd__feat_batch, &fc);
    if (s == KD_OK && !fc.feat) s = kd_error(KD_ERR_INVALID, "dataset '%s' is empty", kd_dataset_name(ds));
    if (s != KD_OK) {
        free(fc.feat);
        return s;
    }
    *feat = fc.feat;
    *dim = fc.dim;
    return KD_OK;
}

kd_status kd_l2_normalize_rows(float *x, int64_t n, int64_t dim) {
    for (int64_t i = 0; i < n; i++) {
        float *r = x + i * dim;
        double ss = 0;
        for (int64_t k = 0; k < dim; k++) ss += (double)r[k] * r[k];
        if (!isfinite(ss))
            return kd_error(KD_ERR_NUMERIC, "feature row %lld is not finite (NaN or infinity)", (long long)i);
        /* F.normalize: x / max(||x||, eps), the norm in float32. */
        float nrm = (float)sqrt(ss);
        float den = nrm > 1e-12f ? nrm : 1e-12f;
        for (int64_t k = 0; k < dim; k++) r[k] /= den;
    }
    return KD_OK;
}

/* ------------------------------------------------------------------ kNN */

#define KD__KNN_QB 256
#define KD__KNN_TB 1024

static int kd__kmax(const kd_knn_cfg *c) {
    int m = 0;
    for (int j = 0; j < c->n_k; j++)
        if (c->k[j] > m) m = c->k[j];
    return m;
}

kd_status kd_knn_check(const kd_knn_cfg *c) {
    if (c->n_k < 1 || c->n_k > KD_KNN_MAX_K)
        return kd_error(KD_ERR_INVALID, "knn: between 1 and %d values of k, got %d", KD_KNN_MAX_K, c->n_k);
    if (c->n_train < 1 || !c->train || !c->train_labels)
        return kd_error(KD_ERR_INVALID, "knn: no training features");
    if (c->dim < 1) return kd_error(KD_ERR_INVALID, "knn: feature size %lld", (long long)c->dim);
    if (c->classes < 1) return kd_error(KD_ERR_INVALID, "knn: %d classes", c->classes);
    for (int j = 0; j < c->n_k; j++) {
        if (c->k[j] < 1) return kd_error(KD_ERR_INVALID, "knn: k must be >= 1, got %d", c->k[j]);
        if (c->k[j] > c->n_train)
            return kd_error(KD_ERR_INVALID, "knn: k %d is larger than the training set (%lld images)", c->k[j],
                            (long long)c->n_train);
    }
    if (!(c->temperature > 0) || !isfinite(c->temperature))
        return kd_error(KD_ERR_INVALID, "knn: temperature must be > 0, got %g", c->temperature);
    for (int64_t i = 0; i < c->n_train; i++)
        if (c->train_labels[i] < 0 || c->train_labels[i] >= c->classes)
            return kd_error(KD_ERR_INVALID, "knn: training image %lld has label %d, outside [0, %d)", (long long)i,
                            c->train_labels[i], c->classes);
    return KD_OK;
}

/* The similarity: eight interleaved partial sums, combined pairwise. The
 * order is fixed, so a pair's value never depends on blocking or threads. */
static inline float kd__dot(const float *a, const float *b, int64_t d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[k + l] * b[k + l];
    for (int l = 0; k < d; k++, l++) acc[l] += a[k] * b[k];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* A candidate neighbour. a is worse than b (farther): smaller similarity,
 * or equal similarity and a larger dataset index. */
typedef struct {
    float s;
    int64_t i;
} kd__nb;

static inline int kd__worse(kd__nb a, kd__nb b) { return a.s < b.s || (a.s == b.s && a.i > b.i); }

/* A min-heap (worst at the root) of at most k neighbours. */
static void kd__heap_push(kd__nb *h, int *n, int k, kd__nb x) {
    if (*n < k) {
        int i = (*n)++;
        while (i > 0) {
            int p = (i - 1) / 2;
            if (!kd__worse(x, h[p])) break;
            h[i] = h[p];
            i = p;
        }
        h[i] = x;
        return;
    }
    if (!kd__worse(h[0], x)) return; /* not nearer than the farthest kept */
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        kd__nb wv = x;
        if (l < k && kd__worse(h[l], wv)) w = l, wv = h[l];
        if (r < k && kd__worse(h[r], wv)) w = r, wv = h[r];
        if (w == i) break;
        h[i] = h[w];
        i = w;
    }
    h[i] = x;
}

static int kd__nearer_first(const void *pa, const void *pb) {
    kd__nb a = *(const kd__nb *)pa, b = *(const kd__nb *)pb;
    return kd__worse(b, a) ? -1 : kd__worse(a, b) ? 1 : 0;
}

kd_status kd_knn_scores(const kd_knn_cfg *c, const float *query, int64_t n_query, double *scores,
                        int64_t *neighbors) {
    KD_TRY(kd_knn_check(c));
    const int kmax = kd__kmax(c);
    const int64_t QB = c->query_block > 0 ? c->query_block : KD__KNN_QB;
    const int64_t TB = c->train_block > 0 ? c->train_block : KD__KNN_TB;
    const int64_t d = c->dim;
    const int nk = c->n_k, C = c->classes;
    kd__nb *heap = malloc((size_t)(QB * kmax) * sizeof *heap);
    int *hn = malloc((size_t)QB * sizeof *hn);
    if (!heap || !hn) {
        free(heap);
        free(hn);
        return kd_error(KD_ERR_NOMEM, "knn: out of memory for %lld x %d neighbours", (long long)QB, kmax);
    }
    for (int64_t q0 = 0; q0 < n_query; q0 += QB) {
        const int64_t nq = n_query - q0 < QB ? n_query - q0 : QB;
        for (int64_t i = 0; i < nq; i++) hn[i] = 0;
        for (int64_t t0 = 0; t0 < c->n_train; t0 += TB) {
            const int64_t nt = c->n_train - t0 < TB ? c->n_train - t0 : TB;
            const float *tile = c->train + t0 * d;
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < nq; i++) {
                const float *q = query + (q0 + i) * d;
                kd__nb *h = heap + i * kmax;
                for (int64_t j = 0; j < nt; j++) {
                    kd__nb x = {kd__dot(q, tile + j * d, d), t0 + j};
                    kd__heap_push(h, &hn[i], kmax, x);
                }
            }
        }
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < nq; i++) {
            kd__nb *h = heap + i * kmax;
            qsort(h, (size_t)hn[i], sizeof *h, kd__nearer_first);
            double *sc = scores + (q0 + i) * nk * C;
            for (int64_t v = 0; v < (int64_t)nk * C; v++) sc[v] = 0;
            /* Each k's sum in neighbour order, nearest first. */
            for (int j = 0; j < nk; j++)
                for (int r = 0; r < c->k[j]; r++)
                    sc[j * C + c->train_labels[h[r].i]] += exp((double)h[r].s / c->temperature);
            if (neighbors)
                for (int r = 0; r < kmax; r++) neighbors[(q0 + i) * kmax + r] = h[r].i;
        }
    }
    free(heap);
    free(hn);
    return KD_OK;
}

kd_status kd_knn_eval(const kd_knn_cfg *c, const float *query, const int32_t *query_labels, int64_t n_query,
                      kd_knn_result *res) {
    memset(res, 0, sizeof *res);
    KD_TRY(kd_knn_check(c));
    if (n_query < 1) return kd_error(KD_ERR_INVALID, "knn: no test features");
    for (int64_t i = 0; i < n_query; i++)
        if (query_labels[i] < 0 || query_labels[i] >= c->classes)
            return kd_error(KD_ERR_INVALID, "knn: test image %lld has label %d, outside [0, %d)", (long long)i,
                            query_labels[i], c->classes);
    const int64_t QB = c->query_block > 0 ? c->query_block : KD__KNN_QB;
    const int nk = c->n_k, C = c->classes;
    double *sc = malloc((size_t)(QB * nk * C) * sizeof *sc);
    if (!sc) return kd_error(KD_ERR_NOMEM, "knn: out of memory for the scores");
    int64_t h1[KD_KNN_MAX_K] = {0}, h5[KD_KNN_MAX_K] = {0};
    kd_status s = KD_OK;
    for (int64_t q0 = 0; q0 < n_query && s == KD_OK; q0 += QB) {
        int64_t nq = n_query - q0 < QB ? n_query - q0 : QB;
        s = kd_knn_scores(c, query + q0 * c->dim, nq, sc, NULL);
        for (int64_t i = 0; s == KD_OK && i < nq; i++) {
            int32_t y = query_labels[q0 + i];
            for (int j = 0; j < nk; j++) {
                const double *r = sc + (i * nk + j) * C;
                /* Classes ahead of the label: a larger score, or an equal one
                 * with a smaller index (as kd__count_hits). */
                int64_t rank = 0;
                for (int k = 0; k < C; k++)
                    if (r[k] > r[y] || (r[k] == r[y] && k < y)) rank++;
                h1[j] += rank == 0;
                h5[j] += rank < 5;
            }
        }
    }
    free(sc);
    if (s != KD_OK) return s;
    for (int j = 0; j < nk; j++) {
        res->top1[j] = 100.0 * (double)h1[j] / (double)n_query;
        res->top5[j] = 100.0 * (double)h5[j] / (double)n_query;
    }
    return KD_OK;
}
