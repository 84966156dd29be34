"""Folds a per-channel affine op that follows a linear layer into the layer's weight and bias.

BatchNormalization(y) = y * s + t with s = gamma / sqrt(var + eps) and t = beta - mean * s; Mul,
Add, Sub and Div by a per-channel constant are the same map with s or t trivial. For y = W x + b,
s * y + t = (W * s) x + (b * s + t), s applied along W's output-channel axis (axis 0 of a Conv
weight, axis 1 of each group of a ConvTranspose weight, the N axis of a Gemm/MatMul weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import algebra, routing
from ..compare import is_float
from ..errors import Refused
from ..graph import Graph, Node, Tensor, attr, optional_input
from ..linear import bias_vector, channel_affine, conv_form, misfit
from ..matcher import Chain, ChainMatch, find_chains
from . import PassLog

LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool"})
AFFINE = frozenset({"BatchNormalization", "Mul", "Add", "Sub", "Div"})
PATTERNS = (
    Chain("matmul+bias+affine", (frozenset({"MatMul"}), frozenset({"Add", "Sub"}), AFFINE)),
    Chain("linear+affine", (LINEAR, AFFINE)),
)


@dataclass
class Linear:
    """A linear layer as (weight, bias) and where its output channels lie."""
    weight: np.ndarray
    bias: np.ndarray  # float64, one entry per output channel
    channel_axis: int  # negative: counted from the end of the output shape
    rank: int | None  # rank of the output, None when unknown
    dtype: np.dtype  # of the stored weight, which the folded one keeps
    op: str  # what the folded layer is written as
    attrs: dict


def linear_of(graph: Graph, node: Node) -> Linear | None:
    """The layer's weight and bias if they are constants, None for anything else; raises Refused
    where the layer cannot fold (an AveragePool that is not a conv, integer weights)."""
    if node.op == "AveragePool":  # folds as the depthwise conv it is
        form = conv_form(graph, node)
        if form is None:
            return None
        g = form.geometry
        attrs = {"kernel_shape": list(g["kernel"]), "strides": list(g["strides"]),
                 "dilations": list(g["dilations"]), "pads": list(g["pads"]), "group": g["group"]}
        return Linear(form.weight, form.bias, 1 - form.weight.ndim, form.weight.ndim, form.dtype,
                      "Conv", attrs)
    return _weighted_layer(graph, node)


def _weighted_layer(graph: Graph, node: Node) -> Linear | None:
    weight = graph.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or graph.constant(node.inputs[0]) is not None:
        return None
    if node.op in ("Conv", "ConvTranspose"):
        misfit(node, weight)
    if not is_float(weight.dtype):
        raise Refused(f"a {node.op} on {weight.dtype} data: folding is float arithmetic")
    bias_input = optional_input(node, 2)
    bias = graph.constant(bias_input) if bias_input is not None else np.zeros(())
    if bias is None:
        return None
    if node.op == "Conv":
        return Linear(weight, bias_vector(bias, weight.shape[0]), 1 - weight.ndim, weight.ndim, weight.dtype,
                      node.op, dict(node.attrs))
    if node.op == "ConvTranspose":
        channels = weight.shape[1] * int(attr(node, "group", 1))
        return Linear(weight, bias_vector(bias, channels), 1 - weight.ndim, weight.ndim, weight.dtype,
                      node.op, dict(node.attrs))
    if weight.ndim != 2:
        return None
    if node.op == "Gemm":
        channels = weight.shape[0] if attr(node, "transB", 0) else weight.shape[1]
        try:
            bias = algebra.per_channel(bias, channels, -1, 2)
        except Refused:
            return None  # C broadcasts over more than the features: not a layer's bias
        alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
        attrs = {**node.attrs, "alpha": 1.0, "beta": 1.0}
        return Linear(np.asarray(weight, np.float64) * alpha, bias * beta, -1, 2, weight.dtype, node.op, attrs)
    return Linear(weight, np.zeros(weight.shape[1]), -1, Graph.rank(node.inputs[0]), weight.dtype,
                  node.op, {})  # MatMul


def affine_of(graph: Graph, node: Node, index: int, layer: Linear,
              channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of the op reading the layer's output at input ``index``; None if it is not
    this pattern at all; raises Refused if it is an affine op that cannot fold."""
    affine = channel_affine(graph, node, channels, layer.channel_axis, layer.rank)
    if affine is None or affine.data_index != index:
        return None
    return affine.scale, affine.shift


