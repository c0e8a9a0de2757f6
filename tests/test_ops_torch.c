/*
 * test_ops_torch.c: every autograd op against PyTorch, on every backend.
 *
 * tests/fixtures/ops.safetensors (written by tools/gen_fixtures.py, which
 * documents the format) holds cases named "<op>" or "<op>_<variant>", each
 * with inputs <case>.in<i>, the forward output <case>.out, upstream weights
 * <case>.r and the gradients <case>.grad<i> of sum(out * r) for the inputs
 * that require them; __metadata__["<case>"] is a JSON object with the op and
 * its parameters. For each case and each backend ("ref", and "cpu" when it is
 * built in) this program builds the op through the public autograd API on a
 * fresh kd_graph, compares the output, runs kd_backward on
 * kd_sum(kd_mul(out, r)) and compares every gradient. Each (backend, case) is
 * its own cmocka test, so one report lists every mismatch.
 *
 * A coverage test fails when some kd_op has no case in the fixture, when
 * kd_op_get_info() reports a missing forward or backward, or when a case names
 * an op kd does not know; test_coverage_can_fail runs the same rules on
 * broken copies of the op infos and the case list and requires each breakage
 * to be reported. A case whose op returns NULL (unimplemented,
 * unsupported on the backend) fails.
 *
 * Tolerances (|got - want| <= atol + rtol * |want| elementwise). The fixture
 * values are float64 results of the float32 inputs rounded to float32, so the
 * error measured here is kd's own float32 error:
 *   - elementwise ops, reshapes, pooling, softmax family, losses: outputs are
 *     O(1) and reduce over at most ~60 terms in float32: atol 1e-5, rtol 1e-4
 *     (a few hundred ulps of slack for a different summation order, or for
 *     expf/logf implementations a few ulps apart).
 *   - conv2d, linear, matmul, bmm: dot products of 4..200 terms of magnitude ~1
 *     whose weight gradients reach ~10; oneDNN may block and reorder the
 *     sums (and use FMA): atol 1e-4, rtol 1e-4 for outputs and gradients.
 *   - batchnorm, layernorm: normalisation divides by a batch standard deviation and the
 *     input gradient is a difference of three O(1) terms (cancellation):
 *     atol 1e-4, rtol 1e-4.
 *   - exp, log: one transcendental per element, which libm and PyTorch get
 *     right to 1-2 ulps: atol 1e-6, rtol 1e-5. The small atol matters for log
 *     near x = 1, where log x ~ x - 1 is tiny and an approximation whose
 *     absolute error stays ~1e-6 is off by percents (case log_near1).
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd/autograd.h"
#include "kd/backend.h"
#include "kd/io.h"

#define MAX_IN 4

typedef struct {
    char *name;          /* case name, e.g. "conv2d_s2_bias" */
    kd_json *meta;       /* the case's parameter object */
    const char *op;      /* meta["op"] */
} fx_case;

/* One (backend, case) test. The graph and the input tensors live here so
 * that the teardown frees them also when a check fails (cmocka longjmps). */
typedef struct {
    const fx_case *c;
    const char *backend; /* "ref" or "cpu" */
    kd_graph *g;
    kd_tensor *in[MAX_IN + 1];
    int n_in;
} fx_run;

static kd_st_file *g_fx;
static fx_case *g_cases;
static int g_ncases;
static const char *g_open_error; /* why the fixture could not be used */
static int g_verbose;

typedef struct {
    double atol, rtol;
} tol;

static tol case_tol(const char *op) {
    if (!strcmp(op, "conv2d") || !strcmp(op, "linear") || !strcmp(op, "matmul") ||
        !strcmp(op, "batchnorm") || !strcmp(op, "bmm") || !strcmp(op, "layernorm"))
        return (tol){1e-4, 1e-4};
    if (!strcmp(op, "exp") || !strcmp(op, "log")) return (tol){1e-6, 1e-5};
    return (tol){1e-5, 1e-4};
}

/* ---------------------------------------------------------------- helpers */

static const kd_st_entry *fx_find(const char *cname, const char *suffix) {
    char key[256];
    snprintf(key, sizeof key, "%s.%s", cname, suffix);
    return kd_st_find(g_fx, key);
}

static const kd_st_entry *fx_need(const char *cname, const char *suffix) {
    const kd_st_entry *e = fx_find(cname, suffix);
    if (!e) fail_msg("%s: fixture has no tensor %s.%s", cname, cname, suffix);
    return e;
}

