"""What the float64 evaluation costs the check: every reference network at benchmark size (the
sizes of benchmarks/reparam.py, TorchScript export), the whole check (the input model's run, its
float64 evaluation, the rewritten model's run, on the check's three input sets) against the check
without the float64 evaluation (the float32 comparison the tool made before), in one run: each
check --repeat times, interleaved, the least time of each kind counting (noise on a shared machine
only adds time).

    python benchmarks/check_cost.py [--arch repvgg_a0 --arch dbb ...] [--out DIR] [--repeat 3]

Prints per network: seconds of each, their ratio, both models' distances from float64, and the
float64 runs made (one on the first input set; one more per set where the rewritten model is not
within the bound of the input model).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "models"))
import export

import onnx_reparam
from onnx_reparam.verify import Checker

SIZES = {1: 4096, 2: 112, 3: 16}  # as benchmarks/reparam.py


def check_seconds(reference: onnx.ModelProto, candidate: onnx.ModelProto, **options) -> tuple[float, object, dict]:
    start = time.perf_counter()
    checker = Checker(reference, **options)
    result = checker.check(candidate)
    return time.perf_counter() - start, result, checker.runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=sorted(export.ARCHS))
    parser.add_argument("--out", help="folder for the exported models (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=3, help="checks of each kind per network; the least time counts")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for arch in args.arch or sorted(export.ARCHS):
            spatial = len(export.input_shape(arch)) - 2
            size = 224 if arch in ("repvgg_a0", "repvgg_b1g4") else SIZES[spatial]
            train_path, _ = export.export_pair(arch, out_dir, "ts", scale=1.0, size=size, classes=1000)
            reference = onnx.load(train_path)
            candidate, _ = onnx_reparam.optimize(train_path, verify=False)
            float32_s = whole_s = float("inf")
            for _ in range(args.repeat):  # interleaved, the least of each: the machine's noise only adds
                float32_s = min(float32_s, check_seconds(reference, candidate, rtol=1e-4, atol=1e-6)[0])
                seconds, result, runs = check_seconds(reference, candidate)
                whole_s = min(whole_s, seconds)
            out = result.outputs[0]
            rows.append((arch, float32_s, whole_s, out.ours, out.theirs, result.passed))
            print(f"{arch:14} float32 check {float32_s:6.2f}s  with float64 {whole_s:6.2f}s  "
                  f"ratio {whole_s / float32_s:5.2f}  ours {out.ours:.2g} / input model {out.theirs:.2g} "
                  f"from float64 ({runs['float64']} float64 runs)  {'PASSED' if result.passed else 'FAILED'}", flush=True)
    worst = max(rows, key=lambda r: r[2] / r[1])
    total = sum(r[2] for r in rows) / sum(r[1] for r in rows)
    print(f"\nall networks: the check with float64 takes {total:.2f}x the float32 check's time; "
          f"worst {worst[0]} {worst[2] / worst[1]:.2f}x")


if __name__ == "__main__":
    main()
