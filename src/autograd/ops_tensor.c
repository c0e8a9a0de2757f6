/*
 * ops_tensor.c: elementwise arithmetic, shape ops and reductions in plain C:
 * add, mul, scale, reshape/flatten, transpose, concat, slice, mean, sum and
 * dropout. Loops are OpenMP-parallel above KD__PAR_MIN elements; reductions
 * sum fixed blocks in a fixed order, so results do not depend on threads.
 */
#include "autograd/autograd_impl.h"

#include <stdio.h>
#include <string.h>

#define SHP(t, buf) kd_shape_str((t), (buf), sizeof(buf))

/* --------------------------------------------------------- add, mul */

static kd_tensor *kd__binary(kd_graph *g, kd_op op, const char *name, kd_tensor *a,
                             kd_tensor *b) {
    kd_tensor *in[2] = {a, b};
    char ba[96], bb[96];
    if (!g || !kd__ok_inputs(g, name, 2, in)) return NULL;
    /* Same layouts stay (flat loops are exact); else the blocked one goes plain. */
    if (a->layout != b->layout) {
        if (!(a = in[0] = kd__to_strided(g, a)) || !(b = in[1] = kd__to_strided(g, b)))
            return NULL;
    }
    /* Two bf16 activations add in bf16 (a residual sum); otherwise bf16
     * operands are widened. */
    const int b16 = op == KD_OP_ADD && kd__bf16_act(a) && kd__bf16_act(b);
    if (!b16 && (!(a = in[0] = kd__to_f32(g, a)) || !(b = in[1] = kd__to_f32(g, b)))) return NULL;
    if (!kd__check_act(g, name, "a", a) || !kd__check_act(g, name, "b", b)) return NULL;
    if (!kd_tensor_same_shape(a, b))
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "%s: shapes %s and %s differ", name,
                                    SHP(a, ba), SHP(b, bb)));
    kd_tensor *y = kd__new_lay(g, a->dtype, a->ndim, a->shape, a->layout);
    if (!y) return NULL;
    int64_t n = kd_tensor_numel(a);
    if (b16) {
        /* bf16(float(a) + float(b)): the float32 sum rounded once. */
        const uint16_t *restrict h0 = a->data, *restrict h1 = b->data;
        uint16_t *restrict hy = y->data;
#pragma omp parallel for simd schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) hy[i] = kd_bf16_round(kd_bf16_value(h0[i]) + kd_bf16_value(h1[i]));
        kd__record(g, op, y, 2, in);
        return g->status == KD_OK ? y : NULL;
    }
    const float *restrict x0 = kd_f32(a), *restrict x1 = kd_f32(b);
    float *restrict yd = kd_f32(y);
    /* simd: -O2 does not vectorise loops it cannot prove alias-free. */
    if (op == KD_OP_ADD) {
#pragma omp parallel for simd schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) yd[i] = x0[i] + x1[i];
    } else {
#pragma omp parallel for simd schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) yd[i] = x0[i] * x1[i];
    }
    kd__record(g, op, y, 2, in);
    return g->status == KD_OK ? y : NULL;
}

kd_tensor *kd_add(kd_graph *g, kd_tensor *a, kd_tensor *b) {
    return kd__binary(g, KD_OP_ADD, "add", a, b);
}

kd_tensor *kd_mul(kd_graph *g, kd_tensor *a, kd_tensor *b) {
    return kd__binary(g, KD_OP_MUL, "mul", a, b);
}

kd_status kd__add_backward(kd_graph *g, kd__node *n) {
    const float *dy = kd_f32(n->out->grad);
    int64_t cnt = kd_tensor_numel(n->out);
    for (int k = 0; k < 2; k++) {
        kd_tensor *x = n->in[k];
        int acc;
        if (!kd__needs_grad(g, x)) continue;
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        kd__axpy(kd_f32(dx), dy, 1.0f, cnt, acc);
    }
    return KD_OK;
}

