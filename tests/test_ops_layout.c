/*
 * test_ops_layout.c: the data-movement transformer ops of
 * src/autograd/ops_layout.c (kd_permute, kd_roll, kd_index_select,
 * kd_add_bcast, kd_drop_path, kd_weight_norm, kd_window_partition,
 * kd_window_reverse, kd_patch_merge), on the "ref" backend and, when it is
 * built, the "cpu" backend.
 *
 *   - PyTorch: tests/fixtures/layout.safetensors (tools/gen_layout_fixtures.py
 *     documents it) holds forward outputs and the gradients of sum(out * r)
 *     for permute 4-d/6-d, roll over 2-3 axes with negative and repeated
 *     shifts, index_select on Swin's relative_position_index (repeats),
 *     add_bcast with Swin's (B, h, N, N) + (1, h, N, N) and
 *     (B/nW, nW, h, N, N) + (1, nW, 1, N, N) patterns, weight_norm with and
 *     without gain (torch._weight_norm, dim 0), Swin's window_partition and
 *     window_reverse and torchvision's patch merging gather. One cmocka test
 *     per (backend, case). Pure copies (permute, roll, window ops, patch
 *     merge, and every forward but weight_norm's) must match bit for bit;
 *     gradients that sum (index_select with repeats, the broadcast b) within
 *     atol 1e-6 + rtol 1e-5; weight_norm within 1e-5 + 1e-4 (a norm and a
 *     division in float32 against float64).
 *   - Central finite differences (h = 1e-2, |num - ana| <= 1e-3 + 5e-3 |num|,
 *     as test_autograd.c) for every op and input, twice: once accumulating
 *     into a pre-filled .grad, once through scale(x, 1) with every buffer
 *     tracked, the case run in a scope and released buffers filled with NaN,
 *     so a backward rule that reads something its op table row does not
 *     retain fails.
 *   - Sizes above the OpenMP threshold against plain loops written here,
 *     bitwise identical with 1 and 4 threads.
 *   - drop_path: the fraction of dropped samples for p = 0.3 over 20000
 *     samples (within 5 sigma of the binomial), whole-sample granularity,
 *     kept samples scaled by exactly 1/(1-p), gradient = mask * scale, the
 *     same mask for the same seed and step (and kd_dropout's draw for
 *     element i decides sample i), a different one for another step or a
 *     second call, identity when not training or p = 0, all zero for p = 1.
 *   - window_reverse(window_partition(x)) == x, and bad shapes and indices
 *     as graph errors whose messages name the values.
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/autograd_impl.h"
#include "kd/autograd.h"
#include "kd/backend.h"
#include "kd/io.h"

#define FD_ATOL 1e-3
#define FD_RTOL 5e-3

static const char *g_backends[2] = {"ref", NULL};
static int g_nbe = 1;

static kd_tensor *tnew(kd_dtype dt, int ndim, const int64_t *shape) {
    kd_tensor *t = NULL;
    KD_ASSERT_OK(kd_tensor_new(dt, ndim, shape, &t));
    return t;
}

static kd_backend *backend(const char *name) {
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get(name, &be));
    return be;
}

static kd_graph *graph_new(const char *be) {
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, backend(be)));
    return g;
}

static float *fdup(const kd_tensor *t) {
    size_t n = kd_tensor_nbytes(t);
    float *p = malloc(n ? n : 1);
    assert_non_null(p);
    memcpy(p, t->data, n);
    return p;
}

/* ============================================================ fixtures */

typedef struct {
    char *name;
    kd_json *meta;
    const char *op;
} fx_case;

typedef struct {
    const fx_case *c;
    const char *backend;
    kd_graph *g;
    kd_tensor *in[3];
    int n_in;
} fx_run;

static kd_st_file *g_fx;
static fx_case *g_cases;
static int g_ncases;
static char g_open_error[512];

static const kd_st_entry *fx_find(const char *cname, const char *suffix) {
    char key[256];
    snprintf(key, sizeof key, "%s.%s", cname, suffix);
    return kd_st_find(g_fx, key);
}

static double meta_num(const fx_case *c, const char *key) {
    const kd_json *v = kd_json_get(c->meta, key);
    if (!v || v->type != KD_JSON_NUMBER) fail_msg("%s: metadata lacks number \"%s\"", c->name, key);
    return v->number;
}

/* meta[key] as ints; returns the count. */
static int meta_ints(const fx_case *c, const char *key, int64_t *out, int cap) {
    const kd_json *v = kd_json_get(c->meta, key);
    if (!v || v->type != KD_JSON_ARRAY || v->count > cap)
        fail_msg("%s: metadata lacks array \"%s\"", c->name, key);
    for (int64_t i = 0; i < v->count; i++) {
        if (v->items[i].type != KD_JSON_NUMBER) fail_msg("%s: %s[%lld] is not a number", c->name, key, (long long)i);
        out[i] = (int64_t)v->items[i].number;
    }
    return (int)v->count;
}

static kd_tensor *build_case(kd_graph *g, const fx_case *c, kd_tensor **in, int n_in) {
    const char *op = c->op;
    int64_t a[KD_MAX_DIMS], b[KD_MAX_DIMS];
    if (!strcmp(op, "permute")) {
        int n = meta_ints(c, "perm", a, KD_MAX_DIMS), perm[KD_MAX_DIMS];
        for (int i = 0; i < n; i++) perm[i] = (int)a[i];
        return kd_permute(g, in[0], perm);
    }
    if (!strcmp(op, "roll")) {
        int n = meta_ints(c, "shifts", a, KD_MAX_DIMS), dims[KD_MAX_DIMS];
        if (meta_ints(c, "dims", b, KD_MAX_DIMS) != n) fail_msg("%s: shifts and dims differ", c->name);
        for (int i = 0; i < n; i++) dims[i] = (int)b[i];
        return kd_roll(g, in[0], n, dims, a);
    }
    if (!strcmp(op, "index_select")) return kd_index_select(g, in[0], in[1]);
    if (!strcmp(op, "add_bcast")) return kd_add_bcast(g, in[0], in[1]);
    if (!strcmp(op, "weight_norm")) return kd_weight_norm(g, in[0], n_in > 1 ? in[1] : NULL);
    if (!strcmp(op, "window_partition")) return kd_window_partition(g, in[0], (int64_t)meta_num(c, "ws"));
    if (!strcmp(op, "window_reverse"))
        return kd_window_reverse(g, in[0], (int64_t)meta_num(c, "ws"), (int64_t)meta_num(c, "N"),
                                 (int64_t)meta_num(c, "H"), (int64_t)meta_num(c, "W"));
    if (!strcmp(op, "patch_merge")) return kd_patch_merge(g, in[0]);
    fail_msg("%s: no dispatch for op \"%s\"", c->name, op);
    return NULL;
}

