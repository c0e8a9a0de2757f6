/* Element-wise ops on oneDNN (dnnl_impl.h): softmax over the last axis,
 * forward and backward; relu / leaky relu, exp, log, gelu (erf) forward and
 * backward (log forward: libm). */
#include "backend/cpu/dnnl_impl.h"
#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- softmax */

/* oneDNN's softmax over axis 1 of the rows (R, C). On Swin's attention scores
 * ((512, 3, 49, 49), bench_kernels swin, 1 thread) it runs the forward in
 * ~2.5 ms and the backward in ~1.2 ms, against ~26 ms and ~20 ms for the ref
 * kernel's loops (a double exp per element). */
static kd_status softmax_entry(cpu_state *st, prim_kind kind, int64_t R, int64_t C,
                               prim_entry **out) {
    prim_key k;
    kd__cpu_key_init(&k, kind);
    k.d[0] = R, k.d[1] = C;
    uint64_t h = kd__cpu_key_hash(&k);
    if ((*out = kd__cpu_cache_find(st, &k, h))) return KD_OK;
    dnnl_memory_desc_t md;
    dnnl_softmax_desc_t op, hint;
    dnnl_dims_t dims = {R, C};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&md, 2, dims, dnnl_f32, dnnl_ab);
    if (s == dnnl_success)
        s = dnnl_softmax_forward_desc_init(kind == PK_SOFTMAX_FWD ? &op : &hint,
                                           dnnl_forward_training, &md, 1);
    if (s == dnnl_success && kind == PK_SOFTMAX_BWD)
        s = dnnl_softmax_backward_desc_init(&op, &md, &md, 1);
    return kd__cpu_cache_insert(st, &k, h, s, &op, kind == PK_SOFTMAX_BWD ? &hint : NULL, out);
}

static void rows_of(const kd_tensor *t, int64_t *R, int64_t *C) {
    *C = t->shape[t->ndim - 1];
    *R = kd_tensor_numel(t) / *C;
}

static kd_status softmax_fwd_locked(cpu_state *st, const kd_tensor *x, kd_tensor *y, int *use_ref) {
    int64_t R, C;
    rows_of(x, &R, &C);
    prim_entry *e;
    KD_TRY(softmax_entry(st, PK_SOFTMAX_FWD, R, C, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, 0));
    exec_arg a[2] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    return kd__cpu_entry_execute(st, e, a, 2);
}

kd_status kd__cpu_softmax_forward(kd_backend *be, const kd_tensor *x, kd_tensor *y) {
    int use_ref = !plain_f32(x) || !plain_f32(y) || x->ndim < 1 || kd_tensor_numel(x) == 0 ||
                  !kd_tensor_same_shape(x, y);
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, softmax_fwd_locked(&kd__cpu_st, x, y, &use_ref));
    if (s == KD_OK && use_ref) return ref_be()->softmax_forward(be, x, y);
    return s;
}

static kd_status softmax_bwd_locked(cpu_state *st, const kd_tensor *y, const kd_tensor *dy,
                                    kd_tensor *dx, int accumulate, int *use_ref) {
    int64_t R, C;
    rows_of(y, &R, &C);
    prim_entry *e;
    KD_TRY(softmax_entry(st, PK_SOFTMAX_BWD, R, C, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, accumulate ? (size_t)(R * C) : 0));
    float *out = accumulate ? kd__cpu_scratch_floats(st, e, 0) : kd_f32(dx);
    exec_arg a[3] = {{DNNL_ARG_DST, y->data}, {DNNL_ARG_DIFF_DST, dy->data}, {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(kd__cpu_entry_execute(st, e, a, 3));
    if (accumulate) kd__cpu_add_into(kd_f32(dx), out, R * C);
    return KD_OK;
}

kd_status kd__cpu_softmax_backward(kd_backend *be, const kd_tensor *y, const kd_tensor *dy,
                                   kd_tensor *dx, int accumulate) {
    int use_ref = !plain_f32(y) || !plain_f32(dy) || !plain_f32(dx) || y->ndim < 1 ||
                  kd_tensor_numel(y) == 0 || !kd_tensor_same_shape(y, dy) ||
                  !kd_tensor_same_shape(y, dx);
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, softmax_bwd_locked(&kd__cpu_st, y, dy, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref) return ref_be()->softmax_backward(be, y, dy, dx, accumulate);
    return s;
}

static kd_status ref_eltwise_fwd(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                 const kd_tensor *x, kd_tensor *y) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = kd__cpu_ps_plain(&ps, x, 0, &s), *py = kd__cpu_ps_plain(&ps, y, 1, &s);
    if (s == KD_OK) s = ref_be()->eltwise_forward(be, kind, alpha, px, py);
    return kd__cpu_ps_finish(&ps, s);
}

static kd_status ref_eltwise_bwd(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                 const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                 int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = kd__cpu_ps_plain(&ps, dy, 0, &s), *psrc = kd__cpu_ps_plain(&ps, src, 0, &s);
    kd_tensor *pdx = kd__cpu_ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK) s = ref_be()->eltwise_backward(be, kind, alpha, pdy, psrc, pdx, accumulate);
    return kd__cpu_ps_finish(&ps, s);
}

