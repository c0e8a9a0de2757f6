"""CRD in RepDistiller's form (crd/criterion.py CRDLoss, Embed, ContrastLoss;
crd/memory.py ContrastMemory; dataset/cifar100.py CIFAR100InstanceSample;
weights from scripts/run_cifar_distill.sh: gamma 1, alpha 0, beta 0.8),
written from ../shared/METHODS.md section 2. Like the official code it gathers
the (B, K+1, D) bank rows and multiplies them with a bmm.

kd splits ContrastMemory.forward in two: the scores (with the normaliser Z
set on the first batch) in the step, the bank update after the optimiser
step. term() does the first; extra() returns the banks after the second
("updated.contrast.memory_v1/_v2", from the embeddings of the same forward),
which tests/test_crd.c compares with kd's after_step.

The sampler's draw is random in the official code (and kd's own stream in
kd), so the cases here fix it: in "exact" mode with classes of equal size and
nce_k = N - (class size), every sample's negatives are all the images of the
other classes, in any order (the loss sums over them), whatever the draw.
Queue mode draws nothing: the negatives are the whole queue, the positive the
other model's embedding of the same image."""
import math

import torch
import torch.nn as nn

from .common import feats, make_case

NAME = "crd"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=0.8, T=4.0)
EPS = 1e-7


class Normalize(nn.Module):
    def forward(self, x):
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class Embed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize()

    def forward(self, x):
        return self.l2norm(self.linear(x.view(x.shape[0], -1)))


class Contrast(nn.Module):
    """ContrastMemory's buffers: params = [K, T, Z_v1, Z_v2, momentum] and the
    two banks (or, in queue mode, the two queues and their write pointer)."""

    def __init__(self, rows, dim, K, T, momentum, queue, gen):
        super().__init__()
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum], dtype=torch.float32))
        stdv = 1. / math.sqrt(dim / 3)
        a = "queue" if queue else "memory"
        self.register_buffer(f"{a}_v1", torch.rand(rows, dim, generator=gen).mul_(2 * stdv).add_(-stdv))
        self.register_buffer(f"{a}_v2", torch.rand(rows, dim, generator=gen).mul_(2 * stdv).add_(-stdv))
        if queue:
            self.register_buffer("queue_ptr", torch.tensor([3], dtype=torch.int64))


class CRD(nn.Module):
    def __init__(self, d_s, d_t, dim, rows, K, T, momentum, queue, gen):
        super().__init__()
        self.embed_s = Embed(d_s, dim)
        self.embed_t = Embed(d_t, dim)
        self.contrast = Contrast(rows, dim, K, T, momentum, queue, gen)


def contrast_loss(x, n_data):
    """ContrastLoss: x (B, K+1) of p = exp(score / T) / Z, positive first."""
    bsz, m = x.shape[0], x.shape[1] - 1
    Pn = 1. / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + EPS)).log()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + EPS)).log()
    return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


def _z(mod, k, out, n_data):
    """The normaliser of side k (2: student scores, 3: teacher scores): set on
    the first batch to mean(out) * N (a Python float in the official code),
    then frozen."""
    p = mod.contrast.params
    if p[k] < 0:
        p[k] = (out.mean() * n_data).item()
    return p[k].item()


def draw(case, index, gen):
    """A random draw as RepDistiller's sampler makes it ("exact"): the image
    itself, then nce_k distinct images of other classes."""
    y_all, K = case["train_labels"], int(case["args"].get("nce_k", 16384))
    rows = []
    for i in index.tolist():
        neg = (y_all != y_all[i]).nonzero().view(-1)
        rows.append(torch.cat([torch.tensor([i]), neg[torch.randperm(len(neg), generator=gen)[:K]]]))
    return torch.stack(rows)


def after_step(mod, case):
    """The bank update after the optimiser step, in place."""
    c, m = mod.contrast, float(case["args"].get("nce_m", 0.5))
    v1, v2 = mod._last
    with torch.no_grad():
        for bank, v in ((c.memory_v1, v1), (c.memory_v2, v2)):
            bank.copy_(_update(bank, case["index"], v, m).to(bank.dtype))


