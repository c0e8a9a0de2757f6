#!/usr/bin/python3
"""Writes the torchvision round-trip fixture of kd's Swin Transformers.

Usage:
    /usr/bin/python3 tools/gen_swin_fixtures.py tests/fixtures

Like tools/gen_imagenet_fixtures.py (whose hash-generated weights it uses:
every state_dict tensor of two or more dimensions is generated, entry k from
generated_weight(k, shape), the others stored; LayerNorm weights
1 + 0.2 N(0,1), biases 0.1 N(0,1); relative_position_index not stored
("generated" 2: the test rebuilds it with torchvision's formula, (dy + ws - 1)
* (2 ws - 1) + dx + ws - 1 for tokens i, j of a window, row-major), for these
cases:

    swin_t        torchvision swin_t, 3 channels, input (1, 3, 224, 224)
    swin_cifar    SwinTransformer(patch 2, embed 64, depths 2-2-2, heads
                  2-4-8, window 4), 3 channels, input (2, 3, 16, 16): maps
                  8 (2x2 windows, shifted), 4 (one window), 2 (padded to 4)
    swin_mnist    SwinTransformer(patch 2, embed 64, depths 2-4, heads 2-4,
                  window 7) with a 1-channel patch conv, input (2, 1, 28, 28)
    swin_mnist_14 the same model (same weights) on (2, 1, 14, 14): map 7,
                  then an odd merge padded to 4, padded to the window 7

All inputs are generated: generated_weight(1000 + case, shape, fan_in=3), so
U(-1, 1). The file tests/fixtures/swin_models.safetensors holds, per case,
    <sd_case>.sd.<name>   the stored state_dict entries (once per model: the
                  first case of that arch, "sd_case" in the metadata)
    <case>.logits      eval-mode logits (N, 10), float64 forward
    <case>.emb         the pooled embedding (N, C)
    <case>.grad_dot, <case>.grad_norm   (T) per state_dict tensor t of the
                  model with a gradient: sum(grad_t * generated_weight(5000 + t,
                  shape, fan_in=3)) and ||grad_t||, the gradients of
                  sum(logits * R) with R = generated_weight(4000, (N, 10),
                  fan_in=3) in eval mode (no stochastic depth), float64
and __metadata__["<case>"] = JSON {"arch", "names", "shapes", "dtypes",
"generated", "num_classes": 10, "in_channels", "input": [N, C, H, W],
"num_params_1000", "grad_names"}.
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.swin_transformer import SwinTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import save_safetensors  # noqa: E402
from gen_imagenet_fixtures import fixture_state_dict, generated_weight  # noqa: E402

NUM_CLASSES = 10
SMALL = {
    "swin_cifar": dict(patch_size=[2, 2], embed_dim=64, depths=[2, 2, 2], num_heads=[2, 4, 8],
                       window_size=[4, 4], stochastic_depth_prob=0.1),
    "swin_mnist": dict(patch_size=[2, 2], embed_dim=64, depths=[2, 4], num_heads=[2, 4],
                       window_size=[7, 7], stochastic_depth_prob=0.1),
}
CASES = [("swin_t", "swin_t", 3, (1, 3, 224, 224)), ("swin_cifar", "swin_cifar", 3, (2, 3, 16, 16)),
         ("swin_mnist", "swin_mnist", 1, (2, 1, 28, 28)), ("swin_mnist_14", "swin_mnist", 1, (2, 1, 14, 14))]


def make(arch, in_ch, num_classes):
    if arch in SMALL:
        m = SwinTransformer(num_classes=num_classes, **SMALL[arch])
    else:
        m = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if in_ch != 3:
        e = m.features[0][0]
        m.features[0][0] = nn.Conv2d(in_ch, e.out_channels, e.kernel_size, e.stride)
    return m


def build(arch, in_ch, seed):
    torch.manual_seed(seed)
    model = make(arch, in_ch, NUM_CLASSES)
    new, gen = fixture_state_dict(model.state_dict(),
                                  lambda name: name.endswith("relative_position_index"))
    model.load_state_dict(new)
    model.eval()
    return model, gen


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_swin_fixtures.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    import torchvision
    tensors = {}
    meta = {"generator": "tools/gen_swin_fixtures.py", "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cases": ",".join(c[0] for c in CASES)}
    models = {}
    for ci, (case, arch, in_ch, shape) in enumerate(CASES):
        if arch not in models:
            models[arch] = build(arch, in_ch, 100 + ci) + (case,)
        model, gen, sd_case = models[arch]
        sd = model.state_dict()
        names, shapes, dtypes = [], [], []
        for (name, t), g in zip(sd.items(), gen):
            names.append(name)
            shapes.append(list(t.shape))
            dtypes.append({torch.float32: "F32", torch.int64: "I64"}[t.dtype])
            if not g and sd_case == case:
                tensors[f"{case}.sd.{name}"] = t.detach().clone()
        x = generated_weight(1000 + ci, shape, fan_in=3)
        m64 = make(arch, in_ch, NUM_CLASSES).double()
        m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
        m64.eval()
        feats = {}

        def grab(mod, inp, out_):
            feats["emb"] = inp[0].detach().clone()
        h = m64.head.register_forward_hook(grab)
        logits = m64(x.double())
        h.remove()
        R = generated_weight(4000, tuple(logits.shape), fan_in=3).double()
        (logits * R).sum().backward()
        gnames, gdot, gnorm = [], [], []
        params = dict(m64.named_parameters())
        for t_idx, name in enumerate(names):
            if name in params and params[name].grad is not None:
                gr = params[name].grad
                w = generated_weight(5000 + t_idx, tuple(gr.shape), fan_in=3).double()
                gnames.append(name)
                gdot.append(float((gr * w).sum()))
                gnorm.append(float(gr.norm()))
        tensors[f"{case}.logits"] = logits.detach().float()
        tensors[f"{case}.emb"] = feats["emb"].float()
        tensors[f"{case}.grad_dot"] = torch.tensor(gdot, dtype=torch.float64).float()
        tensors[f"{case}.grad_norm"] = torch.tensor(gnorm, dtype=torch.float64).float()
        n1000 = sum(p.numel() for p in make(arch, 3, 1000).parameters())
        meta[case] = json.dumps({"arch": arch, "names": names, "shapes": shapes, "dtypes": dtypes,
                                 "generated": gen, "num_classes": NUM_CLASSES, "in_channels": in_ch,
                                 "input": list(shape), "input_key": 1000 + ci, "sd_case": sd_case,
                                 "num_params_1000": n1000, "grad_names": gnames},
                                separators=(",", ":"))
        print(f"{case}: {len(names)} tensors ({sum(gen)} generated), {n1000} parameters with 1000 "
              f"classes, logits[0,:3] {logits[0, :3].tolist()}")
    p = os.path.join(out, "swin_models.safetensors")
    n = save_safetensors(p, tensors, meta)
    print(f"{p}: {len(tensors)} tensors, {n} bytes")


if __name__ == "__main__":
    main()
