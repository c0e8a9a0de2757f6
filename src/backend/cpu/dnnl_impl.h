/* Internal to the cpu backend (src/backend/cpu/dnnl_*.c): the primitive
 * cache and its state (dnnl_cache.c), the layout and conversion helpers
 * (dnnl_layout.c), and the kernels each file implements for the vtable in
 * dnnl_backend.c. The overview of what runs where is at the top of
 * dnnl_backend.c. */
#ifndef KD_BACKEND_CPU_DNNL_IMPL_H
#define KD_BACKEND_CPU_DNNL_IMPL_H

#include "backend/backend_impl.h"
#include "backend/cpu/dnnl_backend.h"

#include <dnnl.h>
#include <dnnl_debug.h>

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------ status check */

/* Turns a failing dnnl_status_t into kd_error(KD_ERR_BACKEND) naming the
 * oneDNN call (the text of `expr` up to its '(') and the status. */
kd_status kd__dnnl_check(dnnl_status_t st, const char *expr);

/* Evaluates to KD_OK or the kd_status of a failing oneDNN call; use as
 * KD_TRY(KD_DNNL_CHECK(dnnl_...(...))). */
#define KD_DNNL_CHECK(call) kd__dnnl_check((call), #call)

/* ------------------------------------------------------- state and cache */

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
    int32_t lay;   /* layout bits of the operands (per primitive kind: conv_key, norm_entry, ...) */
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

/* The process's one engine, stream, cache and scratch buffer (dnnl_cache.c). */
extern cpu_state kd__cpu_st;

/* Creates the engine and stream on first use (lock held). */
kd_status kd__cpu_state_init_locked(cpu_state *st);

static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Temporary floats after the scratchpad part of the scratch buffer; `off` in
 * floats. Valid until the next reserve. */
float *kd__cpu_scratch_floats(cpu_state *st, const prim_entry *e, size_t off);
/* Makes the scratch buffer hold e's scratchpad and nfloats floats after it
 * (invalidates earlier pointers into it: reserve once, before carving). */
kd_status kd__cpu_scratch_reserve_for(cpu_state *st, const prim_entry *e, size_t nfloats);

void kd__cpu_key_init(prim_key *k, prim_kind kind);
uint64_t kd__cpu_key_hash(const prim_key *k);
prim_entry *kd__cpu_cache_find(cpu_state *st, const prim_key *k, uint64_t h);
/* Creates the cache entry for key k: the primitive descriptor for `op` (for a
 * backward op, against a forward pd made from `hint_op`) and its primitive.
 * `init_status` is what the op descriptor initialisation returned (both op
 * and hint). A rejection by oneDNN is cached as an entry with pd == NULL;
 * other failures are errors. _sum: with post_sum 1, a sum post-op
 * (dst += result). */
kd_status kd__cpu_cache_insert(cpu_state *st, const prim_key *k, uint64_t h, dnnl_status_t init_status,
                               const_dnnl_op_desc_t op, const_dnnl_op_desc_t hint_op, prim_entry **out);
kd_status kd__cpu_cache_insert_sum(cpu_state *st, const prim_key *k, uint64_t h, dnnl_status_t init_status,
                                   const_dnnl_op_desc_t op, const_dnnl_op_desc_t hint_op, int post_sum,
                                   prim_entry **out);

typedef struct {
    int arg;
    const void *ptr;
} exec_arg;

/* Runs e on (args) plus the scratchpad, which must have been reserved. */
kd_status kd__cpu_entry_execute(cpu_state *st, prim_entry *e, const exec_arg *args, int nargs);

/* Runs `call` (a *_locked kernel body) under the backend lock, after making
 * sure the engine and stream exist; its status lands in `s`. */
#define CPU_RUN_LOCKED(s, call)                                \
    do {                                                       \
        pthread_mutex_lock(&kd__cpu_st.lock);                  \
        (s) = kd__cpu_state_init_locked(&kd__cpu_st);          \
        if ((s) == KD_OK) (s) = (call);                        \
        pthread_mutex_unlock(&kd__cpu_st.lock);                \
    } while (0)

