/*
 * test_optim.c: kd_optim (src/optim/optim.c) and kd_sched (src/optim/sched.c)
 * step by step against PyTorch 1.13 (tests/fixtures/optim.safetensors from
 * tools/gen_optim_fixtures.py; its docstring describes the cases).
 *
 *   - Every case of the fixture (SGD with and without Nesterov and with the
 *     no-decay group split, AdamW, LARS after SimCLR's lars_optimizer.py,
 *     clip_grad_norm_ + SGD, learning-rate changes between steps): six steps
 *     of fixed gradients on two parameter groups ("" at lr, "distill." at
 *     lr / 2) holding a conv weight, a BN weight, a BN buffer, a linear
 *     weight and a bias. After every step each parameter and each state
 *     tensor (matched by kd's state name) equals torch's within 1e-6
 *     relative; the buffer is never touched; clipping reports torch's norm.
 *   - The same cases interrupted after step 3: a fresh optimiser given the
 *     saved state tensors and kd_optim_state_loaded(3) continues exactly.
 *   - kd_sched's per-step warm-up + cosine against SimCLR's
 *     WarmUpAndCosineDecay (with DINO's floor).
 *   - Bad settings are refused naming the setting; state names are not
 *     truncated.
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/optim.h"

#define NGROUPS 2

typedef struct {
    kd_st_file *f;
    int steps;
    kd_param_list pl[NGROUPS];
    int n_trainable;
} fixture;

static fixture g_fx;

static const kd_st_entry *need(const char *name) {
    const kd_st_entry *e = kd_st_find(g_fx.f, name);
    if (!e) fail_msg("optim.safetensors has no tensor %s", name);
    return e;
}

static const char *need_meta(const char *key) {
    const char *v = kd_st_meta(g_fx.f, key);
    if (!v) fail_msg("optim.safetensors has no metadata %s", key);
    return v;
}

/* Builds the two parameter lists from metadata "params" ("name:kind:group,...")
 * with the shapes of the init.<name> tensors. */
