#!/usr/bin/python3
"""kNN reference for tests/test_eval.c (numpy only; no torch needed).

Written from METHODS.md section 15 (DINO's eval_knn.py knn_classifier):
cosine similarity (the rows are L2-normalised, so a dot product), the k most
similar training rows, each voting exp(sim / T) for its label, summed per
class; the prediction is the class of largest sum. kd's documented tie rules
are applied: equally similar training rows are ordered by index (smaller is
nearer), equal class sums by class index (smaller ranks first).

Two cases, each in tests/fixtures/knn.safetensors under "<case>.<name>":
  exact   features on a dyadic grid (small integers / 4, unnormalised): every
          dot product is exact in float32 and float64, so kd and this script
          see the same similarities, with many exact ties; neighbour lists
          and predictions must match exactly.
  random  L2-normalised Gaussian features (float32, normalised here as
          F.normalize does); redrawn until every k-boundary similarity gap
          and every winning class margin is wide enough that float32 rounding
          cannot reorder them.
Each case stores train (n, d) F32, train_labels I32, query F32,
query_labels I32, k I32, scores (q, n_k, C) F32 (float64 sums rounded),
pred (q, n_k) I32, hits1 / hits5 (n_k) I32 (correct top-1 / top-5 counts),
neighbors (q, NB) I32 (the NB nearest, nearest first; exact case only), and
for the random case raw (q, d) F32 with its normalised rows in query.
Metadata: <case>.temperature. Exponentials use math.exp (the C library's
exp, as kd) so equal sums stay equal on both sides.

    /usr/bin/python3 tools/gen_knn_fixtures.py tests/fixtures
"""

import json
import math
import os
import struct
import sys

import numpy as np

NB = 25  # neighbours stored per query (exact case)


def save_safetensors(path, tensors, metadata):
    """Writes name -> numpy array (float32, int32, int64) with str metadata."""
    kinds = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
    items = sorted(tensors.items(), key=lambda it: (-it[1].dtype.itemsize, it[0]))
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs, off = [], 0
    for name, a in items:
        a = np.ascontiguousarray(a)
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": kinds[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
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


def knn(train, train_labels, query, ks, T, classes):
    """Reference scores (q, n_k, C) float64, sorted neighbour indices and sims."""
    sims = query.astype(np.float64) @ train.astype(np.float64).T
    n = train.shape[0]
    idx = np.arange(n)
    scores = np.zeros((query.shape[0], len(ks), classes))
    order = np.zeros((query.shape[0], n), dtype=np.int64)
    for i in range(query.shape[0]):
        o = np.lexsort((idx, -sims[i]))  # by similarity descending, then index
        order[i] = o
        for j, k in enumerate(ks):
            for r in range(k):  # nearest first, as kd sums
                scores[i, j, train_labels[o[r]]] += math.exp(sims[i, o[r]] / T)
    return scores, order, sims


def rank_of(row, y):
    """Classes ahead of y: a larger sum, or an equal one with a smaller index."""
    return int(np.sum((row > row[y]) | ((row == row[y]) & (np.arange(len(row)) < y))))


def summarise(scores, query_labels):
    q, nk, _ = scores.shape
    pred = np.zeros((q, nk), dtype=np.int32)
    h1 = np.zeros(nk, dtype=np.int32)
    h5 = np.zeros(nk, dtype=np.int32)
    for i in range(q):
        for j in range(nk):
            row = scores[i, j]
            pred[i, j] = min(range(len(row)), key=lambda c: (-row[c], c))
            r = rank_of(row, query_labels[i])
            h1[j] += r == 0
            h5[j] += r < 5
    return pred, h1, h5


def case_exact(rng):
    n, q, d, C = 500, 80, 12, 6
    ks = [1, 5, 20, n]
    T = 0.5
    train = (rng.integers(-3, 4, size=(n, d)) / 4.0).astype(np.float32)
    # Duplicated rows with other labels: exact ties broken by index.
    train[n // 2:n // 2 + 40] = train[:40]
    train_labels = rng.integers(0, C, size=n).astype(np.int32)
    query = (rng.integers(-3, 4, size=(q, d)) / 4.0).astype(np.float32)
    query[:10] = train[100:110]  # queries equal to training rows
    query_labels = rng.integers(0, C, size=q).astype(np.int32)
    scores, order, _ = knn(train, train_labels, query, ks, T, C)
    pred, h1, h5 = summarise(scores, query_labels)
    return {"train": train, "train_labels": train_labels, "query": query, "query_labels": query_labels,
            "k": np.array(ks, dtype=np.int32), "scores": scores.astype(np.float32), "pred": pred,
            "hits1": h1, "hits5": h5, "neighbors": order[:, :NB].astype(np.int32)}, T


def normalize(x):
    x = x.astype(np.float32)
    nrm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=1)).astype(np.float32)
    return (x / np.maximum(nrm, np.float32(1e-12))[:, None]).astype(np.float32)


def case_random(rng):
    n, q, d, C = 600, 100, 13, 7
    ks = [1, 10, 20, 200]
    T = 0.07
    for attempt in range(200):
        # Class-dependent means so that the votes mean something.
        means = rng.normal(size=(C, d))
        train_labels = rng.integers(0, C, size=n).astype(np.int32)
        query_labels = rng.integers(0, C, size=q).astype(np.int32)
        train = normalize(means[train_labels] + 1.5 * rng.normal(size=(n, d)))
        raw = (means[query_labels] + 1.5 * rng.normal(size=(q, d))).astype(np.float32)
        query = normalize(raw)
        scores, order, sims = knn(train, train_labels, query, ks, T, C)
        ok = True
        for i in range(q):
            s = sims[i, order[i]]
            for k in ks:
                if k < n and s[k - 1] - s[k] < 1e-5:
                    ok = False
            for j in range(len(ks)):
                top = np.sort(scores[i, j])[::-1]
                if top[0] - top[1] < 1e-4 * top[0]:
                    ok = False
                y = query_labels[i]
                # The label's own rank must not hinge on rounding either.
                diff = np.abs(scores[i, j] - scores[i, j, y])
                diff[y] = np.inf
                diff[diff == 0] = np.inf  # classes without votes tie exactly (0 == 0) on both sides
                if np.min(diff) < 1e-4 * top[0]:
                    ok = False
        if ok:
            break
    else:
        raise SystemExit("no draw with clear margins")
    pred, h1, h5 = summarise(scores, query_labels)
    return {"train": train, "train_labels": train_labels, "query": query, "query_labels": query_labels,
            "raw": raw, "k": np.array(ks, dtype=np.int32), "scores": scores.astype(np.float32), "pred": pred,
            "hits1": h1, "hits5": h5}, T


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    rng = np.random.default_rng(20240610)
    tensors, meta = {}, {"generator": "tools/gen_knn_fixtures.py", "numpy": np.__version__}
    for name, fn in (("exact", case_exact), ("random", case_random)):
        t, T = fn(rng)
        for k, v in t.items():
            tensors[f"{name}.{k}"] = v
        meta[f"{name}.temperature"] = repr(T)
    path = os.path.join(out, "knn.safetensors")
    save_safetensors(path, tensors, meta)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
