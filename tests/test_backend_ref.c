/*
 * test_backend_ref.c: checks the "ref" backend kernels by means independent of
 * their own code, and the backend registry.
 *
 *   - Central finite differences of the scalar L = sum(y * r), r random, for
 *     every backward kernel (conv data/weights/bias, batch norm in training
 *     and eval mode, max and average pooling, ReLU/leaky ReLU, exp, log).
 *   - Adjoint identities <conv(x), dy> == <x, conv_bwd_data(dy)> ==
 *     <w, conv_bwd_weights(dy, x)>, and the same for pooling.
 *   - Conv forward against an im2col + gemm formulation written here, a 1x1
 *     conv against gemm, and small cases worked out by hand.
 *   - gemm against a naive triple loop with all transposes and padded
 *     leading dimensions; batch-norm running statistics and eval formula
 *     recomputed here in double.
 *   - accumulate = 1 adds to what is there; accumulate = 0 ignores it (the
 *     outputs are pre-filled with NaN).
 *   - Bitwise identical results for 1 and 3 threads.
 *   - The registry and the error paths (no aborts on bad input).
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_impl.h"
#include "kd/backend.h"

/* --------------------------------------------------------------- helpers */

static kd_backend *ref_be(void) {
    kd_backend *be = NULL;
    KD_ASSERT_OK(kd_backend_get("ref", &be));
    assert_non_null(be);
    return be;
}

static kd_tensor *tnew(int ndim, const int64_t *shape) {
    kd_tensor *t = NULL;
    KD_ASSERT_OK(kd_tensor_new(KD_F32, ndim, shape, &t));
    return t;
}
#define T1(a) tnew(1, (const int64_t[]){(a)})
#define T2(a, b) tnew(2, (const int64_t[]){(a), (b)})
#define T4(a, b, c, d) tnew(4, (const int64_t[]){(a), (b), (c), (d)})

static kd_tensor *tnew_i32(const kd_tensor *like) {
    kd_tensor *t = NULL;
    KD_ASSERT_OK(kd_tensor_new(KD_I32, like->ndim, like->shape, &t));
    return t;
}

static kd_tensor *tclone(const kd_tensor *src) {
    kd_tensor *t = tnew(src->ndim, src->shape);
    memcpy(t->data, src->data, kd_tensor_nbytes(src));
    return t;
}

static void tfill(kd_tensor *t, float lo, float hi, uint64_t seed) {
    kd_test_fill_uniform(kd_f32(t), kd_tensor_numel(t), lo, hi, seed);
}

static void tfill_value(kd_tensor *t, float v) {
    float *d = kd_f32(t);
    for (int64_t i = 0; i < kd_tensor_numel(t); i++) d[i] = v;
}

