/* CRD's pieces (src/distill/crd.h) against PyTorch and their own contracts:
 *   - the fused gather-and-dot NCE loss of one side and its gradient against
 *     RepDistiller's ContrastMemory + ContrastLoss on fixed random draws
 *     (tests/fixtures/crd_nce.safetensors, tools/gen_crd_fixtures.py): the
 *     first batch (Z set from it), a frozen Z, and queue mode (positives
 *     given, every queue row a negative); finite differences of the loss;
 *     both score paths (gather, dense GEMM) on every case;
 *   - memory: at the official sizes (B 64, K 16384, D 128, N 50000) a
 *     forward and backward keep far less than the 537 MB the official
 *     gather materialises, on both paths, which agree;
 *   - the sampler: the positive (exact: the image; relax: an image of its
 *     class), K distinct negatives, none of the anchor's class, every
 *     eligible image about equally likely, the same draw for the same
 *     (seed, key) under 1 and 2 threads and another for another key;
 *   - the method refuses what its sampler cannot do, naming the setting:
 *     nce_k above the negatives of the largest class, a class with no
 *     training image, no training labels. (Values, gradients and the bank
 *     update of the whole method: tests/test_distill.c; resume:
 *     tests/test_resume.c; three steps against PyTorch:
 *     tests/test_distill_steps.c.) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/crd.h"
#include "kd/distill.h"
#include "kd/io.h"
#include "testutil.h"

#define FIXTURE KD_SOURCE_DIR "/tests/fixtures/crd_nce.safetensors"

typedef struct {
    kd__crd_nce_params p;
    float z;
    kd_param_list pl;
    kd_tensor *v;
} nce_case;

static void nce_case_load(const kd_st_file *f, const char *c, nce_case *nc) {
    memset(nc, 0, sizeof *nc);
    const char *mt = kd_st_meta(f, c);
    if (!mt) fail_msg("%s: no metadata for %s", FIXTURE, c);
    kd_json *m = NULL;
    KD_ASSERT_OK(kd_json_parse(mt, strlen(mt), c, &m));
    const kd_st_entry *v = kd_test_st_entry(f, "%s.v", c), *bank = kd_test_st_entry(f, "%s.bank", c);
    char name[64];
    snprintf(name, sizeof name, "%s.idx", c);
    const kd_st_entry *idx = kd_st_find(f, name);
    snprintf(name, sizeof name, "%s.pos", c);
    const kd_st_entry *pos = kd_st_find(f, name);
    nc->z = (float)kd_json_get(m, "z")->number;
    nc->p = (kd__crd_nce_params){.bank = bank->data,
                                 .bank_rows = bank->shape[0],
                                 .pos = pos ? pos->data : NULL,
                                 .idx = idx ? idx->data : NULL,
                                 .K = (int64_t)kd_json_get(m, "K")->integer,
                                 .D = v->shape[1],
                                 .n_data = (int64_t)kd_json_get(m, "n_data")->integer,
                                 .T = (float)kd_json_get(m, "T")->number,
                                 .z = &nc->z};
    kd_json_free(m);
    KD_ASSERT_OK(kd_params_new(&nc->pl, "", "v", KD_F32, 2, v->shape, KD_PARAM_WEIGHT, &nc->v));
    memcpy(nc->v->data, v->data, v->nbytes);
}

static double nce_loss(kd_graph *g, nce_case *nc) {
    kd_graph_reset(g);
    kd_tensor *loss = NULL;
    KD_ASSERT_OK(kd__crd_nce(g, nc->v, &nc->p, &loss));
    return kd_f32(loss)[0];
}

static void test_nce_vs_torch(void **state) {
    (void)state;
    kd_st_file *f = kd_test_st_open(FIXTURE);
    char cases[256];
    snprintf(cases, sizeof cases, "%s", kd_st_meta(f, "cases"));
    kd_backend *be;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    int n = 0;
    for (char *save = NULL, *c = strtok_r(cases, ",", &save); c; c = strtok_r(NULL, ",", &save), n++)
    for (int path = KD__CRD_NCE_GATHER; path <= KD__CRD_NCE_DENSE; path++) {
        nce_case nc;
        nce_case_load(f, c, &nc);
        nc.p.path = path;
        kd_params_zero_grad(&nc.pl);
        kd_graph_reset(g);
        kd_tensor *loss = NULL;
        KD_ASSERT_OK(kd__crd_nce(g, nc.v, &nc.p, &loss));
        KD_ASSERT_OK(kd_backward(g, loss));
        const float value = kd_f32(loss)[0];
        char what[96];
        snprintf(what, sizeof what, "crd nce %s: loss", c);
        KD_ASSERT_CLOSE(&value, (const float *)kd_test_st_entry(f, "%s.loss", c)->data, 1, 1e-5, 1e-5, what);
        snprintf(what, sizeof what, "crd nce %s: Z", c);
        KD_ASSERT_CLOSE(&nc.z, (const float *)kd_test_st_entry(f, "%s.z", c)->data, 1, 0, 1e-5, what);
        snprintf(what, sizeof what, "crd nce %s: d loss / d v", c);
        const kd_st_entry *ge = kd_test_st_entry(f, "%s.grad", c);
        KD_ASSERT_CLOSE(kd_f32(nc.v->grad), (const float *)ge->data, kd_tensor_numel(nc.v), 1e-6, 1e-3, what);
        /* Central differences on a few coordinates (Z now frozen). */
        float *x = kd_f32(nc.v);
        for (int k = 0; k < 4; k++) {
            int64_t i = (int64_t)(k * 7919 % kd_tensor_numel(nc.v));
            float x0 = x[i];
            double h = 1e-3;
            x[i] = (float)(x0 + h);
            double lp = nce_loss(g, &nc);
            x[i] = (float)(x0 - h);
            double lm = nce_loss(g, &nc);
            x[i] = x0;
            double fd = (lp - lm) / (2 * h), an = kd_f32(nc.v->grad)[i];
            if (fabs(fd - an) > 2e-2 * fabs(an) + 5e-3)
                fail_msg("crd nce %s: d loss / d v[%lld]: finite difference %.6g, analytic %.6g", c, (long long)i, fd,
                         an);
        }
        printf("  %s (%s): K %lld, D %lld: loss %.6f, Z %.6g match PyTorch\n", c,
               path == KD__CRD_NCE_DENSE ? "dense" : "gather", (long long)nc.p.K, (long long)nc.p.D, value,
               (double)nc.z);
        kd_params_free(&nc.pl);
    }
    assert_int_equal(n, 3);
    kd_graph_free(g);
    kd_st_close(f);
}

