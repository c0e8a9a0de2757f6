/* Every registered distillation method against its PyTorch reference
 * (tests/fixtures/distill_<method>.safetensors, written by
 * tools/gen_distill_fixtures.py from tools/distill_refs/<method>.py):
 *   - the fixture exists for every registered method (except "none"), and its
 *     published weights (gamma, alpha, beta, T) are the method's defaults;
 *   - on each case (several shapes per method) the method is created from
 *     the case's feature shapes, its modules get the fixture's parameters,
 *     and the weighted terms, the composed total gamma CE + alpha KL + beta
 *     term, the gradients of the total with respect to the student's logits
 *     and features and to the method's parameters, and the buffers after the
 *     forward all match PyTorch (float64 reference), on the ref and cpu
 *     backends;
 *   - central finite differences of the total agree with the analytic
 *     gradients on sampled coordinates;
 *   - where the reference gives the state after the step ("<c>.updated.*":
 *     CRD's bank or queue update), kd_method_after_step leaves the same. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/distill.h"
#include "kd/io.h"
#include "testutil.h"

static const char *g_backends[2];
static int g_nbe;

typedef struct {
    kd_st_file *f;
    kd_json *meta_case;
    const char *c; /* case name */
    kd_method *m;
    kd_param_list in;    /* student logits and features (leaves with gradients) */
    kd_tensor *t_logits; /* teacher outputs (no gradients) */
    kd_tensor *t_feat[KD_MAX_FEATS];
    kd_tensor *labels;   /* I32 */
    int32_t *train_labels; /* the case's training-set labels, or NULL (CRD) */
    int64_t *index;        /* the batch's dataset indices, or NULL (CRD) */
    int s_n, t_n;
    int epoch;
} dcase;

/* An optional I64 vector of the fixture ("<c>.<rest>"), copied as int32 or
 * int64; NULL when absent. */
static void *opt_vector(const kd_st_file *f, const char *c, const char *rest, int wide, int64_t *n) {
    char name[256];
    snprintf(name, sizeof name, "%s.%s", c, rest);
    const kd_st_entry *e = kd_st_find(f, name);
    if (!e) return NULL;
    if (e->dtype != KD_I64 || e->ndim != 1) fail_msg("%s: %s is not an I64 vector", kd_st_path(f), name);
    *n = e->shape[0];
    const int64_t *src = e->data;
    void *out = malloc((size_t)*n * (wide ? 8 : 4) + 8);
    if (!out) fail_msg("out of memory");
    for (int64_t i = 0; i < *n; i++) {
        if (wide) ((int64_t *)out)[i] = src[i];
        else ((int32_t *)out)[i] = (int32_t)src[i];
    }
    return out;
}

static const kd_st_entry *need(const kd_st_file *f, const char *fmt, const char *c, const char *rest) {
    char name[256];
    snprintf(name, sizeof name, fmt, c, rest);
    const kd_st_entry *e = kd_st_find(f, name);
    if (!e) fail_msg("fixture %s lacks tensor %s", kd_st_path(f), name);
    return e;
}

static kd_tensor *tensor_from(const kd_st_entry *e) {
    kd_tensor *t = NULL;
    KD_ASSERT_OK(kd_tensor_new(e->dtype, e->ndim, e->shape, &t));
    memcpy(t->data, e->data, e->nbytes);
    return t;
}

static int64_t numel(const kd_st_entry *e) {
    int64_t n = 1;
    for (int d = 0; d < e->ndim; d++) n *= e->shape[d];
    return n;
}

static void net_shapes(const kd_st_file *f, const char *c, const char *side, int n_feat, kd_net_shapes *ns) {
    memset(ns, 0, sizeof *ns);
    ns->n_feat = n_feat;
    char rest[32];
    for (int k = 0; k < n_feat; k++) {
        snprintf(rest, sizeof rest, "%s.feat%d", side, k);
        const kd_st_entry *e = need(f, "%s.%s", c, rest);
        ns->feat_ndim[k] = e->ndim;
        for (int d = 0; d < e->ndim; d++) ns->feat[k][d] = e->shape[d];
    }
    snprintf(rest, sizeof rest, "%s.logits", side);
    ns->num_classes = need(f, "%s.%s", c, rest)->shape[1];
}

