"""Removes nodes that change nothing, so they do not stand between the nodes of a pattern:
Identity; an inference Dropout; Mul/Div by 1 and Add/Sub of 0 (a constant that does not broadcast
the data to a larger shape); a Transpose followed by one that undoes it; a Slice of whole axes; a
second Transpose, Reshape, Squeeze, Unsqueeze or Flatten identical to one already reading the same
tensor; and, by meaning rather than spelling, any chain of data-movement ops that gives back its
input unchanged (a Transpose pair without ``perm``, an identity perm, Squeeze then Unsqueeze,
Flatten then Reshape back, an all-zero Pad): routing runs it on numbered elements and sees each
element where it was.

Value-exact, not bit-exact: ``x + 0.0`` is dropped although it turns -0.0 into +0.0 (README:
the sign of a zero is not kept; the check catches an output that depends on it on its inputs).

Exporters write these (paddle2onnx's `x + 0` is Identity -> Mul(1) -> Add(0) -> Identity, tf2onnx
puts a Transpose of the input in front of each branch). Readers of the removed node's output read
its input instead; a node whose output is a graph output stays, so output names are kept, except
an Identity that only names a graph output: the node before it writes that name itself.
"""
from __future__ import annotations

import numpy as np

from .. import routing
from ..errors import Refused
from ..graph import Graph, Node
from ..routing import ROUTING_OPS
from . import PassLog

NEUTRAL = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}
DUPLICABLE = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    seen: dict[tuple, Node] = {}
    sliced = False
    for node in graph.nodes():
        if id(node) in done or len(node.outputs) != 1:
            continue
        if node.outputs[0].name in graph.output_names:
            if node.op == "Identity":
                log.attempt(node, _into_output, graph, node, log)
            continue
        removed = log.attempt(node, _drop, graph, node, seen, log) or []
        done.update(id(n) for n in removed)
        sliced = sliced or any(n.op == "Slice" for n in removed)
    if sliced:  # shape inference named the sliced axis anew; with the Slice gone it keeps its name
        graph.infer_shapes()


def _into_output(graph: Graph, node: Node, log: PassLog) -> bool:
    """An Identity that only gives a value a graph output's name (paddle2onnx's fetch_name_0,
    tf2onnx's Identity_graph_outputs): the node computing the value writes that name itself."""
    value = node.inputs[0]
    producer = graph.producer(value)
    if producer is None or len(producer.outputs) != 1 or graph.shared(value) is not None \
            or ":" in producer.op or producer.op in SUBGRAPH_OPS:  # another domain's op, or one with a body
        return False
    graph.add_node(producer.op, list(producer.inputs), [node.outputs[0]], dict(producer.attrs), producer.name)
    return log.rewrote("Identity naming a graph output", [producer, node])


def _drop(graph: Graph, node: Node, seen: dict[tuple, Node], log: PassLog) -> list[Node]:
    output = node.outputs[0]
    if node.op == "Identity":
        return _rewire(graph, log, "Identity", [node], output, node.inputs[0])
    if node.op == "Dropout" and _inference(graph, node):
        return _rewire(graph, log, "inference Dropout", [node], output, node.inputs[0])
    if node.op in NEUTRAL and len(node.inputs) == 2:
        data, constant = node.inputs[0], graph.constant(node.inputs[1])
        if constant is None and node.op in ("Mul", "Add"):
            data, constant = node.inputs[1], graph.constant(node.inputs[0])
        if constant is not None and graph.constant(data) is None and _neutral(constant, NEUTRAL[node.op], data):
            return _rewire(graph, log, f"{node.op} by {NEUTRAL[node.op]:g}", [node], output, data)
        return []
    if node.op == "Transpose":
        prior = graph.producer(node.inputs[0])
        if prior is not None and prior.op == "Transpose" and graph.shared(node.inputs[0]) is None:
            first, second = prior.attrs.get("perm"), node.attrs.get("perm")
            if first is not None and second is not None and len(first) == len(second) \
                    and [first[p] for p in second] == list(range(len(first))):
                return _rewire(graph, log, "Transpose pair", [node, prior], output, prior.inputs[0])
    if node.op == "Slice" and _whole(graph, node):
        return _rewire(graph, log, "Slice of whole axes", [node], output, node.inputs[0])
    view = _unchanged(graph, output) if node.op in ROUTING_OPS else None
    if view is not None:
        return _rewire(graph, log, "data movement that changes nothing", view.nodes, output, view.source)
    if node.op in DUPLICABLE:
        key = (node.op, tuple(id(t) for t in node.inputs), tuple(sorted((k, repr(v)) for k, v in node.attrs.items())))
        twin = seen.setdefault(key, node)
        if twin is not node and twin.outputs[0].dtype == output.dtype:
            return _rewire(graph, log, f"duplicate {node.op}", [node], output, twin.outputs[0])
    return []


def _inference(graph: Graph, node: Node) -> bool:
    """A Dropout that passes its input through: no training_mode input (or a constant false one)
    and no reader of its mask."""
    mode = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    training = graph.constant(mode) if mode is not None else np.array(False)
    mask_read = len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1].name in graph.output_names)
    return training is not None and not bool(np.any(training)) and not mask_read


def _unchanged(graph: Graph, output) -> routing.PadView | None:
    """The data-movement ops computing ``output``, when they give back the tensor they read,
    element for element (a view with no padding and no crop, of the same shape). Run only where
    the shapes already agree: a channel shuffle (Reshape, Transpose, Reshape) is looked at and kept."""
    source = routing.view_source(graph, output)
    if source is None or source.shape is None or output.shape is None or list(source.shape) != list(output.shape):
        return None
    try:
        view = routing.pad_view(graph, output)
    except Refused:
        return None  # not a pad or crop: data movement that does something, left without a word
    if view is not None and view.source is source and view.border is None \
            and not any(view.begins) and not any(view.ends):
        return view
    return None


def _whole(graph: Graph, node: Node) -> bool:
    """A Slice (opset 10+) taking every element of the axes it names: from 0, step 1, to the end
    (torch.export writes x[:, ...] so, and shape inference then loses the dim's name)."""
    if len(node.inputs) < 3:
        return False
    params = [graph.constant(t) if t.name else None for t in node.inputs[1:]]
    starts, ends = params[0], params[1]
    if starts is None or ends is None or any(p is None and t.name for p, t in zip(params[2:], node.inputs[3:])):
        return False
    shape = node.inputs[0].shape
    axes = params[2] if len(params) > 2 and params[2] is not None else np.arange(len(starts))
    steps = params[3] if len(params) > 3 and params[3] is not None else np.ones(len(starts), np.int64)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if start != 0 or step != 1 or not (end >= 2**31 - 1 or isinstance(size, int) and end >= size):
            return False
    return True


def _neutral(constant: np.ndarray, value: float, data) -> bool:
    """The constant is all ``value`` and broadcasting it does not enlarge the data."""
    fits = constant.ndim == 0 or constant.size == 1 and data.shape is not None and constant.ndim <= len(data.shape)
    return fits and bool(np.all(constant == value))


def _rewire(graph: Graph, log: PassLog, pattern: str, replaced: list[Node], old, new) -> list[Node]:
    graph.add_rewire(old, new)
    return replaced if log.rewrote(pattern, replaced) else []
