#!/usr/bin/python3
"""Converts a PyTorch checkpoint (.pth) of a RepDistiller CIFAR model into a
safetensors file that kd loads as a teacher (kd distill --teacher-ckpt).

Usage:
    /usr/bin/python3 tools/pth_to_safetensors.py resnet32x4.pth teacher.safetensors --arch resnet32x4
    /usr/bin/python3 tools/pth_to_safetensors.py --self-test

Needs only torch (no safetensors package). The checkpoint may be a plain
state_dict or a dict holding one under "model" (RepDistiller's
train_teacher.py) or "state_dict"; a "module." prefix (DataParallel) is
removed. The metadata records arch, in_channels and num_classes (read from
the first conv and the last 2-d weight unless given), as kd's own checkpoints
do. Only float32 and int64 tensors are written; other float dtypes are cast
to float32.

Also a small library: save_safetensors() and load_safetensors() are used by
tools/gen_zoo_fixtures.py and tools/check_roundtrip.py.
"""

import argparse
import os
import sys

import torch

from st_io import BY_NAME, DTYPES, load_safetensors, save_safetensors  # noqa: E402,F401 (re-exported)


def state_dict_of(obj):
    """The state_dict inside a loaded checkpoint object."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return state_dict_of(obj[key])
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError("no state_dict found (expected a dict of tensors, or one under 'model')")
    sd = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if v.dtype.is_floating_point and v.dtype != torch.float32:
            v = v.float()
        sd[k] = v
    return sd


def convert(pth, out, arch, num_classes=0, in_channels=0):
    """Converts `pth` to `out`; returns (tensors written, metadata)."""
    sd = state_dict_of(torch.load(pth, map_location="cpu"))
    convs = [v for v in sd.values() if v.dim() == 4]
    mats = [v for v in sd.values() if v.dim() == 2]
    in_ch = in_channels or (convs[0].shape[1] if convs else 3)
    ncls = num_classes or (mats[-1].shape[0] if mats else 0)
    meta = {"format": "kd-checkpoint-1", "arch": arch, "in_channels": in_ch,
            "num_classes": ncls, "source": os.path.basename(pth)}
    save_safetensors(out, sd, meta)
    return sd, meta


def self_test():
    """A RepDistiller-style checkpoint (DataParallel names under "model")
    converts to the same tensors, and the metadata kd needs is right."""
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gen_zoo_fixtures import build
    torch.manual_seed(0)
    model = build("ShuffleV1", num_classes=10, in_channels=3)
    sd = model.state_dict()
    with tempfile.TemporaryDirectory() as d:
        pth, out = os.path.join(d, "ckpt_epoch_240.pth"), os.path.join(d, "t.safetensors")
        torch.save({"epoch": 240, "model": {"module." + k: v for k, v in sd.items()},
                    "best_acc": 71.0, "optimizer": {}}, pth)
        convert(pth, out, "ShuffleV1")
        back, meta = load_safetensors(out)
    assert meta["arch"] == "ShuffleV1" and meta["num_classes"] == "10" and meta["in_channels"] == "3", meta
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    model.load_state_dict(back, strict=True)
    print(f"pth_to_safetensors self-test: {len(sd)} tensors round-tripped, metadata {meta}")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pth")
    ap.add_argument("out")
    ap.add_argument("--arch", required=True, help="kd/RepDistiller model name, e.g. resnet32x4")
    ap.add_argument("--num-classes", type=int, default=0)
    ap.add_argument("--in-channels", type=int, default=0)
    a = ap.parse_args()
    sd, meta = convert(a.pth, a.out, a.arch, a.num_classes, a.in_channels)
    print(f"{a.out}: {len(sd)} tensors, arch {a.arch}, {meta['in_channels']} input channels, "
          f"{meta['num_classes']} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
