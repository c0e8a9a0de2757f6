/* Feature evaluation (kd/eval.h): kNN classification against a numpy
 * reference written from METHODS.md section 15 (tools/gen_knn_fixtures.py:
 * an exact case on a dyadic grid with many exact ties, where neighbour
 * lists and predictions must match exactly, and a random L2-normalised
 * case); the result the same for any blocking and thread count on many
 * rows; row normalisation as F.normalize; the refusals of k; linear
 * evaluation on a small separable problem (high accuracy, bit-identical
 * across runs, another seed differs); features of a model equal its own
 * forward's pooled embedding. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/eval.h"
#include "kd/io.h"
#include "testutil.h"

/* ------------------------------------------------------------ fixtures */

typedef struct {
    kd_st_file *f;
    const float *train, *query, *scores, *raw;
    const int32_t *train_labels, *query_labels, *k, *pred, *hits1, *hits5, *neighbors;
    int64_t n_train, n_query, dim;
    int classes, n_k;
    double T;
} knn_case;

static const void *entry(kd_st_file *f, const char *c, const char *name, kd_dtype dt, int64_t *shape0,
                         int64_t *shape1) {
    const kd_st_entry *e = kd_test_st_entry(f, "%s.%s", c, name);
    if (e->dtype != dt) fail_msg("%s.%s: dtype %d", c, name, (int)e->dtype);
    if (shape0) *shape0 = e->shape[0];
    if (shape1) *shape1 = e->ndim > 1 ? e->shape[1] : 1;
    return e->data;
}

static knn_case load_case(const char *c) {
    knn_case k;
    memset(&k, 0, sizeof k);
    k.f = kd_test_st_open(KD_FIXTURE("knn.safetensors"));
    int64_t nk;
    k.train = entry(k.f, c, "train", KD_F32, &k.n_train, &k.dim);
    k.query = entry(k.f, c, "query", KD_F32, &k.n_query, NULL);
    k.train_labels = entry(k.f, c, "train_labels", KD_I32, NULL, NULL);
    k.query_labels = entry(k.f, c, "query_labels", KD_I32, NULL, NULL);
    k.k = entry(k.f, c, "k", KD_I32, &nk, NULL);
    k.n_k = (int)nk;
    const kd_st_entry *s = kd_test_st_entry(k.f, "%s.scores", c);
    k.scores = s->data;
    k.classes = (int)s->shape[2];
    k.pred = entry(k.f, c, "pred", KD_I32, NULL, NULL);
    k.hits1 = entry(k.f, c, "hits1", KD_I32, NULL, NULL);
    k.hits5 = entry(k.f, c, "hits5", KD_I32, NULL, NULL);
    if (kd_st_find(k.f, "exact.neighbors") && !strcmp(c, "exact"))
        k.neighbors = entry(k.f, c, "neighbors", KD_I32, NULL, NULL);
    if (!strcmp(c, "random")) k.raw = entry(k.f, c, "raw", KD_F32, NULL, NULL);
    char key[64];
    snprintf(key, sizeof key, "%s.temperature", c);
    const char *t = kd_st_meta(k.f, key);
    assert_non_null(t);
    k.T = atof(t);
    return k;
}

static kd_knn_cfg case_cfg(const knn_case *k) {
    kd_knn_cfg c = {.train = k->train, .train_labels = k->train_labels, .n_train = k->n_train, .dim = k->dim,
                    .classes = k->classes, .n_k = k->n_k, .temperature = k->T};
    for (int j = 0; j < k->n_k; j++) c.k[j] = k->k[j];
    return c;
}

static int kmax_of(const kd_knn_cfg *c) {
    int m = 0;
    for (int j = 0; j < c->n_k; j++) m = c->k[j] > m ? c->k[j] : m;
    return m;
}

/* Argmax with ties to the smaller class. */
static int argmax_d(const double *r, int C) {
    int b = 0;
    for (int c = 1; c < C; c++)
        if (r[c] > r[b]) b = c;
    return b;
}