static double dot(const float *a, const float *b, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

static double dot_abs(const float *a, const float *b, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += fabs((double)a[i] * (double)b[i]);
    return s;
}

/* Fails unless lhs and rhs agree to a relative 1e-5 of `scale`. */
static void assert_adjoint(double lhs, double rhs, double scale, const char *what) {
    if (!(fabs(lhs - rhs) <= 1e-5 * scale + 1e-6))
        fail_msg("%s: adjoint identity broken: %.9g vs %.9g (scale %.3g)", what, lhs, rhs, scale);
}

/* Recomputes the forward output held by the context. */
typedef void (*fwd_fn)(void *ctx);

/* Central differences of L = sum(y * r) with respect to every element of
 * `param`, compared with the analytic gradient `grad`. The difference
 * y(+h) - y(-h) is formed element by element before weighting, which keeps
 * the rounding noise of the large sum out of the small difference. */
static void check_fd(float *param, int64_t n, const float *grad, fwd_fn fwd, void *ctx,
                     const kd_tensor *y, const float *r, float h, double atol, double rtol,
                     const char *what) {
    const int64_t ny = kd_tensor_numel(y);
    float *yp = malloc((size_t)ny * sizeof *yp);
    float *fd = malloc((size_t)n * sizeof *fd);
    assert_non_null(yp);
    assert_non_null(fd);
    const float *ym = kd_f32(y);
    for (int64_t i = 0; i < n; i++) {
        const float orig = param[i];
        const float up = orig + h, down = orig - h;
        param[i] = up;
        fwd(ctx);
        memcpy(yp, ym, (size_t)ny * sizeof *yp);
        param[i] = down;
        fwd(ctx);
        param[i] = orig;
        double s = 0.0;
        for (int64_t j = 0; j < ny; j++) s += ((double)yp[j] - (double)ym[j]) * (double)r[j];
        fd[i] = (float)(s / ((double)up - (double)down));
    }
    fwd(ctx);
    KD_ASSERT_CLOSE(grad, fd, n, atol, rtol, what);
    free(yp);
    free(fd);
}

/* Runs `run` with 1 and then 3 threads; the caller compares the results. */
static int saved_threads;
static void threads_begin(int n) {
    saved_threads = kd_get_num_threads();
    kd_set_num_threads(n);
}
static void threads_end(void) { kd_set_num_threads(saved_threads); }

static void assert_bitwise(const kd_tensor *a, const kd_tensor *b, const char *what) {
    if (memcmp(a->data, b->data, kd_tensor_nbytes(a)) != 0)
        fail_msg("%s differs between 1 and 3 threads", what);
}

/* ------------------------------------------------------------------ conv */

typedef struct {
    const char *name;
    int64_t N, C, H, W, O, KH, KW;
    kd_conv2d_params p;
    int bias;
} conv_cfg;

static conv_cfg conv_cfgs[] = {
    {"basic 3x3 pad 1", 2, 3, 6, 7, 4, 3, 3, {{1, 1}, {1, 1}, {1, 1}, 1, 0}, 1},
    {"stride 2 pad 1", 2, 3, 8, 9, 4, 3, 3, {{2, 2}, {1, 1}, {1, 1}, 1, 0}, 1},
    {"dilation 2 pad 2", 1, 2, 9, 8, 3, 3, 3, {{1, 1}, {2, 2}, {2, 2}, 1, 0}, 1},
    {"groups 2", 2, 4, 6, 6, 6, 3, 3, {{1, 1}, {0, 0}, {1, 1}, 2, 0}, 1},
    {"mixed 3x2 s(2,1) p(1,0) d(1,2) g2", 2, 4, 9, 8, 4, 3, 2, {{2, 1}, {1, 0}, {1, 2}, 2, 0}, 0},
    {"depthwise", 2, 4, 5, 6, 4, 3, 3, {{1, 1}, {1, 1}, {1, 1}, 4, 0}, 1},
    {"1x1 stride 2", 2, 5, 7, 6, 3, 1, 1, {{2, 2}, {0, 0}, {1, 1}, 1, 0}, 1},
};

/* All tensors of one conv configuration: x (N, C, H, W), w (O, C/G, KH, KW),
 * b (O) or NULL, y and r (N, O, OH, OW). */
typedef struct {
    kd_backend *be;
    const conv_cfg *cfg;
    kd_tensor *x, *w, *b, *y, *r;
} conv_ctx;

static void conv_setup(conv_ctx *k, const conv_cfg *c) {
    k->be = ref_be();
    k->cfg = c;
    int64_t OH = kd_conv_out_size(c->H, c->KH, c->p.stride[0], c->p.pad[0], c->p.dilation[0]);
    int64_t OW = kd_conv_out_size(c->W, c->KW, c->p.stride[1], c->p.pad[1], c->p.dilation[1]);
    k->x = T4(c->N, c->C, c->H, c->W);
    k->w = T4(c->O, c->C / c->p.groups, c->KH, c->KW);
    k->b = c->bias ? T1(c->O) : NULL;
    k->y = T4(c->N, c->O, OH, OW);
    k->r = T4(c->N, c->O, OH, OW);
    tfill(k->x, -1, 1, 11);
    tfill(k->w, -1, 1, 12);
    if (k->b) tfill(k->b, -1, 1, 13);
    tfill(k->r, -1, 1, 14);
}

static void conv_teardown(conv_ctx *k) {
    kd_tensor_free(k->x);
    kd_tensor_free(k->w);
    kd_tensor_free(k->b);
    kd_tensor_free(k->y);
    kd_tensor_free(k->r);
}

static void conv_fwd(void *ctx) {
    conv_ctx *k = ctx;
    KD_ASSERT_OK(k->be->conv2d_forward(k->be, &k->cfg->p, k->x, k->w, k->b, k->y));
}

/* The objective is linear in each of x, w and b, so the central difference is
 * exact up to rounding and a large step keeps that rounding small. */
static void test_conv_fd(void **state) {
    const conv_cfg *c = *state;
    conv_ctx k;
    conv_setup(&k, c);
    kd_tensor *dx = tnew(k.x->ndim, k.x->shape), *dw = tnew(k.w->ndim, k.w->shape);
    kd_tensor *db = T1(c->O);
    KD_ASSERT_OK(k.be->conv2d_backward_data(k.be, &c->p, k.r, k.w, dx, 0));
    KD_ASSERT_OK(k.be->conv2d_backward_weights(k.be, &c->p, k.r, k.x, dw, db, 0));
    check_fd(kd_f32(k.x), kd_tensor_numel(k.x), kd_f32(dx), conv_fwd, &k, k.y, kd_f32(k.r), 0.05f,
             1e-3, 2e-2, "conv dx vs finite differences");
    check_fd(kd_f32(k.w), kd_tensor_numel(k.w), kd_f32(dw), conv_fwd, &k, k.y, kd_f32(k.r), 0.05f,
             1e-3, 2e-2, "conv dw vs finite differences");
    if (k.b)
        check_fd(kd_f32(k.b), c->O, kd_f32(db), conv_fwd, &k, k.y, kd_f32(k.r), 0.05f, 1e-3, 2e-2,
                 "conv db vs finite differences");
    kd_tensor_free(dx);
    kd_tensor_free(dw);
    kd_tensor_free(db);
    conv_teardown(&k);
}

/* With zero bias, conv is bilinear: <conv(x, w), dy> = <x, A^T dy> = <w, B^T dy>.
 * db must be the plain sum of dy per output channel. */
static void test_conv_adjoint(void **state) {
    const conv_cfg *c = *state;
    conv_ctx k;
    conv_setup(&k, c);
    kd_tensor *dx = tnew(k.x->ndim, k.x->shape), *dw = tnew(k.w->ndim, k.w->shape);
    kd_tensor *db = T1(c->O);
    kd_tensor *dy = k.r;
    KD_ASSERT_OK(k.be->conv2d_forward(k.be, &c->p, k.x, k.w, NULL, k.y));
    KD_ASSERT_OK(k.be->conv2d_backward_data(k.be, &c->p, dy, k.w, dx, 0));
    KD_ASSERT_OK(k.be->conv2d_backward_weights(k.be, &c->p, dy, k.x, dw, db, 0));
    const int64_t ny = kd_tensor_numel(k.y);
    double lhs = dot(kd_f32(k.y), kd_f32(dy), ny), scale = dot_abs(kd_f32(k.y), kd_f32(dy), ny);
    assert_adjoint(lhs, dot(kd_f32(k.x), kd_f32(dx), kd_tensor_numel(k.x)), scale, "conv data");
    assert_adjoint(lhs, dot(kd_f32(k.w), kd_f32(dw), kd_tensor_numel(k.w)), scale, "conv weights");
    const int64_t per = k.y->shape[2] * k.y->shape[3];
    float *want = malloc((size_t)c->O * sizeof *want);
    for (int64_t o = 0; o < c->O; o++) {
        double s = 0.0;
        for (int64_t n = 0; n < c->N; n++)
            for (int64_t i = 0; i < per; i++) s += kd_f32(dy)[(n * c->O + o) * per + i];
        want[o] = (float)s;
    }
    KD_ASSERT_CLOSE(kd_f32(db), want, c->O, 1e-5, 1e-5, "conv db vs sum of dy");
    free(want);
    kd_tensor_free(dx);
    kd_tensor_free(dw);
    kd_tensor_free(db);
    conv_teardown(&k);
}

/* Conv forward as im2col written here followed by one gemm per (sample, group). */
static void test_conv_im2col(void **state) {
    const conv_cfg *c = *state;
    conv_ctx k;
    conv_setup(&k, c);
    conv_fwd(&k);
    const int64_t G = c->p.groups, Cg = c->C / G, Og = c->O / G;
    const int64_t OH = k.y->shape[2], OW = k.y->shape[3], R = Cg * c->KH * c->KW;
    float *cols = malloc((size_t)(R * OH * OW) * sizeof *cols);
    float *want = malloc(kd_tensor_nbytes(k.y));
    const float *x = kd_f32(k.x);
    for (int64_t n = 0; n < c->N; n++) {
        for (int64_t g = 0; g < G; g++) {
            for (int64_t ci = 0; ci < Cg; ci++)
                for (int64_t kh = 0; kh < c->KH; kh++)
                    for (int64_t kw = 0; kw < c->KW; kw++)
                        for (int64_t oh = 0; oh < OH; oh++)
                            for (int64_t ow = 0; ow < OW; ow++) {
                                int64_t ih = oh * c->p.stride[0] - c->p.pad[0] + kh * c->p.dilation[0];
                                int64_t iw = ow * c->p.stride[1] - c->p.pad[1] + kw * c->p.dilation[1];
                                int inside = ih >= 0 && ih < c->H && iw >= 0 && iw < c->W;
                                cols[((ci * c->KH + kh) * c->KW + kw) * OH * OW + oh * OW + ow] =
                                    inside ? x[((n * c->C + g * Cg + ci) * c->H + ih) * c->W + iw] : 0.0f;
                            }
            float *out = want + (n * c->O + g * Og) * OH * OW; /* (Og, OH*OW) */
            KD_ASSERT_OK(k.be->gemm(k.be, 0, 0, Og, OH * OW, R, 1.0f, kd_f32(k.w) + g * Og * R, R, cols,
                                    OH * OW, 0.0f, out, OH * OW));
            for (int64_t o = 0; o < Og && k.b; o++)
                for (int64_t i = 0; i < OH * OW; i++) out[o * OH * OW + i] += kd_f32(k.b)[g * Og + o];
        }
    }
    KD_ASSERT_CLOSE(kd_f32(k.y), want, kd_tensor_numel(k.y), 1e-5, 1e-5, "conv forward vs im2col+gemm");
    free(cols);
    free(want);
    conv_teardown(&k);
}

/* accumulate = 0 ignores NaN already in the outputs; accumulate = 1 adds. */
static void test_conv_accumulate(void **state) {
    const conv_cfg *c = *state;
    conv_ctx k;
    conv_setup(&k, c);
    kd_tensor *dx = tnew(k.x->ndim, k.x->shape), *dw = tnew(k.w->ndim, k.w->shape), *db = T1(c->O);
    tfill_value(dx, NAN);
    tfill_value(dw, NAN);
    tfill_value(db, NAN);
    KD_ASSERT_OK(k.be->conv2d_backward_data(k.be, &c->p, k.r, k.w, dx, 0));
    KD_ASSERT_OK(k.be->conv2d_backward_weights(k.be, &c->p, k.r, k.x, dw, db, 0));
    kd_tensor *ax = tnew(dx->ndim, dx->shape), *aw = tnew(dw->ndim, dw->shape), *ab = T1(c->O);
    tfill(ax, -1, 1, 21);
    tfill(aw, -1, 1, 22);
    tfill(ab, -1, 1, 23);
    kd_tensor *ax0 = tclone(ax), *aw0 = tclone(aw), *ab0 = tclone(ab);
    KD_ASSERT_OK(k.be->conv2d_backward_data(k.be, &c->p, k.r, k.w, ax, 1));
    KD_ASSERT_OK(k.be->conv2d_backward_weights(k.be, &c->p, k.r, k.x, aw, ab, 1));
    for (int64_t i = 0; i < kd_tensor_numel(ax0); i++) kd_f32(ax0)[i] += kd_f32(dx)[i];
    for (int64_t i = 0; i < kd_tensor_numel(aw0); i++) kd_f32(aw0)[i] += kd_f32(dw)[i];
    for (int64_t i = 0; i < c->O; i++) kd_f32(ab0)[i] += kd_f32(db)[i];
    KD_ASSERT_CLOSE(kd_f32(ax), kd_f32(ax0), kd_tensor_numel(ax), 1e-6, 1e-6, "conv dx accumulate");
    KD_ASSERT_CLOSE(kd_f32(aw), kd_f32(aw0), kd_tensor_numel(aw), 1e-6, 1e-6, "conv dw accumulate");
    KD_ASSERT_CLOSE(kd_f32(ab), kd_f32(ab0), c->O, 1e-6, 1e-6, "conv db accumulate");
    kd_tensor *ts[] = {dx, dw, db, ax, aw, ab, ax0, aw0, ab0};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
    conv_teardown(&k);
}

static void test_conv_threads(void **state) {
    const conv_cfg *c = *state;
    conv_ctx k;
    conv_setup(&k, c);
    kd_tensor *out[2][4];
    for (int t = 0; t < 2; t++) {
        threads_begin(t == 0 ? 1 : 3);
        out[t][0] = tnew(k.y->ndim, k.y->shape);
        out[t][1] = tnew(k.x->ndim, k.x->shape);
        out[t][2] = tnew(k.w->ndim, k.w->shape);
        out[t][3] = T1(c->O);
        KD_ASSERT_OK(k.be->conv2d_forward(k.be, &c->p, k.x, k.w, k.b, out[t][0]));
        KD_ASSERT_OK(k.be->conv2d_backward_data(k.be, &c->p, k.r, k.w, out[t][1], 0));
        KD_ASSERT_OK(k.be->conv2d_backward_weights(k.be, &c->p, k.r, k.x, out[t][2], out[t][3], 0));
        threads_end();
    }
    static const char *what[4] = {"conv y", "conv dx", "conv dw", "conv db"};
    for (int i = 0; i < 4; i++) {
        assert_bitwise(out[0][i], out[1][i], what[i]);
        kd_tensor_free(out[0][i]);
        kd_tensor_free(out[1][i]);
    }
    conv_teardown(&k);
}

/* Worked by hand: x = 1..9 as 3x3, w = [[1, 2], [3, 4]] (cross-correlation, not flipped). */
static void test_conv_hand(void **state) {
    (void)state;
    kd_backend *be = ref_be();
    kd_tensor *x = T4(1, 1, 3, 3), *w = T4(1, 1, 2, 2), *b = T1(1);
    for (int i = 0; i < 9; i++) kd_f32(x)[i] = (float)(i + 1);
    for (int i = 0; i < 4; i++) kd_f32(w)[i] = (float)(i + 1);
    kd_f32(b)[0] = 0.5f;

    kd_conv2d_params p1 = {{1, 1}, {0, 0}, {1, 1}, 1, 0};
    kd_tensor *y1 = T4(1, 1, 2, 2);
    KD_ASSERT_OK(be->conv2d_forward(be, &p1, x, w, b, y1));
    const float want1[4] = {37.5f, 47.5f, 67.5f, 77.5f};
    KD_ASSERT_CLOSE(kd_f32(y1), want1, 4, 0, 0, "conv stride 1 by hand");

    kd_conv2d_params p2 = {{2, 2}, {1, 1}, {1, 1}, 1, 0};
    kd_tensor *y2 = T4(1, 1, 2, 2);
    KD_ASSERT_OK(be->conv2d_forward(be, &p2, x, w, NULL, y2));
    const float want2[4] = {4.0f, 18.0f, 36.0f, 77.0f};
    KD_ASSERT_CLOSE(kd_f32(y2), want2, 4, 0, 0, "conv stride 2 pad 1 by hand");

    /* With dy = [[1, 0], [0, 0]] the data gradient is w's bottom-right tap at x[0, 0]. */
    kd_tensor *dy = T4(1, 1, 2, 2), *dx = T4(1, 1, 3, 3);
    kd_f32(dy)[0] = 1.0f;
    KD_ASSERT_OK(be->conv2d_backward_data(be, &p2, dy, w, dx, 0));
    const float want3[9] = {4, 0, 0, 0, 0, 0, 0, 0, 0};
    KD_ASSERT_CLOSE(kd_f32(dx), want3, 9, 0, 0, "conv backward data by hand");

    kd_tensor *ts[] = {x, w, b, y1, y2, dy, dx};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
}

/* A 1x1 convolution is W (O, C) @ X[n] (C, H*W) per sample, plus the bias. */
static void test_conv_1x1_is_gemm(void **state) {
    (void)state;
    kd_backend *be = ref_be();
    const int64_t N = 2, C = 5, H = 4, W = 3, O = 6;
    kd_tensor *x = T4(N, C, H, W), *w = T4(O, C, 1, 1), *b = T1(O), *y = T4(N, O, H, W);
    tfill(x, -1, 1, 31);
    tfill(w, -1, 1, 32);
    tfill(b, -1, 1, 33);
    kd_conv2d_params p = {{1, 1}, {0, 0}, {1, 1}, 1, 0};
    KD_ASSERT_OK(be->conv2d_forward(be, &p, x, w, b, y));
    float *want = malloc(kd_tensor_nbytes(y));
    for (int64_t n = 0; n < N; n++) {
        float *out = want + n * O * H * W;
        KD_ASSERT_OK(be->gemm(be, 0, 0, O, H * W, C, 1.0f, kd_f32(w), C, kd_f32(x) + n * C * H * W, H * W,
                              0.0f, out, H * W));
        for (int64_t o = 0; o < O; o++)
            for (int64_t i = 0; i < H * W; i++) out[o * H * W + i] += kd_f32(b)[o];
    }
    KD_ASSERT_CLOSE(kd_f32(y), want, kd_tensor_numel(y), 1e-6, 1e-6, "1x1 conv vs gemm");
    free(want);
    kd_tensor_free(x);
    kd_tensor_free(w);
    kd_tensor_free(b);
    kd_tensor_free(y);
}

/* ------------------------------------------------------------------ gemm */

static void test_gemm_hand(void **state) {
    (void)state;
    kd_backend *be = ref_be();
    const float A[4] = {1, 2, 3, 4}, B[4] = {5, 6, 7, 8};
    float C[4] = {1, 1, 1, 1};
    KD_ASSERT_OK(be->gemm(be, 0, 0, 2, 2, 2, 1.0f, A, 2, B, 2, 0.0f, C, 2));
    const float want[4] = {19, 22, 43, 50};
    KD_ASSERT_CLOSE(C, want, 4, 0, 0, "gemm 2x2 by hand");
    /* A^T @ B = [[1, 3], [2, 4]] @ [[5, 6], [7, 8]]. */
    KD_ASSERT_OK(be->gemm(be, 1, 0, 2, 2, 2, 1.0f, A, 2, B, 2, 0.0f, C, 2));
    const float want_t[4] = {26, 30, 38, 44};
    KD_ASSERT_CLOSE(C, want_t, 4, 0, 0, "gemm A^T B by hand");
}

/* All transposes, padded leading dimensions, alpha and beta, against a naive
 * loop; padding columns of C must stay untouched and beta = 0 must not read C. */
static void test_gemm_naive(void **state) {
    (void)state;
    kd_backend *be = ref_be();
    const int64_t M = 7, N = 5, K = 9, pad = 3;
    for (int ta = 0; ta < 2; ta++) {
        for (int tb = 0; tb < 2; tb++) {
            for (int use_beta = 0; use_beta < 2; use_beta++) {
                const int64_t lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
                const int64_t arows = ta ? K : M, brows = tb ? N : K;
                float *A = malloc((size_t)(arows * lda) * sizeof *A);
                float *B = malloc((size_t)(brows * ldb) * sizeof *B);
                float *C = malloc((size_t)(M * ldc) * sizeof *C);
                float *want = malloc((size_t)(M * ldc) * sizeof *want);
                kd_test_fill_uniform(A, arows * lda, -1, 1, 41);
                kd_test_fill_uniform(B, brows * ldb, -1, 1, 42);
                kd_test_fill_uniform(C, M * ldc, -1, 1, 43);
                const float alpha = 0.7f, beta = use_beta ? -1.3f : 0.0f;
                for (int64_t i = 0; i < M; i++) {
                    for (int64_t j = 0; j < ldc; j++) {
                        if (j >= N) {
                            want[i * ldc + j] = C[i * ldc + j];
                            continue;
                        }
                        double s = 0.0;
                        for (int64_t kk = 0; kk < K; kk++) {
                            double a = ta ? A[kk * lda + i] : A[i * lda + kk];
                            double b = tb ? B[j * ldb + kk] : B[kk * ldb + j];
                            s += a * b;
                        }
                        want[i * ldc + j] = (float)(alpha * s + (use_beta ? beta * C[i * ldc + j] : 0.0));
                    }
                }
                if (!use_beta)
                    for (int64_t i = 0; i < M; i++)
                        for (int64_t j = 0; j < N; j++) C[i * ldc + j] = NAN;
                KD_ASSERT_OK(be->gemm(be, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc));
                char what[64];
                snprintf(what, sizeof what, "gemm ta=%d tb=%d beta=%g", ta, tb, beta);
                KD_ASSERT_CLOSE(C, want, M * ldc, 1e-6, 1e-5, what);
                free(A);
                free(B);
                free(C);
                free(want);
            }
        }
    }
}

/* ------------------------------------------------------------- batchnorm */

typedef struct {
    kd_backend *be;
    kd_bn_params p;
    kd_tensor *x, *g, *b, *rm, *rv, *y, *sm, *sr, *r;
} bn_ctx;

static void bn_setup(bn_ctx *k, int ndim, const int64_t *shape, int training) {
    k->be = ref_be();
    k->p = (kd_bn_params){1e-5f, 0.1f, training};
    const int64_t C = shape[1];
    k->x = tnew(ndim, shape);
    k->y = tnew(ndim, shape);
    k->r = tnew(ndim, shape);
    k->g = T1(C), k->b = T1(C), k->rm = T1(C), k->rv = T1(C), k->sm = T1(C), k->sr = T1(C);
    tfill(k->x, -1, 1, 51);
    /* Give each channel its own offset and scale. */
    int64_t S = 1;
    for (int i = 2; i < ndim; i++) S *= shape[i];
    for (int64_t n = 0; n < shape[0]; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                float *v = &kd_f32(k->x)[(n * C + c) * S + s];
                *v = *v * (0.5f + 0.5f * (float)c) + 0.3f * (float)c - 0.2f;
            }
    tfill(k->g, 0.5f, 1.5f, 52);
    tfill(k->b, -0.5f, 0.5f, 53);
    tfill(k->rm, -0.5f, 0.5f, 54);
    tfill(k->rv, 0.5f, 2.0f, 55);
    tfill(k->r, -1, 1, 56);
}

static void bn_teardown(bn_ctx *k) {
    kd_tensor *ts[] = {k->x, k->g, k->b, k->rm, k->rv, k->y, k->sm, k->sr, k->r};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
}

/* In training mode the forward pass also moves the running statistics; that
 * does not change y, so finite differences may call it repeatedly. */
static void bn_fwd(void *ctx) {
    bn_ctx *k = ctx;
    KD_ASSERT_OK(k->be->batchnorm_forward(k->be, &k->p, k->x, k->g, k->b, k->rm, k->rv, k->y, k->sm, k->sr));
}

static void bn_fd(int ndim, const int64_t *shape, int training) {
    bn_ctx k;
    bn_setup(&k, ndim, shape, training);
    bn_fwd(&k);
    kd_tensor *dx = tnew(ndim, shape), *dg = T1(shape[1]), *db = T1(shape[1]);
    KD_ASSERT_OK(k.be->batchnorm_backward(k.be, &k.p, k.r, k.x, k.g, k.sm, k.sr, dx, dg, db, 0));
    const float *r = kd_f32(k.r);
    check_fd(kd_f32(k.x), kd_tensor_numel(k.x), kd_f32(dx), bn_fwd, &k, k.y, r, 5e-3f, 1e-3, 2e-2,
             training ? "bn train dx vs finite differences" : "bn eval dx vs finite differences");
    check_fd(kd_f32(k.g), shape[1], kd_f32(dg), bn_fwd, &k, k.y, r, 1e-2f, 1e-3, 2e-2, "bn dgamma vs finite differences");
    check_fd(kd_f32(k.b), shape[1], kd_f32(db), bn_fwd, &k, k.y, r, 1e-2f, 1e-3, 2e-2, "bn dbeta vs finite differences");

    /* NULL parameter gradients are allowed and leave dx unchanged. */
    kd_tensor *dx2 = tnew(ndim, shape);
    KD_ASSERT_OK(k.be->batchnorm_backward(k.be, &k.p, k.r, k.x, k.g, k.sm, k.sr, dx2, NULL, NULL, 0));
    KD_ASSERT_CLOSE(kd_f32(dx2), kd_f32(dx), kd_tensor_numel(dx), 0, 0, "bn dx without dgamma/dbeta");
    kd_tensor_free(dx);
    kd_tensor_free(dx2);
    kd_tensor_free(dg);
    kd_tensor_free(db);
    bn_teardown(&k);
}

static void test_bn_fd_train_nchw(void **state) {
    (void)state;
    bn_fd(4, (const int64_t[]){2, 3, 3, 4}, 1);
}

static void test_bn_fd_train_nc(void **state) {
    (void)state;
    bn_fd(2, (const int64_t[]){8, 3}, 1);
}

/* Eval mode: the forward writes the running statistics into save_*, and a
 * backward with training = 0 treats them as constants. */
static void test_bn_fd_eval(void **state) {
    (void)state;
    bn_fd(4, (const int64_t[]){2, 3, 3, 4}, 0);
}

/* Running statistics after one training step, the saved statistics, the
 * normalised output, then eval mode with the updated running statistics,
 * all recomputed here in double. */
static void test_bn_running_stats(void **state) {
    (void)state;
    const int64_t shape[4] = {4, 3, 2, 2}, N = 4, C = 3, S = 4, M = N * S;
    bn_ctx k;
    bn_setup(&k, 4, shape, 1);
    float rm0[3], rv0[3];
    memcpy(rm0, kd_f32(k.rm), sizeof rm0);
    memcpy(rv0, kd_f32(k.rv), sizeof rv0);
    bn_fwd(&k);
    const float *x = kd_f32(k.x), *g = kd_f32(k.g), *b = kd_f32(k.b);
    float want_rm[3], want_rv[3], want_sm[3], want_sr[3];
    float *want_y = malloc(kd_tensor_nbytes(k.y));
    for (int64_t c = 0; c < C; c++) {
        double sum = 0.0, sq = 0.0;
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) sum += x[(n * C + c) * S + s];
        double mean = sum / M;
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) sq += pow(x[(n * C + c) * S + s] - mean, 2);
        double var_biased = sq / M, var_unbiased = sq / (M - 1);
        want_sm[c] = (float)mean;
        want_sr[c] = (float)(1.0 / sqrt(var_biased + 1e-5));
        want_rm[c] = (float)(0.9 * rm0[c] + 0.1 * mean);
        want_rv[c] = (float)(0.9 * rv0[c] + 0.1 * var_unbiased);
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) {
                int64_t i = (n * C + c) * S + s;
                want_y[i] = (float)((x[i] - mean) / sqrt(var_biased + 1e-5) * g[c] + b[c]);
            }
        /* The output has mean beta and biased standard deviation ~gamma. */
        double ym = 0.0, yv = 0.0;
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) ym += kd_f32(k.y)[(n * C + c) * S + s];
        ym /= M;
        for (int64_t n = 0; n < N; n++)
            for (int64_t s = 0; s < S; s++) yv += pow(kd_f32(k.y)[(n * C + c) * S + s] - ym, 2);
        yv /= M;
        assert_true(fabs(ym - b[c]) < 1e-5);
        assert_true(fabs(sqrt(yv) - g[c]) < 1e-3 * g[c]);
    }
    KD_ASSERT_CLOSE(kd_f32(k.sm), want_sm, C, 1e-6, 1e-6, "bn save_mean");
    KD_ASSERT_CLOSE(kd_f32(k.sr), want_sr, C, 1e-6, 1e-6, "bn save_rstd");
    KD_ASSERT_CLOSE(kd_f32(k.rm), want_rm, C, 1e-6, 1e-6, "bn running_mean");
    KD_ASSERT_CLOSE(kd_f32(k.rv), want_rv, C, 1e-6, 1e-6, "bn running_var (unbiased)");
    KD_ASSERT_CLOSE(kd_f32(k.y), want_y, kd_tensor_numel(k.y), 1e-5, 1e-5, "bn training output");

    /* Eval: y = (x - rm) / sqrt(rv + eps) * gamma + beta; running stats unchanged. */
    k.p.training = 0;
    float rm1[3], rv1[3];
    memcpy(rm1, kd_f32(k.rm), sizeof rm1);
    memcpy(rv1, kd_f32(k.rv), sizeof rv1);
    KD_ASSERT_OK(k.be->batchnorm_forward(k.be, &k.p, k.x, k.g, k.b, k.rm, k.rv, k.y, NULL, NULL));
    for (int64_t n = 0; n < N; n++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t s = 0; s < S; s++) {
                int64_t i = (n * C + c) * S + s;
                want_y[i] = (float)((x[i] - rm1[c]) / sqrt(rv1[c] + 1e-5) * g[c] + b[c]);
            }
    KD_ASSERT_CLOSE(kd_f32(k.y), want_y, kd_tensor_numel(k.y), 1e-5, 1e-5, "bn eval output");
    KD_ASSERT_CLOSE(kd_f32(k.rm), rm1, C, 0, 0, "bn eval leaves running_mean");
    KD_ASSERT_CLOSE(kd_f32(k.rv), rv1, C, 0, 0, "bn eval leaves running_var");
    free(want_y);
    bn_teardown(&k);
}

