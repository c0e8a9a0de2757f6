#!/usr/bin/python3
"""Generates tests/fixtures/distill_steps.safetensors: five full distillation
steps, teacher resnet20 -> student resnet8 (RepDistiller's CIFAR ResNets, the
PyTorch definitions of tools/gen_zoo_fixtures.py), for several methods, that
tests/test_distill_steps.c replays through kd_train_step.

Usage:
    /usr/bin/python3 tools/gen_distill_steps.py tests/fixtures/distill_steps.safetensors [METHOD ...]

One step, as RepDistiller's train_student.py / helper/loops.py run it: the
teacher in eval mode without gradient, the student (and the method's modules)
in train mode; loss = gamma*CE + alpha*KL_T + beta*term with the method's
published weights (distill_refs/<m>.WEIGHTS) and its term from
distill_refs/<m>.term, the same reference tests/test_distill.c checks;
torch.optim.SGD(lr 0.05, momentum 0.9, weight decay 5e-4) over the student's
parameters and the method's module parameters (two groups, same settings).
Every step runs at epoch index 4 (0-based; the epoch the method sees, e.g.
DKD's warm-up factor): kd's test passes epoch 4 to kd_train_step.

The trajectory is computed in float64 from float32 initial values and
batches (the reference is then exact to far below kd's float32 error); the
same run in float32 is also made, and its largest deviation from float64 is
stored as metadata (the spread PyTorch's own float32 shows).

Contents (F32 unless noted; all methods share the models and batches):
    teacher.<name>            resnet20 (10 classes) state_dict: RepDistiller
                              init, then batch-norm weight U(0.75, 1.25), bias
                              N(0, 0.1) and running statistics from one
                              train-mode pass over a calibration batch
    student.<name>            resnet8 (10 classes) state_dict, RepDistiller init
    batch<k>.x, batch<k>.y    k = 1..5: (8, 3, 32, 32) ~ N(0, 1); (8) I64 labels
    <m>.param.<name>          the method's modules (kd's names) before step 1
    <m>.step<k>.idx           (I64) CRD: the contrast indices of step k
                              (B x (K+1), positive first), which kd's test
                              hands to the method in place of its sampler
    <m>.step<k>.term.<t>      0-d weighted terms "ce", "kl", "<m>" of step k
    <m>.step<k>.total         0-d sum of the terms
    <m>.final.<name>          the student's state_dict after step 5
    <m>.final.distill.<name>  the method's modules' state_dict after step 5
__metadata__: "methods" (comma-separated), "lr", "momentum", "weight_decay",
"steps", "epoch", "batch", "classes", "teacher", "student", "torch" and per
method "<m>" a JSON object with "weights", "args", "terms" (names in kd's
order) and "f32_spread": the same run in PyTorch float32 against float64,
"loss_rel" (per step, the relative deviation of the total) and "param_abs"
(the largest absolute deviation of any final student or method tensor).
The trajectories are well conditioned (random 1e-7 relative perturbations of
the float64 run's initial weights move the final parameters by ~3e-7), except
at discrete events: PyTorch's float32 AT run jumps from 2e-7 to 3e-5 at step 3
and ends 1.4e-3 off (a ReLU pre-activation that float32 rounding pushes across
zero, as tests/test_models.c describes), so the test widens its tolerances to
10x this spread where it exceeds the base ones.
"""
import copy
import importlib
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_io import save_safetensors  # noqa: E402
from gen_zoo_fixtures import build as build_zoo  # noqa: E402
from distill_refs.common import weighted_terms  # noqa: E402

METHODS = ["kd", "fitnet", "at", "dkd", "crd"]
# Settings a method takes on this small trajectory (40 images): CRD's
# negatives per sample.
ARGS = {"crd": {"nce_k": "16"}}
TEACHER, STUDENT = "resnet20", "resnet8"
STEPS, BATCH, CLASSES, EPOCH = 5, 8, 10, 4
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


def make_teacher():
    """resnet20 whose eval-mode batch norms keep activations normalised (as
    gen_zoo_fixtures.prepare does): random affine parameters, running
    statistics of one calibration batch."""
    torch.manual_seed(11)
    t = build_zoo(TEACHER, num_classes=CLASSES)
    bns = [m for m in t.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.75, 1.25)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None
        t.train()
        t(torch.randn(32, 3, 32, 32))
        for bn in bns:
            bn.momentum = 0.1
    t.eval()
    return t


def make_student():
    torch.manual_seed(12)
    return build_zoo(STUDENT, num_classes=CLASSES)


def make_batches():
    g = torch.Generator().manual_seed(13)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
            for _ in range(STEPS)]