/* ------------------------------------------------- layouts and conversion */

static inline kd_backend *ref_be(void) { return kd__backend_ref(); }

/* Floats of scratch that hold n bf16 values, rounded up to 64 bytes. */
static inline size_t bf16_floats(int64_t n) { return align64((size_t)n * 2) / sizeof(float); }

/* The tensors oneDNN gets here: float32, plain row-major, contiguous, on
 * the CPU. Anything else goes to the ref kernels (which report it). */
static inline int plain_f32(const kd_tensor *t) {
    return t && t->dtype == KD_F32 && t->device == KD_DEVICE_CPU &&
           t->layout == KD_LAYOUT_STRIDED && t->data && kd_tensor_is_contiguous(t);
}

/* conv2d and pool2d operands: plain and 4-d. */
static inline int plain_4d(const kd_tensor *t) { return plain_f32(t) && t->ndim == 4; }

static inline int blocked(const kd_tensor *t) { return t && t->layout == KD_LAYOUT_NCHW16C; }
/* NCHW16C or NHWC: the activation layouts without strides. */
static inline int packed(const kd_tensor *t) {
    return t && (t->layout == KD_LAYOUT_NCHW16C || t->layout == KD_LAYOUT_NHWC);
}

/* A packed 4-d activation of dtype dt on the CPU (NCHW16C needs C % 16 == 0). */
static inline int packed_4d(const kd_tensor *t, kd_dtype dt) {
    return packed(t) && t->dtype == dt && t->device == KD_DEVICE_CPU && t->data && t->ndim == 4 &&
           (t->layout == KD_LAYOUT_NHWC || t->shape[1] % KD_LAYOUT_BLOCK == 0);
}

/* A 4-d float32 activation oneDNN can take: plain contiguous NCHW, NCHW16C
 * with C % 16 == 0, or NHWC. */
static inline int act_4d(const kd_tensor *t) { return packed(t) ? packed_4d(t, KD_F32) : plain_4d(t); }

/* A bf16 activation (precision bf16): NCHW16C (C % 16 == 0) or NHWC. */
static inline int act16(const kd_tensor *t) { return packed_4d(t, KD_BF16); }

/* act_4d, or a bf16 activation (the kernels that take those: conv, batch
 * norm, ReLU). */
static inline int act_4d_any(const kd_tensor *t) { return act_4d(t) || act16(t); }

/* oneDNN's tag for a 4-d activation in kd layout `l`. */
static inline dnnl_format_tag_t act_tag_of(kd_layout l) {
    return l == KD_LAYOUT_NCHW16C ? dnnl_nChw16c : l == KD_LAYOUT_NHWC ? dnnl_nhwc : dnnl_nchw;
}

/* oneDNN checks (in + pl + pr - ext) / stride + 1 == out with integer
 * division; give it the exact right padding the output needs (never below 0). */
static inline int64_t right_pad(int64_t in, int64_t out, int64_t ext, int64_t stride, int64_t pl) {
    int64_t pr = (out - 1) * stride + ext - in - pl;
    return pr > 0 ? pr : 0;
}

/* dst += src, n floats. */
void kd__cpu_add_into(float *restrict dst, const float *restrict src, int64_t n);

/* Plain float32 heap copies of blocked operands (float32 or bf16) for the
 * ref kernels (rare path). */
#define PS_MAX 6
typedef struct {
    int n;
    kd_tensor tmp[PS_MAX];
    kd_tensor *orig[PS_MAX];
    int is_out[PS_MAX];
} plain_set;
/* t itself when it is not blocked, else a plain heap copy of it (NULL and
 * *s set on OOM). Outputs are copied too (accumulate reads them). */
kd_tensor *kd__cpu_ps_plain(plain_set *ps, const kd_tensor *t, int is_out, kd_status *s);
/* Converts the outputs back into their blocked tensors (when s is KD_OK)
 * and frees the copies; returns s. */
