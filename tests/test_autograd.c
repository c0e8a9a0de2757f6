/*
 * test_autograd.c: the autograd layer (src/autograd).
 *
 *   - The op table: every kd_op has a name, a forward and a backward rule,
 *     derived from the table's function pointers and the reference
 *     backend's kernels; and those checks fail on broken copies of the table
 *     (a test of the test).
 *   - Central finite differences for every op with respect to every
 *     differentiable input, on the "ref" backend and, when it is built, on
 *     the "cpu" (oneDNN) backend. The scalar objective is J = sum(out * r)
 *     with a fixed random r, computed in double from the forward output.
 *     Every op of the enum must appear in at least one case.
 *   - Gradient accumulation (two backward passes, a tensor used twice,
 *     intermediates with several consumers), no-grad mode, steady-state
 *     allocation, sticky errors, dropout determinism, bad labels, and
 *     thread-count independence of the plain-C reductions.
 *
 * Finite-difference tolerance: |num - ana| <= 1e-3 + 5e-3 * |num|. With
 * h = 1e-2 the truncation error of a central difference is h^2/6 * f''',
 * at most ~1e-4 for these inputs (log on [0.7, 2] is the worst), and float32
 * rounding of the forward outputs perturbs J by ~1e-6, i.e. ~5e-5 after
 * dividing by 2h. Measured worst cases (KD_FD_VERBOSE=1 prints them) are
 * 2e-4 (log, l2_normalize, batchnorm), so the bound has a 4-10x margin, while
 * a wrong rule (missing factor, sign, term, index) errs by O(|grad|) ~ 0.1-1;
 * the small label-smoothing term is tested with eps = 0.25 so that dropping
 * it errs by ~1e-2. Kinks are avoided: ReLU inputs have |x| >= 0.1, max-pool
 * inputs are distinct values spaced 0.05 apart (> 2h).
 */
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/autograd_impl.h"
#include "kd/autograd.h"
#include "kd/backend.h"

#define FD_ATOL 1e-3
#define FD_RTOL 5e-3

/* ------------------------------------------------------------- helpers */

static kd_tensor *tnew(kd_dtype dt, int ndim, const int64_t *shape) {
    kd_tensor *t = NULL;
    KD_ASSERT_OK(kd_tensor_new(dt, ndim, shape, &t));
    return t;
}

static kd_backend *backend(const char *name) {
    kd_backend *be = NULL;
    if (kd_backend_get(name, &be) != KD_OK) return NULL;
    return be;
}

static kd_graph *graph_new(kd_backend *be) {
    kd_graph *g = NULL;
    KD_ASSERT_OK(kd_graph_init(&g, be));
    return g;
}

/* ---------------------------------------------------- FD case registry */

enum { FILL_UNIFORM = 0, FILL_AWAY0, FILL_DISTINCT, FILL_LABELS };

typedef struct {
    int ndim;
    int64_t shape[4];
    int fill;
    float lo, hi; /* FILL_LABELS: hi = number of classes */
    int diff;     /* take the gradient with respect to this input */
} in_spec;

typedef kd_tensor *(*build_fn)(kd_graph *g, kd_tensor **in);

typedef struct {
    const char *name;
    build_fn build;
    int n_in;
    in_spec in[4];
} fd_case;

/* Constant state the builders share (running statistics, conv params). */
static kd_tensor *g_rmean, *g_rvar;

static kd_tensor *b_conv_groups(kd_graph *g, kd_tensor **in) {
    kd_conv2d_params p = {{2, 1}, {1, 2}, {1, 2}, 2, 0};
    return kd_conv2d(g, in[0], in[1], in[2], &p);
}
static kd_tensor *b_conv_plain(kd_graph *g, kd_tensor **in) {
    kd_conv2d_params p = {{1, 1}, {0, 0}, {1, 1}, 1, 0};
    return kd_conv2d(g, in[0], in[1], NULL, &p);
}
static kd_tensor *b_conv_dw(kd_graph *g, kd_tensor **in) { /* depthwise, stride 2 */
    kd_conv2d_params p = {{2, 2}, {1, 1}, {1, 1}, 3, 0};
    return kd_conv2d(g, in[0], in[1], in[2], &p);
}
static kd_tensor *b_bn_train(kd_graph *g, kd_tensor **in) {
    kd_bn_params p = {1e-5f, 0.1f, 1};
    return kd_batchnorm(g, in[0], in[1], in[2], g_rmean, g_rvar, &p);
}
static kd_tensor *b_bn_eval(kd_graph *g, kd_tensor **in) {
    kd_bn_params p = {1e-5f, 0.1f, 0};
    return kd_batchnorm(g, in[0], in[1], in[2], g_rmean, g_rvar, &p);
}
static kd_tensor *b_bn_noaffine(kd_graph *g, kd_tensor **in) {
    kd_bn_params p = {1e-5f, 0.1f, 1};
    return kd_batchnorm(g, in[0], NULL, NULL, NULL, NULL, &p);
}
static kd_tensor *b_linear(kd_graph *g, kd_tensor **in) { return kd_linear(g, in[0], in[1], in[2]); }
static kd_tensor *b_linear_nb(kd_graph *g, kd_tensor **in) { return kd_linear(g, in[0], in[1], NULL); }
static kd_tensor *b_matmul(kd_graph *g, kd_tensor **in) { return kd_matmul(g, in[0], in[1]); }
static kd_tensor *b_relu(kd_graph *g, kd_tensor **in) { return kd_relu(g, in[0]); }
static kd_tensor *b_leaky(kd_graph *g, kd_tensor **in) { return kd_leaky_relu(g, in[0], 0.1f); }
static kd_tensor *b_add(kd_graph *g, kd_tensor **in) { return kd_add(g, in[0], in[1]); }
static kd_tensor *b_mul(kd_graph *g, kd_tensor **in) { return kd_mul(g, in[0], in[1]); }
static kd_tensor *b_scale(kd_graph *g, kd_tensor **in) { return kd_scale(g, in[0], -0.7f); }
static kd_tensor *b_avgpool(kd_graph *g, kd_tensor **in) { return kd_avgpool2d(g, in[0], 3, 2, 1); }
static kd_tensor *b_avgpool_nopad(kd_graph *g, kd_tensor **in) {
    kd_pool2d_params p = {KD_POOL_AVG, {2, 3}, {2, 1}, {1, 1}, 0};
    return kd_pool2d(g, in[0], &p);
}
static kd_tensor *b_maxpool(kd_graph *g, kd_tensor **in) { return kd_maxpool2d(g, in[0], 3, 2, 1); }
static kd_tensor *b_maxpool2(kd_graph *g, kd_tensor **in) { return kd_maxpool2d(g, in[0], 2, 2, 0); }
static kd_tensor *b_gap(kd_graph *g, kd_tensor **in) { return kd_global_avgpool(g, in[0]); }
static kd_tensor *b_reshape(kd_graph *g, kd_tensor **in) {
    int64_t s[2] = {4, -1};
    return kd_reshape(g, in[0], 2, s);
}
static kd_tensor *b_flatten(kd_graph *g, kd_tensor **in) { return kd_flatten(g, in[0]); }
static kd_tensor *b_transpose(kd_graph *g, kd_tensor **in) { return kd_transpose(g, in[0], 0, 2); }
static kd_tensor *b_transpose4(kd_graph *g, kd_tensor **in) { return kd_transpose(g, in[0], -1, 1); }
static kd_tensor *b_concat(kd_graph *g, kd_tensor **in) { return kd_concat(g, in, 3, 1); }
static kd_tensor *b_concat0(kd_graph *g, kd_tensor **in) { return kd_concat(g, in, 2, 0); }
static kd_tensor *b_slice(kd_graph *g, kd_tensor **in) { return kd_slice(g, in[0], 1, 1, 4); }
static kd_tensor *b_slice_neg(kd_graph *g, kd_tensor **in) { return kd_slice(g, in[0], 0, -2, 3); }
static kd_tensor *b_softmax(kd_graph *g, kd_tensor **in) { return kd_softmax(g, in[0]); }
static kd_tensor *b_log_softmax(kd_graph *g, kd_tensor **in) { return kd_log_softmax(g, in[0]); }
static kd_tensor *b_ce(kd_graph *g, kd_tensor **in) { return kd_cross_entropy(g, in[0], in[1], 0.0f); }
static kd_tensor *b_ce_ls(kd_graph *g, kd_tensor **in) {
    return kd_cross_entropy(g, in[0], in[1], 0.25f);
}
static kd_tensor *b_kl(kd_graph *g, kd_tensor **in) { return kd_kl_div(g, in[0], in[1], 4.0f); }
static kd_tensor *b_kl1(kd_graph *g, kd_tensor **in) { return kd_kl_div(g, in[0], in[1], 1.0f); }
static kd_tensor *b_mse(kd_graph *g, kd_tensor **in) { return kd_mse(g, in[0], in[1]); }
static kd_tensor *b_l2n(kd_graph *g, kd_tensor **in) { return kd_l2_normalize(g, in[0], 1e-12f); }
static kd_tensor *b_mean(kd_graph *g, kd_tensor **in) { return kd_mean(g, in[0]); }
static kd_tensor *b_sum(kd_graph *g, kd_tensor **in) { return kd_sum(g, in[0]); }
static kd_tensor *b_exp(kd_graph *g, kd_tensor **in) { return kd_exp(g, in[0]); }
static kd_tensor *b_log(kd_graph *g, kd_tensor **in) { return kd_log(g, in[0]); }
static kd_tensor *b_dropout(kd_graph *g, kd_tensor **in) { return kd_dropout(g, in[0], 0.3f, 1); }
static kd_tensor *b_sigmoid(kd_graph *g, kd_tensor **in) { return kd_sigmoid(g, in[0]); }
static kd_tensor *b_hardswish(kd_graph *g, kd_tensor **in) { return kd_hardswish(g, in[0]); }
static kd_tensor *b_hardsigmoid(kd_graph *g, kd_tensor **in) { return kd_hardsigmoid(g, in[0]); }
static kd_tensor *b_silu(kd_graph *g, kd_tensor **in) { return kd_silu(g, in[0]); }
static kd_tensor *b_relu6(kd_graph *g, kd_tensor **in) { return kd_relu6(g, in[0]); }
static kd_tensor *b_mul_channel(kd_graph *g, kd_tensor **in) {
    return kd_mul_channel(g, in[0], in[1]);
}
static kd_tensor *b_function(kd_graph *g, kd_tensor **in) {
    return kd_function_apply(g, &kd_test_fn_polymul, NULL, 0, 2, in, in[0]->ndim, in[0]->shape);
}
/* Squeeze-and-excitation as the mobile networks build it: the scale is
 * computed from x itself, so x gets gradient through both paths. */