static int64_t entry_numel(const kd_st_entry *e) {
    int64_t n = 1;
    for (int i = 0; i < e->ndim; i++) n *= e->shape[i];
    return n;
}

static double meta_num(const fx_case *c, const char *key) {
    const kd_json *v = kd_json_get(c->meta, key);
    if (!v || v->type != KD_JSON_NUMBER) fail_msg("%s: metadata lacks number \"%s\"", c->name, key);
    return v->number;
}

static double meta_num_or(const fx_case *c, const char *key, double dflt) {
    const kd_json *v = kd_json_get(c->meta, key);
    return (v && v->type == KD_JSON_NUMBER) ? v->number : dflt;
}

/* meta[key][i] of a number array. */
static double meta_item(const fx_case *c, const char *key, int64_t i) {
    const kd_json *v = kd_json_get(c->meta, key);
    if (!v || v->type != KD_JSON_ARRAY || i >= v->count || v->items[i].type != KD_JSON_NUMBER)
        fail_msg("%s: metadata lacks \"%s\"[%lld]", c->name, key, (long long)i);
    return v->items[i].number;
}

/* Copies a fixture entry into a new heap tensor stored in *slot (before any
 * check can fail, so that the teardown frees it). */
static void tensor_from_entry(const fx_case *c, const kd_st_entry *e, kd_tensor **slot) {
    KD_ASSERT_OK(kd_tensor_new(e->dtype, e->ndim, e->shape, slot));
    kd_tensor *t = *slot;
    if (kd_tensor_nbytes(t) != e->nbytes)
        fail_msg("%s: %s holds %zu bytes, expected %zu", c->name, e->name, e->nbytes,
                 kd_tensor_nbytes(t));
    memcpy(t->data, e->data, e->nbytes);
}

/* A contiguous float copy of t (which may be a strided view); malloc'd. */
static float *gather_f32(const char *what, const kd_tensor *t) {
    if (t->dtype != KD_F32) fail_msg("%s: dtype %s, expected F32", what, kd_dtype_name(t->dtype));
    if (t->layout != KD_LAYOUT_STRIDED) fail_msg("%s: opaque layout returned by the op", what);
    int64_t n = kd_tensor_numel(t);
    float *dst = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    assert_non_null(dst);
    const float *src = t->data;
    int64_t idx[KD_MAX_DIMS] = {0};
    for (int64_t i = 0; i < n; i++) {
        int64_t off = 0;
        for (int d = 0; d < t->ndim; d++) off += idx[d] * t->stride[d];
        dst[i] = src[off];
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++idx[d] < t->shape[d]) break;
            idx[d] = 0;
        }
    }
    return dst;
}

/* Shapes must match exactly, except that any one-element shapes match each
 * other (a loss may be 0-d in PyTorch and (1) in kd). */
static void check_shape(const char *what, const kd_tensor *t, const kd_st_entry *e) {
    int ok = t->ndim == e->ndim;
    for (int i = 0; ok && i < t->ndim; i++) ok = t->shape[i] == e->shape[i];
    if (!ok && kd_tensor_numel(t) == 1 && entry_numel(e) == 1) ok = 1;
    if (!ok) {
        char got[128], want[128] = "(";
        kd_shape_str(t, got, sizeof got);
        for (int i = 0; i < e->ndim; i++) {
            size_t l = strlen(want);
            snprintf(want + l, sizeof want - l, "%s%lld", i ? ", " : "", (long long)e->shape[i]);
        }
        strncat(want, ")", sizeof want - strlen(want) - 1);
        fail_msg("%s: shape %s, want %s", what, got, want);
    }
}

/* Compares t with the fixture entry; fails the test with the worst element. */
static double compare(const char *what, const kd_tensor *t, const kd_st_entry *e, tol tl) {
    check_shape(what, t, e);
    if (e->dtype != KD_F32) fail_msg("%s: fixture dtype is not F32", what);
    float *got = gather_f32(what, t);
    int64_t n = entry_numel(e);
    float *want = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    assert_non_null(want);
    memcpy(want, e->data, (size_t)n * sizeof(float));
    double maxabs = 0, worst = 0;
    int64_t wi = -1;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)want[i]);
        if (!isfinite(got[i])) { wi = i; worst = INFINITY; break; }
        if (d > maxabs) maxabs = d;
        double excess = d - (tl.atol + tl.rtol * fabs((double)want[i]));
        if (excess > worst) { worst = excess; wi = i; }
    }
    if (wi >= 0 && worst > 0) {
        float g = got[wi], w = want[wi];
        free(got);
        free(want);
        fail_msg("%s: element %lld of %lld got %.8g want %.8g (|diff| %.3g; atol %g rtol %g)",
                 what, (long long)wi, (long long)n, g, w, fabs((double)g - (double)w), tl.atol,
                 tl.rtol);
    }
    free(got);
    free(want);
    return maxabs;
}

