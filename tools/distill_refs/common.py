"""Shared pieces of the method references: the RepDistiller composition and
random feature lists shaped like kd's models' outputs."""
import torch
import torch.nn.functional as F


def distill_kl(s, t, T):
    """RepDistiller DistillKL: KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""
    p_s = F.log_softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * T ** 2 / s.shape[0]


def feats(gen, n, maps, dim):
    """A RepDistiller-style feature list: maps [(C, H, W), ...] then the pooled
    (n, dim) embedding. Float32, N(0, 1) scaled into a plausible range (ReLU
    outputs are non-negative, as the models' features are)."""
    out = [torch.randn(n, c, h, w, generator=gen).relu() for (c, h, w) in maps]
    out.append(torch.randn(n, dim, generator=gen).relu())
    return out


def logits(gen, n, k, scale=3.0):
    return scale * torch.randn(n, k, generator=gen)


def labels(gen, n, k):
    return torch.randint(0, k, (n,), generator=gen)