typedef struct {
    double atol, rtol;
} tol;

static void tols(const char *op, tol *out, tol *grad) {
    *out = (tol){0, 0};
    *grad = (tol){0, 0};
    if (!strcmp(op, "index_select") || !strcmp(op, "add_bcast")) *grad = (tol){1e-6, 1e-5};
    if (!strcmp(op, "weight_norm")) *out = *grad = (tol){1e-5, 1e-4};
}

static void compare_entry(const char *what, const kd_tensor *t, const kd_st_entry *e, tol tl) {
    int ok = t->ndim == e->ndim && e->dtype == KD_F32;
    for (int i = 0; ok && i < t->ndim; i++) ok = t->shape[i] == e->shape[i];
    if (!ok) {
        char got[96];
        fail_msg("%s: shape %s (or dtype) differs from the fixture's", what,
                 kd_shape_str(t, got, sizeof got));
    }
    int64_t n = kd_tensor_numel(t);
    float *want = malloc((size_t)(n ? n : 1) * sizeof *want);
    assert_non_null(want);
    memcpy(want, e->data, (size_t)n * sizeof *want);
    if (tl.atol == 0 && tl.rtol == 0) {
        for (int64_t i = 0; i < n; i++)
            if (memcmp(&kd_f32(t)[i], &want[i], sizeof *want) != 0) {
                float gv = kd_f32(t)[i], wv = want[i];
                free(want);
                fail_msg("%s: element %lld of %lld is %.9g, want exactly %.9g", what, (long long)i,
                         (long long)n, gv, wv);
            }
    } else {
        KD_ASSERT_CLOSE(kd_f32(t), want, n, tl.atol, tl.rtol, what);
    }
    free(want);
}

static int teardown_fx(void **state) {
    fx_run *run = *state;
    kd_graph_free(run->g);
    run->g = NULL;
    for (int i = 0; i < run->n_in; i++) kd_tensor_free(run->in[i]);
    run->n_in = 0;
    return 0;
}

static void run_fx(void **state) {
    fx_run *run = *state;
    const fx_case *c = run->c;
    run->g = graph_new(run->backend);
    kd_graph *g = run->g;
    char what[256];
    const kd_st_entry *ie[3] = {NULL};
    for (int k = 0; k < 3; k++) {
        char sfx[16];
        snprintf(sfx, sizeof sfx, "in%d", k);
        if (!(ie[k] = fx_find(c->name, sfx))) break;
        KD_ASSERT_OK(kd_tensor_new(ie[k]->dtype, ie[k]->ndim, ie[k]->shape, &run->in[k]));
        run->n_in = k + 1;
        memcpy(run->in[k]->data, ie[k]->data, ie[k]->nbytes);
        snprintf(sfx, sizeof sfx, "grad%d", k);
        if (fx_find(c->name, sfx)) KD_ASSERT_OK(kd_tensor_require_grad(run->in[k]));
    }
    if (!run->n_in) fail_msg("%s: no inputs in the fixture", c->name);
    tol to, tg;
    tols(c->op, &to, &tg);
    kd_tensor *out = build_case(g, c, run->in, run->n_in);
    if (!out) fail_msg("%s/%s: forward failed: %s", run->backend, c->name, kd_last_error());
    const kd_st_entry *oe = fx_find(c->name, "out"), *re = fx_find(c->name, "r");
    if (!oe || !re) fail_msg("%s: fixture lacks out or r", c->name);
    snprintf(what, sizeof what, "%s/%s out", run->backend, c->name);
    compare_entry(what, out, oe, to);
    kd_tensor *r = kd_graph_tensor(g, KD_F32, out->ndim, out->shape);
    assert_non_null(r);
    assert_int_equal(kd_tensor_nbytes(r), re->nbytes);
    memcpy(r->data, re->data, re->nbytes);
    KD_ASSERT_OK(kd_backward(g, kd_sum(g, kd_mul(g, out, r))));
    for (int k = 0; k < run->n_in; k++) {
        char sfx[16];
        snprintf(sfx, sizeof sfx, "grad%d", k);
        const kd_st_entry *ge = fx_find(c->name, sfx);
        snprintf(what, sizeof what, "%s/%s grad%d", run->backend, c->name, k);
        if (ge) {
            if (!run->in[k]->grad) fail_msg("%s: no gradient", what);
            compare_entry(what, run->in[k]->grad, ge, tg);
        }
        if (memcmp(run->in[k]->data, ie[k]->data, ie[k]->nbytes) != 0)
            fail_msg("%s/%s: input %d modified by the op", run->backend, c->name, k);
    }
}

static void load_fixture(void) {
    const char *path = KD_FIXTURE("layout.safetensors");
    if (kd_st_open(path, &g_fx) != KD_OK) {
        snprintf(g_open_error, sizeof g_open_error, "cannot use %s: %s", path, kd_last_error());
        return;
    }
    const char *list = kd_st_meta(g_fx, "cases");
    if (!list) {
        snprintf(g_open_error, sizeof g_open_error, "%s: no \"cases\" metadata", path);
        return;
    }
    char *copy = strdup(list);
    int cap = 1;
    for (const char *p = list; *p; p++) cap += *p == ',';
    g_cases = calloc((size_t)cap, sizeof *g_cases);
    if (!copy || !g_cases) abort();
    for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        fx_case *c = &g_cases[g_ncases];
        const char *js = kd_st_meta(g_fx, tok);
        const kd_json *op;
        if (!js || kd_json_parse(js, strlen(js), tok, &c->meta) != KD_OK ||
            !(op = kd_json_get(c->meta, "op")) || op->type != KD_JSON_STRING) {
            snprintf(g_open_error, sizeof g_open_error, "%s: case %s: bad metadata", path, tok);
            break;
        }
        c->name = strdup(tok);
        c->op = op->string;
        g_ncases++;
    }
    free(copy);
}

