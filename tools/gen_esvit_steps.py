#!/usr/bin/python3
"""Writes tests/fixtures/esvit_steps.safetensors: three training steps of
EsViT (and DINO) with a tiny Swin student and its EMA teacher, in PyTorch,
for tests/test_esvit_steps.c.

Usage:
    /usr/bin/python3 tools/gen_esvit_steps.py tests/fixtures

The step is the official one (microsoft/esvit main_esvit.py train_one_epoch,
facebookresearch/dino main_dino.py train_one_epoch), one process:

    lr, wd = lr_schedule[it], wd_schedule[it]   (wd on the regularised group:
             utils.get_params_groups, every tensor but biases and 1-d ones)
    teacher_output = teacher(images[:2])        (2 global crops, no grad)
    student_output = student(images)            (one forward per resolution)
    loss = DDINOLoss / DINOLoss(student_output, teacher_output, epoch)
           (the centres are updated inside, from this step's teacher outputs,
           after the loss used the old ones)
    loss.backward()
    utils.clip_gradients(student, clip_grad)    (each tensor's grad norm <= 3)
    utils.cancel_gradients_last_layer(epoch, student, freeze_last_layer)
           (grad None: AdamW skips the tensor, its state and its decay)
    optimizer.step()                            (torch.optim.AdamW)
    teacher <- m teacher + (1 - m) student      (every parameter, m =
           momentum_schedule[it], cosine momentum_teacher -> 1)

with the loss terms of tools/distill_refs/dino_common.py (view_loss,
region_loss: the same code tests/test_distill.c's fixture comes from).

Networks: torchvision's SwinTransformer with kd's swin_mnist settings (patch
2, embed 64, depths 2-4, heads 2-4, window 7, 10 classes) and a 1-channel
patch conv, as tools/gen_swin_fixtures.py, stochastic depth 0 (the official
teacher has none: EsViT builds it with drop_path_rate 0.0; the student's
would draw random masks, so the test runs kd's student without it too);
region tokens = the last normed map (N, 7, 7, 128) as (N 49, 128) rows,
pooled = their mean; the classifier "head" of torchvision's model (kd's
swin_mnist has it too) is not used, and not compared: the official networks
have none (EsViT replaces it by the DINO head), and kd's optimiser decays it
(its gradient tensor exists, zero) where torch skips a tensor without a
gradient. DINO heads (dino_common.Head): out_dim 32, hidden 16,
bottleneck 8. The teacher is a deep copy of the student (backbone and heads).

Initial values, on both sides (the C test regenerates them bit for bit):
every float tensor named n (kd's / torchvision's state_dict names; the
teacher heads take their student head's values) from generated_weight(key(n),
shape, fan_in) of tools/gen_imagenet_fixtures.py, key(n) = 32-bit FNV-1a of
the name's bytes:
    last_layer.weight_g                 1
    *.relative_position_bias_table      fan_in 300 (U(-0.1, 0.1))
    other tensors of >= 2 dimensions    fan_in = prod(shape[1:])
    1-d *.weight (LayerNorm)            1 + 0.1 * generated (fan_in 3)
    other 1-d tensors (biases)          0.1 * generated (fan_in 3)
centres 0. The views of step s (1-based), view v: generated_weight(
key("step<s>.view<v>"), (B, 1, side, side), fan_in=3), U(-1, 1): 2 global
crops of 28x28, then the local crops of 12x12.

Schedule: steps_per_epoch 2, epochs 2 (4 iterations), the 3 steps are
(epoch 0, it 0), (epoch 0, it 1), (epoch 1, it 2): teacher temperature 0.04
then 0.07 (warmup_teacher_temp_epochs 2), last layers held in epoch 0
(freeze_last_layer 1) and first updated at step 3 (AdamW step 1 for them),
lr cosine 5e-3 -> 1e-5 per iteration (utils.cosine_scheduler, no warm-up),
wd cosine 0.04 -> 0.4, teacher momentum cosine 0.9 -> 1 (0.9 rather than
0.996 so that the teacher's moves are well above float32 rounding).

Stored, per method M (esvit: norm_last_layer 1; dino: norm_last_layer 0, so
weight_g is trained, decayed and averaged) and step s:
    M.step<s>.terms       (T) the loss terms (esvit_view, esvit_region | dino)
    M.step<s>.center      (1, 32) dino_loss.center after the step
    M.step<s>.center_grid (1, 32) (esvit)
    M.step<s>.proj        (P, 2) for every tensor p of the list "names" in
                          the metadata: dot(p - p0, R_p) and ||p - p0||, p0
                          its initial value, R_p = generated_weight(
                          key("proj." + n), shape, fan_in=3) with n the
                          student's name of the tensor (so a teacher tensor
                          and its student share R); for attn.qkv.bias
                          without its middle third, the key bias, whose
                          gradient is exactly 0 (adding a constant to every
                          key's logit leaves the softmax unchanged): float
                          rounding leaves a gradient of ~1e-9, which AdamW
                          turns into moves of up to ~lr / 10 in float32
                          (PyTorch's own float32 run moves these 9% off
                          its float64 run), without effect on anything else
computed in float64 from the float32 initial values; and the float32 run's
spread (the same steps in float32, PyTorch's own rounding): per step the
largest relative deviation of the terms, of the centres (relative to their
largest element) and of the projections (relative to ||p - p0||, over the
tensors that moved), in the metadata "f32_spread".
Metadata "M": JSON {"args", "names", "steps", "batch", "global", "local",
"views", "lr", "min_lr", "weight_decay", "weight_decay_end",
"steps_per_epoch", "epochs", "epoch_of_step", "it_of_step", "terms",
"f32_spread"}. Names: "student.<n>" the student backbone, "teacher.<n>" its
EMA copy, "distill.<n>" the method's tensors (heads, teacher heads).
"""

