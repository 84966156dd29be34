"""RepMLP (Ding et al. 2021, arXiv 2105.01883) and RepMLPNet (Ding et al. 2022) in training and
deploy structure, written here after the papers.

The input (N, C, H, W) is cut into partitions of h x w: reshaped to (N, C, H/h, h, W/w, w),
permuted to (N, H/h, W/w, C, h, w) and read as rows of C*h*w (or S*h*w with shared sets). The
partition perceptron is a fully connected layer over each row (a grouped 1x1 conv on
(rows, C*h*w, 1, 1)) with BN; the local perceptron is KxK convs with BN on the same rows seen as
(rows, C, h, w); their sum is reshaped back. At deploy time the convs and BNs are folded into the
FC: a conv is a linear map of the row, whose matrix is the conv applied to the identity basis.
The global perceptron (pooling, BN, two FCs) stays; its BN folds into the first FC.

Deploy weights are read off the training block in float64 (the identity-basis construction of the
paper), independently of the ONNX rewrite they are compared with.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from families import conv_bn
from torch import nn


class RepMLPBlock(nn.Module):
    """The 2021 block: global perceptron, partition perceptron fc3 + BN1d, local perceptron convs
    (kernels ``kernels``, each with BN), all with ``groups`` groups."""

    def __init__(self, c_in, c_out, size, part, kernels=(1, 3), groups=1, reduce=4):
        super().__init__()
        self.C, self.O, self.H, self.W = c_in, c_out, size, size
        self.h = self.w = part
        self.hp, self.wp = size // part, size // part
        self.deploy = False
        if self.hp * self.wp > 1:
            features = c_in * self.hp * self.wp
            self.avg = nn.AvgPool2d(part)
            self.avg_bn = nn.BatchNorm2d(c_in)
            self.fc1 = nn.Linear(features, max(features // reduce, 1))
            self.fc2 = nn.Linear(max(features // reduce, 1), features)
        self.fc3 = nn.Conv2d(c_in * part * part, c_out * part * part, 1, groups=groups, bias=False)
        self.fc3_bn = nn.BatchNorm1d(c_out * part * part)
        self.convs = nn.ModuleList(conv_bn(c_in, c_out, k, 1, k // 2, groups) for k in kernels)

    def global_vector(self, x):
        v = self.avg_bn(self.avg(x)) if not self.deploy else self.avg(x)
        v = self.fc2(F.relu(self.fc1(v.reshape(-1, self.C * self.hp * self.wp))))
        return v.reshape(-1, self.C, self.hp, 1, self.wp, 1)

    def partition_perceptron(self, partitions):
        """(rows, C, h, w) -> (rows, O*h*w): the part that deploys as one FC."""
        out = self.fc3(partitions.reshape(-1, self.C * self.h * self.w, 1, 1)).reshape(-1, self.O * self.h * self.w)
        if self.deploy:
            return out
        out = self.fc3_bn(out)
        for conv in self.convs:
            out = out + conv(partitions).reshape(-1, self.O * self.h * self.w)
        return out

    def forward(self, x):
        x = x.reshape(-1, self.C, self.hp, self.h, self.wp, self.w)
        if self.hp * self.wp > 1:
            x = x + self.global_vector(x.reshape(-1, self.C, self.H, self.W))
        partitions = x.permute(0, 2, 4, 1, 3, 5).reshape(-1, self.C, self.h, self.w)
        out = self.partition_perceptron(partitions).reshape(-1, self.hp, self.wp, self.O, self.h, self.w)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(-1, self.O, self.H, self.W)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        rows = self.C * self.h * self.w
        block = copy.deepcopy(self).double()
        identity = torch.eye(rows, dtype=torch.float64).reshape(rows, self.C, self.h, self.w)
        zero = block.partition_perceptron(torch.zeros(1, self.C, self.h, self.w, dtype=torch.float64))
        matrix = (block.partition_perceptron(identity) - zero).T  # (O*h*w, C*h*w)
        groups = self.fc3.groups
        fc3 = nn.Conv2d(rows, self.O * self.h * self.w, 1, groups=groups, bias=True)
        out_per, in_per = matrix.shape[0] // groups, rows // groups
        blocks = [matrix[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] for g in range(groups)]
        fc3.weight.data = torch.cat(blocks).reshape(fc3.weight.shape).float()
        fc3.bias.data = zero[0].float()
        self.fc3, self.fc3_bn, self.convs = fc3, nn.Identity(), nn.ModuleList()
        if self.hp * self.wp > 1:  # the pooled BN folds into fc1, its features repeated per partition
            scale = self.avg_bn.weight / torch.sqrt(self.avg_bn.running_var + self.avg_bn.eps)
            shift = self.avg_bn.bias - self.avg_bn.running_mean * scale
            repeat = self.hp * self.wp
            self.fc1.bias.data += self.fc1.weight @ shift.repeat_interleave(repeat)
            self.fc1.weight.data *= scale.repeat_interleave(repeat)
            del self.avg_bn
        self.deploy = True


class RepMLPNetBlock(nn.Module):
    """RepMLPNet's block: shared sets (channels read as C/S groups of S channels sharing one FC),
    the partition FC with BN2d over (S, h, w), depthwise KxK local convs on the S sets, and the
    global perceptron as a channel gate (pooling, two 1x1 convs, sigmoid)."""

    def __init__(self, channels, part, sharesets, kernels=(1, 3), reduce=4):
        super().__init__()
        self.C, self.S, self.h, self.w = channels, sharesets, part, part
        self.deploy = False
        self.gp = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // reduce, 1), nn.ReLU(),
                                nn.Conv2d(channels // reduce, channels, 1), nn.Sigmoid())
        features = sharesets * part * part
        self.fc3 = nn.Conv2d(features, features, 1, groups=sharesets, bias=False)
        self.fc3_bn = nn.BatchNorm2d(sharesets)
        self.convs = nn.ModuleList(conv_bn(sharesets, sharesets, k, 1, k // 2, sharesets) for k in kernels)

    def partition_perceptron(self, rows):
        """(rows, S, h, w) -> (rows, S, h, w)."""
        out = self.fc3(rows.reshape(-1, self.S * self.h * self.w, 1, 1)).reshape(-1, self.S, self.h, self.w)
        if self.deploy:
            return out
        out = self.fc3_bn(out)
        for conv in self.convs:
            out = out + conv(rows)
        return out

    def forward(self, x):
        n, c, height, width = x.shape
        hp, wp = height // self.h, width // self.w
        partitions = x.reshape(-1, c, hp, self.h, wp, self.w).permute(0, 2, 4, 1, 3, 5)
        out = self.partition_perceptron(partitions.reshape(-1, self.S, self.h, self.w))
        out = out.reshape(-1, hp, wp, c, self.h, self.w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)
        return out * self.gp(x)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        features = self.S * self.h * self.w
        block = copy.deepcopy(self).double()
        identity = torch.eye(features, dtype=torch.float64).reshape(features, self.S, self.h, self.w)
        zero = block.partition_perceptron(torch.zeros(1, self.S, self.h, self.w, dtype=torch.float64)).reshape(-1)
        matrix = (block.partition_perceptron(identity).reshape(features, features) - zero).T
        fc3 = nn.Conv2d(features, features, 1, groups=self.S, bias=True)
        per = features // self.S
        fc3.weight.data = torch.cat([matrix[g * per:(g + 1) * per, g * per:(g + 1) * per]
                                     for g in range(self.S)]).reshape(fc3.weight.shape).float()
        fc3.bias.data = zero.float()
        self.fc3, self.fc3_bn, self.convs = fc3, nn.Identity(), nn.ModuleList()
        self.deploy = True


class RepMLPNetUnit(nn.Module):
    """x + block(BN(x)), then x + FFN(BN(x)), the FFN two conv-BN pairs around a GELU."""

    def __init__(self, channels, part, sharesets, kernels):
        super().__init__()
        self.prebn1, self.block = nn.BatchNorm2d(channels), RepMLPNetBlock(channels, part, sharesets, kernels)
        self.prebn2 = nn.BatchNorm2d(channels)
        self.ffn = nn.Sequential(conv_bn(channels, 2 * channels, 1), nn.GELU(), conv_bn(2 * channels, channels, 1))

    def forward(self, x):
        x = x + self.block(self.prebn1(x))
        return x + self.ffn(self.prebn2(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck whose middle layer is ``middle`` (a 3x3 conv-BN or a RepMLP block)."""

    def __init__(self, channels, reduced, middle):
        super().__init__()
        self.reduce = nn.Sequential(conv_bn(channels, reduced, 1), nn.ReLU())
        self.middle = middle
        self.expand = conv_bn(reduced, channels, 1)

    def forward(self, x):
        return F.relu(x + self.expand(F.relu(self.middle(self.reduce(x)))))


