#!/usr/bin/python3
"""Generates the torchvision reference fixture for kd's self-supervised
augmentations (include/kd/transforms.h, tests/test_transforms.c).

Usage:
    /usr/bin/python3 tools/gen_transform_fixtures.py tests/fixtures

Needs only Debian's python3-torch (1.13) and python3-torchvision (0.14); the
safetensors file is written by the small writer below (no safetensors
package). The images come from a seeded torch generator and every transform
parameter is a fixed constant in this file, so a rerun reproduces the file
bit for bit on the same torch build (one thread, CPU).

torch's random generator is not kd's, so the fixture never compares draws:
each case applies torchvision with FIXED parameters (crop boxes, factors,
sigmas, hue shifts, thresholds, jitter orders) and the C test applies kd's
function with the same parameters.

transforms.safetensors holds
  img.<name>      the input images, float32 (C, H, W) in [0, 1] (what
                  ToTensor gives):
                    rand  (3, 23, 29) uniform noise
                    grad  (3, 32, 40) smooth colour ramps plus gray pixels
                          (R = G = B), channel ties, exact 0 and 1 values
                    mono  (1, 19, 26) uniform noise, one channel
                    big   (3, 48, 64) ramps plus noise, pipeline input
  <case>.out      torchvision's output, float32
  __metadata__["<case>"] = a flat JSON object: "op", "in" (an image name)
  and the op's parameters (numbers are Python floats written with repr, so
  they parse back to the exact doubles torchvision received):
    resize         oh, ow, interp ("bilinear" | "bicubic"); F.resize(img,
                   [oh, ow], interp, antialias=False)
    resize_short   size, oh, ow: F.resize(img, size) (smaller edge)
    center_crop    oh, ow: F.center_crop(img, [oh, ow])
    crop           top, left, height, width: F.crop (may leave the image)
    resized_crop   top, left, height, width, oh, ow, interp: F.resized_crop
    hflip          F.hflip
    rot90          k: torch.rot90(img, k, dims=[1, 2])
    rotate         angle, interp ("nearest" | "bilinear"): F.rotate(img,
                   angle, interp) (expand=False, center=None, fill=None)
    brightness | contrast | saturation | hue   factor: F.adjust_*
    grayscale      out_c: F.rgb_to_grayscale(img, out_c)
    jitter         order (list of 4 ids: 0 brightness, 1 contrast,
                   2 saturation, 3 hue), factors (4 numbers or null for a
                   disabled adjustment): torchvision's ColorJitter.forward
                   with get_params returning exactly these
    blur           k, sigma: F.gaussian_blur(img, [k, k], [sigma, sigma])
    solarize       threshold: F.solarize
    normalize      mean, std: F.normalize
    pipeline       one augmented view through torchvision's own modules
                   (RandomResizedCrop, ColorJitter, GaussianBlur with
                   get_params fixed; RandomGrayscale, RandomSolarize,
                   RandomHorizontalFlip with p = 1 when applied, omitted
                   otherwise; Normalize): size, interp, flip_first, top,
                   left, height, width, flip, jitter (0/1), order, factors,
                   gray, blur, k, sigma, solarize, threshold, normalize,
                   mean, std
  __metadata__["cases"] lists every case name, comma-separated.
"""

import json
import math
import os
import sys

import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

from st_io import save_safetensors  # noqa: E402
INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
          "nearest": InterpolationMode.NEAREST}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def make_images():
    g = torch.Generator().manual_seed(20240501)
    rand = torch.rand(3, 23, 29, generator=g)
    mono = torch.rand(1, 19, 26, generator=g)

    h, w = 32, 40
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    grad = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6.0 * x + 4.0 * y)]).clone()
    grad[:, 2:6, 2:8] = torch.linspace(0, 1, 6).view(1, 1, 6)  # gray: R = G = B
    grad[0, 8:11, 2:8] = grad[1, 8:11, 2:8]                     # ties R = G
    grad[2, 12:14, 2:8] = grad[0, 12:14, 2:8]                   # ties R = B
    grad[:, 15, 0:4] = 1.0                                      # white
    grad[:, 16, 0:4] = 0.0                                      # black
    grad[0, 17, 0:4] = 1.0                                      # pure red ...
    grad[1:, 17, 0:4] = 0.0
    grad = grad.clamp(0, 1).contiguous()

    h, w = 48, 64
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    big = torch.stack([x * y, 1 - x, 0.5 + 0.4 * torch.cos(5.0 * x - 3.0 * y)])
    big = (big + 0.15 * torch.rand(3, h, w, generator=g)).clamp(0, 1).contiguous()
    return {"rand": rand, "grad": grad, "mono": mono, "big": big}