import copy
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.swin_transformer import SwinTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_imagenet_fixtures import generated_weight  # noqa: E402
from st_io import save_safetensors  # noqa: E402
from distill_refs import dino_common as dc  # noqa: E402

B, L, GLOBAL, LOCAL = 2, 2, 28, 12
STEPS, STEPS_PER_EPOCH, EPOCHS = 3, 2, 2
LR, MIN_LR, WD, WD_END = 5e-3, 1e-5, 0.04, 0.4
CLIP = 3.0
COMMON = dict(out_dim=32, hidden=16, bottleneck=8, momentum_teacher=0.9, warmup_teacher_temp=0.04,
              teacher_temp=0.07, warmup_teacher_temp_epochs=2, student_temp=0.1, center_momentum=0.9,
              freeze_last_layer=1, local_crops_number=L, clip_grad=CLIP)
METHODS = {"esvit": dict(COMMON, norm_last_layer=1), "dino": dict(COMMON, norm_last_layer=0)}
SWIN = dict(patch_size=[2, 2], embed_dim=64, depths=[2, 4], num_heads=[2, 4], window_size=[7, 7],
            stochastic_depth_prob=0.0, num_classes=10)


def key(name):
    """32-bit FNV-1a of the name's bytes."""
    h = 2166136261
    for b in name.encode("utf-8"):
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def init_value(name, shape):
    """The initial float32 value of tensor `name` (see the module comment)."""
    base = name[len("teacher_"):] if name.startswith("teacher_") else name
    k = key(base)
    if base.endswith("last_layer.weight_g"):
        return torch.ones(shape, dtype=torch.float32)
    if base.endswith("relative_position_bias_table"):
        return generated_weight(k, shape, fan_in=300)
    if len(shape) >= 2:
        return generated_weight(k, shape)
    u = generated_weight(k, shape, fan_in=3).numpy()
    if base.endswith(".weight"):
        return torch.from_numpy((np.float32(1.0) + np.float32(0.1) * u).astype(np.float32))
    return torch.from_numpy((np.float32(0.1) * u).astype(np.float32))


def cosine(base, final, it, total):
    """utils.cosine_scheduler(base, final, epochs, niter)[it] without warm-up."""
    iters = np.arange(total)
    return float((final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))))[it])


class Head(nn.Module):
    """DINOHead (use_bn False, 3 layers) with kd's / DINOHead's names: mlp.{0,2,4},
    last_layer.weight_g (a parameter when trained, else fixed), weight_v."""

    def __init__(self, d, a):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, a["hidden"]), nn.GELU(), nn.Linear(a["hidden"], a["hidden"]), nn.GELU(),
                                 nn.Linear(a["hidden"], a["bottleneck"]))
        self.last_layer = nn.Module()
        self.last_layer.weight_v = nn.Parameter(torch.zeros(a["out_dim"], a["bottleneck"]))
        self.last_layer.weight_g = nn.Parameter(torch.ones(a["out_dim"], 1),
                                                requires_grad=not a["norm_last_layer"])

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return F.linear(x, torch._weight_norm(self.last_layer.weight_v, self.last_layer.weight_g, 0))


