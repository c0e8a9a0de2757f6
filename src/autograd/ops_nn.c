/*
 * ops_nn.c: the ops that run on the backend's kernels: conv2d, batch norm,
 * linear, matmul, ReLU / leaky ReLU, exp, log, 2-d pooling; plus global
 * average pooling in plain C. Each forward checks shapes (the kernels assume
 * them), runs the kernel and records a node; each backward rule calls the
 * backend's backward kernel with the accumulate flag of the gradient buffer.
 */
#include "autograd/autograd_impl.h"

#include <math.h>
#include <string.h>

#define SHP(t, buf) kd_shape_str((t), (buf), sizeof(buf))

/* ------------------------------------------------------------- conv2d */

kd_tensor *kd_conv2d(kd_graph *g, kd_tensor *x, kd_tensor *w, kd_tensor *b,
                     const kd_conv2d_params *p) {
    kd_tensor *in[3] = {x, w, b};
    char bx[96], bw[96];
    if (!g || !kd__ok_inputs(g, "conv2d", 2, in)) return NULL;
    if (!p) return kd__fail(g, kd_error(KD_ERR_INVALID, "conv2d: params are NULL"));
    if (!kd__check_act(g, "conv2d", "input", x) || !kd__check_f32(g, "conv2d", "weight", w) ||
        (b && !kd__check_f32(g, "conv2d", "bias", b)))
        return NULL;
    if (x->ndim != 4)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "conv2d: input %s must be 4-d (N, C, H, W)",
                                    SHP(x, bx)));
    if (w->ndim != 4)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "conv2d: weight %s must be 4-d "
                                                  "(O, C/groups, KH, KW)", SHP(w, bw)));
    if (p->groups < 1 || p->stride[0] < 1 || p->stride[1] < 1 || p->dilation[0] < 1 ||
        p->dilation[1] < 1 || p->pad[0] < 0 || p->pad[1] < 0)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "conv2d: invalid params (stride %lldx%lld, "
                                                    "pad %lldx%lld, dilation %lldx%lld, groups "
                                                    "%lld)",
                                    (long long)p->stride[0], (long long)p->stride[1],
                                    (long long)p->pad[0], (long long)p->pad[1],
                                    (long long)p->dilation[0], (long long)p->dilation[1],
                                    (long long)p->groups));
    int64_t N = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    int64_t O = w->shape[0], KH = w->shape[2], KW = w->shape[3];
    if (w->shape[1] * p->groups != C)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "conv2d: input %s has %lld channels but weight "
                                                  "%s expects %lld (%lld per group x %lld groups)",
                                    SHP(x, bx), (long long)C, SHP(w, bw),
                                    (long long)(w->shape[1] * p->groups),
                                    (long long)w->shape[1], (long long)p->groups));
    if (O % p->groups)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "conv2d: weight %s has %lld output channels, "
                                                  "not a multiple of %lld groups",
                                    SHP(w, bw), (long long)O, (long long)p->groups));
    if (b && (b->ndim != 1 || b->shape[0] != O))
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "conv2d: bias %s does not match weight %s "
                                                  "(expected (%lld))",
                                    SHP(b, bx), SHP(w, bw), (long long)O));
    int64_t OH = kd_conv_out_size(H, KH, p->stride[0], p->pad[0], p->dilation[0]);
    int64_t OW = kd_conv_out_size(W, KW, p->stride[1], p->pad[1], p->dilation[1]);
    if (OH <= 0 || OW <= 0)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "conv2d: input %s is too small for weight %s "
                                                  "with pad %lldx%lld and dilation %lldx%lld",
                                    SHP(x, bx), SHP(w, bw), (long long)p->pad[0],
                                    (long long)p->pad[1], (long long)p->dilation[0],
                                    (long long)p->dilation[1]));
    /* Layout: a blocked output when the graph allows it and every group is
     * whole channel blocks (or depthwise); the input may be either then.
     * Otherwise both are plain. */
    int64_t G = p->groups;
    int blk = kd__blocked_ok(g, O) &&
              (G == 1 || (G == C && G == O) ||
               ((C / G) % KD_LAYOUT_BLOCK == 0 && (O / G) % KD_LAYOUT_BLOCK == 0));
    if (!blk && kd__packed(x)) {
        if (!(x = in[0] = kd__to_strided(g, x))) return NULL;
    }
    /* The output's layout: NCHW16C, or NHWC for a bf16 graph whose bf16
     * activations are NHWC (then the input goes NHWC too, whatever it was:
     * oneDNN has no JIT kernel between plain and channels-last). */
    kd_layout lay = blk ? KD_LAYOUT_NCHW16C : KD_LAYOUT_STRIDED;
    if (blk && g->conv_bf16 && g->bf16_layout == KD_LAYOUT_NHWC) {
        lay = KD_LAYOUT_NHWC;
        if (!(x = in[0] = kd__to_layout(g, x, KD_LAYOUT_NHWC))) return NULL;
    }
    /* A plain input of whole channel blocks feeding a blocked output is
     * reordered first: oneDNN 2.6 has no JIT kernel for plain-to-blocked
     * convolutions beyond the few input channels of a stem, and its reference
     * kernel takes seconds (a 1x1 convolution on a plain feature map handed
     * to a distillation regressor). */
    if (lay == KD_LAYOUT_NCHW16C && kd__packed(x) && !kd__blocked(x)) {
        if (!(x = in[0] = kd__to_strided(g, x))) return NULL;
    }
    if (lay == KD_LAYOUT_NCHW16C && !kd__blocked(x) && C % KD_LAYOUT_BLOCK == 0) {
        if (!(x = in[0] = kd_graph_to_blocked(g, x))) return NULL;
    } else if (lay == KD_LAYOUT_NCHW16C && !kd__blocked(x) && C > 8) {
        blk = 0; /* plain to plain (oneDNN's GEMM convolution), not its reference kernel */
        lay = KD_LAYOUT_STRIDED;
    }
    kd_conv2d_params pc = *p;
    /* bf16 precision: every convolution but those reading fewer than
     * KD_LAYOUT_BLOCK channels, the stems on 1- or 3-channel images, which
     * stay float32: raw pixels lose most to rounding (Fashion-MNIST resnet8,
     * 3 epochs, 3 seeds: training -0.54 -> -0.38 and KD -0.23 -> +0.07
     * points from float32; docs/RESULTS.md), and they are a few percent of
     * the work. In a bf16 graph every blocked output, a stem's included,
     * is a bf16 activation (half the bytes kept for the backward). */
    pc.bf16 = g->conv_bf16 && C >= KD_LAYOUT_BLOCK;
    int64_t ys[4] = {N, O, OH, OW};
    kd_tensor *y = kd__new_lay(g, g->conv_bf16 && blk ? KD_BF16 : KD_F32, 4, ys, lay);
    if (!y) return NULL;
    kd_status s = g->be->conv2d_forward(g->be, &pc, x, w, b, y);
    if (s != KD_OK) return kd__fail(g, s);
    kd__node *n = kd__record(g, KD_OP_CONV2D, y, 3, in);
    if (n) n->p.conv = pc;
    return g->status == KD_OK ? y : NULL;
}

