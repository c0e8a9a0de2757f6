/* Five full distillation steps, teacher resnet20 -> student resnet8, through
 * the public kd_train_step against PyTorch (tests/fixtures/distill_steps,
 * made by tools/gen_distill_steps.py from the method references in
 * tools/distill_refs/, the same references tests/test_distill.c checks).
 *
 * Per method: the models and the method's modules start from the fixture's
 * values; each step runs the teacher in eval mode and the student and the
 * method's modules in train mode, at epoch index 4 (the fixture's "epoch"),
 * with the method's published weights (kd_distill_defaults, checked against
 * the fixture's) and SGD lr 0.05, momentum 0.9, weight decay 5e-4 over the
 * student and the method's modules. Every weighted term and the total of
 * every step, and after step 5 every student tensor (batch-norm statistics
 * included) and every tensor of the method's modules are compared.
 *
 * Tolerances. The reference runs in float64, so what is measured is kd's
 * float32 error: kd (cpu and ref backends, 1 or 2 threads) agrees with it to
 * <= 3e-6 relative in every loss and <= 2e-5 absolute in every final tensor
 * (1e-6 for most). The trajectories are well conditioned (random 1e-7
 * perturbations of the float64 run's weights end ~3e-7 away) except at
 * discrete events: PyTorch's own float32 AT run jumps from 2e-7 to 3e-5 at
 * step 3 and ends 1.4e-3 off in the parameters and 6e-5 in the step-5 loss,
 * the kind of ReLU pre-activation crossing zero under float32 rounding that
 * tests/test_models.c describes; a different summation order (another CPU's
 * kernels) could put kd there too. So the base tolerances, loss terms 1e-4
 * relative and parameters 1e-3 absolute + 1e-3 relative (as test_models'
 * steps 4-5), widen to 10x that float32 spread, which the fixture stores
 * (per step for the loss, over all tensors for the parameters), where it
 * exceeds them. A real error moves the step-2 loss by ~lr |g|^2 / L (percents
 * here: a wrong momentum of 0.905 or a DKD warm-up one epoch off fails at
 * once) and the parameters by ~lr |g| ~ 1e-2, well outside either.
 *
 * CRD: the training set is the five batches in order (40 images, so
 * crd.nce_k 16 as the fixture's args say); its memory banks move after every
 * step and are compared after step 5 with the other module tensors; its
 * sampler's draw is random, so each step takes the fixture's draw
 * (crd.step<k>.idx, through kd__crd_set_draw) instead. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "distill/crd.h"
#include "kd/io.h"
#include "kd/train.h"
#include "testutil.h"
#include "train/train_impl.h"

#define STEPS_FIXTURE KD_FIXTURE("distill_steps.safetensors")

/* Base tolerances (see the header comment). */
#define TOL_LOSS_REL 1e-4
#define TOL_PARAM_ABS 1e-3
#define TOL_PARAM_REL 1e-3
#define SPREAD_FACTOR 10.0

static const kd_json *json_member(const kd_json *o, const char *key, kd_json_type type, const char *what) {
    const kd_json *v = kd_json_get(o, key);
    if (!v || v->type != type) fail_msg("%s: no \"%s\" of the expected type", what, key);
    return v;
}

/* Compares every tensor of pl with "<prefix><name>" (same dtype and shape);
 * int64 counters exactly. Returns the largest absolute float deviation. */
static double compare_prefixed(kd_param_list *pl, const kd_st_file *f, const char *prefix, double atol,
                               double rtol, const char *what) {
    double worst = 0;
    for (int i = 0; i < pl->n; i++) {
        const kd_st_entry *e = kd_test_st_entry(f, "%s%s", prefix, pl->items[i].name);
        const char *name = e->name;
        kd_tensor *t = pl->items[i].t;
        if ((int64_t)e->nbytes != kd_tensor_numel(t) * (int64_t)kd_dtype_size(t->dtype) || e->dtype != t->dtype)
            fail_msg("%s: %s differs in dtype or size from the fixture", what, name);
        if (t->dtype == KD_I64) {
            for (int64_t j = 0; j < kd_tensor_numel(t); j++)
                if (((const int64_t *)t->data)[j] != ((const int64_t *)e->data)[j])
                    fail_msg("%s: %s is %lld, PyTorch %lld", what, name, (long long)((const int64_t *)t->data)[j],
                             (long long)((const int64_t *)e->data)[j]);
            continue;
        }
        double d = KD_ASSERT_CLOSE(kd_f32(t), (const float *)e->data, kd_tensor_numel(t), atol, rtol, name);
        if (d > worst) worst = d;
    }
    return worst;
}

