#!/usr/bin/python3
"""PyTorch side of the kd-vs-PyTorch benchmark: the measurements of
bench/train_step.c, on the same models, batch, optimiser and FLOP convention.

Usage (one measurement per process, so ru_maxrss is this measurement's own):
    /usr/bin/python3 bench/torch_step.py --model resnet8x4 --mode train|infer
    /usr/bin/python3 bench/torch_step.py --model resnet8x4 --teacher resnet32x4 --mode kd
        [--layout nchw|channels_last] [--batch 64] [--threads 2] [--classes 100]
        [--warmup 5] [--repeats 5] [--steps 10] [--lr 0.01] [--method kd|crd] [--n-train N]
        [--size 32] [--precision f32|bf16] [--no-impls]

Needs only Debian's python3-torch (1.13). Prints one JSON line with the keys
bench_train_step prints.

One step:
  train  opt.zero_grad(); loss = cross_entropy(model(x), y); loss.item();
         loss.backward(); opt.step()   (SGD momentum 0.9, weight decay 5e-4)
  infer  model.eval(); with torch.no_grad(): model(x)
  kd     with torch.no_grad(): t = teacher(x) (eval mode); then the train step
         with RepDistiller's loss 0.1 * CE + 0.9 * DistillKL(T=4).
         --method crd: RepDistiller's CRD step instead (crd/criterion.py,
         crd/memory.py as ../shared/METHODS.md section 2 states them): both
         nets' features, Embed_s/Embed_t (Linear -> 128, L2-normalised,
         trained with the student), ContrastMemory with two --n-train x 128
         banks (gather of the (B, K+1, 128) rows, bmm, exp(./0.07)/Z, the
         momentum-0.5 update under no_grad) and ContrastLoss on both sides;
         loss = CE + 0.8 * CRD. The official code draws the K = 16384
         negatives per sample in its DataLoader workers (np.random.choice in
         CIFAR100InstanceSample), so here they are drawn outside the timed
         step (one fresh draw per step, made before timing); kd draws them
         inside its step. Image i of the batch is training image i.
--precision bf16: PyTorch's own bf16 mixed precision, the forward passes
and the loss under torch.autocast('cpu', dtype=torch.bfloat16) (float32
weights, SGD in float32); convolutions and linear layers run in bf16, batch
norm as autocast decides. Measure it only on CPUs with native bf16
(AVX-512-BF16 or AMX), as bench/run.sh does.

Kernels: after timing, one more step runs with oneDNN's verbose mode on
(torch.backends.mkldnn.verbose, its output captured from fd 1) and "impls"
lists the distinct oneDNN implementations of its convolutions as
{"fwd", "bwd_data", "bwd_weights"} (names joined by '+', the same form as
bench_train_step's); "" where no convolution of that kind ran on oneDNN
(PyTorch then used its own kernels, e.g. im2col + BLAS). --no-impls skips it.

The batch is one fixed tensor (N, 3, S, S) (S = --size, default 32; 224 for
the ImageNet-size rows) of uniform noise in [-1, 1) with
random labels; no data loading is timed. torch.set_num_threads(threads); the
OpenMP/MKL settings are PyTorch's defaults (bench/run.sh clears
GOMP_SPINCOUNT and OMP_WAIT_POLICY for these runs).

FLOPs: 2 * MACs of every Conv2d and Linear in a forward pass, counted by
forward hooks on one eval-mode image (torchvision's ShiftedWindowAttention
calls F.linear with its qkv and proj weights, so its hook counts those two;
the attention products q @ k^T and attn @ v count nothing, as in kd); a training step counts 3x that, the kd
step the teacher's forward plus 3x the student's (see bench/train_step.c).

Models: RepDistiller's CIFAR definitions (models/resnet.py, models/wrn.py) as
written in tools/gen_zoo_fixtures.py, which the round-trip tests check against kd;
torchvision's swin_t (and swin_cifar: SwinTransformer with patch 2, embed 64,
depths 2-2-2, heads 2-4-8, window 4) as tools/gen_swin_fixtures.py builds them
for tests/test_swin.c (needs python3-torchvision).

BLAS: the "blas" key of the line names the BLAS library this process mapped
(Debian's PyTorch calls the system libblas.so.3 for Linear layers and matmuls;
bench/run.sh points it at OpenBLAS where one is found, see docs/PERFORMANCE.md).
"""
import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import sys
import tempfile
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


