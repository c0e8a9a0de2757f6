/*
 * ref.c: the "ref" backend, plain C float32 kernels on contiguous NCHW tensors.
 *
 * These kernels are the oracle of the test suite: each is a direct loop nest
 * written to be obviously correct, not fast. Sums are accumulated in double.
 * Every output element is computed by exactly one thread in a fixed order
 * (no atomics, no parallel reductions), so results are bitwise identical for
 * any thread count.
 *
 * Covered: conv2d (stride, padding, dilation, groups, optional bias) forward
 * and both backward passes; batch norm forward (training and eval) and
 * backward; max and average pooling; row-major gemm and batched gemm; layer
 * norm forward and backward; softmax over the last axis forward and backward; ReLU/leaky ReLU, exp, log and exact GELU. None of the kernels reads its `be` argument, so other backends may
 * call them to fill gaps (see backend_impl.h).
 */
#include "backend/backend_impl.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------- checking */

/* Checks that t is a float32, contiguous, strided CPU tensor. */
static kd_status ref_check_f32(const kd_tensor *t, const char *op, const char *what) {
    if (!t) return kd_error(KD_ERR_INVALID, "ref %s: %s is NULL", op, what);
    if (t->dtype != KD_F32)
        return kd_error(KD_ERR_UNSUPPORTED, "ref %s: %s has dtype %s; the ref backend computes in F32 only",
                        op, what, kd_dtype_name(t->dtype));
    if (t->device != KD_DEVICE_CPU)
        return kd_error(KD_ERR_UNSUPPORTED, "ref %s: %s is not in host memory", op, what);
    if (!kd_tensor_is_contiguous(t))
        return kd_error(KD_ERR_UNSUPPORTED, "ref %s: %s is not a contiguous strided tensor", op, what);
    return KD_OK;
}

/* Checks that t is a float32 vector of length n. */
static kd_status ref_check_vec(const kd_tensor *t, int64_t n, const char *op, const char *what) {
    KD_TRY(ref_check_f32(t, op, what));
    if (kd_tensor_numel(t) != n) {
        char buf[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: %s has shape %s, expected %lld elements", op, what,
                        kd_shape_str(t, buf, sizeof buf), (long long)n);
    }
    return KD_OK;
}

/* Checks that t is a float32 4-d tensor (n0, n1, n2, n3). */
static kd_status ref_check_4d(const kd_tensor *t, int64_t n0, int64_t n1, int64_t n2, int64_t n3,
                              const char *op, const char *what) {
    KD_TRY(ref_check_f32(t, op, what));
    if (t->ndim != 4 || t->shape[0] != n0 || t->shape[1] != n1 || t->shape[2] != n2 ||
        t->shape[3] != n3) {
        char buf[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: %s has shape %s, expected (%lld, %lld, %lld, %lld)", op,
                        what, kd_shape_str(t, buf, sizeof buf), (long long)n0, (long long)n1,
                        (long long)n2, (long long)n3);
    }
    return KD_OK;
}

/* ----------------------------------------------------------------- conv2d */

/* The sizes of one convolution, derived from x (N, C, H, W) and w (O, C/G, KH, KW). */
typedef struct {
    int64_t N, C, H, W;       /* input */
    int64_t O, KH, KW;        /* filters */
    int64_t G, Cg, Og;        /* groups, input and output channels per group */
    int64_t OH, OW;           /* output */
    int64_t sh, sw, ph, pw, dh, dw;
} ref_conv_geom;

/* Fills g from the input-shaped tensor x, the filter-shaped tensor w and
 * checks that the output-shaped tensor y matches. Works for all three passes
 * (x may be dx, w may be dw, y may be dy). */
static kd_status ref_conv_geometry(ref_conv_geom *g, const kd_conv2d_params *p, const kd_tensor *x,
                                   const kd_tensor *w, const kd_tensor *y, const char *op) {
    if (!p) return kd_error(KD_ERR_INVALID, "ref %s: params are NULL", op);
    KD_TRY(ref_check_f32(x, op, "input"));
    KD_TRY(ref_check_f32(w, op, "weight"));
    KD_TRY(ref_check_f32(y, op, "output"));
    if (x->ndim != 4 || w->ndim != 4)
        return kd_error(KD_ERR_SHAPE, "ref %s: input and weight must be 4-d, got %d-d and %d-d", op,
                        x->ndim, w->ndim);
    if (p->stride[0] < 1 || p->stride[1] < 1 || p->dilation[0] < 1 || p->dilation[1] < 1 ||
        p->pad[0] < 0 || p->pad[1] < 0 || p->groups < 1)
        return kd_error(KD_ERR_INVALID,
                        "ref %s: bad parameters stride (%lld, %lld) pad (%lld, %lld) dilation (%lld, %lld) groups %lld",
                        op, (long long)p->stride[0], (long long)p->stride[1], (long long)p->pad[0],
                        (long long)p->pad[1], (long long)p->dilation[0], (long long)p->dilation[1],
                        (long long)p->groups);
    g->N = x->shape[0], g->C = x->shape[1], g->H = x->shape[2], g->W = x->shape[3];
    g->O = w->shape[0], g->KH = w->shape[2], g->KW = w->shape[3];
    g->G = p->groups;
    g->sh = p->stride[0], g->sw = p->stride[1];
    g->ph = p->pad[0], g->pw = p->pad[1];
    g->dh = p->dilation[0], g->dw = p->dilation[1];
    if (g->C % g->G != 0 || g->O % g->G != 0 || w->shape[1] * g->G != g->C) {
        char bx[96], bw[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: input %s and weight %s do not fit groups=%lld", op,
                        kd_shape_str(x, bx, sizeof bx), kd_shape_str(w, bw, sizeof bw), (long long)g->G);
    }
    g->Cg = g->C / g->G, g->Og = g->O / g->G;
    g->OH = kd_conv_out_size(g->H, g->KH, g->sh, g->ph, g->dh);
    g->OW = kd_conv_out_size(g->W, g->KW, g->sw, g->pw, g->dw);
    if (g->OH < 1 || g->OW < 1) {
        char bx[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: input %s is smaller than the dilated %lldx%lld kernel", op,
                        kd_shape_str(x, bx, sizeof bx), (long long)g->KH, (long long)g->KW);
    }
    return ref_check_4d(y, g->N, g->O, g->OH, g->OW, op, "output");
}