def run(ref, teacher, student, mod, batches, case, dtype):
    """Five steps in `dtype` on copies of the models; returns the per-step
    terms (name -> float) and the final state_dicts."""
    teacher = copy.deepcopy(teacher).to(dtype).eval()
    student = copy.deepcopy(student).to(dtype).train()
    params = list(student.parameters())
    groups = [{"params": params}]
    if mod is not None:
        mod = copy.deepcopy(mod).to(dtype).train()
        groups.append({"params": list(mod.parameters())})
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    steps = []
    for k, (x, y) in enumerate(batches):
        x = x.to(dtype)
        # The step's dataset indices (batch k holds images k*B .. k*B+B-1)
        # and, for CRD, its draw of contrast indices.
        case["index"] = torch.arange(k * BATCH, (k + 1) * BATCH)
        if "draws" in case:
            case["idx"] = case["draws"][k]
        with torch.no_grad():
            t_feats, t_logits = teacher(x, is_feat=True)
        s_feats, s_logits = student(x, is_feat=True)
        terms = weighted_terms(ref, mod, case, s_feats, s_logits, t_feats, t_logits, y)
        total = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if hasattr(ref, "after_step"):  # CRD's bank update
            ref.after_step(mod, case)
        steps.append(({k: v.item() for k, v in terms.items()}, total.item()))
    s_sd = {k: v.detach().clone() for k, v in student.state_dict().items()}
    m_sd = {k: v.detach().clone() for k, v in mod.state_dict().items()} if mod is not None else {}
    return steps, s_sd, m_sd


def main():
    torch.set_num_threads(1)
    path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/distill_steps.safetensors"
    want = sys.argv[2:] or METHODS
    teacher, student, batches = make_teacher(), make_student(), make_batches()
    out, meta = {}, {}
    for k, v in teacher.state_dict().items():
        out[f"teacher.{k}"] = v.clone()
    for k, v in student.state_dict().items():
        out[f"student.{k}"] = v.clone()
    for i, (x, y) in enumerate(batches):
        out[f"batch{i + 1}.x"] = x
        out[f"batch{i + 1}.y"] = y.long()
    # The features' shapes for build(): one eval-mode forward of batch 1.
    with torch.no_grad():
        t_feats, t_logits = teacher(batches[0][0], is_feat=True)
        s_feats, s_logits = copy.deepcopy(student).eval()(batches[0][0], is_feat=True)
    done = []
    for name in want:
        ref = importlib.import_module(f"distill_refs.{name}")
        case = dict(name="steps", s_feats=list(s_feats), t_feats=list(t_feats), s_logits=s_logits,
                    t_logits=t_logits, labels=batches[0][1], args=dict(ARGS.get(name, {})), epoch=EPOCH,
                    training=1)
        case["train_labels"] = torch.cat([y for _, y in batches])
        if hasattr(ref, "draw"):  # CRD: a random draw per step, given to kd's test as <m>.step<k>.idx
            g = torch.Generator().manual_seed(21)
            case["draws"] = [ref.draw(case, torch.arange(k * BATCH, (k + 1) * BATCH), g) for k in range(STEPS)]
            for k, d in enumerate(case["draws"]):
                out[f"{name}.step{k + 1}.idx"] = d
        torch.manual_seed(100)
        mod = ref.build(case)
        if mod is not None:
            mod = mod.float()
            for k, v in mod.state_dict().items():
                out[f"{name}.param.{k}"] = v.clone()
        steps, s_sd, m_sd = run(ref, teacher, student, mod, batches, case, torch.float64)
        steps32, s_sd32, m_sd32 = run(ref, teacher, student, mod, batches, case, torch.float32)
        for k, (terms, total) in enumerate(steps):
            for t, v in terms.items():
                out[f"{name}.step{k + 1}.term.{t}"] = torch.tensor(v, dtype=torch.float32)
            out[f"{name}.step{k + 1}.total"] = torch.tensor(total, dtype=torch.float32)
        for k, v in s_sd.items():
            out[f"{name}.final.{k}"] = v.float() if v.is_floating_point() else v
        for k, v in m_sd.items():
            out[f"{name}.final.distill.{k}"] = v.float() if v.is_floating_point() else v
        # PyTorch float32 against float64: the spread of float32 arithmetic itself.
        loss_dev = [abs(a[1] - b[1]) / max(abs(b[1]), 1e-12) for a, b in zip(steps32, steps)]
        par_dev = 0.0
        for sd, sd32 in ((s_sd, s_sd32), (m_sd, m_sd32)):
            for k, v in sd.items():
                if v.is_floating_point():
                    par_dev = max(par_dev, (sd32[k].double() - v).abs().max().item())
        meta[name] = json.dumps(dict(weights=ref.WEIGHTS, args=case["args"], terms=list(steps[0][0].keys()),
                                     f32_spread=dict(loss_rel=loss_dev, param_abs=par_dev)), sort_keys=True)
        done.append(name)
        print(f"{name}: losses " + " ".join(f"{total:.6f}" for _, total in steps) +
              f"; torch float32 vs float64: loss rel {max(loss_dev):.2e}, params abs {par_dev:.2e}")
    meta.update({"methods": ",".join(done), "lr": str(LR), "momentum": str(MOMENTUM), "weight_decay": str(WD),
                 "steps": str(STEPS), "epoch": str(EPOCH), "batch": str(BATCH), "classes": str(CLASSES),
                 "teacher": TEACHER, "student": STUDENT, "torch": torch.__version__,
                 "generator": "tools/gen_distill_steps.py"})
    n = save_safetensors(path, out, meta)
    print(f"{path}: {len(out)} tensors, {n} bytes")


if __name__ == "__main__":
    main()
