/*
 * ops_act.c: the activations of the mobile and EfficientNet families
 * (sigmoid, hardswish, hardsigmoid, SiLU, ReLU6) and the channel scaling of
 * squeeze-and-excitation blocks (mul_channel), in plain C on every backend.
 *
 * Each activation is a pair of elementwise loops: forward y = f(x), backward
 * dx (+)= dy * f'(x), written out per op so that the compiler vectorises
 * them. The formulas follow PyTorch's CPU kernels, including the gradient at
 * the kinks of the piecewise-linear ones. Loops are OpenMP-parallel above
 * KD__PAR_MIN elements; mul_channel's scale gradient sums each (n, c) plane
 * in double in a fixed order, so results never depend on the thread count.
 */
#include "autograd/autograd_impl.h"

#include <math.h>
#include <string.h>

#define SHP(t, buf) kd_shape_str((t), (buf), sizeof(buf))

/* ---------------------------------------------------------- activations */

/* y[i] = EXPR(v) with v = x[i], in parallel above KD__PAR_MIN elements. */
#define KD__MAP(y, x, n, EXPR)                                                   \
    do {                                                                         \
        int64_t kd__cnt = (n);                                                   \
        _Pragma("omp parallel for schedule(static) if (kd__cnt >= KD__PAR_MIN)") \
        for (int64_t i = 0; i < kd__cnt; i++) {                                  \
            float v = (x)[i];                                                    \
            (y)[i] = (EXPR);                                                     \
        }                                                                        \
    } while (0)

/* d[i] (+)= dy[i] * DERIV, where DERIV uses v = src[i]: the op's input x or
 * its output y, whichever the op table says the rule retains. */
#define KD__MAP_GRAD(d, dy, src, n, acc, DERIV)                                      \
    do {                                                                             \
        int64_t kd__cnt = (n);                                                       \
        if (acc) {                                                                   \
            _Pragma("omp parallel for schedule(static) if (kd__cnt >= KD__PAR_MIN)") \
            for (int64_t i = 0; i < kd__cnt; i++) {                                  \
                float v = (src)[i];                                                  \
                (d)[i] += (dy)[i] * (DERIV);                                         \
            }                                                                        \
        } else {                                                                     \
            _Pragma("omp parallel for schedule(static) if (kd__cnt >= KD__PAR_MIN)") \
            for (int64_t i = 0; i < kd__cnt; i++) {                                  \
                float v = (src)[i];                                                  \
                (d)[i] = (dy)[i] * (DERIV);                                          \
            }                                                                        \
        }                                                                            \
    } while (0)

static inline float kd__sigmoidf(float v) { return 1.0f / (1.0f + expf(-v)); }
static inline float kd__relu6f(float v) { return fminf(fmaxf(v, 0.0f), 6.0f); }

static kd_tensor *kd__act(kd_graph *g, kd_op op, const char *name, kd_tensor *x) {
    if (!g || !kd__ok_inputs(g, name, 1, &x)) return NULL;
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, name, "input", x)) return NULL;
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    int64_t n = kd_tensor_numel(x);
    const float *xd = kd_f32(x);
    float *yd = kd_f32(y);
    switch (op) {
    case KD_OP_SIGMOID: KD__MAP(yd, xd, n, kd__sigmoidf(v)); break;
    case KD_OP_HARDSWISH: KD__MAP(yd, xd, n, v * kd__relu6f(v + 3.0f) / 6.0f); break;
    case KD_OP_HARDSIGMOID: KD__MAP(yd, xd, n, kd__relu6f(v + 3.0f) / 6.0f); break;
    case KD_OP_SILU: KD__MAP(yd, xd, n, v / (1.0f + expf(-v))); break;
    case KD_OP_RELU6: KD__MAP(yd, xd, n, kd__relu6f(v)); break;
    default: return kd__fail(g, kd_error(KD_ERR_INVALID, "%s: not an activation", name));
    }
    kd__record(g, op, y, 1, &x);
    return g->status == KD_OK ? y : NULL;
}

