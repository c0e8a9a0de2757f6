"""What the DINO and EsViT references share, written from ../shared/METHODS.md
sections 8 and 15 and the official code (facebookresearch/dino main_dino.py
DINOLoss, vision_transformer.py DINOHead, utils.cosine_scheduler;
microsoft/esvit main_esvit.py DDINOLoss, utils.MultiCropWrapper /
ResNetWrapper.forward_features):

- the DINO head (Linear-GELU-Linear-GELU-Linear, L2 normalise, weight-normalised
  Linear without bias) under DINOHead's names; weight_g is a buffer where kd
  keeps it fixed (norm_last_layer: requires_grad False in DINO, never
  optimised); the teacher's heads are all buffers (EMA copies);
- the losses as the official forward: DINOLoss (view term) and DDINOLoss
  (view + region), split into their view and region sums;
- the centre update (update_center, one process) and the EMA of the heads
  (main_dino.py's momentum update over the parameters, weight_g included).

kd's loss hook sees: the student's pooled features of every view, stacked view
after view (V B, D), as its last feature; for EsViT first the student's last
maps of the global crops (2 B, C, Hg, Wg) and of the local crops (L B, C, Hl,
Wl); the teacher's map of the global crops and its pooled (2 B, D)."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EPOCHS = 240  # tests/test_distill.c runs every case with 240 epochs of 1 step


def settings(case):
    a = dict(out_dim=10, hidden=7, bottleneck=5, norm_last_layer=1, warmup_teacher_temp=0.04, teacher_temp=0.07,
             warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9, momentum_teacher=0.996,
             local_crops_number=8)
    for k, v in case["args"].items():
        a[k] = type(a[k])(float(v))
    return a


class Head(nn.Module):
    """DINOHead(in_dim, out_dim, use_bn=False, nlayers=3, hidden_dim, bottleneck_dim)."""

    def __init__(self, d, a, gen, trainable=True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, a["hidden"]), nn.GELU(), nn.Linear(a["hidden"], a["hidden"]), nn.GELU(),
                                 nn.Linear(a["hidden"], a["bottleneck"]))
        with torch.no_grad():
            for i in (0, 2, 4):
                self.mlp[i].weight.copy_(0.5 * torch.randn(self.mlp[i].weight.shape, generator=gen))
                self.mlp[i].bias.copy_(0.1 * torch.randn(self.mlp[i].bias.shape, generator=gen))
        self.last_layer = nn.Module()
        v = torch.randn(a["out_dim"], a["bottleneck"], generator=gen)
        g = torch.ones(a["out_dim"], 1)
        if not trainable:  # a teacher's EMA copy: weight_g drifts with the EMA
            g = g + 0.05 * torch.randn(g.shape, generator=gen)
        if trainable:
            self.last_layer.weight_v = nn.Parameter(v)
        else:
            self.last_layer.register_buffer("weight_v", v)
        if trainable and not a["norm_last_layer"]:
            self.last_layer.weight_g = nn.Parameter(g + 0.1 * torch.randn(g.shape, generator=gen))
        else:
            self.last_layer.register_buffer("weight_g", g)
        if not trainable:
            for m in self.mlp:
                if isinstance(m, nn.Linear):
                    w, b = m.weight.detach().clone(), m.bias.detach().clone()
                    del m.weight, m.bias
                    m.register_buffer("weight", w)
                    m.register_buffer("bias", b)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        w = torch._weight_norm(self.last_layer.weight_v, self.last_layer.weight_g, 0)
        return F.linear(x, w)


def teacher_temp(a, epoch):
    """DINOLoss.teacher_temp_schedule[epoch]."""
    W = a["warmup_teacher_temp_epochs"]
    sched = np.concatenate((np.linspace(a["warmup_teacher_temp"], a["teacher_temp"], W),
                            np.ones(EPOCHS - W) * a["teacher_temp"]))
    return sched[epoch]


def view_loss(s_out, t_out, center, a, epoch, ncrops, w):
    """DINOLoss.forward (w = 1), or the view half of DDINOLoss (w = 0.5):
    the sum over pairs and the pair count."""
    student_out = (s_out / a["student_temp"]).chunk(ncrops)
    temp = teacher_temp(a, epoch)
    teacher_out = F.softmax((t_out - center) / temp, dim=-1).detach().chunk(2)
    total, n = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + (w * torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)).mean()
            n += 1
    return total, n


def tokens(m):
    """ResNetWrapper.forward_features: rearrange(x, 'b c h w -> b (h w) c'), then (B * N, C)."""
    B, C, H, W = m.shape
    return m.permute(0, 2, 3, 1).reshape(B * H * W, C), H * W


def region_loss(s_region_out, s_fea, s_npatch, t_region_out, t_fea, t_npatch, center_grid, a, epoch, ncrops):
    """The region half of DDINOLoss.forward: 0.5 * loss_grid per pair, summed."""
    temp = teacher_temp(a, epoch)
    t_region = F.softmax((t_region_out - center_grid) / temp, dim=-1).detach().chunk(2)
    t_fea = t_fea.chunk(2)
    N = t_npatch[0]
    B = t_region[0].shape[0] // N
    s_region = s_region_out / a["student_temp"]
    s_split_size = [s_npatch[0]] * 2 + [s_npatch[1]] * (ncrops - 2)
    s_split_size_bs = [i * B for i in s_split_size]
    s_region = torch.split(s_region, s_split_size_bs, dim=0)
    s_fea = torch.split(s_fea, s_split_size_bs, dim=0)
    total = 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            s_region_cur, s_fea_cur = s_region[v].view(B, s_split_size[v], -1), s_fea[v].view(B, s_split_size[v], -1)
            t_region_cur, t_fea_cur = t_region[iq].view(B, N, -1), t_fea[iq].view(B, N, -1)
            sim = torch.matmul(F.normalize(s_fea_cur, p=2, dim=-1), F.normalize(t_fea_cur, p=2, dim=-1).permute(0, 2, 1))
            ind = sim.max(dim=2)[1]
            t_indexed = torch.gather(t_region_cur, 1, ind.unsqueeze(2).expand(-1, -1, t_region_cur.size(2)))
            loss_grid = torch.sum(-t_indexed * F.log_softmax(s_region_cur, dim=-1), dim=[-1]).mean(-1)
            total = total + (0.5 * loss_grid).mean()
    return total


def update_center(center, t_out, m):
    """update_center on one process: c * m + batch mean * (1 - m)."""
    batch_center = torch.sum(t_out, dim=0, keepdim=True) / len(t_out)
    return center * m + batch_center * (1 - m)


def momentum(a, it=0, total=EPOCHS):
    """utils.cosine_scheduler(momentum_teacher, 1, epochs, niter)[it]."""
    iters = np.arange(total)
    sched = 1 + 0.5 * (a["momentum_teacher"] - 1) * (1 + np.cos(np.pi * iters / len(iters)))
    return float(sched[it])


def ema_head(t, s, m):
    """param_k.mul_(m).add_((1 - m) * param_q) over the head's tensors."""
    out = {}
    ts, ss = t.state_dict(), s.state_dict()
    for k in ts:
        out[k] = ts[k] * m + (1 - m) * ss[k]
    return out