def scaled_weight(layer: Linear, weight: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The weight times the output channels' scale, in ``dtype`` (computed in float64)."""
    if layer.op == "Conv":
        return algebra.scale_conv_weight(weight, scale, dtype)
    if layer.op == "ConvTranspose":
        return algebra.scale_conv_transpose_weight(weight, scale, int(layer.attrs.get("group", 1)), dtype)
    out_axis = 0 if layer.op == "Gemm" and layer.attrs.get("transB", 0) else 1
    return algebra.scale_matrix_weight(weight, scale, out_axis, dtype)


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for pattern in PATTERNS:
        for match in find_chains(graph, pattern, done):
            if log.attempt(match.nodes[0], _fold, graph, match, log):
                done.update(id(n) for n in match.nodes)
    for node in graph.nodes():
        if id(node) not in done and node.op in AFFINE:
            log.attempt(node, _fold_through_layout, graph, node, log)


def _fold(graph: Graph, match: ChainMatch, log: PassLog) -> bool:
    layer_node, *affine_nodes = match.nodes
    pattern = f"{layer_node.op}+{affine_nodes[0].op}"
    try:
        layer = linear_of(graph, layer_node)
    except Refused as refused:
        log.refused(layer_node, refused, pattern)
        return False
    if layer is None:
        parameters = [t for t in layer_node.inputs[1:3] if t.name]
        if layer_node.op != "AveragePool" and any(graph.constant(t) is None for t in parameters):
            log.refused(layer_node, Refused(f"the {layer_node.op}'s weight or bias is computed, or a graph input a "
                                            "caller may override"), pattern)
        return False
    channels = layer.bias.shape[0]
    if layer_node.op == "MatMul" and len(affine_nodes) == 1 and affine_nodes[0].op in ("Add", "Sub"):
        return False  # that Add is the MatMul's bias; the three-node pattern folds what follows it
    bias_node = affine_nodes[0] if len(affine_nodes) == 2 else None
    scale, shift = np.ones(channels), layer.bias
    for node, index in zip(affine_nodes, match.input_index):
        try:
            affine = affine_of(graph, node, index, layer, channels)
        except Refused as refused:
            log.refused(node, refused, f"{layer_node.op}+{node.op}")
            return False
        if affine is None:
            return False
        scale, shift = scale * affine[0], algebra.fold_bias(shift, *affine)
    pattern = f"{layer_node.op}+" + "+".join(n.op for n in affine_nodes)
    if match.blocked:
        log.refused(layer_node, match.blocked.within(f"cannot fold {affine_nodes[-1].op} into {layer_node.op}"),
                    pattern)
        return False
    dtype = Graph.layer_dtype(layer_node.inputs[0], layer.dtype)
    weight = scaled_weight(layer, layer.weight, scale, dtype)
    needs_bias = layer.op != "MatMul" or bias_node is not None or np.any(shift)
    graph.emit_layer(layer.op, layer_node.inputs[0], weight, shift if needs_bias else None,
                     affine_nodes[-1].outputs[0], layer.attrs, layer_node.name, dtype)
    return log.rewrote(pattern, match.nodes)


def _fold_through_layout(graph: Graph, node: Node, log: PassLog) -> bool:
    """An affine op reading a layer's output through data movement (LeViT's MatMul, Flatten,
    BatchNormalization, Reshape): folded into the layer when each of the layer's output channels
    lands in one channel of the affine (routing.copies runs the data movement on numbered
    elements); the data movement then reads the new layer and writes the affine's output."""
    found = _affine_on(graph, node)
    if found is None:
        return False
    data_index, data = found
    source = routing.view_source(graph, data)
    layer_node = graph.producer(source) if source is not None else None
    if source is None or layer_node is None or layer_node.op not in LINEAR:
        return False
    pattern = f"{layer_node.op}+data movement+{node.op}"
    try:
        layer = linear_of(graph, layer_node)
        view = routing.copies(graph, data)
    except Refused as refused:
        log.refused(node, refused.within(f"cannot fold {node.op} into {layer_node.op} through data movement"), pattern)
        return False
    if layer is None or view is None or view.source is not source:
        return False
    pattern = "+".join([layer_node.op] + [n.op for n in view.nodes] + [node.op])
    inside = {id(n) for n in view.nodes} | {id(node)}
    for tensor in [source] + [t for n in view.nodes for t in n.outputs]:
        if tensor.name in graph.output_names or any(id(r) not in inside for r in tensor.outputs):
            shared = graph.shared(tensor) or Refused("an inner value is also read by other nodes")
            log.refused(node, shared.within(f"cannot fold {node.op} into {layer_node.op} through data movement"),
                        pattern)
            return False
    rank, layer_axis = len(view.in_shape), layer.channel_axis
    if not -rank <= layer_axis < 0:
        return False
    out_shape = view.index.shape
    axis = _channel_axis(graph, node, data_index, out_shape)
    if axis is None:
        return False
    affine = channel_affine(graph, node, out_shape[axis], axis - len(out_shape), len(out_shape))
    if affine is None or affine.data_index != data_index:
        return False
    channels = layer.bias.shape[0]
    layer_channel = np.unravel_index(view.index.ravel(), view.in_shape)[rank + layer_axis]
    affine_channel = np.broadcast_to(np.arange(out_shape[axis]).reshape(
        (-1,) + (1,) * (len(out_shape) - axis - 1)), out_shape).ravel()
    pairs = np.unique(np.stack([layer_channel, affine_channel], axis=1), axis=0)
    if view.in_shape[layer_axis] != channels or len(np.unique(pairs[:, 0])) != len(pairs):
        log.refused(node, Refused(f"the data movement spreads a channel of the {layer_node.op} over several "
                                  f"channels of the {node.op}"), pattern)
        return False
    scale, shift = np.ones(channels), np.zeros(channels)
    scale[pairs[:, 0]], shift[pairs[:, 0]] = affine.scale[pairs[:, 1]], affine.shift[pairs[:, 1]]
    dtype = Graph.layer_dtype(layer_node.inputs[0], layer.dtype)
    weight = scaled_weight(layer, layer.weight, scale, dtype)
    bias = algebra.fold_bias(layer.bias, scale, shift)
    op, attrs = layer.op, layer.attrs
    if op == "MatMul" and np.any(bias) and Graph.rank(layer_node.inputs[0]) == 2:
        op, attrs = "Gemm", {}  # one node with its bias, which conv_into_fc reads as an FC as well
    graph.emit_layer(op, layer_node.inputs[0], weight, bias if op != "MatMul" or np.any(bias) else None, source,
                     attrs, layer_node.name, dtype)
    last = view.nodes[-1]  # the ops in graph order: the last writes ``data``
    graph.add_node(last.op, list(last.inputs), [node.outputs[0]], dict(last.attrs), last.name)
    return log.rewrote(pattern, [layer_node, *view.nodes, node])


def _affine_on(graph: Graph, node: Node) -> tuple[int, Tensor] | None:
    """Which input of an affine op is its data, and that tensor, when data movement produces it."""
    if node.op == "BatchNormalization":
        index = 0
    else:
        computed = [i for i, t in enumerate(node.inputs) if graph.constant(t) is None]
        if len(node.inputs) != 2 or len(computed) != 1:
            return None
        index = computed[0]
    data = node.inputs[index]
    producer = graph.producer(data)
    if producer is None or producer.op not in routing.ROUTING_OPS or producer.op == "Constant":
        return None
    return index, data


def _channel_axis(graph: Graph, node: Node, data_index: int, shape: tuple[int, ...]) -> int | None:
    """The axis of ``shape`` an affine op varies along: BatchNormalization's axis 1; for a
    constant, the one axis it varies along (the last where it does not vary at all)."""
    if node.op == "BatchNormalization":
        return 1 if len(shape) >= 2 else None
    const = graph.value(node.inputs[1 - data_index])
    if const.ndim > len(shape):
        return None
    varying = [len(shape) - const.ndim + i for i, size in enumerate(const.shape) if size > 1]
    return varying[0] if len(varying) == 1 else len(shape) - 1 if not varying else None