/* Fails unless t still equals the fixture entry bit for bit (inputs must not
 * be modified by an op). */
static void check_unchanged(const char *what, const kd_tensor *t, const kd_st_entry *e) {
    if (memcmp(t->data, e->data, e->nbytes) != 0) fail_msg("%s: input modified by the op", what);
}

/* ------------------------------------------------------------ dispatch */

/* Builds the case's op on g from its inputs; NULL when the op failed. */
static kd_tensor *build_op(kd_graph *g, const fx_case *c, kd_tensor **in, int n_in) {
    const char *op = c->op;
    if (!strcmp(op, "conv2d")) {
        kd_conv2d_params p;
        memset(&p, 0, sizeof p);
        for (int i = 0; i < 2; i++) {
            p.stride[i] = (int64_t)meta_item(c, "stride", i);
            p.pad[i] = (int64_t)meta_item(c, "pad", i);
            p.dilation[i] = (int64_t)meta_item(c, "dilation", i);
        }
        p.groups = (int64_t)meta_num(c, "groups");
        return kd_conv2d(g, in[0], in[1], n_in > 2 ? in[2] : NULL, &p);
    }
    if (!strcmp(op, "batchnorm")) {
        kd_bn_params p = {(float)meta_num(c, "eps"), (float)meta_num(c, "momentum"),
                          (int)meta_num(c, "training")};
        return kd_batchnorm(g, in[0], in[1], in[2], in[3], in[4], &p);
    }
    if (!strcmp(op, "linear")) return kd_linear(g, in[0], in[1], n_in > 2 ? in[2] : NULL);
    if (!strcmp(op, "matmul")) return kd_matmul(g, in[0], in[1]);
    if (!strcmp(op, "relu")) return kd_relu(g, in[0]);
    if (!strcmp(op, "leaky_relu")) return kd_leaky_relu(g, in[0], (float)meta_num(c, "slope"));
    if (!strcmp(op, "add")) return kd_add(g, in[0], in[1]);
    if (!strcmp(op, "mul")) {
        if (meta_num_or(c, "same_input", 0)) return kd_mul(g, in[0], in[0]);
        return kd_mul(g, in[0], in[1]);
    }
    if (!strcmp(op, "scale")) return kd_scale(g, in[0], (float)meta_num(c, "s"));
    if (!strcmp(op, "avgpool2d") || !strcmp(op, "maxpool2d")) {
        int64_t k = (int64_t)meta_num(c, "kernel"), s = (int64_t)meta_num(c, "stride");
        int64_t pad = (int64_t)meta_num(c, "pad");
        if (op[0] == 'm') return kd_maxpool2d(g, in[0], k, s, pad);
        if (meta_num(c, "count_include_pad")) return kd_avgpool2d(g, in[0], k, s, pad);
        kd_pool2d_params p = {KD_POOL_AVG, {k, k}, {s, s}, {pad, pad}, 0};
        return kd_pool2d(g, in[0], &p);
    }
    if (!strcmp(op, "global_avgpool")) return kd_global_avgpool(g, in[0]);
    if (!strcmp(op, "reshape")) {
        if (meta_num_or(c, "flatten", 0)) return kd_flatten(g, in[0]);
        const kd_json *s = kd_json_get(c->meta, "shape");
        if (!s || s->type != KD_JSON_ARRAY || s->count > KD_MAX_DIMS)
            fail_msg("%s: metadata lacks \"shape\"", c->name);
        int64_t shape[KD_MAX_DIMS];
        for (int64_t i = 0; i < s->count; i++) shape[i] = (int64_t)meta_item(c, "shape", i);
        return kd_reshape(g, in[0], (int)s->count, shape);
    }
    if (!strcmp(op, "transpose"))
        return kd_transpose(g, in[0], (int)meta_num(c, "dim0"), (int)meta_num(c, "dim1"));
    if (!strcmp(op, "concat")) return kd_concat(g, in, n_in, (int)meta_num(c, "dim"));
    if (!strcmp(op, "slice"))
        return kd_slice(g, in[0], (int)meta_num(c, "dim"), (int64_t)meta_num(c, "start"),
                        (int64_t)meta_num(c, "end"));
    if (!strcmp(op, "softmax")) return kd_softmax(g, in[0]);
    if (!strcmp(op, "log_softmax")) return kd_log_softmax(g, in[0]);
    if (!strcmp(op, "cross_entropy"))
        return kd_cross_entropy(g, in[0], in[1], (float)meta_num(c, "label_smoothing"));
    if (!strcmp(op, "kl_div")) return kd_kl_div(g, in[0], in[1], (float)meta_num(c, "T"));
    if (!strcmp(op, "mse")) return kd_mse(g, in[0], in[1]);
    if (!strcmp(op, "l2_normalize")) return kd_l2_normalize(g, in[0], (float)meta_num(c, "eps"));
    if (!strcmp(op, "mean")) return kd_mean(g, in[0]);
    if (!strcmp(op, "sum")) return kd_sum(g, in[0]);
    if (!strcmp(op, "exp")) return kd_exp(g, in[0]);
    if (!strcmp(op, "log")) return kd_log(g, in[0]);
    if (!strcmp(op, "dropout"))
        return kd_dropout(g, in[0], (float)meta_num(c, "p"), (int)meta_num(c, "training"));
    if (!strcmp(op, "sigmoid")) return kd_sigmoid(g, in[0]);
    if (!strcmp(op, "hardswish")) return kd_hardswish(g, in[0]);
    if (!strcmp(op, "hardsigmoid")) return kd_hardsigmoid(g, in[0]);
    if (!strcmp(op, "silu")) return kd_silu(g, in[0]);
    if (!strcmp(op, "relu6")) return kd_relu6(g, in[0]);
    if (!strcmp(op, "mul_channel")) return kd_mul_channel(g, in[0], in[1]);
    /* NCHW -> NCHW16C -> NCHW on backends with blocked layouts, identity on ref. */
    if (!strcmp(op, "to_strided")) return kd_graph_to_strided(g, kd_graph_to_blocked(g, in[0]));
    if (!strcmp(op, "function")) return kd_function_apply(g, &kd_test_fn_polymul, NULL, 0, 2, in, in[0]->ndim, in[0]->shape);
    if (!strcmp(op, "layernorm"))
        return kd_layernorm(g, in[0], n_in > 1 ? in[1] : NULL, n_in > 2 ? in[2] : NULL,
                            (float)meta_num(c, "eps"));
    if (!strcmp(op, "gelu")) return kd_gelu(g, in[0]);
    if (!strcmp(op, "bmm"))
        return kd_bmm(g, in[0], in[1], (int)meta_num(c, "trans_a"), (int)meta_num(c, "trans_b"));
    if (!strcmp(op, "permute")) {
        int perm[KD_MAX_DIMS];
        for (int i = 0; i < in[0]->ndim; i++) perm[i] = (int)meta_item(c, "perm", i);
        return kd_permute(g, in[0], perm);
    }
    if (!strcmp(op, "roll")) {
        const kd_json *sh = kd_json_get(c->meta, "shifts");
        if (!sh || sh->type != KD_JSON_ARRAY || sh->count > KD_MAX_DIMS)
            fail_msg("%s: metadata lacks \"shifts\"", c->name);
        int dims[KD_MAX_DIMS];
        int64_t shifts[KD_MAX_DIMS];
        for (int i = 0; i < (int)sh->count; i++) {
            shifts[i] = (int64_t)meta_item(c, "shifts", i);
            dims[i] = (int)meta_item(c, "dims", i);
        }
        return kd_roll(g, in[0], (int)sh->count, dims, shifts);
    }
    if (!strcmp(op, "index_select")) return kd_index_select(g, in[0], in[1]);
    if (!strcmp(op, "add_bcast")) return kd_add_bcast(g, in[0], in[1]);
    if (!strcmp(op, "drop_path"))
        return kd_drop_path(g, in[0], (float)meta_num(c, "p"), (int)meta_num(c, "training"));
    if (!strcmp(op, "weight_norm")) return kd_weight_norm(g, in[0], n_in > 1 ? in[1] : NULL);
    if (!strcmp(op, "window_attention"))
        return kd_window_attention(g, in[0], n_in > 1 ? in[1] : NULL, n_in > 2 ? in[2] : NULL,
                                   (int64_t)meta_num(c, "heads"));
    fail_msg("%s: the test has no dispatch for op \"%s\"", c->name, op);
    return NULL;
}