static kd_tensor *b_se(kd_graph *g, kd_tensor **in) {
    kd_tensor *s = kd_hardsigmoid(g, kd_scale(g, kd_global_avgpool(g, in[0]), 2.0f));
    return kd_mul_channel(g, in[0], s);
}
/* Blocked-layout chains (NCHW16C on cpu; on ref kd_graph_to_blocked is the
 * identity, so they run plain): conv (blocked out) -> bn -> sigmoid -> avgpool. */
static kd_tensor *b_blk_conv(kd_graph *g, kd_tensor **in) {
    kd_conv2d_params p = {{1, 1}, {1, 1}, {1, 1}, 1, 0};
    kd_bn_params bp = {1e-5f, 0.1f, 1};
    kd_tensor *h = kd_conv2d(g, kd_graph_to_blocked(g, in[0]), in[1], NULL, &p);
    h = kd_sigmoid(g, kd_batchnorm(g, h, in[2], NULL, NULL, NULL, &bp));
    return kd_avgpool2d(g, h, 2, 2, 0);
}
/* maxpool, add/scale, leaky relu, mul_channel, global_avgpool on blocked x. */
static __attribute__((unused)) kd_tensor *b_blk_pool(kd_graph *g, kd_tensor **in) {
    kd_tensor *b = kd_graph_to_blocked(g, in[0]);
    kd_tensor *m = kd_maxpool2d(g, b, 2, 2, 0);
    kd_tensor *a = kd_sigmoid(g, kd_add(g, m, kd_scale(g, m, 0.5f)));
    kd_tensor *c = kd_mul_channel(g, a, in[1]);
    return kd_add(g, kd_global_avgpool(g, c), kd_global_avgpool(g, kd_sigmoid(g, a)));
}
/* A blocked input into a conv whose output cannot be blocked (O = 8), and
 * an explicit round trip. */
static kd_tensor *b_blk_mixed(kd_graph *g, kd_tensor **in) {
    kd_conv2d_params p = {{2, 2}, {0, 0}, {1, 1}, 1, 0};
    kd_tensor *b = kd_graph_to_blocked(g, in[0]);
    kd_tensor *y = kd_conv2d(g, b, in[1], NULL, &p);
    kd_tensor *s = kd_avgpool2d(g, kd_slice(g, kd_graph_to_strided(g, b), 1, 0, 8), 2, 2, 0);
    return kd_add(g, kd_flatten(g, y), kd_flatten(g, s));
}

/* Transformer ops (ops_norm.c). */
static kd_tensor *b_layernorm(kd_graph *g, kd_tensor **in) {
    return kd_layernorm(g, in[0], in[1], in[2], 1e-5f);
}
static kd_tensor *b_layernorm_na(kd_graph *g, kd_tensor **in) {
    return kd_layernorm(g, in[0], NULL, NULL, 1e-5f);
}
static kd_tensor *b_gelu(kd_graph *g, kd_tensor **in) { return kd_gelu(g, in[0]); }
static kd_tensor *b_bmm_nn(kd_graph *g, kd_tensor **in) { return kd_bmm(g, in[0], in[1], 0, 0); }
static kd_tensor *b_bmm_nt(kd_graph *g, kd_tensor **in) { return kd_bmm(g, in[0], in[1], 0, 1); }
static kd_tensor *b_bmm_tn(kd_graph *g, kd_tensor **in) { return kd_bmm(g, in[0], in[1], 1, 0); }
static kd_tensor *b_bmm_tt(kd_graph *g, kd_tensor **in) { return kd_bmm(g, in[0], in[1], 1, 1); }
/* Attention scores: softmax(q k^T) v with q, k, v (B, heads, N, d). */
static kd_tensor *b_attention(kd_graph *g, kd_tensor **in) {
    kd_tensor *p = kd_softmax(g, kd_bmm(g, in[0], in[1], 0, 1));
    return kd_bmm(g, p, in[2], 0, 0);
}

/* Transformer data movement (ops_layout.c; test_ops_layout.c has more). */
static kd_tensor *b_permute(kd_graph *g, kd_tensor **in) {
    static const int p[4] = {2, 0, 3, 1};
    return kd_permute(g, in[0], p);
}
static kd_tensor *b_roll(kd_graph *g, kd_tensor **in) {
    static const int d[2] = {1, 2};
    static const int64_t s[2] = {-1, 3};
    return kd_roll(g, in[0], 2, d, s);
}
static kd_tensor *b_index_select(kd_graph *g, kd_tensor **in) { /* repeated rows */
    static const int64_t idx[7] = {3, 0, 3, 1, 0, 3, 2};
    int64_t m = 7;
    kd_tensor *ix = kd_graph_tensor(g, KD_I64, 1, &m);
    if (!ix) return NULL;
    memcpy(ix->data, idx, sizeof idx);
    return kd_index_select(g, in[0], ix);
}
static kd_tensor *b_add_bcast(kd_graph *g, kd_tensor **in) { return kd_add_bcast(g, in[0], in[1]); }
static kd_tensor *b_drop_path(kd_graph *g, kd_tensor **in) { return kd_drop_path(g, in[0], 0.3f, 1); }
static kd_tensor *b_weight_norm(kd_graph *g, kd_tensor **in) { return kd_weight_norm(g, in[0], in[1]); }
static kd_tensor *b_patch_merge(kd_graph *g, kd_tensor **in) { return kd_patch_merge(g, in[0]); }
/* Fused window attention: qkv (4 windows, N 4, 2 heads of 3), bias (2, 4, 4),
 * a constant (2, 4, 4) mask of 0 / -100 over 2 window positions. */
static kd_tensor *b_window_attention(kd_graph *g, kd_tensor **in) {
    int64_t ms[3] = {2, 4, 4};
    kd_tensor *mask = kd_graph_zeros(g, KD_F32, 3, ms);
    if (!mask) return NULL;
    float *m = kd_f32(mask);
    for (int w = 0; w < 2; w++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) m[(w * 4 + i) * 4 + j] = (w == 1 && (i < 2) != (j < 2)) ? -100.0f : 0.0f;
    return kd_window_attention(g, in[0], in[1], mask, 2);
}

