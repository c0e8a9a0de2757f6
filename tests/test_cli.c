/* End-to-end tests of the `kd` program and the trainer behind it: the run
 * directory, reproducibility from config.yaml, resume (paused and killed),
 * distillation, and bad input (missing, truncated and malformed files, wrong
 * architectures, unknown names, malformed numbers, NaN loss, existing runs).
 * Method settings and the method table: `--method list`, generated help,
 * `--set METHOD.NAME=VALUE` and YAML "METHOD.NAME: VALUE" keys, config.yaml
 * recording every setting of the method, the named loss terms in
 * metrics.jsonl and summary.json; every method-specific case walks the
 * registry (kd_method_defs), so it covers methods added later.
 *
 * Every case runs the real binary (KD_BINARY_DIR "/kd") in a child process on
 * a tiny generated IDX dataset with the ref backend, capturing the exit status,
 * stdout and stderr. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kd/backend.h"
#include "kd/distill.h"
#include "kd/io.h"
#include "testutil.h"

#define KD_EXE KD_BINARY_DIR "/kd"
#define DIRN 700
#define PATHN 1000

/* ------------------------------------------------------------ fixtures */

/* The tiny dataset (kd_test_write_idx): IMG x IMG images, 4 classes; class k
 * has a bright horizontal band in rows 2k, 2k+1 (invariant to horizontal
 * flips, robust to a 1-pixel crop shift) on dark noise. */
#define IMG 8
#define NTRAIN 128
#define NTEST 32

static char g_root[512];    /* scratch directory of this program */
static char g_data[600];    /* the good dataset */
static char g_run_a[600];   /* reference run: 3 epochs, uninterrupted */
static int g_run_a_state;    /* 0: not tried, 1: ok, -1: failed */

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static void copy_file(const char *src, const char *dst, size_t limit) {
    size_t n;
    char *d = kd_test_slurp(src, &n);
    if (!d) fail_msg("cannot read %s", src);
    kd_test_write_file(dst, d, n < limit ? n : limit);
    free(d);
}

static void copy_dataset(const char *dst) {
    static const char *files[] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                                  "t10k-labels-idx1-ubyte"};
    mkdir(dst, 0755);
    for (int i = 0; i < 4; i++) {
        char a[DIRN], b[DIRN];
        snprintf(a, sizeof a, "%s/%s", g_data, files[i]);
        snprintf(b, sizeof b, "%s/%s", dst, files[i]);
        copy_file(a, b, (size_t)-1);
    }
}

static const char *tmp_path(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", g_root, name);
    return buf;
}

/* ----------------------------------------------------------- processes */

/* Runs kd with the NULL-terminated args (output captured under g_root) and waits. */
#define RUN(...) kd_test_run_kd(g_root, (const char *const[]){__VA_ARGS__, NULL})

/* The common training flags (tiny, reference backend, 2 threads). */
#define TRAIN_FLAGS(data, out, epochs)                                                                               \
    "--data", (data), "--model", "resnet8", "--epochs", (epochs), "--batch-size", "16", "--backend", "ref",         \
        "--threads", "2", "--workers", "1", "--out", (out), "--progress", "0", "--lr", "0.1", "--schedule", "cosine", \
        "--hflip", "1", "--pad-crop", "1", "--log-every", "4"

#define EXPECT_FAIL KD_TEST_EXPECT_FAIL
#define EXPECT_FAIL_AFTER_LOG KD_TEST_EXPECT_FAIL_AFTER_LOG

/* ---------------------------------------------------------- checkpoints */

/* Fails unless every tensor that `which` (KD_TEST_CKPT_*) selects is equal
 * byte for byte. */
static void compare_ckpts(const char *pa, const char *pb, int which) {
    char msg[2048];
    if (kd_test_ckpts_differ(pa, pb, which, msg, sizeof msg)) fail_msg("%s", msg);
}

static void expect_same_file(const char *path, const char *before, size_t nbefore) {
    size_t n;
    char *now = kd_test_slurp(path, &n);
    if (!now) fail_msg("%s is gone", path);
    int same = n == nbefore && memcmp(now, before, n) == 0;
    free(now);
    if (!same) fail_msg("%s was modified", path);
}

/* ------------------------------------------------------------ run A */

static int group_setup(void **state) {
    (void)state;
    snprintf(g_root, sizeof g_root, "%s", kd_test_tmpdir("test_cli"));
    snprintf(g_data, sizeof g_data, "%s/data", g_root);
    snprintf(g_run_a, sizeof g_run_a, "%s/run_a", g_root);
    kd_test_write_idx(g_data, NTRAIN, NTEST, IMG);
    if (access(KD_EXE, X_OK) != 0) {
        fprintf(stderr, "%s is not built\n", KD_EXE);
        return -1;
    }
    return 0;
}

/* The reference run, trained once and shared by the tests that need it. */
static void need_run_a(void) {
    if (g_run_a_state == 0) {
        g_run_a_state = -1;
        kd_test_proc p = RUN("train", TRAIN_FLAGS(g_data, g_run_a, "3"));
        kd_test_expect_ok(&p, "kd train (run A)");
        kd_test_proc_free(&p);
        g_run_a_state = 1;
    }
    if (g_run_a_state < 0) fail_msg("the reference run A failed (see the first test that needed it)");
}

static void run_a_file(char *buf, size_t n, const char *file) { snprintf(buf, n, "%s/%s", g_run_a, file); }

/* ====================================================== 1. run directory */

static const kd_json *json_num(const kd_json *doc, const char *key, const char *what) {
    const kd_json *v = kd_json_get(doc, key);
    if (!v || v->type != KD_JSON_NUMBER) fail_msg("%s: no number \"%s\"", what, key);
    return v;
}

static void check_run_terms(const char *dir, const char *const *want, int n_want);

static void test_run_directory(void **state) {
    (void)state;
    need_run_a();
    char path[DIRN];
    static const char *files[] = {"config.yaml", "metrics.jsonl", "summary.json", "last.safetensors",
                                  "best.safetensors", "curves.svg"};
    for (int i = 0; i < 6; i++) {
        run_a_file(path, sizeof path, files[i]);
        if (!file_exists(path)) fail_msg("the run directory lacks %s", files[i]);
    }
    /* curves.svg: one polyline per curve (train/test loss, train/test top-1,
     * and one per loss term: "ce" for plain training), each with one point
     * per epoch (3). */
    run_a_file(path, sizeof path, "curves.svg");
    size_t svg_n;
    char *svg = kd_test_slurp(path, &svg_n);
    assert_non_null(svg);
    int lines = 0;
    for (char *q = strstr(svg, "<polyline"); q; q = strstr(q + 1, "<polyline")) {
        char *pts = strstr(q, "points='");
        assert_non_null(pts);
        int commas = 0;
        for (char *c = pts + 8; *c && *c != '\''; c++) commas += *c == ',';
        assert_int_equal(commas, 3);
        lines++;
    }
    assert_int_equal(lines, 4 + 1);
    free(svg);

    /* metrics.jsonl: every line a JSON object; one epoch record per epoch, in order. */
    run_a_file(path, sizeof path, "metrics.jsonl");
    size_t n;
    char *text = kd_test_slurp(path, &n);
    assert_non_null(text);
    int epochs = 0, steps = 0, line_no = 0;
    for (char *l = text; *l;) {
        char *e = strchr(l, '\n');
        if (!e) fail_msg("metrics.jsonl: line %d has no newline", line_no + 1);
        line_no++;
        kd_json *doc = NULL;
        if (kd_json_parse(l, (size_t)(e - l), "metrics.jsonl line", &doc) != KD_OK)
            fail_msg("metrics.jsonl line %d: %s", line_no, kd_last_error());
        if (doc->type != KD_JSON_OBJECT) fail_msg("metrics.jsonl line %d is no object", line_no);
        const kd_json *t = kd_json_get(doc, "type");
        if (!t || t->type != KD_JSON_STRING) fail_msg("metrics.jsonl line %d has no \"type\"", line_no);
        if (!strcmp(t->string, "epoch")) {
            epochs++;
            const kd_json *ep = json_num(doc, "epoch", "metrics epoch record");
            assert_int_equal((int)ep->number, epochs);
            const kd_json *acc = json_num(doc, "test_top1", "metrics epoch record");
            assert_true(acc->number >= 0 && acc->number <= 100);
            const kd_json *loss = json_num(doc, "train_loss", "metrics epoch record");
            assert_true(isfinite(loss->number) && loss->number > 0);
        } else if (!strcmp(t->string, "step")) {
            steps++;
        } else {
            fail_msg("metrics.jsonl line %d: unknown type '%s'", line_no, t->string);
        }
        kd_json_free(doc);
        l = e + 1;
    }
    free(text);
    assert_int_equal(epochs, 3);
    assert_int_equal(steps, 3 * (NTRAIN / 16) / 4); /* --log-every 4 */

    /* summary.json */
    run_a_file(path, sizeof path, "summary.json");
    text = kd_test_slurp(path, &n);
    assert_non_null(text);
    kd_json *sum = NULL;
    if (kd_json_parse(text, n, "summary.json", &sum) != KD_OK) fail_msg("%s", kd_last_error());
    free(text);
    double top1 = json_num(sum, "top1", "summary.json")->number;
    double top5 = json_num(sum, "top5", "summary.json")->number;
    assert_int_equal((int)json_num(sum, "epochs", "summary.json")->number, 3);
    assert_true(json_num(sum, "images_per_s", "summary.json")->number > 0);
    assert_true(json_num(sum, "wall_s", "summary.json")->number > 0);
    const kd_json *method = kd_json_get(sum, "method");
    assert_non_null(method);
    assert_string_equal(method->string, "none");
    if (!(top1 > 40.0)) fail_msg("top-1 %.2f%% is not above chance (25%%) by a margin on easy data", top1);
    assert_true(top5 >= top1);
    kd_json_free(sum);
    /* Plain training logs one named term, the cross-entropy. */
    check_run_terms(g_run_a, (const char *const[]){"ce"}, 1);

    /* Checkpoints: PyTorch names, architecture metadata; optimiser state only in last. */
    static const char *ck[] = {"last.safetensors", "best.safetensors"};
    for (int i = 0; i < 2; i++) {
        run_a_file(path, sizeof path, ck[i]);
        kd_st_file *f = kd_test_st_open(path);
        static const char *names[] = {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
                                      "layer1.0.bn1.weight", "fc.weight", "fc.bias"};
        for (int k = 0; k < 6; k++) kd_test_st_entry(f, "%s", names[k]); /* fails when absent */
        const kd_st_entry *fc = kd_test_st_entry(f, "fc.weight");
        assert_int_equal(fc->ndim, 2);
        assert_int_equal(fc->shape[0], 4);
        const char *arch = kd_st_meta(f, "arch");
        if (!arch || strcmp(arch, "resnet8") != 0) fail_msg("%s: metadata arch is %s", ck[i], arch ? arch : "(none)");
        const char *nc = kd_st_meta(f, "num_classes");
        assert_non_null(nc);
        assert_string_equal(nc, "4");
        int optim = kd_test_st_count_prefixed(f, "optim.");
        if (i == 0) {
            assert_true(optim > 0);
            assert_non_null(kd_st_meta(f, "epochs_done"));
            assert_string_equal(kd_st_meta(f, "epochs_done"), "3");
        } else {
            assert_int_equal(optim, 0);
        }
        kd_st_close(f);
    }
}

/* The program's final line on stdout names the run directory. */
static void test_eval_of_run(void **state) {
    (void)state;
    need_run_a();
    char ck[DIRN];
    run_a_file(ck, sizeof ck, "best.safetensors");
    kd_test_proc p = RUN("eval", "--ckpt", ck, "--data", g_data, "--backend", "ref", "--threads", "2", "--json");
    kd_test_expect_ok(&p, "kd eval");
    kd_json *doc = NULL;
    if (kd_json_parse(p.out, strlen(p.out), "kd eval --json", &doc) != KD_OK) fail_msg("%s", kd_last_error());
    const kd_json *a = kd_json_get(doc, "arch");
    assert_non_null(a);
    assert_string_equal(a->string, "resnet8");
    assert_true(json_num(doc, "top1", "eval")->number > 40.0);
    assert_int_equal((int)json_num(doc, "n", "eval")->number, NTEST);
    kd_json_free(doc);
    kd_test_proc_free(&p);
}


/* --------------------------------------------------- named loss terms */

/* Members of a step record that are not loss terms. */
static int step_key_fixed(const char *k) {
    static const char *fixed[] = {"type", "epoch", "step", "lr", "loss", "images_per_s"};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        if (!strcmp(k, fixed[i])) return 1;
    return 0;
}

/* Members of an epoch record "train_<x>" that are not loss terms. */
static int epoch_key_fixed(const char *k) { return !strcmp(k, "train_loss") || !strcmp(k, "train_top1"); }

#define MAX_TERMS 16

static int name_index(char names[][64], int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (!strcmp(names[i], name)) return i;
    return -1;
}

