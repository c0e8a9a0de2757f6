/* Per-sample augmentation: the geometry step to a fixed output size (a hook,
 * or Resize + CenterCrop), random crop with zero padding, horizontal flip,
 * and ToTensor + Normalize through a per-channel 256-entry lookup table, so
 * the float32 values equal torchvision's (x / 255 - mean) / std exactly. */
#include "data_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t kd_data_sample_key(uint64_t seed, int64_t epoch, int64_t index) {
    return kd_rng_key(kd_rng_key(seed, (uint64_t)epoch), (uint64_t)index);
}

uint64_t kd_data_view_key(uint64_t seed, int64_t epoch, int64_t index, int view) {
    uint64_t key = kd_data_sample_key(seed, epoch, index);
    return view == 0 ? key : kd_rng_key(key, (uint64_t)view);
}

uint64_t kd_data_shared_key(uint64_t seed, int64_t epoch, int64_t index) {
    return kd_rng_key(kd_data_sample_key(seed, epoch, index), KD_DATA_SHARED_TAG);
}

int kd_transform_shared_flip(uint64_t seed, int64_t epoch, int64_t index) {
    kd_rng r;
    kd_rng_init(&r, seed, kd_data_shared_key(seed, epoch, index));
    return kd_rng_uniform(&r) < 0.5f;
}

kd_status kd_geometry_rot90(const void *ctx, kd_rng *r, const uint8_t *src, int c, int h, int w,
                            uint8_t *dst, int out_h, int out_w, kd_scratch *scratch) {
    (void)r;
    int k = ((*(const int *)ctx % 4) + 4) % 4;
    if ((k & 1) && out_h != out_w)
        return kd_error(KD_ERR_SHAPE, "rotation by %d quarter turns needs a square output, not %dx%d", k, out_h,
                        out_w);
    if (h != out_h || w != out_w) {
        /* The default geometry to the output size first, into the scratch
         * (the resampling gets a scratch of its own: images of another size
         * than the output are the rare, slow path). */
        uint8_t *tmp = kd_scratch_get(scratch, (size_t)c * out_h * out_w);
        if (!tmp) return kd_error(KD_ERR_NOMEM, "rotation: out of memory");
        kd_scratch rs = {0};
        kd_status st = kd_image_resize_center_crop(src, c, h, w, 0, tmp, out_h, out_w, &rs);
        kd_scratch_free(&rs);
        KD_TRY(st);
        src = tmp;
        h = out_h;
        w = out_w;
    }
    for (int ch = 0; ch < c; ch++) {
        const uint8_t *s = src + (size_t)ch * h * w;
        uint8_t *d = dst + (size_t)ch * h * w;
        KD__ROT90_PLANE(s, d, h, w, k);
    }
    return KD_OK;
}

kd_status kd_transform_check(const kd_transform_cfg *cfg, int c) {
    if (cfg->pad_crop < 0 || cfg->pad_crop > 4096)
        return kd_error(KD_ERR_INVALID, "transform: pad_crop %d outside [0, 4096]", cfg->pad_crop);
    if (cfg->out_h < 0 || cfg->out_w < 0 || cfg->out_h > 16384 || cfg->out_w > 16384 ||
        (cfg->out_h > 0) != (cfg->out_w > 0))
        return kd_error(KD_ERR_INVALID,
                        "transform: output size %dx%d: both must be 0 (the dataset's size) or "
                        "in [1, 16384]",
                        cfg->out_h, cfg->out_w);
    if (cfg->resize < 0 || cfg->resize > 65536)
        return kd_error(KD_ERR_INVALID, "transform: resize %d outside [0, 65536]", cfg->resize);
    if (cfg->ssl) {
        KD_TRY(kd_ssl_aug_check(cfg->ssl, c));
        if (cfg->out_h != cfg->ssl->size || cfg->out_w != cfg->ssl->size)
            return kd_error(KD_ERR_INVALID,
                            "transform: the self-supervised pipeline makes %dx%d views but the output size is "
                            "%dx%d; set out_h and out_w to %d",
                            cfg->ssl->size, cfg->ssl->size, cfg->out_h, cfg->out_w, cfg->ssl->size);
        return KD_OK;
    }
    if (!cfg->normalize) return KD_OK;
    if (c > 4)
        return kd_error(KD_ERR_INVALID,
                        "transform: normalisation supports at most 4 channels, images have %d", c);
    for (int k = 0; k < c; k++) {
        if (!isfinite(cfg->mean[k]) || !isfinite(cfg->std[k]) || cfg->std[k] == 0.0f)
            return kd_error(KD_ERR_INVALID, "transform: channel %d has mean %g std %g; std must be "
                            "finite and non-zero", k, (double)cfg->mean[k], (double)cfg->std[k]);
    }
    return KD_OK;
}

