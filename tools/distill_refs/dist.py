"""DIST, Knowledge Distillation from A Stronger Teacher (Huang et al.,
NeurIPS 2022), written from hunto/DIST_KD (README's DIST with tau) and
hunto/image_classification_sota lib/models/losses/dist_kd.py
(cosine_similarity, pearson_correlation, inter/intra_class_relation).
CIFAR-100 composition (METHODS.md section 17): CE 1, DIST weight 2, tau 4,
inner beta = gamma = 1."""
from .common import feats, make_case, settings

NAME = "dist"
WEIGHTS = dict(gamma=1.0, alpha=0.0, beta=2.0, T=4.0)
DEFAULTS = dict(beta=1.0, gamma=1.0, tau=4.0, eps=1e-8)


def _cos(a, b, eps):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _pearson(a, b, eps):
    return _cos(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def _inter(y_s, y_t, eps):
    return 1 - _pearson(y_s, y_t, eps).mean()


def _intra(y_s, y_t, eps):
    return _inter(y_s.transpose(0, 1), y_t.transpose(0, 1), eps)


def dist_loss(z_s, z_t, beta, gamma, tau, eps):
    y_s = (z_s / tau).softmax(dim=1)
    y_t = (z_t / tau).softmax(dim=1)
    return beta * tau ** 2 * _inter(y_s, y_t, eps) + gamma * tau ** 2 * _intra(y_s, y_t, eps)


def cases(gen):
    out = []
    specs = [(8, 10, {}), (5, 100, {}), (16, 100, {"beta": "2", "gamma": "0.5", "tau": "1"}), (7, 10, {"eps": "1e-6"})]
    for i, (n, k, args) in enumerate(specs):
        out.append(make_case(gen, f"c{i}", n, feats(gen, n, [(16, 8, 8)], 64), feats(gen, n, [(32, 8, 8)], 128),
                             k=k, args=args, t_scale=5.0))
    return out


def build(case):
    return None


def term(mod, case, s_feats, s_logits, t_feats, t_logits, labels):
    a = settings(case, DEFAULTS)
    return dist_loss(s_logits, t_logits, a["beta"], a["gamma"], a["tau"], a["eps"])
