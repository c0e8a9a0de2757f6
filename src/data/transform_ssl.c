/* Self-supervised augmentations on float32 (C, H, W) images: resizing
 * (bilinear, bicubic), crops, flips, quarter rotations, colour jitter,
 * grayscale, Gaussian blur, solarisation, normalisation, their parameter
 * draws from kd_rng, and the MoCo-v2 and multi-crop pipelines built on them.
 * Each apply function repeats torchvision's tensor arithmetic operation for
 * operation in float32 (see include/kd/transforms.h), so the outputs match
 * torchvision to a few ulps; tests/test_transforms.c checks them against
 * tests/fixtures/transforms.safetensors. */
#include "kd/transforms.h"

#include "data_internal.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------- geometry */

void kd_tf_resize_output_size(int h, int w, int size, int *oh, int *ow) {
    int shrt = w <= h ? w : h, lng = w <= h ? h : w;
    int new_long = (int)((double)size * (double)lng / (double)shrt);
    if (w <= h) {
        *ow = size;
        *oh = new_long;
    } else {
        *oh = size;
        *ow = new_long;
    }
}

/* Pixel (y, x) of the virtual crop whose origin is (top, left) in a plane of
 * (h, w); outside the plane reads 0, as F.crop pads. */
static inline float kd__px(const float *plane, int h, int w, int top, int left, int y, int x) {
    int sy = top + y, sx = left + x;
    if (sy < 0 || sy >= h || sx < 0 || sx >= w) return 0.0f;
    return plane[(size_t)sy * w + sx];
}

/* torch's linear source index for one output position (UpSample.h:
 * area_pixel_compute_source_index and compute_source_index_and_lambda). The
 * scale in/out is a float, the source position is formed in double, and the
 * weights are float: lambda1 = (float)(real - i0), lambda0 = 1 - lambda1.
 * (Checked against torch 1.13's kernel on one-hot rows: exact.) */
static inline void kd__linear_index(float scale, int in, int d, int *i0, int *i1, float *w0,
                                    float *w1) {
    double real = (double)scale * ((double)d + 0.5) - 0.5;
    if (real < 0.0) real = 0.0;
    int a = (int)real;
    double l = real - (double)a;
    float l1 = (float)(l < 0.0 ? 0.0 : (l > 1.0 ? 1.0 : l));
    *i0 = a;
    *i1 = a + (a < in - 1 ? 1 : 0);
    *w1 = l1;
    *w0 = 1.0f - l1;
}

/* torch's bicubic source index and coefficients (A = -0.75): the position in
 * double from the float scale, the cubic convolution coefficients of
 * t = real - floor(real) in double, rounded to float; indices are clamped to
 * [0, in - 1]. (torch 1.13's own rounding of the coefficients is not
 * reproduced exactly; one-hot rows agree to 5e-7.) */
static inline double kd__cubic1(double x, double a) { return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0; }
static inline double kd__cubic2(double x, double a) {
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
}
static inline void kd__cubic_index(float scale, int in, int d, int idx[4], float wt[4]) {
    const double a = -0.75;
    double real = (double)scale * ((double)d + 0.5) - 0.5;
    double fl = floor(real);
    int i = (int)fl;
    double t = real - fl;
    wt[0] = (float)kd__cubic2(t + 1.0, a);
    wt[1] = (float)kd__cubic1(t, a);
    wt[2] = (float)kd__cubic1(1.0 - t, a);
    wt[3] = (float)kd__cubic2(2.0 - t, a);
    for (int j = 0; j < 4; j++) {
        int v = i - 1 + j;
        idx[j] = v < 0 ? 0 : (v > in - 1 ? in - 1 : v);
    }
}

void kd_tf_resized_crop(const float *src, int c, int h, int w, kd_crop_box b, kd_interp interp,
                        int oh, int ow, float *dst) {
    const int bh = b.height, bw = b.width;
    if (bh == oh && bw == ow) { /* F.resize returns the crop unchanged */
        kd_tf_crop(src, c, h, w, b, dst);
        return;
    }
    const float sy = (float)bh / (float)oh, sx = (float)bw / (float)ow;
    for (int ch = 0; ch < c; ch++) {
        const float *pl = src + (size_t)ch * h * w;
        float *o = dst + (size_t)ch * oh * ow;
        for (int y = 0; y < oh; y++) {
            if (interp == KD_INTERP_BICUBIC) {
                int iy[4], ix[4];
                float wy[4], wx[4];
                kd__cubic_index(sy, bh, y, iy, wy);
                for (int x = 0; x < ow; x++) {
                    kd__cubic_index(sx, bw, x, ix, wx);
                    float acc = 0.0f;
                    for (int j = 0; j < 4; j++) {
                        float t = 0.0f;
                        for (int i = 0; i < 4; i++) {
                            float v = kd__px(pl, h, w, b.top, b.left, iy[j], ix[i]) * wx[i];
                            t = i == 0 ? v : t + v;
                        }
                        acc = j == 0 ? t * wy[j] : acc + t * wy[j];
                    }
                    o[(size_t)y * ow + x] = acc;
                }
            } else {
                int y0, y1;
                float wy0, wy1;
                kd__linear_index(sy, bh, y, &y0, &y1, &wy0, &wy1);
                for (int x = 0; x < ow; x++) {
                    int x0, x1;
                    float wx0, wx1;
                    kd__linear_index(sx, bw, x, &x0, &x1, &wx0, &wx1);
                    float t0 = kd__px(pl, h, w, b.top, b.left, y0, x0) * wx0 +
                               kd__px(pl, h, w, b.top, b.left, y0, x1) * wx1;
                    float t1 = kd__px(pl, h, w, b.top, b.left, y1, x0) * wx0 +
                               kd__px(pl, h, w, b.top, b.left, y1, x1) * wx1;
                    o[(size_t)y * ow + x] = t0 * wy0 + t1 * wy1;
                }
            }
        }
    }
}

