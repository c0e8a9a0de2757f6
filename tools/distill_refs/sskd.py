"""SSKD (xuguodong03/SSKD student.py, wrapper.py): the stage-2 loss on the
outputs of both nets for 4 interleaved views per image (row 4i + v is
image i turned v quarter turns), written from the official code:

    L = 0.1 CE(nor) + 0.9 KL_4(nor) + 2.7 KL_4(aug)[tf-kept] + 10 KL_0.5(simi)[ss-kept]

each F.kl_div(batchmean) * T^2 over the rows it is given. proj_head =
Linear(d, d) -> ReLU -> Linear(d, d) on the flattened feat[-1] of each net:
"ss_s.proj_head.*" trainable, "ss_t.proj_head.*" buffers (frozen in stage
2). The keep rule is student.py's, with stable sorts (kd breaks ties by
index; torch.argsort leaves their order unspecified). kd's weights: gamma
0.1, alpha 0.9, T 4, beta 1 times sskd.tf_weight / sskd.ss_weight.

Also stage1_loss (teacher head training, student.py's first loop) for
tools/gen_sskd_fixtures.py."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import feats, settings

NAME = "sskd"
WEIGHTS = dict(gamma=0.1, alpha=0.9, beta=1.0, T=4.0)
DEFAULTS = dict(tf_weight=2.7, ss_weight=10.0, tf_T=4.0, ss_T=0.5, ratio_tf=1.0, ratio_ss=0.75)


def proj_head(d):
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d))


class Wrapper(nn.Module):
    """wrapper.py's proj_head on its own (the backbone is kd's model)."""

    def __init__(self, d):
        super().__init__()
        self.proj_head = proj_head(d)


def frozen(d):
    """The teacher's head with its tensors as buffers (same names)."""
    src = proj_head(d)
    top, ph = nn.Module(), nn.Module()
    for k in ("0", "2"):
        m = nn.Module()
        m.register_buffer("weight", src[int(k)].weight.detach().clone())
        m.register_buffer("bias", src[int(k)].bias.detach().clone())
        ph.add_module(k, m)
    top.add_module("proj_head", ph)
    return top


def apply_frozen(top, f):
    ph = top.proj_head
    h = F.relu(F.linear(f, getattr(ph, "0").weight, getattr(ph, "0").bias))
    return F.linear(h, getattr(ph, "2").weight, getattr(ph, "2").bias)


class SSKD(nn.Module):
    def __init__(self, d_s, d_t):
        super().__init__()
        self.ss_s = Wrapper(d_s)
        self.ss_t = frozen(d_t)


def build(case):
    d_s = case["s_feats"][-1][0].numel()
    d_t = case["t_feats"][-1][0].numel()
    mod = SSKD(d_s, d_t)
    if case.get("identity_t_head"):
        with torch.no_grad():
            for k in ("0", "2"):
                m = getattr(mod.ss_t.proj_head, k)
                m.weight.copy_(torch.eye(d_t))
                m.bias.zero_()
            # Keeps the student head's ReLU inputs away from the kink, where
            # tests/test_distill.c's finite differences (step 1e-2) would cross it.
            mod.ss_s.proj_head[0].bias.add_(1.0)
    return mod


def simi(aug, nor, batch):
    """student.py's cosine similarities (3B, B), expanded exactly as there."""
    nor = nor.unsqueeze(2).expand(-1, -1, 3 * batch).transpose(0, 2)
    aug = aug.unsqueeze(2).expand(-1, -1, 1 * batch)
    return F.cosine_similarity(aug, nor, dim=1)


def keep_index(scores, target, ratio):
    """student.py's error-level ranking: rows kept (sorted indices)."""
    n = scores.shape[0]
    rank = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.argmax(torch.eq(rank, target.unsqueeze(1)).long(), dim=1)
    index = torch.argsort(rank, stable=True)
    wrong_num = torch.nonzero(rank, as_tuple=True)[0].numel()
    correct_num = n - wrong_num
    wrong_keep = int(wrong_num * ratio)
    index = index[:correct_num + wrong_keep]
    return torch.sort(index)[0]


def terms(mod, case, s_feats, s_logits, t_feats, t_logits, target):
    a = settings(case, DEFAULTS)
    w = WEIGHTS
    batch = s_logits.shape[0] // 4
    nor_index = torch.arange(4 * batch) % 4 == 0
    aug_index = torch.arange(4 * batch) % 4 != 0
    s_rep = mod.ss_s.proj_head(s_feats[-1].reshape(4 * batch, -1))
    t_rep = apply_frozen(mod.ss_t, t_feats[-1].reshape(4 * batch, -1))
    output, knowledge = s_logits, t_logits.detach()
    log_nor_output = F.log_softmax(output[nor_index] / w["T"], dim=1)
    log_aug_output = F.log_softmax(output[aug_index] / a["tf_T"], dim=1)
    nor_knowledge = F.softmax(knowledge[nor_index] / w["T"], dim=1)
    aug_knowledge = F.softmax(knowledge[aug_index] / a["tf_T"], dim=1)
    aug_target = target.unsqueeze(1).expand(-1, 3).contiguous().view(-1).long()
    distill_index_tf = keep_index(aug_knowledge, aug_target, a["ratio_tf"])
    s_simi = simi(s_rep[aug_index], s_rep[nor_index], batch)
    t_simi = simi(t_rep[aug_index], t_rep[nor_index], batch).detach()
    src_target = torch.arange(batch).unsqueeze(1).expand(-1, 3).contiguous().view(-1).long()
    distill_index_ss = keep_index(t_simi, src_target, a["ratio_ss"])
    if "expect_keep_tf" in case:
        assert distill_index_tf.tolist() == case["expect_keep_tf"], distill_index_tf.tolist()
    if "expect_keep_ss" in case:
        assert distill_index_ss.tolist() == case["expect_keep_ss"], distill_index_ss.tolist()
    log_simi = F.log_softmax(s_simi / a["ss_T"], dim=1)
    simi_knowledge = F.softmax(t_simi / a["ss_T"], dim=1)
    loss1 = F.cross_entropy(output[nor_index], target)
    loss2 = F.kl_div(log_nor_output, nor_knowledge, reduction="batchmean") * w["T"] * w["T"]
    loss3 = F.kl_div(log_aug_output[distill_index_tf], aug_knowledge[distill_index_tf],
                     reduction="batchmean") * a["tf_T"] * a["tf_T"]
    loss4 = F.kl_div(log_simi[distill_index_ss], simi_knowledge[distill_index_ss],
                     reduction="batchmean") * a["ss_T"] * a["ss_T"]
    return {"ce": w["gamma"] * loss1, "kl": w["alpha"] * loss2,
            "sskd_tf": w["beta"] * a["tf_weight"] * loss3, "sskd_ss": w["beta"] * a["ss_weight"] * loss4}