/* A small chain: an intermediate with two consumers inside one case. */
static kd_tensor *b_chain(kd_graph *g, kd_tensor **in) {
    kd_tensor *h = kd_linear(g, in[0], in[1], NULL);
    kd_tensor *s = kd_softmax(g, h);
    return kd_add(g, kd_mul(g, s, h), kd_scale(g, h, 0.5f));
}

#define U(lo, hi) FILL_UNIFORM, lo, hi
#define IN1(a) 1, {a}
#define IN2(a, b) 2, {a, b}
#define IN3(a, b, c) 3, {a, b, c}
#define S2(a, b) 2, {a, b}
#define S3(a, b, c) 3, {a, b, c}
#define S4(a, b, c, d) 4, {a, b, c, d}
#define S1(a) 1, {a}

static const fd_case fd_cases[] = {
    {"conv2d stride/pad/dilation/groups/bias", b_conv_groups,
     IN3(((in_spec){S4(2, 4, 6, 6), U(-1, 1), 1}), ((in_spec){S4(6, 2, 3, 3), U(-1, 1), 1}),
         ((in_spec){S1(6), U(-1, 1), 1}))},
    {"conv2d plain, no bias", b_conv_plain,
     IN2(((in_spec){S4(1, 3, 5, 5), U(-1, 1), 1}), ((in_spec){S4(4, 3, 3, 3), U(-1, 1), 1}))},
    {"conv2d depthwise, constant weight", b_conv_dw,
     IN3(((in_spec){S4(2, 3, 5, 5), U(-1, 1), 1}), ((in_spec){S4(3, 1, 3, 3), U(-1, 1), 0}),
         ((in_spec){S1(3), U(-1, 1), 1}))},
    {"batchnorm2d training", b_bn_train,
     IN3(((in_spec){S4(4, 3, 3, 3), U(-1, 1), 1}), ((in_spec){S1(3), U(0.5f, 1.5f), 1}),
         ((in_spec){S1(3), U(-1, 1), 1}))},
    {"batchnorm1d training", b_bn_train,
     IN3(((in_spec){S2(6, 3), U(-1, 1), 1}), ((in_spec){S1(3), U(0.5f, 1.5f), 1}),
         ((in_spec){S1(3), U(-1, 1), 1}))},
    {"batchnorm (N, C, L) training", b_bn_train,
     IN3(((in_spec){S3(3, 3, 4), U(-1, 1), 1}), ((in_spec){S1(3), U(0.5f, 1.5f), 1}),
         ((in_spec){S1(3), U(-1, 1), 0}))},
    {"batchnorm2d eval", b_bn_eval,
     IN3(((in_spec){S4(2, 3, 2, 2), U(-1, 1), 1}), ((in_spec){S1(3), U(0.5f, 1.5f), 1}),
         ((in_spec){S1(3), U(-1, 1), 1}))},
    {"batchnorm without affine", b_bn_noaffine, IN1(((in_spec){S4(3, 2, 2, 2), U(-1, 1), 1}))},
    {"linear", b_linear,
     IN3(((in_spec){S2(3, 5), U(-1, 1), 1}), ((in_spec){S2(4, 5), U(-1, 1), 1}),
         ((in_spec){S1(4), U(-1, 1), 1}))},
    {"linear 3-d input, no bias", b_linear_nb,
     IN2(((in_spec){S3(2, 3, 5), U(-1, 1), 1}), ((in_spec){S2(4, 5), U(-1, 1), 1}))},
    {"matmul", b_matmul,
     IN2(((in_spec){S2(3, 4), U(-1, 1), 1}), ((in_spec){S2(4, 5), U(-1, 1), 1}))},
    {"matmul batched", b_matmul,
     IN2(((in_spec){S3(2, 3, 4), U(-1, 1), 1}), ((in_spec){S3(2, 4, 5), U(-1, 1), 1}))},
    {"matmul shared rhs", b_matmul,
     IN2(((in_spec){S3(2, 3, 4), U(-1, 1), 1}), ((in_spec){S2(4, 5), U(-1, 1), 1}))},
    {"relu", b_relu, IN1(((in_spec){S2(4, 6), FILL_AWAY0, 0.1f, 1, 1}))},
    {"leaky_relu", b_leaky, IN1(((in_spec){S2(4, 6), FILL_AWAY0, 0.1f, 1, 1}))},
    {"add", b_add, IN2(((in_spec){S2(3, 4), U(-1, 1), 1}), ((in_spec){S2(3, 4), U(-1, 1), 1}))},
    {"mul", b_mul, IN2(((in_spec){S2(3, 4), U(-1, 1), 1}), ((in_spec){S2(3, 4), U(-1, 1), 1}))},
    {"mul, constant rhs", b_mul,
     IN2(((in_spec){S2(3, 4), U(-1, 1), 1}), ((in_spec){S2(3, 4), U(-1, 1), 0}))},
    {"scale", b_scale, IN1(((in_spec){S3(2, 3, 4), U(-1, 1), 1}))},
    {"avgpool2d 3/2/1", b_avgpool, IN1(((in_spec){S4(2, 3, 5, 5), U(-1, 1), 1}))},
    {"avgpool2d rect, exclude pad", b_avgpool_nopad, IN1(((in_spec){S4(1, 2, 5, 6), U(-1, 1), 1}))},
    {"maxpool2d 3/2/1", b_maxpool, IN1(((in_spec){S4(2, 2, 5, 5), FILL_DISTINCT, 0, 0, 1}))},
    {"maxpool2d 2/2/0", b_maxpool2, IN1(((in_spec){S4(1, 3, 4, 6), FILL_DISTINCT, 0, 0, 1}))},
    {"global_avgpool", b_gap, IN1(((in_spec){S4(2, 3, 4, 4), U(-1, 1), 1}))},
    {"reshape", b_reshape, IN1(((in_spec){S3(2, 3, 4), U(-1, 1), 1}))},
    {"flatten", b_flatten, IN1(((in_spec){S4(2, 3, 2, 2), U(-1, 1), 1}))},
    {"transpose 0,2", b_transpose, IN1(((in_spec){S3(2, 3, 4), U(-1, 1), 1}))},
    {"transpose -1,1", b_transpose4, IN1(((in_spec){S4(2, 3, 2, 4), U(-1, 1), 1}))},
    {"concat axis 1", b_concat,
     IN3(((in_spec){S3(2, 2, 3), U(-1, 1), 1}), ((in_spec){S3(2, 1, 3), U(-1, 1), 0}),
         ((in_spec){S3(2, 3, 3), U(-1, 1), 1}))},
    {"concat axis 0", b_concat0,
     IN2(((in_spec){S2(2, 3), U(-1, 1), 1}), ((in_spec){S2(1, 3), U(-1, 1), 1}))},
    {"slice", b_slice, IN1(((in_spec){S2(3, 6), U(-1, 1), 1}))},
    {"slice negative start", b_slice_neg, IN1(((in_spec){S3(4, 2, 3), U(-1, 1), 1}))},
    {"softmax", b_softmax, IN1(((in_spec){S2(3, 7), U(-2, 2), 1}))},
    {"log_softmax", b_log_softmax, IN1(((in_spec){S3(2, 3, 7), U(-2, 2), 1}))},
    {"cross_entropy", b_ce,
     IN2(((in_spec){S2(5, 7), U(-2, 2), 1}), ((in_spec){S1(5), FILL_LABELS, 0, 7, 0}))},
    {"cross_entropy label smoothing", b_ce_ls,
     IN2(((in_spec){S2(5, 7), U(-2, 2), 1}), ((in_spec){S1(5), FILL_LABELS, 0, 7, 0}))},
    {"kl_div T=4", b_kl,
     IN2(((in_spec){S2(4, 6), U(-3, 3), 1}), ((in_spec){S2(4, 6), U(-3, 3), 1}))},
    {"kl_div T=1, teacher constant", b_kl1,
     IN2(((in_spec){S2(4, 6), U(-2, 2), 1}), ((in_spec){S2(4, 6), U(-2, 2), 0}))},
    {"mse", b_mse, IN2(((in_spec){S2(3, 4), U(-1, 1), 1}), ((in_spec){S2(3, 4), U(-1, 1), 1}))},
    {"l2_normalize", b_l2n, IN1(((in_spec){S2(3, 5), U(-1, 1), 1}))},
    {"mean", b_mean, IN1(((in_spec){S2(3, 4), U(-1, 1), 1}))},
    {"sum", b_sum, IN1(((in_spec){S2(3, 4), U(-1, 1), 1}))},
    {"exp", b_exp, IN1(((in_spec){S2(3, 4), U(-1, 1), 1}))},
    {"log", b_log, IN1(((in_spec){S2(3, 4), U(0.7f, 2), 1}))},
    {"dropout", b_dropout, IN1(((in_spec){S2(4, 50), U(-1, 1), 1}))},
    /* Activations: inputs stay > 2h = 0.02 away from the kinks (+-3 for the
     * hard ones, 0 and 6 for relu6); the outer pieces are separate cases. */
    {"sigmoid", b_sigmoid, IN1(((in_spec){S2(4, 6), U(-4, 4), 1}))},
    {"hardswish inner", b_hardswish, IN1(((in_spec){S2(4, 6), U(-2.9f, 2.9f), 1}))},
    {"hardswish outer", b_hardswish, IN1(((in_spec){S2(4, 6), FILL_AWAY0, 3.1f, 5, 1}))},
    {"hardsigmoid inner", b_hardsigmoid, IN1(((in_spec){S2(4, 6), U(-2.9f, 2.9f), 1}))},
    {"hardsigmoid outer", b_hardsigmoid, IN1(((in_spec){S2(4, 6), FILL_AWAY0, 3.1f, 5, 1}))},
    {"silu", b_silu, IN1(((in_spec){S3(2, 3, 4), U(-4, 4), 1}))},
    {"relu6 below 6", b_relu6, IN1(((in_spec){S2(4, 6), FILL_AWAY0, 0.1f, 5.9f, 1}))},
    {"relu6 above 6", b_relu6, IN1(((in_spec){S2(3, 4), U(6.1f, 8), 1}))},
    {"mul_channel (N, C)", b_mul_channel,
     IN2(((in_spec){S4(2, 3, 2, 3), U(-1, 1), 1}), ((in_spec){S2(2, 3), U(-1, 1), 1}))},
    {"mul_channel (N, 1)", b_mul_channel,
     IN2(((in_spec){S4(3, 2, 2, 2), U(-1, 1), 1}), ((in_spec){S2(3, 1), U(-1, 1), 1}))},
    {"mul_channel, constant scale", b_mul_channel,
     IN2(((in_spec){S3(2, 3, 4), U(-1, 1), 1}), ((in_spec){S2(2, 3), U(-1, 1), 0}))},
    {"function (custom kd_function)", b_function,
     IN2(((in_spec){S3(2, 3, 4), U(-1, 1), 1}), ((in_spec){S3(2, 3, 4), U(-1, 1), 1}))},
    {"function, one input constant", b_function,
     IN2(((in_spec){S3(2, 3, 4), U(-1, 1), 0}), ((in_spec){S3(2, 3, 4), U(-1, 1), 1}))},
    {"squeeze-excitation chain", b_se, IN1(((in_spec){S4(2, 3, 3, 3), U(-1, 1), 1}))},
    {"blocked conv, bn, sigmoid, avgpool", b_blk_conv,
     IN3(((in_spec){S4(2, 16, 4, 4), U(-1, 1), 1}), ((in_spec){S4(16, 16, 3, 3), U(-0.3f, 0.3f), 1}),
         ((in_spec){S1(16), U(0.5f, 1.5f), 1}))},
    {"blocked input to a plain conv, round trip", b_blk_mixed,
     IN2(((in_spec){S4(2, 16, 4, 4), U(-1, 1), 1}), ((in_spec){S4(8, 16, 1, 1), U(-1, 1), 1}))},
    {"layernorm (N, L, D) affine", b_layernorm,
     IN3(((in_spec){S3(2, 3, 6), U(-2, 2), 1}), ((in_spec){S1(6), U(0.5f, 1.5f), 1}),
         ((in_spec){S1(6), U(-1, 1), 1}))},
    {"layernorm, constant affine", b_layernorm,
     IN3(((in_spec){S2(4, 5), U(-2, 2), 1}), ((in_spec){S1(5), U(0.5f, 1.5f), 0}),
         ((in_spec){S1(5), U(-1, 1), 0}))},
    {"layernorm without affine", b_layernorm_na, IN1(((in_spec){S3(3, 2, 7), U(-2, 2), 1}))},
    {"gelu", b_gelu, IN1(((in_spec){S3(2, 3, 5), U(-4, 4), 1}))},
    {"bmm 4-d", b_bmm_nn,
     IN2(((in_spec){S4(2, 2, 3, 4), U(-1, 1), 1}), ((in_spec){S4(2, 2, 4, 5), U(-1, 1), 1}))},
    {"bmm b transposed", b_bmm_nt,
     IN2(((in_spec){S3(3, 3, 4), U(-1, 1), 1}), ((in_spec){S3(3, 5, 4), U(-1, 1), 1}))},
    {"bmm a transposed", b_bmm_tn,
     IN2(((in_spec){S3(2, 4, 3), U(-1, 1), 1}), ((in_spec){S3(2, 4, 5), U(-1, 1), 1}))},
    {"bmm both transposed, constant b", b_bmm_tt,
     IN2(((in_spec){S3(2, 4, 3), U(-1, 1), 1}), ((in_spec){S3(2, 5, 4), U(-1, 1), 0}))},
    {"attention softmax(q k^T) v", b_attention,
     IN3(((in_spec){S4(2, 2, 4, 3), U(-1, 1), 1}), ((in_spec){S4(2, 2, 4, 3), U(-1, 1), 1}),
         ((in_spec){S4(2, 2, 4, 3), U(-1, 1), 1}))},
    {"permute 4-d", b_permute, IN1(((in_spec){S4(2, 3, 2, 4), U(-1, 1), 1}))},
    {"roll two axes, negative shift", b_roll, IN1(((in_spec){S4(2, 3, 4, 2), U(-1, 1), 1}))},
    {"index_select, repeated rows", b_index_select, IN1(((in_spec){S2(4, 3), U(-1, 1), 1}))},
    {"add_bcast (B, h, N, N) + (1, h, N, N)", b_add_bcast,
     IN2(((in_spec){S4(2, 2, 3, 3), U(-1, 1), 1}), ((in_spec){S4(1, 2, 3, 3), U(-1, 1), 1}))},
    {"drop_path", b_drop_path, IN1(((in_spec){S3(8, 2, 3), U(-1, 1), 1}))},
    {"weight_norm with gain", b_weight_norm,
     IN2(((in_spec){S2(4, 5), U(-1, 1), 1}), ((in_spec){S1(4), U(0.5f, 1.5f), 1}))},
    {"patch_merge", b_patch_merge, IN1(((in_spec){S4(2, 2, 4, 3), U(-1, 1), 1}))},
    {"window_attention with bias and mask", b_window_attention,
     IN2(((in_spec){S3(4, 4, 18), U(-1, 1), 1}), ((in_spec){S3(2, 4, 4), U(-1, 1), 1}))},
    {"chain with a shared intermediate", b_chain,
     IN2(((in_spec){S2(3, 5), U(-1, 1), 1}), ((in_spec){S2(4, 5), U(-1, 1), 1}))},
};
#define N_FD_CASES ((int)(sizeof fd_cases / sizeof fd_cases[0]))