/* Creates the method for case c with the fixture's settings and parameters. */
static void case_setup(dcase *d, const char *method) {
    const kd_json *args = kd_json_get(d->meta_case, "args");
    kd_distill_cfg cfg = kd_distill_defaults(method);
    cfg.seed = 7;
    for (int64_t i = 0; args && i < args->count; i++) {
        char key[128];
        snprintf(key, sizeof key, "%s.%s", method, args->keys[i]);
        KD_ASSERT_OK(kd_distill_cfg_set_arg(&cfg, key, args->items[i].string));
    }
    d->s_n = (int)kd_json_get(d->meta_case, "s_n_feat")->integer;
    d->t_n = (int)kd_json_get(d->meta_case, "t_n_feat")->integer;
    d->epoch = (int)kd_json_get(d->meta_case, "epoch")->integer;
    kd_method_shapes shp;
    memset(&shp, 0, sizeof shp);
    net_shapes(d->f, d->c, "s", d->s_n, &shp.student);
    net_shapes(d->f, d->c, "t", d->t_n, &shp.teacher);
    shp.num_classes = (int)shp.student.num_classes;
    shp.n_train = 1000;
    /* The input geometry and architecture, for a method that builds a model
     * of its own (DoGo's peer, whose tensors are borrowed and not the
     * reference's: see below). */
    shp.in_channels = 1;
    shp.in_h = shp.in_w = 16;
    shp.student_arch = "resnet8";
    int64_t n_tl = 0, n_ix = 0;
    if ((d->train_labels = opt_vector(d->f, d->c, "train_labels", 0, &n_tl))) {
        shp.n_train = n_tl;
        shp.train_labels = d->train_labels;
    }
    d->index = opt_vector(d->f, d->c, "index", 1, &n_ix);
    KD_ASSERT_OK(kd_method_create(&cfg, &shp, &d->m));
    kd_method_set_training(d->m, (int)kd_json_get(d->meta_case, "training")->integer);
    /* Every tensor the method owns comes from the fixture, and nothing else. */
    kd_param_list *pl = kd_method_params(d->m);
    int n_own = 0;
    for (int i = 0; i < pl->n; i++) {
        if (pl->items[i].borrowed) continue; /* a model of the method's own (DoGo's peer) */
        n_own++;
        char rest[200];
        snprintf(rest, sizeof rest, "param.%s", pl->items[i].name);
        const kd_st_entry *e = need(d->f, "%s.%s", d->c, rest);
        kd_tensor *t = pl->items[i].t;
        if (e->dtype != t->dtype || numel(e) != kd_tensor_numel(t))
            fail_msg("%s: %s has %lld elements in the fixture, %lld in kd", kd_st_path(d->f), rest, (long long)numel(e),
                     (long long)kd_tensor_numel(t));
        memcpy(t->data, e->data, e->nbytes);
    }
    int n_fix = 0;
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s.param.", d->c);
    for (int i = 0; i < kd_st_count(d->f); i++) n_fix += strncmp(kd_st_get(d->f, i)->name, prefix, strlen(prefix)) == 0;
    if (n_fix != n_own)
        fail_msg("%s case %s: the reference has %d module tensors, kd's method %d", kd_st_path(d->f), d->c, n_fix,
                 n_own);
    /* Inputs: the student's as leaves with gradients. */
    memset(&d->in, 0, sizeof d->in);
    const kd_st_entry *e = need(d->f, "%s.%s", d->c, "s.logits");
    kd_tensor *t;
    KD_ASSERT_OK(kd_params_new(&d->in, "", "s.logits", KD_F32, e->ndim, e->shape, KD_PARAM_WEIGHT, &t));
    memcpy(t->data, e->data, e->nbytes);
    for (int k = 0; k < d->s_n; k++) {
        char rest[32];
        snprintf(rest, sizeof rest, "s.feat%d", k);
        e = need(d->f, "%s.%s", d->c, rest);
        KD_ASSERT_OK(kd_params_new(&d->in, "", rest, KD_F32, e->ndim, e->shape, KD_PARAM_WEIGHT, &t));
        memcpy(t->data, e->data, e->nbytes);
    }
    d->t_logits = tensor_from(need(d->f, "%s.%s", d->c, "t.logits"));
    for (int k = 0; k < d->t_n; k++) {
        char rest[32];
        snprintf(rest, sizeof rest, "t.feat%d", k);
        d->t_feat[k] = tensor_from(need(d->f, "%s.%s", d->c, rest));
    }
    e = need(d->f, "%s.%s", d->c, "labels");
    int64_t n = e->shape[0];
    KD_ASSERT_OK(kd_tensor_new(KD_I32, 1, &n, &d->labels));
    for (int64_t i = 0; i < n; i++) ((int32_t *)d->labels->data)[i] = (int32_t)((const int64_t *)e->data)[i];
}