/* db (O) (+)= sum of dy (N, O, HW) over N and HW; dy in `lay`. */
static void kd__bias_grad_nchw(float *db, const float *dy, int64_t N, int64_t O, int64_t HW,
                               int acc, kd_layout lay) {
#pragma omp parallel for schedule(static) if (N * O * HW >= KD__PAR_MIN)
    for (int64_t o = 0; o < O; o++) {
        double s = 0;
        for (int64_t i = 0; i < N; i++) {
            if (lay != KD_LAYOUT_STRIDED) {
                for (int64_t j = 0; j < HW; j++) s += dy[kd_layout_offset(lay, i, o, j, O, HW)];
                continue;
            }
            const float *p = dy + (i * O + o) * HW;
            for (int64_t j = 0; j < HW; j++) s += p[j];
        }
        db[o] = acc ? db[o] + (float)s : (float)s;
    }
}

kd_status kd__conv2d_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *w = n->in[1], *b = n->in[2], *dy = n->out->grad;
    kd_backend *be = g->be;
    int acc;
    if (kd__needs_grad(g, x)) {
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        KD_TRY(be->conv2d_backward_data(be, &n->p.conv, dy, w, dx, acc));
    }
    int nw = kd__needs_grad(g, w), nb = b && kd__needs_grad(g, b);
    if (nw) {
        kd_tensor *ts[2] = {w, nb ? b : NULL}, *ds[2];
        acc = kd__grads_common(g, 2, ts, ds);
        if (acc < 0) return g->status;
        KD_TRY(be->conv2d_backward_weights(be, &n->p.conv, dy, x, ds[0], ds[1], acc));
    } else if (nb) {
        kd_tensor *db = kd__grad(g, b, &acc);
        if (!db) return g->status;
        kd__bias_grad_nchw(kd_f32(db), kd_f32(dy), dy->shape[0], dy->shape[1],
                           dy->shape[2] * dy->shape[3], acc, dy->layout);
    }
    return KD_OK;
}

/* ---------------------------------------------------------- batchnorm */

/* A (N, C, L) tensor seen as (N, C, L, 1), which the backend accepts. */
static kd_tensor kd__view4d(const kd_tensor *t) {
    kd_tensor v = *t;
    int64_t s[4] = {t->shape[0], t->shape[1], t->shape[2], 1};
    kd_tensor_set_shape(&v, 4, s);
    return v;
}

static int kd__check_vec(kd_graph *g, const char *what, const kd_tensor *t, int64_t C,
                         const kd_tensor *x) {
    char bt[96], bx[96];
    if (!t) return 1;
    if (!kd__check_f32(g, "batchnorm", what, t)) return 0;
    if (t->ndim != 1 || t->shape[0] != C) {
        kd__fail(g, kd_error(KD_ERR_SHAPE, "batchnorm: %s %s does not match input %s with %lld "
                                           "channels", what, SHP(t, bt), SHP(x, bx),
                             (long long)C));
        return 0;
    }
    return 1;
}

static kd_tensor *kd__filled(kd_graph *g, int64_t C, float v) {
    kd_tensor *t = kd__new(g, KD_F32, 1, &C);
    if (t)
        for (int64_t i = 0; i < C; i++) kd_f32(t)[i] = v;
    return t;
}

void kd_graph_set_sync_bn(kd_graph *g, kd_sum_fn sum, void *user, double grad_scale) {
    g->bn_sum = sum;
    g->bn_sum_user = user;
    g->bn_scale = grad_scale;
}

/* Training-mode forward with the statistics of the global batch (x in any
 * layout kd_layout_offset knows): per-channel sums and the count summed over
 * the processes, then the squared deviations from the global mean; the
 * arithmetic of the ref kernel (double sums, biased variance to normalise,
 * unbiased for the running update). *count: values per channel in all. */
