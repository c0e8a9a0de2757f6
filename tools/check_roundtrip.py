#!/usr/bin/python3
"""kd -> PyTorch: loads kd-saved weights into the PyTorch model with
load_state_dict(strict=True) and prints how far its logits are from the
fixture's.

Usage:
    /usr/bin/python3 tools/check_roundtrip.py KD_FILE ARCH [KD_FILE ARCH ...]
    /usr/bin/python3 tools/check_roundtrip.py --dir DIR   # every DIR/<arch>.safetensors with a fixture

KD_FILE is a file written by kd_model_save (tests/test_zoo_torch leaves one
per architecture in <build>/test_tmp/zoo_kd/). The model is
tools/gen_zoo_fixtures.py's PyTorch definition of ARCH; the input and the
reference logits come from tests/fixtures/zoo_<ARCH>.safetensors (made from
the same weights), so the difference is 0 up to float summation order.
Exits 1 when strict loading fails or a difference exceeds 1e-4.
"""

import glob
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gen_zoo_fixtures import build  # noqa: E402
from pth_to_safetensors import load_safetensors  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures")


def check(kd_file, arch):
    tensors, meta = load_safetensors(kd_file)
    if meta.get("arch", arch) != arch:
        print(f"{kd_file}: holds a '{meta['arch']}' model, not '{arch}'")
        return False
    model = build(arch, num_classes=int(meta.get("num_classes", 100)),
                  in_channels=int(meta.get("in_channels", 3)))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        print(f"{arch}: load_state_dict(strict=True) failed: {e}")
        return False
    model.eval()
    ref, _ = load_safetensors(os.path.join(FIXTURES, f"zoo_{arch}.safetensors"))
    with torch.no_grad():
        logits = model(ref["input"])
    diff = (logits - ref["logits"]).abs().max().item()
    ok = diff <= 1e-4
    print(f"{arch:12s} strict load ok, {len(tensors)} tensors, max |logits - fixture| {diff:.2e}"
          f"{'' if ok else '  FAIL'}")
    return ok


def main():
    args = sys.argv[1:]
    torch.set_num_threads(1)
    pairs = []
    if len(args) == 2 and args[0] == "--dir":
        for path in sorted(glob.glob(os.path.join(args[1], "*.safetensors"))):
            arch = os.path.basename(path)[:-len(".safetensors")]
            if os.path.exists(os.path.join(FIXTURES, f"zoo_{arch}.safetensors")):
                pairs.append((path, arch))
        if not pairs:
            print(f"no kd-saved zoo files in {args[1]} (run test_zoo_torch first)")
            return 1
    elif args and len(args) % 2 == 0:
        pairs = list(zip(args[0::2], args[1::2]))
    else:
        print(__doc__)
        return 2
    ok = all([check(p, a) for p, a in pairs])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
