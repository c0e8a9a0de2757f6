#!/usr/bin/python3
"""Generates tests/fixtures/sskd.safetensors for tests/test_sskd.c: SSKD's
stage 1 (the teacher head's loss and gradient) and a 3-step stage-2
trajectory, teacher resnet20 -> student resnet8, on fixed 4-view batches,
from the references of tools/distill_refs/sskd.py (written from the official
xuguodong03/SSKD student.py and wrapper.py).

Usage:
    /usr/bin/python3 tools/gen_sskd_fixtures.py tests/fixtures/sskd.safetensors

Contents (F32 unless noted):
    stage1.feat                   (4B, d) a teacher's feat[-1] on an interleaved batch (B 6, d 12)
    stage1.param.<name>           the head proj_head.{0,2}.{weight,bias}
    stage1.loss                   0-d CE of the 3B x B similarities against the source index
    stage1.grad.<name>            d loss / d head parameter
    teacher.<name>, student.<name>  resnet20 / resnet8 (10 classes), as tools/gen_distill_steps.py makes them
    batch<k>.view<v>, batch<k>.y  k = 1..3, v = 0..3: (4, 3, 32, 32) ~ N(0, 1); (4) I64 labels
    param.<name>                  the method's modules (ss_s trainable, ss_t buffers) before step 1
    step<k>.term.<t>, step<k>.total  weighted terms "ce", "kl", "sskd_tf", "sskd_ss" and their sum
    final.<name>                  the student after step 3
    final.distill.<name>          the method's modules after step 3
One step, as student.py: the 4B batch interleaved per image (row 4i + v =
view v of image i), the teacher (and its head) in eval mode without
gradient, the student and its head in train mode on all 4B rows, loss =
the four terms, torch.optim.SGD(lr 0.05, momentum 0.9, weight decay 5e-4)
over the student's and its head's parameters. Computed in float64 from
float32 values; __metadata__ "f32_spread" holds PyTorch float32's own
deviation from it (loss relative per step, parameters absolute)."""
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_io import save_safetensors  # noqa: E402
from gen_distill_steps import make_teacher, make_student, CLASSES, TEACHER, STUDENT  # noqa: E402
from distill_refs import sskd as ref  # noqa: E402

STEPS, BATCH = 3, 4
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


def stage1(out):
    g = torch.Generator().manual_seed(21)
    B, d = 6, 12
    feat = torch.randn(4 * B, d, generator=g).relu()
    torch.manual_seed(22)
    head = ref.proj_head(d)
    for k, v in head.state_dict().items():
        out[f"stage1.param.{k}"] = v.clone()
    h64 = copy.deepcopy(head).double()
    loss = ref.stage1_loss(h64, feat.double())
    names = [n for n, _ in h64.named_parameters()]
    grads = torch.autograd.grad(loss, list(h64.parameters()))
    out["stage1.feat"] = feat
    out["stage1.loss"] = loss.detach().float().reshape(())
    for n, gr in zip(names, grads):
        out[f"stage1.grad.{n}"] = gr.float()
    print(f"stage 1: loss {loss.item():.6f}")


def make_batches():
    g = torch.Generator().manual_seed(23)
    return [([torch.randn(BATCH, 3, 32, 32, generator=g) for _ in range(4)],
             torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(STEPS)]


def interleave(views):
    return torch.stack(views, dim=1).reshape(-1, *views[0].shape[1:])


def run(teacher, student, mod, batches, dtype):
    teacher = copy.deepcopy(teacher).to(dtype).eval()
    student = copy.deepcopy(student).to(dtype).train()
    mod = copy.deepcopy(mod).to(dtype).train()
    opt = torch.optim.SGD([{"params": list(student.parameters())}, {"params": list(mod.parameters())}],
                          lr=LR, momentum=MOMENTUM, weight_decay=WD)
    case = dict(args={})
    steps = []
    for views, y in batches:
        x = interleave([v.to(dtype) for v in views])
        with torch.no_grad():
            t_feats, t_logits = teacher(x, is_feat=True)
        s_feats, s_logits = student(x, is_feat=True)
        terms = ref.terms(mod, case, s_feats, s_logits, t_feats, t_logits, y)
        total = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        steps.append(({k: v.item() for k, v in terms.items()}, total.item()))
    return steps, {k: v.detach().clone() for k, v in student.state_dict().items()}, \
        {k: v.detach().clone() for k, v in mod.state_dict().items()}


def main():
    torch.set_num_threads(1)
    path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/sskd.safetensors"
    out = {}
    stage1(out)
    teacher, student, batches = make_teacher(), make_student(), make_batches()
    for k, v in teacher.state_dict().items():
        out[f"teacher.{k}"] = v.clone()
    for k, v in student.state_dict().items():
        out[f"student.{k}"] = v.clone()
    for i, (views, y) in enumerate(batches):
        for v, xv in enumerate(views):
            out[f"batch{i + 1}.view{v}"] = xv
        out[f"batch{i + 1}.y"] = y.long()
    with torch.no_grad():
        t_feats, _ = teacher(batches[0][0][0], is_feat=True)
        s_feats, _ = copy.deepcopy(student).eval()(batches[0][0][0], is_feat=True)
    torch.manual_seed(24)
    mod = ref.build(dict(s_feats=list(s_feats), t_feats=list(t_feats))).float()
    for k, v in mod.state_dict().items():
        out[f"param.{k}"] = v.clone()
    steps, s_sd, m_sd = run(teacher, student, mod, batches, torch.float64)
    steps32, s_sd32, m_sd32 = run(teacher, student, mod, batches, torch.float32)
    for k, (terms, total) in enumerate(steps):
        for t, v in terms.items():
            out[f"step{k + 1}.term.{t}"] = torch.tensor(v, dtype=torch.float32)
        out[f"step{k + 1}.total"] = torch.tensor(total, dtype=torch.float32)
    for k, v in s_sd.items():
        out[f"final.{k}"] = v.float() if v.is_floating_point() else v
    for k, v in m_sd.items():
        out[f"final.distill.{k}"] = v.float() if v.is_floating_point() else v
    loss_dev = [abs(a[1] - b[1]) / max(abs(b[1]), 1e-12) for a, b in zip(steps32, steps)]
    par_dev = 0.0
    for sd, sd32 in ((s_sd, s_sd32), (m_sd, m_sd32)):
        for k, v in sd.items():
            if v.is_floating_point():
                par_dev = max(par_dev, (sd32[k].double() - v).abs().max().item())
    print("stage 2: losses " + " ".join(f"{t:.6f}" for _, t in steps) +
          f"; torch float32 vs float64: loss rel {max(loss_dev):.2e}, params abs {par_dev:.2e}")
    meta = {"steps": str(STEPS), "batch": str(BATCH), "classes": str(CLASSES), "lr": str(LR),
            "momentum": str(MOMENTUM), "weight_decay": str(WD), "teacher": TEACHER, "student": STUDENT,
            "weights": json.dumps(ref.WEIGHTS), "terms": ",".join(steps[0][0].keys()),
            "f32_spread": json.dumps(dict(loss_rel=loss_dev, param_abs=par_dev)), "torch": torch.__version__,
            "generator": "tools/gen_sskd_fixtures.py"}
    n = save_safetensors(path, out, meta)
    print(f"{path}: {len(out)} tensors, {n} bytes")


if __name__ == "__main__":
    main()
