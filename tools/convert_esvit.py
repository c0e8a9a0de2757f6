#!/usr/bin/python3
"""Converts an EsViT checkpoint (microsoft/esvit, main_esvit.py) of a Swin-T/S/B
into a file kd reads like its own checkpoints: the backbone under torchvision's
Swin names (kd's swin_t, swin_s, swin_b), metadata "arch", "in_channels",
"num_classes", optionally the DINO heads as "head.*" / "head_dense.*". Such a
file is a teacher (kd distill --teacher-ckpt FILE) or the start of a fine-tune
(kd train --init-ckpt FILE).

Usage:
    /usr/bin/python3 tools/convert_esvit.py checkpoint.pth swin_t.safetensors --arch swin_t
    /usr/bin/python3 tools/convert_esvit.py checkpoint.pth s.safetensors --arch swin_t \\
        --which student --keep-heads --num-classes 100
    /usr/bin/python3 tools/convert_esvit.py --self-test [--kd build/kd]

The checkpoint holds "teacher" and "student" state dicts (main_esvit.py's
save_dict); the teacher is converted unless --which student (DINO and EsViT
evaluate the teacher). A bare state dict (or one under "state_dict" / "model")
is read as it is. Prefixes "module." (DistributedDataParallel) and then
"backbone." (DINO's MultiCropWrapper) are dropped from every name. The DINO
heads EsViT attaches to the backbone ("head.*": view-level, "head_dense.*":
region-level; DINOHead's mlp.* and last_layer.weight_g / weight_v) are dropped,
or kept under those names with --keep-heads (metadata "head": "dino"), and
"attn_mask" buffers (older Swin code) are dropped.

Names, EsViT (models/swin_transformer.py) -> torchvision
(torchvision/models/swin_transformer.py), stage i, block j:
    patch_embed.proj.*                       features.0.0.*
    patch_embed.norm.*                       features.0.2.*
    layers.i.blocks.j.norm1.*                features.(2i+1).j.norm1.*
    layers.i.blocks.j.attn.qkv.*             features.(2i+1).j.attn.qkv.*
    layers.i.blocks.j.attn.proj.*            features.(2i+1).j.attn.proj.*
    layers.i.blocks.j.attn.relative_position_bias_table
                                             features.(2i+1).j.attn.relative_position_bias_table
    layers.i.blocks.j.attn.relative_position_index (N, N)
                                             features.(2i+1).j.attn.relative_position_index (N*N)
    layers.i.blocks.j.norm2.*                features.(2i+1).j.norm2.*
    layers.i.blocks.j.mlp.fc1.*, mlp.fc2.*   features.(2i+1).j.mlp.0.*, mlp.3.*
    layers.i.downsample.reduction.weight     features.(2i+2).reduction.weight
    layers.i.downsample.norm.*               features.(2i+2).norm.*
    norm.*                                   norm.*
A checkpoint without relative_position_index gets it from the formula both
codes use. The classifier (head.weight, head.bias: the backbone's Linear to
the classes) is not in such a checkpoint (EsViT's "head" is the DINO head);
kd's models have one, so the file gets zeros for --num-classes classes
(default 1000), which kd's fine-tune or linear evaluation trains.

--arch is checked against the shapes: embed dim, depths, heads and window
(7) must be kd's variant's, else an error names both. Absolute position
embeddings (ape=True) have no place in kd's Swin and are refused.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_io import load_safetensors, save_safetensors  # noqa: E402

# kd's variants (src/models/swin.c): embed dim, depths, heads, window.
ARCHS = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
}
HEADS = ("head.", "head_dense.")


def state_dict_of(obj, which):
    """The teacher's (or student's) state dict of an EsViT checkpoint."""
    if isinstance(obj, dict) and ("teacher" in obj or "student" in obj):
        if which not in obj or not isinstance(obj[which], dict):
            raise ValueError("the checkpoint has no '%s' state dict (it has %s)"
                             % (which, ", ".join(sorted(k for k in obj if isinstance(obj[k], dict)))))
        return obj[which]
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def relative_position_index(ws):
    """torchvision's (and EsViT's) index of the bias table, flattened (ws^4)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1).flatten()


BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
MERGE = re.compile(r"layers\.(\d+)\.downsample\.(reduction|norm)\.(.+)$")
BLOCK_PARTS = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
               "norm2": "norm2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}


def tv_name(k):
    """torchvision's name of EsViT backbone tensor k, or None for one kd has no place for."""
    if k.startswith("patch_embed.proj."):
        return "features.0.0." + k[len("patch_embed.proj."):]
    if k.startswith("patch_embed.norm."):
        return "features.0.2." + k[len("patch_embed.norm."):]
    if re.match(r"norm\.(weight|bias)$", k):
        return k
    m = MERGE.match(k)
    if m:
        return "features.%d.%s.%s" % (2 * int(m.group(1)) + 2, m.group(2), m.group(3))
    m = BLOCK.match(k)
    if m:
        f, j, rest = 2 * int(m.group(1)) + 1, int(m.group(2)), m.group(3)
        if rest in ("attn.relative_position_bias_table", "attn.relative_position_index"):
            return "features.%d.%d.%s" % (f, j, rest)
        for src, dst in BLOCK_PARTS.items():
            if rest.startswith(src + "."):
                return "features.%d.%d.%s.%s" % (f, j, dst, rest[len(src) + 1:])
    return None


def strip(k):
    if k.startswith("module."):
        k = k[len("module."):]
    if k.startswith("backbone."):
        k = k[len("backbone."):]
    return k


def check_arch(arch, bb):
    """--arch against the shapes: embed dim, depths, heads, window."""
    if arch not in ARCHS:
        raise ValueError("--arch %s: kd converts EsViT's %s" % (arch, ", ".join(ARCHS)))
    embed, depths, heads, ws = ARCHS[arch]
    if "features.0.0.weight" not in bb:
        raise ValueError("no patch embedding (patch_embed.proj.weight): not a Swin backbone")
    got_embed = bb["features.0.0.weight"].shape[0]
    got_depths = []
    while any(k.startswith("features.%d." % (2 * len(got_depths) + 1)) for k in bb):
        f = 2 * len(got_depths) + 1
        got_depths.append(len({k.split(".")[2] for k in bb if k.startswith("features.%d." % f)}))
    got_depths = tuple(got_depths)
    if got_embed != embed or got_depths != depths:
        raise ValueError("--arch %s is embed dim %d, depths %s; the checkpoint has embed dim %d, depths %s"
                         % (arch, embed, "-".join(map(str, depths)), got_embed, "-".join(map(str, got_depths))))
    for s, d in enumerate(depths):
        for j in range(d):
            t = bb.get("features.%d.%d.attn.relative_position_bias_table" % (2 * s + 1, j))
            if t is None:
                raise ValueError("stage %d block %d has no relative_position_bias_table" % (s, j))
            want = ((2 * ws - 1) ** 2, heads[s])
            if tuple(t.shape) != want:
                w = int(round(t.shape[0] ** 0.5) + 1) // 2
                raise ValueError("--arch %s has window %d and %d heads in stage %d (bias table %s); the "
                                 "checkpoint's layers.%d.blocks.%d has window %d and %d heads (bias table %s)"
                                 % (arch, ws, heads[s], s, tuple(want), s, j, w, t.shape[1], tuple(t.shape)))


