#!/usr/bin/python3
"""Generates the PyTorch reference fixtures that kd's C tests compare against.

Usage:
    /usr/bin/python3 tools/gen_fixtures.py tests/fixtures

Needs only Debian's python3-torch (1.13); the safetensors files are written by
the small writer below (no safetensors package). Everything is seeded and
computed on the CPU with one thread, so a rerun reproduces the files bit for
bit on the same torch build.

Two files are written.

ops.safetensors: one or more cases per kd_op (include/kd/autograd.h).
  A case named "<case>" ("<opname>" or "<opname>_<variant>", where <opname> is
  kd_op_get_info(op)->name) holds
    <case>.in0, <case>.in1, ...   inputs in the argument order of the kd_<op>()
                                  call (F32, except cross_entropy's labels: I64)
    <case>.out                    the forward output (loss ops: a 0-d scalar)
    <case>.r                      random upstream weights shaped like out; the
                                  objective whose gradients are stored is
                                  sum(out * r)
    <case>.grad<i>                d objective / d in<i>, present exactly for the
                                  inputs that require gradients in the case
  and __metadata__["<case>"] = a flat JSON object with the op and its
  parameters, e.g. {"op": "conv2d", "stride": [2, 2], "pad": [1, 1],
  "dilation": [1, 1], "groups": 1}. Values are numbers, lists of numbers or
  strings. batchnorm training cases also store <case>.running_mean and
  <case>.running_var: in3 and in4 after the in-place momentum update.
  __metadata__["cases"] lists all case names, comma-separated.
  The inputs are float32 (what kd receives); the reference outputs and
  gradients are computed in float64 from those exact float32 inputs and then
  rounded to float32, so the fixture carries no float32 summation-order noise
  of its own. Inputs of ReLU, leaky ReLU and max pooling stay away from the
  kinks (|x| >= 0.1, no ties inside a pooling window).

resnet8_5steps.safetensors: five SGD steps of RepDistiller's CIFAR resnet8
  (models/resnet.py: BasicBlock, channels 16,16,32,64, depth 8 so one block per
  stage, conv1 3x3 without bias + bn1 + relu, layer1..layer3 (layer2/3 start
  with stride 2 and a 1x1 conv + BN downsample), 8x8 average pool, fc),
  num_classes 10, 3 input channels, float32, train mode throughout.
  Loss: F.cross_entropy (mean over the batch, no label smoothing).
  Optimiser: torch.optim.SGD(model.parameters(), lr 0.1, momentum 0.9,
  weight_decay 5e-4, nesterov False, dampening 0): weight decay applies to all
  parameters (BN and bias included), as RepDistiller does; the momentum buffer
  starts as the first step's (decayed) gradient.
    init.<name>          every state_dict entry before training (parameters,
                         bn running_mean/running_var F32, num_batches_tracked
                         I64 0-d)
    batch<k>.x           (8, 3, 32, 32) F32, N(0, 1), k = 1..5
    batch<k>.y           (8,) I64 labels in [0, 10)
    step1.logits         (8, 10) forward output of step 1 (before the update)
    step1.grad.<param>   gradients of step 1's loss (before weight decay and
                         momentum), one per parameter
    step<k>.loss         0-d F32, the loss of step k's forward (before update)
    step<k>.<name>       every state_dict entry after step k (parameters after
                         the update; BN running stats after step k's forward;
                         num_batches_tracked = k)
  Metadata: arch, num_classes, batch, steps, lr, momentum, weight_decay,
  nesterov, torch version.
"""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from st_io import save_safetensors  # noqa: E402,F401 (re-exported for the other generators)


# --------------------------------------------------------------------- ops


