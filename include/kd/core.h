/*
 * kd/core.h: the bottom layer of libkd. Status codes with messages, the tensor
 * descriptor, a bump arena, the counter-based RNG, logging and thread settings.
 *
 * Usage:
 *     kd_tensor *t = NULL;
 *     int64_t shape[4] = {64, 3, 32, 32};
 *     if (kd_tensor_new(KD_F32, 4, shape, &t) != KD_OK)
 *         fprintf(stderr, "kd: %s\n", kd_last_error());
 *     ...
 *     kd_tensor_free(t);
 *
 * Every library function that can fail returns a kd_status; on failure it also
 * records a one-sentence message (naming the file, value or shape at fault)
 * that kd_last_error() returns. The library never calls exit().
 */
#ifndef KD_CORE_H
#define KD_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- status */

/* X-macro table: name, value, default text. */
#define KD_STATUS_MAP(XX)                                                  \
    XX(OK, 0, "ok")                                                        \
    XX(ERR_NOMEM, -1, "out of memory")                                     \
    XX(ERR_INVALID, -2, "invalid argument")                                \
    XX(ERR_IO, -3, "input/output error")                                   \
    XX(ERR_FORMAT, -4, "malformed or truncated data")                      \
    XX(ERR_SHAPE, -5, "shape mismatch")                                    \
    XX(ERR_NOT_FOUND, -6, "not found")                                     \
    XX(ERR_NUMERIC, -7, "non-finite value")                                \
    XX(ERR_BACKEND, -8, "backend failure")                                 \
    XX(ERR_UNSUPPORTED, -9, "unsupported")                                 \
    XX(ERR_INTERNAL, -10, "internal error")

typedef enum {
#define KD__STATUS_ENUM(name, val, text) KD_##name = val,
    KD_STATUS_MAP(KD__STATUS_ENUM)
#undef KD__STATUS_ENUM
} kd_status;

/* Short fixed text for a status code ("out of memory"). */
const char *kd_status_str(kd_status s);

/* Records a formatted message for the calling thread and returns s, so that
 * library code can write `return kd_error(KD_ERR_IO, "cannot open %s", path);`. */
