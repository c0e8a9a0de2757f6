#!/usr/bin/python3
"""PyTorch definitions of RepDistiller's CIFAR model zoo and the fixtures that
tests/test_zoo_torch.c checks kd's models against.

Usage:
    /usr/bin/python3 tools/gen_zoo_fixtures.py tests/fixtures [ARCH...]

The models below follow RepDistiller's models/*.py (resnet.py, wrn.py,
vgg.py, mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py, resnetv2.py):
same modules, state_dict names, initialisation and forward(x, is_feat,
preact) features. They are also imported by tools/check_roundtrip.py.

For each architecture one file tests/fixtures/zoo_<arch>.safetensors, made
with torch.manual_seed(0), 3 input channels, 100 classes, one CPU thread:

  1. The model is built with RepDistiller's initialisation. In a "synthetic"
     fixture (the large models) every Conv2d and Linear tensor (weights and
     biases) is then replaced by values that C reproduces bit for bit, so the
     file need not store them:
        h  = splitmix64(fnv1a64(name) + i)             (i = flat index, mod 2^64)
        u  = float32((h >> 40) - 2^23) * 2^-23         (exact, in [-1, 1))
        w  = u * float32(b)                             (one float32 rounding)
        b  = sqrt(6 / fan_in) for 4-d, 1 / sqrt(fan_in) for 2-d, 0.1 for 1-d,
        fan_in = numel / shape[0]
  2. Every BatchNorm gets weight U(0.75, 1.25) and bias N(0, 0.1), then its
     running statistics from one train-mode pass (momentum None) over a
     calibration batch (8, 3, 32, 32) ~ N(0, 1): running_mean/var are that
     batch's statistics and num_batches_tracked is 1, so the eval-mode
     activations stay normalised through any depth.
  3. "input" (2, 3, 32, 32) ~ N(0, 1) and "logits" (2, 100) of the eval-mode
     forward are stored, with every state_dict tensor except the synthetic
     ones (a "full" fixture stores all of them).

Metadata: arch (kd's registry name), torch, in_channels, num_classes,
params (trainable elements), state_dict (JSON list of [name, dtype, shape]
in state_dict order), synthetic (JSON list of the generated names), feats
and preacts (JSON lists of [shape, mean, mean of squares] of each
is_feat=True feature without and with preact=True, in RepDistiller's order).
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pth_to_safetensors import save_safetensors  # noqa: E402


def _conv_init_normal_fan_out(model):
    """RepDistiller's vgg/wrn/mobilenetv2 init: conv N(0, sqrt(2/(k*k*out)))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def _kaiming_fan_out(model):
    """RepDistiller's resnet/resnetv2 init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


# ------------------------------------------------------------ resnet.py

class CifarBasicBlock(nn.Module):
    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        res = self.downsample(x) if self.downsample is not None else x
        pre = out + res
        return F.relu(pre), pre


class CifarResNet(nn.Module):
    def __init__(self, depth, widths, num_classes=100, in_channels=3):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[1], n, 1)
        self.layer2 = self._make_layer(widths[2], n, 2)
        self.layer3 = self._make_layer(widths[3], n, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        _kaiming_fan_out(self)

    def _make_layer(self, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes))
        layers = [CifarBasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [CifarBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @staticmethod
    def _stage(layer, x):
        pre = None
        for b in layer:
            x, pre = b(x)
        return x, pre

    def forward(self, x, is_feat=False, preact=False):
        x = F.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, f1p = self._stage(self.layer1, x)
        f1 = x
        x, f2p = self._stage(self.layer2, x)
        f2 = x
        x, f3p = self._stage(self.layer3, x)
        f3 = x
        x = F.avg_pool2d(x, 8).flatten(1)
        f4 = x
        x = self.fc(x)
        feats = [f0, f1p, f2p, f3p, f4] if preact else [f0, f1, f2, f3, f4]
        return (feats, x) if is_feat else x


# --------------------------------------------------------------- wrn.py

class WrnBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        out = self.conv2(out)
        return (x if self.equal else self.convShortcut(act)) + out


class WrnStage(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WrnBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, k, num_classes=100, in_channels=3):
        super().__init__()
        ch = [16, 16 * k, 32 * k, 64 * k]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = WrnStage(n, ch[0], ch[1], 1)
        self.block2 = WrnStage(n, ch[1], ch[2], 2)
        self.block3 = WrnStage(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.nch = ch[3]
        _conv_init_normal_fan_out(self)
        self.fc.bias.data.zero_()

    def forward(self, x, is_feat=False, preact=False):
        out = self.conv1(x)
        f0 = out
        out = self.block1(out)
        f1 = out
        out = self.block2(out)
        f2 = out
        out = self.block3(out)
        f3 = out
        out = F.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8).view(-1, self.nch)
        f4 = out
        out = self.fc(out)
        if preact:
            f1 = self.block2.layer[0].bn1(f1)
            f2 = self.block3.layer[0].bn1(f2)
            f3 = self.bn1(f3)
        return ([f0, f1, f2, f3, f4], out) if is_feat else out


# --------------------------------------------------------------- vgg.py

VGG_CFG = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(nn.Module):
    def __init__(self, depth, num_classes=100, in_channels=3):
        super().__init__()
        cfg = VGG_CFG[depth]
        cin = in_channels
        for b in range(5):
            layers = []
            for v in cfg[b]:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
            setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)
        _conv_init_normal_fan_out(self)
        self.classifier.weight.data.normal_(0, 0.01)
        self.classifier.bias.data.zero_()

    def forward(self, x, is_feat=False, preact=False):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        f0 = x
        pres, posts = [], []
        for b in range(1, 5):
            if b < 4 or h == 64:
                x = F.max_pool2d(x, 2, 2)
            x = getattr(self, f"block{b}")(x)
            pres.append(x)
            x = F.relu(x)
            posts.append(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        f5 = x
        x = self.classifier(x)
        feats = [f0] + (pres if preact else posts) + [f5]
        return (feats, x) if is_feat else x


# ------------------------------------------------------- mobilenetv2.py

class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        self.use_res = stride == 1 and inp == oup
        h = inp * t
        self.conv = nn.Sequential(
            nn.Conv2d(inp, h, 1, 1, 0, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
            nn.Conv2d(h, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, T=6, width=0.5, num_classes=100, in_channels=3):
        super().__init__()
        setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2],
                   [T, 96, 3, 1], [T, 160, 3, 2], [T, 320, 1, 1]]
        cin = int(32 * width)
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, cin, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            cout = int(c * width)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(cin, last, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        _conv_init_normal_fan_out(self)
        self.classifier[0].weight.data.normal_(0, 0.01)
        self.classifier[0].bias.data.zero_()

    def forward(self, x, is_feat=False, preact=False):
        out = self.conv1(x)
        feats = [out]
        for i, blk in enumerate(self.blocks):
            out = blk(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        out = self.conv2(out)
        out = F.avg_pool2d(out, 2, ceil_mode=True).flatten(1)
        feats.append(out)
        out = self.classifier(out)
        return (feats, out) if is_feat else out


# ------------------------------------------------------ ShuffleNetv1.py

def channel_shuffle(x, g):
    n, c, h, w = x.size()
    return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.stride = stride
        mid = int(cout / 4)
        self.g = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre


class ShuffleV1(nn.Module):
    def __init__(self, num_classes=100, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for s, (cout, n) in enumerate(zip([240, 480, 960], [4, 8, 4])):
            blocks = []
            for i in range(n):
                blocks.append(ShuffleV1Block(cin, cout - (cin if i == 0 else 0), 2 if i == 0 else 1, 3))
                cin = cout
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(960, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, pres = [out], [out]
        for s in range(3):
            for b in getattr(self, f"layer{s + 1}"):
                out, pre = b(out)
            feats.append(out)
            pres.append(pre)
        out = F.avg_pool2d(out, 4).flatten(1)
        feats.append(out)
        pres.append(out)
        out = self.linear(out)
        return (pres if preact else feats, out) if is_feat else out


# ------------------------------------------------------ ShuffleNetv2.py

class ShuffleV2Basic(nn.Module):
    def __init__(self, cin):
        super().__init__()
        c = cin // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        c = int(x.size(1) * 0.5)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = torch.cat([x1, F.relu(pre)], 1)
        return channel_shuffle(out, 2), torch.cat([x1, pre], 1)


class ShuffleV2Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        a = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        b = F.relu(self.bn3(self.conv3(x)))
        b = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(b)))))
        return channel_shuffle(torch.cat([a, b], 1), 2), None


class ShuffleV2(nn.Module):
    def __init__(self, num_classes=100, in_channels=3):
        super().__init__()
        chans, nblocks = (116, 232, 464, 1024), (3, 7, 3)
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for s in range(3):
            layers = [ShuffleV2Down(cin, chans[s])] + [ShuffleV2Basic(chans[s]) for _ in range(nblocks[s])]
            cin = chans[s]
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.conv2 = nn.Conv2d(chans[2], chans[3], 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(chans[3])
        self.linear = nn.Linear(chans[3], num_classes)

    def forward(self, x, is_feat=False, preact=False):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, pres = [out], [out]
        for s in range(3):
            for b in getattr(self, f"layer{s + 1}"):
                out, pre = b(out)
            feats.append(out)
            pres.append(pre)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4).flatten(1)
        feats.append(out)
        pres.append(out)
        out = self.linear(out)
        return (pres if preact else feats, out) if is_feat else out


# ---------------------------------------------------------- resnetv2.py

class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(pre), pre


class ResNetV2(nn.Module):
    def __init__(self, blocks=(3, 4, 6, 3), num_classes=100, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for s, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for i in range(n):
                layers.append(Bottleneck(cin, planes, (1 if s == 0 else 2) if i == 0 else 1))
                cin = 4 * planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.linear = nn.Linear(2048, num_classes)
        _kaiming_fan_out(self)

    def forward(self, x, is_feat=False, preact=False):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, pres = [out], [out]
        for s in range(4):
            for b in getattr(self, f"layer{s + 1}"):
                out, pre = b(out)
            feats.append(out)
            pres.append(pre)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        feats.append(out)
        pres.append(out)
        out = self.linear(out)
        return (pres if preact else feats, out) if is_feat else out


# -------------------------------------------------------------- the zoo

def build(arch, num_classes=100, in_channels=3):
    """RepDistiller's model_dict by kd's names."""
    kw = {"num_classes": num_classes, "in_channels": in_channels}
    resnets = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
               "resnet56": 56, "resnet110": 110}
    if arch in resnets:
        return CifarResNet(resnets[arch], [16, 16, 32, 64], **kw)
    if arch in ("resnet8x4", "resnet32x4"):
        return CifarResNet(8 if arch == "resnet8x4" else 32, [32, 64, 128, 256], **kw)
    if arch.startswith("wrn_"):
        _, d, k = arch.split("_")
        return WideResNet(int(d), int(k), **kw)
    if arch.startswith("vgg"):
        return VGG(int(arch[3:]), **kw)
    if arch in ("MobileNetV2", "mobile_half"):
        return MobileNetV2(6, 0.5, **kw)
    if arch == "ShuffleV1":
        return ShuffleV1(**kw)
    if arch == "ShuffleV2":
        return ShuffleV2(**kw)
    if arch == "ResNet50":
        return ResNetV2((3, 4, 6, 3), **kw)
    raise KeyError(arch)


# Small models get the whole state_dict; the others are synthetic (see above).
FULL = ["resnet8", "MobileNetV2"]
SYNTHETIC = ["resnet20", "resnet32x4", "wrn_16_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
             "ShuffleV1", "ShuffleV2", "ResNet50"]

M64 = (1 << 64) - 1


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def synth_values(name, shape):
    """The synthetic tensor named `name` (formula in the module docstring)."""
    n = int(np.prod(shape)) if len(shape) else 1
    with np.errstate(over="ignore"):
        z = np.uint64(fnv1a64(name)) + np.arange(n, dtype=np.uint64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(40)).astype(np.int64) - (1 << 23)).astype(np.float32) * np.float32(2.0 ** -23)
    fan_in = n // shape[0]
    if len(shape) == 4:
        bound = np.float32(math.sqrt(6.0 / fan_in))
    elif len(shape) == 2:
        bound = np.float32(1.0 / math.sqrt(fan_in))
    else:
        bound = np.float32(0.1)
    return torch.from_numpy((u * bound).astype(np.float32).reshape(shape))


def synthetic_names(model):
    names = []
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            for pname, _ in m.named_parameters(recurse=False):
                names.append(f"{mname}.{pname}")
    return names


def prepare(arch, synthetic):
    """Builds the model, applies steps 1 and 2; returns (model, synthetic names)."""
    torch.manual_seed(0)
    model = build(arch)
    syn = synthetic_names(model) if synthetic else []
    sd = model.state_dict()
    with torch.no_grad():
        for name in syn:
            sd[name].copy_(synth_values(name, list(sd[name].shape)))
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.weight.uniform_(0.75, 1.25)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None
        calib = torch.randn(8, 3, 32, 32)
        model.train()
        model(calib)
        for bn in bns:
            bn.momentum = 0.1
    model.eval()
    return model, syn


def stats(feats):
    out = []
    for f in feats:
        d = f.detach().double()
        out.append([list(f.shape), float(d.mean()), float((d * d).mean())])
    return out


def make_fixture(arch, synthetic, outdir):
    model, syn = prepare(arch, synthetic)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        pres, logits2 = model(x, is_feat=True, preact=True)
    assert torch.equal(logits, logits2)
    sd = model.state_dict()
    tensors = {k: v for k, v in sd.items() if k not in set(syn)}
    tensors["input"] = x
    tensors["logits"] = logits
    dt = {torch.float32: "F32", torch.int64: "I64"}
    meta = {
        "arch": arch,
        "torch": torch.__version__,
        "in_channels": 3,
        "num_classes": 100,
        "params": sum(p.numel() for p in model.parameters()),
        "state_dict": json.dumps([[k, dt[v.dtype], list(v.shape)] for k, v in sd.items()],
                                 separators=(",", ":")),
        "synthetic": json.dumps(syn, separators=(",", ":")),
        "feats": json.dumps(stats(feats), separators=(",", ":")),
        "preacts": json.dumps(stats(pres), separators=(",", ":")),
    }
    path = os.path.join(outdir, f"zoo_{arch}.safetensors")
    n = save_safetensors(path, tensors, meta)
    print(f"{path}: {n} bytes, {meta['params']} params, {len(syn)} synthetic tensors, "
          f"|logits| max {logits.abs().max().item():.3f}")
    return n


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    outdir = sys.argv[1]
    want = sys.argv[2:] or FULL + SYNTHETIC
    total = 0
    for arch in want:
        total += make_fixture(arch, arch not in FULL, outdir)
    print(f"total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
