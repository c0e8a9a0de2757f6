#!/usr/bin/python3
"""Generates tests/fixtures/distill_<method>.safetensors from the PyTorch
references in tools/distill_refs/ (one module per method).

Usage:
    /usr/bin/python3 tools/gen_distill_fixtures.py tests/fixtures [METHOD ...]

For each case <c> of a method the file holds (F32 unless noted):
    <c>.s.logits, <c>.t.logits        (N, K)
    <c>.s.feat<k>, <c>.t.feat<k>      the feature lists (maps, then pooled)
    <c>.labels                        (N) I64
    <c>.param.<name>                  the method's modules (state_dict names:
                                      parameters and buffers) before the step
    <c>.after.<name>                  buffers after the forward (batch-norm
                                      running statistics), where there are any
    <c>.term.<term>                   0-d weighted terms: "ce", "kl", "<method>"
    <c>.total                         0-d gamma*CE + alpha*KL + beta*term
    <c>.train_labels, <c>.index       (I64) where the case has them: the
                                      training set's labels and the batch's
                                      dataset indices (CRD)
    <c>.<extra>                       what the reference's extra() returns
                                      (CRD: the banks after the update)
    <c>.grad.s.logits, <c>.grad.s.feat<k>, <c>.grad.param.<name>
                                      d total / d input, for every student
                                      input and trainable parameter
and __metadata__: "method", "cases" (comma-separated), "weights" (JSON of the
published gamma, alpha, beta, T) and per case "<c>" a JSON object with
"args" (setting -> text), "epoch", "training", "fd" (0: the loss stops a
gradient that finite differences of the total would see, e.g. CRD queue
mode's detached positives, so the test skips them), "s_n_feat", "t_n_feat".

The reference runs in float64 from the float32 inputs and parameters; outputs
are rounded to float32. Seeded: a rerun writes identical files.
"""
import importlib
import json
import os
import pkgutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_io import save_safetensors  # noqa: E402
import distill_refs  # noqa: E402
from distill_refs.common import weighted_terms  # noqa: E402


def method_modules():
    for info in pkgutil.iter_modules(distill_refs.__path__):
        mod = importlib.import_module(f"distill_refs.{info.name}")
        if hasattr(mod, "NAME"):  # common, ssl_common: shared pieces
            yield mod


def run_case(ref, case, seed):
    torch.manual_seed(seed)
    mod = ref.build(case)
    out = {}
    c = case["name"]
    if mod is not None:
        mod = mod.float()
        for k, v in mod.state_dict().items():
            out[f"{c}.param.{k}"] = v.clone()
        mod = mod.double()
        mod.train(bool(case.get("training", 1)))
    s_feats = [f.double().requires_grad_(True) for f in case["s_feats"]]
    t_feats = [f.double() for f in case["t_feats"]]
    s_logits = case["s_logits"].double().requires_grad_(True)
    t_logits = case["t_logits"].double()
    y = case["labels"]
    terms = weighted_terms(ref, mod, case, s_feats, s_logits, t_feats, t_logits, y)
    total = sum(terms.values())
    params = [p for p in mod.parameters()] if mod is not None else []
    names = [n for n, _ in mod.named_parameters()] if mod is not None else []
    grads = torch.autograd.grad(total, [s_logits] + s_feats + params, allow_unused=True)
    out[f"{c}.s.logits"] = case["s_logits"]
    out[f"{c}.t.logits"] = case["t_logits"]
    for k, f in enumerate(case["s_feats"]):
        out[f"{c}.s.feat{k}"] = f
    for k, f in enumerate(case["t_feats"]):
        out[f"{c}.t.feat{k}"] = f
    out[f"{c}.labels"] = y.long()
    for name, v in terms.items():
        out[f"{c}.term.{name}"] = v.detach().float().reshape(())
    out[f"{c}.total"] = total.detach().float().reshape(())
    zero = lambda x: torch.zeros_like(x)  # noqa: E731
    out[f"{c}.grad.s.logits"] = (grads[0] if grads[0] is not None else zero(s_logits)).float()
    for k, f in enumerate(s_feats):
        g = grads[1 + k]
        out[f"{c}.grad.s.feat{k}"] = (g if g is not None else zero(f)).float()
    for i, n in enumerate(names):
        g = grads[1 + len(s_feats) + i]
        out[f"{c}.grad.param.{n}"] = (g if g is not None else zero(params[i])).float()
    if mod is not None:
        pnames = set(names)
        for k, v in mod.state_dict().items():
            if k not in pnames:
                out[f"{c}.after.{k}"] = v.float() if v.is_floating_point() else v
    # Methods that read the training set's labels or the batch's dataset
    # indices (CRD's sampler and banks), and what a reference computes after
    # the step (CRD's bank update).
    for key in ("train_labels", "index"):
        if key in case:
            out[f"{c}.{key}"] = case[key].long()
    if hasattr(ref, "extra"):
        for k, v in ref.extra(mod, case).items():
            out[f"{c}.{k}"] = v.detach().float() if v.is_floating_point() else v
    meta = dict(args={k: str(v) for k, v in case.get("args", {}).items()}, epoch=case.get("epoch", 0),
                training=case.get("training", 1), fd=case.get("fd", 1), s_n_feat=len(case["s_feats"]),
                t_n_feat=len(case["t_feats"]))
    return out, meta


def main():
    torch.set_num_threads(1)
    outdir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    only = set(sys.argv[2:])
    for ref in method_modules():
        if only and ref.NAME not in only:
            continue
        gen = torch.Generator().manual_seed(1234)
        tensors, meta = {}, {"method": ref.NAME, "weights": json.dumps(ref.WEIGHTS)}
        names = []
        for i, case in enumerate(ref.cases(gen)):
            t, m = run_case(ref, case, 100 + i)
            tensors.update(t)
            meta[case["name"]] = json.dumps(m, sort_keys=True)
            names.append(case["name"])
        meta["cases"] = ",".join(names)
        path = os.path.join(outdir, f"distill_{ref.NAME}.safetensors")
        save_safetensors(path, tensors, meta)
        print(f"{path}: {len(names)} cases, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
