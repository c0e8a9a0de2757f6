/* RepDistiller's CIFAR zoo against PyTorch, both ways
 * (tests/fixtures/zoo_<arch>.safetensors, written by tools/gen_zoo_fixtures.py).
 *
 * PyTorch -> kd: the fixture's state_dict (stored tensors plus the synthetic
 * Conv2d/Linear tensors regenerated here bit for bit) is assembled into one
 * safetensors file, loaded with kd_model_load (every name and shape checked),
 * and the eval-mode logits on the fixture's input must equal PyTorch's within
 * 1e-4; the is_feat=True features (plain and preact) must have PyTorch's
 * shapes and moments, in RepDistiller's order.
 * kd -> PyTorch: kd_model_save's file must hold exactly the PyTorch
 * state_dict: the same names, dtypes, shapes and bytes, so
 * load_state_dict(strict=True) accepts it. The saved files are left in
 * <build>/test_tmp/zoo_kd/<arch>.safetensors for tools/check_roundtrip.py
 * (the zoo_roundtrip_torch test where torch is installed). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/io.h"
#include "kd/models.h"
#include "kd/train.h"
#include "testutil.h"

#define KD_ZOO_OUT_DIR KD_BINARY_DIR "/test_tmp/zoo_kd"

/* Every architecture with a fixture (FULL + SYNTHETIC in gen_zoo_fixtures.py). */
static const char *const kd_zoo_archs[] = {"resnet8", "MobileNetV2", "resnet20", "resnet32x4", "wrn_16_2",
                                           "vgg8",    "vgg11",       "vgg13",    "vgg16",      "vgg19",
                                           "ShuffleV1", "ShuffleV2", "ResNet50"};
#define KD_ZOO_N ((int)(sizeof kd_zoo_archs / sizeof kd_zoo_archs[0]))

/* ------------------------------------------- synthetic tensors (see the generator) */

static uint64_t fnv1a64(const char *s) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001B3ull;
    return h;
}

static uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void synth_fill(const char *name, int ndim, const int64_t *shape, float *out) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    int64_t fan_in = n / shape[0];
    float bound = ndim == 4 ? (float)sqrt(6.0 / (double)fan_in)
                : ndim == 2 ? (float)(1.0 / sqrt((double)fan_in))
                            : 0.1f;
    uint64_t h0 = fnv1a64(name);
    for (int64_t i = 0; i < n; i++) {
        uint64_t z = splitmix64(h0 + (uint64_t)i);
        float u = (float)((int64_t)(z >> 40) - (1 << 23)) * 0x1p-23f;
        out[i] = u * bound;
    }
}

/* ---------------------------------------------------------------- helpers */

static kd_json *meta_json(const kd_st_file *f, const char *key) {
    const char *s = kd_st_meta(f, key);
    if (!s) fail_msg("%s: metadata '%s' missing", kd_st_path(f), key);
    kd_json *j = NULL;
    KD_ASSERT_OK(kd_json_parse(s, strlen(s), key, &j));
    return j;
}

static int json_has_string(const kd_json *arr, const char *s) {
    for (int64_t i = 0; i < arr->count; i++)
        if (strcmp(arr->items[i].string, s) == 0) return 1;
    return 0;
}

static kd_dtype dtype_of(const char *s) { return strcmp(s, "I64") == 0 ? KD_I64 : KD_F32; }

/* [shape, mean, mean of squares] of a kd feature against PyTorch's. */
static void check_stats(const char *arch, const char *what, int k, const kd_tensor *t, const kd_json *want) {
    const kd_json *shape = &want->items[0];
    if (!t) fail_msg("%s: %s[%d] missing", arch, what, k);
    assert_int_equal(t->ndim, shape->count);
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] != shape->items[i].integer)
            fail_msg("%s: %s[%d] dim %d is %lld, PyTorch %lld", arch, what, k, i, (long long)t->shape[i],
                     (long long)shape->items[i].integer);
    int64_t n = kd_tensor_numel(t);
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < n; i++) {
        double v = kd_f32(t)[i];
        s += v;
        s2 += v * v;
    }
    double m = s / (double)n, m2 = s2 / (double)n, wm = want->items[1].number, wm2 = want->items[2].number;
    if (fabs(m - wm) > 1e-5 + 1e-4 * fabs(wm) || fabs(m2 - wm2) > 1e-5 + 1e-4 * fabs(wm2))
        fail_msg("%s: %s[%d] mean %.7g meansq %.7g, PyTorch %.7g %.7g", arch, what, k, m, m2, wm, wm2);
}