/* ---------------------------------------------------------------- tests */

static int teardown_case(void **state) {
    fx_run *run = *state;
    kd_graph_free(run->g);
    run->g = NULL;
    for (int i = 0; i < run->n_in; i++) kd_tensor_free(run->in[i]);
    run->n_in = 0;
    return 0;
}

static void run_case(void **state) {
    fx_run *run = *state;
    const fx_case *c = run->c;
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get(run->backend, &be));
    KD_ASSERT_OK(kd_graph_init(&run->g, be));
    kd_graph *g = run->g;
    kd_graph_set_rng(g, 1234, 0);
    tol tl = case_tol(c->op);
    char what[256];

    /* Inputs: heap leaves; those with a stored gradient require grad. */
    kd_tensor **in = run->in;
    const kd_st_entry *in_e[MAX_IN + 1] = {NULL};
    int n_in = 0;
    while (n_in <= MAX_IN) {
        char suffix[16];
        snprintf(suffix, sizeof suffix, "in%d", n_in);
        const kd_st_entry *e = fx_find(c->name, suffix);
        if (!e) break;
        in_e[n_in] = e;
        run->n_in = n_in + 1;
        tensor_from_entry(c, e, &in[n_in]);
        snprintf(suffix, sizeof suffix, "grad%d", n_in);
        if (fx_find(c->name, suffix)) KD_ASSERT_OK(kd_tensor_require_grad(in[n_in]));
        n_in++;
    }
    if (n_in == 0) fail_msg("%s: fixture has no inputs", c->name);

    /* Outputs may be blocked (conv2d with O % 16 == 0 on cpu): compare plain. */
    kd_tensor *out = kd_graph_to_strided(g, build_op(g, c, in, n_in));
    if (!out || kd_graph_status(g) != KD_OK)
        fail_msg("%s/%s: forward failed (%s): %s", run->backend, c->name,
                 kd_status_str(kd_graph_status(g)), kd_last_error());

    snprintf(what, sizeof what, "%s/%s out", run->backend, c->name);
    double err_out = compare(what, out, fx_need(c->name, "out"), tl);

    /* Training-mode batch norm updates in3/in4 (running mean/var) in place. */
    int bn_train = !strcmp(c->op, "batchnorm") && meta_num(c, "training") != 0;
    if (bn_train) {
        snprintf(what, sizeof what, "%s/%s running_mean", run->backend, c->name);
        compare(what, in[3], fx_need(c->name, "running_mean"), tl);
        snprintf(what, sizeof what, "%s/%s running_var", run->backend, c->name);
        compare(what, in[4], fx_need(c->name, "running_var"), tl);
    }

    /* objective = sum(out * r); r takes out's shape (numel checked above). */
    const kd_st_entry *re = fx_need(c->name, "r");
    if (entry_numel(re) != kd_tensor_numel(out)) fail_msg("%s: r does not match out", c->name);
    kd_tensor *r = kd_graph_tensor(g, KD_F32, out->ndim, out->shape);
    assert_non_null(r);
    memcpy(r->data, re->data, re->nbytes);
    kd_tensor *obj = kd_sum(g, kd_mul(g, out, r));
    if (!obj || kd_graph_status(g) != KD_OK)
        fail_msg("%s/%s: sum(out * r) failed: %s", run->backend, c->name, kd_last_error());
    kd_status s = kd_backward(g, obj);
    if (s != KD_OK)
        fail_msg("%s/%s: backward failed (%s): %s", run->backend, c->name, kd_status_str(s),
                 kd_last_error());

    double err_grad = 0;
    for (int i = 0; i < n_in; i++) {
        char suffix[16];
        snprintf(suffix, sizeof suffix, "grad%d", i);
        const kd_st_entry *ge = fx_find(c->name, suffix);
        if (ge) {
            snprintf(what, sizeof what, "%s/%s grad%d", run->backend, c->name, i);
            if (!in[i]->grad) fail_msg("%s: no gradient", what);
            double e = compare(what, in[i]->grad, ge, tl);
            if (e > err_grad) err_grad = e;
        }
        if (!(bn_train && (i == 3 || i == 4))) {
            snprintf(what, sizeof what, "%s/%s in%d", run->backend, c->name, i);
            check_unchanged(what, in[i], in_e[i]);
        }
    }
    if (g_verbose)
        printf("    %s/%s: max |diff| out %.3g, grads %.3g\n", run->backend, c->name, err_out,
               err_grad);
}

