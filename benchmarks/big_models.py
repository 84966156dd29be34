"""Big models at I/O speed: optimize's time and peak memory against the floor (onnx.load +
onnx.save of the same file) and against onnxslim, in one run.

    python benchmarks/big_models.py [--model repvgg_b3 --model replknet --model repmlp] [--huge]
                                    [--out DIR] [--repeat 1]

Models (training structure, random weights, random BN statistics, TorchScript export keeping BN):
- repvgg_b3: RepVGG-B3 (timm's repvgg_b3 layout), 3x3+1x1+identity branches with BN, ~470 MiB;
- replknet: RepLKNet-like, depthwise 31x31+BN parallel to 5x5+BN, 1x1 convs, 256-1024 channels;
- repmlp: RepMLP-like, grouped partition FC+BN parallel to 1x1/3x3 conv+BN;
- huge (with --huge): RepVGG-B3 widened past 2 GB, saved with external data.

Each measurement runs in a fresh process (its peak resident memory is its own): the floor,
``optimize --no-verify``, ``optimize`` (with the check), and onnxslim when it is installed. The
rounds (--repeat N, 3 by default) are interleaved and the best time and the median peak are printed:
on a shared machine noise only ever adds time, so the best of N is the steadiest estimate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

MEASURE = r"""
import json, sys, time
kind, source, target = sys.argv[1:4]
start = time.perf_counter()
if kind == "floor":
    import onnx
    model = onnx.load(source)
    onnx.save(model, target, save_as_external_data=len(sys.argv) > 4, location=target.split("/")[-1] + ".data")
elif kind == "onnxslim":
    import onnxslim
    onnxslim.slim(source, target)
else:
    from onnx_reparam.cli import main
    args = ["optimize", source, target, "-q"] + (["--no-verify"] if kind == "no-verify" else [])
    try:
        main.main(args, standalone_mode=False)
    except SystemExit as exit:
        if exit.code:
            raise
seconds = time.perf_counter() - start
with open("/proc/self/status") as status:  # VmHWM starts anew at exec; ru_maxrss would not
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak": peak}))
"""


def build(name: str):
    import families
    import repmlp
    import repvgg
    from torch import nn

    if name in ("repvgg_b3", "huge"):
        widths = [3, 3, 3, 5] if name == "repvgg_b3" else [6, 6, 6, 9]
        return repvgg.randomize_bn(repvgg.RepVGG([4, 6, 16, 1], widths, 1000)), (1, 3, 224, 224)
    if name == "replknet":
        def block(c):
            mixer = nn.Sequential(families.conv_bn(c, c, 1), nn.ReLU(), families.LargeKernel(c, 31, 5), nn.ReLU(),
                                  families.conv_bn(c, c, 1))
            ffn = nn.Sequential(families.conv_bn(c, 4 * c, 1), nn.GELU(), families.conv_bn(4 * c, c, 1))
            return nn.Sequential(families.Residual(mixer), families.Residual(ffn))
        layers = [families.conv_bn(3, 256, 3, 4, 1), nn.ReLU()]
        for c, blocks, stride in ((256, 2, 1), (512, 2, 2), (1024, 6, 2)):
            if layers and c != 256:
                layers += [families.conv_bn(c // 2, c, 1), nn.ReLU(), families.conv_bn(c, c, 3, stride, 1, c), nn.ReLU()]
            layers += [block(c) for _ in range(blocks)]
        return repvgg.randomize_bn(nn.Sequential(*layers)), (1, 3, 112, 112)
    if name == "repmlp":
        blocks = [repmlp.RepMLPBlock(64, 64, 28, 14, kernels=(1, 3), groups=4) for _ in range(2)]
        return repvgg.randomize_bn(nn.Sequential(*blocks)), (1, 64, 28, 28)
    raise ValueError(name)


def export(name: str, folder: Path) -> Path:
    path = folder / f"{name}.onnx"
    if path.exists():
        return path
    import export as exporter
    import torch
    model, shape = build(name)
    model.eval()
    if name != "huge":
        return exporter.export(model, path, "ts", shape)
    with torch.no_grad():  # over 2 GB: the exporter must write external data
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], do_constant_folding=False, opset_version=17)
    return path


def measure(kind: str, source: Path, folder: Path) -> dict:
    target = folder / f"{source.stem}.{kind}.onnx"
    extra = ["external"] if kind == "floor" and source.with_name(source.name + ".data").exists() else []
    run = subprocess.run([sys.executable, "-c", MEASURE, kind, str(source), str(target)] + extra,
                         capture_output=True, text=True, check=False)
    if run.returncode:
        return {"error": (run.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=["repvgg_b3", "replknet", "repmlp"])
    parser.add_argument("--huge", action="store_true", help="also a model over 2 GB")
    parser.add_argument("--out", type=Path, help="folder for the models (kept, reused)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    names = (args.model or ["repvgg_b3", "replknet", "repmlp"]) + (["huge"] if args.huge else [])
    try:
        import onnxslim  # noqa: F401
        kinds = ["floor", "no-verify", "verify", "onnxslim"]
    except ImportError:
        kinds = ["floor", "no-verify", "verify"]
        print("onnxslim is not installed: no comparison with it")
    folder = args.out or Path(tempfile.mkdtemp(prefix="onnx-reparam-big-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'model':10} {'size':>9} | " + " | ".join(f"{k:>20}" for k in kinds) +
          " | no-verify/floor time, peak | no-verify/onnxslim time, peak")
    for name in names:
        source = export(name, folder)
        size = source.stat().st_size + sum(p.stat().st_size for p in folder.glob(f"{source.name}*.data"))
        results = {k: [] for k in kinds}
        for _ in range(args.repeat):
            for kind in kinds:
                results[kind].append(measure(kind, source, folder))
        row = {}
        for kind, runs in results.items():
            good = [r for r in runs if "error" in r] or runs
            row[kind] = runs[0] if "error" in good[0] else {
                "seconds": min(r["seconds"] for r in runs),
                "peak": statistics.median(r["peak"] for r in runs)}
        cells = [f"{row[k]['seconds']:7.1f} s {row[k]['peak'] / 2**30:5.2f} GB" if "error" not in row[k]
                 else f"{'error':>20}" for k in kinds]
        ratios = ""
        if "error" not in row["no-verify"] and "error" not in row["floor"]:
            ratios = (f" | {row['no-verify']['seconds'] / row['floor']['seconds']:.2f}x, "
                      f"{row['no-verify']['peak'] / row['floor']['peak']:.2f}x")
            if "onnxslim" in row and "error" not in row["onnxslim"]:
                ratios += (f" | {row['no-verify']['seconds'] / row['onnxslim']['seconds']:.2f}x, "
                           f"{row['no-verify']['peak'] / row['onnxslim']['peak']:.2f}x")
        print(f"{name:10} {size / 2**20:6.0f} MiB | " + " | ".join(cells) + ratios, flush=True)
        for kind in kinds:
            if "error" in row[kind]:
                print(f"  {kind}: {row[kind]['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
