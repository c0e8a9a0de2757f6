/* `kd eval --knn`, `kd eval --linear` and the `labels` run setting, end to
 * end through the kd program on a tiny generated IDX dataset (ref backend):
 * the run directories (config.yaml, metrics.jsonl, summary.json,
 * labels.txt); the kNN result equal to the library's on the same checkpoint;
 * linear evaluation bit-identical across runs; a label subset recorded and
 * balanced; `kd train --labels N` training on classes * N images, recording
 * them, and a resumed run reading its labels.txt back; every bad input (an
 * unknown flag, k <= 0 or larger than the training set, an unknown
 * architecture, a fraction that leaves a class empty, flags of the other
 * mode, an existing result) one message and exit 2, before any work; the
 * flag tables of kd eval, select and export: every documented flag has a
 * generated help line, every help line's flag is accepted, defaults shown are
 * the library's, and an unknown flag, a missing value and a value out of
 * range give exit 2 and one line naming the flag. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd/eval.h"
#include "kd/io.h"
#include "testutil.h"

#define NTRAIN 128
#define NTEST 32
#define IMG 8

static char g_root[512], g_data[700], g_ckpt[1200];

#define RUN(...) kd_test_run_kd(g_root, (const char *const[]){__VA_ARGS__, NULL})
#define EVAL_FLAGS "--data", g_data, "--backend", "ref", "--threads", "2"

static int exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

static const char *path_in(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", g_root, name);
    return buf;
}

#define EXPECT_FAIL KD_TEST_EXPECT_FAIL_AFTER_LOG

static kd_json *read_json(const char *dir, const char *file) {
    char p[1400];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    size_t n;
    char *t = kd_test_slurp(p, &n);
    if (!t) fail_msg("cannot read %s", p);
    kd_json *doc = NULL;
    if (kd_json_parse(t, n, p, &doc) != KD_OK) fail_msg("%s", kd_last_error());
    free(t);
    return doc;
}

static double num(const kd_json *doc, const char *key) {
    const kd_json *v = kd_json_get(doc, key);
    if (!v || v->type != KD_JSON_NUMBER) fail_msg("no number '%s'", key);
    return v->number;
}

static int count_lines(const char *dir, const char *file, int skip_comments) {
    char p[1400];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    size_t n;
    char *t = kd_test_slurp(p, &n);
    if (!t) fail_msg("cannot read %s", p);
    int c = 0;
    for (char *l = t; *l;) {
        char *e = strchr(l, '\n');
        if (!(skip_comments && l[0] == '#') && (e ? e > l : 1)) c++;
        if (!e) break;
        l = e + 1;
    }
    free(t);
    return c;
}

/* The indices of a labels.txt. */
static int read_indices(const char *dir, int64_t *idx, int cap) {
    char p[1400];
    snprintf(p, sizeof p, "%s/labels.txt", dir);
    FILE *f = fopen(p, "r");
    if (!f) fail_msg("no %s", p);
    char line[128];
    int n = 0;
    while (fgets(line, sizeof line, f))
        if (line[0] != '#' && n < cap) idx[n++] = atoll(line);
    fclose(f);
    return n;
}

static int setup(void **state) {
    (void)state;
    snprintf(g_root, sizeof g_root, "%s", kd_test_tmpdir("eval_cli"));
    snprintf(g_data, sizeof g_data, "%s/data", g_root);
    kd_test_write_idx(g_data, NTRAIN, NTEST, IMG);
    /* A supervised checkpoint to evaluate. */
    char out[900];
    snprintf(out, sizeof out, "%s/teacher", g_root);
    kd_test_proc p = RUN("train", "--data", g_data, "--model", "resnet8", "--epochs", "2", "--batch-size", "16",
                         "--backend", "ref", "--threads", "2", "--workers", "1", "--out", out, "--progress", "0",
                         "--lr", "0.1", "--schedule", "cosine");
    if (p.status != 0) {
        kd_test_proc_dump(&p, "kd train (setup)");
        kd_test_proc_free(&p);
        return -1;
    }
    kd_test_proc_free(&p);
    snprintf(g_ckpt, sizeof g_ckpt, "%s/best.safetensors", out);
    return 0;
}

/* ------------------------------------------------------------------ kNN */

