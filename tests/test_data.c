/* Tests of the data layer: IDX and CIFAR readers on generated files (plain and
 * gzipped) and their error messages, class-balanced subsets, the crop / flip /
 * normalise transform against a naive padded-image reference, and the loader
 * (coverage, order, determinism across worker counts, drop_last, restarts,
 * several views of each sample with their own streams, transforms and sizes).
 * The real Fashion-MNIST under /usr/share/datasets is checked when present. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "kd/data.h"

/* ----------------------------------------------------------------- helpers */

static char *tmpdir(const char *tag) {
    static char buf[16][1024];
    static int k;
    char *p = buf[k++ % 16];
    snprintf(p, 1024, "%s", kd_test_tmpdir(tag));
    return p;
}

static void write_bytes(const char *path, const uint8_t *b, size_t n, int gz) {
    if (gz) {
        gzFile f = gzopen(path, "wb");
        assert_non_null(f);
        if (n) assert_int_equal(gzwrite(f, b, (unsigned)n), (int)n);
        assert_int_equal(gzclose(f), Z_OK);
    } else {
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        if (n) assert_int_equal(fwrite(b, 1, n, f), n);
        assert_int_equal(fclose(f), 0);
    }
}

static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n + 1);
    assert_int_equal(fread(b, 1, *n, f), *n);
    fclose(f);
    return b;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Pixel j of image i in a generated set: depends on both, so misplaced
 * images or bytes are caught. */
static uint8_t pix(uint32_t tag, int64_t i, int64_t j) {
    return (uint8_t)((i * 131 + j * 7 + tag * 29 + (i * j) % 13) & 255);
}

static int gen_label(uint32_t tag, int64_t i, int classes) {
    return (int)((i * 3 + tag) % (uint32_t)classes);
}

/* Writes an IDX images/labels pair, e.g. DIR/PREFIXtrain-images-idx3-ubyte[.gz]. */
static void write_idx(const char *dir, const char *prefix, const char *split, uint32_t n, uint32_t h,
                      uint32_t w, int classes, uint32_t tag, int gz) {
    char path[2048];
    size_t ni = 16 + (size_t)n * h * w;
    uint8_t *b = malloc(ni);
    put_be32(b, 0x803);
    put_be32(b + 4, n);
    put_be32(b + 8, h);
    put_be32(b + 12, w);
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < h * w; j++) b[16 + (size_t)i * h * w + j] = pix(tag, i, j);
    snprintf(path, sizeof path, "%s/%s%s-images-idx3-ubyte%s", dir, prefix, split, gz ? ".gz" : "");
    write_bytes(path, b, ni, gz);
    free(b);
    uint8_t *l = malloc(8 + n);
    put_be32(l, 0x801);
    put_be32(l + 4, n);
    for (uint32_t i = 0; i < n; i++) l[8 + i] = (uint8_t)gen_label(tag, i, classes);
    snprintf(path, sizeof path, "%s/%s%s-labels-idx1-ubyte%s", dir, prefix, split, gz ? ".gz" : "");
    write_bytes(path, l, 8 + n, gz);
    free(l);
}

static void check_generated(const kd_dataset *ds, uint32_t n, int h, int w, int classes,
                            uint32_t tag) {
    assert_int_equal(kd_dataset_size(ds), n);
    assert_int_equal(kd_dataset_channels(ds), 1);
    assert_int_equal(kd_dataset_height(ds), h);
    assert_int_equal(kd_dataset_width(ds), w);
    assert_int_equal(kd_dataset_num_classes(ds), classes);
    for (uint32_t i = 0; i < n; i++) {
        assert_int_equal(kd_dataset_label(ds, i), gen_label(tag, i, classes));
        const uint8_t *im = kd_dataset_image(ds, i);
        for (int j = 0; j < h * w; j++)
            if (im[j] != pix(tag, i, j)) fail_msg("image %u byte %d: %d != %d", i, j, im[j], pix(tag, i, j));
    }
}

/* -------------------------------------------------------------------- IDX */

static void test_idx_plain_roundtrip(void **state) {
    (void)state;
    char *dir = tmpdir("idxplain");
    write_idx(dir, "", "train", 37, 5, 7, 7, 1, 0);
    write_idx(dir, "", "t10k", 11, 5, 7, 7, 2, 0);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_idx(dir, 1, &ds));
    check_generated(ds, 37, 5, 7, 7, 1);
    assert_true(kd_dataset_is_train(ds));
    char base[256];
    snprintf(base, sizeof base, "%s", strrchr(dir, '/') + 1);
    assert_string_equal(kd_dataset_name(ds), base);
    kd_dataset_free(ds);
    KD_ASSERT_OK(kd_dataset_open_idx(dir, 0, &ds));
    /* 11 test labels (i*3+2)%7 cover all 7 classes. */
    check_generated(ds, 11, 5, 7, 7, 2);
    assert_false(kd_dataset_is_train(ds));
    kd_dataset_free(ds);
}

static void test_idx_gz_roundtrip(void **state) {
    (void)state;
    char *dir = tmpdir("idxgz");
    write_idx(dir, "", "train", 50, 28, 28, 10, 3, 1);
    write_idx(dir, "", "t10k", 20, 28, 28, 10, 4, 1);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open(dir, 1, &ds)); /* autodetected */
    check_generated(ds, 50, 28, 28, 10, 3);
    kd_dataset_free(ds);
    char spec[1100];
    snprintf(spec, sizeof spec, "idx:%s", dir);
    KD_ASSERT_OK(kd_dataset_open(spec, 0, &ds));
    check_generated(ds, 20, 28, 28, 10, 4);
    kd_dataset_free(ds);
}

static void test_idx_suffix_and_prefix(void **state) {
    (void)state;
    char *dir = tmpdir("idxsuffix");
    write_idx(dir, "emnist-foo-", "train", 12, 4, 4, 5, 5, 1);
    write_idx(dir, "emnist-foo-", "t10k", 6, 4, 4, 5, 6, 0);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open(dir, 1, &ds));
    check_generated(ds, 12, 4, 4, 5, 5);
    assert_string_equal(kd_dataset_name(ds), "emnist-foo");
    kd_dataset_free(ds);

    /* A second set makes the suffix match ambiguous; a prefix picks one. */
    write_idx(dir, "emnist-bar-", "train", 9, 4, 4, 4, 7, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_INVALID, "emnist-bar-train-images");
    assert_non_null(strstr(kd_last_error(), "emnist-foo-train-images"));
    assert_null(ds);
    char prefix[1100];
    snprintf(prefix, sizeof prefix, "%s/emnist-bar", dir);
    KD_ASSERT_OK(kd_dataset_open(prefix, 1, &ds));
    check_generated(ds, 9, 4, 4, 4, 7);
    assert_string_equal(kd_dataset_name(ds), "emnist-bar");
    kd_dataset_free(ds);
    snprintf(prefix, sizeof prefix, "%s/emnist-foo", dir);
    KD_ASSERT_OK(kd_dataset_open_idx(prefix, 0, &ds));
    check_generated(ds, 6, 4, 4, 5, 6);
    kd_dataset_free(ds);
    /* The exact name wins over suffix matches. */
    write_idx(dir, "", "train", 8, 4, 4, 2, 8, 0);
    KD_ASSERT_OK(kd_dataset_open_idx(dir, 1, &ds));
    check_generated(ds, 8, 4, 4, 2, 8);
    kd_dataset_free(ds);
}

