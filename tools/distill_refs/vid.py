"""VID: Variational Information Distillation (Ahn et al., CVPR 2019) as
RepDistiller runs it (distiller_zoo/VID.py; train_student.py builds
nn.ModuleList([VIDLoss(s, t, t) for s, t in zip(s_n, t_n)]) over the channel
counts of feat[1:-1]; helper/loops.py sums the per-layer losses; beta 1 in
scripts/run_cifar_distill.sh).

The module is that ModuleList itself, so kd's parameter names are the official
criterion's state_dict names: "<k>.log_scale", "<k>.regressor.{0,2,4}.weight".
"""
import numpy as np
import torch
import torch.nn as nn

from .common import feats, make_case, pool_pair

NAME = "vid"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=1.0, T=4.0)


class VIDLoss(nn.Module):
    """distiller_zoo/VID.py: a 1x1-conv regressor (no bias) predicting the
    teacher map from the student's, with a per-channel Gaussian variance."""

    def __init__(self, num_input_channels, num_mid_channel, num_target_channels, init_pred_var=5.0, eps=1e-5):
        super().__init__()

        def conv1x1(cin, cout):
            return nn.Conv2d(cin, cout, kernel_size=1, padding=0, bias=False, stride=1)

        self.regressor = nn.Sequential(
            conv1x1(num_input_channels, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_target_channels),
        )
        self.log_scale = nn.Parameter(np.log(np.exp(init_pred_var - eps) - 1.0) * torch.ones(num_target_channels))
        self.eps = eps

    def forward(self, input, target):
        input, target = pool_pair(input, target)
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        return torch.mean(neg_log_prob)


def cases(gen):
    out = []
    # c0: channel mismatch, equal spatial sizes.
    # c1: spatial mismatch both ways (student 8 -> 4, teacher 6 -> 3).
    # c2: the teacher exposes more maps than the student (zip truncates), a
    #     pooling that is no integer ratio (student 6 -> 4) and a non-default eps.
    specs = [
        (4, [(8, 8, 8), (16, 8, 8), (32, 4, 4)], [(16, 8, 8), (32, 8, 8), (64, 4, 4)], {}),
        (3, [(8, 8, 8), (8, 8, 8), (12, 3, 3)], [(16, 8, 8), (16, 4, 4), (24, 6, 6)], {}),
        (5, [(4, 8, 8), (6, 6, 6), (10, 4, 4), (12, 2, 2)], [(8, 8, 8), (8, 4, 4), (16, 4, 4), (16, 4, 4), (32, 2, 2)],
         {"eps": "0.001"}),
    ]
    for i, (n, sm, tm, args) in enumerate(specs):
        out.append(make_case(gen, f"c{i}", n, feats(gen, n, sm, 32), feats(gen, n, tm, 64), args=args))
    return out


def _eps(case):
    return float(case["args"].get("eps", 1e-5))


def build(case):
    s_n = [f.shape[1] for f in case["s_feats"][1:-1]]
    t_n = [f.shape[1] for f in case["t_feats"][1:-1]]
    init = float(case["args"].get("init_pred_var", 5.0))
    mod = nn.ModuleList([VIDLoss(s, t, t, init_pred_var=init, eps=_eps(case)) for s, t in zip(s_n, t_n)])
    # Spread the variances (around 1, so that the gradients are not tiny) and
    # enlarge the regressor weights, so that a channel mix-up or a wrong
    # factor cannot hide under the test's absolute tolerance.
    with torch.no_grad():
        for m in mod:
            m.log_scale.normal_(0.5, 0.5)
            for p in m.regressor.parameters():
                p.mul_(2.0)
    return mod


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    g_s, g_t = s_feats[1:-1], t_feats[1:-1]
    return sum(c(f_s, f_t) for f_s, f_t, c in zip(g_s, g_t, mod))