/* y[n,o,oh,ow] = b[o] + sum_{c,kh,kw} w[o,c,kh,kw] * x[n, g*Cg+c, oh*sh-ph+kh*dh, ow*sw-pw+kw*dw],
 * where g = o / Og and out-of-range input positions read as zero. */
static kd_status ref_conv2d_forward(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                                    const kd_tensor *w, const kd_tensor *b, kd_tensor *y) {
    (void)be;
    ref_conv_geom g;
    KD_TRY(ref_conv_geometry(&g, p, x, w, y, "conv2d_forward"));
    if (b) KD_TRY(ref_check_vec(b, g.O, "conv2d_forward", "bias"));
    const float *xd = kd_f32(x), *wd = kd_f32(w), *bd = b ? kd_f32(b) : NULL;
    float *yd = kd_f32(y);

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < g.N; n++) {
        for (int64_t o = 0; o < g.O; o++) {
            int64_t grp = o / g.Og;
            const float *wo = wd + o * g.Cg * g.KH * g.KW;          /* (Cg, KH, KW) */
            const float *xn = xd + (n * g.C + grp * g.Cg) * g.H * g.W; /* (Cg, H, W) */
            float *yo = yd + (n * g.O + o) * g.OH * g.OW;            /* (OH, OW) */
            for (int64_t oh = 0; oh < g.OH; oh++) {
                for (int64_t ow = 0; ow < g.OW; ow++) {
                    double acc = bd ? (double)bd[o] : 0.0;
                    for (int64_t c = 0; c < g.Cg; c++) {
                        const float *xc = xn + c * g.H * g.W;
                        const float *wc = wo + c * g.KH * g.KW;
                        for (int64_t kh = 0; kh < g.KH; kh++) {
                            int64_t ih = oh * g.sh - g.ph + kh * g.dh;
                            if (ih < 0 || ih >= g.H) continue;
                            for (int64_t kw = 0; kw < g.KW; kw++) {
                                int64_t iw = ow * g.sw - g.pw + kw * g.dw;
                                if (iw < 0 || iw >= g.W) continue;
                                acc += (double)xc[ih * g.W + iw] * (double)wc[kh * g.KW + kw];
                            }
                        }
                    }
                    yo[oh * g.OW + ow] = (float)acc;
                }
            }
        }
    }
    return KD_OK;
}

/* dx[n,ci,ih,iw] = sum over the (o, kh, kw) whose window touches (ih, iw) of
 * dy[n,o,oh,ow] * w[o,c,kh,kw]. Written as a gather so that each dx element
 * is summed by one thread: oh = (ih + ph - kh*dh) / sh when that divides. */
static kd_status ref_conv2d_backward_data(kd_backend *be, const kd_conv2d_params *p,
                                          const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                          int accumulate) {
    (void)be;
    ref_conv_geom g;
    KD_TRY(ref_conv_geometry(&g, p, dx, w, dy, "conv2d_backward_data"));
    const float *dyd = kd_f32(dy), *wd = kd_f32(w);
    float *dxd = kd_f32(dx);

#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t n = 0; n < g.N; n++) {
        for (int64_t ci = 0; ci < g.C; ci++) {
            int64_t grp = ci / g.Cg, c = ci % g.Cg;
            float *dxc = dxd + (n * g.C + ci) * g.H * g.W; /* (H, W) */
            for (int64_t ih = 0; ih < g.H; ih++) {
                for (int64_t iw = 0; iw < g.W; iw++) {
                    double acc = 0.0;
                    for (int64_t og = 0; og < g.Og; og++) {
                        int64_t o = grp * g.Og + og;
                        const float *dyo = dyd + (n * g.O + o) * g.OH * g.OW; /* (OH, OW) */
                        const float *wc = wd + (o * g.Cg + c) * g.KH * g.KW;  /* (KH, KW) */
                        for (int64_t kh = 0; kh < g.KH; kh++) {
                            int64_t th = ih + g.ph - kh * g.dh;
                            if (th < 0 || th % g.sh != 0) continue;
                            int64_t oh = th / g.sh;
                            if (oh >= g.OH) continue;
                            for (int64_t kw = 0; kw < g.KW; kw++) {
                                int64_t tw = iw + g.pw - kw * g.dw;
                                if (tw < 0 || tw % g.sw != 0) continue;
                                int64_t ow = tw / g.sw;
                                if (ow >= g.OW) continue;
                                acc += (double)dyo[oh * g.OW + ow] * (double)wc[kh * g.KW + kw];
                            }
                        }
                    }
                    if (accumulate)
                        dxc[ih * g.W + iw] += (float)acc;
                    else
                        dxc[ih * g.W + iw] = (float)acc;
                }
            }
        }
    }
    return KD_OK;
}

/* dw[o,c,kh,kw] = sum_{n,oh,ow} dy[n,o,oh,ow] * x[n, g*Cg+c, oh*sh-ph+kh*dh, ow*sw-pw+kw*dw]
 * and db[o] = sum_{n,oh,ow} dy[n,o,oh,ow]; one output channel per iteration. */
