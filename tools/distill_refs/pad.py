"""PAD, Prime-Aware Adaptive Distillation (Zhang et al., ECCV 2020), written
from torchdistill: models/wrapper.py VarianceBranch4PAD (var_estimator =
Sequential(Linear(d, d), BatchNorm1d(d)) on the student's flattened pooled
embedding) and losses/mid_level.py PADL2Loss (mean over dims, then over the
batch, of (f_t - f_s)^2 / (eps + exp(log_var)) + log_var, eps 1e-6). The
ImageNet config weighs CE 1 and PAD 1. The optional warm-up
(warmup_epochs W > 0) scales the term by min(1, (epoch + 1) / W)."""
import torch
from torch import nn

from .common import feats, make_case, warmup_ramp

NAME = "pad"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=1.0, T=4.0)


class PADModule(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.var_estimator = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d))


def cases(gen):
    out = []
    # (batch, student maps, embedding width, training, epoch, settings)
    specs = [(8, [(16, 8, 8), (32, 4, 4)], 64, 1, 0, {}),
             (5, [(16, 8, 8)], 32, 1, 3, {"warmup_epochs": "10"}),
             (12, [(32, 4, 4)], 16, 0, 0, {}),
             (6, [(16, 4, 4)], 48, 1, 0, {"eps": "1e-3"})]
    for i, (n, maps, d, training, epoch, args) in enumerate(specs):
        t_maps = [(2 * c, h, w) for (c, h, w) in maps]
        k = 10 if i % 2 == 0 else 100
        out.append(make_case(gen, f"c{i}", n, feats(gen, n, maps, d), feats(gen, n, t_maps, d), k=k, args=args,
                             training=training, epoch=epoch))
    return out


def build(case):
    d = case["s_feats"][-1].shape[1]
    mod = PADModule(d)
    # Non-default batch-norm affine parameters and running statistics, so
    # that both the train- and the eval-mode paths are exercised.
    bn = mod.var_estimator[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return mod


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    args = case["args"]
    eps = float(args.get("eps", 1e-6))
    warm = int(args.get("warmup_epochs", 0))
    f_s = s_feats[-1].flatten(1)
    f_t = t_feats[-1].flatten(1)
    log_var = mod.var_estimator(f_s)
    loss = torch.mean((f_t - f_s) ** 2 / (eps + torch.exp(log_var)) + log_var, dim=1).mean()
    return warmup_ramp(case, warm) * loss
