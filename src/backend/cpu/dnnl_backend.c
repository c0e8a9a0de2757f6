/*
 * dnnl_backend.c: the "cpu" backend, on oneDNN 2.x through its C API.
 *
 * What runs where:
 *   conv2d forward / backward data / backward weights (+bias)  oneDNN convolution
 *   batch norm forward (train, eval) and backward             oneDNN batch normalization,
 *       running statistics and save_rstd computed here (oneDNN does not update them)
 *   average pooling forward and backward                      oneDNN pooling
 *   max pooling forward and backward                          here, in C: kd's argmax `ws`
 *       (flat h*W+w per plane) is not oneDNN's workspace format, and one pass that
 *       writes y and ws costs less than oneDNN's pass plus an argmax pass
 *   gemm                                                      dnnl_sgemm (row-major)
 *   batched gemm                                              oneDNN matmul with a batch
 *       dimension (transposes as strides), or a loop of dnnl_sgemm (kd__cpu_set_bmm_mode)
 *   layer norm forward and backward                           oneDNN layer normalization,
 *       rstd computed here from oneDNN's variance (and the variance rebuilt for backward)
 *   softmax over the last axis forward and backward           oneDNN softmax
 *   eltwise relu / leaky relu, exp, log, gelu (erf) fwd/bwd   oneDNN eltwise (log forward: libm)
 * A configuration oneDNN rejects (dnnl_unimplemented or invalid arguments at
 * descriptor creation) runs on the ref kernels, with a debug log line.
 *
 * Performance design:
 *   - One engine and one stream per process, created on first use.
 *   - A hash map from a key (op kind, every shape and parameter) to the
 *     primitive descriptor, the primitive and its memory objects, so a shape
 *     costs one primitive creation; later calls only swap data handles.
 *     Rejected configurations are cached too (pd == NULL).
 *   - User-managed scratchpad: every primitive is created with
 *     dnnl_scratchpad_mode_user and runs on one growable buffer owned by the
 *     backend. Kernels that need temporaries (accumulate=1, statistics) take
 *     them from the same buffer, after the scratchpad part.
 *   - Activations are plain NCHW or kd's blocked NCHW16C (oneDNN nChw16c),
 *     each operand in its own tensor's layout (blocked_channels = 16). A conv
 *     with a blocked operand is created with dnnl_format_tag_any weights:
 *     kd's weights stay OIHW, and a cached reorder (OIHW -> the pd's format
 *     before forward / backward data; the pd's format -> OIHW after backward
 *     weights) runs into the scratch buffer every call (weights change every
 *     step; they are small). All-plain convs keep plain OIHW weights. The
 *     formats are chosen in one place (conv_layout_tags).
 *   - A configuration that ends on the ref kernels with blocked operands
 *     runs them on plain heap copies (a rare path: shapes oneDNN rejects).
 *
 * Threading and determinism: oneDNN runs on OpenMP with kd's thread count;
 * every reduction here is either done by oneDNN (fixed partition for a fixed
 * thread count) or by one thread per output in a fixed order. One mutex
 * guards the cache, the cached memory objects and the scratch buffer for the
 * whole of a kernel call (one graph uses a backend at a time anyway).
 */
#include "backend/cpu/dnnl_backend.h"
#include "backend/backend_impl.h"

#include <dnnl.h>
#include <dnnl_debug.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ status check */

/* Turns a failing dnnl_status_t into kd_error(KD_ERR_BACKEND) naming the
 * oneDNN call (the text of `expr` up to its '(') and the status. */
static kd_status dnnl__check(dnnl_status_t st, const char *expr) {
    if (st == dnnl_success) return KD_OK;
    int n = (int)strcspn(expr, "(");
    return kd_error(KD_ERR_BACKEND, "oneDNN %.*s failed: %s", n, expr, dnnl_status2str(st));
}

/* Evaluates to KD_OK or the kd_status of a failing oneDNN call; use as
 * KD_TRY(KD_DNNL_CHECK(dnnl_...(...))). */
#define KD_DNNL_CHECK(call) dnnl__check((call), #call)

/* ------------------------------------------------------------------ state */

#define CPU_BUCKETS 256 /* power of two */
#define CPU_KEY_DIMS 18
#define CPU_MAX_ARGS 12

typedef enum {
    PK_CONV_FWD = 1,
    PK_CONV_BWD_DATA,
    PK_CONV_BWD_WEIGHTS,
    PK_BN_FWD,
    PK_BN_BWD,
    PK_POOL_FWD,
    PK_POOL_BWD,
    PK_ELTWISE_FWD,
    PK_ELTWISE_BWD,
    PK_LN_FWD,
    PK_LN_BWD,
    PK_MATMUL,
    PK_SOFTMAX_FWD,
    PK_SOFTMAX_BWD,
} prim_kind;

/* Everything that determines a primitive. Zeroed before filling so that it
 * can be hashed and compared as bytes. */
typedef struct {
    int32_t kind;  /* prim_kind */
    int32_t alg;   /* dnnl_alg_kind_t (conv, pool, eltwise) */
    int32_t flags; /* conv: has bias; bn: dnnl_normalization_flags_t */
    int32_t prop;  /* dnnl_prop_kind_t */
    int32_t lay;   /* layout bits: 1 src (x / dx) blocked, 2 dst (y / dy) blocked */
    int64_t d[CPU_KEY_DIMS];
    float f[2];    /* eltwise alpha; bn eps */
} prim_key;

typedef struct prim_entry prim_entry;
struct prim_entry {
    prim_key key;
    uint64_t hash;
    dnnl_primitive_desc_t pd;      /* NULL: oneDNN rejected this key, use ref */
    dnnl_primitive_desc_t hint_pd; /* forward pd a backward pd was created against */
    dnnl_primitive_t prim;
    size_t scratch_bytes;          /* scratch bytes before the kernel's temporary floats */
    size_t pad_bytes;              /* user scratchpad the primitive itself needs */
    /* Conv with format_tag_any weights in a format other than OIHW: the
     * cached reorder between kd's OIHW and the pd's format. The reordered
     * weights live in scratch at wofs (after the scratchpads), wbytes long. */
    dnnl_primitive_t wre;
    dnnl_memory_t wre_mem[3];      /* from, to, scratchpad */
    size_t wre_pad, wofs, wbytes;
    int nmem;
    int mem_arg[CPU_MAX_ARGS];     /* DNNL_ARG_* of mem[i] */
    dnnl_memory_t mem[CPU_MAX_ARGS];
    prim_entry *next;
};

typedef struct {
    pthread_mutex_t lock;
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    prim_entry *buckets[CPU_BUCKETS];
    int nentries;
    int nprims_created;
    void *scratch; /* (scratch_cap) bytes, 64-byte aligned */
    size_t scratch_cap;
} cpu_state;

static cpu_state g_cpu = {.lock = PTHREAD_MUTEX_INITIALIZER};
static kd_backend g_cpu_backend; /* defined at the end of the file */

static kd_status state_init_locked(cpu_state *st) {
    if (st->stream) return KD_OK;
    if (!st->engine) KD_TRY(KD_DNNL_CHECK(dnnl_engine_create(&st->engine, dnnl_cpu, 0)));
    KD_TRY(KD_DNNL_CHECK(dnnl_stream_create(&st->stream, st->engine, dnnl_stream_default_flags)));
    return KD_OK;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Makes the scratch buffer at least `bytes` long. Invalidates earlier
 * pointers into it, so each kernel reserves once, before carving. */
static kd_status scratch_reserve(cpu_state *st, size_t bytes) {
    if (bytes <= st->scratch_cap) return KD_OK;
    size_t cap = st->scratch_cap + st->scratch_cap / 2;
    if (cap < bytes) cap = bytes;
    cap = (cap + 4095) & ~(size_t)4095;
    kd_aligned_free(st->scratch);
    st->scratch = kd_aligned_alloc(cap);
    if (!st->scratch) {
        st->scratch_cap = 0;
        return kd_error(KD_ERR_NOMEM, "cpu backend: cannot allocate %zu bytes of scratch", cap);
    }
    st->scratch_cap = cap;
    return KD_OK;
}

/* Temporary floats after the scratchpad part of the buffer; `off` in floats. */
static float *scratch_floats(cpu_state *st, const prim_entry *e, size_t off) {
    return (float *)((char *)st->scratch + align64(e ? e->scratch_bytes : 0)) + off;
}

static kd_status scratch_reserve_for(cpu_state *st, const prim_entry *e, size_t nfloats) {
    return scratch_reserve(st, align64(e ? e->scratch_bytes : 0) + nfloats * sizeof(float));
}

/* ------------------------------------------------------------------ cache */

static void key_init(prim_key *k, prim_kind kind) {
    memset(k, 0, sizeof *k);
    k->kind = kind;
}

static uint64_t key_hash(const prim_key *k) {
    const unsigned char *p = (const unsigned char *)k;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < sizeof *k; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static prim_entry *cache_find(cpu_state *st, const prim_key *k, uint64_t h) {
    for (prim_entry *e = st->buckets[h & (CPU_BUCKETS - 1)]; e; e = e->next)
        if (e->hash == h && memcmp(&e->key, k, sizeof *k) == 0) return e;
    return NULL;
}

static void entry_free(prim_entry *e) {
    for (int i = 0; i < e->nmem; i++) dnnl_memory_destroy(e->mem[i]);
    for (int i = 0; i < 3; i++)
        if (e->wre_mem[i]) dnnl_memory_destroy(e->wre_mem[i]);
    if (e->wre) dnnl_primitive_destroy(e->wre);
    if (e->prim) dnnl_primitive_destroy(e->prim);
    if (e->pd) dnnl_primitive_desc_destroy(e->pd);
    if (e->hint_pd) dnnl_primitive_desc_destroy(e->hint_pd);
    free(e);
}

static const char *kind_name(int kind) {
    switch (kind) {
    case PK_CONV_FWD: return "convolution forward";
    case PK_CONV_BWD_DATA: return "convolution backward data";
    case PK_CONV_BWD_WEIGHTS: return "convolution backward weights";
    case PK_BN_FWD: return "batch normalization forward";
    case PK_BN_BWD: return "batch normalization backward";
    case PK_POOL_FWD: return "pooling forward";
    case PK_POOL_BWD: return "pooling backward";
    case PK_ELTWISE_FWD: return "eltwise forward";
    case PK_ELTWISE_BWD: return "eltwise backward";
    case PK_LN_FWD: return "layer normalization forward";
    case PK_LN_BWD: return "layer normalization backward";
    case PK_MATMUL: return "matmul";
    case PK_SOFTMAX_FWD: return "softmax forward";
    case PK_SOFTMAX_BWD: return "softmax backward";
    }
    return "primitive";
}

static int status_is_rejection(dnnl_status_t s) {
    return s == dnnl_unimplemented || s == dnnl_invalid_arguments;
}

/* Creates the cache entry for key k: the primitive descriptor for `op` (for a
 * backward op, against a forward pd made from `hint_op`) and its primitive.
 * `init_status` is what the op descriptor initialisation returned (both op
 * and hint). A rejection by oneDNN is cached as an entry with pd == NULL;
 * other failures are errors. */
static kd_status cache_insert_sum(cpu_state *st, const prim_key *k, uint64_t h,
                                  dnnl_status_t init_status, const_dnnl_op_desc_t op,
                                  const_dnnl_op_desc_t hint_op, int post_sum, prim_entry **out);

static kd_status cache_insert(cpu_state *st, const prim_key *k, uint64_t h,
                              dnnl_status_t init_status, const_dnnl_op_desc_t op,
                              const_dnnl_op_desc_t hint_op, prim_entry **out) {
    return cache_insert_sum(st, k, h, init_status, op, hint_op, 0, out);
}

/* cache_insert with, when post_sum is 1, a sum post-op (dst += result). */
static kd_status cache_insert_sum(cpu_state *st, const prim_key *k, uint64_t h,
                                  dnnl_status_t init_status, const_dnnl_op_desc_t op,
                                  const_dnnl_op_desc_t hint_op, int post_sum, prim_entry **out) {
    *out = NULL;
    prim_entry *e = calloc(1, sizeof *e);
    if (!e) return kd_error(KD_ERR_NOMEM, "cpu backend: out of memory for a cache entry");
    e->key = *k;
    e->hash = h;
    kd_status s = KD_OK;
    dnnl_status_t ds = init_status;
    dnnl_primitive_attr_t attr = NULL;
    if (ds == dnnl_success) {
        s = KD_DNNL_CHECK(dnnl_primitive_attr_create(&attr));
        if (s != KD_OK) goto fail;
        s = KD_DNNL_CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
        if (s != KD_OK) goto fail;
        if (post_sum) {
            dnnl_post_ops_t po = NULL;
            s = KD_DNNL_CHECK(dnnl_post_ops_create(&po));
            if (s == KD_OK) s = KD_DNNL_CHECK(dnnl_post_ops_append_sum(po, 1.0f));
            if (s == KD_OK) s = KD_DNNL_CHECK(dnnl_primitive_attr_set_post_ops(attr, po));
            if (po) dnnl_post_ops_destroy(po);
            if (s != KD_OK) goto fail;
        }
    }
    if (ds == dnnl_success && hint_op)
        ds = dnnl_primitive_desc_create(&e->hint_pd, hint_op, attr, st->engine, NULL);
    if (ds == dnnl_success)
        ds = dnnl_primitive_desc_create(&e->pd, op, attr, st->engine, e->hint_pd);
    if (ds != dnnl_success) {
        if (!status_is_rejection(ds)) {
            s = dnnl__check(ds, "dnnl_primitive_desc_create");
            goto fail;
        }
        /* Rejected: remember it, the caller runs the ref kernel. */
        if (e->pd) dnnl_primitive_desc_destroy(e->pd);
        if (e->hint_pd) dnnl_primitive_desc_destroy(e->hint_pd);
        e->pd = e->hint_pd = NULL;
        kd_log_msg(KD_LOG_DEBUG, "cpu backend: oneDNN rejects this %s (%s); using the ref kernel",
               kind_name(k->kind), dnnl_status2str(ds));
    } else {
        s = KD_DNNL_CHECK(dnnl_primitive_create(&e->prim, e->pd));
        if (s != KD_OK) goto fail;
        st->nprims_created++;
        const dnnl_memory_desc_t *smd = dnnl_primitive_desc_query_md(e->pd, dnnl_query_scratchpad_md, 0);
        e->pad_bytes = smd ? dnnl_memory_desc_get_size(smd) : 0;
        e->scratch_bytes = e->pad_bytes;
    }
    if (attr) dnnl_primitive_attr_destroy(attr);
    prim_entry **b = &st->buckets[h & (CPU_BUCKETS - 1)];
    e->next = *b;
    *b = e;
    st->nentries++;
    *out = e;
    return KD_OK;
fail:
    if (attr) dnnl_primitive_attr_destroy(attr);
    entry_free(e);
    return s;
}

/* The memory object of argument `arg` of e, created on first use from the
 * pd's own descriptor for it, pointed at `ptr`. */
static kd_status entry_mem(cpu_state *st, prim_entry *e, int arg, const void *ptr,
                           dnnl_memory_t *out) {
    int i = 0;
    while (i < e->nmem && e->mem_arg[i] != arg) i++;
    if (i == e->nmem) {
        if (e->nmem == CPU_MAX_ARGS)
            return kd_error(KD_ERR_INTERNAL, "cpu backend: too many arguments for a primitive");
        const dnnl_memory_desc_t *md = dnnl_primitive_desc_query_md(e->pd, dnnl_query_exec_arg_md, arg);
        if (!md) return kd_error(KD_ERR_BACKEND, "oneDNN dnnl_primitive_desc_query_md failed for argument %d", arg);
        KD_TRY(KD_DNNL_CHECK(dnnl_memory_create(&e->mem[i], md, st->engine, DNNL_MEMORY_NONE)));
        e->mem_arg[i] = arg;
        e->nmem++;
    }
    KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->mem[i], (void *)ptr)));
    *out = e->mem[i];
    return KD_OK;
}

