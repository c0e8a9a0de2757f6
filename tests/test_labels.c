/* Label subsets (kd_dataset_label_subset and friends): the spec parser and
 * its refusals; class balance (every class gets round(P% of its labeled
 * images), halves up, computed here in double, or N); determinism in (ds,
 * spec, seed) and independence of the thread count; other seeds differ; a
 * smaller spec's picks lie inside a larger one's; unlabeled samples never
 * picked; the empty-class and too-few-images errors naming the spec and the
 * class (with its folder name); index files read back and their errors;
 * kd_dataset_select and kd_dataset_keep_labels. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd/data.h"
#include "testutil.h"

#define K 10

/* A dataset of K classes, class k with 40 + 13 k samples (labels shuffled
 * over the indices), and `unlabeled` more samples with label -1 spread in. */
static kd_dataset *make_ds(int unlabeled, int64_t *counts) {
    int64_t n = 0;
    for (int k = 0; k < K; k++) n += counts[k] = 40 + 13 * k;
    int64_t total = n + unlabeled;
    uint8_t *img = malloc((size_t)total * 4);
    int32_t *lab = malloc((size_t)total * sizeof *lab);
    int64_t m = 0;
    for (int k = 0; k < K; k++)
        for (int64_t i = 0; i < counts[k]; i++) lab[m++] = k;
    for (int i = 0; i < unlabeled; i++) lab[m++] = -1;
    kd_rng r;
    kd_rng_init(&r, 99, 1);
    for (int64_t i = total - 1; i > 0; i--) {
        int64_t j = kd_rng_below(&r, (uint32_t)(i + 1));
        int32_t t = lab[i];
        lab[i] = lab[j];
        lab[j] = t;
    }
    for (int64_t i = 0; i < total * 4; i++) img[i] = (uint8_t)(i * 7);
    kd_dataset *ds = NULL;
    /* kd_dataset_from_memory wants labels in range: build labeled, then mark. */
    int32_t *lab2 = malloc((size_t)total * sizeof *lab2);
    for (int64_t i = 0; i < total; i++) lab2[i] = lab[i] < 0 ? 0 : lab[i];
    KD_ASSERT_OK(kd_dataset_from_memory("synthetic", total, 1, 2, 2, img, lab2, K, &ds));
    if (unlabeled) {
        int64_t *keep = malloc((size_t)total * sizeof *keep), nk = 0;
        for (int64_t i = 0; i < total; i++)
            if (lab[i] >= 0) keep[nk++] = i;
        kd_dataset *d2 = NULL;
        KD_ASSERT_OK(kd_dataset_keep_labels(ds, keep, nk, &d2));
        kd_dataset_free(ds);
        ds = d2;
        free(keep);
    }
    free(img);
    free(lab);
    free(lab2);
    return ds;
}

static void per_class(const kd_dataset *ds, const int64_t *idx, int64_t n, int64_t *got) {
    memset(got, 0, K * sizeof *got);
    for (int64_t i = 0; i < n; i++) {
        int32_t y = kd_dataset_label(ds, idx[i]);
        assert_true(y >= 0 && y < K);
        got[y]++;
        if (i) assert_true(idx[i] > idx[i - 1]);
    }
}

static void test_spec_parse(void **state) {
    (void)state;
    kd_label_spec s;
    KD_ASSERT_OK(kd_label_spec_parse("10%", &s));
    assert_int_equal(s.per_class, 0);
    assert_true(s.num * 10 == s.den);
    KD_ASSERT_OK(kd_label_spec_parse("0.5%", &s));
    assert_true(s.num * 200 == s.den);
    KD_ASSERT_OK(kd_label_spec_parse("100%", &s));
    assert_true(s.num == s.den);
    KD_ASSERT_OK(kd_label_spec_parse("25", &s));
    assert_int_equal(s.per_class, 25);
    KD_ASSERT_OK(kd_label_spec_parse("runs/x/labels.txt", &s));
    assert_true(s.is_file);
    KD_ASSERT_OK(kd_label_spec_parse("", &s));
    static const char *bad[] = {"0", "0%", "0.0%", "101%", "100.5%", "10 %", "5x", "-3", "+3", "1.1234567%", "%",
                                "1e3", ".%", "3.5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (kd_label_spec_parse(bad[i], &s) != KD_ERR_INVALID) fail_msg("'%s' was accepted", bad[i]);
        if (!strstr(kd_last_error(), "labels") || !strstr(kd_last_error(), bad[i]))
            fail_msg("'%s': the message does not name the setting and value: %s", bad[i], kd_last_error());
    }
}