static void test_bn_accumulate(void **state) {
    (void)state;
    const int64_t shape[4] = {2, 3, 2, 3};
    bn_ctx k;
    bn_setup(&k, 4, shape, 1);
    bn_fwd(&k);
    kd_tensor *dx = tnew(4, shape), *dg = T1(3), *db = T1(3);
    tfill_value(dx, NAN);
    tfill_value(dg, NAN);
    tfill_value(db, NAN);
    KD_ASSERT_OK(k.be->batchnorm_backward(k.be, &k.p, k.r, k.x, k.g, k.sm, k.sr, dx, dg, db, 0));
    kd_tensor *ax = tnew(4, shape), *ag = T1(3), *ab = T1(3);
    tfill(ax, -1, 1, 61);
    tfill(ag, -1, 1, 62);
    tfill(ab, -1, 1, 63);
    kd_tensor *ax0 = tclone(ax), *ag0 = tclone(ag), *ab0 = tclone(ab);
    KD_ASSERT_OK(k.be->batchnorm_backward(k.be, &k.p, k.r, k.x, k.g, k.sm, k.sr, ax, ag, ab, 1));
    for (int64_t i = 0; i < kd_tensor_numel(ax0); i++) kd_f32(ax0)[i] += kd_f32(dx)[i];
    for (int64_t i = 0; i < 3; i++) kd_f32(ag0)[i] += kd_f32(dg)[i], kd_f32(ab0)[i] += kd_f32(db)[i];
    KD_ASSERT_CLOSE(kd_f32(ax), kd_f32(ax0), kd_tensor_numel(ax), 1e-6, 1e-6, "bn dx accumulate");
    KD_ASSERT_CLOSE(kd_f32(ag), kd_f32(ag0), 3, 1e-6, 1e-6, "bn dgamma accumulate");
    KD_ASSERT_CLOSE(kd_f32(ab), kd_f32(ab0), 3, 1e-6, 1e-6, "bn dbeta accumulate");
    kd_tensor *ts[] = {dx, dg, db, ax, ag, ab, ax0, ag0, ab0};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
    bn_teardown(&k);
}

