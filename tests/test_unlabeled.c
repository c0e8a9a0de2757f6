/* Labeled and unlabeled images in one epoch: kd_dataset_concat over every
 * mix of sources (two in-memory datasets, memory + STL-10 records read with
 * pread, STL-10 train + its unlabeled_X.bin, memory + a folder of JPEGs,
 * nested concats), checked image by image against the bytes the test wrote,
 * labels kept or dropped, subsets of a concat, the loader over a concat,
 * the errors naming both datasets; and the run setting `unlabeled`
 * end to end with the kd program: a kd pretrain epoch that trains on the
 * labeled and the unlabeled images (images counted in the checkpoint and
 * summary.json), its record in config.yaml and summary.json, a resume that
 * tries to change it, and the refusals (a method that needs labels, images
 * of another channel count, a missing directory) with exit 2 naming the
 * setting. */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd/data.h"
#include "kd/io.h"

#define PATHN 2048

static void mkdir_p(const char *path) {
    char cmd[2 * PATHN + 32];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", path);
    assert_int_equal(system(cmd), 0);
}

/* Pixel j of in-memory image i of dataset `tag`. */
static uint8_t mem_pix(int tag, int64_t i, int64_t j) { return (uint8_t)((i * 53 + j * 7 + tag * 91 + (j * j) % 11) & 255); }

/* An in-memory dataset of n (c, h, w) images of mem_pix(tag) and labels
 * (i + tag) % classes. */
static kd_dataset *mem_dataset(const char *name, int tag, int64_t n, int c, int h, int w, int classes) {
    size_t per = (size_t)c * h * w;
    uint8_t *img = malloc((size_t)n * per);
    int32_t *lab = malloc((size_t)n * sizeof *lab);
    for (int64_t i = 0; i < n; i++) {
        for (size_t j = 0; j < per; j++) img[(size_t)i * per + j] = mem_pix(tag, i, (int64_t)j);
        lab[i] = (int32_t)((i + tag) % classes);
    }
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_from_memory(name, n, c, h, w, img, lab, classes, &ds));
    free(img);
    free(lab);
    return ds;
}

/* Fails unless sample i of ds reads as in-memory image k of mem_dataset(tag). */
static void check_mem_sample(const kd_dataset *ds, int64_t i, int tag, int64_t k, int c, int h, int w) {
    kd_image im = {0};
    KD_ASSERT_OK(kd_dataset_read(ds, i, &im));
    assert_int_equal(im.c, c);
    assert_int_equal(im.h, h);
    assert_int_equal(im.w, w);
    for (int64_t j = 0; j < (int64_t)c * h * w; j++)
        if (im.data[j] != mem_pix(tag, k, j)) fail_msg("sample %lld byte %lld", (long long)i, (long long)j);
    kd_image_free(&im);
}

/* ---------------------------------------------------------------- STL-10 */

#define STL KD_TEST_STL

static void check_stl_sample(const kd_dataset *ds, int64_t i, int tag, int64_t k) {
    kd_image im = {0};
    KD_ASSERT_OK(kd_dataset_read(ds, i, &im));
    assert_int_equal(im.c, 3);
    assert_int_equal(im.h, STL);
    assert_int_equal(im.w, STL);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < STL; y++)
            for (int x = 0; x < STL; x++)
                if (im.data[(c * STL + y) * STL + x] != kd_test_stl10_pix(tag, k, c, y, x))
                    fail_msg("sample %lld (%d, %d, %d): not STL-10 record %lld", (long long)i, c, y, x, (long long)k);
    kd_image_free(&im);
}

/* ------------------------------------------------------------ data layer */

/* Two in-memory datasets: an in-memory result, a's samples then b's, labels
 * kept or -1, the combined label array; both inputs may be freed first. */