static kd_status kd__bn_sync_forward(kd_graph *g, const kd_bn_params *p, const kd_tensor *x,
                                     const kd_tensor *gamma, const kd_tensor *beta, kd_tensor *running_mean,
                                     kd_tensor *running_var, kd_tensor *y, kd_tensor *save_mean,
                                     kd_tensor *save_rstd, double *count) {
    const int64_t N = x->shape[0], C = x->shape[1], S = kd_tensor_numel(x) / (N * C);
    const kd_layout lay = x->layout;
    const int64_t step = lay == KD_LAYOUT_NCHW16C ? KD_LAYOUT_BLOCK : lay == KD_LAYOUT_NHWC ? C : 1;
    double *buf = kd__scratch(g, (size_t)(C + 1) * sizeof *buf), *mean = kd__scratch(g, (size_t)C * sizeof *mean);
    if (!buf || !mean) return g->status ? g->status : kd_error(KD_ERR_NOMEM, "batchnorm: out of memory");
    const float *xd = kd_f32(x);
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        double sum = 0.0;
        for (int64_t i = 0; i < N; i++) {
            const float *xc = xd + kd_layout_offset(lay, i, c, 0, C, S);
            for (int64_t j = 0; j < S; j++) sum += xc[j * step];
        }
        buf[c] = sum;
    }
    buf[C] = (double)(N * S);
    KD_TRY(g->bn_sum(buf, C + 1, g->bn_sum_user));
    const double M = buf[C];
    if (M < 2)
        return kd_error(KD_ERR_SHAPE, "batchnorm: synchronised training needs more than 1 value per channel, got %g", M);
    for (int64_t c = 0; c < C; c++) mean[c] = buf[c] / M;
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        double sq = 0.0;
        for (int64_t i = 0; i < N; i++) {
            const float *xc = xd + kd_layout_offset(lay, i, c, 0, C, S);
            for (int64_t j = 0; j < S; j++) sq += (xc[j * step] - mean[c]) * (xc[j * step] - mean[c]);
        }
        buf[c] = sq;
    }
    KD_TRY(g->bn_sum(buf, C, g->bn_sum_user));
    const float *gd = kd_f32(gamma), *bd = kd_f32(beta);
    float *rm = kd_f32(running_mean), *rv = kd_f32(running_var), *yd = kd_f32(y);
    float *sm = kd_f32(save_mean), *sr = kd_f32(save_rstd);
    const double eps = p->eps, mom = p->momentum;
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        const double var = buf[c] / M, rstd = 1.0 / sqrt(var + eps), mu = mean[c];
        rm[c] = (float)((1.0 - mom) * rm[c] + mom * mu);
        rv[c] = (float)((1.0 - mom) * rv[c] + mom * var * M / (M - 1));
        sm[c] = (float)mu;
        sr[c] = (float)rstd;
        const double gc = gd[c], bc = bd[c];
        for (int64_t i = 0; i < N; i++) {
            const int64_t o = kd_layout_offset(lay, i, c, 0, C, S);
            for (int64_t j = 0; j < S; j++)
                yd[o + j * step] = (float)((xd[o + j * step] - mu) * rstd * gc + bc);
        }
    }
    *count = M;
    return KD_OK;
}

kd_tensor *kd_batchnorm(kd_graph *g, kd_tensor *x, kd_tensor *gamma, kd_tensor *beta,
                        kd_tensor *running_mean, kd_tensor *running_var, const kd_bn_params *p) {
    kd_tensor *in[3] = {x, gamma, beta};
    char bx[96];
    if (!g || !kd__ok_inputs(g, "batchnorm", 1, in)) return NULL;
    if (!p) return kd__fail(g, kd_error(KD_ERR_INVALID, "batchnorm: params are NULL"));
    /* A bf16 activation stays bf16 through a training-mode batch norm and
     * through forwards that record nothing (a teacher); the others (eval
     * mode with gradients, whose rule reads x as float32, synchronised
     * statistics) widen it first. */
    if (kd__bf16_act(x) && ((p->training && g->bn_sum) || (!p->training && g->grad_enabled))) {
        if (!(x = in[0] = kd__to_f32(g, x))) return NULL;
    }
    if (!kd__check_act(g, "batchnorm", "input", x)) return NULL;
    if (x->ndim < 2 || x->ndim > 4)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "batchnorm: input %s must be (N, C), "
                                                  "(N, C, L) or (N, C, H, W)", SHP(x, bx)));
    int64_t C = x->shape[1];
    if (!kd__check_vec(g, "weight", gamma, C, x) || !kd__check_vec(g, "bias", beta, C, x) ||
        !kd__check_vec(g, "running_mean", running_mean, C, x) ||
        !kd__check_vec(g, "running_var", running_var, C, x))
        return NULL;
    if (p->training && kd_tensor_numel(x) / C <= 1)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "batchnorm: training needs more than one "
                                                  "value per channel, input is %s",
                                    SHP(x, bx)));
    if (!p->training && (!running_mean || !running_var))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "batchnorm: eval mode needs running "
                                                    "statistics"));
    /* Absent affine parameters or running statistics become constants. */
    kd_tensor *gm = gamma ? gamma : kd__filled(g, C, 1.0f);
    kd_tensor *bt = beta ? beta : kd__filled(g, C, 0.0f);
    kd_tensor *rm = running_mean ? running_mean : kd__filled(g, C, 0.0f);
    kd_tensor *rv = running_var ? running_var : kd__filled(g, C, 1.0f);
    kd_tensor *y = kd__new_lay(g, x->dtype, x->ndim, x->shape, x->layout);
    kd_tensor *smean = kd__new(g, KD_F32, 1, &C), *srstd = kd__new(g, KD_F32, 1, &C);
    if (!gm || !bt || !rm || !rv || !y || !smean || !srstd) return NULL;
    int view = x->ndim == 3;
    kd_tensor xv = view ? kd__view4d(x) : *x, yv = view ? kd__view4d(y) : *y;
    const int sync = p->training && g->bn_sum;
    double count = 0;
    kd_status s = sync ? kd__bn_sync_forward(g, p, x, gm, bt, rm, rv, y, smean, srstd, &count)
                       : g->be->batchnorm_forward(g->be, p, &xv, gm, bt, rm, rv, &yv,
                                                  p->training ? smean : NULL,
                                                  p->training ? srstd : NULL);
    if (s != KD_OK) return kd__fail(g, s);
    kd__node *n = kd__record(g, KD_OP_BATCHNORM, y, 3, in);
    if (n) {
        n->in[1] = gm; /* the backward rule needs gamma even when it is a constant */
        n->p.bn.p = *p;
        n->p.bn.view4d = view;
        n->p.bn.sync = sync;
        n->p.bn.count = count;
        n->p.bn.scale = g->bn_scale;
        n->saved[0] = smean;
        n->saved[1] = srstd;
        if (!p->training) {
            for (int64_t c = 0; c < C; c++) {
                kd_f32(smean)[c] = kd_f32(rm)[c];
                kd_f32(srstd)[c] = 1.0f / sqrtf(kd_f32(rv)[c] + p->eps);
            }
        }
    }
    return g->status == KD_OK ? y : NULL;
}

