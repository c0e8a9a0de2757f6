#!/usr/bin/python3
"""PyTorch side of the kd-vs-PyTorch benchmark: the measurements of
bench/train_step.c, on the same models, batch, optimiser and FLOP convention.

Usage (one measurement per process, so ru_maxrss is this measurement's own):
    /usr/bin/python3 bench/torch_step.py --model resnet8x4 --mode train|infer
    /usr/bin/python3 bench/torch_step.py --model resnet8x4 --teacher resnet32x4 --mode kd
        [--layout nchw|channels_last] [--batch 64] [--threads 2] [--classes 100]
        [--warmup 5] [--repeats 5] [--steps 10] [--lr 0.01]

Needs only Debian's python3-torch (1.13). Prints one JSON line with the keys
bench_train_step prints.

One step:
  train  opt.zero_grad(); loss = cross_entropy(model(x), y); loss.item();
         loss.backward(); opt.step()   (SGD momentum 0.9, weight decay 5e-4)
  infer  model.eval(); with torch.no_grad(): model(x)
  kd     with torch.no_grad(): t = teacher(x) (eval mode); then the train step
         with RepDistiller's loss 0.1 * CE + 0.9 * DistillKL(T=4).
The batch is one fixed tensor (N, 3, 32, 32) of uniform noise in [-1, 1) with
random labels; no data loading is timed. torch.set_num_threads(threads); the
OpenMP/MKL settings are PyTorch's defaults (bench/run.sh clears
GOMP_SPINCOUNT and OMP_WAIT_POLICY for these runs).

FLOPs: 2 * MACs of every Conv2d and Linear in a forward pass, counted by
forward hooks on one eval-mode image; a training step counts 3x that, the kd
step the teacher's forward plus 3x the student's (see bench/train_step.c).

Models: RepDistiller's CIFAR definitions (models/resnet.py, models/wrn.py) as
written in tools/gen_zoo_fixtures.py, which the round-trip tests check against kd.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# RepDistiller's models, the same definitions the round-trip tests check
# against kd (tools/gen_zoo_fixtures.py); forward(x) returns the logits.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from gen_zoo_fixtures import build  # noqa: E402

MODELS = {name: (lambda k, n=name: build(n, num_classes=k))
          for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                       "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2",
                       "wrn_40_1", "wrn_40_2")}


def forward_flops_per_image(model):
    """2 * MACs of every Conv2d and Linear for one 3x32x32 image (eval mode)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            k = m.in_features
        total[0] += 2 * out.numel() * k

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    model.train(was)
    for h in hs:
        h.remove()
    return total[0]


def distill_kl(s, t, T):
    """RepDistiller DistillKL: sum KL(softmax(t/T) || softmax(s/T)) * T^2 / N."""
    p_s = F.log_softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T * T) / s.shape[0]


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--teacher", default="resnet32x4", choices=sorted(MODELS))
    ap.add_argument("--mode", default="train", choices=("train", "infer", "kd"))
    ap.add_argument("--layout", default="nchw", choices=("nchw", "channels_last"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    a = ap.parse_args()

    rss_start = peak_rss_mib()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    fmt = torch.channels_last if a.layout == "channels_last" else torch.contiguous_format
    student = MODELS[a.model](a.classes)
    fwd = forward_flops_per_image(student)
    student = student.to(memory_format=fmt)
    teacher = None
    t_fwd = 0
    if a.mode == "kd":
        teacher = MODELS[a.teacher](a.classes)
        t_fwd = forward_flops_per_image(teacher)
        teacher = teacher.to(memory_format=fmt).eval()
    flops_img = fwd if a.mode == "infer" else 3 * fwd + t_fwd

    g = torch.Generator().manual_seed(7)
    x = (torch.rand(a.batch, 3, 32, 32, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch,), generator=g)
    opt = torch.optim.SGD(student.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)

    if a.mode == "infer":
        student.eval()

        def step():
            with torch.no_grad():
                student(x)
    else:
        student.train()

        def step():
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
            s = student(x)
            if teacher is not None:
                loss = 0.1 * F.cross_entropy(s, y) + 0.9 * distill_kl(s, t, 4.0)
            else:
                loss = F.cross_entropy(s, y)
            v = loss.item()
            if v != v or abs(v) == float("inf"):
                sys.exit(f"torch_step: loss became {v}")
            opt.zero_grad()
            loss.backward()
            opt.step()

    for _ in range(a.warmup):
        step()
    ips = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        ips.append(a.steps * a.batch / (time.perf_counter() - t0))
    med = statistics.median(ips)
    print(json.dumps({
        "framework": "pytorch", "model": a.model, "teacher": a.teacher if a.mode == "kd" else None,
        "mode": a.mode, "layout": a.layout, "backend": "torch " + torch.__version__,
        "batch": a.batch, "threads": torch.get_num_threads(), "classes": a.classes,
        "warmup": a.warmup, "repeats": a.repeats, "steps": a.steps,
        "img_s_median": round(med, 2), "img_s_min": round(min(ips), 2), "img_s_max": round(max(ips), 2),
        "flops_per_image": flops_img, "fwd_flops_per_image": fwd,
        "gflops_median": round(med * flops_img * 1e-9, 3), "gflops_max": round(max(ips) * flops_img * 1e-9, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_start_mib": round(rss_start, 1),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default"),
    }))


if __name__ == "__main__":
    main()
