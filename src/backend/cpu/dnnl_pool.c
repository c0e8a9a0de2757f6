/* Pooling on the cpu backend (dnnl_impl.h): average pooling on oneDNN; max
 * pooling here in C, writing kd's argmax `ws` (flat h*W+w per plane) in the
 * same pass as y (oneDNN's workspace is another format). */
#include "backend/cpu/dnnl_impl.h"
#include <float.h>
#include <math.h>
#include <string.h>

static kd_status ref_pool_fwd(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *x,
                              kd_tensor *y, kd_tensor *ws) {
    if (ws && blocked(ws))
        return kd_error(KD_ERR_UNSUPPORTED, "cpu pool2d: blocked argmax needs blocked x and y");
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = kd__cpu_ps_plain(&ps, x, 0, &s), *py = kd__cpu_ps_plain(&ps, y, 1, &s);
    if (s == KD_OK) s = ref_be()->pool2d_forward(be, p, px, py, ws);
    return kd__cpu_ps_finish(&ps, s);
}

static kd_status ref_pool_bwd(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *dy,
                              const kd_tensor *ws, kd_tensor *dx, int accumulate) {
    if (ws && blocked(ws))
        return kd_error(KD_ERR_UNSUPPORTED, "cpu pool2d: blocked argmax needs blocked dy and dx");
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = kd__cpu_ps_plain(&ps, dy, 0, &s), *pdx = kd__cpu_ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK) s = ref_be()->pool2d_backward(be, p, pdy, ws, pdx, accumulate);
    return kd__cpu_ps_finish(&ps, s);
}

/* ---------------------------------------------------------------- pooling */

/* The operands pooling runs here: plain or NCHW16C float32 (an NHWC one, which
 * the graph never makes, goes to the ref kernels through plain copies). */
static int pool_4d(const kd_tensor *t) { return act_4d(t) && t->layout != KD_LAYOUT_NHWC; }

typedef struct {
    int64_t N, C, H, W, OH, OW;
    int xb, yb; /* x (dx) / y (dy) in NCHW16C */
    dnnl_dims_t kernel, stride, pad_l, pad_r; /* (h, w) */
} pool_shape;

static void pool_shape_init(pool_shape *q, const kd_pool2d_params *p, const kd_tensor *x,
                            const kd_tensor *y) {
    memset(q, 0, sizeof *q);
    q->N = x->shape[0], q->C = x->shape[1], q->H = x->shape[2], q->W = x->shape[3];
    q->OH = y->shape[2], q->OW = y->shape[3];
    q->xb = blocked(x);
    q->yb = blocked(y);
    int64_t in[2] = {q->H, q->W}, out[2] = {q->OH, q->OW};
    for (int i = 0; i < 2; i++) {
        q->kernel[i] = p->kernel[i];
        q->stride[i] = p->stride[i];
        q->pad_l[i] = p->pad[i];
        q->pad_r[i] = right_pad(in[i], out[i], p->kernel[i], p->stride[i], p->pad[i]);
    }
}

static dnnl_alg_kind_t pool_alg(const kd_pool2d_params *p) {
    if (p->kind == KD_POOL_MAX) return dnnl_pooling_max;
    return p->count_include_pad ? dnnl_pooling_avg_include_padding
                                : dnnl_pooling_avg_exclude_padding;
}