/* The fixture loads and covers every op of this file that has a PyTorch
 * counterpart (drop_path is random: its tests are statistical). */
static void test_fixture_coverage(void **state) {
    (void)state;
    if (g_open_error[0]) fail_msg("%s", g_open_error);
    static const char *ops[] = {"permute", "roll", "index_select", "add_bcast", "weight_norm",
                                "window_partition", "window_reverse", "patch_merge"};
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        int found = 0;
        for (int k = 0; k < g_ncases && !found; k++) found = !strcmp(g_cases[k].op, ops[i]);
        if (!found) fail_msg("layout.safetensors has no case for %s", ops[i]);
    }
}

/* ================================================== finite differences */

typedef kd_tensor *(*build_fn)(kd_graph *g, kd_tensor **in);

typedef struct {
    const char *name;
    build_fn build;
    kd_op op; /* must appear on the tape */
    int n_in;
    int ndim[3];
    int64_t shape[3][KD_MAX_DIMS];
    int diff[3];
} fd_case;

static kd_tensor *g_index; /* (12) int64 into a (5, D) table, with repeats */

static kd_tensor *b_perm4(kd_graph *g, kd_tensor **in) {
    static const int p[4] = {2, 0, 3, 1};
    return kd_permute(g, in[0], p);
}
static kd_tensor *b_perm6(kd_graph *g, kd_tensor **in) {
    static const int p[6] = {4, 1, -1, 0, 3, 2};
    return kd_permute(g, in[0], p);
}
static kd_tensor *b_roll(kd_graph *g, kd_tensor **in) {
    static const int d[2] = {1, 2};
    static const int64_t s[2] = {-2, 5};
    return kd_roll(g, in[0], 2, d, s);
}
/* The index as an arena tensor: in the tracked pass it is released at the
 * scope's end unless the op table retains it. */
static kd_tensor *b_index_select(kd_graph *g, kd_tensor **in) {
    kd_tensor *ix = kd_graph_tensor(g, KD_I64, 1, g_index->shape);
    if (!ix) return NULL;
    memcpy(ix->data, g_index->data, kd_tensor_nbytes(g_index));
    return kd_index_select(g, in[0], ix);
}
static kd_tensor *b_add_bcast(kd_graph *g, kd_tensor **in) { return kd_add_bcast(g, in[0], in[1]); }
static kd_tensor *b_drop_path(kd_graph *g, kd_tensor **in) { return kd_drop_path(g, in[0], 0.4f, 1); }
static kd_tensor *b_wn(kd_graph *g, kd_tensor **in) { return kd_weight_norm(g, in[0], in[1]); }
static kd_tensor *b_wn1(kd_graph *g, kd_tensor **in) { return kd_weight_norm(g, in[0], NULL); }
static kd_tensor *b_winpart(kd_graph *g, kd_tensor **in) { return kd_window_partition(g, in[0], 2); }
static kd_tensor *b_winrev(kd_graph *g, kd_tensor **in) { return kd_window_reverse(g, in[0], 2, 2, 4, 2); }
static kd_tensor *b_pmerge(kd_graph *g, kd_tensor **in) { return kd_patch_merge(g, in[0]); }

static const fd_case fd_cases[] = {
    {"permute_4d", b_perm4, KD_OP_PERMUTE, 1, {4}, {{2, 3, 2, 4}}, {1}},
    {"permute_6d", b_perm6, KD_OP_PERMUTE, 1, {6}, {{2, 1, 3, 2, 2, 3}}, {1}},
    {"roll", b_roll, KD_OP_ROLL, 1, {4}, {{2, 3, 4, 2}}, {1}},
    {"index_select", b_index_select, KD_OP_INDEX_SELECT, 1, {2}, {{5, 3}}, {1}},
    {"add_bcast", b_add_bcast, KD_OP_ADD_BCAST, 2, {5, 5}, {{2, 2, 3, 2, 2}, {1, 2, 1, 2, 2}}, {1, 1}},
    {"drop_path", b_drop_path, KD_OP_DROP_PATH, 1, {3}, {{8, 2, 3}}, {1}},
    {"weight_norm", b_wn, KD_OP_WEIGHT_NORM, 2, {2, 1}, {{4, 5}, {4}}, {1, 1}},
    {"weight_norm_nogain", b_wn1, KD_OP_WEIGHT_NORM, 1, {2}, {{3, 6}}, {1}},
    {"window_partition", b_winpart, KD_OP_PERMUTE, 1, {4}, {{2, 4, 2, 3}}, {1}},
    {"window_reverse", b_winrev, KD_OP_PERMUTE, 1, {3}, {{4, 4, 3}}, {1}},
    {"patch_merge", b_pmerge, KD_OP_PERMUTE, 1, {4}, {{2, 2, 4, 3}}, {1}},
};
#define N_FD ((int)(sizeof fd_cases / sizeof fd_cases[0]))

static double objective(const kd_tensor *out, const kd_tensor *r) {
    double s = 0;
    for (int64_t i = 0; i < kd_tensor_numel(out); i++) s += (double)kd_f32(out)[i] * kd_f32(r)[i];
    return s;
}