static void case_free(dcase *d) {
    kd_method_free(d->m);
    kd_params_free(&d->in);
    kd_tensor_free(d->t_logits);
    for (int k = 0; k < d->t_n; k++) kd_tensor_free(d->t_feat[k]);
    kd_tensor_free(d->labels);
    free(d->train_labels);
    free(d->index);
}

/* Runs the method's loss on the case; returns the total (and the terms). */
static kd_tensor *case_loss(dcase *d, kd_graph *g, kd_loss_terms *terms) {
    kd_graph_reset(g);
    kd_step_batch b = {.n = d->labels->shape[0], .n_views = 0, .x = NULL, .y = d->labels, .index = d->index};
    kd_step_ctx ctx = {.g = g, .batch = &b, .epoch = d->epoch, .epochs = 240, .steps_per_epoch = 1};
    ctx.s.logits = d->in.items[0].t;
    ctx.s.n_feat = d->s_n;
    for (int k = 0; k < d->s_n; k++) ctx.s.feat[k] = ctx.s.preact[k] = d->in.items[1 + k].t;
    ctx.t.logits = d->t_logits;
    ctx.t.n_feat = d->t_n;
    for (int k = 0; k < d->t_n; k++) ctx.t.feat[k] = ctx.t.preact[k] = d->t_feat[k];
    kd_loss_terms_clear(terms);
    KD_ASSERT_OK(kd_method_loss(d->m, &ctx, terms));
    kd_tensor *total = NULL;
    for (int i = 0; i < terms->n; i++) total = total ? kd_add(g, total, terms->t[i]) : terms->t[i];
    KD_ASSERT_OK(kd_graph_status(g));
    assert_non_null(total);
    return total;
}

static double grad_scale(const float *g, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(g[i]));
    return m;
}

static void check_grad(const char *what, const kd_tensor *p, const kd_st_entry *ref) {
    int64_t n = kd_tensor_numel(p);
    double s = grad_scale(ref->data, n);
    /* An input the loss never reads (the logits of a self-supervised loss)
     * gets no gradient in kd; PyTorch's is then all zeros. */
    if (!p->grad && s == 0) return;
    if (!p->grad) fail_msg("%s has no gradient", what);
    KD_ASSERT_CLOSE(kd_f32(p->grad), (const float *)ref->data, n, 1e-6 + 2e-4 * s, 2e-3, what);
}

/* Central differences of the total on a few coordinates of x. */
static void finite_diff(dcase *d, kd_graph *g, kd_loss_terms *terms, kd_tensor *x, const char *what, uint64_t seed) {
    if (!x->grad) return; /* unread by the loss: check_grad saw a zero reference */
    int64_t n = kd_tensor_numel(x);
    float *v = kd_f32(x);
    double s = grad_scale(kd_f32(x->grad), n);
    if (s == 0) return;
    kd_rng r;
    kd_rng_init(&r, seed, 99);
    for (int k = 0; k < 4; k++) {
        int64_t i = (int64_t)kd_rng_below(&r, (uint32_t)n);
        double an = kd_f32(x->grad)[i];
        float x0 = v[i];
        double h = 1e-2 * fmax(1.0, fabs(x0));
        v[i] = (float)(x0 + h);
        double lp = kd_f32(case_loss(d, g, terms))[0];
        v[i] = (float)(x0 - h);
        double lm = kd_f32(case_loss(d, g, terms))[0];
        v[i] = x0;
        double fd = (lp - lm) / (2 * h);
        double tol = 3e-2 * (fabs(an) + 0.05 * s) + 1e-6 * fmax(fabs(lp), 1.0) / h;
        if (fabs(fd - an) > tol)
            fail_msg("%s[%lld]: finite difference %.6g vs analytic %.6g (tolerance %.3g)", what, (long long)i, fd, an,
                     tol);
    }
}