static void test_idx_missing(void **state) {
    (void)state;
    kd_dataset *ds = NULL;
    ASSERT_ERR(kd_dataset_open_idx("/nonexistent/kd-data", 1, &ds), KD_ERR_NOT_FOUND,
               "/nonexistent/kd-data");
    ASSERT_ERR(kd_dataset_open("/nonexistent/kd-data", 1, &ds), KD_ERR_NOT_FOUND,
               "/nonexistent/kd-data");
    char *dir = tmpdir("idxmissing");
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_NOT_FOUND, "train-images-idx3-ubyte");
    ASSERT_ERR(kd_dataset_open(dir, 1, &ds), KD_ERR_NOT_FOUND, dir);
    assert_non_null(strstr(kd_last_error(), "CIFAR"));
    /* Images present, labels missing. */
    write_idx(dir, "", "t10k", 3, 2, 2, 2, 0, 0);
    char p[1100];
    snprintf(p, sizeof p, "%s/t10k-labels-idx1-ubyte", dir);
    remove(p);
    ASSERT_ERR(kd_dataset_open_idx(dir, 0, &ds), KD_ERR_NOT_FOUND, "t10k-labels-idx1-ubyte");
    assert_null(ds);
}

static void test_idx_truncated(void **state) {
    (void)state;
    char *dir = tmpdir("idxtrunc");
    kd_dataset *ds = NULL;
    char p[1100], want[64], got[64];
    /* Plain file cut by 10 bytes. */
    write_idx(dir, "", "train", 10, 6, 6, 4, 1, 0);
    snprintf(p, sizeof p, "%s/train-images-idx3-ubyte", dir);
    size_t n;
    uint8_t *b = read_bytes(p, &n);
    assert_int_equal(n, 16 + 360);
    write_bytes(p, b, n - 10, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, p);
    snprintf(want, sizeof want, "expected %zu bytes", n);
    snprintf(got, sizeof got, "got %zu", n - 10);
    assert_non_null(strstr(kd_last_error(), want));
    assert_non_null(strstr(kd_last_error(), got));
    assert_null(ds);
    /* Trailing bytes are an error too. */
    b = realloc(b, n + 3);
    memset(b + n, 0, 3);
    write_bytes(p, b, n + 3, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, "trailing");
    /* Gzipped file whose content is short: same message. */
    remove(p);
    strcat(p, ".gz");
    write_bytes(p, b, n - 1, 1);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, p);
    snprintf(got, sizeof got, "got %zu", n - 1);
    assert_non_null(strstr(kd_last_error(), got));
    /* A cut gzip stream. */
    write_bytes(p, b, n, 1);
    size_t zn;
    uint8_t *z = read_bytes(p, &zn);
    write_bytes(p, z, zn / 2, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, p);
    /* A header shorter than 16 bytes. */
    write_bytes(p, b, 9, 1);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, "header");
    free(z);
    free(b);
}

static void test_idx_bad_magic_and_counts(void **state) {
    (void)state;
    char *dir = tmpdir("idxmagic");
    kd_dataset *ds = NULL;
    char p[1100];
    size_t n;
    write_idx(dir, "", "train", 10, 3, 3, 4, 1, 0);
    snprintf(p, sizeof p, "%s/train-images-idx3-ubyte", dir);
    uint8_t *b = read_bytes(p, &n);
    put_be32(b, 0x804);
    write_bytes(p, b, n, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, p);
    assert_non_null(strstr(kd_last_error(), "magic"));
    put_be32(b, 0x803);
    write_bytes(p, b, n, 0);
    KD_ASSERT_OK(kd_dataset_open_idx(dir, 1, &ds));
    kd_dataset_free(ds);
    ds = NULL;
    free(b);

    /* Labels: wrong magic, then one label short. */
    snprintf(p, sizeof p, "%s/train-labels-idx1-ubyte", dir);
    b = read_bytes(p, &n);
    put_be32(b, 0x803);
    write_bytes(p, b, n, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, p);
    assert_non_null(strstr(kd_last_error(), "magic"));
    put_be32(b, 0x801);
    put_be32(b + 4, 9);
    write_bytes(p, b, n - 1, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, p);
    assert_non_null(strstr(kd_last_error(), "9 labels"));
    assert_non_null(strstr(kd_last_error(), "10 images"));
    /* Count right, data short. */
    put_be32(b + 4, 10);
    write_bytes(p, b, n - 1, 0);
    ASSERT_ERR(kd_dataset_open_idx(dir, 1, &ds), KD_ERR_FORMAT, p);
    assert_non_null(strstr(kd_last_error(), "expected 18 bytes"));
    assert_null(ds);
    free(b);
}

/* ------------------------------------------------------------------ CIFAR */

static void write_cifar(const char *path, int variant, int64_t n, int64_t first, uint32_t tag) {
    size_t head = variant == 10 ? 1 : 2, rec = head + 3072;
    uint8_t *b = malloc(rec * (size_t)n);
    for (int64_t i = 0; i < n; i++) {
        uint8_t *r = b + (size_t)i * rec;
        int64_t g = first + i;
        int lab = gen_label(tag, g, variant);
        if (variant == 100) r[0] = (uint8_t)(lab / 5);
        r[head - 1] = (uint8_t)lab;
        for (int j = 0; j < 3072; j++) r[head + j] = pix(tag, g, j);
    }
    write_bytes(path, b, rec * (size_t)n, 0);
    free(b);
}

static void check_cifar(const kd_dataset *ds, int variant, int64_t n, uint32_t tag) {
    assert_int_equal(kd_dataset_size(ds), n);
    assert_int_equal(kd_dataset_channels(ds), 3);
    assert_int_equal(kd_dataset_height(ds), 32);
    assert_int_equal(kd_dataset_width(ds), 32);
    assert_int_equal(kd_dataset_num_classes(ds), variant);
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(kd_dataset_label(ds, i), gen_label(tag, i, variant));
        const uint8_t *im = kd_dataset_image(ds, i);
        for (int j = 0; j < 3072; j++)
            if (im[j] != pix(tag, i, j)) fail_msg("image %lld byte %d", (long long)i, j);
    }
}

static void test_cifar10(void **state) {
    (void)state;
    char *root = tmpdir("cifar10");
    char dir[1100], p[1200];
    snprintf(dir, sizeof dir, "%s/cifar-10-batches-bin", root);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    assert_int_equal(system(cmd), 0);
    int counts[5] = {3, 2, 4, 1, 5};
    int64_t first = 0;
    for (int k = 0; k < 5; k++) {
        snprintf(p, sizeof p, "%s/data_batch_%d.bin", dir, k + 1);
        write_cifar(p, 10, counts[k], first, 1);
        first += counts[k];
    }
    snprintf(p, sizeof p, "%s/test_batch.bin", dir);
    write_cifar(p, 10, 7, 0, 2);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open_cifar(dir, 10, 1, &ds));
    check_cifar(ds, 10, 15, 1);
    assert_string_equal(kd_dataset_name(ds), "cifar-10");
    kd_dataset_free(ds);
    KD_ASSERT_OK(kd_dataset_open(root, 0, &ds)); /* finds the archive's subdirectory */
    check_cifar(ds, 10, 7, 2);
    kd_dataset_free(ds);
    KD_ASSERT_OK(kd_dataset_open(dir, 1, &ds));
    check_cifar(ds, 10, 15, 1);
    kd_dataset_free(ds);
}