static void test_knn_run(void **state) {
    (void)state;
    char out[1200];
    path_in(out, sizeof out, "knn");
    kd_test_proc p = RUN("eval", "--knn", "--ckpt", g_ckpt, EVAL_FLAGS, "--k", "5,20", "--out", out, "--json");
    kd_test_expect_ok(&p, "kd eval --knn");
    /* --json prints summary.json. */
    kd_json *printed = NULL;
    if (kd_json_parse(p.out, strlen(p.out), "stdout", &printed) != KD_OK) fail_msg("%s", kd_last_error());
    kd_test_proc_free(&p);
    kd_json *s = read_json(out, "summary.json");
    assert_string_equal(kd_json_get(s, "mode")->string, "knn");
    assert_int_equal((int)num(s, "train_images"), NTRAIN);
    assert_int_equal((int)num(s, "test_images"), NTEST);
    assert_int_equal((int)num(s, "k"), 5);
    const kd_json *arr = kd_json_get(s, "knn");
    assert_non_null(arr);
    assert_int_equal(arr->count, 2);
    assert_int_equal((int)num(&arr->items[1], "k"), 20);
    assert_true(num(printed, "top1") == num(s, "top1"));
    assert_int_equal(count_lines(out, "metrics.jsonl", 0), 2);
    char cfg[1300];
    snprintf(cfg, sizeof cfg, "%s/config.yaml", out);
    assert_true(exists(cfg));
    /* The same numbers from the library on the same checkpoint. */
    kd_dataset *tr = NULL, *te = NULL;
    KD_ASSERT_OK(kd_dataset_open(g_data, 1, &tr));
    KD_ASSERT_OK(kd_dataset_open(g_data, 0, &te));
    kd_model *m = NULL;
    kd_model_cfg mc = {.in_channels = 1, .num_classes = 4, .seed = 0};
    KD_ASSERT_OK(kd_model_load_new(g_ckpt, NULL, &mc, &m));
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    kd_transform_cfg tf = {.normalize = 1};
    kd_dataset_norm(tr, tf.mean, tf.std);
    float *ftr = NULL, *fte = NULL;
    int64_t d = 0;
    kd_set_num_threads(2);
    KD_ASSERT_OK(kd_extract_features(m, be, tr, 256, &tf, &ftr, &d));
    KD_ASSERT_OK(kd_extract_features(m, be, te, 256, &tf, &fte, &d));
    KD_ASSERT_OK(kd_l2_normalize_rows(ftr, NTRAIN, d));
    KD_ASSERT_OK(kd_l2_normalize_rows(fte, NTEST, d));
    kd_knn_cfg kc = {.train = ftr, .train_labels = kd_dataset_labels(tr), .n_train = NTRAIN, .dim = d, .classes = 4,
                     .n_k = 2, .k = {5, 20}, .temperature = 0.07};
    kd_knn_result kr;
    KD_ASSERT_OK(kd_knn_eval(&kc, fte, kd_dataset_labels(te), NTEST, &kr));
    for (int j = 0; j < 2; j++) {
        assert_true(num(&arr->items[j], "top1") == kr.top1[j]);
        assert_true(num(&arr->items[j], "top5") == kr.top5[j]);
    }
    /* The bands are easy: the features separate the classes. */
    assert_true(kr.top1[0] > 50.0);
    free(ftr);
    free(fte);
    kd_model_free(m);
    kd_dataset_free(tr);
    kd_dataset_free(te);
    kd_json_free(s);
    kd_json_free(printed);
    /* The directory holds a result now: refused. */
    p = RUN("eval", "--knn", "--ckpt", g_ckpt, EVAL_FLAGS, "--k", "5", "--out", out);
    EXPECT_FAIL(&p, 2, "already holds a result", out);
    kd_test_proc_free(&p);
}

/* --------------------------------------------------------------- linear */