kd_status kd__mul_backward(kd_graph *g, kd__node *n) {
    const float *dy = kd_f32(n->out->grad);
    int64_t cnt = kd_tensor_numel(n->out);
    for (int k = 0; k < 2; k++) {
        kd_tensor *x = n->in[k];
        int acc;
        if (!kd__needs_grad(g, x)) continue;
        kd_tensor *dx = kd__grad(g, x, &acc);
        if (!dx) return g->status;
        const float *o = kd_f32(n->in[1 - k]);
        float *d = kd_f32(dx);
        if (acc) {
#pragma omp parallel for schedule(static) if (cnt >= KD__PAR_MIN)
            for (int64_t i = 0; i < cnt; i++) d[i] += dy[i] * o[i];
        } else {
#pragma omp parallel for schedule(static) if (cnt >= KD__PAR_MIN)
            for (int64_t i = 0; i < cnt; i++) d[i] = dy[i] * o[i];
        }
    }
    return KD_OK;
}

/* -------------------------------------------------------------- scale */

kd_tensor *kd_scale(kd_graph *g, kd_tensor *x, float s) {
    if (!g || !kd__ok_inputs(g, "scale", 1, &x)) return NULL;
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, "scale", "input", x)) return NULL;
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    kd__axpy(kd_f32(y), kd_f32(x), s, kd_tensor_numel(x), 0);
    kd__node *n = kd__record(g, KD_OP_SCALE, y, 1, &x);
    if (n) n->p.f.a = s;
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__scale_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    kd__axpy(kd_f32(dx), kd_f32(n->out->grad), n->p.f.a, kd_tensor_numel(x), acc);
    return KD_OK;
}

/* ------------------------------------------------------------ reshape */

/* The output is a view of x's data (ops never write their inputs); its
 * gradient has its own buffer. */
kd_tensor *kd_reshape(kd_graph *g, kd_tensor *x, int ndim, const int64_t *shape) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "reshape", 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (!kd__check_f32(g, "reshape", "input", x)) return NULL;
    if (ndim < 0 || ndim > KD_MAX_DIMS || (ndim && !shape))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "reshape: rank %d is outside 0..%d", ndim,
                                    KD_MAX_DIMS));
    /* One dimension may be -1 (inferred), as in PyTorch. */
    int64_t s[KD_MAX_DIMS], known = 1, n = kd_tensor_numel(x);
    int infer = -1;
    for (int i = 0; i < ndim; i++) {
        s[i] = shape[i];
        if (s[i] == -1 && infer < 0) infer = i;
        else if (s[i] < 0) infer = -2;
        else known *= s[i];
    }
    if (infer >= 0 && known > 0 && n % known == 0) s[infer] = n / known;
    int64_t total = 1;
    for (int i = 0; i < ndim; i++) total *= s[i];
    if (infer == -2 || total != n || (infer >= 0 && known == 0)) {
        char want[128];
        size_t off = (size_t)snprintf(want, sizeof want, "(");
        for (int i = 0; i < ndim && off < sizeof want; i++)
            off += (size_t)snprintf(want + off, sizeof want - off, i ? ", %lld" : "%lld",
                                    (long long)shape[i]);
        if (off < sizeof want) snprintf(want + off, sizeof want - off, ")");
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "reshape: cannot view %s (%lld elements) as %s",
                                    SHP(x, bx), (long long)n, want));
    }
    kd_tensor *y = kd__scratch(g, sizeof *y);
    if (!y) return NULL;
    memset(y, 0, sizeof *y);
    y->dtype = x->dtype;
    y->device = x->device;
    y->layout = KD_LAYOUT_STRIDED;
    y->node = -1;
    y->data = x->data;
    kd_tensor_set_shape(y, ndim, s);
    kd__record(g, KD_OP_RESHAPE, y, 1, &x);
    return g->status == KD_OK ? y : NULL;
}

