/* Hostile input: crafted files (gzip bombs, lying headers, sparse files,
 * images claiming huge sizes, list labels beyond the class limit) must give a
 * clear error naming the file, and opening them must stay within a small
 * memory bound: each case runs in a forked child (kd_test_measure) whose peak
 * resident memory growth (getrusage ru_maxrss) is checked. Also the label
 * checks of a training run (kd_dataset_check_labels). */
#include "testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd/data.h"
#include "kd/io.h"

/* Fails unless the measured run failed with `status`, a message holding
 * `needle`, and a memory growth of at most max_kib. */
static void expect_bounded(const kd_test_measured *m, kd_status status, const char *needle,
                           long max_kib, const char *what) {
    print_message("%s: status %s, growth %ld KiB (peak %ld KiB), error: %s\n", what,
                  kd_status_str((kd_status)m->status), m->growth_kib, m->peak_kib, m->error);
    if (m->status != (int)status)
        fail_msg("%s: status %s (%s), want %s", what, kd_status_str((kd_status)m->status), m->error,
                 kd_status_str(status));
    if (needle && !strstr(m->error, needle))
        fail_msg("%s: message \"%s\" lacks \"%s\"", what, m->error, needle);
    if (m->growth_kib > max_kib)
        fail_msg("%s: memory grew by %ld KiB, more than the bound of %ld KiB", what, m->growth_kib,
                 max_kib);
}

static char g_path[2048];

static kd_status open_idx_train(void *arg) {
    kd_dataset *ds = NULL;
    kd_status st = kd_dataset_open_idx((const char *)arg, 1, &ds);
    kd_dataset_free(ds);
    return st;
}

static kd_status open_cifar10_train(void *arg) {
    kd_dataset *ds = NULL;
    kd_status st = kd_dataset_open_cifar((const char *)arg, 10, 1, &ds);
    kd_dataset_free(ds);
    return st;
}

static kd_status open_stl10_train(void *arg) {
    kd_dataset *ds = NULL;
    kd_status st = kd_dataset_open_stl10((const char *)arg, KD_SPLIT_TRAIN, &ds);
    kd_dataset_free(ds);
    return st;
}

static kd_status open_st(void *arg) {
    kd_st_file *f = NULL;
    kd_status st = kd_st_open((const char *)arg, &f);
    kd_st_close(f);
    return st;
}

static kd_status read_image(void *arg) {
    kd_image im = {0};
    kd_status st = kd_image_read((const char *)arg, &im);
    kd_image_free(&im);
    return st;
}

static kd_status open_list(void *arg) {
    kd_dataset *ds = NULL;
    kd_status st = kd_dataset_open_list((const char *)arg, &ds);
    if (st == KD_OK && kd_dataset_num_classes(ds) != KD_DATASET_MAX_CLASSES) st = KD_ERR_INVALID;
    kd_dataset_free(ds);
    return st;
}

/* An IDX header (16 bytes) for n images of h x w. */
static void idx_header(unsigned char *b, uint32_t n, uint32_t h, uint32_t w) {
    kd_test_put_be32(b, 0x803);
    kd_test_put_be32(b + 4, n);
    kd_test_put_be32(b + 8, h);
    kd_test_put_be32(b + 12, w);
}

static void write_idx_labels(const char *dir, uint32_t n) {
    unsigned char *b = calloc(1, 8 + n);
    kd_test_put_be32(b, 0x801);
    kd_test_put_be32(b + 4, n);
    char p[1100];
    snprintf(p, sizeof p, "%s/train-labels-idx1-ubyte", dir);
    kd_test_write_file(p, b, 8 + n);
    free(b);
}

/* A gzip stream whose header allows 10 images of 28x28 (7856 bytes) but that
 * inflates to 64 MiB more: refused once the stream passes the header's size. */
static void test_idx_gzip_bomb(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("gzbomb");
    unsigned char b[16 + 7840] = {0};
    idx_header(b, 10, 28, 28);
    snprintf(g_path, sizeof g_path, "%s/train-images-idx3-ubyte.gz", dir);
    kd_test_write_gz_bomb(g_path, b, sizeof b, (uint64_t)64 << 20);
    write_idx_labels(dir, 10);
    struct stat sb;
    assert_int_equal(stat(g_path, &sb), 0);
    print_message("gzip bomb: %lld bytes on disk, %llu inflated\n", (long long)sb.st_size,
                  (unsigned long long)(sizeof b + ((uint64_t)64 << 20)));
    kd_test_measured m = kd_test_measure(open_idx_train, (void *)dir);
    expect_bounded(&m, KD_ERR_FORMAT, "train-images-idx3-ubyte.gz: trailing data", 16 << 10,
                   "gzip bomb");
    assert_non_null(strstr(m.error, "10 images of 28x28"));
}