static void test_cifar100(void **state) {
    (void)state;
    char *dir = tmpdir("cifar100");
    char p[1200];
    snprintf(p, sizeof p, "%s/train.bin", dir);
    write_cifar(p, 100, 120, 0, 3);
    snprintf(p, sizeof p, "%s/test.bin", dir);
    write_cifar(p, 100, 9, 0, 4);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open(dir, 1, &ds));
    check_cifar(ds, 100, 120, 3);
    assert_string_equal(kd_dataset_name(ds), "cifar-100");
    kd_dataset_free(ds);
    char spec[1100];
    snprintf(spec, sizeof spec, "cifar100:%s", dir);
    KD_ASSERT_OK(kd_dataset_open(spec, 0, &ds));
    check_cifar(ds, 100, 9, 4);
    kd_dataset_free(ds);
}

static void test_cifar_errors(void **state) {
    (void)state;
    char *dir = tmpdir("cifarerr");
    char p[1200];
    kd_dataset *ds = NULL;
    /* Missing batch 3. */
    for (int k = 1; k <= 5; k++) {
        if (k == 3) continue;
        snprintf(p, sizeof p, "%s/data_batch_%d.bin", dir, k);
        write_cifar(p, 10, 2, 0, 1);
    }
    ASSERT_ERR(kd_dataset_open_cifar(dir, 10, 1, &ds), KD_ERR_NOT_FOUND, "data_batch_3.bin");
    /* Size not a multiple of 3073. */
    snprintf(p, sizeof p, "%s/data_batch_3.bin", dir);
    write_cifar(p, 10, 2, 0, 1);
    KD_ASSERT_OK(kd_dataset_open_cifar(dir, 10, 1, &ds));
    assert_int_equal(kd_dataset_size(ds), 10);
    kd_dataset_free(ds);
    ds = NULL;
    size_t n;
    uint8_t *b = read_bytes(p, &n);
    write_bytes(p, b, n - 1, 0);
    ASSERT_ERR(kd_dataset_open_cifar(dir, 10, 1, &ds), KD_ERR_FORMAT, p);
    assert_non_null(strstr(kd_last_error(), "multiple"));
    /* Label out of range. */
    b[3073] = 10;
    write_bytes(p, b, n, 0);
    ASSERT_ERR(kd_dataset_open_cifar(dir, 10, 1, &ds), KD_ERR_FORMAT, "label 10");
    assert_non_null(strstr(kd_last_error(), p));
    free(b);
    /* A CIFAR-10 file read as CIFAR-100 (3073 is not a multiple of 3074). */
    snprintf(p, sizeof p, "%s/train.bin", dir);
    write_cifar(p, 10, 1, 0, 1);
    ASSERT_ERR(kd_dataset_open_cifar(dir, 100, 1, &ds), KD_ERR_FORMAT, "train.bin");
    assert_non_null(strstr(kd_last_error(), "CIFAR-10 file"));
    /* Missing test split, bad variant, missing dir. */
    ASSERT_ERR(kd_dataset_open_cifar(dir, 100, 0, &ds), KD_ERR_NOT_FOUND, "test.bin");
    ASSERT_ERR(kd_dataset_open_cifar(dir, 11, 0, &ds), KD_ERR_INVALID, "11");
    ASSERT_ERR(kd_dataset_open_cifar("/nonexistent/c10", 10, 0, &ds), KD_ERR_NOT_FOUND,
               "/nonexistent/c10");
    assert_null(ds);
}

/* ------------------------------------------------------------ memory, subset */

/* n images of (c, h, w); image i holds bytes pix(9, i, j); labels given. */
static kd_dataset *make_ds(int64_t n, int c, int h, int w, const int32_t *labels, int classes) {
    int64_t per = (int64_t)c * h * w;
    uint8_t *im = malloc((size_t)(n * per));
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < per; j++) im[i * per + j] = pix(9, i, j);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_from_memory("synthetic", n, c, h, w, im, labels, classes, &ds));
    free(im);
    return ds;
}

static void test_from_memory_errors(void **state) {
    (void)state;
    uint8_t im[4] = {0};
    int32_t lab[1] = {3};
    kd_dataset *ds = NULL;
    ASSERT_ERR(kd_dataset_from_memory("m", 1, 1, 2, 2, im, lab, 3, &ds), KD_ERR_INVALID, "label 3");
    ASSERT_ERR(kd_dataset_from_memory("m", 0, 1, 2, 2, im, lab, 4, &ds), KD_ERR_INVALID, "shape");
    assert_null(ds);
}

static void test_subset(void **state) {
    (void)state;
    enum { N = 100 };
    int32_t lab[N];
    for (int i = 0; i < N; i++) lab[i] = i % 10 < 5 ? 0 : i % 10 < 8 ? 1 : 2; /* 50/30/20 */
    kd_dataset *ds = make_ds(N, 1, 3, 3, lab, 3);
    int64_t wants[][4] = {{30, 10, 10, 10}, {90, 40, 30, 20}, {66, 23, 23, 20}, {31, 11, 10, 10}, {100, 50, 30, 20}};
    for (size_t t = 0; t < sizeof wants / sizeof wants[0]; t++) {
        kd_dataset *a = NULL, *b = NULL;
        KD_ASSERT_OK(kd_dataset_subset(ds, wants[t][0], 5, &a));
        KD_ASSERT_OK(kd_dataset_subset(ds, wants[t][0], 5, &b));
        assert_int_equal(kd_dataset_size(a), wants[t][0]);
        assert_int_equal(kd_dataset_num_classes(a), 3);
        int64_t cnt[3] = {0, 0, 0}, prev = -1;
        for (int64_t i = 0; i < kd_dataset_size(a); i++) {
            cnt[kd_dataset_label(a, i)]++;
            /* Recover the source index from the image bytes; order is kept. */
            int64_t src = -1;
            for (int64_t s = 0; s < N && src < 0; s++)
                if (memcmp(kd_dataset_image(ds, s), kd_dataset_image(a, i), 9) == 0) src = s;
            assert_true(src > prev);
            assert_int_equal(lab[src], kd_dataset_label(a, i));
            prev = src;
            assert_memory_equal(kd_dataset_image(a, i), kd_dataset_image(b, i), 9);
        }
        for (int k = 0; k < 3; k++) assert_int_equal(cnt[k], wants[t][k + 1]);
        kd_dataset_free(a);
        kd_dataset_free(b);
    }
    /* Another seed picks other samples. */
    kd_dataset *a = NULL, *b = NULL;
    KD_ASSERT_OK(kd_dataset_subset(ds, 30, 5, &a));
    KD_ASSERT_OK(kd_dataset_subset(ds, 30, 6, &b));
    int same = 1;
    for (int64_t i = 0; i < 30; i++)
        same &= memcmp(kd_dataset_image(a, i), kd_dataset_image(b, i), 9) == 0;
    assert_false(same);
    kd_dataset_free(a);
    kd_dataset_free(b);
    ASSERT_ERR(kd_dataset_subset(ds, 101, 1, &a), KD_ERR_INVALID, "101");
    kd_dataset_free(ds);
}

/* -------------------------------------------------------------- transforms */

/* Naive reference: pad with zeros, take the window at (top, left), then flip;
 * returns the byte (or -1 for padding) feeding output (ch, y, x). */
static int ref_src(const uint8_t *src, int h, int w, int pad, const kd_transform_draw *d, int ch,
                   int y, int x) {
    int ph = h + 2 * pad, pw = w + 2 * pad;
    int *padded = calloc((size_t)ph * pw, sizeof *padded);
    for (int i = 0; i < ph * pw; i++) padded[i] = -1;
    for (int yy = 0; yy < h; yy++)
        for (int xx = 0; xx < w; xx++)
            padded[(yy + pad) * pw + xx + pad] = src[(ch * h + yy) * w + xx];
    int cx = d->flip ? w - 1 - x : x;
    int v = padded[(y + d->top) * pw + cx + d->left];
    free(padded);
    return v;
}

