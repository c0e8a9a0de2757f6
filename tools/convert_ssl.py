#!/usr/bin/python3
"""Converts a PyTorch self-supervised checkpoint (MoCo v2, SimCLR ports) into
an encoder file kd reads like its own encoder.safetensors: the backbone under
kd's torchvision names, the projection head as "head.*", metadata "arch",
"head" (mlp | simclr), "in_channels", "num_classes". Such a file is a SEED
teacher (kd distill --method seed --teacher-ckpt FILE --set
seed.teacher_head=KIND) or the start of a fine-tune (kd train --init-ckpt FILE).

Usage:
    /usr/bin/python3 tools/convert_ssl.py moco_v2_800ep_pretrain.pth.tar enc.safetensors --arch resnet50
    /usr/bin/python3 tools/convert_ssl.py ckpt.pth enc.safetensors --arch resnet18 \\
        --backbone-prefix encoder. --head-prefix projector. --head simclr
    /usr/bin/python3 tools/convert_ssl.py --self-test

Defaults read facebookresearch/moco's main_moco.py checkpoints: the state_dict
under "state_dict", the query encoder under "module.encoder_q.", its MLP head
(fc = Linear-ReLU-Linear, --mlp) under "module.encoder_q.fc." (fc.0, fc.2
become head.0, head.2); the key encoder and the queue are dropped. A head in
SimCLRv2's layout (Linear, BN, ReLU, Linear, BN, ReLU, Linear, BN) keeps its
nn.Sequential indices (head.0 ... head.7); give --head simclr.

The backbone's classifier (fc, to the dataset's classes) is not in such a
checkpoint; kd's models have one, so the file gets fc.weight and fc.bias of
zeros for --num-classes classes (default 1000): kd's fine-tune or linear
evaluation trains it.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_io import load_safetensors, save_safetensors  # noqa: E402


def state_dict_of(obj):
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def convert_sd(sd, backbone_prefix, head_prefix, head, num_classes):
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        if v.dtype.is_floating_point and v.dtype != torch.float32:
            v = v.float()
        if k.startswith(head_prefix):
            out["head." + k[len(head_prefix):]] = v
        elif k.startswith(backbone_prefix):
            out[k[len(backbone_prefix):]] = v
    if not any(k.startswith("head.") for k in out):
        raise ValueError("no head tensors under '%s'" % head_prefix)
    if not any(k.endswith("weight") and not k.startswith("head.") for k in out):
        raise ValueError("no backbone tensors under '%s'" % backbone_prefix)
    if "fc.weight" not in out:
        d = out["head.0.weight"].shape[1]
        out["fc.weight"] = torch.zeros(num_classes, d)
        out["fc.bias"] = torch.zeros(num_classes)
    if head == "mlp" and "head.1.weight" in out:
        raise ValueError("the head has a tensor at index 1 (batch norm): give --head simclr")
    return out


def convert(pth, dst, arch, backbone_prefix, head_prefix, head, num_classes):
    sd = state_dict_of(torch.load(pth, map_location="cpu"))
    out = convert_sd(sd, backbone_prefix, head_prefix, head, num_classes)
    convs = [v for k, v in out.items() if v.dim() == 4]
    meta = {"format": "kd-checkpoint-1", "arch": arch, "in_channels": convs[0].shape[1] if convs else 3,
            "num_classes": num_classes, "head": head, "ssl_method": "converted",
            "source": os.path.basename(pth)}
    save_safetensors(dst, out, meta)
    return out, meta


def self_test():
    """A MoCo-v2-style checkpoint of a torchvision resnet18 with the MLP head,
    written by torch.save, converted and read back: every backbone and head
    tensor arrives under kd's name with its values; the key encoder and the
    queue are dropped; fc gets zeros; a BN head refused as mlp."""
    import torchvision
    torch.manual_seed(0)
    q = torchvision.models.resnet18(num_classes=128)
    dim = q.fc.weight.shape[1]
    q.fc = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), q.fc)
    k = torchvision.models.resnet18(num_classes=128)
    sd = {}
    for name, v in q.state_dict().items():
        sd["module.encoder_q." + name] = v
    for name, v in k.state_dict().items():
        sd["module.encoder_k." + name] = v
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    with tempfile.TemporaryDirectory() as d:
        pth = os.path.join(d, "moco.pth.tar")
        torch.save({"epoch": 1, "arch": "resnet18", "state_dict": sd}, pth)
        dst = os.path.join(d, "enc.safetensors")
        convert(pth, dst, "resnet18", "module.encoder_q.", "module.encoder_q.fc.", "mlp", 10)
        got, meta = load_safetensors(dst)
    want = {n: v for n, v in q.state_dict().items() if not n.startswith("fc.")}
    bad = 0
    for n, v in want.items():
        if n not in got or not torch.equal(got[n], v):
            print("self-test: %s missing or changed" % n)
            bad += 1
    for i in (0, 2):
        for p in ("weight", "bias"):
            if not torch.equal(got["head.%d.%s" % (i, p)], q.fc[i].state_dict()[p]):
                print("self-test: head.%d.%s differs" % (i, p))
                bad += 1
    if any(n.startswith("encoder_k") or "queue" in n for n in got):
        print("self-test: the key encoder or the queue leaked into the file")
        bad += 1
    if got["fc.weight"].shape != (10, dim) or got["fc.weight"].abs().sum() != 0:
        print("self-test: fc.weight is not zeros of (10, %d)" % dim)
        bad += 1
    if meta.get("head") != "mlp" or meta.get("arch") != "resnet18":
        print("self-test: metadata %s" % meta)
        bad += 1
    try:
        convert_sd({"module.encoder_q.conv1.weight": torch.zeros(1), "module.encoder_q.fc.1.weight": torch.zeros(1),
                    "module.encoder_q.fc.0.weight": torch.zeros(2, 2)},
                   "module.encoder_q.", "module.encoder_q.fc.", "mlp", 10)
        print("self-test: a batch-norm head was accepted as mlp")
        bad += 1
    except ValueError:
        pass
    print("convert_ssl self-test: %s" % ("ok" if bad == 0 else "%d failures" % bad))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--arch", help="kd architecture name (resnet18, resnet50, ...)")
    ap.add_argument("--backbone-prefix", default="module.encoder_q.")
    ap.add_argument("--head-prefix", default="module.encoder_q.fc.")
    ap.add_argument("--head", default="mlp", choices=["mlp", "simclr"])
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    if not a.src or not a.dst or not a.arch:
        ap.error("give SRC DST --arch ARCH (or --self-test)")
    try:
        out, meta = convert(a.src, a.dst, a.arch, a.backbone_prefix, a.head_prefix, a.head, a.num_classes)
    except (ValueError, OSError, RuntimeError) as e:
        print("convert_ssl: %s: %s" % (a.src, e), file=sys.stderr)
        return 2
    print("%s: %d tensors, head %s -> %s" % (a.src, len(out), meta["head"], a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
