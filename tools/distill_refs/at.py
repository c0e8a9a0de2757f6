"""Attention transfer as RepDistiller runs it (distiller_zoo/AT.py Attention,
helper/loops.py: loss_kd = sum(Attention(p)(feat_s[1:-1], feat_t[1:-1]));
weights from scripts/run_cifar_distill.sh: gamma 1, alpha 0, beta 1000)."""
import torch.nn.functional as F

from .common import feats, make_case, pool_pair

NAME = "at"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=1000.0, T=4.0)


def _at(f, p):
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))


def _at_loss(f_s, f_t, p):
    f_s, f_t = pool_pair(f_s, f_t)
    return (_at(f_s, p) - _at(f_t, p)).pow(2).mean()


def cases(gen):
    spec = [
        # same spatial sizes, channel mismatch
        ("same", 8, [(8, 16, 16), (16, 16, 16), (32, 8, 8), (64, 4, 4)],
         [(16, 16, 16), (32, 16, 16), (64, 8, 8), (128, 4, 4)], {}),
        # spatial mismatch both ways, pools that do not divide evenly (12->8, 8->7, 6->4)
        ("pooled", 5, [(8, 16, 16), (16, 12, 12), (32, 7, 7), (64, 4, 4)],
         [(16, 16, 16), (32, 8, 8), (64, 8, 8), (128, 6, 6)], {}),
        # two pairs, even pools (8->4, 4->2), power 3
        ("p3", 3, [(4, 8, 8), (8, 8, 8), (16, 4, 4)],
         [(8, 8, 8), (16, 4, 4), (32, 2, 2)], {"p": "3"}),
    ]
    return [make_case(gen, name, n, feats(gen, n, sm, sm[-1][0]), feats(gen, n, tm, tm[-1][0]), args=args)
            for name, n, sm, tm, args in spec]


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    p = float(case["args"].get("p", 2))
    if p == int(p):
        p = int(p)
    return sum(_at_loss(f_s, f_t, p) for f_s, f_t in zip(s_feats[1:-1], t_feats[1:-1]))