typedef struct {
    int arg;
    const void *ptr;
} exec_arg;

/* Runs e on (args) plus the scratchpad, which must have been reserved. */
static kd_status entry_execute(cpu_state *st, prim_entry *e, const exec_arg *args, int nargs) {
    dnnl_exec_arg_t a[CPU_MAX_ARGS];
    int n = 0;
    for (int i = 0; i < nargs; i++) {
        a[n].arg = args[i].arg;
        KD_TRY(entry_mem(st, e, args[i].arg, args[i].ptr, &a[n].memory));
        n++;
    }
    if (e->pad_bytes) {
        if (st->scratch_cap < e->scratch_bytes)
            return kd_error(KD_ERR_INTERNAL, "cpu backend: scratchpad not reserved");
        a[n].arg = DNNL_ARG_SCRATCHPAD;
        KD_TRY(entry_mem(st, e, DNNL_ARG_SCRATCHPAD, st->scratch, &a[n].memory));
        n++;
    }
    KD_TRY(KD_DNNL_CHECK(dnnl_primitive_execute(e->prim, st->stream, n, a)));
    KD_TRY(KD_DNNL_CHECK(dnnl_stream_wait(st->stream)));
    return KD_OK;
}

/* -------------------------------------------------------------- utilities */

/* dst += src, n floats. */
static void add_into(float *restrict dst, const float *restrict src, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

static kd_backend *ref_be(void) { return kd__backend_ref(); }

/* Floats of scratch that hold n bf16 values, rounded up to 64 bytes. */
static size_t bf16_floats(int64_t n) { return align64((size_t)n * 2) / sizeof(float); }

/* bf16(v): round to nearest even, as PyTorch's .to(torch.bfloat16) and
 * oneDNN's reorders; NaN stays a quiet NaN. */
static inline uint16_t bf16_round(uint32_t v) {
    uint32_t r = (v + 0x7fffu + ((v >> 16) & 1u)) >> 16;
    return (uint16_t)((v & 0x7fffffffu) > 0x7f800000u ? (v >> 16) | 0x40u : r);
}

/* dst = bf16(src), n values; the kernel reads the result as dnnl_bf16. With
 * AVX-512-BF16 compiled in, 16 at a time with vcvtneps2bf16 (the same
 * rounding; like oneDNN's own conversion it flushes float32 denormals, below
 * 1.2e-38, to zero). Memory-bound: one pass, parallel over blocks. */
static void cvt_f32_bf16(uint16_t *dst, const float *src, int64_t n) {
    const int64_t blk = 4096;
    const int64_t nb = (n + blk - 1) / blk;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t b = 0; b < nb; b++) {
        int64_t i = b * blk, end = i + blk < n ? i + blk : n;
#if defined(__AVX512BF16__)
        for (; i + 16 <= end; i += 16) {
            __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
            _mm256_storeu_si256((__m256i *)(void *)(dst + i), (__m256i)h);
        }
#endif
        for (; i < end; i++) {
            uint32_t v;
            memcpy(&v, &src[i], sizeof v);
            dst[i] = bf16_round(v);
        }
    }
}

/* The tensors oneDNN gets here: float32, plain row-major, contiguous, on
 * the CPU. Anything else goes to the ref kernels (which report it). */
static int plain_f32(const kd_tensor *t) {
    return t && t->dtype == KD_F32 && t->device == KD_DEVICE_CPU &&
           t->layout == KD_LAYOUT_STRIDED && t->data && kd_tensor_is_contiguous(t);
}

/* conv2d and pool2d operands: plain and 4-d. */
static int plain_4d(const kd_tensor *t) { return plain_f32(t) && t->ndim == 4; }

static int blocked(const kd_tensor *t) { return t && t->layout == KD_LAYOUT_NCHW16C; }

/* A 4-d float32 activation oneDNN can take: plain contiguous NCHW, or
 * NCHW16C with C % 16 == 0. */
static int act_4d(const kd_tensor *t) {
    if (blocked(t))
        return t->dtype == KD_F32 && t->device == KD_DEVICE_CPU && t->data && t->ndim == 4 &&
               t->shape[1] % KD_LAYOUT_BLOCK == 0;
    return plain_4d(t);
}

static dnnl_format_tag_t act_tag(int is_blocked) { return is_blocked ? dnnl_nChw16c : dnnl_nchw; }

/* ---- ref fallback for blocked operands: plain heap copies (rare path) */

#define PS_MAX 6
typedef struct {
    int n;
    kd_tensor tmp[PS_MAX];
    kd_tensor *orig[PS_MAX];
    int is_out[PS_MAX];
} plain_set;

/* t itself when it is not blocked, else a plain heap copy of it (NULL and
 * *s set on OOM). Outputs are copied too (accumulate reads them). */
static kd_tensor *ps_plain(plain_set *ps, const kd_tensor *t, int is_out, kd_status *s) {
    if (!blocked(t) || *s != KD_OK) return (kd_tensor *)t;
    if (ps->n == PS_MAX) {
        *s = kd_error(KD_ERR_INTERNAL, "cpu backend: too many blocked operands");
        return NULL;
    }
    kd_tensor *c = &ps->tmp[ps->n];
    *c = *t;
    c->layout = KD_LAYOUT_STRIDED;
    kd_tensor_set_shape(c, t->ndim, t->shape);
    c->data = kd_aligned_alloc(kd_tensor_nbytes(t) ? kd_tensor_nbytes(t) : 64);
    if (!c->data) {
        *s = kd_error(KD_ERR_NOMEM, "cpu backend: out of memory for a plain copy of %zu bytes",
                      kd_tensor_nbytes(t));
        return NULL;
    }
    int64_t HW = t->shape[2] * t->shape[3];
    kd_layout_to_strided(kd_f32(c), kd_f32(t), t->shape[0], t->shape[1], HW, 0);
    ps->orig[ps->n] = (kd_tensor *)t;
    ps->is_out[ps->n] = is_out;
    ps->n++;
    return c;
}

/* Converts the outputs back into their blocked tensors (when s is KD_OK)
 * and frees the copies; returns s. */
static kd_status ps_finish(plain_set *ps, kd_status s) {
    for (int i = 0; i < ps->n; i++) {
        kd_tensor *o = ps->orig[i], *c = &ps->tmp[i];
        if (s == KD_OK && ps->is_out[i])
            kd_layout_to_nchw16c(kd_f32(o), kd_f32(c), o->shape[0], o->shape[1],
                                 o->shape[2] * o->shape[3], 0);
        kd_aligned_free(c->data);
    }
    ps->n = 0;
    return s;
}

/* The ref kernels, taking blocked operands through plain copies. */
static kd_status ref_conv_fwd(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                              const kd_tensor *w, const kd_tensor *b, kd_tensor *y) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = ps_plain(&ps, x, 0, &s), *py = ps_plain(&ps, y, 1, &s);
    if (s == KD_OK) s = ref_be()->conv2d_forward(be, p, px, w, b, py);
    return ps_finish(&ps, s);
}

static kd_status ref_conv_bwd_data(kd_backend *be, const kd_conv2d_params *p,
                                   const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                   int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = ps_plain(&ps, dy, 0, &s), *pdx = ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK) s = ref_be()->conv2d_backward_data(be, p, pdy, w, pdx, accumulate);
    return ps_finish(&ps, s);
}