static void run_case(kd_st_file *f, const char *method, const char *c, const char *backend) {
    dcase d;
    memset(&d, 0, sizeof d);
    d.f = f;
    d.c = c;
    const char *mtext = kd_st_meta(f, c);
    if (!mtext) fail_msg("%s: no metadata for case %s", kd_st_path(f), c);
    KD_ASSERT_OK(kd_json_parse(mtext, strlen(mtext), c, &d.meta_case));
    case_setup(&d, method);
    kd_backend *be;
    KD_ASSERT_OK(kd_backend_get(backend, &be));
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    kd_loss_terms terms = {0};
    kd_param_list *mp = kd_method_params(d.m);
    kd_params_zero_grad(&d.in);
    kd_params_zero_grad(mp);
    kd_tensor *total = case_loss(&d, g, &terms);
    /* Terms and total. */
    char what[256];
    for (int i = 0; i < terms.n; i++) {
        char rest[96];
        snprintf(rest, sizeof rest, "term.%s", terms.name[i]);
        const kd_st_entry *e = need(f, "%s.%s", c, rest);
        snprintf(what, sizeof what, "%s %s %s [%s]", method, c, rest, backend);
        KD_ASSERT_CLOSE(kd_f32(terms.t[i]), (const float *)e->data, 1, 1e-5, 1e-4, what);
    }
    snprintf(what, sizeof what, "%s %s total [%s]", method, c, backend);
    KD_ASSERT_CLOSE(kd_f32(total), (const float *)need(f, "%s.%s", c, "total")->data, 1, 1e-5, 1e-4, what);
    /* Buffers after the forward (batch-norm running statistics). */
    for (int i = 0; i < mp->n; i++) {
        if (mp->items[i].kind != KD_PARAM_BUFFER || mp->items[i].t->dtype != KD_F32 || mp->items[i].borrowed) continue;
        char rest[200];
        snprintf(rest, sizeof rest, "after.%s", mp->items[i].name);
        const kd_st_entry *e = need(f, "%s.%s", c, rest);
        snprintf(what, sizeof what, "%s %s %s [%s]", method, c, rest, backend);
        KD_ASSERT_CLOSE(kd_f32(mp->items[i].t), (const float *)e->data, kd_tensor_numel(mp->items[i].t), 1e-5, 1e-4,
                        what);
    }
    /* Gradients. */
    KD_ASSERT_OK(kd_backward(g, total));
    for (int i = 0; i < d.in.n; i++) {
        char rest[200];
        snprintf(rest, sizeof rest, "grad.%s", d.in.items[i].name);
        snprintf(what, sizeof what, "%s %s %s [%s]", method, c, rest, backend);
        check_grad(what, d.in.items[i].t, need(f, "%s.%s", c, rest));
    }
    for (int i = 0; i < mp->n; i++) {
        if (mp->items[i].kind == KD_PARAM_BUFFER || mp->items[i].borrowed) continue;
        char rest[200];
        snprintf(rest, sizeof rest, "grad.param.%s", mp->items[i].name);
        snprintf(what, sizeof what, "%s %s %s [%s]", method, c, rest, backend);
        check_grad(what, mp->items[i].t, need(f, "%s.%s", c, rest));
    }
    /* Finite differences on the reference backend (cheap, deterministic),
     * unless the case's loss stops a gradient on purpose ("fd": 0). */
    const kd_json *fd = kd_json_get(d.meta_case, "fd");
    if (!strcmp(backend, "ref") && (!fd || fd->integer)) {
        for (int i = 0; i < d.in.n; i++) {
            snprintf(what, sizeof what, "%s %s d total / d %s", method, c, d.in.items[i].name);
            finite_diff(&d, g, &terms, d.in.items[i].t, what, 10 + (uint64_t)i);
        }
        for (int i = 0; i < mp->n; i++) {
            if (mp->items[i].kind == KD_PARAM_BUFFER || mp->items[i].borrowed) continue;
            snprintf(what, sizeof what, "%s %s d total / d %s", method, c, mp->items[i].name);
            finite_diff(&d, g, &terms, mp->items[i].t, what, 100 + (uint64_t)i);
        }
    }
    /* State after the step's hooks (CRD's bank update), where the reference
     * gives it as "<c>.updated.<name>": one more unperturbed loss (the
     * finite differences ran the last ones), then after_step. */
    char upd[64];
    snprintf(upd, sizeof upd, "%s.updated.", c);
    int n_upd = 0;
    for (int i = 0; i < kd_st_count(f); i++) n_upd += !strncmp(kd_st_get(f, i)->name, upd, strlen(upd));
    if (n_upd) {
        case_loss(&d, g, &terms);
        kd_step_batch b = {.n = d.labels->shape[0], .y = d.labels, .index = d.index};
        kd_step_ctx ctx = {.g = g, .batch = &b, .epoch = d.epoch, .epochs = 240, .steps_per_epoch = 1};
        KD_ASSERT_OK(kd_method_after_step(d.m, &ctx));
        int seen = 0;
        for (int i = 0; i < mp->n; i++) {
            char rest[200];
            snprintf(rest, sizeof rest, "updated.%s", mp->items[i].name);
            char full[300];
            snprintf(full, sizeof full, "%s.%s", c, rest);
            const kd_st_entry *e = kd_st_find(f, full);
            if (!e) continue;
            seen++;
            kd_tensor *t = mp->items[i].t;
            snprintf(what, sizeof what, "%s %s %s [%s]", method, c, rest, backend);
            if (t->dtype == KD_F32)
                KD_ASSERT_CLOSE(kd_f32(t), (const float *)e->data, kd_tensor_numel(t), 1e-5, 1e-4, what);
            else
                assert_memory_equal(t->data, e->data, e->nbytes);
        }
        if (seen != n_upd) fail_msg("%s case %s: %d updated tensors in the fixture, %d matched kd's", method, c, n_upd, seen);
    }
    kd_loss_terms_free(&terms);
    kd_graph_free(g);
    kd_json_free(d.meta_case);
    case_free(&d);
}