static void test_transform_identity_flip(void **state) {
    (void)state;
    enum { C = 2, H = 3, W = 5 };
    uint8_t src[C * H * W];
    for (int i = 0; i < C * H * W; i++) src[i] = (uint8_t)(i * 17 + 3);
    kd_transform_cfg cfg = {0};
    float out[C * H * W];
    kd_transform_draw d = {0, 0, 0};
    kd_transform_apply(&cfg, &d, src, C, H, W, out);
    for (int i = 0; i < C * H * W; i++) assert_true(out[i] == (float)src[i] / 255.0f);
    /* Flip reverses every row. */
    d.flip = 1;
    kd_transform_apply(&cfg, &d, src, C, H, W, out);
    for (int c = 0; c < C; c++)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++)
                assert_true(out[(c * H + y) * W + x] == (float)src[(c * H + y) * W + W - 1 - x] / 255.0f);
    /* pad > 0 with the centred window is the identity too. */
    cfg.pad_crop = 2;
    d = (kd_transform_draw){2, 2, 0};
    kd_transform_apply(&cfg, &d, src, C, H, W, out);
    for (int i = 0; i < C * H * W; i++) assert_true(out[i] == (float)src[i] / 255.0f);
}

static void test_transform_crop_shift(void **state) {
    (void)state;
    enum { H = 6, W = 6, P = 2 };
    uint8_t src[H * W];
    for (int i = 0; i < H * W; i++) src[i] = (uint8_t)(10 + i);
    kd_transform_cfg cfg = {.pad_crop = P};
    float out[H * W];
    /* Window at (top 0, left 4): output (y, x) shows source (y - 2, x + 2). */
    kd_transform_draw d = {0, 4, 0};
    kd_transform_apply(&cfg, &d, src, 1, H, W, out);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            int sy = y - 2, sx = x + 2;
            float want = (sy >= 0 && sx < W) ? (float)src[sy * W + sx] / 255.0f : 0.0f;
            assert_true(out[y * W + x] == want);
        }
    /* Every window and flip against the naive padded reference, 3 channels,
     * non-square, pad larger than the image. */
    enum { C2 = 3, H2 = 4, W2 = 3 };
    uint8_t s2[C2 * H2 * W2];
    for (int i = 0; i < C2 * H2 * W2; i++) s2[i] = (uint8_t)(200 - 5 * i);
    for (int pad = 0; pad <= 5; pad++) {
        kd_transform_cfg c2 = {.pad_crop = pad, .normalize = 1,
                               .mean = {0.1f, 0.2f, 0.3f}, .std = {0.5f, 0.25f, 2.0f}};
        float o2[C2 * H2 * W2];
        for (int top = 0; top <= 2 * pad; top++)
            for (int left = 0; left <= 2 * pad; left++)
                for (int flip = 0; flip < 2; flip++) {
                    kd_transform_draw dd = {top, left, flip};
                    kd_transform_apply(&c2, &dd, s2, C2, H2, W2, o2);
                    for (int c = 0; c < C2; c++)
                        for (int y = 0; y < H2; y++)
                            for (int x = 0; x < W2; x++) {
                                int v = ref_src(s2, H2, W2, pad, &dd, c, y, x);
                                float u = v < 0 ? 0.0f : (float)v / 255.0f;
                                float want = (u - c2.mean[c]) / c2.std[c];
                                if (o2[(c * H2 + y) * W2 + x] != want)
                                    fail_msg("pad %d top %d left %d flip %d at (%d,%d,%d)", pad,
                                             top, left, flip, c, y, x);
                            }
                }
    }
}

static void test_transform_normalize(void **state) {
    (void)state;
    uint8_t src[4] = {0, 255, 128, 51};
    kd_transform_cfg cfg = {.normalize = 1, .mean = {0.5f}, .std = {0.5f}};
    kd_transform_draw d = {0, 0, 0};
    float out[4];
    kd_transform_apply(&cfg, &d, src, 1, 2, 2, out);
    assert_true(out[0] == -1.0f);
    assert_true(out[1] == 1.0f);
    assert_true(fabsf(out[2] - (128.0f / 255.0f - 0.5f) / 0.5f) < 1e-7f);
    assert_true(fabsf(out[3] - (0.2f - 0.5f) / 0.5f) < 1e-6f);
    /* Fashion-MNIST statistics: (51/255 - 0.2860) / 0.3530. */
    kd_transform_cfg f = {.normalize = 1, .mean = {0.2860f}, .std = {0.3530f}};
    kd_transform_apply(&f, &d, src, 1, 2, 2, out);
    assert_true(fabs(out[3] - (0.2 - 0.2860) / 0.3530) < 1e-6);
    assert_true(fabs(out[0] - (-0.2860 / 0.3530)) < 1e-6);
    /* Bad configurations. */
    kd_transform_cfg bad = {.normalize = 1, .mean = {0.5f}, .std = {0.0f}};
    ASSERT_ERR(kd_transform_check(&bad, 1), KD_ERR_INVALID, "std");
    bad = (kd_transform_cfg){.pad_crop = -1};
    ASSERT_ERR(kd_transform_check(&bad, 1), KD_ERR_INVALID, "pad_crop");
    bad = (kd_transform_cfg){.normalize = 1, .std = {1, 1, 1, 1}};
    ASSERT_ERR(kd_transform_check(&bad, 5), KD_ERR_INVALID, "4 channels");
}

static void test_transform_draws(void **state) {
    (void)state;
    kd_transform_cfg cfg = {.pad_crop = 3, .hflip = 1};
    int seen_top[7] = {0}, seen_left[7] = {0}, flips = 0, n = 20000;
    for (int i = 0; i < n; i++) {
        kd_rng r;
        kd_rng_init(&r, 7, kd_data_sample_key(7, 0, i));
        kd_transform_draw d = kd_transform_draw_from(&cfg, &r);
        assert_true(d.top >= 0 && d.top <= 6 && d.left >= 0 && d.left <= 6);
        seen_top[d.top]++;
        seen_left[d.left]++;
        flips += d.flip;
    }
    for (int k = 0; k < 7; k++) {
        assert_true(abs(seen_top[k] - n / 7) < n / 35);
        assert_true(abs(seen_left[k] - n / 7) < n / 35);
    }
    assert_true(abs(flips - n / 2) < n / 25);
    /* Flip off, crop off: nothing drawn, identity. */
    kd_transform_cfg none = {0};
    kd_rng r;
    kd_rng_init(&r, 1, 2);
    kd_transform_draw d = kd_transform_draw_from(&none, &r);
    assert_int_equal(d.top + d.left + d.flip, 0);
}

/* ------------------------------------------------------------------ loader */

typedef struct {
    int64_t nb;
    int64_t *n;  /* per batch */
    float *x;    /* all batches concatenated */
    int32_t *y;
    int64_t *index;
    int64_t total;
} epoch_dump;

static void dump_free(epoch_dump *e) {
    free(e->n);
    free(e->x);
    free(e->y);
    free(e->index);
}

