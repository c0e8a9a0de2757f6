/*
 * kd/transforms.h: the self-supervised augmentations (SSKD rotations, the
 * MoCo-v2 pipeline of SEED, DINO/EsViT multi-crop) as pure, deterministic
 * functions on float32 images, each equal to torchvision's tensor path
 * (ToTensor first, then torchvision.transforms.functional on float tensors).
 *
 * Images are contiguous float32 (C, H, W), values normally in [0, 1]. Every
 * random transform is split in two:
 *   - a draw function that takes a kd_rng * and the input size and returns
 *     the parameters exactly as torchvision's get_params draws them (same
 *     formulas; torch's generator differs, so the values do not), and
 *   - an apply function that takes explicit parameters and no generator.
 * So the loader draws in a worker from the sample's stream and the tests feed
 * torchvision's fixed parameters to the apply functions.
 *
 * Usage (SEED's MoCo-v2 view of one sample, sizes known per image):
 *     kd_ssl_aug_cfg cfg = kd_ssl_aug_cfg_mocov2(224);
 *     if (kd_ssl_aug_check(&cfg, c) != KD_OK) ...;          // kd_last_error()
 *     float *work = malloc(kd_ssl_aug_work_floats(&cfg) * sizeof(float));
 *     kd_rng r;
 *     kd_rng_init(&r, seed, kd_data_sample_key(seed, epoch, index));
 *     kd_ssl_aug_params p = kd_ssl_aug_draw(&cfg, &r, h, w);
 *     kd_ssl_aug_apply(&cfg, &p, img, c, h, w, work, out); // out: (c, 224, 224)
 *
 * Draw order. A draw function consumes the stream in the order torchvision's
 * transforms would call torch.rand/uniform_/randint/randperm, stage by stage
 * (documented per function below). A probability coin u = kd_rng_uniform(r)
 * in [0, 1) applies its transform when u < p (torchvision's RandomApply
 * applies when u <= p; the two differ only at u == p exactly, probability
 * 2^-24, and this way p = 0 never and p = 1 always applies). A uniform
 * factor in [lo, hi] is (float)(lo + u * (hi - lo)) with u = kd_rng_uniform(r),
 * i.e. torch.empty(1).uniform_(lo, hi); randint(0, n) is kd_rng_below(r, n).
 *
 * Buffers. Apply functions write dst and allocate nothing. Point-wise ones
 * (flip, colour, grayscale, solarize, normalise) and the blur accept
 * dst == src; resampling ones (crop, resize, rot90, rotate) need dst and src
 * apart.
 * The blur takes a caller workspace of h * w floats.
 *
 * Differences from the papers' code (which run on PIL images): resizing is
 * torchvision's tensor resize without antialiasing (bilinear or bicubic,
 * align_corners = False); the blur is torchvision's GaussianBlur (a truncated
 * kernel of odd size, reflect padding) where MoCo/DINO call PIL's
 * ImageFilter.GaussianBlur(radius = sigma); solarisation compares floats
 * (threshold 128/255 reproduces PIL's x >= 128).
 */
#ifndef KD_TRANSFORMS_H
#define KD_TRANSFORMS_H

#include <stddef.h>

#include "kd/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------- geometry */

typedef enum {
    KD_INTERP_BILINEAR = 0, /* F.interpolate(mode="bilinear", align_corners=False) */
    KD_INTERP_BICUBIC = 1,  /* mode="bicubic" (A = -0.75, borders clamped, no clamp of values) */
    KD_INTERP_NEAREST = 2   /* kd_tf_rotate only; the resize functions take bilinear or bicubic */
} kd_interp;

/* A crop window in input pixels. Parts outside the image read as 0 (F.crop). */
typedef struct {
    int top, left, height, width;
} kd_crop_box;

/* Output size of F.resize(img, size) with an int size: the smaller edge
 * becomes `size`, the other int(size * long / short). */
void kd_tf_resize_output_size(int h, int w, int size, int *oh, int *ow);

/* F.resize(img, [oh, ow], interp, antialias=False). src (c, h, w) -> dst (c, oh, ow). */
void kd_tf_resize(const float *src, int c, int h, int w, kd_interp interp, int oh, int ow,
                  float *dst);

/* F.crop(img, top, left, height, width): dst (c, b.height, b.width), zeros
 * where the box leaves the image. */