static kd_status ref_conv_bwd_weights(kd_backend *be, const kd_conv2d_params *p,
                                      const kd_tensor *dy, const kd_tensor *x, kd_tensor *dw,
                                      kd_tensor *db, int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = ps_plain(&ps, dy, 0, &s), *px = ps_plain(&ps, x, 0, &s);
    if (s == KD_OK) s = ref_be()->conv2d_backward_weights(be, p, pdy, px, dw, db, accumulate);
    return ps_finish(&ps, s);
}

static kd_status ref_bn_fwd(kd_backend *be, const kd_bn_params *p, const kd_tensor *x,
                            const kd_tensor *gamma, const kd_tensor *beta,
                            kd_tensor *running_mean, kd_tensor *running_var, kd_tensor *y,
                            kd_tensor *save_mean, kd_tensor *save_rstd) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = ps_plain(&ps, x, 0, &s), *py = ps_plain(&ps, y, 1, &s);
    if (s == KD_OK)
        s = ref_be()->batchnorm_forward(be, p, px, gamma, beta, running_mean, running_var, py,
                                        save_mean, save_rstd);
    return ps_finish(&ps, s);
}

static kd_status ref_bn_bwd(kd_backend *be, const kd_bn_params *p, const kd_tensor *dy,
                            const kd_tensor *x, const kd_tensor *gamma,
                            const kd_tensor *save_mean, const kd_tensor *save_rstd,
                            kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta, int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = ps_plain(&ps, dy, 0, &s), *px = ps_plain(&ps, x, 0, &s);
    kd_tensor *pdx = ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK)
        s = ref_be()->batchnorm_backward(be, p, pdy, px, gamma, save_mean, save_rstd, pdx,
                                         dgamma, dbeta, accumulate);
    return ps_finish(&ps, s);
}

static kd_status ref_pool_fwd(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *x,
                              kd_tensor *y, kd_tensor *ws) {
    if (ws && blocked(ws))
        return kd_error(KD_ERR_UNSUPPORTED, "cpu pool2d: blocked argmax needs blocked x and y");
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = ps_plain(&ps, x, 0, &s), *py = ps_plain(&ps, y, 1, &s);
    if (s == KD_OK) s = ref_be()->pool2d_forward(be, p, px, py, ws);
    return ps_finish(&ps, s);
}

static kd_status ref_pool_bwd(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *dy,
                              const kd_tensor *ws, kd_tensor *dx, int accumulate) {
    if (ws && blocked(ws))
        return kd_error(KD_ERR_UNSUPPORTED, "cpu pool2d: blocked argmax needs blocked dy and dx");
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = ps_plain(&ps, dy, 0, &s), *pdx = ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK) s = ref_be()->pool2d_backward(be, p, pdy, ws, pdx, accumulate);
    return ps_finish(&ps, s);
}

static kd_status ref_eltwise_fwd(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                 const kd_tensor *x, kd_tensor *y) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *px = ps_plain(&ps, x, 0, &s), *py = ps_plain(&ps, y, 1, &s);
    if (s == KD_OK) s = ref_be()->eltwise_forward(be, kind, alpha, px, py);
    return ps_finish(&ps, s);
}

static kd_status ref_eltwise_bwd(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                 const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                 int accumulate) {
    plain_set ps = {0};
    kd_status s = KD_OK;
    kd_tensor *pdy = ps_plain(&ps, dy, 0, &s), *psrc = ps_plain(&ps, src, 0, &s);
    kd_tensor *pdx = ps_plain(&ps, dx, 1, &s);
    if (s == KD_OK) s = ref_be()->eltwise_backward(be, kind, alpha, pdy, psrc, pdx, accumulate);
    return ps_finish(&ps, s);
}

/* Runs `call` (a *_locked kernel body) under the backend lock, after making
 * sure the engine and stream exist; its status lands in `s`. */
#define CPU_RUN_LOCKED(s, call)                          \
    do {                                                 \
        pthread_mutex_lock(&g_cpu.lock);                 \
        (s) = state_init_locked(&g_cpu);                 \
        if ((s) == KD_OK) (s) = (call);                  \
        pthread_mutex_unlock(&g_cpu.lock);               \
    } while (0)

/* ------------------------------------------------------------ convolution */

typedef struct {
    int64_t N, C, H, W, O, KH, KW, OH, OW, G;
    int xb, yb; /* x (dx) / y (dy) in NCHW16C */
    int bf16;   /* bf16 operands (converted in scratch), f32 results */
    /* (h, w) in dnnl_dims_t, the array type oneDNN reads; dil is (dilation - 1). */
    dnnl_dims_t stride, pad_l, pad_r, dil;
} conv_shape;

/* oneDNN checks (in + pl + pr - ext) / stride + 1 == out with integer
 * division; give it the exact right padding the output needs (never below 0). */
static int64_t right_pad(int64_t in, int64_t out, int64_t ext, int64_t stride, int64_t pl) {
    int64_t pr = (out - 1) * stride + ext - in - pl;
    return pr > 0 ? pr : 0;
}

static void conv_shape_init(conv_shape *c, const kd_conv2d_params *p, const kd_tensor *x,
                            const kd_tensor *w, const kd_tensor *y) {
    memset(c, 0, sizeof *c);
    c->N = x->shape[0], c->C = x->shape[1], c->H = x->shape[2], c->W = x->shape[3];
    c->O = w->shape[0], c->KH = w->shape[2], c->KW = w->shape[3];
    c->OH = y->shape[2], c->OW = y->shape[3];
    c->G = p->groups > 0 ? p->groups : 1;
    c->xb = blocked(x);
    c->yb = blocked(y);
    c->bf16 = p->bf16 && g_cpu_backend.bf16;
    int64_t in[2] = {c->H, c->W}, out[2] = {c->OH, c->OW}, k[2] = {c->KH, c->KW};
    for (int i = 0; i < 2; i++) {
        c->stride[i] = p->stride[i];
        c->pad_l[i] = p->pad[i];
        c->dil[i] = p->dilation[i] - 1;
        c->pad_r[i] = right_pad(in[i], out[i], p->dilation[i] * (k[i] - 1) + 1, p->stride[i],
                                p->pad[i]);
    }
}

static void conv_key(prim_key *k, prim_kind kind, const conv_shape *c, int has_bias) {
    key_init(k, kind);
    k->flags = has_bias;
    k->lay = c->xb | c->yb << 1 | c->bf16 << 2;
    int64_t v[] = {c->N, c->C, c->H, c->W, c->O, c->KH, c->KW, c->OH, c->OW, c->G,
                   c->stride[0], c->stride[1], c->pad_l[0], c->pad_l[1], c->dil[0], c->dil[1]};
    memcpy(k->d, v, sizeof v);
}

/* The one place that picks conv memory layouts: activations in their
 * tensors' layouts; weights plain when both activations are plain, else
 * dnnl_format_tag_any (oneDNN's blocked kernels want blocked weights, and
 * each of forward / backward data / backward weights picks its own: forcing
 * the forward's format on the backward passes falls back to ref:any). */
static void conv_layout_tags(const conv_shape *c, dnnl_format_tag_t *src, dnnl_format_tag_t *dst,
                             dnnl_format_tag_t *wei) {
    *src = act_tag(c->xb);
    *dst = act_tag(c->yb);
    *wei = (c->xb || c->yb) ? dnnl_format_tag_any : c->G > 1 ? dnnl_goihw : dnnl_oihw;
}

/* kd's weight layout: OIHW, or GOIHW for grouped convs. */
static dnnl_status_t conv_plain_wmd(const conv_shape *c, dnnl_memory_desc_t *wei) {
    if (c->G > 1) {
        dnnl_dims_t wd = {c->G, c->O / c->G, c->C / c->G, c->KH, c->KW};
        return dnnl_memory_desc_init_by_tag(wei, 5, wd, dnnl_f32, dnnl_goihw);
    }
    dnnl_dims_t wd = {c->O, c->C, c->KH, c->KW};
    return dnnl_memory_desc_init_by_tag(wei, 4, wd, dnnl_f32, dnnl_oihw);
}

/* Memory descriptors of a conv of `kind`: src (N, C, H, W), weights
 * (O, C/G, KH, KW) or (G, O/G, C/G, KH, KW), bias (O), dst (N, O, OH, OW).
 * All float32, except in bf16 mode, where what the kernel reads is bf16
 * (forward: src, weights; backward data: diff_dst, weights; backward
 * weights: src, diff_dst) and what it writes stays float32. kind 0 gives the
 * all-bf16 forward that backward pds are hinted with. */
static dnnl_status_t conv_mds(const conv_shape *c, int kind, dnnl_memory_desc_t *src,
                              dnnl_memory_desc_t *wei, dnnl_memory_desc_t *bias,
                              dnnl_memory_desc_t *dst) {
    dnnl_format_tag_t src_tag, dst_tag, wei_tag;
    conv_layout_tags(c, &src_tag, &dst_tag, &wei_tag);
    dnnl_data_type_t ts = dnnl_f32, tw = dnnl_f32, td = dnnl_f32;
    if (c->bf16) {
        ts = kind == PK_CONV_BWD_DATA ? dnnl_f32 : dnnl_bf16;
        tw = kind == PK_CONV_BWD_WEIGHTS ? dnnl_f32 : dnnl_bf16;
        td = kind == PK_CONV_FWD ? dnnl_f32 : dnnl_bf16;
    }
    dnnl_dims_t sd = {c->N, c->C, c->H, c->W}, dd = {c->N, c->O, c->OH, c->OW}, bd = {c->O};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(src, 4, sd, ts, src_tag);
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_tag(dst, 4, dd, td, dst_tag);
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_tag(bias, 1, bd, dnnl_f32, dnnl_x);
    if (s != dnnl_success) return s;
    if (c->G > 1) {
        dnnl_dims_t wd = {c->G, c->O / c->G, c->C / c->G, c->KH, c->KW};
        return dnnl_memory_desc_init_by_tag(wei, 5, wd, tw, wei_tag);
    }
    dnnl_dims_t wd = {c->O, c->C, c->KH, c->KW};
    return dnnl_memory_desc_init_by_tag(wei, 4, wd, tw, wei_tag);
}

/* For a conv entry created with format_tag_any weights: when the pd's
 * weight format is not kd's OIHW, the cached reorder between the two
 * (OIHW -> pd before forward and backward data; pd -> OIHW after backward
 * weights) and the scratch layout [scratchpads | weights | floats]. */