static void test_concat_memory(void **state) {
    (void)state;
    kd_dataset *a = mem_dataset("alpha", 1, 5, 1, 4, 4, 3), *b = mem_dataset("beta", 2, 3, 1, 4, 4, 3);
    kd_dataset *keep = NULL, *drop = NULL;
    KD_ASSERT_OK(kd_dataset_concat(a, b, 0, &keep));
    KD_ASSERT_OK(kd_dataset_concat(a, b, 1, &drop));
    kd_dataset_free(a);
    kd_dataset_free(b);
    for (int d = 0; d < 2; d++) {
        const kd_dataset *ds = d ? drop : keep;
        assert_int_equal(kd_dataset_size(ds), 8);
        assert_int_equal(kd_dataset_channels(ds), 1);
        assert_int_equal(kd_dataset_height(ds), 4);
        assert_int_equal(kd_dataset_width(ds), 4);
        assert_int_equal(kd_dataset_num_classes(ds), 3);
        assert_false(kd_dataset_is_lazy(ds));
        assert_int_equal(kd_dataset_split(ds), KD_SPLIT_TRAIN);
        assert_non_null(strstr(kd_dataset_name(ds), "alpha"));
        const int32_t *lab = kd_dataset_labels(ds);
        for (int64_t i = 0; i < 8; i++) {
            int32_t want = i < 5 ? (int32_t)((i + 1) % 3) : d ? -1 : (int32_t)((i - 5 + 2) % 3);
            assert_int_equal(kd_dataset_label(ds, i), want);
            assert_int_equal(lab[i], want);
            if (i < 5) check_mem_sample(ds, i, 1, i, 1, 4, 4);
            else check_mem_sample(ds, i, 2, i - 5, 1, 4, 4);
            const uint8_t *p = kd_dataset_image(ds, i);
            assert_non_null(p);
            assert_int_equal(p[3], mem_pix(i < 5 ? 1 : 2, i < 5 ? i : i - 5, 3));
        }
    }
    kd_dataset_free(keep);
    kd_dataset_free(drop);
}

/* Memory + STL-10 records, STL-10 train + unlabeled_X.bin: lazy results
 * that read each record from its own file, paths per part; subsets, label
 * selections and a nested concat keep each part's records; the loader
 * gives every image (pixel / 255 without augmentation) with its label. */
