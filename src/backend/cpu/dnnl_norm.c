/* Normalisations on oneDNN (dnnl_impl.h): batch norm forward (training,
 * eval) and backward, with the running statistics and save_rstd computed
 * here (oneDNN does not update them); layer norm forward and backward over
 * the last axis, rstd from oneDNN's variance. A bf16 batch-norm input (a
 * bf16 activation) gives a bf16 output with float32 statistics; its
 * backward widens x to float32 in scratch and runs the float32 kernel, so
 * that gradients stay float32. */
#include "backend/cpu/dnnl_impl.h"
#include <math.h>
#include <string.h>

static kd_status ref_bn_fwd(kd_backend *be, const kd_bn_params *p, const kd_tensor *x,
                            const kd_tensor *gamma, const kd_tensor *beta,
                            kd_tensor *running_mean, kd_tensor *running_var, kd_tensor *y,
                            kd_tensor *save_mean, kd_tensor *save_rstd) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = kd__cpu_ps_plain(&ps, x, 0, &s), *py = kd__cpu_ps_plain(&ps, y, 1, &s);
    if (s == KD_OK)
        s = ref_be()->batchnorm_forward(be, p, px, gamma, beta, running_mean, running_var, py,
                                        save_mean, save_rstd);
    return kd__cpu_ps_finish(&ps, s);
}

static kd_status ref_bn_bwd(kd_backend *be, const kd_bn_params *p, const kd_tensor *dy,
                            const kd_tensor *x, const kd_tensor *gamma,
                            const kd_tensor *save_mean, const kd_tensor *save_rstd,
                            kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta, int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = kd__cpu_ps_plain(&ps, dy, 0, &s), *px = kd__cpu_ps_plain(&ps, x, 0, &s);
    kd_tensor *pdx = kd__cpu_ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK)
        s = ref_be()->batchnorm_backward(be, p, pdy, px, gamma, save_mean, save_rstd, pdx,
                                         dgamma, dbeta, accumulate);
    return kd__cpu_ps_finish(&ps, s);
}

/* ------------------------------------------------------------- batch norm */

/* x (N, C) or (N, C, d2...) viewed as (N, C, S, 1) NCHW. */
static void bn_dims(const kd_tensor *x, int64_t *N, int64_t *C, int64_t *S) {
    *N = x->shape[0];
    *C = x->ndim > 1 ? x->shape[1] : 1;
    *S = 1;
    for (int i = 2; i < x->ndim; i++) *S *= x->shape[i];
}

/* The 4-d dims oneDNN gets for a bn input: (N, C, H, W) of a packed x,
 * else x (N, C) or (N, C, d2...) seen as (N, C, S, 1). */
static void bn_dims4(const kd_tensor *x, int64_t d[4]) {
    if (packed(x)) {
        for (int i = 0; i < 4; i++) d[i] = x->shape[i];
        return;
    }
    bn_dims(x, &d[0], &d[1], &d[2]);
    d[3] = 1;
}

/* The layout bits of a batch norm's entry: x's kd_layout (bits 0-1:
 * strided, NCHW16C or NHWC), bf16 data in bit 2 when `data16`. */
static int bn_lay(const kd_tensor *x, int data16) {
    return (int)(packed(x) ? x->layout : KD_LAYOUT_STRIDED) | data16 << 2;
}

/* The cache entry of a batch norm (PK_BN_*: dims (N, C, H, W) in the
 * activation layout and data type of `lay`, bn_lay) or a
 * layer norm (PK_LN_*: dims (R, D), plain float32) of `kind`: the forward
 * with `prop`, or the backward against a training forward as its hint. */