static void test_balance_fraction(void **state) {
    (void)state;
    int64_t counts[K], got[K];
    kd_dataset *ds = make_ds(0, counts);
    static const char *specs[] = {"10%", "2.5%", "33.3%", "50%", "100%", "12.5%"};
    static const double pct[] = {10, 2.5, 33.3, 50, 100, 12.5};
    for (size_t s = 0; s < sizeof specs / sizeof specs[0]; s++) {
        int64_t *idx = NULL, n = 0, want_n = 0;
        KD_ASSERT_OK(kd_dataset_label_subset(ds, specs[s], 7, &idx, &n));
        per_class(ds, idx, n, got);
        for (int k = 0; k < K; k++) {
            /* round half up of count * pct / 100, in double (exact here up to
             * the tiny offset that keeps x.5 from rounding down) */
            int64_t want = (int64_t)floor((double)counts[k] * pct[s] / 100.0 + 0.5 + 1e-9);
            if (got[k] != want)
                fail_msg("%s: class %d has %lld of %lld, want %lld", specs[s], k, (long long)got[k],
                         (long long)counts[k], (long long)want);
            want_n += want;
        }
        assert_int_equal(n, want_n);
        free(idx);
    }
    kd_dataset_free(ds);
}

static void test_balance_per_class_and_unlabeled(void **state) {
    (void)state;
    int64_t counts[K], got[K];
    kd_dataset *ds = make_ds(300, counts); /* 300 unlabeled samples among them */
    int64_t *idx = NULL, n = 0;
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "17", 1, &idx, &n));
    assert_int_equal(n, 17 * K);
    per_class(ds, idx, n, got); /* fails on an unlabeled pick */
    for (int k = 0; k < K; k++) assert_int_equal(got[k], 17);
    free(idx);
    /* 100% of a partly labeled set: every labeled sample, no unlabeled one. */
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "100%", 1, &idx, &n));
    int64_t labeled = 0;
    for (int k = 0; k < K; k++) labeled += counts[k];
    assert_int_equal(n, labeled);
    free(idx);
    kd_dataset_free(ds);
}

static void test_determinism_and_seeds(void **state) {
    (void)state;
    int64_t counts[K];
    kd_dataset *ds = make_ds(50, counts);
    int64_t *a = NULL, *b = NULL, *c = NULL, na, nb, nc;
    kd_set_num_threads(1);
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "10%", 42, &a, &na));
    kd_set_num_threads(2);
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "10%", 42, &b, &nb));
    kd_set_num_threads(0);
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, (size_t)na * sizeof *a);
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "10%", 43, &c, &nc));
    assert_int_equal(na, nc);
    assert_true(memcmp(a, c, (size_t)na * sizeof *a) != 0);
    free(b);
    /* A larger spec with the same seed contains the smaller one's picks. */
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "30%", 42, &b, &nb));
    for (int64_t i = 0, j = 0; i < na; i++) {
        while (j < nb && b[j] < a[i]) j++;
        if (j == nb || b[j] != a[i]) fail_msg("index %lld of 10%% is not in 30%%", (long long)a[i]);
    }
    free(a);
    free(b);
    free(c);
    kd_dataset_free(ds);
}

static void test_empty_class_errors(void **state) {
    (void)state;
    int64_t counts[K];
    kd_dataset *ds = make_ds(0, counts);
    int64_t *idx = NULL, n = 0;
    /* Class 0 has 40 images: 1% of 40 rounds to 0. */
    assert_int_equal(kd_dataset_label_subset(ds, "1%", 0, &idx, &n), KD_ERR_INVALID);
    assert_null(idx);
    const char *e = kd_last_error();
    if (!strstr(e, "labels 1%") || !strstr(e, "class 0") || !strstr(e, "no labeled image"))
        fail_msg("message: %s", e);
    /* 1.25% of 40 = 0.5 rounds up to 1: accepted. */
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "1.25%", 0, &idx, &n));
    free(idx);
    /* More per class than class 0 has. */
    assert_int_equal(kd_dataset_label_subset(ds, "41", 0, &idx, &n), KD_ERR_INVALID);
    e = kd_last_error();
    if (!strstr(e, "labels 41") || !strstr(e, "class 0") || !strstr(e, "40")) fail_msg("message: %s", e);
    kd_dataset_free(ds);
}

/* A folder dataset names the class: "class 0 (cat)". */
static void test_empty_class_named(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("labels_folder");
    static const char *cls[] = {"cat", "dog"};
    static const int cnt[] = {3, 30};
    char path[1200];
    for (int c = 0; c < 2; c++) {
        snprintf(path, sizeof path, "%s/%s", dir, cls[c]);
        mkdir(path, 0755);
        for (int i = 0; i < cnt[c]; i++) {
            snprintf(path, sizeof path, "%s/%s/%03d.jpg", dir, cls[c], i);
            kd_test_write_jpeg(path, 8, 8, (uint64_t)(c * 100 + i));
        }
    }
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_folder(dir, &ds));
    int64_t *idx = NULL, n = 0;
    assert_int_equal(kd_dataset_label_subset(ds, "10%", 0, &idx, &n), KD_ERR_INVALID);
    if (!strstr(kd_last_error(), "class 0 (cat) would get no labeled image")) fail_msg("message: %s", kd_last_error());
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "2", 0, &idx, &n));
    assert_int_equal(n, 4);
    kd_dataset *sub = NULL;
    KD_ASSERT_OK(kd_dataset_select(ds, idx, n, &sub)); /* a lazy dataset: paths copied */
    for (int64_t i = 0; i < n; i++) {
        assert_string_equal(kd_dataset_path(sub, i), kd_dataset_path(ds, idx[i]));
        assert_int_equal(kd_dataset_label(sub, i), kd_dataset_label(ds, idx[i]));
    }
    kd_dataset_free(sub);
    free(idx);
    kd_dataset_free(ds);
}