void kd_tf_crop(const float *src, int c, int h, int w, kd_crop_box b, float *dst);

/* The box of F.center_crop(img, [oh, ow]): top = round((h - oh) / 2) with
 * Python's round (half to even); when the crop is larger than the image,
 * torchvision first pads (floor half before, ceil half after), which gives
 * top = -((oh - h) / 2). Apply with kd_tf_crop. */
kd_crop_box kd_tf_center_crop_box(int h, int w, int oh, int ow);

/* F.resized_crop(img, top, left, height, width, [oh, ow], interp,
 * antialias=False): crop, then resize the crop (its own borders clamp). */
void kd_tf_resized_crop(const float *src, int c, int h, int w, kd_crop_box b, kd_interp interp,
                        int oh, int ow, float *dst);

/* F.hflip. dst may be src. */
void kd_tf_hflip(const float *src, int c, int h, int w, float *dst);

/* torch.rot90(img, k, dims=[1, 2]) (k any integer, taken mod 4): k = 1 turns
 * the image a quarter counter-clockwise, out[y][x] = in[x][w - 1 - y]. dst is
 * (c, w, h) for odd k, (c, h, w) for even k; dst must not overlap src. */
void kd_tf_rot90(const float *src, int c, int h, int w, int k, float *dst);

/* F.rotate(img, angle_deg, interp, expand=False, center=None, fill=None) on
 * a float tensor: turns the image angle_deg degrees counter-clockwise about
 * its centre, keeping (c, h, w). Each output pixel samples the input at the
 * inverse-rotated position with grid_sample(align_corners=False, padding
 * zeros): interp KD_INTERP_NEAREST (ties round half to even, as torch does)
 * or KD_INTERP_BILINEAR; positions outside the image read 0. The grid is
 * formed in float32 exactly as _gen_affine_grid forms it, so even nearest
 * picks the pixels torchvision picks. KD_ERR_INVALID for bicubic (torchvision
 * refuses it too), a non-finite angle, a bad size, or dst == src; dst must
 * not overlap src. */
kd_status kd_tf_rotate(const float *src, int c, int h, int w, float angle_deg, kd_interp interp,
                       float *dst);

/* RandomRotation(degrees).get_params: angle ~ U(-degrees, degrees) (one
 * uniform, (float)(lo + u * (hi - lo)) like every uniform factor here). */
float kd_tf_rotation_draw(kd_rng *r, float degrees);

/* RandomResizedCrop.get_params: up to 10 attempts, each drawing an area
 * fraction s ~ U(scale) and log-aspect ~ U(log ratio) (2 uniforms), then
 * w = round(sqrt(h*w*s*a)), h' = round(sqrt(h*w*s/a)); the first that fits
 * draws top ~ randint(0, h - h' + 1) and left ~ randint(0, w - w' + 1).
 * When none fits: the largest centred box with the aspect clamped to ratio.
 * scale = (0.08, 1) and ratio = (3/4, 4/3) are torchvision's defaults. */
kd_crop_box kd_tf_rrc_draw(kd_rng *r, int h, int w, const float scale[2], const float ratio[2]);

/* RandomCrop((oh, ow), padding = pad).get_params on the padded image, as a
 * box in unpadded coordinates (so top, left may be negative and kd_tf_crop
 * reads the zero padding): top ~ randint(0, h + 2 pad - oh + 1) - pad, then
 * left likewise; no draws when the padded image is exactly (oh, ow). */
kd_crop_box kd_tf_random_crop_draw(kd_rng *r, int h, int w, int oh, int ow, int pad);

/* A probability coin: one uniform u, returns u < p. */
int kd_tf_coin(kd_rng *r, float p);

/* --------------------------------------------------------------- colour */

/* F.adjust_brightness / _contrast / _saturation / _hue and F.rgb_to_grayscale
 * on float tensors, operation for operation in float32 (torchvision's
 * _blend: clamp(f * img + (1 - f) * other, 0, 1), where (1 - f) is formed in
 * double and both scalars are rounded to float). c is 1 or 3; on one channel
 * saturation and hue change nothing, as in torchvision. dst may be src.
 * Contrast blends with the mean of the grayscale image (summed in double). */