static int setup(void **state) {
    (void)state;
    memset(&g_fx, 0, sizeof g_fx);
    if (kd_st_open(KD_FIXTURE("optim.safetensors"), &g_fx.f) != KD_OK) {
        fprintf(stderr, "%s\n", kd_last_error());
        return -1;
    }
    g_fx.steps = atoi(kd_st_meta(g_fx.f, "steps") ? kd_st_meta(g_fx.f, "steps") : "0");
    const char *p = kd_st_meta(g_fx.f, "params");
    if (!p || g_fx.steps < 4) return -1;
    while (*p) {
        char item[256], name[200], kind[8];
        size_t len = strcspn(p, ",");
        if (len >= sizeof item) return -1;
        memcpy(item, p, len);
        item[len] = '\0';
        int group;
        if (sscanf(item, "%199[^:]:%7[^:]:%d", name, kind, &group) != 3 || group < 0 || group >= NGROUPS)
            return -1;
        kd_param_kind k = !strcmp(kind, "w") ? KD_PARAM_WEIGHT : !strcmp(kind, "nd") ? KD_PARAM_NO_DECAY
                                                                                      : KD_PARAM_BUFFER;
        char iname[256];
        snprintf(iname, sizeof iname, "init.%s", name);
        const kd_st_entry *e = kd_st_find(g_fx.f, iname);
        kd_tensor *t = NULL;
        if (!e || kd_params_new(&g_fx.pl[group], "", name, KD_F32, e->ndim, e->shape, k, &t) != KD_OK) return -1;
        g_fx.n_trainable += k != KD_PARAM_BUFFER;
        p += len + (p[len] == ',');
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    for (int gi = 0; gi < NGROUPS; gi++) kd_params_free(&g_fx.pl[gi]);
    kd_st_close(g_fx.f);
    return 0;
}

static void reset_params(void) {
    for (int gi = 0; gi < NGROUPS; gi++)
        for (int i = 0; i < g_fx.pl[gi].n; i++) {
            kd_param *pp = &g_fx.pl[gi].items[i];
            char name[256];
            snprintf(name, sizeof name, "init.%s", pp->name);
            memcpy(pp->t->data, need(name)->data, kd_tensor_nbytes(pp->t));
            if (pp->t->grad) memset(pp->t->grad->data, 0, kd_tensor_nbytes(pp->t->grad));
        }
}

static void set_grads(int k) {
    for (int gi = 0; gi < NGROUPS; gi++)
        for (int i = 0; i < g_fx.pl[gi].n; i++) {
            kd_param *pp = &g_fx.pl[gi].items[i];
            if (pp->kind == KD_PARAM_BUFFER) continue;
            char name[256];
            snprintf(name, sizeof name, "grad%d.%s", k, pp->name);
            memcpy(pp->t->grad->data, need(name)->data, kd_tensor_nbytes(pp->t->grad));
        }
}

/* "key=value key=value ..." of metadata case.<name> into cfg and lrs. */
static void parse_case(const char *text, kd_optim_cfg *c, double *lrs, int *has_lrs) {
    memset(c, 0, sizeof *c);
    *has_lrs = 0;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", text);
    for (char *save = NULL, *tok = strtok_r(buf, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(tok, '=');
        assert_non_null(eq);
        *eq = '\0';
        const char *k = tok, *v = eq + 1;
        if (!strcmp(k, "kind")) KD_ASSERT_OK(kd_optim_kind_parse(v, &c->kind));
        else if (!strcmp(k, "lr")) c->lr = strtod(v, NULL);
        else if (!strcmp(k, "momentum")) c->momentum = strtod(v, NULL);
        else if (!strcmp(k, "dampening")) c->dampening = strtod(v, NULL);
        else if (!strcmp(k, "nesterov")) c->nesterov = atoi(v);
        else if (!strcmp(k, "weight_decay")) c->weight_decay = strtod(v, NULL);
        else if (!strcmp(k, "beta1")) c->beta1 = strtod(v, NULL);
        else if (!strcmp(k, "beta2")) c->beta2 = strtod(v, NULL);
        else if (!strcmp(k, "eps")) c->eps = strtod(v, NULL);
        else if (!strcmp(k, "trust_coef")) c->trust_coef = strtod(v, NULL);
        else if (!strcmp(k, "no_decay_norm_bias")) c->no_decay_norm_bias = atoi(v);
        else if (!strcmp(k, "clip_grad_norm")) c->clip_grad_norm = strtod(v, NULL);
        else if (!strcmp(k, "lrs")) {
            int n = 0;
            for (const char *q = v; *q && n < g_fx.steps; n++) {
                char *end;
                lrs[n] = strtod(q, &end);
                q = *end == ',' ? end + 1 : end;
            }
            assert_int_equal(n, g_fx.steps);
            *has_lrs = 1;
        } else {
            fail_msg("unknown key %s in the case settings", k);
        }
    }
}

static kd_optim *make_optim(const kd_optim_cfg *c) {
    kd_param_group groups[NGROUPS] = {{"", &g_fx.pl[0], 1.0f}, {"distill.", &g_fx.pl[1], 0.5f}};
    kd_optim *o = NULL;
    KD_ASSERT_OK(kd_optim_init(&o, groups, NGROUPS, c));
    return o;
}

/* Within 1e-6 relative, with an absolute floor of 1e-7 of the tensor's
 * largest magnitude for elements near zero (float32 rounding of terms that
 * cancel); returns the largest fraction of that tolerance used. */
static double check_tensor(const float *got, const kd_st_entry *want, const char *what) {
    const float *w = want->data;
    int64_t n = (int64_t)(want->nbytes / sizeof(float));
    double big = 0, used = 0;
    for (int64_t j = 0; j < n; j++) big = fmax(big, fabs((double)w[j]));
    KD_ASSERT_CLOSE(got, w, n, 1e-7 * big, 1e-6, what);
    for (int64_t j = 0; j < n; j++) {
        double tol = 1e-7 * big + 1e-6 * fabs((double)w[j]);
        if (tol > 0) used = fmax(used, fabs((double)got[j] - (double)w[j]) / tol);
    }
    return used;
}

/* Compares parameters and state after step k of case cname. */
static double check_step(kd_optim *o, const char *cname, int k) {
    char name[512];
    double worst = 0;
    for (int gi = 0; gi < NGROUPS; gi++)
        for (int i = 0; i < g_fx.pl[gi].n; i++) {
            kd_param *pp = &g_fx.pl[gi].items[i];
            if (pp->kind == KD_PARAM_BUFFER) {
                /* Buffers are not optimised. */
                snprintf(name, sizeof name, "init.%s", pp->name);
                if (memcmp(pp->t->data, need(name)->data, kd_tensor_nbytes(pp->t)))
                    fail_msg("%s: buffer %s changed at step %d", cname, pp->name, k);
                continue;
            }
            snprintf(name, sizeof name, "%s.step%d.%s", cname, k, pp->name);
            worst = fmax(worst, check_tensor(kd_f32(pp->t), need(name), name));
        }
    /* Every state tensor kd names exists in torch's state, and no torch state is missing. */
    int want_states = 0;
    char prefix[128];
    snprintf(prefix, sizeof prefix, "%s.step%d.", cname, k);
    for (int i = 0; i < kd_st_count(g_fx.f); i++) {
        const char *en = kd_st_get(g_fx.f, i)->name;
        size_t pl = strlen(prefix);
        if (strncmp(en, prefix, pl) == 0 &&
            (strstr(en + pl, ".momentum_buffer") || strstr(en + pl, ".exp_avg")))
            want_states++;
    }
    assert_int_equal(kd_optim_state_count(o), want_states);
    for (int i = 0; i < kd_optim_state_count(o); i++) {
        const char *sn;
        kd_tensor *st;
        KD_ASSERT_OK(kd_optim_state_get(o, i, &sn, &st));
        snprintf(name, sizeof name, "%s.step%d.%s", cname, k, sn);
        worst = fmax(worst, check_tensor(kd_f32(st), need(name), name));
    }
    return worst;
}

static void run_case(const char *cname, int resume_at) {
    char key[160];
    snprintf(key, sizeof key, "case.%s", cname);
    kd_optim_cfg c;
    double lrs[64];
    int has_lrs;
    assert_true(g_fx.steps <= 64);
    parse_case(need_meta(key), &c, lrs, &has_lrs);
    reset_params();
    kd_optim *o = make_optim(&c);
    const kd_st_entry *norms = NULL;
    if (c.clip_grad_norm > 0) {
        snprintf(key, sizeof key, "%s.norm", cname);
        norms = need(key);
    }
    double worst = 0;
    for (int k = 1; k <= g_fx.steps; k++) {
        if (k == resume_at + 1) {
            /* A checkpoint and a fresh optimiser: the state tensors and the
             * step count carry everything. */
            kd_optim *o2 = make_optim(&c);
            assert_int_equal(kd_optim_state_count(o2), kd_optim_state_count(o));
            for (int i = 0; i < kd_optim_state_count(o); i++) {
                const char *n1, *n2;
                kd_tensor *t1, *t2;
                KD_ASSERT_OK(kd_optim_state_get(o, i, &n1, &t1));
                KD_ASSERT_OK(kd_optim_state_get(o2, i, &n2, &t2));
                assert_string_equal(n1, n2);
                memcpy(t2->data, t1->data, kd_tensor_nbytes(t1));
            }
            kd_optim_state_loaded(o2, kd_optim_steps(o));
            kd_optim_free(o);
            o = o2;
        }
        if (has_lrs) kd_optim_set_lr(o, lrs[k - 1]);
        set_grads(k);
        KD_ASSERT_OK(kd_optim_step(o));
        assert_int_equal(kd_optim_steps(o), k);
        if (norms) {
            double want = ((const float *)norms->data)[k - 1], got = kd_optim_last_grad_norm(o);
            if (!(fabs(got - want) <= 1e-6 * want))
                fail_msg("%s step %d: gradient norm %.9g, torch %.9g", cname, k, got, want);
        }
        worst = fmax(worst, check_step(o, cname, k));
    }
    if (!resume_at) printf("  %-24s %d steps: at most %.0f%% of the tolerance\n", cname, g_fx.steps, 100 * worst);
    kd_optim_free(o);
}

static void for_each_case(int resume_at) {
    char list[1024];
    snprintf(list, sizeof list, "%s", need_meta("cases"));
    int n = 0;
    for (char *save = NULL, *c = strtok_r(list, ",", &save); c; c = strtok_r(NULL, ",", &save), n++)
        run_case(c, resume_at);
    assert_true(n >= 10);
}

static void test_cases_vs_torch(void **state) {
    (void)state;
    for_each_case(0);
}

static void test_cases_resumed(void **state) {
    (void)state;
    for_each_case(3);
}

/* The cases cover what the brief of each optimiser asks for. */
static void test_cases_cover(void **state) {
    (void)state;
    const char *must[] = {"sgd", "sgd_nesterov", "sgd_nodecay", "sgd_lr_change", "sgd_clip", "adamw",
                          "adamw_nodecay", "lars", "lars_nodecay"};
    char key[64];
    for (size_t i = 0; i < sizeof must / sizeof must[0]; i++) {
        snprintf(key, sizeof key, "case.%s", must[i]);
        need_meta(key);
    }
}

/* kd_sched against SimCLR's WarmUpAndCosineDecay, per step. */
static void test_schedule_vs_reference(void **state) {
    (void)state;
    char list[512];
    snprintf(list, sizeof list, "%s", need_meta("scheds"));
    int n = 0;
    for (char *save = NULL, *nm = strtok_r(list, ",", &save); nm; nm = strtok_r(NULL, ",", &save), n++) {
        char key[160];
        snprintf(key, sizeof key, "sched.%s", nm);
        double base = 0, floor_lr = 0;
        int epochs = 0, warm = 0, spe = 0;
        if (sscanf(need_meta(key), "base_lr=%lf min_lr=%lf epochs=%d warmup_epochs=%d steps_per_epoch=%d", &base,
                   &floor_lr, &epochs, &warm, &spe) != 5)
            fail_msg("cannot read %s", key);
        kd_sched s = {.kind = KD_SCHED_COSINE, .base_lr = (float)base, .epochs = epochs, .min_lr = (float)floor_lr,
                      .warmup_epochs = warm};
        snprintf(key, sizeof key, "sched.%s.lr", nm);
        const kd_st_entry *e = need(key);
        assert_int_equal((int64_t)(e->nbytes / 4), (int64_t)epochs * spe);
        for (int ep = 0; ep < epochs; ep++)
            for (int st = 0; st < spe; st++) {
                float want = ((const float *)e->data)[ep * spe + st];
                float got = kd_sched_lr(&s, ep, st, spe);
                if (!(fabs((double)got - want) <= 1e-6 * fabs((double)want) + 1e-9))
                    fail_msg("%s: epoch %d step %d: lr %.9g, reference %.9g", nm, ep, st, got, want);
            }
        /* Beyond the last step the cosine stays at its floor. */
        assert_float_equal(kd_sched_lr(&s, epochs + 3, 0, spe), floor_lr, 1e-7);
    }
    assert_true(n >= 3);
}

/* Settings torch refuses are refused, naming the setting. */
static void test_bad_settings(void **state) {
    (void)state;
    kd_param_group groups[NGROUPS] = {{"", &g_fx.pl[0], 1.0f}, {"distill.", &g_fx.pl[1], 0.5f}};
    kd_optim *o = NULL;
    kd_optim_cfg c = kd_optim_defaults(KD_OPTIM_SGD);
    c.nesterov = 1;
    c.momentum = 0;
    assert_int_equal(kd_optim_init(&o, groups, NGROUPS, &c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "nesterov"));
    c = kd_optim_defaults(KD_OPTIM_SGD);
    c.lr = -0.1;
    assert_int_equal(kd_optim_init(&o, groups, NGROUPS, &c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "lr"));
    c = kd_optim_defaults(KD_OPTIM_ADAMW);
    c.beta2 = 1.0;
    assert_int_equal(kd_optim_init(&o, groups, NGROUPS, &c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "betas"));
    c = kd_optim_defaults(KD_OPTIM_LARS);
    c.trust_coef = 0;
    assert_int_equal(kd_optim_init(&o, groups, NGROUPS, &c), KD_ERR_INVALID);
    assert_non_null(strstr(kd_last_error(), "trust"));
    assert_null(o);
    kd_optim_kind k;
    assert_int_equal(kd_optim_kind_parse("adamw", &k), KD_OK);
    assert_int_equal(k, KD_OPTIM_ADAMW);
    assert_int_equal(kd_optim_kind_parse("adam", &k), KD_ERR_NOT_FOUND);
    assert_string_equal(kd_optim_kind_name(KD_OPTIM_LARS), "lars");
    /* torch's defaults. */
    c = kd_optim_defaults(KD_OPTIM_ADAMW);
    assert_true(c.beta1 == 0.9 && c.beta2 == 0.999 && c.eps == 1e-8 && c.weight_decay == 1e-2);
    c = kd_optim_defaults(KD_OPTIM_LARS);
    assert_true(c.momentum == 0.9 && c.trust_coef == 1e-3);
}

/* State names are whole whatever the length of the parameter's name; a
 * non-finite gradient under clipping is refused before any update. */
static void test_long_names_and_nonfinite(void **state) {
    (void)state;
    kd_param_list pl = {0};
    char longname[127]; /* kd_param names hold up to 127 characters */
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    memcpy(longname + sizeof longname - 8, ".weight", 8);
    int64_t shape[1] = {3};
    kd_tensor *w = NULL;
    KD_ASSERT_OK(kd_params_new(&pl, "", longname, KD_F32, 1, shape, KD_PARAM_WEIGHT, &w));
    kd_param_group grp = {"a.long.prefix.of.a.method.with.modules.", &pl, 1.0f};
    kd_optim_cfg c = kd_optim_defaults(KD_OPTIM_ADAMW);
    c.clip_grad_norm = 1.0;
    kd_optim *o = NULL;
    KD_ASSERT_OK(kd_optim_init(&o, &grp, 1, &c));
    assert_int_equal(kd_optim_state_count(o), 2);
    const char *sn;
    kd_tensor *st;
    KD_ASSERT_OK(kd_optim_state_get(o, 1, &sn, &st));
    char want[512];
    snprintf(want, sizeof want, "a.long.prefix.of.a.method.with.modules.%s.exp_avg_sq", longname);
    assert_string_equal(sn, want);
    assert_int_not_equal(kd_optim_state_get(o, 2, &sn, &st), KD_OK);
    for (int j = 0; j < 3; j++) kd_f32(w)[j] = 1.0f;
    kd_f32(w->grad)[0] = NAN;
    assert_int_equal(kd_optim_step(o), KD_ERR_NUMERIC);
    for (int j = 0; j < 3; j++) assert_true(kd_f32(w)[j] == 1.0f);
    assert_int_equal(kd_optim_steps(o), 0);
    kd_optim_free(o);
    kd_params_free(&pl);
}

/* kd_optim_hold (DINO's frozen last layer): a tensor held for the first 2
 * steps is untouched by them (no decay either), then moves exactly as in a
 * fresh optimiser that starts at step 2 (torch skips a parameter whose grad
 * is None: its AdamW step count and SGD momentum start at its own first
 * update); the other tensor of the held optimiser is unaffected, and a
 * per-step weight decay (kd_optim_set_weight_decay) applies to both. */
static void test_hold_and_wd_schedule(void **state) {
    (void)state;
    for (int kind = 0; kind < 2; kind++) {
        kd_param_list pa = {0}, pb = {0}, pc = {0};
        kd_tensor *a1, *a2, *b1, *c2;
        int64_t sh[1] = {5};
        KD_ASSERT_OK(kd_params_new(&pa, "", "w1", KD_F32, 1, sh, KD_PARAM_WEIGHT, &a1));
        KD_ASSERT_OK(kd_params_new(&pa, "", "w2", KD_F32, 1, sh, KD_PARAM_WEIGHT, &a2));
        KD_ASSERT_OK(kd_params_new(&pb, "", "w1", KD_F32, 1, sh, KD_PARAM_WEIGHT, &b1));
        KD_ASSERT_OK(kd_params_new(&pc, "", "w2", KD_F32, 1, sh, KD_PARAM_WEIGHT, &c2));
        kd_tensor *all[4] = {a1, a2, b1, c2};
        for (int t = 0; t < 4; t++) {
            assert_non_null(all[t]->grad); /* kd_params_new gives a trainable tensor its gradient */
            for (int j = 0; j < 5; j++) kd_f32(all[t])[j] = 0.5f + 0.25f * (float)j * (t % 2 ? -1.0f : 1.0f);
        }
        kd_optim_cfg c = kd_optim_defaults(kind ? KD_OPTIM_SGD : KD_OPTIM_ADAMW);
        c.lr = 0.01;
        c.weight_decay = 0.1;
        kd_optim *oa, *ob, *oc;
        kd_param_group ga = {"", &pa, 1.0f}, gb = {"", &pb, 1.0f}, gc = {"", &pc, 1.0f};
        KD_ASSERT_OK(kd_optim_init(&oa, &ga, 1, &c));
        KD_ASSERT_OK(kd_optim_init(&ob, &gb, 1, &c));
        KD_ASSERT_OK(kd_optim_init(&oc, &gc, 1, &c));
        assert_int_equal(kd_optim_hold(oa, b1, 2), KD_ERR_NOT_FOUND);
        float start[5];
        memcpy(start, kd_f32(a1), sizeof start);
        for (int k = 0; k < 5; k++) {
            KD_ASSERT_OK(kd_optim_hold(oa, a1, 2)); /* set again every step, as DINO does */
            const double wd = 0.1 + 0.05 * k;
            kd_optim_set_weight_decay(oa, wd);
            kd_optim_set_weight_decay(ob, wd);
            kd_optim_set_weight_decay(oc, wd);
            for (int j = 0; j < 5; j++) {
                kd_f32(a1->grad)[j] = kd_f32(b1->grad)[j] = 0.3f * (float)(k + 1) - 0.1f * (float)j;
                kd_f32(a2->grad)[j] = kd_f32(c2->grad)[j] = 0.2f * (float)j - 0.1f * (float)k;
            }
            KD_ASSERT_OK(kd_optim_step(oa));
            KD_ASSERT_OK(kd_optim_step(oc));
            if (k >= 2) KD_ASSERT_OK(kd_optim_step(ob));
            if (k < 2) assert_memory_equal(kd_f32(a1), start, sizeof start);
        }
        assert_true(kd_optim_base_weight_decay(oa) == 0.1);
        assert_memory_equal(kd_f32(a1), kd_f32(b1), 5 * sizeof(float));
        assert_memory_equal(kd_f32(a2), kd_f32(c2), 5 * sizeof(float));
        assert_memory_not_equal(kd_f32(a1), start, sizeof start);
        kd_optim_free(oa);
        kd_optim_free(ob);
        kd_optim_free(oc);
        kd_params_free(&pa);
        kd_params_free(&pb);
        kd_params_free(&pc);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cases_cover),
        cmocka_unit_test(test_cases_vs_torch),
        cmocka_unit_test(test_cases_resumed),
        cmocka_unit_test(test_schedule_vs_reference),
        cmocka_unit_test(test_bad_settings),
        cmocka_unit_test(test_long_names_and_nonfinite),
        cmocka_unit_test(test_hold_and_wd_schedule),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