static void fill_input(kd_tensor *t, const in_spec *s, uint64_t seed) {
    int64_t n = kd_tensor_numel(t);
    if (s->fill == FILL_LABELS) {
        kd_rng r;
        kd_rng_init(&r, seed, 1);
        for (int64_t i = 0; i < n; i++) ((int32_t *)t->data)[i] = (int32_t)kd_rng_below(&r, (uint32_t)s->hi);
        return;
    }
    float *x = kd_f32(t);
    if (s->fill == FILL_UNIFORM) {
        kd_test_fill_uniform(x, n, s->lo, s->hi, seed);
    } else if (s->fill == FILL_AWAY0) {
        kd_test_fill_uniform(x, n, -1, 1, seed);
        for (int64_t i = 0; i < n; i++) {
            float a = fabsf(x[i]);
            a = s->lo + (s->hi - s->lo) * a;
            x[i] = x[i] < 0 ? -a : a;
        }
    } else { /* distinct values 0.05 apart in random order (Fisher-Yates) */
        kd_rng r;
        kd_rng_init(&r, seed, 2);
        for (int64_t i = 0; i < n; i++) x[i] = 0.05f * (float)i - 0.025f * (float)n;
        for (int64_t i = n - 1; i > 0; i--) {
            int64_t j = kd_rng_below(&r, (uint32_t)(i + 1));
            float t0 = x[i];
            x[i] = x[j];
            x[j] = t0;
        }
    }
}