static void run_fd(const char *bename, const fd_case *c) {
    kd_graph *g = graph_new(bename);
    kd_graph_set_rng(g, 42, 7);
    kd_tensor *in[3] = {NULL, NULL, NULL}, *r = NULL;
    for (int k = 0; k < c->n_in; k++) {
        in[k] = tnew(KD_F32, c->ndim[k], c->shape[k]);
        kd_test_fill_uniform(kd_f32(in[k]), kd_tensor_numel(in[k]), -1, 1, 500 + 31 * (uint64_t)k);
        if (c->diff[k]) KD_ASSERT_OK(kd_tensor_require_grad(in[k]));
    }
    float *ana[2][3] = {{NULL}};
    for (int pass = 0; pass < 2; pass++) {
        kd_graph_reset(g);
        size_t scope = 0;
        if (pass == 1) {
            g->track_min = 0; /* every buffer tracked, released ones filled with NaN */
            g->scribble = 1;
            scope = kd_graph_scope_begin(g);
        }
        kd_tensor *use[3] = {NULL, NULL, NULL};
        for (int k = 0; k < c->n_in; k++) {
            use[k] = in[k];
            if (!c->diff[k]) continue;
            for (int64_t i = 0; i < kd_tensor_numel(in[k]); i++) kd_f32(in[k]->grad)[i] = 0.25f;
            if (pass == 1) use[k] = kd_scale(g, in[k], 1.0f);
        }
        kd_tensor *out = c->build(g, use);
        if (!out) fail_msg("%s [%s]: forward failed: %s", c->name, bename, kd_last_error());
        if (pass == 1) out = kd_graph_scope_return(g, scope, kd_scale(g, out, 1.0f));
        if (!r) {
            r = tnew(KD_F32, out->ndim, out->shape);
            kd_test_fill_uniform(kd_f32(r), kd_tensor_numel(r), 0.5f, 1.5f, 99);
        }
        int on_tape = 0;
        for (int i = 0; i < g->n_nodes; i++) on_tape |= g->tape[i].op == c->op;
        if (!on_tape) fail_msg("%s: op %s not recorded", c->name, kd_op_get_info(c->op)->name);
        if (kd_backward(g, kd_sum(g, kd_mul(g, out, r))) != KD_OK)
            fail_msg("%s [%s]: backward failed: %s", c->name, bename, kd_last_error());
        g->track_min = KD__TRACK_MIN;
        g->scribble = 0;
        for (int k = 0; k < c->n_in; k++) {
            if (!c->diff[k]) continue;
            int64_t n = kd_tensor_numel(in[k]);
            ana[pass][k] = malloc((size_t)n * sizeof(float));
            for (int64_t i = 0; i < n; i++) ana[pass][k][i] = kd_f32(in[k]->grad)[i] - 0.25f;
        }
    }
    kd_graph_set_grad_enabled(g, 0);
    const float h = 1e-2f;
    for (int k = 0; k < c->n_in; k++) {
        if (!c->diff[k]) continue;
        int64_t n = kd_tensor_numel(in[k]);
        float *num = calloc((size_t)n, sizeof *num), *x = kd_f32(in[k]);
        for (int64_t i = 0; i < n; i++) {
            float x0 = x[i];
            double j[2];
            for (int s = 0; s < 2; s++) {
                x[i] = s ? x0 - h : x0 + h;
                kd_graph_reset(g);
                kd_tensor *out = c->build(g, in);
                if (!out) fail_msg("%s: forward failed: %s", c->name, kd_last_error());
                j[s] = objective(out, r);
            }
            x[i] = x0;
            num[i] = (float)((j[0] - j[1]) / (2.0 * h));
        }
        for (int pass = 0; pass < 2; pass++) {
            char what[160];
            snprintf(what, sizeof what, "%s [%s]: d/d input %d (%s)", c->name, bename, k,
                     pass ? "fresh, tracked" : "accumulated");
            KD_ASSERT_CLOSE(ana[pass][k], num, n, FD_ATOL, FD_RTOL, what);
            free(ana[pass][k]);
        }
        free(num);
    }
    kd_tensor_free(r);
    for (int k = 0; k < c->n_in; k++) kd_tensor_free(in[k]);
    kd_graph_free(g);
}

static void test_finite_differences(void **state) {
    (void)state;
    int64_t m = 12;
    static const int64_t idx[12] = {4, 0, 2, 2, 4, 1, 0, 4, 2, 3, 3, 4};
    g_index = tnew(KD_I64, 1, &m);
    memcpy(g_index->data, idx, sizeof idx);
    for (int b = 0; b < g_nbe; b++)
        for (int i = 0; i < N_FD; i++) run_fd(g_backends[b], &fd_cases[i]);
    kd_tensor_free(g_index);
    g_index = NULL;
}

/* ============================== large sizes: plain loops, thread counts */

/* Row-major multi-index helpers for the plain reference loops. */
static void unravel(int64_t i, int nd, const int64_t *s, int64_t *ix) {
    for (int d = nd - 1; d >= 0; d--) {
        ix[d] = i % s[d];
        i /= s[d];
    }
}
static int64_t ravel(int nd, const int64_t *s, const int64_t *ix) {
    int64_t o = 0;
    for (int d = 0; d < nd; d++) o = o * s[d] + ix[d];
    return o;
}

typedef struct {
    float *out, *grad[2];
    int64_t n_out;
} big_res;

/* Runs build on the inputs at `threads` threads; objective sum(out * r),
 * r = uniform(seed 77) of out's shape. Returns copies of out and the grads. */
static big_res big_run(const char *bename, int threads, build_fn build, kd_tensor **in, int n_in) {
    int saved = kd_get_num_threads();
    kd_set_num_threads(threads);
    kd_graph *g = graph_new(bename);
    kd_graph_set_rng(g, 5, 6);
    for (int k = 0; k < n_in; k++)
        if (in[k]->grad) memset(in[k]->grad->data, 0, kd_tensor_nbytes(in[k]));
    kd_tensor *out = build(g, in);
    if (!out) fail_msg("forward failed: %s", kd_last_error());
    kd_tensor *r = kd_graph_tensor(g, KD_F32, out->ndim, out->shape);
    kd_test_fill_uniform(kd_f32(r), kd_tensor_numel(r), -1, 1, 77);
    KD_ASSERT_OK(kd_backward(g, kd_sum(g, kd_mul(g, out, r))));
    big_res res = {fdup(out), {NULL, NULL}, kd_tensor_numel(out)};
    for (int k = 0; k < n_in; k++)
        if (in[k]->grad) res.grad[k] = fdup(in[k]->grad);
    kd_graph_free(g);
    kd_set_num_threads(saved);
    return res;
}

static void big_free(big_res *r) {
    free(r->out);
    free(r->grad[0]);
    free(r->grad[1]);
}

/* Both thread counts agree bitwise; returns the 4-thread result. */
static big_res big_both(const char *bename, build_fn build, kd_tensor **in, int n_in, const char *what) {
    big_res a = big_run(bename, 1, build, in, n_in), b = big_run(bename, 4, build, in, n_in);
    if (memcmp(a.out, b.out, (size_t)a.n_out * sizeof(float)) != 0)
        fail_msg("%s [%s]: output differs between 1 and 4 threads", what, bename);
    for (int k = 0; k < n_in; k++)
        if (a.grad[k] && memcmp(a.grad[k], b.grad[k], kd_tensor_nbytes(in[k])) != 0)
            fail_msg("%s [%s]: gradient %d differs between 1 and 4 threads", what, bename, k);
    big_free(&a);
    return b;
}

