"""What INT8 post-training quantization does to a re-parameterized network, and what --int8-ready
does about it. The set-up (issue 20): timm's RepVGG-A0 and MobileOne-S0 at full width, random
weights, BatchNorm statistics averaged over natural-image crops (the sample images shipped with
scikit-image), in three BN variants:

- ``calibrated``: the statistics of those crops;
- ``recalibrated``: gamma and beta perturbed (as training moves them), then statistics again;
- ``dead-identity``: as calibrated, with the identity branches' running variance x1e-3 on 10% of
  their channels (nearly-dead channels: the large identity gains QARepVGG describes).

Each is exported in training structure (TorchScript) and measured as five models:

- ``train``: the training export as it is (its BatchNormalization nodes stay in float: no INT8
  engine runs them so, they fold into the convs first, so this is a bound, not a baseline);
- ``branches``: each branch's BN folded into its conv (``--only fold_affine``), the branches
  summed by their Adds: the training structure quantized branch by branch, as an engine would;
- ``fused``: ``optimize``; ``int8-ready``: ``optimize --int8-ready``; ``+identity``: with
  ``--keep-identity`` too.

All are quantized four ways (weight-only INT8 per tensor and per channel,
simulated in float; onnxruntime's ``quantize_static`` QDQ MinMax per tensor and per channel, the
classifier left in float) and compared with their own float output on evaluation crops: output
SQNR in dB and top-1 agreement. For the fused and --int8-ready models, quantize-check's keep list
(as many as that helps, of the most sensitive layers in float) is measured too: "keep k: QDQ per
tensor of everything -> with those k in float". Last, what ``optimize --int8-ready --calibration``
chooses for each target, measuring on the calibration crops (half calibrate, half evaluate). BN statistics and quantizer calibration use the left half of
each image, evaluation crops the right half, so they are disjoint. Last, the INT8/FP32 latency
ratio of the fused model on this CPU (ORT, both as deployed).

    pip install torch torchvision scikit-image onnx && pip install --no-deps timm   # and this project
    python benchmarks/int8.py [--nets repvgg_a0 mobileone_s0] [--variants ...] [--size 128]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnx_reparam
from onnx_reparam import quantize as q
from onnx_reparam.int8 import check

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
VARIANTS = ("calibrated", "recalibrated", "dead-identity")


def crops(count: int, size: int, half: str, seed: int) -> np.ndarray:
    """ImageNet-normalized crops from the left or right half of each sample image."""
    import skimage.data
    images = [getattr(skimage.data, name)()[..., :3] for name in IMAGES]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        image = images[rng.integers(len(images))]
        width = image.shape[1] // 2
        part = image[:, :width] if half == "left" else image[:, width:]
        step = int(rng.integers(1, 3)) if min(part.shape[:2]) >= 2 * size + 1 else 1
        y = rng.integers(0, part.shape[0] - size * step + 1)
        x = rng.integers(0, part.shape[1] - size * step + 1)
        crop = part[y:y + size * step:step, x:x + size * step:step] / 255.0
        out.append(((crop - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def build(name: str, variant: str, size: int):
    import timm
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def calibrate() -> None:
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average
        model.train()
        with torch.no_grad():
            for batch in torch.from_numpy(crops(256, size, "left", seed=1)).split(32):
                model(batch)
        model.eval()

    calibrate()
    if variant == "recalibrated":
        rng = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for bn in batchnorms:
                bn.weight.mul_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=rng))
                bn.bias.add_(0.1 * torch.randn(bn.bias.shape, generator=rng))
        calibrate()
    elif variant == "dead-identity":
        rng = np.random.default_rng(3)
        for module_name, bn in model.named_modules():
            if module_name.endswith("identity") and isinstance(bn, nn.BatchNorm2d):
                chosen = rng.choice(bn.num_features, max(1, bn.num_features // 10), replace=False)
                bn.running_var[torch.from_numpy(chosen)] *= 1e-3
    return model.eval()


def export(model, path: Path, size: int) -> None:
    import torch
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL)


def classifier(model: onnx.ModelProto) -> list[str]:
    """The last layer, left in float in the QDQ runs (as is usual)."""
    layers = q.weight_layers(model)
    return [layers[-1][0].name] if layers else []


def measure(model: onnx.ModelProto, calibration: list[dict], evaluation: list[dict]) -> dict[str, q.Outcome]:
    reference = q.run(model, evaluation)
    outcomes = {}
    for label, per_channel in (("weights/tensor", False), ("weights/channel", True)):
        outcomes[label] = q.compare(reference, q.run(q.quantize_weights(model, per_channel), evaluation))
    for label, per_channel in (("QDQ/tensor", False), ("QDQ/channel", True)):
        quantized = q.quantize_qdq(model, calibration, per_channel, exclude=classifier(model))
        outcomes[label] = q.compare(reference, q.run(quantized, evaluation))
    return outcomes


def latency_ratio(fp32: onnx.ModelProto, int8: onnx.ModelProto, rounds: int = 30) -> float:
    """INT8 / FP32 latency on the CPU, both as deployed: onnx-reparam's interleaved bench."""
    return onnx_reparam.bench(fp32, int8, names=("FP32", "INT8"), provider="cpu", rounds=rounds).ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["repvgg_a0", "mobileone_s0"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--evaluation", type=int, default=128)
    parser.add_argument("--keep", type=Path, help="folder to keep the exported and optimized models in")
    args = parser.parse_args()
    calibration = [{"x": x[None]} for x in crops(args.calibration, args.size, "left", seed=10)]
    evaluation = [{"x": x[None]} for x in crops(args.evaluation, args.size, "right", seed=11)]
    folder = args.keep or Path(tempfile.mkdtemp(prefix="int8-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{args.calibration} calibration and {args.evaluation} evaluation crops of {args.size} px; "
          f"SQNR in dB against each model's own float output / top-1 agreement")
    header = f"{'net':<13} {'BN':<14} {'model':<11}" + "".join(f"{label:>19}" for label in
                                                              ("weights/tensor", "weights/channel", "QDQ/tensor",
                                                               "QDQ/channel"))
    print(header)
    for name in args.nets:
        for variant in args.variants:
            train_path = folder / f"{name}_{variant}_train.onnx"
            export(build(name, variant, args.size), train_path, args.size)
            train = onnx.load(train_path)
            models = {"train": train,
                      "branches": onnx_reparam.optimize(train, only="fold_affine")[0],
                      "fused": onnx_reparam.optimize(train)[0],
                      "int8-ready": onnx_reparam.optimize(train, int8_ready=True)[0],
                      "+identity": onnx_reparam.optimize(train, int8_ready=True, keep_identity=True)[0]}
            for label, model in models.items():
                onnx.save(model, folder / f"{name}_{variant}_{label}.onnx")
                outcomes = measure(model, calibration, evaluation)
                cells = "".join(f"{o.sqnr[0]:>10.1f} / {100 * (o.agreement[0] or 0):>3.0f}%" for o in outcomes.values())
                if label in ("fused", "int8-ready"):  # the hints' keep list, chosen on the same halves
                    curve = check(model, calibration + evaluation[:len(calibration)]).keep_curve
                    best = max(curve, key=lambda point: point[1])
                    cells += f"   keep {best[0]}: {curve[0][1]:.1f} -> {best[1]:.1f}"
                print(f"{name:<13} {variant:<14} {label:<11}{cells}", flush=True)
            picks = {target: onnx_reparam.optimize_for_int8(train, calibration, target=target)[1].int8_choice
                     for target in ("qdq", "weights")}
            print(f"{'':<28} optimize --int8-ready --calibration (on the calibration crops): "
                  + ", ".join(f"{target} -> {choice}" for target, choice in picks.items()), flush=True)
        fused = models["fused"]
        quantized = q.quantize_qdq(fused, calibration, exclude=classifier(fused))
        ratio = latency_ratio(fused, quantized)
        print(f"{name}: INT8 (QDQ per tensor) / FP32 latency of the fused model on this CPU: {ratio:.2f}")


if __name__ == "__main__":
    main()
