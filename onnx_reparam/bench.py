"""Latency A/B of two models with the same inputs, in one run: sessions with ORT's default graph
optimizations (as a deployment runs them), warm-up, then rounds in which each model runs once in a
random order; per model the median and the interquartile range, and the median and IQR of the
per-round ratio B/A (the two runs of a round share the machine's state, so the ratio is steadier
than the ratio of medians). On CUDA, inputs and outputs stay bound on the device (IOBinding), so
host copies do not dominate.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import ReparamError, first_line
from .inputs import Shapes, make_inputs, takes_feeds
from .runtime import Runner, device_name, gpu_present, ort_module


@dataclass
class Latency:
    name: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float


@dataclass
class BenchResult:
    provider: str
    device: str
    onnxruntime: str
    threads: int | str
    rounds: int
    warmup: int
    a: Latency
    b: Latency
    ratio: float  # median over rounds of B / A
    ratio_q1: float
    ratio_q3: float
    notes: list[str] = field(default_factory=list)
    cuda: str = ""  # why CUDA was not used ("" when it was, or was not asked for)
    gpu: bool = False  # an NVIDIA GPU or driver is here: ``cuda`` is news, printed without -v
    inputs: list[str] = field(default_factory=list)  # what the models ran on, one line per input

    def summary(self, verbose: bool = False) -> str:
        """Medians and B/A; under ``verbose``, also the inputs, each model's fastest and slowest
        round, and why CUDA was not used on a machine without a GPU."""
        lines = [f"latency on {self.provider} ({self.device}; onnxruntime {self.onnxruntime}; "
                 f"threads: {self.threads}; {self.rounds} interleaved rounds after {self.warmup} warm-up)"]
        for label, lat in (("A", self.a), ("B", self.b)):
            lines.append(f"  {label} {lat.name}: median {lat.median_ms:.3f} ms "
                         f"(IQR {lat.q1_ms:.3f}-{lat.q3_ms:.3f})"
                         + (f"; fastest {lat.min_ms:.3f}, slowest {lat.max_ms:.3f}" if verbose else ""))
        lines.append(f"  B/A {self.ratio:.3f} (IQR {self.ratio_q1:.3f}-{self.ratio_q3:.3f})")
        if verbose:
            lines += [f"  input {line}" for line in self.inputs]
        if self.cuda and (self.gpu or verbose):
            lines.append(f"  {self.cuda}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


class _Timed:
    """One model ready to run: a session and its inputs (bound on the device for CUDA)."""

    def __init__(self, runner: Runner, model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int | None):
        ort = ort_module()
        try:
            self.session = runner.session(model, optimized=True, threads=threads)
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            raise ReparamError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        self.feeds = feeds
        self.binding = None
        if runner.provider.startswith("CUDA"):
            self.binding = self.session.io_binding()
            for name, value in feeds.items():
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for output in self.session.get_outputs():
                self.binding.bind_output(output.name, "cuda", 0)

    def run(self) -> float:
        start = time.perf_counter()
        if self.binding is not None:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        else:
            self.session.run(None, self.feeds)
        return time.perf_counter() - start


MAX_ROUNDS = 100_000
MAX_THREADS = 1024  # onnxruntime makes one OS thread per intra-op thread


def bench(a: onnx.ModelProto, b: onnx.ModelProto, *, names: tuple[str, str] = ("A", "B"), provider: str = "auto",
          input_shapes: Shapes | None = None, seed: int = 0, rounds: int = 50, warmup: int = 5,
          threads: int | None = None) -> BenchResult:
    """Times ``a`` and ``b`` on the same seeded inputs, interleaved (see the module docstring)."""
    limits = [("rounds", rounds, 1, MAX_ROUNDS), ("warmup", warmup, 0, MAX_ROUNDS)]
    for name, value, low, high in limits + ([("threads", threads, 1, MAX_THREADS)] if threads is not None else []):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ReparamError(f"{name} must be an integer from {low} to {high}, not {value!r}")
    runner = Runner(provider)
    chosen: list[str] = []
    feeds = make_inputs(a, input_shapes, seed, chosen=chosen)[0]
    takes_feeds(b, feeds, names[1])
    timed = [_Timed(runner, model, feeds, threads) for model in (a, b)]
    for _ in range(warmup):
        for t in timed:
            t.run()
    rng = np.random.default_rng(seed)
    times = np.zeros((rounds, 2))
    for r in range(rounds):
        for i in rng.permutation(2):
            times[r, i] = timed[i].run()
    ms = times * 1e3
    ratios = times[:, 1] / times[:, 0]
    latencies = [Latency(name, *map(float, np.percentile(ms[:, i], [50, 25, 75, 0, 100]))) for i, name in enumerate(names)]
    notes = runner.notes + chosen
    if not runner.provider.startswith("CUDA"):
        notes.append("measured on the CPU")
    ratio, ratio_q1, ratio_q3 = np.percentile(ratios, [50, 25, 75])
    return BenchResult(runner.provider, device_name(runner.provider), ort_module().__version__,
                       threads or f"onnxruntime's default ({os.cpu_count()} cores)", rounds, warmup,
                       latencies[0], latencies[1], float(ratio), float(ratio_q1), float(ratio_q3), notes,
                       runner.cuda, gpu_present(), [f"{name}: {value.dtype} {'x'.join(map(str, value.shape))}"
                                                    for name, value in feeds.items()])