/* Headers that lie about the size: far more images than memory holds (no
 * allocation at all), more images than the short stream holds (allocation
 * follows the stream, not the header), and a plain file (sparse, 1 GiB)
 * much longer than its header says (refused from its size alone). */
static void test_idx_lying_header(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("idxlie");
    unsigned char b[16 + 784] = {0};
    snprintf(g_path, sizeof g_path, "%s/train-images-idx3-ubyte.gz", dir);
    idx_header(b, 0x7fffffffu, 28, 28); /* 1.7 TB */
    kd_test_write_gz(g_path, b, sizeof b);
    write_idx_labels(dir, 10);
    kd_test_measured m = kd_test_measure(open_idx_train, (void *)dir);
    expect_bounded(&m, KD_ERR_FORMAT, "more than this machine has", 4 << 10, "1.7 TB claimed");
    assert_non_null(strstr(m.error, "train-images-idx3-ubyte.gz"));

    idx_header(b, 1000000, 28, 28); /* 784 MB claimed, one image given */
    kd_test_write_gz(g_path, b, sizeof b);
    m = kd_test_measure(open_idx_train, (void *)dir);
    expect_bounded(&m, KD_ERR_FORMAT, "truncated: expected 784000016 bytes", 4 << 10,
                   "784 MB claimed, 800 bytes given");

    unlink(g_path);
    snprintf(g_path, sizeof g_path, "%s/train-images-idx3-ubyte", dir);
    idx_header(b, 1, 28, 28);
    kd_test_write_sparse(g_path, b, sizeof b, (uint64_t)1 << 30);
    m = kd_test_measure(open_idx_train, (void *)dir);
    expect_bounded(&m, KD_ERR_FORMAT, "train-images-idx3-ubyte: trailing data", 4 << 10,
                   "sparse 1 GiB plain IDX");
}

/* CIFAR files have no header: a sparse file far larger than memory is
 * refused from its size; a gzipped one is refused (it could inflate to
 * anything). */
static void test_cifar_sparse_and_gzip(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("cifarsparse");
    char p[1100];
    for (int i = 1; i <= 5; i++) {
        snprintf(p, sizeof p, "%s/data_batch_%d.bin", dir, i);
        kd_test_write_sparse(p, NULL, 0, (uint64_t)3073 << 30); /* 3.3 TB */
    }
    kd_test_measured m = kd_test_measure(open_cifar10_train, (void *)dir);
    expect_bounded(&m, KD_ERR_FORMAT, "data_batch_1.bin: reading it needs", 4 << 10,
                   "sparse 3.3 TB CIFAR file");
    assert_non_null(strstr(m.error, "more than this machine has"));

    unsigned char rec[3073] = {3};
    snprintf(p, sizeof p, "%s/data_batch_1.bin", dir);
    kd_test_write_gz_bomb(p, rec, sizeof rec, (uint64_t)3073 * 20000);
    m = kd_test_measure(open_cifar10_train, (void *)dir);
    expect_bounded(&m, KD_ERR_FORMAT, "data_batch_1.bin: gzip-compressed", 4 << 10,
                   "gzipped CIFAR file");
}

/* STL-10: a sparse images file of 4M records (116 GB) beside a labels file of
 * 10 bytes is refused before its record index is allocated. */
static void test_stl10_sparse(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("stlsparse");
    char p[1100];
    snprintf(p, sizeof p, "%s/train_X.bin", dir);
    kd_test_write_sparse(p, NULL, 0, (uint64_t)27648 << 22);
    snprintf(p, sizeof p, "%s/train_y.bin", dir);
    kd_test_write_file(p, "\1\2\3\4\5\6\7\10\11\12", 10);
    kd_test_measured m = kd_test_measure(open_stl10_train, (void *)dir);
    expect_bounded(&m, KD_ERR_FORMAT, "train_y.bin: 10 labels, but", 4 << 10,
                   "sparse STL-10 images file");
    assert_non_null(strstr(m.error, "holds 4194304 images"));
}

/* Writes a safetensors file: the header JSON, then `data` bytes of which the
 * first n are given (the rest a hole). */
static void write_st(const char *path, const char *json, const void *d, size_t n, uint64_t data) {
    size_t hl = strlen(json);
    unsigned char *b = calloc(1, 8 + hl + n);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, json, hl);
    if (n) memcpy(b + 8 + hl, d, n);
    kd_test_write_sparse(path, b, 8 + hl + n, 8 + hl + data);
    free(b);
}

