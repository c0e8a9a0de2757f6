"""EsViT's loss (microsoft/esvit main_esvit.py DDINOLoss with a ResNet
backbone, utils.MultiCropWrapper / ResNetWrapper.forward_features), written
from ../shared/METHODS.md sections 8 and 15 (dino_common.py): per pair of a
teacher global view and another student view, 0.5 view CE + 0.5 mean over
the student's tokens of the CE to the teacher token of highest cosine
similarity (dense heads "head_dense", "teacher_head_dense"; centre
"center_grid"). Region tokens: the last maps (B, C, H, W) as (B H W, C) rows,
one block per resolution (global crops, then local crops). kd reports the
view and region halves as two terms. After the step: both centres and both
teacher heads' EMA ("updated.*")."""
import torch
import torch.nn as nn

from . import dino_common as dc

NAME = "esvit"
WEIGHTS = dict(gamma=0.0, alpha=0.0, beta=1.0, T=1.0)


class EsViT(nn.Module):
    def __init__(self, d, c, a, gen):
        super().__init__()
        self.head = dc.Head(d, a, gen)
        self.teacher_head = dc.Head(d, a, gen, trainable=False)
        self.head_dense = dc.Head(c, a, gen)
        self.teacher_head_dense = dc.Head(c, a, gen, trainable=False)
        self.dino_loss = nn.Module()
        self.dino_loss.register_buffer("center", 0.3 * torch.randn(1, a["out_dim"], generator=gen))
        self.dino_loss.register_buffer("center_grid", 0.3 * torch.randn(1, a["out_dim"], generator=gen))


def cases(gen):
    out = []
    for name, B, V, D, C, hg, hl, K, nll, epoch, W in (("multicrop", 2, 4, 6, 10, 3, 2, 10, 1, 3, 5),
                                                       ("global", 3, 2, 4, 6, 2, 0, 8, 0, 0, 0)):
        L = V - 2
        # Tokens near basis vectors: both teacher views of image b hold one
        # subset of the basis (each in its own order), every student token is
        # one of them, so each student token has one clearly most similar
        # teacher token in either view (the argmax does not flip under the
        # finite differences' steps).
        def tok(idx, n):
            return (torch.eye(C)[idx].T * (1 + torch.rand(len(idx), generator=gen))).reshape(C, n, n)
        sub = [torch.randperm(C, generator=gen)[:hg * hg] for _ in range(B)]
        pick = lambda b, n: sub[b][torch.randint(0, hg * hg, (n * n,), generator=gen)]  # noqa: E731
        tm = torch.stack([tok(sub[n % B][torch.randperm(hg * hg, generator=gen)], hg) for n in range(2 * B)])
        mg = torch.stack([tok(pick(n % B, hg), hg) for n in range(2 * B)])
        tm = tm + 0.05 * torch.rand(tm.shape, generator=gen)
        mg = mg + 0.05 * torch.rand(mg.shape, generator=gen)
        s_feats = [mg]
        if L:
            ml = torch.stack([tok(pick(n % B, hl), hl) for n in range(L * B)])
            s_feats.append(ml + 0.05 * torch.rand(ml.shape, generator=gen))
        pooled = torch.randn(V * B, D, generator=gen).relu()
        s_feats.append(pooled)
        t_pooled = pooled[:2 * B] + 0.2 * torch.randn(2 * B, D, generator=gen)
        args = {"out_dim": str(K), "hidden": "7", "bottleneck": "5", "norm_last_layer": str(nll),
                "local_crops_number": str(L), "warmup_teacher_temp_epochs": str(W)}
        out.append(dict(name=name, s_feats=s_feats, t_feats=[tm, t_pooled], s_logits=torch.randn(B, 10, generator=gen),
                        t_logits=torch.randn(B, 10, generator=gen), labels=torch.zeros(B, dtype=torch.long),
                        args=args, epoch=epoch))
    return out


def build(case):
    gen = torch.Generator().manual_seed(22)
    return EsViT(case["s_feats"][-1].shape[1], case["s_feats"][0].shape[1], dc.settings(case), gen)


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, y):
    a = dc.settings(case)
    B = t_feats[-1].shape[0] // 2
    V = s_feats[-1].shape[0] // B
    s_cls = mod.head(s_feats[-1])
    tg, ng = dc.tokens(s_feats[0])
    npatch = [ng]
    s_fea = tg
    if V > 2:
        tl, nl = dc.tokens(s_feats[1])
        npatch.append(nl)
        s_fea = torch.cat((tg, tl))
    else:
        npatch.append(0)
    s_region = mod.head_dense(s_fea)
    with torch.no_grad():
        t_cls = mod.teacher_head(t_feats[-1])
        t_fea, tn = dc.tokens(t_feats[0])
        t_region = mod.teacher_head_dense(t_fea)
    view, n = dc.view_loss(s_cls, t_cls, mod.dino_loss.center, a, case["epoch"], V, 0.5)
    region = dc.region_loss(s_region, s_fea, npatch, t_region, t_fea, [tn], mod.dino_loss.center_grid, a,
                            case["epoch"], V)
    mod._t = (t_cls, t_region)
    return {"esvit_view": view / n, "esvit_region": region / n}


def extra(mod, case):
    a = dc.settings(case)
    m = dc.momentum(a)
    out = {"updated.dino_loss.center": dc.update_center(mod.dino_loss.center, mod._t[0], a["center_momentum"]),
           "updated.dino_loss.center_grid": dc.update_center(mod.dino_loss.center_grid, mod._t[1],
                                                             a["center_momentum"])}
    for k, v in dc.ema_head(mod.teacher_head, mod.head, m).items():
        out[f"updated.teacher_head.{k}"] = v
    for k, v in dc.ema_head(mod.teacher_head_dense, mod.head_dense, m).items():
        out[f"updated.teacher_head_dense.{k}"] = v
    return out