static void test_linear_run(void **state) {
    (void)state;
    char a[1200], b[1200], c[1200];
    path_in(a, sizeof a, "lin_a");
    path_in(b, sizeof b, "lin_b");
    path_in(c, sizeof c, "lin_labels");
    kd_test_proc p = RUN("eval", "--linear", "--ckpt", g_ckpt, EVAL_FLAGS, "--epochs", "5", "--batch-size", "32",
                         "--lr", "0.1", "--out", a);
    kd_test_expect_ok(&p, "kd eval --linear");
    kd_test_proc_free(&p);
    p = RUN("eval", "--linear", "--ckpt", g_ckpt, EVAL_FLAGS, "--epochs", "5", "--batch-size", "32", "--lr", "0.1",
            "--out", b);
    kd_test_expect_ok(&p, "kd eval --linear (again)");
    kd_test_proc_free(&p);
    kd_json *sa = read_json(a, "summary.json"), *sb = read_json(b, "summary.json");
    assert_string_equal(kd_json_get(sa, "mode")->string, "linear");
    assert_true(num(sa, "top1") == num(sb, "top1"));
    assert_true(num(sa, "test_loss") == num(sb, "test_loss"));
    assert_true(num(sa, "train_loss") == num(sb, "train_loss"));
    assert_int_equal((int)num(sa, "labeled_images"), NTRAIN);
    assert_int_equal(count_lines(a, "metrics.jsonl", 0), 6); /* 5 epochs + the test record */
    kd_json_free(sa);
    kd_json_free(sb);
    /* A label subset: 4 per class, recorded. */
    p = RUN("eval", "--linear", "--ckpt", g_ckpt, EVAL_FLAGS, "--epochs", "3", "--labels", "4", "--seed", "7",
            "--out", c);
    kd_test_expect_ok(&p, "kd eval --linear --labels 4");
    kd_test_proc_free(&p);
    kd_json *sc = read_json(c, "summary.json");
    assert_int_equal((int)num(sc, "train_images"), 16);
    assert_int_equal((int)num(sc, "labeled_images"), 16);
    kd_json_free(sc);
    int64_t idx[64];
    int n = read_indices(c, idx, 64);
    assert_int_equal(n, 16);
    int per[4] = {0};
    for (int i = 0; i < n; i++) per[idx[i] % 4]++; /* image i has label i % 4 */
    for (int k = 0; k < 4; k++) assert_int_equal(per[k], 4);
    /* kNN with the same subset as its bank: 16 images, the same indices. */
    char dk[1300];
    snprintf(dk, sizeof dk, "%s_knn", c);
    p = RUN("eval", "--knn", "--ckpt", g_ckpt, EVAL_FLAGS, "--k", "3", "--labels", "4", "--seed", "7", "--out", dk);
    kd_test_expect_ok(&p, "kd eval --knn --labels 4");
    kd_test_proc_free(&p);
    kd_json *sk = read_json(dk, "summary.json");
    assert_int_equal((int)num(sk, "train_images"), 16);
    kd_json_free(sk);
    int64_t idx2[64];
    assert_int_equal(read_indices(dk, idx2, 64), 16);
    assert_memory_equal(idx, idx2, sizeof(int64_t) * 16);
}

/* ----------------------------------------------------------- bad input */

/* A copy of the checkpoint whose metadata names another architecture. */
static void write_with_arch(const char *dst, const char *arch) {
    kd_st_file *f = kd_test_st_open(g_ckpt);
    kd_st_writer *w = NULL;
    KD_ASSERT_OK(kd_st_writer_init(&w));
    for (int i = 0; i < kd_st_count(f); i++) {
        const kd_st_entry *e = kd_st_get(f, i);
        KD_ASSERT_OK(kd_st_writer_add(w, e->name, e->dtype, e->ndim, e->shape, e->data));
    }
    KD_ASSERT_OK(kd_st_writer_set_meta(w, "arch", arch));
    KD_ASSERT_OK(kd_st_writer_set_meta(w, "num_classes", "4"));
    KD_ASSERT_OK(kd_st_writer_save(w, dst));
    kd_st_writer_free(w);
    kd_st_close(f);
}

