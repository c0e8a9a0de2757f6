"""safetensors in and out for kd's Python tools, with torch only (Debian has no
safetensors package). One copy, used by the fixture generators, the
converter and the benchmarks.

    from st_io import save_safetensors, load_safetensors
"""

import json
import os
import struct

import torch

DTYPES = {torch.float32: ("F32", 4), torch.int64: ("I64", 8)}
BY_NAME = {"F32": torch.float32, "I64": torch.int64}


def save_safetensors(path, tensors, metadata):
    """Writes `tensors` (name -> tensor) with a str->str `metadata` map.

    Layout: 8-byte little-endian header length, JSON header padded with spaces
    to a multiple of 8, then the raw little-endian data with no gaps. Entries
    are ordered by element size (largest first), then by name, so every tensor
    starts at an offset aligned to its element size.
    """
    items = []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        if t.dtype not in DTYPES:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        items.append((name, t))
    items.sort(key=lambda it: (-DTYPES[it[1].dtype][1], it[0]))
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs, off = [], 0
    for name, t in items:
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": DTYPES[t.dtype][0], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
    return 8 + len(hjson) + off


def load_safetensors(path):
    """Returns (name -> tensor, metadata) for F32/I64 safetensors files."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, e in header.items():
        if e["dtype"] not in BY_NAME:
            raise ValueError(f"{path}: {name} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        buf = bytearray(data[base + a:base + b])
        t = torch.frombuffer(buf, dtype=BY_NAME[e["dtype"]]) if b > a else \
            torch.empty(0, dtype=BY_NAME[e["dtype"]])
        out[name] = t.reshape(e["shape"]).clone()
    return out, meta