def swin(name, k):
    """torchvision's Swin (tools/gen_swin_fixtures.py), imported only when asked."""
    from gen_swin_fixtures import make
    return make(name, 3, k)


for _n in ("swin_t", "swin_s", "swin_b", "swin_cifar"):
    MODELS[_n] = (lambda k, n=_n: swin(n, k))


def blas_library():
    """The BLAS shared object this process mapped (PyTorch's Linear and matmul use it)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.rsplit("/", 1)[-1]}
        return ",".join(sorted(libs)) or "none"
    except OSError:
        return "unknown"


def forward_flops_per_image(model, size=32):
    """2 * MACs of every Conv2d and Linear for one 3 x size x size image (eval mode)."""
    total = [0]
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention as swa
    except ImportError:
        swa = ()

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif swa and isinstance(m, swa):
            # qkv (C -> 3C) and proj (C -> C) on every token (no window padding
            # at the benchmark's sizes); their modules' hooks do not fire.
            k = 4 * m.qkv.in_features
        else:
            k = m.in_features
        total[0] += 2 * out.numel() * k

    kinds = (nn.Conv2d, nn.Linear) + ((swa,) if swa else ())
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was)
    for h in hs:
        h.remove()
    return total[0]


def distill_kl(s, t, T):
    """RepDistiller DistillKL: sum KL(softmax(t/T) || softmax(s/T)) * T^2 / N."""
    p_s = F.log_softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T * T) / s.shape[0]


class Embed(nn.Module):
    """RepDistiller crd/criterion.py Embed: Linear, then L2 normalisation."""

    def __init__(self, dim_in, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.view(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class ContrastMemory(nn.Module):
    """RepDistiller crd/memory.py ContrastMemory (K negatives, T 0.07, momentum 0.5)."""

    def __init__(self, dim, n_data, K=16384, T=0.07, momentum=0.5):
        super().__init__()
        self.n_data = n_data
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1. / (dim / 3) ** 0.5
        self.register_buffer("memory_v1", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv))

    def forward(self, v1, v2, y, idx):
        K, T = int(self.params[0].item()), self.params[1].item()
        Z_v1, Z_v2, momentum = self.params[2].item(), self.params[3].item(), self.params[4].item()
        B, D = v1.size(0), self.memory_v1.size(1)
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(B, K + 1, D)
        out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(B, D, 1)), T))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(B, K + 1, D)
        out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(B, D, 1)), T))
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * self.n_data
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * self.n_data
            Z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()
        with torch.no_grad():
            for mem, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(mem, 0, y.view(-1))
                pos.mul_(momentum).add_(torch.mul(v, 1 - momentum))
                mem.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2


def contrast_loss(x, n_data, eps=1e-7):
    """RepDistiller crd/criterion.py ContrastLoss."""
    bsz, m = x.shape[0], x.size(1) - 1
    Pn = 1. / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


def features(model, x):
    """The pooled penultimate embedding feat[-1] and the logits (the is_feat
    path of RepDistiller's models)."""
    feats, logits = model(x, is_feat=True)
    return feats[-1], logits


def crd_draws(labels, n, batch, K, count, seed=3):
    """count draws of (batch, K+1) indices as CIFAR100InstanceSample makes
    them in "exact" mode: image i, then K distinct images of other classes."""
    import numpy as np
    rng = np.random.default_rng(seed)
    lab = labels.numpy()
    out = []
    for _ in range(count):
        rows = []
        for i in range(batch):
            neg = np.nonzero(lab != lab[i])[0]
            rows.append(np.hstack(([i], rng.choice(neg, K, replace=False))))
        out.append(torch.from_numpy(np.stack(rows)).long())
    return out


def onednn_conv_impls(step):
    """Runs step() once with oneDNN's verbose mode on and returns the distinct
    implementations of the convolutions it executed, per kind."""
    names = {"fwd": set(), "bwd_data": set(), "bwd_weights": set()}
    kinds = {"forward_training": "fwd", "forward_inference": "fwd", "forward": "fwd",
             "backward_data": "bwd_data", "backward_weights": "bwd_weights"}
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                step()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        text = f.read().decode("utf-8", "replace")
    for line in text.splitlines():
        # onednn_verbose,exec,cpu,convolution,IMPL,PROP_KIND,... (oneDNN 2.x)
        fs = line.split(",")
        if (len(fs) > 5 and fs[0].endswith("_verbose") and fs[1] == "exec"
                and fs[3] == "convolution" and fs[5] in kinds):
            names[kinds[fs[5]]].add(fs[4])
    return {k: "+".join(sorted(v)) for k, v in names.items()}


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
    ap.add_argument("--method", default="kd", choices=("kd", "crd"))
    ap.add_argument("--n-train", type=int, default=0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    ap.add_argument("--no-impls", action="store_true")
    a = ap.parse_args()
    a.n_train = max(a.n_train, a.batch)

    rss_start = peak_rss_mib()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    fmt = torch.channels_last if a.layout == "channels_last" else torch.contiguous_format
    student = MODELS[a.model](a.classes)
    fwd = forward_flops_per_image(student, a.size)
    student = student.to(memory_format=fmt)
    teacher = None
    t_fwd = 0
    if a.mode == "kd":
        teacher = MODELS[a.teacher](a.classes)
        t_fwd = forward_flops_per_image(teacher, a.size)
        teacher = teacher.to(memory_format=fmt).eval()
    flops_img = fwd if a.mode == "infer" else 3 * fwd + t_fwd

    g = torch.Generator().manual_seed(7)
    x = (torch.rand(a.batch, 3, a.size, a.size, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch,), generator=g)
    params = list(student.parameters())
    crd = a.mode == "kd" and a.method == "crd"
    if crd:
        # Training-set labels: the batch's, then j mod classes (as bench_train_step).
        labels = torch.cat([y, torch.arange(a.batch, a.n_train) % a.classes])
        with torch.no_grad():
            fs, _ = features(student, x[:2])
            ft, _ = features(teacher, x[:2])
        embed_s, embed_t = Embed(fs.shape[1]), Embed(ft.shape[1])
        contrast = ContrastMemory(128, a.n_train)
        params += list(embed_s.parameters()) + list(embed_t.parameters())
        draws = crd_draws(labels, a.n_train, a.batch, 16384, a.warmup + a.repeats * a.steps + 1)
        index = torch.arange(a.batch)
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=5e-4)

    def amp():
        """The forward passes' precision context: autocast to bf16, or nothing."""
        if a.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if a.mode == "infer":
        student.eval()

        def step():
            with torch.no_grad(), amp():
                student(x)
    else:
        student.train()

        def forward_loss():
            if crd:
                with torch.no_grad():
                    ft, t = features(teacher, x)
                fs, s = features(student, x)
                out_v1, out_v2 = contrast(embed_s(fs), embed_t(ft), index, draws.pop())
                return F.cross_entropy(s, y) + 0.8 * (contrast_loss(out_v1, a.n_train) +
                                                      contrast_loss(out_v2, a.n_train)).squeeze()
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
            s = student(x)
            if teacher is not None:
                return 0.1 * F.cross_entropy(s, y) + 0.9 * distill_kl(s, t, 4.0)
            return F.cross_entropy(s, y)

        def step():
            with amp():
                loss = forward_loss()
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
    impls = None if a.no_impls else onednn_conv_impls(step)
    print(json.dumps({
        "framework": "pytorch", "method": a.method if a.mode == "kd" else "none", "n_train": a.n_train,
        "model": a.model, "teacher": a.teacher if a.mode == "kd" else None,
        "mode": a.mode, "layout": a.layout, "precision": a.precision,
        "backend": "torch " + torch.__version__,
        "batch": a.batch, "threads": torch.get_num_threads(), "classes": a.classes, "size": a.size,
        "warmup": a.warmup, "repeats": a.repeats, "steps": a.steps,
        "img_s_median": round(med, 2), "img_s_min": round(min(ips), 2), "img_s_max": round(max(ips), 2),
        "flops_per_image": flops_img, "fwd_flops_per_image": fwd,
        "gflops_median": round(med * flops_img * 1e-9, 3), "gflops_max": round(max(ips) * flops_img * 1e-9, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_start_mib": round(rss_start, 1),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default"),
        "blas": blas_library(), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "default"),
        **({"impls": impls} if impls is not None else {}),
    }))


if __name__ == "__main__":
    main()
