#!/usr/bin/python3
"""Generates tests/fixtures/crd_nce.safetensors: CRD's NCE loss of one side on
a fixed random draw of indices, for tests/test_crd.c, from the PyTorch
reference tools/distill_refs/crd.py (RepDistiller's ContrastMemory scores,
gathered into a (B, K+1, D) tensor and multiplied in a bmm as the official
code does, then ContrastLoss).

Usage:
    /usr/bin/python3 tools/gen_crd_fixtures.py tests/fixtures/crd_nce.safetensors

Per case <c> (F32 unless noted):
    <c>.v       (B, D)   the anchor embeddings (rows L2-normalised)
    <c>.bank    (R, D)   the other model's bank (or queue)
    <c>.idx     (B, K+1) I64 the draw (bank cases): positive first
    <c>.pos     (B, D)   queue case: the positives (the other side's embeddings)
    <c>.loss    0-d      ContrastLoss
    <c>.grad    (B, D)   d loss / d v
    <c>.z       0-d      the normaliser used (set from this batch when the
                         case's metadata "z" is negative)
__metadata__ per case: JSON with "K", "T", "n_data", "z" (the normaliser
before the call; -1: the first batch). Seeded: a rerun writes identical files.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_io import save_safetensors  # noqa: E402
from distill_refs.crd import contrast_loss  # noqa: E402


def normed(gen, n, d):
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def bank(gen, rows, d):
    """RepDistiller's init, then a third of the rows already moved (normalised)."""
    stdv = 1. / math.sqrt(d / 3)
    b = torch.rand(rows, d, generator=gen) * 2 * stdv - stdv
    b[: rows // 3] = normed(gen, rows // 3, d)
    return b


def run(name, gen, B, D, rows, K, T, n_data, z0, queue):
    v = normed(gen, B, D)
    m = bank(gen, rows, D)
    out, meta = {}, dict(K=K, T=T, n_data=n_data, z=z0)
    vd = v.double().requires_grad_(True)
    if queue:
        pos = normed(gen, B, D)
        w = torch.cat([pos.double().unsqueeze(1), m.double().unsqueeze(0).expand(B, -1, -1)], 1)
        out[f"{name}.pos"] = pos
    else:
        labels = torch.randint(0, 10, (rows,), generator=gen)
        idx = torch.empty(B, K + 1, dtype=torch.int64)
        for i in range(B):
            anchor = int(torch.randint(0, rows, (1,), generator=gen))
            neg = (labels != labels[anchor]).nonzero().view(-1)
            neg = neg[torch.randperm(len(neg), generator=gen)[:K]]
            idx[i, 0] = anchor
            idx[i, 1:] = neg
        w = torch.index_select(m.double(), 0, idx.view(-1)).view(B, K + 1, D)
        out[f"{name}.idx"] = idx
    e = torch.exp(torch.bmm(w, vd.unsqueeze(2)).squeeze(2) / T)
    z = z0 if z0 >= 0 else (e.detach().mean() * n_data).item()
    loss = contrast_loss(e / z, n_data).squeeze()
    (g,) = torch.autograd.grad(loss, [vd])
    out.update({f"{name}.v": v, f"{name}.bank": m, f"{name}.loss": loss.detach().float().reshape(()),
                f"{name}.grad": g.float(), f"{name}.z": torch.tensor(z, dtype=torch.float32)})
    print(f"{name}: B {B} K {K} D {D} rows {rows}: loss {loss.item():.6f} z {z:.6g}")
    return out, meta


def main():
    torch.set_num_threads(1)
    path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/crd_nce.safetensors"
    gen = torch.Generator().manual_seed(2020)
    tensors, meta = {}, {}
    spec = [("first", 8, 64, 1500, 1000, 0.07, 1500, -1.0, False),
            ("frozen", 6, 32, 900, 700, 0.1, 900, 2500.0, False),
            ("queue", 5, 32, 300, 300, 0.07, 5000, -1.0, True)]
    for s in spec:
        t, m = run(*s[:1], gen, *s[1:])
        tensors.update(t)
        meta[s[0]] = json.dumps(m, sort_keys=True)
    meta["cases"] = ",".join(s[0] for s in spec)
    meta["generator"] = "tools/gen_crd_fixtures.py"
    n = save_safetensors(path, tensors, meta)
    print(f"{path}: {len(tensors)} tensors, {n} bytes")


if __name__ == "__main__":
    main()