/* The run in dir logged named loss terms: every step record carries weighted
 * terms that sum to its loss; every epoch record carries "train_<term>" for
 * each term the steps logged, summing to train_loss; summary.json's
 * "train_loss_terms" holds the last epoch's values. With want (n_want >= 0)
 * the terms seen are exactly want. */
static void check_run_terms(const char *dir, const char *const *want, int n_want) {
    char path[PATHN];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    char *text = kd_test_slurp(path, NULL);
    if (!text) fail_msg("no %s", path);
    char seen[MAX_TERMS][64];
    int n_seen = 0, n_steps = 0, n_epochs = 0;
    double last_epoch_vals[MAX_TERMS];
    for (int i = 0; i < MAX_TERMS; i++) last_epoch_vals[i] = NAN;
    for (char *l = text; *l;) {
        char *e = strchr(l, '\n');
        if (!e) fail_msg("%s: the last line has no newline", path);
        kd_json *doc = NULL;
        if (kd_json_parse(l, (size_t)(e - l), path, &doc) != KD_OK) fail_msg("%s", kd_last_error());
        const char *type = kd_json_get(doc, "type")->string;
        if (!strcmp(type, "step")) {
            n_steps++;
            double loss = json_num(doc, "loss", "step record")->number, sum = 0;
            int n_terms = 0;
            for (int64_t i = 0; i < doc->count; i++) {
                const char *k = doc->keys[i];
                if (step_key_fixed(k)) continue;
                if (doc->items[i].type != KD_JSON_NUMBER) fail_msg("%s: step term %s is no number", path, k);
                if (n_want >= 0) {
                    int ok = 0;
                    for (int w = 0; w < n_want; w++) ok |= !strcmp(want[w], k);
                    if (!ok) fail_msg("%s: unexpected term \"%s\" in a step record", path, k);
                }
                if (name_index(seen, n_seen, k) < 0) {
                    if (n_seen == MAX_TERMS) fail_msg("%s: too many terms", path);
                    snprintf(seen[n_seen++], 64, "%s", k);
                }
                sum += doc->items[i].number;
                n_terms++;
            }
            if (n_terms == 0) fail_msg("%s: a step record names no loss term", path);
            if (!(fabs(sum - loss) <= 1e-5 * fmax(1.0, fabs(loss))))
                fail_msg("%s: step terms sum to %.9g, loss %.9g", path, sum, loss);
        } else if (!strcmp(type, "epoch")) {
            n_epochs++;
            double loss = json_num(doc, "train_loss", "epoch record")->number, sum = 0;
            for (int i = 0; i < n_seen; i++) {
                char key[80];
                snprintf(key, sizeof key, "train_%s", seen[i]);
                last_epoch_vals[i] = json_num(doc, key, "epoch record")->number;
                sum += last_epoch_vals[i];
            }
            for (int64_t i = 0; i < doc->count; i++) {
                const char *k = doc->keys[i];
                if (strncmp(k, "train_", 6) || epoch_key_fixed(k)) continue;
                if (name_index(seen, n_seen, k + 6) < 0) fail_msg("%s: epoch term %s no step logged", path, k);
            }
            if (!(fabs(sum - loss) <= 1e-5 * fmax(1.0, fabs(loss))))
                fail_msg("%s: train_<term> sum to %.9g, train_loss %.9g", path, sum, loss);
        }
        kd_json_free(doc);
        l = e + 1;
    }
    free(text);
    if (n_steps == 0 || n_epochs == 0) fail_msg("%s: %d step and %d epoch records", path, n_steps, n_epochs);
    if (n_want >= 0) {
        if (n_seen != n_want) fail_msg("%s: %d terms logged, expected %d", path, n_seen, n_want);
        for (int w = 0; w < n_want; w++)
            if (name_index(seen, n_seen, want[w]) < 0) fail_msg("%s: term \"%s\" was never logged", path, want[w]);
    }
    snprintf(path, sizeof path, "%s/summary.json", dir);
    text = kd_test_slurp(path, NULL);
    if (!text) fail_msg("no %s", path);
    kd_json *sum = NULL;
    if (kd_json_parse(text, strlen(text), path, &sum) != KD_OK) fail_msg("%s", kd_last_error());
    free(text);
    const kd_json *lt = kd_json_get(sum, "train_loss_terms");
    if (!lt || lt->type != KD_JSON_OBJECT) fail_msg("%s has no object \"train_loss_terms\"", path);
    if (lt->count != n_seen) fail_msg("%s: train_loss_terms has %lld terms, metrics %d", path, (long long)lt->count, n_seen);
    for (int i = 0; i < n_seen; i++) {
        const kd_json *v = kd_json_get(lt, seen[i]);
        if (!v || v->type != KD_JSON_NUMBER) fail_msg("%s: train_loss_terms lacks \"%s\"", path, seen[i]);
        if (!(fabs(v->number - last_epoch_vals[i]) <= 1e-6 * fmax(1e-6, fabs(last_epoch_vals[i]))))
            fail_msg("%s: train_loss_terms.%s %.9g, last epoch record %.9g", path, seen[i], v->number,
                     last_epoch_vals[i]);
    }
    kd_json_free(sum);
}

/* ============================================ 2. config.yaml reproduces */

static void test_config_reproduces(void **state) {
    (void)state;
    need_run_a();
    char cfg[PATHN], other[DIRN], la[PATHN], lb[PATHN];
    run_a_file(cfg, sizeof cfg, "config.yaml");
    tmp_path(other, sizeof other, "run_repro");
    kd_test_proc p = RUN("train", "--config", cfg, "--out", other);
    kd_test_expect_ok(&p, "kd train --config");
    kd_test_proc_free(&p);
    run_a_file(la, sizeof la, "last.safetensors");
    snprintf(lb, sizeof lb, "%s/last.safetensors", other);
    compare_ckpts(la, lb, KD_TEST_CKPT_WITH_OPTIM);
    run_a_file(la, sizeof la, "best.safetensors");
    snprintf(lb, sizeof lb, "%s/best.safetensors", other);
    compare_ckpts(la, lb, KD_TEST_CKPT_MODEL);
    /* The resolved settings are the same apart from the run directory. */
    snprintf(lb, sizeof lb, "%s/config.yaml", other);
    char *ta = kd_test_slurp(cfg, NULL), *tb = kd_test_slurp(lb, NULL);
    assert_non_null(ta);
    assert_non_null(tb);
    char *oa = strstr(ta, "\nout:"), *ob = strstr(tb, "\nout:");
    assert_non_null(oa);
    assert_non_null(ob);
    *strchr(oa + 1, '\n') = '\0';
    char *resta = oa + strlen(oa) + 1;
    *strchr(ob + 1, '\n') = '\0';
    char *restb = ob + strlen(ob) + 1;
    *oa = *ob = '\0';
    /* Skip the comment line, which names the file. */
    assert_string_equal(strchr(ta, '\n'), strchr(tb, '\n'));
    assert_string_equal(resta, restb);
    free(ta);
    free(tb);
}

/* The number of loader threads changes nothing; the seed changes the weights
 * (a control that the byte comparison can fail). */
static void test_workers_and_seed(void **state) {
    (void)state;
    char w1[DIRN], w3[DIRN], s7[DIRN], p1[PATHN], p3[PATHN], p7[PATHN], msg[2048];
    tmp_path(w1, sizeof w1, "run_w1");
    tmp_path(w3, sizeof w3, "run_w3");
    tmp_path(s7, sizeof s7, "run_s7");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(g_data, w1, "1"));
    kd_test_expect_ok(&p, "kd train --workers 1");
    kd_test_proc_free(&p);
    p = RUN("train", TRAIN_FLAGS(g_data, w3, "1"), "--workers", "3");
    kd_test_expect_ok(&p, "kd train --workers 3");
    kd_test_proc_free(&p);
    p = RUN("train", TRAIN_FLAGS(g_data, s7, "1"), "--seed", "7");
    kd_test_expect_ok(&p, "kd train --seed 7");
    kd_test_proc_free(&p);
    snprintf(p1, sizeof p1, "%s/last.safetensors", w1);
    snprintf(p3, sizeof p3, "%s/last.safetensors", w3);
    snprintf(p7, sizeof p7, "%s/last.safetensors", s7);
    compare_ckpts(p1, p3, KD_TEST_CKPT_WITH_OPTIM);
    if (!kd_test_ckpts_differ(p1, p7, KD_TEST_CKPT_MODEL, msg, sizeof msg))
        fail_msg("--seed 7 gives the same weights as --seed 0");
}

/* The test_top1 of epoch record k (1-based) of dir's metrics.jsonl into buf
 * ("" when the record has none). */
static void epoch_test_top1(const char *dir, int k, char *buf, size_t n) {
    char path[PATHN];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    char *m = kd_test_slurp(path, NULL);
    assert_non_null(m);
    buf[0] = '\0';
    char *q = m;
    for (int i = 0; i < k; i++) {
        q = strstr(q, "\"type\": \"epoch\"");
        if (!q) fail_msg("%s has fewer than %d epoch records", path, k);
        q++;
    }
    char *eol = strchr(q, '\n'), *t = strstr(q, "\"test_top1\": ");
    if (t && (!eol || t < eol)) {
        t += strlen("\"test_top1\": ");
        size_t len = strcspn(t, ",}");
        snprintf(buf, n, "%.*s", (int)len, t);
    }
    free(m);
}

/* eval_every 2 over 3 epochs: the test split is evaluated after epochs 2 and
 * 3 only (epoch 1's record has no test fields), training is untouched (the
 * checkpoint equals run A's bit for bit, optimiser state included) and the
 * last epoch's test top-1 is run A's; eval_every 0 is refused. */
static void test_eval_every(void **state) {
    (void)state;
    need_run_a();
    char e[DIRN], la[PATHN], le[PATHN], a1[64], e1[64];
    tmp_path(e, sizeof e, "run_eval_every");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(g_data, e, "3"), "--eval-every", "2");
    kd_test_expect_ok(&p, "kd train --eval-every 2");
    kd_test_proc_free(&p);
    run_a_file(la, sizeof la, "last.safetensors");
    snprintf(le, sizeof le, "%s/last.safetensors", e);
    compare_ckpts(la, le, KD_TEST_CKPT_WITH_OPTIM);
    epoch_test_top1(e, 1, e1, sizeof e1);
    if (e1[0]) fail_msg("epoch 1 was evaluated (test_top1 %s) with eval_every 2", e1);
    for (int k = 2; k <= 3; k++) {
        epoch_test_top1(e, k, e1, sizeof e1);
        epoch_test_top1(g_run_a, k, a1, sizeof a1);
        if (!e1[0] || strcmp(a1, e1)) fail_msg("epoch %d: test_top1 '%s' with eval_every 2, '%s' without", k, e1, a1);
    }
    tmp_path(e, sizeof e, "run_eval_every0");
    p = RUN("train", TRAIN_FLAGS(g_data, e, "3"), "--eval-every", "0");
    EXPECT_FAIL(&p, 2, "eval_every");
    kd_test_proc_free(&p);
}

/* kd export: run A's model alone (every tensor of last.safetensors without
 * the optim. / distill. / ema. prefixes, byte-identical, and nothing else),
 * which kd eval scores exactly as the run's last epoch; --ema without an EMA
 * copy, the checkpoint itself as --out and a missing file exit 2. */
static void test_export(void **state) {
    (void)state;
    need_run_a();
    char la[PATHN], ex[PATHN], msg[256];
    run_a_file(la, sizeof la, "last.safetensors");
    tmp_path(ex, sizeof ex, "exported.safetensors");
    kd_test_proc p = RUN("export", "--ckpt", g_run_a, "--out", ex);
    kd_test_expect_ok(&p, "kd export");
    kd_test_proc_free(&p);
    kd_st_file *a = kd_test_st_open(la), *e = kd_test_st_open(ex);
    int model = 0;
    for (int i = 0; i < kd_st_count(a); i++) {
        const kd_st_entry *t = kd_st_get(a, i);
        if (!strncmp(t->name, "optim.", 6) || !strncmp(t->name, "distill.", 8) || !strncmp(t->name, "ema.", 4))
            continue;
        model++;
        const kd_st_entry *u = kd_st_find(e, t->name);
        if (!u) fail_msg("the export lacks %s", t->name);
        if (u->nbytes != t->nbytes || memcmp(u->data, t->data, t->nbytes))
            fail_msg("%s differs between %s and the export", t->name, la);
    }
    assert_true(model > 0);
    assert_int_equal(kd_st_count(e), model);
    assert_string_equal(kd_st_meta(e, "arch"), "resnet8");
    kd_st_close(a);
    kd_st_close(e);
    /* kd eval of the export = the run's last epoch. */
    p = RUN("eval", "--ckpt", ex, "--data", g_data, "--backend", "ref", "--threads", "2");
    kd_test_expect_ok(&p, "kd eval of the export");
    char last[64];
    epoch_test_top1(g_run_a, 3, last, sizeof last);
    snprintf(msg, sizeof msg, "top1 %.2f%%", atof(last));
    if (!strstr(p.out, msg)) fail_msg("kd eval of the export printed %s; the run's last epoch had %s", p.out, msg);
    kd_test_proc_free(&p);
    p = RUN("export", "--ckpt", la, "--out", ex, "--ema");
    EXPECT_FAIL(&p, 2, "no EMA copy");
    kd_test_proc_free(&p);
    p = RUN("export", "--ckpt", la, "--out", la);
    EXPECT_FAIL(&p, 2, "the checkpoint itself");
    kd_test_proc_free(&p);
    p = RUN("export", "--ckpt", "nope.safetensors", "--out", ex);
    EXPECT_FAIL(&p, 2, "nope.safetensors");
    kd_test_proc_free(&p);
}