/* At the official sizes a forward and backward of one side hold the
 * B x (K+1) exponentiated scores (4.2 MB) and the draw, not the 537 MB of
 * gathered rows. */
static void test_nce_memory(void **state) {
    (void)state;
    const int64_t B = 64, K = 16384, D = 128, N = 50000;
    float *bank = malloc(sizeof(float) * (size_t)(N * D));
    int64_t *idx = malloc(sizeof(int64_t) * (size_t)(B * (K + 1)));
    assert_non_null(bank);
    assert_non_null(idx);
    kd_test_fill_uniform(bank, N * D, -0.15f, 0.15f, 3);
    kd_rng r;
    kd_rng_init(&r, 5, 0);
    for (int64_t k = 0; k < B * (K + 1); k++) idx[k] = (int64_t)kd_rng_below(&r, (uint32_t)N);
    kd_param_list pl = {0};
    kd_tensor *v;
    int64_t vs[2] = {B, D};
    KD_ASSERT_OK(kd_params_new(&pl, "", "v", KD_F32, 2, vs, KD_PARAM_WEIGHT, &v));
    kd_test_fill_uniform(kd_f32(v), B * D, -0.1f, 0.1f, 4);
    kd_backend *be;
    KD_ASSERT_OK(kd_backend_get("cpu", &be) == KD_OK ? KD_OK : kd_backend_get("ref", &be));
    /* Gather: the B x (K+1) scores (4.2 MB); dense (AUTO at N <= 8 (K+1)):
     * also the B x N score matrix (12.8 MB). */
    const int paths[2] = {KD__CRD_NCE_GATHER, KD__CRD_NCE_AUTO};
    const size_t bound[2] = {8u << 20, 24u << 20};
    double values[2];
    for (int q = 0; q < 2; q++) {
        float z = -1;
        kd__crd_nce_params p = {.path = paths[q], .bank = bank, .bank_rows = N, .idx = idx, .K = K, .D = D,
                                .n_data = N, .T = 0.07f, .z = &z};
        kd_graph *g = NULL;
        KD_ASSERT_OK(kd_graph_init(&g, be));
        kd_tensor *loss = NULL;
        KD_ASSERT_OK(kd__crd_nce(g, v, &p, &loss));
        KD_ASSERT_OK(kd_backward(g, loss));
        values[q] = kd_f32(loss)[0];
        assert_true(isfinite(values[q]));
        size_t peak = kd_graph_peak_bytes(g), gathered = (size_t)(B * (K + 1) * D) * sizeof(float);
        printf("  %s, B %lld, K %lld, D %lld, N %lld: graph peak %.1f MB; the official gather holds %.0f MB\n",
               q ? "auto (dense)" : "gather", (long long)B, (long long)K, (long long)D, (long long)N,
               (double)peak / 1e6, (double)gathered / 1e6);
        if (peak > bound[q]) fail_msg("graph peak %zu bytes: more than %zu", peak, bound[q]);
        kd_graph_free(g);
    }
    if (fabs(values[0] - values[1]) > 1e-5 * fabs(values[0]))
        fail_msg("gather loss %.8g, dense loss %.8g", values[0], values[1]);
    kd_params_free(&pl);
    free(bank);
    free(idx);
}