static kd_status ref_conv2d_backward_weights(kd_backend *be, const kd_conv2d_params *p,
                                             const kd_tensor *dy, const kd_tensor *x, kd_tensor *dw,
                                             kd_tensor *db, int accumulate) {
    (void)be;
    ref_conv_geom g;
    KD_TRY(ref_conv_geometry(&g, p, x, dw, dy, "conv2d_backward_weights"));
    if (db) KD_TRY(ref_check_vec(db, g.O, "conv2d_backward_weights", "bias gradient"));
    const float *dyd = kd_f32(dy), *xd = kd_f32(x);
    float *dwd = kd_f32(dw), *dbd = db ? kd_f32(db) : NULL;

#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < g.O; o++) {
        int64_t grp = o / g.Og;
        float *dwo = dwd + o * g.Cg * g.KH * g.KW; /* (Cg, KH, KW) */
        for (int64_t c = 0; c < g.Cg; c++) {
            for (int64_t kh = 0; kh < g.KH; kh++) {
                for (int64_t kw = 0; kw < g.KW; kw++) {
                    double acc = 0.0;
                    for (int64_t n = 0; n < g.N; n++) {
                        const float *dyo = dyd + (n * g.O + o) * g.OH * g.OW;
                        const float *xc = xd + (n * g.C + grp * g.Cg + c) * g.H * g.W;
                        for (int64_t oh = 0; oh < g.OH; oh++) {
                            int64_t ih = oh * g.sh - g.ph + kh * g.dh;
                            if (ih < 0 || ih >= g.H) continue;
                            for (int64_t ow = 0; ow < g.OW; ow++) {
                                int64_t iw = ow * g.sw - g.pw + kw * g.dw;
                                if (iw < 0 || iw >= g.W) continue;
                                acc += (double)dyo[oh * g.OW + ow] * (double)xc[ih * g.W + iw];
                            }
                        }
                    }
                    float *dst = &dwo[(c * g.KH + kh) * g.KW + kw];
                    if (accumulate)
                        *dst += (float)acc;
                    else
                        *dst = (float)acc;
                }
            }
        }
        if (dbd) {
            double acc = 0.0;
            for (int64_t n = 0; n < g.N; n++) {
                const float *dyo = dyd + (n * g.O + o) * g.OH * g.OW;
                for (int64_t i = 0; i < g.OH * g.OW; i++) acc += (double)dyo[i];
            }
            if (accumulate)
                dbd[o] += (float)acc;
            else
                dbd[o] = (float)acc;
        }
    }
    return KD_OK;
}

/* ------------------------------------------------------------- batchnorm */

/* Views x (N, C, ...) as (N, C, S) with S the product of the trailing dims. */
static kd_status ref_bn_sizes(const kd_tensor *x, int64_t *N, int64_t *C, int64_t *S, const char *op) {
    KD_TRY(ref_check_f32(x, op, "input"));
    if (x->ndim < 2) {
        char buf[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: input %s must be (N, C) or (N, C, H, W)", op,
                        kd_shape_str(x, buf, sizeof buf));
    }
    *N = x->shape[0], *C = x->shape[1], *S = 1;
    for (int i = 2; i < x->ndim; i++) *S *= x->shape[i];
    return KD_OK;
}

/* Training: mean and biased variance over (N, S) per channel; y = (x - mean)
 * * rstd * gamma + beta with rstd = 1/sqrt(var + eps); running_mean and
 * running_var (either may be NULL, as with track_running_stats=False) move
 * toward the batch mean and the unbiased variance var * M / (M - 1).
 * Eval: the same formula with the running statistics; save_* (if given)
 * receive running_mean and 1/sqrt(running_var + eps). gamma/beta NULL mean
 * 1 and 0 (affine=False). */
static kd_status ref_batchnorm_forward(kd_backend *be, const kd_bn_params *p, const kd_tensor *x,
                                       const kd_tensor *gamma, const kd_tensor *beta,
                                       kd_tensor *running_mean, kd_tensor *running_var, kd_tensor *y,
                                       kd_tensor *save_mean, kd_tensor *save_rstd) {
    (void)be;
    const char *op = "batchnorm_forward";
    if (!p) return kd_error(KD_ERR_INVALID, "ref %s: params are NULL", op);
    int64_t N, C, S;
    KD_TRY(ref_bn_sizes(x, &N, &C, &S, op));
    KD_TRY(ref_check_f32(y, op, "output"));
    if (!kd_tensor_same_shape(x, y)) return kd_error(KD_ERR_SHAPE, "ref %s: output shape differs from input", op);
    if (gamma) KD_TRY(ref_check_vec(gamma, C, op, "gamma"));
    if (beta) KD_TRY(ref_check_vec(beta, C, op, "beta"));
    if (running_mean) KD_TRY(ref_check_vec(running_mean, C, op, "running_mean"));
    if (running_var) KD_TRY(ref_check_vec(running_var, C, op, "running_var"));
    if (save_mean) KD_TRY(ref_check_vec(save_mean, C, op, "save_mean"));
    if (save_rstd) KD_TRY(ref_check_vec(save_rstd, C, op, "save_rstd"));
    const int64_t M = N * S; /* values per channel */
    if (p->training) {
        if (M < 2)
            return kd_error(KD_ERR_SHAPE, "ref %s: training needs more than 1 value per channel, got %lld",
                            op, (long long)M);
        if (!save_mean || !save_rstd)
            return kd_error(KD_ERR_INVALID, "ref %s: training mode needs save_mean and save_rstd", op);
    } else if (!running_mean || !running_var) {
        return kd_error(KD_ERR_INVALID, "ref %s: eval mode needs running_mean and running_var", op);
    }
    const float *xd = kd_f32(x);
    const float *gd = gamma ? kd_f32(gamma) : NULL, *bd = beta ? kd_f32(beta) : NULL;
    float *rm = running_mean ? kd_f32(running_mean) : NULL;
    float *rv = running_var ? kd_f32(running_var) : NULL;
    float *sm = save_mean ? kd_f32(save_mean) : NULL, *sr = save_rstd ? kd_f32(save_rstd) : NULL;
    float *yd = kd_f32(y);
    const double eps = p->eps, mom = p->momentum;

#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double mean, rstd;
        if (p->training) {
            double sum = 0.0;
            for (int64_t n = 0; n < N; n++) {
                const float *xc = xd + (n * C + c) * S;
                for (int64_t s = 0; s < S; s++) sum += xc[s];
            }
            mean = sum / (double)M;
            double sq = 0.0;
            for (int64_t n = 0; n < N; n++) {
                const float *xc = xd + (n * C + c) * S;
                for (int64_t s = 0; s < S; s++) sq += (xc[s] - mean) * (xc[s] - mean);
            }
            double var = sq / (double)M;
            rstd = 1.0 / sqrt(var + eps);
            if (rm) rm[c] = (float)((1.0 - mom) * rm[c] + mom * mean);
            if (rv) rv[c] = (float)((1.0 - mom) * rv[c] + mom * var * (double)M / (double)(M - 1));
        } else {
            mean = rm[c];
            rstd = 1.0 / sqrt((double)rv[c] + eps);
        }
        if (sm) sm[c] = (float)mean;
        if (sr) sr[c] = (float)rstd;
        double gc = gd ? gd[c] : 1.0, bc = bd ? bd[c] : 0.0;
        for (int64_t n = 0; n < N; n++) {
            const float *xc = xd + (n * C + c) * S;
            float *yc = yd + (n * C + c) * S;
            for (int64_t s = 0; s < S; s++) yc[s] = (float)((xc[s] - mean) * rstd * gc + bc);
        }
    }
    return KD_OK;
}