/* Runs one epoch and copies every batch out. */
static epoch_dump run_epoch(kd_loader *l, const kd_dataset *ds, int64_t epoch) {
    int64_t per = (int64_t)kd_dataset_channels(ds) * kd_dataset_height(ds) * kd_dataset_width(ds);
    int64_t N = kd_dataset_size(ds);
    epoch_dump e = {0};
    e.n = calloc((size_t)kd_loader_num_batches(l) + 1, sizeof *e.n);
    e.x = malloc((size_t)(N * per) * sizeof *e.x);
    e.y = malloc((size_t)N * sizeof *e.y);
    e.index = malloc((size_t)N * sizeof *e.index);
    KD_ASSERT_OK(kd_loader_start_epoch(l, epoch));
    kd_batch b;
    int r;
    while ((r = kd_loader_next(l, &b)) == 1) {
        assert_int_equal(b.batch, e.nb);
        assert_true(e.total + b.n <= N);
        memcpy(e.x + e.total * per, b.x, (size_t)(b.n * per) * sizeof *b.x);
        memcpy(e.y + e.total, b.y, (size_t)b.n * sizeof *b.y);
        memcpy(e.index + e.total, b.index, (size_t)b.n * sizeof *b.index);
        e.n[e.nb++] = b.n;
        e.total += b.n;
    }
    assert_int_equal(r, 0);
    assert_int_equal(kd_loader_next(l, &b), 0); /* stays at the end */
    assert_int_equal(e.nb, kd_loader_num_batches(l));
    return e;
}

static kd_dataset *loader_ds(int64_t n) {
    int32_t *lab = malloc((size_t)n * sizeof *lab);
    for (int64_t i = 0; i < n; i++) lab[i] = (int32_t)(i % 10);
    kd_dataset *ds = make_ds(n, 3, 8, 6, lab, 10);
    free(lab);
    return ds;
}

static const kd_loader_cfg base_cfg = {
    .batch_size = 10, .shuffle = 1, .seed = 1234,
    .transform = {.pad_crop = 2, .hflip = 1, .normalize = 1,
                  .mean = {0.49f, 0.48f, 0.45f}, .std = {0.25f, 0.24f, 0.26f}}};

static void test_loader_coverage(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(103);
    kd_loader *l = NULL;
    kd_loader_cfg cfg = base_cfg;
    cfg.num_workers = 2;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    assert_int_equal(kd_loader_num_batches(l), 11);
    epoch_dump e0 = run_epoch(l, ds, 0), e1 = run_epoch(l, ds, 1);
    int64_t per = 3 * 8 * 6;
    float *want = malloc((size_t)per * sizeof *want);
    for (int ep = 0; ep < 2; ep++) {
        epoch_dump *e = ep ? &e1 : &e0;
        assert_int_equal(e->total, 103);
        assert_int_equal(e->n[10], 3);
        int seen[103] = {0};
        for (int64_t i = 0; i < 103; i++) {
            int64_t idx = e->index[i];
            assert_true(idx >= 0 && idx < 103);
            seen[idx]++;
            assert_int_equal(e->y[i], kd_dataset_label(ds, idx));
            /* Each row is exactly the documented per-sample transform. */
            KD_ASSERT_OK(kd_transform_sample(&cfg.transform, ds, idx, cfg.seed, ep, want));
            assert_memory_equal(e->x + i * per, want, (size_t)per * sizeof *want);
        }
        for (int i = 0; i < 103; i++) assert_int_equal(seen[i], 1);
    }
    /* A new order every epoch, and not the identity. */
    assert_memory_not_equal(e0.index, e1.index, 103 * sizeof(int64_t));
    int identity = 1;
    for (int i = 0; i < 103; i++) identity &= e0.index[i] == i;
    assert_false(identity);
    free(want);
    dump_free(&e0);
    dump_free(&e1);
    kd_loader_free(l);
    kd_dataset_free(ds);
}

static void test_loader_seed_and_permutation(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(57);
    kd_loader_cfg cfg = base_cfg;
    kd_loader *a = NULL, *b = NULL, *c = NULL;
    KD_ASSERT_OK(kd_loader_init(&a, ds, &cfg));
    KD_ASSERT_OK(kd_loader_init(&b, ds, &cfg));
    cfg.seed = 1235;
    KD_ASSERT_OK(kd_loader_init(&c, ds, &cfg));
    epoch_dump ea = run_epoch(a, ds, 3), eb = run_epoch(b, ds, 3), ec = run_epoch(c, ds, 3);
    assert_memory_equal(ea.index, eb.index, 57 * sizeof(int64_t));
    assert_memory_equal(ea.x, eb.x, 57 * 144 * sizeof(float));
    assert_memory_not_equal(ea.index, ec.index, 57 * sizeof(int64_t));
    /* The documented Fisher-Yates over kd_rng(seed, kd_rng_key(TAG, epoch)). */
    int64_t perm[57];
    for (int i = 0; i < 57; i++) perm[i] = i;
    kd_rng r;
    kd_rng_init(&r, 1234, kd_rng_key(KD_DATA_SHUFFLE_TAG, 3));
    for (int i = 56; i > 0; i--) {
        int j = (int)kd_rng_below(&r, (uint32_t)i + 1);
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    assert_memory_equal(ea.index, perm, sizeof perm);
    dump_free(&ea);
    dump_free(&eb);
    dump_free(&ec);
    kd_loader_free(a);
    kd_loader_free(b);
    kd_loader_free(c);
    /* No shuffle: dataset order. */
    cfg.shuffle = 0;
    KD_ASSERT_OK(kd_loader_init(&a, ds, &cfg));
    epoch_dump e = run_epoch(a, ds, 0);
    for (int i = 0; i < 57; i++) assert_int_equal(e.index[i], i);
    dump_free(&e);
    kd_loader_free(a);
    kd_dataset_free(ds);
}

static void test_loader_workers_bit_exact(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(211);
    int workers[] = {0, 1, 3, 3, 2};
    int prefetch[] = {0, 0, 0, 1, 7};
    epoch_dump ref[2];
    for (size_t t = 0; t < sizeof workers / sizeof workers[0]; t++) {
        kd_loader_cfg cfg = base_cfg;
        cfg.batch_size = 16;
        cfg.num_workers = workers[t];
        cfg.prefetch = prefetch[t];
        kd_loader *l = NULL;
        KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
        for (int ep = 0; ep < 2; ep++) {
            epoch_dump e = run_epoch(l, ds, ep + 5);
            assert_int_equal(e.nb, 14);
            if (t == 0) {
                ref[ep] = e;
                continue;
            }
            assert_memory_equal(e.n, ref[ep].n, 14 * sizeof(int64_t));
            assert_memory_equal(e.index, ref[ep].index, 211 * sizeof(int64_t));
            assert_memory_equal(e.y, ref[ep].y, 211 * sizeof(int32_t));
            assert_memory_equal(e.x, ref[ep].x, 211 * 144 * sizeof(float));
            dump_free(&e);
        }
        kd_loader_free(l);
    }
    dump_free(&ref[0]);
    dump_free(&ref[1]);
    kd_dataset_free(ds);
}

static void test_loader_drop_last(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(103);
    kd_loader_cfg cfg = base_cfg;
    cfg.drop_last = 1;
    for (int w = 0; w <= 2; w += 2) {
        cfg.num_workers = w;
        kd_loader *l = NULL;
        KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
        assert_int_equal(kd_loader_num_batches(l), 10);
        epoch_dump e = run_epoch(l, ds, 0);
        assert_int_equal(e.total, 100);
        for (int i = 0; i < 10; i++) assert_int_equal(e.n[i], 10);
        dump_free(&e);
        kd_loader_free(l);
    }
    /* A batch larger than the dataset: one short batch, or none with drop_last. */
    cfg.batch_size = 500;
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    assert_int_equal(kd_loader_num_batches(l), 0);
    epoch_dump e = run_epoch(l, ds, 0);
    dump_free(&e);
    kd_loader_free(l);
    cfg.drop_last = 0;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    e = run_epoch(l, ds, 0);
    assert_int_equal(e.nb, 1);
    assert_int_equal(e.n[0], 103);
    dump_free(&e);
    kd_loader_free(l);
    kd_dataset_free(ds);
}

static void test_loader_restart_and_shutdown(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(300);
    kd_loader_cfg cfg = base_cfg;
    cfg.batch_size = 7;
    cfg.num_workers = 3;
    cfg.prefetch = 4;
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    kd_batch b;
    ASSERT_ERR(kd_loader_next(l, &b), KD_ERR_INVALID, "kd_loader_start_epoch");
    epoch_dump full = run_epoch(l, ds, 2);
    /* Abandon epochs part way, then run epoch 2 again: same batches. */
    for (int k = 0; k < 5; k++) {
        KD_ASSERT_OK(kd_loader_start_epoch(l, 9));
        for (int i = 0; i < k; i++) assert_int_equal(kd_loader_next(l, &b), 1);
    }
    epoch_dump again = run_epoch(l, ds, 2);
    assert_memory_equal(full.index, again.index, 300 * sizeof(int64_t));
    assert_memory_equal(full.x, again.x, 300 * 144 * sizeof(float));
    dump_free(&full);
    dump_free(&again);
    /* Free mid-epoch while workers are busy. */
    KD_ASSERT_OK(kd_loader_start_epoch(l, 3));
    assert_int_equal(kd_loader_next(l, &b), 1);
    kd_loader_free(l);
    /* Free right after start, and without any epoch. */
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    KD_ASSERT_OK(kd_loader_start_epoch(l, 0));
    kd_loader_free(l);
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    kd_loader_free(l);
    kd_loader_free(NULL);
    /* Bad configurations. */
    cfg.batch_size = 0;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "batch_size");
    cfg.batch_size = 4;
    cfg.num_workers = -1;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "num_workers");
    cfg.num_workers = 1;
    cfg.transform.std[1] = 0;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "std");
    assert_null(l);
    kd_dataset_free(ds);
}