static void test_bad_input(void **state) {
    (void)state;
    char out[1200], bad[1200];
    path_in(out, sizeof out, "bad_out");
    kd_test_proc p;
#define BAD(want_status, ...)                                                                   \
    do {                                                                                        \
        p = RUN("eval", "--ckpt", g_ckpt, EVAL_FLAGS, "--out", out, __VA_ARGS__);               \
        kd_test_expect_fail(&p, (want_status), 0, needles);                                         \
        kd_test_proc_free(&p);                                                                  \
        assert_false(exists(out));                                                              \
    } while (0)
    {
        const char *const needles[] = {"--frobnicate", NULL};
        BAD(2, "--knn", "--frobnicate", "1");
    }
    {
        const char *const needles[] = {"--k", "'0'", NULL};
        BAD(2, "--knn", "--k", "0");
    }
    {
        const char *const needles[] = {"--k", "'-5'", NULL};
        BAD(2, "--knn", "--k", "-5");
    }
    {
        const char *const needles[] = {"--k", "20,x", NULL};
        BAD(2, "--knn", "--k", "20,x");
    }
    {
        const char *const needles[] = {"k 500", "larger than the training set", "128", NULL};
        BAD(2, "--knn", "--k", "20,500");
    }
    {
        /* The defaults (20 and 200) on a set of 128 images. */
        const char *const needles[] = {"k 200", "larger than the training set", NULL};
        BAD(2, "--knn");
    }
    {
        const char *const needles[] = {"--temperature", NULL};
        BAD(2, "--knn", "--temperature", "0");
    }
    {
        const char *const needles[] = {"--k", "--knn only", NULL};
        BAD(2, "--linear", "--k", "5");
    }
    {
        const char *const needles[] = {"larger than the training set", "the labeled ones", NULL};
        BAD(2, "--knn", "--labels", "10%");
    }
    {
        const char *const needles[] = {"--knn", "--linear", NULL};
        BAD(2, "--knn", "--linear");
    }
    {
        const char *const needles[] = {"--epochs", NULL};
        BAD(2, "--linear", "--epochs", "0");
    }
    {
        const char *const needles[] = {"labels 1%", "class 0", "no labeled image", NULL};
        BAD(2, "--linear", "--labels", "1%");
    }
    {
        const char *const needles[] = {"labels", "10 %", NULL};
        BAD(2, "--linear", "--labels", "10 %");
    }
    {
        const char *const needles[] = {"resnet9000", NULL};
        BAD(2, "--knn", "--k", "5", "--model", "resnet9000");
    }
    /* A checkpoint that names an unknown architecture. */
    path_in(bad, sizeof bad, "alien.safetensors");
    write_with_arch(bad, "alexnet_9000");
    p = RUN("eval", "--knn", "--ckpt", bad, EVAL_FLAGS, "--k", "5", "--out", out);
    EXPECT_FAIL(&p, 2, "alien.safetensors", "alexnet_9000");
    kd_test_proc_free(&p);
    p = RUN("eval", "--linear", "--ckpt", bad, EVAL_FLAGS, "--out", out);
    EXPECT_FAIL(&p, 2, "alexnet_9000");
    kd_test_proc_free(&p);
    assert_false(exists(out));
    /* --knn without --out. */
    p = RUN("eval", "--knn", "--ckpt", g_ckpt, EVAL_FLAGS);
    EXPECT_FAIL(&p, 2, "--out");
    kd_test_proc_free(&p);
    /* The accuracy mode still works. */
    p = RUN("eval", "--ckpt", g_ckpt, EVAL_FLAGS, "--json");
    kd_test_expect_ok(&p, "kd eval (accuracy)");
    assert_non_null(strstr(p.out, "\"top1\""));
    kd_test_proc_free(&p);
    /* Help names both modes. */
    p = RUN("eval", "--help");
    kd_test_expect_ok(&p, "kd eval --help");
    assert_non_null(strstr(p.out, "--knn"));
    assert_non_null(strstr(p.out, "--linear"));
    assert_non_null(strstr(p.out, "computed once with the evaluation transform"));
    kd_test_proc_free(&p);
#undef BAD
}

/* ------------------------------------- the flag tables of eval, select, export */

/* The flags each command documents (its usage in docs and the README): the
 * help must give each its own line "  --flag ...", and every flag with a help
 * line must be accepted by the parser. */
static const char *const g_eval_flags[] = {"--ckpt", "--data", "--model", "--batch", "--threads", "--backend",
                                           "--json", "--knn", "--k", "--temperature", "--linear", "--epochs",
                                           "--lr", "--batch-size", "--out", "--labels", "--seed", NULL};
static const char *const g_select_flags[] = {"--teacher-ckpt", "--per-class", "--out", "--data", "--labels",
                                             "--unlabeled", "--seed", "--threads", "--batch", "--backend", NULL};
static const char *const g_export_flags[] = {"--ckpt", "--out", "--ema", NULL};