class Net(nn.Module):
    """The student (or teacher): Swin backbone, DINO head, dense head (esvit)."""

    def __init__(self, a, region):
        super().__init__()
        self.backbone = SwinTransformer(**SWIN)
        e = self.backbone.features[0][0]
        self.backbone.features[0][0] = nn.Conv2d(1, e.out_channels, e.kernel_size, e.stride)
        self.head = Head(128, a)
        self.head_dense = Head(128, a) if region else None

    def maps(self, x):
        """The last normed map (N, H, W, C) and the pooled (N, C)."""
        m = self.backbone.norm(self.backbone.features(x))
        return m, m.mean(dim=(1, 2))

    def kd_named(self, teacher):
        """(kd's name, tensor) of every float tensor: "student.<n>" / "teacher.<n>"
        for the backbone, "distill.[teacher_]head[_dense].<n>" for the heads."""
        out = []
        for n, t in self.backbone.state_dict(keep_vars=True).items():
            if t.is_floating_point() and not n.startswith("head."):  # the classifier: see the comment
                out.append((("teacher." if teacher else "student.") + n, n, t))
        heads = [("head", self.head)] + ([("head_dense", self.head_dense)] if self.head_dense is not None else [])
        for hn, h in heads:
            for n, t in h.state_dict(keep_vars=True).items():
                sn = f"{hn}.{n}"
                out.append(("distill." + ("teacher_" if teacher else "") + sn, sn, t))
        return out


def views(step, dtype):
    out = []
    for v in range(2 + L):
        side = GLOBAL if v < 2 else LOCAL
        out.append(generated_weight(key(f"step{step}.view{v}"), (B, 1, side, side), fan_in=3).to(dtype))
    return out


def tokens(m):
    return m.reshape(-1, m.shape[-1])


def run(method, dtype):
    a = dict(METHODS[method])
    region = method == "esvit"
    torch.manual_seed(0)
    student = Net(a, region)
    with torch.no_grad():
        for kn, sn, t in student.kd_named(False):
            t.copy_(init_value(sn, tuple(t.shape)))
    student = student.to(dtype)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    p0 = {kn: t.detach().clone() for kn, sn, t in student.kd_named(False) + teacher.kd_named(True)}
    # utils.get_params_groups: regularised = not a bias and not 1-d.
    reg, noreg = [], []
    for n, p in student.named_parameters():
        if not p.requires_grad:
            continue
        (noreg if n.endswith(".bias") or len(p.shape) == 1 else reg).append(p)
    opt = torch.optim.AdamW([{"params": reg}, {"params": noreg, "weight_decay": 0.0}], lr=LR)
    K = a["out_dim"]
    center = torch.zeros(1, K, dtype=dtype)
    center_grid = torch.zeros(1, K, dtype=dtype)
    total = EPOCHS * STEPS_PER_EPOCH
    V = 2 + L
    out = []
    for s in range(1, STEPS + 1):
        it = s - 1
        epoch = it // STEPS_PER_EPOCH
        for i, g in enumerate(opt.param_groups):
            g["lr"] = cosine(LR, MIN_LR, it, total)
            if i == 0:
                g["weight_decay"] = cosine(WD, WD_END, it, total)
        x = views(s, dtype)
        with torch.no_grad():
            tm, tp = teacher.maps(torch.cat(x[:2]))
            t_cls = teacher.head(tp)
            t_fea = tokens(tm)
            t_region = teacher.head_dense(t_fea) if region else None
        gm, gp = student.maps(torch.cat(x[:2]))
        lm, lp = student.maps(torch.cat(x[2:]))
        s_cls = student.head(torch.cat((gp, lp)))
        if region:
            s_fea = torch.cat((tokens(gm), tokens(lm)))
            s_region = student.head_dense(s_fea)
            view, n = dc.view_loss(s_cls, t_cls, center, a, epoch, V, 0.5)
            reg_sum = dc.region_loss(s_region, s_fea, [gm.shape[1] * gm.shape[2], lm.shape[1] * lm.shape[2]],
                                     t_region, t_fea, [tm.shape[1] * tm.shape[2]], center_grid, a, epoch, V)
            terms = [view / n, reg_sum / n]
        else:
            view, n = dc.view_loss(s_cls, t_cls, center, a, epoch, V, 1.0)
            terms = [view / n]
        loss = sum(terms)
        # DINOLoss.update_center, inside the loss call (after the loss used the old centre)
        center = dc.update_center(center, t_cls, a["center_momentum"])
        if region:
            center_grid = dc.update_center(center_grid, t_region, a["center_momentum"])
        opt.zero_grad()
        loss.backward()
        for p in student.parameters():  # utils.clip_gradients
            if p.grad is not None:
                pn = p.grad.data.norm(2)
                cc = CLIP / (pn + 1e-6)
                if cc < 1:
                    p.grad.data.mul_(cc)
        if epoch < a["freeze_last_layer"]:  # utils.cancel_gradients_last_layer
            for n_, p in student.named_parameters():
                if "last_layer" in n_:
                    p.grad = None
        opt.step()
        m = cosine(a["momentum_teacher"], 1.0, it, total)
        with torch.no_grad():
            for pq, pk in zip(student.parameters(), teacher.parameters()):
                pk.data.mul_(m).add_((1 - m) * pq.detach().data)
        rec = {"terms": [float(t) for t in terms], "center": center.double().clone(),
               "center_grid": center_grid.double().clone(), "proj": [], "names": []}
        for kn, sn, t in student.kd_named(False) + teacher.kd_named(True):
            d = (t.detach() - p0[kn]).double()
            R = generated_weight(key("proj." + sn), tuple(t.shape), fan_in=3).double()
            if sn.endswith("attn.qkv.bias"):  # the key bias: no gradient (see the module comment)
                C = t.shape[0] // 3
                d[C:2 * C] = 0
            rec["names"].append(kn)
            rec["proj"].append([float((d * R).sum()), float(d.norm())])
        out.append(rec)
    return out


