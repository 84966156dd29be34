"""Full-size RepVGG-A0 and B1g4 (224x224, batch 1): the training export rewritten by onnx-reparam
against the deploy export, in one run.

    python benchmarks/repvgg.py [--arch repvgg_a0 ...] [--exporter ts ...] [--rounds 30] [--out DIR]

Prints per model: node counts and op histograms (original / ours / deploy), max relative error
(ours vs original, ours vs deploy), the time optimize takes split into load / match+rewrite /
verify / save, and ORT CPU latency of original, ours and deploy measured interleaved (one run of
each per round, medians over the rounds), with ratios. Latency sessions use ORT's default graph
optimizations, as a deployment would; verification runs with them off.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "models"))
import export  # noqa: E402

import onnx_reparam  # noqa: E402


def histogram(model: onnx.ModelProto) -> str:
    return " ".join(f"{op}:{n}" for op, n in sorted(Counter(n.op_type for n in model.graph.node).items()))


def latencies(paths: dict[str, Path], rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per inference, the models run one after another in each round so that
    machine noise hits them alike."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    # Idle ORT worker threads spin by default; with several sessions in one process the spinning
    # threads of one steal the cores of the next and the order decides the numbers (seen: 25 ms
    # vs 17 ms for identical graphs). Without spinning the interleaved medians agree.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(arch: str, exporter: str, out_dir: Path, rounds: int) -> dict:
    start = time.perf_counter()
    train_path, deploy_path = export.export_pair(arch, out_dir, exporter, scale=1.0, size=224,
                                                 classes=1000)
    export_s = time.perf_counter() - start
    ours_path = out_dir / f"{arch}_ours_{exporter}.onnx"
    start = time.perf_counter()
    model, report = onnx_reparam.optimize(train_path)
    save_start = time.perf_counter()
    onnx_reparam.save_model(model, ours_path)
    report.seconds["save"] = time.perf_counter() - save_start
    total_s = time.perf_counter() - start
    original, deploy = onnx.load(train_path), onnx.load(deploy_path)
    vs_deploy = onnx_reparam.verify(deploy_path, ours_path)
    lat = latencies({"original": train_path, "ours": ours_path, "deploy": deploy_path}, rounds)
    size_mb = train_path.stat().st_size / 1e6
    print(f"\n== {arch} / {exporter} (training export {size_mb:.0f} MB, exported in {export_s:.0f}s)")
    for name, m in (("original", original), ("ours", model), ("deploy", deploy)):
        print(f"  {name:8} {len(m.graph.node):4} nodes  {histogram(m)}")
    same = histogram(model) == histogram(deploy)
    print(f"  op histogram ours == deploy: {same}")
    print(f"  max rel error ours vs original {report.verification.outputs[0].max_rel_error:.2e}, "
          f"ours vs deploy {vs_deploy.outputs[0].max_rel_error:.2e} ({report.verification.provider})")
    split = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
    print(f"  optimize {total_s:.2f}s: {split}")
    print(f"  ORT CPU latency (median of {rounds}): original {lat['original'] * 1e3:.2f} ms, "
          f"ours {lat['ours'] * 1e3:.2f} ms, deploy {lat['deploy'] * 1e3:.2f} ms")
    print(f"  ratios: ours/deploy {lat['ours'] / lat['deploy']:.3f}, "
          f"original/deploy {lat['original'] / lat['deploy']:.3f}")
    return {"same_histogram": same, "ratio": lat["ours"] / lat["deploy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=sorted(export.ARCHS))
    parser.add_argument("--exporter", action="append", choices=export.EXPORTERS)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", help="folder for the exported models (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = {(a, e): bench(a, e, out_dir, args.rounds)
                   for a in args.arch or sorted(export.ARCHS) for e in args.exporter or ("ts", "dynamo")}
    print("\nsummary: ours/deploy latency " + ", ".join(
        f"{a}/{e} {r['ratio']:.3f}{'' if r['same_histogram'] else ' (histogram differs)'}"
        for (a, e), r in results.items()))


if __name__ == "__main__":
    main()
