#!/usr/bin/env python3
"""Writes the seed corpora of the kd fuzz targets to fuzz/corpus/<target>/.

Every seed is small (at most a few KB) and generated here; nothing is
downloaded. Needs Python 3 and, for the JPEG/PNG seeds, Pillow (Debian's
python3-pil). Run from anywhere: python3 fuzz/make_corpus.py
"""
import gzip
import io
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def idx_images(n, h, w):
    return struct.pack(">IIII", 0x803, n, h, w) + bytes((i * 7) % 256 for i in range(n * h * w))


def idx_labels(n):
    return struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))


def png_bytes(w, h, mode="RGB", interlace=False):
    from PIL import Image
    im = Image.new(mode, (w, h))
    px = im.load()
    for y in range(h):
        for x in range(w):
            v = (x * 40 + y * 20) % 256
            px[x, y] = {"RGB": (v, 255 - v, x * 30 % 256), "L": v, "RGBA": (v, v, 0, 128),
                        "P": v % 16, "1": v & 1, "I;16": v * 256}[mode]
    b = io.BytesIO()
    im.save(b, "PNG", interlace=1 if interlace else 0)
    return b.getvalue()


def jpeg_bytes(w, h, mode="RGB", progressive=False, quality=75, subsampling=2):
    from PIL import Image
    im = Image.new(mode, (w, h))
    px = im.load()
    for y in range(h):
        for x in range(w):
            v = (x * 40 + y * 20) % 256
            px[x, y] = {"RGB": (v, 255 - v, x * 30 % 256), "L": v, "CMYK": (v, 0, 255 - v, 30)}[mode]
    b = io.BytesIO()
    kw = {"quality": quality, "progressive": progressive}
    if mode == "RGB":
        kw["subsampling"] = subsampling
    im.save(b, "JPEG", **kw)
    return b.getvalue()


