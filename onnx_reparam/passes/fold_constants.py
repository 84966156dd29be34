"""Evaluates subgraphs that compute only from constants (shape arithmetic, weight + buffer sums)
and replaces them by their values, so the other passes see plain constants.

Exporters compute pad values, scatter indices and summed weights at run time when their own
constant folding is off; the graph layer evaluates those in onnxruntime (graph/folding.py). Values
that are constant although an input is computed are folded here first: a Shape (with its
start/end), or one Gather of it, when the dims it selects are static; CastLike of a constant, which reads only the other input's type (the dynamo exporter
builds each conv's zero bias as Expand(CastLike(0, x), Shape(weight))).
"""
from __future__ import annotations

import gc

import numpy as np

from ..errors import Refused, option
from ..graph import Graph, Node
from . import PassLog

SIZE_LIMIT = 1 << 26  # bytes: a folded value larger than this stays computed
MAX_ROUNDS = 8


def run(graph: Graph, log: PassLog) -> None:
    problems: dict[str, str] = {}
    # Folding fixes shapes (slice bounds become constants), shapes let Shape ops fold: repeat.
    for _ in range(MAX_ROUNDS):
        folded = _fold_by_type(graph)
        if folded:
            if not log.rewrote("constant subgraphs", folded):
                break
            graph.cleanup()
        values, nodes, unevaluated = graph.constant_subgraphs(SIZE_LIMIT)
        problems.update(unevaluated)
        for tensor, value in values:
            graph.add_rewire(tensor, graph.add_constant(tensor.name, value))
        if values:
            if not log.rewrote("constant subgraphs", nodes):
                break
            graph.cleanup()
            if graph.holds_new_weights():
                gc.collect()  # the graph is reference cycles: weights the folded nodes read go now
        if not folded and not values:
            break
        graph.infer_shapes()
    for name, problem in problems.items():
        log.refused(f"value '{name}'", Refused("computed from constants alone, but onnxruntime could not compute it",
                                               problem), "constant subgraphs")
    reshaped = [log.attempt(node, _reshape_by_count, graph, node, log) for node in graph.nodes()
                if node.op == "Reshape" and len(node.inputs) == 2 and graph.constant(node.inputs[1]) is None]
    if any(reshaped):  # their outputs' sizes are the input's now, for the rules that read them
        graph.cleanup()
        graph.infer_shapes()


def _reshape_by_count(graph: Graph, node: Node, log: PassLog) -> bool:
    """A Reshape whose target is constant but for one size computed from the input's shape
    (YOLO heads' x.view(batch, anchors, outputs, h, w) with a dynamic batch): that size is -1,
    which onnxruntime infers from the element count, exactly the value computed when every other
    size is positive (Concat of constants and one computed size)."""
    concat = graph.producer(node.inputs[1])
    if concat is None or concat.op != "Concat" or graph.shared(node.inputs[1]) is not None:
        return False
    parts, computed = [], 0
    for piece in concat.inputs:
        value = graph.constant(piece)
        if value is None:
            if Graph.static_shape(piece) != (1,):
                return False
            value, computed = np.array([-1], np.int64), computed + 1
        elif value.ndim != 1 or np.any(value <= 0):
            return False  # a 0 (copy a dim) or -1 of its own: the element count decides no more
        parts.append(value.astype(np.int64))
    if computed > 1:
        log.refused(node, Refused(f"{computed} sizes of the Reshape's target are computed: -1 stands for one only; "
                                  f"{option('static_shape=True')} fixes the sizes", size_dependent=True),
                    "Reshape to one computed size")
    if computed != 1:
        return False
    shape = graph.add_constant(f"{node.name}_shape", np.concatenate(parts))
    graph.add_node("Reshape", [node.inputs[0], shape], [node.outputs[0]], dict(node.attrs), node.name)
    return log.rewrote("Reshape to one computed size", [node])


def _fold_by_type(graph: Graph) -> list[Node]:
    """Shape (with its start/end) and Gather(Shape, constant indices) become constants when the
    dims they select are static; Size when all are; CastLike of a constant when the type it is
    cast like is known; an Identity of a weight gives its readers the weight itself. Written down
    as rewirings; returns the nodes they replace."""
    folded: list[Node] = []

    def to_constant(node: Node, value: np.ndarray) -> None:
        graph.add_rewire(node.outputs[0], graph.add_constant(node.outputs[0].name, value))
        folded.append(node)

    for node in graph.nodes():
        if node.op == "Identity" and graph.is_stored(node.inputs[0]) and node.outputs[0].name not in graph.output_names:
            # TorchScript shares equal weights so: folded, each reader would get a copy
            graph.add_rewire(node.outputs[0], node.inputs[0])
            folded.append(node)
            continue
        if node.op == "CastLike" and len(node.inputs) == 2 and not node.attrs:
            value, like = graph.constant(node.inputs[0]), node.inputs[1].dtype
            if value is not None and like is not None and np.dtype(like).kind in "fiub":
                to_constant(node, value.astype(np.dtype(like)))
            continue
        if node.op not in ("Shape", "Size"):
            continue
        dims = _selected_dims(node)
        if dims is None:
            continue
        output = node.outputs[0]
        if node.op == "Size":
            if all(isinstance(d, int) for d in dims):
                to_constant(node, np.array(int(np.prod(dims, dtype=np.int64)), np.int64))
            continue
        if all(isinstance(d, int) and d >= 0 for d in dims):
            to_constant(node, np.array(dims, np.int64))
            continue
        for gather in list(output.outputs):
            indices = graph.constant(gather.inputs[1]) if gather.op == "Gather" and len(gather.inputs) > 1 else None
            if indices is None or gather.attrs.get("axis", 0) != 0 or gather.inputs[0] is not output:
                continue
            if np.any((indices < -len(dims)) | (indices >= len(dims))):
                continue
            picked = np.asarray(dims, dtype=object)[indices]
            # a scalar index picks a bare int, which np.ravel makes an np.int64; None stays None
            if all(d is not None and d >= 0 for d in np.ravel(picked)):
                to_constant(gather, np.asarray(picked, np.int64).reshape(indices.shape))
    return folded


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
