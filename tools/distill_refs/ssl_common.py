"""Pieces the self-supervised references share (simclr, moco, seed), written
from ../shared/METHODS.md sections 5, 13 and 14 and the official code they
cite: projection heads under PyTorch nn.Sequential names, MoCo's queue and its
FIFO update. Frozen modules (a key encoder's EMA head, a teacher's head) hold
their tensors as buffers, as kd does."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Frozen(nn.Module):
    """A layer whose tensors are buffers (weight, bias, running statistics)."""

    def __init__(self, **tensors):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v)


class BNNoCenter(nn.Module):
    """Keras BatchNormalization(center=False) as a BatchNorm1d whose bias is a
    zero buffer (SimCLRv2's last head layer)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.register_buffer("bias", torch.zeros(d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.num_batches_tracked += 1
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, None, self.training, 0.1, 1e-5)


def simclr_head(d, out, gen):
    """tf2/model.py ProjectionHead with 3 layers: Dense(no bias) + BN (+ ReLU
    for the middle layers); the last BN without centre. Weights N(0, 0.01)."""
    h = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
                      nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
                      nn.Linear(d, out, bias=False), BNNoCenter(out))
    with torch.no_grad():
        for i in (0, 3, 6):
            h[i].weight.copy_(torch.randn(h[i].weight.shape, generator=gen) * 0.3)
        for i in (1, 4, 7):
            h[i].weight.copy_(0.5 + torch.rand(h[i].weight.shape, generator=gen))
        for i in (1, 4):
            h[i].bias.copy_(0.1 * torch.randn(h[i].bias.shape, generator=gen))
    return h


def mlp_head(d, hidden, out, gen):
    """MoCo v2 / SEED: Linear(d, hidden) -> ReLU -> Linear(hidden, out)."""
    h = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, out))
    with torch.no_grad():
        for i in (0, 2):
            h[i].weight.copy_(torch.randn(h[i].weight.shape, generator=gen) * 0.3)
            h[i].bias.copy_(0.1 * torch.randn(h[i].bias.shape, generator=gen))
    return h


def frozen_copy(head, gen, perturb=0.0, eval_stats=False):
    """The head with every tensor a buffer (Frozen layers, same names), its
    values perturbed (an EMA copy that has drifted) and, for eval-mode batch
    norm, random running statistics."""
    layers = []
    for m in head:
        if isinstance(m, nn.ReLU):
            layers.append(nn.ReLU())
            continue
        t = {k: v.detach().clone() for k, v in m.state_dict().items()}
        for k in ("weight", "bias"):
            if k in t and t[k].is_floating_point() and perturb:
                t[k] = t[k] + perturb * torch.randn(t[k].shape, generator=gen)
        if eval_stats and "running_mean" in t:
            t["running_mean"] = 0.2 * torch.randn(t["running_mean"].shape, generator=gen)
            t["running_var"] = 0.5 + torch.rand(t["running_var"].shape, generator=gen)
        fz = Frozen(**t)
        fz.kind = type(m)
        layers.append(fz)
    return nn.Sequential(*layers)


def frozen_forward(seq, x, training):
    for m in seq:
        if isinstance(m, nn.ReLU):
            x = F.relu(x)
        elif m.kind is nn.Linear:
            x = F.linear(x, m.weight, getattr(m, "bias", None))
        elif m.kind is BNNoCenter:
            x = F.batch_norm(x, m.running_mean, m.running_var, m.weight, None, training, 0.1, 1e-5)
        else:
            x = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, training, 0.1, 1e-5)
    return x


def new_queue(dim, K, ptr, gen):
    """MoCo's queue: randn (dim, K), each column L2-normalised; the pointer."""
    q = F.normalize(torch.randn(dim, K, generator=gen), dim=0)
    return q, torch.tensor([ptr], dtype=torch.long)


def enqueue(queue, ptr, keys):
    """_dequeue_and_enqueue: columns ptr, ptr + 1, ... take the keys' rows
    (MoCo asserts K % B == 0 and writes queue[:, ptr:ptr + B]; kd wraps
    around the end, which is the same whenever MoCo's assert holds)."""
    q = queue.clone()
    K = q.shape[1]
    p = int(ptr[0])
    for i in range(keys.shape[0]):
        q[:, p] = keys[i].to(q.dtype)
        p = (p + 1) % K
    return q, torch.tensor([p], dtype=torch.long)