static kd_status conv_weight_reorder(cpu_state *st, prim_entry *e, prim_kind kind,
                                     const conv_shape *c) {
    const dnnl_memory_desc_t *chosen = dnnl_primitive_desc_query_md(
        e->pd, kind == PK_CONV_BWD_WEIGHTS ? dnnl_query_diff_weights_md : dnnl_query_weights_md,
        0);
    if (!chosen) return kd_error(KD_ERR_BACKEND, "oneDNN: conv pd has no weights descriptor");
    dnnl_memory_desc_t plain;
    KD_TRY(KD_DNNL_CHECK(conv_plain_wmd(c, &plain)));
    if (dnnl_memory_desc_equal(chosen, &plain)) return KD_OK;
    int to_pd = kind != PK_CONV_BWD_WEIGHTS;
    const dnnl_memory_desc_t *from = to_pd ? &plain : chosen, *to = to_pd ? chosen : &plain;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t rpd = NULL;
    kd_status s = KD_DNNL_CHECK(dnnl_primitive_attr_create(&attr));
    if (s == KD_OK)
        s = KD_DNNL_CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    if (s == KD_OK)
        s = KD_DNNL_CHECK(dnnl_reorder_primitive_desc_create(&rpd, from, st->engine, to,
                                                             st->engine, attr));
    if (s == KD_OK) s = KD_DNNL_CHECK(dnnl_primitive_create(&e->wre, rpd));
    if (s == KD_OK) {
        const dnnl_memory_desc_t *smd = dnnl_primitive_desc_query_md(rpd, dnnl_query_scratchpad_md, 0);
        e->wre_pad = smd ? dnnl_memory_desc_get_size(smd) : 0;
        s = KD_DNNL_CHECK(dnnl_memory_create(&e->wre_mem[0], from, st->engine, DNNL_MEMORY_NONE));
        if (s == KD_OK)
            s = KD_DNNL_CHECK(dnnl_memory_create(&e->wre_mem[1], to, st->engine, DNNL_MEMORY_NONE));
        if (s == KD_OK && e->wre_pad)
            s = KD_DNNL_CHECK(dnnl_memory_create(&e->wre_mem[2], smd, st->engine, DNNL_MEMORY_NONE));
    }
    if (s == KD_OK) {
        size_t pad = e->pad_bytes > e->wre_pad ? e->pad_bytes : e->wre_pad;
        e->wofs = align64(pad);
        e->wbytes = dnnl_memory_desc_get_size(chosen);
        e->scratch_bytes = e->wofs + align64(e->wbytes);
        st->nprims_created++;
    }
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return s;
}

/* Runs e's weight reorder from `from` to `to` (scratch reserved). */
static kd_status conv_run_reorder(cpu_state *st, prim_entry *e, const void *from, void *to) {
    dnnl_exec_arg_t a[3] = {{DNNL_ARG_FROM, e->wre_mem[0]}, {DNNL_ARG_TO, e->wre_mem[1]},
                            {DNNL_ARG_SCRATCHPAD, e->wre_mem[2]}};
    KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->wre_mem[0], (void *)from)));
    KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->wre_mem[1], to)));
    if (e->wre_pad)
        KD_TRY(KD_DNNL_CHECK(dnnl_memory_set_data_handle(e->wre_mem[2], st->scratch)));
    KD_TRY(KD_DNNL_CHECK(dnnl_primitive_execute(e->wre, st->stream, e->wre_pad ? 3 : 2, a)));
    return KD_DNNL_CHECK(dnnl_stream_wait(st->stream));
}

static void *conv_wbuf(cpu_state *st, const prim_entry *e) { return (char *)st->scratch + e->wofs; }

/* Finds or creates the conv primitive of `kind` for c. */
static kd_status conv_entry(cpu_state *st, prim_kind kind, const conv_shape *c, int has_bias,
                            prim_entry **out) {
    prim_key k;
    conv_key(&k, kind, c, has_bias);
    uint64_t h = key_hash(&k);
    if ((*out = cache_find(st, &k, h))) return KD_OK;

    dnnl_memory_desc_t src, wei, bias, dst, hsrc, hwei, hbias, hdst;
    dnnl_convolution_desc_t op, hint;
    dnnl_status_t s = conv_mds(c, kind, &src, &wei, &bias, &dst);
    if (s == dnnl_success)
        s = conv_mds(c, c->bf16 ? 0 : PK_CONV_FWD, &hsrc, &hwei, &hbias, &hdst);
    const dnnl_memory_desc_t *bmd = has_bias ? &bias : NULL;
    if (s == dnnl_success && kind == PK_CONV_FWD)
        s = dnnl_dilated_convolution_forward_desc_init(
            &op, dnnl_forward_training, dnnl_convolution_direct, &src, &wei, bmd, &dst,
            c->stride, c->dil, c->pad_l, c->pad_r);
    if (s == dnnl_success && kind != PK_CONV_FWD)
        s = dnnl_dilated_convolution_forward_desc_init(
            &hint, dnnl_forward_training, dnnl_convolution_direct, &hsrc, &hwei,
            has_bias ? &hbias : NULL, &hdst, c->stride, c->dil, c->pad_l, c->pad_r);
    if (s == dnnl_success && kind == PK_CONV_BWD_DATA)
        s = dnnl_dilated_convolution_backward_data_desc_init(
            &op, dnnl_convolution_direct, &src, &wei, &dst, c->stride, c->dil, c->pad_l, c->pad_r);
    if (s == dnnl_success && kind == PK_CONV_BWD_WEIGHTS)
        s = dnnl_dilated_convolution_backward_weights_desc_init(
            &op, dnnl_convolution_direct, &src, &wei, bmd, &dst, c->stride, c->dil, c->pad_l,
            c->pad_r);
    KD_TRY(cache_insert(st, &k, h, s, &op, kind == PK_CONV_FWD ? NULL : &hint, out));
    if ((*out)->pd && (c->xb || c->yb || c->bf16)) {
        kd_status ks = conv_weight_reorder(st, *out, kind, c);
        if (ks != KD_OK) {
            /* Keep the cache consistent: the entry stays, rejected. */
            dnnl_primitive_destroy((*out)->prim);
            dnnl_primitive_desc_destroy((*out)->pd);
            (*out)->prim = NULL;
            (*out)->pd = NULL;
            return ks;
        }
    }
    return KD_OK;
}