/* The coverage rules, on any op-info table and case list so that a test can
 * run them on broken copies: every op has a name, a forward, a backward and
 * at least one case named "<op>" or "<op>_<variant>" whose op is it; every
 * case names a known op. Prints one line per problem to log (NULL: silent);
 * returns the count. */
static int coverage_problems(const kd_op_info *const *infos, int n_ops, const fx_case *cases,
                             int ncases, FILE *log) {
    int missing = 0;
    for (int op = 0; op < n_ops; op++) {
        const kd_op_info *info = infos[op];
        if (!info || !info->name) {
            if (log) fprintf(log, "op %d: no kd_op_info\n", op);
            missing++;
            continue;
        }
        if (!info->has_forward || !info->has_backward) {
            if (log) fprintf(log, "op %s: has_forward %d has_backward %d\n", info->name,
                    info->has_forward, info->has_backward);
            missing++;
        }
        size_t len = strlen(info->name);
        int found = 0;
        for (int i = 0; i < ncases && !found; i++) {
            const char *cn = cases[i].name;
            found = !strcmp(cases[i].op, info->name) && !strncmp(cn, info->name, len) &&
                    (cn[len] == '\0' || cn[len] == '_');
        }
        if (!found) {
            if (log) fprintf(log, "op %s: no case in ops.safetensors\n", info->name);
            missing++;
        }
    }
    for (int i = 0; i < ncases; i++) {
        int known = 0;
        for (int op = 0; op < n_ops && !known; op++)
            known = infos[op] && infos[op]->name && !strcmp(infos[op]->name, cases[i].op);
        if (!known) {
            if (log)
                fprintf(log, "case %s: op \"%s\" is not a kd_op\n", cases[i].name, cases[i].op);
            missing++;
        }
    }
    return missing;
}