/* ------------------------------------------------------------ sampler */

#define SN 1000
#define SCLASSES 10

/* Unbalanced labels: class c has about (c + 1) shares; class 9 is largest. */
static void sampler_labels(int32_t *y) {
    kd_rng r;
    kd_rng_init(&r, 9, 1);
    for (int64_t i = 0; i < SN; i++) {
        uint32_t u = kd_rng_below(&r, 55), c = 0, acc = 1;
        while (u >= acc) acc += ++c + 1;
        y[i] = (int32_t)c;
    }
}

static void check_draw(const kd__crd_sampler *s, const int32_t *lab, const int64_t *index, const int32_t *y,
                       int64_t B, int64_t K, int relax, const int64_t *out) {
    unsigned char *mark = calloc(SN, 1);
    assert_non_null(mark);
    for (int64_t i = 0; i < B; i++) {
        const int64_t *row = out + i * (K + 1);
        if (!relax && row[0] != index[i]) fail_msg("exact: row %lld's positive %lld is not its image %lld", (long long)i,
                                                   (long long)row[0], (long long)index[i]);
        if (row[0] < 0 || row[0] >= SN || lab[row[0]] != y[i])
            fail_msg("row %lld: positive %lld is not of class %d", (long long)i, (long long)row[0], y[i]);
        for (int64_t j = 1; j <= K; j++) {
            int64_t n = row[j];
            if (n < 0 || n >= SN) fail_msg("row %lld: negative %lld out of range", (long long)i, (long long)n);
            if (lab[n] == y[i]) fail_msg("row %lld: negative %lld is of the anchor's class %d", (long long)i,
                                         (long long)n, y[i]);
            if (mark[n]) fail_msg("row %lld: negative %lld drawn twice", (long long)i, (long long)n);
            mark[n] = 1;
        }
        for (int64_t j = 1; j <= K; j++) mark[row[j]] = 0;
    }
    free(mark);
    (void)s;
}