kd_status kd_error(kd_status s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The calling thread's last message (or the status text when none was set). */
const char *kd_last_error(void);
void kd_clear_error(void);

/* Propagate a failing status from an expression. */
#define KD_TRY(expr)                                                       \
    do {                                                                   \
        kd_status kd__s = (expr);                                          \
        if (kd__s != KD_OK) return kd__s;                                  \
    } while (0)

/* --------------------------------------------------------------- tensors */

#define KD_MAX_DIMS 6

typedef enum { KD_F32 = 0, KD_BF16, KD_F16, KD_I64, KD_I32, KD_U8, KD_DTYPE_COUNT } kd_dtype;
size_t kd_dtype_size(kd_dtype dt);
const char *kd_dtype_name(kd_dtype dt); /* safetensors spelling: "F32", "BF16", ... */

typedef enum { KD_DEVICE_CPU = 0, KD_DEVICE_CUDA } kd_device;

/* How the elements are laid out in memory. KD_LAYOUT_STRIDED is the plain
 * row-major (possibly strided) layout that every op understands.
 * KD_LAYOUT_NCHW16C is the channel-blocked activation layout of oneDNN
 * (nChw16c): a 4-d tensor of shape (N, C, H, W) with C % 16 == 0 stored as
 * [N][C/16][H][W][16]. There is no padding (nbytes == numel * 4), so
 * elementwise loops over the flat buffer are exact when every operand has the
 * same layout; the `stride` fields of such a tensor are unused (0). The
 * autograd layer creates them only on backends with `blocked_channels` (see
 * backend.h). KD_LAYOUT_NHWC is channels-last: a 4-d tensor of shape
 * (N, C, H, W) stored as [N][H][W][C], also without padding and with unused
 * strides; the autograd layer uses it only for the bf16 activations of
 * graphs on CPUs whose fastest bf16 kernels want it (AMX; backend.h
 * `bf16_layout`). KD_LAYOUT_OPAQUE is reserved for a backend's own
 * descriptor (`layout_desc`). */
typedef enum { KD_LAYOUT_STRIDED = 0, KD_LAYOUT_OPAQUE, KD_LAYOUT_NCHW16C, KD_LAYOUT_NHWC } kd_layout;

#define KD_LAYOUT_BLOCK 16 /* channel block of KD_LAYOUT_NCHW16C */

typedef struct kd_tensor kd_tensor;
struct kd_tensor {
    kd_dtype dtype;
    kd_device device;
    kd_layout layout;
    int ndim;
    int64_t shape[KD_MAX_DIMS];
    int64_t stride[KD_MAX_DIMS]; /* in elements; contiguous row-major by default */
    void *data;                  /* not owned when `owns_data` is 0 */
    const void *layout_desc;     /* backend descriptor for KD_LAYOUT_OPAQUE */
    int owns_data;
    /* Autograd. `grad` has the same shape; for parameters it is persistent and
     * accumulates (+=) until zeroed; for an op output (other than the loss)
     * kd_backward recycles it once the op's rule has used it, leaving NULL.
     * `node` is the tape index of the op that produced this tensor, or -1 for
     * a leaf. */
    int requires_grad;
    kd_tensor *grad;
    int32_t node;
    int32_t grad_ready; /* 1 once `grad` got a value during the current backward */
};

/* Heap tensors (parameters, buffers, datasets). Data is zeroed, 64-byte aligned. */
kd_status kd_tensor_new(kd_dtype dt, int ndim, const int64_t *shape, kd_tensor **out);
void kd_tensor_free(kd_tensor *t); /* also frees t->grad if heap-owned; NULL is fine */
/* Allocates t->grad (zeroed) if missing and sets requires_grad. */
kd_status kd_tensor_require_grad(kd_tensor *t);

int64_t kd_tensor_numel(const kd_tensor *t);
size_t kd_tensor_nbytes(const kd_tensor *t);
int kd_tensor_is_contiguous(const kd_tensor *t);
int kd_tensor_same_shape(const kd_tensor *a, const kd_tensor *b);
/* Fills shape/stride for a contiguous tensor; data untouched. */
void kd_tensor_set_shape(kd_tensor *t, int ndim, const int64_t *shape);
/* "(64, 3, 32, 32)" into buf; returns buf. */
const char *kd_shape_str(const kd_tensor *t, char *buf, size_t n);
static inline float *kd_f32(const kd_tensor *t) { return (float *)t->data; }

/* Layout reorders between contiguous NCHW and NCHW16C (C % 16 == 0), on raw
 * float buffers of N*C*HW elements: dst = src, or dst += src when
 * `accumulate`. Plain C, OpenMP over (n, channel block); deterministic. */
void kd_layout_to_nchw16c(float *dst, const float *src, int64_t N, int64_t C, int64_t HW,
                          int accumulate);
void kd_layout_to_strided(float *dst, const float *src, int64_t N, int64_t C, int64_t HW,
                          int accumulate);
/* Any of the three 4-d layouts (KD_LAYOUT_STRIDED contiguous, NCHW16C, NHWC)
 * to any other, or a copy (accumulate) when they are the same. */
void kd_layout_convert(float *dst, kd_layout dst_layout, const float *src, kd_layout src_layout,
                       int64_t N, int64_t C, int64_t HW, int accumulate);
/* bfloat16 <-> float32 on raw buffers of n values. To bf16: round to
 * nearest even, as PyTorch's .to(torch.bfloat16) and oneDNN; float32
 * denormals (below 1.2e-38) become signed zeros, as vcvtneps2bf16 makes
 * them, so that the vector path (AVX-512-BF16, picked at run time) and the
 * scalar one give the same bits; a NaN stays a quiet NaN. To float32:
 * exact. OpenMP over fixed blocks; deterministic. */
void kd_bf16_from_f32(uint16_t *dst, const float *src, int64_t n);
void kd_bf16_to_f32(float *dst, const uint16_t *src, int64_t n);
static inline float kd_bf16_value(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
static inline uint16_t kd_bf16_round(float f) {
    union { float f; uint32_t u; } v = {f};
    uint32_t a = v.u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u); /* quiet NaN */
    if (a < 0x00800000u) return (uint16_t)((v.u >> 16) & 0x8000u); /* denormal: signed zero */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* Offset of element (n, c, hw) of a 4-d (N, C, H*W) tensor in `layout`. */
static inline int64_t kd_layout_offset(kd_layout layout, int64_t n, int64_t c, int64_t hw,
                                       int64_t C, int64_t HW) {
    if (layout == KD_LAYOUT_NCHW16C)
        return ((n * (C / KD_LAYOUT_BLOCK) + c / KD_LAYOUT_BLOCK) * HW + hw) * KD_LAYOUT_BLOCK +
               c % KD_LAYOUT_BLOCK;
    if (layout == KD_LAYOUT_NHWC) return (n * HW + hw) * C + c;
    return (n * C + c) * HW + hw;
}

/* ----------------------------------------------------------------- arena */

/* A bump allocator for per-step activations. It grows by chunks while the
 * first step runs; kd_arena_reset() then folds all chunks into one block of
 * the high-water size, so later steps of the same shape allocate nothing. */
typedef struct kd_arena kd_arena;
kd_status kd_arena_init(kd_arena **out, size_t initial_bytes);
void kd_arena_free(kd_arena *a);
void *kd_arena_alloc(kd_arena *a, size_t bytes); /* 64-byte aligned, NULL on OOM */
void kd_arena_reset(kd_arena *a);
size_t kd_arena_used(const kd_arena *a);
size_t kd_arena_capacity(const kd_arena *a);
size_t kd_arena_grow_count(const kd_arena *a); /* chunk mallocs since init */
size_t kd_arena_high_water(const kd_arena *a); /* most bytes in use at once since init */

/* ------------------------------------------------------------------- rng */

/* Philox4x32-10: a counter-based generator. A stream is (seed, key); the n-th
 * draw of a stream depends only on (seed, key, n), never on threads or order,
 * so per-sample augmentation and dropout masks are reproducible under any
 * thread count. */
typedef struct {
    uint64_t seed;
    uint64_t key; /* stream id, e.g. (epoch << 32) | sample index */
    uint64_t counter;
    uint32_t buf[4];
    int buf_left;
} kd_rng;

void kd_rng_init(kd_rng *r, uint64_t seed, uint64_t key);
uint32_t kd_rng_u32(kd_rng *r);
float kd_rng_uniform(kd_rng *r);           /* [0, 1) with 24 bits */
float kd_rng_normal(kd_rng *r);            /* N(0, 1), Box-Muller */
uint32_t kd_rng_below(kd_rng *r, uint32_t n); /* uniform in [0, n), unbiased */
/* Raw Philox block: 4 words for (counter, key) under `seed`. */
void kd_philox4x32(uint64_t seed, uint64_t key, uint64_t counter, uint32_t out[4]);
/* Mixes values into a 64-bit stream key (splitmix64 chain). */
uint64_t kd_rng_key(uint64_t a, uint64_t b);

/* --------------------------------------------------------------- logging */

typedef enum { KD_LOG_DEBUG = 0, KD_LOG_INFO, KD_LOG_WARN, KD_LOG_ERROR, KD_LOG_QUIET } kd_log_level;
void kd_log_set_level(kd_log_level lvl);
kd_log_level kd_log_get_level(void);
void kd_log_msg(kd_log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* --------------------------------------------------------------- threads */

/* Number of threads used by kd's own kernels and by oneDNN (OpenMP). 0 means
 * "all cores". Results are identical for a fixed thread count. */
void kd_set_num_threads(int n);
int kd_get_num_threads(void);

/* Aligned heap memory (64 bytes). */
void *kd_aligned_alloc(size_t bytes);
void kd_aligned_free(void *p);

/* Library version string, e.g. "0.1.0". */
const char *kd_version(void);

#ifdef __cplusplus
}
#endif
#endif /* KD_CORE_H */