/* ============================================================ 3. resume */

static void test_resume_after_pause(void **state) {
    (void)state;
    need_run_a();
    char b[DIRN], la[PATHN], lb[PATHN];
    tmp_path(b, sizeof b, "run_b");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(g_data, b, "3"), "--stop-after", "1");
    kd_test_expect_ok(&p, "kd train --stop-after 1");
    kd_test_proc_free(&p);
    snprintf(lb, sizeof lb, "%s/last.safetensors", b);
    kd_st_file *f = kd_test_st_open(lb);
    const char *ed = kd_st_meta(f, "epochs_done");
    if (!ed || strcmp(ed, "1") != 0) fail_msg("after --stop-after 1, epochs_done is %s", ed ? ed : "(none)");
    kd_st_close(f);

    p = RUN("train", "--resume", b);
    kd_test_expect_ok(&p, "kd train --resume");
    kd_test_proc_free(&p);
    run_a_file(la, sizeof la, "last.safetensors");
    compare_ckpts(la, lb, KD_TEST_CKPT_WITH_OPTIM);
    run_a_file(la, sizeof la, "best.safetensors");
    snprintf(lb, sizeof lb, "%s/best.safetensors", b);
    compare_ckpts(la, lb, KD_TEST_CKPT_MODEL);

    /* metrics.jsonl continues: three epoch records in all. */
    snprintf(lb, sizeof lb, "%s/metrics.jsonl", b);
    char *m = kd_test_slurp(lb, NULL);
    assert_non_null(m);
    int n = 0;
    for (char *q = m; (q = strstr(q, "\"type\": \"epoch\"")); q++) n++;
    free(m);
    assert_int_equal(n, 3);
    snprintf(lb, sizeof lb, "%s/summary.json", b);
    m = kd_test_slurp(lb, NULL);
    assert_non_null(m);
    kd_json *sum = NULL;
    if (kd_json_parse(m, strlen(m), "summary.json", &sum) != KD_OK) fail_msg("%s", kd_last_error());
    assert_int_equal((int)json_num(sum, "epochs", "summary.json")->number, 3);
    kd_json_free(sum);
    free(m);
}

static void test_resume_after_kill(void **state) {
    (void)state;
    need_run_a();
    char c[DIRN], lc[PATHN], la[PATHN];
    tmp_path(c, sizeof c, "run_c");
    snprintf(lc, sizeof lc, "%s/last.safetensors", c);
    kd_test_child child = kd_test_spawn_kd(g_root, (const char *const[]){"train", TRAIN_FLAGS(g_data, c, "3"), NULL});
    int ws = 0, finished = 0;
    for (;;) {
        pid_t w = waitpid(child.pid, &ws, WNOHANG);
        if (w == child.pid) {
            finished = 1;
            break;
        }
        if (file_exists(lc)) break;
        if (kd_test_now() - child.t0 > 300) {
            kill(child.pid, SIGKILL);
            waitpid(child.pid, &ws, 0);
            fail_msg("run C wrote no checkpoint in 300 s");
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    if (!finished) {
        kill(child.pid, SIGKILL);
        while (waitpid(child.pid, &ws, 0) < 0 && errno == EINTR) {
        }
    }
    if (finished || !WIFSIGNALED(ws)) {
        kd_test_proc p = kd_test_collect(&child, ws);
        int ok = p.status == 0 && !p.signal;
        if (!ok) kd_test_proc_dump(&p, NULL);
        kd_test_proc_free(&p);
        if (!ok) fail_msg("run C failed before it could be killed");
        skip(); /* it finished before the kill */
        return;
    }
    /* The checkpoint left behind is whole (atomic replacement). */
    kd_st_file *f = kd_test_st_open(lc);
    const char *ed = kd_st_meta(f, "epochs_done");
    assert_non_null(ed);
    int done = atoi(ed);
    kd_st_close(f);
    if (done >= 3) {
        skip();
        return;
    }
    assert_true(done >= 1);
    kd_test_proc p = RUN("train", "--resume", c);
    kd_test_expect_ok(&p, "kd train --resume after SIGKILL");
    kd_test_proc_free(&p);
    run_a_file(la, sizeof la, "last.safetensors");
    compare_ckpts(la, lc, KD_TEST_CKPT_WITH_OPTIM);
}

/* =========================================================== 4. distill */

static void test_distill(void **state) {
    (void)state;
    need_run_a();
    char t[PATHN], d[DIRN], path[PATHN];
    run_a_file(t, sizeof t, "best.safetensors");
    tmp_path(d, sizeof d, "run_distill");
    kd_test_proc p = RUN("distill", "--teacher-ckpt", t, TRAIN_FLAGS(g_data, d, "1"));
    kd_test_expect_ok(&p, "kd distill");
    kd_test_proc_free(&p);
    snprintf(path, sizeof path, "%s/summary.json", d);
    char *text = kd_test_slurp(path, NULL);
    if (!text) fail_msg("kd distill wrote no %s", path);
    kd_json *sum = NULL;
    if (kd_json_parse(text, strlen(text), "summary.json", &sum) != KD_OK) fail_msg("%s", kd_last_error());
    free(text);
    const kd_json *m = kd_json_get(sum, "method"), *te = kd_json_get(sum, "teacher");
    assert_non_null(m);
    assert_non_null(te);
    assert_string_equal(m->string, "kd");
    assert_string_equal(te->string, "resnet8");
    assert_int_equal((int)json_num(sum, "epochs", "summary.json")->number, 1);
    kd_json_free(sum);
    /* The KL term took part. */
    snprintf(path, sizeof path, "%s/metrics.jsonl", d);
    text = kd_test_slurp(path, NULL);
    assert_non_null(text);
    char *kl = strstr(text, "\"train_kl\": ");
    assert_non_null(kl);
    double v = strtod(kl + 12, NULL);
    free(text);
    if (!(v > 0)) fail_msg("train_kl is %g in a kd run", v);
    /* kd's step: the weighted "ce" and "kl" terms in step and epoch records
     * (train_ce, train_kl) and in summary.json's train_loss_terms. */
    check_run_terms(d, (const char *const[]){"ce", "kl"}, 2);
    snprintf(path, sizeof path, "%s/last.safetensors", d);
    kd_st_file *f = kd_test_st_open(path);
    kd_st_close(f);
}

/* A missing teacher checkpoint is named. */
static void test_distill_missing_teacher(void **state) {
    (void)state;
    char d[DIRN], t[DIRN];
    tmp_path(d, sizeof d, "run_distill_noteacher");
    tmp_path(t, sizeof t, "no-such-teacher.safetensors");
    kd_test_proc p = RUN("distill", "--teacher-ckpt", t, TRAIN_FLAGS(g_data, d, "1"));
    EXPECT_FAIL(&p, 1, t); /* the whole path, intact */
    if (strncmp(p.err, "kd distill: teacher: /", 22) != 0) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("expected 'kd distill: teacher: %s: ...'", t);
    }
    kd_test_proc_free(&p);
    char last[PATHN];
    snprintf(last, sizeof last, "%s/last.safetensors", d);
    assert_false(file_exists(last));
}

/* ======================================================== 5. bad input */

/* An unknown teacher architecture is named (and the message is not garbled). */
static void test_distill_unknown_teacher_arch(void **state) {
    (void)state;
    char d[DIRN];
    tmp_path(d, sizeof d, "run_distill_badteacher");
    kd_test_proc p = RUN("distill", "--teacher-ckpt", "t.safetensors", "--teacher", "resnet9",
                         TRAIN_FLAGS(g_data, d, "1"));
    EXPECT_FAIL(&p, -1, "teacher: unknown model 'resnet9'");
    kd_test_proc_free(&p);
    assert_false(file_exists(d));
}

/* a. missing dataset directory */
static void test_bad_missing_dataset(void **state) {
    (void)state;
    char d[DIRN], out[DIRN];
    tmp_path(d, sizeof d, "no-such-dataset");
    tmp_path(out, sizeof out, "run_missing_data");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(d, out, "1"));
    EXPECT_FAIL(&p, 1, "no-such-dataset");
    kd_test_proc_free(&p);
    char path[PATHN];
    snprintf(path, sizeof path, "%s/last.safetensors", out);
    assert_false(file_exists(path));
    p = RUN("eval", "--ckpt", "whatever.safetensors", "--data", d, "--backend", "ref");
    EXPECT_FAIL(&p, 1, "no-such-dataset");
    kd_test_proc_free(&p);
}

/* b. truncated images file */
static void test_bad_truncated_images(void **state) {
    (void)state;
    char d[DIRN], out[DIRN], f[PATHN];
    tmp_path(d, sizeof d, "data_truncated");
    copy_dataset(d);
    snprintf(f, sizeof f, "%s/train-images-idx3-ubyte", d);
    copy_file(f, f, 16 + 50 * IMG * IMG + 7); /* cut mid-image */
    tmp_path(out, sizeof out, "run_truncated");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(d, out, "1"));
    EXPECT_FAIL(&p, 1, "train-images-idx3-ubyte");
    kd_test_proc_free(&p);
    snprintf(f, sizeof f, "%s/last.safetensors", out);
    assert_false(file_exists(f));
}

/* b'. truncated labels file, and a header cut short */
static void test_bad_truncated_labels(void **state) {
    (void)state;
    char d[DIRN], out[DIRN], f[PATHN];
    tmp_path(d, sizeof d, "data_truncated_labels");
    copy_dataset(d);
    snprintf(f, sizeof f, "%s/t10k-labels-idx1-ubyte", d);
    copy_file(f, f, 8 + NTEST - 3);
    tmp_path(out, sizeof out, "run_truncated_labels");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(d, out, "1"));
    EXPECT_FAIL(&p, 1, "t10k-labels-idx1-ubyte");
    kd_test_proc_free(&p);
    snprintf(f, sizeof f, "%s/t10k-labels-idx1-ubyte", d);
    copy_file(f, f, 5); /* not even a header */
    p = RUN("info", d);
    EXPECT_FAIL(&p, 1, "t10k-labels-idx1-ubyte");
    kd_test_proc_free(&p);
}

/* c. bad magic number */
static void test_bad_magic(void **state) {
    (void)state;
    char d[DIRN], out[DIRN], f[PATHN];
    tmp_path(d, sizeof d, "data_badmagic");
    copy_dataset(d);
    snprintf(f, sizeof f, "%s/t10k-images-idx3-ubyte", d);
    size_t n;
    char *b = kd_test_slurp(f, &n);
    assert_non_null(b);
    b[2] = 0x0d; /* 0x00000d03 */
    kd_test_write_file(f, b, n);
    free(b);
    tmp_path(out, sizeof out, "run_badmagic");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(d, out, "1"));
    EXPECT_FAIL(&p, 1, "t10k-images-idx3-ubyte");
    kd_test_proc_free(&p);
    snprintf(f, sizeof f, "%s/last.safetensors", out);
    assert_false(file_exists(f));
}

/* c'. labels out of step with images (counts differ) */
static void test_bad_count_mismatch(void **state) {
    (void)state;
    char d[DIRN], out[DIRN], f[PATHN];
    tmp_path(d, sizeof d, "data_count");
    copy_dataset(d);
    snprintf(f, sizeof f, "%s/train-labels-idx1-ubyte", d);
    size_t n;
    unsigned char *b = (unsigned char *)kd_test_slurp(f, &n);
    assert_non_null(b);
    kd_test_put_be32(b + 4, NTRAIN - 1);
    kd_test_write_file(f, b, n - 1);
    free(b);
    tmp_path(out, sizeof out, "run_count");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(d, out, "1"));
    EXPECT_FAIL(&p, 1, "train-");
    kd_test_proc_free(&p);
}

/* d. checkpoint of another architecture */
static void test_bad_arch_mismatch(void **state) {
    (void)state;
    need_run_a();
    char ck[DIRN];
    run_a_file(ck, sizeof ck, "best.safetensors");
    kd_test_proc p = RUN("eval", "--ckpt", ck, "--model", "resnet14", "--data", g_data, "--backend", "ref");
    EXPECT_FAIL(&p, 1, ck, "resnet8", "resnet14");
    kd_test_proc_free(&p);
}