/* With xhat = (x - mean) * rstd, M values per channel:
 *   dbeta = sum(dy), dgamma = sum(dy * xhat),
 *   training: dx = gamma * rstd * (dy - dbeta/M - xhat * dgamma/M),
 *   eval (p->training == 0; statistics are constants): dx = gamma * rstd * dy.
 * save_mean/save_rstd are what the forward pass wrote. dx, dgamma and dbeta
 * may each be NULL when that gradient is not wanted. */
static kd_status ref_batchnorm_backward(kd_backend *be, const kd_bn_params *p, const kd_tensor *dy,
                                        const kd_tensor *x, const kd_tensor *gamma,
                                        const kd_tensor *save_mean, const kd_tensor *save_rstd,
                                        kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta,
                                        int accumulate) {
    (void)be;
    const char *op = "batchnorm_backward";
    if (!p) return kd_error(KD_ERR_INVALID, "ref %s: params are NULL", op);
    int64_t N, C, S;
    KD_TRY(ref_bn_sizes(x, &N, &C, &S, op));
    KD_TRY(ref_check_f32(dy, op, "output gradient"));
    if (!kd_tensor_same_shape(x, dy))
        return kd_error(KD_ERR_SHAPE, "ref %s: output gradient shape differs from input", op);
    if (dx) {
        KD_TRY(ref_check_f32(dx, op, "input gradient"));
        if (!kd_tensor_same_shape(x, dx))
            return kd_error(KD_ERR_SHAPE, "ref %s: input gradient shape differs from input", op);
    }
    if (gamma) KD_TRY(ref_check_vec(gamma, C, op, "gamma"));
    KD_TRY(ref_check_vec(save_mean, C, op, "save_mean"));
    KD_TRY(ref_check_vec(save_rstd, C, op, "save_rstd"));
    if (dgamma) KD_TRY(ref_check_vec(dgamma, C, op, "gamma gradient"));
    if (dbeta) KD_TRY(ref_check_vec(dbeta, C, op, "beta gradient"));
    const int64_t M = N * S;
    const float *dyd = kd_f32(dy), *xd = kd_f32(x), *gd = gamma ? kd_f32(gamma) : NULL;
    const float *sm = kd_f32(save_mean), *sr = kd_f32(save_rstd);
    float *dxd = dx ? kd_f32(dx) : NULL;
    float *dgd = dgamma ? kd_f32(dgamma) : NULL, *dbd = dbeta ? kd_f32(dbeta) : NULL;

#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < C; c++) {
        const double mean = sm[c], rstd = sr[c];
        double sum_dy = 0.0, sum_dy_xhat = 0.0;
        for (int64_t n = 0; n < N; n++) {
            const float *dyc = dyd + (n * C + c) * S, *xc = xd + (n * C + c) * S;
            for (int64_t s = 0; s < S; s++) {
                sum_dy += dyc[s];
                sum_dy_xhat += dyc[s] * (xc[s] - mean) * rstd;
            }
        }
        if (dxd) {
            const double k = (gd ? gd[c] : 1.0) * rstd;
            for (int64_t n = 0; n < N; n++) {
                const float *dyc = dyd + (n * C + c) * S, *xc = xd + (n * C + c) * S;
                float *dxc = dxd + (n * C + c) * S;
                for (int64_t s = 0; s < S; s++) {
                    double v = dyc[s];
                    if (p->training) {
                        double xhat = (xc[s] - mean) * rstd;
                        v -= (sum_dy + xhat * sum_dy_xhat) / (double)M;
                    }
                    float r = (float)(k * v);
                    if (accumulate)
                        dxc[s] += r;
                    else
                        dxc[s] = r;
                }
            }
        }
        if (dgd) {
            if (accumulate)
                dgd[c] += (float)sum_dy_xhat;
            else
                dgd[c] = (float)sum_dy_xhat;
        }
        if (dbd) {
            if (accumulate)
                dbd[c] += (float)sum_dy;
            else
                dbd[c] = (float)sum_dy;
        }
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- pool2d */

/* Checks the pooling parameters (PyTorch's rules: padding at most half the
 * kernel) and that y-shaped tensor (N, C, OH, OW) fits x-shaped (N, C, H, W). */
static kd_status ref_pool_check(const kd_pool2d_params *p, const kd_tensor *x, const kd_tensor *y,
                                const char *op) {
    if (!p) return kd_error(KD_ERR_INVALID, "ref %s: params are NULL", op);
    if (p->kind != KD_POOL_MAX && p->kind != KD_POOL_AVG)
        return kd_error(KD_ERR_INVALID, "ref %s: unknown pooling kind %d", op, (int)p->kind);
    for (int i = 0; i < 2; i++) {
        if (p->kernel[i] < 1 || p->stride[i] < 1 || p->pad[i] < 0 || 2 * p->pad[i] > p->kernel[i])
            return kd_error(KD_ERR_INVALID,
                            "ref %s: bad parameters kernel (%lld, %lld) stride (%lld, %lld) pad (%lld, %lld); "
                            "padding must be at most half the kernel",
                            op, (long long)p->kernel[0], (long long)p->kernel[1], (long long)p->stride[0],
                            (long long)p->stride[1], (long long)p->pad[0], (long long)p->pad[1]);
    }
    KD_TRY(ref_check_f32(x, op, "input"));
    if (x->ndim != 4) {
        char buf[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: input %s must be (N, C, H, W)", op, kd_shape_str(x, buf, sizeof buf));
    }
    if (x->shape[2] * x->shape[3] > INT32_MAX)
        return kd_error(KD_ERR_SHAPE, "ref %s: a plane of %lld elements does not fit an int32 index", op,
                        (long long)(x->shape[2] * x->shape[3]));
    int64_t OH = kd_conv_out_size(x->shape[2], p->kernel[0], p->stride[0], p->pad[0], 1);
    int64_t OW = kd_conv_out_size(x->shape[3], p->kernel[1], p->stride[1], p->pad[1], 1);
    if (OH < 1 || OW < 1) {
        char buf[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: input %s is smaller than the %lldx%lld window", op,
                        kd_shape_str(x, buf, sizeof buf), (long long)p->kernel[0], (long long)p->kernel[1]);
    }
    return ref_check_4d(y, x->shape[0], x->shape[1], OH, OW, op, "output");
}

/* Checks that ws is an int32 contiguous tensor shaped like y. */
static kd_status ref_pool_check_ws(const kd_tensor *ws, const kd_tensor *y, const char *op) {
    if (!ws) return kd_error(KD_ERR_INVALID, "ref %s: max pooling needs the argmax workspace", op);
    if (ws->dtype != KD_I32 || !kd_tensor_is_contiguous(ws) || !kd_tensor_same_shape(ws, y))
        return kd_error(KD_ERR_INVALID, "ref %s: the workspace must be a contiguous I32 tensor shaped like the output", op);
    return KD_OK;
}

/* The window of output (oh, ow) clipped to the input, and the divisor of
 * average pooling as PyTorch computes it (the window clipped to the padded
 * input when count_include_pad, to the input otherwise). */
typedef struct {
    int64_t h0, h1, w0, w1; /* [h0, h1) x [w0, w1) inside the input */
    int64_t divisor;
} ref_window;

static ref_window ref_pool_window(const kd_pool2d_params *p, int64_t H, int64_t W, int64_t oh, int64_t ow) {
    ref_window r;
    int64_t hs = oh * p->stride[0] - p->pad[0], ws = ow * p->stride[1] - p->pad[1];
    int64_t he = hs + p->kernel[0], we = ws + p->kernel[1];
    if (he > H + p->pad[0]) he = H + p->pad[0];
    if (we > W + p->pad[1]) we = W + p->pad[1];
    int64_t padded_size = (he - hs) * (we - ws);
    r.h0 = hs < 0 ? 0 : hs;
    r.w0 = ws < 0 ? 0 : ws;
    r.h1 = he > H ? H : he;
    r.w1 = we > W ? W : we;
    r.divisor = p->count_include_pad ? padded_size : (r.h1 - r.h0) * (r.w1 - r.w0);
    return r;
}

/* Max: y = max over the in-bounds window (padding counts as -inf, so it is
 * never chosen), ws = flat h*W+w index of the first maximum; a NaN wins, as
 * in PyTorch. Avg: y = window sum / divisor. One (n, c) plane per iteration. */
static kd_status ref_pool2d_forward(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *x,
                                    kd_tensor *y, kd_tensor *ws) {
    (void)be;
    const char *op = "pool2d_forward";
    KD_TRY(ref_pool_check(p, x, y, op));
    if (p->kind == KD_POOL_MAX) KD_TRY(ref_pool_check_ws(ws, y, op));
    const int64_t P = x->shape[0] * x->shape[1], H = x->shape[2], W = x->shape[3];
    const int64_t OH = y->shape[2], OW = y->shape[3];
    const float *xd = kd_f32(x);
    float *yd = kd_f32(y);
    int32_t *wsd = (p->kind == KD_POOL_MAX) ? (int32_t *)ws->data : NULL;

#pragma omp parallel for schedule(static)
    for (int64_t pl = 0; pl < P; pl++) {
        const float *xp = xd + pl * H * W; /* (H, W) */
        float *yp = yd + pl * OH * OW;     /* (OH, OW) */
        for (int64_t oh = 0; oh < OH; oh++) {
            for (int64_t ow = 0; ow < OW; ow++) {
                ref_window r = ref_pool_window(p, H, W, oh, ow);
                if (p->kind == KD_POOL_MAX) {
                    float best = -INFINITY;
                    int64_t arg = -1;
                    for (int64_t ih = r.h0; ih < r.h1; ih++) {
                        for (int64_t iw = r.w0; iw < r.w1; iw++) {
                            float v = xp[ih * W + iw];
                            if (arg < 0 || v > best || isnan(v)) {
                                best = v;
                                arg = ih * W + iw;
                            }
                        }
                    }
                    yp[oh * OW + ow] = best;
                    wsd[pl * OH * OW + oh * OW + ow] = (int32_t)arg;
                } else {
                    double sum = 0.0;
                    for (int64_t ih = r.h0; ih < r.h1; ih++)
                        for (int64_t iw = r.w0; iw < r.w1; iw++) sum += xp[ih * W + iw];
                    yp[oh * OW + ow] = r.divisor > 0 ? (float)(sum / (double)r.divisor) : 0.0f;
                }
            }
        }
    }
    return KD_OK;
}

/* Max: dx[argmax] += dy. Avg: every in-bounds position of the window gets
 * dy / divisor. Overlapping windows add in a fixed order within a plane. */
static kd_status ref_pool2d_backward(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *dy,
                                     const kd_tensor *ws, kd_tensor *dx, int accumulate) {
    (void)be;
    const char *op = "pool2d_backward";
    KD_TRY(ref_pool_check(p, dx, dy, op));
    if (p->kind == KD_POOL_MAX) KD_TRY(ref_pool_check_ws(ws, dy, op));
    const int64_t P = dx->shape[0] * dx->shape[1], H = dx->shape[2], W = dx->shape[3];
    const int64_t OH = dy->shape[2], OW = dy->shape[3];
    const float *dyd = kd_f32(dy);
    const int32_t *wsd = (p->kind == KD_POOL_MAX) ? (const int32_t *)ws->data : NULL;
    float *dxd = kd_f32(dx);
    int64_t bad = 0;

#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t pl = 0; pl < P; pl++) {
        const float *dyp = dyd + pl * OH * OW; /* (OH, OW) */
        float *dxp = dxd + pl * H * W;         /* (H, W) */
        if (!accumulate) memset(dxp, 0, (size_t)(H * W) * sizeof *dxp);
        if (p->kind == KD_POOL_MAX) {
            const int32_t *wp = wsd + pl * OH * OW;
            for (int64_t i = 0; i < OH * OW; i++) {
                if (wp[i] >= 0 && wp[i] < H * W)
                    dxp[wp[i]] += dyp[i];
                else if (wp[i] != -1)
                    bad++;
            }
        } else {
            for (int64_t oh = 0; oh < OH; oh++) {
                for (int64_t ow = 0; ow < OW; ow++) {
                    ref_window r = ref_pool_window(p, H, W, oh, ow);
                    if (r.divisor <= 0) continue;
                    float gv = (float)((double)dyp[oh * OW + ow] / (double)r.divisor);
                    for (int64_t ih = r.h0; ih < r.h1; ih++)
                        for (int64_t iw = r.w0; iw < r.w1; iw++) dxp[ih * W + iw] += gv;
                }
            }
        }
    }
    if (bad)
        return kd_error(KD_ERR_INVALID, "ref %s: %lld argmax indices fall outside the %lldx%lld input plane",
                        op, (long long)bad, (long long)H, (long long)W);
    return KD_OK;
}

/* ------------------------------------------------------------------ gemm */

/* C (M, N) = alpha * op(A) @ op(B) + beta * C, row-major with leading
 * dimensions. When beta is 0, C is not read (so NaN there does not leak), as
 * in BLAS. */
static kd_status ref_gemm(kd_backend *be, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K,
                          float alpha, const float *A, int64_t lda, const float *B, int64_t ldb,
                          float beta, float *C, int64_t ldc) {
    (void)be;
    if (M < 0 || N < 0 || K < 0)
        return kd_error(KD_ERR_INVALID, "ref gemm: negative size M=%lld N=%lld K=%lld", (long long)M,
                        (long long)N, (long long)K);
    int64_t a_cols = trans_a ? M : K, b_cols = trans_b ? K : N;
    if (lda < (a_cols > 1 ? a_cols : 1) || ldb < (b_cols > 1 ? b_cols : 1) || ldc < (N > 1 ? N : 1))
        return kd_error(KD_ERR_INVALID, "ref gemm: leading dimensions lda=%lld ldb=%lld ldc=%lld are too small "
                        "for M=%lld N=%lld K=%lld", (long long)lda, (long long)ldb, (long long)ldc,
                        (long long)M, (long long)N, (long long)K);
    if (M == 0 || N == 0) return KD_OK;
    if (!C || (K > 0 && (!A || !B))) return kd_error(KD_ERR_INVALID, "ref gemm: NULL matrix pointer");

#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = 0; j < N; j++) {
            double acc = 0.0;
            for (int64_t k = 0; k < K; k++) {
                double a = trans_a ? A[k * lda + i] : A[i * lda + k];
                double b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
                acc += a * b;
            }
            double c = (double)alpha * acc;
            if (beta != 0.0f) c += (double)beta * C[i * ldc + j];
            C[i * ldc + j] = (float)c;
        }
    }
    return KD_OK;
}

