"""SSLD's loss (PaddleClas ppcls/loss/dmlloss.py DMLLoss with softmax, no
temperature), written from ../shared/METHODS.md section 16:
kl(a, b) = sum_c b log((b + 1e-12) / (a + 1e-12)); L = (kl(p_s, p_t) +
kl(p_t, p_s)) / 2, batch mean, the teacher detached; labels unused (some -1)."""
import torch
import torch.nn.functional as F

from .common import make_case

NAME = "ssld"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)
EPS = 1e-12


def cases(gen):
    out = []
    for name, n, k, scale in (("close", 6, 5, 1.0), ("sharp", 7, 10, 4.0)):
        c = make_case(gen, name, n, [torch.randn(n, 4, generator=gen)], [torch.randn(n, 4, generator=gen)], k=k,
                      t_scale=scale)
        c["labels"][0] = -1
        out.append(c)
    return out


def build(case):
    return None


def kl(a, b):
    return (b * torch.log((b + EPS) / (a + EPS))).sum(1)


def terms(mod, case, s_feats, s_logits, t_logits_unused, t_logits, y):
    p_s = F.softmax(s_logits, dim=1)
    p_t = F.softmax(t_logits, dim=1).detach()
    return {"ssld": WEIGHTS["beta"] * ((kl(p_s, p_t) + kl(p_t, p_s)) / 2).mean()}