/* d'. the same architecture name but a mis-shaped tensor (or a missing one) */
static void write_doctored(const char *src, const char *dst, const char *reshape, const char *drop) {
    kd_st_file *f = kd_test_st_open(src);
    kd_st_writer *w = NULL;
    KD_ASSERT_OK(kd_st_writer_init(&w));
    for (int i = 0; i < kd_st_count(f); i++) {
        const kd_st_entry *e = kd_st_get(f, i);
        if (drop && !strcmp(e->name, drop)) continue;
        int64_t shape[KD_MAX_DIMS];
        memcpy(shape, e->shape, sizeof shape);
        if (reshape && !strcmp(e->name, reshape)) shape[e->ndim - 1] /= 2; /* fewer elements: data stays in bounds */
        KD_ASSERT_OK(kd_st_writer_add(w, e->name, e->dtype, e->ndim, shape, e->data));
    }
    static const char *keys[] = {"format", "arch", "in_channels", "num_classes", "kd_version"};
    for (int k = 0; k < 5; k++)
        if (kd_st_meta(f, keys[k])) KD_ASSERT_OK(kd_st_writer_set_meta(w, keys[k], kd_st_meta(f, keys[k])));
    KD_ASSERT_OK(kd_st_writer_save(w, dst));
    kd_st_writer_free(w);
    kd_st_close(f);
}

static void test_bad_misshaped_tensor(void **state) {
    (void)state;
    need_run_a();
    char ck[DIRN], bad[DIRN];
    run_a_file(ck, sizeof ck, "best.safetensors");
    tmp_path(bad, sizeof bad, "misshaped.safetensors");
    write_doctored(ck, bad, "layer1.0.conv1.weight", NULL);
    kd_test_proc p = RUN("eval", "--ckpt", bad, "--data", g_data, "--backend", "ref");
    EXPECT_FAIL(&p, 1, "misshaped.safetensors", "layer1.0.conv1.weight");
    kd_test_proc_free(&p);
    /* The same file as a teacher. */
    char out[DIRN];
    tmp_path(out, sizeof out, "run_misshaped_teacher");
    p = RUN("distill", "--teacher-ckpt", bad, TRAIN_FLAGS(g_data, out, "1"));
    EXPECT_FAIL(&p, 1, bad, "teacher", "layer1.0.conv1.weight");
    kd_test_proc_free(&p);
}

static void test_bad_missing_tensor(void **state) {
    (void)state;
    need_run_a();
    char ck[DIRN], bad[DIRN];
    run_a_file(ck, sizeof ck, "best.safetensors");
    tmp_path(bad, sizeof bad, "missing-tensor.safetensors");
    write_doctored(ck, bad, NULL, "fc.bias");
    kd_test_proc p = RUN("eval", "--ckpt", bad, "--data", g_data, "--backend", "ref");
    EXPECT_FAIL(&p, 1, "missing-tensor.safetensors", "fc.bias");
    kd_test_proc_free(&p);
}

/* e. unknown names */
static void test_bad_unknown_model(void **state) {
    (void)state;
    char out[DIRN];
    tmp_path(out, sizeof out, "run_unknown_model");
    kd_test_proc p = RUN("train", "--data", g_data, "--model", "resnet9000", "--backend", "ref", "--out", out,
                         "--epochs", "1", "--progress", "0");
    EXPECT_FAIL(&p, -1, "resnet9000");
    kd_test_proc_free(&p);
    assert_false(file_exists(out));
}

static void test_bad_unknown_method(void **state) {
    (void)state;
    char out[DIRN];
    tmp_path(out, sizeof out, "run_unknown_method");
    kd_test_proc p = RUN("train", "--data", g_data, "--method", "nope", "--backend", "ref", "--out", out, "--epochs",
                         "1", "--progress", "0");
    EXPECT_FAIL(&p, -1, "nope");
    kd_test_proc_free(&p);
    assert_false(file_exists(out));
}

static void test_bad_unknown_backend(void **state) {
    (void)state;
    char out[DIRN];
    tmp_path(out, sizeof out, "run_unknown_backend");
    kd_test_proc p = RUN("train", "--data", g_data, "--backend", "abacus", "--out", out, "--epochs", "1", "--progress",
                         "0");
    EXPECT_FAIL(&p, -1, "abacus");
    kd_test_proc_free(&p);
    assert_false(file_exists(out));
}

static void test_bad_unknown_flag(void **state) {
    (void)state;
    kd_test_proc p = RUN("train", "--data", g_data, "--lr-typo", "1");
    EXPECT_FAIL(&p, 2, "lr");
    if (!strstr(p.err, "lr-typo") && !strstr(p.err, "lr_typo")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("the message does not name the flag --lr-typo");
    }
    kd_test_proc_free(&p);
    p = RUN("eval", "--ckpt", "x.safetensors", "--lr-typo", "1");
    EXPECT_FAIL(&p, 2, "--lr-typo");
    kd_test_proc_free(&p);
    p = RUN("train", "stray-argument");
    EXPECT_FAIL(&p, 2, "stray-argument");
    kd_test_proc_free(&p);
    p = RUN("train", "--epochs");
    EXPECT_FAIL(&p, 2, "--epochs");
    kd_test_proc_free(&p);
}

/* f. malformed numbers: the message names the setting and the value; a run
 * directory given as --out is left as it was. */
static char g_victim[600];

static void need_victim(void) {
    need_run_a();
    if (g_victim[0]) return;
    tmp_path(g_victim, sizeof g_victim, "victim");
    mkdir(g_victim, 0755);
    static const char *files[] = {"config.yaml", "metrics.jsonl", "summary.json", "last.safetensors",
                                  "best.safetensors"};
    for (int i = 0; i < 5; i++) {
        char a[DIRN], b[PATHN];
        run_a_file(a, sizeof a, files[i]);
        snprintf(b, sizeof b, "%s/%s", g_victim, files[i]);
        copy_file(a, b, (size_t)-1);
    }
}

/* Runs `kd train ... --out victim FLAG VALUE` and checks the failure and that
 * the victim run is untouched. */
static void bad_setting(const char *flag, const char *value, const char *setting, int want) {
    need_victim();
    static const char *files[] = {"config.yaml", "metrics.jsonl", "summary.json", "last.safetensors",
                                  "best.safetensors"};
    char *before[5];
    size_t n[5];
    char paths[5][PATHN];
    for (int i = 0; i < 5; i++) {
        snprintf(paths[i], sizeof paths[i], "%s/%s", g_victim, files[i]);
        before[i] = kd_test_slurp(paths[i], &n[i]);
        assert_non_null(before[i]);
    }
    kd_test_proc p = RUN("train", "--data", g_data, "--backend", "ref", "--out", g_victim, "--progress", "0", flag,
                         value);
    EXPECT_FAIL(&p, want, value);
    const char *first;
    kd_test_count_lines(p.err, 1, &first);
    if (!kd_test_contains_ci(first, strcspn(first, "\n"), setting) && !kd_test_contains_ci(first, strcspn(first, "\n"), flag + 2)) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("the message does not name the setting %s", setting);
    }
    kd_test_proc_free(&p);
    for (int i = 0; i < 5; i++) {
        expect_same_file(paths[i], before[i], n[i]);
        free(before[i]);
    }
}

static void test_bad_precision(void **state) {
    (void)state;
    bad_setting("--precision", "fp16", "precision", 2);
}

/* --precision bf16: where the CPU has native bf16 a short run works and
 * records its precision; elsewhere (and always on the ref backend) it is
 * refused with a message naming bf16, before anything is written. */
static void test_precision_bf16(void **state) {
    (void)state;
    char out[DIRN], path[PATHN];
    tmp_path(out, sizeof out, "run_bf16_ref");
    kd_test_proc p = RUN("train", "--data", g_data, "--backend", "ref", "--precision", "bf16", "--out", out, "--epochs",
                         "1", "--progress", "0");
    EXPECT_FAIL(&p, -1, "bf16");
    kd_test_proc_free(&p);
    assert_false(file_exists(out));
    kd_backend *cpu = NULL;
    if (kd_backend_get("cpu", &cpu) != KD_OK || !cpu->bf16) return;
    tmp_path(out, sizeof out, "run_bf16");
    p = RUN("train", TRAIN_FLAGS(g_data, out, "1"), "--backend", "cpu", "--precision", "bf16");
    kd_test_expect_ok(&p, "kd train --precision bf16");
    kd_test_proc_free(&p);
    snprintf(path, sizeof path, "%s/summary.json", out);
    size_t n;
    char *s = kd_test_slurp(path, &n);
    assert_non_null(s);
    if (!strstr(s, "\"precision\": \"bf16\"")) fail_msg("%s does not record precision bf16:\n%s", path, s);
    free(s);
}

static void test_bad_lr_suffix(void **state) {
    (void)state;
    bad_setting("--lr", "0.1x", "lr", 2);
}
static void test_bad_epochs_word(void **state) {
    (void)state;
    bad_setting("--epochs", "ten", "epochs", 2);
}
static void test_bad_batch_negative(void **state) {
    (void)state;
    bad_setting("--batch-size", "-5", "batch_size", 2);
}
static void test_bad_batch_zero(void **state) {
    (void)state;
    bad_setting("--batch-size", "0", "batch_size", -1);
}
static void test_bad_lr_nan(void **state) {
    (void)state;
    bad_setting("--lr", "nan", "lr", 2);
}
static void test_bad_lr_negative(void **state) {
    (void)state;
    bad_setting("--lr", "-0.1", "lr", -1);
}
static void test_bad_epochs_huge(void **state) {
    (void)state;
    bad_setting("--epochs", "99999999999999999999", "epochs", 2);
}
static void test_bad_milestones(void **state) {
    (void)state;
    bad_setting("--milestones", "5,x", "milestones", 2);
}
static void test_bad_schedule(void **state) {
    (void)state;
    bad_setting("--schedule", "zigzag", "schedule", 2);
}
static void test_bad_seed(void **state) {
    (void)state;
    bad_setting("--seed", "-3", "seed", 2);
}
static void test_bad_eval_batch(void **state) {
    (void)state;
    kd_test_proc p = RUN("eval", "--ckpt", "x.safetensors", "--batch", "12abc");
    EXPECT_FAIL(&p, 2, "12abc");
    kd_test_proc_free(&p);
    p = RUN("eval", "--ckpt", "x.safetensors", "--batch", "0");
    EXPECT_FAIL(&p, 2, "batch");
    kd_test_proc_free(&p);
    p = RUN("eval", "--data", g_data);
    EXPECT_FAIL(&p, 2, "--ckpt");
    kd_test_proc_free(&p);
}

/* Bad config files: missing, malformed YAML, a bad value (file:line named). */
static void test_bad_config_file(void **state) {
    (void)state;
    char cfg[DIRN], out[DIRN];
    tmp_path(out, sizeof out, "run_badcfg");
    tmp_path(cfg, sizeof cfg, "no-such-config.yaml");
    kd_test_proc p = RUN("train", "--config", cfg, "--out", out);
    EXPECT_FAIL(&p, -1, "no-such-config.yaml");
    kd_test_proc_free(&p);
    tmp_path(cfg, sizeof cfg, "bad-value.yaml");
    const char *text = "model: resnet8\nlr: \"fast\"\n";
    kd_test_write_file(cfg, text, strlen(text));
    p = RUN("train", "--config", cfg, "--out", out);
    EXPECT_FAIL(&p, -1, cfg, "bad-value.yaml:2", "'fast' for lr");
    kd_test_proc_free(&p);
    tmp_path(cfg, sizeof cfg, "bad-key.yaml");
    text = "model: resnet8\nlearning_rate: 0.1\n";
    kd_test_write_file(cfg, text, strlen(text));
    p = RUN("train", "--config", cfg, "--out", out);
    EXPECT_FAIL(&p, -1, "bad-key.yaml", "learning_rate");
    kd_test_proc_free(&p);
    tmp_path(cfg, sizeof cfg, "bad-yaml.yaml");
    text = "model: [resnet8\nlr: 0.1\n";
    kd_test_write_file(cfg, text, strlen(text));
    p = RUN("train", "--config", cfg, "--out", out);
    EXPECT_FAIL(&p, -1, "bad-yaml.yaml");
    kd_test_proc_free(&p);
    assert_false(file_exists(out));
}

