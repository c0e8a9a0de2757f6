/* Heap tensors, shapes and aligned memory. */
#include "kd/core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *kd_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, (bytes + 63) & ~(size_t)63) != 0) return NULL;
    return p;
}

void kd_aligned_free(void *p) { free(p); }

size_t kd_dtype_size(kd_dtype dt) {
    switch (dt) {
    case KD_F32: return 4;
    case KD_BF16: return 2;
    case KD_F16: return 2;
    case KD_I64: return 8;
    case KD_I32: return 4;
    case KD_U8: return 1;
    default: return 0;
    }
}

const char *kd_dtype_name(kd_dtype dt) {
    switch (dt) {
    case KD_F32: return "F32";
    case KD_BF16: return "BF16";
    case KD_F16: return "F16";
    case KD_I64: return "I64";
    case KD_I32: return "I32";
    case KD_U8: return "U8";
    default: return "?";
    }
}

void kd_tensor_set_shape(kd_tensor *t, int ndim, const int64_t *shape) {
    t->ndim = ndim;
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        t->shape[i] = shape[i];
        t->stride[i] = s;
        s *= shape[i];
    }
    for (int i = ndim; i < KD_MAX_DIMS; i++) {
        t->shape[i] = 1;
        t->stride[i] = 1;
    }
}

int64_t kd_tensor_numel(const kd_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

size_t kd_tensor_nbytes(const kd_tensor *t) {
    return (size_t)kd_tensor_numel(t) * kd_dtype_size(t->dtype);
}

int kd_tensor_is_contiguous(const kd_tensor *t) {
    if (t->layout != KD_LAYOUT_STRIDED) return 0;
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->stride[i] != s) return 0;
        s *= t->shape[i];
    }
    return 1;
}