static void test_sampler(void **state) {
    (void)state;
    int32_t lab[SN];
    sampler_labels(lab);
    kd__crd_sampler s;
    KD_ASSERT_OK(kd__crd_sampler_init(&s, lab, SN, SCLASSES));
    int64_t total = 0;
    for (int c = 0; c < SCLASSES; c++) total += kd__crd_class_size(&s, c);
    assert_int_equal(total, SN);
    const int64_t B = 32, K = SN - kd__crd_class_size(&s, SCLASSES - 1);
    int64_t index[32];
    int32_t y[32];
    for (int i = 0; i < B; i++) {
        index[i] = (i * 37 + 11) % SN;
        y[i] = lab[index[i]];
    }
    int64_t *a = malloc(sizeof(int64_t) * (size_t)(B * (K + 1))), *b = malloc(sizeof(int64_t) * (size_t)(B * (K + 1)));
    assert_non_null(a);
    assert_non_null(b);
    for (int relax = 0; relax < 2; relax++) {
        /* K up to the largest class's negatives, and a small K. */
        const int64_t ks[2] = {K, 17};
        for (int kk = 0; kk < 2; kk++) {
            kd_set_num_threads(1);
            KD_ASSERT_OK(kd__crd_draw(&s, 42, 7, index, y, B, ks[kk], relax, a));
            check_draw(&s, lab, index, y, B, ks[kk], relax, a);
            kd_set_num_threads(2);
            KD_ASSERT_OK(kd__crd_draw(&s, 42, 7, index, y, B, ks[kk], relax, b));
            assert_memory_equal(a, b, sizeof(int64_t) * (size_t)(B * (ks[kk] + 1)));
            KD_ASSERT_OK(kd__crd_draw(&s, 42, 8, index, y, B, ks[kk], relax, b));
            if (!memcmp(a + 1, b + 1, sizeof(int64_t) * (size_t)ks[kk]))
                fail_msg("another key drew the same negatives");
        }
    }
    /* Relax: the positive varies over the class across keys. */
    int distinct = 0;
    int64_t first = -1;
    for (uint64_t key = 0; key < 20; key++) {
        KD_ASSERT_OK(kd__crd_draw(&s, 42, key, index, y, 1, 5, 1, a));
        if (key == 0) first = a[0];
        distinct += a[0] != first;
    }
    if (distinct == 0) fail_msg("relax: the positive never changes across 20 draws");
    /* Uniformity: over many draws of K = 100 of the 900-odd negatives of one
     * anchor, every eligible image's count stays within 6 sigma of the mean
     * (a biased draw, e.g. Floyd's fallback taken wrongly, fails). */
    int64_t counts[SN] = {0}, draws = 400, k = 100;
    for (uint64_t key = 0; key < (uint64_t)draws; key++) {
        KD_ASSERT_OK(kd__crd_draw(&s, 1, key, index, y, 1, k, 0, a));
        for (int64_t j = 1; j <= k; j++) counts[a[j]]++;
    }
    int64_t elig = SN - kd__crd_class_size(&s, y[0]);
    double mean = (double)draws * (double)k / (double)elig, sd = sqrt(mean * (1 - (double)k / (double)elig));
    for (int64_t i = 0; i < SN; i++) {
        if (lab[i] == y[0]) continue;
        if (fabs((double)counts[i] - mean) > 6 * sd)
            fail_msg("image %lld drawn %lld times; expected %.1f +- %.1f", (long long)i, (long long)counts[i], mean, sd);
    }
    /* More negatives than the class has: refused. */
    assert_int_not_equal(kd__crd_draw(&s, 1, 0, index, y, 1, elig + 1, 0, a), KD_OK);
    kd_set_num_threads(0);
    free(a);
    free(b);
    kd__crd_sampler_free(&s);
}

