/*
 * test_swin.c: the Swin Transformers (src/models/swin.c).
 *
 *   - Parameter counts with 1000 classes: swin_t, swin_s, swin_b against
 *     torchvision's published figures, the small variants against the
 *     fixture (torchvision's SwinTransformer built with their settings).
 *   - A PyTorch round trip per case of tests/fixtures/swin_models.safetensors
 *     (tools/gen_swin_fixtures.py: swin_t at 224x224, swin_cifar at 16x16,
 *     swin_mnist at 28x28 and 14x14, the last two padding maps to the window
 *     and merging an odd map): names, shapes and order equal torchvision's
 *     state_dict; the torchvision file loads; eval-mode logits and pooled
 *     embedding match the float64 PyTorch forward within 1e-4 * max(1,
 *     max|want|) on the default backend (and on "ref" for the small cases);
 *     the gradients of sum(logits * R) for every parameter match PyTorch's
 *     through two projections per tensor (dot with a generated tensor and
 *     the L2 norm, relative 2e-3); load + save gives torchvision's file back.
 *   - One training step per variant (stochastic depth on): every trainable
 *     tensor gets a finite, non-zero gradient.
 *   - Bad input: an image the patch does not divide, a map the window
 *     neither divides nor holds, a checkpoint of another Swin variant: one
 *     error naming the sizes.
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/autograd.h"
#include "kd/io.h"
#include "kd/models.h"
#include "kd/train.h"

#define TOL 1e-4
#define GRAD_TOL 2e-3

static kd_st_file *g_fx;
static int g_verbose;

static kd_model *create(const char *arch, int in_ch, int num_classes) {
    kd_model *m = NULL;
    kd_model_cfg cfg = {.in_channels = in_ch, .num_classes = num_classes, .seed = 7};
    if (kd_model_create(arch, &cfg, &m) != KD_OK) fail_msg("%s: %s", arch, kd_last_error());
    return m;
}

static void test_param_counts(void **state) {
    (void)state;
    static const struct {
        const char *arch;
        int64_t n;
    } tv[] = {{"swin_t", 28288354}, {"swin_s", 49606258}, {"swin_b", 87768224}};
    for (size_t i = 0; i < sizeof tv / sizeof tv[0]; i++) {
        kd_model *m = create(tv[i].arch, 3, 1000);
        if (kd_model_num_params(m) != tv[i].n)
            fail_msg("%s: %lld parameters, torchvision has %lld", tv[i].arch, (long long)kd_model_num_params(m),
                     (long long)tv[i].n);
        kd_model_free(m);
    }
    if (!g_fx) fail_msg("cannot open %s", KD_FIXTURE("swin_models.safetensors"));
    const char *small[] = {"swin_cifar", "swin_mnist"};
    for (int i = 0; i < 2; i++) {
        kd_json *meta = kd_test_st_meta_json(g_fx, small[i]);
        int64_t want = (int64_t)kd_json_get(meta, "num_params_1000")->number;
        kd_model *m = create(small[i], 3, 1000);
        if (g_verbose) printf("    %-12s %lld parameters\n", small[i], (long long)kd_model_num_params(m));
        if (kd_model_num_params(m) != want)
            fail_msg("%s: %lld parameters, torchvision's SwinTransformer has %lld", small[i],
                     (long long)kd_model_num_params(m), (long long)want);
        kd_model_free(m);
        kd_json_free(meta);
    }
}

/* d(sum(logits * R))/d(param) against the fixture's projections. */
static void check_grads(const char *ctx, kd_model *m, const kd_json *meta, const kd_st_entry *dot,
                        const kd_st_entry *nrm) {
    const kd_json *gn = kd_test_json_array(meta, "grad_names"), *names = kd_test_json_array(meta, "names");
    if (dot->shape[0] != gn->count) fail_msg("%s: fixture has %lld gradient rows for %lld names", ctx,
                                             (long long)dot->shape[0], (long long)gn->count);
    kd_param_list *pl = kd_model_params(m);
    double worst = 0;
    for (int64_t i = 0; i < gn->count; i++) {
        const char *name = gn->items[i].string;
        kd_param *p = kd_params_find(pl, name);
        if (!p) fail_msg("%s: no parameter %s", ctx, name);
        int64_t t_idx = -1;
        for (int64_t k = 0; k < names->count; k++)
            if (strcmp(names->items[k].string, name) == 0) t_idx = k;
        if (!p->t->grad) fail_msg("%s: %s has no gradient", ctx, name);
        int64_t n = kd_tensor_numel(p->t);
        float *w = malloc((size_t)n * sizeof *w);
        assert_non_null(w);
        kd_test_gen_weight(w, n, (uint64_t)(5000 + t_idx), 3);
        const float *gr = kd_f32(p->t->grad);
        double d = 0, s2 = 0, w2 = 0;
        for (int64_t j = 0; j < n; j++) {
            d += (double)gr[j] * w[j];
            s2 += (double)gr[j] * gr[j];
            w2 += (double)w[j] * w[j];
        }
        free(w);
        double want_d = ((const float *)dot->data)[i], want_n = ((const float *)nrm->data)[i];
        double ed = fabs(d - want_d) / (want_n * sqrt(w2) + 1e-12), en = fabs(sqrt(s2) - want_n) / (want_n + 1e-12);
        if (!(ed <= GRAD_TOL) || !(en <= GRAD_TOL))
            fail_msg("%s: gradient of %s: dot %.8g want %.8g, norm %.8g want %.8g", ctx, name, d, want_d, sqrt(s2),
                     want_n);
        worst = fmax(worst, fmax(ed, en));
    }
    if (g_verbose) printf("    %-24s %lld gradients, worst relative error %.3g\n", ctx, (long long)gn->count, worst);
}