static kd_status norm_entry(cpu_state *st, prim_kind kind, int ndims, const int64_t *dims, int lay, float eps,
                            unsigned flags, dnnl_prop_kind_t prop, prim_entry **out) {
    prim_key k;
    kd__cpu_key_init(&k, kind);
    k.flags = (int32_t)flags;
    k.prop = prop;
    k.lay = lay;
    for (int i = 0; i < ndims; i++) k.d[i] = dims[i];
    k.f[0] = eps;
    uint64_t h = kd__cpu_key_hash(&k);
    if ((*out = kd__cpu_cache_find(st, &k, h))) return KD_OK;

    const int bn = kind == PK_BN_FWD || kind == PK_BN_BWD, fwd = kind == PK_BN_FWD || kind == PK_LN_FWD;
    dnnl_memory_desc_t md;
    dnnl_dims_t dd;
    for (int i = 0; i < ndims; i++) dd[i] = dims[i];
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&md, ndims, dd, (lay & 4) ? dnnl_bf16 : dnnl_f32,
                                                   bn ? act_tag_of((kd_layout)(lay & 3)) : dnnl_ab);
    union {
        dnnl_batch_normalization_desc_t b;
        dnnl_layer_normalization_desc_t l;
    } op, hint;
    if (s == dnnl_success && bn)
        s = fwd ? dnnl_batch_normalization_forward_desc_init(&op.b, prop, &md, eps, flags)
                : dnnl_batch_normalization_forward_desc_init(&hint.b, dnnl_forward_training, &md, eps, flags);
    if (s == dnnl_success && !bn)
        s = fwd ? dnnl_layer_normalization_forward_desc_init(&op.l, prop, &md, NULL, eps, flags)
                : dnnl_layer_normalization_forward_desc_init(&hint.l, dnnl_forward_training, &md, NULL, eps, flags);
    if (s == dnnl_success && !fwd)
        s = bn ? dnnl_batch_normalization_backward_desc_init(&op.b, prop, &md, &md, eps, flags)
               : dnnl_layer_normalization_backward_desc_init(&op.l, prop, &md, &md, NULL, eps, flags);
    return kd__cpu_cache_insert(st, &k, h, s, &op, fwd ? NULL : &hint, out);
}

/* The backward of a batch norm (nstat = nparam = channels) or a layer norm
 * (nstat rows, nparam columns) once its entry e exists. Scratch floats: var
 * (nstat), dgamma, dbeta, a zero shift (nparam each), dx when accumulating
 * or not wanted, then x widened to float32 when it is bf16; the parameter
 * gradients always land in scratch first, so that NULL outputs and
 * accumulate=1 take one path. */
static kd_status norm_bwd_run(cpu_state *st, prim_entry *e, float eps, int64_t nstat, int64_t nparam,
                              const kd_tensor *dy, const kd_tensor *x, const kd_tensor *gamma,
                              const kd_tensor *save_mean, const kd_tensor *save_rstd, kd_tensor *dx,
                              kd_tensor *dgamma, kd_tensor *dbeta, int accumulate) {
    const int64_t n = kd_tensor_numel(x);
    const int dx_scratch = accumulate || !dx;
    const size_t spad = align64((size_t)nstat * sizeof(float)) / sizeof(float);
    const size_t ppad = align64((size_t)nparam * sizeof(float)) / sizeof(float);
    const size_t npad = align64((size_t)n * sizeof(float)) / sizeof(float);
    const int x16 = x->dtype == KD_BF16;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, spad + 3 * ppad + (dx_scratch ? npad : 0) + (x16 ? npad : 0)));
    float *var = kd__cpu_scratch_floats(st, e, 0);
    float *dg = kd__cpu_scratch_floats(st, e, spad);
    float *dbt = kd__cpu_scratch_floats(st, e, spad + ppad);
    float *shift = kd__cpu_scratch_floats(st, e, spad + 2 * ppad);
    float *dxo = dx_scratch ? kd__cpu_scratch_floats(st, e, spad + 3 * ppad) : kd_f32(dx);
    const void *xp = x->data;
    if (x16) {
        float *xw = kd__cpu_scratch_floats(st, e, spad + 3 * ppad + (dx_scratch ? npad : 0));
        kd_bf16_to_f32(xw, (const uint16_t *)x->data, n);
        xp = xw;
    }
    /* oneDNN wants the variance; rebuild it from rstd = 1/sqrt(var + eps). */
    const float *rstd = kd_f32(save_rstd);
