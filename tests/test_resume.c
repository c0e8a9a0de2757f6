/* Bit-identical `--resume` of distillation runs: `kd distill` paused with
 * `--stop-after 1` and continued with `--resume DIR` ends with the same
 * last.safetensors (every tensor, optimiser state included, byte for byte;
 * metadata such as wall time may differ) and best.safetensors as the same
 * run left uninterrupted. Methods: kd (no module), fitnet (a trainable
 * regressor with batch-norm running statistics) and pad (a variance branch,
 * Linear + BatchNorm1d with running statistics), on the ref backend, and
 * fitnet on the cpu backend (blocked layouts, oneDNN kernels).
 *
 * The checkpoint of a method with modules must hold them as "distill.<name>"
 * with the PyTorch reference's state_dict names (tools/distill_refs/), their
 * momentum buffers as "optim.distill.<name>.momentum_buffer", batch-norm
 * counters that saw every step, and every tensor of the student, with no cap
 * on the count (a resnet8 checkpoint with its optimiser state holds > 64).
 *
 * Every run is the real binary (KD_BINARY_DIR "/kd") on a tiny generated IDX
 * dataset (8x8 grey images, 4 classes); the teacher (resnet14) comes from a
 * tiny `kd train` first. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd/distill.h"
#include "kd/io.h"
#include "kd/models.h"
#include "testutil.h"

#define KD_EXE KD_BINARY_DIR "/kd"
#define EPOCHS 3
#define STEPS 3 /* --max-steps-per-epoch */

static char g_root[600];
static char g_data[700];
static char g_teacher[800]; /* the teacher's best.safetensors */
static int g_teacher_state; /* 0: not tried, 1: ok, -1: failed */

static int group_setup(void **state) {
    (void)state;
    snprintf(g_root, sizeof g_root, "%s", kd_test_tmpdir("test_resume"));
    snprintf(g_data, sizeof g_data, "%s/data", g_root);
    kd_test_write_idx(g_data, 128, 32, 8);
    if (access(KD_EXE, X_OK) != 0) {
        fprintf(stderr, "%s is not built\n", KD_EXE);
        return -1;
    }
    return 0;
}

#define RUN(...) kd_test_run_kd(g_root, (const char *const[]){__VA_ARGS__, NULL})

/* The teacher: resnet14 after a few steps of `kd train`, made once. */
static void need_teacher(void) {
    if (g_teacher_state == 0) {
        g_teacher_state = -1;
        char out[700];
        snprintf(out, sizeof out, "%s/teacher", g_root);
        kd_test_proc p = RUN("train", "--data", g_data, "--model", "resnet14", "--epochs", "1", "--batch-size", "16",
                             "--max-steps-per-epoch", "4", "--backend", "ref", "--threads", "2", "--workers", "1",
                             "--progress", "0", "--lr", "0.05", "--out", out);
        kd_test_expect_ok(&p, "kd train (teacher)");
        kd_test_proc_free(&p);
        snprintf(g_teacher, sizeof g_teacher, "%s/best.safetensors", out);
        g_teacher_state = 1;
    }
    if (g_teacher_state < 0) fail_msg("training the teacher failed (see the first test that needed it)");
}

/* The distillation flags: 3 epochs of 3 steps, cosine schedule (the learning
 * rate differs per epoch), augmentation on (the loader's per-epoch streams). */
#define DISTILL_FLAGS(method, backend, out)                                                                          \
    "distill", "--data", g_data, "--model", "resnet8", "--teacher-ckpt", g_teacher, "--method", (method),            \
        "--epochs", "3", "--max-steps-per-epoch", "3", "--batch-size", "16", "--backend", (backend), "--threads",   \
        "2", "--workers", "1", "--progress", "0", "--lr", "0.05", "--schedule", "cosine", "--hflip", "1",          \
        "--pad-crop", "1", "--log-every", "2", "--out", (out)

/* Runs `method` uninterrupted into <root>/<tag>_full and paused + resumed
 * into <root>/<tag>_resumed; checks that the two runs end identical. The
 * final checkpoint's path is left in last (the resumed run's). */