/* ------------------------------------------------------------ loader views */

/* FNV-1a over bytes, to compare an epoch with one recorded before views
 * existed. */
static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* The hash of epoch 3 of loader_ds(57) under cfg (x, y, index of each batch
 * in order); checks that each batch is one view, x. */
static uint64_t epoch_hash(const kd_loader_cfg *cfg) {
    kd_dataset *ds = loader_ds(57);
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, ds, cfg));
    assert_int_equal(kd_loader_num_views(l), 1);
    int c, h, w;
    kd_loader_sample_shape(l, &c, &h, &w);
    uint64_t hash = 0xcbf29ce484222325ull;
    KD_ASSERT_OK(kd_loader_start_epoch(l, 3));
    kd_batch b;
    while (kd_loader_next(l, &b) == 1) {
        assert_int_equal(b.n_views, 1);
        assert_ptr_equal(b.views[0], b.x);
        assert_int_equal(b.view_shape[0].c, c);
        assert_int_equal(b.view_shape[0].h, h);
        assert_int_equal(b.view_shape[0].w, w);
        hash = fnv1a(hash, b.x, (size_t)b.n * (size_t)(c * h * w) * sizeof(float));
        hash = fnv1a(hash, b.y, (size_t)b.n * sizeof *b.y);
        hash = fnv1a(hash, b.index, (size_t)b.n * sizeof *b.index);
    }
    kd_loader_free(l);
    kd_dataset_free(ds);
    return hash;
}

/* A one-view loader (n_views 0, 1, or 1 with view_transforms) gives the bytes
 * it gave before views existed (hashes recorded from commit 78c8ec3), on the
 * direct path and through the geometry step (another output size). */
static void test_loader_one_view_unchanged(void **state) {
    (void)state;
    static const uint64_t want[2] = {0xfca8541ce7806898ull, 0x4ed5f4ccc3e0fc6cull};
    for (int geo = 0; geo < 2; geo++) {
        kd_loader_cfg cfg = base_cfg;
        if (geo) cfg.transform.out_h = 10, cfg.transform.out_w = 7;
        kd_transform_cfg one = cfg.transform;
        for (int form = 0; form < 3; form++) {
            kd_loader_cfg c = cfg;
            c.n_views = form ? 1 : 0;
            c.view_transforms = form == 2 ? &one : NULL;
            for (int nw = 0; nw <= 2; nw += 2) {
                c.num_workers = nw;
                uint64_t h = epoch_hash(&c);
                if (h != want[geo])
                    fail_msg("geometry %d, form %d, %d workers: epoch hash %#llx, before views %#llx", geo,
                             form, nw, (unsigned long long)h, (unsigned long long)want[geo]);
            }
        }
    }
}

/* Every view of one epoch, copied out: view v of the i-th sample of the
 * epoch at x[v] + i * per[v]. */
typedef struct {
    int nv;
    int64_t per[4];
    float *x[4];
    int64_t *index;
    int32_t *y;
    int64_t total;
} views_dump;

static void views_dump_free(views_dump *e) {
    for (int v = 0; v < e->nv; v++) free(e->x[v]);
    free(e->index);
    free(e->y);
}

static views_dump run_epoch_views(kd_loader *l, const kd_dataset *ds, int64_t epoch) {
    views_dump e = {0};
    int64_t N = kd_dataset_size(ds);
    e.nv = kd_loader_num_views(l);
    assert_true(e.nv >= 1 && e.nv <= 4);
    for (int v = 0; v < e.nv; v++) {
        int c, h, w;
        kd_loader_view_shape(l, v, &c, &h, &w);
        e.per[v] = (int64_t)c * h * w;
        e.x[v] = malloc((size_t)(N * e.per[v]) * sizeof(float));
    }
    e.index = malloc((size_t)N * sizeof *e.index);
    e.y = malloc((size_t)N * sizeof *e.y);
    KD_ASSERT_OK(kd_loader_start_epoch(l, epoch));
    kd_batch b;
    int r;
    while ((r = kd_loader_next(l, &b)) == 1) {
        assert_int_equal(b.n_views, e.nv);
        assert_ptr_equal(b.x, b.views[0]);
        for (int v = 0; v < e.nv; v++) {
            int c, h, w;
            kd_loader_view_shape(l, v, &c, &h, &w);
            assert_int_equal(b.view_shape[v].c, c);
            assert_int_equal(b.view_shape[v].h, h);
            assert_int_equal(b.view_shape[v].w, w);
            memcpy(e.x[v] + e.total * e.per[v], b.views[v], (size_t)(b.n * e.per[v]) * sizeof(float));
        }
        memcpy(e.index + e.total, b.index, (size_t)b.n * sizeof *b.index);
        memcpy(e.y + e.total, b.y, (size_t)b.n * sizeof *b.y);
        e.total += b.n;
    }
    assert_int_equal(r, 0);
    assert_int_equal(e.total, N);
    return e;
}

static void assert_views_equal(const views_dump *a, const views_dump *b) {
    assert_int_equal(a->nv, b->nv);
    assert_int_equal(a->total, b->total);
    assert_memory_equal(a->index, b->index, (size_t)a->total * sizeof *a->index);
    assert_memory_equal(a->y, b->y, (size_t)a->total * sizeof *a->y);
    for (int v = 0; v < a->nv; v++)
        assert_memory_equal(a->x[v], b->x[v], (size_t)(a->total * a->per[v]) * sizeof(float));
}