/* Batched gemm: one ref_gemm per matrix, in order. */
static kd_status ref_gemm_batch(kd_backend *be, int64_t batch, int trans_a, int trans_b, int64_t M,
                                int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                                int64_t stride_a, const float *B, int64_t ldb, int64_t stride_b,
                                float beta, float *C, int64_t ldc, int64_t stride_c) {
    if (batch < 0)
        return kd_error(KD_ERR_INVALID, "ref gemm_batch: negative batch %lld", (long long)batch);
    for (int64_t i = 0; i < batch; i++)
        KD_TRY(ref_gemm(be, trans_a, trans_b, M, N, K, alpha, A ? A + i * stride_a : NULL, lda,
                        B ? B + i * stride_b : NULL, ldb, beta, C ? C + i * stride_c : NULL, ldc));
    return KD_OK;
}

/* ------------------------------------------------------------- layernorm */

/* x (..., D) as rows (R, D); checks the companions of a layernorm call. */
static kd_status ref_ln_check(const kd_tensor *x, const kd_tensor *other, const char *op,
                              const char *what, int64_t *R, int64_t *D) {
    KD_TRY(ref_check_f32(x, op, "input"));
    if (x->ndim < 1) return kd_error(KD_ERR_SHAPE, "ref %s: input needs at least one axis", op);
    *D = x->shape[x->ndim - 1];
    *R = *D ? kd_tensor_numel(x) / *D : 0;
    if (other) {
        KD_TRY(ref_check_f32(other, op, what));
        if (!kd_tensor_same_shape(x, other))
            return kd_error(KD_ERR_SHAPE, "ref %s: %s shape differs from the input", op, what);
    }
    return KD_OK;
}

