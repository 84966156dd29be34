"""Writes the ultralytics fixtures under models/fixtures/: its re-parameterizable blocks (RepConv
with its identity BN, RepC3, RepNCSPELAN4 of RepConvN, C2fCIB with RepVGGDW) in a small net with
random BN statistics, exported by TorchScript in training structure and after ultralytics' own
fuse() (what its exporter writes), to compare with.

    pip install --no-deps ultralytics; pip install opencv-python-headless pyyaml  # its imports
    python models/ultralytics_fixtures.py [OUT_DIR]       # needs torch; a separate venv is fine
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn
from ultralytics.nn.modules.block import C2fCIB, RepC3, RepNCSPELAN4, RepVGGDW
from ultralytics.nn.modules.conv import Conv, RepConv
from ultralytics.utils.torch_utils import fuse_conv_and_bn


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Conv(3, 16, 3, 2), RepConv(16, 16, bn=True), RepC3(16, 16, n=1),
                          RepNCSPELAN4(16, 32, 16, 8), C2fCIB(32, 32, n=1, shortcut=True, lk=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return randomized(model)


def randomized(model: nn.Module) -> nn.Module:
    """The model in eval mode with seeded BN statistics and affine parameters, as training leaves them."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.5)
    return model.eval()


def fused(model: nn.Module) -> nn.Module:
    """What ultralytics' BaseModel.fuse() does to these blocks."""
    for module in model.modules():
        if isinstance(module, Conv) and hasattr(module, "bn"):
            module.conv = fuse_conv_and_bn(module.conv, module.bn)
            delattr(module, "bn")
            module.forward = module.forward_fuse
        if isinstance(module, RepConv):
            module.fuse_convs()
            module.forward = module.forward_fuse
        if isinstance(module, RepVGGDW):
            module.fuse()
            module.forward = module.forward_fuse
    return model


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    os.makedirs(out, exist_ok=True)
    x = torch.randn(1, 3, 32, 32)
    model = net()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for name, m in (("ultralytics_blocks_train", model), ("ultralytics_blocks_fused", fused(net()))):
            torch.onnx.export(m, (x,), os.path.join(out, f"{name}.onnx"), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"], do_constant_folding=False)


if __name__ == "__main__":
    main()