kd_tensor *kd_sigmoid(kd_graph *g, kd_tensor *x) { return kd__act(g, KD_OP_SIGMOID, "sigmoid", x); }
kd_tensor *kd_hardswish(kd_graph *g, kd_tensor *x) {
    return kd__act(g, KD_OP_HARDSWISH, "hardswish", x);
}
kd_tensor *kd_hardsigmoid(kd_graph *g, kd_tensor *x) {
    return kd__act(g, KD_OP_HARDSIGMOID, "hardsigmoid", x);
}
kd_tensor *kd_silu(kd_graph *g, kd_tensor *x) { return kd__act(g, KD_OP_SILU, "silu", x); }
kd_tensor *kd_relu6(kd_graph *g, kd_tensor *x) { return kd__act(g, KD_OP_RELU6, "relu6", x); }

kd_status kd__act_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t cnt = kd_tensor_numel(x);
    /* Only the tensor the op table retains is read: y for sigmoid and relu6,
     * x for the others. */
    const float *dy = kd_f32(n->out->grad);
    float *d = kd_f32(dx);
    switch (n->op) {
    case KD_OP_SIGMOID: KD__MAP_GRAD(d, dy, kd_f32(n->out), cnt, acc, v * (1.0f - v)); break;
    case KD_OP_HARDSWISH:
        KD__MAP_GRAD(d, dy, kd_f32(x), cnt, acc,
                     v < -3.0f ? 0.0f : (v <= 3.0f ? v / 3.0f + 0.5f : 1.0f));
        break;
    case KD_OP_HARDSIGMOID:
        KD__MAP_GRAD(d, dy, kd_f32(x), cnt, acc, (v > -3.0f && v < 3.0f) ? 1.0f / 6.0f : 0.0f);
        break;
    case KD_OP_SILU: {
        /* d/dx x s(x) = s (1 + x (1 - s)), s recomputed from x. */
#define KD__SILU_D(v) (kd__sigmoidf(v) * (1.0f + (v) * (1.0f - kd__sigmoidf(v))))
        KD__MAP_GRAD(d, dy, kd_f32(x), cnt, acc, KD__SILU_D(v));
#undef KD__SILU_D
        break;
    }
    case KD_OP_RELU6:
        /* y = min(max(x, 0), 6) lies strictly inside (0, 6) exactly where x
         * does (a NaN x gives y = 0 and gradient 0 either way), so the mask
         * from y equals PyTorch's mask from x. */
        KD__MAP_GRAD(d, dy, kd_f32(n->out), cnt, acc, (v > 0.0f && v < 6.0f) ? 1.0f : 0.0f);
        break;
    default:
        kd__fail(g, kd_error(KD_ERR_INVALID, "activation backward: op %d", (int)n->op));
        return g->status;
    }
    return KD_OK;
}

/* ---------------------------------------------------------- mul_channel */

/* NCHW16C x: d (+)= x * s[n, c] (s (N, C), or (N, 1) when sc == 1), one
 * (n, channel block) per iteration. */
static void kd__mul_channel_blocked(float *d, const float *x, const float *s, int64_t N,
                                    int64_t C, int64_t S, int64_t sc, int acc) {
    enum { B = KD_LAYOUT_BLOCK };
    int64_t CB = C / B;
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
    for (int64_t nb = 0; nb < N * CB; nb++) {
        int64_t n = nb / CB, c0 = (nb % CB) * B;
        float k[B];
        for (int l = 0; l < B; l++) k[l] = sc == 1 ? s[n] : s[n * C + c0 + l];
        const float *xp = x + nb * S * B;
        float *dp = d + nb * S * B;
        for (int64_t j = 0; j < S; j++)
            for (int l = 0; l < B; l++)
                dp[j * B + l] = acc ? dp[j * B + l] + xp[j * B + l] * k[l] : xp[j * B + l] * k[l];
    }
}