/* Per row: mean and biased variance in double, rstd = 1/sqrt(var + eps),
 * y = (x - mean) * rstd * gamma + beta. */
static kd_status ref_layernorm_forward(kd_backend *be, float eps, const kd_tensor *x,
                                       const kd_tensor *gamma, const kd_tensor *beta, kd_tensor *y,
                                       kd_tensor *save_mean, kd_tensor *save_rstd) {
    (void)be;
    const char *op = "layernorm_forward";
    int64_t R, D;
    KD_TRY(ref_ln_check(x, y, op, "output", &R, &D));
    if (gamma) KD_TRY(ref_check_vec(gamma, D, op, "gamma"));
    if (beta) KD_TRY(ref_check_vec(beta, D, op, "beta"));
    if (save_mean) KD_TRY(ref_check_vec(save_mean, R, op, "save_mean"));
    if (save_rstd) KD_TRY(ref_check_vec(save_rstd, R, op, "save_rstd"));
    const float *xd = kd_f32(x), *gd = gamma ? kd_f32(gamma) : NULL, *bd = beta ? kd_f32(beta) : NULL;
    float *yd = kd_f32(y), *sm = save_mean ? kd_f32(save_mean) : NULL;
    float *sr = save_rstd ? kd_f32(save_rstd) : NULL;

#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *xr = xd + r * D;
        float *yr = yd + r * D;
        double sum = 0.0, sq = 0.0;
        for (int64_t d = 0; d < D; d++) sum += xr[d];
        const double mean = sum / (double)D;
        for (int64_t d = 0; d < D; d++) sq += (xr[d] - mean) * (xr[d] - mean);
        const double rstd = 1.0 / sqrt(sq / (double)D + (double)eps);
        for (int64_t d = 0; d < D; d++)
            yr[d] = (float)((xr[d] - mean) * rstd * (gd ? gd[d] : 1.0) + (bd ? bd[d] : 0.0));
        if (sm) sm[r] = (float)mean;
        if (sr) sr[r] = (float)rstd;
    }
    return KD_OK;
}