def convert_sd(sd, arch, keep_heads=False, num_classes=1000):
    """EsViT state dict -> (kd tensors by torchvision name, list of dropped names)."""
    out, dropped = {}, []
    for k0, v in sd.items():
        if not torch.is_tensor(v):
            continue
        if v.dtype.is_floating_point and v.dtype != torch.float32:
            v = v.float()
        k = strip(k0)
        if k.startswith(HEADS):
            if keep_heads:
                out[k] = v
            else:
                dropped.append(k0)
            continue
        if k.endswith("attn_mask"):
            dropped.append(k0)
            continue
        if k == "absolute_pos_embed":
            raise ValueError("%s: absolute position embeddings (ape=True) are not part of kd's Swin" % k0)
        n = tv_name(k)
        if n is None:
            raise ValueError("%s: not a tensor of EsViT's Swin backbone (after the prefixes: %s)" % (k0, k))
        if n.endswith("relative_position_index"):
            v = v.reshape(-1).to(torch.int64)
        out[n] = v
    check_arch(arch, out)
    embed, depths, heads, ws = ARCHS[arch]
    idx = relative_position_index(ws)
    for s, d in enumerate(depths):
        for j in range(d):
            n = "features.%d.%d.attn.relative_position_index" % (2 * s + 1, j)
            if n not in out:
                out[n] = idx.clone()
            elif not torch.equal(out[n], idx):
                raise ValueError("%s differs from the relative position index of window %d" % (n, ws))
    if "head.weight" not in out:
        c = out["norm.weight"].shape[0]
        out["head.weight"] = torch.zeros(num_classes, c)
        out["head.bias"] = torch.zeros(num_classes)
    return out, dropped


def convert(pth, dst, arch, which="teacher", keep_heads=False, num_classes=1000):
    obj = torch.load(pth, map_location="cpu")
    out, dropped = convert_sd(state_dict_of(obj, which), arch, keep_heads, num_classes)
    meta = {"format": "kd-checkpoint-1", "arch": arch, "in_channels": out["features.0.0.weight"].shape[1],
            "num_classes": num_classes, "ssl_method": "esvit", "esvit_state": which,
            "source": os.path.basename(pth)}
    if keep_heads and any(k.startswith(HEADS) for k in out):
        meta["head"] = "dino"
    save_safetensors(dst, out, meta)
    return out, meta, dropped


# ---------------------------------------------------------------- self-test

