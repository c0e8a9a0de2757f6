"""SEED's loss (jacobswan1/SEED seed/builder.py SEED.forward), written from
../shared/METHODS.md section 5: student head Linear-ReLU-Linear (trainable),
the teacher's own head (frozen buffers, eval-mode batch norm), the queue of
teacher embeddings; the FIFO update after the step is "updated.queue" and
"updated.queue_ptr"."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ssl_common import enqueue, frozen_copy, frozen_forward, mlp_head, new_queue, simclr_head

NAME = "seed"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)


class SEED(nn.Module):
    def __init__(self, d_s, d_t, dim, K, kind, gen):
        super().__init__()
        self.head = mlp_head(d_s, d_s, dim, gen)
        th = simclr_head(d_t, dim, gen) if kind == "simclr" else mlp_head(d_t, d_t, dim, gen)
        self.teacher_head = frozen_copy(th, gen, eval_stats=True)
        q, p = new_queue(dim, K, 0, gen)
        self.register_buffer("queue", q)
        self.register_buffer("queue_ptr", p)


def cases(gen):
    out = []
    for name, B, d_s, d_t, dim, K, kind, ts, tt in (("simclr_t", 6, 8, 12, 6, 12, "simclr", "0.2", "0.0001"),
                                                    ("mlp_t", 6, 10, 6, 4, 7, "mlp", "0.5", "0.05")):
        s = [torch.randn(B, d_s, generator=gen).relu()]
        t = [torch.randn(B, d_t, generator=gen).relu()]
        out.append(dict(name=name, s_feats=s, t_feats=t, s_logits=torch.randn(B, 10, generator=gen),
                        t_logits=torch.randn(B, 10, generator=gen), labels=torch.zeros(B, dtype=torch.long),
                        args={"K": str(K), "dim": str(dim), "teacher_head": kind, "tau_s": ts, "tau_t": tt}))
    return out


def build(case):
    gen = torch.Generator().manual_seed(17)
    a = case["args"]
    return SEED(case["s_feats"][-1].shape[1], case["t_feats"][-1].shape[1], int(a["dim"]), int(a["K"]),
                a["teacher_head"], gen)


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, y):
    a = case["args"]
    temp, dist_t = float(a["tau_s"]), float(a["tau_t"])
    s_emb = F.normalize(mod.head(s_feats[-1]), dim=1)
    with torch.no_grad():
        t_emb = F.normalize(frozen_forward(mod.teacher_head, t_feats[-1], False), dim=1)
    queue = mod.queue.clone().detach().to(s_emb)
    logit_stu = torch.einsum("nc,ck->nk", s_emb, queue)
    logit_tea = torch.einsum("nc,ck->nk", t_emb, queue)
    logit_s_p = torch.einsum("nc,nc->n", s_emb, t_emb).unsqueeze(-1)
    logit_t_p = torch.einsum("nc,nc->n", t_emb, t_emb).unsqueeze(-1)
    logit_stu = torch.cat([logit_s_p, logit_stu], dim=1) / temp
    logit_tea = torch.cat([logit_t_p, logit_tea], dim=1) / dist_t
    p_t = F.softmax(logit_tea, dim=1)
    loss = (-p_t * F.log_softmax(logit_stu, dim=1)).sum(1).mean()
    mod._last_t = t_emb
    return {"seed": WEIGHTS["beta"] * loss}


def extra(mod, case):
    q, p = enqueue(mod.queue, mod.queue_ptr, mod._last_t)
    return {"updated.queue": q.float(), "updated.queue_ptr": p}
