"""Node counts after onnx-reparam and after onnxslim on the same inputs: the shipped example and
every committed fixture (or the models given), with the op types whose counts differ.

    pip install onnxslim    # not a dependency of this project
    python benchmarks/vs_onnxslim.py [MODEL.onnx ...]

onnxslim folds constants and removes data-movement no-ops but does not re-parameterize (no BN
after a layer with a bias, no branch merges), so it leaves more Conv/BatchNormalization/Add; where
it leaves fewer nodes, the op columns show which (Issue 18's standard: no more nodes than onnxslim
wherever the difference is data-movement no-ops). onnx-reparam runs without its check here (the
counts are what is compared; the tests check the rewrites).
"""
from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import onnx_reparam


def main() -> int:
    try:
        import onnxslim
    except ImportError:
        print("onnxslim is not installed: pip install onnxslim", file=sys.stderr)
        return 2
    paths = [Path(p) for p in sys.argv[1:]] or \
        [ROOT / "models" / "repvgg_a0_tiny_train.onnx", *sorted((ROOT / "models" / "fixtures").glob("*.onnx"))]
    print(f"{'model':42} {'in':>6} {'ours':>6} {'onnxslim':>9}  ops that differ (ours, onnxslim)")
    for path in paths:
        original = onnx.load(path)
        ours, _ = onnx_reparam.optimize(path, verify=False)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            slim = onnxslim.slim(onnx.load(path))
        a, b = (Counter(n.op_type for n in m.graph.node) for m in (ours, slim))
        differ = ", ".join(f"{op} {a[op]}/{b[op]}" for op in sorted(set(a) | set(b)) if a[op] != b[op])
        print(f"{path.name:42} {len(original.graph.node):>6} {len(ours.graph.node):>6} {len(slim.graph.node):>9}  "
              f"{differ}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