/* ---------------------------------------------------------------- eltwise */

/* Exp runs as exp_use_dst_for_bwd so that its backward reads y, as kd's
 * contract says; relu (alpha = negative slope), log and gelu (erf) read x. */
static dnnl_alg_kind_t eltwise_alg(kd_eltwise_kind kind) {
    switch (kind) {
    case KD_ELTWISE_RELU: return dnnl_eltwise_relu;
    case KD_ELTWISE_EXP: return dnnl_eltwise_exp_use_dst_for_bwd;
    case KD_ELTWISE_LOG: return dnnl_eltwise_log;
    case KD_ELTWISE_GELU: return dnnl_eltwise_gelu_erf;
    default: return dnnl_alg_kind_undef;
    }
}

/* The eltwise entry of `kind` on n values, float32, or bf16 when `bf16` (a
 * forward on bf16 activations). */
static kd_status eltwise_entry(cpu_state *st, prim_kind kind, dnnl_alg_kind_t alg, float alpha,
                               int64_t n, int bf16, prim_entry **out) {
    prim_key k;
    kd__cpu_key_init(&k, kind);
    k.alg = alg;
    k.lay = bf16;
    k.d[0] = n;
    k.f[0] = alpha;
    uint64_t h = kd__cpu_key_hash(&k);
    if ((*out = kd__cpu_cache_find(st, &k, h))) return KD_OK;

    dnnl_memory_desc_t md;
    dnnl_eltwise_desc_t op, hint;
    dnnl_dims_t dims = {n};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&md, 1, dims, bf16 ? dnnl_bf16 : dnnl_f32, dnnl_x);
    if (s == dnnl_success)
        s = dnnl_eltwise_forward_desc_init(kind == PK_ELTWISE_FWD ? &op : &hint,
                                           dnnl_forward_training, alg, &md, alpha, 0.f);
    if (s == dnnl_success && kind == PK_ELTWISE_BWD)
        s = dnnl_eltwise_backward_desc_init(&op, alg, &md, &md, alpha, 0.f);
    return kd__cpu_cache_insert(st, &k, h, s, &op, kind == PK_ELTWISE_BWD ? &hint : NULL, out);
}

static kd_status eltwise_fwd_locked(cpu_state *st, kd_eltwise_kind kind, float alpha,
                                    const kd_tensor *x, kd_tensor *y, int *use_ref) {
    prim_entry *e;
    KD_TRY(eltwise_entry(st, PK_ELTWISE_FWD, eltwise_alg(kind), alpha, kd_tensor_numel(x),
                         x->dtype == KD_BF16, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, 0));
    exec_arg a[2] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    return kd__cpu_entry_execute(st, e, a, 2);
}

/* An elementwise operand of a packed tensor seen as a flat plain tensor of
 * the same shape (exact when every operand has the same layout). */
static kd_tensor flat_view(const kd_tensor *t) {
    kd_tensor v = *t;
    if (packed(t)) {
        v.layout = KD_LAYOUT_STRIDED;
        kd_tensor_set_shape(&v, t->ndim, t->shape);
    }
    return v;
}