static void fixture_path(const char *method, char *buf, size_t n) {
    snprintf(buf, n, "%s/tests/fixtures/distill_%s.safetensors", KD_SOURCE_DIR, method);
}

/* A registered method without a reference fixture fails here. */
static void test_every_method_has_fixture(void **state) {
    (void)state;
    int n;
    const kd_method_def *const *defs = kd_method_defs(&n);
    int missing = 0;
    for (int i = 0; i < n; i++) {
        if (!strcmp(defs[i]->name, "none")) continue;
        char path[600];
        fixture_path(defs[i]->name, path, sizeof path);
        if (!kd_file_exists(path)) {
            printf("method %s has no fixture %s (tools/gen_distill_fixtures.py)\n", defs[i]->name, path);
            missing++;
        }
    }
    assert_int_equal(missing, 0);
}

static void test_methods_vs_torch(void **state) {
    (void)state;
    int n;
    const kd_method_def *const *defs = kd_method_defs(&n);
    for (int i = 0; i < n; i++) {
        const kd_method_def *m = defs[i];
        char path[600];
        fixture_path(m->name, path, sizeof path);
        if (!kd_file_exists(path)) continue; /* reported by test_every_method_has_fixture */
        kd_st_file *f = NULL;
        KD_ASSERT_OK(kd_st_open(path, &f));
        assert_string_equal(kd_st_meta(f, "method"), m->name);
        /* The reference's weights are the published ones: kd's defaults. */
        kd_json *w = NULL;
        const char *wt = kd_st_meta(f, "weights");
        KD_ASSERT_OK(kd_json_parse(wt, strlen(wt), "weights", &w));
        const float pub[4] = {(float)kd_json_get(w, "gamma")->number, (float)kd_json_get(w, "alpha")->number,
                              (float)kd_json_get(w, "beta")->number, (float)kd_json_get(w, "T")->number};
        const float mine[4] = {m->gamma, m->alpha, m->beta, m->T};
        for (int k = 0; k < 4; k++)
            if (pub[k] != mine[k]) fail_msg("%s: weight %d is %g in kd, %g in the reference", m->name, k, mine[k], pub[k]);
        kd_json_free(w);
        char cases[1024];
        snprintf(cases, sizeof cases, "%s", kd_st_meta(f, "cases"));
        int ncase = 0;
        for (char *save = NULL, *c = strtok_r(cases, ",", &save); c; c = strtok_r(NULL, ",", &save)) {
            for (int b = 0; b < g_nbe; b++) run_case(f, m->name, c, g_backends[b]);
            ncase++;
        }
        printf("%-8s %d cases x %d backends match PyTorch\n", m->name, ncase, g_nbe);
        assert_true(ncase >= 1);
        kd_st_close(f);
    }
}

int main(void) {
    g_backends[g_nbe++] = "ref";
    kd_backend *be;
    if (kd_backend_get("cpu", &be) == KD_OK) g_backends[g_nbe++] = "cpu";
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_method_has_fixture),
        cmocka_unit_test(test_methods_vs_torch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