/* The help line of flag ("  --flag" then a space or the end), or NULL. */
static const char *help_line(const char *help, const char *flag) {
    size_t n = strlen(flag);
    for (const char *l = help; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (!strncmp(l, "  ", 2) && !strncmp(l + 2, flag, n) && (l[2 + n] == ' ' || l[2 + n] == '\n'))
            return l;
    return NULL;
}

/* 1 when the line starting at l holds s. */
static int line_has(const char *l, const char *s) {
    char line[512];
    size_t n = strcspn(l, "\n");
    if (n >= sizeof line) n = sizeof line - 1;
    memcpy(line, l, n);
    line[n] = '\0';
    return strstr(line, s) != NULL;
}

static void check_help_covers_parser(const char *cmd, const char *const *flags) {
    kd_test_proc p = RUN(cmd, "--help");
    kd_test_expect_ok(&p, cmd);
    if (!strstr(p.out, "usage: kd ")) fail_msg("kd %s --help has no usage line", cmd);
    for (int i = 0; flags[i]; i++)
        if (!help_line(p.out, flags[i])) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("kd %s --help has no line for %s", cmd, flags[i]);
        }
    /* Every flag line of the help names a flag the parser knows: given
     * without its value it is refused as incomplete, never as unknown. */
    int lines = 0;
    for (const char *l = p.out; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
        if (strncmp(l, "  --", 4) != 0) continue;
        char flag[64];
        size_t n = strcspn(l + 2, " \n");
        if (n >= sizeof flag) fail_msg("kd %s --help: a flag line too long", cmd);
        memcpy(flag, l + 2, n);
        flag[n] = '\0';
        if (!strcmp(cmd, "eval") && !strcmp(flag, "--ckpt") && line_has(l, "--ckpt random")) continue; /* prose */
        lines++;
        kd_test_proc q = RUN(cmd, flag);
        if (q.status != 2 || strstr(q.err, "unknown option")) {
            kd_test_proc_dump(&q, flag);
            fail_msg("kd %s does not accept %s, which its help lists", cmd, flag);
        }
        kd_test_proc_free(&q);
    }
    int want = 0;
    while (flags[want]) want++;
    if (lines != want) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("kd %s --help has %d flag lines, expected %d", cmd, lines, want);
    }
    kd_test_proc_free(&p);
}

static void test_flag_tables(void **state) {
    (void)state;
    check_help_covers_parser("eval", g_eval_flags);
    check_help_covers_parser("select", g_select_flags);
    check_help_covers_parser("export", g_export_flags);
    /* Defaults in the help come from the library's defaults. */
    kd_eval_cfg d;
    kd_eval_cfg_defaults(&d);
    kd_test_proc p = RUN("eval", "--help");
    char want[64];
    snprintf(want, sizeof want, "[%d,%d]", d.k[0], d.k[1]);
    assert_int_equal(d.n_k, 2);
    const char *l = help_line(p.out, "--k");
    if (!l || !line_has(l, want)) fail_msg("the --k help line lacks %s", want);
    snprintf(want, sizeof want, "[%d]", d.linear.epochs);
    l = help_line(p.out, "--epochs");
    if (!l || !line_has(l, want)) fail_msg("the --epochs help line lacks %s", want);
    kd_test_proc_free(&p);
    /* An unknown flag, a missing value and a value out of range: exit 2 and
     * one line naming the flag, for each command. */
    p = RUN("eval", "--ckpt", "x.safetensors", "--frobnicate", "1");
    KD_TEST_EXPECT_FAIL(&p, 2, "unknown option", "--frobnicate");
    kd_test_proc_free(&p);
    p = RUN("eval", "--ckpt", "x.safetensors", "--knn", "--temperature");
    KD_TEST_EXPECT_FAIL(&p, 2, "--temperature", "needs a value");
    kd_test_proc_free(&p);
    p = RUN("eval", "--linear", "--ckpt", "x.safetensors", "--out", "o", "--epochs", "1000001");
    KD_TEST_EXPECT_FAIL(&p, 2, "--epochs", "'1000001'", "1..1000000");
    kd_test_proc_free(&p);
    p = RUN("eval", "--ckpt=x.safetensors", "--batch=0");
    KD_TEST_EXPECT_FAIL(&p, 2, "--batch", "'0'", "1..");
    kd_test_proc_free(&p);
    p = RUN("select", "--teacher-ckpt", "t.safetensors", "--per-klass", "2");
    KD_TEST_EXPECT_FAIL(&p, 2, "unknown option", "--per-klass");
    kd_test_proc_free(&p);
    p = RUN("select", "--teacher-ckpt", "t.safetensors", "--out", "f.txt", "--per-class");
    KD_TEST_EXPECT_FAIL(&p, 2, "--per-class", "needs a value");
    kd_test_proc_free(&p);
    p = RUN("select", "--teacher-ckpt", "t.safetensors", "--out", "f.txt", "--per-class", "2", "--threads", "-3");
    KD_TEST_EXPECT_FAIL(&p, 2, "--threads", "'-3'", "0..");
    kd_test_proc_free(&p);
    p = RUN("export", "--ckpt", "a.safetensors", "--emma");
    KD_TEST_EXPECT_FAIL(&p, 2, "unknown option", "--emma");
    kd_test_proc_free(&p);
    p = RUN("export", "--ckpt", "a.safetensors", "--out");
    KD_TEST_EXPECT_FAIL(&p, 2, "--out", "needs a value");
    kd_test_proc_free(&p);
    p = RUN("export", "--ckpt", "a.safetensors", "--out", "b.safetensors", "--ema=2");
    KD_TEST_EXPECT_FAIL(&p, 2, "--ema", "no value");
    kd_test_proc_free(&p);
    /* A missing required flag names them all. */
    p = RUN("select", "--teacher-ckpt", "t.safetensors", "--out", "f.txt");
    KD_TEST_EXPECT_FAIL(&p, 2, "--per-class", "required");
    kd_test_proc_free(&p);
}