static float *r_of(int64_t n) {
    float *r = malloc((size_t)n * sizeof *r);
    kd_test_fill_uniform(r, n, -1, 1, 77);
    return r;
}

static const int g_bperm[6] = {0, 1, 3, 2, 4, 5};
static kd_tensor *bb_perm(kd_graph *g, kd_tensor **in) { return kd_permute(g, in[0], g_bperm); }
static const int g_bperm2[4] = {3, 1, 0, 2};
static kd_tensor *bb_perm2(kd_graph *g, kd_tensor **in) { return kd_permute(g, in[0], g_bperm2); }
static kd_tensor *bb_roll(kd_graph *g, kd_tensor **in) {
    static const int d[2] = {1, 2};
    static const int64_t s[2] = {-3, 10};
    return kd_roll(g, in[0], 2, d, s);
}
static kd_tensor *bb_bcast(kd_graph *g, kd_tensor **in) { return kd_add_bcast(g, in[0], in[1]); }
static kd_tensor *bb_wn(kd_graph *g, kd_tensor **in) { return kd_weight_norm(g, in[0], in[1]); }
static kd_tensor *bb_isel(kd_graph *g, kd_tensor **in) { return kd_index_select(g, in[0], g_index); }

static void check_perm_big(const char *be, int nd, const int64_t *s, const int *perm, build_fn build) {
    kd_tensor *x = tnew(KD_F32, nd, s);
    int64_t n = kd_tensor_numel(x), ys[KD_MAX_DIMS], ix[KD_MAX_DIMS], jx[KD_MAX_DIMS];
    kd_test_fill_uniform(kd_f32(x), n, -1, 1, 3);
    KD_ASSERT_OK(kd_tensor_require_grad(x));
    big_res res = big_both(be, build, &x, 1, "permute");
    for (int d = 0; d < nd; d++) ys[d] = s[perm[d]];
    float *r = r_of(n);
    for (int64_t i = 0; i < n; i++) { /* y[i] = x[j], j[perm[d]] = i[d]; dx[j] = r[i] */
        unravel(i, nd, ys, ix);
        for (int d = 0; d < nd; d++) jx[perm[d]] = ix[d];
        int64_t j = ravel(nd, s, jx);
        if (res.out[i] != kd_f32(x)[j] || res.grad[0][j] != r[i])
            fail_msg("permute [%s]: element %lld wrong", be, (long long)i);
    }
    free(r);
    big_free(&res);
    kd_tensor_free(x);
}

static void test_large_sizes(void **state) {
    (void)state;
    for (int b = 0; b < g_nbe; b++) {
        const char *be = g_backends[b];
        /* Swin's window permute, (N, H/ws, ws, W/ws, ws, C), and a scramble. */
        const int64_t s6[6] = {4, 4, 7, 4, 7, 24}, s4[4] = {6, 20, 30, 17};
        check_perm_big(be, 6, s6, g_bperm, bb_perm);
        check_perm_big(be, 4, s4, g_bperm2, bb_perm2);

        { /* roll: y[i] = x[(i - shift) mod n] along axes 1, 2 */
            const int64_t s[4] = {8, 14, 14, 32};
            kd_tensor *x = tnew(KD_F32, 4, s);
            int64_t n = kd_tensor_numel(x), ix[4];
            kd_test_fill_uniform(kd_f32(x), n, -1, 1, 4);
            KD_ASSERT_OK(kd_tensor_require_grad(x));
            big_res res = big_both(be, bb_roll, &x, 1, "roll");
            float *r = r_of(n);
            for (int64_t i = 0; i < n; i++) {
                unravel(i, 4, s, ix);
                ix[1] = ((ix[1] + 3) % 14 + 14) % 14;
                ix[2] = ((ix[2] - 10) % 14 + 14) % 14;
                int64_t j = ravel(4, s, ix);
                if (res.out[i] != kd_f32(x)[j] || res.grad[0][j] != r[i])
                    fail_msg("roll [%s]: element %lld wrong", be, (long long)i);
            }
            free(r);
            big_free(&res);
            kd_tensor_free(x);
        }

        { /* add_bcast (B/nW, nW, h, N, N) + (1, nW, 1, N, N) */
            const int64_t xs[5] = {3, 4, 3, 49, 49}, bs[5] = {1, 4, 1, 49, 49};
            kd_tensor *in[2] = {tnew(KD_F32, 5, xs), tnew(KD_F32, 5, bs)};
            int64_t n = kd_tensor_numel(in[0]), nb = kd_tensor_numel(in[1]), ix[5];
            kd_test_fill_uniform(kd_f32(in[0]), n, -1, 1, 5);
            kd_test_fill_uniform(kd_f32(in[1]), nb, -1, 1, 6);
            for (int k = 0; k < 2; k++) KD_ASSERT_OK(kd_tensor_require_grad(in[k]));
            big_res res = big_both(be, bb_bcast, in, 2, "add_bcast");
            float *r = r_of(n);
            double *db = calloc((size_t)nb, sizeof *db);
            for (int64_t i = 0; i < n; i++) {
                unravel(i, 5, xs, ix);
                ix[0] = ix[2] = 0;
                int64_t j = ravel(5, bs, ix);
                if (res.out[i] != kd_f32(in[0])[i] + kd_f32(in[1])[j] || res.grad[0][i] != r[i])
                    fail_msg("add_bcast [%s]: element %lld wrong", be, (long long)i);
                db[j] += r[i];
            }
            float *dbf = malloc((size_t)nb * sizeof *dbf);
            for (int64_t j = 0; j < nb; j++) dbf[j] = (float)db[j];
            KD_ASSERT_CLOSE(res.grad[1], dbf, nb, 1e-6, 1e-5, "add_bcast d b (large)");
            free(dbf);
            free(db);
            free(r);
            big_free(&res);
            kd_tensor_free(in[0]);
            kd_tensor_free(in[1]);
        }

        { /* index_select: Swin ws = 7, table (169, 16), index (2401) */
            const int ws = 7;
            int64_t M = ws * ws * ws * ws, ts[2] = {(2 * ws - 1) * (2 * ws - 1), 16};
            g_index = tnew(KD_I64, 1, &M);
            int64_t *ix = g_index->data;
            for (int a = 0; a < ws * ws; a++)
                for (int c = 0; c < ws * ws; c++)
                    ix[a * ws * ws + c] = (a / ws - c / ws + ws - 1) * (2 * ws - 1) + (a % ws - c % ws + ws - 1);
            kd_tensor *t = tnew(KD_F32, 2, ts);
            kd_test_fill_uniform(kd_f32(t), kd_tensor_numel(t), -1, 1, 7);
            KD_ASSERT_OK(kd_tensor_require_grad(t));
            big_res res = big_both(be, bb_isel, &t, 1, "index_select");
            float *r = r_of(M * 16);
            double *dt = calloc((size_t)(ts[0] * 16), sizeof *dt);
            for (int64_t m = 0; m < M; m++)
                for (int j = 0; j < 16; j++) {
                    if (res.out[m * 16 + j] != kd_f32(t)[ix[m] * 16 + j])
                        fail_msg("index_select [%s]: row %lld wrong", be, (long long)m);
                    dt[ix[m] * 16 + j] += r[m * 16 + j];
                }
            float *dtf = malloc((size_t)(ts[0] * 16) * sizeof *dtf);
            for (int64_t j = 0; j < ts[0] * 16; j++) dtf[j] = (float)dt[j];
            KD_ASSERT_CLOSE(res.grad[0], dtf, ts[0] * 16, 1e-6, 1e-5, "index_select d table (large)");
            free(dtf);
            free(dt);
            free(r);
            big_free(&res);
            kd_tensor_free(t);
            kd_tensor_free(g_index);
            g_index = NULL;
        }

        { /* weight_norm (256, 200) with gain, in double here */
            const int64_t O = 256, I = 200, vs[2] = {O, I};
            kd_tensor *in[2] = {tnew(KD_F32, 2, vs), tnew(KD_F32, 1, &O)};
            kd_test_fill_uniform(kd_f32(in[0]), O * I, -1, 1, 8);
            kd_test_fill_uniform(kd_f32(in[1]), O, 0.5f, 2, 9);
            for (int k = 0; k < 2; k++) KD_ASSERT_OK(kd_tensor_require_grad(in[k]));
            big_res res = big_both(be, bb_wn, in, 2, "weight_norm");
            float *r = r_of(O * I), *w = malloc((size_t)(O * I) * sizeof *w),
                  *dv = malloc((size_t)(O * I) * sizeof *dv), *dg = malloc((size_t)O * sizeof *dg);
            for (int64_t o = 0; o < O; o++) {
                const float *v = kd_f32(in[0]) + o * I, *ro = r + o * I;
                double gg = kd_f32(in[1])[o], nn = 0, dot = 0;
                for (int64_t i = 0; i < I; i++) nn += (double)v[i] * v[i];
                nn = sqrt(nn);
                for (int64_t i = 0; i < I; i++) {
                    w[o * I + i] = (float)(gg * v[i] / nn);
                    dot += (double)ro[i] * v[i] / nn; /* <r, v/||v||> */
                }
                dg[o] = (float)dot;
                for (int64_t i = 0; i < I; i++) dv[o * I + i] = (float)(gg / nn * (ro[i] - dot * v[i] / nn));
            }
            KD_ASSERT_CLOSE(res.out, w, O * I, 1e-6, 1e-5, "weight_norm w (large)");
            KD_ASSERT_CLOSE(res.grad[0], dv, O * I, 1e-6, 1e-4, "weight_norm d v (large)");
            KD_ASSERT_CLOSE(res.grad[1], dg, O, 1e-6, 1e-5, "weight_norm d gain (large)");
            free(r);
            free(w);
            free(dv);
            free(dg);
            big_free(&res);
            kd_tensor_free(in[0]);
            kd_tensor_free(in[1]);
        }
    }
}