#pragma omp parallel for schedule(static) if (nstat > 65536)
    for (int64_t i = 0; i < nstat; i++) {
        double r = rstd[i];
        var[i] = (float)(1.0 / (r * r) - (double)eps);
    }
    exec_arg a[9] = {{DNNL_ARG_SRC, xp},       {DNNL_ARG_MEAN, save_mean->data},
                     {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_DIFF_DST, dy->data},
                     {DNNL_ARG_DIFF_SRC, dxo}};
    int na = 5;
    if (gamma) {
        a[na++] = (exec_arg){DNNL_ARG_SCALE, gamma->data};
        a[na++] = (exec_arg){DNNL_ARG_DIFF_SCALE, dg};
        a[na++] = (exec_arg){DNNL_ARG_DIFF_SHIFT, dbt};
        /* oneDNN 2.6 counts SHIFT among a use_shift backward's inputs (and
         * fails the execution without it) though the gradients do not
         * depend on it; kd's backward has no beta, so it gets zeros. */
        memset(shift, 0, (size_t)nparam * sizeof(float));
        a[na++] = (exec_arg){DNNL_ARG_SHIFT, shift};
    }
    KD_TRY(kd__cpu_entry_execute(st, e, a, na));
    if (accumulate && dx) kd__cpu_add_into(kd_f32(dx), dxo, n);
    if (dgamma) {
        float *o = kd_f32(dgamma);
        for (int64_t i = 0; i < nparam; i++) o[i] = accumulate ? o[i] + dg[i] : dg[i];
    }
    if (dbeta) {
        float *o = kd_f32(dbeta);
        for (int64_t i = 0; i < nparam; i++) o[i] = accumulate ? o[i] + dbt[i] : dbt[i];
    }
    return KD_OK;
}

static kd_status bn_fwd_locked(cpu_state *st, const kd_bn_params *p, const kd_tensor *x,
                               const kd_tensor *gamma, const kd_tensor *beta,
                               kd_tensor *running_mean, kd_tensor *running_var, kd_tensor *y,
                               kd_tensor *save_mean, kd_tensor *save_rstd, int *use_ref) {
    int64_t N, C, S;
    bn_dims(x, &N, &C, &S);
    unsigned flags = (gamma ? dnnl_use_scale : 0u) | (beta ? dnnl_use_shift : 0u);
    if (!p->training) flags |= dnnl_use_global_stats;
    int64_t d4[4];
    bn_dims4(x, d4);
    prim_entry *e;
    KD_TRY(norm_entry(st, PK_BN_FWD, 4, d4, bn_lay(x, x->dtype == KD_BF16), p->eps, flags,
                    p->training ? dnnl_forward_training : dnnl_forward_inference, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;

    exec_arg a[6] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    int na = 2;
    if (gamma) a[na++] = (exec_arg){DNNL_ARG_SCALE, gamma->data};
    if (beta) a[na++] = (exec_arg){DNNL_ARG_SHIFT, beta->data};
    if (!p->training) {
        a[na++] = (exec_arg){DNNL_ARG_MEAN, running_mean->data};
        a[na++] = (exec_arg){DNNL_ARG_VARIANCE, running_var->data};
        KD_TRY(kd__cpu_scratch_reserve_for(st, e, 0));
        KD_TRY(kd__cpu_entry_execute(st, e, a, na));
        /* As the ref kernel: save_* (if given) get the statistics used. */
        const float *rm = kd_f32(running_mean), *rv = kd_f32(running_var);
        for (int64_t c = 0; c < C; c++) {
            if (save_mean) kd_f32(save_mean)[c] = rm[c];
            if (save_rstd) kd_f32(save_rstd)[c] = (float)(1.0 / sqrt((double)rv[c] + (double)p->eps));
        }
        return KD_OK;
    }

    /* Training: oneDNN writes the batch mean and the biased variance. */
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, (size_t)C));
    float *mean = kd_f32(save_mean);
    float *var = kd__cpu_scratch_floats(st, e, 0);
    a[na++] = (exec_arg){DNNL_ARG_MEAN, mean};
    a[na++] = (exec_arg){DNNL_ARG_VARIANCE, var};
    KD_TRY(kd__cpu_entry_execute(st, e, a, na));

    /* save_rstd from the biased variance; running variance with the unbiased
     * one (n / (n - 1)), as PyTorch does. */
    int64_t n = N * S; /* > 1, checked by the caller */
    double unbias = (double)n / (double)(n - 1);
    double m = p->momentum;
    float *rm = running_mean ? kd_f32(running_mean) : NULL;
    float *rv = running_var ? kd_f32(running_var) : NULL;
    float *rstd = kd_f32(save_rstd);
    for (int64_t c = 0; c < C; c++) {
        rstd[c] = (float)(1.0 / sqrt((double)var[c] + (double)p->eps));
        if (rm) rm[c] = (float)((1.0 - m) * rm[c] + m * mean[c]);
        if (rv) rv[c] = (float)((1.0 - m) * rv[c] + m * var[c] * unbias);
    }
    return KD_OK;
}