/* CRD: the fixture's draw of step global_step + 1 in place of the sampler's. */
static kd_status fixture_draw(void *user, const kd_step_ctx *ctx, int64_t K, int64_t *out) {
    const kd_st_file *f = user;
    const kd_st_entry *e = kd_test_st_entry(f, "crd.step%d.idx", (int)ctx->global_step + 1);
    if (e->dtype != KD_I64 || e->ndim != 2 || e->shape[0] != ctx->batch->n || e->shape[1] != K + 1)
        fail_msg("%s: crd.step%d.idx is not (%lld, %lld) int64", kd_st_path(f), (int)ctx->global_step + 1,
                 (long long)ctx->batch->n, (long long)(K + 1));
    memcpy(out, e->data, e->nbytes);
    return KD_OK;
}

static void run_method(const char *method, const char *backend) {
    kd_backend *be = NULL;
    if (kd_backend_get(backend, &be) != KD_OK) {
        printf("  backend %s not built: skipped\n", backend);
        return;
    }
    if (!kd_method_find(method)) fail_msg("method %s is not registered", method);
    kd_st_file *f = NULL;
    KD_ASSERT_OK(kd_st_open(STEPS_FIXTURE, &f));
    const char *meta = kd_st_meta(f, method);
    if (!meta) fail_msg("%s has no trajectory for %s: run tools/gen_distill_steps.py", STEPS_FIXTURE, method);
    kd_json *mj = NULL;
    KD_ASSERT_OK(kd_json_parse(meta, strlen(meta), method, &mj));
    const int steps = atoi(kd_st_meta(f, "steps")), epoch = atoi(kd_st_meta(f, "epoch"));
    const int64_t n = atoll(kd_st_meta(f, "batch"));
    const int classes = atoi(kd_st_meta(f, "classes"));
    const float lr = strtof(kd_st_meta(f, "lr"), NULL);

    /* The published weights kd uses are the ones the fixture was made with. */
    kd_distill_cfg dc = kd_distill_defaults(method);
    const kd_json *args = json_member(mj, "args", KD_JSON_OBJECT, method);
    for (int64_t i = 0; i < args->count; i++) {
        char key[128];
        snprintf(key, sizeof key, "%s.%s", method, args->keys[i]);
        KD_ASSERT_OK(kd_distill_cfg_set_arg(&dc, key, args->items[i].string));
    }
    const kd_json *w = json_member(mj, "weights", KD_JSON_OBJECT, method);
    const struct {
        const char *key;
        float v;
    } weights[] = {{"gamma", dc.gamma}, {"alpha", dc.alpha}, {"beta", dc.beta}, {"T", dc.T}};
    for (int i = 0; i < 4; i++) {
        double want = json_member(w, weights[i].key, KD_JSON_NUMBER, method)->number;
        if (fabs(weights[i].v - want) > 1e-6 * fabs(want))
            fail_msg("%s: kd's %s is %g, the fixture's %g", method, weights[i].key, weights[i].v, want);
    }
    const kd_method_def *def = kd_method_find(method);
    if (def->feat_flags & KD_FWD_PREACT)
        fail_msg("%s reads pre-activation features; the fixture was made with post-activation ones", method);
    const kd_json *spread = json_member(mj, "f32_spread", KD_JSON_OBJECT, method);
    const kd_json *loss_spread = json_member(spread, "loss_rel", KD_JSON_ARRAY, method);
    if (loss_spread->count != steps) fail_msg("%s: %lld loss spreads for %d steps", method,
                                              (long long)loss_spread->count, steps);
    const double param_spread = json_member(spread, "param_abs", KD_JSON_NUMBER, method)->number;

    kd_model_cfg mc = {.in_channels = 3, .num_classes = classes, .seed = 0};
    kd_model *student = NULL, *teacher = NULL;
    KD_ASSERT_OK(kd_model_create(kd_st_meta(f, "student"), &mc, &student));
    KD_ASSERT_OK(kd_model_create(kd_st_meta(f, "teacher"), &mc, &teacher));
    assert_int_equal(kd_model_params(student)->n, kd_test_st_count_prefixed(f, "student."));
    assert_int_equal(kd_model_params(teacher)->n, kd_test_st_count_prefixed(f, "teacher."));
    KD_ASSERT_OK(kd__load_params(kd_model_params(student), f, "student."));
    KD_ASSERT_OK(kd__load_params(kd_model_params(teacher), f, "teacher."));
    kd_model_set_training(teacher, 0);
    kd_model_set_training(student, 1);

    kd_optim_cfg oc = kd_optim_defaults(KD_OPTIM_SGD);
    oc.lr = lr;
    oc.momentum = strtof(kd_st_meta(f, "momentum"), NULL);
    oc.weight_decay = strtof(kd_st_meta(f, "weight_decay"), NULL);
    kd_sched sc = {.kind = KD_SCHED_CONSTANT, .base_lr = lr, .epochs = epoch + 1};
    kd_trainer_cfg tc = {.student = student,
                         .teacher = teacher,
                         .method = dc,
                         .optim = oc,
                         .sched = sc,
                         .be = be,
                         .precision = KD_F32,
                         .in_channels = 3,
                         .height = 32,
                         .width = 32,
                         .num_classes = classes,
                         .n_train = n * steps,
                         .seed = 0};
    /* The training set is the batches in order (labels for CRD's sampler). */
    int32_t *train_labels = malloc(sizeof(int32_t) * (size_t)(n * steps));
    assert_non_null(train_labels);
    for (int k = 1; k <= steps; k++) {
        const kd_st_entry *ey = kd_test_st_entry(f, "batch%d.y", k);
        for (int64_t i = 0; i < n; i++) train_labels[(k - 1) * n + i] = (int32_t)((const int64_t *)ey->data)[i];
    }
    tc.train_labels = train_labels;
    kd_trainer *tr = NULL;
    KD_ASSERT_OK(kd_trainer_init(&tr, &tc));
    free(train_labels);
    if (!strcmp(method, "crd")) kd__crd_set_draw(kd_trainer_method(tr), fixture_draw, f);

    /* The method's modules start from the reference's values (every tensor,
     * by kd's PyTorch-style name, and nothing else). */
    char prefix[128];
    snprintf(prefix, sizeof prefix, "%s.param.", method);
    kd_param_list *mp = kd_method_params(kd_trainer_method(tr));
    assert_int_equal(mp->n, kd_test_st_count_prefixed(f, prefix));
    KD_ASSERT_OK(kd__load_params(mp, f, prefix));

    float *x = malloc(sizeof(float) * (size_t)(n * 3 * 32 * 32));
    int32_t *y = malloc(sizeof(int32_t) * (size_t)n);
    int64_t *index = malloc(sizeof(int64_t) * (size_t)n);
    assert_non_null(x);
    assert_non_null(y);
    assert_non_null(index);
    const kd_json *term_names = json_member(mj, "terms", KD_JSON_ARRAY, method);
    for (int k = 1; k <= steps; k++) {
        const kd_st_entry *ex = kd_test_st_entry(f, "batch%d.x", k), *ey = kd_test_st_entry(f, "batch%d.y", k);
        assert_int_equal(ex->nbytes, sizeof(float) * (size_t)(n * 3 * 32 * 32));
        assert_int_equal(ey->nbytes, sizeof(int64_t) * (size_t)n);
        memcpy(x, ex->data, ex->nbytes);
        for (int64_t i = 0; i < n; i++) {
            y[i] = (int32_t)((const int64_t *)ey->data)[i];
            index[i] = (k - 1) * n + i;
        }
        kd_batch b = {.n = n, .batch = k - 1, .x = x, .y = y, .index = index};
        kd_step_result r;
        KD_ASSERT_OK(kd_train_step(tr, &b, epoch, k - 1, steps, &r));

        double tol = fmax(TOL_LOSS_REL, SPREAD_FACTOR * loss_spread->items[k - 1].number);
        const kd_st_entry *et = kd_test_st_entry(f, "%s.step%d.total", method, k);
        double want = ((const float *)et->data)[0];
        printf("  %s %s step %d: loss %.7g (PyTorch %.7g, rel %.2g, tol %.2g)\n", backend, method, k, r.loss, want,
               fabs(r.loss - want) / fabs(want), tol);
        if (!(fabs(r.loss - want) <= tol * fabs(want)))
            fail_msg("%s step %d: loss %.8g, PyTorch %.8g", method, k, r.loss, want);
        /* The same terms, by name, in kd's order. */
        if (r.n_terms != term_names->count)
            fail_msg("%s step %d: %d terms, PyTorch %lld", method, k, r.n_terms, (long long)term_names->count);
        for (int i = 0; i < r.n_terms; i++) {
            if (strcmp(r.term_names[i], term_names->items[i].string) != 0)
                fail_msg("%s: term %d is '%s', PyTorch '%s'", method, i, r.term_names[i],
                         term_names->items[i].string);
            const kd_st_entry *e = kd_test_st_entry(f, "%s.step%d.term.%s", method, k, r.term_names[i]);
            double tw = ((const float *)e->data)[0], got = r.term_values[i];
            /* Each term within tol of itself, or of the total for a term that
             * is small beside it. */
            if (!(fabs(got - tw) <= tol * (fabs(tw) + 0.01 * fabs(want))))
                fail_msg("%s step %d: term %s %.8g, PyTorch %.8g", method, k, r.term_names[i], got, tw);
        }
    }
    double atol = fmax(TOL_PARAM_ABS, SPREAD_FACTOR * param_spread);
    snprintf(prefix, sizeof prefix, "%s.final.", method);
    double ds = compare_prefixed(kd_model_params(student), f, prefix, atol, TOL_PARAM_REL, method);
    snprintf(prefix, sizeof prefix, "%s.final.distill.", method);
    assert_int_equal(mp->n, kd_test_st_count_prefixed(f, prefix));
    double dm = compare_prefixed(mp, f, prefix, atol, TOL_PARAM_REL, method);
    printf("  %s %s after %d steps: student max |dev| %.2g, method modules %.2g (%d tensors; atol %.2g)\n", backend,
           method, steps, ds, dm, mp->n, atol);
    free(x);
    free(y);
    free(index);
    kd_trainer_free(tr);
    kd_model_free(student);
    kd_model_free(teacher);
    kd_json_free(mj);
    kd_st_close(f);
}