kd_status kd__cpu_eltwise_forward(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                  const kd_tensor *x, kd_tensor *y) {
    if ((packed(x) || packed(y)) && x->layout == y->layout) {
        kd_tensor xv = flat_view(x), yv = flat_view(y);
        return kd__cpu_eltwise_forward(be, kind, alpha, &xv, &yv);
    }
    if (x->dtype == KD_BF16 || y->dtype == KD_BF16) {
        /* bf16 activations: ReLU only (the graph widens x for the others). */
        kd_status s = KD_OK;
        int use_ref = 0;
        if (kind != KD_ELTWISE_RELU || x->dtype != y->dtype || kd_tensor_numel(x) != kd_tensor_numel(y))
            return kd_error(KD_ERR_INVALID, "cpu eltwise: bf16 operands need ReLU with a bf16 x and y");
        if (kd_tensor_numel(x) == 0) return KD_OK;
        CPU_RUN_LOCKED(s, eltwise_fwd_locked(&kd__cpu_st, kind, alpha, x, y, &use_ref));
        if (s == KD_OK && use_ref)
            return kd_error(KD_ERR_BACKEND, "oneDNN: no bf16 ReLU kernel for %lld values",
                            (long long)kd_tensor_numel(x));
        return s;
    }
    /* oneDNN 2.6's log has up to ~4e-6 absolute error (98,000 ulp near x = 1),
     * which matters for log-ratios in distillation losses: use libm's logf. */
    int use_ref = !plain_f32(x) || !plain_f32(y) || kd_tensor_numel(x) == 0 ||
                  kd_tensor_numel(x) != kd_tensor_numel(y) ||
                  eltwise_alg(kind) == dnnl_alg_kind_undef || kind == KD_ELTWISE_LOG;
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, eltwise_fwd_locked(&kd__cpu_st, kind, alpha, x, y, &use_ref));
    if (s == KD_OK && use_ref) return ref_eltwise_fwd(be, kind, alpha, x, y);
    return s;
}

static kd_status eltwise_bwd_locked(cpu_state *st, kd_eltwise_kind kind, float alpha,
                                    const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                    int accumulate, int *use_ref) {
    int64_t n = kd_tensor_numel(dx);
    prim_entry *e;
    KD_TRY(eltwise_entry(st, PK_ELTWISE_BWD, eltwise_alg(kind), alpha, n, 0, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, accumulate ? (size_t)n : 0));
    float *out = accumulate ? kd__cpu_scratch_floats(st, e, 0) : kd_f32(dx);
    int src_arg = kind == KD_ELTWISE_EXP ? DNNL_ARG_DST : DNNL_ARG_SRC;
    exec_arg a[3] = {{src_arg, src->data}, {DNNL_ARG_DIFF_DST, dy->data}, {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(kd__cpu_entry_execute(st, e, a, 3));
    if (accumulate) kd__cpu_add_into(kd_f32(dx), out, n);
    return KD_OK;
}

/* ReLU backward on a bf16 src (x or y of a ReLU on bf16 activations) with
 * float32 dy and dx: dx (+)= src > 0 ? dy : alpha * dy, the rule of the
 * float32 kernels (a NaN src passes dy, as PyTorch's threshold_backward).
 * The sign test reads the bf16 bits: positive and nonzero. */
static void relu_bwd_bf16(float alpha, const float *restrict dy, const uint16_t *restrict src,
                          float *restrict dx, int64_t n, int accumulate) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        float d = (int16_t)src[i] > 0 ? dy[i] : alpha * dy[i];
        dx[i] = accumulate ? dx[i] + d : d;
    }
}

kd_status kd__cpu_eltwise_backward(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                   const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                   int accumulate) {
    if (src->dtype == KD_BF16) {
        if (kind != KD_ELTWISE_RELU || dy->dtype != KD_F32 || dx->dtype != KD_F32 ||
            dy->layout != src->layout || dx->layout != src->layout ||
            kd_tensor_numel(dy) != kd_tensor_numel(src) || kd_tensor_numel(dx) != kd_tensor_numel(src))
            return kd_error(KD_ERR_INVALID, "cpu eltwise backward: a bf16 src needs ReLU with "
                                            "float32 dy and dx of its layout and size");
        relu_bwd_bf16(alpha, kd_f32(dy), (const uint16_t *)src->data, kd_f32(dx),
                      kd_tensor_numel(dx), accumulate);
        return KD_OK;
    }
    if ((packed(dy) || packed(src) || packed(dx)) && dy->layout == dx->layout &&
        src->layout == dx->layout) {
        kd_tensor dyv = flat_view(dy), sv = flat_view(src), dxv = flat_view(dx);
        return kd__cpu_eltwise_backward(be, kind, alpha, &dyv, &sv, &dxv, accumulate);
    }
    int64_t n = kd_tensor_numel(dx);
    int use_ref = !plain_f32(dy) || !plain_f32(src) || !plain_f32(dx) || n == 0 ||
                  kd_tensor_numel(dy) != n || kd_tensor_numel(src) != n ||
                  eltwise_alg(kind) == dnnl_alg_kind_undef;
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, eltwise_bwd_locked(&kd__cpu_st, kind, alpha, dy, src, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_eltwise_bwd(be, kind, alpha, dy, src, dx, accumulate);
    return s;
}
