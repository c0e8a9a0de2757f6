#!/usr/bin/python3
"""PyTorch's own bf16 against fp32 on the recipe of tools/bf16_accuracy.sh.

Is the accuracy bf16 loses in kd's `--precision bf16` training inherent to
bf16 convolutions at that budget? This trains the same network (RepDistiller's
resnet8, global average pooling, one input channel) with the same recipe
(Fashion-MNIST's 60000 training images normalised by their mean and std,
random crop with padding 2 and horizontal flip, batch 128, SGD lr 0.05
momentum 0.9 weight decay 5e-4, cosine per step to 0, EPOCHS epochs) in
PyTorch float32 and under torch.autocast("cpu", torch.bfloat16) (bf16
convolutions and linear layers, float32 weights, as kd), with the same seed,
initialisation and data order for both, and prints one JSON line per run and
the paired differences. Not kd's data order or initialisation: compare the
gap, not the numbers.

Usage: /usr/bin/python3 tools/bf16_accuracy_torch.py [--epochs 3] [--seeds 0,1,2]
       [--threads 2] [--out runs/bf16_accuracy_torch.jsonl]
"""
import argparse
import gzip
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_zoo_fixtures import CifarResNet  # noqa: E402

DATA = "/usr/share/datasets/fashion-mnist"


def idx(path):
    with gzip.open(path, "rb") as f:
        b = f.read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


class Net(CifarResNet):
    """resnet8 with global average pooling (28x28 inputs end at 7x7)."""

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3):
            x, _ = self._stage(layer, x)
        return self.fc(x.mean((2, 3)))


def run(seed, bf16, epochs, xtr, ytr, xte, yte, max_steps=0):
    torch.manual_seed(seed)
    net = Net(8, [16, 16, 32, 64], num_classes=10, in_channels=1).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(seed)
    n, bs = len(xtr), 128
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s / steps, 1.0))))
    t0 = time.time()
    for _ in range(epochs):
        net.train()
        perm = rng.permutation(n)
        for i in range(n // bs if not max_steps else max_steps):
            b = perm[i * bs:(i + 1) * bs]
            # random crop with padding 2 and horizontal flip, per image
            pad = np.pad(xtr[b], ((0, 0), (2, 2), (2, 2)))
            oy, ox = rng.integers(0, 5, len(b)), rng.integers(0, 5, len(b))
            flip = rng.random(len(b)) < 0.5
            x = np.stack([pad[j, oy[j]:oy[j] + 28, ox[j]:ox[j] + 28] for j in range(len(b))])
            x[flip] = x[flip, :, ::-1]
            xt = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(xt).float(), torch.from_numpy(ytr[b]).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xte), 500):
            xt = torch.from_numpy(xte[i:i + 500]).unsqueeze(1).contiguous(memory_format=torch.channels_last)
            correct += (net(xt).argmax(1).numpy() == yte[i:i + 500]).sum()
    return 100.0 * correct / len(xte), time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bf16_accuracy_torch.jsonl")
    ap.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: all; a smoke test)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    xtr = idx(os.path.join(DATA, "train-images-idx3-ubyte.gz")).astype(np.float32) / 255
    ytr = idx(os.path.join(DATA, "train-labels-idx1-ubyte.gz")).astype(np.int64)
    xte = idx(os.path.join(DATA, "t10k-images-idx3-ubyte.gz")).astype(np.float32) / 255
    yte = idx(os.path.join(DATA, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    res = {}
    with open(a.out, "a") as f:
        for seed in [int(s) for s in a.seeds.split(",")]:
            for p in ("f32", "bf16"):
                top1, wall = run(seed, p == "bf16", a.epochs, xtr, ytr, xte, yte, a.max_steps)
                res[(seed, p)] = top1
                rec = {"torch": torch.__version__, "seed": seed, "precision": p, "epochs": a.epochs,
                       "top1": round(float(top1), 2), "wall_s": round(wall, 1)}
                print(json.dumps(rec), flush=True)
                f.write(json.dumps(rec) + "\n")
    seeds = sorted({s for s, _ in res})
    for p in ("f32", "bf16"):
        v = [res[(s, p)] for s in seeds]
        print("%s: %.2f +- %.2f" % (p, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0))
    d = [res[(s, "bf16")] - res[(s, "f32")] for s in seeds]
    print("bf16 - f32 (paired): %.2f +- %.2f  (%s)" % (statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0,
                                                       ", ".join("%.2f" % x for x in d)))


if __name__ == "__main__":
    main()