/* ------------------------------------------------ the labels run setting */

#define TRAIN_FLAGS(out)                                                                                       \
    "--data", g_data, "--model", "resnet8", "--batch-size", "4", "--backend", "ref", "--threads", "2",       \
        "--workers", "1", "--out", (out), "--progress", "0", "--lr", "0.05", "--schedule", "cosine"

static void test_train_labels(void **state) {
    (void)state;
    char out[1200];
    path_in(out, sizeof out, "train_labels");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(out), "--epochs", "1", "--labels", "3");
    kd_test_expect_ok(&p, "kd train --labels 3");
    kd_test_proc_free(&p);
    kd_json *s = read_json(out, "summary.json");
    assert_int_equal((int)num(s, "train_images"), 4 * 3);
    assert_int_equal((int)num(s, "labeled_images"), 4 * 3);
    /* The run normalises by the whole training split, as kd eval does, not
     * by the 12 labeled images: kd eval of its checkpoint gives the run's
     * own last test loss. */
    char ck[1300], loss[64];
    snprintf(ck, sizeof ck, "%s/last.safetensors", out);
    p = RUN("eval", "--ckpt", ck, EVAL_FLAGS, "--json");
    kd_test_expect_ok(&p, "kd eval of the --labels run");
    const char *l = strstr(p.out, "\"loss\": ");
    assert_non_null(l);
    snprintf(loss, sizeof loss, "%s", l + 8);
    kd_test_proc_free(&p);
    double run_loss = num(s, "test_loss"), eval_loss = strtod(loss, NULL);
    if (fabs(run_loss - eval_loss) > 2e-6 * fabs(run_loss) + 1e-6)
        fail_msg("kd eval's test loss %.6f differs from the run's %.6f: another normalisation", eval_loss, run_loss);
    kd_json_free(s);
    int64_t idx[64];
    int n = read_indices(out, idx, 64);
    assert_int_equal(n, 12);
    int per[4] = {0};
    for (int i = 0; i < n; i++) {
        assert_true(idx[i] >= 0 && idx[i] < NTRAIN);
        if (i) assert_true(idx[i] > idx[i - 1]);
        per[idx[i] % 4]++;
    }
    for (int k = 0; k < 4; k++) assert_int_equal(per[k], 3);
    /* config.yaml records the setting; --help lists it. */
    char cfg[1300];
    snprintf(cfg, sizeof cfg, "%s/config.yaml", out);
    size_t len;
    char *text = kd_test_slurp(cfg, &len);
    assert_non_null(strstr(text, "labels: \"3\""));
    free(text);
    p = RUN("train", "--help");
    assert_non_null(strstr(p.out, "--labels"));
    kd_test_proc_free(&p);
    /* The same seed draws the same images; another seed others. */
    char out2[1200], out3[1200];
    path_in(out2, sizeof out2, "train_labels_same");
    path_in(out3, sizeof out3, "train_labels_seed");
    p = RUN("train", TRAIN_FLAGS(out2), "--epochs", "1", "--labels", "3", "--max-steps-per-epoch", "1");
    kd_test_expect_ok(&p, "kd train --labels 3 (again)");
    kd_test_proc_free(&p);
    p = RUN("train", TRAIN_FLAGS(out3), "--epochs", "1", "--labels", "3", "--max-steps-per-epoch", "1", "--seed", "5");
    kd_test_expect_ok(&p, "kd train --labels 3 --seed 5");
    kd_test_proc_free(&p);
    int64_t i2[64], i3[64];
    assert_int_equal(read_indices(out2, i2, 64), 12);
    assert_int_equal(read_indices(out3, i3, 64), 12);
    assert_memory_equal(idx, i2, 12 * sizeof *idx);
    assert_true(memcmp(idx, i3, 12 * sizeof *idx) != 0);
}