void kd_tf_resize(const float *src, int c, int h, int w, kd_interp interp, int oh, int ow,
                  float *dst) {
    kd_crop_box whole = {0, 0, h, w};
    kd_tf_resized_crop(src, c, h, w, whole, interp, oh, ow, dst);
}

void kd_tf_crop(const float *src, int c, int h, int w, kd_crop_box b, float *dst) {
    for (int ch = 0; ch < c; ch++) {
        const float *pl = src + (size_t)ch * h * w;
        float *o = dst + (size_t)ch * b.height * b.width;
        for (int y = 0; y < b.height; y++) {
            int sy = b.top + y;
            float *orow = o + (size_t)y * b.width;
            if (sy < 0 || sy >= h) {
                memset(orow, 0, (size_t)b.width * sizeof(float));
                continue;
            }
            for (int x = 0; x < b.width; x++) {
                int sx = b.left + x;
                orow[x] = (sx < 0 || sx >= w) ? 0.0f : pl[(size_t)sy * w + sx];
            }
        }
    }
}

/* Python's int(round(d / 2)) for an integer d >= 0: halves go to the even neighbour. */
static int kd__half_round_even(int d) {
    if (d % 2 == 0) return d / 2;
    int lo = (d - 1) / 2;
    return lo % 2 == 0 ? lo : lo + 1;
}

kd_crop_box kd_tf_center_crop_box(int h, int w, int oh, int ow) {
    kd_crop_box b = {0, 0, oh, ow};
    b.top = oh > h ? -((oh - h) / 2) : kd__half_round_even(h - oh);
    b.left = ow > w ? -((ow - w) / 2) : kd__half_round_even(w - ow);
    return b;
}

void kd_tf_hflip(const float *src, int c, int h, int w, float *dst) {
    for (int64_t row = 0; row < (int64_t)c * h; row++) {
        const float *s = src + row * w;
        float *d = dst + row * w;
        if (s == d) {
            for (int x = 0; x < w / 2; x++) {
                float t = d[x];
                d[x] = d[w - 1 - x];
                d[w - 1 - x] = t;
            }
        } else {
            for (int x = 0; x < w; x++) d[x] = s[w - 1 - x];
        }
    }
}

void kd_tf_rot90(const float *src, int c, int h, int w, int k, float *dst) {
    k = ((k % 4) + 4) % 4;
    for (int ch = 0; ch < c; ch++) {
        const float *s = src + (size_t)ch * h * w;
        float *d = dst + (size_t)ch * h * w;
        KD__ROT90_PLANE(s, d, h, w, k);
    }
}

/* torch.empty(1).uniform_(lo, hi).item(). */
static float kd__uniform(kd_rng *r, float lo, float hi) {
    double u = (double)kd_rng_uniform(r);
    return (float)((double)lo + u * ((double)hi - (double)lo));
}

/* F.rotate(img, angle, interp, expand=False, center=None, fill=None) on a
 * float tensor, step by step:
 *   - _get_inverse_affine_matrix([0, 0], -angle, [0, 0], 1, [0, 0]) in
 *     double: rot = radians(-angle), matrix = [cos, sin, 0, -sin, cos, 0];
 *   - theta = that matrix in float32; _gen_affine_grid divides its columns
 *     by (0.5 w, 0.5 h) in float32 and multiplies the centred pixel
 *     coordinates (x - w/2 + 0.5, y - h/2 + 0.5, 1) by it: two float32
 *     products and a sum (the third term, 1 * 0, changes nothing);
 *   - grid_sample(align_corners=False, padding zeros) unnormalises as the
 *     vectorised CPU kernel does, (g + 1) * (size / 2) - 0.5, then reads the
 *     nearest pixel (round half to even, like nearbyint / _mm256_round_ps) or
 *     blends the four neighbours with weights (1 - dy)(1 - dx), (1 - dy) dx,
 *     dy (1 - dx), dy dx, summed nw, ne, sw, se, outside pixels reading 0.
 *     torch's AVX2 kernel is compiled with FMA contraction: the unnormalise
 *     is one fma and the blend an fma chain (measured bit for bit against
 *     torch 1.13 on x86-64), so kd uses fmaf there; a torch build without
 *     FMA differs by an ulp or so. The grid itself (_gen_affine_grid's bmm)
 *     matches plain float32 products and sum, no fma. */