def _idx(case):
    """The case's draw where it gives one, else every sample's positive (its
    own index, "exact") and all the indices of the other classes as
    negatives."""
    if "idx" in case:
        return case["idx"]
    y_all, index = case["train_labels"], case["index"]
    rows = []
    for i in index.tolist():
        neg = [j for j in range(len(y_all)) if y_all[j] != y_all[i]]
        rows.append([i] + neg)
    return torch.tensor(rows, dtype=torch.int64)


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    a = case["args"]
    T = float(a.get("nce_t", 0.07))
    n_data = len(case["train_labels"])
    v1 = mod.embed_s(s_feats[-1])
    v2 = mod.embed_t(t_feats[-1])
    c = mod.contrast
    if a.get("mode", "exact") == "queue":
        # Positive: the other side's embedding of the same image (no
        # gradient); negatives: every queue row.
        w1 = torch.cat([v1.detach().unsqueeze(1), c.queue_v1.unsqueeze(0).expand(v1.shape[0], -1, -1).to(v1)], 1)
        w2 = torch.cat([v2.detach().unsqueeze(1), c.queue_v2.unsqueeze(0).expand(v2.shape[0], -1, -1).to(v2)], 1)
    else:
        idx = _idx(case)
        B, K1 = idx.shape
        w1 = torch.index_select(c.memory_v1, 0, idx.view(-1)).detach().view(B, K1, -1).to(v1)
        w2 = torch.index_select(c.memory_v2, 0, idx.view(-1)).detach().view(B, K1, -1).to(v2)
    # ContrastMemory: the teacher's embedding against the student's bank
    # (out_v2) and the student's against the teacher's (out_v1).
    out_v2 = torch.exp(torch.bmm(w1, v2.unsqueeze(2)).squeeze(2) / T)
    out_v1 = torch.exp(torch.bmm(w2, v1.unsqueeze(2)).squeeze(2) / T)
    z1 = _z(mod, 2, out_v1.detach(), n_data)
    z2 = _z(mod, 3, out_v2.detach(), n_data)
    out_v1, out_v2 = out_v1 / z1, out_v2 / z2
    mod._last = (v1.detach(), v2.detach())
    return (contrast_loss(out_v1, n_data) + contrast_loss(out_v2, n_data)).squeeze()


def _update(bank, index, v, momentum):
    pos = torch.index_select(bank, 0, index).double()
    pos.mul_(momentum).add_(v.double() * (1 - momentum))
    norm = pos.pow(2).sum(1, keepdim=True).pow(0.5)
    out = bank.clone().double()
    out.index_copy_(0, index, pos.div(norm))
    return out


def extra(mod, case):
    """The banks (or queues) after the step's update."""
    v1, v2 = mod._last
    c = mod.contrast
    m = float(case["args"].get("nce_m", 0.5))
    if case["args"].get("mode", "exact") == "queue":
        out = {}
        K = c.queue_v1.shape[0]
        ptr = int(c.queue_ptr[0])
        for name, q, v in (("queue_v1", c.queue_v1, v1), ("queue_v2", c.queue_v2, v2)):
            q = q.clone().double()
            for i in range(v.shape[0]):
                q[(ptr + i) % K] = v[i]
            out[f"updated.contrast.{name}"] = q
        out["updated.contrast.queue_ptr"] = torch.tensor([(ptr + v1.shape[0]) % K], dtype=torch.int64)
        return out
    index = case["index"]
    return {"updated.contrast.memory_v1": _update(c.memory_v1, index, v1, m),
            "updated.contrast.memory_v2": _update(c.memory_v2, index, v2, m)}


def _balanced(gen, classes, per_class):
    y = torch.arange(classes).repeat_interleave(per_class)
    return y[torch.randperm(len(y), generator=gen)]


def cases(gen):
    out = []
    # name, classes, per class, batch, s maps, d_s, t maps, d_t, args
    spec = [
        ("exact", 4, 6, 6, [(16, 8, 8), (32, 4, 4)], 32, [(16, 8, 8), (48, 4, 4)], 48, {"feat_dim": "16"}),
        ("dim128", 5, 8, 8, [(16, 8, 8), (32, 4, 4)], 64, [(32, 8, 8), (64, 4, 4)], 128, {}),
        ("queue", 3, 10, 5, [(16, 8, 8), (24, 4, 4)], 24, [(16, 8, 8), (40, 4, 4)], 40,
         {"feat_dim": "16", "mode": "queue", "nce_k": "20", "nce_t": "0.1"}),
    ]
    for name, k, per, n, sm, ds, tm, dt, args in spec:
        y_all = _balanced(gen, k, per)
        index = torch.randperm(len(y_all), generator=gen)[:n]
        if args.get("mode") != "queue":
            args = dict(args, nce_k=str(len(y_all) - per))
        case = make_case(gen, name, n, feats(gen, n, sm, ds), feats(gen, n, tm, dt), k=k, args=args)
        case["labels"] = y_all[index]
        case["train_labels"], case["index"] = y_all, index
        # Queue mode's positive is the other side's embedding without
        # gradient (a stop-gradient finite differences cannot see).
        case["fd"] = 0 if args.get("mode") == "queue" else 1
        out.append(case)
    return out


def build(case):
    a = case["args"]
    dim = int(a.get("feat_dim", 128))
    K = int(a.get("nce_k", 16384))
    queue = a.get("mode", "exact") == "queue"
    rows = K if queue else len(case["train_labels"])
    gen = torch.Generator().manual_seed(77)
    return CRD(case["s_feats"][-1].shape[1], case["t_feats"][-1].shape[1], dim, rows, K,
               float(a.get("nce_t", 0.07)), float(a.get("nce_m", 0.5)), queue, gen)
