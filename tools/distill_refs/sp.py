"""Similarity-preserving distillation as RepDistiller runs it
(distiller_zoo/SP.py Similarity, helper/loops.py: g_s = [feat_s[-2]],
loss_kd = sum(Similarity()(g_s, g_t)); weights from
scripts/run_cifar_distill.sh: gamma 1, alpha 0, beta 3000)."""
import torch
import torch.nn.functional as F

from .common import feats, make_case

NAME = "sp"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=3000.0, T=4.0)


def _similarity_loss(f_s, f_t):
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)
    G_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)


def cases(gen):
    spec = [
        # channel mismatch, same spatial size
        ("channels", 8, [(8, 16, 16), (16, 8, 8), (32, 8, 8)], [(16, 16, 16), (32, 8, 8), (64, 8, 8)], {}),
        # channel and spatial mismatch
        ("spatial", 5, [(8, 16, 16), (16, 8, 8), (16, 8, 8)], [(16, 16, 16), (32, 8, 8), (64, 4, 4)], {}),
        # another feature (sp.layer 1), small batch
        ("layer1", 3, [(4, 8, 8), (8, 6, 6), (16, 4, 4)], [(8, 8, 8), (16, 4, 4), (32, 2, 2)], {"layer": "1"}),
    ]
    return [make_case(gen, name, n, feats(gen, n, sm, sm[-1][0]), feats(gen, n, tm, tm[-1][0]), args=args)
            for name, n, sm, tm, args in spec]


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    k = int(case["args"].get("layer", -2))
    return sum([_similarity_loss(s_feats[k], t_feats[k])]).reshape(())
