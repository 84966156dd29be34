"""The library's entry points: optimize a model, inspect it, verify two models."""
from __future__ import annotations

import os
import time

import numpy as np
import onnx

from . import verify as verification
from .errors import ReparamError
from .graph import Graph
from .model_io import load_model
from .pipeline import run_passes, select_passes
from .report import GraphStats, Report


class VerificationError(ReparamError):
    """The rewritten model's outputs differ from the original's. Carries both for inspection."""

    def __init__(self, model: onnx.ModelProto, report: Report):
        super().__init__("verification failed: " + report.verification.summary().replace("\n", ";"))
        self.model, self.report = model, report


def optimize(model: str | os.PathLike | onnx.ModelProto, *, only: tuple[str, ...] = (),
             skip: tuple[str, ...] = (), verify: bool = True, provider: str = "auto",
             input_shapes: dict[str, tuple[int, ...]] | None = None,
             inputs: dict[str, np.ndarray] | None = None, seed: int = 0, rtol: float | None = None,
             atol: float | None = None) -> tuple[onnx.ModelProto, Report]:
    """Rewrites a training-structure model into its deploy structure and, unless ``verify`` is
    False, checks in onnxruntime that the outputs are unchanged. Returns (model, report); raises
    VerificationError (holding both) when the check fails. The input is never modified."""
    passes = select_passes(only, skip)
    report = Report()
    start = time.perf_counter()
    original = load_model(model)
    report.seconds["load"] = time.perf_counter() - start
    report.before = GraphStats.of(original)

    start = time.perf_counter()
    graph = Graph(original)
    report.passes = run_passes(graph, passes)
    optimized = graph.to_model(original) if report.rewrites else original
    report.seconds["rewrite"] = time.perf_counter() - start
    report.after = GraphStats.of(optimized)

    if verify and report.rewrites:
        start = time.perf_counter()
        report.verification = verification.compare(
            original, optimized, provider=provider, input_shapes=input_shapes, inputs=inputs,
            seed=seed, rtol=rtol, atol=atol)
        report.seconds["verify"] = time.perf_counter() - start
        if not report.verification.passed:
            raise VerificationError(optimized, report)
    return optimized, report


def inspect(model: str | os.PathLike | onnx.ModelProto, *, only: tuple[str, ...] = (),
            skip: tuple[str, ...] = ()) -> Report:
    """Dry run: what would be rewritten and what would be left, and why."""
    return optimize(model, only=only, skip=skip, verify=False)[1]


def verify(reference: str | os.PathLike | onnx.ModelProto,
           candidate: str | os.PathLike | onnx.ModelProto, **options) -> verification.Verification:
    """The same equivalence check optimize runs, on any two models with the same inputs and
    outputs. Options: provider, input_shapes, inputs, seed, rtol, atol."""
    return verification.compare(load_model(reference), load_model(candidate), **options)
