#!/usr/bin/env python3
"""Writes kd's CIFAR-100 recipes: one YAML config per (teacher-student pair, method)
under configs/cifar100/<teacher>-<student>/<method>.yaml, and one per teacher under
configs/cifar100/teachers/<teacher>.yaml.

Usage:
    python3 tools/gen_recipes.py            # (re)write every file
    python3 tools/gen_recipes.py --check    # exit 1 if a file is missing or differs

Plain python3, no third-party packages. The recipes are generated so that every file
follows one recipe (METHODS.md section 0, RepDistiller train_student.py /
train_teacher.py): SGD momentum 0.9, weight decay 5e-4, batch 64, 240 epochs, lr 0.05
(0.01 for MobileNetV2, ShuffleV1 and ShuffleV2 students), lr x0.1 at epochs 150, 180,
210. What differs between the files comes from the tables below, each read from the
official code or README named next to it:

  * the pairs and the published CIFAR-100 top-1 (last epoch) of teacher, student, KD,
    CRD and SSKD: METHODS.md section 10 (RepDistiller README, SSKD README);
  * the other RepDistiller methods' numbers: RepDistiller README;
  * the loss weights (-r/-a/-b): RepDistiller scripts/run_cifar_distill.sh; kd's methods
    carry them as their defaults, so the recipes do not repeat them;
  * DKD's NCKD weight per pair: mdistiller configs/cifar100/dkd/*.yaml (DKD.BETA,
    default 8.0 in mdistiller/engine/cfg.py where a config names none) and DKD's
    numbers: mdistiller README;
  * DIST: one config for every pair (DIST_KD README, CIFAR-100 section), numbers from
    the same README;
  * LSKD: base temperature and KD weight per pair from the names of the logs behind
    each published number ("KD_TYPE,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT.txt",
    sunshangquan/logit-standardization-KD README and logs/KD/).

A method setting ("<method>.<name>: value") is written only where the pair needs a
value other than the method's default, so that a recipe names no setting a method
does not have. Run it from anywhere; it writes relative to the repository root.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "configs", "cifar100")

# Methods in kd's registry order (`kd distill --method list`), "none" first.
METHODS = ["none", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "nst", "pad", "dkd", "dist", "lskd", "crd",
           "sskd"]

# Recipes that combine a method with the KD term, as RepDistiller's README shows
# ("combining CRD with KD": -a 1 -b 0.8): file "<method>+kd.yaml", that method
# with alpha 1.
KD_VARIANTS = ["crd"]

# Students trained with lr 0.01 in RepDistiller train_student.py (and mdistiller,
# DIST, LSKD configs): "if opt.model_s in ['MobileNetV2', 'ShuffleV1', 'ShuffleV2']".
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}

# Teachers: published top-1 (RepDistiller README; METHODS.md section 10).
TEACHERS = {
    "wrn_40_2": 75.61,
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "vgg13": 74.64,
    "ResNet50": 79.34,
}

# The pairs of METHODS.md section 10, in its order: (teacher, student, published
# top-1 of the student alone, KD, CRD, SSKD or None).
PAIRS = [
    ("wrn_40_2", "wrn_16_2", 73.26, 74.92, 75.48, 76.04),
    ("wrn_40_2", "wrn_40_1", 71.98, 73.54, 74.14, 76.13),
    ("resnet56", "resnet20", 69.06, 70.66, 71.16, 71.49),
    ("resnet110", "resnet32", 71.14, 73.08, 73.48, None),
    ("resnet32x4", "resnet8x4", 72.50, 73.33, 75.51, 76.20),
    ("vgg13", "vgg8", 70.36, 72.98, 73.94, 75.33),
    ("vgg13", "MobileNetV2", 64.60, 67.37, 69.73, 71.53),
    ("ResNet50", "MobileNetV2", 64.60, 67.35, 69.11, 72.57),
    ("resnet32x4", "ShuffleV1", 70.50, 74.07, 75.11, 78.44),
    ("resnet32x4", "ShuffleV2", 71.82, 74.45, 75.65, 78.61),
    ("wrn_40_2", "ShuffleV1", 70.50, 74.83, 76.05, 77.40),
]

# RepDistiller README, both tables: FitNet, AT, SP, CC, VID, RKD, PKT, NST per pair.
REPDISTILLER = {
    "wrn_40_2-wrn_16_2": (73.58, 74.08, 73.83, 73.56, 74.11, 73.35, 74.54, 73.68),
    "wrn_40_2-wrn_40_1": (72.24, 72.77, 72.43, 72.21, 73.30, 72.22, 73.45, 72.24),
    "resnet56-resnet20": (69.21, 70.55, 69.67, 69.63, 70.38, 69.61, 70.34, 69.60),
    "resnet110-resnet32": (71.06, 72.31, 72.69, 71.48, 72.61, 71.82, 72.61, 71.96),
    "resnet32x4-resnet8x4": (73.50, 73.44, 72.94, 72.97, 73.09, 71.90, 73.64, 73.30),
    "vgg13-vgg8": (71.02, 71.43, 72.68, 70.71, 71.23, 71.48, 72.88, 71.53),
    "vgg13-MobileNetV2": (64.14, 59.40, 66.30, 64.86, 65.56, 64.52, 67.13, 58.16),
    "ResNet50-MobileNetV2": (63.16, 58.58, 68.08, 65.43, 67.57, 64.43, 66.52, 64.96),
    "resnet32x4-ShuffleV1": (73.59, 71.73, 73.48, 71.14, 73.38, 72.28, 74.10, 74.12),
    "resnet32x4-ShuffleV2": (73.54, 72.73, 74.56, 71.29, 73.40, 73.21, 74.69, 74.68),
    "wrn_40_2-ShuffleV1": (73.73, 73.32, 74.52, 71.38, 73.61, 72.21, 73.89, 74.89),
}
REPDISTILLER_METHODS = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "nst"]

# RepDistiller scripts/run_cifar_distill.sh flags (-r gamma, -a alpha, -b beta) and
# the --distill name behind each method; kd's method defaults equal these.
REPDISTILLER_FLAGS = {
    "kd": ("kd", "-r 0.1 -a 0.9 -b 0"),
    "fitnet": ("hint", "-a 0 -b 100"),
    "at": ("attention", "-a 0 -b 1000"),
    "sp": ("similarity", "-a 0 -b 3000"),
    "cc": ("correlation", "-a 0 -b 0.02"),
    "vid": ("vid", "-a 0 -b 1"),
    "rkd": ("rkd", "-a 0 -b 1"),
    "pkt": ("pkt", "-a 0 -b 30000"),
    "nst": ("nst", "-a 0 -b 50"),
    "crd": ("crd", "-a 0 -b 0.8"),
    "crd+kd": ("crd", "-a 1 -b 0.8"),
}

# mdistiller configs/cifar100/dkd/<file>: (file, DKD.BETA or None where the file
# sets none and mdistiller's default 8.0 applies, published top-1 from its README).
# The README's second table heads the last column "ResNet32x4 / MobileNet-V2"; its
# 77.07 is the ShuffleNet-V2 student of configs/cifar100/dkd/res32x4_shuv2.yaml (the
# LSKD README lists the same 77.07 under ShuffleNet-V2).
DKD_DEFAULT_BETA = 8.0
DKD = {
    "wrn_40_2-wrn_16_2": ("wrn40_2_wrn_16_2.yaml", 6.0, 76.23),
    "wrn_40_2-wrn_40_1": ("wrn40_2_wrn_40_1.yaml", 6.0, 74.81),
    "resnet56-resnet20": ("res56_res20.yaml", 2.0, 71.97),
    "resnet110-resnet32": ("res110_res32.yaml", 2.0, 74.11),
    "resnet32x4-resnet8x4": ("res32x4_res8x4.yaml", None, 76.32),
    "vgg13-vgg8": ("vgg13_vgg8.yaml", 6.0, 74.68),
    "vgg13-MobileNetV2": ("vgg13_mv2.yaml", 6.0, 69.71),
    "ResNet50-MobileNetV2": ("res50_mv2.yaml", None, 70.35),
    "resnet32x4-ShuffleV1": ("res32x4_shuv1.yaml", None, 76.45),
    "resnet32x4-ShuffleV2": ("res32x4_shuv2.yaml", None, 77.07),
    "wrn_40_2-ShuffleV1": ("wrn40_2_shuv1.yaml", None, 76.70),
}

# DIST_KD README, CIFAR-100: mean +- std of its runs.
DIST = {
    "wrn_40_2-wrn_40_1": "74.43 +- 0.24",
    "resnet56-resnet20": "71.75 +- 0.30",
    "resnet32x4-resnet8x4": "76.31 +- 0.19",
    "ResNet50-MobileNetV2": "68.66 +- 0.23",
    "resnet32x4-ShuffleV1": "76.34 +- 0.18",
    "resnet32x4-ShuffleV2": "77.35 +- 0.25",
}

# LSKD (logit-standardization-KD README, "KD+Ours"): (base temperature, KD weight,
# published top-1) from the log behind each number. kd's lskd defaults are base
# temperature 2 (lskd.T) and KD weight 9 (the term weight beta); the two pairs the
# README does not report keep those defaults (their configs' tags say "2,9").
LSKD_DEFAULT = (2.0, 9.0)
LSKD = {
    "wrn_40_2-wrn_16_2": (2.0, 9.0, 76.11),
    "wrn_40_2-wrn_40_1": (2.0, 9.0, 74.37),
    "resnet56-resnet20": (2.0, 9.0, 71.43),
    "resnet110-resnet32": (2.0, 9.0, 74.17),
    "resnet32x4-resnet8x4": (2.0, 9.0, 76.62),
    "vgg13-vgg8": (3.0, 9.0, 74.36),
    "vgg13-MobileNetV2": (3.0, 9.0, 68.61),
    "ResNet50-MobileNetV2": (3.0, 1.0, 69.02),
    "resnet32x4-ShuffleV2": (2.0, 9.0, 75.56),
}

DATA = "cifar100:data/cifar-100-binary"


def fmt(x):
    """A number as YAML text without a trailing '.0' for integers."""
    return ("%g" % x) if isinstance(x, float) else str(x)


def lr_for(student):
    return 0.01 if student in LOW_LR_STUDENTS else 0.05


def recipe_lines(model, lr, out):
    """The shared RepDistiller recipe (METHODS.md section 0)."""
    return [
        "data: %s   # --data on the command line overrides this" % DATA,
        "model: %s" % model,
        "epochs: 240",
        "batch_size: 64",
        "optimizer: sgd",
        "lr: %s%s" % (fmt(lr), "   # 0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 (train_student.py)" if lr != 0.05 else ""),
        "momentum: 0.9",
        "weight_decay: 0.0005",
        "schedule: multistep",
        'milestones: "150,180,210"',
        "lr_decay: 0.1",
        "out: %s" % out,
    ]


def teacher_file(t):
    path = "configs/cifar100/teachers/%s.yaml" % t
    head = [
        "# CIFAR-100 teacher %s: RepDistiller train_teacher.py / scripts/run_cifar_vanilla.sh" % t,
        "# (python train_teacher.py --model %s); recipe of METHODS.md section 0." % t,
        "# Published top-1 (RepDistiller README, METHODS.md section 10): %.2f (last epoch)." % TEACHERS[t],
        "# Generated by tools/gen_recipes.py: edit that script, not this file.",
        "#",
        "# Run:  kd train --config %s --data cifar100:DIR" % path,
        "# The distillation recipes read the teacher from runs/cifar100/teachers/%s/last.safetensors" % t,
        "# (RepDistiller's published teachers are the epoch-240 checkpoints, not the best epoch).",
    ]
    body = recipe_lines(t, 0.05, "runs/cifar100/teachers/%s" % t)
    body.insert(2, "method: none")
    return path, "\n".join(head + body) + "\n"


def published_line(method, key, pair):
    t, s, p_student, p_kd, p_crd, p_sskd = pair
    if method == "none":
        return "student alone %.2f" % p_student
    if method == "kd":
        return "KD %.2f (teacher %.2f, student alone %.2f; CRD %.2f%s)" % (
            p_kd, TEACHERS[t], p_student, p_crd, "" if p_sskd is None else ", SSKD %.2f" % p_sskd)
    if method in REPDISTILLER_METHODS:
        v = REPDISTILLER[key][REPDISTILLER_METHODS.index(method)]
        return "%s %.2f (RepDistiller README; KD %.2f, student alone %.2f)" % (method.upper() if method != "fitnet" else "FitNet", v, p_kd, p_student)
    if method == "dkd":
        return "DKD %.2f (mdistiller README; KD %.2f, student alone %.2f)" % (DKD[key][2], p_kd, p_student)
    if method == "dist":
        if key in DIST:
            return "DIST %s (DIST_KD README; KD %.2f, student alone %.2f)" % (DIST[key], p_kd, p_student)
        return "none for this pair in the DIST_KD README (KD %.2f, student alone %.2f)" % (p_kd, p_student)
    if method == "lskd":
        if key in LSKD:
            return "KD+LS %.2f (logit-standardization-KD README; KD %.2f, student alone %.2f)" % (LSKD[key][2], p_kd, p_student)
        return "none for this pair in the logit-standardization-KD README (KD %.2f, student alone %.2f)" % (p_kd, p_student)
    if method == "pad":
        return "none on CIFAR-100 (PAD reports ImageNet only; KD %.2f, student alone %.2f)" % (p_kd, p_student)
    if method == "crd":
        return "CRD %.2f (RepDistiller README; KD %.2f, student alone %.2f)" % (p_crd, p_kd, p_student)
    if method == "crd+kd":
        return "none in the RepDistiller README, which gives the command only (CRD %.2f, KD %.2f)" % (p_crd, p_kd)
    if method == "sskd":
        if p_sskd is not None:
            return "SSKD %.2f (SSKD README, with its own retrained teachers; KD %.2f, student alone %.2f)" % (
                p_sskd, p_kd, p_student)
        return "none for this pair in the SSKD README (KD %.2f, student alone %.2f)" % (p_kd, p_student)
    raise ValueError(method)


def source_lines(method, key, t, s):
    if method == "none":
        return ["# Source: RepDistiller train_student.py recipe with no teacher (the student baseline,",
                "# RepDistiller train_teacher.py --model %s)." % s]
    if method in REPDISTILLER_FLAGS:
        d, flags = REPDISTILLER_FLAGS[method]
        return ["# Source: RepDistiller scripts/run_cifar_distill.sh (--distill %s %s) and" % (d, flags),
                "# train_student.py; the weights are kd's %s defaults." % method]
    if method == "pad":
        return ["# Source: no official code (METHODS.md section 4; torchdistill PADL2Loss); the",
                "# RepDistiller recipe with kd's pad defaults."]
    if method == "dkd":
        f, beta, _ = DKD[key]
        how = "DKD.BETA %s" % fmt(beta) if beta is not None else "no DKD.BETA: mdistiller's default %s" % fmt(DKD_DEFAULT_BETA)
        return ["# Source: mdistiller configs/cifar100/dkd/%s (%s; CE 1, alpha 1," % (f, how),
                "# T 4, warm-up 20 epochs as mdistiller/engine/cfg.py) and mdistiller/distillers/DKD.py."]
    if method == "dist":
        return ["# Source: DIST_KD README, CIFAR-100 (classification/configs/strategies/distill/dist_cifar.yaml,",
                "# one config for every pair; CE 1, DIST weight 2, tau 4, beta = gamma = 1: kd's dist defaults)."]
    if method == "lskd":
        T, w = LSKD.get(key, LSKD_DEFAULT + (None,))[:2]
        why = "the log behind the published number" if key in LSKD else "not reported; the README's --base-temp 2 --kd-weight 9"
        return ["# Source: sunshangquan/logit-standardization-KD (mdistiller/distillers/KD.py with",
                "# --logit-stand --base-temp %s --kd-weight %s: %s; CE 0.1)." % (fmt(T), fmt(w), why)]
    if method == "sskd":
        return ["# Source: xuguodong03/SSKD student.py (weights 0.1 CE, 0.9 KD, 2.7 tf, 10 ss; T 4, 4, 0.5;",
                "# ratios 1.0 / 0.75: kd's sskd defaults). Stage 1 (teacher head: 60 epochs, lr 0.05,",
                "# x0.1 at 30 and 45) runs first and is kept as <out>/sskd_teacher_head.safetensors."]
    raise ValueError(method)


def method_settings(method, key):
    """Top-level keys where the pair needs a value other than the method's default."""
    if method == "dkd":
        beta = DKD[key][1]
        if beta is not None and beta != DKD_DEFAULT_BETA:
            return ["dkd.beta: %s   # NCKD weight for this pair (default %s)" % (fmt(beta), fmt(DKD_DEFAULT_BETA))]
        note = ["# dkd.beta stays at its default %s for this pair." % fmt(DKD_DEFAULT_BETA)]
        if key.startswith("wrn_40_2-"):
            note.append("# (mdistiller's %s sets no DKD.BETA, so 8, although its wrn-wrn pairs use 6.)" % DKD[key][0])
        return note
    if method == "lskd" and key in LSKD:
        T, w, _ = LSKD[key]
        out = []
        if T != LSKD_DEFAULT[0]:
            out.append("lskd.T: %s   # base temperature for this pair (default %s)" % (fmt(T), fmt(LSKD_DEFAULT[0])))
        if w != LSKD_DEFAULT[1]:
            out.append("beta: %s   # KD weight for this pair (default %s)" % (fmt(w), fmt(LSKD_DEFAULT[1])))
        return out
    return []