/* ========================================================== drop_path */

static void test_drop_path(void **state) {
    (void)state;
    const float p = 0.3f, inv = 1.0f / (1.0f - p);
    const int64_t N = 20000, s[3] = {N, 2, 3}, per = 6;
    kd_tensor *x = tnew(KD_F32, 3, s);
    kd_test_fill_uniform(kd_f32(x), N * per, 0.5f, 1.5f, 21);
    KD_ASSERT_OK(kd_tensor_require_grad(x));
    for (int b = 0; b < g_nbe; b++) {
        const char *be = g_backends[b];
        kd_graph *g = graph_new(be);
        kd_graph_set_rng(g, 1234, 9);
        memset(x->grad->data, 0, kd_tensor_nbytes(x));
        kd_tensor *y = kd_drop_path(g, x, p, 1);
        assert_non_null(y);
        assert_true(y != x);
        kd_tensor *r = kd_graph_tensor(g, KD_F32, 3, s);
        kd_test_fill_uniform(kd_f32(r), N * per, -1, 1, 22);
        KD_ASSERT_OK(kd_backward(g, kd_sum(g, kd_mul(g, y, r))));
        const float *xd = kd_f32(x), *yd = kd_f32(y), *rd = kd_f32(r), *gd = kd_f32(x->grad);
        unsigned char *keep = malloc((size_t)N);
        int64_t dropped = 0;
        for (int64_t i = 0; i < N; i++) {
            int zeros = 0;
            for (int64_t j = 0; j < per; j++) zeros += yd[i * per + j] == 0.0f;
            if (zeros != 0 && zeros != per)
                fail_msg("drop_path [%s]: sample %lld is partly dropped (%d of %lld zero)", be,
                         (long long)i, zeros, (long long)per);
            keep[i] = zeros == 0;
            dropped += !keep[i];
            for (int64_t j = 0; j < per; j++) {
                int64_t e = i * per + j;
                float want = keep[i] ? xd[e] * inv : 0.0f, gw = keep[i] ? inv * rd[e] : 0.0f;
                if (yd[e] != want)
                    fail_msg("drop_path [%s]: y[%lld] = %.9g, want %.9g (x * 1/(1-p))", be,
                             (long long)e, yd[e], want);
                if (gd[e] != gw)
                    fail_msg("drop_path [%s]: dx[%lld] = %.9g, want mask * scale * dy = %.9g", be,
                             (long long)e, gd[e], gw);
            }
        }
        /* Binomial(N, p): 5 sigma is 0.016 here; p as the keep probability
         * (0.7) or a per-element mask would be far outside. */
        double frac = (double)dropped / (double)N, sig = sqrt(p * (1 - p) / (double)N);
        if (fabs(frac - p) > 5 * sig)
            fail_msg("drop_path [%s]: dropped %.4f of the samples, want %.2f +- %.4f", be, frac,
                     (double)p, 5 * sig);

        /* Same seed and step: the same mask; kd_dropout's draw for element i
         * (first random op of a step in both cases) decides sample i. */
        kd_graph *g2 = graph_new(be);
        kd_graph_set_rng(g2, 1234, 9);
        kd_graph_set_grad_enabled(g2, 0);
        kd_tensor *y2 = kd_drop_path(g2, x, p, 1);
        assert_non_null(y2);
        assert_memory_equal(y2->data, y->data, kd_tensor_nbytes(x));
        kd_graph_reset(g2);
        int64_t ns = N;
        kd_tensor *ones = kd_graph_tensor(g2, KD_F32, 1, &ns);
        for (int64_t i = 0; i < N; i++) kd_f32(ones)[i] = 1.0f;
        kd_tensor *dm = kd_dropout(g2, ones, p, 1);
        assert_non_null(dm);
        for (int64_t i = 0; i < N; i++)
            if ((kd_f32(dm)[i] != 0.0f) != keep[i])
                fail_msg("drop_path [%s]: sample %lld: keep %d, but kd_dropout's draw says %d", be,
                         (long long)i, keep[i], kd_f32(dm)[i] != 0.0f);
        /* Another step, or a second call in the step: another mask. */
        kd_graph_reset(g2);
        kd_graph_set_rng(g2, 1234, 10);
        kd_tensor *y3 = kd_drop_path(g2, x, p, 1);
        assert_non_null(y3);
        int64_t diff = 0;
        for (int64_t i = 0; i < N; i++) diff += (kd_f32(y3)[i * per] != 0.0f) != keep[i];
        assert_true(diff > N / 10);
        kd_tensor *y4 = kd_drop_path(g2, x, p, 1);
        assert_non_null(y4);
        diff = 0;
        for (int64_t i = 0; i < N; i++) diff += (kd_f32(y4)[i * per] != 0.0f) != (kd_f32(y3)[i * per] != 0.0f);
        assert_true(diff > N / 10);
        /* Identity when not training or p == 0; nothing recorded. All zero for p = 1. */
        kd_graph_reset(g);
        assert_ptr_equal(kd_drop_path(g, x, p, 0), x);
        assert_ptr_equal(kd_drop_path(g, x, 0.0f, 1), x);
        assert_int_equal(kd_graph_tape_size(g), 0);
        kd_tensor *z = kd_drop_path(g, x, 1.0f, 1);
        assert_non_null(z);
        for (int64_t i = 0; i < N * per; i++)
            if (kd_f32(z)[i] != 0.0f) fail_msg("drop_path p = 1 [%s]: element %lld nonzero", be, (long long)i);
        free(keep);
        kd_graph_free(g2);
        kd_graph_free(g);
    }
    kd_tensor_free(x);
}