static void test_concat_stl10(void **state) {
    (void)state;
    char dir[PATHN], spec[PATHN + 16], upath[PATHN + 32], tpath[PATHN + 32];
    snprintf(dir, sizeof dir, "%s/stl10_binary", kd_test_tmpdir("unl_stl"));
    mkdir_p(dir);
    kd_test_write_stl10_split(dir, "train", 1, 6, 1);
    kd_test_write_stl10_split(dir, "test", 2, 2, 1);
    kd_test_write_stl10_split(dir, "unlabeled", 3, 9, 0);
    snprintf(spec, sizeof spec, "stl10:%s", dir);
    snprintf(upath, sizeof upath, "%s/unlabeled_X.bin", dir);
    snprintf(tpath, sizeof tpath, "%s/train_X.bin", dir);
    kd_dataset *tr = NULL, *un = NULL;
    KD_ASSERT_OK(kd_dataset_open_split(spec, KD_SPLIT_TRAIN, &tr));
    KD_ASSERT_OK(kd_dataset_open_split(spec, KD_SPLIT_UNLABELED, &un));
    kd_dataset *mem = mem_dataset("mem", 4, 2, 3, STL, STL, 10);

    /* Memory + STL-10 unlabeled. */
    kd_dataset *mu = NULL;
    KD_ASSERT_OK(kd_dataset_concat(mem, un, 1, &mu));
    assert_int_equal(kd_dataset_size(mu), 11);
    assert_true(kd_dataset_is_lazy(mu));
    assert_null(kd_dataset_image(mu, 0)); /* lazy: nothing copied into memory */
    assert_int_equal(kd_dataset_height(mu), STL);
    assert_int_equal(kd_dataset_num_classes(mu), 10);
    for (int64_t i = 0; i < 11; i++) {
        assert_int_equal(kd_dataset_label(mu, i), i < 2 ? (int32_t)((i + 4) % 10) : -1);
        if (i < 2) check_mem_sample(mu, i, 4, i, 3, STL, STL);
        else check_stl_sample(mu, i, 3, i - 2);
        int c, h, w;
        KD_ASSERT_OK(kd_dataset_probe(mu, i, &c, &h, &w));
        assert_true(c == 3 && h == STL && w == STL);
    }
    assert_null(kd_dataset_path(mu, 1));
    assert_string_equal(kd_dataset_path(mu, 5), upath);

    /* STL-10 train (labels kept) + its unlabeled split; the sources freed. */
    kd_dataset *tu = NULL;
    KD_ASSERT_OK(kd_dataset_concat(tr, un, 1, &tu));
    kd_dataset_free(tr);
    kd_dataset_free(un);
    assert_int_equal(kd_dataset_size(tu), 15);
    assert_string_equal(kd_dataset_class_name(tu, 7), "monkey");
    for (int64_t i = 0; i < 15; i++) {
        assert_int_equal(kd_dataset_label(tu, i), i < 6 ? (int32_t)((i * 3 + 1) % 10) : -1);
        if (i < 6) check_stl_sample(tu, i, 1, i);
        else check_stl_sample(tu, i, 3, i - 6);
        assert_string_equal(kd_dataset_path(tu, i), i < 6 ? tpath : upath);
    }

    /* Selections across the parts: records and labels follow. */
    int64_t idx[] = {1, 5, 6, 14};
    kd_dataset *sel = NULL, *kl = NULL, *one = NULL, *sub = NULL;
    KD_ASSERT_OK(kd_dataset_select(tu, idx, 4, &sel));
    assert_int_equal(kd_dataset_size(sel), 4);
    for (int k = 0; k < 4; k++) {
        assert_int_equal(kd_dataset_label(sel, k), kd_dataset_label(tu, idx[k]));
        if (idx[k] < 6) check_stl_sample(sel, k, 1, idx[k]);
        else check_stl_sample(sel, k, 3, idx[k] - 6);
    }
    int64_t only_b[] = {7, 9};
    KD_ASSERT_OK(kd_dataset_select(tu, only_b, 2, &one)); /* one part left */
    assert_int_equal(kd_dataset_size(one), 2);
    assert_int_equal(kd_dataset_label(one, 0), -1);
    assert_int_equal(kd_dataset_num_classes(one), 10);
    check_stl_sample(one, 1, 3, 3);
    KD_ASSERT_OK(kd_dataset_keep_labels(tu, idx, 2, &kl)); /* labels of 1 and 5 only */
    assert_int_equal(kd_dataset_size(kl), 15);
    for (int64_t i = 0; i < 15; i++)
        assert_int_equal(kd_dataset_label(kl, i), i == 1 || i == 5 ? kd_dataset_label(tu, i) : -1);
    check_stl_sample(kl, 12, 3, 6);
    KD_ASSERT_OK(kd_dataset_subset(tu, 4, 3, &sub));
    assert_int_equal(kd_dataset_size(sub), 4);
    for (int k = 0; k < 4; k++) assert_true(kd_dataset_label(sub, k) >= 0); /* class-balanced: labeled ones */

    /* A concat of a concat: parts flattened, every sample where it was. */
    kd_dataset *nest = NULL;
    KD_ASSERT_OK(kd_dataset_concat(tu, mu, 0, &nest));
    assert_int_equal(kd_dataset_size(nest), 26);
    check_stl_sample(nest, 3, 1, 3);
    check_stl_sample(nest, 14, 3, 8);
    check_mem_sample(nest, 16, 4, 1, 3, STL, STL);
    check_stl_sample(nest, 25, 3, 8);
    assert_int_equal(kd_dataset_label(nest, 16), (1 + 4) % 10);

    /* The loader: every sample once, pixel / 255, labels of the concat. */
    kd_loader_cfg cfg = {.batch_size = 4, .shuffle = 1, .seed = 3, .num_workers = 2};
    kd_loader *l = NULL;
    KD_ASSERT_OK(kd_loader_init(&l, mu, &cfg));
    KD_ASSERT_OK(kd_loader_start_epoch(l, 0));
    kd_batch bt;
    int r, seen[11] = {0};
    int64_t total = 0;
    while ((r = kd_loader_next(l, &bt)) == 1) {
        for (int64_t k = 0; k < bt.n; k++) {
            int64_t i = bt.index[k];
            assert_true(i >= 0 && i < 11);
            seen[i]++;
            assert_int_equal(bt.y[k], kd_dataset_label(mu, i));
            const float *x = bt.x + k * 3 * STL * STL;
            for (int j = 0; j < 3 * STL * STL; j++) {
                int c = j / (STL * STL), y = j / STL % STL, xx = j % STL;
                uint8_t want = i < 2 ? mem_pix(4, i, j) : kd_test_stl10_pix(3, i - 2, c, y, xx);
                if (fabsf(x[j] - want / 255.0f) > 1e-6f) fail_msg("loader sample %lld value %d", (long long)i, j);
            }
        }
        total += bt.n;
    }
    assert_int_equal(r, 0);
    assert_int_equal(total, 11);
    for (int i = 0; i < 11; i++) assert_int_equal(seen[i], 1);
    kd_loader_free(l);

    kd_dataset_free(nest);
    kd_dataset_free(sub);
    kd_dataset_free(kl);
    kd_dataset_free(one);
    kd_dataset_free(sel);
    kd_dataset_free(tu);
    kd_dataset_free(mu);
    kd_dataset_free(mem);
}