/* g. NaN loss: epoch 2 explodes; epoch 1's checkpoint survives and works. */
static void test_nan_loss(void **state) {
    (void)state;
    char out[DIRN], last[PATHN];
    tmp_path(out, sizeof out, "run_nan");
    kd_test_proc p = RUN("train", "--data", g_data, "--model", "resnet8", "--epochs", "3", "--batch-size", "16",
                         "--backend", "ref", "--threads", "2", "--workers", "1", "--out", out, "--progress", "0",
                         "--lr", "0.05", "--schedule", "multistep", "--milestones", "1", "--lr-decay", "1e30");
    EXPECT_FAIL_AFTER_LOG(&p, 1, "epoch 2", "last.safetensors");
    const char *first;
    kd_test_count_lines(p.err, 1, &first);
    size_t len = strcspn(first, "\n");
    if (!kd_test_contains_ci(first, len, "nan") && !kd_test_contains_ci(first, len, "inf")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("the message does not say NaN or inf");
    }
    /* It names the loss term and the step: "loss term 'ce' became NaN at epoch 2 step S". */
    const char *st = strstr(first, "step ");
    if (!kd_test_contains_ci(first, len, "'ce'") || !st || st > first + len || st[5] < '1' || st[5] > '9') {
        kd_test_proc_dump(&p, NULL);
        fail_msg("the message does not name the loss term 'ce' and the step");
    }
    kd_test_proc_free(&p);
    snprintf(last, sizeof last, "%s/last.safetensors", out);
    kd_st_file *f = kd_test_st_open(last);
    const char *ed = kd_st_meta(f, "epochs_done");
    if (!ed || strcmp(ed, "1") != 0) fail_msg("epochs_done is %s, expected 1", ed ? ed : "(none)");
    /* Its weights are finite. */
    for (int i = 0; i < kd_st_count(f); i++) {
        const kd_st_entry *e = kd_st_get(f, i);
        if (e->dtype != KD_F32) continue;
        for (size_t k = 0; k < e->nbytes / 4; k++)
            if (!isfinite(((const float *)e->data)[k])) fail_msg("%s holds a non-finite value in %s", last, e->name);
    }
    kd_st_close(f);
    p = RUN("eval", "--ckpt", last, "--data", g_data, "--backend", "ref", "--threads", "2");
    kd_test_expect_ok(&p, "kd eval of the last good checkpoint");
    kd_test_proc_free(&p);
    char path[PATHN];
    snprintf(path, sizeof path, "%s/metrics.jsonl", out);
    char *m = kd_test_slurp(path, NULL);
    assert_non_null(m);
    int n = 0;
    for (char *q = m; (q = strstr(q, "\"type\": \"epoch\"")); q++) n++;
    free(m);
    assert_int_equal(n, 1);
}

/* h. a second `kd train` into an existing run refuses and changes nothing */
static void test_existing_run_refused(void **state) {
    (void)state;
    need_victim();
    static const char *files[] = {"config.yaml", "metrics.jsonl", "summary.json", "last.safetensors",
                                  "best.safetensors"};
    char *before[5];
    size_t n[5];
    char paths[5][PATHN];
    for (int i = 0; i < 5; i++) {
        snprintf(paths[i], sizeof paths[i], "%s/%s", g_victim, files[i]);
        before[i] = kd_test_slurp(paths[i], &n[i]);
        assert_non_null(before[i]);
    }
    kd_test_proc p = RUN("train", TRAIN_FLAGS(g_data, g_victim, "1"));
    EXPECT_FAIL(&p, 1, "--resume", g_victim);
    kd_test_proc_free(&p);
    for (int i = 0; i < 5; i++) {
        expect_same_file(paths[i], before[i], n[i]);
        free(before[i]);
    }
}

/* Resuming a directory that holds no run names it. */
static void test_resume_missing(void **state) {
    (void)state;
    char d[DIRN];
    tmp_path(d, sizeof d, "no-such-run");
    kd_test_proc p = RUN("train", "--resume", d);
    EXPECT_FAIL(&p, 1, "no-such-run");
    kd_test_proc_free(&p);
}

/* --resume of a run whose last checkpoint is corrupt names it and changes nothing. */
static void test_resume_corrupt_checkpoint(void **state) {
    (void)state;
    need_victim();
    char d[DIRN], last[PATHN], metrics[PATHN];
    tmp_path(d, sizeof d, "run_corrupt_resume");
    mkdir(d, 0755);
    static const char *files[] = {"config.yaml", "metrics.jsonl", "last.safetensors"};
    for (int i = 0; i < 3; i++) {
        char a[PATHN], b[PATHN];
        snprintf(a, sizeof a, "%s/%s", g_victim, files[i]);
        snprintf(b, sizeof b, "%s/%s", d, files[i]);
        copy_file(a, b, i == 2 ? 1000 : (size_t)-1);
    }
    snprintf(last, sizeof last, "%s/last.safetensors", d);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", d);
    size_t nl, nm;
    char *bl = kd_test_slurp(last, &nl), *bm = kd_test_slurp(metrics, &nm);
    kd_test_proc p = RUN("train", "--resume", d);
    EXPECT_FAIL(&p, 1, last);
    kd_test_proc_free(&p);
    expect_same_file(last, bl, nl);
    expect_same_file(metrics, bm, nm);
    free(bl);
    free(bm);
}

/* i. corrupt checkpoint: truncated copies */
static void test_corrupt_checkpoint(void **state) {
    (void)state;
    need_run_a();
    char ck[DIRN], bad[DIRN];
    run_a_file(ck, sizeof ck, "best.safetensors");
    size_t n;
    char *b = kd_test_slurp(ck, &n);
    assert_non_null(b);
    free(b);
    static const size_t cuts[] = {0, 5, 100, 0};
    for (int i = 0; i < 4; i++) {
        size_t cut = i == 0 ? n / 2 : i == 3 ? n - 1 : cuts[i];
        char name[64];
        snprintf(name, sizeof name, "truncated%d.safetensors", i);
        tmp_path(bad, sizeof bad, name);
        copy_file(ck, bad, cut);
        kd_test_proc p = RUN("eval", "--ckpt", bad, "--data", g_data, "--backend", "ref");
        EXPECT_FAIL(&p, 1, name);
        kd_test_proc_free(&p);
        p = RUN("info", bad);
        EXPECT_FAIL(&p, 1, name);
        kd_test_proc_free(&p);
    }
    /* A header that is not JSON. */
    tmp_path(bad, sizeof bad, "garbage.safetensors");
    const char garbage[] = "\x10\x00\x00\x00\x00\x00\x00\x00{not json at all";
    kd_test_write_file(bad, garbage, sizeof garbage - 1);
    kd_test_proc p = RUN("eval", "--ckpt", bad, "--data", g_data, "--backend", "ref");
    EXPECT_FAIL(&p, 1, "garbage.safetensors");
    kd_test_proc_free(&p);
    /* The original is intact. */
    kd_st_close(kd_test_st_open(ck));
}

/* A checkpoint trained for another class count. */
static void test_bad_class_count(void **state) {
    (void)state;
    need_run_a();
    char d[DIRN], ck[DIRN];
    tmp_path(d, sizeof d, "data_2class");
    copy_dataset(d);
    /* Relabel: classes 0..1 only. */
    static const char *lab[] = {"train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"};
    for (int i = 0; i < 2; i++) {
        char f[PATHN];
        snprintf(f, sizeof f, "%s/%s", d, lab[i]);
        size_t n;
        char *b = kd_test_slurp(f, &n);
        for (size_t k = 8; k < n; k++) b[k] = (char)(b[k] & 1);
        kd_test_write_file(f, b, n);
        free(b);
    }
    run_a_file(ck, sizeof ck, "best.safetensors");
    kd_test_proc p = RUN("eval", "--ckpt", ck, "--data", d, "--backend", "ref");
    EXPECT_FAIL(&p, 1, ck, "classes");
    kd_test_proc_free(&p);
}

/* j. kd info */
static void test_info_dataset(void **state) {
    (void)state;
    kd_test_proc p = RUN("info", g_data);
    kd_test_expect_ok(&p, "kd info DATASET");
    if (!strstr(p.out, "4 classes")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("kd info does not print the class count");
    }
    char want[64];
    snprintf(want, sizeof want, "train %d, test %d", NTRAIN, NTEST);
    if (!strstr(p.out, want)) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("kd info does not print '%s'", want);
    }
    kd_test_proc_free(&p);
}

static void test_info_checkpoint(void **state) {
    (void)state;
    need_run_a();
    char ck[DIRN];
    run_a_file(ck, sizeof ck, "last.safetensors");
    kd_test_proc p = RUN("info", ck);
    kd_test_expect_ok(&p, "kd info CKPT");
    if (!strstr(p.out, "architecture resnet8") || !strstr(p.out, "layer1.0.conv1.weight") ||
        !strstr(p.out, "epochs_done: 3")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("kd info does not describe the checkpoint");
    }
    kd_test_proc_free(&p);
}

static void test_info_nonexistent(void **state) {
    (void)state;
    kd_test_proc p = RUN("info", "/nonexistent");
    EXPECT_FAIL(&p, 1, "/nonexistent");
    kd_test_proc_free(&p);
    p = RUN("info", "/nonexistent/model.safetensors");
    EXPECT_FAIL(&p, 1, "/nonexistent/model.safetensors");
    kd_test_proc_free(&p);
    p = RUN("info");
    if (p.signal || p.status != 2) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("kd info without a path: expected exit 2");
    }
    kd_test_proc_free(&p);
}

/* ============================================================== 6. help */

static void expect_usage(const char *const *args, const char *must) {
    kd_test_proc p = kd_test_run_kd(g_root, args);
    kd_test_expect_ok(&p, args[0]);
    if (!strstr(p.out, "usage") || (must && !strstr(p.out, must))) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("no usage text (%s) on stdout", must ? must : "usage");
    }
    kd_test_proc_free(&p);
}

static void test_help_top(void **state) {
    (void)state;
    expect_usage((const char *const[]){"--help", NULL}, "distill");
    expect_usage((const char *const[]){"help", NULL}, "eval");
}
static void test_help_train(void **state) {
    (void)state;
    expect_usage((const char *const[]){"train", "--help", NULL}, "--batch-size");
}
static void test_help_distill(void **state) {
    (void)state;
    expect_usage((const char *const[]){"distill", "--help", NULL}, "--teacher-ckpt");
}
static void test_help_eval(void **state) {
    (void)state;
    expect_usage((const char *const[]){"eval", "--help", NULL}, "--ckpt");
}
static void test_help_info(void **state) {
    (void)state;
    expect_usage((const char *const[]){"info", "--help", NULL}, "PATH");
}
static void test_unknown_command(void **state) {
    (void)state;
    kd_test_proc p = RUN("frobnicate");
    EXPECT_FAIL(&p, 2, "frobnicate");
    kd_test_proc_free(&p);
    p = RUN(NULL);
    if (p.signal || p.status != 2) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("kd without a command: expected exit 2, got %d", p.status);
    }
    kd_test_proc_free(&p);
}

/* ============================================= 7. methods and their settings */

/* The line of text holding needle, or NULL; *len is its length. */
static const char *line_with(const char *text, const char *needle, size_t *len) {
    const char *p = strstr(text, needle);
    if (!p) return NULL;
    const char *b = p;
    while (b > text && b[-1] != '\n') b--;
    *len = strcspn(b, "\n");
    return b;
}

static int name_char(char c) { return isalnum((unsigned char)c) || c == '_' || c == '.'; }

/* Whether word occurs in s[0..len) not inside a longer name. */
static int contains_word(const char *s, size_t len, const char *word) {
    size_t m = strlen(word);
    for (size_t i = 0; i + m <= len; i++)
        if (!strncmp(s + i, word, m) && (i == 0 || !name_char(s[i - 1])) && (i + m == len || !name_char(s[i + m])))
            return 1;
    return 0;
}

/* The first float setting of d with a non-zero default, or NULL. */
static const kd_method_arg *first_float_arg(const kd_method_def *d) {
    for (int i = 0; i < d->n_args; i++)
        if (d->args[i].type == KD_ARG_FLOAT && strtod(d->args[i].def, NULL) != 0) return &d->args[i];
    return NULL;
}

/* The weighted terms the default step of d logs with its published weights;
 * -1 when d has its own step (its terms are its own business). */
static int method_terms(const kd_method_def *d, const char **out) {
    if (d->step || d->loss) return -1; /* terms of its own */
    kd_distill_cfg dc = kd_distill_defaults(d->name);
    int n = 0;
    if (dc.gamma != 0) out[n++] = "ce";
    if (dc.alpha != 0) out[n++] = "kl";
    if (dc.beta != 0 && d->term) out[n++] = d->name;
    return n;
}

/* A path that does not exist: a run that reads data would fail naming it. */
static const char *no_data(void) {
    static char p[DIRN];
    tmp_path(p, sizeof p, "no-such-data-dir");
    return p;
}

/* The error line must not be about the data: nothing was read. */
static void expect_no_data_read(const kd_test_proc *p, const char *out) {
    if (strstr(p->err, "no-such-data-dir")) {
        kd_test_proc_dump(p, NULL);
        fail_msg("the error is about the data: the command line was not checked first");
    }
    if (out) assert_false(file_exists(out));
}