void kd_tf_adjust_brightness(const float *src, int c, int h, int w, double factor, float *dst);
void kd_tf_adjust_contrast(const float *src, int c, int h, int w, double factor, float *dst);
void kd_tf_adjust_saturation(const float *src, int c, int h, int w, double factor, float *dst);
/* hue_factor in [-0.5, 0.5]: RGB -> HSV (_rgb2hsv), h = (h + f) mod 1,
 * HSV -> RGB (_hsv2rgb). */
void kd_tf_adjust_hue(const float *src, int c, int h, int w, double hue_factor, float *dst);

/* L = 0.2989 R + 0.587 G + 0.114 B (torchvision's tensor weights), written
 * to out_c = 1 or 3 channels. A one-channel input is copied (1 channel). */
void kd_tf_grayscale(const float *src, int c, int h, int w, int out_c, float *dst);

/* ColorJitter(brightness, contrast, saturation, hue) strengths: factor ranges
 * [max(0, 1 - b), 1 + b] (likewise c, s) and [-hue, hue]; a strength of 0
 * disables that adjustment (no draw). hue <= 0.5. */
typedef struct {
    float brightness, contrast, saturation, hue;
} kd_jitter_cfg;

enum { KD_JITTER_BRIGHTNESS = 0, KD_JITTER_CONTRAST, KD_JITTER_SATURATION, KD_JITTER_HUE };

typedef struct {
    int order[4];     /* a permutation of the KD_JITTER_* ids: application order */
    unsigned enabled; /* bit k set: adjustment k is applied */
    double factor[4]; /* brightness, contrast, saturation factors; hue shift */
} kd_jitter_params;

/* ColorJitter.get_params: order = torch.randperm(4) (for i = 0..2:
 * swap(order[i], order[i + randint(0, 4 - i)])), then one uniform factor for
 * each enabled adjustment in the order brightness, contrast, saturation, hue. */
kd_jitter_params kd_tf_jitter_draw(kd_rng *r, const kd_jitter_cfg *cfg);
/* ColorJitter.forward with those parameters. dst may be src. */
void kd_tf_jitter_apply(const kd_jitter_params *p, const float *src, int c, int h, int w,
                        float *dst);

/* ------------------------------------------------------------- filters */

/* GaussianBlur.get_params: sigma ~ U(lo, hi) (one uniform). */
float kd_tf_blur_draw(kd_rng *r, float sigma_lo, float sigma_hi);

/* The odd kernel size covering +-3 sigma: 2 * ceil(3 * sigma) + 1. */
int kd_tf_blur_kernel_size(float sigma);

/* F.gaussian_blur(img, [k, k], [sigma, sigma]): torchvision's float32 kernel
 * exp(-x^2 / (2 sigma^2)) / sum over x = -(k-1)/2 .. (k-1)/2, reflect padding
 * (folded further when k/2 >= the image side, where torch would refuse),
 * applied separably with double accumulation. k odd >= 1. work: h * w floats.
 * dst may be src. */
void kd_tf_gaussian_blur(const float *src, int c, int h, int w, int k, float sigma, float *work,
                         float *dst);

/* F.solarize: x >= threshold becomes 1 - x. dst may be src. */
void kd_tf_solarize(const float *src, int c, int h, int w, float threshold, float *dst);

/* F.normalize: (x - mean[ch]) / std[ch] in float32. dst may be src. */
void kd_tf_normalize(const float *src, int c, int h, int w, const float *mean, const float *std,
                     float *dst);

/* ------------------------------------------------------------ pipelines */

/* One augmented view: RandomResizedCrop(size, scale, ratio), then (flip here
 * when flip_first), RandomApply(ColorJitter, jitter_p), RandomGrayscale(gray_p)
 * (keeps the channel count), RandomApply(GaussianBlur(blur_kernel,
 * blur_sigma), blur_p), RandomSolarize(solarize_threshold, solarize_p),
 * (flip here otherwise) RandomHorizontalFlip(flip_p), Normalize. A stage
 * whose probability is 0 is absent: it draws nothing. */
typedef struct {
    int size;                 /* output side S: views are (C, S, S) */
    float scale[2];           /* RRC area fraction range */
    float ratio[2];           /* RRC aspect range */
    kd_interp interp;
    float flip_p;
    int flip_first;           /* 0: flip last (MoCo-v2); 1: flip right after the crop (DINO) */
    float jitter_p;
    kd_jitter_cfg jitter;
    float gray_p;
    float blur_p;
    float blur_sigma[2];
    int blur_kernel;          /* odd; 0: kd_tf_blur_kernel_size(blur_sigma[1]) */
    float solarize_p;
    float solarize_threshold;
    int normalize;            /* 1: Normalize(mean, std) at the end */
    float mean[3], std[3];
} kd_ssl_aug_cfg;