/* J = sum(out * r) in double. */
static double objective(const kd_tensor *out, const kd_tensor *r) {
    double s = 0;
    int64_t n = kd_tensor_numel(out);
    for (int64_t i = 0; i < n; i++) s += (double)kd_f32(out)[i] * kd_f32(r)[i];
    return s;
}

static double fd_eval(kd_graph *g, const fd_case *c, kd_tensor **in, const kd_tensor *r) {
    kd_graph_reset(g);
    kd_tensor *out = c->build(g, in);
    if (!out) fail_msg("%s: forward failed: %s", c->name, kd_last_error());
    /* objective() reads the buffer in row-major order: a blocked output must
     * be converted first, as kd_mul does on the analytic side. */
    out = kd_graph_to_strided(g, out);
    if (!out) fail_msg("%s: to_strided failed: %s", c->name, kd_last_error());
    return objective(out, r);
}

/* Resets g with every arena byte set to 0xFF (a float NaN), so that a rule
 * that reads a gradient buffer it should overwrite produces NaN. */
static void poison_arena(kd_graph *g) {
    kd_graph_reset(g);
    int64_t n = (int64_t)kd_arena_capacity(kd_graph_arena(g)) - 4096;
    kd_tensor *t = kd_graph_tensor(g, KD_U8, 1, &n);
    assert_non_null(t);
    memset(t->data, 0xFF, (size_t)n);
    kd_graph_reset(g);
}

/* Runs one case on backend `be`; marks the ops it recorded in seen[]. */
static void run_fd_case(kd_backend *be, const fd_case *c, int *seen) {
    kd_graph *g = graph_new(be);
    int64_t big = 4 << 20; /* one 4 MiB arena block, enough for every case */
    assert_non_null(kd_graph_tensor(g, KD_U8, 1, &big));
    kd_graph_reset(g);
    kd_tensor *in[4] = {NULL, NULL, NULL, NULL};
    for (int k = 0; k < c->n_in; k++) {
        const in_spec *s = &c->in[k];
        in[k] = tnew(s->fill == FILL_LABELS ? KD_I32 : KD_F32, s->ndim, s->shape);
        fill_input(in[k], s, 1000 + 17 * (uint64_t)k + (uint64_t)(c - fd_cases) * 101);
        if (s->diff) KD_ASSERT_OK(kd_tensor_require_grad(in[k]));
    }
    kd_graph_set_rng(g, 42, 7);

    /* Analytic gradients of J = sum(out * r), twice: pass 0 feeds the leaves
     * straight in (their .grad accumulates onto a pre-filled 0.25), pass 1
     * feeds scale(leaf, 1), so each rule writes a fresh intermediate gradient
     * (accumulate = 0) into reused, stale arena memory. Pass 1 also checks
     * the op table's retention: every tensor is tracked, the case runs in a
     * scope that keeps only scale(out, 1), and released buffers are filled
     * with NaN, so a rule that reads a tensor its op does not retain (an
     * input, the output, a saved value) gets NaN or reused data. */
    kd_tensor *r = NULL;
    float *ana[2][4] = {{NULL}};
    for (int pass = 0; pass < 2; pass++) {
        poison_arena(g);
        size_t scope = 0;
        if (pass == 1) {
            g->track_min = 0;
            g->scribble = 1;
            scope = kd_graph_scope_begin(g);
        }
        kd_tensor *use[4] = {NULL, NULL, NULL, NULL};
        for (int k = 0; k < c->n_in; k++) {
            use[k] = in[k];
            if (!c->in[k].diff) continue;
            for (int64_t i = 0; i < kd_tensor_numel(in[k]); i++) kd_f32(in[k]->grad)[i] = 0.25f;
            if (pass == 1) use[k] = kd_scale(g, in[k], 1.0f);
        }
        kd_tensor *out = c->build(g, use);
        if (!out) fail_msg("%s [%s]: forward failed: %s", c->name, be->name, kd_last_error());
        if (pass == 1) {
            out = kd_graph_scope_return(g, scope, kd_scale(g, out, 1.0f));
        }
        if (!r) {
            /* r in +-[0.5, 1.5]: every output contributes with weight of order 1. */
            static const in_spec r_spec = {0, {0}, FILL_AWAY0, 0.5f, 1.5f, 0};
            r = tnew(KD_F32, out->ndim, out->shape);
            fill_input(r, &r_spec, 99);
        }
        kd_tensor *loss = kd_sum(g, kd_mul(g, out, r));
        if (kd_backward(g, loss) != KD_OK)
            fail_msg("%s [%s]: backward failed: %s", c->name, be->name, kd_last_error());
        g->track_min = KD__TRACK_MIN;
        g->scribble = 0;
        for (int i = 0; i < g->n_nodes; i++) seen[g->tape[i].op] = 1;
        for (int k = 0; k < c->n_in; k++) {
            if (!c->in[k].diff) continue;
            int64_t n = kd_tensor_numel(in[k]);
            ana[pass][k] = malloc((size_t)n * sizeof(float));
            for (int64_t i = 0; i < n; i++) ana[pass][k][i] = kd_f32(in[k]->grad)[i] - 0.25f;
        }
    }

    /* Numerical gradients with the tape off. */
    kd_graph_set_grad_enabled(g, 0);
    const float h = 1e-2f;
    for (int k = 0; k < c->n_in; k++) {
        if (!c->in[k].diff) {
            if (in[k]->grad) fail_msg("%s: input %d does not require grad but got one", c->name, k);
            continue;
        }
        int64_t n = kd_tensor_numel(in[k]);
        float *num = calloc((size_t)n, sizeof *num);
        float *x = kd_f32(in[k]);
        for (int64_t i = 0; i < n; i++) {
            float x0 = x[i];
            x[i] = x0 + h;
            double jp = fd_eval(g, c, in, r);
            x[i] = x0 - h;
            double jm = fd_eval(g, c, in, r);
            x[i] = x0;
            num[i] = (float)((jp - jm) / (2.0 * (double)h));
        }
        for (int pass = 0; pass < 2; pass++) {
            char what[160];
            snprintf(what, sizeof what, "%s [%s]: d/d input %d (%s)", c->name, be->name, k,
                     pass ? "fresh" : "accumulated");
            double err = KD_ASSERT_CLOSE(ana[pass][k], num, n, FD_ATOL, FD_RTOL, what);
            if (getenv("KD_FD_VERBOSE")) {
                double mx = 0;
                for (int64_t i = 0; i < n; i++) mx = fmax(mx, fabs(num[i]));
                fprintf(stderr, "  %-72s max|err| %.2e max|grad| %.2e\n", what, err, mx);
            }
            free(ana[pass][k]);
        }
        free(num);
    }
    kd_tensor_free(r);
    for (int k = 0; k < c->n_in; k++) kd_tensor_free(in[k]);
    kd_graph_free(g);
}

static void setup_running_stats(void) {
    int64_t c = 3;
    g_rmean = tnew(KD_F32, 1, &c);
    g_rvar = tnew(KD_F32, 1, &c);
    kd_test_fill_uniform(kd_f32(g_rmean), c, -0.5f, 0.5f, 5);
    kd_test_fill_uniform(kd_f32(g_rvar), c, 0.5f, 1.5f, 6);
}

static void free_running_stats(void) {
    kd_tensor_free(g_rmean);
    kd_tensor_free(g_rvar);
    g_rmean = g_rvar = NULL;
}

/* The first op that no finite-difference case ran (seen[op] == 0), or NULL.
 * to_strided counts only on a backend with blocked layouts. */
static const char *fd_missing_op(const int *seen, const kd_backend *be) {
    for (int op = 0; op < KD_OP_COUNT; op++)
        if (!seen[op] && !(op == KD_OP_TO_STRIDED && !be->blocked_channels))
            return kd_op_get_info((kd_op)op)->name;
    return NULL;
}

static void fd_all(kd_backend *be) {
    int seen[KD_OP_COUNT] = {0};
    setup_running_stats();
    for (int i = 0; i < N_FD_CASES; i++) {
        /* Eval-mode statistics must not drift between the passes. */
        kd_test_fill_uniform(kd_f32(g_rmean), 3, -0.5f, 0.5f, 5);
        kd_test_fill_uniform(kd_f32(g_rvar), 3, 0.5f, 1.5f, 6);
        run_fd_case(be, &fd_cases[i], seen);
    }
    free_running_stats();
    const char *missing = fd_missing_op(seen, be);
    if (missing) fail_msg("op %s has no finite-difference case", missing);
}