/* `kd distill --method list`: every registered method, its summary and its paper. */
static void test_method_list(void **state) {
    (void)state;
    kd_test_proc p = RUN("distill", "--method", "list");
    kd_test_expect_ok(&p, "kd distill --method list");
    int n;
    const kd_method_def *const *defs = kd_method_defs(&n);
    int name_lines = 0;
    for (const char *l = p.out; *l; l += strcspn(l, "\n") + (l[strcspn(l, "\n")] == '\n'))
        name_lines += *l != ' ' && *l != '\n';
    if (name_lines != n) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("%d methods listed, %d registered", name_lines, n);
    }
    for (int i = 0; i < n; i++) {
        const kd_method_def *d = defs[i];
        size_t nl = strlen(d->name);
        const char *line = NULL;
        for (const char *l = p.out; *l; l += strcspn(l, "\n") + (l[strcspn(l, "\n")] == '\n'))
            if (!strncmp(l, d->name, nl) && l[nl] == ' ') line = l;
        if (!line) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("method %s is not listed", d->name);
        }
        size_t len = strcspn(line, "\n");
        const char *next = line + len + (line[len] == '\n');
        if (!kd_test_contains_ci(line, len, d->summary) || !kd_test_contains_ci(next, strcspn(next, "\n"), d->paper ? d->paper : "-")) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("method %s: summary or paper missing from its entry", d->name);
        }
    }
    kd_test_proc_free(&p);
}

/* `kd distill --method NAME --help` for every method: its summary, paper and
 * every "<method>.<setting>" with its default, from the settings table. */
static void test_method_help(void **state) {
    (void)state;
    int n, with_args = 0, saw_kd = 0;
    const kd_method_def *const *defs = kd_method_defs(&n);
    for (int i = 0; i < n; i++) {
        const kd_method_def *d = defs[i];
        kd_test_proc p = RUN("distill", "--method", d->name, "--help");
        kd_test_expect_ok(&p, "kd distill --method NAME --help");
        if (!strstr(p.out, "usage")) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("--method %s --help: no usage text", d->name);
        }
        saw_kd |= !strcmp(d->name, "kd");
        if (!strcmp(d->name, "none")) {
            kd_test_proc_free(&p);
            continue;
        }
        char head[64];
        snprintf(head, sizeof head, "method %s: ", d->name);
        if (!strstr(p.out, head) || !strstr(p.out, d->summary) || (d->paper && !strstr(p.out, d->paper))) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("--method %s --help does not describe the method", d->name);
        }
        if (d->n_args == 0 && !strstr(p.out, "no settings")) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("--method %s --help does not say it has no settings", d->name);
        }
        for (int a = 0; a < d->n_args; a++) {
            char key[160], def[200];
            snprintf(key, sizeof key, "%s.%s=", d->name, d->args[a].name);
            snprintf(def, sizeof def, "[%s]", d->args[a].def);
            size_t len;
            const char *line = line_with(p.out, key, &len);
            if (!line || !kd_test_contains_ci(line, len, def)) {
                kd_test_proc_dump(&p, NULL);
                fail_msg("--method %s --help: no line with %s and its default %s", d->name, key, def);
            }
        }
        with_args += d->n_args > 0;
        kd_test_proc_free(&p);
    }
    assert_true(saw_kd);
    printf("  help of %d methods checked, %d with settings\n", n, with_args);
}

/* An unknown setting of a method is a bad command line, found before any
 * data is read. */
static void test_set_unknown_setting(void **state) {
    (void)state;
    char out[DIRN];
    tmp_path(out, sizeof out, "run_set_unknown");
    kd_test_proc p = RUN("distill", "--method", "kd", "--set", "kd.foo=1", "--teacher-ckpt", "t.safetensors", "--data",
                         no_data(), "--out", out, "--progress", "0");
    EXPECT_FAIL(&p, 2, "kd.foo");
    expect_no_data_read(&p, out);
    kd_test_proc_free(&p);
    /* --set needs METHOD.NAME=VALUE. */
    p = RUN("distill", "--method", "kd", "--set", "foo", "--data", no_data(), "--out", out);
    EXPECT_FAIL(&p, 2, "--set");
    kd_test_proc_free(&p);
}

/* A malformed value of a float setting, for every method that has one. */
static void test_set_wrong_type(void **state) {
    (void)state;
    int n, tried = 0;
    const kd_method_def *const *defs = kd_method_defs(&n);
    char out[DIRN];
    tmp_path(out, sizeof out, "run_set_type");
    for (int i = 0; i < n; i++) {
        const kd_method_def *d = defs[i];
        for (int a = 0; a < d->n_args; a++) {
            if (d->args[a].type != KD_ARG_FLOAT) continue;
            char set[200], key[160];
            snprintf(key, sizeof key, "%s.%s", d->name, d->args[a].name);
            snprintf(set, sizeof set, "%s=abc", key);
            kd_test_proc p = RUN("distill", "--method", d->name, "--set", set, "--teacher-ckpt", "t.safetensors",
                                 "--data", no_data(), "--out", out, "--progress", "0");
            EXPECT_FAIL(&p, 2, key, "abc");
            expect_no_data_read(&p, out);
            kd_test_proc_free(&p);
            tried++;
            break;
        }
    }
    if (!tried) {
        printf("  no registered method has a float setting: skipped\n");
        skip();
    }
}

/* Another method's setting: the message names the setting, its method and
 * the method in use. */
static void test_set_other_method(void **state) {
    (void)state;
    int n, tried = 0;
    const kd_method_def *const *defs = kd_method_defs(&n);
    char out[DIRN];
    tmp_path(out, sizeof out, "run_set_other");
    for (int i = 0; i < n; i++) {
        const kd_method_def *d = defs[i];
        if (!strcmp(d->name, "kd") || d->n_args == 0) continue;
        /* dkd.alpha when dkd has it, else the method's first setting. */
        const kd_method_arg *a = &d->args[0];
        for (int k = 0; k < d->n_args; k++)
            if (!strcmp(d->args[k].name, "alpha")) a = &d->args[k];
        char key[160], set[200], own[80];
        snprintf(key, sizeof key, "%s.%s", d->name, a->name);
        snprintf(set, sizeof set, "%s=%s", key, a->def);
        snprintf(own, sizeof own, "method %s", d->name);
        kd_test_proc p = RUN("distill", "--method", "kd", "--set", set, "--teacher-ckpt", "t.safetensors", "--data",
                             no_data(), "--out", out, "--progress", "0");
        EXPECT_FAIL(&p, 2, key, own);
        const char *first;
        kd_test_count_lines(p.err, 1, &first);
        /* The method in use, kd, as a word of its own (not inside "kd distill:"). */
        const char *msg = strstr(first, ": ");
        if (!msg || !contains_word(msg, strcspn(msg, "\n"), "kd")) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("the message does not name the method in use (kd)");
        }
        expect_no_data_read(&p, out);
        kd_test_proc_free(&p);
        tried++;
    }
    if (!tried) {
        printf("  no method other than kd has settings: skipped\n");
        skip();
    }
}

/* An unknown method is refused, listing every registered method. */
static void test_unknown_method_lists(void **state) {
    (void)state;
    char out[DIRN];
    tmp_path(out, sizeof out, "run_method_foo");
    kd_test_proc p = RUN("distill", "--method", "foo", "--data", no_data(), "--out", out, "--progress", "0");
    EXPECT_FAIL(&p, 2, "'foo'");
    const char *first;
    kd_test_count_lines(p.err, 1, &first);
    size_t len = strcspn(first, "\n");
    int n;
    const kd_method_def *const *defs = kd_method_defs(&n);
    for (int i = 0; i < n; i++)
        if (!contains_word(first, len, defs[i]->name)) {
            kd_test_proc_dump(&p, NULL);
            fail_msg("the message does not list method %s", defs[i]->name);
        }
    expect_no_data_read(&p, out);
    kd_test_proc_free(&p);
}

/* Every method that needs a teacher, run without --teacher-ckpt: exit 2
 * naming teacher_ckpt, before the (missing) data is read. */
static void test_teacher_required(void **state) {
    (void)state;
    int n, tried = 0;
    const kd_method_def *const *defs = kd_method_defs(&n);
    char out[DIRN];
    tmp_path(out, sizeof out, "run_no_teacher");
    for (int i = 0; i < n; i++) {
        kd_distill_cfg dc = kd_distill_defaults(defs[i]->name);
        if (!kd_distill_needs_teacher(&dc)) continue;
        kd_test_proc p = RUN("distill", "--method", defs[i]->name, "--data", no_data(), "--out", out, "--progress",
                             "0");
        EXPECT_FAIL(&p, 2, "teacher_ckpt");
        expect_no_data_read(&p, out);
        kd_test_proc_free(&p);
        tried++;
    }
    assert_true(tried >= 1); /* kd at least */
}

/* An encoder of kd pretrain (simclr, 1 epoch of 2 steps) on the tiny data:
 * the teacher of the label-free distillation methods (SEED), whose teacher
 * brings its projection head. */
static void ssl_teacher(char *buf, size_t n) {
    static int state = 0;
    static char dir[DIRN];
    if (state == 0) {
        state = -1;
        tmp_path(dir, sizeof dir, "run_pretrain_teacher");
        kd_test_proc p = RUN("pretrain", "--method", "simclr", TRAIN_FLAGS(g_data, dir, "1"), "--max-steps-per-epoch",
                             "2");
        kd_test_expect_ok(&p, "kd pretrain (the SEED teacher)");
        kd_test_proc_free(&p);
        state = 1;
    }
    if (state < 0) fail_msg("kd pretrain of the SEED teacher failed (see the first test that needed it)");
    snprintf(buf, n, "%s/encoder.safetensors", dir);
}

/* The settings a method needs on the tiny dataset (NTRAIN images, 4 classes),
 * the idx-th as "key=value", or NULL past the last: CRD's 16384 negatives
 * per sample exceed it; DINO's 65536-wide heads on 10 crops are slow on the
 * reference backend. */
static const char *tiny_data_setting_i(const char *method, int idx, char *key, size_t nkey, const char **value) {
    static const struct {
        const char *method, *key, *value;
    } tiny[] = {{"crd", "crd.nce_k", "16"}, {"sskd", "sskd.head_epochs", "1"}, {"moco", "moco.K", "64"},
                {"seed", "seed.K", "64"}, {"dino", "dino.out_dim", "64"}, {"dino", "dino.hidden", "32"},
                {"dino", "dino.local_crops_number", "2"}, {"esvit", "esvit.out_dim", "64"},
                {"esvit", "esvit.hidden", "32"}, {"esvit", "esvit.local_crops_number", "2"}};
    for (size_t i = 0; i < sizeof tiny / sizeof tiny[0]; i++)
        if (!strcmp(tiny[i].method, method) && idx-- == 0) {
            snprintf(key, nkey, "%s", tiny[i].key);
            *value = tiny[i].value;
            return key;
        }
    return NULL;
}

/* kd pretrain: encoder.safetensors holds the model and its projection head
 * (PyTorch names, metadata "head"), and the self-supervised refusals exit 2
 * with one message before training: a supervised method, a batch without
 * negatives, a SEED teacher without a head or with another kind of head. */