static void test_index_files(void **state) {
    (void)state;
    int64_t counts[K];
    kd_dataset *ds = make_ds(20, counts);
    const char *dir = kd_test_tmpdir("labels_files");
    char path[1200];
    snprintf(path, sizeof path, "%s/good.txt", dir);
    int64_t *idx = NULL, n = 0;
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "5", 3, &idx, &n));
    FILE *f = fopen(path, "w");
    fprintf(f, "# a comment\n\n");
    for (int64_t i = 0; i < n; i++) fprintf(f, "%lld\n", (long long)idx[i]);
    fclose(f);
    int64_t *back = NULL, nback = 0;
    KD_ASSERT_OK(kd_dataset_label_subset(ds, path, 999, &back, &nback)); /* the file wins over the seed */
    assert_int_equal(nback, n);
    assert_memory_equal(back, idx, (size_t)n * sizeof *idx);
    free(back);
    /* Bad files: the message names the file and line. */
    int64_t unl = -1;
    for (int64_t i = 0; i < kd_dataset_size(ds) && unl < 0; i++)
        if (kd_dataset_label(ds, i) < 0) unl = i;
    char c_unl[64];
    snprintf(c_unl, sizeof c_unl, "%lld\n", (long long)unl);
    const char *cases[][2] = {{"3\n2\n", ":2:"}, {"1\nabc\n", ":2:"}, {"99999\n", ":1:"}, {"# nothing\n", "no dataset index"},
                              {"-1\n", ":1:"}, {c_unl, "has no label"}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        snprintf(path, sizeof path, "%s/bad%zu.txt", dir, c);
        kd_test_write_file(path, cases[c][0], strlen(cases[c][0]));
        assert_int_not_equal(kd_dataset_label_subset(ds, path, 0, &back, &nback), KD_OK);
        if (!strstr(kd_last_error(), path) || !strstr(kd_last_error(), cases[c][1]))
            fail_msg("case %zu: %s", c, kd_last_error());
    }
    snprintf(path, sizeof path, "%s/missing.txt", dir);
    assert_int_not_equal(kd_dataset_label_subset(ds, path, 0, &back, &nback), KD_OK);
    assert_non_null(strstr(kd_last_error(), "missing.txt"));
    free(idx);
    kd_dataset_free(ds);
}

static void test_select_and_keep_labels(void **state) {
    (void)state;
    int64_t counts[K];
    kd_dataset *ds = make_ds(0, counts);
    int64_t *idx = NULL, n = 0;
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "3", 5, &idx, &n));
    kd_dataset *sel = NULL, *kept = NULL;
    KD_ASSERT_OK(kd_dataset_select(ds, idx, n, &sel));
    assert_int_equal(kd_dataset_size(sel), n);
    assert_int_equal(kd_dataset_num_classes(sel), K);
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(kd_dataset_label(sel, i), kd_dataset_label(ds, idx[i]));
        assert_memory_equal(kd_dataset_image(sel, i), kd_dataset_image(ds, idx[i]), 4);
    }
    KD_ASSERT_OK(kd_dataset_keep_labels(ds, idx, n, &kept));
    assert_int_equal(kd_dataset_size(kept), kd_dataset_size(ds));
    int64_t j = 0, labeled = 0;
    for (int64_t i = 0; i < kd_dataset_size(ds); i++) {
        int in = j < n && idx[j] == i;
        j += in;
        assert_int_equal(kd_dataset_label(kept, i), in ? kd_dataset_label(ds, i) : -1);
        assert_memory_equal(kd_dataset_image(kept, i), kd_dataset_image(ds, i), 4);
        labeled += kd_dataset_label(kept, i) >= 0;
    }
    assert_int_equal(labeled, n);
    /* A selection that does not increase is refused. */
    int64_t badidx[2] = {5, 5};
    kd_dataset *bad = NULL;
    assert_int_equal(kd_dataset_select(ds, badidx, 2, &bad), KD_ERR_INVALID);
    kd_dataset_free(sel);
    kd_dataset_free(kept);
    free(idx);
    kd_dataset_free(ds);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_parse),
        cmocka_unit_test(test_balance_fraction),
        cmocka_unit_test(test_balance_per_class_and_unlabeled),
        cmocka_unit_test(test_determinism_and_seeds),
        cmocka_unit_test(test_empty_class_errors),
        cmocka_unit_test(test_empty_class_named),
        cmocka_unit_test(test_index_files),
        cmocka_unit_test(test_select_and_keep_labels),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