/* ====================================================== window round trip */

static void test_window_round_trip(void **state) {
    (void)state;
    const int64_t s[4] = {2, 8, 12, 5};
    kd_tensor *x = tnew(KD_F32, 4, s);
    int64_t n = kd_tensor_numel(x);
    kd_test_fill_uniform(kd_f32(x), n, -1, 1, 31);
    KD_ASSERT_OK(kd_tensor_require_grad(x));
    for (int b = 0; b < g_nbe; b++) {
        kd_graph *g = graph_new(g_backends[b]);
        memset(x->grad->data, 0, kd_tensor_nbytes(x));
        kd_tensor *w = kd_window_partition(g, x, 4);
        assert_non_null(w);
        assert_int_equal(w->ndim, 3);
        assert_int_equal(w->shape[0], 2 * 2 * 3);
        assert_int_equal(w->shape[1], 16);
        assert_int_equal(w->shape[2], 5);
        /* Window (n, wi, wj), token (a, c) is x[n, 4 wi + a, 4 wj + c]. */
        for (int64_t k = 0; k < n; k++) {
            int64_t c = k % 5, tok = (k / 5) % 16, win = k / 80;
            int64_t nn = win / 6, wi = (win / 3) % 2, wj = win % 3;
            int64_t src = ((nn * 8 + 4 * wi + tok / 4) * 12 + 4 * wj + tok % 4) * 5 + c;
            if (kd_f32(w)[k] != kd_f32(x)[src]) fail_msg("window_partition: element %lld", (long long)k);
        }
        kd_tensor *back = kd_window_reverse(g, w, 4, 2, 8, 12);
        assert_non_null(back);
        assert_int_equal(back->ndim, 4);
        assert_memory_equal(back->data, x->data, kd_tensor_nbytes(x));
        kd_tensor *r = kd_graph_tensor(g, KD_F32, 4, s);
        kd_test_fill_uniform(kd_f32(r), n, -1, 1, 32);
        KD_ASSERT_OK(kd_backward(g, kd_sum(g, kd_mul(g, back, r))));
        assert_memory_equal(x->grad->data, r->data, kd_tensor_nbytes(x));
        kd_graph_free(g);
    }
    kd_tensor_free(x);
}

/* ============================================================= errors */

/* The op returned NULL, the graph holds `st` and the message has every needle. */
static void expect_err(kd_graph *g, kd_tensor *got, kd_status st, const char *what, int n, ...) {
    if (got) fail_msg("%s: succeeded, want an error", what);
    if (kd_graph_status(g) != st)
        fail_msg("%s: status %s, want %s (%s)", what, kd_status_str(kd_graph_status(g)),
                 kd_status_str(st), kd_last_error());
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        const char *needle = va_arg(ap, const char *);
        if (!strstr(kd_last_error(), needle)) {
            va_end(ap);
            fail_msg("%s: message \"%s\" lacks \"%s\"", what, kd_last_error(), needle);
        }
    }
    va_end(ap);
    kd_graph_reset(g);
}

