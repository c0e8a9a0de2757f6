"""Hinton KD (RepDistiller distiller_zoo/KD.py): no module, no term; the
whole loss is the composition 0.1 CE + 0.9 KL_T4."""
from .common import feats, make_case

NAME = "kd"
WEIGHTS = dict(gamma=0.1, alpha=0.9, beta=0.0, T=4.0)


def cases(gen):
    return [make_case(gen, f"c{i}", n, feats(gen, n, [(16, 8, 8), (32, 4, 4)], 64),
                 feats(gen, n, [(32, 8, 8), (64, 4, 4)], 128), k=k)
            for i, (n, k) in enumerate([(8, 10), (5, 100)])]


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    return None