/* Three views of one transform (random crop + flip): view 0 is the one-view
 * output, views 1 and 2 draw from their own streams (the documented
 * kd_rng_key(kd_data_sample_key(...), v)), so they differ from view 0 and
 * from each other; the bytes do not depend on the number of workers. */
static void test_loader_three_views(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(97);
    const int64_t N = 97, per = 3 * 8 * 6;
    kd_loader_cfg one = base_cfg;
    one.batch_size = 8;
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &one));
    views_dump ref1 = run_epoch_views(l, ds, 4);
    kd_loader_free(l);

    int workers[] = {0, 1, 3, 2}, prefetch[] = {0, 0, 0, 1};
    views_dump d[4];
    for (int t = 0; t < 4; t++) {
        kd_loader_cfg cfg = one;
        cfg.n_views = 3;
        cfg.num_workers = workers[t];
        cfg.prefetch = prefetch[t];
        KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
        assert_int_equal(kd_loader_num_views(l), 3);
        d[t] = run_epoch_views(l, ds, 4);
        kd_loader_free(l);
        if (t) assert_views_equal(&d[0], &d[t]);
    }
    /* View 0 is the one-view loader's output, bit for bit. */
    assert_memory_equal(d[0].index, ref1.index, (size_t)N * sizeof *ref1.index);
    assert_memory_equal(d[0].x[0], ref1.x[0], (size_t)(N * per) * sizeof(float));
    /* Each view of each sample is its documented recomputation. */
    float *want = malloc((size_t)per * sizeof *want), *mine = malloc((size_t)per * sizeof *mine);
    int64_t same01 = 0, same02 = 0, same12 = 0;
    for (int64_t i = 0; i < N; i++) {
        int64_t idx = d[0].index[i];
        for (int v = 0; v < 3; v++) {
            KD_ASSERT_OK(kd_transform_sample_view(&one.transform, ds, idx, one.seed, 4, v, want));
            assert_memory_equal(d[0].x[v] + i * per, want, (size_t)per * sizeof *want);
            kd_rng r;
            uint64_t key = kd_data_sample_key(one.seed, 4, idx);
            kd_rng_init(&r, one.seed, v ? kd_rng_key(key, (uint64_t)v) : key);
            assert_true(kd_data_view_key(one.seed, 4, idx, v) == (v ? kd_rng_key(key, (uint64_t)v) : key));
            kd_transform_draw dr = kd_transform_draw_from(&one.transform, &r);
            kd_transform_apply(&one.transform, &dr, kd_dataset_image(ds, idx), 3, 8, 6, mine);
            assert_memory_equal(mine, want, (size_t)per * sizeof *want);
        }
        same01 += !memcmp(d[0].x[0] + i * per, d[0].x[1] + i * per, (size_t)per * sizeof(float));
        same02 += !memcmp(d[0].x[0] + i * per, d[0].x[2] + i * per, (size_t)per * sizeof(float));
        same12 += !memcmp(d[0].x[1] + i * per, d[0].x[2] + i * per, (size_t)per * sizeof(float));
    }
    /* 50 equally likely (window, flip) draws: a pair of views coincides for
     * about 2 of 97 samples; independent streams never for most. */
    printf("  views equal on %lld, %lld, %lld of %lld samples (0-1, 0-2, 1-2)\n", (long long)same01,
           (long long)same02, (long long)same12, (long long)N);
    assert_true(same01 < N / 5 && same02 < N / 5 && same12 < N / 5);
    free(want);
    free(mine);
    views_dump_free(&ref1);
    for (int t = 0; t < 4; t++) views_dump_free(&d[t]);
    kd_dataset_free(ds);
}

/* A geometry hook for view tests: a random top-left shift of 0 or 1 pixel
 * (drawn from the view's stream), then the out_h x out_w window. */
static kd_status shift_window(const void *ctx, kd_rng *r, const uint8_t *src, int c, int h, int w, uint8_t *dst,
                              int out_h, int out_w, kd_scratch *scratch) {
    (void)ctx;
    (void)scratch;
    int dy = (int)kd_rng_below(r, 2), dx = (int)kd_rng_below(r, 2);
    if (out_h + dy > h || out_w + dx > w) return kd_error(KD_ERR_SHAPE, "shift_window: window too large");
    for (int ch = 0; ch < c; ch++)
        for (int y = 0; y < out_h; y++)
            for (int x = 0; x < out_w; x++)
                dst[((size_t)ch * out_h + y) * out_w + x] = src[((size_t)ch * h + y + dy) * w + x + dx];
    return KD_OK;
}

/* Views of their own sizes: view 0 at the dataset's size (8x6), view 1 at
 * 10x7 through Resize + CenterCrop, view 2 at 5x4 through a geometry hook
 * with no flip or crop; each has its own shape and its recomputation. */
static void test_loader_views_sizes(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(41);
    kd_transform_cfg tfs[3] = {base_cfg.transform, base_cfg.transform, base_cfg.transform};
    tfs[1].out_h = 10, tfs[1].out_w = 7;
    tfs[2].out_h = 5, tfs[2].out_w = 4;
    tfs[2].pad_crop = 0, tfs[2].hflip = 0;
    tfs[2].geometry = shift_window;
    kd_loader_cfg cfg = base_cfg;
    cfg.batch_size = 6;
    cfg.n_views = 3;
    cfg.view_transforms = tfs;
    views_dump d[3];
    for (int nw = 0; nw < 3; nw++) {
        cfg.num_workers = nw;
        kd_loader *l = NULL;
        KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
        const int want[3][3] = {{3, 8, 6}, {3, 10, 7}, {3, 5, 4}};
        for (int v = 0; v < 3; v++) {
            int c, h, w;
            kd_loader_view_shape(l, v, &c, &h, &w);
            assert_int_equal(c, want[v][0]);
            assert_int_equal(h, want[v][1]);
            assert_int_equal(w, want[v][2]);
        }
        int c, h, w;
        kd_loader_sample_shape(l, &c, &h, &w);
        assert_int_equal(h * 10 + w, 86);
        d[nw] = run_epoch_views(l, ds, 1);
        kd_loader_free(l);
        if (nw) assert_views_equal(&d[0], &d[nw]);
    }
    float want[3 * 10 * 7];
    for (int64_t i = 0; i < 41; i++) {
        int64_t idx = d[0].index[i];
        for (int v = 0; v < 3; v++) {
            KD_ASSERT_OK(kd_transform_sample_view(&tfs[v], ds, idx, cfg.seed, 1, v, want));
            assert_memory_equal(d[0].x[v] + i * d[0].per[v], want, (size_t)d[0].per[v] * sizeof(float));
        }
        /* View 2 by hand: the window at the shift drawn first from its stream. */
        kd_rng r;
        kd_rng_init(&r, cfg.seed, kd_data_view_key(cfg.seed, 1, idx, 2));
        int dy = (int)kd_rng_below(&r, 2), dx = (int)kd_rng_below(&r, 2);
        const uint8_t *src = kd_dataset_image(ds, idx);
        for (int ch = 0; ch < 3; ch++)
            for (int y = 0; y < 5; y++)
                for (int x = 0; x < 4; x++) {
                    float u = (float)src[(ch * 8 + y + dy) * 6 + x + dx] / 255.0f;
                    float e = (u - tfs[2].mean[ch]) / tfs[2].std[ch];
                    if (d[0].x[2][i * 60 + (ch * 5 + y) * 4 + x] != e)
                        fail_msg("sample %lld view 2 at (%d, %d, %d)", (long long)idx, ch, y, x);
                }
    }
    for (int nw = 0; nw < 3; nw++) views_dump_free(&d[nw]);
    kd_dataset_free(ds);
}

