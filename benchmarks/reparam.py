"""Every reference network at benchmark size (batch 1): the training export rewritten by
onnx-reparam against the deploy export, in one run.

    python benchmarks/reparam.py [--arch repvgg_a0 --arch dbb ...] [--exporter ts ...] [--rounds 30]
                                 [--out DIR] [--dynamic-batch [--static-shape]]

Sizes: RepVGG-A0/B1g4 at paper width, 224x224, 1000 classes; the block families (models/families.py)
at 128 channels on 112x112 (1-D: 4096, 3-D: 16^3), the RepMLP nets at 64 channels on 112x112,
1000 classes.

Prints per model: node counts and op histograms (original / ours / deploy), max relative error
(ours vs original, ours vs deploy), the time optimize takes split into load / match+rewrite /
verify / save, and ORT CPU latency of original, ours and deploy measured interleaved (one run of
each per round in a random order, medians over the rounds), with ratios. Latency sessions use ORT's default graph
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
import export

import onnx_reparam
from onnx_reparam.inputs import make_inputs


def histogram(model: onnx.ModelProto) -> str:
    return " ".join(f"{op}:{n}" for op, n in sorted(Counter(n.op_type for n in model.graph.node).items()))


SIZES = {1: 4096, 2: 112, 3: 16}  # families: input extent per spatial rank


SESSIONS = 3  # per model: where a session's buffers land shifts its speed by a few percent


def latencies(paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int,
              warmup: int = 3, min_seconds: float = 10.0) -> tuple[dict[str, float], int]:
    """Median seconds per inference and the rounds run: the models run one after another in each
    round so that machine noise hits them alike; small models get more rounds (at least
    ``min_seconds`` of measuring), since their medians are noisier. Each model runs in SESSIONS
    sessions, taking turns, so that no one session's memory placement decides its number."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    # Idle ORT worker threads spin by default; with several sessions in one process the spinning
    # threads of one steal the cores of the next and the order decides the numbers (seen: 25 ms
    # vs 17 ms for identical graphs). Without spinning the interleaved medians agree.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {(k, i): ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for k, p in paths.items() for i in range(SESSIONS)}
    start = time.perf_counter()
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feed)
    per_round = (time.perf_counter() - start) / warmup / SESSIONS
    rounds = max(rounds, min(int(min_seconds / per_round), 5000))
    times: dict[str, list[float]] = {k: [] for k in paths}
    order = np.random.default_rng(0)
    for r in range(rounds):
        # a fresh order each round: whichever model runs after another does not always lose the cache
        for name in order.permutation(list(paths)):
            start = time.perf_counter()
            sessions[(name, r % SESSIONS)].run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, rounds


def bench(arch: str, exporter: str, out_dir: Path, rounds: int, dynamic_batch: bool = False,
          static_shape: bool = False) -> dict:
    start = time.perf_counter()
    spatial = len(export.input_shape(arch)) - 2
    size = 224 if arch in ("repvgg_a0", "repvgg_b1g4") else SIZES[spatial]
    train_path, deploy_path = export.export_pair(arch, out_dir, exporter, scale=1.0, size=size,
                                                 classes=1000, dynamic_batch=dynamic_batch)
    export_s = time.perf_counter() - start
    ours_path = out_dir / train_path.name.replace("_train_", "_ours_")
    start = time.perf_counter()
    model, report = onnx_reparam.optimize(train_path, static_shape=static_shape)
    save_start = time.perf_counter()
    onnx_reparam.save_model(model, ours_path)
    report.seconds["save"] = time.perf_counter() - save_start
    total_s = time.perf_counter() - start
    original, deploy = onnx.load(train_path), onnx.load(deploy_path)
    vs_deploy = onnx_reparam.verify(deploy_path, ours_path)
    feed = make_inputs(original)[0]
    lat, rounds = latencies({"original": train_path, "ours": ours_path, "deploy": deploy_path}, feed, rounds)
    size_mb = train_path.stat().st_size / 1e6
    shape = "x".join(str(d) for d in feed["x"].shape)
    print(f"\n== {arch} / {exporter} ({shape}, training export {size_mb:.1f} MB, exported in {export_s:.0f}s)")
    for name, m in (("original", original), ("ours", model), ("deploy", deploy)):
        print(f"  {name:8} {len(m.graph.node):4} nodes  {histogram(m)}")
    same = histogram(model) == histogram(deploy)
    ours_ops, deploy_ops = (Counter(n.op_type for n in m.graph.node) for m in (model, deploy))
    subset = all(ours_ops[op] <= deploy_ops[op] for op in ours_ops)
    print(f"  op histogram ours == deploy: {same}; no op more often than in deploy: {subset}")
    print(f"  max rel error ours vs original {report.verification.outputs[0].max_rel_error:.2e}, "
          f"ours vs deploy {vs_deploy.outputs[0].max_rel_error:.2e} ({report.verification.provider})")
    split = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
    print(f"  optimize {total_s:.2f}s: {split}")
    print(f"  ORT CPU latency (median of {rounds}): original {lat['original'] * 1e3:.2f} ms, "
          f"ours {lat['ours'] * 1e3:.2f} ms, deploy {lat['deploy'] * 1e3:.2f} ms")
    print(f"  ratios: ours/deploy {lat['ours'] / lat['deploy']:.3f}, "
          f"original/deploy {lat['original'] / lat['deploy']:.3f}")
    return {"histogram": "same ops" if same else "no op more often" if subset else "OPS DIFFER", "ratio": lat["ours"] / lat["deploy"], "nodes": (
        len(original.graph.node), len(model.graph.node), len(deploy.graph.node)),
        "error": report.verification.outputs[0].max_rel_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=sorted(export.ARCHS))
    parser.add_argument("--exporter", action="append", choices=export.EXPORTERS)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", help="folder for the exported models (default: a temporary one)")
    parser.add_argument("--dynamic-batch", action="store_true", help="export with a dynamic batch axis")
    parser.add_argument("--static-shape", action="store_true", help="optimize with --static-shape")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = {(a, e): bench(a, e, out_dir, args.rounds, args.dynamic_batch, args.static_shape)
                   for a in args.arch or sorted(export.ARCHS) for e in args.exporter or ("ts", "dynamo")}
    print("\nsummary (nodes original -> ours (deploy), max rel error, ORT CPU latency ours/deploy, ops):")
    for (a, e), r in results.items():
        print(f"  {a:12} {e:7} {r['nodes'][0]:5} -> {r['nodes'][1]:3} ({r['nodes'][2]:3})  "
              f"{r['error']:.1e}  {r['ratio']:.3f}  {r['histogram']}")


if __name__ == "__main__":
    main()