kd_tensor *kd_flatten(kd_graph *g, kd_tensor *x) {
    if (!g || !kd__ok_inputs(g, "flatten", 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (x->ndim < 1) return kd__fail(g, kd_error(KD_ERR_SHAPE, "flatten: input is a scalar"));
    int64_t n0 = x->shape[0];
    int64_t s[2] = {n0, n0 ? kd_tensor_numel(x) / n0 : 0};
    return kd_reshape(g, x, 2, s);
}

kd_status kd__reshape_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    kd__axpy(kd_f32(dx), kd_f32(n->out->grad), 1.0f, kd_tensor_numel(x), acc);
    return KD_OK;
}

/* ---------------------------------------------------------- transpose */

/* dst (+)= src with axes d0, d1 swapped; src has shape `s` (contiguous), dst
 * the swapped shape (contiguous). Viewed as (A, P, B, Q, C) -> (A, Q, B, P, C). */
static void kd__swap_axes(float *dst, const float *src, int ndim, const int64_t *s, int d0,
                          int d1, int acc) {
    int64_t A = 1, B = 1, C = 1, P = s[d0], Q = s[d1];
    for (int i = 0; i < d0; i++) A *= s[i];
    for (int i = d0 + 1; i < d1; i++) B *= s[i];
    for (int i = d1 + 1; i < ndim; i++) C *= s[i];
    int64_t rows = A * Q * B * P;
#pragma omp parallel for schedule(static) if (rows * C >= KD__PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        /* r indexes dst rows (a, q, b, p); each row is C contiguous elements. */
        int64_t p = r % P, t = r / P;
        int64_t b = t % B;
        t /= B;
        int64_t q = t % Q, a = t / Q;
        const float *sp = src + ((((a * P + p) * B + b) * Q + q) * C);
        float *dp = dst + r * C;
        if (acc)
            for (int64_t c = 0; c < C; c++) dp[c] += sp[c];
        else
            for (int64_t c = 0; c < C; c++) dp[c] = sp[c];
    }
}

kd_tensor *kd_transpose(kd_graph *g, kd_tensor *x, int dim0, int dim1) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "transpose", 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (!kd__check_f32(g, "transpose", "input", x)) return NULL;
    if (dim0 < 0) dim0 += x->ndim;
    if (dim1 < 0) dim1 += x->ndim;
    if (dim0 < 0 || dim1 < 0 || dim0 >= x->ndim || dim1 >= x->ndim)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "transpose: axes %d and %d are out of range "
                                                    "for %s", dim0, dim1, SHP(x, bx)));
    if (dim0 > dim1) {
        int t = dim0;
        dim0 = dim1;
        dim1 = t;
    }
    int64_t ys[KD_MAX_DIMS];
    for (int i = 0; i < x->ndim; i++) ys[i] = x->shape[i];
    ys[dim0] = x->shape[dim1];
    ys[dim1] = x->shape[dim0];
    kd_tensor *y = kd__new(g, KD_F32, x->ndim, ys);
    if (!y) return NULL;
    if (dim0 == dim1)
        memcpy(y->data, x->data, kd_tensor_nbytes(x));
    else
        kd__swap_axes(kd_f32(y), kd_f32(x), x->ndim, x->shape, dim0, dim1, 0);
    kd__node *n = kd__record(g, KD_OP_TRANSPOSE, y, 1, &x);
    if (n) {
        n->p.dims.d0 = dim0;
        n->p.dims.d1 = dim1;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__transpose_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0], *y = n->out;
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    if (n->p.dims.d0 == n->p.dims.d1)
        kd__axpy(kd_f32(dx), kd_f32(y->grad), 1.0f, kd_tensor_numel(x), acc);
    else
        kd__swap_axes(kd_f32(dx), kd_f32(y->grad), y->ndim, y->shape, n->p.dims.d0,
                      n->p.dims.d1, acc);
    return KD_OK;
}

/* ------------------------------------------------------- concat, slice */