/* A resumed run reads labels.txt: edited between the pause and the resume,
 * the edit is what the rest of the run trains on. */
static void test_train_labels_resume(void **state) {
    (void)state;
    char out[1200], lt[1300];
    path_in(out, sizeof out, "train_labels_resume");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(out), "--epochs", "2", "--labels", "3", "--stop-after", "1");
    kd_test_expect_ok(&p, "kd train --labels 3 --stop-after 1");
    kd_test_proc_free(&p);
    int64_t idx[64];
    assert_int_equal(read_indices(out, idx, 64), 12);
    /* Keep the first 2 of each class. */
    snprintf(lt, sizeof lt, "%s/labels.txt", out);
    FILE *f = fopen(lt, "w");
    int per[4] = {0};
    fprintf(f, "# edited\n");
    for (int i = 0; i < 12; i++)
        if (per[idx[i] % 4]++ < 2) fprintf(f, "%lld\n", (long long)idx[i]);
    fclose(f);
    p = RUN("train", "--resume", out, "--progress", "0");
    kd_test_expect_ok(&p, "kd train --resume");
    kd_test_proc_free(&p);
    kd_json *s = read_json(out, "summary.json");
    assert_int_equal((int)num(s, "train_images"), 8);
    assert_int_equal((int)num(s, "epochs"), 2);
    kd_json_free(s);
    assert_int_equal(count_lines(out, "labels.txt", 1), 8); /* not rewritten */
}

static void test_train_labels_bad(void **state) {
    (void)state;
    char out[1200];
    path_in(out, sizeof out, "train_labels_bad");
    /* 1% of 32 images per class rounds to 0. */
    kd_test_proc p = RUN("train", TRAIN_FLAGS(out), "--epochs", "1", "--labels", "1%");
    EXPECT_FAIL(&p, 2, "labels 1%", "class 0", "no labeled image");
    kd_test_proc_free(&p);
    assert_false(exists(out));
    p = RUN("train", TRAIN_FLAGS(out), "--epochs", "1", "--labels", "33");
    EXPECT_FAIL(&p, 2, "labels 33", "only 32");
    kd_test_proc_free(&p);
    p = RUN("train", TRAIN_FLAGS(out), "--epochs", "1", "--labels", "0%");
    EXPECT_FAIL(&p, 2, "labels", "0%");
    kd_test_proc_free(&p);
    p = RUN("train", TRAIN_FLAGS(out), "--epochs", "1", "--labels", "3", "--train-subset", "64");
    EXPECT_FAIL(&p, 2, "train_subset", "labels");
    kd_test_proc_free(&p);
    char missing[1200];
    path_in(missing, sizeof missing, "no-such-labels.txt");
    p = RUN("train", TRAIN_FLAGS(out), "--epochs", "1", "--labels", missing);
    EXPECT_FAIL(&p, 2, "no-such-labels.txt");
    kd_test_proc_free(&p);
    assert_false(exists(out));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_knn_run),
        cmocka_unit_test(test_linear_run),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_flag_tables),
        cmocka_unit_test(test_train_labels),
        cmocka_unit_test(test_train_labels_resume),
        cmocka_unit_test(test_train_labels_bad),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
