"""Writes end-to-end detector fixtures under models/fixtures/, built by ultralytics from its own YAML
files with random weights and random BN statistics, exported by TorchScript in training structure:

- ``yolov6_repconv_nms.onnx``: ultralytics' YOLOv6 (scale n) with each repeated 3x3 Conv a RepConv
  (the RepVGG block YOLOv6 trains with), wrapped in ultralytics' own export-time NMSModel
  (``export(nms=True)``): NonMaxSuppression inside the graph, detections as one float output
  whose boxes, scores and classes are picked by it;
- ``rtdetr_tiny.onnx``: RT-DETR-l's graph (its RepC3 neck, AIFI encoder, the decoder's TopK query
  selection and deformable attention) at a small scale;
- ``yoloe_tiny.onnx`` and ``yoloe_tiny_dynamic.onnx`` (a dynamic batch): YOLOE-11 with its class
  embeddings set (``set_classes``; random text embeddings through the head's own ``get_tpe``, as
  ``get_text_pe`` would give without downloading its text model), exported unfused: each level's
  class logits are BatchNorm -> an einsum with the embeddings -> scale and bias, which the deploy
  export (ultralytics' exporter fuses the head with ``pe``) has as one 1x1 Conv.

``ultralytics_e2e_manifest.json`` holds the Conv/BatchNormalization/Add counts of each after
ultralytics' own ``fuse()``, for the tests to compare with.

    pip install --no-deps ultralytics; pip install opencv-python-headless pyyaml  # its imports
    python models/ultralytics_e2e_fixtures.py [OUT_DIR]   # torch 2.14.1 + torchvision, a separate venv
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision.ops  # noqa: F401 - NMSModel imports it inside its forward, which tracing cannot
import yaml
from torch import nn
from ultralytics.engine.exporter import NMSModel
from ultralytics.nn.modules.conv import Conv, RepConv
from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel, YOLOEModel
from ultralytics.utils import ROOT as CFG_ROOT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import op_counts
from ultralytics_fixtures import randomized

SIZE = 128

OPS = ("Conv", "BatchNormalization", "Add", "MatMul")  # what the manifest counts


def yolov6() -> nn.Module:
    cfg = yaml.safe_load((CFG_ROOT / "cfg" / "models" / "v6" / "yolov6.yaml").read_text())
    cfg["scales"] = {"n": [0.33, 0.0625, 1024]}  # a quarter of YOLOv6-n's widths: a small file
    cfg["scale"] = "n"
    torch.manual_seed(0)
    model = DetectionModel(cfg, ch=3, nc=80, verbose=False)
    for module in model.model:  # the repeated 3x3 Convs become YOLOv6's RepVGG blocks
        if isinstance(module, nn.Sequential):
            for i, layer in enumerate(module):
                if isinstance(layer, Conv) and layer.conv.kernel_size == (3, 3) and layer.conv.stride == (1, 1) \
                        and layer.conv.in_channels == layer.conv.out_channels:
                    module[i] = RepConv(layer.conv.in_channels, layer.conv.out_channels, bn=True)
    model = randomized(model)
    args = SimpleNamespace(dynamic=False, batch=1, format="onnx", conf=0.25, iou=0.45, max_det=100,
                           agnostic_nms=False, opset=17)
    model.task = "detect"
    return NMSModel(model, args).eval()


def rtdetr() -> nn.Module:
    cfg = yaml.safe_load((CFG_ROOT / "cfg" / "models" / "rt-detr" / "rtdetr-l.yaml").read_text())
    cfg["scales"] = {"t": [0.33, 0.125, 256]}
    cfg["scale"] = "t"
    for layer in cfg["backbone"]:  # HGNet's blocks take no width scale: an eighth of their channels
        if layer[2] in ("HGStem", "HGBlock"):
            layer[3][:2] = [max(8, c // 8) for c in layer[3][:2]]
    for layer in cfg["head"]:  # a small encoder and decoder: hidden 64, 100 queries, 2 layers
        if layer[2] == "AIFI":
            layer[3] = [128, 4]
        if layer[2] == "RTDETRDecoder":
            layer[3] = [80, 64, 100, 2, 4, 2, 128]
    torch.manual_seed(0)
    return randomized(RTDETRDetectionModel(cfg, ch=3, nc=80, verbose=False))


def yoloe() -> nn.Module:
    cfg = yaml.safe_load((CFG_ROOT / "cfg" / "models" / "11" / "yoloe-11.yaml").read_text())
    cfg["scales"] = {"t": [0.33, 0.0625, 1024]}
    cfg["scale"] = "t"
    cfg["head"][-1][3] = [5, 512, True]  # 5 classes (the init pass needs 512-dim embeddings)
    torch.manual_seed(0)
    model = randomized(YOLOEModel(cfg, ch=3, verbose=False))
    head = model.model[-1]
    with torch.no_grad():
        names = ["person", "car", "dog", "cat", "bicycle"]
        model.set_classes(names, head.get_tpe(torch.randn(1, len(names), head.embed)))
        for contrastive in head.cv4:  # the trained head's scale and bias, not its initial ones
            contrastive.logit_scale.fill_(0.7)
            contrastive.bias.fill_(-4.0)
    head.export = True  # as ultralytics' exporter sets it: the embeddings are expanded to the batch
    head.format = "onnx"
    return model


def deployed(model: nn.Module) -> nn.Module:
    """The model as its project deploys it: ultralytics' fuse(); YOLOE's head fused with its class
    embeddings, as ultralytics' exporter does."""
    inner = model.model if isinstance(model, NMSModel) else model
    inner.fuse(verbose=False)
    if isinstance(inner, YOLOEModel):
        inner.model[-1].fuse(inner.pe)
    return model


class First(nn.Module):
    """The first output of a model that returns several (RT-DETR's eval forward: (y, x))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def export(model: nn.Module, path: Path, dynamic: bool = False) -> None:
    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output0"], do_constant_folding=False,
                          dynamic_axes=axes)


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                      "fixtures"))
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    builds = (("yolov6_repconv_nms", yolov6, False), ("rtdetr_tiny", rtdetr, False), ("yoloe_tiny", yoloe, False),
              ("yoloe_tiny_dynamic", yoloe, True))
    for name, build, dynamic in builds:
        train = build()
        deploy = deployed(copy.deepcopy(train))
        path, fused = out_dir / f"{name}.onnx", Path(tempfile.gettempdir()) / f"{name}_fused.onnx"
        export(First(train), path, dynamic)
        export(First(deploy), fused, dynamic)
        manifest[path.name] = {"deploy": op_counts(fused, OPS), "train": op_counts(path, OPS)}
        print(path, f"{path.stat().st_size / 1e6:.2f} MB", manifest[path.name], flush=True)
    (out_dir / "ultralytics_e2e_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