/* Eval mode: y = (x - mean) * rstd * gamma + beta with constant statistics.
 * Every tensor in `lay` (element (n, c, j) at kd_layout_offset). */
static void kd__bn_eval_backward(const float *dy, const float *x, const float *mean,
                                 const float *rstd, const float *gamma, float *dx, float *dgamma,
                                 float *dbeta, int64_t N, int64_t C, int64_t S, int acc,
                                 kd_layout lay) {
    int64_t step = lay == KD_LAYOUT_NCHW16C ? KD_LAYOUT_BLOCK : lay == KD_LAYOUT_NHWC ? C : 1;
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        double sg = 0, sb = 0;
        float k = gamma[c] * rstd[c];
        for (int64_t i = 0; i < N; i++) {
            int64_t o = kd_layout_offset(lay, i, c, 0, C, S);
            for (int64_t jj = 0; jj < S; jj++) {
                int64_t j = jj * step;
                float d = dy[o + j];
                sb += d;
                sg += (double)d * (x[o + j] - mean[c]) * rstd[c];
                if (dx) dx[o + j] = acc ? dx[o + j] + d * k : d * k;
            }
        }
        if (dgamma) dgamma[c] = acc ? dgamma[c] + (float)sg : (float)sg;
        if (dbeta) dbeta[c] = acc ? dbeta[c] + (float)sb : (float)sb;
    }
}

/* Training-mode backward when x's gradient is still empty (the usual case: a
 * conv output feeds only its batch norm). dgamma and dbeta are leaves that
 * always accumulate; one kernel call with a single accumulate flag would
 * zero dx and then add into it through a scratch pass. Instead the kernel
 * overwrites dx and writes dgamma/dbeta into C-sized temporaries, which are
 * then added into the leaves' gradients. */
static kd_status kd__batchnorm_backward_fresh(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *gamma = n->in[1], *beta = n->in[2], *dy = n->out->grad;
    int acc;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t C = x->shape[1];
    int ng = gamma && kd__needs_grad(g, gamma), nb = beta && kd__needs_grad(g, beta);
    kd_tensor *tg = ng ? kd__new(g, KD_F32, 1, &C) : NULL, *tb = nb ? kd__new(g, KD_F32, 1, &C) : NULL;
    if ((ng && !tg) || (nb && !tb)) return g->status;
    int view = n->p.bn.view4d;
    kd_tensor dyv = view ? kd__view4d(dy) : *dy, xv = view ? kd__view4d(x) : *x;
    kd_tensor dxv = view ? kd__view4d(dx) : *dx;
    KD_TRY(g->be->batchnorm_backward(g->be, &n->p.bn.p, &dyv, &xv, gamma, n->saved[0], n->saved[1],
                                     &dxv, tg, tb, acc));
    kd_tensor *pairs[2][2] = {{gamma, tg}, {beta, tb}};
    for (int i = 0; i < 2; i++) {
        if (!pairs[i][1]) continue;
        kd_tensor *d = kd__grad_acc(g, pairs[i][0]);
        if (!d) return g->status;
        kd__axpy(kd_f32(d), kd_f32(pairs[i][1]), 1.0f, C, 1);
    }
    return KD_OK;
}

/* Training-mode backward of a synchronised batch norm: this process's sums
 * of dy and dy * xhat per channel, scaled by its grad_scale and summed over
 * the processes (G1, G2: the global loss's); dx = gamma * rstd * (dy - (G1 +
 * xhat * G2) / (M * scale)) in this process's gradient scale; gamma and beta
 * get this process's own sums. Every process runs the sum, whether or not it
 * needs any of the gradients. */
