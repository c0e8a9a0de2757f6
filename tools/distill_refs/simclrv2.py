"""SimCLRv2's distillation loss (METHODS.md sections 7 and 13): tau^2 *
CE(softmax(t / tau), s / tau) averaged over every image, plus the optional
cross-entropy over the labeled images only (label -1: unlabeled), summed and
divided by the batch size as the paper's equation 3 sums both terms over the
data: every image weighs the same in both terms, whatever the labeled share."""
import torch
import torch.nn.functional as F

from .common import make_case

NAME = "simclrv2"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)


def cases(gen):
    out = []
    for name, args in (("tau1", {}), ("tau_labeled", {"tau": "0.5", "labeled_weight": "0.7"})):
        c = make_case(gen, name, 8, [torch.randn(8, 6, generator=gen)], [torch.randn(8, 6, generator=gen)], k=5,
                      args=args)
        c["labels"][torch.tensor([1, 4, 5])] = -1
        out.append(c)
    return out


def build(case):
    return None


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, y):
    a = case["args"]
    tau = float(a.get("tau", 1.0))
    w = float(a.get("labeled_weight", 0.0))
    p_t = F.softmax(t_logits / tau, dim=1)
    d = (-p_t * F.log_softmax(s_logits / tau, dim=1)).sum(1).mean() * tau * tau
    out = {"simclrv2": WEIGHTS["beta"] * d}
    if w != 0:
        lab = y >= 0
        out["ce"] = w * F.cross_entropy(s_logits[lab], y[lab], reduction="sum") / len(y)
    return out
