"""Exports the reference networks to ONNX, in training structure and in deploy structure.

    python models/export.py OUT_DIR [--arch repvgg_a0 --arch dbb ...] [--scale 0.125]
                            [--size 32] [--classes 10] [--exporter ts --exporter dynamo ...] [--half]

Exporters: ``ts`` TorchScript with do_constant_folding=False (BatchNormalization nodes stay),
``ts-fold`` TorchScript with its default constant folding (in eval mode it already folds Conv+BN),
``dynamo`` torch.export-based (its optimizer also folds Conv+BN), ``dynamo-raw`` the same with
``optimize=False`` (nothing folded; each conv's zero bias computed at run time). Files are named
``{arch}_{train|deploy}_{exporter}.onnx``. Weights are seeded and every BN gets random statistics,
so folding is exercised for real. Archs: RepVGG (repvgg.py), the block families (families.py) and the
RepMLP nets (repmlp.py);
``--scale`` is the width multiplier (1.0: RepVGG's paper width, 128 channels for the
families, 64 for the RepMLP nets, whose FC grows with the square of the width).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families
import repmlp
import repvgg

NETS = {**families.FAMILIES, **repmlp.NETS}  # name: (constructor(c, classes), input shape)
ARCHS = {"repvgg_a0": repvgg.repvgg_a0, "repvgg_b1g4": repvgg.repvgg_b1g4,
         **{name: ctor for name, (ctor, _) in NETS.items()}}
EXPORTERS = ("ts", "ts-fold", "dynamo", "dynamo-raw")
WIDTH = 128  # channels of a family net at scale 1.0
REPMLP_WIDTH = 64  # RepMLP's FC grows with (channels * h * w)^2


def build(arch: str, scale: float = 0.125, classes: int = 10, seed: int = 0,
          size: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(training-structure model, deploy-structure model), both in eval mode. ``size``: the input
    extent, which a RepMLP net's partitions are laid out for."""
    torch.manual_seed(seed)
    if arch in NETS:
        width = REPMLP_WIDTH if arch in repmlp.NETS else WIDTH
        options = {"size": size} if arch in repmlp.NETS and size else {}
        train = repvgg.randomize_bn(ARCHS[arch](c=max(4, round(width * scale)), classes=classes, **options), seed)
        return train, (repmlp if arch in repmlp.NETS else families).to_deploy(train)
    train = repvgg.randomize_bn(ARCHS[arch](scale, classes), seed)
    return train, repvgg.to_deploy(train)


def input_shape(arch: str, size: int | None = None) -> tuple[int, ...]:
    """The input shape an arch is exported with; ``size`` replaces its spatial extent."""
    shape = NETS[arch][1] if arch in NETS else (1, 3, 32, 32)
    return shape[:2] + (size,) * (len(shape) - 2) if size else shape


def export(model: torch.nn.Module, path: str | os.PathLike, exporter: str,
           shape: tuple[int, ...] = (1, 3, 32, 32), dynamic_batch: bool = False,
           dtype: torch.dtype = torch.float32) -> Path:
    """Writes ``model`` to ``path`` as one self-contained ONNX file; returns the path."""
    path = Path(path)
    model = model.to(dtype)
    if dynamic_batch and exporter.startswith("dynamo") and shape[0] < 2:
        shape = (2,) + tuple(shape[1:])  # torch.export's dynamic dims start at 2
    x = torch.randn(*shape, dtype=dtype)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):
            dims = ({"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None)
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], optimize=exporter == "dynamo",
                                        output_names=["logits"], dynamic_shapes=dims, verbose=False)
            program.save(str(path), external_data=False)
        else:
            axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes=axes,
                              do_constant_folding=exporter == "ts-fold", opset_version=17)
    return path


def export_pair(arch: str, out_dir: str | os.PathLike, exporter: str, scale: float = 0.125,
                size: int | None = None, classes: int = 10, half: bool = False,
                dynamic_batch: bool = False) -> tuple[Path, Path]:
    """Exports ``arch`` in both structures; returns (train path, deploy path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, deploy = build(arch, scale, classes, size=size)
    shape, dtype = input_shape(arch, size), torch.float16 if half else torch.float32
    tag = exporter + ("_fp16" if half else "") + ("_dyn" if dynamic_batch else "")
    return tuple(export(model, out_dir / f"{arch}_{kind}_{tag}.onnx", exporter, shape, dynamic_batch, dtype)
                 for kind, model in (("train", train), ("deploy", deploy)))


def op_counts(path: str | os.PathLike, ops: tuple[str, ...]) -> dict[str, int]:
    """How many nodes of each of ``ops`` an exported model has (the fixture manifests' counts)."""
    found = Counter(n.op_type for n in onnx.load(path).graph.node)
    return {op: found.get(op, 0) for op in ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS))
    parser.add_argument("--exporter", action="append", choices=EXPORTERS)
    parser.add_argument("--scale", type=float, default=0.125, help="width multiplier (1.0 = paper size)")
    parser.add_argument("--size", type=int, help="input extent on each spatial axis (default: the arch's)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--half", action="store_true", help="export in float16")
    args = parser.parse_args()
    for arch in args.arch or sorted(ARCHS):
        for exporter in args.exporter or EXPORTERS:
            for path in export_pair(arch, args.out_dir, exporter, args.scale, args.size, args.classes,
                                    args.half):
                print(f"{path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