/* -------------------------------------------------------------- tests */

static void test_op_table(void **state) {
    (void)state;
    char msg[4096];
    const char *names[] = {"ref", "cpu"};
    for (int b = 0; b < 2; b++) {
        kd_backend *be = backend(names[b]);
        if (!be) continue; /* cpu: not built in */
        if (kd__op_table_check(kd__op_table, KD_OP_COUNT, be, msg, sizeof msg) != 0)
            fail_msg("op table on %s:\n%s", names[b], msg);
    }
    for (int op = 0; op < KD_OP_COUNT; op++) {
        const kd_op_info *info = kd_op_get_info((kd_op)op);
        assert_non_null(info);
        assert_string_equal(info->name, kd__op_table[op].name);
        if (!info->has_forward) fail_msg("op %s has no forward", info->name);
        if (!info->has_backward) fail_msg("op %s has no backward rule", info->name);
    }
    assert_null(kd_op_get_info(KD_OP_COUNT));
}

/* A test of the tests above: the checks must fail on a table that lost a
 * backward rule, a forward, an entry or a name, and on a reference backend
 * that lost a kernel; and the finite-difference coverage must name an op
 * without a case. */
static void test_op_table_checks_can_fail(void **state) {
    (void)state;
    kd_backend *ref = backend("ref");
    assert_non_null(ref);
    static kd__op_entry t[KD_OP_COUNT];
    char msg[4096];
    kd_op_info info;

    memcpy(t, kd__op_table, sizeof t);
    assert_int_equal(kd__op_table_check(t, KD_OP_COUNT, ref, msg, sizeof msg), 0);
    for (int op = 0; op < KD_OP_COUNT; op++) {
        memcpy(t, kd__op_table, sizeof t);
        t[op].backward = NULL;
        kd__op_info_derive(&t[op], ref, &info);
        assert_int_equal(info.has_backward, 0);
        assert_int_equal(info.has_forward, 1);
        assert_int_equal(kd__op_table_check(t, KD_OP_COUNT, ref, msg, sizeof msg), 1);
        if (!strstr(msg, "no backward") || !strstr(msg, kd__op_table[op].name))
            fail_msg("a missing backward of %s went unreported: %s", kd__op_table[op].name, msg);
        t[op] = kd__op_table[op];
        t[op].forward = NULL;
        kd__op_info_derive(&t[op], ref, &info);
        assert_int_equal(info.has_forward, 0);
        assert_int_equal(kd__op_table_check(t, KD_OP_COUNT, ref, msg, sizeof msg), 1);
        assert_non_null(strstr(msg, "no forward"));
        memset(&t[op], 0, sizeof t[op]); /* a hole in the designated initialisers */
        assert_int_equal(kd__op_table_check(t, KD_OP_COUNT, ref, msg, sizeof msg), 1);
        assert_non_null(strstr(msg, "no table entry"));
    }
    memcpy(t, kd__op_table, sizeof t);
    t[KD_OP_SUM].name = t[KD_OP_MEAN].name;
    assert_int_equal(kd__op_table_check(t, KD_OP_COUNT, ref, msg, sizeof msg), 1);
    assert_non_null(strstr(msg, "share the name"));

    /* A reference backend without a kernel leaves the ops that call it
     * without a forward (or backward). */
    kd_backend broken = *ref;
    broken.conv2d_backward_weights = NULL;
    broken.eltwise_forward = NULL;
    kd__op_info_derive(&kd__op_table[KD_OP_CONV2D], &broken, &info);
    assert_int_equal(info.has_forward, 1);
    assert_int_equal(info.has_backward, 0);
    kd__op_info_derive(&kd__op_table[KD_OP_EXP], &broken, &info);
    assert_int_equal(info.has_forward, 0);
    /* conv2d (backward) and relu, leaky_relu, exp, log, gelu (forward). */
    assert_int_equal(kd__op_table_check(kd__op_table, KD_OP_COUNT, &broken, msg, sizeof msg), 6);
    /* The transformer kernels: layernorm without its backward kernel, bmm
     * without the batched gemm. */
    broken = *ref;
    broken.layernorm_backward = NULL;
    broken.gemm_batch = NULL;
    kd__op_info_derive(&kd__op_table[KD_OP_LAYERNORM], &broken, &info);
    assert_int_equal(info.has_forward, 1);
    assert_int_equal(info.has_backward, 0);
    kd__op_info_derive(&kd__op_table[KD_OP_BMM], &broken, &info);
    assert_int_equal(info.has_forward, 0);
    assert_int_equal(info.has_backward, 0);
    assert_int_equal(kd__op_table_check(kd__op_table, KD_OP_COUNT, &broken, msg, sizeof msg), 2);

    int seen[KD_OP_COUNT];
    for (int op = 0; op < KD_OP_COUNT; op++) seen[op] = 1;
    assert_null(fd_missing_op(seen, ref));
    seen[KD_OP_KL_DIV] = 0;
    const char *m = fd_missing_op(seen, ref);
    assert_non_null(m);
    assert_string_equal(m, "kl_div");
}

static void test_fd_ref(void **state) {
    (void)state;
    kd_backend *be = backend("ref");
    assert_non_null(be);
    fd_all(be);
}

static void test_fd_cpu(void **state) {
    (void)state;
    kd_backend *be = backend("cpu");
    if (!be) {
        fprintf(stderr, "  (cpu backend not built: %s)\n", kd_last_error());
        skip();
    }
    fd_all(be);
}

static void test_accumulation(void **state) {
    (void)state;
    kd_graph *g = graph_new(backend("ref"));
    int64_t xs[2] = {3, 4}, ws[2] = {2, 4};
    kd_tensor *x = tnew(KD_F32, 2, xs), *w = tnew(KD_F32, 2, ws);
    kd_test_fill_uniform(kd_f32(x), 12, -1, 1, 1);
    kd_test_fill_uniform(kd_f32(w), 8, -1, 1, 2);
    KD_ASSERT_OK(kd_tensor_require_grad(w));

    /* Two steps without zeroing: the parameter's grad doubles. */
    float first[8];
    for (int step = 0; step < 2; step++) {
        kd_graph_reset(g);
        kd_tensor *loss = kd_sum(g, kd_mul(g, kd_linear(g, x, w, NULL), kd_linear(g, x, w, NULL)));
        KD_ASSERT_OK(kd_backward(g, loss));
        if (step == 0) memcpy(first, kd_f32(w->grad), sizeof first);
    }
    float twice[8];
    for (int i = 0; i < 8; i++) twice[i] = 2 * first[i];
    KD_ASSERT_CLOSE(kd_f32(w->grad), twice, 8, 1e-6, 1e-6, "two steps");
    /* A second backward over the same tape adds once more. */
    kd_tensor *loss = kd_sum(g, kd_mul(g, kd_linear(g, x, w, NULL), kd_linear(g, x, w, NULL)));
    memset(w->grad->data, 0, 8 * sizeof(float));
    KD_ASSERT_OK(kd_backward(g, loss));
    KD_ASSERT_OK(kd_backward(g, loss));
    KD_ASSERT_CLOSE(kd_f32(w->grad), twice, 8, 1e-6, 1e-6, "two backward passes, one tape");

    /* x + x: the gradient is 2 everywhere. */
    KD_ASSERT_OK(kd_tensor_require_grad(x));
    kd_graph_reset(g);
    KD_ASSERT_OK(kd_backward(g, kd_sum(g, kd_add(g, x, x))));
    float want[12];
    for (int i = 0; i < 12; i++) want[i] = 2.0f;
    KD_ASSERT_CLOSE(kd_f32(x->grad), want, 12, 0, 0, "x + x");

    /* An intermediate with two consumers: h = 2x, L = sum(h*h + h), dL/dx = 2(2h + 1). */
    memset(x->grad->data, 0, 12 * sizeof(float));
    kd_graph_reset(g);
    kd_tensor *h = kd_scale(g, x, 2.0f);
    KD_ASSERT_OK(kd_backward(g, kd_sum(g, kd_add(g, kd_mul(g, h, h), h))));
    for (int i = 0; i < 12; i++) want[i] = 2.0f * (2.0f * kd_f32(h)[i] + 1.0f);
    KD_ASSERT_CLOSE(kd_f32(x->grad), want, 12, 1e-6, 1e-6, "two consumers");
    assert_int_equal(h->grad_ready, 1);
    /* Its gradient buffer went back to the graph once h's own rule had run. */
    assert_null(h->grad);

    /* Recycled buffers: a chain of 64 same-shape ops (16 KiB each) needs a
     * couple of live gradient buffers, not 64 (1 MiB); only the small
     * descriptors are new per op. */
    int64_t big_n = 4096;
    kd_tensor *big = NULL;
    KD_ASSERT_OK(kd_tensor_new(KD_F32, 1, &big_n, &big));
    KD_ASSERT_OK(kd_tensor_require_grad(big));
    kd_graph_reset(g);
    kd_tensor *c = big;
    for (int i = 0; i < 64; i++) c = kd_scale(g, c, 1.0f);
    size_t before = kd_arena_used(kd_graph_arena(g));
    KD_ASSERT_OK(kd_backward(g, kd_sum(g, c)));
    size_t grew = kd_arena_used(kd_graph_arena(g)) - before;
    if (grew > 4 * 16384 + 64 * 512)
        fail_msg("backward of 64 scales took %zu arena bytes: gradient buffers are not recycled", grew);
    kd_tensor_free(big);

    kd_tensor_free(x);
    kd_tensor_free(w);
    kd_graph_free(g);
}

