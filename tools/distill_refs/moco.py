"""MoCo v2's loss (facebookresearch/moco moco/builder.py MoCo.forward), written
from ../shared/METHODS.md section 14: the query features are the student's
pooled embeddings, the key features the key encoder's (kd's EMA copy; here
given, no gradient). head_k is the EMA copy of the MLP head (buffers, drifted
from head); the queue's FIFO update after the step is "updated.queue" and
"updated.queue_ptr"."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ssl_common import enqueue, frozen_copy, frozen_forward, mlp_head, new_queue

NAME = "moco"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)


class MoCo(nn.Module):
    def __init__(self, d, dim, K, ptr, gen):
        super().__init__()
        self.head = mlp_head(d, d, dim, gen)
        self.head_k = frozen_copy(self.head, gen, perturb=0.05)
        q, p = new_queue(dim, K, ptr, gen)
        self.register_buffer("queue", q)
        self.register_buffer("queue_ptr", p)


def cases(gen):
    out = []
    for name, B, d, dim, K, ptr, tau in (("k12", 6, 12, 8, 12, 6, "0.2"), ("wrap", 4, 10, 6, 10, 8, "0.07")):
        s = [torch.randn(B, d, generator=gen).relu()]
        t = [s[0] + 0.1 * torch.randn(B, d, generator=gen)]
        out.append(dict(name=name, s_feats=s, t_feats=t, s_logits=torch.randn(B, 10, generator=gen),
                        t_logits=torch.randn(B, 10, generator=gen), labels=torch.zeros(B, dtype=torch.long),
                        args={"K": str(K), "dim": str(dim), "tau": tau}, ptr=ptr))
    return out


def build(case):
    gen = torch.Generator().manual_seed(11)
    a = case["args"]
    return MoCo(case["s_feats"][-1].shape[1], int(a["dim"]), int(a["K"]), case["ptr"], gen)


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, y):
    tau = float(case["args"]["tau"])
    q = F.normalize(mod.head(s_feats[-1]), dim=1)
    with torch.no_grad():
        k = F.normalize(frozen_forward(mod.head_k, t_feats[-1], mod.training), dim=1)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, mod.queue.clone().detach().to(q)])
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    mod._last_k = k
    return {"moco": WEIGHTS["beta"] * F.cross_entropy(logits, labels)}


def extra(mod, case):
    q, p = enqueue(mod.queue, mod.queue_ptr, mod._last_k)
    return {"updated.queue": q.float(), "updated.queue_ptr": p}
