"""Recognises a tensor that is another tensor padded (with per-channel values) or cropped, whatever
data-movement ops an exporter used to build it: Pad, Slice, ScatterND writes of the border,
Transpose pairs, Concat, Reshape...

Such ops copy values without looking at them, so where each output element comes from does not
depend on the values. Running the subgraph once on the input's element numbers 1..n and once on
their negatives therefore shows exactly which output element is which input element (it flips
sign) and which is a constant (it does not). The subgraph is a pad/crop view of its input when the
copied elements are the input shifted by a fixed offset on the spatial axes and everything else is
one constant per channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
from onnx import ValueInfoProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from .errors import Refused, first_line, option
from .graph import Graph, Node, Tensor

ROUTING_OPS = frozenset({"Pad", "Slice", "ScatterND", "ScatterElements", "Concat", "Transpose",
                         "Identity", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Flatten",
                         "Gather", "Tile", "CastLike"})  # CastLike: only to the type it has
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})  # these keep memory order
MAX_NODES = 64  # a border written piecewise takes a handful of nodes; more is not this pattern
FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class PadView:
    """``tensor`` equals ``source`` padded by ``begins``/``ends`` on each spatial axis (negative:
    cropped), the padding of channel c holding ``border[c]`` (None where nothing is padded)."""
    source: Tensor
    begins: tuple[int, ...]
    ends: tuple[int, ...]
    border: np.ndarray | None
    nodes: list[Node]


def pad_view(graph: Graph, tensor: Tensor) -> PadView | None:
    """The view ``tensor`` is, or None when no data-movement op produces it; raises Refused when
    the ops are not a pad or crop of one tensor."""
    found = _ops_making(graph, tensor, "the pads, indices or shapes of the data-movement ops")
    if found is None:
        return None
    nodes, source = found
    in_shape, out_shape = _probe_shapes(source, tensor)
    a, b = source.shape, tensor.shape
    if in_shape is None and a and b and len(a) == len(b) and isinstance(a[0], str) \
            and all(isinstance(d, int) for d in list(a[1:]) + list(b[1:])):
        if isinstance(b[0], int):  # a symbolic batch in, a number out (a Slice of the first sample)
            raise Refused("the ops change the batch or channel axis")
        # shape inference lost the batch's name on the way (opset 18's Pad with axes): the ops must
        # keep it, seen at two sizes (their pads, indices and shapes are constants)
        for batch in (PROBE_BATCH, PROBE_BATCH + 1):
            if _run(graph, nodes, source, tensor, np.zeros((batch, *a[1:])), "padding/cropping").shape[0] != batch:
                raise Refused("the ops change the batch or channel axis")
        in_shape, out_shape = (PROBE_BATCH, *a[1:]), (PROBE_BATCH, *b[1:])
    if in_shape is None or out_shape is None or len(in_shape) != len(out_shape) or len(in_shape) < 3:
        raise Refused("padding/cropping ops on a tensor of unknown or different shape")
    if np.dtype(source.dtype) not in FLOATS:
        raise Refused(f"padding/cropping ops on {source.dtype} data")
    if in_shape[:2] != out_shape[:2]:
        raise Refused("the ops change the batch or channel axis")
    plus, minus = _numbered(graph, nodes, source, tensor, in_shape, "padding/cropping")
    view = _as_view(source, in_shape, nodes, plus, minus)
    if view is None:
        raise Refused("not a pad or crop of one tensor")
    return view


PROBE_BATCH = 2  # samples in the probe of a symbolic batch axis: ops mixing samples would show
MAX_PROBED = 1 << 22  # elements: a larger tensor's data movement is not run to read its layout


@dataclass
class Copies:
    """``tensor`` is made of ``source``'s elements, moved: element p of ``tensor`` (probed at
    shape ``index.shape``) is element ``index[p]`` of ``source`` (flat, probed at ``in_shape``)."""
    source: Tensor
    nodes: list[Node]
    in_shape: tuple[int, ...]
    index: np.ndarray


def copies(graph: Graph, tensor: Tensor) -> Copies | None:
    """Where each element of ``tensor`` comes from, when data-movement ops make it of one
    computed tensor's elements alone (reshapes, transposes, slices: no padding); None when no
    data-movement op produces it; raises Refused when the ops write values of their own or their
    layout cannot be read."""
    found = _ops_making(graph, tensor, "the shapes of the data-movement ops")
    if found is None:
        return None
    nodes, source = found
    in_shape, out_shape = Graph.static_shape(source), Graph.static_shape(tensor)
    if in_shape is None or out_shape is None:
        symbolic = any(isinstance(d, str) for t in (source, tensor) for d in (t.shape or []))
        raise Refused("data-movement ops on a tensor of " + (
            f"symbolic shape: {option('static_shape=True')} fixes the sizes" if symbolic else "unknown shape"),
            size_dependent=symbolic)
    if np.dtype(source.dtype) not in FLOATS:
        raise Refused(f"data-movement ops on {source.dtype} data")
    if max(np.prod(in_shape), np.prod(out_shape)) > MAX_PROBED:
        raise Refused(f"data-movement ops on over {MAX_PROBED} elements: their layout is not probed")
    plus, minus = _numbered(graph, nodes, source, tensor, in_shape, "data-movement")
    if plus.shape != tuple(out_shape) or not np.all((plus == -minus) & (plus != 0)):
        raise Refused("the data-movement ops write values of their own (a padding)")
    return Copies(source, nodes, tuple(in_shape), np.abs(plus).astype(np.int64) - 1)


def _ops_making(graph: Graph, tensor: Tensor, what: str) -> tuple[list[Node], Tensor] | None:
    """The data-movement ops computing ``tensor`` and the one tensor they read; None when no such
    op produces it; raises Refused where ``what`` (their pads, indices or shapes) is computed from
    symbolic input sizes, or they are not ops on one tensor."""
    node = graph.producer(tensor)
    if node is None or node.op not in ROUTING_OPS:
        return None
    nodes, source, shaped_by = _subgraph(graph, tensor)
    if shaped_by:
        raise symbolic_reason(graph, what)
    return nodes, source


def _numbered(graph: Graph, nodes: list[Node], source: Tensor, tensor: Tensor, in_shape: tuple[int, ...],
              ops: str) -> tuple[np.ndarray, np.ndarray]:
    """The ops run on the source's element numbers 1..n, and on their negatives. They copy values
    whatever their type, so the probe runs in float64, where every number up to 2**53 is exact
    (float16 could number only 2048 elements)."""
    numbers = np.arange(1, np.prod(in_shape) + 1, dtype=np.float64).reshape(in_shape)
    return _run(graph, nodes, source, tensor, numbers, ops), _run(graph, nodes, source, tensor, -numbers, ops)


def _run(graph: Graph, nodes: list[Node], source: Tensor, tensor: Tensor, values: np.ndarray, ops: str) -> np.ndarray:
    """The ops run on ``values`` in place of ``source``; raises Refused where they cannot be."""
    try:
        return evaluate(graph, nodes, {source.name: values}, tensor, widen=source.dtype)
    except Exception as exc:  # onnx's evaluator rejects some valid ops (negative Pad), ORT others: said
        raise Refused(f"the {ops} ops could not be evaluated", f"{type(exc).__name__}: {first_line(exc)}") from exc


def _probe_shapes(source: Tensor, tensor: Tensor) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """The shapes to probe the ops with: the static ones, or, where both have the same symbolic
    batch dim and static others, that dim at PROBE_BATCH (the ops' pads, indices and shapes are
    constants then, so they treat every sample alike, whatever the batch size)."""
    a, b = source.shape, tensor.shape
    if a and b and len(a) == len(b) and isinstance(a[0], str) and a[0] == b[0] and \
            all(isinstance(d, int) for d in list(a[1:]) + list(b[1:])):
        return (PROBE_BATCH, *a[1:]), (PROBE_BATCH, *b[1:])
    return Graph.static_shape(source), Graph.static_shape(tensor)


def view_source(graph: Graph, tensor: Tensor) -> Tensor | None:
    """The one computed tensor the data-movement ops producing ``tensor`` read, if there is one."""
    try:
        return _subgraph(graph, tensor)[1]
    except Refused:
        return None


def symbolic_reason(graph: Graph, what: str) -> Refused:
    """Why values computed from tensor shapes stop a rewrite: with every size static, constant
    folding would have computed them, so some size is symbolic; names the inputs' symbolic dims."""
    dims = [f"{i.name}: {d}" for i in graph.inputs for d in (i.shape or []) if not isinstance(d, int)]
    return Refused(f"{what} are computed from symbolic input sizes ({', '.join(dims) or 'unknown'}), so the rewrite "
                   f"would hold for one size only: {option('static_shape=True')} fixes the sizes", size_dependent=True)