static kd_status kd__batchnorm_backward_sync(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *gamma = n->in[1], *beta = n->in[2], *dy = n->out->grad;
    const int64_t N = x->shape[0], C = x->shape[1], S = kd_tensor_numel(x) / (N * C);
    const kd_layout lay = x->layout;
    const int64_t step = lay == KD_LAYOUT_NCHW16C ? KD_LAYOUT_BLOCK : lay == KD_LAYOUT_NHWC ? C : 1;
    double *loc = kd__scratch(g, (size_t)C * 2 * sizeof *loc), *glob = kd__scratch(g, (size_t)C * 2 * sizeof *glob);
    if (!loc || !glob) return g->status ? g->status : kd_error(KD_ERR_NOMEM, "batchnorm: out of memory");
    const float *dyd = kd_f32(dy), *xd = kd_f32(x), *gd = kd_f32(gamma);
    const float *sm = kd_f32(n->saved[0]), *sr = kd_f32(n->saved[1]);
    const double scale = n->p.bn.scale, M = n->p.bn.count;
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        const double mean = sm[c], rstd = sr[c];
        double sdy = 0.0, sdyx = 0.0;
        for (int64_t i = 0; i < N; i++) {
            const int64_t o = kd_layout_offset(lay, i, c, 0, C, S);
            for (int64_t j = 0; j < S; j++) {
                sdy += dyd[o + j * step];
                sdyx += dyd[o + j * step] * (xd[o + j * step] - mean) * rstd;
            }
        }
        loc[c] = sdy;
        loc[C + c] = sdyx;
        glob[c] = scale * sdy;
        glob[C + c] = scale * sdyx;
    }
    KD_TRY(g->bn_sum(glob, 2 * C, g->bn_sum_user));
    if (kd__needs_grad(g, x)) {
        int acc;
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        float *dxd = kd_f32(dx);
        const double div = M * scale;
#pragma omp parallel for schedule(static) if (N * C * S >= KD__PAR_MIN)
        for (int64_t c = 0; c < C; c++) {
            const double mean = sm[c], rstd = sr[c], k = gd[c] * rstd;
            for (int64_t i = 0; i < N; i++) {
                const int64_t o = kd_layout_offset(lay, i, c, 0, C, S);
                for (int64_t j = 0; j < S; j++) {
                    const int64_t e = o + j * step;
                    const double xhat = (xd[e] - mean) * rstd;
                    const float r = (float)(k * (dyd[e] - (glob[c] + xhat * glob[C + c]) / div));
                    dxd[e] = acc ? dxd[e] + r : r;
                }
            }
        }
    }
    kd_tensor *leaf[2] = {gamma, beta};
    for (int k = 0; k < 2; k++) {
        if (!leaf[k] || !kd__needs_grad(g, leaf[k])) continue;
        kd_tensor *d = kd__grad_acc(g, leaf[k]);
        if (!d) return g->status;
        float *dd = kd_f32(d);
        for (int64_t c = 0; c < C; c++) dd[c] += (float)loc[(k == 0 ? C : 0) + c];
    }
    return KD_OK;
}

kd_status kd__batchnorm_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *gamma = n->in[1], *beta = n->in[2], *dy = n->out->grad;
    if (n->p.bn.sync && n->p.bn.p.training) return kd__batchnorm_backward_sync(g, n);
    if (n->p.bn.p.training && kd__needs_grad(g, x) && x->node >= 0 && !(x->grad && x->grad_ready))
        return kd__batchnorm_backward_fresh(g, n);
    kd_tensor *ts[3] = {kd__needs_grad(g, x) ? x : NULL,
                        kd__needs_grad(g, gamma) ? gamma : NULL,
                        beta && kd__needs_grad(g, beta) ? beta : NULL};
    kd_tensor *ds[3];
    int acc = kd__grads_common(g, 3, ts, ds);
    if (acc < 0) return g->status;
    if (!n->p.bn.p.training) {
        int64_t N = x->shape[0], C = x->shape[1], S = kd_tensor_numel(x) / (N * C);
        if (N * C == 0) return KD_OK;
        kd__bn_eval_backward(kd_f32(dy), kd_f32(x), kd_f32(n->saved[0]), kd_f32(n->saved[1]),
                             kd_f32(gamma), ds[0] ? kd_f32(ds[0]) : NULL,
                             ds[1] ? kd_f32(ds[1]) : NULL, ds[2] ? kd_f32(ds[2]) : NULL, N, C,
                             S, acc, x->layout);
        return KD_OK;
    }
    kd_tensor *dx = ds[0], *tmp = NULL;
    if (!dx) { /* the kernel always writes dx; give it scratch */
        dx = tmp = kd__tmp_like(g, x);
        if (!dx) return g->status;
        if (acc) memset(dx->data, 0, kd_tensor_nbytes(dx));
    }
    int view = n->p.bn.view4d;
    kd_tensor dyv = view ? kd__view4d(dy) : *dy, xv = view ? kd__view4d(x) : *x;
    kd_tensor dxv = view ? kd__view4d(dx) : *dx;
    kd_status s = g->be->batchnorm_backward(g->be, &n->p.bn.p, &dyv, &xv, gamma, n->saved[0],
                                            n->saved[1], &dxv, ds[1], ds[2], acc);
    kd__tmp_free(g, tmp);
    return s;
}

/* -------------------------------------------------------------- linear */

