"""NST: Neuron Selectivity Transfer (Huang & Wang, "Like What You Like",
2017) as RepDistiller runs it (distiller_zoo/NST.py NSTLoss on the pairs of
feat[1:-1], summed in helper/loops.py; beta 50 in
scripts/run_cifar_distill.sh). No module.
"""
import torch.nn.functional as F

from .common import feats, make_case, pool_pair

NAME = "nst"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=50.0, T=4.0)


def poly_kernel(a, b):
    a = a.unsqueeze(1)
    b = b.unsqueeze(2)
    return (a * b).sum(-1).pow(2)


def nst_loss(f_s, f_t, full_loss):
    f_s, f_t = pool_pair(f_s, f_t)
    f_s = f_s.view(f_s.shape[0], f_s.shape[1], -1)
    f_s = F.normalize(f_s, dim=2)
    f_t = f_t.view(f_t.shape[0], f_t.shape[1], -1)
    f_t = F.normalize(f_t, dim=2)
    if full_loss:
        return (poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean()
                - 2 * poly_kernel(f_s, f_t).mean())
    return poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()


def cases(gen):
    out = []
    # c0: channel mismatch, equal spatial sizes.
    # c1: spatial mismatch both ways, one not an integer ratio (6 -> 4).
    # c2: the student exposes more maps than the teacher (zip truncates),
    #     full_loss off, a batch of 2.
    specs = [
        (4, [(8, 8, 8), (16, 4, 4), (32, 2, 2)], [(16, 8, 8), (32, 4, 4), (24, 2, 2)], {}),
        (3, [(8, 8, 8), (8, 6, 6), (12, 2, 2)], [(16, 8, 8), (16, 4, 4), (6, 4, 4)], {}),
        (2, [(4, 8, 8), (6, 4, 4), (10, 4, 4), (12, 2, 2)], [(8, 8, 8), (8, 8, 8), (16, 2, 2)],
         {"full_loss": "0"}),
    ]
    for i, (n, sm, tm, args) in enumerate(specs):
        out.append(make_case(gen, f"c{i}", n, feats(gen, n, sm, 32), feats(gen, n, tm, 64), args=args))
    return out


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    full = case["args"].get("full_loss", "1") not in ("0", "false", "no")
    return sum(nst_loss(f_s, f_t, full) for f_s, f_t in zip(s_feats[1:-1], t_feats[1:-1]))