/* ---------------------------------------------------------------- pool2d */

typedef struct {
    const char *name;
    int64_t N, C, H, W;
    kd_pool2d_params p;
} pool_cfg;

static pool_cfg pool_cfgs[] = {
    {"max 3x3 s2 p1", 2, 3, 7, 8, {KD_POOL_MAX, {3, 3}, {2, 2}, {1, 1}, 1}},
    {"max 2x2 s2", 1, 2, 6, 6, {KD_POOL_MAX, {2, 2}, {2, 2}, {0, 0}, 1}},
    {"max 3x2 s1 p(1,0) overlapping", 1, 2, 5, 6, {KD_POOL_MAX, {3, 2}, {1, 1}, {1, 0}, 1}},
    {"avg 2x2 s2", 2, 3, 6, 6, {KD_POOL_AVG, {2, 2}, {2, 2}, {0, 0}, 1}},
    {"avg 3x3 s1 p1 include pad", 1, 2, 5, 6, {KD_POOL_AVG, {3, 3}, {1, 1}, {1, 1}, 1}},
    {"avg 3x3 s2 p1 exclude pad", 2, 2, 7, 6, {KD_POOL_AVG, {3, 3}, {2, 2}, {1, 1}, 0}},
};

typedef struct {
    kd_backend *be;
    const pool_cfg *cfg;
    kd_tensor *x, *y, *ws, *r;
} pool_ctx;