/* Writes the complete PyTorch state_dict of the fixture (stored + synthetic
 * tensors, with the fixture's metadata arch) to `path`. */
static void assemble_torch_file(const kd_st_file *f, const kd_json *sd, const kd_json *syn, const char *path) {
    kd_st_writer *w = NULL;
    KD_ASSERT_OK(kd_st_writer_init(&w));
    float **bufs = calloc((size_t)sd->count, sizeof *bufs);
    assert_non_null(bufs);
    for (int64_t i = 0; i < sd->count; i++) {
        const kd_json *row = &sd->items[i];
        const char *name = row->items[0].string;
        const kd_json *shp = &row->items[2];
        int64_t shape[KD_MAX_DIMS], n = 1;
        for (int d = 0; d < shp->count; d++) n *= shape[d] = shp->items[d].integer;
        if (json_has_string(syn, name)) {
            bufs[i] = malloc((size_t)n * sizeof(float));
            assert_non_null(bufs[i]);
            synth_fill(name, (int)shp->count, shape, bufs[i]);
            KD_ASSERT_OK(kd_st_writer_add(w, name, KD_F32, (int)shp->count, shape, bufs[i]));
        } else {
            const kd_st_entry *e = kd_st_find(f, name);
            if (!e) fail_msg("%s: state_dict entry %s is neither stored nor synthetic", kd_st_path(f), name);
            KD_ASSERT_OK(kd_st_writer_add(w, name, e->dtype, e->ndim, e->shape, e->data));
        }
    }
    KD_ASSERT_OK(kd_st_writer_set_meta(w, "arch", kd_st_meta(f, "arch")));
    KD_ASSERT_OK(kd_st_writer_save(w, path));
    kd_st_writer_free(w);
    for (int64_t i = 0; i < sd->count; i++) free(bufs[i]);
    free(bufs);
}

/* The kd-saved file holds exactly the entries of the PyTorch file, byte for byte. */
static void check_same_tensor_set(const char *arch, const char *kd_path, const char *torch_path, const kd_json *sd) {
    kd_st_file *a = NULL, *b = NULL;
    KD_ASSERT_OK(kd_st_open(kd_path, &a));
    KD_ASSERT_OK(kd_st_open(torch_path, &b));
    if (kd_st_count(a) != sd->count)
        fail_msg("%s: kd saved %d tensors, the PyTorch state_dict has %lld", arch, kd_st_count(a),
                 (long long)sd->count);
    for (int64_t i = 0; i < sd->count; i++) {
        const kd_json *row = &sd->items[i];
        const char *name = row->items[0].string;
        const kd_st_entry *ea = kd_st_find(a, name), *eb = kd_st_find(b, name);
        if (!ea) fail_msg("%s: kd's file lacks %s", arch, name);
        assert_non_null(eb);
        if (ea->dtype != dtype_of(row->items[1].string) || ea->ndim != row->items[2].count)
            fail_msg("%s: %s has another dtype or rank than PyTorch's", arch, name);
        for (int d = 0; d < ea->ndim; d++)
            if (ea->shape[d] != row->items[2].items[d].integer) fail_msg("%s: %s has another shape", arch, name);
        if (ea->nbytes != eb->nbytes || memcmp(ea->data, eb->data, ea->nbytes) != 0)
            fail_msg("%s: %s differs from the PyTorch bytes", arch, name);
    }
    kd_st_close(a);
    kd_st_close(b);
}

/* Forward on the fixture's input; returns the max |logits - PyTorch|. */
static double check_forward(kd_model *m, const kd_st_file *f, kd_backend *be, const kd_json *feats,
                            const kd_json *pres) {
    const char *arch = kd_model_arch(m);
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    kd_graph_set_grad_enabled(g, 0);
    kd_model_set_training(m, 0);
    const kd_st_entry *ex = kd_st_find(f, "input"), *el = kd_st_find(f, "logits");
    assert_non_null(ex);
    assert_non_null(el);
    kd_tensor *x = kd_graph_wrap(g, KD_F32, 4, ex->shape, (void *)ex->data);
    kd_model_out o;
    KD_ASSERT_OK(kd_model_forward(m, g, x, KD_FWD_PREACT, &o));
    assert_int_equal(o.logits->shape[0], el->shape[0]);
    assert_int_equal(o.logits->shape[1], el->shape[1]);
    double err = KD_ASSERT_CLOSE(kd_f32(o.logits), el->data, kd_tensor_numel(o.logits), 1e-4, 0, arch);
    if (o.n_feat != feats->count)
        fail_msg("%s: kd returns %d features, RepDistiller %lld", arch, o.n_feat, (long long)feats->count);
    for (int k = 0; k < o.n_feat; k++) {
        check_stats(arch, "feat", k, o.feat[k], &feats->items[k]);
        check_stats(arch, "preact", k, o.preact[k], &pres->items[k]);
    }
    kd_graph_free(g);
    return err;
}