/* Copies `outer` rows: dst row stride dn, src row stride sn, `cnt` elements each. */
static void kd__copy_rows(float *dst, int64_t dn, const float *src, int64_t sn, int64_t outer,
                          int64_t cnt, int acc) {
#pragma omp parallel for schedule(static) if (outer * cnt >= KD__PAR_MIN)
    for (int64_t o = 0; o < outer; o++) {
        float *d = dst + o * dn;
        const float *s = src + o * sn;
        if (acc)
            for (int64_t i = 0; i < cnt; i++) d[i] += s[i];
        else
            memcpy(d, s, (size_t)cnt * sizeof *d);
    }
}

/* Elements per index of `dim` (product of the later axes) and rows before it. */
static void kd__split(const kd_tensor *t, int dim, int64_t *outer, int64_t *inner) {
    *outer = 1;
    *inner = 1;
    for (int i = 0; i < dim; i++) *outer *= t->shape[i];
    for (int i = dim + 1; i < t->ndim; i++) *inner *= t->shape[i];
}

kd_tensor *kd_concat(kd_graph *g, kd_tensor *const *xs, int n, int dim) {
    char b0[96], bi[96];
    if (!g || g->status != KD_OK) return NULL;
    if (!xs || n < 1)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "concat: needs at least one input"));
    if (!kd__ok_inputs(g, "concat", n, xs)) return NULL;
    int any_blocked = 0;
    for (int k = 0; k < n; k++) any_blocked |= kd__packed(xs[k]);
    if (any_blocked) {
        kd_tensor **cv = kd__scratch(g, (size_t)n * sizeof *cv);
        if (!cv) return NULL;
        for (int k = 0; k < n; k++)
            if (!(cv[k] = kd__to_strided(g, xs[k]))) return NULL;
        xs = cv;
    }
    kd_tensor *x0 = xs[0];
    if (dim < 0) dim += x0->ndim;
    if (dim < 0 || dim >= x0->ndim)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "concat: axis %d is out of range for %s", dim,
                                    SHP(x0, b0)));
    int64_t ys[KD_MAX_DIMS];
    for (int i = 0; i < x0->ndim; i++) ys[i] = x0->shape[i];
    ys[dim] = 0;
    for (int k = 0; k < n; k++) {
        kd_tensor *x = xs[k];
        if (!kd__check_f32(g, "concat", "input", x)) return NULL;
        int ok = x->ndim == x0->ndim;
        for (int i = 0; ok && i < x0->ndim; i++) ok = i == dim || x->shape[i] == x0->shape[i];
        if (!ok)
            return kd__fail(g, kd_error(KD_ERR_SHAPE, "concat: input %d %s does not match input 0 "
                                                      "%s outside axis %d",
                                        k, SHP(x, bi), SHP(x0, b0), dim));
        ys[dim] += x->shape[dim];
    }
    kd_tensor *y = kd__new(g, KD_F32, x0->ndim, ys);
    if (!y) return NULL;
    int64_t outer, inner, off = 0;
    kd__split(y, dim, &outer, &inner);
    for (int k = 0; k < n; k++) {
        int64_t cnt = xs[k]->shape[dim] * inner;
        kd__copy_rows(kd_f32(y) + off, ys[dim] * inner, kd_f32(xs[k]), cnt, outer, cnt, 0);
        off += cnt;
    }
    kd__node *nd = kd__record(g, KD_OP_CONCAT, y, n, xs);
    if (nd) nd->p.dims.d0 = dim;
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__concat_backward(kd_graph *g, kd__node *n) {
    kd_tensor *y = n->out;
    int dim = n->p.dims.d0;
    int64_t outer, inner, off = 0;
    kd__split(y, dim, &outer, &inner);
    for (int k = 0; k < n->n_in; k++) {
        kd_tensor *x = n->in_list[k];
        int64_t cnt = x->shape[dim] * inner;
        int acc;
        if (kd__needs_grad(g, x)) {
            kd_tensor *dx = kd__grad(g, x, &acc);
            if (!dx) return g->status;
            kd__copy_rows(kd_f32(dx), cnt, kd_f32(y->grad) + off, y->shape[dim] * inner, outer,
                          cnt, acc);
        }
        off += cnt;
    }
    return KD_OK;
}