kd_tensor *kd_mul_channel(kd_graph *g, kd_tensor *x, kd_tensor *s) {
    kd_tensor *in[2] = {x, s};
    char bx[96], bs[96];
    if (!g || !kd__ok_inputs(g, "mul_channel", 2, in)) return NULL;
    if (!(x = in[0] = kd__to_f32(g, x))) return NULL;
    if (!kd__check_f32_any(g, "mul_channel", "x", x) || !kd__check_f32(g, "mul_channel", "s", s))
        return NULL;
    if (x->ndim < 2 || s->ndim != 2 || s->shape[0] != x->shape[0] ||
        (s->shape[1] != x->shape[1] && s->shape[1] != 1))
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "mul_channel: x %s and s %s do not match (need "
                                                  "x (N, C, ...) and s (N, C) or (N, 1))",
                                    SHP(x, bx), SHP(s, bs)));
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    int64_t N = x->shape[0], C = x->shape[1], S = C ? kd_tensor_numel(x) / (N * C) : 0;
    int64_t sc = s->shape[1]; /* C or 1 */
    const float *xd = kd_f32(x), *sd = kd_f32(s);
    float *yd = kd_f32(y);
    if (kd__blocked(x)) {
        kd__mul_channel_blocked(yd, xd, sd, N, C, S, sc, 0);
        kd__record(g, KD_OP_MUL_CHANNEL, y, 2, in);
        return g->status == KD_OK ? y : NULL;
    }
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
    for (int64_t p = 0; p < N * C; p++) {
        float k = sd[sc == 1 ? p / C : p];
        const float *xp = xd + p * S;
        float *yp = yd + p * S;
        for (int64_t j = 0; j < S; j++) yp[j] = xp[j] * k;
    }
    kd__record(g, KD_OP_MUL_CHANNEL, y, 2, in);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__mul_channel_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *s = n->in[1];
    int64_t N = x->shape[0], C = x->shape[1], S = C ? kd_tensor_numel(x) / (N * C) : 0;
    int64_t sc = s->shape[1];
    const float *dy = kd_f32(n->out->grad), *xd = kd_f32(x), *sd = kd_f32(s);
    int acc;
    if (kd__needs_grad(g, x)) {
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        float *d = kd_f32(dx);
        if (kd__blocked(x)) {
            kd__mul_channel_blocked(d, dy, sd, N, C, S, sc, acc);
        } else {
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
        for (int64_t p = 0; p < N * C; p++) {
            float k = sd[sc == 1 ? p / C : p];
            const float *gp = dy + p * S;
            float *dp = d + p * S;
            if (acc)
                for (int64_t j = 0; j < S; j++) dp[j] += gp[j] * k;
            else
                for (int64_t j = 0; j < S; j++) dp[j] = gp[j] * k;
        }
        }
    }
    if (kd__needs_grad(g, s)) {
        /* One double sum per (n, c) plane; for s (N, 1) the planes of a
         * sample are then added in channel order. */
        double *plane = kd__scratch(g, (size_t)(N * C > 0 ? N * C : 1) * sizeof *plane);
        if (!plane) return g->status;
        if (kd__blocked(x)) {
            /* Same per-plane order (j ascending) as the plain loop. */
            enum { B = KD_LAYOUT_BLOCK };
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
            for (int64_t nb = 0; nb < N * C / B; nb++) {
                double a[B] = {0};
                const float *gp = dy + nb * S * B, *xp = xd + nb * S * B;
                for (int64_t j = 0; j < S; j++)
                    for (int l = 0; l < B; l++) a[l] += (double)gp[j * B + l] * xp[j * B + l];
                for (int l = 0; l < B; l++) plane[nb * B + l] = a[l];
            }
        } else {
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
        for (int64_t p = 0; p < N * C; p++) {
            const float *gp = dy + p * S, *xp = xd + p * S;
            double acc_p = 0;
            for (int64_t j = 0; j < S; j++) acc_p += (double)gp[j] * xp[j];
            plane[p] = acc_p;
        }
        }
        kd_tensor *ds = kd__grad(g, s, &acc);
        if (!ds) return g->status;
        float *d = kd_f32(ds);
        for (int64_t i = 0; i < N * sc; i++) {
            double v;
            if (sc == 1) {
                v = 0;
                for (int64_t c = 0; c < C; c++) v += plane[i * C + c];
            } else {
                v = plane[i];
            }
            d[i] = acc ? d[i] + (float)v : (float)v;
        }
    }
    return KD_OK;
}