def pair_file(pair, method):
    """The recipe of `method` for the pair; "<m>+kd" is method m with alpha 1."""
    t, s = pair[0], pair[1]
    key = "%s-%s" % (t, s)
    path = "configs/cifar100/%s/%s.yaml" % (key, method)
    title = "student %s alone" % s if method == "none" else "%s, teacher %s -> student %s" % (method, t, s)
    head = ["# CIFAR-100 recipe: %s." % title]
    head += source_lines(method, key, t, s)
    head.append("# Published top-1 (last epoch): %s." % published_line(method, key, pair))
    head.append("# Generated by tools/gen_recipes.py: edit that script, not this file.")
    head.append("#")
    if method == "none":
        head.append("# Run:  kd train --config %s --data cifar100:DIR" % path)
    else:
        head.append("# Run:  kd distill --config %s --data cifar100:DIR" % path)
        head.append("# The teacher checkpoint is made first by")
        head.append("#       kd train --config configs/cifar100/teachers/%s.yaml --data cifar100:DIR" % t)
    head.append("# Add --seed N for repeats; published numbers are single runs or means over a few seeds.")
    body = recipe_lines(s, lr_for(s), "runs/cifar100/%s/%s" % (key, method))
    base = method[:-3] if method.endswith("+kd") else method
    extra = ["method: %s" % base]
    if base != method:
        extra.append("alpha: 1   # the KD term added (RepDistiller README: -a 1 -b 0.8)")
    if method != "none":
        extra += ["teacher: %s" % t, "teacher_ckpt: runs/cifar100/teachers/%s/last.safetensors" % t]
    body[2:2] = extra
    body += method_settings(method, key)
    return path, "\n".join(head + body) + "\n"


def all_files():
    files = [teacher_file(t) for t in TEACHERS]
    for pair in PAIRS:
        for m in METHODS:
            files.append(pair_file(pair, m))
        for m in KD_VARIANTS:
            files.append(pair_file(pair, m + "+kd"))
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="report files that are missing or differ; write nothing")
    args = ap.parse_args()
    bad = 0
    files = all_files()
    for rel, text in files:
        path = os.path.join(ROOT, rel)
        if args.check:
            try:
                with open(path) as f:
                    same = f.read() == text
            except OSError:
                same = False
            if not same:
                print("out of date: %s" % rel)
                bad += 1
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if args.check:
        print("%d of %d recipe files up to date" % (len(files) - bad, len(files)))
        return 1 if bad else 0
    print("wrote %d recipe files under %s" % (len(files), os.path.relpath(OUT, os.getcwd())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