/* The draws of one view. */
typedef struct {
    kd_crop_box box;
    int flip, jitter, gray, blur, solarize; /* 1: the stage applies */
    kd_jitter_params jit;                    /* valid when jitter */
    float sigma;                             /* valid when blur */
} kd_ssl_aug_params;

/* MoCo-v2 (main_moco.py --aug-plus, used by SEED): RandomResizedCrop(size,
 * scale (0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2,
 * blur sigma [0.1, 2] p 0.5 (kernel 13), flip p 0.5, then ImageNet
 * normalisation (mean 0.485 0.456 0.406, std 0.229 0.224 0.225). */
kd_ssl_aug_cfg kd_ssl_aug_cfg_mocov2(int size);

/* KD_ERR_INVALID with a message naming the field when cfg cannot run on
 * images with c channels (c must be 1 or 3). */
kd_status kd_ssl_aug_check(const kd_ssl_aug_cfg *cfg, int c);

/* The blur kernel size the view uses. */
int kd_ssl_aug_blur_kernel(const kd_ssl_aug_cfg *cfg);

/* Floats of workspace kd_ssl_aug_apply needs (S * S when blurring can happen). */
size_t kd_ssl_aug_work_floats(const kd_ssl_aug_cfg *cfg);

/* Draw order: RRC box (kd_tf_rrc_draw on (h, w)); flip coin if flip_first;
 * jitter coin, then kd_tf_jitter_draw if it applies; gray coin; blur coin,
 * then kd_tf_blur_draw if it applies; solarize coin; flip coin if not
 * flip_first. Stages with p = 0 draw nothing. */
kd_ssl_aug_params kd_ssl_aug_draw(const kd_ssl_aug_cfg *cfg, kd_rng *r, int h, int w);

/* src (c, h, w) -> dst (c, S, S). work: kd_ssl_aug_work_floats floats. */
void kd_ssl_aug_apply(const kd_ssl_aug_cfg *cfg, const kd_ssl_aug_params *p, const float *src,
                      int c, int h, int w, float *work, float *dst);

/* Multi-crop (DINO / EsViT): n_global views of global.size then n_local views
 * of local.size. Global view v uses global[v == 0 ? 0 : 1]; every local view
 * uses `local`. Each view has its own draws, taken from the one stream view
 * after view, globals first. */
#define KD_MULTICROP_MAX_VIEWS 32
typedef struct {
    int n_global, n_local;
    kd_ssl_aug_cfg global[2];
    kd_ssl_aug_cfg local;
} kd_multicrop_cfg;

/* DataAugmentationDINO as EsViT uses it: 2 global views (scale (0.4, 1), blur
 * p 1.0; then blur p 0.1 + solarize p 0.2), n_local local views (scale
 * (0.05, 0.4), blur p 0.5), all with flip first, ColorJitter(0.4, 0.4, 0.2,
 * 0.1) p 0.8, grayscale p 0.2, bicubic resizing, ImageNet normalisation. */
kd_multicrop_cfg kd_multicrop_cfg_esvit(int global_size, int n_local, int local_size);

kd_status kd_multicrop_check(const kd_multicrop_cfg *cfg, int c);
int kd_multicrop_num_views(const kd_multicrop_cfg *cfg);
const kd_ssl_aug_cfg *kd_multicrop_view_cfg(const kd_multicrop_cfg *cfg, int view);
size_t kd_multicrop_work_floats(const kd_multicrop_cfg *cfg);

/* Draws every view: out has kd_multicrop_num_views entries. */
void kd_multicrop_draw(const kd_multicrop_cfg *cfg, kd_rng *r, int h, int w,
                       kd_ssl_aug_params *out);
/* dst[v]: (c, S_v, S_v) for each view v. */
void kd_multicrop_apply(const kd_multicrop_cfg *cfg, const kd_ssl_aug_params *p,
                        const float *src, int c, int h, int w, float *work, float *const *dst);

#ifdef __cplusplus
}
#endif
#endif /* KD_TRANSFORMS_H */