class Classifier(nn.Module):
    def __init__(self, stem, body, channels, classes):
        super().__init__()
        self.stem, self.body, self.head = stem, body, nn.Linear(channels, classes)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class Pooled(nn.Module):
    """Average-pools (N, C, H, W) to (N, C, size, size) for a block that takes one partition."""

    def __init__(self, size, block):
        super().__init__()
        self.size, self.block = size, block

    def forward(self, x):
        return self.block(F.avg_pool2d(x, x.shape[-1] // self.size))


def repmlp_block_net(c=8, classes=10, size=16, part=8, kernels=(1, 3, 5), groups=2):
    """Stem, a RepMLP block with its global perceptron over (size/part)^2 partitions, then one
    over a single pooled partition (no global perceptron), head."""
    stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU())
    body = nn.Sequential(RepMLPBlock(c, c, size, part, kernels, groups), nn.ReLU(),
                         Pooled(part, RepMLPBlock(c, c, part, part, (1, 3), groups)), nn.ReLU())
    return Classifier(stem, body, c, classes)


def repmlp_resnet(c=16, classes=10, size=16, part=8, kernels=(1, 3, 5), groups=4):
    """A ResNet stage: a 3x3 bottleneck, then RepMLP bottlenecks (RepMLP-Res50's c4 design)."""
    stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU())
    reduced = c // 2
    body = nn.Sequential(
        Bottleneck(c, reduced, conv_bn(reduced, reduced, 3, 1, 1)),
        Bottleneck(c, reduced, RepMLPBlock(reduced, reduced, size, part, kernels, groups)),
        Bottleneck(c, reduced, RepMLPBlock(reduced, reduced, size, part, kernels, groups)))
    return Classifier(stem, body, c, classes)


def repmlpnet(c=16, classes=10, size=16, part=4, sharesets=4, kernels=(1, 3)):
    """RepMLPNet-style: a conv stem then units of RepMLPNet blocks and FFNs."""
    stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU())
    body = nn.Sequential(RepMLPNetUnit(c, part, sharesets, kernels), RepMLPNetUnit(c, part, sharesets, kernels))
    return Classifier(stem, body, c, classes)


def to_deploy(model: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(model)
    for module in deployed.modules():
        if isinstance(module, (RepMLPBlock, RepMLPNetBlock)):
            module.switch_to_deploy()
    return deployed.eval()


# name: (constructor, input shape); ``c`` widens them for the benchmark
NETS = {
    "repmlp_block": (repmlp_block_net, (1, 3, 16, 16)),
    "repmlp_resnet": (repmlp_resnet, (1, 3, 16, 16)),
    "repmlpnet": (repmlpnet, (1, 3, 16, 16)),
}