/* Scores, predictions and accuracies against the reference, for one blocking. */
static void check_case(const knn_case *k, int64_t qb, int64_t tb, double rtol, int exact_neighbors) {
    kd_knn_cfg c = case_cfg(k);
    c.query_block = qb;
    c.train_block = tb;
    int kmax = kmax_of(&c);
    double *sc = malloc((size_t)(k->n_query * k->n_k * k->classes) * sizeof *sc);
    int64_t *nb = malloc((size_t)(k->n_query * kmax) * sizeof *nb);
    KD_ASSERT_OK(kd_knn_scores(&c, k->query, k->n_query, sc, nb));
    int64_t n = k->n_query * k->n_k * k->classes;
    float *scf = malloc((size_t)n * sizeof *scf);
    for (int64_t i = 0; i < n; i++) scf[i] = (float)sc[i];
    KD_ASSERT_CLOSE(scf, k->scores, n, 1e-30, rtol, "knn scores");
    for (int64_t i = 0; i < k->n_query; i++)
        for (int j = 0; j < k->n_k; j++) {
            int p = argmax_d(sc + (i * k->n_k + j) * k->classes, k->classes);
            if (p != k->pred[i * k->n_k + j])
                fail_msg("query %lld, k %d: kd predicts class %d, the reference %d", (long long)i, k->k[j], p,
                         k->pred[i * k->n_k + j]);
        }
    if (exact_neighbors) {
        int nbs = 25 < kmax ? 25 : kmax;
        for (int64_t i = 0; i < k->n_query; i++)
            for (int r = 0; r < nbs; r++)
                if (nb[i * kmax + r] != k->neighbors[i * 25 + r])
                    fail_msg("query %lld: neighbour %d is %lld, the reference %d (ties go to the smaller index)",
                             (long long)i, r, (long long)nb[i * kmax + r], k->neighbors[i * 25 + r]);
    }
    kd_knn_result res;
    KD_ASSERT_OK(kd_knn_eval(&c, k->query, k->query_labels, k->n_query, &res));
    for (int j = 0; j < k->n_k; j++) {
        double w1 = 100.0 * k->hits1[j] / (double)k->n_query, w5 = 100.0 * k->hits5[j] / (double)k->n_query;
        if (res.top1[j] != w1 || res.top5[j] != w5)
            fail_msg("k %d: top1 %g top5 %g, the reference %g %g", k->k[j], res.top1[j], res.top5[j], w1, w5);
    }
    free(sc);
    free(nb);
    free(scf);
}

static void test_knn_exact_ties(void **state) {
    (void)state;
    knn_case k = load_case("exact");
    check_case(&k, 0, 0, 2e-7, 1);
    check_case(&k, 7, 33, 2e-7, 1); /* blocks that divide neither size */
    check_case(&k, 1, 1, 2e-7, 1);
    kd_st_close(k.f);
}

static void test_knn_random(void **state) {
    (void)state;
    knn_case k = load_case("random");
    check_case(&k, 0, 0, 2e-5, 0);
    check_case(&k, 16, 77, 2e-5, 0);
    kd_st_close(k.f);
}

/* kd_l2_normalize_rows against the fixture's F.normalize in float32. */
static void test_l2_normalize(void **state) {
    (void)state;
    knn_case k = load_case("random");
    int64_t n = k.n_query * k.dim;
    float *x = malloc((size_t)n * sizeof *x);
    memcpy(x, k.raw, (size_t)n * sizeof *x);
    KD_ASSERT_OK(kd_l2_normalize_rows(x, k.n_query, k.dim));
    KD_ASSERT_CLOSE(x, k.query, n, 1e-7, 1e-6, "normalised rows");
    /* A zero row stays zero (eps 1e-12); a NaN row is refused, naming it. */
    float z[6] = {0, 0, 0, 1, NAN, 2};
    assert_int_equal(kd_l2_normalize_rows(z, 2, 3), KD_ERR_NUMERIC);
    assert_non_null(strstr(kd_last_error(), "row 1"));
    assert_true(z[0] == 0 && z[1] == 0 && z[2] == 0);
    free(x);
    kd_st_close(k.f);
}

/* Many rows: results identical for any blocking and thread count, and the
 * memory bounded by the blocks (not by n_query * n_train). */