static kd_status pool_entry(cpu_state *st, prim_kind kind, dnnl_alg_kind_t alg,
                            const pool_shape *q, prim_entry **out) {
    prim_key k;
    kd__cpu_key_init(&k, kind);
    k.alg = alg;
    k.lay = q->xb | q->yb << 1;
    int64_t v[] = {q->N, q->C, q->H, q->W, q->OH, q->OW, q->kernel[0], q->kernel[1],
                   q->stride[0], q->stride[1], q->pad_l[0], q->pad_l[1]};
    memcpy(k.d, v, sizeof v);
    uint64_t h = kd__cpu_key_hash(&k);
    if ((*out = kd__cpu_cache_find(st, &k, h))) return KD_OK;

    dnnl_memory_desc_t src, dst;
    dnnl_pooling_desc_t op, hint;
    dnnl_dims_t sd = {q->N, q->C, q->H, q->W}, dd = {q->N, q->C, q->OH, q->OW};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&src, 4, sd, dnnl_f32, act_tag_of(q->xb ? KD_LAYOUT_NCHW16C : KD_LAYOUT_STRIDED));
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_tag(&dst, 4, dd, dnnl_f32, act_tag_of(q->yb ? KD_LAYOUT_NCHW16C : KD_LAYOUT_STRIDED));
    /* Forward runs as inference: max pooling's argmax is kd's own format. */
    if (s == dnnl_success)
        s = dnnl_pooling_forward_desc_init(kind == PK_POOL_FWD ? &op : &hint,
                                           kind == PK_POOL_FWD ? dnnl_forward_inference
                                                               : dnnl_forward_training,
                                           alg, &src, &dst, q->stride, q->kernel, q->pad_l,
                                           q->pad_r);
    if (s == dnnl_success && kind == PK_POOL_BWD)
        s = dnnl_pooling_backward_desc_init(&op, alg, &src, &dst, q->stride, q->kernel, q->pad_l,
                                            q->pad_r);
    return kd__cpu_cache_insert(st, &k, h, s, &op, kind == PK_POOL_BWD ? &hint : NULL, out);
}

/* Max pooling forward: y = the window's maximum and ws = its flat index
 * (h * W + w) within the channel's plane, by PyTorch's rule (the first
 * maximum; a NaN wins, the last one; padding never does). x, y and ws are
 * `groups` planes of L lanes side by side: plain NCHW is N*C groups of one
 * lane, NCHW16C N*C/16 groups of 16 (ws in y's layout). One thread per
 * (group, output row); every lane keeps its own maximum. */
static void maxpool_argmax(const pool_shape *q, int64_t groups, int L, const float *x, float *y, int32_t *ws) {
    int64_t rows = groups * q->OH;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t g = r / q->OH, oh = r % q->OH;
        const float *xp = x + g * q->H * q->W * L;
        float *yp = y + (g * q->OH + oh) * q->OW * L;
        int32_t *wp = ws + (g * q->OH + oh) * q->OW * L;
        int64_t h0 = oh * q->stride[0] - q->pad_l[0], h1 = h0 + q->kernel[0];
        if (h0 < 0) h0 = 0;
        if (h1 > q->H) h1 = q->H;
        for (int64_t ow = 0; ow < q->OW; ow++) {
            int64_t w0 = ow * q->stride[1] - q->pad_l[1], w1 = w0 + q->kernel[1];
            if (w0 < 0) w0 = 0;
            if (w1 > q->W) w1 = q->W;
            float *best = yp + ow * L;
            int32_t *arg = wp + ow * L;
            for (int l = 0; l < L; l++) best[l] = -INFINITY, arg[l] = -1;
            for (int64_t h = h0; h < h1; h++)
                for (int64_t w = w0; w < w1; w++) {
                    const float *v = xp + (h * q->W + w) * L;
                    int32_t idx = (int32_t)(h * q->W + w);
                    for (int l = 0; l < L; l++)
                        if (arg[l] < 0 || v[l] > best[l] || isnan(v[l])) best[l] = v[l], arg[l] = idx;
                }
        }
    }
}

/* Max pooling backward: dx[.., ws] (+)= dy over `groups` planes of L lanes
 * (as maxpool_argmax), one thread per group in a fixed order, so
 * deterministic. Returns the number of indices outside the plane (skipped;
 * -1 marks an empty window and is not counted). */
static int64_t maxpool_scatter(int64_t groups, int L, int64_t in_plane, int64_t out_plane, const float *dy,
                               const int32_t *ws, float *dx, int accumulate) {
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t g = 0; g < groups; g++) {
        float *dxp = dx + g * in_plane * L;
        if (!accumulate) memset(dxp, 0, (size_t)(in_plane * L) * sizeof(float));
        const float *dyp = dy + g * out_plane * L;
        const int32_t *wp = ws + g * out_plane * L;
        for (int64_t i = 0; i < out_plane * L; i++) {
            int32_t a = wp[i];
            if (a >= 0 && a < in_plane)
                dxp[a * L + i % L] += dyp[i];
            else if (a != -1)
                bad++;
        }
    }
    return bad;
}

