"""DINO's loss (facebookresearch/dino main_dino.py DINOLoss, DINOHead), written
from ../shared/METHODS.md section 15 (dino_common.py): the student head on
the pooled features of every view (V B rows, views stacked), the teacher's
EMA head on its 2 global views (buffers), CE between the centred, sharpened
teacher and the student over every pair of a teacher view and another student
view. After the step: the centre (update_center) and the teacher head's EMA
at the first step's momentum ("updated.*")."""
import torch
import torch.nn as nn

from . import dino_common as dc

NAME = "dino"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)


class Dino(nn.Module):
    def __init__(self, d, a, gen):
        super().__init__()
        self.head = dc.Head(d, a, gen)
        self.teacher_head = dc.Head(d, a, gen, trainable=False)
        self.dino_loss = nn.Module()
        self.dino_loss.register_buffer("center", 0.3 * torch.randn(1, a["out_dim"], generator=gen))


def _args(B, V, D, K, nll, epoch, W):
    return {"out_dim": str(K), "hidden": "7", "bottleneck": "5", "norm_last_layer": str(nll),
            "local_crops_number": str(V - 2), "warmup_teacher_temp_epochs": str(W)}


def cases(gen):
    out = []
    for name, B, V, D, K, nll, epoch, W in (("multicrop", 3, 5, 6, 12, 1, 2, 5), ("global", 4, 2, 8, 9, 0, 0, 0)):
        s = torch.randn(V * B, D, generator=gen).relu()
        t = s[:2 * B] + 0.2 * torch.randn(2 * B, D, generator=gen)
        out.append(dict(name=name, s_feats=[s], t_feats=[t], s_logits=torch.randn(B, 10, generator=gen),
                        t_logits=torch.randn(B, 10, generator=gen), labels=torch.zeros(B, dtype=torch.long),
                        args=_args(B, V, D, K, nll, epoch, W), epoch=epoch))
    return out


def build(case):
    gen = torch.Generator().manual_seed(21)
    return Dino(case["s_feats"][-1].shape[1], dc.settings(case), gen)


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, y):
    a = dc.settings(case)
    B = t_feats[-1].shape[0] // 2
    V = s_feats[-1].shape[0] // B
    s_out = mod.head(s_feats[-1])
    with torch.no_grad():
        t_out = mod.teacher_head(t_feats[-1])
    total, n = dc.view_loss(s_out, t_out, mod.dino_loss.center, a, case["epoch"], V, 1.0)
    mod._t_out = t_out
    return {"dino": WEIGHTS["beta"] * total / n}


def extra(mod, case):
    a = dc.settings(case)
    out = {"updated.dino_loss.center": dc.update_center(mod.dino_loss.center, mod._t_out, a["center_momentum"])}
    for k, v in dc.ema_head(mod.teacher_head, mod.head, dc.momentum(a)).items():
        out[f"updated.teacher_head.{k}"] = v
    return out
