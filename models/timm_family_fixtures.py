"""Writes one small export of every re-parameterizable timm family that models/timm_fixtures.py does
not cover (those four are at full width there), under models/fixtures/timm_families/: the
family's own code (timm.create_model of its smallest variant, narrowed and made shallower by the
variant's own arguments so the file stays small, 10 classes), random weights, BN statistics from a
few training-mode passes, TorchScript at batch 1, as benchmarks/timm_families.py exports them at
full size. ``manifest.json`` holds the Conv/BatchNormalization/Add counts of the training export
and of timm's ``reparameterize_model`` export, for the tests to compare with.

    pip install torch torchvision onnx && pip install --no-deps timm
    python models/timm_family_fixtures.py [OUT_DIR]   # torch 2.14.1, timm 1.0.31
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import warnings
from pathlib import Path

import timm
import torch
from timm.utils.model import reparameterize_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import op_counts

OPS = ("Conv", "BatchNormalization", "Add")
# variant -> (its own constructor's arguments that narrow it, input size)
SMALL = {
    "fastvit_t8": (dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128)), 64),
    "repghostnet_050": (dict(width=0.25), 64),  # its creator's width (the variant fixes 0.5)
    "ghostnetv3_050": (dict(width=0.25), 64),
    "levit_conv_128s": (dict(img_size=64, embed_dim=(32, 48, 64), num_heads=(2, 3, 4), depth=(1, 1, 1)), 64),
    "efficientvit_m0": (dict(img_size=64, embed_dim=(16, 32, 48), depth=(1, 1, 1), num_heads=(2, 2, 2),
                             window_size=(4, 4, 4)), 64),
    "efficientvim_m1": (dict(embed_dim=(16, 32, 48), depths=(1, 1, 1), state_dim=(16, 9, 4)), 64),
    "shvit_s1": (dict(embed_dim=(16, 32, 48), depth=(1, 1, 1), partial_dim=(8, 12, 16)), 64),
    "iformer_t": (dict(dims=(16, 32, 48, 64), depths=(1, 1, 3, 3), attn_groups=(0, 0, 1, 1)), 64),
    "tiny_vit_5m_224": (dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                             window_sizes=(4, 4, 4, 2)), 64),
    "nextvit_blocks": (dict(), 64),  # nextvit_small's stage widths are fixed (to 1024): its blocks, below
}


def nextvit_blocks(name: str, pretrained: bool = False, num_classes: int = 10) -> torch.nn.Module:
    """NextViT's own blocks, narrow: a conv stem, a NextConvBlock, a NextTransformerBlock with a
    spatial reduction (its attention's k/v pooled 4 to 1 and normalized again) and one without,
    then NextViT's head (BN, pooling, Linear)."""
    from timm.models.nextvit import NextConvBlock, NextTransformerBlock
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        NextConvBlock(32, 32, stride=2, head_dim=16),
        NextTransformerBlock(32, 128, drop_path=0.0, stride=2, sr_ratio=2, head_dim=32),
        NextTransformerBlock(128, 128, drop_path=0.0, sr_ratio=1, head_dim=32),
        nn.BatchNorm2d(128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


CREATORS = {"repghostnet_050": timm.models.repghost._create_repghostnet,
            "ghostnetv3_050": lambda name, **kw: timm.models.ghostnet._create_ghostnet(name, version="v3", **kw),
            "nextvit_blocks": nextvit_blocks}


def export_pair(name: str, folder: Path) -> tuple[Path, Path]:
    arguments, size = SMALL[name]
    torch.manual_seed(0)
    if name in CREATORS:  # a width the registered variant fixes: the family's own creator takes it
        model = CREATORS[name](name, pretrained=False, num_classes=10, **arguments)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10, **arguments)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, size, size))
    model.eval()
    x = torch.randn(1, 3, size, size)
    paths = folder / f"{name}_train.onnx", folder / f"{name}_deploy.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(paths[0]), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"])
        torch.onnx.export(reparameterize_model(copy.deepcopy(model)), (x,), str(paths[1]), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"])
    return paths


def main() -> None:
    here = Path(os.path.dirname(os.path.abspath(__file__)))
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "fixtures" / "timm_families"
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in SMALL:
        train, deploy = export_pair(name, out_dir)
        manifest[train.name] = {"train": op_counts(train, OPS), "deploy": op_counts(deploy, OPS)}
        deploy.unlink()  # its counts are what the tests need
        print(f"{name:16} {train.stat().st_size / 1e6:5.2f} MB {manifest[train.name]}", flush=True)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
