#!/usr/bin/python3
"""Generates tests/fixtures/optim.safetensors: step-by-step references for
kd_optim (src/optim/optim.c) and kd_sched (src/optim/sched.c).

Usage:
    /usr/bin/python3 tools/gen_optim_fixtures.py tests/fixtures

References:
  - SGD:    torch.optim.SGD (momentum, dampening 0, Nesterov, L2 weight decay
            added to the gradient; the momentum buffer starts as the first
            step's decayed gradient).
  - AdamW:  torch.optim.AdamW (decoupled weight decay p *= 1 - lr * wd before
            the moment updates; bias corrections from the step count).
  - LARS:   SimCLR's tf2/lars_optimizer.py (classic momentum), written below
            in torch float32 operations (norms in float64) from METHODS.md section 13: the weight
            decay is added to the gradient first, then the trust ratio
            eta * ||w|| / ||g|| uses that decayed gradient (1 when either norm
            is 0); v = m * v + lr * trust * g; Nesterov: update = m * v +
            lr * trust * g, else update = v; w -= update. Tensors excluded from
            weight decay are excluded from the adaptation too (SimCLR passes
            one exclude list for both), so they get trust 1 and no decay.
  - clip:   torch.nn.utils.clip_grad_norm_ over the parameters of every group,
            before the optimiser step.
  - kd_sched cosine with warm-up: SimCLR's WarmUpAndCosineDecay
            (tf2/model.py), per step: lr = base * step / warmup_steps while
            step < warmup_steps (so the first step runs at lr 0), then
            min_lr + (base - min_lr) * (1 + cos(pi * (step - warmup_steps) /
            (total_steps - warmup_steps))) / 2, which with min_lr 0 is
            SimCLR's CosineDecay and with min_lr > 0 DINO's cosine_scheduler
            (utils.py) with final_value = min_lr. Steps count from 0 over the
            whole run (epoch * steps_per_epoch + step).

kd side: two parameter groups, prefix "" with lr_scale 1 and prefix "distill."
with lr_scale 0.5 (torch: one param_group per kd group with lr * lr_scale;
with no_decay_norm_bias, each kd group splits into a decaying group and one
with weight_decay 0 for the KD_PARAM_NO_DECAY tensors). Parameters:
    group 0: conv.weight (4, 3, 3, 3) KD_PARAM_WEIGHT, bn.weight (4,)
             KD_PARAM_NO_DECAY, bn.running_mean (4,) KD_PARAM_BUFFER (never
             touched, no state)
    group 1: regressor.weight (5, 4) KD_PARAM_WEIGHT, regressor.bias (5,)
             KD_PARAM_NO_DECAY

Contents (all F32):
    init.<param>                     initial values
    grad<k>.<param>                  the gradient fed before step k (k = 1..STEPS)
    <case>.step<k>.<param>           parameters after step k
    <case>.step<k>.<state>           optimiser state after step k, named as
                                     kd_optim_state_get names it:
                                     "<prefix><param>.momentum_buffer" (SGD,
                                     LARS), ".exp_avg" and ".exp_avg_sq" (AdamW)
    <case>.norm                      (STEPS,) total gradient norm that
                                     clip_grad_norm_ returned (clip cases)
    sched.<name>.lr                  (epochs * steps_per_epoch,) learning rates
Metadata:
    cases            comma-separated case names
    case.<case>      "key=value ..." of the kd_optim_cfg (kind, lr, momentum,
                     dampening, nesterov, weight_decay, beta1, beta2, eps,
                     trust_coef, no_decay_norm_bias, clip_grad_norm) plus
                     "lrs=a,b,c" when the learning rate changes between steps
                     (kd_optim_set_lr before step k with the k-th value)
    scheds           comma-separated schedule case names
    sched.<name>     "base_lr=... min_lr=... epochs=... warmup_epochs=...
                     steps_per_epoch=..."
    steps, params, torch
The hyperparameters are Python floats (doubles), as torch receives them; the
C test parses the same text with strtod.
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_io import save_safetensors  # noqa: E402

STEPS = 6

# name, shape, kind ("w": KD_PARAM_WEIGHT, "nd": KD_PARAM_NO_DECAY, "buf": KD_PARAM_BUFFER), group
PARAMS = [
    ("conv.weight", (4, 3, 3, 3), "w", 0),
    ("bn.weight", (4,), "nd", 0),
    ("bn.running_mean", (4,), "buf", 0),
    ("regressor.weight", (5, 4), "w", 1),
    ("regressor.bias", (5,), "nd", 1),
]
GROUPS = [("", 1.0), ("distill.", 0.5)]

DEFAULTS = dict(kind="sgd", lr=0.1, momentum=0.0, dampening=0.0, nesterov=0, weight_decay=0.0, beta1=0.9,
                beta2=0.999, eps=1e-8, trust_coef=1e-3, no_decay_norm_bias=0, clip_grad_norm=0.0)

CASES = [
    ("sgd", dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)),
    ("sgd_nesterov", dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=1)),
    ("sgd_nodecay", dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, no_decay_norm_bias=1)),
    ("sgd_nesterov_nodecay", dict(kind="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=1,
                                  no_decay_norm_bias=1)),
    ("sgd_lr_change", dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
     [0.1, 0.05, 0.2, 0.01, 0.3, 0.1]),
    ("sgd_clip", dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, clip_grad_norm=0.1)),
    ("adamw", dict(kind="adamw", lr=0.01, weight_decay=0.05)),
    ("adamw_nodecay", dict(kind="adamw", lr=0.01, weight_decay=0.05, no_decay_norm_bias=1)),
    ("adamw_lr_change", dict(kind="adamw", lr=0.01, weight_decay=0.05, no_decay_norm_bias=1),
     [0.01, 0.02, 0.005, 0.0, 0.01, 0.03]),
    ("lars", dict(kind="lars", lr=0.5, momentum=0.9, weight_decay=0.05, trust_coef=1e-3)),
    ("lars_nodecay", dict(kind="lars", lr=0.5, momentum=0.9, weight_decay=0.05, trust_coef=1e-3,
                          no_decay_norm_bias=1)),
    ("lars_nesterov_nodecay", dict(kind="lars", lr=0.5, momentum=0.9, weight_decay=0.05, trust_coef=1e-3,
                                   nesterov=1, no_decay_norm_bias=1)),
]

SCHEDS = [
    ("cosine_warmup", dict(base_lr=0.3, min_lr=0.0, epochs=6, warmup_epochs=2, steps_per_epoch=5)),
    ("cosine_warmup_floor", dict(base_lr=1.0, min_lr=1e-3, epochs=5, warmup_epochs=1, steps_per_epoch=7)),
    ("cosine", dict(base_lr=0.05, min_lr=0.0, epochs=4, warmup_epochs=0, steps_per_epoch=3)),
]


def make_data():
    g = torch.Generator().manual_seed(1234)
    init, grads = {}, []
    for name, shape, kind, _ in PARAMS:
        if name == "bn.weight":
            init[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            init[name] = torch.empty(shape).uniform_(-1.0, 1.0, generator=g)
    # Gradients of varying scale; the LARS cases need |g| comparable to
    # wd * |w| so that adding the decay before the trust ratio matters.
    scales = [0.05, 1.0, 0.02, 3.0, 0.3, 0.01]
    for k in range(STEPS):
        gk = {}
        for name, shape, kind, _ in PARAMS:
            if kind != "buf":
                gk[name] = scales[k] * torch.randn(shape, generator=g)
        grads.append(gk)
    return init, grads


def lars_step(params, cfg, lr_of, state):
    """SimCLR tf2/lars_optimizer.py, classic momentum; the updates in float32."""
    m = cfg["momentum"]
    for name, p in params.items():
        kind = dict((n, k) for n, _, k, _ in PARAMS)[name]
        excluded = cfg["no_decay_norm_bias"] and kind == "nd"
        grad = p.grad.clone()
        if cfg["weight_decay"] and not excluded:
            grad = grad + cfg["weight_decay"] * p.detach()
        # The norms and the trust ratio in float64 (TF reduces in float32:
        # that only adds float32 summation noise), then one rounding of
        # lr * trust to float32, the precision of the update itself.
        trust = 1.0
        if not excluded:
            w_norm = float(torch.linalg.vector_norm(p.detach().double()))
            g_norm = float(torch.linalg.vector_norm(grad.double()))
            if w_norm > 0 and g_norm > 0:
                trust = cfg["trust_coef"] * w_norm / g_norm
        scaled_lr = torch.tensor(lr_of[name] * trust, dtype=torch.float32)
        v = state.setdefault(name, torch.zeros_like(p))
        next_v = m * v + scaled_lr * grad
        update = m * next_v + scaled_lr * grad if cfg["nesterov"] else next_v
        with torch.no_grad():
            p.sub_(update)
        state[name] = next_v


def run_case(cname, cfg, lrs, init, grads, out):
    params = {n: init[n].clone().requires_grad_(True) for n, _, k, _ in PARAMS if k != "buf"}
    kind_of = {n: k for n, _, k, _ in PARAMS}
    group_of = {n: gi for n, _, _, gi in PARAMS}
    # torch param groups: one per kd group, split by decay when asked.
    tgroups = []
    for gi, (prefix, scale) in enumerate(GROUPS):
        names = [n for n in params if group_of[n] == gi]
        if cfg["no_decay_norm_bias"]:
            dec = [n for n in names if kind_of[n] != "nd"]
            nod = [n for n in names if kind_of[n] == "nd"]
            parts = [(dec, cfg["weight_decay"]), (nod, 0.0)]
        else:
            parts = [(names, cfg["weight_decay"])]
        for ns, wd in parts:
            if ns:
                tgroups.append(dict(params=[params[n] for n in ns], lr=cfg["lr"] * scale, weight_decay=wd,
                                    scale=scale))
    kind = cfg["kind"]
    if kind == "sgd":
        opt = torch.optim.SGD(tgroups, lr=cfg["lr"], momentum=cfg["momentum"], dampening=cfg["dampening"],
                              nesterov=bool(cfg["nesterov"]))
    elif kind == "adamw":
        opt = torch.optim.AdamW(tgroups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"])
    else:
        opt = None
    lars_state = {}
    norms = []
    for k in range(STEPS):
        lr = lrs[k] if lrs else cfg["lr"]
        if opt is not None:
            for tg in opt.param_groups:
                tg["lr"] = lr * tg["scale"]
        for n, p in params.items():
            p.grad = grads[k][n].clone()
        if cfg["clip_grad_norm"] > 0:
            tn = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg["clip_grad_norm"])
            norms.append(float(tn))
        if opt is not None:
            opt.step()
        else:
            lr_of = {n: lr * GROUPS[group_of[n]][1] for n in params}
            lars_step(params, cfg, lr_of, lars_state)
        for n, p in params.items():
            out[f"{cname}.step{k + 1}.{n}"] = p.detach().clone()
            prefix = GROUPS[group_of[n]][0]
            if kind == "sgd" and cfg["momentum"] > 0:
                out[f"{cname}.step{k + 1}.{prefix}{n}.momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
            elif kind == "adamw":
                out[f"{cname}.step{k + 1}.{prefix}{n}.exp_avg"] = opt.state[p]["exp_avg"].clone()
                out[f"{cname}.step{k + 1}.{prefix}{n}.exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone()
            elif kind == "lars" and cfg["momentum"] > 0:
                out[f"{cname}.step{k + 1}.{prefix}{n}.momentum_buffer"] = lars_state[n].clone()
    if norms:
        out[f"{cname}.norm"] = torch.tensor(norms, dtype=torch.float32)
        # The case must actually clip at every step.
        assert all(n > cfg["clip_grad_norm"] for n in norms), norms


def sched_lr(s, g):
    """SimCLR WarmUpAndCosineDecay with a floor (DINO's final_value), step g from 0."""
    spe = s["steps_per_epoch"]
    warm = s["warmup_epochs"] * spe
    total = s["epochs"] * spe
    base, floor = s["base_lr"], s["min_lr"]
    if g < warm:
        return base * g / warm
    span = total - warm
    u = min(g - warm, span) / span if span > 0 else 1.0
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * u))