class OpCases:
    """Collects cases: inputs (float32), float64 reference outputs and grads."""

    def __init__(self):
        self.tensors = {}
        self.meta = {}
        self.names = []

    def add(self, case, params, fn, inputs, grad_mask, extra_out=None):
        """fn(*inputs64) -> output64 (or (output64, {suffix: tensor64}))."""
        assert case not in self.meta, case
        xs = []
        for i, (x, need) in enumerate(zip(inputs, grad_mask)):
            self.tensors[f"{case}.in{i}"] = x
            if x.dtype == torch.float32:
                x = x.double()
            if need:
                x = x.clone().requires_grad_(True)
            xs.append(x)
        res = fn(*xs)
        extras = {}
        if isinstance(res, tuple):
            res, extras = res
        r = torch.randn(res.shape, dtype=torch.float32)
        obj = (res * r.double()).sum()
        need = [x for x, m in zip(xs, grad_mask) if m]
        grads = torch.autograd.grad(obj, need) if need else []
        self.tensors[f"{case}.out"] = res.detach().float()
        self.tensors[f"{case}.r"] = r
        gi = iter(grads)
        for i, m in enumerate(grad_mask):
            if m:
                self.tensors[f"{case}.grad{i}"] = next(gi).detach().float()
        for k, v in extras.items():
            self.tensors[f"{case}.{k}"] = v.detach().float()
        self.meta[case] = json.dumps(params)
        self.names.append(case)


def away_from_zero(*shape):
    """Normal-ish values with |x| >= 0.1 (no ReLU kink within rounding)."""
    u = torch.randn(*shape)
    return torch.sign(u) * (0.1 + u.abs())


def away_from(x, kinks, gap=0.1):
    """x with every value within `gap` of a kink moved to kink +- gap."""
    for k in kinks:
        d = x - k
        near = d.abs() < gap
        x = torch.where(near, k + torch.where(d < 0, -gap, gap) * torch.ones_like(x), x)
    return x


def distinct(*shape):
    """A random permutation of evenly spaced values in [-2, 2): no ties."""
    n = 1
    for s in shape:
        n *= s
    v = torch.randperm(n).float() / n * 4.0 - 2.0
    return v.reshape(*shape)


def transformer_cases(c):
    """Transformer ops of ops_norm.c (Swin, DINO): layernorm, gelu, bmm, and softmax on
    attention-shaped (B, heads, N, N) scores. Appended after the older cases, so that
    those keep their random inputs."""
    randn = torch.randn

    # layernorm: in0 x (..., D), in1 gamma (D), in2 beta (D) when "affine" is 1.
    def ln(case, x, affine, eps):
        D = x.shape[-1]
        ins = [x] + ([1.0 + 0.3 * randn(D), 0.3 * randn(D)] if affine else [])

        def fn(x, g=None, b=None):
            return F.layer_norm(x, (D,), g, b, eps)
        c.add(case, {"op": "layernorm", "eps": eps, "affine": int(affine)}, fn, ins,
              [True] * len(ins))

    ln("layernorm", 2 * randn(2, 5, 8) + 0.5, True, 1e-5)
    ln("layernorm_noaffine", randn(3, 4, 6) - 1.0, False, 1e-5)
    ln("layernorm_2d_d96", randn(3, 96), True, 1e-6)

    c.add("gelu", {"op": "gelu"}, F.gelu, [3 * randn(3, 4, 5)], [True])

    # bmm: in0 a, in1 b; op(a) (..., M, K) @ op(b) (..., K, N), op = transpose when
    # trans_a / trans_b is 1 (a stored (..., K, M), b stored (..., N, K)).
    def bmm(case, batch, M, K, N, ta, tb):
        a = randn(*batch, *((K, M) if ta else (M, K)))
        b = randn(*batch, *((N, K) if tb else (K, N)))

        def fn(a, b):
            return torch.matmul(a.transpose(-1, -2) if ta else a,
                                b.transpose(-1, -2) if tb else b)
        c.add(case, {"op": "bmm", "trans_a": ta, "trans_b": tb}, fn, [a, b], [True, True])

    bmm("bmm", (3,), 4, 5, 6, 0, 0)
    for ta in (0, 1):
        for tb in (0, 1):
            bmm(f"bmm_4d_{'t' if ta else 'n'}{'t' if tb else 'n'}", (2, 3), 4, 5, 3, ta, tb)

    c.add("softmax_4d_attn", {"op": "softmax"}, lambda x: F.softmax(x, -1),
          [2 * randn(2, 3, 7, 7)], [True])