static void test_no_grad(void **state) {
    (void)state;
    kd_graph *g = graph_new(backend("ref"));
    int64_t xs[2] = {4, 5}, ws[2] = {3, 5};
    kd_tensor *x = tnew(KD_F32, 2, xs), *tw = tnew(KD_F32, 2, ws), *sw = tnew(KD_F32, 2, ws);
    kd_test_fill_uniform(kd_f32(x), 20, -1, 1, 1);
    kd_test_fill_uniform(kd_f32(tw), 15, -1, 1, 2);
    kd_test_fill_uniform(kd_f32(sw), 15, -1, 1, 3);
    KD_ASSERT_OK(kd_tensor_require_grad(tw)); /* a teacher that could train, frozen here */
    KD_ASSERT_OK(kd_tensor_require_grad(sw));

    int prev = kd_graph_set_grad_enabled(g, 0);
    assert_int_equal(prev, 1);
    kd_tensor *t_logits = kd_relu(g, kd_linear(g, x, tw, NULL));
    assert_non_null(t_logits);
    assert_int_equal(kd_graph_tape_size(g), 0);
    assert_int_equal(t_logits->node, -1);
    kd_graph_set_grad_enabled(g, 1);
    assert_int_equal(kd_graph_grad_enabled(g), 1);

    kd_tensor *s_logits = kd_linear(g, x, sw, NULL);
    KD_ASSERT_OK(kd_backward(g, kd_kl_div(g, s_logits, t_logits, 4.0f)));
    for (int i = 0; i < 15; i++) assert_true(kd_f32(tw->grad)[i] == 0.0f);
    int nonzero = 0;
    for (int i = 0; i < 15; i++) nonzero += kd_f32(sw->grad)[i] != 0.0f;
    assert_true(nonzero > 0);
    assert_null(t_logits->grad); /* the teacher's output got no gradient either */
    assert_null(x->grad);        /* nor did the constant input */

    /* Ops on constants only record nothing even with gradients on. */
    kd_graph_reset(g);
    assert_non_null(kd_exp(g, x));
    assert_int_equal(kd_graph_tape_size(g), 0);
    assert_int_not_equal(kd_backward(g, kd_sum(g, x)), KD_OK);

    kd_tensor_free(x);
    kd_tensor_free(tw);
    kd_tensor_free(sw);
    kd_graph_free(g);
}

typedef struct {
    kd_tensor *x, *cw, *cb, *gamma, *beta, *rm, *rv, *fw, *fb, *labels;
} small_net;

static kd_tensor *small_step(kd_graph *g, small_net *m) {
    kd_conv2d_params cp = {{1, 1}, {1, 1}, {1, 1}, 1, 0};
    kd_bn_params bp = {1e-5f, 0.1f, 1};
    kd_tensor *h = kd_conv2d(g, m->x, m->cw, m->cb, &cp);
    h = kd_batchnorm(g, h, m->gamma, m->beta, m->rm, m->rv, &bp);
    h = kd_relu(g, h);
    h = kd_maxpool2d(g, h, 2, 2, 0);
    h = kd_dropout(g, kd_flatten(g, h), 0.1f, 1);
    kd_tensor *loss = kd_cross_entropy(g, kd_linear(g, h, m->fw, m->fb), m->labels, 0.1f);
    kd_status s = kd_backward(g, loss);
    if (s != KD_OK) fail_msg("small step: %s", kd_last_error());
    return loss;
}

static void test_steady_state(void **state) {
    (void)state;
    small_net m;
    m.x = tnew(KD_F32, 4, (const int64_t[]){4, 3, 8, 8});
    m.cw = tnew(KD_F32, 4, (const int64_t[]){4, 3, 3, 3});
    m.cb = tnew(KD_F32, 1, (const int64_t[]){4});
    m.gamma = tnew(KD_F32, 1, (const int64_t[]){4});
    m.beta = tnew(KD_F32, 1, (const int64_t[]){4});
    m.rm = tnew(KD_F32, 1, (const int64_t[]){4});
    m.rv = tnew(KD_F32, 1, (const int64_t[]){4});
    m.fw = tnew(KD_F32, 2, (const int64_t[]){5, 64});
    m.fb = tnew(KD_F32, 1, (const int64_t[]){5});
    m.labels = tnew(KD_I64, 1, (const int64_t[]){4});
    kd_test_fill_uniform(kd_f32(m.x), 4 * 3 * 64, -1, 1, 1);
    kd_test_fill_uniform(kd_f32(m.cw), 108, -0.3f, 0.3f, 2);
    kd_test_fill_uniform(kd_f32(m.fw), 320, -0.2f, 0.2f, 3);
    for (int i = 0; i < 4; i++) {
        kd_f32(m.gamma)[i] = 1;
        kd_f32(m.rv)[i] = 1;
        ((int64_t *)m.labels->data)[i] = i;
    }
    kd_tensor *params[] = {m.cw, m.cb, m.gamma, m.beta, m.fw, m.fb};
    for (int i = 0; i < 6; i++) KD_ASSERT_OK(kd_tensor_require_grad(params[i]));

    kd_graph *g = graph_new(backend("ref"));
    size_t allocs[3], cap[3];
    float loss[3];
    for (int step = 0; step < 3; step++) {
        kd_graph_reset(g);
        kd_graph_set_rng(g, 1, 0); /* same masks: same loss */
        size_t before = kd_graph_heap_allocs(g);
        loss[step] = kd_f32(small_step(g, &m))[0];
        allocs[step] = kd_graph_heap_allocs(g);
        cap[step] = kd_arena_capacity(kd_graph_arena(g));
        if (step > 0) assert_int_equal(allocs[step], before); /* nothing inside a step */
        assert_int_equal(kd_graph_status(g), KD_OK);
    }
    assert_int_equal(allocs[1], allocs[2]);
    assert_int_equal(cap[1], cap[2]);
    assert_true(isfinite(loss[0]));
    /* Running stats move and params are untouched, so only BN's batch
     * statistics matter: the loss is identical. */
    assert_true(loss[0] == loss[1] && loss[1] == loss[2]);

    kd_graph_free(g);
    for (int i = 0; i < 6; i++) kd_tensor_free(params[i]);
    kd_tensor_free(m.x);
    kd_tensor_free(m.rm);
    kd_tensor_free(m.rv);
    kd_tensor_free(m.labels);
}