def fmt(v):
    return repr(v) if isinstance(v, float) else str(v)


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    torch.set_num_threads(1)
    init, grads = make_data()
    out = {}
    for n, t in init.items():
        out[f"init.{n}"] = t
    for k, gk in enumerate(grads):
        for n, t in gk.items():
            out[f"grad{k + 1}.{n}"] = t
    meta = {"steps": str(STEPS), "torch": torch.__version__,
            "params": ",".join(f"{n}:{k}:{gi}" for n, _, k, gi in PARAMS)}
    names = []
    for case in CASES:
        cname, over = case[0], case[1]
        lrs = case[2] if len(case) > 2 else None
        cfg = dict(DEFAULTS)
        cfg.update(over)
        run_case(cname, cfg, lrs, init, grads, out)
        text = " ".join(f"{k}={fmt(v)}" for k, v in cfg.items())
        if lrs:
            text += " lrs=" + ",".join(fmt(x) for x in lrs)
        meta[f"case.{cname}"] = text
        names.append(cname)
    meta["cases"] = ",".join(names)
    snames = []
    for sname, s in SCHEDS:
        total = s["epochs"] * s["steps_per_epoch"]
        out[f"sched.{sname}.lr"] = torch.tensor([sched_lr(s, g) for g in range(total)], dtype=torch.float32)
        meta[f"sched.{sname}"] = " ".join(f"{k}={fmt(v)}" for k, v in s.items())
        snames.append(sname)
    meta["scheds"] = ",".join(snames)
    path = os.path.join(outdir, "optim.safetensors")
    n = save_safetensors(path, out, meta)
    print(f"{path}: {len(out)} tensors, {n} bytes, {len(names)} optimiser cases, {len(snames)} schedules")


if __name__ == "__main__":
    main()