/* Every kd_op has a forward, a backward and at least one fixture case named
 * after it; every case names a known op. */
static void test_coverage(void **state) {
    (void)state;
    if (g_open_error) fail_msg("%s", g_open_error);
    const kd_op_info *infos[KD_OP_COUNT];
    for (int op = 0; op < KD_OP_COUNT; op++) infos[op] = kd_op_get_info((kd_op)op);
    int missing = coverage_problems(infos, KD_OP_COUNT, g_cases, g_ncases, stderr);
    if (missing) fail_msg("%d coverage problem(s), listed above", missing);
}

/* A test of test_coverage: its rules must fail when an op loses its backward
 * or its forward, when every case of an op is dropped from the fixture, and
 * when a case names an unknown op. */
static void test_coverage_can_fail(void **state) {
    (void)state;
    if (g_open_error) fail_msg("%s", g_open_error);
    const kd_op_info *infos[KD_OP_COUNT];
    kd_op_info broken;
    for (int op = 0; op < KD_OP_COUNT; op++) infos[op] = kd_op_get_info((kd_op)op);
    fx_case *kept = calloc((size_t)g_ncases + 1, sizeof *kept);
    assert_non_null(kept);
    for (int op = 0; op < KD_OP_COUNT; op++) {
        const kd_op_info *real = infos[op];
        broken = *real;
        broken.has_backward = 0;
        infos[op] = &broken;
        assert_int_equal(coverage_problems(infos, KD_OP_COUNT, g_cases, g_ncases, NULL), 1);
        broken = *real;
        broken.has_forward = 0;
        assert_int_equal(coverage_problems(infos, KD_OP_COUNT, g_cases, g_ncases, NULL), 1);
        infos[op] = real;
        /* Drop every case of this op from the fixture. */
        int n = 0;
        for (int i = 0; i < g_ncases; i++)
            if (strcmp(g_cases[i].op, real->name) != 0) kept[n++] = g_cases[i];
        assert_true(n < g_ncases);
        assert_int_equal(coverage_problems(infos, KD_OP_COUNT, kept, n, NULL), 1);
    }
    /* A case whose op kd does not know. */
    for (int i = 0; i < g_ncases; i++) kept[i] = g_cases[i];
    kept[g_ncases] = (fx_case){"warp_affine", NULL, "warp_affine"};
    assert_int_equal(coverage_problems(infos, KD_OP_COUNT, kept, g_ncases + 1, NULL), 1);
    free(kept);
}