kd_status kd_tf_rotate(const float *src, int c, int h, int w, float angle_deg, kd_interp interp,
                       float *dst) {
    if (interp != KD_INTERP_NEAREST && interp != KD_INTERP_BILINEAR)
        return kd_error(KD_ERR_INVALID, "rotate: interpolation %d is not nearest or bilinear",
                        (int)interp);
    if (c < 1 || h < 1 || w < 1)
        return kd_error(KD_ERR_INVALID, "rotate: bad image size (%d, %d, %d)", c, h, w);
    if (!isfinite(angle_deg)) return kd_error(KD_ERR_INVALID, "rotate: angle is not finite");
    if (!src || !dst || src == dst) return kd_error(KD_ERR_INVALID, "rotate: bad buffers");

    const double rot = -(double)angle_deg * (M_PI / 180.0); /* math.radians(-angle) */
    const double cr = cos(rot), sr = sin(rot);
    const float t00 = (float)cr, t01 = (float)sr, t10 = (float)(-sr), t11 = (float)cr;
    const float hw = (float)(0.5 * w), hh = (float)(0.5 * h);
    const float r00 = t00 / hw, r10 = t01 / hw; /* grid x = bx * r00 + by * r10 */
    const float r01 = t10 / hh, r11 = t11 / hh; /* grid y = bx * r01 + by * r11 */
    const float sx = (float)w / 2.0f, sy = (float)h / 2.0f;
    const size_t plane = (size_t)h * w;

    for (int y = 0; y < h; y++) {
        const float by = (float)y - (float)(h * 0.5) + 0.5f; /* linspace, exact */
        for (int x = 0; x < w; x++) {
            const float bx = (float)x - (float)(w * 0.5) + 0.5f;
            const float px = bx * r00, py = by * r10;
            const float qx = bx * r01, qy = by * r11;
            const float gx = px + py, gy = qx + qy;
            const float ix = fmaf(gx + 1.0f, sx, -0.5f);
            const float iy = fmaf(gy + 1.0f, sy, -0.5f);
            const size_t o = (size_t)y * w + x;
            if (interp == KD_INTERP_NEAREST) {
                const float nx = nearbyintf(ix), ny = nearbyintf(iy);
                const int in = nx >= 0.0f && nx < (float)w && ny >= 0.0f && ny < (float)h;
                const size_t i = in ? (size_t)ny * w + (size_t)nx : 0;
                for (int ch = 0; ch < c; ch++)
                    dst[(size_t)ch * plane + o] = in ? src[(size_t)ch * plane + i] : 0.0f;
            } else {
                const float fx = floorf(ix), fy = floorf(iy);
                const float dx = ix - fx, dy = iy - fy;
                const float ex = 1.0f - dx, sy1 = 1.0f - dy;
                const float wnw = sy1 * ex, wne = sy1 * dx, wsw = dy * ex, wse = dy * dx;
                const int x0 = (int)fx, y0 = (int)fy, x1 = x0 + 1, y1 = y0 + 1;
                const int vx0 = fx >= 0.0f && fx < (float)w, vx1 = x1 >= 0 && x1 < w;
                const int vy0 = fy >= 0.0f && fy < (float)h, vy1 = y1 >= 0 && y1 < h;
                for (int ch = 0; ch < c; ch++) {
                    const float *s = src + (size_t)ch * plane;
                    const float nw = vy0 && vx0 ? s[(size_t)y0 * w + x0] : 0.0f;
                    const float ne = vy0 && vx1 ? s[(size_t)y0 * w + x1] : 0.0f;
                    const float sw = vy1 && vx0 ? s[(size_t)y1 * w + x0] : 0.0f;
                    const float se = vy1 && vx1 ? s[(size_t)y1 * w + x1] : 0.0f;
                    dst[(size_t)ch * plane + o] =
                        fmaf(se, wse, fmaf(sw, wsw, fmaf(ne, wne, nw * wnw)));
                }
            }
        }
    }
    return KD_OK;
}

float kd_tf_rotation_draw(kd_rng *r, float degrees) { return kd__uniform(r, -degrees, degrees); }

int kd_tf_coin(kd_rng *r, float p) { return kd_rng_uniform(r) < p; }

