"""Writes the timm fixtures under models/fixtures/: timm's own RepVGG-A0, MobileOne-S0 and
RepViT-M0.9 blocks (their stage depths, a quarter of their widths so the files stay small), with
BatchNorm statistics that are real averages over natural-image crops (the sample images shipped in
scikit-image), exported in training structure as users export them:

- ``timm_repvgg_a0_ts.onnx``: TorchScript, float32, BN nodes kept;
- ``timm_mobileone_s0_dynamo_raw.onnx``: torch.export with ``optimize=False``, float32;
- ``timm_{repvgg_a0,mobileone_s0,repvit_m0_9}_half.onnx``: after ``model.half()`` (float16 everywhere);
- ``timm_{...}_half_inside.onnx``: float16 inside, float32 inputs and outputs;
- ``timm_levit_128s_ts.onnx``: LeViT-128S's structure at a quarter width, TorchScript, float32.

``crops/``: 24 natural-image crops (64 px PNG, from the right halves of the images; the BN
statistics come from whole images) as calibration data for quantize-check's tests.

Each also gets timm's own deploy conversion (``timm.utils.model.reparameterize_model``) exported the
same way; ``timm_manifest.json`` holds its Conv/BatchNormalization/Add counts, for the tests to
compare with.

    pip install torch==2.14.1 torchvision==0.29.1 && pip install --no-deps timm   # a separate venv
    pip install scikit-image onnx onnxscript
    python models/timm_fixtures.py [OUT_DIR [NAME ...]]   # NAMEs (or crops): write only these again
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
import torch
from timm.models.byobnet import ByobNet, ByoModelCfg, _mobileone_bcfg, _rep_vgg_bcfg
from timm.models.levit import Levit
from timm.models.repvit import RepVit
from timm.utils.model import reparameterize_model
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import export, op_counts

SIZE = 64
CLASSES = 1000
QUARTER = 0.25

OPS = ("Conv", "BatchNormalization", "Add")  # what the manifest counts


def repvgg_a0() -> nn.Module:
    cfg = ByoModelCfg(blocks=_rep_vgg_bcfg(d=(2, 4, 14, 1), wf=tuple(QUARTER * w for w in (0.75, 0.75, 0.75, 2.5))),
                      stem_type="rep", stem_chs=12)
    return ByobNet(cfg, num_classes=CLASSES)


def mobileone_s0() -> nn.Module:
    # timm rounds widths to multiples of 8, so the stem is 16 (S0's 48 is 0.75 of 64)
    cfg = ByoModelCfg(blocks=_mobileone_bcfg(wf=tuple(QUARTER * w for w in (1.0, 1.0, 1.0, 2.0)),
                                             num_conv_branches=4), stem_type="one", stem_chs=16)
    return ByobNet(cfg, num_classes=CLASSES)


def repvit_m0_9() -> nn.Module:
    return RepVit(embed_dim=(16, 32, 64, 128), depth=(2, 2, 14, 2), num_classes=CLASSES)


def levit_128s() -> nn.Module:
    """LeViT-128S's structure (its Linear+BN layers: MatMul, Flatten, BatchNormalization, Reshape
    in the export), a quarter of its width, one block per stage, on 64x64 inputs."""
    return Levit(img_size=SIZE, embed_dim=(32, 64, 96), key_dim=8, depth=(1, 1, 1), num_heads=(2, 4, 6),
                 num_classes=CLASSES)


NETS = {"repvgg_a0": repvgg_a0, "mobileone_s0": mobileone_s0, "repvit_m0_9": repvit_m0_9, "levit_128s": levit_128s}


def crops(count: int, seed: int) -> torch.Tensor:
    """Natural-image crops, ImageNet-normalized."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    images = [getattr(skimage.data, name)() for name in names]
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for _ in range(count):
        image = images[rng.integers(len(images))]
        y, x = rng.integers(0, image.shape[0] - 2 * SIZE), rng.integers(0, image.shape[1] - 2 * SIZE)
        step = int(rng.integers(1, 3))
        crop = image[y:y + SIZE * step:step, x:x + SIZE * step:step, :3] / 255.0
        out.append(((crop - mean) / std).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


def calibrated(name: str) -> nn.Module:
    """The net with seeded weights and BN statistics averaged over natural-image crops."""
    torch.manual_seed(0)
    model = NETS[name]()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average, as a calibration pass computes
    model.train()
    with torch.no_grad():
        for batch in crops(256, seed=1).split(16):
            model(batch)
    return model.eval()


class HalfInside(nn.Module):
    """float16 inside, float32 at the edges."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x):
        return self.model(x.half()).float()


def write_crops(folder: Path, count: int = 24, seed: int = 7) -> None:
    """Natural-image crops as PNG files, as a user's calibration folder holds them."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = getattr(skimage.data, names[i % len(names)])()[..., :3]
        right = image[:, image.shape[1] // 2:]
        y, x = rng.integers(0, right.shape[0] - SIZE), rng.integers(0, right.shape[1] - SIZE)
        Image.fromarray(right[y:y + SIZE, x:x + SIZE]).save(folder / f"crop{i:02d}.png")


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "fixtures")
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) <= 2 or "crops" in sys.argv[2:]:
        write_crops(out_dir / "crops")
    shape = (1, 3, SIZE, SIZE)
    plan = [("repvgg_a0", "ts", "ts"), ("mobileone_s0", "dynamo-raw", "dynamo_raw"), ("levit_128s", "ts", "ts")]
    plan += [(name, "ts", variant) for name in NETS if name != "levit_128s" for variant in ("half", "half_inside")]
    only = set(sys.argv[2:])  # nets to write again; the others' files and counts stay as they are
    manifest_path = out_dir / "timm_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    for name, exporter, variant in plan:
        if only and name not in only or only == {"crops"}:
            continue
        train = calibrated(name)
        deploy = reparameterize_model(copy.deepcopy(train))
        files = {}
        for kind, model in (("train", train), ("deploy", deploy)):
            path = out_dir / f"timm_{name}_{variant}.onnx" if kind == "train" else \
                Path(tempfile.gettempdir()) / f"timm_{name}_{variant}_deploy.onnx"
            if variant == "half":
                export(copy.deepcopy(model), path, exporter, shape, dtype=torch.float16)
            elif variant == "half_inside":  # export() would cast the model to its input's float32
                torch.onnx.export(HalfInside(copy.deepcopy(model)), (torch.randn(*shape),), str(path), dynamo=False,
                                  input_names=["x"], output_names=["logits"], do_constant_folding=False,
                                  opset_version=17)
            else:
                export(model, path, exporter, shape)
            files[kind] = path
        manifest[files["train"].name] = {"deploy": op_counts(files["deploy"], OPS),
                                         "train": op_counts(files["train"], OPS)}
        size = files["train"].stat().st_size / 1e6
        print(files["train"], f"{size:.2f} MB", manifest[files["train"].name], flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
