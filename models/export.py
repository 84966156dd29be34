"""Exports the reference networks to ONNX, in training structure and in deploy structure.

    python models/export.py OUT_DIR [--arch repvgg_a0 --arch repvgg_b1g4] [--scale 0.125]
                            [--size 32] [--classes 10] [--exporter ts --exporter dynamo ...]

Exporters: ``ts`` TorchScript with do_constant_folding=False (BatchNormalization nodes stay),
``ts-fold`` TorchScript with its default constant folding (in eval mode it already folds Conv+BN),
``dynamo`` torch.export-based (its optimizer also folds Conv+BN). Files are named
``{arch}_{train|deploy}_{exporter}.onnx``. Weights are seeded and every BN gets random statistics,
so folding is exercised for real.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repvgg  # noqa: E402

ARCHS = {"repvgg_a0": repvgg.repvgg_a0, "repvgg_b1g4": repvgg.repvgg_b1g4}
EXPORTERS = ("ts", "ts-fold", "dynamo")


def build(arch: str, scale: float = 0.125, classes: int = 10, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(training-structure model, deploy-structure model), both in eval mode."""
    torch.manual_seed(seed)
    train = repvgg.randomize_bn(ARCHS[arch](scale, classes), seed)
    return train, repvgg.to_deploy(train)


def export(model: torch.nn.Module, path: str | os.PathLike, exporter: str,
           shape: tuple[int, ...] = (1, 3, 32, 32), dynamic_batch: bool = False) -> Path:
    """Writes ``model`` to ``path`` as one self-contained ONNX file; returns the path."""
    path = Path(path)
    x = torch.randn(*shape)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = ({"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None)
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"],
                                        output_names=["logits"], dynamic_shapes=dims, verbose=False)
            program.save(str(path), external_data=False)
        else:
            axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes=axes,
                              do_constant_folding=exporter == "ts-fold", opset_version=17)
    return path


def export_pair(arch: str, out_dir: str | os.PathLike, exporter: str, scale: float = 0.125,
                size: int = 32, classes: int = 10) -> tuple[Path, Path]:
    """Exports ``arch`` in both structures; returns (train path, deploy path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, deploy = build(arch, scale, classes)
    shape = (1, 3, size, size)
    return (export(train, out_dir / f"{arch}_train_{exporter}.onnx", exporter, shape),
            export(deploy, out_dir / f"{arch}_deploy_{exporter}.onnx", exporter, shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS))
    parser.add_argument("--exporter", action="append", choices=EXPORTERS)
    parser.add_argument("--scale", type=float, default=0.125, help="width multiplier (1.0 = paper size)")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    for arch in args.arch or sorted(ARCHS):
        for exporter in args.exporter or EXPORTERS:
            for path in export_pair(arch, args.out_dir, exporter, args.scale, args.size, args.classes):
                print(f"{path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
