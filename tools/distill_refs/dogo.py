"""DoGo's loss (NeurAI-Lab/DoGo criterion/kl.py, models/simclr.py), written
from ../shared/METHODS.md section 6: each peer's SimCLR NT-Xent (tau 0.5) on
its head's normalised output, plus the KL between the peers' view-to-view
similarity distributions (S = z_view1 z_view2^T / 0.1, softmax over rows),
the other peer detached, averaged over all elements; weights 100 (peer 1, the
student) and 1 (peer 2). The student's features are s_feats (2B rows: view 1
then view 2), peer 2's are t_feats; kd's peer model (resnet8 in the cases, pooled features of 64) is not part of the
loss on given features (its tensors are borrowed, not the reference's).
The cases set "fd": 0: each KL reads the other peer's distribution detached,
which finite differences of the total would see (the gradients are checked
against PyTorch's)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .simclr import nt_xent

NAME = "dogo"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)


def dogo_head(d, hidden, out, gen):
    h = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))
    with torch.no_grad():
        for i in (0, 3):
            h[i].weight.copy_(torch.randn(h[i].weight.shape, generator=gen) * 0.3)
        h[3].bias.copy_(0.1 * torch.randn(h[3].bias.shape, generator=gen))
        h[1].weight.copy_(0.5 + torch.rand(h[1].weight.shape, generator=gen))
        h[1].bias.copy_(0.1 * torch.randn(h[1].bias.shape, generator=gen))
    return h


class DoGo(nn.Module):
    def __init__(self, d1, d2, hidden, out, gen):
        super().__init__()
        self.head = dogo_head(d1, hidden, out, gen)
        self.peer_head = dogo_head(d2, hidden, out, gen)


def cases(gen):
    out = []
    for name, B, d1, d2, args in (("default", 5, 8, 64, {"hidden": "6", "dim": "4"}),
                                  ("custom", 4, 8, 64, {"hidden": "5", "dim": "3", "w1": "3", "w2": "0.5",
                                                        "tau": "0.2", "tau_kl": "0.5"})):
        s = [torch.randn(2 * B, d1, generator=gen).relu()]
        t = [torch.randn(2 * B, d2, generator=gen).relu()]
        out.append(dict(name=name, s_feats=s, t_feats=t, s_logits=torch.randn(2 * B, 10, generator=gen),
                        t_logits=torch.randn(2 * B, 10, generator=gen), labels=torch.zeros(B, dtype=torch.long),
                        args=dict(args, peer="resnet8"), fd=0))
    return out


def build(case):
    gen = torch.Generator().manual_seed(19)
    a = case["args"]
    return DoGo(case["s_feats"][-1].shape[1], case["t_feats"][-1].shape[1], int(a["hidden"]), int(a["dim"]), gen)


def kl(s, s_t):
    """KL(softmax(s_t) || softmax(s)), s_t detached, mean over all elements."""
    return F.kl_div(F.log_softmax(s, dim=1), F.softmax(s_t.detach(), dim=1), reduction="sum") / s.numel()


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, y):
    a = case["args"]
    tau, tau_kl = float(a.get("tau", 0.5)), float(a.get("tau_kl", 0.1))
    w1, w2 = float(a.get("w1", 100)), float(a.get("w2", 1))
    z1 = F.normalize(mod.head(s_feats[-1]), dim=1)
    z2 = F.normalize(mod.peer_head(t_feats[-1]), dim=1)
    B = z1.shape[0] // 2
    S1 = z1[:B] @ z1[B:].t() / tau_kl
    S2 = z2[:B] @ z2[B:].t() / tau_kl
    # nt_xent normalises again: idempotent on unit rows
    return {"ssl1": nt_xent(z1, tau), "kl1": w1 * kl(S1, S2), "ssl2": nt_xent(z2, tau), "kl2": w2 * kl(S2, S1)}