/* ----------------------------------------------------------------- main */

static char g_open_msg[512];

/* Opens the fixture and parses the case list; sets g_open_error on failure. */
static void load_fixture(void) {
    const char *path = KD_FIXTURE("ops.safetensors");
    if (kd_st_open(path, &g_fx) != KD_OK) {
        snprintf(g_open_msg, sizeof g_open_msg, "cannot use %s: %s", path, kd_last_error());
        g_open_error = g_open_msg;
        return;
    }
    const char *list = kd_st_meta(g_fx, "cases");
    if (!list) {
        snprintf(g_open_msg, sizeof g_open_msg, "%s: no \"cases\" metadata", path);
        g_open_error = g_open_msg;
        return;
    }
    char *copy = strdup(list);
    int cap = 1;
    for (const char *p = list; *p; p++) cap += *p == ',';
    g_cases = calloc((size_t)cap, sizeof *g_cases);
    if (!copy || !g_cases) abort();
    for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok;
         tok = strtok_r(NULL, ",", &save)) {
        fx_case *c = &g_cases[g_ncases];
        const char *js = kd_st_meta(g_fx, tok);
        if (!js || kd_json_parse(js, strlen(js), tok, &c->meta) != KD_OK) {
            snprintf(g_open_msg, sizeof g_open_msg, "%s: case %s: bad or missing metadata: %s",
                     path, tok, js ? kd_last_error() : "absent");
            g_open_error = g_open_msg;
            break;
        }
        const kd_json *op = kd_json_get(c->meta, "op");
        if (!op || op->type != KD_JSON_STRING) {
            snprintf(g_open_msg, sizeof g_open_msg, "%s: case %s: metadata lacks \"op\"", path,
                     tok);
            g_open_error = g_open_msg;
            kd_json_free(c->meta);
            break;
        }
        c->name = strdup(tok);
        c->op = op->string;
        g_ncases++;
    }
    free(copy);
}

int main(void) {
    g_verbose = getenv("KD_TEST_VERBOSE") != NULL;
    load_fixture();

    const char *backends[2] = {"ref", NULL};
    int nbe = 1;
    kd_backend *be = NULL;
    if (kd_backend_get("cpu", &be) == KD_OK)
        backends[nbe++] = "cpu";
    else
        printf("cpu backend not available (%s): testing ref only\n", kd_last_error());

    int ntests = 2 + (g_open_error ? 0 : nbe * g_ncases);
    struct CMUnitTest *tests = calloc((size_t)ntests, sizeof *tests);
    fx_run *runs = calloc((size_t)(nbe * g_ncases + 1), sizeof *runs);
    char **names = calloc((size_t)ntests, sizeof *names);
    if (!tests || !runs || !names) return 2;
    tests[0] = (struct CMUnitTest)cmocka_unit_test(test_coverage);
    tests[1] = (struct CMUnitTest)cmocka_unit_test(test_coverage_can_fail);
    int k = 2;
    for (int b = 0; b < nbe && !g_open_error; b++)
        for (int i = 0; i < g_ncases; i++, k++) {
            fx_run *run = &runs[k - 2];
            run->c = &g_cases[i];
            run->backend = backends[b];
            size_t len = strlen(backends[b]) + strlen(g_cases[i].name) + 2;
            names[k] = malloc(len);
            if (!names[k]) return 2;
            snprintf(names[k], len, "%s/%s", backends[b], g_cases[i].name);
            tests[k] = (struct CMUnitTest){names[k], run_case, NULL, teardown_case, run};
        }
    int rc = _cmocka_run_group_tests("ops_vs_torch", tests, (size_t)ntests, NULL, NULL);

    for (int i = 0; i < ntests; i++) free(names[i]);
    free(names);
    free(runs);
    free(tests);
    for (int i = 0; i < g_ncases; i++) {
        kd_json_free(g_cases[i].meta);
        free(g_cases[i].name);
    }
    free(g_cases);
    if (g_fx) kd_st_close(g_fx);
    return rc;
}