/* Memory + a folder of JPEGs of other sizes: a varying-size lazy result
 * whose folder samples decode as kd_image_read decodes the files; class
 * folders with labels kept must fit a's classes. */
static void test_concat_folder(void **state) {
    (void)state;
    const char *root = kd_test_tmpdir("unl_folder");
    char flat[PATHN], cls[PATHN], p[PATHN + 64];
    snprintf(flat, sizeof flat, "%s/extra", root);
    mkdir_p(flat);
    static const int sizes[3][2] = {{10, 12}, {8, 8}, {16, 9}};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/img%d.jpg", flat, i);
        kd_test_write_jpeg(p, sizes[i][0], sizes[i][1], (uint64_t)(40 + i));
    }
    kd_dataset *mem = mem_dataset("mem", 5, 4, 3, 8, 8, 2), *un = NULL, *mf = NULL;
    KD_ASSERT_OK(kd_dataset_open_split(flat, KD_SPLIT_UNLABELED, &un));
    KD_ASSERT_OK(kd_dataset_concat(mem, un, 1, &mf));
    assert_int_equal(kd_dataset_size(mf), 7);
    assert_int_equal(kd_dataset_height(mf), 0); /* the folder's images differ in size */
    assert_int_equal(kd_dataset_num_classes(mf), 2);
    assert_true(kd_dataset_is_lazy(mf));
    for (int64_t i = 0; i < 4; i++) {
        check_mem_sample(mf, i, 5, i, 3, 8, 8);
        assert_int_equal(kd_dataset_label(mf, i), (int32_t)((i + 5) % 2));
    }
    kd_image a = {0}, b = {0};
    for (int64_t i = 4; i < 7; i++) {
        assert_int_equal(kd_dataset_label(mf, i), -1);
        snprintf(p, sizeof p, "%s/img%d.jpg", flat, (int)(i - 4));
        assert_string_equal(kd_dataset_path(mf, i), p);
        KD_ASSERT_OK(kd_image_read(p, &a));
        KD_ASSERT_OK(kd_dataset_read(mf, i, &b));
        assert_int_equal(b.w, sizes[i - 4][0]);
        assert_int_equal(b.h, sizes[i - 4][1]);
        assert_memory_equal(a.data, b.data, (size_t)3 * b.h * b.w);
        int c, h, w;
        KD_ASSERT_OK(kd_dataset_probe(mf, i, &c, &h, &w));
        assert_true(c == 3 && h == sizes[i - 4][1] && w == sizes[i - 4][0]);
    }
    kd_image_free(&a);
    kd_image_free(&b);

    /* Class folders (3 classes) after a 2-class dataset: labels kept do not
     * fit; dropped they do. */
    snprintf(cls, sizeof cls, "%s/classes", root);
    for (int k = 0; k < 3; k++) {
        snprintf(p, sizeof p, "%s/c%d", cls, k);
        mkdir_p(p);
        snprintf(p, sizeof p, "%s/c%d/x.jpg", cls, k);
        kd_test_write_jpeg(p, 8, 8, (uint64_t)(50 + k));
    }
    kd_dataset *fo = NULL, *bad = NULL, *ok = NULL;
    KD_ASSERT_OK(kd_dataset_open_folder(cls, &fo));
    ASSERT_ERR(kd_dataset_concat(mem, fo, 0, &bad), KD_ERR_INVALID, "label 2");
    assert_null(bad);
    KD_ASSERT_OK(kd_dataset_concat(fo, mem, 0, &ok)); /* 2 classes inside 3 */
    assert_int_equal(kd_dataset_label(ok, 3), (0 + 5) % 2);
    assert_string_equal(kd_dataset_class_name(ok, 2), "c2");
    kd_dataset_free(ok);
    kd_dataset_free(fo);
    kd_dataset_free(mf);
    kd_dataset_free(un);
    kd_dataset_free(mem);
}

/* Channels that differ, or fixed sizes that differ: KD_ERR_SHAPE naming
 * both datasets. */
