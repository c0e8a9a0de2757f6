"""SimCLR / SimCLRv2 pretraining loss (google-research/simclr tf2/objective.py
add_contrastive_loss, model.py ProjectionHead), written from
../shared/METHODS.md section 13. The student's "features" are the pooled
embeddings of both views, view a's B rows then view b's, as kd's one forward
over the stacked views gives them; the loss follows the TF code's four blocks
(ab, aa, ba, bb) with the diagonal masked by LARGE_NUM."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ssl_common import mlp_head, simclr_head

NAME = "simclr"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)
LARGE_NUM = 1e9


class SimCLR(nn.Module):
    def __init__(self, kind, d, out, gen):
        super().__init__()
        self.head = simclr_head(d, out, gen) if kind == "simclr" else mlp_head(d, d, out, gen)


def nt_xent(z, tau):
    h = F.normalize(z, dim=1)
    B = h.shape[0] // 2
    h1, h2 = h[:B], h[B:]
    labels = torch.arange(B)
    masks = torch.eye(B, dtype=h.dtype)
    logits_aa = h1 @ h1.t() / tau - masks * LARGE_NUM
    logits_bb = h2 @ h2.t() / tau - masks * LARGE_NUM
    logits_ab = h1 @ h2.t() / tau
    logits_ba = h2 @ h1.t() / tau
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


def cases(gen):
    out = []
    for name, B, d, dim, args in (("v2", 6, 12, 8, {}),
                                  ("mlp", 5, 10, 6, {"head": "mlp", "tau": "0.1", "proj_dim": "6"})):
        if "proj_dim" not in args:
            args = dict(args, proj_dim=str(dim))
        s = [torch.randn(2 * B, d, generator=gen).relu()]
        out.append(dict(name=name, s_feats=s, t_feats=[], s_logits=torch.randn(2 * B, 10, generator=gen),
                        t_logits=torch.randn(2 * B, 10, generator=gen), labels=torch.zeros(B, dtype=torch.long),
                        args=args))
    return out


def build(case):
    gen = torch.Generator().manual_seed(7)
    d = case["s_feats"][-1].shape[1]
    return SimCLR(case["args"].get("head", "simclr"), d, int(case["args"]["proj_dim"]), gen)


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, y):
    tau = float(case["args"].get("tau", 0.5))
    return {"simclr": WEIGHTS["beta"] * nt_xent(mod.head(s_feats[-1]), tau)}
