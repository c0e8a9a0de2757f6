/* Data movement of the cpu backend (dnnl_impl.h): dst += src accumulation,
 * and plain float32 heap copies of packed (NCHW16C or NHWC, float32 or
 * bf16) operands for the rare configurations that end on the ref kernels. */
#include "backend/cpu/dnnl_impl.h"

#include <string.h>

/* dst += src, n floats. */
void kd__cpu_add_into(float *restrict dst, const float *restrict src, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

/* t itself when it is not packed, else a plain heap copy of it (NULL and
 * *s set on OOM). Outputs are copied too (accumulate reads them). */
kd_tensor *kd__cpu_ps_plain(plain_set *ps, const kd_tensor *t, int is_out, kd_status *s) {
    if (!packed(t) || *s != KD_OK) return (kd_tensor *)t;
    if (ps->n == PS_MAX) {
        *s = kd_error(KD_ERR_INTERNAL, "cpu backend: too many packed operands");
        return NULL;
    }
    kd_tensor *c = &ps->tmp[ps->n];
    *c = *t;
    c->dtype = KD_F32;
    c->layout = KD_LAYOUT_STRIDED;
    kd_tensor_set_shape(c, t->ndim, t->shape);
    size_t bytes = kd_tensor_nbytes(c);
    /* a bf16 tensor is widened into the second half first, then reordered */
    c->data = kd_aligned_alloc(bytes ? (t->dtype == KD_BF16 ? 2 : 1) * bytes : 64);
    if (!c->data) {
        *s = kd_error(KD_ERR_NOMEM, "cpu backend: out of memory for a plain copy of %zu bytes",
                      bytes);
        return NULL;
    }
    int64_t HW = t->shape[2] * t->shape[3], n = kd_tensor_numel(t);
    const float *src = kd_f32(t);
    if (t->dtype == KD_BF16) {
        float *wide = (float *)((char *)c->data + bytes);
        kd_bf16_to_f32(wide, (const uint16_t *)t->data, n);
        src = wide;
    }
    kd_layout_convert(kd_f32(c), KD_LAYOUT_STRIDED, src, t->layout, t->shape[0], t->shape[1], HW, 0);
    ps->orig[ps->n] = (kd_tensor *)t;
    ps->is_out[ps->n] = is_out;
    ps->n++;
    return c;
}

/* Converts the outputs back into their packed tensors (when s is KD_OK)
 * and frees the copies; returns s. */
kd_status kd__cpu_ps_finish(plain_set *ps, kd_status s) {
    for (int i = 0; i < ps->n; i++) {
        kd_tensor *o = ps->orig[i], *c = &ps->tmp[i];
        if (s == KD_OK && ps->is_out[i]) {
            size_t bytes = kd_tensor_nbytes(c);
            float *dst = o->dtype == KD_BF16 ? (float *)((char *)c->data + bytes) : kd_f32(o);
            kd_layout_convert(dst, o->layout, kd_f32(c), KD_LAYOUT_STRIDED, o->shape[0],
                              o->shape[1], o->shape[2] * o->shape[3], 0);
            if (o->dtype == KD_BF16) kd_bf16_from_f32((uint16_t *)o->data, dst, kd_tensor_numel(o));
        }
        kd_aligned_free(c->data);
    }
    ps->n = 0;
    return s;
}