/* Two SSL views (kd_transform_cfg.ssl: SimCLR/MoCo pipelines) through the
 * loader: each view equals ToTensor + kd_ssl_aug_apply with the parameters
 * kd_ssl_aug_draw takes from that view's stream, for any worker count; the
 * two views of a sample differ; a size mismatch is refused. */
static void test_loader_ssl_views(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(23);
    kd_ssl_aug_cfg aug[2] = {kd_ssl_aug_cfg_mocov2(5), kd_ssl_aug_cfg_mocov2(5)};
    aug[1].blur_p = 1.0f;
    aug[1].solarize_p = 0.5f;
    kd_transform_cfg tfs[2] = {base_cfg.transform, base_cfg.transform};
    for (int v = 0; v < 2; v++) {
        tfs[v].ssl = &aug[v];
        tfs[v].out_h = tfs[v].out_w = 5;
    }
    kd_loader_cfg cfg = base_cfg;
    cfg.batch_size = 5;
    cfg.n_views = 2;
    cfg.view_transforms = tfs;
    views_dump d[2];
    for (int nw = 0; nw < 2; nw++) {
        cfg.num_workers = nw * 2;
        kd_loader *l = NULL;
        KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
        d[nw] = run_epoch_views(l, ds, 3);
        kd_loader_free(l);
        if (nw) assert_views_equal(&d[0], &d[nw]);
    }
    float fsrc[3 * 8 * 6], work[25], want[3 * 5 * 5];
    int differ = 0;
    for (int64_t i = 0; i < 23; i++) {
        int64_t idx = d[0].index[i];
        const uint8_t *src = kd_dataset_image(ds, idx);
        for (int k = 0; k < 3 * 8 * 6; k++) fsrc[k] = (float)src[k] / 255.0f;
        for (int v = 0; v < 2; v++) {
            kd_rng r;
            kd_rng_init(&r, cfg.seed, kd_data_view_key(cfg.seed, 3, idx, v));
            kd_ssl_aug_params p = kd_ssl_aug_draw(&aug[v], &r, 8, 6);
            kd_ssl_aug_apply(&aug[v], &p, fsrc, 3, 8, 6, work, want);
            assert_memory_equal(d[0].x[v] + i * 75, want, sizeof want);
        }
        differ += memcmp(d[0].x[0] + i * 75, d[0].x[1] + i * 75, sizeof want) != 0;
    }
    assert_true(differ > 20);
    for (int nw = 0; nw < 2; nw++) views_dump_free(&d[nw]);
    kd_loader *l = NULL;
    tfs[1].out_h = tfs[1].out_w = 6;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "view 1: transform: the self-supervised pipeline makes 5x5");
    tfs[1].out_h = tfs[1].out_w = 5;
    aug[1].gray_p = 2.0f;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "gray_p = 2");
    assert_null(l);
    kd_dataset_free(ds);
}

/* Bad view configurations are refused, naming the view and the setting. */
static void test_loader_views_bad(void **state) {
    (void)state;
    kd_dataset *ds = loader_ds(20);
    kd_loader *l = NULL;
    kd_loader_cfg cfg = base_cfg;
    cfg.n_views = -1;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "n_views -1");
    kd_transform_cfg tfs[3] = {base_cfg.transform, base_cfg.transform, base_cfg.transform};
    cfg.n_views = 0;
    cfg.view_transforms = tfs;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "view_transforms is set but n_views is 0");
    cfg.n_views = 3;
    tfs[1].pad_crop = -1;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "view 1: transform: pad_crop -1");
    tfs[1].pad_crop = 2;
    tfs[2].std[2] = 0.0f;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "view 2: transform: channel 2");
    tfs[2].std[2] = 0.5f;
    tfs[2].out_h = 4;
    ASSERT_ERR(kd_loader_init(&l, ds, &cfg), KD_ERR_INVALID, "view 2: transform: output size 4x0");
    assert_null(l);
    tfs[2].out_w = 4;
    KD_ASSERT_OK(kd_loader_init(&l, ds, &cfg));
    kd_loader_free(l);
    kd_dataset_free(ds);
}

/* -------------------------------------------------------- real Fashion-MNIST */

#define KD_FASHION_DIR "/usr/share/datasets/fashion-mnist"

static int fashion_present(void) {
    FILE *f = fopen(KD_FASHION_DIR "/train-labels-idx1-ubyte.gz", "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

static void test_fashion_mnist(void **state) {
    (void)state;
    if (!fashion_present()) {
        print_message("skipping: %s is absent (Debian package dataset-fashion-mnist)\n",
                      KD_FASHION_DIR);
        skip();
    }
    for (int train = 1; train >= 0; train--) {
        kd_dataset *ds = NULL;
        KD_ASSERT_OK(kd_dataset_open(KD_FASHION_DIR, train, &ds));
        int64_t n = train ? 60000 : 10000;
        assert_int_equal(kd_dataset_size(ds), n);
        assert_int_equal(kd_dataset_channels(ds), 1);
        assert_int_equal(kd_dataset_height(ds), 28);
        assert_int_equal(kd_dataset_width(ds), 28);
        assert_int_equal(kd_dataset_num_classes(ds), 10);
        assert_string_equal(kd_dataset_name(ds), "fashion-mnist");
        int64_t hist[10] = {0};
        double sum = 0;
        for (int64_t i = 0; i < n; i++) {
            hist[kd_dataset_label(ds, i)]++;
            const uint8_t *im = kd_dataset_image(ds, i);
            for (int j = 0; j < 784; j++) sum += im[j];
        }
        for (int k = 0; k < 10; k++) assert_int_equal(hist[k], n / 10);
        /* The usual normalisation constant: mean 0.2860 (train), 0.2868 (test). */
        double mean = sum / (255.0 * 784.0 * (double)n);
        assert_true(fabs(mean - (train ? 0.2860 : 0.2868)) < 5e-4);
        /* The first training label of Fashion-MNIST is 9 (ankle boot). */
        if (train) assert_int_equal(kd_dataset_label(ds, 0), 9);
        kd_dataset_free(ds);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idx_plain_roundtrip),
        cmocka_unit_test(test_idx_gz_roundtrip),
        cmocka_unit_test(test_idx_suffix_and_prefix),
        cmocka_unit_test(test_idx_missing),
        cmocka_unit_test(test_idx_truncated),
        cmocka_unit_test(test_idx_bad_magic_and_counts),
        cmocka_unit_test(test_cifar10),
        cmocka_unit_test(test_cifar100),
        cmocka_unit_test(test_cifar_errors),
        cmocka_unit_test(test_from_memory_errors),
        cmocka_unit_test(test_subset),
        cmocka_unit_test(test_transform_identity_flip),
        cmocka_unit_test(test_transform_crop_shift),
        cmocka_unit_test(test_transform_normalize),
        cmocka_unit_test(test_transform_draws),
        cmocka_unit_test(test_loader_coverage),
        cmocka_unit_test(test_loader_seed_and_permutation),
        cmocka_unit_test(test_loader_workers_bit_exact),
        cmocka_unit_test(test_loader_drop_last),
        cmocka_unit_test(test_loader_restart_and_shutdown),
        cmocka_unit_test(test_loader_one_view_unchanged),
        cmocka_unit_test(test_loader_three_views),
        cmocka_unit_test(test_loader_views_sizes),
        cmocka_unit_test(test_loader_ssl_views),
        cmocka_unit_test(test_loader_views_bad),
        cmocka_unit_test(test_fashion_mnist),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