static void run_pair_set(const char *method, const char *set, const char *set2, const char *backend, const char *tag,
                         char *last, size_t nlast) {
    need_teacher();
    char full[700], part[700], a[800], b[800], msg[2048];
    snprintf(full, sizeof full, "%s/%s_full", g_root, tag);
    snprintf(part, sizeof part, "%s/%s_resumed", g_root, tag);
    /* Method settings (--set), or --log-every repeated where there is none. */
    const char *sf = set ? "--set" : "--log-every", *sv = set ? set : "2";
    const char *sf2 = set2 ? "--set" : "--log-every", *sv2 = set2 ? set2 : "2";
    kd_test_proc p = RUN(DISTILL_FLAGS(method, backend, full), sf, sv, sf2, sv2);
    kd_test_expect_ok(&p, "kd distill (uninterrupted)");
    kd_test_proc_free(&p);
    p = RUN(DISTILL_FLAGS(method, backend, part), sf, sv, sf2, sv2, "--stop-after", "1");
    kd_test_expect_ok(&p, "kd distill --stop-after 1");
    kd_test_proc_free(&p);

    /* The pause is real: one epoch done, and its weights are not the end's. */
    snprintf(a, sizeof a, "%s/last.safetensors", full);
    snprintf(b, sizeof b, "%s/last.safetensors", part);
    kd_st_file *f = kd_test_st_open(b);
    const char *ed = kd_st_meta(f, "epochs_done");
    if (!ed || strcmp(ed, "1") != 0) fail_msg("after --stop-after 1, epochs_done is %s", ed ? ed : "(none)");
    kd_st_close(f);
    if (!kd_test_ckpts_differ(a, b, KD_TEST_CKPT_WITH_OPTIM, msg, sizeof msg))
        fail_msg("%s: the paused run already equals the finished one", method);

    p = RUN("distill", "--resume", part);
    kd_test_expect_ok(&p, "kd distill --resume");
    kd_test_proc_free(&p);
    if (kd_test_ckpts_differ(a, b, KD_TEST_CKPT_WITH_OPTIM, msg, sizeof msg))
        fail_msg("%s, resumed vs uninterrupted: %s", method, msg);
    f = kd_test_st_open(b);
    ed = kd_st_meta(f, "epochs_done");
    if (!ed || atoi(ed) != EPOCHS) fail_msg("after --resume, epochs_done is %s", ed ? ed : "(none)");
    kd_st_close(f);
    snprintf(a, sizeof a, "%s/best.safetensors", full);
    snprintf(b, sizeof b, "%s/best.safetensors", part);
    if (kd_test_ckpts_differ(a, b, KD_TEST_CKPT_MODEL, msg, sizeof msg))
        fail_msg("%s, best.safetensors: %s", method, msg);
    snprintf(last, nlast, "%s/last.safetensors", part);
    printf("  %s (%s): paused after epoch 1, resumed: last.safetensors identical to the uninterrupted run\n", method,
           backend);
}

static void run_pair(const char *method, const char *backend, const char *tag, char *last, size_t nlast) {
    run_pair_set(method, NULL, NULL, backend, tag, last, nlast);
}

static int all_zero(const kd_st_entry *e) {
    const unsigned char *p = e->data;
    for (size_t i = 0; i < e->nbytes; i++)
        if (p[i]) return 0;
    return 1;
}

/* Checks the layout of a distillation checkpoint: every student tensor and
 * its momentum buffer; the method's tensors exactly `modules` (PyTorch names,
 * without "distill."), of which the first n_trainable have momentum buffers
 * (non-zero: they were trained) and every "num_batches_tracked" counts every
 * step; and nothing else. */
static void check_layout(const char *path, const char *const *modules, int n_modules, int n_trainable) {
    kd_st_file *f = kd_test_st_open(path);
    kd_model_cfg mc = {.in_channels = 1, .num_classes = 4, .seed = 0};
    kd_model *m = NULL;
    KD_ASSERT_OK(kd_model_create("resnet8", &mc, &m));
    kd_param_list *pl = kd_model_params(m);
    int student_trainable = 0;
    char name[400];
    for (int i = 0; i < pl->n; i++) {
        if (!kd_st_find(f, pl->items[i].name)) fail_msg("%s lacks the student's %s", path, pl->items[i].name);
        if (pl->items[i].kind == KD_PARAM_BUFFER) continue;
        student_trainable++;
        snprintf(name, sizeof name, "optim.%s.momentum_buffer", pl->items[i].name);
        if (!kd_st_find(f, name)) fail_msg("%s lacks %s", path, name);
    }
    for (int i = 0; i < n_modules; i++) {
        const kd_st_entry *e = kd_test_st_entry(f, "distill.%s", modules[i]);
        if (strstr(modules[i], "num_batches_tracked")) {
            if (e->dtype != KD_I64 || e->nbytes != 8) fail_msg("%s: %s is not an int64 scalar", path, e->name);
            int64_t v;
            memcpy(&v, e->data, 8);
            if (v != EPOCHS * STEPS) fail_msg("%s: %s is %lld, not %d", path, e->name, (long long)v, EPOCHS * STEPS);
        }
        snprintf(name, sizeof name, "optim.distill.%s.momentum_buffer", modules[i]);
        const kd_st_entry *mb = kd_st_find(f, name);
        if (i < n_trainable && !mb) fail_msg("%s lacks %s", path, name);
        if (i >= n_trainable && mb) fail_msg("%s holds %s for a buffer", path, name);
        if (mb && all_zero(mb)) fail_msg("%s: %s is all zero: the module was not trained", path, name);
    }
    assert_int_equal(kd_test_st_count_prefixed(f, "distill."), n_modules);
    assert_int_equal(kd_test_st_count_prefixed(f, "optim.distill."), n_trainable);
    assert_int_equal(kd_test_st_count_prefixed(f, "optim."), student_trainable + n_trainable);
    int total = kd_st_count(f);
    assert_int_equal(total, pl->n + student_trainable + n_modules + n_trainable);
    /* No cap on the number of tensors a checkpoint holds. */
    assert_true(total > 64);
    printf("  %s: %d tensors (%d student, %d optim., %d distill.)\n", path, total, pl->n,
           student_trainable + n_trainable, n_modules);
    kd_model_free(m);
    kd_st_close(f);
}