static void test_knn_many_rows_invariant(void **state) {
    (void)state;
    const int64_t n = 5000, q = 1000, d = 24;
    const int C = 9;
    float *tr = malloc((size_t)(n * d) * sizeof *tr), *qu = malloc((size_t)(q * d) * sizeof *qu);
    int32_t *lt = malloc((size_t)n * sizeof *lt), *lq = malloc((size_t)q * sizeof *lq);
    kd_test_fill_uniform(tr, n * d, -1, 1, 11);
    kd_test_fill_uniform(qu, q * d, -1, 1, 12);
    for (int64_t i = 0; i < n; i++) lt[i] = (int32_t)((i * 7) % C), tr[i * d + (i * 7) % C] += 4.0f;
    for (int64_t i = 0; i < q; i++) lq[i] = (int32_t)((i * 5) % C), qu[i * d + (i * 5) % C] += 4.0f;
    /* Duplicate rows: exact ties. */
    memcpy(tr + 4000 * d, tr, (size_t)(500 * d) * sizeof *tr);
    KD_ASSERT_OK(kd_l2_normalize_rows(tr, n, d));
    KD_ASSERT_OK(kd_l2_normalize_rows(qu, q, d));
    kd_knn_cfg c = {.train = tr, .train_labels = lt, .n_train = n, .dim = d, .classes = C, .n_k = 3,
                    .k = {1, 20, 200}, .temperature = 0.07};
    size_t ns = (size_t)(q * 3 * C);
    double *ref = malloc(ns * sizeof *ref), *got = malloc(ns * sizeof *got);
    int64_t *nref = malloc((size_t)(q * 200) * sizeof *nref), *ngot = malloc((size_t)(q * 200) * sizeof *ngot);
    kd_set_num_threads(1);
    KD_ASSERT_OK(kd_knn_scores(&c, qu, q, ref, nref));
    kd_knn_result r1, r2;
    KD_ASSERT_OK(kd_knn_eval(&c, qu, lq, q, &r1));
    kd_set_num_threads(2);
    static const int64_t blocks[][2] = {{0, 0}, {1, 4999}, {333, 129}, {2000, 10000}};
    for (size_t b = 0; b < sizeof blocks / sizeof blocks[0]; b++) {
        c.query_block = blocks[b][0];
        c.train_block = blocks[b][1];
        KD_ASSERT_OK(kd_knn_scores(&c, qu, q, got, ngot));
        if (memcmp(ref, got, ns * sizeof *ref) || memcmp(nref, ngot, (size_t)(q * 200) * sizeof *nref))
            fail_msg("blocks %lld x %lld with 2 threads differ from the default with 1 thread",
                     (long long)blocks[b][0], (long long)blocks[b][1]);
        KD_ASSERT_OK(kd_knn_eval(&c, qu, lq, q, &r2));
        assert_memory_equal(&r1, &r2, sizeof r1);
    }
    /* The features carry the label: kNN finds it. */
    assert_true(r1.top1[1] > 90.0);
    kd_set_num_threads(0);
    free(tr);
    free(qu);
    free(lt);
    free(lq);
    free(ref);
    free(got);
    free(nref);
    free(ngot);
}

static void test_knn_refusals(void **state) {
    (void)state;
    float tr[8] = {1, 0, 0, 1, 1, 0, 0, 1};
    int32_t lt[4] = {0, 1, 0, 1};
    kd_knn_cfg c = {.train = tr, .train_labels = lt, .n_train = 4, .dim = 2, .classes = 2, .n_k = 1, .k = {5},
                    .temperature = 0.07};
    assert_int_equal(kd_knn_check(&c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "k 5 is larger than the training set (4 images)"));
    c.k[0] = 0;
    assert_int_equal(kd_knn_check(&c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "k must be >= 1"));
    c.k[0] = -3;
    assert_int_equal(kd_knn_check(&c), KD_ERR_INVALID);
    c.k[0] = 4;
    KD_ASSERT_OK(kd_knn_check(&c));
    c.temperature = 0;
    assert_int_equal(kd_knn_check(&c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "temperature"));
    c.temperature = 0.07;
    lt[2] = -1;
    assert_int_equal(kd_knn_check(&c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "label -1"));
    lt[2] = 0;
    c.n_k = 0;
    assert_int_equal(kd_knn_check(&c), KD_ERR_INVALID);
}

/* ----------------------------------------------------- linear evaluation */

/* Four well-separated Gaussian classes in 8 dimensions. */
static void separable(int64_t n, uint64_t seed, float *x, int32_t *y) {
    kd_test_fill_uniform(x, n * 8, -0.5f, 0.5f, seed);
    for (int64_t i = 0; i < n; i++) {
        y[i] = (int32_t)(i % 4);
        x[i * 8 + y[i]] += 2.0f;
        x[i * 8 + 4 + y[i]] -= 1.0f;
    }
}