static kd_status pool_fwd_locked(cpu_state *st, const kd_pool2d_params *p, const kd_tensor *x,
                                 kd_tensor *y, int *use_ref) {
    pool_shape q;
    pool_shape_init(&q, p, x, y);
    prim_entry *e;
    KD_TRY(pool_entry(st, PK_POOL_FWD, pool_alg(p), &q, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, 0));
    exec_arg a[2] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    return kd__cpu_entry_execute(st, e, a, 2);
}

kd_status kd__cpu_pool2d_forward(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *x,
                                 kd_tensor *y, kd_tensor *ws) {
    int use_ref = !pool_4d(x) || !pool_4d(y) || kd_tensor_numel(y) == 0 ||
                  kd_tensor_numel(x) == 0 ||
                  (p->kind == KD_POOL_MAX && (!ws || ws->dtype != KD_I32 ||
                                              kd_tensor_numel(ws) != kd_tensor_numel(y)));
    if (!use_ref && p->kind == KD_POOL_MAX) {
        pool_shape q;
        pool_shape_init(&q, p, x, y);
        int all_b = q.xb && q.yb && blocked(ws);
        if (!all_b && (q.xb || q.yb || blocked(ws)))
            return kd_error(KD_ERR_UNSUPPORTED, "cpu max pooling: x, y and ws must share a layout");
        int L = all_b ? KD_LAYOUT_BLOCK : 1;
        maxpool_argmax(&q, q.N * q.C / L, L, kd_f32(x), kd_f32(y), (int32_t *)ws->data);
        return KD_OK;
    }
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, pool_fwd_locked(&kd__cpu_st, p, x, y, &use_ref));
    if (s == KD_OK && use_ref) return ref_pool_fwd(be, p, x, y, ws);
    return s;
}

static kd_status pool_bwd_locked(cpu_state *st, const kd_pool2d_params *p, const kd_tensor *dy,
                                 kd_tensor *dx, int accumulate, int *use_ref) {
    pool_shape q;
    pool_shape_init(&q, p, dx, dy);
    prim_entry *e;
    KD_TRY(pool_entry(st, PK_POOL_BWD, pool_alg(p), &q, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    int64_t n = kd_tensor_numel(dx);
    KD_TRY(kd__cpu_scratch_reserve_for(st, e, accumulate ? (size_t)n : 0));
    float *out = accumulate ? kd__cpu_scratch_floats(st, e, 0) : kd_f32(dx);
    exec_arg a[2] = {{DNNL_ARG_DIFF_DST, dy->data}, {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(kd__cpu_entry_execute(st, e, a, 2));
    if (accumulate) kd__cpu_add_into(kd_f32(dx), out, n);
    return KD_OK;
}

kd_status kd__cpu_pool2d_backward(kd_backend *be, const kd_pool2d_params *p,
                                  const kd_tensor *dy, const kd_tensor *ws, kd_tensor *dx,
                                  int accumulate) {
    if (!pool_4d(dy) || !pool_4d(dx) || kd_tensor_numel(dy) == 0 || kd_tensor_numel(dx) == 0 ||
        (p->kind == KD_POOL_MAX && (!ws || ws->dtype != KD_I32 ||
                                    kd_tensor_numel(ws) != kd_tensor_numel(dy))))
        return ref_pool_bwd(be, p, dy, ws, dx, accumulate);
    if (p->kind == KD_POOL_MAX) {
        int64_t planes = dx->shape[0] * dx->shape[1], H = dx->shape[2], W = dx->shape[3];
        int all_b = blocked(dy) && blocked(dx) && blocked(ws);
        if (!all_b && (blocked(dy) || blocked(dx) || blocked(ws)))
            return kd_error(KD_ERR_UNSUPPORTED, "cpu max pooling: dy, ws and dx must share a layout");
        int L = all_b ? KD_LAYOUT_BLOCK : 1;
        int64_t bad = maxpool_scatter(planes / L, L, H * W, dy->shape[2] * dy->shape[3], kd_f32(dy),
                                      (const int32_t *)ws->data, kd_f32(dx), accumulate);
        if (bad)
            return kd_error(KD_ERR_INVALID,
                            "cpu pool2d_backward: %lld argmax indices fall outside the %lldx%lld input plane",
                            (long long)bad, (long long)H, (long long)W);
        return KD_OK;
    }
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, pool_bwd_locked(&kd__cpu_st, p, dy, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref) return ref_pool_bwd(be, p, dy, ws, dx, accumulate);
    return s;
}
