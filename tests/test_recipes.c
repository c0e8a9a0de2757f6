/* The CIFAR-100 recipes under configs/cifar100 (written by tools/gen_recipes.py):
 *
 *   - every YAML file there loads and resolves (kd_train_cfg_load +
 *     kd_train_cfg_resolve: a registered method with valid settings, registered
 *     student and teacher architectures), follows the RepDistiller recipe of
 *     METHODS.md section 0, names in its directory and file name the pair and
 *     method it configures ("<method>+kd.yaml": the method with alpha 1, as
 *     RepDistiller's CRD+KD), and carries DKD's per-pair NCKD weight of
 *     METHODS.md section 17;
 *   - every pair of METHODS.md section 10 has a recipe for every registered
 *     method, and every teacher a training recipe;
 *   - one recipe runs end to end through the kd program on a few hundred
 *     generated CIFAR-100-format images: `kd train` of its teacher recipe for a
 *     few steps, then `kd distill --config <recipe>`; the run's metrics.jsonl
 *     holds every named loss term of the method per epoch ("train_<term>"), and
 *     its curves.svg draws and names each of them. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd/distill.h"
#include "kd/train.h"
#include "testutil.h"
#include "train/train_impl.h"

#define RECIPES KD_SOURCE_DIR "/configs/cifar100"

/* METHODS.md section 10, teacher -> student. */
static const char *const k_pairs[][2] = {
    {"wrn_40_2", "wrn_16_2"},   {"wrn_40_2", "wrn_40_1"},     {"resnet56", "resnet20"},
    {"resnet110", "resnet32"},  {"resnet32x4", "resnet8x4"},  {"vgg13", "vgg8"},
    {"vgg13", "MobileNetV2"},   {"ResNet50", "MobileNetV2"},  {"resnet32x4", "ShuffleV1"},
    {"resnet32x4", "ShuffleV2"}, {"wrn_40_2", "ShuffleV1"},
};
#define NPAIRS ((int)(sizeof k_pairs / sizeof k_pairs[0]))

/* DKD's NCKD weight (METHODS.md section 17; mdistiller configs/cifar100/dkd/):
 * 2 for the resnet56 and resnet110 pairs, 6 for the wrn-wrn and vgg pairs, 8
 * for the rest (wrn_40_2 -> ShuffleV1's config sets none: mdistiller's 8). */
static double dkd_beta(const char *teacher, const char *student) {
    if (!strcmp(teacher, "resnet56") || !strcmp(teacher, "resnet110")) return 2;
    if (!strcmp(teacher, "vgg13") || (!strcmp(teacher, "wrn_40_2") && !strncmp(student, "wrn_", 4))) return 6;
    return 8;
}

static int is_low_lr_student(const char *s) {
    return !strcmp(s, "MobileNetV2") || !strcmp(s, "ShuffleV1") || !strcmp(s, "ShuffleV2");
}