/* x holds a shuffled ramp with spacing 0.05, so no two inputs tie and a
 * perturbation of 1e-3 never changes which element is the maximum. */
static void pool_setup(pool_ctx *k, const pool_cfg *c) {
    k->be = ref_be();
    k->cfg = c;
    int64_t OH = kd_conv_out_size(c->H, c->p.kernel[0], c->p.stride[0], c->p.pad[0], 1);
    int64_t OW = kd_conv_out_size(c->W, c->p.kernel[1], c->p.stride[1], c->p.pad[1], 1);
    k->x = T4(c->N, c->C, c->H, c->W);
    k->y = T4(c->N, c->C, OH, OW);
    k->r = T4(c->N, c->C, OH, OW);
    k->ws = c->p.kind == KD_POOL_MAX ? tnew_i32(k->y) : NULL;
    const int64_t n = kd_tensor_numel(k->x);
    float *x = kd_f32(k->x);
    for (int64_t i = 0; i < n; i++) x[i] = 0.05f * (float)(i - n / 2);
    kd_rng rng;
    kd_rng_init(&rng, 71, 0);
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = kd_rng_below(&rng, (uint32_t)(i + 1));
        float t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
    tfill(k->r, -1, 1, 72);
}

static void pool_teardown(pool_ctx *k) {
    kd_tensor_free(k->x);
    kd_tensor_free(k->y);
    kd_tensor_free(k->ws);
    kd_tensor_free(k->r);
}

