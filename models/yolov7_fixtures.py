"""Writes the YOLOv7 fixtures under models/fixtures/: yolov7-tiny built by WongKinYiu/yolov7's own
code (``models.yolo.Model`` from ``cfg/training/yolov7-tiny.yaml``, a quarter of its width, 4
classes, 128x128 inputs so the files stay small), random weights, BatchNorm statistics from a few
training-mode passes, exported in training structure as the repository's ``export.py`` exports it
(TorchScript, the head's raw maps, ``model.model[-1].export = True``):

- ``yolov7_tiny_train.onnx``: static batch;
- ``yolov7_tiny_train_dynamic.onnx``: a dynamic batch.

Its head adds ImplicitA (a learned per-channel constant) before each 1x1 output conv and multiplies
by ImplicitM after it. The repository's own deploy conversion (``Model.fuse()``: Conv+BN, then
``IDetect.fuse``, which folds both implicit constants into the conv) is exported the same way;
``yolov7_manifest.json`` holds its Conv/BatchNormalization/Add/Mul counts, for the tests.

    git clone https://github.com/WongKinYiu/yolov7   # its models/, utils/ and cfg/
    pip install torch torchvision onnx pandas seaborn opencv-python-headless pyyaml scipy  # a separate venv
    python models/yolov7_fixtures.py YOLOV7_CHECKOUT [OUT_DIR]
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

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import op_counts

SIZE = 128
WIDTH = 0.25
CLASSES = 4

OPS = ("Conv", "BatchNormalization", "Add", "Mul")  # what the manifest counts


def build(checkout: Path) -> torch.nn.Module:
    sys.path.insert(0, str(checkout))
    from models.yolo import Model  # the repository's own code
    cfg = yaml.safe_load((checkout / "cfg" / "training" / "yolov7-tiny.yaml").read_text())
    cfg.update(width_multiple=WIDTH, nc=CLASSES)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = Model(cfg, ch=3)
    for module in model.modules():  # ImplicitA/M start near 0 and 1: make them matter
        if type(module).__name__ == "ImplicitA":
            torch.nn.init.normal_(module.implicit, 0.0, 0.5)
        if type(module).__name__ == "ImplicitM":
            torch.nn.init.normal_(module.implicit, 1.0, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(4):  # BN statistics that are averages of something
            model(torch.rand(4, 3, SIZE, SIZE))
    model.eval()
    model.model[-1].export = True  # as export.py without --grid: the head's raw maps
    return model


def export(model: torch.nn.Module, path: Path, dynamic: bool) -> None:
    names = ["p3", "p4", "p5"]
    axes = {name: {0: "batch"} for name in ["images", *names]} if dynamic else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=12,
                          input_names=["images"], output_names=names, dynamic_axes=axes,
                          do_constant_folding=False)


def main() -> None:
    checkout = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent / "fixtures"
    model = build(checkout)
    manifest = {}
    deploy_path = out / "yolov7_tiny_deploy.onnx"
    deployed = copy.deepcopy(model)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # as attempt_load's checkpoints
        deployed.fuse()
    export(deployed, deploy_path, dynamic=False)
    deploy = op_counts(deploy_path, OPS)
    os.remove(deploy_path)  # only its counts are kept
    for name, dynamic in (("yolov7_tiny_train.onnx", False), ("yolov7_tiny_train_dynamic.onnx", True)):
        export(model, out / name, dynamic)
        manifest[name] = {"train": op_counts(out / name, OPS), "deploy": deploy}
        print(name, manifest[name])
    (out / "yolov7_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
