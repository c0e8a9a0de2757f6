/* Per-sample augmentation: random crop with zero padding, horizontal flip,
 * and ToTensor + Normalize through a per-channel 256-entry lookup table, so
 * the float32 values equal torchvision's (x / 255 - mean) / std exactly. */
#include "data_internal.h"

#include <math.h>

uint64_t kd_data_sample_key(uint64_t seed, int64_t epoch, int64_t index) {
    return kd_rng_key(kd_rng_key(seed, (uint64_t)epoch), (uint64_t)index);
}

kd_status kd_transform_check(const kd_transform_cfg *cfg, int c) {
    if (cfg->pad_crop < 0 || cfg->pad_crop > 4096)
        return kd_error(KD_ERR_INVALID, "transform: pad_crop %d outside [0, 4096]", cfg->pad_crop);
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

kd_status kd_transform_sample(const kd_transform_cfg *cfg, const kd_dataset *ds, int64_t index,
                              uint64_t seed, int64_t epoch, float *dst) {
    if (index < 0 || index >= ds->n)
        return kd_error(KD_ERR_INVALID, "dataset %s: sample %lld outside [0, %lld)", ds->name,
                        (long long)index, (long long)ds->n);
    KD_TRY(kd_transform_check(cfg, ds->c));
    kd_rng r;
    kd_rng_init(&r, seed, kd_data_sample_key(seed, epoch, index));
    kd_transform_draw d = kd_transform_draw_from(cfg, &r);
    kd_transform_apply(cfg, &d, kd_dataset_image(ds, index), ds->c, ds->h, ds->w, dst);
    return KD_OK;
}
