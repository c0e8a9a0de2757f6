"""LSKD, Logit Standardization in Knowledge Distillation (Sun et al.,
CVPR 2024), written from sunshangquan/logit-standardization-KD
mdistiller/distillers/KD.py (normalize, kd_loss with logit_stand) and
tools/train.py (--logit-stand --base-temp 2 --kd-weight 9; CE_WEIGHT 0.1 of
engine/cfg.py): gamma 0.1 (CE), alpha 0, beta 9 on the standardised KD term."""
import torch.nn.functional as F

from .common import feats, make_case, settings

NAME = "lskd"
WEIGHTS = dict(gamma=0.1, alpha=0.0, beta=9.0, T=2.0)
DEFAULTS = dict(T=2.0, eps=1e-7)


def _normalize(z, eps):
    mean = z.mean(dim=-1, keepdims=True)
    std = z.std(dim=-1, keepdims=True)
    return (z - mean) / (eps + std)


def lskd_loss(z_s, z_t, T, eps):
    lp_s = F.log_softmax(_normalize(z_s, eps) / T, dim=1)
    p_t = F.softmax(_normalize(z_t, eps) / T, dim=1)
    return F.kl_div(lp_s, p_t, reduction="none").sum(1).mean() * T ** 2


def cases(gen):
    out = []
    specs = [(8, 10, {}), (5, 100, {}), (16, 100, {"T": "3"}), (2, 10, {})]
    for i, (n, k, args) in enumerate(specs):
        # Teacher logits on another scale and offset than the student's: the
        # standardisation removes both.
        out.append(make_case(gen, f"c{i}", n, feats(gen, n, [(16, 8, 8)], 64), feats(gen, n, [(32, 8, 8)], 128),
                             k=k, args=args, t_scale=8.0, t_shift=2.0))
    return out


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    a = settings(case, DEFAULTS)
    return lskd_loss(s_logits, t_logits, a["T"], a["eps"])