static kd_status ref_layernorm_backward(kd_backend *be, float eps, const kd_tensor *dy,
                                        const kd_tensor *x, const kd_tensor *gamma,
                                        const kd_tensor *save_mean, const kd_tensor *save_rstd,
                                        kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta,
                                        int accumulate) {
    (void)be;
    (void)eps;
    const char *op = "layernorm_backward";
    int64_t R, D;
    KD_TRY(ref_ln_check(x, dy, op, "output gradient", &R, &D));
    if (dx) KD_TRY(ref_ln_check(x, dx, op, "input gradient", &R, &D));
    if (gamma) KD_TRY(ref_check_vec(gamma, D, op, "gamma"));
    KD_TRY(ref_check_vec(save_mean, R, op, "save_mean"));
    KD_TRY(ref_check_vec(save_rstd, R, op, "save_rstd"));
    if (dgamma) KD_TRY(ref_check_vec(dgamma, D, op, "gamma gradient"));
    if (dbeta) KD_TRY(ref_check_vec(dbeta, D, op, "beta gradient"));
    const float *dyd = kd_f32(dy), *xd = kd_f32(x), *gd = gamma ? kd_f32(gamma) : NULL;
    const float *sm = kd_f32(save_mean), *sr = kd_f32(save_rstd);

    if (dx) {
        float *dxd = kd_f32(dx);
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const float *dyr = dyd + r * D, *xr = xd + r * D;
            float *dxr = dxd + r * D;
            const double mean = sm[r], rstd = sr[r];
            double s1 = 0.0, s2 = 0.0; /* sum(g), sum(g * xhat) */
            for (int64_t d = 0; d < D; d++) {
                double gv = (double)dyr[d] * (gd ? gd[d] : 1.0);
                s1 += gv;
                s2 += gv * (xr[d] - mean) * rstd;
            }
            for (int64_t d = 0; d < D; d++) {
                double gv = (double)dyr[d] * (gd ? gd[d] : 1.0);
                double xhat = (xr[d] - mean) * rstd;
                float v = (float)(rstd * (gv - s1 / (double)D - xhat * s2 / (double)D));
                dxr[d] = accumulate ? dxr[d] + v : v;
            }
        }
    }
    if (dgamma || dbeta) {
        float *dgd = dgamma ? kd_f32(dgamma) : NULL, *dbd = dbeta ? kd_f32(dbeta) : NULL;
#pragma omp parallel for schedule(static)
        for (int64_t d = 0; d < D; d++) {
            double sg = 0.0, sb = 0.0;
            for (int64_t r = 0; r < R; r++) {
                double v = dyd[r * D + d];
                sg += v * (xd[r * D + d] - (double)sm[r]) * (double)sr[r];
                sb += v;
            }
            if (dgd) dgd[d] = accumulate ? dgd[d] + (float)sg : (float)sg;
            if (dbd) dbd[d] = accumulate ? dbd[d] + (float)sb : (float)sb;
        }
    }
    return KD_OK;
}

/* --------------------------------------------------------------- softmax */

/* Rows of the last axis; checks that b has a's shape. */
static kd_status ref_rows(const kd_tensor *a, const kd_tensor *b, const char *op, const char *wa,
                          const char *wb, int64_t *R, int64_t *C) {
    KD_TRY(ref_check_f32(a, op, wa));
    KD_TRY(ref_check_f32(b, op, wb));
    if (a->ndim < 1 || !kd_tensor_same_shape(a, b))
        return kd_error(KD_ERR_SHAPE, "ref %s: %s and %s need one shape with at least one axis",
                        op, wa, wb);
    *C = a->shape[a->ndim - 1];
    *R = *C ? kd_tensor_numel(a) / *C : 0;
    return KD_OK;
}

/* Per row: l = max + log(sum(exp(x - max))) with the sum in double, then
 * y = expf(x - l). */
static kd_status ref_softmax_forward(kd_backend *be, const kd_tensor *x, kd_tensor *y) {
    (void)be;
    int64_t R, C;
    KD_TRY(ref_rows(x, y, "softmax_forward", "input", "output", &R, &C));
    const float *xd = kd_f32(x);
    float *yd = kd_f32(y);
#pragma omp parallel for schedule(static) if (R * C >= 32768)
    for (int64_t r = 0; r < R; r++) {
        const float *xr = xd + r * C;
        float *yr = yd + r * C;
        float m = -INFINITY;
        for (int64_t c = 0; c < C; c++) m = xr[c] > m ? xr[c] : m;
        float l = m;
        if (m != -INFINITY) {
            double s = 0;
            for (int64_t c = 0; c < C; c++) s += exp((double)(xr[c] - m));
            l = m + (float)log(s);
        }
        for (int64_t c = 0; c < C; c++) yr[c] = expf(xr[c] - l);
    }
    return KD_OK;
}