static void pool_fwd(void *ctx) {
    pool_ctx *k = ctx;
    KD_ASSERT_OK(k->be->pool2d_forward(k->be, &k->cfg->p, k->x, k->y, k->ws));
}

static void test_pool_fd(void **state) {
    const pool_cfg *c = *state;
    pool_ctx k;
    pool_setup(&k, c);
    pool_fwd(&k);
    kd_tensor *dx = tnew(k.x->ndim, k.x->shape);
    KD_ASSERT_OK(k.be->pool2d_backward(k.be, &c->p, k.r, k.ws, dx, 0));
    check_fd(kd_f32(k.x), kd_tensor_numel(k.x), kd_f32(dx), pool_fwd, &k, k.y, kd_f32(k.r), 1e-3f,
             1e-3, 2e-2, "pool dx vs finite differences");
    kd_tensor_free(dx);
    pool_teardown(&k);
}

/* Pooling is linear once the argmax is fixed: <pool(x), dy> == <x, pool_bwd(dy)>. */
static void test_pool_adjoint(void **state) {
    const pool_cfg *c = *state;
    pool_ctx k;
    pool_setup(&k, c);
    tfill(k.x, -1, 1, 73); /* any input: the identity holds for the chosen argmax */
    pool_fwd(&k);
    kd_tensor *dx = tnew(k.x->ndim, k.x->shape);
    KD_ASSERT_OK(k.be->pool2d_backward(k.be, &c->p, k.r, k.ws, dx, 0));
    const int64_t ny = kd_tensor_numel(k.y);
    assert_adjoint(dot(kd_f32(k.y), kd_f32(k.r), ny), dot(kd_f32(k.x), kd_f32(dx), kd_tensor_numel(k.x)),
                   dot_abs(kd_f32(k.y), kd_f32(k.r), ny), c->name);
    kd_tensor_free(dx);
    pool_teardown(&k);
}

static void test_pool_accumulate(void **state) {
    const pool_cfg *c = *state;
    pool_ctx k;
    pool_setup(&k, c);
    pool_fwd(&k);
    kd_tensor *dx = tnew(k.x->ndim, k.x->shape), *ax = tnew(k.x->ndim, k.x->shape);
    tfill_value(dx, NAN);
    KD_ASSERT_OK(k.be->pool2d_backward(k.be, &c->p, k.r, k.ws, dx, 0));
    tfill(ax, -1, 1, 74);
    kd_tensor *ax0 = tclone(ax);
    KD_ASSERT_OK(k.be->pool2d_backward(k.be, &c->p, k.r, k.ws, ax, 1));
    for (int64_t i = 0; i < kd_tensor_numel(ax0); i++) kd_f32(ax0)[i] += kd_f32(dx)[i];
    KD_ASSERT_CLOSE(kd_f32(ax), kd_f32(ax0), kd_tensor_numel(ax), 1e-6, 1e-5, "pool dx accumulate");
    kd_tensor_free(dx);
    kd_tensor_free(ax);
    kd_tensor_free(ax0);
    pool_teardown(&k);
}

static void test_pool_threads(void **state) {
    const pool_cfg *c = *state;
    pool_ctx k;
    pool_setup(&k, c);
    kd_tensor *y[2], *dx[2];
    for (int t = 0; t < 2; t++) {
        threads_begin(t == 0 ? 1 : 3);
        y[t] = tnew(k.y->ndim, k.y->shape);
        dx[t] = tnew(k.x->ndim, k.x->shape);
        KD_ASSERT_OK(k.be->pool2d_forward(k.be, &c->p, k.x, y[t], k.ws));
        KD_ASSERT_OK(k.be->pool2d_backward(k.be, &c->p, k.r, k.ws, dx[t], 0));
        threads_end();
    }
    assert_bitwise(y[0], y[1], "pool y");
    assert_bitwise(dx[0], dx[1], "pool dx");
    for (int t = 0; t < 2; t++) kd_tensor_free(y[t]), kd_tensor_free(dx[t]);
    pool_teardown(&k);
}

/* Padding acts as -inf: with all-negative inputs every output is the largest
 * in-bounds value of its window (zero padding would give 0), and the argmax
 * points at it. */