kd_transform_draw kd_transform_draw_from(const kd_transform_cfg *cfg, kd_rng *r) {
    kd_transform_draw d = {0, 0, 0};
    if (cfg->pad_crop > 0) {
        uint32_t span = 2u * (uint32_t)cfg->pad_crop + 1u;
        d.top = (int)kd_rng_below(r, span);
        d.left = (int)kd_rng_below(r, span);
    }
    if (cfg->hflip) d.flip = kd_rng_uniform(r) < 0.5f;
    return d;
}

void kd__transform_tables_init(const kd_transform_cfg *cfg, int c, kd__transform_tables *t) {
    int nt = cfg->normalize ? c : 1;
    t->lut_stride = cfg->normalize ? 256 : 0;
    for (int k = 0; k < nt; k++)
        for (int v = 0; v < 256; v++) {
            float x = (float)v / 255.0f;
            if (cfg->normalize) x = (x - cfg->mean[k]) / cfg->std[k];
            t->lut[k * 256 + v] = x;
        }
}

/* Output pixel (y, x) of channel ch reads input (y + top - pad, x' + left -
 * pad), with x' = x, or W-1-x when flipped (torchvision crops, then flips);
 * reads outside the image see the zero padding. */
void kd__transform_apply_tables(const kd__transform_tables *t, int pad, const kd_transform_draw *d,
                                const uint8_t *src, int c, int h, int w, float *dst) {
    int dy = d->top - pad, dx = d->left - pad;
    /* Columns x whose source column lies inside the image: [x0, x1). */
    int x0, x1;
    if (!d->flip) {
        x0 = dx < 0 ? -dx : 0;
        x1 = dx > 0 ? w - dx : w;
    } else {
        x0 = dx > 0 ? dx : 0;
        x1 = dx < 0 ? w + dx : w;
    }
    if (x0 > w) x0 = w;
    if (x1 < x0) x1 = x0;
    for (int ch = 0; ch < c; ch++) {
        const float *lut = t->lut + (size_t)ch * t->lut_stride;
        const float zero = lut[0];
        const uint8_t *plane = src + (size_t)ch * h * w;
        for (int y = 0; y < h; y++) {
            float *o = dst + ((size_t)ch * h + y) * w;
            int sy = y + dy;
            if (sy < 0 || sy >= h) {
                for (int x = 0; x < w; x++) o[x] = zero;
                continue;
            }
            const uint8_t *row = plane + (size_t)sy * w;
            for (int x = 0; x < x0; x++) o[x] = zero;
            if (!d->flip) {
                for (int x = x0; x < x1; x++) o[x] = lut[row[x + dx]];
            } else {
                const int base = w - 1 + dx;
                for (int x = x0; x < x1; x++) o[x] = lut[row[base - x]];
            }
            for (int x = x1; x < w; x++) o[x] = zero;
        }
    }
}

void kd_transform_apply(const kd_transform_cfg *cfg, const kd_transform_draw *d, const uint8_t *src,
                        int c, int h, int w, float *dst) {
    kd__transform_tables t;
    kd__transform_tables_init(cfg, c, &t);
    kd__transform_apply_tables(&t, cfg->pad_crop, d, src, c, h, w, dst);
}

void kd__sample_ctx_free(kd__sample_ctx *x) {
    if (!x) return;
    kd_image_free(&x->img);
    free(x->geo);
    kd_scratch_free(&x->scratch);
    free(x->pre);
    free(x->fsrc);
    free(x->fwork);
    x->fsrc = x->fwork = NULL;
    x->fsrc_cap = x->fwork_cap = 0;
    x->geo = NULL;
    x->geo_cap = 0;
    x->pre = NULL;
    x->pre_cap = 0;
}

/* Grows a float buffer of the sample context to n floats. */
static kd_status kd__grow_floats(float **p, size_t *cap, size_t n) {
    if (*cap >= n) return KD_OK;
    float *q = realloc(*p, n * sizeof *q);
    if (!q) return kd_error(KD_ERR_NOMEM, "transform: cannot allocate %zu floats", n);
    *p = q;
    *cap = n;
    return KD_OK;
}

/* The SSL pipeline of kd_transform_cfg.ssl: ToTensor, then kd_ssl_aug_apply. */
static kd_status kd__sample_apply_ssl(const kd_ssl_aug_cfg *ssl, kd_rng *r, const uint8_t *src, int c, int h,
                                      int w, kd__sample_ctx *x, float *dst) {
    size_t n = (size_t)c * h * w, nw = kd_ssl_aug_work_floats(ssl);
    KD_TRY(kd__grow_floats(&x->fsrc, &x->fsrc_cap, n));
    KD_TRY(kd__grow_floats(&x->fwork, &x->fwork_cap, nw ? nw : 1));
    for (size_t i = 0; i < n; i++) x->fsrc[i] = (float)src[i] / 255.0f;
    kd_ssl_aug_params p = kd_ssl_aug_draw(ssl, r, h, w);
    kd_ssl_aug_apply(ssl, &p, x->fsrc, c, h, w, x->fwork, dst);
    return KD_OK;
}