/* dx = y * (dy - sum(y * dy)), the row sum in double. */
static kd_status ref_softmax_backward(kd_backend *be, const kd_tensor *y, const kd_tensor *dy,
                                      kd_tensor *dx, int accumulate) {
    (void)be;
    int64_t R, C;
    KD_TRY(ref_rows(y, dy, "softmax_backward", "output", "output gradient", &R, &C));
    KD_TRY(ref_rows(y, dx, "softmax_backward", "output", "input gradient", &R, &C));
    const float *yd = kd_f32(y), *gd = kd_f32(dy);
    float *d = kd_f32(dx);
#pragma omp parallel for schedule(static) if (R * C >= 32768)
    for (int64_t r = 0; r < R; r++) {
        const float *yr = yd + r * C, *gr = gd + r * C;
        float *dr = d + r * C;
        double s = 0;
        for (int64_t c = 0; c < C; c++) s += (double)yr[c] * gr[c];
        for (int64_t c = 0; c < C; c++) {
            float v = yr[c] * (gr[c] - (float)s);
            dr[c] = accumulate ? dr[c] + v : v;
        }
    }
    return KD_OK;
}

/* --------------------------------------------------------------- eltwise */

static kd_status ref_eltwise_check(kd_eltwise_kind kind, const kd_tensor *a, const kd_tensor *b,
                                   const char *op, const char *wa, const char *wb) {
    if ((int)kind < 0 || kind >= KD_ELTWISE_COUNT)
        return kd_error(KD_ERR_INVALID, "ref %s: unknown eltwise kind %d", op, (int)kind);
    KD_TRY(ref_check_f32(a, op, wa));
    KD_TRY(ref_check_f32(b, op, wb));
    if (kd_tensor_numel(a) != kd_tensor_numel(b)) {
        char ba[96], bb[96];
        return kd_error(KD_ERR_SHAPE, "ref %s: %s %s and %s %s differ in size", op, wa,
                        kd_shape_str(a, ba, sizeof ba), wb, kd_shape_str(b, bb, sizeof bb));
    }
    return KD_OK;
}

/* RELU: y = x > 0 ? x : alpha * x. EXP: y = exp(x). LOG: y = log(x).
 * GELU: y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), in double. */
static kd_status ref_eltwise_forward(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                     const kd_tensor *x, kd_tensor *y) {
    (void)be;
    KD_TRY(ref_eltwise_check(kind, x, y, "eltwise_forward", "input", "output"));
    const int64_t n = kd_tensor_numel(x);
    const float *xd = kd_f32(x);
    float *yd = kd_f32(y);

#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float v = xd[i];
        switch (kind) {
        case KD_ELTWISE_RELU: yd[i] = v > 0.0f ? v : alpha * v; break;
        case KD_ELTWISE_EXP: yd[i] = expf(v); break;
        case KD_ELTWISE_LOG: yd[i] = logf(v); break;
        case KD_ELTWISE_GELU: yd[i] = (float)(0.5 * v * (1.0 + erf(v * M_SQRT1_2))); break;
        default: break;
        }
    }
    return KD_OK;
}

/* RELU: dx = dy * (src > 0 ? 1 : alpha), src = x (or y when alpha >= 0: same
 * sign). EXP: dx = dy * y, src = y.
 * LOG: dx = dy / x, src = x. GELU: dx = dy * (Phi(x) + x * phi(x)), src = x. */
static kd_status ref_eltwise_backward(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                      const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                      int accumulate) {
    (void)be;
    KD_TRY(ref_eltwise_check(kind, dy, src, "eltwise_backward", "output gradient", "source"));
    KD_TRY(ref_eltwise_check(kind, dy, dx, "eltwise_backward", "output gradient", "input gradient"));
    const int64_t n = kd_tensor_numel(dy);
    const float *dyd = kd_f32(dy), *sd = kd_f32(src);
    float *dxd = kd_f32(dx);

#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = 0.0f;
        switch (kind) {
        case KD_ELTWISE_RELU: g = sd[i] > 0.0f ? dyd[i] : alpha * dyd[i]; break;
        case KD_ELTWISE_EXP: g = dyd[i] * sd[i]; break;
        case KD_ELTWISE_LOG: g = dyd[i] / sd[i]; break;
        case KD_ELTWISE_GELU: {
            /* d/dx x * Phi(x) = Phi(x) + x * phi(x) */
            double v = sd[i];
            double dphi = 0.5 * (1.0 + erf(v * M_SQRT1_2)) + v * exp(-0.5 * v * v) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
            g = (float)(dyd[i] * dphi);
            break;
        }
        default: break;
        }
        if (accumulate)
            dxd[i] += g;
        else
            dxd[i] = g;
    }
    return KD_OK;
}

/* ------------------------------------------------------------------ misc */

/* The ref backend caches nothing. */
static void ref_trim(kd_backend *be) { (void)be; }

static kd_backend ref_backend = {
    .name = "ref",
    .device = KD_DEVICE_CPU,
    .blocked_channels = 0, /* plain tensors only */
    .conv2d_forward = ref_conv2d_forward,
    .conv2d_backward_data = ref_conv2d_backward_data,
    .conv2d_backward_weights = ref_conv2d_backward_weights,
    .batchnorm_forward = ref_batchnorm_forward,
    .batchnorm_backward = ref_batchnorm_backward,
    .pool2d_forward = ref_pool2d_forward,
    .pool2d_backward = ref_pool2d_backward,
    .gemm = ref_gemm,
    .gemm_batch = ref_gemm_batch,
    .layernorm_forward = ref_layernorm_forward,
    .layernorm_backward = ref_layernorm_backward,
    .softmax_forward = ref_softmax_forward,
    .softmax_backward = ref_softmax_backward,
    .eltwise_forward = ref_eltwise_forward,
    .eltwise_backward = ref_eltwise_backward,
    .trim = ref_trim,
    .impl = NULL,
};

kd_backend *kd__backend_ref(void) { return &ref_backend; }