static void test_errors(void **state) {
    (void)state;
    kd_graph *g = graph_new("ref");
    const int64_t s4[4] = {2, 6, 8, 3}, s5[4] = {1, 5, 4, 2}, s3[3] = {2, 3, 4}, sb[3] = {1, 2, 4};
    const int64_t sv[2] = {5, 7}, sg = 4, st[2] = {6, 2}, m = 5;
    kd_tensor *x = tnew(KD_F32, 4, s4), *xo = tnew(KD_F32, 4, s5), *x3 = tnew(KD_F32, 3, s3);
    kd_tensor *b3 = tnew(KD_F32, 3, sb), *v = tnew(KD_F32, 2, sv), *gn = tnew(KD_F32, 1, &sg);
    kd_tensor *t = tnew(KD_F32, 2, st), *ix = tnew(KD_I64, 1, &m), *ix32 = tnew(KD_I32, 1, &m);
    kd_tensor *all[] = {x, xo, x3, b3, v, gn, t, ix, ix32};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) memset(all[i]->data, 0, kd_tensor_nbytes(all[i]));
    expect_err(g, kd_window_partition(g, x, 4), KD_ERR_SHAPE, "window_partition", 3,
               "window size 4", "H = 6", "W = 8");
    expect_err(g, kd_window_partition(g, x3, 2), KD_ERR_SHAPE, "window_partition 3-d", 1, "(N, H, W, C)");
    expect_err(g, kd_window_reverse(g, x3, 2, 1, 4, 4), KD_ERR_SHAPE, "window_reverse", 2,
               "(4, 4, C)", "window size 2");
    expect_err(g, kd_window_reverse(g, x3, 3, 1, 4, 6), KD_ERR_SHAPE, "window_reverse ws", 2,
               "window size 3", "H = 4");
    expect_err(g, kd_patch_merge(g, xo), KD_ERR_SHAPE, "patch_merge", 3, "H = 5", "W = 4", "even");
    int64_t *id = ix->data;
    for (int i = 0; i < 5; i++) id[i] = i % 3;
    id[3] = 6;
    expect_err(g, kd_index_select(g, t, ix), KD_ERR_INVALID, "index_select", 2, "index[3] = 6", "[0, 6)");
    id[3] = 1;
    id[1] = -1;
    expect_err(g, kd_index_select(g, t, ix), KD_ERR_INVALID, "index_select negative", 1, "index[1] = -1");
    expect_err(g, kd_index_select(g, t, ix32), KD_ERR_INVALID, "index_select i32", 1, "int64");
    expect_err(g, kd_index_select(g, x3, ix), KD_ERR_SHAPE, "index_select 3-d table", 1, "(L, D)");
    expect_err(g, kd_add_bcast(g, x3, b3), KD_ERR_SHAPE, "add_bcast", 3, "(1, 2, 4)", "(2, 3, 4)",
               "broadcast");
    expect_err(g, kd_add_bcast(g, x3, v), KD_ERR_SHAPE, "add_bcast rank", 1, "broadcast");
    static const int rep[3] = {0, 1, 1}, oob[3] = {0, 3, 1};
    expect_err(g, kd_permute(g, x3, rep), KD_ERR_INVALID, "permute repeated", 2, "perm[2] = 1", "repeated");
    expect_err(g, kd_permute(g, x3, oob), KD_ERR_INVALID, "permute range", 2, "perm[1] = 3", "out of range");
    static const int dims[1] = {3};
    static const int64_t sh[1] = {1};
    expect_err(g, kd_roll(g, x3, 1, dims, sh), KD_ERR_INVALID, "roll axis", 2, "axis 3", "(2, 3, 4)");
    expect_err(g, kd_roll(g, x3, 0, dims, sh), KD_ERR_INVALID, "roll no axis", 1, "at least one axis");
    expect_err(g, kd_weight_norm(g, v, gn), KD_ERR_SHAPE, "weight_norm gain", 3, "gain (4)", "(5)", "(5, 7)");
    expect_err(g, kd_weight_norm(g, x3, NULL), KD_ERR_SHAPE, "weight_norm 3-d", 1, "(O, I)");
    expect_err(g, kd_drop_path(g, x3, 1.5f, 1), KD_ERR_INVALID, "drop_path p", 2, "1.5", "[0, 1]");
    /* Sticky: after an error every op returns NULL until the reset. */
    assert_null(kd_patch_merge(g, xo));
    assert_null(kd_permute(g, x3, (const int[3]){2, 1, 0}));
    assert_int_not_equal(kd_graph_status(g), KD_OK);
    kd_graph_reset(g);
    assert_non_null(kd_permute(g, x3, (const int[3]){2, 1, 0}));
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) kd_tensor_free(all[i]);
    kd_graph_free(g);
}

/* ================================================================ main */

int main(void) {
    kd_backend *be = NULL;
    if (kd_backend_get("cpu", &be) == KD_OK)
        g_backends[g_nbe++] = "cpu";
    else
        printf("cpu backend not available (%s): testing ref only\n", kd_last_error());
    load_fixture();
    int nfx = g_open_error[0] ? 0 : g_nbe * g_ncases, nfix = 6;
    struct CMUnitTest *tests = calloc((size_t)(nfix + nfx), sizeof *tests);
    fx_run *runs = calloc((size_t)(nfx + 1), sizeof *runs);
    char **names = calloc((size_t)(nfx + 1), sizeof *names);
    if (!tests || !runs || !names) return 2;
    tests[0] = (struct CMUnitTest)cmocka_unit_test(test_fixture_coverage);
    tests[1] = (struct CMUnitTest)cmocka_unit_test(test_finite_differences);
    tests[2] = (struct CMUnitTest)cmocka_unit_test(test_large_sizes);
    tests[3] = (struct CMUnitTest)cmocka_unit_test(test_drop_path);
    tests[4] = (struct CMUnitTest)cmocka_unit_test(test_window_round_trip);
    tests[5] = (struct CMUnitTest)cmocka_unit_test(test_errors);
    for (int b = 0, k = 0; b < g_nbe && nfx; b++)
        for (int i = 0; i < g_ncases; i++, k++) {
            runs[k] = (fx_run){&g_cases[i], g_backends[b], NULL, {NULL}, 0};
            size_t len = strlen(g_backends[b]) + strlen(g_cases[i].name) + 8;
            names[k] = malloc(len);
            if (!names[k]) return 2;
            snprintf(names[k], len, "%s/%s", g_backends[b], g_cases[i].name);
            tests[nfix + k] = (struct CMUnitTest){names[k], run_fx, NULL, teardown_fx, &runs[k]};
        }
    int rc = _cmocka_run_group_tests("ops_layout", tests, (size_t)(nfix + nfx), NULL, NULL);
    for (int k = 0; k < nfx; k++) free(names[k]);
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