static void test_pretrain(void **state) {
    (void)state;
    need_run_a();
    char enc[PATHN], out[DIRN], best[PATHN];
    ssl_teacher(enc, sizeof enc);
    kd_st_file *f = NULL;
    KD_ASSERT_OK(kd_st_open(enc, &f));
    assert_non_null(kd_st_find(f, "conv1.weight"));
    assert_non_null(kd_st_find(f, "head.0.weight"));
    assert_non_null(kd_st_find(f, "head.7.running_var"));
    assert_null(kd_st_find(f, "head_k.0.weight"));
    assert_string_equal(kd_st_meta(f, "head"), "simclr");
    assert_string_equal(kd_st_meta(f, "ssl_method"), "simclr");
    kd_st_close(f);

    tmp_path(out, sizeof out, "run_pretrain_refused");
    kd_test_proc p = RUN("pretrain", "--method", "kd", TRAIN_FLAGS(g_data, out, "1"));
    EXPECT_FAIL(&p, 2, "method 'kd' is not self-supervised");
    assert_false(file_exists(out));
    kd_test_proc_free(&p);
    p = RUN("pretrain", "--method", "simclr", TRAIN_FLAGS(g_data, out, "1"), "--batch-size", "1");
    EXPECT_FAIL(&p, 2, "needs at least 2 images per batch");
    kd_test_proc_free(&p);
    run_a_file(best, sizeof best, "best.safetensors");
    p = RUN("distill", "--method", "seed", TRAIN_FLAGS(g_data, out, "1"), "--teacher-ckpt", best);
    EXPECT_FAIL(&p, 2, "has no tensor head.");
    kd_test_proc_free(&p);
    char lastf[PATHN];
    snprintf(lastf, sizeof lastf, "%s/last.safetensors", out);
    assert_false(file_exists(lastf));
    p = RUN("distill", "--method", "seed", TRAIN_FLAGS(g_data, out, "1"), "--teacher-ckpt", enc, "--set",
            "seed.teacher_head=mlp");
    EXPECT_FAIL(&p, 2, "set seed.teacher_head=simclr");
    assert_false(file_exists(lastf));
    kd_test_proc_free(&p);
    /* DINO and EsViT: multi-crop views (2 global 28x28 + 2 local 12x12), the
     * EMA teacher, AdamW; the encoder file holds the student head, the
     * metrics the method's terms. */
    static const char *const ssl_dino[] = {"dino", "esvit"};
    for (int i = 0; i < 2; i++) {
        char name[64], s1[64], s2[64], s3[64], enc2[PATHN], metrics[PATHN];
        snprintf(name, sizeof name, "run_pretrain_%s", ssl_dino[i]);
        tmp_path(out, sizeof out, name);
        snprintf(s1, sizeof s1, "%s.out_dim=64", ssl_dino[i]);
        snprintf(s2, sizeof s2, "%s.hidden=32", ssl_dino[i]);
        snprintf(s3, sizeof s3, "%s.local_crops_number=2", ssl_dino[i]);
        p = RUN("pretrain", "--method", ssl_dino[i], TRAIN_FLAGS(g_data, out, "2"), "--max-steps-per-epoch", "2",
                "--optimizer", "adamw", "--lr", "0.0005", "--set", s1, "--set", s2, "--set", s3);
        kd_test_expect_ok(&p, ssl_dino[i]);
        kd_test_proc_free(&p);
        snprintf(enc2, sizeof enc2, "%s/encoder.safetensors", out);
        KD_ASSERT_OK(kd_st_open(enc2, &f));
        assert_non_null(kd_st_find(f, "conv1.weight"));
        assert_non_null(kd_st_find(f, "head.mlp.0.weight"));
        assert_non_null(kd_st_find(f, "head.last_layer.weight_v"));
        assert_string_equal(kd_st_meta(f, "ssl_method"), ssl_dino[i]);
        kd_st_close(f);
        snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", out);
        char *mt = kd_test_slurp(metrics, NULL);
        if (!mt || !strstr(mt, i ? "\"train_esvit_region\"" : "\"train_dino\""))
            fail_msg("%s has no %s term", metrics, ssl_dino[i]);
        free(mt);
    }
    /* A local-crop count the loader cannot make is refused before training. */
    tmp_path(out, sizeof out, "run_pretrain_dino_refused");
    p = RUN("pretrain", "--method", "dino", TRAIN_FLAGS(g_data, out, "1"), "--set", "dino.local_crops_number=40");
    EXPECT_FAIL(&p, 2, "dino.local_crops_number 40");
    assert_false(file_exists(out));
    kd_test_proc_free(&p);
}

/* kd select (SSLD's data selection) and train_indices: the file holds the
 * labeled images (the subset kd train would draw with the seed) and at most
 * K per class more, sorted and unique; an ssld run on it trains on exactly
 * those images; bad input exits 2. */
static void test_select(void **state) {
    (void)state;
    need_run_a();
    char teacher[PATHN], file[DIRN], out[DIRN];
    run_a_file(teacher, sizeof teacher, "best.safetensors");
    tmp_path(file, sizeof file, "select.txt");
    kd_test_proc p = RUN("select", "--teacher-ckpt", teacher, "--data", g_data, "--labels", "2", "--seed", "3",
                         "--per-class", "3", "--out", file, "--threads", "2");
    kd_test_expect_ok(&p, "kd select");
    kd_test_proc_free(&p);
    kd_dataset *ds = NULL;
    KD_ASSERT_OK(kd_dataset_open(g_data, 1, &ds));
    int64_t *lab = NULL, nl = 0, *all = NULL, na = 0;
    KD_ASSERT_OK(kd_dataset_label_subset(ds, "2", 3, &lab, &nl));
    KD_ASSERT_OK(kd_dataset_indices_read(file, ds, &all, &na)); /* sorted and unique, or it fails */
    assert_int_equal(nl, 8);
    if (na <= nl || na > nl + 4 * 3) fail_msg("kd select wrote %lld indices for 8 labeled + at most 12", (long long)na);
    for (int64_t i = 0; i < nl; i++) {
        int found = 0;
        for (int64_t j = 0; j < na; j++) found |= all[j] == lab[i];
        if (!found) fail_msg("labeled image %lld is not in the selection file", (long long)lab[i]);
    }
    tmp_path(out, sizeof out, "run_ssld_selected");
    p = RUN("distill", "--method", "ssld", TRAIN_FLAGS(g_data, out, "1"), "--teacher-ckpt", teacher, "--labels", "2",
            "--seed", "3", "--train-indices", file);
    kd_test_expect_ok(&p, "kd distill --method ssld --train-indices");
    kd_test_proc_free(&p);
    char sum[PATHN];
    snprintf(sum, sizeof sum, "%s/summary.json", out);
    size_t tn = 0;
    char *text = kd_test_slurp(sum, &tn);
    assert_non_null(text);
    kd_json *doc = NULL;
    if (kd_json_parse(text, tn, sum, &doc) != KD_OK) fail_msg("%s", kd_last_error());
    free(text);
    assert_int_equal((int64_t)json_num(doc, "train_images", sum)->number, na);
    kd_json_free(doc);
    p = RUN("select", "--teacher-ckpt", teacher, "--data", g_data, "--per-class", "0", "--out", file);
    EXPECT_FAIL(&p, 2, "--per-class");
    kd_test_proc_free(&p);
    p = RUN("select", "--teacher-ckpt", no_data(), "--data", g_data, "--per-class", "2", "--out", file);
    EXPECT_FAIL(&p, 2, "teacher");
    kd_test_proc_free(&p);
    tmp_path(out, sizeof out, "run_select_refused");
    p = RUN("train", TRAIN_FLAGS(g_data, out, "1"), "--labels", "2", "--train-indices", file);
    EXPECT_FAIL(&p, 2, "train_indices");
    kd_test_proc_free(&p);
    free(lab);
    free(all);
    kd_dataset_free(ds);
}

/* CRD refuses what its sampler cannot do with exit 2 and one message naming
 * the setting, before training: more negatives than a class has (the tiny
 * data has about 96 per class), and training images without labels (a list
 * file of unlabeled JPEGs). */
static void test_crd_refusals(void **state) {
    (void)state;
    if (!kd_method_find("crd")) skip();
    char teacher[PATHN], out[DIRN], list[DIRN], img[DIRN + 32];
    run_a_file(teacher, sizeof teacher, "best.safetensors");
    tmp_path(out, sizeof out, "run_crd_refused");
    kd_test_proc p = RUN("distill", "--method", "crd", TRAIN_FLAGS(g_data, out, "1"), "--teacher-ckpt", teacher);
    EXPECT_FAIL(&p, 2, "crd.nce_k 16384");
    kd_test_proc_free(&p);
    tmp_path(list, sizeof list, "unlabeled_list");
    mkdir(list, 0755);
    char text[1024] = "";
    for (int i = 0; i < 8; i++) {
        snprintf(img, sizeof img, "%s/u%d.jpg", list, i);
        kd_test_write_jpeg(img, IMG, IMG, (uint64_t)i);
        snprintf(text + strlen(text), sizeof text - strlen(text), "u%d.jpg\n", i);
    }
    char spec[DIRN + 64];
    snprintf(img, sizeof img, "%s/images.txt", list);
    kd_test_write_file(img, text, strlen(text));
    snprintf(spec, sizeof spec, "list:%s", img);
    p = RUN("distill", "--method", "crd", TRAIN_FLAGS(spec, out, "1"), "--teacher-ckpt", teacher);
    EXPECT_FAIL(&p, 2, "needs labels");
    kd_test_proc_free(&p);
}

/* SSKD refuses, with exit 2 and one message naming the settings, before
 * training: a teacher without a trained head when sskd.head_epochs is 0 (no
 * artifact in the run directory, no sskd.teacher_head), and a head file
 * whose shapes do not fit the teacher's feat[-1]. */
static void test_sskd_refusals(void **state) {
    (void)state;
    if (!kd_method_find("sskd")) skip();
    char teacher[PATHN], out[DIRN], head[DIRN + 64], set[DIRN + 96];
    run_a_file(teacher, sizeof teacher, "best.safetensors");
    tmp_path(out, sizeof out, "run_sskd_refused");
    kd_test_proc p = RUN("distill", "--method", "sskd", TRAIN_FLAGS(g_data, out, "1"), "--teacher-ckpt", teacher,
                         "--set", "sskd.head_epochs=0");
    EXPECT_FAIL(&p, 2, "sskd.head_epochs is 0", "sskd.teacher_head");
    kd_test_proc_free(&p);
    /* A head of dimension 3, which no teacher of the tiny runs has. */
    tmp_path(head, sizeof head, "sskd_bad_head.safetensors");
    static float w[9], b[3];
    int64_t ws[2] = {3, 3}, bs[1] = {3};
    kd_st_writer *wr = NULL;
    KD_ASSERT_OK(kd_st_writer_init(&wr));
    KD_ASSERT_OK(kd_st_writer_add(wr, "ss_t.proj_head.0.weight", KD_F32, 2, ws, w));
    KD_ASSERT_OK(kd_st_writer_add(wr, "ss_t.proj_head.0.bias", KD_F32, 1, bs, b));
    KD_ASSERT_OK(kd_st_writer_add(wr, "ss_t.proj_head.2.weight", KD_F32, 2, ws, w));
    KD_ASSERT_OK(kd_st_writer_add(wr, "ss_t.proj_head.2.bias", KD_F32, 1, bs, b));
    KD_ASSERT_OK(kd_st_writer_save(wr, head));
    kd_st_writer_free(wr);
    snprintf(set, sizeof set, "sskd.teacher_head=%s", head);
    tmp_path(out, sizeof out, "run_sskd_refused2");
    p = RUN("distill", "--method", "sskd", TRAIN_FLAGS(g_data, out, "1"), "--teacher-ckpt", teacher, "--set", set);
    EXPECT_FAIL(&p, 2, "sskd.teacher_head", "does not fit the teacher", "(3, 3)");
    kd_test_proc_free(&p);
}

/* One short distillation run of method d (2 steps, 1 epoch) into out, with
 * --set key=value when key is given (and the setting the tiny data needs). */
/* A short run of method d (2 steps of 1 epoch) into out, with --set key=value
 * when key is given and the NULL-terminated flags `extra` (may be NULL) last,
 * where they override the defaults. */
static void run_method_ex(const kd_method_def *d, const char *key, const char *value, const char *out,
                          const char *const *extra) {
    char teacher[PATHN], set[300];
    if (d->labels == KD_LABELS_ABSENT && d->teacher != KD_TEACHER_NONE)
        ssl_teacher(teacher, sizeof teacher);
    else
        run_a_file(teacher, sizeof teacher, "best.safetensors");
    const char *args[64];
    int n = 0;
    const char *base[] = {"distill", "--method", d->name, TRAIN_FLAGS(g_data, out, "1"), "--max-steps-per-epoch", "2",
                          "--log-every", "1"};
    for (size_t i = 0; i < sizeof base / sizeof base[0]; i++) args[n++] = base[i];
    if (d->teacher != KD_TEACHER_NONE) {
        args[n++] = "--teacher-ckpt";
        args[n++] = teacher;
    }
    if (key) {
        snprintf(set, sizeof set, "%s=%s", key, value);
        args[n++] = "--set";
        args[n++] = set;
    }
    char tkey[160], tset[4][300];
    const char *tval;
    for (int k = 0; k < 4 && tiny_data_setting_i(d->name, k, tkey, sizeof tkey, &tval); k++) {
        snprintf(tset[k], sizeof tset[k], "%s=%s", tkey, tval);
        args[n++] = "--set";
        args[n++] = tset[k];
    }
    for (int k = 0; extra && extra[k] && n < 63; k++) args[n++] = extra[k];
    args[n] = NULL;
    kd_test_proc p = kd_test_run_kd(g_root, args);
    char what[128];
    snprintf(what, sizeof what, "kd distill --method %s", d->name);
    kd_test_expect_ok(&p, what);
    kd_test_proc_free(&p);
}

static void run_method(const kd_method_def *d, const char *key, const char *value, const char *out) {
    run_method_ex(d, key, value, out, NULL);
}

/* config.yaml without the comment line (it names the file) and the out line. */
static char *config_body(const char *path) {
    char *t = kd_test_slurp(path, NULL);
    if (!t) fail_msg("no %s", path);
    char *o = strstr(t, "\nout:");
    if (!o) fail_msg("%s has no out:", path);
    char *e = strchr(o + 1, '\n');
    memmove(o, e, strlen(e) + 1);
    char *body = strdup(strchr(t, '\n'));
    free(t);
    return body;
}

static void expect_same_config(const char *dir_a, const char *dir_b) {
    char pa[PATHN], pb[PATHN];
    snprintf(pa, sizeof pa, "%s/config.yaml", dir_a);
    snprintf(pb, sizeof pb, "%s/config.yaml", dir_b);
    char *a = config_body(pa), *b = config_body(pb);
    if (strcmp(a, b)) fail_msg("%s and %s differ in more than out:\n%s\n----\n%s", pa, pb, a, b);
    free(a);
    free(b);
}

