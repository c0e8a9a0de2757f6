"""DKD, Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), written
from megvii-research/mdistiller mdistiller/distillers/DKD.py (dkd_loss,
_get_gt_mask, _get_other_mask, cat_mask) and engine/cfg.py (CE 1, ALPHA 1,
BETA 8, T 4, WARMUP 20). mdistiller's trainer passes 1-based epochs, so the
warm-up factor of kd's 0-based case["epoch"] is min((epoch + 1) / warmup, 1).
kd composes it as gamma 1 (CE), alpha 0, beta 1 on the warmed-up DKD term."""
import torch
import torch.nn.functional as F

from .common import feats, make_case, settings, warmup_ramp

NAME = "dkd"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=1.0, T=4.0)
DEFAULTS = dict(alpha=1.0, beta=8.0, T=4.0, warmup=20)


def _gt_mask(z, y):
    return torch.zeros_like(z).scatter_(1, y.reshape(-1).unsqueeze(1), 1).bool()


def _other_mask(z, y):
    return torch.ones_like(z).scatter_(1, y.reshape(-1).unsqueeze(1), 0).bool()


def _cat_mask(p, m1, m2):
    return torch.cat([(p * m1).sum(dim=1, keepdims=True), (p * m2).sum(1, keepdims=True)], dim=1)


def dkd_loss(z_s, z_t, y, alpha, beta, T):
    gt, other = _gt_mask(z_s, y), _other_mask(z_s, y)
    p_s = _cat_mask(F.softmax(z_s / T, dim=1), gt, other)
    p_t = _cat_mask(F.softmax(z_t / T, dim=1), gt, other)
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * T ** 2 / y.shape[0]
    p_t2 = F.softmax(z_t / T - 1000.0 * gt, dim=1)
    lp_s2 = F.log_softmax(z_s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(lp_s2, p_t2, reduction="sum") * T ** 2 / y.shape[0]
    return alpha * tckd + beta * nckd


def cases(gen):
    out = []
    # (batch, classes, epoch, settings): the epoch exercises the warm-up ramp
    # (0 -> 1/20, 9 -> 10/20, 30 -> 1); one case uses the wrn/vgg beta 6 and
    # another a shorter warm-up.
    specs = [(8, 10, 0, {}), (5, 100, 9, {}), (12, 100, 30, {"beta": "6"}),
             (6, 10, 2, {"warmup": "5", "alpha": "0.5", "T": "2"})]
    for i, (n, k, epoch, args) in enumerate(specs):
        out.append(make_case(gen, f"c{i}", n, feats(gen, n, [(16, 8, 8)], 64), feats(gen, n, [(32, 8, 8)], 128),
                             k=k, args=args, t_scale=5.0, epoch=epoch))
    return out


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    a = settings(case, DEFAULTS)
    return warmup_ramp(case, a["warmup"]) * dkd_loss(s_logits, t_logits, labels, a["alpha"], a["beta"], a["T"])