static void test_maxpool_padding(void **state) {
    (void)state;
    kd_backend *be = ref_be();
    kd_tensor *x = T4(1, 1, 2, 2), *y = T4(1, 1, 3, 3);
    kd_tensor *ws = tnew_i32(y);
    const float xv[4] = {-4, -3, -2, -1};
    memcpy(x->data, xv, sizeof xv);
    kd_pool2d_params p = {KD_POOL_MAX, {2, 2}, {1, 1}, {1, 1}, 1};
    KD_ASSERT_OK(be->pool2d_forward(be, &p, x, y, ws));
    const float want[9] = {-4, -3, -3, -2, -1, -1, -2, -1, -1};
    const int32_t want_ws[9] = {0, 1, 1, 2, 3, 3, 2, 3, 3};
    KD_ASSERT_CLOSE(kd_f32(y), want, 9, 0, 0, "max pool with padding by hand");
    assert_memory_equal(ws->data, want_ws, sizeof want_ws);
    kd_tensor_free(x);
    kd_tensor_free(y);
    kd_tensor_free(ws);

    /* A larger all-negative case against a window maximum computed here. */
    const int64_t N = 2, C = 2, H = 7, W = 6, OH = 4, OW = 3;
    x = T4(N, C, H, W);
    y = T4(N, C, OH, OW);
    ws = tnew_i32(y);
    tfill(x, -2, -1, 75);
    p = (kd_pool2d_params){KD_POOL_MAX, {3, 3}, {2, 2}, {1, 1}, 1};
    KD_ASSERT_OK(be->pool2d_forward(be, &p, x, y, ws));
    for (int64_t pl = 0; pl < N * C; pl++)
        for (int64_t oh = 0; oh < OH; oh++)
            for (int64_t ow = 0; ow < OW; ow++) {
                float best = -INFINITY;
                for (int64_t ih = oh * 2 - 1; ih < oh * 2 + 2; ih++)
                    for (int64_t iw = ow * 2 - 1; iw < ow * 2 + 2; iw++)
                        if (ih >= 0 && ih < H && iw >= 0 && iw < W && kd_f32(x)[pl * H * W + ih * W + iw] > best)
                            best = kd_f32(x)[pl * H * W + ih * W + iw];
                int64_t o = pl * OH * OW + oh * OW + ow;
                int32_t arg = ((int32_t *)ws->data)[o];
                assert_true(kd_f32(y)[o] == best);
                assert_true(arg >= 0 && arg < H * W);
                assert_true(kd_f32(x)[pl * H * W + arg] == best);
            }
    kd_tensor_free(x);
    kd_tensor_free(y);
    kd_tensor_free(ws);

    /* Ties (zeros after a ReLU are common) pick the first in-bounds position
     * of the window in row-major order, as PyTorch does. */
    x = T4(1, 1, 4, 4);
    y = T4(1, 1, 2, 2);
    ws = tnew_i32(y);
    KD_ASSERT_OK(be->pool2d_forward(be, &p, x, y, ws));
    const int32_t want_tie[4] = {0, 1, 4, 5};
    assert_memory_equal(ws->data, want_tie, sizeof want_tie);
    kd_tensor_free(x);
    kd_tensor_free(y);
    kd_tensor_free(ws);
}

/* x = 1..9 as 3x3, 3x3 window, stride 1, pad 1: the corner sees 1+2+4+5 = 12. */
static void test_avgpool_pad_divisor(void **state) {
    (void)state;
    kd_backend *be = ref_be();
    kd_tensor *x = T4(1, 1, 3, 3), *y = T4(1, 1, 3, 3);
    for (int i = 0; i < 9; i++) kd_f32(x)[i] = (float)(i + 1);
    kd_pool2d_params p = {KD_POOL_AVG, {3, 3}, {1, 1}, {1, 1}, 1};
    KD_ASSERT_OK(be->pool2d_forward(be, &p, x, y, NULL));
    const float incl[9] = {12 / 9.f, 21 / 9.f, 16 / 9.f, 27 / 9.f, 5, 33 / 9.f, 24 / 9.f, 39 / 9.f, 28 / 9.f};
    KD_ASSERT_CLOSE(kd_f32(y), incl, 9, 1e-6, 1e-6, "avg pool count_include_pad=1 by hand");
    p.count_include_pad = 0;
    KD_ASSERT_OK(be->pool2d_forward(be, &p, x, y, NULL));
    const float excl[9] = {3, 3.5f, 4, 4.5f, 5, 5.5f, 6, 6.5f, 7};
    KD_ASSERT_CLOSE(kd_f32(y), excl, 9, 1e-6, 1e-6, "avg pool count_include_pad=0 by hand");
    kd_tensor_free(x);
    kd_tensor_free(y);
}

/* --------------------------------------------------------------- eltwise */

typedef struct {
    kd_backend *be;
    kd_eltwise_kind kind;
    float alpha;
    kd_tensor *x, *y;
} elt_ctx;

static void elt_fwd(void *ctx) {
    elt_ctx *k = ctx;
    KD_ASSERT_OK(k->be->eltwise_forward(k->be, k->kind, k->alpha, k->x, k->y));
}

/* Inputs stay away from the ReLU kink (|x| >= 2e-2) and from log's pole. */
static void elt_case(kd_eltwise_kind kind, float alpha, const char *what) {
    elt_ctx k = {ref_be(), kind, alpha, T2(6, 17), T2(6, 17)};
    const int64_t n = kd_tensor_numel(k.x);
    float *x = kd_f32(k.x);
    switch (kind) {
    case KD_ELTWISE_RELU:
        tfill(k.x, 0.02f, 2.0f, 81);
        for (int64_t i = 0; i < n; i += 2) x[i] = -x[i];
        break;
    case KD_ELTWISE_EXP: tfill(k.x, -2.0f, 2.0f, 82); break;
    default: tfill(k.x, 0.5f, 3.0f, 83); break;
    }
    elt_fwd(&k);
    /* Forward against the formula. */
    float *want = malloc((size_t)n * sizeof *want);
    for (int64_t i = 0; i < n; i++)
        want[i] = kind == KD_ELTWISE_RELU ? (x[i] > 0 ? x[i] : alpha * x[i])
                : kind == KD_ELTWISE_EXP  ? (float)exp(x[i])
                                          : (float)log(x[i]);
    KD_ASSERT_CLOSE(kd_f32(k.y), want, n, 1e-7, 1e-6, what);
    /* Backward against finite differences; src is y for EXP, x otherwise. */
    kd_tensor *r = T2(6, 17), *dx = T2(6, 17);
    tfill(r, -1, 1, 84);
    const kd_tensor *src = kind == KD_ELTWISE_EXP ? k.y : k.x;
    KD_ASSERT_OK(k.be->eltwise_backward(k.be, kind, alpha, r, src, dx, 0));
    check_fd(x, n, kd_f32(dx), elt_fwd, &k, k.y, kd_f32(r), 1e-3f, 1e-3, 2e-2, what);
    /* accumulate = 0 overwrites NaN; accumulate = 1 adds. */
    kd_tensor *ax = T2(6, 17), *nan_dx = T2(6, 17);
    tfill_value(nan_dx, NAN);
    KD_ASSERT_OK(k.be->eltwise_backward(k.be, kind, alpha, r, src, nan_dx, 0));
    KD_ASSERT_CLOSE(kd_f32(nan_dx), kd_f32(dx), n, 0, 0, "eltwise accumulate=0 over NaN");
    tfill(ax, -1, 1, 85);
    for (int64_t i = 0; i < n; i++) want[i] = kd_f32(ax)[i] + kd_f32(dx)[i];
    KD_ASSERT_OK(k.be->eltwise_backward(k.be, kind, alpha, r, src, ax, 1));
    KD_ASSERT_CLOSE(kd_f32(ax), want, n, 1e-6, 1e-6, "eltwise accumulate=1");
    free(want);
    kd_tensor *ts[] = {k.x, k.y, r, dx, ax, nan_dx};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
}

static void test_eltwise_relu(void **state) {
    (void)state;
    elt_case(KD_ELTWISE_RELU, 0.0f, "relu");
}
static void test_eltwise_leaky_relu(void **state) {
    (void)state;
    elt_case(KD_ELTWISE_RELU, 0.2f, "leaky relu 0.2");
}
static void test_eltwise_exp(void **state) {
    (void)state;
    elt_case(KD_ELTWISE_EXP, 0.0f, "exp");
}
static void test_eltwise_log(void **state) {
    (void)state;
    elt_case(KD_ELTWISE_LOG, 0.0f, "log");
}

/* ------------------------------------------------------ registry, errors */

