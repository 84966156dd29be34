"""Evaluates subgraphs that compute only from constants (shape arithmetic, weight + buffer sums)
and replaces them by their values, so the other passes see plain constants.

Exporters compute pad values, scatter indices and summed weights at run time when their own
constant folding is off; onnx-graphsurgeon's fold_constants evaluates those in onnxruntime.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..graph import Graph
from . import PassLog

SIZE_LIMIT = 1 << 26  # bytes: a folded value larger than this stays computed
MAX_ROUNDS = 8


def run(graph: Graph, log: PassLog) -> None:
    start = _computing_nodes(graph)
    level = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # it warns about every op it skips
    ort.set_default_logger_severity(3)  # and ORT about every optimization it cannot apply
    try:
        # Folding fixes shapes (slice bounds become constants), shapes let Shape ops fold: repeat.
        for _ in range(MAX_ROUNDS):
            before = _computing_nodes(graph)
            graph.gs.fold_constants(size_threshold=SIZE_LIMIT, should_exclude_node=lambda node: any(
                t.name in graph.overridable for t in node.inputs))  # values the caller may replace
            graph.cleanup()
            if _computing_nodes(graph) == before:
                break
            graph.infer_shapes()
    finally:
        gs.logger.G_LOGGER.severity = level
        ort.set_default_logger_severity(2)  # ORT's default; it has no getter to restore from
    folded = start - _computing_nodes(graph)
    if folded:
        log.rewrote("constant subgraphs", f"{folded} nodes evaluated")


def _computing_nodes(graph: Graph) -> int:
    """Constant nodes becoming initializers is no change; anything else is."""
    return sum(1 for n in graph.gs.nodes if n.op != "Constant")