static void test_concat_errors(void **state) {
    (void)state;
    kd_dataset *g = mem_dataset("graydata", 1, 2, 1, 4, 4, 2), *c = mem_dataset("colourdata", 2, 2, 3, 4, 4, 2);
    kd_dataset *big = mem_dataset("bigdata", 3, 2, 1, 6, 6, 2), *out = NULL;
    ASSERT_ERR(kd_dataset_concat(g, c, 1, &out), KD_ERR_SHAPE, "graydata");
    assert_non_null(strstr(kd_last_error(), "colourdata"));
    assert_non_null(strstr(kd_last_error(), "channels"));
    assert_null(out);
    ASSERT_ERR(kd_dataset_concat(g, big, 1, &out), KD_ERR_SHAPE, "bigdata");
    assert_non_null(strstr(kd_last_error(), "graydata"));
    assert_non_null(strstr(kd_last_error(), "6x6"));
    assert_null(out);
    ASSERT_ERR(kd_dataset_concat(g, NULL, 1, &out), KD_ERR_INVALID, "NULL");
    kd_dataset_free(g);
    kd_dataset_free(c);
    kd_dataset_free(big);
}

/* ------------------------------------------------------ the kd program */

static char g_root[1024];

#define RUN(...) kd_test_run_kd(g_root, (const char *const[]){__VA_ARGS__, NULL})
#define FLAGS(data, out)                                                                                         \
    "--data", (data), "--model", "resnet8", "--epochs", "1", "--batch-size", "16", "--backend", "ref",         \
        "--threads", "2", "--workers", "1", "--out", (out), "--progress", "0", "--lr", "0.1", "--schedule",    \
        "cosine", "--log-every", "1"

#define EXPECT_FAIL KD_TEST_EXPECT_FAIL_AFTER_LOG

static kd_json *read_json(const char *path) {
    size_t n = 0;
    char *text = kd_test_slurp(path, &n);
    if (!text) fail_msg("cannot read %s", path);
    kd_json *doc = NULL;
    if (kd_json_parse(text, n, path, &doc) != KD_OK) fail_msg("%s", kd_last_error());
    free(text);
    return doc;
}

static int count_step_records(const char *metrics) {
    char *t = kd_test_slurp(metrics, NULL);
    if (!t) fail_msg("cannot read %s", metrics);
    int n = 0;
    for (const char *s = t; (s = strstr(s, "\"type\": \"step\"")); s++) n++;
    free(t);
    return n;
}

/* kd pretrain --method simclr on 64 labeled IDX images + `unlabeled` 32
 * more: the epoch trains on 96 images (6 batches of 16), recorded in the
 * checkpoint (train_images), summary.json (train_images, unlabeled,
 * unlabeled_images) and config.yaml; without the setting the same run trains
 * on 64. A resume may not change it (exit 1, as for the other settings). */
static void test_unlabeled_run(void **state) {
    (void)state;
    char a[PATHN], b[PATHN], out[PATHN], base[PATHN], path[PATHN + 64];
    snprintf(a, sizeof a, "%s/labeled", g_root);
    snprintf(b, sizeof b, "%s/extra", g_root);
    kd_test_write_idx(a, 64, 16, 8);
    kd_test_write_idx(b, 32, 8, 8);
    snprintf(out, sizeof out, "%s/run_unl", g_root);
    snprintf(base, sizeof base, "%s/run_base", g_root);
    kd_test_proc p = RUN("pretrain", "--method", "simclr", FLAGS(a, out), "--unlabeled", b);
    kd_test_expect_ok(&p, "kd pretrain --unlabeled");
    kd_test_proc_free(&p);
    p = RUN("pretrain", "--method", "simclr", FLAGS(a, base));
    kd_test_expect_ok(&p, "kd pretrain without unlabeled");
    kd_test_proc_free(&p);

    snprintf(path, sizeof path, "%s/metrics.jsonl", out);
    assert_int_equal(count_step_records(path), 6);
    snprintf(path, sizeof path, "%s/metrics.jsonl", base);
    assert_int_equal(count_step_records(path), 4);
    snprintf(path, sizeof path, "%s/last.safetensors", out);
    kd_st_file *f = kd_test_st_open(path);
    assert_string_equal(kd_st_meta(f, "train_images"), "96");
    kd_st_close(f);
    snprintf(path, sizeof path, "%s/last.safetensors", base);
    f = kd_test_st_open(path);
    assert_string_equal(kd_st_meta(f, "train_images"), "64");
    kd_st_close(f);
    snprintf(path, sizeof path, "%s/summary.json", out);
    kd_json *doc = read_json(path);
    const kd_json *v = kd_json_get(doc, "train_images");
    assert_true(v && v->type == KD_JSON_NUMBER && v->number == 96);
    v = kd_json_get(doc, "unlabeled_images");
    assert_true(v && v->type == KD_JSON_NUMBER && v->number == 32);
    v = kd_json_get(doc, "unlabeled");
    assert_true(v && v->type == KD_JSON_STRING);
    assert_string_equal(v->string, b);
    kd_json_free(doc);
    snprintf(path, sizeof path, "%s/summary.json", base);
    doc = read_json(path);
    assert_null(kd_json_get(doc, "unlabeled_images"));
    kd_json_free(doc);
    snprintf(path, sizeof path, "%s/config.yaml", out);
    char *cfg = kd_test_slurp(path, NULL);
    char want[PATHN + 32];
    snprintf(want, sizeof want, "unlabeled: \"%s\"", b);
    if (!cfg || !strstr(cfg, want)) fail_msg("%s lacks %s", path, want);
    free(cfg);

    /* A resume keeps the run's unlabeled data (refused as any other
     * setting a resume may not change: exit 1 naming it). */
    p = RUN("pretrain", "--resume", out, "--unlabeled", a);
    EXPECT_FAIL(&p, 1, "unlabeled");
    kd_test_proc_free(&p);
}