# ------------------------------------------------------------------ cases


class FixedRRC(T.RandomResizedCrop):
    def __init__(self, box, *a, **k):
        super().__init__(*a, **k)
        self.box = box

    def get_params(self, img, scale, ratio):  # noqa: D401 (overrides the static draw)
        return self.box


class FixedJitter(T.ColorJitter):
    def __init__(self, order, factors, *a, **k):
        super().__init__(*a, **k)
        self.fixed = (torch.tensor(order), *factors)

    def get_params(self, *args):
        return self.fixed


class FixedBlur(T.GaussianBlur):
    def __init__(self, fixed_sigma, *a, **k):
        super().__init__(*a, **k)
        self.fixed_sigma = fixed_sigma

    def get_params(self, sigma_min, sigma_max):
        return self.fixed_sigma


def jitter_module(order, factors):
    # Strengths only decide which adjustments exist; get_params is fixed.
    b, c, s, h = [0 if f is None else 0.5 for f in factors]
    return FixedJitter(order, factors, brightness=b, contrast=c, saturation=s, hue=h)


def pipeline(img, p):
    c = img.shape[0]
    mods = [FixedRRC((p["top"], p["left"], p["height"], p["width"]), p["size"],
                     scale=(0.2, 1.0), interpolation=INTERP[p["interp"]], antialias=False)]
    flip = [T.RandomHorizontalFlip(p=1.0)] if p["flip"] else []
    if p["flip_first"]:
        mods += flip
    if p["jitter"]:
        mods.append(jitter_module(p["order"], p["factors"]))
    if p["gray"]:
        mods.append(T.RandomGrayscale(p=1.0))
    if p["blur"]:
        mods.append(FixedBlur(p["sigma"], p["k"], sigma=(0.1, 2.0)))
    if p["solarize"]:
        mods.append(T.RandomSolarize(p["threshold"], p=1.0))
    if not p["flip_first"]:
        mods += flip
    if p["normalize"]:
        mods.append(T.Normalize(p["mean"][:c], p["std"][:c]))
    return T.Compose(mods)(img)