kd_crop_box kd_tf_rrc_draw(kd_rng *r, int h, int w, const float scale[2], const float ratio[2]) {
    const double area = (double)h * (double)w;
    const float lr0 = logf(ratio[0]), lr1 = logf(ratio[1]);
    for (int attempt = 0; attempt < 10; attempt++) {
        double target = area * (double)kd__uniform(r, scale[0], scale[1]);
        double aspect = (double)expf(kd__uniform(r, lr0, lr1));
        /* Python's round(): half to even, which nearbyint does in the default mode. */
        double cw = nearbyint(sqrt(target * aspect)), chh = nearbyint(sqrt(target / aspect));
        if (cw > 0 && cw <= w && chh > 0 && chh <= h) {
            kd_crop_box b = {0, 0, (int)chh, (int)cw};
            b.top = (int)kd_rng_below(r, (uint32_t)(h - b.height + 1));
            b.left = (int)kd_rng_below(r, (uint32_t)(w - b.width + 1));
            return b;
        }
    }
    /* Fallback: central crop with the aspect ratio clamped to the range. */
    double in_ratio = (double)w / (double)h;
    double rmin = ratio[0] < ratio[1] ? ratio[0] : ratio[1];
    double rmax = ratio[0] < ratio[1] ? ratio[1] : ratio[0];
    kd_crop_box b = {0, 0, h, w};
    if (in_ratio < rmin) {
        b.height = (int)nearbyint((double)w / rmin);
    } else if (in_ratio > rmax) {
        b.width = (int)nearbyint((double)h * rmax);
    }
    b.top = (h - b.height) / 2;
    b.left = (w - b.width) / 2;
    return b;
}

kd_crop_box kd_tf_random_crop_draw(kd_rng *r, int h, int w, int oh, int ow, int pad) {
    int ph = h + 2 * pad, pw = w + 2 * pad;
    kd_crop_box b = {-pad, -pad, oh, ow};
    if (ph == oh && pw == ow) return b;
    b.top = (int)kd_rng_below(r, (uint32_t)(ph - oh + 1)) - pad;
    b.left = (int)kd_rng_below(r, (uint32_t)(pw - ow + 1)) - pad;
    return b;
}

/* --------------------------------------------------------------- colour */