kd_tensor *kd_slice(kd_graph *g, kd_tensor *x, int dim, int64_t start, int64_t end) {
    char bx[96];
    if (!g || !kd__ok_inputs(g, "slice", 1, &x)) return NULL;
    if (!(x = kd__to_strided(g, x))) return NULL;
    if (!kd__check_f32(g, "slice", "input", x)) return NULL;
    if (dim < 0) dim += x->ndim;
    if (dim < 0 || dim >= x->ndim)
        return kd__fail(g, kd_error(KD_ERR_INVALID, "slice: axis %d is out of range for %s", dim,
                                    SHP(x, bx)));
    int64_t len = x->shape[dim];
    int64_t s0 = start < 0 ? start + len : start, e0 = end < 0 ? end + len : end;
    if (s0 < 0 || e0 > len || s0 > e0)
        return kd__fail(g, kd_error(KD_ERR_SHAPE, "slice: range [%lld, %lld) is outside axis %d "
                                                  "of %s",
                                    (long long)start, (long long)end, dim, SHP(x, bx)));
    int64_t ys[KD_MAX_DIMS];
    for (int i = 0; i < x->ndim; i++) ys[i] = x->shape[i];
    ys[dim] = e0 - s0;
    kd_tensor *y = kd__new(g, KD_F32, x->ndim, ys);
    if (!y) return NULL;
    int64_t outer, inner;
    kd__split(x, dim, &outer, &inner);
    kd__copy_rows(kd_f32(y), ys[dim] * inner, kd_f32(x) + s0 * inner, len * inner, outer,
                  ys[dim] * inner, 0);
    kd__node *n = kd__record(g, KD_OP_SLICE, y, 1, &x);
    if (n) {
        n->p.dims.d0 = dim;
        n->p.dims.start = s0;
        n->p.dims.end = e0;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__slice_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int dim = n->p.dims.d0;
    int64_t outer, inner, len = x->shape[dim], s0 = n->p.dims.start;
    kd__split(x, dim, &outer, &inner);
    int64_t cnt = (n->p.dims.end - s0) * inner;
    float *d = kd_f32(dx);
    if (!acc) memset(d, 0, kd_tensor_nbytes(dx)); /* outside the slice the gradient is 0 */
    kd__copy_rows(d + s0 * inner, len * inner, kd_f32(n->out->grad), cnt, outer, cnt, 1);
    return KD_OK;
}

/* --------------------------------------------------------- reductions */

static kd_tensor *kd__reduce(kd_graph *g, kd_op op, const char *name, kd_tensor *x) {
    if (!g || !kd__ok_inputs(g, name, 1, &x)) return NULL;
    /* A sum over every element reads any layout (the gradient is uniform). */
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, name, "input", x)) return NULL;
    kd_tensor *y = kd__new(g, KD_F32, 0, NULL);
    if (!y) return NULL;
    int64_t n = kd_tensor_numel(x);
    double s = kd__sum_f64(g, kd_f32(x), n);
    if (op == KD_OP_MEAN) s = n ? s / (double)n : 0.0 / 0.0;
    kd_f32(y)[0] = (float)s;
    kd__record(g, op, y, 1, &x);
    return g->status == KD_OK ? y : NULL;
}

kd_tensor *kd_mean(kd_graph *g, kd_tensor *x) { return kd__reduce(g, KD_OP_MEAN, "mean", x); }
kd_tensor *kd_sum(kd_graph *g, kd_tensor *x) { return kd__reduce(g, KD_OP_SUM, "sum", x); }

static kd_status kd__fill_grad(kd_graph *g, kd_tensor *x, float v) {
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    int64_t n = kd_tensor_numel(x);
    float *d = kd_f32(dx);
    if (acc) {
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) d[i] += v;
    } else {
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN)
        for (int64_t i = 0; i < n; i++) d[i] = v;
    }
    return KD_OK;
}