static void test_registry(void **state) {
    (void)state;
    kd_backend *be = (kd_backend *)1;
    kd_clear_error();
    assert_int_equal(kd_backend_get("nope", &be), KD_ERR_NOT_FOUND);
    assert_null(be);
    assert_non_null(strstr(kd_last_error(), "'nope'"));
    assert_int_not_equal(kd_backend_get(NULL, &be), KD_OK);

    KD_ASSERT_OK(kd_backend_get("ref", &be));
    assert_string_equal(be->name, "ref");
    assert_ptr_equal(be, kd__backend_ref());
    assert_non_null(be->conv2d_forward);
    assert_non_null(be->conv2d_backward_data);
    assert_non_null(be->conv2d_backward_weights);
    assert_non_null(be->batchnorm_forward);
    assert_non_null(be->batchnorm_backward);
    assert_non_null(be->pool2d_forward);
    assert_non_null(be->pool2d_backward);
    assert_non_null(be->gemm);
    assert_non_null(be->eltwise_forward);
    assert_non_null(be->eltwise_backward);
    assert_non_null(be->trim);
    be->trim(be);

#ifdef KD_WITH_DNNL
    KD_ASSERT_OK(kd_backend_get("cpu", &be));
    assert_string_equal(be->name, "cpu");
    const char *dflt = "cpu";
#else
    assert_int_equal(kd_backend_get("cpu", &be), KD_ERR_NOT_FOUND);
    assert_non_null(strstr(kd_last_error(), "cpu"));
    const char *dflt = "ref";
#endif

    /* KD_BACKEND overrides the default only when it names a backend. */
    char *old = getenv("KD_BACKEND") ? strdup(getenv("KD_BACKEND")) : NULL;
    unsetenv("KD_BACKEND");
    assert_string_equal(kd_backend_default()->name, dflt);
    setenv("KD_BACKEND", "ref", 1);
    assert_string_equal(kd_backend_default()->name, "ref");
    kd_log_level lvl = kd_log_get_level();
    kd_log_set_level(KD_LOG_QUIET);
    setenv("KD_BACKEND", "bogus", 1);
    assert_string_equal(kd_backend_default()->name, dflt);
    kd_log_set_level(lvl);
    if (old) {
        setenv("KD_BACKEND", old, 1);
        free(old);
    } else {
        unsetenv("KD_BACKEND");
    }
}

/* Bad input yields a status and a message, never an abort. */
static void test_errors(void **state) {
    (void)state;
    kd_backend *be = ref_be();
    kd_tensor *x = T4(1, 4, 5, 5), *w = T4(2, 4, 3, 3), *y = T4(1, 2, 3, 3), *bad = NULL;
    kd_conv2d_params p = {{1, 1}, {0, 0}, {1, 1}, 1, 0};
    KD_ASSERT_OK(be->conv2d_forward(be, &p, x, w, NULL, y));
    KD_ASSERT_OK(kd_tensor_new(KD_I32, 4, x->shape, &bad));
    assert_int_equal(be->conv2d_forward(be, &p, bad, w, NULL, y), KD_ERR_UNSUPPORTED);
    assert_non_null(strstr(kd_last_error(), "I32"));
    p.groups = 3;
    assert_int_equal(be->conv2d_forward(be, &p, x, w, NULL, y), KD_ERR_SHAPE);
    p.groups = 1;
    p.pad[0] = 1; /* y would need to be (1, 2, 5, 3) */
    assert_int_equal(be->conv2d_forward(be, &p, x, w, NULL, y), KD_ERR_SHAPE);
    p.pad[0] = 0;
    p.stride[0] = 0;
    assert_int_equal(be->conv2d_forward(be, &p, x, w, NULL, y), KD_ERR_INVALID);

    kd_pool2d_params pp = {KD_POOL_MAX, {2, 2}, {2, 2}, {2, 2}, 1};
    kd_tensor *py = T4(1, 4, 3, 3);
    kd_tensor *ws = tnew_i32(py);
    assert_int_equal(be->pool2d_forward(be, &pp, x, py, ws), KD_ERR_INVALID); /* pad > kernel/2 */
    pp.pad[0] = pp.pad[1] = 1;
    KD_ASSERT_OK(be->pool2d_forward(be, &pp, x, py, ws));
    assert_int_not_equal(be->pool2d_forward(be, &pp, x, py, NULL), KD_OK); /* max needs ws */

    kd_bn_params bp = {1e-5f, 0.1f, 1};
    kd_tensor *one = T2(1, 3), *g = T1(3), *sm = T1(3), *sr = T1(3);
    assert_int_not_equal(be->batchnorm_forward(be, &bp, one, g, g, NULL, NULL, one, sm, sr), KD_OK);

    float A[4] = {0}, B[4] = {0}, C[4] = {0};
    assert_int_equal(be->gemm(be, 0, 0, 2, 2, 2, 1.0f, A, 1, B, 2, 0.0f, C, 2), KD_ERR_INVALID);
    assert_int_equal(be->eltwise_forward(be, KD_ELTWISE_COUNT, 0.0f, x, x), KD_ERR_INVALID);

    kd_tensor *ts[] = {x, w, y, bad, py, ws, one, g, sm, sr};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) kd_tensor_free(ts[i]);
}

/* ------------------------------------------------------------------ main */

/* Each configuration runs as separately named tests, e.g. "conv_fd[3]". */
#define KD_CFG_TEST(fn, i, cfgs) {#fn "[" #i "]", fn, NULL, NULL, &cfgs[i]}
#define CONV_TESTS(i)                                                                        \
    KD_CFG_TEST(test_conv_fd, i, conv_cfgs), KD_CFG_TEST(test_conv_adjoint, i, conv_cfgs),   \
        KD_CFG_TEST(test_conv_im2col, i, conv_cfgs),                                         \
        KD_CFG_TEST(test_conv_accumulate, i, conv_cfgs), KD_CFG_TEST(test_conv_threads, i, conv_cfgs)
#define POOL_TESTS(i)                                                                        \
    KD_CFG_TEST(test_pool_fd, i, pool_cfgs), KD_CFG_TEST(test_pool_adjoint, i, pool_cfgs),   \
        KD_CFG_TEST(test_pool_accumulate, i, pool_cfgs), KD_CFG_TEST(test_pool_threads, i, pool_cfgs)

int main(void) {
    _Static_assert(sizeof conv_cfgs / sizeof conv_cfgs[0] == 7, "register every conv config below");
    _Static_assert(sizeof pool_cfgs / sizeof pool_cfgs[0] == 6, "register every pool config below");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_gemm_hand),
        cmocka_unit_test(test_gemm_naive),
        cmocka_unit_test(test_conv_hand),
        cmocka_unit_test(test_conv_1x1_is_gemm),
        CONV_TESTS(0), CONV_TESTS(1), CONV_TESTS(2), CONV_TESTS(3), CONV_TESTS(4), CONV_TESTS(5),
        CONV_TESTS(6),
        cmocka_unit_test(test_bn_fd_train_nchw),
        cmocka_unit_test(test_bn_fd_train_nc),
        cmocka_unit_test(test_bn_fd_eval),
        cmocka_unit_test(test_bn_running_stats),
        cmocka_unit_test(test_bn_accumulate),
        POOL_TESTS(0), POOL_TESTS(1), POOL_TESTS(2), POOL_TESTS(3), POOL_TESTS(4), POOL_TESTS(5),
        cmocka_unit_test(test_maxpool_padding),
        cmocka_unit_test(test_avgpool_pad_divisor),
        cmocka_unit_test(test_eltwise_relu),
        cmocka_unit_test(test_eltwise_leaky_relu),
        cmocka_unit_test(test_eltwise_exp),
        cmocka_unit_test(test_eltwise_log),
    };
    return cmocka_run_group_tests_name("backend_ref", tests, NULL, NULL);
}