/* Reads a kd select file: the indices (after the '#' header) into idx. */
static int read_indices(const char *path, int64_t *idx, int cap) {
    char *text = kd_test_slurp(path, NULL);
    if (!text) fail_msg("cannot read %s", path);
    int n = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') continue;
        if (n >= cap) fail_msg("%s: more than %d indices", path, cap);
        idx[n++] = strtoll(line, NULL, 10);
    }
    free(text);
    return n;
}

/* SSLD from another source: kd select --unlabeled ranks the training split's
 * unlabeled images and the source's, numbered after the split's (with K above
 * the candidate count every image is kept: indices 0 .. 95, against 0 .. 63
 * without the source), and kd distill --method ssld --unlabeled with those
 * train_indices trains on all 96. */
static void test_unlabeled_select(void **state) {
    (void)state;
    char a[PATHN], b[PATHN], t[PATHN], tck[PATHN + 32], sel[PATHN], sel0[PATHN], out[PATHN], path[PATHN + 64];
    snprintf(a, sizeof a, "%s/labeled_s", g_root);
    snprintf(b, sizeof b, "%s/extra_s", g_root);
    kd_test_write_idx(a, 64, 16, 8);
    kd_test_write_idx(b, 32, 8, 8);
    snprintf(t, sizeof t, "%s/teacher_s", g_root);
    snprintf(tck, sizeof tck, "%s/last.safetensors", t);
    kd_test_proc p = RUN("train", FLAGS(a, t), "--max-steps-per-epoch", "1");
    kd_test_expect_ok(&p, "teacher");
    kd_test_proc_free(&p);
    snprintf(sel, sizeof sel, "%s/sel_unl.txt", g_root);
    snprintf(sel0, sizeof sel0, "%s/sel_base.txt", g_root);
    p = RUN("select", "--teacher-ckpt", tck, "--data", a, "--labels", "2", "--per-class", "1000", "--backend", "ref",
            "--out", sel, "--unlabeled", b);
    kd_test_expect_ok(&p, "kd select --unlabeled");
    kd_test_proc_free(&p);
    p = RUN("select", "--teacher-ckpt", tck, "--data", a, "--labels", "2", "--per-class", "1000", "--backend", "ref",
            "--out", sel0);
    kd_test_expect_ok(&p, "kd select");
    kd_test_proc_free(&p);
    int64_t idx[128];
    int n = read_indices(sel, idx, 128);
    assert_int_equal(n, 96);
    for (int i = 0; i < n; i++) assert_int_equal(idx[i], i);
    assert_int_equal(read_indices(sel0, idx, 128), 64);
    /* Training images 10 and 20 made copies of test images 0 and 3: no
     * candidates (SSLD leaves the evaluation images out). */
    char d[PATHN], img[PATHN + 64], seld[PATHN];
    snprintf(d, sizeof d, "%s/dups_s", g_root);
    kd_test_write_idx(d, 64, 16, 8);
    size_t ntr = 0, nte = 0;
    snprintf(img, sizeof img, "%s/train-images-idx3-ubyte", d);
    unsigned char *tr = (unsigned char *)kd_test_slurp(img, &ntr);
    snprintf(path, sizeof path, "%s/t10k-images-idx3-ubyte", d);
    unsigned char *te = (unsigned char *)kd_test_slurp(path, &nte);
    assert_true(tr && te && ntr == 16 + 64 * 64 && nte == 16 + 16 * 64);
    memcpy(tr + 16 + 10 * 64, te + 16 + 0 * 64, 64);
    memcpy(tr + 16 + 20 * 64, te + 16 + 3 * 64, 64);
    kd_test_write_file(img, tr, ntr);
    free(tr);
    free(te);
    snprintf(seld, sizeof seld, "%s/sel_dups.txt", g_root);
    p = RUN("select", "--teacher-ckpt", tck, "--data", d, "--per-class", "1000", "--backend", "ref", "--out", seld);
    kd_test_expect_ok(&p, "kd select on data with copies of test images");
    if (!strstr(p.out, "2 copies of test images excluded")) fail_msg("kd select printed: %s", p.out);
    kd_test_proc_free(&p);
    n = read_indices(seld, idx, 128);
    assert_int_equal(n, 62);
    for (int i = 0, want = 0; i < n; i++, want++) {
        if (want == 10 || want == 20) want++;
        assert_int_equal(idx[i], want);
    }

    snprintf(out, sizeof out, "%s/run_ssld", g_root);
    p = RUN("distill", "--method", "ssld", "--teacher-ckpt", tck, "--labels", "2", "--train-indices", sel,
            "--unlabeled", b, FLAGS(a, out));
    kd_test_expect_ok(&p, "kd distill --method ssld --unlabeled");
    kd_test_proc_free(&p);
    snprintf(path, sizeof path, "%s/summary.json", out);
    kd_json *doc = read_json(path);
    const kd_json *v = kd_json_get(doc, "train_images");
    assert_true(v && v->type == KD_JSON_NUMBER && v->number == 96);
    kd_json_free(doc);
}