static void test_roundtrip(void **state) {
    const char *cs = *state;
    if (!g_fx) fail_msg("cannot open %s", KD_FIXTURE("swin_models.safetensors"));
    kd_json *meta = kd_test_st_meta_json(g_fx, cs);
    const char *arch = kd_json_get(meta, "arch")->string;
    const char *sd_case = kd_json_get(meta, "sd_case")->string;
    int in_ch = (int)kd_json_get(meta, "in_channels")->number;
    kd_model *m = create(arch, in_ch, (int)kd_json_get(meta, "num_classes")->number);
    kd_test_check_state_dict_names(arch, m, meta);

    const char *dir = kd_test_tmpdir(cs);
    char tv_path[1200], kd_path[1200];
    snprintf(tv_path, sizeof tv_path, "%s/torchvision.safetensors", dir);
    snprintf(kd_path, sizeof kd_path, "%s/kd.safetensors", dir);
    kd_test_write_state_dict(g_fx, sd_case, meta, tv_path);
    KD_ASSERT_OK(kd_model_load(m, tv_path));
    kd_model_set_training(m, 0);

    const kd_json *in = kd_test_json_array(meta, "input");
    int64_t xs[4];
    for (int d = 0; d < 4; d++) xs[d] = (int64_t)in->items[d].number;
    int64_t xn = xs[0] * xs[1] * xs[2] * xs[3];
    float *xbuf = malloc((size_t)xn * sizeof *xbuf);
    assert_non_null(xbuf);
    kd_test_gen_weight(xbuf, xn, (uint64_t)kd_json_get(meta, "input_key")->number, 3);
    int64_t rs[2] = {xs[0], 10};
    float rbuf[64];
    assert_true(xs[0] * 10 <= 64);
    kd_test_gen_weight(rbuf, rs[0] * rs[1], 4000, 3);

    const kd_st_entry *le = kd_test_st_entry(g_fx, "%s.logits", cs), *ee = kd_test_st_entry(g_fx, "%s.emb", cs);
    const kd_st_entry *gd = kd_test_st_entry(g_fx, "%s.grad_dot", cs), *gnrm = kd_test_st_entry(g_fx, "%s.grad_norm", cs);
    int with_ref = strcmp(arch, "swin_t") != 0;
    kd_backend *bes[2] = {kd_backend_default(), NULL};
    if (with_ref && strcmp(bes[0]->name, "ref") != 0) KD_ASSERT_OK(kd_backend_get("ref", &bes[1]));
    for (int b = 0; b < 2 && bes[b]; b++) {
        kd_backend *be = bes[b];
        kd_graph *g = NULL;
        KD_ASSERT_OK(kd_graph_init(&g, be));
        kd_tensor *x = kd_graph_wrap(g, KD_F32, 4, xs, xbuf);
        kd_model_out o;
        if (kd_model_forward(m, g, x, 0, &o) != KD_OK)
            fail_msg("%s [%s]: forward failed: %s", cs, be->name, kd_last_error());
        char what[128];
        snprintf(what, sizeof what, "%s [%s] logits", cs, be->name);
        double dl = kd_test_compare_scaled(what, o.logits, le, TOL);
        snprintf(what, sizeof what, "%s [%s] embedding", cs, be->name);
        double de = kd_test_compare_scaled(what, o.feat[o.n_feat - 1], ee, TOL);
        if (g_verbose) printf("    %-14s [%s] max |diff| logits %.3g, embedding %.3g\n", cs, be->name, dl, de);
        /* Features: n_feat = stages + 2, channels doubling, the final map NCHW. */
        const kd_tensor *fm = o.feat[o.n_feat - 2];
        if (fm->ndim != 4 || fm->shape[1] != kd_model_feat_dim(m))
            fail_msg("%s: the final map is not (N, %lld, H, W)", cs, (long long)kd_model_feat_dim(m));
        kd_params_zero_grad(kd_model_params(m));
        kd_tensor *R = kd_graph_wrap(g, KD_F32, 2, rs, rbuf);
        KD_ASSERT_OK(kd_backward(g, kd_sum(g, kd_mul(g, o.logits, R))));
        snprintf(what, sizeof what, "%s [%s]", cs, be->name);
        check_grads(what, m, meta, gd, gnrm);
        kd_graph_free(g);
    }
    free(xbuf);
    KD_ASSERT_OK(kd_model_save(m, kd_path));
    char msg[2048];
    if (kd_test_ckpts_differ(tv_path, kd_path, KD_TEST_CKPT_ALL, msg, sizeof msg))
        fail_msg("%s: load + save: %s", cs, msg);
    kd_model_free(m);
    kd_json_free(meta);
}