static void test_kd_cpu(void **state) {
    (void)state;
    run_method("kd", "cpu");
}
static void test_fitnet_cpu(void **state) {
    (void)state;
    run_method("fitnet", "cpu");
}
static void test_at_cpu(void **state) {
    (void)state;
    run_method("at", "cpu");
}
static void test_dkd_cpu(void **state) {
    (void)state;
    run_method("dkd", "cpu");
}
static void test_kd_ref(void **state) {
    (void)state;
    run_method("kd", "ref");
}
static void test_fitnet_ref(void **state) {
    (void)state;
    run_method("fitnet", "ref");
}
static void test_at_ref(void **state) {
    (void)state;
    run_method("at", "ref");
}
static void test_dkd_ref(void **state) {
    (void)state;
    run_method("dkd", "ref");
}
static void test_crd_cpu(void **state) {
    (void)state;
    run_method("crd", "cpu");
}
static void test_crd_ref(void **state) {
    (void)state;
    run_method("crd", "ref");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kd_cpu),  cmocka_unit_test(test_fitnet_cpu), cmocka_unit_test(test_at_cpu),
        cmocka_unit_test(test_dkd_cpu), cmocka_unit_test(test_kd_ref),     cmocka_unit_test(test_fitnet_ref),
        cmocka_unit_test(test_at_ref),  cmocka_unit_test(test_dkd_ref),    cmocka_unit_test(test_crd_cpu),
        cmocka_unit_test(test_crd_ref),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