/* Refusals before training, exit 2 naming `unlabeled`: a method that needs
 * labels (kd train), images with another channel count (RGB JPEGs after
 * grey IDX images), a missing directory. */
static void test_unlabeled_refused(void **state) {
    (void)state;
    char a[PATHN], jpg[PATHN], out[PATHN], p1[PATHN + 32], last[PATHN + 32];
    snprintf(a, sizeof a, "%s/labeled_r", g_root);
    kd_test_write_idx(a, 32, 8, 8);
    snprintf(jpg, sizeof jpg, "%s/rgb", g_root);
    mkdir_p(jpg);
    for (int i = 0; i < 2; i++) {
        snprintf(p1, sizeof p1, "%s/u%d.jpg", jpg, i);
        kd_test_write_jpeg(p1, 8, 8, (uint64_t)i);
    }
    snprintf(out, sizeof out, "%s/run_refused", g_root);
    snprintf(last, sizeof last, "%s/last.safetensors", out);
    kd_test_proc p = RUN("train", FLAGS(a, out), "--unlabeled", jpg);
    EXPECT_FAIL(&p, 2, "unlabeled", "needs a label");
    kd_test_proc_free(&p);
    p = RUN("pretrain", "--method", "simclr", FLAGS(a, out), "--unlabeled", jpg);
    EXPECT_FAIL(&p, 2, "unlabeled", jpg, "channels");
    kd_test_proc_free(&p);
    char missing[PATHN + 16];
    snprintf(missing, sizeof missing, "%s/nothing_here", g_root);
    p = RUN("pretrain", "--method", "simclr", FLAGS(a, out), "--unlabeled", missing);
    EXPECT_FAIL(&p, 2, "unlabeled", missing);
    kd_test_proc_free(&p);
    struct stat sb;
    assert_true(stat(last, &sb) != 0); /* nothing trained */
}

static int group_setup(void **state) {
    (void)state;
    snprintf(g_root, sizeof g_root, "%s", kd_test_tmpdir("test_unlabeled"));
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concat_memory),   cmocka_unit_test(test_concat_stl10),
        cmocka_unit_test(test_concat_folder),   cmocka_unit_test(test_concat_errors),
        cmocka_unit_test(test_unlabeled_run),
        cmocka_unit_test(test_unlabeled_select),   cmocka_unit_test(test_unlabeled_refused),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
