"""FitNet hints as RepDistiller runs them (distiller_zoo/FitNet.py HintLoss,
models/util.py ConvReg, helper/loops.py: f_s = regressor(feat_s[hint_layer]),
loss = MSE(f_s, feat_t[hint_layer]); weights from scripts/run_cifar_distill.sh:
gamma 1, alpha 0, beta 100). The regressor is trained jointly (train mode)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import feats, make_case

NAME = "fitnet"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=100.0, T=4.0)


class ConvReg(nn.Module):
    """RepDistiller's ConvReg (use_relu=True): conv chosen by the map heights, BN, ReLU."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        s_N, s_C, s_H, s_W = s_shape
        t_N, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            raise NotImplementedError('student size {}, teacher size {}'.format(s_H, t_H))
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Hint(nn.Module):
    def __init__(self, s_shape, t_shape):
        super().__init__()
        self.regressor = ConvReg(s_shape, t_shape)


def _hint(case):
    return int(case["args"].get("hint_layer", 2))


def cases(gen):
    # (name, N, student maps, teacher maps, args, training)
    spec = [
        # stride-2 conv: the student's hint map is twice the teacher's; channel mismatch.
        ("stride2", 8, [(8, 16, 16), (16, 16, 16), (16, 16, 16), (32, 8, 8)],
         [(16, 8, 8), (16, 8, 8), (32, 8, 8), (64, 4, 4)], {}, 1),
        # transposed conv: the student's map is half the teacher's.
        ("transposed", 5, [(8, 8, 8), (16, 4, 4), (16, 4, 4), (32, 2, 2)],
         [(8, 16, 16), (16, 8, 8), (24, 8, 8), (48, 4, 4)], {}, 1),
        # transposed conv with batch norm in eval mode: the conv bias reaches
        # the output (in train mode the batch statistics cancel it).
        ("transposed_eval", 2, [(8, 8, 8), (16, 4, 4), (16, 4, 4), (32, 2, 2)],
         [(8, 16, 16), (16, 8, 8), (24, 8, 8), (48, 4, 4)], {}, 0),
        # kernel (1 + s_H - t_H, 1 + s_W - t_W) = (3, 2): a non-square student map.
        ("kernel", 6, [(8, 12, 10), (12, 6, 5), (12, 6, 5), (24, 3, 3)],
         [(8, 8, 8), (20, 4, 4), (20, 4, 4), (40, 2, 2)], {}, 1),
        # same size (1x1 conv), hint_layer 1, batch norm in eval mode.
        ("same_eval", 3, [(8, 8, 8), (16, 8, 8), (32, 4, 4)],
         [(16, 8, 8), (32, 8, 8), (64, 4, 4)], {"hint_layer": "1"}, 0),
        # hint on the last map from the end (negative index), stride-2 conv.
        ("negative", 6, [(8, 8, 8), (16, 8, 8), (12, 8, 8)],
         [(16, 8, 8), (32, 4, 4), (24, 4, 4)], {"hint_layer": "-2"}, 1),
    ]
    out = []
    for name, n, sm, tm, args, training in spec:
        t_feats = feats(gen, n, tm, tm[-1][0])
        # The teacher's hint map near the regressor's active outputs (about
        # +1.2, see build()): the per-channel gradient sums through the
        # train-mode batch norm stay small, so the conv bias gradient (exactly
        # 0 in train mode) is 0 up to float32 rounding far below the test's
        # 1e-6 floor.
        h = int(args.get("hint_layer", 2))
        t_feats[h] = (0.4 * torch.randn(t_feats[h].shape, generator=gen) + 1.2).relu()
        out.append(make_case(gen, name, n, feats(gen, n, sm, sm[-1][0]), t_feats, args=args, training=training))
    return out


def build(case):
    k = _hint(case)
    mod = Hint(tuple(case["s_feats"][k].shape), tuple(case["t_feats"][k].shape))
    # Non-trivial batch-norm parameters and statistics, so that the eval case
    # and the running-statistics update test something. Each channel's shift
    # is +-(1.0..1.4) against a scale of at most 0.3 on the normalised map: a
    # channel's ReLU is then (almost) all on or all off, which keeps the ReLU's
    # mask in the test but its kinks away from the finite-difference steps
    # (1e-2) of tests/test_distill.c. The conv weights are 5x PyTorch's init so
    # that such a step is a small relative change (running_var grows to match,
    # for the eval case).
    with torch.no_grad():
        mod.regressor.conv.weight.mul_(5.0)
        bn = mod.regressor.bn
        c = bn.weight.numel()
        sign = torch.where(torch.arange(c) % 3 == 2, -1.0, 1.0)
        bn.weight.uniform_(0.1, 0.3)
        bn.bias.copy_(sign * torch.empty(c).uniform_(1.0, 1.4))
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0).mul_(25.0)
    return mod


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    k = _hint(case)
    return F.mse_loss(mod.regressor(s_feats[k]), t_feats[k])
