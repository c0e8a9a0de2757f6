/* Data movement of the cpu backend (dnnl_impl.h): float32 -> bf16 rounding
 * for the bf16 convolutions, dst += src accumulation, and plain heap copies
 * of blocked (NCHW16C) operands for the rare configurations that end on the
 * ref kernels. */
#include "backend/cpu/dnnl_impl.h"

#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

/* dst += src, n floats. */
void kd__cpu_add_into(float *restrict dst, const float *restrict src, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

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
void kd__cpu_cvt_f32_bf16(uint16_t *dst, const float *src, int64_t n) {
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

/* t itself when it is not blocked, else a plain heap copy of it (NULL and
 * *s set on OOM). Outputs are copied too (accumulate reads them). */
kd_tensor *kd__cpu_ps_plain(plain_set *ps, const kd_tensor *t, int is_out, kd_status *s) {
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
kd_status kd__cpu_ps_finish(plain_set *ps, kd_status s) {
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