def layout_cases(c):
    """Transformer data-movement ops of ops_layout.c (tests/test_ops_layout.c has
    more, from tools/gen_layout_fixtures.py). Appended after the transformer cases.
    permute: "perm"; roll: "shifts", "dims"; index_select: in1 the I64 index;
    add_bcast: in1 b broadcast to in0; drop_path: the identities only ("p",
    "training"; kd's mask RNG is not torch's); weight_norm: in1 the gain (O)
    when "gain" is 1."""
    randn = torch.randn
    c.add("permute_4d", {"op": "permute", "perm": [0, 2, 3, 1]},
          lambda x: x.permute(0, 2, 3, 1).contiguous(), [randn(2, 3, 4, 5)], [True])
    c.add("roll_2axes", {"op": "roll", "shifts": [-2, 3], "dims": [1, 2]},
          lambda x: torch.roll(x, (-2, 3), (1, 2)), [randn(2, 5, 4, 3)], [True])
    c.add("index_select", {"op": "index_select"}, lambda t, i: t.index_select(0, i),
          [randn(5, 3), torch.tensor([4, 0, 4, 2, 1, 4, 0], dtype=torch.int64)], [True, False])
    c.add("add_bcast_attn", {"op": "add_bcast"}, lambda x, b: x + b,
          [randn(2, 3, 4, 4), randn(1, 3, 4, 4)], [True, True])
    c.add("drop_path_eval", {"op": "drop_path", "p": 0.5, "training": 0}, lambda x: x * 1.0,
          [randn(3, 4)], [True])
    c.add("weight_norm", {"op": "weight_norm", "gain": 1},
          lambda v, g: torch._weight_norm(v, g.view(-1, 1), 0),
          [randn(4, 6), randn(4).abs() + 0.5], [True, True])