kd_tensor *kd_linear(kd_graph *g, kd_tensor *x, kd_tensor *w, kd_tensor *b) {
    kd_tensor *in[3] = {x, w, b};
    char bx[96], bw[96];
    if (!g || !kd__ok_inputs(g, "linear", 2, in)) return NULL;
    if (!(x = in[0] = kd__to_strided(g, x))) return NULL;
    if (!kd__check_f32(g, "linear", "input", x) || !kd__check_f32(g, "linear", "weight", w) ||
        (b && !kd__check_f32(g, "linear", "bias", b)))
        return NULL;
    if (w->ndim != 2)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "linear: weight %s must be 2-d (out, in)",
                                    SHP(w, bw)));
    int64_t O = w->shape[0], I = w->shape[1];
    if (x->ndim < 1 || x->shape[x->ndim - 1] != I)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "linear: input %s has %lld features but weight "
                                                  "%s expects %lld",
                                    SHP(x, bx), (long long)(x->ndim ? x->shape[x->ndim - 1] : 0),
                                    SHP(w, bw), (long long)I));
    if (b && (b->ndim != 1 || b->shape[0] != O))
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "linear: bias %s does not match weight %s "
                                                  "(expected (%lld))",
                                    SHP(b, bx), SHP(w, bw), (long long)O));
    int64_t ys[KD_MAX_DIMS];
    for (int i = 0; i < x->ndim; i++) ys[i] = x->shape[i];
    ys[x->ndim - 1] = O;
    kd_tensor *y = kd__new(g, KD_F32, x->ndim, ys);
    if (!y) return NULL;
    int64_t M = I ? kd_tensor_numel(x) / I : 0;
    float *yd = kd_f32(y);
    if (b) {
        const float *bd = kd_f32(b);
#pragma omp parallel for schedule(static) if (M * O >= KD__PAR_MIN)
        for (int64_t m = 0; m < M; m++) memcpy(yd + m * O, bd, (size_t)O * sizeof *yd);
    }
    if (M > 0 && O > 0) {
        kd_status s = g->be->gemm(g->be, 0, 1, M, O, I, 1.0f, kd_f32(x), I, kd_f32(w), I,
                                  b ? 1.0f : 0.0f, yd, O);
        if (s != KD_OK) return kd__fail(g, s);
    }
    kd__record(g, KD_OP_LINEAR, y, 3, in);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__linear_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *w = n->in[1], *b = n->in[2], *dy = n->out->grad;
    int64_t O = w->shape[0], I = w->shape[1], M = I ? kd_tensor_numel(x) / I : 0;
    int acc;
    if (M == 0) return KD_OK;
    if (kd__needs_grad(g, x)) {
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        /* dx (M, I) = dy (M, O) @ w (O, I) */
        KD_TRY(g->be->gemm(g->be, 0, 0, M, I, O, 1.0f, kd_f32(dy), O, kd_f32(w), I,
                           acc ? 1.0f : 0.0f, kd_f32(dx), I));
    }
    if (kd__needs_grad(g, w)) {
        kd_tensor *dw = kd__grad(g, w, &acc);
        if (!dw) return g->status;
        /* dw (O, I) = dy^T (O, M) @ x (M, I) */
        KD_TRY(g->be->gemm(g->be, 1, 0, O, I, M, 1.0f, kd_f32(dy), O, kd_f32(x), I,
                           acc ? 1.0f : 0.0f, kd_f32(dw), I));
    }
    if (b && kd__needs_grad(g, b)) {
        kd_tensor *db = kd__grad(g, b, &acc);
        if (!db) return g->status;
        float *d = kd_f32(db);
        const float *gy = kd_f32(dy);
#pragma omp parallel for schedule(static) if (M * O >= KD__PAR_MIN)
        for (int64_t o = 0; o < O; o++) {
            double s = 0;
            for (int64_t m = 0; m < M; m++) s += gy[m * O + o];
            d[o] = acc ? d[o] + (float)s : (float)s;
        }
    }
    return KD_OK;
}

/* -------------------------------------------------------------- matmul */

kd_tensor *kd_matmul(kd_graph *g, kd_tensor *a, kd_tensor *b) {
    kd_tensor *in[2] = {a, b};
    char ba[96], bb[96];
    if (!g || !kd__ok_inputs(g, "matmul", 2, in)) return NULL;
    if (!(a = in[0] = kd__to_strided(g, a)) || !(b = in[1] = kd__to_strided(g, b))) return NULL;
    if (!kd__check_f32(g, "matmul", "a", a) || !kd__check_f32(g, "matmul", "b", b)) return NULL;
    int ok = a->ndim >= 2 && b->ndim >= 2 && (b->ndim == 2 || b->ndim == a->ndim);
    for (int i = 0; ok && b->ndim > 2 && i < a->ndim - 2; i++) ok = a->shape[i] == b->shape[i];
    if (ok) ok = a->shape[a->ndim - 1] == b->shape[b->ndim - 2];
    if (!ok)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "matmul: cannot multiply %s by %s (need "
                                                  "(..., M, K) @ (K, N) or (..., K, N) with the "
                                                  "same batch dims)",
                                    SHP(a, ba), SHP(b, bb)));
    int64_t ys[KD_MAX_DIMS];
    for (int i = 0; i < a->ndim; i++) ys[i] = a->shape[i];
    int64_t M = a->shape[a->ndim - 2], K = a->shape[a->ndim - 1], N = b->shape[b->ndim - 1];
    ys[a->ndim - 1] = N;
    kd_tensor *y = kd__new(g, KD_F32, a->ndim, ys);
    if (!y) return NULL;
    int64_t B = (M > 0 && K > 0) ? kd_tensor_numel(a) / (M * K) : 0;
    if (K == 0) memset(y->data, 0, kd_tensor_nbytes(y));
    if (M > 0 && N > 0 && K > 0 && B > 0) {
        /* A shared b folds the batch into the rows: one GEMM. */
        int64_t nb = b->ndim == 2 ? 1 : B, rows = b->ndim == 2 ? B * M : M;
        for (int64_t i = 0; i < nb; i++) {
            kd_status s = g->be->gemm(g->be, 0, 0, rows, N, K, 1.0f, kd_f32(a) + i * M * K, K,
                                      kd_f32(b) + i * K * N, N, 0.0f, kd_f32(y) + i * M * N, N);
            if (s != KD_OK) return kd__fail(g, s);
        }
    }
    kd__record(g, KD_OP_MATMUL, y, 2, in);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__matmul_backward(kd_graph *g, kd__node *n) {
    kd_tensor *a = n->in[0], *b = n->in[1], *dy = n->out->grad;
    int64_t M = a->shape[a->ndim - 2], K = a->shape[a->ndim - 1], N = b->shape[b->ndim - 1];
    int64_t B = (M > 0 && K > 0) ? kd_tensor_numel(a) / (M * K) : 0;
    int shared = b->ndim == 2;
    int64_t nb = shared ? 1 : B, rows = shared ? B * M : M;
    int acc;
    if (kd__needs_grad(g, a)) {
        kd_tensor *da = kd__grad(g, a, &acc);
        if (!da) return g->status;
        if (N == 0 && !acc) memset(da->data, 0, kd_tensor_nbytes(da));
        /* da (M, K) = dy (M, N) @ b^T */
        for (int64_t i = 0; i < nb && N > 0 && rows * K > 0; i++)
            KD_TRY(g->be->gemm(g->be, 0, 1, rows, K, N, 1.0f, kd_f32(dy) + i * M * N, N,
                               kd_f32(b) + i * K * N, N, acc ? 1.0f : 0.0f,
                               kd_f32(da) + i * M * K, K));
    }
    if (kd__needs_grad(g, b)) {
        kd_tensor *db = kd__grad(g, b, &acc);
        if (!db) return g->status;
        if (rows == 0 && !acc) memset(db->data, 0, kd_tensor_nbytes(db));
        /* db (K, N) = a^T (K, M) @ dy (M, N) */
        for (int64_t i = 0; i < nb && rows > 0 && K * N > 0; i++)
            KD_TRY(g->be->gemm(g->be, 1, 0, K, N, rows, 1.0f, kd_f32(a) + i * M * K, K,
                               kd_f32(dy) + i * M * N, N, acc ? 1.0f : 0.0f,
                               kd_f32(db) + i * K * N, N));
    }
    return KD_OK;
}