typedef struct {
    const char *arch;
    int in_ch;
    int64_t hw;
} train_case;

static void test_train_step(void **state) {
    const train_case *tc = *state;
    kd_model *m = create(tc->arch, tc->in_ch, 10);
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, kd_backend_default()));
    kd_graph_set_rng(g, 3, 1);
    int64_t xs[4] = {4, tc->in_ch, tc->hw, tc->hw}, ys[1] = {4};
    kd_tensor *x = kd_graph_tensor(g, KD_F32, 4, xs);
    kd_tensor *y = kd_graph_tensor(g, KD_I32, 1, ys);
    kd_test_fill_uniform(kd_f32(x), kd_tensor_numel(x), -2, 2, 11);
    for (int i = 0; i < 4; i++) ((int32_t *)y->data)[i] = 2 * i + 1;
    kd_model_out o;
    if (kd_model_forward(m, g, x, 0, &o) != KD_OK) fail_msg("%s: training forward failed: %s", tc->arch, kd_last_error());
    KD_ASSERT_OK(kd_backward(g, kd_cross_entropy(g, o.logits, y, 0.0f)));
    kd_test_check_param_grads(tc->arch, kd_model_params(m));
    kd_graph_free(g);
    kd_model_free(m);
}

static void expect_forward_error(const char *arch, int64_t hw, const char *a, const char *b) {
    kd_model *m = create(arch, 3, 10);
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, kd_backend_default()));
    kd_graph_set_grad_enabled(g, 0);
    int64_t xs[4] = {1, 3, hw, hw};
    kd_tensor *x = kd_graph_zeros(g, KD_F32, 4, xs);
    kd_model_out o;
    kd_status s = kd_model_forward(m, g, x, 0, &o);
    if (s == KD_OK) fail_msg("%s accepted a %lldx%lld image", arch, (long long)hw, (long long)hw);
    const char *msg = kd_last_error();
    if (!strstr(msg, a) || !strstr(msg, b)) fail_msg("%s at %lld: message '%s' lacks '%s' or '%s'", arch, (long long)hw, msg, a, b);
    kd_graph_free(g);
    kd_model_free(m);
}

static void test_bad_input(void **state) {
    (void)state;
    expect_forward_error("swin_t", 30, "30x30", "patch size 4");
    expect_forward_error("swin_t", 64, "16x16", "window size 7");
    expect_forward_error("swin_cifar", 24, "6x6", "window size 4");
    /* A swin_s checkpoint into swin_t: refused, naming a tensor and sizes. */
    kd_model *s = create("swin_cifar", 3, 10), *t = create("swin_mnist", 3, 10);
    const char *dir = kd_test_tmpdir("swin_bad");
    char path[1200];
    snprintf(path, sizeof path, "%s/swin_cifar.safetensors", dir);
    KD_ASSERT_OK(kd_model_save(s, path));
    if (kd_model_load(t, path) == KD_OK) fail_msg("swin_mnist loaded a swin_cifar checkpoint");
    const char *msg = kd_last_error();
    if (!strstr(msg, "swin_cifar.safetensors")) fail_msg("message '%s' does not name the file", msg);
    if (g_verbose) printf("    %s\n", msg);
    kd_model_free(s);
    kd_model_free(t);
}

int main(void) {
    g_verbose = getenv("KD_TEST_VERBOSE") != NULL;
    if (kd_st_open(KD_FIXTURE("swin_models.safetensors"), &g_fx) != KD_OK) g_fx = NULL;
    static const char *cases[] = {"swin_t", "swin_cifar", "swin_mnist", "swin_mnist_14"};
    static const train_case tcs[] = {{"swin_t", 3, 112}, {"swin_cifar", 3, 32}, {"swin_mnist", 1, 28}};
    struct CMUnitTest tests[16];
    char names[16][64];
    int k = 0;
    tests[k++] = (struct CMUnitTest)cmocka_unit_test(test_param_counts);
    for (int i = 0; i < 4; i++) {
        snprintf(names[k], sizeof names[0], "roundtrip/%s", cases[i]);
        tests[k] = (struct CMUnitTest){names[k], test_roundtrip, NULL, NULL, (void *)cases[i]};
        k++;
    }
    for (int i = 0; i < 3; i++) {
        snprintf(names[k], sizeof names[0], "train_step/%s", tcs[i].arch);
        tests[k] = (struct CMUnitTest){names[k], test_train_step, NULL, NULL, (void *)&tcs[i]};
        k++;
    }
    tests[k++] = (struct CMUnitTest)cmocka_unit_test(test_bad_input);
    int rc = _cmocka_run_group_tests("swin", tests, (size_t)k, NULL, NULL);
    if (g_fx) kd_st_close(g_fx);
    return rc;
}