static void test_safetensors_lying(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("stlie");
    /* A header length of 2^62. */
    snprintf(g_path, sizeof g_path, "%s/hlen.safetensors", dir);
    unsigned char b[24] = {0};
    b[7] = 0x40;
    kd_test_write_file(g_path, b, sizeof b);
    kd_test_measured m = kd_test_measure(open_st, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "hlen.safetensors: header length 4611686018427387904", 4 << 10,
                   "header length 2^62");
    /* Offsets past the end of a 64-byte data section. */
    snprintf(g_path, sizeof g_path, "%s/offs.safetensors", dir);
    write_st(g_path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1000000000],\"data_offsets\":[0,4000000000]}}",
             NULL, 0, 64);
    m = kd_test_measure(open_st, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "offs.safetensors: tensor 'w' has data_offsets [0, 4000000000] outside",
                   4 << 10, "offsets past the file");
    /* A tensor of 2 TB in a sparse file of that size. */
    snprintf(g_path, sizeof g_path, "%s/huge.safetensors", dir);
    write_st(g_path, "{\"w\":{\"dtype\":\"U8\",\"shape\":[2199023255552],\"data_offsets\":[0,2199023255552]}}",
             NULL, 0, (uint64_t)1 << 41);
    m = kd_test_measure(open_st, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "huge.safetensors: its tensors need", 4 << 10,
                   "2 TB tensor in a sparse file");
    /* A small tensor at the start of a sparse 64 GiB file: opens, and only
     * what the tensors occupy is read. */
    snprintf(g_path, sizeof g_path, "%s/tail.safetensors", dir);
    float v[4] = {1, 2, 3, 4};
    write_st(g_path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}    ", v,
             sizeof v, (uint64_t)64 << 30);
    m = kd_test_measure(open_st, g_path);
    expect_bounded(&m, KD_OK, NULL, 4 << 10, "small tensor, sparse 64 GiB file");
}

/* Images claiming more pixels than kd decodes are refused from the header;
 * one at the limit with almost no data fails at the first missing row
 * without touching the full image. */
static void test_images_huge(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("imghuge");
    kd_test_measured m;
    snprintf(g_path, sizeof g_path, "%s/wide.png", dir);
    kd_test_write_png_claiming(g_path, 100000, 100000);
    m = kd_test_measure(read_image, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "wide.png: PNG larger than kd decodes", 4 << 10,
                   "PNG 100000 x 100000");
    kd_test_write_png_claiming(g_path, KD_IMAGE_MAX_SIDE + 1, 16);
    m = kd_test_measure(read_image, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "wide.png: PNG larger than kd decodes", 4 << 10,
                   "PNG one pixel wider than the limit");
    kd_test_write_png_claiming(g_path, KD_IMAGE_MAX_SIDE, KD_IMAGE_MAX_SIDE);
    m = kd_test_measure(read_image, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "wide.png: PNG of 16384x16384 pixels is larger than kd decodes",
                   4 << 10, "PNG 16384 x 16384 (2^28 pixels)");
    kd_test_write_png_claiming(g_path, KD_IMAGE_MAX_SIDE, 4096);
    m = kd_test_measure(read_image, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "wide.png: corrupt PNG", 8 << 10,
                   "PNG at the limit, 100 bytes of data");

    snprintf(g_path, sizeof g_path, "%s/big.jpg", dir);
    kd_test_write_jpeg_claiming(g_path, 65000, 65000, 0);
    m = kd_test_measure(read_image, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "big.jpg: JPEG of 65000x65000 pixels is larger than kd decodes",
                   4 << 10, "JPEG 65000 x 65000");
    kd_test_write_jpeg_claiming(g_path, 30000, 1000, 1);
    m = kd_test_measure(read_image, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "big.jpg: JPEG of 30000x1000 pixels is larger", 4 << 10,
                   "progressive JPEG 30000 wide");
    /* A valid 8x8 JPEG of 568 scans: refused at the 501st (each scan costs a
     * pass over the coefficients, so scans, not pixels, bound the work). */
    char bomb[2100];
    snprintf(bomb, sizeof bomb, "%s/scans.jpg", dir);
    int scans = kd_test_write_jpeg_scan_bomb(bomb);
    assert_true(scans > 500);
    m = kd_test_measure(read_image, bomb);
    expect_bounded(&m, KD_ERR_FORMAT, "more than 500 scans", 4 << 10, "JPEG of 568 scans");
    /* Probing reads the header only, with the same limit. */
    int c, h, w;
    assert_int_equal(kd_image_probe(g_path, &c, &h, &w), KD_ERR_FORMAT);
}