static inline float kd__clamp01(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

/* rgb_to_grayscale's float32 expression. */
static inline float kd__gray(float r, float g, float b) {
    return 0.2989f * r + 0.587f * g + 0.114f * b;
}

/* _blend(img, other, ratio) weights: both python floats rounded to float32. */
static inline void kd__blend_weights(double ratio, float *a, float *b) {
    *a = (float)ratio;
    *b = (float)(1.0 - ratio);
}

void kd_tf_adjust_brightness(const float *src, int c, int h, int w, double factor, float *dst) {
    float a, b;
    kd__blend_weights(factor, &a, &b);
    const int64_t n = (int64_t)c * h * w;
    for (int64_t i = 0; i < n; i++) dst[i] = kd__clamp01(a * src[i] + b * 0.0f);
}

void kd_tf_adjust_contrast(const float *src, int c, int h, int w, double factor, float *dst) {
    const int64_t hw = (int64_t)h * w;
    double sum = 0.0;
    if (c == 3) {
        for (int64_t i = 0; i < hw; i++) sum += kd__gray(src[i], src[hw + i], src[2 * hw + i]);
    } else {
        for (int64_t i = 0; i < (int64_t)c * hw; i++) sum += src[i];
        sum /= c;
    }
    const float mean = (float)(sum / (double)hw);
    float a, b;
    kd__blend_weights(factor, &a, &b);
    const float bm = b * mean;
    for (int64_t i = 0; i < (int64_t)c * hw; i++) dst[i] = kd__clamp01(a * src[i] + bm);
}

void kd_tf_adjust_saturation(const float *src, int c, int h, int w, double factor, float *dst) {
    const int64_t hw = (int64_t)h * w;
    if (c != 3) {
        if (dst != src) memcpy(dst, src, (size_t)(c * hw) * sizeof(float));
        return;
    }
    float a, b;
    kd__blend_weights(factor, &a, &b);
    for (int64_t i = 0; i < hw; i++) {
        float r = src[i], g = src[hw + i], bl = src[2 * hw + i];
        float l = kd__gray(r, g, bl);
        float bl_ = b * l;
        dst[i] = kd__clamp01(a * r + bl_);
        dst[hw + i] = kd__clamp01(a * g + bl_);
        dst[2 * hw + i] = kd__clamp01(a * bl + bl_);
    }
}

void kd_tf_adjust_hue(const float *src, int c, int h, int w, double hue_factor, float *dst) {
    const int64_t hw = (int64_t)h * w;
    if (c != 3) {
        if (dst != src) memcpy(dst, src, (size_t)(c * hw) * sizeof(float));
        return;
    }
    const float hf = (float)hue_factor;
    for (int64_t i = 0; i < hw; i++) {
        const float r = src[i], g = src[hw + i], b = src[2 * hw + i];
        /* _rgb2hsv */
        float maxc = r, minc = r;
        if (g > maxc) maxc = g;
        if (b > maxc) maxc = b;
        if (g < minc) minc = g;
        if (b < minc) minc = b;
        const int eqc = maxc == minc;
        const float cr = maxc - minc;
        const float s = cr / (eqc ? 1.0f : maxc);
        const float crd = eqc ? 1.0f : cr;
        const float rc = (maxc - r) / crd, gc = (maxc - g) / crd, bc = (maxc - b) / crd;
        float hh;
        if (maxc == r)
            hh = bc - gc;
        else if (maxc == g)
            hh = (2.0f + rc) - bc;
        else
            hh = (4.0f + gc) - rc;
        hh = fmodf(hh / 6.0f + 1.0f, 1.0f);
        /* (h + hue_factor) % 1.0: torch.remainder, fmod then shift into [0, 1). */
        hh = fmodf(hh + hf, 1.0f);
        if (hh != 0.0f && hh < 0.0f) hh += 1.0f;
        /* _hsv2rgb */
        const float v = maxc;
        const float h6 = hh * 6.0f;
        const float fi = floorf(h6);
        const float f = h6 - fi;
        int sector = ((int)fi % 6 + 6) % 6;
        const float p = kd__clamp01(v * (1.0f - s));
        const float q = kd__clamp01(v * (1.0f - s * f));
        const float t = kd__clamp01(v * (1.0f - s * (1.0f - f)));
        float ro, go, bo;
        switch (sector) {
        case 0: ro = v; go = t; bo = p; break;
        case 1: ro = q; go = v; bo = p; break;
        case 2: ro = p; go = v; bo = t; break;
        case 3: ro = p; go = q; bo = v; break;
        case 4: ro = t; go = p; bo = v; break;
        default: ro = v; go = p; bo = q; break;
        }
        dst[i] = ro;
        dst[hw + i] = go;
        dst[2 * hw + i] = bo;
    }
}

void kd_tf_grayscale(const float *src, int c, int h, int w, int out_c, float *dst) {
    const int64_t hw = (int64_t)h * w;
    if (c != 3) {
        if (dst != src) memcpy(dst, src, (size_t)(c * hw) * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < hw; i++) {
        float l = kd__gray(src[i], src[hw + i], src[2 * hw + i]);
        dst[i] = l;
        if (out_c == 3) {
            dst[hw + i] = l;
            dst[2 * hw + i] = l;
        }
    }
}

kd_jitter_params kd_tf_jitter_draw(kd_rng *r, const kd_jitter_cfg *cfg) {
    kd_jitter_params p = {{0, 1, 2, 3}, 0u, {1.0, 1.0, 1.0, 0.0}};
    for (int i = 0; i < 3; i++) { /* torch.randperm(4) on the CPU */
        int j = i + (int)kd_rng_below(r, (uint32_t)(4 - i));
        int t = p.order[i];
        p.order[i] = p.order[j];
        p.order[j] = t;
    }
    const float strength[4] = {cfg->brightness, cfg->contrast, cfg->saturation, cfg->hue};
    for (int k = 0; k < 4; k++) {
        if (!(strength[k] > 0.0f)) continue;
        float lo, hi;
        if (k == KD_JITTER_HUE) {
            lo = -strength[k];
            hi = strength[k];
        } else {
            lo = 1.0f - strength[k] > 0.0f ? 1.0f - strength[k] : 0.0f;
            hi = 1.0f + strength[k];
        }
        p.factor[k] = kd__uniform(r, lo, hi);
        p.enabled |= 1u << k;
    }
    return p;
}

void kd_tf_jitter_apply(const kd_jitter_params *p, const float *src, int c, int h, int w,
                        float *dst) {
    const float *in = src;
    int copied = 0;
    for (int i = 0; i < 4; i++) {
        int k = p->order[i];
        if (k < 0 || k > 3 || !(p->enabled & (1u << k))) continue;
        switch (k) {
        case KD_JITTER_BRIGHTNESS: kd_tf_adjust_brightness(in, c, h, w, p->factor[k], dst); break;
        case KD_JITTER_CONTRAST: kd_tf_adjust_contrast(in, c, h, w, p->factor[k], dst); break;
        case KD_JITTER_SATURATION: kd_tf_adjust_saturation(in, c, h, w, p->factor[k], dst); break;
        default: kd_tf_adjust_hue(in, c, h, w, p->factor[k], dst); break;
        }
        in = dst;
        copied = 1;
    }
    if (!copied && dst != src) memcpy(dst, src, (size_t)c * h * w * sizeof(float));
}

/* ------------------------------------------------------------- filters */

float kd_tf_blur_draw(kd_rng *r, float sigma_lo, float sigma_hi) {
    return kd__uniform(r, sigma_lo, sigma_hi);
}

int kd_tf_blur_kernel_size(float sigma) { return 2 * (int)ceilf(3.0f * sigma) + 1; }

/* Reflect padding's source index for i in (-inf, inf) on a side of n. */
static inline int kd__reflect(int i, int n) {
    if (n == 1) return 0;
    const int period = 2 * (n - 1);
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - i;
}

#define KD__MAX_BLUR_KERNEL 1025

void kd_tf_gaussian_blur(const float *src, int c, int h, int w, int k, float sigma, float *work,
                         float *dst) {
    if (k < 1 || k > KD__MAX_BLUR_KERNEL || k % 2 == 0) { /* checked by callers; stay defined */
        if (dst != src) memcpy(dst, src, (size_t)c * h * w * sizeof(float));
        return;
    }
    /* _get_gaussian_kernel1d in float32: x = linspace(-(k-1)/2, (k-1)/2, k). */
    float ker[KD__MAX_BLUR_KERNEL];
    const float half = (float)(k - 1) * 0.5f;
    float sum = 0.0f;
    for (int i = 0; i < k; i++) {
        float x = -half + (float)i;
        float z = x / sigma;
        ker[i] = expf(-0.5f * (z * z));
        sum += ker[i];
    }
    for (int i = 0; i < k; i++) ker[i] /= sum;
    const int rad = k / 2;
    for (int ch = 0; ch < c; ch++) {
        const float *s = src + (size_t)ch * h * w;
        float *d = dst + (size_t)ch * h * w;
        for (int y = 0; y < h; y++) { /* rows into work */
            const float *row = s + (size_t)y * w;
            float *o = work + (size_t)y * w;
            for (int x = 0; x < w; x++) {
                double acc = 0.0;
                if (x >= rad && x + rad < w) {
                    const float *p = row + x - rad;
                    for (int i = 0; i < k; i++) acc += (double)ker[i] * p[i];
                } else {
                    for (int i = 0; i < k; i++) acc += (double)ker[i] * row[kd__reflect(x - rad + i, w)];
                }
                o[x] = (float)acc;
            }
        }
        for (int y = 0; y < h; y++) { /* columns from work */
            float *o = d + (size_t)y * w;
            const int inside = y >= rad && y + rad < h;
            for (int x = 0; x < w; x++) {
                double acc = 0.0;
                for (int i = 0; i < k; i++) {
                    int sy = inside ? y - rad + i : kd__reflect(y - rad + i, h);
                    acc += (double)ker[i] * work[(size_t)sy * w + x];
                }
                o[x] = (float)acc;
            }
        }
    }
}

void kd_tf_solarize(const float *src, int c, int h, int w, float threshold, float *dst) {
    const int64_t n = (int64_t)c * h * w;
    for (int64_t i = 0; i < n; i++) dst[i] = src[i] >= threshold ? 1.0f - src[i] : src[i];
}

void kd_tf_normalize(const float *src, int c, int h, int w, const float *mean, const float *std,
                     float *dst) {
    const int64_t hw = (int64_t)h * w;
    for (int ch = 0; ch < c; ch++)
        for (int64_t i = 0; i < hw; i++)
            dst[ch * hw + i] = (src[ch * hw + i] - mean[ch]) / std[ch];
}

/* ------------------------------------------------------------ pipelines */

kd_ssl_aug_cfg kd_ssl_aug_cfg_mocov2(int size) {
    kd_ssl_aug_cfg c;
    memset(&c, 0, sizeof c);
    c.size = size;
    c.scale[0] = 0.2f;
    c.scale[1] = 1.0f;
    c.ratio[0] = 3.0f / 4.0f;
    c.ratio[1] = 4.0f / 3.0f;
    c.interp = KD_INTERP_BILINEAR;
    c.flip_p = 0.5f;
    c.flip_first = 0;
    c.jitter_p = 0.8f;
    c.jitter = (kd_jitter_cfg){0.4f, 0.4f, 0.4f, 0.1f};
    c.gray_p = 0.2f;
    c.blur_p = 0.5f;
    c.blur_sigma[0] = 0.1f;
    c.blur_sigma[1] = 2.0f;
    c.blur_kernel = 0;
    c.solarize_p = 0.0f;
    c.solarize_threshold = 128.0f / 255.0f;
    c.normalize = 1;
    const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    memcpy(c.mean, mean, sizeof mean);
    memcpy(c.std, std, sizeof std);
    return c;
}

static int kd__prob_ok(float p) { return p >= 0.0f && p <= 1.0f; }

kd_status kd_ssl_aug_check(const kd_ssl_aug_cfg *cfg, int c) {
    if (c != 1 && c != 3)
        return kd_error(KD_ERR_INVALID, "augmentation: images have %d channels; 1 or 3 supported", c);
    if (cfg->size < 1 || cfg->size > 16384)
        return kd_error(KD_ERR_INVALID, "augmentation: size %d outside [1, 16384]", cfg->size);
    if (!(cfg->scale[0] > 0.0f) || !(cfg->scale[0] <= cfg->scale[1]) || !isfinite(cfg->scale[1]))
        return kd_error(KD_ERR_INVALID, "augmentation: crop scale (%g, %g) must satisfy 0 < min <= max",
                        (double)cfg->scale[0], (double)cfg->scale[1]);
    if (!(cfg->ratio[0] > 0.0f) || !(cfg->ratio[0] <= cfg->ratio[1]) || !isfinite(cfg->ratio[1]))
        return kd_error(KD_ERR_INVALID, "augmentation: crop ratio (%g, %g) must satisfy 0 < min <= max",
                        (double)cfg->ratio[0], (double)cfg->ratio[1]);
    if (cfg->interp != KD_INTERP_BILINEAR && cfg->interp != KD_INTERP_BICUBIC)
        return kd_error(KD_ERR_INVALID, "augmentation: unknown interpolation %d", (int)cfg->interp);
    const float probs[5] = {cfg->flip_p, cfg->jitter_p, cfg->gray_p, cfg->blur_p, cfg->solarize_p};
    const char *names[5] = {"flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"};
    for (int i = 0; i < 5; i++)
        if (!kd__prob_ok(probs[i]))
            return kd_error(KD_ERR_INVALID, "augmentation: %s = %g outside [0, 1]", names[i],
                            (double)probs[i]);
    const kd_jitter_cfg *j = &cfg->jitter;
    if (!(j->brightness >= 0.0f) || !(j->contrast >= 0.0f) || !(j->saturation >= 0.0f) ||
        !(j->hue >= 0.0f) || !(j->hue <= 0.5f) || !isfinite(j->brightness) ||
        !isfinite(j->contrast) || !isfinite(j->saturation))
        return kd_error(KD_ERR_INVALID,
                        "augmentation: colour jitter (%g, %g, %g, %g) needs finite strengths >= 0 "
                        "and hue <= 0.5", (double)j->brightness, (double)j->contrast,
                        (double)j->saturation, (double)j->hue);
    if (cfg->blur_p > 0.0f) {
        if (!(cfg->blur_sigma[0] > 0.0f) || !(cfg->blur_sigma[0] <= cfg->blur_sigma[1]) ||
            !(cfg->blur_sigma[1] <= 100.0f))
            return kd_error(KD_ERR_INVALID,
                            "augmentation: blur sigma (%g, %g) must satisfy 0 < min <= max <= 100",
                            (double)cfg->blur_sigma[0], (double)cfg->blur_sigma[1]);
        int k = kd_ssl_aug_blur_kernel(cfg);
        if (k < 1 || k % 2 == 0 || k > KD__MAX_BLUR_KERNEL)
            return kd_error(KD_ERR_INVALID, "augmentation: blur kernel %d must be odd, in [1, %d]",
                            k, KD__MAX_BLUR_KERNEL);
    }
    if (cfg->solarize_p > 0.0f && !isfinite(cfg->solarize_threshold))
        return kd_error(KD_ERR_INVALID, "augmentation: solarize threshold is not finite");
    if (cfg->normalize)
        for (int k = 0; k < c; k++)
            if (!isfinite(cfg->mean[k]) || !isfinite(cfg->std[k]) || cfg->std[k] == 0.0f)
                return kd_error(KD_ERR_INVALID,
                                "augmentation: channel %d has mean %g std %g; std must be finite "
                                "and non-zero", k, (double)cfg->mean[k], (double)cfg->std[k]);
    return KD_OK;
}

int kd_ssl_aug_blur_kernel(const kd_ssl_aug_cfg *cfg) {
    return cfg->blur_kernel > 0 ? cfg->blur_kernel : kd_tf_blur_kernel_size(cfg->blur_sigma[1]);
}

size_t kd_ssl_aug_work_floats(const kd_ssl_aug_cfg *cfg) {
    return cfg->blur_p > 0.0f ? (size_t)cfg->size * (size_t)cfg->size : 0;
}

kd_ssl_aug_params kd_ssl_aug_draw(const kd_ssl_aug_cfg *cfg, kd_rng *r, int h, int w) {
    kd_ssl_aug_params p;
    memset(&p, 0, sizeof p);
    p.box = kd_tf_rrc_draw(r, h, w, cfg->scale, cfg->ratio);
    if (cfg->flip_first && cfg->flip_p > 0.0f) p.flip = kd_tf_coin(r, cfg->flip_p);
    if (cfg->jitter_p > 0.0f) {
        p.jitter = kd_tf_coin(r, cfg->jitter_p);
        if (p.jitter) p.jit = kd_tf_jitter_draw(r, &cfg->jitter);
    }
    if (cfg->gray_p > 0.0f) p.gray = kd_tf_coin(r, cfg->gray_p);
    if (cfg->blur_p > 0.0f) {
        p.blur = kd_tf_coin(r, cfg->blur_p);
        if (p.blur) p.sigma = kd_tf_blur_draw(r, cfg->blur_sigma[0], cfg->blur_sigma[1]);
    }
    if (cfg->solarize_p > 0.0f) p.solarize = kd_tf_coin(r, cfg->solarize_p);
    if (!cfg->flip_first && cfg->flip_p > 0.0f) p.flip = kd_tf_coin(r, cfg->flip_p);
    return p;
}

void kd_ssl_aug_apply(const kd_ssl_aug_cfg *cfg, const kd_ssl_aug_params *p, const float *src,
                      int c, int h, int w, float *work, float *dst) {
    const int s = cfg->size;
    kd_tf_resized_crop(src, c, h, w, p->box, cfg->interp, s, s, dst);
    if (cfg->flip_first && p->flip) kd_tf_hflip(dst, c, s, s, dst);
    if (p->jitter) kd_tf_jitter_apply(&p->jit, dst, c, s, s, dst);
    if (p->gray) kd_tf_grayscale(dst, c, s, s, c, dst);
    if (p->blur) kd_tf_gaussian_blur(dst, c, s, s, kd_ssl_aug_blur_kernel(cfg), p->sigma, work, dst);
    if (p->solarize) kd_tf_solarize(dst, c, s, s, cfg->solarize_threshold, dst);
    if (!cfg->flip_first && p->flip) kd_tf_hflip(dst, c, s, s, dst);
    if (cfg->normalize) kd_tf_normalize(dst, c, s, s, cfg->mean, cfg->std, dst);
}

kd_multicrop_cfg kd_multicrop_cfg_esvit(int global_size, int n_local, int local_size) {
    kd_multicrop_cfg m;
    memset(&m, 0, sizeof m);
    kd_ssl_aug_cfg base = kd_ssl_aug_cfg_mocov2(global_size);
    base.interp = KD_INTERP_BICUBIC;
    base.flip_first = 1;
    base.jitter = (kd_jitter_cfg){0.4f, 0.4f, 0.2f, 0.1f};
    base.scale[0] = 0.4f;
    base.scale[1] = 1.0f;
    m.n_global = 2;
    m.global[0] = base;
    m.global[0].blur_p = 1.0f;
    m.global[1] = base;
    m.global[1].blur_p = 0.1f;
    m.global[1].solarize_p = 0.2f;
    m.n_local = n_local;
    m.local = base;
    m.local.size = local_size;
    m.local.scale[0] = 0.05f;
    m.local.scale[1] = 0.4f;
    m.local.blur_p = 0.5f;
    return m;
}

int kd_multicrop_num_views(const kd_multicrop_cfg *cfg) { return cfg->n_global + cfg->n_local; }

const kd_ssl_aug_cfg *kd_multicrop_view_cfg(const kd_multicrop_cfg *cfg, int view) {
    if (view < cfg->n_global) return &cfg->global[view == 0 ? 0 : 1];
    return &cfg->local;
}

kd_status kd_multicrop_check(const kd_multicrop_cfg *cfg, int c) {
    if (cfg->n_global < 0 || cfg->n_local < 0 || cfg->n_global + cfg->n_local < 1 ||
        cfg->n_global + cfg->n_local > KD_MULTICROP_MAX_VIEWS)
        return kd_error(KD_ERR_INVALID, "multi-crop: %d global + %d local views; need 1..%d in all",
                        cfg->n_global, cfg->n_local, KD_MULTICROP_MAX_VIEWS);
    for (int v = 0; v < kd_multicrop_num_views(cfg); v++) {
        kd_status st = kd_ssl_aug_check(kd_multicrop_view_cfg(cfg, v), c);
        if (st != KD_OK)
            return kd_error(st, "multi-crop view %d (%s): %s", v,
                            v < cfg->n_global ? "global" : "local", kd_last_error());
    }
    return KD_OK;
}

size_t kd_multicrop_work_floats(const kd_multicrop_cfg *cfg) {
    size_t m = 0;
    for (int v = 0; v < kd_multicrop_num_views(cfg); v++) {
        size_t n = kd_ssl_aug_work_floats(kd_multicrop_view_cfg(cfg, v));
        if (n > m) m = n;
    }
    return m;
}

void kd_multicrop_draw(const kd_multicrop_cfg *cfg, kd_rng *r, int h, int w,
                       kd_ssl_aug_params *out) {
    for (int v = 0; v < kd_multicrop_num_views(cfg); v++)
        out[v] = kd_ssl_aug_draw(kd_multicrop_view_cfg(cfg, v), r, h, w);
}

void kd_multicrop_apply(const kd_multicrop_cfg *cfg, const kd_ssl_aug_params *p,
                        const float *src, int c, int h, int w, float *work, float *const *dst) {
    for (int v = 0; v < kd_multicrop_num_views(cfg); v++)
        kd_ssl_aug_apply(kd_multicrop_view_cfg(cfg, v), &p[v], src, c, h, w, work, dst[v]);
}