kd_status kd__cpu_batchnorm_forward(kd_backend *be, const kd_bn_params *p, const kd_tensor *x,
                                    const kd_tensor *gamma, const kd_tensor *beta,
                                    kd_tensor *running_mean, kd_tensor *running_var,
                                    kd_tensor *y, kd_tensor *save_mean, kd_tensor *save_rstd) {
    /* The ref kernel reports the invalid cases (training on one value per
     * channel, missing statistics) with its messages. */
    int64_t N, C, S;
    int use_ref = packed(x) ? !act_4d_any(x) || y->layout != x->layout || y->dtype != x->dtype
                             : !plain_f32(x) || !plain_f32(y);
    use_ref = use_ref || x->ndim < 2 || kd_tensor_numel(x) == 0;
    if (!use_ref) {
        bn_dims(x, &N, &C, &S);
        use_ref = p->training ? (N * S < 2 || !save_mean || !save_rstd)
                              : (!running_mean || !running_var);
    }
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, bn_fwd_locked(&kd__cpu_st, p, x, gamma, beta, running_mean, running_var,
                                             y, save_mean, save_rstd, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_bn_fwd(be, p, x, gamma, beta, running_mean, running_var, y,
                                           save_mean, save_rstd);
    return s;
}

static kd_status bn_bwd_locked(cpu_state *st, const kd_bn_params *p, const kd_tensor *dy,
                               const kd_tensor *x, const kd_tensor *gamma,
                               const kd_tensor *save_mean, const kd_tensor *save_rstd,
                               kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta, int accumulate,
                               int *use_ref) {
    int64_t N, C, S;
    bn_dims(x, &N, &C, &S);
    /* Scale and shift go together; eval-mode backward treats the statistics
     * as constants. */
    unsigned flags = (gamma ? dnnl_use_scale | dnnl_use_shift : 0u) |
                     (p->training ? 0u : dnnl_use_global_stats);
    int64_t d4[4];
    bn_dims4(x, d4);
    prim_entry *e;
    KD_TRY(norm_entry(st, PK_BN_BWD, 4, d4, bn_lay(x, 0), p->eps, flags, dnnl_backward, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    return norm_bwd_run(st, e, p->eps, C, C, dy, x, gamma, save_mean, save_rstd, dx, dgamma, dbeta, accumulate);
}

kd_status kd__cpu_batchnorm_backward(kd_backend *be, const kd_bn_params *p, const kd_tensor *dy,
                                     const kd_tensor *x, const kd_tensor *gamma,
                                     const kd_tensor *save_mean, const kd_tensor *save_rstd,
                                     kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta,
                                     int accumulate) {
    /* Parameter gradients without gamma cannot come from a primitive without
     * use_scale. */
    int use_ref = packed(x) ? !act_4d_any(x) || !act_4d(dy) || dy->layout != x->layout ||
                                   (dx && dx->layout != x->layout)
                             : !plain_f32(x) || !plain_f32(dy) || (dx && !plain_f32(dx));
    use_ref = use_ref || x->ndim < 2 || kd_tensor_numel(x) == 0 || (!gamma && (dgamma || dbeta));
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, bn_bwd_locked(&kd__cpu_st, p, dy, x, gamma, save_mean, save_rstd, dx,
                                             dgamma, dbeta, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_bn_bwd(be, p, dy, x, gamma, save_mean, save_rstd, dx, dgamma,
                                            dbeta, accumulate);
    return s;
}

/* ------------------------------------------------------------- layer norm */

static kd_status ln_fwd_locked(cpu_state *st, float eps, const kd_tensor *x,
                               const kd_tensor *gamma, const kd_tensor *beta, kd_tensor *y,
                               kd_tensor *save_mean, kd_tensor *save_rstd, int *use_ref) {
    int64_t D = x->shape[x->ndim - 1], R = kd_tensor_numel(x) / D, rd[2] = {R, D};
    unsigned flags = gamma ? dnnl_use_scale | dnnl_use_shift : 0u;
    int train = save_mean && save_rstd;
    prim_entry *e;
    KD_TRY(norm_entry(st, PK_LN_FWD, 2, rd, 0, eps, flags,
                    train ? dnnl_forward_training : dnnl_forward_inference, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, train ? (size_t)R : 0));
    float *var = kd__cpu_scratch_floats(st, e, 0);
    exec_arg a[6] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    int na = 2;
    if (gamma) {
        a[na++] = (exec_arg){DNNL_ARG_SCALE, gamma->data};
        a[na++] = (exec_arg){DNNL_ARG_SHIFT, beta->data};
    }
    if (train) {
        a[na++] = (exec_arg){DNNL_ARG_MEAN, save_mean->data};
        a[na++] = (exec_arg){DNNL_ARG_VARIANCE, var};
    }
    KD_TRY(kd__cpu_entry_execute(st, e, a, na));
    if (train) {
        float *rstd = kd_f32(save_rstd);
#pragma omp parallel for schedule(static) if (R > 65536)
        for (int64_t r = 0; r < R; r++) rstd[r] = (float)(1.0 / sqrt((double)var[r] + (double)eps));
    }
    return KD_OK;
}

kd_status kd__cpu_layernorm_forward(kd_backend *be, float eps, const kd_tensor *x,
                                    const kd_tensor *gamma, const kd_tensor *beta, kd_tensor *y,
                                    kd_tensor *save_mean, kd_tensor *save_rstd) {
    /* The ref kernel reports malformed calls; oneDNN gets plain contiguous
     * tensors with gamma and beta both present or both absent. */
    int use_ref = !plain_f32(x) || !plain_f32(y) || x->ndim < 1 || kd_tensor_numel(x) == 0 ||
                  !kd_tensor_same_shape(x, y) || (!gamma != !beta) ||
                  (gamma && (!plain_f32(gamma) || !plain_f32(beta) ||
                             kd_tensor_numel(gamma) != x->shape[x->ndim - 1] ||
                             kd_tensor_numel(beta) != x->shape[x->ndim - 1])) ||
                  (!save_mean != !save_rstd);
    if (!use_ref && save_mean) {
        int64_t R = kd_tensor_numel(x) / x->shape[x->ndim - 1];
        use_ref = !plain_f32(save_mean) || !plain_f32(save_rstd) ||
                  kd_tensor_numel(save_mean) != R || kd_tensor_numel(save_rstd) != R;
    }
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, ln_fwd_locked(&kd__cpu_st, eps, x, gamma, beta, y, save_mean, save_rstd,
                                        &use_ref));
    if (s == KD_OK && use_ref)
        return ref_be()->layernorm_forward(be, eps, x, gamma, beta, y, save_mean, save_rstd);
    return s;
}

static kd_status ln_bwd_locked(cpu_state *st, float eps, const kd_tensor *dy, const kd_tensor *x,
                               const kd_tensor *gamma, const kd_tensor *save_mean,
                               const kd_tensor *save_rstd, kd_tensor *dx, kd_tensor *dgamma,
                               kd_tensor *dbeta, int accumulate, int *use_ref) {
    int64_t D = x->shape[x->ndim - 1], R = kd_tensor_numel(x) / D, rd[2] = {R, D};
    unsigned flags = gamma ? dnnl_use_scale | dnnl_use_shift : 0u;
    prim_entry *e;
    KD_TRY(norm_entry(st, PK_LN_BWD, 2, rd, 0, eps, flags, gamma ? dnnl_backward : dnnl_backward_data,
                    &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    return norm_bwd_run(st, e, eps, R, D, dy, x, gamma, save_mean, save_rstd, dx, dgamma, dbeta, accumulate);
}

kd_status kd__cpu_layernorm_backward(kd_backend *be, float eps, const kd_tensor *dy,
                                     const kd_tensor *x, const kd_tensor *gamma,
                                     const kd_tensor *save_mean, const kd_tensor *save_rstd,
                                     kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta,
                                     int accumulate) {
    int use_ref = !plain_f32(x) || !plain_f32(dy) || (dx && !plain_f32(dx)) || x->ndim < 1 ||
                  kd_tensor_numel(x) == 0 || !kd_tensor_same_shape(x, dy) ||
                  (dx && !kd_tensor_same_shape(x, dx)) || !save_mean || !save_rstd ||
                  (!gamma && (dgamma || dbeta));
    if (!use_ref) {
        int64_t D = x->shape[x->ndim - 1], R = kd_tensor_numel(x) / D;
        use_ref = !plain_f32(save_mean) || !plain_f32(save_rstd) ||
                  kd_tensor_numel(save_mean) != R || kd_tensor_numel(save_rstd) != R ||
                  (gamma && (!plain_f32(gamma) || kd_tensor_numel(gamma) != D)) ||
                  (dgamma && kd_tensor_numel(dgamma) != D) || (dbeta && kd_tensor_numel(dbeta) != D);
    }
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, ln_bwd_locked(&kd__cpu_st, eps, dy, x, gamma, save_mean, save_rstd, dx,
                                        dgamma, dbeta, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_be()->layernorm_backward(be, eps, dy, x, gamma, save_mean, save_rstd, dx,
                                            dgamma, dbeta, accumulate);
    return s;
}