/* ------------------------------------------------------------ setup */

static kd_status create_crd(const int32_t *labels, int64_t n, int classes, const char *k, kd_method **m) {
    kd_distill_cfg cfg = kd_distill_defaults("crd");
    if (k) KD_ASSERT_OK(kd_distill_cfg_set_arg(&cfg, "crd.nce_k", k));
    kd_method_shapes shp;
    memset(&shp, 0, sizeof shp);
    shp.student.n_feat = shp.teacher.n_feat = 1;
    shp.student.feat_ndim[0] = shp.teacher.feat_ndim[0] = 2;
    shp.student.feat[0][0] = shp.teacher.feat[0][0] = 2;
    shp.student.feat[0][1] = 16;
    shp.teacher.feat[0][1] = 32;
    shp.student.num_classes = shp.teacher.num_classes = classes;
    shp.num_classes = classes;
    shp.n_train = n;
    shp.train_labels = labels;
    return kd_method_create(&cfg, &shp, m);
}

static void expect_refusal(kd_status s, const char *needle) {
    assert_int_not_equal(s, KD_OK);
    if (!strstr(kd_last_error(), needle)) fail_msg("message '%s' does not name '%s'", kd_last_error(), needle);
    printf("  refused: %s\n", kd_last_error());
}

static void test_setup_refusals(void **state) {
    (void)state;
    int32_t lab[40];
    for (int i = 0; i < 40; i++) lab[i] = i % 4; /* 10 per class: 30 negatives each */
    kd_method *m = NULL;
    KD_ASSERT_OK(create_crd(lab, 40, 4, "30", &m));
    kd_param_list *pl = kd_method_params(m);
    int banks = 0;
    for (int i = 0; i < pl->n; i++)
        if (strstr(pl->items[i].name, "memory_v")) {
            assert_int_equal(pl->items[i].t->shape[0], 40);
            assert_int_equal(pl->items[i].t->shape[1], 128);
            banks++;
        }
    assert_int_equal(banks, 2);
    kd_method_free(m);
    expect_refusal(create_crd(lab, 40, 4, "31", &m), "crd.nce_k");
    expect_refusal(create_crd(lab, 40, 4, NULL, &m), "crd.nce_k 16384");
    expect_refusal(create_crd(lab, 40, 5, "10", &m), "class 4 of 5 has no training image");
    expect_refusal(create_crd(NULL, 40, 4, "10", &m), "training labels");
    /* Queue mode needs neither labels nor classes, and its memory is 2 K D. */
    kd_distill_cfg cfg = kd_distill_defaults("crd");
    KD_ASSERT_OK(kd_distill_cfg_set_arg(&cfg, "crd.mode", "queue"));
    kd_method_shapes shp;
    memset(&shp, 0, sizeof shp);
    shp.student.n_feat = shp.teacher.n_feat = 1;
    shp.student.feat_ndim[0] = shp.teacher.feat_ndim[0] = 2;
    shp.student.feat[0][1] = 16;
    shp.teacher.feat[0][1] = 32;
    shp.num_classes = 1000;
    shp.n_train = 1281167;
    KD_ASSERT_OK(kd_method_create(&cfg, &shp, &m));
    int64_t bytes = 0;
    pl = kd_method_params(m);
    for (int i = 0; i < pl->n; i++) bytes += (int64_t)kd_tensor_nbytes(pl->items[i].t);
    printf("  queue mode at N = 1281167: %.1f MB of method tensors\n", (double)bytes / 1e6);
    assert_true(bytes < 2 * 16384 * 128 * 4 + (1 << 20));
    kd_method_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nce_vs_torch),
        cmocka_unit_test(test_nce_memory),
        cmocka_unit_test(test_sampler),
        cmocka_unit_test(test_setup_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