/* File lists: labels are class indices below KD_DATASET_MAX_CLASSES. */
static void test_list_label_limit(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("listlab");
    snprintf(g_path, sizeof g_path, "%s/list.txt", dir);
    char text[256];
    snprintf(text, sizeof text, "a.png 0\n# comment\nb.png %d\n", KD_DATASET_MAX_CLASSES - 1);
    kd_test_write_file(g_path, text, strlen(text));
    kd_test_measured m = kd_test_measure(open_list, g_path);
    expect_bounded(&m, KD_OK, NULL, 4 << 10, "largest allowed label");
    snprintf(text, sizeof text, "a.png 0\n# comment\nb.png %d\n", KD_DATASET_MAX_CLASSES);
    kd_test_write_file(g_path, text, strlen(text));
    m = kd_test_measure(open_list, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "list.txt:3: label 100000 is too large", 4 << 10,
                   "label of KD_DATASET_MAX_CLASSES");
    kd_test_write_file(g_path, "x.png 999999999999999999999999999999\n", 37);
    m = kd_test_measure(open_list, g_path);
    expect_bounded(&m, KD_ERR_FORMAT, "list.txt:1: label 999999999999999999999999999999 is too large",
                   4 << 10, "30-digit label");
}

/* kd_dataset_check_labels: training labels outside the evaluation range, and
 * classes without a training image. */
static void test_label_checks(void **state) {
    (void)state;
    enum { NT = 256, NE = 10 };
    uint8_t img[NT] = {0};
    int32_t yt[NT], ye[NE];
    for (int i = 0; i < NT; i++) yt[i] = i;
    for (int i = 0; i < NE; i++) ye[i] = i;
    kd_dataset *tr = NULL, *ev = NULL;
    assert_int_equal(kd_dataset_from_memory("bytes", NT, 1, 1, 1, img, yt, 256, &tr), KD_OK);
    assert_int_equal(kd_dataset_from_memory("digits", NE, 1, 1, 1, img, ye, 10, &ev), KD_OK);
    int32_t lo, hi;
    assert_int_equal(kd_dataset_label_range(tr, &lo, &hi), NT);
    assert_int_equal(lo, 0);
    assert_int_equal(hi, 255);
    char buf[2048];
    assert_int_equal(kd_dataset_check_labels(tr, ev, 256, buf, sizeof buf), 1);
    print_message("%s", buf);
    assert_non_null(strstr(buf, "training labels of bytes span 0..255, outside the evaluation labels of digits (0..9)"));
    /* Same range: no warning. */
    assert_int_equal(kd_dataset_check_labels(ev, ev, 10, buf, sizeof buf), 0);
    assert_string_equal(buf, "");
    kd_dataset_free(tr);

    /* Classes 3-4 and 6-8 of 10 have no training image. */
    int32_t ys[5] = {0, 1, 2, 5, 9};
    assert_int_equal(kd_dataset_from_memory("gaps", 5, 1, 1, 1, img, ys, 10, &tr), KD_OK);
    char list[64];
    assert_int_equal(kd_dataset_missing_classes(tr, 10, list, sizeof list), 5);
    assert_string_equal(list, "3-4, 6-8");
    assert_int_equal(kd_dataset_check_labels(tr, ev, 10, buf, sizeof buf), 1);
    print_message("%s", buf);
    assert_non_null(strstr(buf, "5 of the 10 classes have no training image in gaps: 3-4, 6-8"));
    kd_dataset_free(tr);

    /* Many gaps: the list is cut with "...". */
    int32_t ya[NT];
    for (int i = 0; i < NT; i++) ya[i] = 2 * (i % 128);
    assert_int_equal(kd_dataset_from_memory("even", NT, 1, 1, 1, img, ya, 256, &tr), KD_OK);
    assert_int_equal(kd_dataset_missing_classes(tr, 256, list, sizeof list), 128);
    assert_true(strlen(list) < sizeof list);
    assert_non_null(strstr(list, "1, 3, 5"));
    assert_non_null(strstr(list, "..."));
    kd_dataset_free(tr);
    kd_dataset_free(ev);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idx_gzip_bomb),        cmocka_unit_test(test_idx_lying_header),
        cmocka_unit_test(test_cifar_sparse_and_gzip), cmocka_unit_test(test_stl10_sparse),
        cmocka_unit_test(test_safetensors_lying),    cmocka_unit_test(test_images_huge),
        cmocka_unit_test(test_list_label_limit),     cmocka_unit_test(test_label_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