def _subgraph(graph: Graph, tensor: Tensor) -> tuple[list[Node], Tensor, list[Tensor]]:
    """The routing nodes that compute ``tensor`` from one non-constant tensor, in graph order, and
    the tensors whose shapes (read by Shape/Size) their computed indices, pads or shapes come from;
    raises Refused when they are not that."""
    found: dict[int, Node] = {}
    sources: dict[str, Tensor] = {}
    shaped_by: list[Tensor] = []
    stack = [tensor]
    while stack:
        value = stack.pop()
        if graph.constant(value) is not None:
            continue
        node = graph.producer(value)
        if node is None or node.op not in ROUTING_OPS or node.op == "Constant":
            sources[value.name] = value
            continue
        if id(node) in found:
            continue
        found[id(node)] = node
        if len(found) > MAX_NODES:
            raise Refused("padding/cropping subgraph too large")
        if node.op == "CastLike" and node.inputs[0].dtype != node.inputs[1].dtype:
            raise Refused("a CastLike changes the type of the values")
        data = DATA_INPUTS.get(node.op, (0,))
        for index, operand in enumerate(node.inputs):
            if node.op == "CastLike" and index == 1:
                continue  # read for its type alone
            if not operand.name:
                continue
            if data is None or index in data:
                stack.append(operand)
            elif graph.constant(operand) is None:  # an index, pad or shape the graph computes
                shapes = _shapes_read(graph, operand)
                if shapes is None:
                    raise Refused(f"the {node.op}'s input {index} is computed from data")
                shaped_by += shapes
    if len(sources) != 1:
        raise Refused(f"padding/cropping ops read {len(sources)} computed tensors")
    return graph.in_order(found.values()), next(iter(sources.values())), shaped_by