/* ------------------------------------------------------------ eltwise */

static kd_tensor *kd__eltwise(kd_graph *g, kd_op op, const char *name, kd_eltwise_kind kind,
                              float alpha, kd_tensor *x) {
    if (!g || !kd__ok_inputs(g, name, 1, &x)) return NULL;
    /* ReLU and leaky ReLU keep bf16 activations; exp and log widen them. */
    if (kind != KD_ELTWISE_RELU && !(x = kd__to_f32(g, x))) return NULL;
    if (!kd__check_act(g, name, "input", x)) return NULL;
    kd_tensor *y = kd__new_lay(g, x->dtype, x->ndim, x->shape, x->layout);
    if (!y) return NULL;
    kd_status s = g->be->eltwise_forward(g->be, kind, alpha, x, y);
    if (s != KD_OK) return kd__fail(g, s);
    kd__node *n = kd__record(g, op, y, 1, &x);
    if (n) n->p.f.a = alpha;
    return g->status == KD_OK ? y : NULL;
}

kd_tensor *kd_relu(kd_graph *g, kd_tensor *x) {
    return kd__eltwise(g, KD_OP_RELU, "relu", KD_ELTWISE_RELU, 0.0f, x);
}

kd_tensor *kd_leaky_relu(kd_graph *g, kd_tensor *x, float slope) {
    return kd__eltwise(g, KD_OP_LEAKY_RELU, "leaky_relu", KD_ELTWISE_RELU, slope, x);
}

kd_tensor *kd_exp(kd_graph *g, kd_tensor *x) {
    return kd__eltwise(g, KD_OP_EXP, "exp", KD_ELTWISE_EXP, 0.0f, x);
}

kd_tensor *kd_log(kd_graph *g, kd_tensor *x) {
    return kd__eltwise(g, KD_OP_LOG, "log", KD_ELTWISE_LOG, 0.0f, x);
}

static kd_status kd__eltwise_backward(kd_graph *g, kd__node *n, kd_eltwise_kind kind,
                                      const kd_tensor *src) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    return g->be->eltwise_backward(g->be, kind, n->p.f.a, n->out->grad, src, dx, acc);
}

/* The kernels test only the sign of `src` (dx = dy where src > 0, else
 * slope * dy). For slope >= 0, y > 0 exactly where x > 0 (NaN stays NaN), so
 * y gives bit-identical gradients and x need not outlive the forward. */
kd_status kd__relu_backward(kd_graph *g, kd__node *n) {
    return kd__eltwise_backward(g, n, KD_ELTWISE_RELU, kd__relu_uses_out(n) ? n->out : n->in[0]);
}

kd_status kd__exp_backward(kd_graph *g, kd__node *n) {
    return kd__eltwise_backward(g, n, KD_ELTWISE_EXP, n->out);
}

kd_status kd__log_backward(kd_graph *g, kd__node *n) {
    return kd__eltwise_backward(g, n, KD_ELTWISE_LOG, n->in[0]);
}

/* ------------------------------------------------------------ pooling */