kd_status kd__mean_backward(kd_graph *g, kd__node *n) {
    int64_t cnt = kd_tensor_numel(n->in[0]);
    return kd__fill_grad(g, n->in[0], kd_f32(n->out->grad)[0] / (float)(cnt ? cnt : 1));
}

kd_status kd__sum_backward(kd_graph *g, kd__node *n) {
    return kd__fill_grad(g, n->in[0], kd_f32(n->out->grad)[0]);
}

/* ------------------------------------------------------------ dropout */

/* Element i is kept when the i-th uniform draw of the node's Philox stream is
 * >= p; the mask is recomputed in backward instead of stored. Returns the
 * multiplier (0 or 1/(1-p)). */
static inline float kd__drop_mult(uint64_t seed, uint64_t key, int64_t i, float p, float inv,
                                  uint32_t *blk, int64_t *blk_id) {
    int64_t b = i >> 2;
    if (b != *blk_id) {
        kd_philox4x32(seed, key, (uint64_t)b, blk);
        *blk_id = b;
    }
    float u = (float)(blk[i & 3] >> 8) * (1.0f / 16777216.0f);
    return u >= p ? inv : 0.0f;
}

#define KD__DROP_CHUNK 4096 /* multiple of 4: a chunk never splits a Philox block */

static void kd__dropout_apply(float *dst, const float *src, int64_t n, uint64_t seed,
                              uint64_t key, float p, int acc) {
    float inv = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    int64_t nchunk = (n + KD__DROP_CHUNK - 1) / KD__DROP_CHUNK;
#pragma omp parallel for schedule(static) if (n >= KD__PAR_MIN)
    for (int64_t c = 0; c < nchunk; c++) {
        uint32_t blk[4];
        int64_t blk_id = -1;
        int64_t lo = c * KD__DROP_CHUNK, hi = lo + KD__DROP_CHUNK < n ? lo + KD__DROP_CHUNK : n;
        for (int64_t i = lo; i < hi; i++) {
            float m = kd__drop_mult(seed, key, i, p, inv, blk, &blk_id);
            dst[i] = acc ? dst[i] + m * src[i] : m * src[i];
        }
    }
}

kd_tensor *kd_dropout(kd_graph *g, kd_tensor *x, float p, int training) {
    if (!g || !kd__ok_inputs(g, "dropout", 1, &x)) return NULL;
    if (!(p >= 0.0f && p <= 1.0f))
        return kd__fail(g, kd_error(KD_ERR_INVALID, "dropout: probability %g is outside [0, 1]",
                                    (double)p));
    if (!training || p == 0.0f) return x;
    if (!(x = kd__to_f32(g, x)) || !kd__check_f32_any(g, "dropout", "input", x)) return NULL;
    kd_tensor *y = kd__new_like(g, x);
    if (!y) return NULL;
    uint64_t key = kd_rng_key(g->step_key, g->n_dropout++);
    kd__dropout_apply(kd_f32(y), kd_f32(x), kd_tensor_numel(x), g->seed, key, p, 0);
    kd__node *n = kd__record(g, KD_OP_DROPOUT, y, 1, &x);
    if (n) {
        n->p.f.a = p;
        n->p.f.key = key;
        n->p.f.seed = g->seed;
    }
    return g->status == KD_OK ? y : NULL;
}

kd_status kd__dropout_backward(kd_graph *g, kd__node *n) {
    kd_tensor *x = n->in[0];
    int acc;
    if (!kd__needs_grad(g, x)) return KD_OK;
    kd_tensor *dx = kd__grad(g, x, &acc);
    if (!dx) return g->status;
    kd__dropout_apply(kd_f32(dx), kd_f32(n->out->grad), kd_tensor_numel(x), n->p.f.seed, n->p.f.key,
                      n->p.f.a, acc);
    return KD_OK;
}