def stage1_loss(head, feat):
    """student.py's teacher-head loop: CE of the rotated rows' similarities
    to the unrotated ones against the source index, no temperature."""
    batch = feat.shape[0] // 4
    rep = head(feat.reshape(4 * batch, -1))
    nor_index = torch.arange(4 * batch) % 4 == 0
    aug_index = torch.arange(4 * batch) % 4 != 0
    s = simi(rep[aug_index], rep[nor_index], batch)
    target = torch.arange(batch).unsqueeze(1).expand(-1, 3).contiguous().view(-1).long()
    return F.cross_entropy(s, target)


# Crafted ranks (see cases): the true label's rank in each rotated row of the
# teacher's logits, and the source image's rank in each row of t_simi.
TF_RANKS = [0, 2, 0, 5, 1, 0, 0, 3, 6, 4, 0, 2]   # 7 wrong; ratio 0.5 keeps rows 4, 1, 11
SS_RANKS = [0, 0, 0, 1, 0, 2, 3, 0, 1, 3, 1, 0]   # 6 wrong; ratio 0.75 keeps 4: all but rows 6, 9


def crafted(gen):
    """B = 4, K = 10: teacher logits whose rotated rows rank the label as
    TF_RANKS says, an identity teacher head and teacher embeddings whose
    similarity rows rank the source as SS_RANKS says."""
    B, K, d = 4, 10, 4
    labels = torch.tensor([3, 7, 1, 9])
    t_logits = 3.0 * torch.randn(4 * B, K, generator=gen)
    t_emb = torch.zeros(4 * B, d)
    for i in range(B):
        t_emb[4 * i] = 0.1 + torch.eye(d)[i]
    for r in range(3 * B):
        i, row = r // 3, 4 * (r // 3) + 1 + r % 3
        # Logits: classes in a random order with the label at place TF_RANKS[r].
        order = [c for c in torch.randperm(K, generator=gen).tolist() if c != labels[i].item()]
        order.insert(TF_RANKS[r], labels[i].item())
        for place, c in enumerate(order):
            t_logits[row, c] = float(K - place) + 0.01 * place
        # Embedding: image coefficients descending with the source at place SS_RANKS[r].
        imgs = [j for j in range(B) if j != i]
        imgs.insert(SS_RANKS[r], i)
        for place, j in enumerate(imgs):
            t_emb[row, j] = float(B - place)
        t_emb[row] += 0.1
    s_feats = feats(gen, 4 * B, [(8, 4, 4)], 8)
    t_feats = [torch.randn(4 * B, 8, 4, 4, generator=gen).relu(), t_emb]
    s_logits = 3.0 * torch.randn(4 * B, K, generator=gen)
    keep_tf = sorted([r for r in range(3 * B) if TF_RANKS[r] == 0] + [4, 1, 11])
    keep_ss = [r for r in range(3 * B) if r not in (6, 9)]
    return dict(name="crafted", s_feats=s_feats, t_feats=t_feats, s_logits=s_logits, t_logits=t_logits,
                labels=labels, args={"ratio_tf": "0.5"}, identity_t_head=True,
                expect_keep_tf=keep_tf, expect_keep_ss=keep_ss)


def cases(gen):
    out = []
    for name, B, K, s_maps, ds, t_maps, dt, args in [
            ("b4", 4, 10, [(8, 4, 4)], 16, [(16, 4, 4)], 24, {}),
            ("b5", 5, 100, [(8, 8, 8), (16, 4, 4)], 32, [(32, 4, 4)], 20,
             {"tf_T": "2", "ss_T": "1", "ratio_ss": "0.5", "ratio_tf": "0.7", "tf_weight": "1.5", "ss_weight": "4"})]:
        s_feats = feats(gen, 4 * B, s_maps, ds)
        t_feats = feats(gen, 4 * B, t_maps, dt)
        s_logits = 3.0 * torch.randn(4 * B, K, generator=gen)
        t_logits = 3.0 * torch.randn(4 * B, K, generator=gen)
        labels = torch.randint(0, K, (B,), generator=gen)
        out.append(dict(name=name, s_feats=s_feats, t_feats=t_feats, s_logits=s_logits, t_logits=t_logits,
                        labels=labels, args=args))
    out.append(crafted(gen))
    return out