def window_attention_cases(c):
    """kd_window_attention against torchvision's shifted_window_attention core
    (after the qkv linear, before proj): in0 qkv (Bw, N, 3C), in1 the bias
    (heads, N, N), in2 the mask (nW, N, N) (no gradient); "heads". Appended
    after the layout cases."""
    randn = torch.randn

    def attn(heads):
        def fn(qkv, bias=None, mask=None):
            Bw, N, C3 = qkv.shape
            C = C3 // 3
            q, k, v = qkv.reshape(Bw, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            q = q * (C // heads) ** -0.5
            a = q.matmul(k.transpose(-2, -1))
            if bias is not None:
                a = a + bias.unsqueeze(0)
            if mask is not None:
                nW = mask.shape[0]
                a = (a.view(Bw // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(Bw, heads, N, N)
            a = F.softmax(a, dim=-1)
            return a.matmul(v).transpose(1, 2).reshape(Bw, N, C)
        return fn

    mask = torch.zeros(2, 9, 9)
    lab = torch.tensor([0, 0, 1, 0, 0, 1, 2, 2, 3])
    mask[1] = (lab[:, None] != lab[None, :]).float() * -100.0
    c.add("window_attention", {"op": "window_attention", "heads": 2}, attn(2),
          [randn(4, 9, 12), 0.5 * randn(2, 9, 9), mask], [True, True, False])
    c.add("window_attention_nobias", {"op": "window_attention", "heads": 3}, attn(3),
          [randn(3, 5, 18)], [True])


def build_ops():
    c = OpCases()
    randn = torch.randn

    # conv2d: in0 x (N, C, H, W), in1 w (O, C/groups, KH, KW), in2 b (O) when "bias" is 1.
    def conv(case, x, w, b, stride, pad, dil, groups):
        params = {"op": "conv2d", "stride": list(stride), "pad": list(pad),
                  "dilation": list(dil), "groups": groups, "bias": int(b is not None)}
        ins = [x, w] + ([b] if b is not None else [])

        def fn(x, w, b=None):
            return F.conv2d(x, w, b, stride=stride, padding=pad, dilation=dil, groups=groups)
        c.add(case, params, fn, ins, [True] * len(ins))

    conv("conv2d_3x3", randn(2, 3, 7, 7), randn(4, 3, 3, 3) * 0.3, None, (1, 1), (1, 1), (1, 1), 1)
    conv("conv2d_s2_bias", randn(2, 4, 8, 8), randn(6, 4, 3, 3) * 0.3, randn(6), (2, 2), (1, 1),
         (1, 1), 1)
    conv("conv2d_dil2", randn(2, 3, 9, 9), randn(4, 3, 3, 3) * 0.3, None, (1, 1), (2, 2), (2, 2), 1)
    conv("conv2d_groups2", randn(2, 4, 6, 6), randn(6, 2, 3, 3) * 0.3, randn(6), (1, 1), (1, 1),
         (1, 1), 2)
    conv("conv2d_depthwise", randn(2, 4, 6, 6), randn(4, 1, 3, 3) * 0.3, None, (1, 1), (1, 1),
         (1, 1), 4)
    conv("conv2d_1x1", randn(2, 5, 5, 5), randn(3, 5, 1, 1) * 0.3, randn(3), (1, 1), (0, 0),
         (1, 1), 1)
    conv("conv2d_1x1_s2", randn(2, 4, 8, 8), randn(6, 4, 1, 1) * 0.3, None, (2, 2), (0, 0),
         (1, 1), 1)
    conv("conv2d_rect", randn(2, 3, 7, 6), randn(5, 3, 3, 2) * 0.3, randn(5), (2, 1), (1, 0),
         (1, 1), 1)
    # Channel counts of resnet8 (multiples of 16): oneDNN's blocked kernels.
    conv("conv2d_c16_s2", randn(2, 16, 8, 8), randn(32, 16, 3, 3) * 0.1, None, (2, 2), (1, 1),
         (1, 1), 1)

    # batchnorm: in0 x, in1 gamma, in2 beta, in3 running_mean, in4 running_var.
    def bn(case, x, training):
        C = x.shape[1]
        gamma = 1.0 + 0.3 * randn(C)
        beta = 0.3 * randn(C)
        rm = 0.2 * randn(C)
        rv = 0.5 + torch.rand(C)
        params = {"op": "batchnorm", "eps": 1e-5, "momentum": 0.1, "training": int(training)}

        def fn(x, g, b, rm, rv):
            rm, rv = rm.clone(), rv.clone()
            y = F.batch_norm(x, rm, rv, g, b, training=training, momentum=0.1, eps=1e-5)
            return (y, {"running_mean": rm, "running_var": rv}) if training else y
        c.add(case, params, fn, [x + 0.5, gamma, beta, rm, rv], [True, True, True, False, False])

    bn("batchnorm_2d_train", randn(4, 3, 5, 5), True)
    bn("batchnorm_2d_eval", randn(4, 3, 5, 5), False)
    bn("batchnorm_2d_c16_train", randn(2, 16, 4, 4), True)
    bn("batchnorm_1d_train", randn(8, 5), True)
    bn("batchnorm_1d_eval", randn(8, 5), False)

    # linear: in0 x (N, in), in1 w (out, in), in2 b (out) when "bias" is 1.
    c.add("linear", {"op": "linear", "bias": 1}, F.linear,
          [randn(4, 6), randn(5, 6) * 0.4, randn(5)], [True, True, True])
    c.add("linear_nobias", {"op": "linear", "bias": 0}, lambda x, w: F.linear(x, w),
          [randn(3, 7), randn(4, 7) * 0.4], [True, True])

    c.add("matmul", {"op": "matmul"}, torch.matmul, [randn(3, 4), randn(4, 5)], [True, True])

    c.add("relu", {"op": "relu"}, F.relu, [away_from_zero(3, 4, 5)], [True])
    c.add("leaky_relu", {"op": "leaky_relu", "slope": 0.1},
          lambda x: F.leaky_relu(x, 0.1), [away_from_zero(3, 4, 5)], [True])

    c.add("add", {"op": "add"}, torch.add, [randn(2, 3, 4), randn(2, 3, 4)], [True, True])
    c.add("mul", {"op": "mul"}, torch.mul, [randn(2, 3, 4), randn(2, 3, 4)], [True, True])
    # One tensor feeding both inputs: its gradient must accumulate (2 x r).
    c.add("mul_self", {"op": "mul", "same_input": 1}, lambda x: x * x, [randn(3, 5)], [True])
    c.add("scale", {"op": "scale", "s": -1.75}, lambda x: x * -1.75, [randn(3, 4)], [True])

    # Pooling: square windows, PyTorch's floor mode.
    def pool(case, kind, x, k, s, p, cip=1):
        params = {"op": kind, "kernel": k, "stride": s, "pad": p}
        if kind == "avgpool2d":
            params["count_include_pad"] = cip

            def fn(x):
                return F.avg_pool2d(x, k, s, p, count_include_pad=bool(cip))
        else:
            def fn(x):
                return F.max_pool2d(x, k, s, p)
        c.add(case, params, fn, [x], [True])

    pool("avgpool2d_k2s2", "avgpool2d", randn(2, 3, 6, 6), 2, 2, 0)
    pool("avgpool2d_k3s1p1", "avgpool2d", randn(2, 3, 5, 5), 3, 1, 1)
    pool("avgpool2d_k3s2p1_nopad", "avgpool2d", randn(2, 2, 7, 7), 3, 2, 1, cip=0)
    pool("maxpool2d_k2s2", "maxpool2d", distinct(2, 3, 6, 6), 2, 2, 0)
    pool("maxpool2d_k2s2_odd", "maxpool2d", distinct(2, 2, 7, 7), 2, 2, 0)
    pool("maxpool2d_k3s2p1", "maxpool2d", distinct(2, 3, 7, 7), 3, 2, 1)
    pool("avgpool2d_c16_k2s2", "avgpool2d", randn(2, 16, 4, 4), 2, 2, 0)
    pool("maxpool2d_c16_k3s2p1", "maxpool2d", distinct(2, 16, 5, 5), 3, 2, 1)

    c.add("global_avgpool", {"op": "global_avgpool"},
          lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1), [randn(2, 3, 4, 5)], [True])

    c.add("reshape", {"op": "reshape", "shape": [6, 4]}, lambda x: x.reshape(6, 4),
          [randn(2, 3, 4)], [True])
    c.add("reshape_flatten", {"op": "reshape", "flatten": 1}, lambda x: x.flatten(1),
          [randn(2, 3, 2, 2)], [True])

    c.add("transpose", {"op": "transpose", "dim0": 0, "dim1": 1}, lambda x: x.t(),
          [randn(3, 5)], [True])
    c.add("transpose_3d", {"op": "transpose", "dim0": 0, "dim1": 2},
          lambda x: x.transpose(0, 2), [randn(2, 3, 4)], [True])

    c.add("concat", {"op": "concat", "dim": 1}, lambda *xs: torch.cat(xs, 1),
          [randn(2, 3, 2, 2), randn(2, 1, 2, 2), randn(2, 2, 2, 2)], [True, True, True])
    c.add("concat_dim0", {"op": "concat", "dim": 0}, lambda *xs: torch.cat(xs, 0),
          [randn(2, 3), randn(3, 3)], [True, True])

    c.add("slice", {"op": "slice", "dim": 1, "start": 1, "end": 4},
          lambda x: x[:, 1:4], [randn(2, 6, 3)], [True])
    c.add("slice_last", {"op": "slice", "dim": 2, "start": 2, "end": 5},
          lambda x: x[:, :, 2:5], [randn(2, 3, 6)], [True])

    c.add("softmax", {"op": "softmax"}, lambda x: F.softmax(x, -1), [2 * randn(4, 7)], [True])
    c.add("softmax_3d", {"op": "softmax"}, lambda x: F.softmax(x, -1), [2 * randn(2, 3, 5)],
          [True])
    c.add("log_softmax", {"op": "log_softmax"}, lambda x: F.log_softmax(x, -1),
          [2 * randn(4, 7)], [True])

    # cross_entropy: in0 logits (N, C), in1 labels I64 (N).
    for case, ls in (("cross_entropy", 0.0), ("cross_entropy_ls0.1", 0.1)):
        c.add(case, {"op": "cross_entropy", "label_smoothing": ls},
              lambda x, y, ls=ls: F.cross_entropy(x, y, label_smoothing=ls),
              [2 * randn(6, 10), torch.randint(0, 10, (6,))], [True, False])

    # kl_div: in0 student logits, in1 teacher logits; RepDistiller DistillKL.
    T = 4.0

    def distill_kl(s, t):
        return (F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="sum")
                * T ** 2 / s.shape[0])
    c.add("kl_div", {"op": "kl_div", "T": T}, distill_kl, [3 * randn(5, 10), 3 * randn(5, 10)],
          [True, True])

    c.add("mse", {"op": "mse"}, F.mse_loss, [randn(3, 4), randn(3, 4)], [True, True])

    c.add("l2_normalize", {"op": "l2_normalize", "eps": 1e-12},
          lambda x: F.normalize(x, dim=1, eps=1e-12), [randn(4, 6)], [True])

    c.add("mean", {"op": "mean"}, torch.mean, [randn(3, 4, 5)], [True])
    c.add("sum", {"op": "sum"}, torch.sum, [randn(3, 4, 5)], [True])
    c.add("exp", {"op": "exp"}, torch.exp, [torch.rand(3, 4) * 4 - 2], [True])
    c.add("log", {"op": "log"}, torch.log, [torch.rand(3, 4) * 3 + 0.2], [True])
    # Ratios of probabilities near 1 (PKT, KL-style method losses): log x ~ x - 1.
    c.add("log_near1", {"op": "log"}, torch.log, [1 + (torch.rand(4, 8) - 0.5) * 0.02], [True])

    # dropout: only the identities (kd's mask RNG is not torch's).
    c.add("dropout_p0", {"op": "dropout", "p": 0.0, "training": 1},
          lambda x: F.dropout(x, 0.0, training=True), [randn(3, 4)], [True])
    c.add("dropout_eval", {"op": "dropout", "p": 0.5, "training": 0},
          lambda x: F.dropout(x, 0.5, training=False), [randn(3, 4)], [True])

    # Activations of the mobile networks. Inputs of the piecewise-linear ones
    # stay >= 0.1 away from their kinks (hardswish, hardsigmoid: -3 and 3;
    # relu6: 0 and 6).
    c.add("sigmoid", {"op": "sigmoid"}, torch.sigmoid, [3 * randn(3, 4, 5)], [True])
    c.add("hardswish", {"op": "hardswish"}, F.hardswish, [away_from(3 * randn(4, 30), (-3, 3))],
          [True])
    c.add("hardsigmoid", {"op": "hardsigmoid"}, F.hardsigmoid,
          [away_from(3 * randn(4, 30), (-3, 3))], [True])
    c.add("silu", {"op": "silu"}, F.silu, [3 * randn(3, 4, 5)], [True])
    c.add("relu6", {"op": "relu6"}, F.relu6, [away_from(2 + 3 * randn(4, 30), (0, 6))], [True])

    # mul_channel: in0 x (N, C, H, W), in1 s (N, C) or (N, 1); y = x * s[:, :, None, None].
    c.add("mul_channel", {"op": "mul_channel"}, lambda x, s: x * s[:, :, None, None],
          [randn(2, 3, 4, 5), randn(2, 3)], [True, True])
    c.add("mul_channel_n1", {"op": "mul_channel"}, lambda x, s: x * s[:, :, None, None],
          [randn(3, 4, 2, 3), randn(3, 1)], [True, True])

    # to_strided: kd's layout conversion, values unchanged (identity). kd runs the case as
    # NCHW -> NCHW16C -> NCHW where the backend has blocked layouts (C % 16 == 0).
    c.add("to_strided", {"op": "to_strided"}, lambda x: x.clone(), [randn(2, 32, 3, 4)], [True])

    # function: a custom kd_function (tests/testutil.c kd_test_fn_polymul), y = a * b^2 + a / 2.
    c.add("function", {"op": "function"}, lambda a, b: a * b * b + 0.5 * a,
          [randn(3, 4, 5), randn(3, 4, 5)], [True, True])

    transformer_cases(c)
    layout_cases(c)
    window_attention_cases(c)

    c.meta["cases"] = ",".join(c.names)
    c.meta["generator"] = "tools/gen_fixtures.py"
    c.meta["torch"] = torch.__version__
    return c


# ------------------------------------------------------------------ resnet8


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet with BasicBlocks: depth 6n+2."""

    def __init__(self, depth, widths, num_classes, in_channels=3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (w, s) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, s if j == 0 else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # the 8x8 average pool for 32x32 inputs
        return self.fc(x)


def build_resnet8(steps=5, batch=8, num_classes=10):
    model = CifarResNet(8, [16, 16, 32, 64], num_classes)
    model.train()
    lr, momentum, wd = 0.1, 0.9, 5e-4
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd,
                          nesterov=False)
    t = {}
    for k, v in model.state_dict().items():
        t[f"init.{k}"] = v.clone()
    losses = []
    for step in range(1, steps + 1):
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, num_classes, (batch,))
        t[f"batch{step}.x"] = x
        t[f"batch{step}.y"] = y
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if step == 1:
            t["step1.logits"] = logits.detach().clone()
            for k, p in model.named_parameters():
                t[f"step1.grad.{k}"] = p.grad.detach().clone()
        opt.step()
        t[f"step{step}.loss"] = loss.detach().clone()
        losses.append(loss.item())
        for k, v in model.state_dict().items():
            t[f"step{step}.{k}"] = v.detach().clone()
    meta = {"arch": "resnet8", "num_classes": num_classes, "in_channels": 3, "batch": batch,
            "steps": steps, "lr": lr, "momentum": momentum, "weight_decay": wd,
            "nesterov": 0, "loss": "cross_entropy", "generator": "tools/gen_fixtures.py",
            "torch": torch.__version__}
    nparams = sum(p.numel() for p in model.parameters())
    return t, meta, losses, nparams


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_fixtures.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    torch.manual_seed(0)
    c = build_ops()
    p = os.path.join(out, "ops.safetensors")
    n = save_safetensors(p, c.tensors, c.meta)
    ops = sorted({json.loads(c.meta[k])["op"] for k in c.names})
    print(f"{p}: {len(c.names)} cases over {len(ops)} ops, {len(c.tensors)} tensors, {n} bytes")
    print("  ops: " + " ".join(ops))

    torch.manual_seed(1)
    t, meta, losses, nparams = build_resnet8()
    p = os.path.join(out, "resnet8_5steps.safetensors")
    n = save_safetensors(p, t, meta)
    print(f"{p}: resnet8 ({nparams} parameters), {len(t)} tensors, {n} bytes")
    print("  losses: " + " ".join(f"{v:.6f}" for v in losses))


if __name__ == "__main__":
    main()