static int file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Sorted names of the entries of dir (without "." and ".."), malloc'd. */
static char **list_dir(const char *dir, int *n) {
    DIR *d = opendir(dir);
    if (!d) fail_msg("cannot open %s (run tools/gen_recipes.py)", dir);
    int cap = 32;
    char **v = malloc(sizeof *v * (size_t)cap);
    *n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (*n == cap) v = realloc(v, sizeof *v * (size_t)(cap *= 2));
        v[(*n)++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(v, (size_t)*n, sizeof *v, cmp_str);
    return v;
}

static void free_list(char **v, int n) {
    for (int i = 0; i < n; i++) free(v[i]);
    free(v);
}

/* The value of one method setting ("dkd.beta") as resolved for cfg. */
typedef struct {
    const char *key;
    char value[64];
    int found;
} setting_probe;

static void probe_visit(void *user, const char *key, const char *value, const char *help) {
    (void)help;
    setting_probe *p = user;
    if (strcmp(key, p->key) == 0) {
        snprintf(p->value, sizeof p->value, "%s", value);
        p->found = 1;
    }
}

/* Loads and resolves one recipe; fails naming the file. */
static void load_recipe(const char *path, kd_train_cfg *c) {
    kd_train_cfg_defaults(c);
    if (kd_train_cfg_load(c, path) != KD_OK) fail_msg("%s: %s", path, kd_last_error());
    if (kd_train_cfg_resolve(c) != KD_OK) fail_msg("%s: %s", path, kd_last_error());
}

/* METHODS.md section 0: SGD momentum 0.9, wd 5e-4, batch 64, 240 epochs,
 * x0.1 at 150, 180, 210; lr 0.05 (0.01 for the small mobile students). */
static int near(double a, double b) { return fabs(a - b) <= 1e-6 * fmax(1.0, fabs(b)); }

static void check_shared_recipe(const char *path, const kd_train_cfg *c) {
    double lr = is_low_lr_student(c->model) ? 0.01 : 0.05;
    if (c->optimizer != KD_OPTIM_SGD || !near(c->momentum, 0.9) || !near(c->weight_decay, 5e-4) ||
        c->batch_size != 64 || c->epochs != 240 || !near(c->lr, lr) || c->sched.kind != KD_SCHED_MULTISTEP ||
        c->sched.n_milestones != 3 || c->sched.milestones[0] != 150 || c->sched.milestones[1] != 180 ||
        c->sched.milestones[2] != 210 || !near(c->sched.gamma, 0.1) || c->sched.warmup_epochs != 0)
        fail_msg("%s: not the RepDistiller recipe (sgd %d momentum %g wd %g batch %d epochs %d lr %g (want %g) "
                 "schedule %d milestones %d:%d,%d,%d lr_decay %g warmup %d)",
                 path, c->optimizer == KD_OPTIM_SGD, (double)c->momentum, (double)c->weight_decay, c->batch_size,
                 c->epochs, (double)c->lr, lr, (int)c->sched.kind, c->sched.n_milestones, c->sched.milestones[0], c->sched.milestones[1],
                 c->sched.milestones[2], (double)c->sched.gamma, (int)c->sched.warmup_epochs);
    if (strncmp(c->data, "cifar100:", 9) != 0) fail_msg("%s: data '%s' is not a cifar100: spec", path, c->data);
}

/* The header comment: names its source and the published number. */
static void check_header(const char *path) {
    char *text = kd_test_slurp(path, NULL);
    if (!text) fail_msg("cannot read %s", path);
    if (text[0] != '#') fail_msg("%s: does not start with a comment naming its source", path);
    if (!strstr(text, "Source:") && !strstr(text, "RepDistiller"))
        fail_msg("%s: the header comment names no source", path);
    if (!strstr(text, "Published top-1")) fail_msg("%s: the header comment gives no published number", path);
    if (!strstr(text, "tools/gen_recipes.py")) fail_msg("%s: does not say it is generated", path);
    free(text);
}

static void test_teacher_recipes(void **state) {
    (void)state;
    int n;
    char **names = list_dir(RECIPES "/teachers", &n);
    int seen[NPAIRS] = {0};
    for (int i = 0; i < n; i++) {
        size_t len = strlen(names[i]);
        if (len < 6 || strcmp(names[i] + len - 5, ".yaml") != 0) fail_msg("teachers/%s is not a .yaml file", names[i]);
        char path[1200];
        snprintf(path, sizeof path, RECIPES "/teachers/%s", names[i]);
        kd_train_cfg c;
        load_recipe(path, &c);
        check_shared_recipe(path, &c);
        check_header(path);
        if (strlen(c.model) != len - 5 || strncmp(c.model, names[i], len - 5) != 0)
            fail_msg("%s trains '%s'", path, c.model);
        if (strcmp(c.distill.method, "none") != 0 || kd_distill_needs_teacher(&c.distill))
            fail_msg("%s: a teacher trains alone (method none), got '%s'", path, c.distill.method);
        char want[600];
        snprintf(want, sizeof want, "runs/cifar100/teachers/%s", c.model);
        if (strcmp(c.out, want) != 0) fail_msg("%s: out %s, the pair recipes read %s", path, c.out, want);
        for (int p = 0; p < NPAIRS; p++)
            if (!strcmp(k_pairs[p][0], c.model)) seen[p] = 1;
    }
    for (int p = 0; p < NPAIRS; p++)
        if (!seen[p]) fail_msg("no recipe configs/cifar100/teachers/%s.yaml for the teacher", k_pairs[p][0]);
    free_list(names, n);
}

/* Every file of one pair directory. */
static int check_pair_dir(const char *pair_dir, const char *teacher, const char *student) {
    char dir[1200];
    snprintf(dir, sizeof dir, RECIPES "/%s", pair_dir);
    int n, checked = 0;
    char **names = list_dir(dir, &n);
    for (int i = 0; i < n; i++) {
        size_t len = strlen(names[i]);
        char path[1400];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (len < 6 || strcmp(names[i] + len - 5, ".yaml") != 0) fail_msg("%s is not a .yaml file", path);
        kd_train_cfg c;
        load_recipe(path, &c);
        check_shared_recipe(path, &c);
        check_header(path);
        /* "<method>.yaml", or "<method>+kd.yaml": the method with the KD term
         * at weight 1 (RepDistiller's "-a 1", e.g. CRD+KD). */
        size_t stem = len - 5;
        int with_kd = stem > 3 && !strncmp(names[i] + stem - 3, "+kd", 3);
        if (with_kd) stem -= 3;
        if (strlen(c.distill.method) != stem || strncmp(c.distill.method, names[i], stem) != 0)
            fail_msg("%s configures method '%s'", path, c.distill.method);
        if (with_kd && c.distill.alpha != 1.0f)
            fail_msg("%s: a +kd recipe has alpha %g, not 1", path, (double)c.distill.alpha);
        if (strcmp(c.model, student) != 0) fail_msg("%s: student '%s', the directory says '%s'", path, c.model, student);
        if (kd_distill_needs_teacher(&c.distill)) {
            char want[600];
            snprintf(want, sizeof want, "runs/cifar100/teachers/%s/last.safetensors", teacher);
            if (strcmp(c.teacher, teacher) != 0 || strcmp(c.teacher_ckpt, want) != 0)
                fail_msg("%s: teacher '%s' from '%s', want '%s' from '%s'", path, c.teacher, c.teacher_ckpt, teacher, want);
        } else if (c.teacher_ckpt[0]) {
            fail_msg("%s: method %s uses no teacher but the recipe loads %s", path, c.distill.method, c.teacher_ckpt);
        }
        char want_out[600];
        snprintf(want_out, sizeof want_out, "runs/cifar100/%s/%s%s", pair_dir, c.distill.method, with_kd ? "+kd" : "");
        if (strcmp(c.out, want_out) != 0) fail_msg("%s: out %s, want %s", path, c.out, want_out);
        if (!strcmp(c.distill.method, "dkd")) {
            setting_probe p = {"dkd.beta", "", 0};
            KD_ASSERT_OK(kd_distill_cfg_visit(&c.distill, probe_visit, &p));
            if (!p.found) fail_msg("%s: dkd has no setting dkd.beta", path);
            if (fabs(atof(p.value) - dkd_beta(teacher, student)) > 1e-6)
                fail_msg("%s: dkd.beta %s, mdistiller's config for this pair has %g", path, p.value,
                         dkd_beta(teacher, student));
        }
        checked++;
    }
    free_list(names, n);
    return checked;
}

static void test_pair_recipes(void **state) {
    (void)state;
    int n, checked = 0;
    char **dirs = list_dir(RECIPES, &n);
    for (int i = 0; i < n; i++) {
        if (!strcmp(dirs[i], "teachers")) continue;
        int p = 0;
        char name[200];
        for (; p < NPAIRS; p++) {
            snprintf(name, sizeof name, "%s-%s", k_pairs[p][0], k_pairs[p][1]);
            if (!strcmp(name, dirs[i])) break;
        }
        if (p == NPAIRS) fail_msg("configs/cifar100/%s is not a pair of METHODS.md section 10", dirs[i]);
        checked += check_pair_dir(dirs[i], k_pairs[p][0], k_pairs[p][1]);
    }
    free_list(dirs, n);
    /* Every pair has a recipe for every registered supervised method (those
     * that train without labels or with few, pretraining, SEED, SimCLRv2's
     * distillation, have theirs in configs/ssl/). */
    int nm, nsup = 0;
    const kd_method_def *const *defs = kd_method_defs(&nm);
    for (int m = 0; m < nm; m++) nsup += defs[m]->labels == KD_LABELS_REQUIRED;
    for (int p = 0; p < NPAIRS; p++)
        for (int m = 0; m < nm; m++) {
            if (defs[m]->labels != KD_LABELS_REQUIRED) continue;
            char path[1200];
            snprintf(path, sizeof path, RECIPES "/%s-%s/%s.yaml", k_pairs[p][0], k_pairs[p][1], defs[m]->name);
            if (!file_exists(path)) fail_msg("no recipe %s (run tools/gen_recipes.py)", path);
        }
    assert_true(checked >= NPAIRS * nsup);
}

/* ------------------------------------------------------- end to end */

/* The recipe run end to end, and its teacher's recipe. */
#define E2E_PAIR "resnet56-resnet20"
#define E2E_METHOD "dkd"
#define E2E_TEACHER "resnet56"

/* The epoch records' train_<term> keys the method's weights call for. */
static int expected_terms(const kd_train_cfg *c, const char **names) {
    int n = 0;
    if (c->distill.gamma > 0) names[n++] = "ce";
    if (c->distill.alpha > 0) names[n++] = "kl";
    const kd_method_def *d = kd_method_find(c->distill.method);
    if (c->distill.beta > 0 && d && (d->term || d->step)) names[n++] = d->name;
    return n;
}

static void test_recipe_end_to_end(void **state) {
    (void)state;
    const char *root = kd_test_tmpdir("recipes");
    char data[1100], spec[1200], tdir[1100], sdir[1100], tcfg[1100], scfg[1100], ckpt[1200];
    snprintf(data, sizeof data, "%s/cifar-100-binary", root);
    snprintf(spec, sizeof spec, "cifar100:%s", data);
    snprintf(tdir, sizeof tdir, "%s/teacher", root);
    snprintf(sdir, sizeof sdir, "%s/student", root);
    snprintf(tcfg, sizeof tcfg, RECIPES "/teachers/%s.yaml", E2E_TEACHER);
    snprintf(scfg, sizeof scfg, RECIPES "/%s/%s.yaml", E2E_PAIR, E2E_METHOD);
    snprintf(ckpt, sizeof ckpt, "%s/last.safetensors", tdir);
    char cmd[1300];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", data);
    assert_int_equal(system(cmd), 0);
    kd_test_write_cifar100(data, 320, 100, 7);

    /* Batch 64 from the recipe: 3 steps are 192 images. */
    kd_test_proc p = kd_test_run_kd(root, (const char *const[]){"train", "--config", tcfg, "--data", spec, "--epochs", "1",
                                                                 "--max-steps-per-epoch", "3", "--out", tdir,
                                                                 "--progress", "0", "--threads", "2", NULL});
    kd_test_expect_ok(&p, "kd train (teacher recipe)");
    kd_test_proc_free(&p);
    p = kd_test_run_kd(root, (const char *const[]){"distill", "--config", scfg, "--data", spec, "--teacher-ckpt", ckpt,
                                                   "--epochs", "1", "--max-steps-per-epoch", "3", "--out", sdir,
                                                   "--progress", "0", "--threads", "2", "--log-every", "1", NULL});
    kd_test_expect_ok(&p, "kd distill (recipe)");
    kd_test_proc_free(&p);

    /* The run used the recipe: its method, teacher and per-pair setting. */
    char path[1300];
    snprintf(path, sizeof path, "%s/summary.json", sdir);
    char *summary = kd_test_slurp(path, NULL);
    assert_non_null(summary);
    if (!strstr(summary, "\"method\": \"" E2E_METHOD "\"") || !strstr(summary, "\"teacher\": \"" E2E_TEACHER "\"") ||
        !strstr(summary, "\"model\": \"resnet20\""))
        fail_msg("summary.json does not name the recipe's method, teacher and student:\n%s", summary);
    free(summary);
    snprintf(path, sizeof path, "%s/config.yaml", sdir);
    char *config = kd_test_slurp(path, NULL);
    assert_non_null(config);
    if (!strstr(config, "dkd.beta: \"2\"")) fail_msg("config.yaml of the run lacks the recipe's dkd.beta 2:\n%s", config);
    free(config);

    /* Every named term per epoch in metrics.jsonl, and in curves.svg. */
    kd_train_cfg c;
    load_recipe(scfg, &c);
    const char *terms[4];
    int nt = expected_terms(&c, terms);
    assert_true(nt >= 2); /* DKD: ce and dkd */
    snprintf(path, sizeof path, "%s/metrics.jsonl", sdir);
    char *metrics = kd_test_slurp(path, NULL);
    assert_non_null(metrics);
    const char *ep = strstr(metrics, "\"type\": \"epoch\"");
    if (!ep) fail_msg("metrics.jsonl has no epoch record:\n%s", metrics);
    const char *eol = strchr(ep, '\n');
    size_t eplen = eol ? (size_t)(eol - ep) : strlen(ep);
    char *svg;
    snprintf(path, sizeof path, "%s/curves.svg", sdir);
    svg = kd_test_slurp(path, NULL);
    assert_non_null(svg);
    for (int i = 0; i < nt; i++) {
        char key[96], label[96];
        snprintf(key, sizeof key, "\"train_%s\": ", terms[i]);
        const char *k = strstr(ep, key);
        if (!k || (size_t)(k - ep) >= eplen) fail_msg("the epoch record lacks %s:\n%.*s", key, (int)eplen, ep);
        double v = atof(k + strlen(key));
        if (!isfinite(v)) fail_msg("%s is %g", key, v);
        snprintf(label, sizeof label, ">%s</text>", terms[i]);
        if (!strstr(svg, label)) fail_msg("curves.svg does not name the term %s", terms[i]);
    }
    /* One line per term besides the four of the loss and accuracy panels. */
    int lines = 0;
    for (const char *q = svg; (q = strstr(q, "<polyline")); q++) lines++;
    if (lines != 4 + nt) fail_msg("curves.svg has %d lines, want %d (loss, accuracy and %d terms)", lines, 4 + nt, nt);
    free(svg);
    free(metrics);
    /* Passed: the scratch directory (data, checkpoints) is not needed. */
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    assert_int_equal(system(cmd), 0);
}

/* ------------------------------------------------------- curves.svg */

static int count(const char *s, const char *needle) {
    int n = 0;
    for (const char *q = s; (q = strstr(q, needle)); q++) n++;
    return n;
}

/* kd__write_curves on a written metrics.jsonl: one line per train_<term>
 * (terms that start late included), summary keys that are not terms
 * skipped, a log axis for terms of very different sizes, dashed lines past
 * the palette. */
static void test_curves_terms(void **state) {
    (void)state;
    const char *dir = kd_test_tmpdir("curves");
    char path[1200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (int e = 1; e <= 4; e++) {
        fprintf(f, "{\"type\": \"step\", \"epoch\": %d, \"step\": %d, \"lr\": 0.05, \"loss\": 3, \"ce\": 2}\n", e, e);
        fprintf(f, "{\"type\": \"epoch\", \"epoch\": %d, \"lr\": 0.05, \"train_loss\": %g, \"train_ce\": %g, \"train_kl\": %g",
                e, 5.0 - e, 4.0 / e, 1.0 / e);
        if (e >= 2) fprintf(f, ", \"train_fitnet\": %g", 0.01 / e); /* a term from epoch 2 on */
        fprintf(f, ", \"train_top1\": %d, \"train_top5\": %d, \"test_top1\": %d, \"test_top5\": 50, \"test_loss\": 3, "
                   "\"images_per_s\": 100.0, \"epoch_s\": 1.0, \"wall_s\": %d}\n", 10 * e, 20 * e, 9 * e, e);
    }
    fclose(f);
    KD_ASSERT_OK(kd__write_curves(dir));
    snprintf(path, sizeof path, "%s/curves.svg", dir);
    char *svg = kd_test_slurp(path, NULL);
    assert_non_null(svg);
    const char *names[] = {"ce", "kl", "fitnet"};
    for (int i = 0; i < 3; i++) {
        char label[64];
        snprintf(label, sizeof label, ">%s</text>", names[i]);
        if (count(svg, label) != 1) fail_msg("curves.svg names %s %d times:\n%s", names[i], count(svg, label), svg);
    }
    /* ">loss</text>" once: the title of the loss panel, not a term. */
    if (strstr(svg, ">top1</text>") || strstr(svg, ">top5</text>") || count(svg, ">loss</text>") != 1)
        fail_msg("curves.svg plots a summary key as a loss term:\n%s", svg);
    assert_int_equal(count(svg, "<polyline"), 4 + 3);
    if (!strstr(svg, "log scale")) fail_msg("terms from 0.0025 to 4 are not drawn on a log axis:\n%s", svg);
    /* The late term has 3 points, the others 4 (the last three polylines). */
    const char *q = svg;
    for (int k = 0; k < 4 + 3; k++) {
        q = strstr(q, "points='") + 8;
        int pts = 0;
        for (const char *r = q; *r != '\''; r++) pts += *r == ',';
        if (pts != (k == 6 ? 3 : 4)) fail_msg("polyline %d has %d points", k, pts);
    }
    free(svg);

    /* Twelve terms: the colours repeat dashed past the palette of ten. */
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    for (int e = 1; e <= 2; e++) {
        fprintf(f, "{\"type\": \"epoch\", \"epoch\": %d, \"train_loss\": 1", e);
        for (int k = 0; k < 12; k++) fprintf(f, ", \"train_t%d\": %g", k, 1.0 + k - 0.5 * e);
        fprintf(f, ", \"train_top1\": 1, \"test_top1\": 1, \"test_loss\": 1}\n");
    }
    fclose(f);
    KD_ASSERT_OK(kd__write_curves(dir));
    snprintf(path, sizeof path, "%s/curves.svg", dir);
    svg = kd_test_slurp(path, NULL);
    assert_non_null(svg);
    assert_int_equal(count(svg, "<polyline"), 4 + 12);
    assert_int_equal(count(svg, "<polyline fill='none' stroke='#1f77b4' stroke-width='2' stroke-dasharray"), 1);
    if (!strstr(svg, ">t11</text>") || strstr(svg, "log scale")) fail_msg("twelve terms:\n%s", svg);
    free(svg);
}

/* configs/ssl/: every recipe loads and resolves, names a registered method
 * that trains without labels or with few, and every method of that kind has
 * a recipe there (SimCLRv2's distillation and its fine-tune included). */
static void test_ssl_recipes(void **state) {
    (void)state;
    const char *dir = KD_SOURCE_DIR "/configs/ssl";
    int n, methods_seen = 0;
    char **files = list_dir(dir, &n);
    int nm;
    const kd_method_def *const *defs = kd_method_defs(&nm);
    int *has = calloc((size_t)nm, sizeof *has);
    for (int i = 0; i < n; i++) {
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        kd_train_cfg c;
        kd_train_cfg_defaults(&c);
        KD_ASSERT_OK(kd_train_cfg_load(&c, path));
        KD_ASSERT_OK(kd_train_cfg_resolve(&c));
        const kd_method_def *d = kd_method_find(c.distill.method);
        if (!d) fail_msg("%s: unknown method %s", path, c.distill.method);
        if (d->labels == KD_LABELS_REQUIRED && !c.labels[0] && strcmp(d->name, "none"))
            fail_msg("%s: method %s is supervised", path, d->name);
        if (!strcmp(d->name, "none") && !c.init_ckpt[0]) fail_msg("%s: a fine-tune without init_ckpt", path);
        for (int m = 0; m < nm; m++) has[m] |= defs[m] == d;
    }
    for (int m = 0; m < nm; m++) {
        if (defs[m]->labels == KD_LABELS_REQUIRED) continue;
        if (!has[m]) fail_msg("no recipe for %s in %s", defs[m]->name, dir);
        methods_seen++;
    }
    assert_true(methods_seen >= 5);
    free(has);
    free_list(files, n);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ssl_recipes),
        cmocka_unit_test(test_curves_terms),
        cmocka_unit_test(test_teacher_recipes),
        cmocka_unit_test(test_pair_recipes),
        cmocka_unit_test(test_recipe_end_to_end),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