static void run_zoo(const char *arch, kd_backend *be) {
    char fixture[512], torch_path[512], kd_path[512];
    snprintf(fixture, sizeof fixture, "%s/tests/fixtures/zoo_%s.safetensors", KD_SOURCE_DIR, arch);
    snprintf(torch_path, sizeof torch_path, "%s/%s.torch.safetensors", KD_ZOO_OUT_DIR, arch);
    snprintf(kd_path, sizeof kd_path, "%s/%s.safetensors", KD_ZOO_OUT_DIR, arch);
    kd_st_file *f = NULL;
    KD_ASSERT_OK(kd_st_open(fixture, &f));
    kd_json *sd = meta_json(f, "state_dict"), *syn = meta_json(f, "synthetic");
    kd_json *feats = meta_json(f, "feats"), *pres = meta_json(f, "preacts");
    assemble_torch_file(f, sd, syn, torch_path);

    kd_model_cfg cfg = {.in_channels = 3, .num_classes = 100, .seed = 7};
    kd_model *m = NULL;
    KD_ASSERT_OK(kd_model_create(arch, &cfg, &m));
    assert_int_equal(kd_model_params(m)->n, sd->count); /* no tensor beyond PyTorch's */
    assert_int_equal(kd_model_num_params(m), atoll(kd_st_meta(f, "params")));
    KD_ASSERT_OK(kd_model_load(m, torch_path));

    double err = check_forward(m, f, be, feats, pres);
    KD_ASSERT_OK(kd_model_save(m, kd_path));
    check_same_tensor_set(arch, kd_path, torch_path, sd);
    printf("  %-12s %-3s max |logits - torch| %.2e, %lld tensors (%lld synthetic) byte-identical after save\n",
           arch, be->name, err, (long long)sd->count, (long long)syn->count);
    remove(torch_path);
    kd_model_free(m);
    kd_json_free(sd);
    kd_json_free(syn);
    kd_json_free(feats);
    kd_json_free(pres);
    kd_st_close(f);
}

static void test_zoo_cpu(void **state) {
    (void)state;
    kd_backend *be = NULL;
    if (kd_backend_get("cpu", &be) != KD_OK) KD_ASSERT_OK(kd_backend_get("ref", &be));
    KD_ASSERT_OK(kd_mkdirs(KD_ZOO_OUT_DIR));
    for (int i = 0; i < KD_ZOO_N; i++) run_zoo(kd_zoo_archs[i], be);
}

/* The plain-C reference backend on the new architectures' small members
 * (grouped and depthwise convs, shuffles, splits). */
static void test_zoo_ref(void **state) {
    (void)state;
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    KD_ASSERT_OK(kd_mkdirs(KD_ZOO_OUT_DIR));
    static const char *const small[] = {"MobileNetV2", "ShuffleV1", "ShuffleV2", "vgg8"};
    for (int i = 0; i < 4; i++) run_zoo(small[i], be);
}

/* "mobile_half" is RepDistiller's later name of the same network: same
 * tensors, same function. */
static void test_mobile_half_alias(void **state) {
    (void)state;
    kd_model_cfg cfg = {.in_channels = 3, .num_classes = 100, .seed = 7};
    kd_model *a = NULL, *b = NULL;
    KD_ASSERT_OK(kd_model_create("MobileNetV2", &cfg, &a));
    KD_ASSERT_OK(kd_model_create("mobile_half", &cfg, &b));
    kd_param_list *pa = kd_model_params(a), *pb = kd_model_params(b);
    assert_int_equal(pa->n, pb->n);
    for (int i = 0; i < pa->n; i++) {
        assert_string_equal(pa->items[i].name, pb->items[i].name);
        assert_true(kd_tensor_same_shape(pa->items[i].t, pb->items[i].t));
    }
    KD_ASSERT_OK(kd_params_copy(pb, pa));
    kd_model_free(a);
    kd_model_free(b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_zoo_cpu),
        cmocka_unit_test(test_zoo_ref),
        cmocka_unit_test(test_mobile_half_alias),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
