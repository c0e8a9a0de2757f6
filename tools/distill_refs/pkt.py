"""PKT: Probabilistic Knowledge Transfer (Passalis & Tefas, ECCV 2018) as
RepDistiller runs it (distiller_zoo/PKT.py cosine_similarity_loss, eps 1e-7,
on feat[-1]; helper/loops.py; beta 30000 in scripts/run_cifar_distill.sh).
No module. A feature map (pkt.feat pointing at one) is flattened to (N, -1)
first: kd's extension, the official code takes the pooled embedding only.
"""
import torch

from .common import feats, flat_pair, make_case

NAME = "pkt"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=30000.0, T=4.0)


def cosine_similarity_loss(output_net, target_net, eps=0.0000001):
    # Normalise each vector by its norm (NaN entries set to 0, as the official code does).
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0
    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0
    # Cosine similarities scaled to [0, 1], rows normalised to probabilities.
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    # KL divergence.
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def cases(gen):
    out = []
    # c0: the default embedding pair, student narrower than the teacher.
    # c1: a teacher row of zeros (its normalised row is 0: similarities 1/2).
    # c2: a feature map flattened, a non-default eps and a batch of 3.
    specs = [(8, 16, 32, {}), (5, 64, 48, {}), (3, None, None, {"feat": "-2", "eps": "0.001"})]
    for i, (n, ds, dt, args) in enumerate(specs):
        s = feats(gen, n, [(4, 4, 4), (8, 4, 4)], ds or 8)
        t = feats(gen, n, [(8, 4, 4), (6, 2, 2)], dt or 8)
        if i == 1:
            t[-1][2] = 0.0
        out.append(make_case(gen, f"c{i}", n, s, t, args=args))
    return out


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    f_s, f_t = flat_pair(case, s_feats, t_feats)
    return cosine_similarity_loss(f_s, f_t, float(case["args"].get("eps", 1e-7)))
