"""Multi-branch block families in training structure, with their deploy structure.

Written here from the papers' descriptions: ACNet (Ding et al. 2019), Diverse Branch Block (Ding et
al. 2021), MobileOne (Vasu et al. 2023), RepGhost (Chen et al. 2022), RepViT (Wang et al. 2024),
FastViT (Vasu et al. 2023), RepLKNet (Ding et al. 2022) and UniRepLKNet's dilated branches (Ding
et al. 2024), plus two-head classifiers, and RepVGG blocks in 1-D and 3-D.

Every re-parameterizable block is linear (its activation sits outside it in ``Reparam``), so its
deploy weights are read off the block itself: run it in float64 on unit impulses (one per input
channel and stride phase) and on zeros; the differences are the kernel taps, the zero response in
the interior is the bias. That is what each family's hand-written ``switch_to_deploy`` computes,
for any block, and it is independent of the ONNX rewrite it is compared with.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

PROBE_BATCH = 32  # impulses run through a block at once
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def conv_bn(c_in: int, c_out: int, kernel, stride=1, padding=0, groups=1, dims=2, dilation=1,
            bias=False) -> nn.Sequential:
    return nn.Sequential(CONV[dims](c_in, c_out, kernel, stride, padding, dilation, groups, bias=bias),
                         BN[dims](c_out))


class Reparam(nn.Module):
    """A linear training-time block that deploys as one conv (``geometry``), then an activation."""

    def __init__(self, block: nn.Module, c_in: int, c_out: int, kernel: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, dims: int = 2, act: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.block, self.act = block, act or nn.Identity()
        self.geometry = dict(in_channels=c_in, out_channels=c_out, kernel_size=kernel, stride=stride,
                             padding=padding, groups=groups, dilation=dilation)
        self.dims = dims

    def forward(self, x):
        return self.act(self.block(x))

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        conv = CONV[self.dims](**self.geometry, bias=True)
        conv.weight.data, conv.bias.data = impulse_kernel(self.block.double(), conv)
        self.block = conv.float()


@torch.no_grad()
def impulse_kernel(block: nn.Module, conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the conv ``block`` equals, read off its responses in float64.

    Output o reads input o*s - p + t*d at tap t, so a unit impulse at input center*s - p + r shows
    every tap t with t*d = r (mod s) at output center - (t*d - r)/s. Channels of different groups
    do not meet, so one probe per (column of a group, stride phase r) gives the whole kernel."""
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    dims, c_in, groups = len(k), conv.in_channels, conv.groups
    center = [(k[a] - 1) * d[a] // s[a] + 2 for a in range(dims)]
    size = [(2 * center[a] + 2) * s[a] + (k[a] - 1) * d[a] + 2 * p[a] for a in range(dims)]
    zero = block(torch.zeros([1, c_in] + size, dtype=torch.float64))
    in_per_group = c_in // groups
    probes = [(column, phase) for column in range(in_per_group)
              for phase in itertools.product(*(range(stride) for stride in s))]
    weight = torch.zeros(conv.weight.shape, dtype=torch.float64)
    for first in range(0, len(probes), PROBE_BATCH):
        chunk = probes[first:first + PROBE_BATCH]
        x = torch.zeros([len(chunk), c_in] + size, dtype=torch.float64)
        for i, (column, phase) in enumerate(chunk):
            x[(i, slice(column, None, in_per_group)) + tuple(center[a] * s[a] - p[a] + phase[a] for a in range(dims))] = 1
        responses = block(x) - zero
        for i, (column, phase) in enumerate(chunk):
            for taps in itertools.product(*(range(n) for n in k)):
                if all((taps[a] * d[a] - phase[a]) % s[a] == 0 for a in range(dims)):
                    out = tuple(center[a] - (taps[a] * d[a] - phase[a]) // s[a] for a in range(dims))
                    weight[(slice(None), column) + taps] = responses[(i, slice(None)) + out]
    return weight.float(), zero[(0, slice(None)) + tuple(center)].float()


class ACBlock(nn.Module):
    """ACNet: KxK-BN + 1xK-BN + Kx1-BN. The asymmetric branches pad [p - K//2, p]; when p < K//2
    they read a crop of the input instead (ACNet's CropLayer)."""

    def __init__(self, c_in, c_out, k, stride=1, padding=None, groups=1):
        super().__init__()
        p = k // 2 if padding is None else padding
        self.square = conv_bn(c_in, c_out, k, stride, p, groups)
        self.crop = max(k // 2 - p, 0)
        hor, ver = ((0, p), (p, 0)) if self.crop else ((p - k // 2, p), (p, p - k // 2))
        self.hor = conv_bn(c_in, c_out, (1, k), stride, hor, groups)
        self.ver = conv_bn(c_in, c_out, (k, 1), stride, ver, groups)

    def forward(self, x):
        c = self.crop
        hor_in = x[:, :, c:-c, :] if c else x
        ver_in = x[:, :, :, c:-c] if c else x
        return self.square(x) + self.hor(hor_in) + self.ver(ver_in)


class BNAndPad(nn.Module):
    """DBB's BN whose output is padded with the BN's own value on zero input."""

    def __init__(self, channels, pad):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x):
        out = self.bn(x)
        if self.pad:
            bn = self.bn
            value = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)
            p = self.pad
            out = F.pad(out, [p] * 4)
            out[:, :, 0:p, :] = value
            out[:, :, -p:, :] = value
            out[:, :, :, 0:p] = value
            out[:, :, :, -p:] = value
        return out


class IdentityConv1x1(nn.Conv2d):
    """DBB's 1x1 conv trained as weight + identity."""

    def __init__(self, channels, groups):
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        identity = torch.zeros(channels, channels // groups, 1, 1)
        for i in range(channels):
            identity[i, i % (channels // groups), 0, 0] = 1
        self.register_buffer("identity", identity)
        nn.init.zeros_(self.weight)
        self.weight.data += torch.randn_like(self.weight) * 0.1

    def forward(self, x):
        return F.conv2d(x, self.weight + self.identity, None, 1, 0, 1, self.groups)


class DBB(nn.Module):
    """Diverse Branch Block: KxK-BN + 1x1-BN + 1x1-BN(pad)-KxK-BN + 1x1-BN(pad)-AvgPool-BN."""

    def __init__(self, c_in, c_out, k, stride=1, groups=1):
        super().__init__()
        p = k // 2
        self.origin = conv_bn(c_in, c_out, k, stride, p, groups)
        depthwise = groups == c_out
        self.avg = nn.Sequential()
        if not depthwise:
            self.avg.add_module("conv", nn.Conv2d(c_in, c_out, 1, 1, 0, groups=groups, bias=False))
            self.avg.add_module("bn", BNAndPad(c_out, p))
            self.avg.add_module("pool", nn.AvgPool2d(k, stride, 0))
            self.one = conv_bn(c_in, c_out, 1, stride, 0, groups)
        else:
            self.avg.add_module("pool", nn.AvgPool2d(k, stride, p))
            self.one = None
        self.avg.add_module("avgbn", nn.BatchNorm2d(c_out))
        internal = c_in if not depthwise else 2 * c_in
        first = IdentityConv1x1(c_in, groups) if internal == c_in else \
            nn.Conv2d(c_in, internal, 1, groups=groups, bias=False)
        self.seq = nn.Sequential(first, BNAndPad(internal, p),
                                 nn.Conv2d(internal, c_out, k, stride, 0, groups=groups, bias=False),
                                 nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.origin(x) + self.avg(x) + self.seq(x)
        return out + self.one(x) if self.one is not None else out


class MobileOneBlock(nn.Module):
    """MobileOne: ``branches`` KxK-BN convs + a 1x1-BN scale branch + a BN skip, summed."""

    def __init__(self, c_in, c_out, k, stride=1, groups=1, branches=2, scale=True, skip=True):
        super().__init__()
        self.skip = nn.BatchNorm2d(c_in) if skip and c_in == c_out and stride == 1 else None
        self.scale = conv_bn(c_in, c_out, 1, stride, 0, groups) if scale and k > 1 else None
        self.convs = nn.ModuleList(conv_bn(c_in, c_out, k, stride, k // 2, groups) for _ in range(branches))

    def forward(self, x):
        outs = [conv(x) for conv in self.convs]
        if self.scale is not None:
            outs.append(self.scale(x))
        if self.skip is not None:
            outs.append(self.skip(x))
        return sum(outs[1:], outs[0])


class RepGhostCheap(nn.Module):
    """RepGhost: depthwise 3x3-BN plus a BN of the same input (re-param in place of concat)."""

    def __init__(self, c):
        super().__init__()
        self.cheap, self.fusion = conv_bn(c, c, 3, 1, 1, c), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.cheap(x) + self.fusion(x)


class RepViTMixer(nn.Module):
    """RepViT's RepVGGDW: BN(dw3x3-BN(x) + dw1x1(x) + x), the BN after the sum."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.conv1 = conv_bn(c, c, 3, 1, 1, c), nn.Conv2d(c, c, 1, 1, 0, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class RepMixer(nn.Module):
    """FastViT's token mixer: x + layer_scale * (mixer(x) - norm(x)), mixer a depthwise MobileOne
    block without activation, norm its BN-only form."""

    def __init__(self, c, k=3):
        super().__init__()
        self.mixer = MobileOneBlock(c, c, k, groups=c, branches=1)
        self.norm = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) * 0.5 + 0.1)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvPosEnc(nn.Module):
    """FastViT's conditional positional encoding: x + depthwise_conv(x)."""

    def __init__(self, c, k=7):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, 1, k // 2, groups=c)

    def forward(self, x):
        return x + self.conv(x)


class LargeKernel(nn.Module):
    """RepLKNet: a large depthwise kernel plus a small one, each with BN; UniRepLKNet adds dilated
    small kernels (``dilated``: (kernel, dilation) pairs)."""

    def __init__(self, c, large, small, dilated=()):
        super().__init__()
        self.large = conv_bn(c, c, large, 1, large // 2, c)
        self.small = conv_bn(c, c, small, 1, small // 2, c)
        self.dilated = nn.ModuleList(conv_bn(c, c, k, 1, d * (k - 1) // 2, c, dilation=d) for k, d in dilated)

    def forward(self, x):
        out = self.large(x) + self.small(x)
        for branch in self.dilated:
            out = out + branch(x)
        return out


class RepVGGBlockND(nn.Module):
    """RepVGG block over 1, 2 or 3 spatial dims, with an optional dilated 3x3 branch."""

    def __init__(self, c_in, c_out, stride=1, dims=2, dilation=1):
        super().__init__()
        self.dense = conv_bn(c_in, c_out, 3, stride, dilation, dims=dims, dilation=dilation)
        self.one = conv_bn(c_in, c_out, 1, stride, 0, dims=dims)
        self.identity = BN[dims](c_in) if c_in == c_out and stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        return out + self.identity(x) if self.identity is not None else out


class TwoHeads(nn.Module):
    """LeViT-style distillation heads: (BN-Linear(x) + BN-Linear(x)) / 2 on pooled features, and a
    residual FC tree fc(x) + x - BN(x)."""

    def __init__(self, c, classes):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.bn = nn.BatchNorm1d(c)
        self.head = nn.Sequential(nn.BatchNorm1d(c), nn.Linear(c, classes))
        self.head_dist = nn.Sequential(nn.BatchNorm1d(c), nn.Linear(c, classes))

    def forward(self, x):
        x = self.fc(x) + x - self.bn(x)
        return (self.head(x) + self.head_dist(x)) / 2


class DeployHeads(nn.Module):
    """TwoHeads' deploy structure: one Linear for the residual tree, one for the heads."""

    def __init__(self, heads: TwoHeads):
        super().__init__()
        c, classes = heads.fc.in_features, heads.head[1].out_features
        self.fc, self.head = nn.Linear(c, c), nn.Linear(c, classes)
        with torch.no_grad():
            heads = heads.double()
            eye = torch.eye(c, dtype=torch.float64)
            zero = torch.zeros(1, c, dtype=torch.float64)
            residual = lambda x: heads.fc(x) + x - heads.bn(x)  # noqa: E731
            averaged = lambda x: (heads.head(x) + heads.head_dist(x)) / 2  # noqa: E731
            for layer, f in ((self.fc, residual), (self.head, averaged)):
                layer.bias.data = f(zero)[0].float()
                layer.weight.data = (f(eye) - f(zero)).T.float()

    def forward(self, x):
        return self.head(self.fc(x))


class Net(nn.Module):
    """Stem conv, the family's blocks, global pooling and the classifier head."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], features: int, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.Sequential(*blocks), head
        self.features = features

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = x.mean(dim=tuple(range(2, x.dim())))
        return self.head(x)


def _stem(c_out, dims=2, c_in=3):
    return nn.Sequential(CONV[dims](c_in, c_out, 3, 1, 1), nn.ReLU())


def acnet(c=16, classes=10):
    act = nn.ReLU
    blocks = [Reparam(ACBlock(c, c, 3), c, c, 3, 1, 1, act=act()),
              Reparam(ACBlock(c, c, 5), c, c, 5, 1, 2, act=act()),
              Reparam(ACBlock(c, c, 3, padding=0), c, c, 3, 1, 0, act=act()),  # crop 1
              Reparam(ACBlock(c, c, 5, padding=1), c, c, 5, 1, 1, act=act()),  # crop 1, pads [0, 1]
              Reparam(ACBlock(c, 2 * c, 3, stride=2, groups=2), c, 2 * c, 3, 2, 1, 2, act=act())]
    return Net(_stem(c), blocks, 2 * c, nn.Linear(2 * c, classes))


def dbb(c=16, classes=10):
    blocks = [Reparam(DBB(c, c, 3), c, c, 3, 1, 1, act=nn.ReLU()),
              Reparam(DBB(c, 2 * c, 3, stride=2, groups=2), c, 2 * c, 3, 2, 1, 2, act=nn.ReLU()),
              Reparam(DBB(2 * c, 2 * c, 5), 2 * c, 2 * c, 5, 1, 2, act=nn.ReLU()),
              Reparam(DBB(2 * c, 2 * c, 3, groups=2 * c), 2 * c, 2 * c, 3, 1, 1, 2 * c, act=nn.ReLU())]
    return Net(_stem(c), blocks, 2 * c, nn.Linear(2 * c, classes))


def mobileone(c=16, classes=10, branches=3):
    blocks = []
    for c_in, c_out, stride in ((c, c, 1), (c, 2 * c, 2), (2 * c, 2 * c, 1)):
        blocks.append(Reparam(MobileOneBlock(c_in, c_in, 3, stride, c_in, branches), c_in, c_in, 3, stride,
                              1, c_in, act=nn.ReLU()))
        blocks.append(Reparam(MobileOneBlock(c_in, c_out, 1, 1, 1, branches), c_in, c_out, 1, act=nn.ReLU()))
    return Net(_stem(c), blocks, 2 * c, nn.Linear(2 * c, classes))


def repghost(c=16, classes=10):
    blocks = []
    for _ in range(2):
        blocks += [nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()),
                   Reparam(RepGhostCheap(c), c, c, 3, 1, 1, c, act=nn.ReLU())]
    return Net(_stem(c), blocks, c, nn.Linear(c, classes))


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def repvit(c=16, classes=10):
    blocks = []
    for _ in range(2):
        blocks += [Reparam(RepViTMixer(c), c, c, 3, 1, 1, c),
                   Residual(nn.Sequential(conv_bn(c, 2 * c, 1), nn.GELU(), conv_bn(2 * c, c, 1)))]
    return Net(_stem(c), blocks, c, nn.Linear(c, classes))


def fastvit(c=16, classes=10):
    blocks = [Reparam(ConvPosEnc(c), c, c, 7, 1, 3, c)]
    for _ in range(2):
        blocks += [Reparam(RepMixer(c), c, c, 3, 1, 1, c),
                   Residual(nn.Sequential(conv_bn(c, c, 7, 1, 3, c), nn.Conv2d(c, 2 * c, 1), nn.GELU(),
                                          nn.Conv2d(2 * c, c, 1)))]
    blocks.append(Reparam(LargeKernel(c, 7, 3), c, c, 7, 1, 3, c, act=nn.ReLU()))
    return Net(_stem(c), blocks, c, nn.Linear(c, classes))


def replknet(c=16, classes=10):
    blocks = [Reparam(LargeKernel(c, 31, 5), c, c, 31, 1, 15, c, act=nn.ReLU()),
              Reparam(LargeKernel(c, 13, 5, dilated=((5, 2), (3, 3), (3, 4))), c, c, 13, 1, 6, c, act=nn.ReLU())]
    return Net(_stem(c), blocks, c, nn.Linear(c, classes))


def fc_heads(c=32, classes=10):
    return Net(_stem(c), [], c, TwoHeads(c, classes))


def repvgg_nd(dims, c=8, classes=10):
    blocks = [Reparam(RepVGGBlockND(c, c, 1, dims), c, c, 3, 1, 1, dims=dims, act=nn.ReLU()),
              Reparam(RepVGGBlockND(c, 2 * c, 2, dims), c, 2 * c, 3, 2, 1, dims=dims, act=nn.ReLU()),
              Reparam(RepVGGBlockND(2 * c, 2 * c, 1, dims, dilation=2), 2 * c, 2 * c, 3, 1, 2, dims=dims,
                      act=nn.ReLU(), dilation=2)]
    return Net(_stem(c, dims), blocks, 2 * c, nn.Linear(2 * c, classes))


def to_deploy(model: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(model)
    for name, module in list(deployed.named_modules()):
        if isinstance(module, Reparam):
            module.switch_to_deploy()
        elif isinstance(module, TwoHeads):
            parent = deployed.get_submodule(name.rsplit(".", 1)[0]) if "." in name else deployed
            setattr(parent, name.rsplit(".", 1)[-1], DeployHeads(module))
    return deployed.eval()


# name: (constructor, input shape); small sizes for tests, ``scale`` widens for the benchmark
FAMILIES = {
    "acnet": (acnet, (1, 3, 32, 32)),
    "dbb": (dbb, (1, 3, 32, 32)),
    "mobileone": (mobileone, (1, 3, 32, 32)),
    "repghost": (repghost, (1, 3, 32, 32)),
    "repvit": (repvit, (1, 3, 32, 32)),
    "fastvit": (fastvit, (1, 3, 32, 32)),
    "replknet": (replknet, (1, 3, 40, 40)),
    "fc_heads": (fc_heads, (2, 3, 16, 16)),
    "repvgg_1d": (lambda **kw: repvgg_nd(1, **kw), (1, 3, 64)),
    "repvgg_3d": (lambda **kw: repvgg_nd(3, **kw), (1, 3, 12, 12, 12)),
}