def esvit_state_dict(embed, depths, heads, ws, gen, dense=True, masks=True, out_dim=64, bottleneck=16):
    """An EsViT SwinTransformer + DINO heads state dict, names and shapes
    written from microsoft/esvit's module tree (models/swin_transformer.py:
    PatchEmbed, BasicLayer.blocks[j] = SwinTransformerBlock(norm1,
    attn = WindowAttention(relative_position_bias_table, qkv, proj), norm2,
    mlp = Mlp(fc1, fc2)), BasicLayer.downsample = PatchMerging(reduction,
    norm), norm; main_esvit.py's DINOHead as head / head_dense), random
    values; attn_mask buffers in the shifted blocks as older Swin code keeps."""
    sd = {}

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = r(embed, 3, 4, 4), r(embed)
    sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"] = r(embed), r(embed)
    N = ws * ws
    # EsViT's index: 2-D (N, N), built in its own (non-flattened) way.
    idx2 = torch.zeros(N, N, dtype=torch.int64)
    for a in range(N):
        for b in range(N):
            dy, dx = a // ws - b // ws, a % ws - b % ws
            idx2[a, b] = (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)
    res = 56
    for i, (d, h) in enumerate(zip(depths, heads)):
        C = embed * 2 ** i
        for j in range(d):
            p = "layers.%d.blocks.%d." % (i, j)
            sd[p + "norm1.weight"], sd[p + "norm1.bias"] = r(C), r(C)
            sd[p + "attn.relative_position_bias_table"] = r((2 * ws - 1) ** 2, h)
            sd[p + "attn.relative_position_index"] = idx2.clone()
            sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = r(3 * C, C), r(3 * C)
            sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(C, C), r(C)
            sd[p + "norm2.weight"], sd[p + "norm2.bias"] = r(C), r(C)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * C, C), r(4 * C)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(C, 4 * C), r(C)
            if masks and j % 2 == 1 and res > ws:
                sd[p + "attn_mask"] = torch.zeros((res // ws) ** 2, N, N)
        if i + 1 < len(depths):
            p = "layers.%d.downsample." % i
            sd[p + "reduction.weight"] = r(2 * C, 4 * C)
            sd[p + "norm.weight"], sd[p + "norm.bias"] = r(4 * C), r(4 * C)
            res //= 2
    C = embed * 2 ** (len(depths) - 1)
    sd["norm.weight"], sd["norm.bias"] = r(C), r(C)
    for hname in ("head",) + (("head_dense",) if dense else ()):
        sd[hname + ".mlp.0.weight"], sd[hname + ".mlp.0.bias"] = r(32, C), r(32)
        sd[hname + ".mlp.2.weight"], sd[hname + ".mlp.2.bias"] = r(32, 32), r(32)
        sd[hname + ".mlp.4.weight"], sd[hname + ".mlp.4.bias"] = r(bottleneck, 32), r(bottleneck)
        sd[hname + ".last_layer.weight_g"] = torch.ones(out_dim, 1)
        sd[hname + ".last_layer.weight_v"] = r(out_dim, bottleneck)
    return sd


def esvit_name_of(tv):
    """The inverse of the conversion, written from torchvision's side (the
    self-test's own mapping): torchvision name -> EsViT name."""
    p = tv.split(".")
    if p[0] == "features" and p[1] == "0":
        return ("patch_embed.proj." if p[2] == "0" else "patch_embed.norm.") + p[3]
    if p[0] == "features":
        f = int(p[1])
        if f % 2 == 0:
            return "layers.%d.downsample.%s" % (f // 2 - 1, ".".join(p[2:]))
        rest = ".".join(p[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
        return "layers.%d.blocks.%s.%s" % ((f - 1) // 2, p[2], rest)
    return tv


def self_test(kd_bin=None):
    """An EsViT checkpoint of a Swin-T (teacher bare, student under "module.",
    DINO heads, attn_mask buffers), written by torch.save, converted: the file
    loads into torchvision's swin_t with strict=True, its relative position
    indices are torchvision's, every backbone tensor is the EsViT tensor it
    comes from (the self-test's own inverse mapping), the heads and masks are
    dropped (kept with keep_heads), head.* of the classifier are zeros; a
    wrong --arch and a window-14 checkpoint are refused naming both; with
    --kd, `kd info` reads the file (architecture, parameter count)."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    embed, depths, heads, ws = ARCHS["swin_t"]
    teacher = esvit_state_dict(embed, depths, heads, ws, g)
    student = {"module." + k: v for k, v in esvit_state_dict(embed, depths, heads, ws, g).items()}
    bad = 0

    def fail(msg):
        nonlocal bad
        print("self-test: " + msg)
        bad += 1

    tv = torchvision.models.swin_t(weights=None, num_classes=10)
    tv_sd = tv.state_dict()
    with tempfile.TemporaryDirectory() as d:
        pth = os.path.join(d, "checkpoint.pth")
        torch.save({"student": student, "teacher": teacher, "epoch": 1, "args": None}, pth)
        for which, src, keep in (("teacher", teacher, False), ("student", student, True)):
            dst = os.path.join(d, which + ".safetensors")
            convert(pth, dst, "swin_t", which, keep, 10)
            got, meta = load_safetensors(dst)
            src = {strip(k): v for k, v in src.items()}
            model = {k: v for k, v in got.items() if not k.startswith(HEADS) or k in ("head.weight", "head.bias")}
            try:
                tv.load_state_dict(model, strict=True)
            except RuntimeError as e:
                fail("%s: torchvision swin_t refuses the file: %s" % (which, str(e)[:400]))
            for n, v in tv_sd.items():
                if n.endswith("relative_position_index"):
                    if not torch.equal(got[n], v):
                        fail("%s: %s is not torchvision's" % (which, n))
                elif n.startswith("head."):
                    if got[n].shape != v.shape or got[n].abs().sum() != 0:
                        fail("%s: %s is not zeros of %s" % (which, n, tuple(v.shape)))
                elif not torch.equal(got[n], src[esvit_name_of(n)]):
                    fail("%s: %s is not EsViT's %s" % (which, n, esvit_name_of(n)))
            used = {esvit_name_of(n) for n in tv_sd}
            left = [k for k in src if k not in used and not k.startswith(HEADS) and not k.endswith("attn_mask")]
            if left:
                fail("%s: EsViT tensors with no torchvision counterpart: %s" % (which, left[:5]))
            heads_in = sorted(k for k in got if k.startswith(HEADS) and k not in ("head.weight", "head.bias"))
            want_heads = sorted(k for k in src if k.startswith(HEADS)) if keep else []
            if heads_in != want_heads:
                fail("%s: heads in the file %s, expected %s" % (which, heads_in[:4], want_heads[:4]))
            for k in want_heads:
                if not torch.equal(got[k], src[k]):
                    fail("%s: head tensor %s changed" % (which, k))
            if any("attn_mask" in k for k in got):
                fail("%s: an attn_mask buffer leaked into the file" % which)
            if meta.get("arch") != "swin_t" or meta.get("num_classes") != "10" or \
                    (meta.get("head") == "dino") != keep:
                fail("%s: metadata %s" % (which, meta))
            if kd_bin:
                r = subprocess.run([kd_bin, "info", dst], capture_output=True, text=True)
                total = sum(v.numel() for v in got.values())
                first = r.stdout.splitlines()[0] if r.stdout else ""
                if r.returncode != 0 or "architecture swin_t" not in first or \
                        " %d parameters" % total not in first:
                    fail("%s: kd info: rc %d, %r (expected %d parameters, swin_t) %s"
                         % (which, r.returncode, first, total, r.stderr.strip()))
        # Refusals: another arch, another window.
        for arch, sd, what in (("swin_s", teacher, "depths"),
                               ("swin_t", esvit_state_dict(embed, depths, heads, 14, g, masks=False), "window 14")):
            try:
                convert_sd(sd, arch)
                fail("%s: %s accepted" % (arch, what))
            except ValueError as e:
                msg = str(e)
                if arch not in msg or ("2-2-18-2" not in msg if what == "depths" else "window 14" not in msg):
                    fail("the %s refusal does not name both: %s" % (what, msg))
        try:
            convert_sd(dict(teacher, absolute_pos_embed=torch.zeros(1, 3136, 96)), "swin_t")
            fail("absolute_pos_embed accepted")
        except ValueError:
            pass
        try:
            state_dict_of({"teacher": teacher}, "student")
            fail("a missing student accepted")
        except ValueError:
            pass
    print("convert_esvit self-test: %s" % ("ok" if bad == 0 else "%d failures" % bad))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?")
    ap.add_argument("dst", nargs="?")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="kd architecture: swin_t, swin_s, swin_b")
    ap.add_argument("--which", default="teacher", choices=["teacher", "student"])
    ap.add_argument("--keep-heads", action="store_true", help="keep the DINO heads as head.* / head_dense.*")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--kd", help="with --self-test: the kd program, to read the converted file (kd info)")
    a = ap.parse_args()
    if a.self_test:
        return self_test(a.kd)
    if not a.src or not a.dst or not a.arch:
        ap.error("give SRC DST --arch ARCH (or --self-test)")
    if a.num_classes < 1:
        ap.error("--num-classes %d: give at least 1" % a.num_classes)
    try:
        out, meta, dropped = convert(a.src, a.dst, a.arch, a.which, a.keep_heads, a.num_classes)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        print("convert_esvit: %s: %s" % (a.src, e), file=sys.stderr)
        return 2
    print("%s: %s of %s, %d tensors%s, %d dropped -> %s"
          % (a.src, a.which, a.arch, len(out), ", DINO heads kept" if "head" in meta else "",
             len(dropped), a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
