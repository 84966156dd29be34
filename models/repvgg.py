"""RepVGG (Ding et al., 2021, arXiv 2101.03697) in training and deploy structure.

Training block: ReLU(BN(Conv3x3(x)) + BN(Conv1x1(x)) + BN(x)), the identity branch only when
stride is 1 and channels match. Deploy block: ReLU(Conv3x3(x) + b), obtained by the network's own
conversion (``switch_to_deploy``), which the ONNX rewrite must reproduce from the graph alone.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
            groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def fuse_conv_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.in_channels, self.groups = in_channels, groups
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = (nn.BatchNorm2d(in_channels)
                             if out_channels == in_channels and stride == 1 else None)
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.rbr_reparam: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        k3, b3 = fuse_conv_bn(self.rbr_dense[0].weight, self.rbr_dense[1])
        k1, b1 = fuse_conv_bn(self.rbr_1x1[0].weight, self.rbr_1x1[1])
        kernel = k3 + nn.functional.pad(k1, [1, 1, 1, 1])
        bias = b3 + b1
        if self.rbr_identity is not None:
            per_group = self.in_channels // self.groups
            identity = torch.zeros_like(k3)
            for i in range(self.in_channels):
                identity[i, i % per_group, 1, 1] = 1
            ki, bi = fuse_conv_bn(identity, self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    def switch_to_deploy(self) -> None:
        kernel, bias = self.equivalent_kernel_bias()
        dense = self.rbr_dense[0]
        self.rbr_reparam = nn.Conv2d(dense.in_channels, dense.out_channels, 3, dense.stride, 1,
                                     groups=dense.groups, bias=True)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel.detach(), bias.detach()
        del self.rbr_dense, self.rbr_1x1
        self.rbr_identity = None


class RepVGG(nn.Module):
    def __init__(self, num_blocks: list[int], width_multiplier: list[float], num_classes: int = 1000,
                 override_groups_map: dict[int, int] | None = None, base_width: int = 64):
        super().__init__()
        groups_map = override_groups_map or {}
        self.in_planes = min(base_width, int(base_width * width_multiplier[0]))
        self.layer_idx = 1
        self.stage0 = RepVGGBlock(3, self.in_planes, stride=2)
        stages = []
        for i, blocks in enumerate(num_blocks):
            planes = int(base_width * 2 ** i * width_multiplier[min(i, 3)]) if i < 3 else \
                int(base_width * 8 * width_multiplier[3])
            layers = []
            for stride in [2] + [1] * (blocks - 1):
                layers.append(RepVGGBlock(self.in_planes, planes, stride,
                                          groups_map.get(self.layer_idx, 1)))
                self.in_planes = planes
                self.layer_idx += 1
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stage0(x))
        return self.linear(torch.flatten(self.gap(x), 1))


G4_MAP = dict.fromkeys(range(2, 27, 2), 4)


def repvgg_a0(scale: float = 1.0, num_classes: int = 1000) -> RepVGG:
    return RepVGG([2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5], num_classes, base_width=round(64 * scale))


def repvgg_b1g4(scale: float = 1.0, num_classes: int = 1000) -> RepVGG:
    return RepVGG([4, 6, 16, 1], [2, 2, 2, 4], num_classes, G4_MAP, base_width=round(64 * scale))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BN non-trivial statistics, as a trained network has, so that folding is tested."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=gen) + 0.5
            module.bias.data = torch.randn(n, generator=gen) * 0.1
            module.running_mean.data = torch.randn(n, generator=gen) * 0.1
            module.running_var.data = torch.rand(n, generator=gen) + 0.5
    return model.eval()


def to_deploy(model: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(model)
    for module in deployed.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
    return deployed.eval()