int kd_tensor_same_shape(const kd_tensor *a, const kd_tensor *b) {
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

const char *kd_shape_str(const kd_tensor *t, char *buf, size_t n) {
    size_t off = 0;
    off += (size_t)snprintf(buf + off, n - off, "(");
    for (int i = 0; i < t->ndim && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (off < n) snprintf(buf + off, n - off, ")");
    return buf;
}

kd_status kd_tensor_new(kd_dtype dt, int ndim, const int64_t *shape, kd_tensor **out) {
    *out = NULL;
    if (ndim < 0 || ndim > KD_MAX_DIMS)
        return kd_error(KD_ERR_INVALID, "tensor rank %d is outside 0..%d", ndim, KD_MAX_DIMS);
    if (kd_dtype_size(dt) == 0) return kd_error(KD_ERR_INVALID, "unknown dtype %d", (int)dt);
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0) return kd_error(KD_ERR_INVALID, "negative dimension %lld", (long long)shape[i]);
    kd_tensor *t = calloc(1, sizeof *t);
    if (!t) return kd_error(KD_ERR_NOMEM, "out of memory allocating a tensor descriptor");
    t->dtype = dt;
    t->device = KD_DEVICE_CPU;
    t->layout = KD_LAYOUT_STRIDED;
    t->node = -1;
    kd_tensor_set_shape(t, ndim, shape);
    size_t nb = kd_tensor_nbytes(t);
    t->data = kd_aligned_alloc(nb);
    if (!t->data) {
        free(t);
        return kd_error(KD_ERR_NOMEM, "out of memory allocating %zu bytes", nb);
    }
    memset(t->data, 0, nb);
    t->owns_data = 1;
    *out = t;
    return KD_OK;
}

void kd_tensor_free(kd_tensor *t) {
    if (!t) return;
    if (t->grad && t->grad->owns_data) kd_tensor_free(t->grad);
    if (t->owns_data) kd_aligned_free(t->data);
    free(t);
}

kd_status kd_tensor_require_grad(kd_tensor *t) {
    t->requires_grad = 1;
    if (t->grad) return KD_OK;
    return kd_tensor_new(t->dtype, t->ndim, t->shape, &t->grad);
}

/* ---------------------------------------------------------- layout reorders */

void kd_layout_to_nchw16c(float *dst, const float *src, int64_t N, int64_t C, int64_t HW,
                          int accumulate) {
    const int64_t B = KD_LAYOUT_BLOCK, CB = C / B;
#pragma omp parallel for schedule(static) if (N * C * HW >= 32768)
    for (int64_t nb = 0; nb < N * CB; nb++) {
        const float *s = src + nb * B * HW; /* (n, cb*16 + l, hw) at s[l*HW + hw] */
        float *d = dst + nb * B * HW;
        for (int64_t j = 0; j < HW; j++) {
            if (accumulate)
                for (int64_t l = 0; l < B; l++) d[j * B + l] += s[l * HW + j];
            else
                for (int64_t l = 0; l < B; l++) d[j * B + l] = s[l * HW + j];
        }
    }
}

void kd_layout_to_strided(float *dst, const float *src, int64_t N, int64_t C, int64_t HW,
                          int accumulate) {
    const int64_t B = KD_LAYOUT_BLOCK, CB = C / B;
#pragma omp parallel for schedule(static) if (N * C * HW >= 32768)
    for (int64_t nb = 0; nb < N * CB; nb++) {
        const float *s = src + nb * B * HW;
        float *d = dst + nb * B * HW;
        for (int64_t l = 0; l < B; l++) {
            if (accumulate)
                for (int64_t j = 0; j < HW; j++) d[l * HW + j] += s[j * B + l];
            else
                for (int64_t j = 0; j < HW; j++) d[l * HW + j] = s[j * B + l];
        }
    }
}

/* Per sample, a (R, K) row-major matrix to its (K, R) transpose, in tiles
 * of 16 x 16 (both sides stay in cache); dst = or += src. */
static void kd__transpose_samples(float *dst, const float *src, int64_t N, int64_t R, int64_t K,
                                  int accumulate) {
    const int64_t T = 16, RT = (R + T - 1) / T;
#pragma omp parallel for schedule(static) if (N * R * K >= 32768)
    for (int64_t nt = 0; nt < N * RT; nt++) {
        const int64_t n = nt / RT, r0 = (nt % RT) * T, r1 = r0 + T < R ? r0 + T : R;
        const float *s = src + n * R * K;
        float *d = dst + n * R * K;
        for (int64_t k0 = 0; k0 < K; k0 += T) {
            const int64_t k1 = k0 + T < K ? k0 + T : K;
            for (int64_t k = k0; k < k1; k++) {
                if (accumulate)
                    for (int64_t r = r0; r < r1; r++) d[k * R + r] += s[r * K + k];
                else
                    for (int64_t r = r0; r < r1; r++) d[k * R + r] = s[r * K + k];
            }
        }
    }
}

void kd_layout_convert(float *dst, kd_layout dst_layout, const float *src, kd_layout src_layout,
                       int64_t N, int64_t C, int64_t HW, int accumulate) {
    const int64_t n = N * C * HW;
    if (dst_layout == src_layout) {
#pragma omp parallel for schedule(static) if (n >= 32768)
        for (int64_t i = 0; i < n; i++) dst[i] = accumulate ? dst[i] + src[i] : src[i];
    } else if (src_layout == KD_LAYOUT_STRIDED && dst_layout == KD_LAYOUT_NCHW16C) {
        kd_layout_to_nchw16c(dst, src, N, C, HW, accumulate);
    } else if (src_layout == KD_LAYOUT_NCHW16C && dst_layout == KD_LAYOUT_STRIDED) {
        kd_layout_to_strided(dst, src, N, C, HW, accumulate);
    } else if (src_layout == KD_LAYOUT_STRIDED && dst_layout == KD_LAYOUT_NHWC) {
        kd__transpose_samples(dst, src, N, C, HW, accumulate); /* (C, HW) -> (HW, C) */
    } else if (src_layout == KD_LAYOUT_NHWC && dst_layout == KD_LAYOUT_STRIDED) {
        kd__transpose_samples(dst, src, N, HW, C, accumulate); /* (HW, C) -> (C, HW) */
    } else { /* NCHW16C <-> NHWC: rare (a user's mix), element by element */
#pragma omp parallel for schedule(static) if (n >= 32768)
        for (int64_t nc = 0; nc < N * C; nc++) {
            const int64_t i = nc / C, c = nc % C;
            for (int64_t j = 0; j < HW; j++) {
                float v = src[kd_layout_offset(src_layout, i, c, j, C, HW)];
                float *d = dst + kd_layout_offset(dst_layout, i, c, j, C, HW);
                *d = accumulate ? *d + v : v;
            }
        }
    }
}

/* ------------------------------------------------------ bfloat16 conversion */

#define KD__CVT_BLOCK 4096 /* values per OpenMP work item */

#if defined(__x86_64__) && defined(__GNUC__)
#define KD__HAVE_BF16_JIT 1
#include <immintrin.h>
/* 16 values at a time with vcvtneps2bf16 (round to nearest even, denormals
 * to zero, quiet NaNs: the bits of kd_bf16_round). */
__attribute__((target("avx512f,avx512bf16"))) static void kd__bf16_from_f32_avx(uint16_t *dst,
                                                                                 const float *src,
                                                                                 int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), (__m256i)h);
    }
    for (; i < n; i++) dst[i] = kd_bf16_round(src[i]);
}
#endif

static int kd__bf16_native(void) {
#ifdef KD__HAVE_BF16_JIT
    __builtin_cpu_init(); /* idempotent; needed before constructors have run */
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    return 0;
#endif
}

void kd_bf16_from_f32(uint16_t *dst, const float *src, int64_t n) {
    const int64_t nb = (n + KD__CVT_BLOCK - 1) / KD__CVT_BLOCK;
    const int native = kd__bf16_native();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t b = 0; b < nb; b++) {
        int64_t i = b * KD__CVT_BLOCK, m = n - i < KD__CVT_BLOCK ? n - i : KD__CVT_BLOCK;
#ifdef KD__HAVE_BF16_JIT
        if (native) {
            kd__bf16_from_f32_avx(dst + i, src + i, m);
            continue;
        }
#endif
        (void)native;
        for (int64_t j = 0; j < m; j++) dst[i + j] = kd_bf16_round(src[i + j]);
    }
}

void kd_bf16_to_f32(float *dst, const uint16_t *src, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &v, sizeof v);
    }
}