/* The value config.yaml records for key ("key: \"value\"" on a line of its own). */
static void expect_config_value(const char *dir, const char *key, const char *value) {
    char path[PATHN], line[512];
    snprintf(path, sizeof path, "%s/config.yaml", dir);
    char *t = kd_test_slurp(path, NULL);
    if (!t) fail_msg("no %s", path);
    snprintf(line, sizeof line, "\n%s: \"%s\"\n", key, value);
    if (!strstr(t, line)) {
        size_t len;
        char k[200];
        snprintf(k, sizeof k, "\n%s:", key);
        const char *l = strstr(t, k) ? line_with(t, k + 1, &len) : NULL;
        fail_msg("%s records %s as %.*s, expected \"%s\"", path, key, l ? (int)len : 6, l ? l : "(none)", value);
    }
    free(t);
}

/* For every method with settings: a short run records every setting of the
 * method, resolved (the one overridden by --set with its new value, the
 * others with their defaults) in config.yaml, logs the method's named terms,
 * and `--config` of that config.yaml repeats the run to the byte. */
static void test_method_settings_recorded(void **state) {
    (void)state;
    need_run_a();
    int n, tried = 0;
    const kd_method_def *const *defs = kd_method_defs(&n);
    for (int i = 0; i < n; i++) {
        const kd_method_def *d = defs[i];
        if (d->n_args == 0) continue;
        const kd_method_arg *fa = first_float_arg(d);
        char key[160] = "", value[64] = "", out1[DIRN], out2[DIRN], name[96];
        if (fa) {
            snprintf(key, sizeof key, "%s.%s", d->name, fa->name);
            snprintf(value, sizeof value, "%g", 2.0 * strtod(fa->def, NULL));
        }
        snprintf(name, sizeof name, "run_m_%s", d->name);
        tmp_path(out1, sizeof out1, name);
        snprintf(name, sizeof name, "run_m_%s_repeat", d->name);
        tmp_path(out2, sizeof out2, name);
        run_method(d, fa ? key : NULL, value, out1);
        for (int a = 0; a < d->n_args; a++) {
            char k[160], tkey[160];
            const char *tval = NULL, *want = d->args[a].def;
            snprintf(k, sizeof k, "%s.%s", d->name, d->args[a].name);
            for (int t = 0; tiny_data_setting_i(d->name, t, tkey, sizeof tkey, &tval); t++)
                if (!strcmp(k, tkey)) want = tval;
            expect_config_value(out1, k, fa && &d->args[a] == fa ? value : want);
        }
        const char *terms[8];
        int nt = method_terms(d, terms);
        check_run_terms(out1, terms, nt);
        char cfg[PATHN], la[PATHN], lb[PATHN];
        snprintf(cfg, sizeof cfg, "%s/config.yaml", out1);
        kd_test_proc p = RUN("distill", "--config", cfg, "--out", out2);
        kd_test_expect_ok(&p, "kd distill --config <run>/config.yaml");
        kd_test_proc_free(&p);
        snprintf(la, sizeof la, "%s/last.safetensors", out1);
        snprintf(lb, sizeof lb, "%s/last.safetensors", out2);
        compare_ckpts(la, lb, KD_TEST_CKPT_WITH_OPTIM);
        expect_same_config(out1, out2);
        tried++;
    }
    printf("  %d methods with settings: recorded and repeated\n", tried);
    if (!tried) skip();
}

/* Every registered method, 2 steps with --precision bf16 on the cpu backend:
 * bf16 activations reach each method's features, heads and losses, which
 * must take them (widened where an op has no bf16 kernel); the run finishes
 * with finite loss (a NaN loss fails the run) and logs the method's named
 * terms, and config.yaml records the precision. Skipped where the CPU has no
 * native bf16. */
static void test_every_method_bf16(void **state) {
    (void)state;
    kd_backend *be = NULL;
    if (kd_backend_get("cpu", &be) != KD_OK || !be->bf16) {
        printf("  no native bf16 on this CPU: skipped\n");
        skip();
    }
    need_run_a();
    static const char *const extra[] = {"--backend", "cpu", "--precision", "bf16", NULL};
    int n;
    const kd_method_def *const *defs = kd_method_defs(&n);
    for (int i = 0; i < n; i++) {
        const kd_method_def *d = defs[i];
        char out[DIRN], name[96];
        snprintf(name, sizeof name, "run_bf16_%s", d->name);
        tmp_path(out, sizeof out, name);
        run_method_ex(d, NULL, NULL, out, extra);
        const char *terms[8];
        int nt = method_terms(d, terms);
        check_run_terms(out, terms, nt);
        expect_config_value(out, "precision", "bf16");
    }
    printf("  %d methods ran in bf16\n", n);
}

/* A handwritten YAML config with top-level "<method>.<setting>: value" keys
 * gives the same run as --set; an unknown dotted key is refused naming it. */
static void test_yaml_method_keys(void **state) {
    (void)state;
    need_run_a();
    int n;
    const kd_method_def *const *defs = kd_method_defs(&n);
    const kd_method_def *d = NULL;
    const kd_method_arg *fa = NULL;
    for (int i = 0; i < n && !d; i++)
        if (defs[i]->teacher != KD_TEACHER_NONE && (fa = first_float_arg(defs[i]))) d = defs[i];
    if (!d) {
        printf("  no method with a float setting: skipped\n");
        skip();
        return;
    }
    char key[160], value[64], flags_run[DIRN], yaml_run[DIRN], yaml[DIRN], teacher[PATHN];
    snprintf(key, sizeof key, "%s.%s", d->name, fa->name);
    snprintf(value, sizeof value, "%g", 3.0 * strtod(fa->def, NULL));
    tmp_path(flags_run, sizeof flags_run, "run_yaml_flags");
    tmp_path(yaml_run, sizeof yaml_run, "run_yaml_file");
    tmp_path(yaml, sizeof yaml, "method.yaml");
    run_a_file(teacher, sizeof teacher, "best.safetensors");
    run_method(d, key, value, flags_run);
    /* The same settings as run_method's flags, as YAML. */
    char text[4096];
    snprintf(text, sizeof text,
             "# handwritten\ndata: %s\nmodel: resnet8\nmethod: %s\nteacher_ckpt: %s\nepochs: 1\nbatch_size: 16\n"
             "backend: ref\nthreads: 2\nworkers: 1\nprogress: 0\nlr: 0.1\nschedule: cosine\nhflip: 1\npad_crop: 1\n"
             "log_every: 1\nmax_steps_per_epoch: 2\n%s: %s\n",
             g_data, d->name, teacher, key, value);
    kd_test_write_file(yaml, text, strlen(text));
    kd_test_proc p = RUN("distill", "--config", yaml, "--out", yaml_run);
    kd_test_expect_ok(&p, "kd distill --config method.yaml");
    kd_test_proc_free(&p);
    expect_config_value(yaml_run, key, value);
    char la[PATHN], lb[PATHN];
    snprintf(la, sizeof la, "%s/last.safetensors", flags_run);
    snprintf(lb, sizeof lb, "%s/last.safetensors", yaml_run);
    compare_ckpts(la, lb, KD_TEST_CKPT_WITH_OPTIM);
    expect_same_config(flags_run, yaml_run);
    /* An unknown dotted key. */
    char bad[DIRN], out[DIRN], badkey[160];
    tmp_path(bad, sizeof bad, "method-badkey.yaml");
    tmp_path(out, sizeof out, "run_yaml_badkey");
    snprintf(badkey, sizeof badkey, "%s.no_such_setting", d->name);
    snprintf(text, sizeof text, "method: %s\n%s: 1\ndata: %s\n", d->name, badkey, no_data());
    kd_test_write_file(bad, text, strlen(text));
    p = RUN("distill", "--config", bad, "--teacher-ckpt", "t.safetensors", "--out", out);
    EXPECT_FAIL(&p, 2, badkey);
    expect_no_data_read(&p, out);
    kd_test_proc_free(&p);
}

/* `kd train --epochs 3` with the default milestones 150,180,210 warns on
 * stderr that they never take effect; milestones within the run do not. */
static void test_milestone_warning(void **state) {
    (void)state;
    char out[DIRN];
    tmp_path(out, sizeof out, "run_milestones");
    kd_test_proc p = RUN("train", TRAIN_FLAGS(g_data, out, "3"), "--schedule", "multistep", "--max-steps-per-epoch",
                         "1");
    kd_test_expect_ok(&p, "kd train --epochs 3");
    size_t len;
    const char *l = line_with(p.err, "150,180,210", &len);
    if (!l || !kd_test_contains_ci(l, len, "warn") || !kd_test_contains_ci(l, len, "epochs 3")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("no warning on stderr about milestones 150,180,210 beyond epochs 3");
    }
    kd_test_proc_free(&p);
    tmp_path(out, sizeof out, "run_milestones_ok");
    p = RUN("train", TRAIN_FLAGS(g_data, out, "3"), "--schedule", "multistep", "--milestones", "1,2",
            "--max-steps-per-epoch", "1");
    kd_test_expect_ok(&p, "kd train --epochs 3 --milestones 1,2");
    if (strstr(p.err, "milestones")) {
        kd_test_proc_dump(&p, NULL);
        fail_msg("a warning about milestones that all take effect");
    }
    kd_test_proc_free(&p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_help_top),
        cmocka_unit_test(test_help_train),
        cmocka_unit_test(test_help_distill),
        cmocka_unit_test(test_help_eval),
        cmocka_unit_test(test_help_info),
        cmocka_unit_test(test_unknown_command),
        cmocka_unit_test(test_run_directory),
        cmocka_unit_test(test_eval_of_run),
        cmocka_unit_test(test_config_reproduces),
        cmocka_unit_test(test_workers_and_seed),
        cmocka_unit_test(test_eval_every),
        cmocka_unit_test(test_export),
        cmocka_unit_test(test_resume_after_pause),
        cmocka_unit_test(test_resume_after_kill),
        cmocka_unit_test(test_distill),
        cmocka_unit_test(test_distill_missing_teacher),
        cmocka_unit_test(test_distill_unknown_teacher_arch),
        cmocka_unit_test(test_bad_missing_dataset),
        cmocka_unit_test(test_bad_truncated_images),
        cmocka_unit_test(test_bad_truncated_labels),
        cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_bad_count_mismatch),
        cmocka_unit_test(test_bad_arch_mismatch),
        cmocka_unit_test(test_bad_misshaped_tensor),
        cmocka_unit_test(test_bad_missing_tensor),
        cmocka_unit_test(test_bad_class_count),
        cmocka_unit_test(test_bad_unknown_model),
        cmocka_unit_test(test_bad_unknown_method),
        cmocka_unit_test(test_bad_unknown_backend),
        cmocka_unit_test(test_bad_unknown_flag),
        cmocka_unit_test(test_bad_precision),
        cmocka_unit_test(test_precision_bf16),
        cmocka_unit_test(test_bad_lr_suffix),
        cmocka_unit_test(test_bad_epochs_word),
        cmocka_unit_test(test_bad_batch_negative),
        cmocka_unit_test(test_bad_batch_zero),
        cmocka_unit_test(test_bad_lr_nan),
        cmocka_unit_test(test_bad_lr_negative),
        cmocka_unit_test(test_bad_epochs_huge),
        cmocka_unit_test(test_bad_milestones),
        cmocka_unit_test(test_bad_schedule),
        cmocka_unit_test(test_bad_seed),
        cmocka_unit_test(test_bad_eval_batch),
        cmocka_unit_test(test_bad_config_file),
        cmocka_unit_test(test_nan_loss),
        cmocka_unit_test(test_existing_run_refused),
        cmocka_unit_test(test_resume_missing),
        cmocka_unit_test(test_resume_corrupt_checkpoint),
        cmocka_unit_test(test_corrupt_checkpoint),
        cmocka_unit_test(test_info_dataset),
        cmocka_unit_test(test_info_checkpoint),
        cmocka_unit_test(test_info_nonexistent),
        cmocka_unit_test(test_method_list),
        cmocka_unit_test(test_method_help),
        cmocka_unit_test(test_set_unknown_setting),
        cmocka_unit_test(test_set_wrong_type),
        cmocka_unit_test(test_set_other_method),
        cmocka_unit_test(test_unknown_method_lists),
        cmocka_unit_test(test_teacher_required),
        cmocka_unit_test(test_crd_refusals),
        cmocka_unit_test(test_sskd_refusals),
        cmocka_unit_test(test_method_settings_recorded),
        cmocka_unit_test(test_every_method_bf16),
        cmocka_unit_test(test_pretrain),
        cmocka_unit_test(test_select),
        cmocka_unit_test(test_yaml_method_keys),
        cmocka_unit_test(test_milestone_warning),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