def build_cases(imgs):
    cases = []  # (name, meta, out)

    def add(name, op, src, fn, **params):
        meta = {"op": op, "in": src, **params}
        out = fn(imgs[src].clone())
        cases.append((name, meta, out.contiguous()))

    for name, src, oh, ow, mode in [
        ("resize_bilinear_down", "rand", 15, 20, "bilinear"),
        ("resize_bilinear_up", "rand", 40, 47, "bilinear"),
        ("resize_bilinear_mixed", "rand", 30, 17, "bilinear"),
        ("resize_bilinear_same", "rand", 23, 29, "bilinear"),
        ("resize_bilinear_mono", "mono", 11, 37, "bilinear"),
        ("resize_bicubic_down", "rand", 15, 20, "bicubic"),
        ("resize_bicubic_up", "grad", 45, 51, "bicubic"),
        ("resize_bicubic_mixed", "rand", 31, 12, "bicubic"),
    ]:
        add(name, "resize", src, lambda x, oh=oh, ow=ow, m=mode:
            F.resize(x, [oh, ow], INTERP[m], antialias=False), oh=oh, ow=ow, interp=mode)
    for name, src, size in [("resize_short_rand", "rand", 16), ("resize_short_grad", "grad", 25)]:
        out = F.resize(imgs[src].clone(), size, InterpolationMode.BILINEAR, antialias=False)
        add(name, "resize_short", src, lambda x, s=size: F.resize(
            x, s, InterpolationMode.BILINEAR, antialias=False),
            size=size, oh=out.shape[1], ow=out.shape[2])

    for name, oh, ow in [("center_crop_16", 16, 16), ("center_crop_20x28", 20, 28),
                         ("center_crop_22x26", 22, 26), ("center_crop_pad", 30, 35),
                         ("center_crop_mixed", 10, 40), ("center_crop_pad_odd", 26, 32)]:
        add(name, "center_crop", "rand", lambda x, oh=oh, ow=ow: F.center_crop(x, [oh, ow]),
            oh=oh, ow=ow)

    for name, box in [("crop_inside", (4, 5, 12, 17)), ("crop_pad_tl", (-3, -2, 20, 30)),
                      ("crop_pad_br", (10, 20, 20, 15))]:
        add(name, "crop", "rand", lambda x, b=box: F.crop(x, *b),
            top=box[0], left=box[1], height=box[2], width=box[3])

    for name, src, box, oh, ow, mode in [
        ("rrc_bilinear_up", "rand", (2, 3, 15, 20), 24, 24, "bilinear"),
        ("rrc_bilinear_whole", "rand", (0, 0, 23, 29), 32, 32, "bilinear"),
        ("rrc_bilinear_down", "grad", (10, 4, 20, 33), 9, 11, "bilinear"),
        ("rrc_bicubic_small", "rand", (5, 7, 8, 6), 17, 13, "bicubic"),
        ("rrc_bicubic_down", "grad", (3, 1, 29, 37), 12, 12, "bicubic"),
        ("rrc_same_size", "rand", (3, 4, 10, 12), 10, 12, "bilinear"),
    ]:
        add(name, "resized_crop", src, lambda x, b=box, oh=oh, ow=ow, m=mode:
            F.resized_crop(x, *b, [oh, ow], INTERP[m], antialias=False),
            top=box[0], left=box[1], height=box[2], width=box[3], oh=oh, ow=ow, interp=mode)

    add("hflip_rand", "hflip", "rand", F.hflip)
    add("hflip_mono", "hflip", "mono", F.hflip)
    for k in (1, 2, 3, -1, 4):
        add(f"rot90_k{k}".replace("-", "m"), "rot90", "rand",
            lambda x, k=k: torch.rot90(x, k, dims=[1, 2]), k=k)
    for src in ("rand", "mono"):
        for angle in (30.0, -45.0, 90.0, 137.5, -7.25):
            for mode in ("nearest", "bilinear"):
                name = f"rotate_{src}_{angle}_{mode}".replace("-", "m").replace(".", "p")
                add(name, "rotate", src, lambda x, a=angle, m=mode: F.rotate(x, a, INTERP[m]),
                    angle=angle, interp=mode)

    adjust = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
              "saturation": F.adjust_saturation, "hue": F.adjust_hue}
    for op, src, f in [
        ("brightness", "rand", 0.6), ("brightness", "rand", 1.37), ("brightness", "grad", 0.0),
        ("brightness", "mono", 1.2),
        ("contrast", "rand", 0.6), ("contrast", "rand", 1.4), ("contrast", "grad", 0.0),
        ("contrast", "mono", 0.7),
        ("saturation", "rand", 0.6), ("saturation", "rand", 1.4), ("saturation", "grad", 0.0),
        ("saturation", "grad", 2.0),
        ("hue", "rand", -0.1), ("hue", "rand", 0.1), ("hue", "rand", 0.5), ("hue", "rand", -0.5),
        ("hue", "rand", 0.0), ("hue", "grad", 0.033), ("hue", "grad", -0.27), ("hue", "mono", 0.2),
    ]:
        name = f"{op}_{src}_{f}".replace("-", "m").replace(".", "p")
        add(name, op, src, lambda x, fn=adjust[op], f=f: fn(x, f), factor=f)

    add("grayscale_rand_1", "grayscale", "rand", lambda x: F.rgb_to_grayscale(x, 1), out_c=1)
    add("grayscale_rand_3", "grayscale", "rand", lambda x: F.rgb_to_grayscale(x, 3), out_c=3)
    add("grayscale_mono", "grayscale", "mono", lambda x: F.rgb_to_grayscale(x, 1), out_c=1)

    for name, src, order, factors in [
        ("jitter_rand", "rand", [3, 1, 0, 2], [0.7, 1.3, 0.8, -0.07]),
        ("jitter_grad", "grad", [0, 1, 2, 3], [1.2, 0.65, 1.35, 0.09]),
        ("jitter_partial", "rand", [2, 3, 1, 0], [1.25, None, None, 0.04]),
        ("jitter_mono", "mono", [1, 3, 2, 0], [0.9, 1.2, 0.7, 0.1]),
    ]:
        add(name, "jitter", src, lambda x, o=order, fs=factors: jitter_module(o, fs)(x),
            order=order, factors=factors)

    for name, src, k, sigma in [
        ("blur_rand_k3", "rand", 3, 0.1), ("blur_rand_k5", "rand", 5, 1.0),
        ("blur_rand_k23", "rand", 23, 2.0), ("blur_grad_k9", "grad", 9, 2.0),
        ("blur_grad_k13", "grad", 13, 1.37), ("blur_mono_k7", "mono", 7, 0.73),
    ]:
        add(name, "blur", src, lambda x, k=k, s=sigma: F.gaussian_blur(x, [k, k], [s, s]),
            k=k, sigma=sigma)

    for name, src, thr in [("solarize_rand_half", "rand", 0.5), ("solarize_grad", "grad", 0.25),
                           ("solarize_rand_128", "rand", 128 / 255)]:
        add(name, "solarize", src, lambda x, t=thr: F.solarize(x, t), threshold=thr)

    add("normalize_rand", "normalize", "rand",
        lambda x: F.normalize(x, IMAGENET_MEAN, IMAGENET_STD), mean=IMAGENET_MEAN,
        std=IMAGENET_STD)

    base = {"size": 32, "interp": "bilinear", "flip_first": 0, "flip": 0, "jitter": 0,
            "order": [0, 1, 2, 3], "factors": [None, None, None, None], "gray": 0, "blur": 0,
            "k": 13, "sigma": 1.0, "solarize": 0, "threshold": 128 / 255, "normalize": 1,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    for name, src, over in [
        # MoCo-v2: every stage applied.
        ("pipeline_mocov2_all", "big",
         dict(top=5, left=9, height=37, width=41, flip=1, jitter=1, order=[2, 0, 3, 1],
              factors=[0.83, 1.21, 0.66, -0.043], gray=1, blur=1, sigma=1.3)),
        # MoCo-v2: crop and jitter only, no normalisation.
        ("pipeline_mocov2_jitter", "big",
         dict(top=0, left=20, height=48, width=44, jitter=1, order=[1, 3, 2, 0],
              factors=[1.37, 0.61, 1.12, 0.097], blur=1, sigma=0.31, normalize=0)),
        # MoCo-v2: nothing but the crop.
        ("pipeline_mocov2_crop", "big", dict(top=11, left=3, height=20, width=27)),
        # DINO/EsViT local view: bicubic, flip first, solarised.
        ("pipeline_dino_local", "big",
         dict(size=16, interp="bicubic", flip_first=1, top=14, left=30, height=12, width=15,
              flip=1, jitter=1, order=[3, 2, 1, 0], factors=[0.7, 1.1, 0.95, 0.02],
              blur=1, k=9, sigma=0.8, solarize=1)),
    ]:
        p = {**base, **over}
        add(name, "pipeline", src, lambda x, p=p: pipeline(x, p), **p)
    return cases


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_transform_fixtures.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    imgs = make_images()
    cases = build_cases(imgs)
    tensors = {f"img.{k}": v for k, v in imgs.items()}
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "cases": ",".join(c[0] for c in cases)}
    for name, m, o in cases:
        assert name not in meta and f"{name}.out" not in tensors, name
        assert torch.isfinite(o).all(), name
        tensors[f"{name}.out"] = o
        meta[name] = json.dumps(m)
    p = os.path.join(out, "transforms.safetensors")
    n = save_safetensors(p, tensors, meta)
    ops = sorted({m["op"] for _, m, _ in cases})
    print(f"{p}: {len(cases)} cases over {len(ops)} ops, {len(tensors)} tensors, {n} bytes")
    print("  ops: " + " ".join(ops))


if __name__ == "__main__":
    main()
