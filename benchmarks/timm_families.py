"""Every re-parameterizable timm family, as a user exports it, against timm's own deploy
conversion: the smallest variant, random weights, BN statistics from a few training-mode passes,
TorchScript at batch 1, then ``optimize``; timm's ``reparameterize_model`` exported the same way.
Prints the Conv/BatchNormalization/Add/Mul and node counts of both, and whether ours reaches the
deploy export's Conv count with no more BatchNormalization or Add.

    pip install torch torchvision onnx && pip install --no-deps timm   # and this project
    python benchmarks/timm_families.py [NAME ...] [--keep DIR]

The exports are 7 to 130 MB each (nextvit_small), so they are made here, not committed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnx_reparam

FAMILIES = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050", "ghostnetv3_050",
            "levit_128s", "levit_conv_128s", "efficientvit_m0", "efficientvim_m1", "shvit_s1", "iformer_t",
            "tiny_vit_5m_224", "nextvit_small"]  # timm 1.0's lcnetv2 has no registered variant
OPS = ("Conv", "BatchNormalization", "Add", "Mul")


def counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {**{op: ops.get(op, 0) for op in OPS}, "nodes": len(model.graph.node)}


def export_pair(name: str, folder: Path) -> tuple[Path, Path]:
    import timm
    import torch
    from timm.utils.model import reparameterize_model
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    size = model.default_cfg.get("input_size", (3, 224, 224))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, *size))
    model.eval()
    x = torch.randn(1, *size)
    paths = folder / f"{name}_train.onnx", folder / f"{name}_deploy.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(paths[0]), dynamo=False, opset_version=17)
        torch.onnx.export(reparameterize_model(copy.deepcopy(model)), x, str(paths[1]), dynamo=False,
                          opset_version=17)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=FAMILIES)
    parser.add_argument("--keep", type=Path, help="write the exports here")
    args = parser.parse_args()
    reached = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.names:
            train, deploy = export_pair(name, folder)
            ours, report = onnx_reparam.optimize(train)
            theirs, got = counts(onnx.load(deploy)), counts(ours)
            same = got["Conv"] == theirs["Conv"] and got["BatchNormalization"] <= theirs["BatchNormalization"] \
                and got["Add"] <= theirs["Add"]
            reached += same
            check = "verified" if report.verification and report.verification.passed else "NOT VERIFIED"
            print(f"{name:16} train {counts(onnx.load(train))}\n{'':16} deploy {theirs}\n{'':16} ours   {got} "
                  f"{'reached' if same else 'NOT REACHED'}, {check}")
    print(f"{reached} of {len(args.names)} reach timm's deploy counts")
    return 0 if reached == len(args.names) else 1


if __name__ == "__main__":
    sys.exit(main())