static void test_sticky_errors(void **state) {
    (void)state;
    kd_graph *g = graph_new(backend("ref"));
    kd_tensor *x = tnew(KD_F32, 4, (const int64_t[]){2, 3, 8, 8});
    kd_tensor *w = tnew(KD_F32, 4, (const int64_t[]){4, 16, 3, 3});
    KD_ASSERT_OK(kd_tensor_require_grad(w));
    kd_conv2d_params cp = {{1, 1}, {1, 1}, {1, 1}, 1, 0};

    kd_tensor *ok = kd_relu(g, x);
    assert_non_null(ok);
    kd_clear_error();
    assert_null(kd_conv2d(g, x, w, NULL, &cp));
    assert_int_equal(kd_graph_status(g), KD_ERR_SHAPE);
    const char *msg = kd_last_error();
    if (!strstr(msg, "(2, 3, 8, 8)") || !strstr(msg, "(4, 16, 3, 3)") || !strstr(msg, "conv2d"))
        fail_msg("message does not name the shapes: %s", msg);
    /* Later ops return NULL at once, even on valid inputs, keeping the first message. */
    assert_null(kd_relu(g, x));
    assert_null(kd_sum(g, kd_relu(g, NULL)));
    assert_string_equal(kd_last_error(), msg);
    assert_int_equal(kd_backward(g, NULL), KD_ERR_SHAPE);
    assert_int_equal(kd_backward(g, ok), KD_ERR_SHAPE);

    /* Reset clears the status; a NULL input then is an invalid argument. */
    kd_graph_reset(g);
    assert_int_equal(kd_graph_status(g), KD_OK);
    assert_null(kd_add(g, x, NULL));
    assert_int_equal(kd_graph_status(g), KD_ERR_INVALID);

    /* Other shape errors. */
    kd_graph_reset(g);
    kd_tensor *a = tnew(KD_F32, 2, (const int64_t[]){3, 4}), *b = tnew(KD_F32, 2, (const int64_t[]){4, 3});
    assert_null(kd_add(g, a, b));
    assert_int_equal(kd_graph_status(g), KD_ERR_SHAPE);
    assert_non_null(strstr(kd_last_error(), "(3, 4)"));
    kd_graph_reset(g);
    assert_null(kd_matmul(g, a, a));
    assert_int_equal(kd_graph_status(g), KD_ERR_SHAPE);
    kd_graph_reset(g);
    assert_null(kd_reshape(g, a, 2, (const int64_t[]){5, -1}));
    assert_int_equal(kd_graph_status(g), KD_ERR_SHAPE);
    kd_graph_reset(g);
    assert_int_equal(kd_backward(g, kd_relu(g, a)), KD_ERR_SHAPE); /* not one element */

    kd_tensor_free(a);
    kd_tensor_free(b);
    kd_tensor_free(x);
    kd_tensor_free(w);
    kd_graph_free(g);
}

static void test_dropout(void **state) {
    (void)state;
    kd_graph *g = graph_new(backend("ref"));
    int64_t n = 10000;
    kd_tensor *x = tnew(KD_F32, 1, &n);
    for (int64_t i = 0; i < n; i++) kd_f32(x)[i] = 1.0f;
    float *y1 = malloc((size_t)n * sizeof *y1);

    kd_graph_set_rng(g, 123, 5);
    kd_tensor *y = kd_dropout(g, x, 0.25f, 1);
    assert_non_null(y);
    memcpy(y1, y->data, (size_t)n * sizeof *y1);
    int64_t dropped = 0;
    for (int64_t i = 0; i < n; i++) {
        if (y1[i] == 0.0f) dropped++;
        else assert_float_equal(y1[i], 1.0f / 0.75f, 1e-6);
    }
    assert_true(dropped > 2300 && dropped < 2700);

    /* Same seed and key after a reset: the same mask. */
    kd_graph_reset(g);
    kd_graph_set_rng(g, 123, 5);
    y = kd_dropout(g, x, 0.25f, 1);
    assert_memory_equal(y->data, y1, (size_t)n * sizeof *y1);
    /* A second dropout in the same step draws another stream. */
    kd_tensor *y2 = kd_dropout(g, x, 0.25f, 1);
    assert_true(memcmp(y2->data, y1, (size_t)n * sizeof *y1) != 0);
    /* Another key: another mask. */
    kd_graph_reset(g);
    kd_graph_set_rng(g, 123, 6);
    y = kd_dropout(g, x, 0.25f, 1);
    assert_true(memcmp(y->data, y1, (size_t)n * sizeof *y1) != 0);
    /* Identity in eval mode and for p = 0; p = 1 drops everything. */
    assert_ptr_equal(kd_dropout(g, x, 0.25f, 0), x);
    assert_ptr_equal(kd_dropout(g, x, 0.0f, 1), x);
    y = kd_dropout(g, x, 1.0f, 1);
    for (int64_t i = 0; i < n; i++) assert_true(kd_f32(y)[i] == 0.0f);
    assert_null(kd_dropout(g, x, 1.5f, 1));
    assert_int_equal(kd_graph_status(g), KD_ERR_INVALID);

    free(y1);
    kd_tensor_free(x);
    kd_graph_free(g);
}

static void test_cross_entropy_labels(void **state) {
    (void)state;
    kd_graph *g = graph_new(backend("ref"));
    kd_tensor *logits = tnew(KD_F32, 2, (const int64_t[]){3, 7});
    kd_tensor *lab = tnew(KD_I32, 1, (const int64_t[]){3});
    kd_test_fill_uniform(kd_f32(logits), 21, -1, 1, 3);
    int32_t *l = lab->data;
    l[0] = 1;
    l[1] = 9;
    l[2] = 0;
    assert_null(kd_cross_entropy(g, logits, lab, 0.0f));
    assert_int_equal(kd_graph_status(g), KD_ERR_INVALID);
    const char *msg = kd_last_error();
    if (!strstr(msg, "label 9") || !strstr(msg, "7 classes"))
        fail_msg("message does not name the label and class count: %s", msg);
    kd_graph_reset(g);
    l[1] = -1;
    assert_null(kd_cross_entropy(g, logits, lab, 0.0f));
    assert_int_equal(kd_graph_status(g), KD_ERR_INVALID);

    /* A known value: uniform logits give log(C) with or without smoothing. */
    kd_graph_reset(g);
    l[1] = 6;
    memset(logits->data, 0, 21 * sizeof(float));
    kd_tensor *loss = kd_cross_entropy(g, logits, lab, 0.2f);
    assert_non_null(loss);
    assert_float_equal(kd_f32(loss)[0], logf(7.0f), 1e-6);
    kd_tensor_free(logits);
    kd_tensor_free(lab);
    kd_graph_free(g);
}

/* The plain-C reductions and row ops give bitwise identical results for any
 * thread count (fixed blocks, fixed order). */
static void test_thread_determinism(void **state) {
    (void)state;
    int64_t n = 300000, rs[2] = {600, 500};
    kd_tensor *x = tnew(KD_F32, 1, &n), *lg = tnew(KD_F32, 2, rs);
    kd_tensor *lab = tnew(KD_I32, 1, rs);
    kd_test_fill_uniform(kd_f32(x), n, -1, 1, 11);
    kd_test_fill_uniform(kd_f32(lg), n, -3, 3, 12);
    for (int i = 0; i < 600; i++) ((int32_t *)lab->data)[i] = i % 500;
    KD_ASSERT_OK(kd_tensor_require_grad(lg));
    int saved = kd_get_num_threads();
    float out[2][3];
    float *grad[2];
    for (int t = 0; t < 2; t++) {
        kd_set_num_threads(t == 0 ? 1 : 4);
        kd_graph *g = graph_new(backend("ref"));
        kd_graph_set_rng(g, 3, 4);
        out[t][0] = kd_f32(kd_sum(g, x))[0];
        out[t][1] = kd_f32(kd_mse(g, x, kd_dropout(g, x, 0.5f, 1)))[0];
        kd_tensor *loss = kd_cross_entropy(g, lg, lab, 0.1f);
        out[t][2] = kd_f32(loss)[0];
        memset(lg->grad->data, 0, kd_tensor_nbytes(lg));
        KD_ASSERT_OK(kd_backward(g, kd_add(g, loss, kd_mean(g, kd_softmax(g, lg)))));
        grad[t] = malloc(kd_tensor_nbytes(lg));
        memcpy(grad[t], lg->grad->data, kd_tensor_nbytes(lg));
        kd_graph_free(g);
    }
    kd_set_num_threads(saved);
    assert_memory_equal(out[0], out[1], sizeof out[0]);
    assert_memory_equal(grad[0], grad[1], kd_tensor_nbytes(lg));
    free(grad[0]);
    free(grad[1]);
    kd_tensor_free(x);
    kd_tensor_free(lg);
    kd_tensor_free(lab);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_op_table),
        cmocka_unit_test(test_op_table_checks_can_fail),
        cmocka_unit_test(test_fd_ref),
        cmocka_unit_test(test_fd_cpu),
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_no_grad),
        cmocka_unit_test(test_steady_state),
        cmocka_unit_test(test_sticky_errors),
        cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_cross_entropy_labels),
        cmocka_unit_test(test_thread_determinism),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