kd_tensor *kd_pool2d(kd_graph *g, kd_tensor *x, const kd_pool2d_params *p) {
    const char *name = p && p->kind == KD_POOL_MAX ? "maxpool2d" : "avgpool2d";
    char bx[96];
    if (!g || !kd__ok_inputs(g, name, 1, &x)) return NULL;
    if (!p) return kd__fail(g, kd_error(KD_ERR_INVALID, "pool2d: params are NULL"));
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, name, "input", x)) return NULL;
    if (x->ndim != 4)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "%s: input %s must be 4-d (N, C, H, W)", name,
                                    SHP(x, bx)));
    for (int i = 0; i < 2; i++) {
        if (p->kernel[i] < 1 || p->stride[i] < 1 || p->pad[i] < 0 || p->pad[i] > p->kernel[i] / 2)
            return kd__fail(g, kd_error(KD_ERR_INVALID, "%s: invalid window (kernel %lldx%lld, "
                                                        "stride %lldx%lld, pad %lldx%lld; pad "
                                                        "must be at most half the kernel)",
                                        name, (long long)p->kernel[0], (long long)p->kernel[1],
                                        (long long)p->stride[0], (long long)p->stride[1],
                                        (long long)p->pad[0], (long long)p->pad[1]));
    }
    int64_t OH = kd_conv_out_size(x->shape[2], p->kernel[0], p->stride[0], p->pad[0], 1);
    int64_t OW = kd_conv_out_size(x->shape[3], p->kernel[1], p->stride[1], p->pad[1], 1);
    if (OH <= 0 || OW <= 0)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "%s: input %s is smaller than the %lldx%lld "
                                                  "window",
                                    name, SHP(x, bx), (long long)p->kernel[0],
                                    (long long)p->kernel[1]));
    int64_t ys[4] = {x->shape[0], x->shape[1], OH, OW};
    /* y (and max pooling's argmax, in y's element order) keep x's layout. */
    kd_tensor *y = kd__new_lay(g, KD_F32, 4, ys, x->layout), *ws = NULL;
    if (!y) return NULL;
    if (p->kind == KD_POOL_MAX && !(ws = kd__new_lay(g, KD_I32, 4, ys, x->layout))) return NULL;
    kd_status s = g->be->pool2d_forward(g->be, p, x, y, ws);
    if (s != KD_OK) return kd__fail(g, s);
    kd__node *n = kd__record(g, p->kind == KD_POOL_MAX ? KD_OP_MAXPOOL2D : KD_OP_AVGPOOL2D, y, 1,
                             &x);
    if (n) {
        n->p.pool = *p;
        n->saved[0] = ws;
    }
    return g->status == KD_OK ? y : NULL;
}

static kd_tensor *kd__pool_sq(kd_graph *g, kd_tensor *x, kd_pool_kind kind, int64_t k,
                              int64_t stride, int64_t pad) {
    kd_pool2d_params p = {kind, {k, k}, {stride > 0 ? stride : k, stride > 0 ? stride : k},
                          {pad, pad}, 1};
    return kd_pool2d(g, x, &p);
}

kd_tensor *kd_avgpool2d(kd_graph *g, kd_tensor *x, int64_t kernel, int64_t stride, int64_t pad) {
    return kd__pool_sq(g, x, KD_POOL_AVG, kernel, stride, pad);
}

kd_tensor *kd_maxpool2d(kd_graph *g, kd_tensor *x, int64_t kernel, int64_t stride, int64_t pad) {
    return kd__pool_sq(g, x, KD_POOL_MAX, kernel, stride, pad);
}

kd_status kd__pool2d_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    return g->be->pool2d_backward(g->be, &n->p.pool, n->out->grad, n->saved[0], dx, acc);
}

/* (N, C, H, W) -> (N, C): plain C, one double sum per plane. */
kd_tensor *kd_global_avgpool(kd_graph *g, kd_tensor *x) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "global_avgpool", 1, &x)) return NULL;
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, "global_avgpool", "input", x)) return NULL;
    if (x->ndim != 4 || x->shape[2] * x->shape[3] == 0)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "global_avgpool: input %s must be 4-d "
                                                  "(N, C, H, W) with H, W > 0", SHP(x, bx)));
    int64_t NC = x->shape[0] * x->shape[1], S = x->shape[2] * x->shape[3];
    kd_tensor *y = kd__new(g, KD_F32, 2, x->shape);
    if (!y) return NULL;
    const float *xd = kd_f32(x);
    float *yd = kd_f32(y);
    if (kd__blocked(x)) {
        /* One (n, channel block) per iteration; each lane's sum in plane order. */
        enum { B = KD_LAYOUT_BLOCK };
#pragma omp parallel for schedule(static) if (NC * S >= KD__PAR_MIN)
        for (int64_t nb = 0; nb < NC / B; nb++) {
            double s[B] = {0};
            const float *p = xd + nb * S * B;
            for (int64_t j = 0; j < S; j++)
                for (int l = 0; l < B; l++) s[l] += p[j * B + l];
            for (int l = 0; l < B; l++) yd[nb * B + l] = (float)(s[l] / (double)S);
        }
    } else {
#pragma omp parallel for schedule(static) if (NC * S >= KD__PAR_MIN)
        for (int64_t i = 0; i < NC; i++) {
            double s = 0;
            for (int64_t j = 0; j < S; j++) s += xd[i * S + j];
            yd[i] = (float)(s / (double)S);
        }
    }
    kd__record(g, KD_OP_GLOBAL_AVGPOOL, y, 1, &x);
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__global_avgpool_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t NC = x->shape[0] * x->shape[1], S = x->shape[2] * x->shape[3];
    const float *dy = kd_f32(n->out->grad);
    float *d = kd_f32(dx), inv = 1.0f / (float)S;
    if (kd__blocked(dx)) {
        enum { B = KD_LAYOUT_BLOCK };
#pragma omp parallel for schedule(static) if (NC * S >= KD__PAR_MIN)
        for (int64_t nb = 0; nb < NC / B; nb++) {
            float v[B];
            for (int l = 0; l < B; l++) v[l] = dy[nb * B + l] * inv;
            float *p = d + nb * S * B;
            for (int64_t j = 0; j < S; j++)
                for (int l = 0; l < B; l++) p[j * B + l] = acc ? p[j * B + l] + v[l] : v[l];
        }
        return KD_OK;
    }
#pragma omp parallel for schedule(static) if (NC * S >= KD__PAR_MIN)
    for (int64_t i = 0; i < NC; i++) {
        float v = dy[i] * inv;
        float *row = d + i * S;
        if (acc)
            for (int64_t j = 0; j < S; j++) row[j] += v;
        else
            for (int64_t j = 0; j < S; j++) row[j] = v;
    }
    return KD_OK;
}