static kd_status conv_fwd_locked(cpu_state *st, const kd_conv2d_params *p, const kd_tensor *x,
                                 const kd_tensor *w, const kd_tensor *b, kd_tensor *y,
                                 int *use_ref) {
    conv_shape c;
    conv_shape_init(&c, p, x, w, y);
    prim_entry *e;
    KD_TRY(conv_entry(st, PK_CONV_FWD, &c, b != NULL, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    int64_t nx = kd_tensor_numel(x);
    KD_TRY(scratch_reserve_for(st, e, c.bf16 ? bf16_floats(nx) : 0));
    const void *xp = x->data, *wp = w->data;
    if (c.bf16) {
        xp = scratch_floats(st, e, 0);
        cvt_f32_bf16((uint16_t *)xp, kd_f32(x), nx);
    }
    if (e->wre) {
        wp = conv_wbuf(st, e);
        KD_TRY(conv_run_reorder(st, e, w->data, (void *)wp));
    }
    exec_arg a[4] = {{DNNL_ARG_SRC, xp}, {DNNL_ARG_WEIGHTS, wp}, {DNNL_ARG_DST, y->data},
                     {DNNL_ARG_BIAS, b ? b->data : NULL}};
    return entry_execute(st, e, a, b ? 4 : 3);
}

static kd_status cpu_conv2d_forward(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                                    const kd_tensor *w, const kd_tensor *b, kd_tensor *y) {
    if (!act_4d(x) || !plain_4d(w) || !act_4d(y) || (b && !plain_f32(b)) || p->groups < 1 ||
        kd_tensor_numel(y) == 0 || kd_tensor_numel(x) == 0)
        return ref_conv_fwd(be, p, x, w, b, y);
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, conv_fwd_locked(&g_cpu, p, x, w, b, y, &use_ref));
    if (s == KD_OK && use_ref) return ref_conv_fwd(be, p, x, w, b, y);
    return s;
}

static kd_status conv_bwd_data_locked(cpu_state *st, const kd_conv2d_params *p,
                                      const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                      int accumulate, int *use_ref) {
    conv_shape c;
    conv_shape_init(&c, p, dx, w, dy);
    prim_entry *e;
    KD_TRY(conv_entry(st, PK_CONV_BWD_DATA, &c, 0, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    int64_t n = kd_tensor_numel(dx), ndy = kd_tensor_numel(dy);
    /* scratch floats: [dx when accumulating | dy in bf16] */
    size_t nacc = accumulate ? align64((size_t)n * sizeof(float)) / sizeof(float) : 0;
    KD_TRY(scratch_reserve_for(st, e, nacc + (c.bf16 ? bf16_floats(ndy) : 0)));
    float *out = accumulate ? scratch_floats(st, e, 0) : kd_f32(dx);
    const void *dyp = dy->data, *wp = w->data;
    if (c.bf16) {
        dyp = scratch_floats(st, e, nacc);
        cvt_f32_bf16((uint16_t *)dyp, kd_f32(dy), ndy);
    }
    if (e->wre) {
        wp = conv_wbuf(st, e);
        KD_TRY(conv_run_reorder(st, e, w->data, (void *)wp));
    }
    exec_arg a[3] = {{DNNL_ARG_DIFF_DST, dyp}, {DNNL_ARG_WEIGHTS, wp},
                     {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(entry_execute(st, e, a, 3));
    if (accumulate) add_into(kd_f32(dx), out, n);
    return KD_OK;
}

static kd_status cpu_conv2d_backward_data(kd_backend *be, const kd_conv2d_params *p,
                                          const kd_tensor *dy, const kd_tensor *w, kd_tensor *dx,
                                          int accumulate) {
    if (!act_4d(dy) || !plain_4d(w) || !act_4d(dx) || p->groups < 1 ||
        kd_tensor_numel(dy) == 0 || kd_tensor_numel(dx) == 0)
        return ref_conv_bwd_data(be, p, dy, w, dx, accumulate);
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, conv_bwd_data_locked(&g_cpu, p, dy, w, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref) return ref_conv_bwd_data(be, p, dy, w, dx, accumulate);
    return s;
}

static kd_status conv_bwd_weights_locked(cpu_state *st, const kd_conv2d_params *p,
                                         const kd_tensor *dy, const kd_tensor *x, kd_tensor *dw,
                                         kd_tensor *db, int accumulate, int *use_ref) {
    conv_shape c;
    conv_shape_init(&c, p, x, dw, dy);
    /* oneDNN 2.6's bf16 backward-weights kernel (jit_bf16:avx512_core_bf16)
     * is pathological on strided spatial convs: 2-8 GFLOP/s against 30-185
     * in float32 for the stride-2 3x3 convs of the CIFAR ResNets (measured
     * here, same process). Those run in float32; 1x1 and stride-1 stay bf16. */
    if (c.bf16 && (c.stride[0] > 1 || c.stride[1] > 1) && (c.KH > 1 || c.KW > 1)) c.bf16 = 0;
    prim_entry *e;
    KD_TRY(conv_entry(st, PK_CONV_BWD_WEIGHTS, &c, db != NULL, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    /* With accumulate=1 the gradients land in scratch: dw, then db (64-byte aligned). */
    int64_t nw = kd_tensor_numel(dw), nb = db ? kd_tensor_numel(db) : 0;
    size_t nw_pad = align64((size_t)nw * sizeof(float)) / sizeof(float);
    size_t nacc = accumulate ? nw_pad + align64((size_t)nb * sizeof(float)) / sizeof(float) : 0;
    /* scratch floats: [dw, db when accumulating | x in bf16 | dy in bf16] */
    int64_t nx = kd_tensor_numel(x), ndy = kd_tensor_numel(dy);
    KD_TRY(scratch_reserve_for(st, e, nacc + (c.bf16 ? bf16_floats(nx) + bf16_floats(ndy) : 0)));
    float *ow = accumulate ? scratch_floats(st, e, 0) : kd_f32(dw);
    float *ob = !db ? NULL : accumulate ? scratch_floats(st, e, nw_pad) : kd_f32(db);
    const void *xp = x->data, *dyp = dy->data;
    if (c.bf16) {
        xp = scratch_floats(st, e, nacc);
        dyp = scratch_floats(st, e, nacc + bf16_floats(nx));
        cvt_f32_bf16((uint16_t *)xp, kd_f32(x), nx);
        cvt_f32_bf16((uint16_t *)dyp, kd_f32(dy), ndy);
    }
    /* Weights in the pd's format land in the weights buffer, then reorder to OIHW. */
    exec_arg a[4] = {{DNNL_ARG_SRC, xp}, {DNNL_ARG_DIFF_DST, dyp},
                     {DNNL_ARG_DIFF_WEIGHTS, e->wre ? conv_wbuf(st, e) : (void *)ow},
                     {DNNL_ARG_DIFF_BIAS, ob}};
    KD_TRY(entry_execute(st, e, a, db ? 4 : 3));
    if (e->wre) KD_TRY(conv_run_reorder(st, e, conv_wbuf(st, e), ow));
    if (accumulate) {
        add_into(kd_f32(dw), ow, nw);
        if (db) add_into(kd_f32(db), ob, nb);
    }
    return KD_OK;
}

static kd_status cpu_conv2d_backward_weights(kd_backend *be, const kd_conv2d_params *p,
                                             const kd_tensor *dy, const kd_tensor *x,
                                             kd_tensor *dw, kd_tensor *db, int accumulate) {
    if (!act_4d(dy) || !act_4d(x) || !plain_4d(dw) || (db && !plain_f32(db)) ||
        p->groups < 1 || kd_tensor_numel(dy) == 0 || kd_tensor_numel(x) == 0)
        return ref_conv_bwd_weights(be, p, dy, x, dw, db, accumulate);
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, conv_bwd_weights_locked(&g_cpu, p, dy, x, dw, db, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_conv_bwd_weights(be, p, dy, x, dw, db, accumulate);
    return s;
}

/* ------------------------------------------------------------- batch norm */

/* x (N, C) or (N, C, d2...) viewed as (N, C, S, 1) NCHW. */
static void bn_dims(const kd_tensor *x, int64_t *N, int64_t *C, int64_t *S) {
    *N = x->shape[0];
    *C = x->ndim > 1 ? x->shape[1] : 1;
    *S = 1;
    for (int i = 2; i < x->ndim; i++) *S *= x->shape[i];
}

/* The 4-d dims oneDNN gets for a bn input: (N, C, H, W) of a blocked x,
 * else x (N, C) or (N, C, d2...) seen as (N, C, S, 1). */
static void bn_dims4(const kd_tensor *x, int64_t d[4]) {
    if (blocked(x)) {
        for (int i = 0; i < 4; i++) d[i] = x->shape[i];
        return;
    }
    bn_dims(x, &d[0], &d[1], &d[2]);
    d[3] = 1;
}

static kd_status bn_entry(cpu_state *st, prim_kind kind, const int64_t d4[4], int blk,
                          float eps, unsigned flags, dnnl_prop_kind_t prop, prim_entry **out) {
    prim_key k;
    key_init(&k, kind);
    k.flags = (int32_t)flags;
    k.prop = prop;
    k.lay = blk;
    k.d[0] = d4[0], k.d[1] = d4[1], k.d[2] = d4[2], k.d[3] = d4[3];
    k.f[0] = eps;
    uint64_t h = key_hash(&k);
    if ((*out = cache_find(st, &k, h))) return KD_OK;

    dnnl_memory_desc_t md;
    dnnl_batch_normalization_desc_t op, hint;
    dnnl_dims_t dims = {d4[0], d4[1], d4[2], d4[3]};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&md, 4, dims, dnnl_f32, act_tag(blk));
    if (s == dnnl_success && kind == PK_BN_FWD)
        s = dnnl_batch_normalization_forward_desc_init(&op, prop, &md, eps, flags);
    if (s == dnnl_success && kind == PK_BN_BWD)
        s = dnnl_batch_normalization_forward_desc_init(&hint, dnnl_forward_training, &md, eps, flags);
    if (s == dnnl_success && kind == PK_BN_BWD)
        s = dnnl_batch_normalization_backward_desc_init(&op, prop, &md, &md, eps, flags);
    return cache_insert(st, &k, h, s, &op, kind == PK_BN_BWD ? &hint : NULL, out);
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
    KD_TRY(bn_entry(st, PK_BN_FWD, d4, blocked(x), p->eps, flags,
                    p->training ? dnnl_forward_training : dnnl_forward_inference, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;

    exec_arg a[6] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    int na = 2;
    if (gamma) a[na++] = (exec_arg){DNNL_ARG_SCALE, gamma->data};
    if (beta) a[na++] = (exec_arg){DNNL_ARG_SHIFT, beta->data};
    if (!p->training) {
        a[na++] = (exec_arg){DNNL_ARG_MEAN, running_mean->data};
        a[na++] = (exec_arg){DNNL_ARG_VARIANCE, running_var->data};
        KD_TRY(scratch_reserve_for(st, e, 0));
        KD_TRY(entry_execute(st, e, a, na));
        /* As the ref kernel: save_* (if given) get the statistics used. */
        const float *rm = kd_f32(running_mean), *rv = kd_f32(running_var);
        for (int64_t c = 0; c < C; c++) {
            if (save_mean) kd_f32(save_mean)[c] = rm[c];
            if (save_rstd) kd_f32(save_rstd)[c] = (float)(1.0 / sqrt((double)rv[c] + (double)p->eps));
        }
        return KD_OK;
    }

    /* Training: oneDNN writes the batch mean and the biased variance. */
    KD_TRY(scratch_reserve_for(st, e, (size_t)C));
    float *mean = kd_f32(save_mean);
    float *var = scratch_floats(st, e, 0);
    a[na++] = (exec_arg){DNNL_ARG_MEAN, mean};
    a[na++] = (exec_arg){DNNL_ARG_VARIANCE, var};
    KD_TRY(entry_execute(st, e, a, na));

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

static kd_status cpu_batchnorm_forward(kd_backend *be, const kd_bn_params *p, const kd_tensor *x,
                                       const kd_tensor *gamma, const kd_tensor *beta,
                                       kd_tensor *running_mean, kd_tensor *running_var,
                                       kd_tensor *y, kd_tensor *save_mean, kd_tensor *save_rstd) {
    /* The ref kernel reports the invalid cases (training on one value per
     * channel, missing statistics) with its messages. */
    int64_t N, C, S;
    int use_ref = blocked(x) ? !act_4d(x) || y->layout != x->layout
                             : !plain_f32(x) || !plain_f32(y);
    use_ref = use_ref || x->ndim < 2 || kd_tensor_numel(x) == 0;
    if (!use_ref) {
        bn_dims(x, &N, &C, &S);
        use_ref = p->training ? (N * S < 2 || !save_mean || !save_rstd)
                              : (!running_mean || !running_var);
    }
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, bn_fwd_locked(&g_cpu, p, x, gamma, beta, running_mean, running_var,
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
    KD_TRY(bn_entry(st, PK_BN_BWD, d4, blocked(x), p->eps, flags, dnnl_backward, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;

    /* Scratch floats: var (C), dgamma (C), dbeta (C), a zero shift (C), then
     * dx (numel) when accumulating or not wanted; the parameter gradients
     * always land in scratch first so that NULL outputs and accumulate=1
     * take one path. */
    int64_t n = kd_tensor_numel(x);
    int dx_scratch = accumulate || !dx;
    size_t cpad = align64((size_t)C * sizeof(float)) / sizeof(float);
    KD_TRY(scratch_reserve_for(st, e, 4 * cpad + (dx_scratch ? (size_t)n : 0)));
    float *var = scratch_floats(st, e, 0);
    float *dg = scratch_floats(st, e, cpad);
    float *dbt = scratch_floats(st, e, 2 * cpad);
    float *shift = scratch_floats(st, e, 3 * cpad);
    float *dxo = dx_scratch ? scratch_floats(st, e, 4 * cpad) : kd_f32(dx);

    /* oneDNN wants the variance; rebuild it from rstd = 1/sqrt(var + eps). */
    const float *rstd = kd_f32(save_rstd);
    for (int64_t c = 0; c < C; c++) {
        double r = rstd[c];
        var[c] = (float)(1.0 / (r * r) - (double)p->eps);
    }
    exec_arg a[9] = {{DNNL_ARG_SRC, x->data},  {DNNL_ARG_MEAN, save_mean->data},
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
        memset(shift, 0, (size_t)C * sizeof(float));
        a[na++] = (exec_arg){DNNL_ARG_SHIFT, shift};
    }
    KD_TRY(entry_execute(st, e, a, na));

    if (accumulate && dx) add_into(kd_f32(dx), dxo, n);
    if (dgamma) {
        float *o = kd_f32(dgamma);
        for (int64_t c = 0; c < C; c++) o[c] = accumulate ? o[c] + dg[c] : dg[c];
    }
    if (dbeta) {
        float *o = kd_f32(dbeta);
        for (int64_t c = 0; c < C; c++) o[c] = accumulate ? o[c] + dbt[c] : dbt[c];
    }
    return KD_OK;
}

static kd_status cpu_batchnorm_backward(kd_backend *be, const kd_bn_params *p, const kd_tensor *dy,
                                        const kd_tensor *x, const kd_tensor *gamma,
                                        const kd_tensor *save_mean, const kd_tensor *save_rstd,
                                        kd_tensor *dx, kd_tensor *dgamma, kd_tensor *dbeta,
                                        int accumulate) {
    /* Parameter gradients without gamma cannot come from a primitive without
     * use_scale. */
    int use_ref = blocked(x) ? !act_4d(x) || dy->layout != x->layout ||
                                   (dx && dx->layout != x->layout)
                             : !plain_f32(x) || !plain_f32(dy) || (dx && !plain_f32(dx));
    use_ref = use_ref || x->ndim < 2 || kd_tensor_numel(x) == 0 || (!gamma && (dgamma || dbeta));
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, bn_bwd_locked(&g_cpu, p, dy, x, gamma, save_mean, save_rstd, dx,
                                             dgamma, dbeta, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_bn_bwd(be, p, dy, x, gamma, save_mean, save_rstd, dx, dgamma,
                                            dbeta, accumulate);
    return s;
}

/* ---------------------------------------------------------------- pooling */

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
    key_init(&k, kind);
    k.alg = alg;
    k.lay = q->xb | q->yb << 1;
    int64_t v[] = {q->N, q->C, q->H, q->W, q->OH, q->OW, q->kernel[0], q->kernel[1],
                   q->stride[0], q->stride[1], q->pad_l[0], q->pad_l[1]};
    memcpy(k.d, v, sizeof v);
    uint64_t h = key_hash(&k);
    if ((*out = cache_find(st, &k, h))) return KD_OK;

    dnnl_memory_desc_t src, dst;
    dnnl_pooling_desc_t op, hint;
    dnnl_dims_t sd = {q->N, q->C, q->H, q->W}, dd = {q->N, q->C, q->OH, q->OW};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&src, 4, sd, dnnl_f32, act_tag(q->xb));
    if (s == dnnl_success) s = dnnl_memory_desc_init_by_tag(&dst, 4, dd, dnnl_f32, act_tag(q->yb));
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
    return cache_insert(st, &k, h, s, &op, kind == PK_POOL_BWD ? &hint : NULL, out);
}

/* Max pooling forward: y = the window's maximum and ws = its flat index
 * (h * W + w) by PyTorch's rule (the first maximum; a NaN wins, the last one;
 * padding never does). One thread per (n, c) plane. */
static void maxpool_argmax(const pool_shape *q, const float *x, float *y, int32_t *ws) {
    int64_t planes = q->N * q->C;
#pragma omp parallel for schedule(static)
    for (int64_t pl = 0; pl < planes; pl++) {
        const float *xp = x + pl * q->H * q->W;
        float *yp = y + pl * q->OH * q->OW;
        int32_t *wp = ws + pl * q->OH * q->OW;
        for (int64_t oh = 0; oh < q->OH; oh++) {
            int64_t h0 = oh * q->stride[0] - q->pad_l[0], h1 = h0 + q->kernel[0];
            if (h0 < 0) h0 = 0;
            if (h1 > q->H) h1 = q->H;
            for (int64_t ow = 0; ow < q->OW; ow++) {
                int64_t w0 = ow * q->stride[1] - q->pad_l[1], w1 = w0 + q->kernel[1];
                if (w0 < 0) w0 = 0;
                if (w1 > q->W) w1 = q->W;
                float best = -INFINITY;
                int64_t arg = -1;
                for (int64_t h = h0; h < h1; h++)
                    for (int64_t w = w0; w < w1; w++) {
                        float v = xp[h * q->W + w];
                        if (arg < 0 || v > best || isnan(v)) best = v, arg = h * q->W + w;
                    }
                yp[oh * q->OW + ow] = best;
                wp[oh * q->OW + ow] = (int32_t)arg;
            }
        }
    }
}

/* The same on NCHW16C x, y and ws (ws in y's blocked order, its values the
 * flat h*W+w index within the channel's plane as in the plain version).
 * One thread per (n, channel block, output row); the 16 lanes of a block
 * run side by side with the same tie rule per lane. */
static void maxpool_argmax_blocked(const pool_shape *q, const float *x, float *y, int32_t *ws) {
    enum { B = KD_LAYOUT_BLOCK };
    int64_t rows = q->N * (q->C / B) * q->OH;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t nb = r / q->OH, oh = r % q->OH;
        const float *xp = x + nb * q->H * q->W * B;
        float *yp = y + (nb * q->OH + oh) * q->OW * B;
        int32_t *wp = ws + (nb * q->OH + oh) * q->OW * B;
        int64_t h0 = oh * q->stride[0] - q->pad_l[0], h1 = h0 + q->kernel[0];
        if (h0 < 0) h0 = 0;
        if (h1 > q->H) h1 = q->H;
        for (int64_t ow = 0; ow < q->OW; ow++) {
            int64_t w0 = ow * q->stride[1] - q->pad_l[1], w1 = w0 + q->kernel[1];
            if (w0 < 0) w0 = 0;
            if (w1 > q->W) w1 = q->W;
            float best[B];
            int32_t arg[B];
            for (int l = 0; l < B; l++) best[l] = -INFINITY, arg[l] = -1;
            for (int64_t h = h0; h < h1; h++)
                for (int64_t w = w0; w < w1; w++) {
                    const float *v = xp + (h * q->W + w) * B;
                    int32_t idx = (int32_t)(h * q->W + w);
                    for (int l = 0; l < B; l++)
                        if (arg[l] < 0 || v[l] > best[l] || isnan(v[l])) best[l] = v[l], arg[l] = idx;
                }
            for (int l = 0; l < B; l++) yp[ow * B + l] = best[l], wp[ow * B + l] = arg[l];
        }
    }
}

/* Blocked backward: dx[n, c, ws] (+)= dy on NCHW16C dy, ws, dx; one thread
 * per (n, channel block), fixed order. Returns the count of bad indices. */
static int64_t maxpool_scatter_blocked(int64_t nblocks, int64_t in_plane, int64_t out_plane,
                                       const float *dy, const int32_t *ws, float *dx,
                                       int accumulate) {
    enum { B = KD_LAYOUT_BLOCK };
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t nb = 0; nb < nblocks; nb++) {
        float *dxp = dx + nb * in_plane * B;
        if (!accumulate) memset(dxp, 0, (size_t)(in_plane * B) * sizeof(float));
        const float *dyp = dy + nb * out_plane * B;
        const int32_t *wp = ws + nb * out_plane * B;
        for (int64_t i = 0; i < out_plane * B; i++) {
            int32_t a = wp[i];
            if (a >= 0 && a < in_plane)
                dxp[a * B + i % B] += dyp[i];
            else if (a != -1)
                bad++;
        }
    }
    return bad;
}

/* Max pooling backward: dx[n, c, ws] (+)= dy, one thread per plane in a
 * fixed order, so deterministic. Returns the number of indices outside the
 * plane (skipped; -1 marks an empty window and is not counted). */
static int64_t maxpool_scatter(int64_t planes, int64_t in_plane, int64_t out_plane,
                               const float *dy, const int32_t *ws, float *dx, int accumulate) {
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t pl = 0; pl < planes; pl++) {
        float *dxp = dx + pl * in_plane;
        if (!accumulate) memset(dxp, 0, (size_t)in_plane * sizeof(float));
        const float *dyp = dy + pl * out_plane;
        const int32_t *wp = ws + pl * out_plane;
        for (int64_t i = 0; i < out_plane; i++) {
            if (wp[i] >= 0 && wp[i] < in_plane)
                dxp[wp[i]] += dyp[i];
            else if (wp[i] != -1)
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
    KD_TRY(scratch_reserve_for(st, e, 0));
    exec_arg a[2] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    return entry_execute(st, e, a, 2);
}

static kd_status cpu_pool2d_forward(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *x,
                                    kd_tensor *y, kd_tensor *ws) {
    int use_ref = !act_4d(x) || !act_4d(y) || kd_tensor_numel(y) == 0 ||
                  kd_tensor_numel(x) == 0 ||
                  (p->kind == KD_POOL_MAX && (!ws || ws->dtype != KD_I32 ||
                                              kd_tensor_numel(ws) != kd_tensor_numel(y)));
    if (!use_ref && p->kind == KD_POOL_MAX) {
        pool_shape q;
        pool_shape_init(&q, p, x, y);
        if (q.xb && q.yb && blocked(ws)) {
            maxpool_argmax_blocked(&q, kd_f32(x), kd_f32(y), (int32_t *)ws->data);
            return KD_OK;
        }
        if (q.xb || q.yb || blocked(ws))
            return kd_error(KD_ERR_UNSUPPORTED, "cpu max pooling: x, y and ws must share a layout");
        maxpool_argmax(&q, kd_f32(x), kd_f32(y), (int32_t *)ws->data);
        return KD_OK;
    }
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, pool_fwd_locked(&g_cpu, p, x, y, &use_ref));
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
    KD_TRY(scratch_reserve_for(st, e, accumulate ? (size_t)n : 0));
    float *out = accumulate ? scratch_floats(st, e, 0) : kd_f32(dx);
    exec_arg a[2] = {{DNNL_ARG_DIFF_DST, dy->data}, {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(entry_execute(st, e, a, 2));
    if (accumulate) add_into(kd_f32(dx), out, n);
    return KD_OK;
}

static kd_status cpu_pool2d_backward(kd_backend *be, const kd_pool2d_params *p,
                                     const kd_tensor *dy, const kd_tensor *ws, kd_tensor *dx,
                                     int accumulate) {
    if (!act_4d(dy) || !act_4d(dx) || kd_tensor_numel(dy) == 0 || kd_tensor_numel(dx) == 0 ||
        (p->kind == KD_POOL_MAX && (!ws || ws->dtype != KD_I32 ||
                                    kd_tensor_numel(ws) != kd_tensor_numel(dy))))
        return ref_pool_bwd(be, p, dy, ws, dx, accumulate);
    if (p->kind == KD_POOL_MAX) {
        int64_t planes = dx->shape[0] * dx->shape[1], H = dx->shape[2], W = dx->shape[3];
        int all_b = blocked(dy) && blocked(dx) && blocked(ws);
        if (!all_b && (blocked(dy) || blocked(dx) || blocked(ws)))
            return kd_error(KD_ERR_UNSUPPORTED, "cpu max pooling: dy, ws and dx must share a layout");
        int64_t bad = all_b ? maxpool_scatter_blocked(planes / KD_LAYOUT_BLOCK, H * W,
                                                      dy->shape[2] * dy->shape[3], kd_f32(dy),
                                                      (const int32_t *)ws->data, kd_f32(dx),
                                                      accumulate)
                            : maxpool_scatter(planes, H * W, dy->shape[2] * dy->shape[3],
                                              kd_f32(dy), (const int32_t *)ws->data, kd_f32(dx),
                                              accumulate);
        if (bad)
            return kd_error(KD_ERR_INVALID,
                            "cpu pool2d_backward: %lld argmax indices fall outside the %lldx%lld input plane",
                            (long long)bad, (long long)H, (long long)W);
        return KD_OK;
    }
    int use_ref = 0;
    kd_status s;
    CPU_RUN_LOCKED(s, pool_bwd_locked(&g_cpu, p, dy, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref) return ref_pool_bwd(be, p, dy, ws, dx, accumulate);
    return s;
}

/* ------------------------------------------------------------------- gemm */

static kd_status cpu_gemm(kd_backend *be, int trans_a, int trans_b, int64_t M, int64_t N,
                          int64_t K, float alpha, const float *A, int64_t lda, const float *B,
                          int64_t ldb, float beta, float *C, int64_t ldc) {
    if (M <= 0 || N <= 0 || K <= 0)
        return ref_be()->gemm(be, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    /* dnnl_sgemm is row-major: lda is the row stride of A as stored. */
    return KD_DNNL_CHECK(dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A,
                                    lda, B, ldb, beta, C, ldc));
}

/* ------------------------------------------------------------ batched gemm */

/* How gemm_batch runs (kd__cpu_set_bmm_mode): oneDNN's matmul primitive with
 * a batch dimension (transposes as strides, beta 1 as a sum post-op), or a
 * loop of dnnl_sgemm (parallel over the batch when it has at least as many
 * matrices as threads). KD_CPU_BMM_AUTO takes the matmul primitive unless A
 * is transposed: on Swin's window attention (1536 x (49, 32)/(49, 49),
 * bench_kernels swin, 1 thread) the primitive runs q k^T in ~2.6 ms against
 * ~3.9 ms for the loop and attn @ v in ~2.1 against ~2.5 ms, but a
 * transposed A (the backward's attn^T dC) in ~3.2-4.1 ms against ~2.4 ms. */
static int g_bmm_mode = KD_CPU_BMM_AUTO;

void kd__cpu_set_bmm_mode(int mode) { g_bmm_mode = mode; }

static kd_status gemm_loop(int64_t batch, int trans_a, int trans_b, int64_t M, int64_t N,
                           int64_t K, float alpha, const float *A, int64_t lda, int64_t sa,
                           const float *B, int64_t ldb, int64_t sb, float beta, float *C,
                           int64_t ldc, int64_t sc) {
    if (batch >= kd_get_num_threads() && batch > 1) {
        int bad = 0;
        /* Inside the parallel region each sgemm runs on its own thread. */
#pragma omp parallel for schedule(static) reduction(| : bad)
        for (int64_t i = 0; i < batch; i++)
            bad |= dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A + i * sa,
                              lda, B + i * sb, ldb, beta, C + i * sc, ldc) != dnnl_success;
        return bad ? kd_error(KD_ERR_BACKEND, "oneDNN dnnl_sgemm failed in a batched gemm") : KD_OK;
    }
    for (int64_t i = 0; i < batch; i++)
        KD_TRY(KD_DNNL_CHECK(dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha,
                                        A + i * sa, lda, B + i * sb, ldb, beta, C + i * sc, ldc)));
    return KD_OK;
}

/* Logical (batch, rows, cols) of a row-major operand with leading dimension
 * ld and batch stride bs, stored transposed when `trans`. */
static dnnl_status_t mm_md(dnnl_memory_desc_t *md, int64_t batch, int64_t rows, int64_t cols,
                           int trans, int64_t ld, int64_t bs) {
    dnnl_dims_t dims = {batch, rows, cols};
    dnnl_dims_t strides = {bs, trans ? 1 : ld, trans ? ld : 1};
    return dnnl_memory_desc_init_by_strides(md, 3, dims, dnnl_f32, strides);
}

static kd_status matmul_locked(cpu_state *st, int64_t batch, int trans_a, int trans_b, int64_t M,
                               int64_t N, int64_t K, const float *A, int64_t lda, int64_t sa,
                               const float *B, int64_t ldb, int64_t sb, float beta, float *C,
                               int64_t ldc, int64_t sc, int *use_loop) {
    prim_key k;
    key_init(&k, PK_MATMUL);
    k.flags = beta != 0.0f;
    int64_t v[12] = {batch, M, N, K, trans_a, trans_b, lda, ldb, ldc, sa, sb, sc};
    memcpy(k.d, v, sizeof v);
    uint64_t h = key_hash(&k);
    prim_entry *e = cache_find(st, &k, h);
    if (!e) {
        dnnl_memory_desc_t amd, bmd, cmd;
        dnnl_matmul_desc_t op;
        dnnl_status_t s = mm_md(&amd, batch, M, K, trans_a, lda, sa);
        if (s == dnnl_success) s = mm_md(&bmd, batch, K, N, trans_b, ldb, sb);
        if (s == dnnl_success) s = mm_md(&cmd, batch, M, N, 0, ldc, sc);
        if (s == dnnl_success) s = dnnl_matmul_desc_init(&op, &amd, &bmd, NULL, &cmd);
        KD_TRY(cache_insert_sum(st, &k, h, s, &op, NULL, beta != 0.0f, &e));
    }
    if (!e->pd) return *use_loop = 1, KD_OK;
    KD_TRY(scratch_reserve_for(st, e, 0));
    exec_arg a[3] = {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}};
    return entry_execute(st, e, a, 3);
}

static kd_status cpu_gemm_batch(kd_backend *be, int64_t batch, int trans_a, int trans_b,
                                int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                                int64_t lda, int64_t sa, const float *B, int64_t ldb, int64_t sb,
                                float beta, float *C, int64_t ldc, int64_t sc) {
    if (batch <= 0 || M <= 0 || N <= 0 || K <= 0 || !A || !B || !C)
        return ref_be()->gemm_batch(be, batch, trans_a, trans_b, M, N, K, alpha, A, lda, sa, B,
                                    ldb, sb, beta, C, ldc, sc);
    int use_loop = g_bmm_mode == KD_CPU_BMM_LOOP || (g_bmm_mode == KD_CPU_BMM_AUTO && trans_a) ||
                   alpha != 1.0f || (beta != 0.0f && beta != 1.0f);
    kd_status s = KD_OK;
    if (!use_loop)
        CPU_RUN_LOCKED(s, matmul_locked(&g_cpu, batch, trans_a, trans_b, M, N, K, A, lda, sa, B,
                                        ldb, sb, beta, C, ldc, sc, &use_loop));
    if (s == KD_OK && use_loop)
        return gemm_loop(batch, trans_a, trans_b, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta,
                         C, ldc, sc);
    return s;
}

/* ------------------------------------------------------------- layer norm */

static kd_status ln_entry(cpu_state *st, prim_kind kind, int64_t R, int64_t D, float eps,
                          unsigned flags, dnnl_prop_kind_t prop, prim_entry **out) {
    prim_key k;
    key_init(&k, kind);
    k.flags = (int32_t)flags;
    k.prop = prop;
    k.d[0] = R, k.d[1] = D;
    k.f[0] = eps;
    uint64_t h = key_hash(&k);
    if ((*out = cache_find(st, &k, h))) return KD_OK;
    dnnl_memory_desc_t md;
    dnnl_layer_normalization_desc_t op, hint;
    dnnl_dims_t dims = {R, D};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&md, 2, dims, dnnl_f32, dnnl_ab);
    if (s == dnnl_success && kind == PK_LN_FWD)
        s = dnnl_layer_normalization_forward_desc_init(&op, prop, &md, NULL, eps, flags);
    if (s == dnnl_success && kind == PK_LN_BWD)
        s = dnnl_layer_normalization_forward_desc_init(&hint, dnnl_forward_training, &md, NULL,
                                                       eps, flags);
    if (s == dnnl_success && kind == PK_LN_BWD)
        s = dnnl_layer_normalization_backward_desc_init(&op, prop, &md, &md, NULL, eps, flags);
    return cache_insert(st, &k, h, s, &op, kind == PK_LN_BWD ? &hint : NULL, out);
}

static kd_status ln_fwd_locked(cpu_state *st, float eps, const kd_tensor *x,
                               const kd_tensor *gamma, const kd_tensor *beta, kd_tensor *y,
                               kd_tensor *save_mean, kd_tensor *save_rstd, int *use_ref) {
    int64_t D = x->shape[x->ndim - 1], R = kd_tensor_numel(x) / D;
    unsigned flags = gamma ? dnnl_use_scale | dnnl_use_shift : 0u;
    int train = save_mean && save_rstd;
    prim_entry *e;
    KD_TRY(ln_entry(st, PK_LN_FWD, R, D, eps, flags,
                    train ? dnnl_forward_training : dnnl_forward_inference, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(scratch_reserve_for(st, e, train ? (size_t)R : 0));
    float *var = scratch_floats(st, e, 0);
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
    KD_TRY(entry_execute(st, e, a, na));
    if (train) {
        float *rstd = kd_f32(save_rstd);
#pragma omp parallel for schedule(static) if (R > 65536)
        for (int64_t r = 0; r < R; r++) rstd[r] = (float)(1.0 / sqrt((double)var[r] + (double)eps));
    }
    return KD_OK;
}

static kd_status cpu_layernorm_forward(kd_backend *be, float eps, const kd_tensor *x,
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
        CPU_RUN_LOCKED(s, ln_fwd_locked(&g_cpu, eps, x, gamma, beta, y, save_mean, save_rstd,
                                        &use_ref));
    if (s == KD_OK && use_ref)
        return ref_be()->layernorm_forward(be, eps, x, gamma, beta, y, save_mean, save_rstd);
    return s;
}

static kd_status ln_bwd_locked(cpu_state *st, float eps, const kd_tensor *dy, const kd_tensor *x,
                               const kd_tensor *gamma, const kd_tensor *save_mean,
                               const kd_tensor *save_rstd, kd_tensor *dx, kd_tensor *dgamma,
                               kd_tensor *dbeta, int accumulate, int *use_ref) {
    int64_t D = x->shape[x->ndim - 1], R = kd_tensor_numel(x) / D, n = R * D;
    unsigned flags = gamma ? dnnl_use_scale | dnnl_use_shift : 0u;
    prim_entry *e;
    KD_TRY(ln_entry(st, PK_LN_BWD, R, D, eps, flags, gamma ? dnnl_backward : dnnl_backward_data,
                    &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    /* Scratch floats: var (R), dgamma, dbeta, a zero shift (D each), then dx
     * (n) when accumulating or not wanted. */
    int dx_scratch = accumulate || !dx;
    size_t rpad = align64((size_t)R * sizeof(float)) / sizeof(float);
    size_t dpad = align64((size_t)D * sizeof(float)) / sizeof(float);
    KD_TRY(scratch_reserve_for(st, e, rpad + 3 * dpad + (dx_scratch ? (size_t)n : 0)));
    float *var = scratch_floats(st, e, 0);
    float *dg = scratch_floats(st, e, rpad);
    float *dbt = scratch_floats(st, e, rpad + dpad);
    float *shift = scratch_floats(st, e, rpad + 2 * dpad);
    float *dxo = dx_scratch ? scratch_floats(st, e, rpad + 3 * dpad) : kd_f32(dx);
    /* oneDNN wants the variance; rebuild it from rstd = 1/sqrt(var + eps). */
    const float *rstd = kd_f32(save_rstd);
#pragma omp parallel for schedule(static) if (R > 65536)
    for (int64_t r = 0; r < R; r++) {
        double q = rstd[r];
        var[r] = (float)(1.0 / (q * q) - (double)eps);
    }
    exec_arg a[9] = {{DNNL_ARG_SRC, x->data},  {DNNL_ARG_MEAN, save_mean->data},
                     {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_DIFF_DST, dy->data},
                     {DNNL_ARG_DIFF_SRC, dxo}};
    int na = 5;
    if (gamma) {
        a[na++] = (exec_arg){DNNL_ARG_SCALE, gamma->data};
        a[na++] = (exec_arg){DNNL_ARG_DIFF_SCALE, dg};
        a[na++] = (exec_arg){DNNL_ARG_DIFF_SHIFT, dbt};
        /* As for batch norm: oneDNN 2.6 may count SHIFT among the inputs of a
         * use_shift backward; the gradients do not depend on it. */
        memset(shift, 0, (size_t)D * sizeof(float));
        a[na++] = (exec_arg){DNNL_ARG_SHIFT, shift};
    }
    KD_TRY(entry_execute(st, e, a, na));
    if (accumulate && dx) add_into(kd_f32(dx), dxo, n);
    if (dgamma) {
        float *o = kd_f32(dgamma);
        for (int64_t d = 0; d < D; d++) o[d] = accumulate ? o[d] + dg[d] : dg[d];
    }
    if (dbeta) {
        float *o = kd_f32(dbeta);
        for (int64_t d = 0; d < D; d++) o[d] = accumulate ? o[d] + dbt[d] : dbt[d];
    }
    return KD_OK;
}

static kd_status cpu_layernorm_backward(kd_backend *be, float eps, const kd_tensor *dy,
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
        CPU_RUN_LOCKED(s, ln_bwd_locked(&g_cpu, eps, dy, x, gamma, save_mean, save_rstd, dx,
                                        dgamma, dbeta, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_be()->layernorm_backward(be, eps, dy, x, gamma, save_mean, save_rstd, dx,
                                            dgamma, dbeta, accumulate);
    return s;
}

/* ---------------------------------------------------------------- softmax */

/* oneDNN's softmax over axis 1 of the rows (R, C). On Swin's attention scores
 * ((512, 3, 49, 49), bench_kernels swin, 1 thread) it runs the forward in
 * ~2.5 ms and the backward in ~1.2 ms, against ~26 ms and ~20 ms for the ref
 * kernel's loops (a double exp per element). */
static kd_status softmax_entry(cpu_state *st, prim_kind kind, int64_t R, int64_t C,
                               prim_entry **out) {
    prim_key k;
    key_init(&k, kind);
    k.d[0] = R, k.d[1] = C;
    uint64_t h = key_hash(&k);
    if ((*out = cache_find(st, &k, h))) return KD_OK;
    dnnl_memory_desc_t md;
    dnnl_softmax_desc_t op, hint;
    dnnl_dims_t dims = {R, C};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&md, 2, dims, dnnl_f32, dnnl_ab);
    if (s == dnnl_success)
        s = dnnl_softmax_forward_desc_init(kind == PK_SOFTMAX_FWD ? &op : &hint,
                                           dnnl_forward_training, &md, 1);
    if (s == dnnl_success && kind == PK_SOFTMAX_BWD)
        s = dnnl_softmax_backward_desc_init(&op, &md, &md, 1);
    return cache_insert(st, &k, h, s, &op, kind == PK_SOFTMAX_BWD ? &hint : NULL, out);
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
    KD_TRY(scratch_reserve_for(st, e, 0));
    exec_arg a[2] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    return entry_execute(st, e, a, 2);
}

static kd_status cpu_softmax_forward(kd_backend *be, const kd_tensor *x, kd_tensor *y) {
    int use_ref = !plain_f32(x) || !plain_f32(y) || x->ndim < 1 || kd_tensor_numel(x) == 0 ||
                  !kd_tensor_same_shape(x, y);
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, softmax_fwd_locked(&g_cpu, x, y, &use_ref));
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
    KD_TRY(scratch_reserve_for(st, e, accumulate ? (size_t)(R * C) : 0));
    float *out = accumulate ? scratch_floats(st, e, 0) : kd_f32(dx);
    exec_arg a[3] = {{DNNL_ARG_DST, y->data}, {DNNL_ARG_DIFF_DST, dy->data}, {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(entry_execute(st, e, a, 3));
    if (accumulate) add_into(kd_f32(dx), out, R * C);
    return KD_OK;
}

static kd_status cpu_softmax_backward(kd_backend *be, const kd_tensor *y, const kd_tensor *dy,
                                      kd_tensor *dx, int accumulate) {
    int use_ref = !plain_f32(y) || !plain_f32(dy) || !plain_f32(dx) || y->ndim < 1 ||
                  kd_tensor_numel(y) == 0 || !kd_tensor_same_shape(y, dy) ||
                  !kd_tensor_same_shape(y, dx);
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, softmax_bwd_locked(&g_cpu, y, dy, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref) return ref_be()->softmax_backward(be, y, dy, dx, accumulate);
    return s;
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

static kd_status eltwise_entry(cpu_state *st, prim_kind kind, dnnl_alg_kind_t alg, float alpha,
                               int64_t n, prim_entry **out) {
    prim_key k;
    key_init(&k, kind);
    k.alg = alg;
    k.d[0] = n;
    k.f[0] = alpha;
    uint64_t h = key_hash(&k);
    if ((*out = cache_find(st, &k, h))) return KD_OK;

    dnnl_memory_desc_t md;
    dnnl_eltwise_desc_t op, hint;
    dnnl_dims_t dims = {n};
    dnnl_status_t s = dnnl_memory_desc_init_by_tag(&md, 1, dims, dnnl_f32, dnnl_x);
    if (s == dnnl_success)
        s = dnnl_eltwise_forward_desc_init(kind == PK_ELTWISE_FWD ? &op : &hint,
                                           dnnl_forward_training, alg, &md, alpha, 0.f);
    if (s == dnnl_success && kind == PK_ELTWISE_BWD)
        s = dnnl_eltwise_backward_desc_init(&op, alg, &md, &md, alpha, 0.f);
    return cache_insert(st, &k, h, s, &op, kind == PK_ELTWISE_BWD ? &hint : NULL, out);
}

static kd_status eltwise_fwd_locked(cpu_state *st, kd_eltwise_kind kind, float alpha,
                                    const kd_tensor *x, kd_tensor *y, int *use_ref) {
    prim_entry *e;
    KD_TRY(eltwise_entry(st, PK_ELTWISE_FWD, eltwise_alg(kind), alpha, kd_tensor_numel(x), &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(scratch_reserve_for(st, e, 0));
    exec_arg a[2] = {{DNNL_ARG_SRC, x->data}, {DNNL_ARG_DST, y->data}};
    return entry_execute(st, e, a, 2);
}

/* An elementwise operand of a blocked tensor seen as a flat plain tensor of
 * the same shape (exact when every operand has the same layout). */
static kd_tensor flat_view(const kd_tensor *t) {
    kd_tensor v = *t;
    if (blocked(t)) {
        v.layout = KD_LAYOUT_STRIDED;
        kd_tensor_set_shape(&v, t->ndim, t->shape);
    }
    return v;
}

static kd_status cpu_eltwise_forward(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                     const kd_tensor *x, kd_tensor *y) {
    if ((blocked(x) || blocked(y)) && x->layout == y->layout) {
        kd_tensor xv = flat_view(x), yv = flat_view(y);
        return cpu_eltwise_forward(be, kind, alpha, &xv, &yv);
    }
    /* oneDNN 2.6's log has up to ~4e-6 absolute error (98,000 ulp near x = 1),
     * which matters for log-ratios in distillation losses: use libm's logf. */
    int use_ref = !plain_f32(x) || !plain_f32(y) || kd_tensor_numel(x) == 0 ||
                  kd_tensor_numel(x) != kd_tensor_numel(y) ||
                  eltwise_alg(kind) == dnnl_alg_kind_undef || kind == KD_ELTWISE_LOG;
    kd_status s = KD_OK;
    if (!use_ref) CPU_RUN_LOCKED(s, eltwise_fwd_locked(&g_cpu, kind, alpha, x, y, &use_ref));
    if (s == KD_OK && use_ref) return ref_eltwise_fwd(be, kind, alpha, x, y);
    return s;
}

static kd_status eltwise_bwd_locked(cpu_state *st, kd_eltwise_kind kind, float alpha,
                                    const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                    int accumulate, int *use_ref) {
    int64_t n = kd_tensor_numel(dx);
    prim_entry *e;
    KD_TRY(eltwise_entry(st, PK_ELTWISE_BWD, eltwise_alg(kind), alpha, n, &e));
    if (!e->pd) return *use_ref = 1, KD_OK;
    KD_TRY(scratch_reserve_for(st, e, accumulate ? (size_t)n : 0));
    float *out = accumulate ? scratch_floats(st, e, 0) : kd_f32(dx);
    int src_arg = kind == KD_ELTWISE_EXP ? DNNL_ARG_DST : DNNL_ARG_SRC;
    exec_arg a[3] = {{src_arg, src->data}, {DNNL_ARG_DIFF_DST, dy->data}, {DNNL_ARG_DIFF_SRC, out}};
    KD_TRY(entry_execute(st, e, a, 3));
    if (accumulate) add_into(kd_f32(dx), out, n);
    return KD_OK;
}

static kd_status cpu_eltwise_backward(kd_backend *be, kd_eltwise_kind kind, float alpha,
                                      const kd_tensor *dy, const kd_tensor *src, kd_tensor *dx,
                                      int accumulate) {
    if ((blocked(dy) || blocked(src) || blocked(dx)) && dy->layout == dx->layout &&
        src->layout == dx->layout) {
        kd_tensor dyv = flat_view(dy), sv = flat_view(src), dxv = flat_view(dx);
        return cpu_eltwise_backward(be, kind, alpha, &dyv, &sv, &dxv, accumulate);
    }
    int64_t n = kd_tensor_numel(dx);
    int use_ref = !plain_f32(dy) || !plain_f32(src) || !plain_f32(dx) || n == 0 ||
                  kd_tensor_numel(dy) != n || kd_tensor_numel(src) != n ||
                  eltwise_alg(kind) == dnnl_alg_kind_undef;
    kd_status s = KD_OK;
    if (!use_ref)
        CPU_RUN_LOCKED(s, eltwise_bwd_locked(&g_cpu, kind, alpha, dy, src, dx, accumulate, &use_ref));
    if (s == KD_OK && use_ref)
        return ref_eltwise_bwd(be, kind, alpha, dy, src, dx, accumulate);
    return s;
}

/* ------------------------------------------------------------------- trim */

static void cpu_trim(kd_backend *be) {
    (void)be;
    cpu_state *st = &g_cpu;
    pthread_mutex_lock(&st->lock);
    for (int b = 0; b < CPU_BUCKETS; b++) {
        prim_entry *e = st->buckets[b];
        while (e) {
            prim_entry *next = e->next;
            entry_free(e);
            e = next;
        }
        st->buckets[b] = NULL;
    }
    st->nentries = 0;
    kd_aligned_free(st->scratch);
    st->scratch = NULL;
    st->scratch_cap = 0;
    pthread_mutex_unlock(&st->lock);
}

/* ---------------------------------------------------------------- backend */

static kd_backend g_cpu_backend = {
    .name = "cpu",
    .device = KD_DEVICE_CPU,
    .blocked_channels = KD_LAYOUT_BLOCK,
    .bf16 = -1, /* resolved by kd__backend_cpu() */
    .conv2d_forward = cpu_conv2d_forward,
    .conv2d_backward_data = cpu_conv2d_backward_data,
    .conv2d_backward_weights = cpu_conv2d_backward_weights,
    .batchnorm_forward = cpu_batchnorm_forward,
    .batchnorm_backward = cpu_batchnorm_backward,
    .pool2d_forward = cpu_pool2d_forward,
    .pool2d_backward = cpu_pool2d_backward,
    .gemm = cpu_gemm,
    .gemm_batch = cpu_gemm_batch,
    .layernorm_forward = cpu_layernorm_forward,
    .layernorm_backward = cpu_layernorm_backward,
    .softmax_forward = cpu_softmax_forward,
    .softmax_backward = cpu_softmax_backward,
    .eltwise_forward = cpu_eltwise_forward,
    .eltwise_backward = cpu_eltwise_backward,
    .trim = cpu_trim,
    .impl = &g_cpu,
};

/* bf16 convolutions run natively when oneDNN finds AVX-512-BF16 (or AMX,
 * which includes it); elsewhere oneDNN would emulate them slowly, so kd
 * reports no bf16 and the graph refuses the setting. KD_BF16=0 in the
 * environment hides it (to compare). */
static void cpu_detect_bf16(void) {
    const char *env = getenv("KD_BF16");
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    int native = ((int)isa & (int)dnnl_cpu_isa_avx512_core_bf16) ==
                 (int)dnnl_cpu_isa_avx512_core_bf16;
    g_cpu_backend.bf16 = native && !(env && env[0] == '0');
}

kd_backend *kd__backend_cpu(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, cpu_detect_bf16);
    return &g_cpu_backend;
}

int kd__cpu_primitive_count(void) {
    pthread_mutex_lock(&g_cpu.lock);
    int n = g_cpu.nprims_created;
    pthread_mutex_unlock(&g_cpu.lock);
    return n;
}

int kd__cpu_cache_size(void) {
    pthread_mutex_lock(&g_cpu.lock);
    int n = g_cpu.nentries;
    pthread_mutex_unlock(&g_cpu.lock);
    return n;
}

size_t kd__cpu_scratch_bytes(void) {
    pthread_mutex_lock(&g_cpu.lock);
    size_t n = g_cpu.scratch_cap;
    pthread_mutex_unlock(&g_cpu.lock);
    return n;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int kd__cpu_conv_impls(int which, char *buf, size_t cap) {
    static const prim_kind kinds[3] = {PK_CONV_FWD, PK_CONV_BWD_DATA, PK_CONV_BWD_WEIGHTS};
    if (cap) buf[0] = '\0';
    if (which < 0 || which > 2) return 0;
    enum { MAX_NAMES = 32 };
    const char *names[MAX_NAMES];
    int n = 0;
    pthread_mutex_lock(&g_cpu.lock);
    for (int b = 0; b < CPU_BUCKETS; b++) {
        for (const prim_entry *e = g_cpu.buckets[b]; e; e = e->next) {
            if (e->key.kind != (int32_t)kinds[which]) continue;
            const char *name = "ref";
            if (e->pd && (dnnl_primitive_desc_query(e->pd, dnnl_query_impl_info_str, 0, &name) !=
                              dnnl_success || !name))
                name = "?";
            int seen = 0;
            for (int i = 0; i < n && !seen; i++) seen = !strcmp(names[i], name);
            if (!seen && n < MAX_NAMES) names[n++] = name;
        }
    }
    qsort(names, (size_t)n, sizeof names[0], cmp_str);
    size_t len = 0;
    for (int i = 0; i < n && cap; i++) {
        int w = snprintf(buf + len, cap - len, "%s%s", i ? "+" : "", names[i]);
        if (w < 0 || (size_t)w >= cap - len) { /* no room for this name: drop its part */
            buf[len] = '\0';
            break;
        }
        len += (size_t)w;
    }
    pthread_mutex_unlock(&g_cpu.lock);
    return n;
}