def spread(r64, r32):
    """Per step: the float32 run's largest relative deviations from float64."""
    sp = {"terms": [], "center": [], "proj": []}
    for a64, a32 in zip(r64, r32):
        sp["terms"].append(max(abs(x - y) / abs(x) for x, y in zip(a64["terms"], a32["terms"])))
        c = 0.0
        for k in ("center", "center_grid"):
            scale = float(a64[k].abs().max())
            if scale > 0:
                c = max(c, float((a64[k] - a32[k]).abs().max()) / scale)
        sp["center"].append(c)
        p = 0.0
        for (d64, n64), (d32, n32) in zip(a64["proj"], a32["proj"]):
            if n64 > 0:
                p = max(p, abs(d64 - d32) / n64, abs(n64 - n32) / n64)
        sp["proj"].append(p)
    return sp


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_esvit_steps.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(1)
    import torchvision
    tensors = {}
    meta = {"generator": "tools/gen_esvit_steps.py", "torch": torch.__version__,
            "torchvision": torchvision.__version__, "methods": ",".join(METHODS)}
    for method, a in METHODS.items():
        r64 = run(method, torch.float64)
        r32 = run(method, torch.float32)
        sp = spread(r64, r32)
        for s, rec in enumerate(r64, 1):
            tensors[f"{method}.step{s}.terms"] = torch.tensor(rec["terms"], dtype=torch.float64).float()
            tensors[f"{method}.step{s}.center"] = rec["center"].float()
            if method == "esvit":
                tensors[f"{method}.step{s}.center_grid"] = rec["center_grid"].float()
            tensors[f"{method}.step{s}.proj"] = torch.tensor(rec["proj"], dtype=torch.float64).float()
            print(f"{method} step {s}: terms {rec['terms']}, f32 spread terms {sp['terms'][s - 1]:.2g} "
                  f"centres {sp['center'][s - 1]:.2g} projections {sp['proj'][s - 1]:.2g}")
        args = {k: str(v) for k, v in a.items() if k != "clip_grad"}
        args["clip_grad"] = str(CLIP)
        meta[method] = json.dumps({
            "args": args, "names": r64[0]["names"], "steps": STEPS, "batch": B, "global": GLOBAL,
            "local": LOCAL, "views": 2 + L, "lr": LR, "min_lr": MIN_LR, "weight_decay": WD,
            "weight_decay_end": WD_END, "steps_per_epoch": STEPS_PER_EPOCH, "epochs": EPOCHS,
            "terms": ["esvit_view", "esvit_region"] if method == "esvit" else ["dino"],
            "f32_spread": sp}, separators=(",", ":"))
    p = os.path.join(outdir, "esvit_steps.safetensors")
    n = save_safetensors(p, tensors, meta)
    print(f"{p}: {len(tensors)} tensors, {n} bytes")


if __name__ == "__main__":
    main()
