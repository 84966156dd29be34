"""Writes the YOLOv6 fixtures under models/fixtures/: YOLOv6-N built by meituan/YOLOv6's own code
(``yolov6.models.yolo.build_model`` from ``configs/yolov6n.py``, training_mode "repvgg" as its
train script sets it, half its width, 4 classes, 128x128 inputs so the files stay small), random weights, BatchNorm
statistics from a few training-mode passes, exported in training structure the way the
repository's ``deploy/ONNX/export_onnx.py`` exports (TorchScript, opset 13, constant folding on,
eval mode) but without its ``fuse``/``switch_to_deploy``:

- ``yolov6n_e2e_train.onnx``: ``--end2end --ort``: its ``End2End`` wrapper with onnxruntime's
  NonMaxSuppression inside (num_dets, det_boxes, det_scores, det_classes); score threshold 0.005
  so that random weights still detect something.

The repository's own deploy conversion (``fuse_model``: ConvModule conv+BN, then
``RepVGGBlock.switch_to_deploy``) is exported the same way; ``yolov6_manifest.json`` holds its
Conv/BatchNormalization/Add counts, for the tests.

    git clone https://github.com/meituan/YOLOv6   # its yolov6/ and configs/
    pip install torch torchvision onnx addict "setuptools<70" pyyaml opencv-python-headless  # a separate venv
    python models/yolov6_fixtures.py YOLOV6_CHECKOUT [OUT_DIR]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import op_counts

SIZE = 128
CLASSES = 4
WIDTH = 0.125  # half of YOLOv6-N's 0.25, so the files stay small

OPS = ("Conv", "BatchNormalization", "Add", "NonMaxSuppression")  # what the manifest counts


def build(checkout: Path) -> torch.nn.Module:
    sys.path.insert(0, str(checkout))
    from yolov6.models.yolo import build_model  # the repository's own code
    from yolov6.utils.config import Config
    cfg = Config.fromfile(str(checkout / "configs" / "yolov6n.py"))
    cfg.training_mode = "repvgg"  # tools/train.py's default
    cfg.model.width_multiple = WIDTH
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        model = build_model(cfg, CLASSES, "cpu")
    model.train()
    with torch.no_grad():
        for _ in range(4):  # BN statistics that are averages of something
            model(torch.rand(4, 3, SIZE, SIZE))
    return model.eval()


def deploy(model: torch.nn.Module) -> torch.nn.Module:
    """What export_onnx.py does to a checkpoint before exporting it."""
    from yolov6.layers.common import RepVGGBlock
    from yolov6.utils.torch_utils import fuse_model
    model = fuse_model(copy.deepcopy(model))
    for layer in model.modules():
        if isinstance(layer, RepVGGBlock):
            layer.switch_to_deploy()
    return model.eval()


def end2end(model: torch.nn.Module) -> torch.nn.Module:
    from yolov6.models.end2end import End2End
    return End2End(model, max_obj=100, iou_thres=0.65, score_thres=0.005, device=torch.device("cpu"), ort=True,
                   trt_version=8, with_preprocess=False).eval()


def export(model: torch.nn.Module, path: Path, outputs: list[str]) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=13,
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True,
                          input_names=["images"], output_names=outputs)


def main() -> None:
    checkout = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent / "fixtures"
    train = build(checkout)
    fused = deploy(train)
    manifest = {}
    e2e_outputs = ["num_dets", "det_boxes", "det_scores", "det_classes"]
    for name, make, outputs in (("yolov6n_e2e", end2end, e2e_outputs),):
        path, deploy_path = out / f"{name}_train.onnx", out / f"{name}_deploy.onnx"
        export(make(copy.deepcopy(train)), path, outputs)
        export(make(copy.deepcopy(fused)), deploy_path, outputs)
        manifest[path.name] = {"train": op_counts(path, OPS), "deploy": op_counts(deploy_path, OPS)}
        deploy_path.unlink()  # only its counts are kept
        print(path, f"{path.stat().st_size / 1e6:.2f} MB", manifest[path.name])
    (out / "yolov6_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