# The inputs of a routing op that carry data (None: all); the others are indices, pads or shapes.
DATA_INPUTS = {"ScatterND": (0, 2), "ScatterElements": (0, 2), "Concat": None}


def _shapes_read(graph: Graph, tensor: Tensor) -> list[Tensor] | None:
    """The tensors whose shapes ``tensor`` is computed from (through Shape/Size, with constants),
    or None when it depends on some tensor's values."""
    shaped: list[Tensor] = []
    stack, seen = [tensor], set[int]()
    while stack:
        value = stack.pop()
        node = graph.producer(value)
        if graph.constant(value) is not None or id(node) in seen:
            continue
        if node is None or len(seen) > 4 * MAX_NODES:
            return None
        seen.add(id(node))
        if node.op in ("Shape", "Size"):
            shaped.append(node.inputs[0])
            continue
        stack.extend(t for t in node.inputs if t.name)
    return shaped


def evaluate(graph: Graph, nodes: list[Node], feeds: dict[str, np.ndarray], output: Tensor,
             widen: np.dtype | None = None) -> np.ndarray:
    """``output`` of ``nodes`` (in graph order) run on ``feeds`` by name, the other tensors they
    read being the graph's constants; constants of type ``widen`` are widened to float64 (the
    probe runs in float64)."""
    constants, protos = {}, []
    computed = {t.name for n in nodes for t in n.outputs} | set(feeds)
    for node in nodes:
        inputs = node.inputs[:1] if node.op == "CastLike" else node.inputs
        for t in inputs:
            if t.name and t.name not in computed and t.name not in constants:
                value = graph.value(t)
                if widen is not None and value.dtype == widen:  # data written into the tensor: widened with it
                    value = value.astype(np.float64)
                constants[t.name] = numpy_helper.from_array(value, t.name)
        if node.op == "CastLike":  # to the type the value has (_subgraph checked): a copy
            protos.append(helper.make_node("Identity", [inputs[0].name], [node.outputs[0].name]))
            continue
        protos.append(helper.make_node(node.op, [t.name for t in node.inputs],
                                       [t.name for t in node.outputs], **node.attrs))
    model = helper.make_model(helper.make_graph(
        protos, "view", [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                         for name, v in feeds.items()],
        [ValueInfoProto(name=output.name)], list(constants.values())),  # its type: whatever the ops give
        opset_imports=[helper.make_opsetid("", _opset(graph))])
    try:
        # a list of outputs: it returns a dict only when asked for intermediate values
        return np.asarray(cast(list, ReferenceEvaluator(model).run([output.name], feeds))[0])
    except Exception:  # noqa: BLE001 - onnx's evaluator rejects some valid ops (negative Pad): ask ORT
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 4
        model.ir_version = min(model.ir_version, 10)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                       enable_fallback=0)
        return np.asarray(session.run([output.name], feeds)[0])


def _opset(graph: Graph) -> int:
    return graph.opset


def _as_view(source: Tensor, probed: tuple[int, ...], nodes: list[Node], plus: np.ndarray,
             minus: np.ndarray) -> PadView | None:
    copied = (plus == -minus) & (plus != 0)
    if not copied.any():
        return None
    in_shape = np.array(probed)
    first = np.argwhere(copied)[0]
    origin = np.array(np.unravel_index(int(abs(plus[tuple(first)])) - 1, tuple(in_shape)))
    begins = first - origin
    if begins[0] or begins[1]:
        return None  # moved along batch or channels: not a padding
    # Where each output element must come from if this is a pad/crop by ``begins``.
    grid = np.indices(plus.shape) - begins.reshape((-1,) + (1,) * plus.ndim)
    inside = np.all((grid >= 0) & (grid < in_shape.reshape((-1,) + (1,) * plus.ndim)), axis=0)
    expected = np.ravel_multi_index(tuple(np.where(inside, grid, 0)), tuple(in_shape)) + 1
    if not np.array_equal(copied, inside) or not np.array_equal(np.abs(plus[inside]), expected[inside]):
        return None
    border = None
    if not inside.all():
        border = np.zeros(plus.shape[1])
        for c in range(plus.shape[1]):
            values = plus[:, c][~inside[:, c]]
            if values.size and np.any(values != values[0]):
                return None
            border[c] = values[0] if values.size else 0.0
    ends = np.array(plus.shape) - in_shape - begins
    return PadView(source, tuple(int(b) for b in begins[2:]), tuple(int(e) for e in ends[2:]),
                   border, nodes)