static void test_linear_separable(void **state) {
    (void)state;
    const int64_t n = 400, m = 200, d = 8;
    float *xt = malloc((size_t)(n * d) * sizeof *xt), *xs = malloc((size_t)(m * d) * sizeof *xs);
    int32_t *yt = malloc((size_t)n * sizeof *yt), *ys = malloc((size_t)m * sizeof *ys);
    separable(n, 1, xt, yt);
    separable(m, 2, xs, ys);
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("cpu", &be));
    kd_linear_cfg c = kd_linear_defaults();
    c.epochs = 20;
    c.batch_size = 32;
    c.seed = 3;
    float w1[32], b1[4], w2[32], b2[4], w3[32], b3[4];
    double l1[20], l2[20];
    kd_linear_result r1, r2, r3;
    KD_ASSERT_OK(kd_linear_eval(&c, be, xt, yt, n, xs, ys, m, d, 4, l1, w1, b1, &r1));
    KD_ASSERT_OK(kd_linear_eval(&c, be, xt, yt, n, xs, ys, m, d, 4, l2, w2, b2, &r2));
    assert_true(r1.top1 >= 98.0);
    assert_true(r1.top5 == 100.0);
    assert_true(l1[19] < l1[0]); /* it learns */
    assert_memory_equal(w1, w2, sizeof w1);
    assert_memory_equal(b1, b2, sizeof b1);
    assert_memory_equal(l1, l2, sizeof l1);
    assert_memory_equal(&r1, &r2, sizeof r1);
    c.seed = 4;
    KD_ASSERT_OK(kd_linear_eval(&c, be, xt, yt, n, xs, ys, m, d, 4, NULL, w3, b3, &r3));
    assert_true(memcmp(w1, w3, sizeof w1) != 0);
    /* Refusals name the setting. */
    c.lr = 0;
    assert_int_equal(kd_linear_eval(&c, be, xt, yt, n, xs, ys, m, d, 4, NULL, NULL, NULL, &r3), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "lr"));
    c.lr = 0.1;
    yt[7] = 4;
    assert_int_equal(kd_linear_eval(&c, be, xt, yt, n, xs, ys, m, d, 4, NULL, NULL, NULL, &r3), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "training image 7"));
    free(xt);
    free(xs);
    free(yt);
    free(ys);
}

/* ---------------------------------------------------------------- features */

/* kd_extract_features equals the pooled embedding of a direct eval forward. */
static void test_features_are_pooled_embedding(void **state) {
    (void)state;
    const int64_t n = 10;
    uint8_t img[10 * 64];
    int32_t lab[10];
    for (int i = 0; i < 10 * 64; i++) img[i] = (uint8_t)((i * 37) % 251);
    for (int i = 0; i < 10; i++) lab[i] = i % 3;
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_from_memory("tiny", n, 1, 8, 8, img, lab, 3, &ds));
    kd_model *m = NULL;
    kd_model_cfg mc = {.in_channels = 1, .num_classes = 3, .seed = 5};
    KD_ASSERT_OK(kd_model_create("resnet8", &mc, &m));
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    kd_transform_cfg tf = {.normalize = 1, .mean = {0.5f}, .std = {0.25f}, .pad_crop = 2, .hflip = 1};
    float *feat = NULL;
    int64_t dim = 0;
    KD_ASSERT_OK(kd_extract_features(m, be, ds, 4, &tf, &feat, &dim));
    assert_int_equal(dim, kd_model_feat_dim(m));
    assert_true(kd_model_training(m)); /* the mode is restored */
    /* Direct: (x / 255 - 0.5) / 0.25, eval mode, last feature. */
    float *x = malloc((size_t)(n * 64) * sizeof *x);
    for (int i = 0; i < n * 64; i++) x[i] = ((float)img[i] / 255.0f - 0.5f) / 0.25f;
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    kd_graph_set_grad_enabled(g, 0);
    kd_model_set_training(m, 0);
    int64_t xs[4] = {n, 1, 8, 8};
    kd_model_out o;
    KD_ASSERT_OK(kd_model_forward(m, g, kd_graph_wrap(g, KD_F32, 4, xs, x), 0, &o));
    kd_tensor *f = kd_graph_to_strided(g, o.feat[o.n_feat - 1]);
    KD_ASSERT_CLOSE(feat, kd_f32(f), n * dim, 1e-5, 1e-5, "features");
    kd_graph_free(g);
    kd_model_free(m);
    kd_dataset_free(ds);
    free(x);
    free(feat);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_knn_exact_ties),
        cmocka_unit_test(test_knn_random),
        cmocka_unit_test(test_l2_normalize),
        cmocka_unit_test(test_knn_many_rows_invariant),
        cmocka_unit_test(test_knn_refusals),
        cmocka_unit_test(test_linear_separable),
        cmocka_unit_test(test_features_are_pooled_embedding),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
