"""Evaluates subgraphs that compute only from constants (shape arithmetic, weight + buffer sums)
and replaces them by their values, so the other passes see plain constants.

Exporters compute pad values, scatter indices and summed weights at run time when their own
constant folding is off; onnx-graphsurgeon's fold_constants evaluates those in onnxruntime.
"""
from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..graph import Graph
from . import PassLog

SIZE_LIMIT = 1 << 26  # bytes: a folded value larger than this stays computed


def run(graph: Graph, log: PassLog) -> None:
    before = _computing_nodes(graph)
    level = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # it warns about every op it skips
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        graph.gs.fold_constants(size_threshold=SIZE_LIMIT)
        graph.cleanup()
    finally:
        gs.logger.G_LOGGER.severity = level
    folded = before - _computing_nodes(graph)
    if folded:
        log.rewrote("constant subgraphs", f"{folded} nodes evaluated")


def _computing_nodes(graph: Graph) -> int:
    """Constant nodes becoming initializers is no change; anything else is."""
    return sum(1 for n in graph.gs.nodes if n.op != "Constant")