static int registered(const char *method) {
    if (kd_method_find(method)) return 1;
    printf("  method %s is not registered: skipped\n", method);
    return 0;
}

static void test_resume_kd(void **state) {
    (void)state;
    char last[800];
    run_pair("kd", "ref", "kd", last, sizeof last);
    check_layout(last, NULL, 0, 0);
}

/* RepDistiller's ConvReg as tools/distill_refs/fitnet.py names it; the
 * trainable tensors first. */
static const char *const fitnet_modules[] = {
    "regressor.conv.weight",       "regressor.conv.bias",        "regressor.bn.weight",
    "regressor.bn.bias",           "regressor.bn.running_mean",  "regressor.bn.running_var",
    "regressor.bn.num_batches_tracked"};

static void test_resume_fitnet(void **state) {
    (void)state;
    if (!registered("fitnet")) skip();
    char last[800];
    run_pair("fitnet", "ref", "fitnet", last, sizeof last);
    check_layout(last, fitnet_modules, 7, 4);
}

static void test_resume_fitnet_cpu(void **state) {
    (void)state;
    if (!registered("fitnet")) skip();
    char last[800];
    run_pair("fitnet", "cpu", "fitnet_cpu", last, sizeof last);
    check_layout(last, fitnet_modules, 7, 4);
}

/* torchdistill's VarianceBranch4PAD as tools/distill_refs/pad.py names it. */
static void test_resume_pad(void **state) {
    (void)state;
    if (!registered("pad")) skip();
    static const char *const pad_modules[] = {
        "var_estimator.0.weight",       "var_estimator.0.bias",        "var_estimator.1.weight",
        "var_estimator.1.bias",         "var_estimator.1.running_mean", "var_estimator.1.running_var",
        "var_estimator.1.num_batches_tracked"};
    char last[800];
    run_pair("pad", "ref", "pad", last, sizeof last);
    check_layout(last, pad_modules, 7, 4);
}

/* CRD: its memory banks and normalisers (contrast.*) change every step and
 * its sampler draws from the step count, so a resumed run that lost either
 * ends elsewhere. The 128 images give about 96 negatives per class. */
static void test_resume_crd(void **state) {
    (void)state;
    if (!registered("crd")) skip();
    static const char *const crd_modules[] = {"embed_s.linear.weight", "embed_s.linear.bias", "embed_t.linear.weight",
                                              "embed_t.linear.bias",   "contrast.params",     "contrast.memory_v1",
                                              "contrast.memory_v2"};
    char last[800];
    run_pair_set("crd", "crd.nce_k=64", NULL, "ref", "crd", last, sizeof last);
    check_layout(last, crd_modules, 7, 4);
    run_pair_set("crd", "crd.nce_k=64", "crd.mode=relax", "cpu", "crd_relax", last, sizeof last);
}

/* Self-supervised pretraining resumes bit-identically with its state: MoCo's
 * queue and pointer, its EMA key encoder ("ema.*") and EMA head ("head_k"),
 * the augmentation streams of both views; and the encoder it exports. */