def st_file(tensors, meta=None):
    header, data = {}, b""
    if meta:
        header["__metadata__"] = meta
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def main():
    # IDX: byte 0 = mode (bit 0 labels file, bit 1 gzip by the target, bit 2 raw .gz).
    put("idx", "images_plain", b"\x00" + idx_images(3, 4, 5))
    put("idx", "images_gz_by_target", b"\x02" + idx_images(2, 3, 3))
    put("idx", "images_raw_gz", b"\x04" + gzip.compress(idx_images(2, 2, 2)))
    put("idx", "labels_plain", b"\x01" + idx_labels(4))
    put("idx", "labels_raw_gz", b"\x05" + gzip.compress(idx_labels(2)))
    put("idx", "header_only", b"\x00" + struct.pack(">IIII", 0x803, 1000, 28, 28))
    # CIFAR: byte 0 even = CIFAR-10, odd = CIFAR-100.
    rec10 = bytes([3]) + bytes(range(256)) * 12
    put("cifar", "cifar10_two", b"\x00" + rec10 + bytes([9]) + bytes(3072))
    put("cifar", "cifar100_one", b"\x01" + bytes([4, 42]) + bytes(range(256)) * 12)
    put("cifar", "cifar10_short", b"\x00" + rec10[:100])
    # STL-10: byte 0 = records (bits 0-1), odd size (bit 3), test (bit 4), unlabeled (bit 5).
    put("stl10", "train_2", bytes([1, 1, 10]))
    put("stl10", "test_4", bytes([16 | 3, 1, 2, 3, 4]))
    put("stl10", "unlabeled", bytes([32 | 2]))
    put("stl10", "bad_label", bytes([0, 11]))
    # safetensors.
    put("safetensors", "f32_i64", st_file({"a": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
                                           "b": ("I64", [1], struct.pack("<q", 7))},
                                          {"format": "pt"}))
    put("safetensors", "bf16_u8_empty", st_file({"x": ("BF16", [3], bytes(6)), "y": ("U8", [0], b""),
                                                 "z": ("I32", [], struct.pack("<i", 5))}))
    put("safetensors", "f16_nested", st_file({"layer.0.weight": ("F16", [1, 2, 1, 1], bytes(4))}))
    # Images.
    put("png", "rgb", png_bytes(5, 4))
    put("png", "gray", png_bytes(3, 3, "L"))
    put("png", "rgba_interlaced", png_bytes(9, 7, "RGBA", interlace=True))
    put("png", "palette", png_bytes(4, 4, "P"))
    put("png", "bilevel", png_bytes(9, 2, "1"))
    put("png", "gray16", png_bytes(3, 2, "I;16"))
    put("jpeg", "baseline", jpeg_bytes(16, 8))
    put("jpeg", "progressive", jpeg_bytes(17, 9, progressive=True))
    put("jpeg", "gray", jpeg_bytes(8, 8, "L"))
    put("jpeg", "cmyk", jpeg_bytes(8, 8, "CMYK"))
    put("jpeg", "444_q95", jpeg_bytes(10, 10, quality=95, subsampling=0))
    # Folders: entries of (name length, name, data length LE16, data).
    def entry(name, data):
        n = name.encode()
        return bytes([len(n)]) + n + struct.pack("<H", len(data)) + data
    p, j = png_bytes(3, 3), jpeg_bytes(8, 8)
    put("folder", "classes", entry("cat/a.png", p) + entry("dog/b.jpg", j) + entry("dog/sub/c.PNG", p))
    put("folder", "splits", entry("train/x/a.png", p) + entry("val/x/b.png", p) + entry("train/y/c.jpg", j)
        + entry("unlabeled/u.jpg", j))
    put("folder", "flat", entry("a.png", p) + entry("b.jpeg", j) + entry(".hidden.png", p))
    put("folder", "bad_image", entry("c/a.png", b"not a png") + entry("c/b.jpg", j[: len(j) // 2]))
    # File lists (a.png, d/c.png exist beside the list).
    put("list", "labelled", b"a.png 0\n# comment\n\nd/c.png 3\nmissing.jpg 1\n")
    put("list", "unlabelled", b"a.png\nd/c.png\n")
    put("list", "spaces", b"  a file with spaces.png 2  \r\n/abs/path.png 0\n")
    put("list", "mixed_bad", b"a.png 1\nd/c.png\n")
    # YAML configs.
    put("config", "basic", b"model: resnet8\ndata: /nonexistent\nepochs: 2\nbatch_size: 64\nlr: 0.05\n")
    put("config", "distill", b"model: resnet8\nteacher: resnet32x4\nmethod: kd\nkd.T: 4\nalpha: 0.9\n"
        b"gamma: 0.1\nsched: cosine\nprecision: bf16\n")
    put("config", "weird", b"# comment\n? complex\n: value\nlist: [1, 2]\nmap: {a: 1}\nanchor: &a x\nref: *a\n")
    put("config", "quoted", b"\"model\": 'resnet8'\nout: \"runs/x y\"\nseed: 0x10\nthreads: -1\n")
    # CLI: byte 0 % 5 picks train, distill, eval, select, export; NUL-separated arguments.
    def cli(which, *args):
        return bytes([which]) + b"\0".join(a.encode() for a in args)
    put("cli", "train", cli(0, "--model", "resnet8", "--epochs=3", "--data", "/nonexistent"))
    put("cli", "distill_set", cli(1, "--method", "kd", "--set", "kd.T=4", "--teacher", "resnet32x4"))
    put("cli", "resume", cli(1, "--resume", "runs/x", "--epochs", "9", "--set", "dkd.beta=8"))
    put("cli", "help", cli(0, "--help", "--lr", "0.1"))
    put("cli", "bad", cli(0, "positional", "--unknown-flag", "1"))
    put("cli", "eval_knn", cli(2, "--knn", "--k", "5,20", "--ckpt", "x", "--out", "y", "--temperature=0.1"))
    put("cli", "eval_linear", cli(2, "--linear", "--epochs", "3", "--labels", "10%", "--seed", "7", "--lr", "0.5"))
    put("cli", "select", cli(3, "--per-class", "10", "--teacher-ckpt", "t", "--out", "o", "--batch", "-1"))
    put("cli", "export", cli(4, "--ema", "--ckpt=a", "--out"))


if __name__ == "__main__":
    main()