kd_status kd__cpu_ps_finish(plain_set *ps, kd_status s);

/* ------------------------------------------------ the vtable's kernels */

/* dnnl_conv.c */
kd_status kd__cpu_conv2d_forward(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *x,
                                 const kd_tensor *w, const kd_tensor *b, kd_tensor *y);
kd_status kd__cpu_conv2d_backward_data(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *dy,
                                       const kd_tensor *w, kd_tensor *dx, int accumulate);
kd_status kd__cpu_conv2d_backward_weights(kd_backend *be, const kd_conv2d_params *p, const kd_tensor *dy,
                                          const kd_tensor *x, kd_tensor *dw, kd_tensor *db, int accumulate);

/* dnnl_norm.c */
kd_status kd__cpu_batchnorm_forward(kd_backend *be, const kd_bn_params *p, const kd_tensor *x,
                                    const kd_tensor *gamma, const kd_tensor *beta, kd_tensor *running_mean,
                                    kd_tensor *running_var, kd_tensor *y, kd_tensor *save_mean,
                                    kd_tensor *save_rstd);
kd_status kd__cpu_batchnorm_backward(kd_backend *be, const kd_bn_params *p, const kd_tensor *dy,
                                     const kd_tensor *x, const kd_tensor *gamma, const kd_tensor *save_mean,
                                     const kd_tensor *save_rstd, kd_tensor *dx, kd_tensor *dgamma,
                                     kd_tensor *dbeta, int accumulate);
kd_status kd__cpu_layernorm_forward(kd_backend *be, float eps, const kd_tensor *x, const kd_tensor *gamma,
                                    const kd_tensor *beta, kd_tensor *y, kd_tensor *save_mean,
                                    kd_tensor *save_rstd);
kd_status kd__cpu_layernorm_backward(kd_backend *be, float eps, const kd_tensor *dy, const kd_tensor *x,
                                     const kd_tensor *gamma, const kd_tensor *save_mean,
                                     const kd_tensor *save_rstd, kd_tensor *dx, kd_tensor *dgamma,
                                     kd_tensor *dbeta, int accumulate);

/* dnnl_pool.c */
kd_status kd__cpu_pool2d_forward(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *x, kd_tensor *y,
                                 kd_tensor *ws);
kd_status kd__cpu_pool2d_backward(kd_backend *be, const kd_pool2d_params *p, const kd_tensor *dy,
                                  const kd_tensor *ws, kd_tensor *dx, int accumulate);

/* dnnl_matmul.c */
kd_status kd__cpu_gemm(kd_backend *be, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                       const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                       int64_t ldc);
kd_status kd__cpu_gemm_batch(kd_backend *be, int64_t batch, int trans_a, int trans_b, int64_t M, int64_t N,
                             int64_t K, float alpha, const float *A, int64_t lda, int64_t sa, const float *B,
                             int64_t ldb, int64_t sb, float beta, float *C, int64_t ldc, int64_t sc);

/* dnnl_eltwise.c */
kd_status kd__cpu_softmax_forward(kd_backend *be, const kd_tensor *x, kd_tensor *y);
kd_status kd__cpu_softmax_backward(kd_backend *be, const kd_tensor *y, const kd_tensor *dy, kd_tensor *dx,
                                   int accumulate);
kd_status kd__cpu_eltwise_forward(kd_backend *be, kd_eltwise_kind kind, float alpha, const kd_tensor *x,
                                  kd_tensor *y);
kd_status kd__cpu_eltwise_backward(kd_backend *be, kd_eltwise_kind kind, float alpha, const kd_tensor *dy,
                                   const kd_tensor *src, kd_tensor *dx, int accumulate);

/* dnnl_cache.c */
void kd__cpu_trim(kd_backend *be);

#endif /* KD_BACKEND_CPU_DNNL_IMPL_H */
