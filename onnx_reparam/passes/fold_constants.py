"""Evaluates subgraphs that compute only from constants (shape arithmetic, weight + buffer sums)
and replaces them by their values, so the other passes see plain constants.

Exporters compute pad values, scatter indices and summed weights at run time when their own
constant folding is off; onnx-graphsurgeon's fold_constants evaluates those in onnxruntime. Values
that are constant although an input is computed are folded here first: a Shape (with its
start/end, which onnx-graphsurgeon 0.6.1 ignores), or one Gather of it, when the dims it selects
are static; CastLike of a constant, which reads only the other input's type (the dynamo exporter
builds each conv's zero bias as Expand(CastLike(0, x), Shape(weight))).
"""
from __future__ import annotations

import gc

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..graph import Graph, Node, quiet_onnx_graphsurgeon
from . import PassLog

SIZE_LIMIT = 1 << 26  # bytes: a folded value larger than this stays computed
MAX_ROUNDS = 8


def run(graph: Graph, log: PassLog) -> None:
    before = [n for n in graph.gs.nodes if n.op != "Constant"]
    original = graph.gs
    if log.policy is not None:  # the rewrite may be withheld: fold a copy, keep it if allowed
        graph.gs = original.copy()
    # The ORT sessions onnx-graphsurgeon makes (with no options we could pass) warn about every
    # optimization they cannot apply, through ORT's process-wide logger: the one place we touch it.
    ort.set_default_logger_severity(3)
    try:
        # Folding fixes shapes (slice bounds become constants), shapes let Shape ops fold: repeat.
        for _ in range(MAX_ROUNDS):
            count = _computing_nodes(graph)
            _fold_by_type(graph)
            with graph.spelled_out(), quiet_onnx_graphsurgeon():
                graph.gs.fold_constants(fold_shapes=False, size_threshold=SIZE_LIMIT, should_exclude_node=lambda node: any(
                    t.name in graph.overridable for t in node.inputs))  # values the caller may replace
            graph.cleanup()
            if _computing_nodes(graph) == count:
                break
            graph.infer_shapes()
    except Exception:
        if log.policy is not None:
            graph.gs = original
        raise
    finally:
        ort.set_default_logger_severity(2)  # ORT's default; it has no getter to restore from
        # onnx-graphsurgeon folds on clones of the graph, reference cycles sharing our weights:
        # collected now, they do not keep weights that later rewrites let go.
        if graph.holds_new_weights():
            gc.collect()
    left = {graph.label(n) for n in graph.gs.nodes}
    folded = [n for n in before if graph.label(n) not in left]
    if folded and not log.rewrote("constant subgraphs", folded):
        graph.gs = original


def _computing_nodes(graph: Graph) -> int:
    """Constant nodes becoming initializers is no change; anything else is."""
    return sum(1 for n in graph.gs.nodes if n.op != "Constant")


def _fold_by_type(graph: Graph) -> None:
    """Shape (with its start/end) and Gather(Shape, constant indices) become constants when the
    dims they select are static; Size when all are; CastLike of a constant when the type it is
    cast like is known; an Identity of a weight gives its readers the weight itself."""
    for node in graph.nodes():
        if node.op == "Identity" and isinstance(node.inputs[0], gs.Constant) \
                and node.inputs[0].name not in graph.overridable and node.outputs[0].name not in graph.output_names:
            _share(node)  # TorchScript shares equal weights so: folded, each reader would get a copy
            continue
        if node.op == "CastLike" and len(node.inputs) == 2 and not node.attrs:
            value, like = graph.constant(node.inputs[0]), node.inputs[1].dtype
            if value is not None and like is not None and np.dtype(like).kind in "fiub":
                _to_constant(node, value.astype(np.dtype(like)))
            continue
        if node.op not in ("Shape", "Size"):
            continue
        dims = _selected_dims(node)
        if dims is None:
            continue
        output = node.outputs[0]
        if node.op == "Size":
            if all(isinstance(d, int) for d in dims):
                _to_constant(node, np.array(int(np.prod(dims, dtype=np.int64)), np.int64))
            continue
        if all(isinstance(d, int) and d >= 0 for d in dims):
            _to_constant(node, np.array(dims, np.int64))
            continue
        for gather in list(output.outputs):
            indices = graph.constant(gather.inputs[1]) if gather.op == "Gather" and len(gather.inputs) > 1 else None
            if indices is None or gather.attrs.get("axis", 0) != 0 or gather.inputs[0] is not output:
                continue
            if np.any((indices < -len(dims)) | (indices >= len(dims))):
                continue
            picked = np.asarray(dims, dtype=object)[indices]
            if all(isinstance(d, int) and d >= 0 for d in np.ravel(picked)):
                _to_constant(gather, np.asarray(picked, np.int64).reshape(indices.shape))


def _selected_dims(node: Node) -> list | None:
    shape = node.inputs[0].shape if node.inputs else None
    if shape is None:
        return None
    rank = len(shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
    if node.op == "Size":
        start, end = 0, rank
    start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
    return [d if isinstance(d, int) and d >= 0 else None for d in shape[start:end]]


def _share(node: Node) -> None:
    weight, output = node.inputs[0], node.outputs[0]
    for reader in list(output.outputs):
        for index, tensor in enumerate(reader.inputs):
            if tensor is output:
                reader.inputs[index] = weight
    node.outputs.clear()


def _to_constant(node: Node, value: np.ndarray) -> None:
    output = node.outputs[0]
    node.outputs.clear()
    output.to_constant(value)
