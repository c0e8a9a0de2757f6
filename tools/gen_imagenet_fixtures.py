#!/usr/bin/python3
"""Writes the torchvision round-trip fixture of kd's ImageNet-size models.

Usage:
    /usr/bin/python3 tools/gen_imagenet_fixtures.py tests/fixtures

Needs Debian's python3-torch and python3-torchvision (0.14); the safetensors
file is written by gen_fixtures.save_safetensors. Deterministic: seeded, one
thread, and the large weights come from an integer hash, not from torch's RNG.

For each architecture (resnet18, resnet34, resnet50, mobilenet_v3_large,
mobilenet_v3_small, efficientnet_b0) the torchvision model is built with
weights=None, num_classes=10, and its state_dict is replaced as follows:

  - every tensor with two or more dimensions (conv and linear weights, 99% of
    the bytes) is generated, not stored: entry k of the state_dict (0-based,
    state_dict order) gets, for element i (row-major),
        z  = splitmix64((k + 1) * 0x9E3779B97F4A7C15 + i)      (mod 2^64)
        u  = float32((z >> 40) * 2^-23 - 1)                    (exact, in [-1, 1))
        w  = u * float32(sqrt(3 / fan_in))                     (float32 product)
    with fan_in = shape[1] * prod(shape[2:]) and splitmix64 the usual
    finaliser (z += 0x9E3779B97F4A7C15; z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9;
    z = (z ^ z >> 27) * 0x94D049BB133111EB; z ^= z >> 31). The C test
    regenerates them bit for bit.
  - every other tensor is stored: biases and batch-norm affine parameters are
    drawn at random (weight 1 + 0.2 N(0,1), bias 0.1 N(0,1)); the running
    statistics are those of one training-mode pass over a calibration batch
    with momentum 1 (so eval-mode activations stay O(1) through 50 layers);
    num_batches_tracked is then 1 (I64, 0-d).

The file tests/fixtures/imagenet_models.safetensors then holds
    x                       (2, 3, 64, 64) F32 input shared by all models
    <arch>.sd.<name>        the stored (non-generated) state_dict entries
    <arch>.logits           (2, 10) eval-mode logits of x
    <arch>.emb              (2, D) the pooled embedding (input of the classifier)
and __metadata__["<arch>"] = JSON {"names": [...], "shapes": [[...]...],
"dtypes": ["F32"|"I64"...], "generated": [0|1...], "num_classes": 10,
"in_channels": 3, "num_params_1000": <trainable parameters with 1000 classes>}.
The logits and embeddings are computed in float64 from the exact float32
parameters and input, then rounded to float32.
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torchvision.models as tvm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import save_safetensors  # noqa: E402

ARCHS = ["resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "mobilenet_v3_small",
         "efficientnet_b0"]
NUM_CLASSES = 10
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def generated_weight(k, shape, fan_in=None):
    """The hash-generated float32 tensor for state_dict entry k (fan_in:
    prod(shape[1:]) unless given; 3 gives U(-1, 1) inputs)."""
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(k + 1) * GOLDEN + i
        z = z + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(40)).astype(np.float64) * 2.0 ** -23 - 1.0).astype(np.float32)
    if fan_in is None:
        fan_in = int(np.prod(shape[1:]))
    bound = np.float32(math.sqrt(3.0 / fan_in))
    return torch.from_numpy((u * bound).astype(np.float32).reshape(shape))


def fixture_state_dict(sd, derived=lambda name: False):
    """The fixture's replacement of a state_dict and its "generated" codes:
    1 hash-generated (two or more dimensions), 0 stored (1-d weights
    1 + 0.2 N(0,1), other float tensors 0.1 N(0,1), running statistics and
    integers as they are), 2 kept as they are but not stored (derived(name):
    the test rebuilds them)."""
    new, gen = {}, []
    for k, (name, t) in enumerate(sd.items()):
        if derived(name):
            new[name] = t.clone()
            gen.append(2)
        elif t.dim() >= 2:
            new[name] = generated_weight(k, tuple(t.shape))
            gen.append(1)
        else:
            gen.append(0)
            if t.dtype == torch.float32 and not ("running_" in name):
                new[name] = (1.0 + 0.2 * torch.randn(t.shape)) if name.endswith(".weight") else 0.1 * torch.randn(t.shape)
            else:
                new[name] = t.clone()
    return new, gen


def build(arch, calib):
    model = getattr(tvm, arch)(weights=None, num_classes=NUM_CLASSES)
    new, gen = fixture_state_dict(model.state_dict())
    model.load_state_dict(new)
    # Running statistics: one training-mode pass with momentum 1.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(calib)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
    return model, gen


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_imagenet_fixtures.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(2024)
    x = torch.randn(2, 3, 64, 64)
    tensors = {"x": x}
    meta = {"generator": "tools/gen_imagenet_fixtures.py", "torch": torch.__version__,
            "archs": ",".join(ARCHS)}
    import torchvision
    meta["torchvision"] = torchvision.__version__
    for idx, arch in enumerate(ARCHS):
        torch.manual_seed(100 + idx)
        calib = torch.randn(4, 3, 64, 64)
        model, gen = build(arch, calib)
        sd = model.state_dict()
        names, shapes, dtypes = [], [], []
        for (name, t), g in zip(sd.items(), gen):
            names.append(name)
            shapes.append(list(t.shape))
            dtypes.append({torch.float32: "F32", torch.int64: "I64"}[t.dtype])
            if not g:
                tensors[f"{arch}.sd.{name}"] = t.detach().clone()
        # Float64 reference from the float32 parameters.
        m64 = model.double()
        with torch.no_grad():
            feats = {}
            head = m64.fc if arch.startswith("resnet") else m64.classifier

            def grab(mod, inp, out):
                feats["emb"] = inp[0].clone()  # returns None: the output is kept
            h = head.register_forward_hook(grab)
            logits = m64(x.double())
            h.remove()
        assert logits.shape == (x.shape[0], NUM_CLASSES), logits.shape
        tensors[f"{arch}.logits"] = logits.float()
        tensors[f"{arch}.emb"] = feats["emb"].float()
        n1000 = sum(p.numel() for p in getattr(tvm, arch)(weights=None).parameters())
        meta[arch] = json.dumps({"names": names, "shapes": shapes, "dtypes": dtypes,
                                 "generated": gen, "num_classes": NUM_CLASSES,
                                 "in_channels": 3, "num_params_1000": n1000},
                                separators=(",", ":"))
        print(f"{arch}: {len(names)} tensors ({sum(gen)} generated), "
              f"{n1000} parameters with 1000 classes, logits[0,:3] "
              f"{logits[0, :3].tolist()}")
    p = os.path.join(out, "imagenet_models.safetensors")
    n = save_safetensors(p, tensors, meta)
    print(f"{p}: {len(tensors)} tensors, {n} bytes")


if __name__ == "__main__":
    main()