kd_status kd__sample_apply(const kd_transform_cfg *cfg, const kd__transform_tables *t, kd_rng *r,
                           int pre_flip, const uint8_t *src, int c, int h, int w, int out_h, int out_w,
                           kd__sample_ctx *x, float *dst) {
    if (pre_flip) { /* the shared flip, before the geometry step */
        size_t need = (size_t)c * h * w;
        if (x->pre_cap < need) {
            uint8_t *p = realloc(x->pre, need);
            if (!p) return kd_error(KD_ERR_NOMEM, "transform: cannot allocate %zu bytes", need);
            x->pre = p;
            x->pre_cap = need;
        }
        for (size_t row = 0; row < (size_t)c * h; row++)
            for (int xx = 0; xx < w; xx++) x->pre[row * w + xx] = src[row * w + (w - 1 - xx)];
        src = x->pre;
    }
    if (cfg->ssl) return kd__sample_apply_ssl(cfg->ssl, r, src, c, h, w, x, dst);
    if (cfg->geometry || h != out_h || w != out_w) {
        size_t need = (size_t)c * out_h * out_w;
        if (x->geo_cap < need) {
            uint8_t *p = realloc(x->geo, need);
            if (!p) return kd_error(KD_ERR_NOMEM, "transform: cannot allocate %zu bytes", need);
            x->geo = p;
            x->geo_cap = need;
        }
        if (cfg->geometry)
            KD_TRY(cfg->geometry(cfg->geometry_ctx, r, src, c, h, w, x->geo, out_h, out_w,
                                 &x->scratch));
        else
            KD_TRY(kd_image_resize_center_crop(src, c, h, w, cfg->resize, x->geo, out_h, out_w,
                                               &x->scratch));
        src = x->geo;
    }
    kd_transform_draw d = kd_transform_draw_from(cfg, r);
    kd__transform_apply_tables(t, cfg->pad_crop, &d, src, c, out_h, out_w, dst);
    return KD_OK;
}

kd_status kd_transform_sample(const kd_transform_cfg *cfg, const kd_dataset *ds, int64_t index,
                              uint64_t seed, int64_t epoch, float *dst) {
    return kd_transform_sample_view(cfg, ds, index, seed, epoch, 0, dst);
}

kd_status kd_transform_sample_view(const kd_transform_cfg *cfg, const kd_dataset *ds, int64_t index,
                                   uint64_t seed, int64_t epoch, int view, float *dst) {
    if (view < 0) return kd_error(KD_ERR_INVALID, "transform: view %d is negative", view);
    if (index < 0 || index >= ds->n)
        return kd_error(KD_ERR_INVALID, "dataset %s: sample %lld outside [0, %lld)", ds->name,
                        (long long)index, (long long)ds->n);
    KD_TRY(kd_transform_check(cfg, ds->c));
    int out_h = cfg->out_h ? cfg->out_h : ds->h, out_w = cfg->out_w ? cfg->out_w : ds->w;
    if (out_h <= 0 || out_w <= 0)
        return kd_error(KD_ERR_INVALID,
                        "dataset %s: images differ in size; set the transform's out_h and out_w",
                        ds->name);
    kd_rng r;
    kd_rng_init(&r, seed, kd_data_view_key(seed, epoch, index, view));
    if (!kd_dataset_is_lazy(ds) && !cfg->geometry && !cfg->hflip_shared && !cfg->ssl && out_h == ds->h &&
        out_w == ds->w) {
        kd_transform_draw d = kd_transform_draw_from(cfg, &r);
        kd_transform_apply(cfg, &d, kd_dataset_image(ds, index), ds->c, ds->h, ds->w, dst);
        return KD_OK;
    }
    kd__sample_ctx x = {0};
    kd__transform_tables *t = malloc(sizeof *t);
    kd_status st = t ? kd_dataset_read(ds, index, &x.img)
                     : kd_error(KD_ERR_NOMEM, "transform: out of memory");
    if (st == KD_OK) {
        kd__transform_tables_init(cfg, ds->c, t);
        int pre_flip = cfg->hflip_shared && kd_transform_shared_flip(seed, epoch, index);
        st = kd__sample_apply(cfg, t, &r, pre_flip, x.img.data, x.img.c, x.img.h, x.img.w, out_h, out_w,
                              &x, dst);
    }
    free(t);
    kd__sample_ctx_free(&x);
    return st;
}
