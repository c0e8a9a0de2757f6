"""Shared pieces of the method references: the RepDistiller composition,
random cases shaped like kd's models' outputs, and the helpers that several
references repeat (RepDistiller's pooling of map pairs, the selection of one
flattened feature, settings and the warm-up ramp)."""
import torch
import torch.nn.functional as F


def weighted_terms(ref, mod, case, s_feats, s_logits, t_feats, t_logits, y):
    """kd's default step: the named weighted terms gamma CE, alpha KL_T and
    beta * the method term, at the reference's published weights; a
    reference with a loss of its own (kd's `loss` hook, e.g. SSKD) defines
    terms(mod, case, s_feats, s_logits, t_feats, t_logits, y) -> the named
    weighted terms instead."""
    if hasattr(ref, "terms"):
        return ref.terms(mod, case, s_feats, s_logits, t_feats, t_logits, y)
    w = ref.WEIGHTS
    terms = {}
    if w["gamma"] != 0:
        terms["ce"] = w["gamma"] * F.cross_entropy(s_logits, y)
    if w["alpha"] != 0:
        terms["kl"] = w["alpha"] * distill_kl(s_logits, t_logits, w["T"])
    if w["beta"] != 0:
        t = ref.term(mod, case, s_feats, s_logits, t_feats, t_logits, y)
        if t is not None:
            terms[ref.NAME] = w["beta"] * t
    return terms


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


def make_case(gen, name, n, s_feats, t_feats, k=10, args=None, t_scale=3.0, t_shift=0.0, **extra):
    """One case of the contract in __init__.py with the given feature lists;
    student logits, teacher logits (scale t_scale, plus t_shift) and labels
    over k classes are drawn from gen in that order. extra: epoch, training."""
    s_logits = logits(gen, n, k)
    t_logits = logits(gen, n, k, scale=t_scale)
    if t_shift:
        t_logits = t_logits + t_shift
    return dict(name=name, s_feats=s_feats, t_feats=t_feats, s_logits=s_logits, t_logits=t_logits,
                labels=labels(gen, n, k), args=dict(args or {}), **extra)


def settings(case, defaults):
    """The method's settings: defaults, overridden by the case's args (text),
    each converted to its default's type."""
    a = dict(defaults)
    a.update({k: type(defaults[k])(float(v)) for k, v in case["args"].items()})
    return a


def warmup_ramp(case, warmup):
    """A linear warm-up over warmup epochs, min(1, (epoch + 1) / warmup), with
    the case's 0-based epoch (mdistiller counts epochs from 1); 0: no ramp."""
    return min(1.0, (case.get("epoch", 0) + 1) / warmup) if warmup > 0 else 1.0


def pool_pair(f_s, f_t):
    """RepDistiller's pairing of feature maps in AT, VID and NST (at_loss,
    VIDLoss.forward, NSTLoss.forward): the map with the larger height is
    adaptive-average-pooled to (H, H), H the other's height."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return f_s, f_t


def flat_pair(case, s_feats, t_feats):
    """The feature the case's "feat" setting selects (default -1, the pooled
    embedding) on both nets, flattened to (N, -1)."""
    k = int(case["args"].get("feat", -1))
    return s_feats[k].reshape(s_feats[k].shape[0], -1), t_feats[k].reshape(t_feats[k].shape[0], -1)
