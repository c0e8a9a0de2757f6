"""RKD: Relational Knowledge Distillation (Park et al., CVPR 2019) as
RepDistiller runs it (distiller_zoo/RKD.py RKDLoss(w_d=25, w_a=50) on feat[-1],
helper/loops.py; beta 1 in scripts/run_cifar_distill.sh). No module.
"""
import torch
import torch.nn.functional as F

from .common import feats, flat_pair, make_case

NAME = "rkd"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=1.0, T=4.0)


def pdist(e, squared=False, eps=1e-12):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_loss(f_s, f_t, w_d, w_a, eps):
    student = f_s.view(f_s.shape[0], -1)
    teacher = f_t.view(f_t.shape[0], -1)
    # Distance term: pairwise distances divided by their mean over positive entries.
    with torch.no_grad():
        t_d = pdist(teacher, squared=False, eps=eps)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = pdist(student, squared=False, eps=eps)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    loss_d = F.smooth_l1_loss(d, t_d)
    # Angle term: cosines of the angles at every vertex i between j and k.
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a


def cases(gen):
    out = []
    # c0: the default embedding pair, student narrower than the teacher.
    # c1: one student row far from the others, so that normalised distances
    #     differ by more than 1 (the linear branch of smooth-L1).
    # c2: a feature map (flattened as RKDLoss does), other inner weights and
    #     a batch of 3.
    specs = [(8, 16, 32, {}), (5, 64, 48, {}), (3, None, None, {"feat": "-2", "w_dist": "10", "w_angle": "20"})]
    for i, (n, ds, dt, args) in enumerate(specs):
        s = feats(gen, n, [(4, 4, 4), (8, 4, 4)], ds or 8)
        t = feats(gen, n, [(8, 4, 4), (6, 2, 2)], dt or 8)
        if i == 1:
            s[-1][0] *= 10.0
        out.append(make_case(gen, f"c{i}", n, s, t, args=args))
    return out


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    a = case["args"]
    return rkd_loss(*flat_pair(case, s_feats, t_feats), float(a.get("w_dist", 25)), float(a.get("w_angle", 50)),
                    float(a.get("eps", 1e-12)))