static void test_resume_ssl(void **state) {
    (void)state;
    if (!registered("moco") || !registered("simclr")) skip();
    char last[800], a[800], b[800], msg[2048];
    run_pair_set("moco", "moco.K=64", "moco.bn_splits=4", "cpu", "moco", last, sizeof last);
    kd_st_file *f = kd_test_st_open(last);
    static const char *const need[] = {"distill.queue", "distill.queue_ptr", "distill.head_k.0.weight",
                                       "distill.head.2.bias", "ema.conv1.weight", "ema.bn1.running_mean"};
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++)
        if (!kd_st_find(f, need[i])) fail_msg("%s has no %s", last, need[i]);
    kd_st_close(f);
    snprintf(a, sizeof a, "%s/moco_full/encoder.safetensors", g_root);
    snprintf(b, sizeof b, "%s/moco_resumed/encoder.safetensors", g_root);
    if (kd_test_ckpts_differ(a, b, KD_TEST_CKPT_MODEL, msg, sizeof msg)) fail_msg("moco encoder.safetensors: %s", msg);
    run_pair("simclr", "ref", "simclr", last, sizeof last);
    if (!registered("esvit")) return;
    /* EsViT (DINO's step plus the region term): the EMA teacher, both centres,
     * the teacher heads and the schedules (teacher temperature warm-up over
     * the 3 epochs, momentum and weight decay per step, the last layers held
     * during epoch 1 and released after the resume) continue bit-identically. */
    run_pair_set("esvit", "esvit.out_dim=32", "esvit.hidden=16", "ref", "esvit", last, sizeof last);
    f = kd_test_st_open(last);
    static const char *const need_esvit[] = {"distill.dino_loss.center", "distill.dino_loss.center_grid",
                                             "distill.teacher_head.last_layer.weight_v",
                                             "distill.teacher_head_dense.mlp.0.weight", "distill.head.last_layer.weight_g",
                                             "ema.conv1.weight"};
    for (size_t i = 0; i < sizeof need_esvit / sizeof need_esvit[0]; i++)
        if (!kd_st_find(f, need_esvit[i])) fail_msg("%s has no %s", last, need_esvit[i]);
    if (all_zero(kd_st_find(f, "distill.dino_loss.center_grid"))) fail_msg("%s: the region centre never moved", last);
    kd_st_close(f);
}

/* Zeroes tensor `name` of the safetensors file at path in place (its bytes
 * located through the header's data_offsets). */
static void zero_tensor_in_file(const char *path, const char *name) {
    size_t n = 0;
    char *raw = kd_test_slurp(path, &n);
    if (!raw || n < 8) fail_msg("cannot read %s", path);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | (unsigned char)raw[i];
    if (hlen > n - 8) fail_msg("%s: bad header length", path);
    kd_json *h = NULL;
    KD_ASSERT_OK(kd_json_parse(raw + 8, (size_t)hlen, path, &h));
    const kd_json *e = kd_json_get(h, name), *off = e ? kd_json_get(e, "data_offsets") : NULL;
    if (!off || off->type != KD_JSON_ARRAY || off->count != 2) fail_msg("%s has no tensor %s", path, name);
    size_t a = (size_t)off->items[0].number, b = (size_t)off->items[1].number;
    if (b < a || 8 + hlen + b > n) fail_msg("%s: bad offsets for %s", path, name);
    memset(raw + 8 + hlen + a, 0, b - a);
    kd_test_write_file(path, raw, n);
    kd_json_free(h);
    free(raw);
}

/* The comparison can fail: a paused fitnet run whose checkpoint lost the
 * regressor's momentum (zeroed before --resume) ends differently from the
 * uninterrupted run, so the resumed run does read optim.distill.* (and a
 * run that dropped that state would be caught above). */
static void test_resume_detects_lost_state(void **state) {
    (void)state;
    if (!registered("fitnet")) skip();
    need_teacher();
    char full[700], part[700], a[800], b[800], msg[2048];
    snprintf(full, sizeof full, "%s/fitnet_full", g_root);
    snprintf(a, sizeof a, "%s/last.safetensors", full);
    if (access(a, R_OK) != 0) {
        kd_test_proc p = RUN(DISTILL_FLAGS("fitnet", "ref", full));
        kd_test_expect_ok(&p, "kd distill (uninterrupted)");
        kd_test_proc_free(&p);
    }
    snprintf(part, sizeof part, "%s/fitnet_lost", g_root);
    snprintf(b, sizeof b, "%s/last.safetensors", part);
    kd_test_proc p = RUN(DISTILL_FLAGS("fitnet", "ref", part), "--stop-after", "1");
    kd_test_expect_ok(&p, "kd distill --stop-after 1");
    kd_test_proc_free(&p);
    zero_tensor_in_file(b, "optim.distill.regressor.conv.weight.momentum_buffer");
    p = RUN("distill", "--resume", part);
    kd_test_expect_ok(&p, "kd distill --resume");
    kd_test_proc_free(&p);
    if (!kd_test_ckpts_differ(a, b, KD_TEST_CKPT_WITH_OPTIM, msg, sizeof msg))
        fail_msg("zeroing the regressor's momentum before --resume changed nothing");
    printf("  zeroed momentum before --resume: %s\n", msg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_kd),
        cmocka_unit_test(test_resume_fitnet),
        cmocka_unit_test(test_resume_fitnet_cpu),
        cmocka_unit_test(test_resume_pad),
        cmocka_unit_test(test_resume_crd),
        cmocka_unit_test(test_resume_ssl),
        cmocka_unit_test(test_resume_detects_lost_state),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
