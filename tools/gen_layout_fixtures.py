#!/usr/bin/python3
"""Generates tests/fixtures/layout.safetensors: PyTorch references for kd's
data-movement transformer ops (src/autograd/ops_layout.c), read by
tests/test_ops_layout.c.

Usage:
    /usr/bin/python3 tools/gen_layout_fixtures.py tests/fixtures/layout.safetensors

Same case format as ops.safetensors (tools/gen_fixtures.py, class OpCases):
a case <c> holds <c>.in0, <c>.in1 (inputs in the argument order of the kd
call; F32, index_select's index I64), <c>.out, <c>.r (upstream weights) and
<c>.grad<i> = d sum(out * r) / d in<i> for the inputs that require gradients,
computed in float64 from the float32 inputs and rounded to float32.
__metadata__[<c>] is a JSON object with "op" (the kd call without the kd_
prefix) and its parameters:
    permute          "perm"
    roll             "shifts", "dims" (torch.roll's arguments)
    index_select     -- (in1 is Swin's relative_position_index or random
                         indices with repeats)
    add_bcast        -- (in1 is b, broadcast to in0)
    weight_norm      -- (in1, when present, is the gain (O); torch's
                         _weight_norm(v, g.view(O, 1), 0))
    window_partition "ws"           Swin's window_partition, then .view(-1, ws*ws, C)
    window_reverse   "ws", "N", "H", "W"  Swin's window_reverse of in0
    patch_merge      --             torchvision's _patch_merging_pad
__metadata__["cases"] lists the cases. Seeded: a rerun writes identical files.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import OpCases  # noqa: E402
from st_io import save_safetensors  # noqa: E402
from torchvision.models.swin_transformer import _patch_merging_pad  # noqa: E402


# Swin-Transformer (microsoft/Swin-Transformer, models/swin_transformer.py).
def window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def relative_position_index(wh, ww):
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def build():
    c = OpCases()
    randn = torch.randn

    for name, shape, perm in [("permute_4d", (2, 3, 4, 5), (0, 2, 3, 1)),
                              ("permute_4d_rev", (3, 2, 4, 5), (3, 2, 1, 0)),
                              ("permute_6d_swin", (2, 2, 3, 2, 3, 4), (0, 1, 3, 2, 4, 5)),
                              ("permute_6d", (2, 3, 2, 4, 1, 3), (5, 2, 0, 4, 1, 3)),
                              ("permute_3d_id", (2, 3, 4), (0, 1, 2))]:
        c.add(name, {"op": "permute", "perm": list(perm)},
              lambda x, p=perm: x.permute(*p).contiguous(), [randn(*shape)], [True])

    for name, shape, shifts, dims in [("roll_swin", (2, 6, 6, 3), (-2, -2), (1, 2)),
                                      ("roll_swin_back", (2, 6, 6, 3), (2, 2), (1, 2)),
                                      ("roll_mixed", (3, 4, 5, 2), (7, -3, 1), (0, 2, -1)),
                                      ("roll_repeat", (4, 5), (2, -4, 3), (1, 1, 0)),
                                      ("roll_big_neg", (2, 3, 7), (-23,), (2,))]:
        c.add(name, {"op": "roll", "shifts": list(shifts), "dims": list(dims)},
              lambda x, s=shifts, d=dims: torch.roll(x, s, d), [randn(*shape)], [True])

    # Swin's relative position bias: table ((2ws-1)^2, heads)[index.view(-1)].
    for name, ws, heads in [("index_select_relpos", 3, 4), ("index_select_relpos_rect", 2, 3)]:
        idx = relative_position_index(ws, ws + 1 if name.endswith("rect") else ws).reshape(-1)
        L = int(idx.max()) + 1 + 2  # two rows nobody reads: their gradient is 0
        c.add(name, {"op": "index_select"}, lambda t, i: t.index_select(0, i),
              [randn(L, heads), idx.long()], [True, False])
    idx = torch.randint(0, 6, (17,))
    c.add("index_select_repeat", {"op": "index_select"}, lambda t, i: t.index_select(0, i),
          [randn(6, 5), idx], [True, False])

    B, h, N, nW = 4, 3, 4, 2
    for name, xs, bs in [("add_bcast_attn", (B, h, N, N), (1, h, N, N)),
                         ("add_bcast_mask", (B // nW, nW, h, N, N), (1, nW, 1, N, N)),
                         ("add_bcast_inner", (3, 4, 5), (3, 1, 1)),
                         ("add_bcast_ones", (2, 1, 5, 3), (1, 1, 5, 1)),
                         ("add_bcast_same", (2, 3), (2, 3))]:
        c.add(name, {"op": "add_bcast"}, lambda x, b: x + b, [randn(*xs), randn(*bs)],
              [True, True])

    O, I = 5, 7
    c.add("weight_norm_gain", {"op": "weight_norm"},
          lambda v, g: torch._weight_norm(v, g.view(-1, 1), 0),
          [randn(O, I), randn(O).abs() + 0.5], [True, True])
    c.add("weight_norm_nogain", {"op": "weight_norm"},
          lambda v: torch._weight_norm(v, torch.ones(O, 1, dtype=v.dtype), 0),
          [randn(O, I)], [True])

    n, H, W, C, ws = 2, 6, 9, 4, 3
    c.add("window_partition", {"op": "window_partition", "ws": ws},
          lambda x: window_partition(x, ws).reshape(-1, ws * ws, C), [randn(n, H, W, C)], [True])
    nwin = n * (H // ws) * (W // ws)
    c.add("window_reverse", {"op": "window_reverse", "ws": ws, "N": n, "H": H, "W": W},
          lambda w: window_reverse(w.view(nwin, ws, ws, C), ws, H, W),
          [randn(nwin, ws * ws, C)], [True])
    c.add("window_reverse_4d", {"op": "window_reverse", "ws": ws, "N": n, "H": H, "W": W},
          lambda w: window_reverse(w, ws, H, W), [randn(nwin, ws, ws, C)], [True])

    c.add("patch_merge", {"op": "patch_merge"}, _patch_merging_pad, [randn(2, 4, 6, 3)], [True])
    c.add("patch_merge_1x1", {"op": "patch_merge"}, _patch_merging_pad, [randn(1, 2, 2, 5)],
          [True])
    return c


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_layout_fixtures.py OUT.safetensors")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = build()
    meta = dict(c.meta)
    meta["cases"] = ",".join(c.names)
    meta["torch"] = torch.__version__
    n = save_safetensors(sys.argv[1], c.tensors, meta)
    ops = sorted({json.loads(c.meta[k])["op"] for k in c.names})
    print(f"{sys.argv[1]}: {len(c.names)} cases over {len(ops)} ops, {n} bytes")


if __name__ == "__main__":
    main()
