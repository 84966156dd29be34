"""Composes a layer with the linear maps right before it: a conv with the padding/cropping
subgraph and the pointwise conv or inference BN feeding it; a Gemm/MatMul with the BN feeding it;
a reshape with the reshape feeding it; a constant MatMul over the channels of a reshaped tensor
with the 1x1 conv it is.

conv_k(pad_v(conv_1x1(x))) is one conv_k on x with the pads added, exact when every padded value
equals what the 1x1 conv gives on zeros (its bias): DBB's 1x1-then-kxk branch. BN(x) before a conv
or FC folds into its input side (W' = W * s per input channel, b' = b + W t), exact when the conv
reads no zero padding or the shift is zero. A 1x1 conv right after a conv (no nonlinearity between,
one group each) is one conv with the first one's geometry: W' = W_1x1 W, b' = W_1x1 b + b_1x1.
A composition that would cost more multiply-adds than the layers it replaces (a 1x1 bottleneck
before a kxk conv, a 1x1 widening after one) is left alone.
"""
from __future__ import annotations

import numpy as np

from .. import algebra
from ..errors import Refused
from ..graph import Graph, Node, Tensor, attr
from ..linear import before_layer, channel_affine, conv_chain, fc_form
from ..routing import RESHAPES, ROUTING_OPS
from . import PassLog


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for node in graph.nodes():
        if id(node) in done:
            continue
        if node.op in ("Conv", "AveragePool"):
            compose = _compose_conv
        elif node.op == "MatMul" and _left_weight(graph, node.inputs[0]) is not None:
            compose = _channel_matmul
        elif node.op in ("Gemm", "MatMul"):
            compose = _compose_matrix
        elif node.op in RESHAPES:
            compose = _compose_reshapes
        else:
            continue
        done.update(id(n) for n in log.attempt(node, compose, graph, node, log) or [])


def _compose_conv(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    try:
        form, note = conv_chain(graph, node)
    except Refused:
        return []  # not an exact conv: the rules that would fold or merge it say why
    if note:
        log.refused(node, note, f"{node.op} chain")
    if form is None or len(form.nodes) == 1:
        return []
    pattern = "+".join(n.op for n in reversed(form.nodes))
    pads = form.geometry["pads"]
    if min(pads) < 0:
        log.refused(node, Refused(f"composing would need negative pads {list(pads)}"), pattern)
        return []
    before = sum(_macs(graph, n) for n in form.nodes)
    after = _macs(graph, node, form.weight)
    if after > before:
        log.refused(node, Refused("composing would add work", f"{after} multiply-adds per image, {before} now"),
                    pattern)
        return []
    g = form.geometry
    attrs: dict[str, object] = {"kernel_shape": list(g["kernel"]), "strides": list(g["strides"]),
             "dilations": list(g["dilations"]), "pads": list(pads)}
    if node.op == "AveragePool" and all(n.op in ROUTING_OPS for n in form.nodes[1:]):
        # only padding/reshaping was absorbed: it stays a pool (padding counted, as it was)
        attrs["count_include_pad"] = 1
        if not any(d > 1 for d in g["dilations"]):
            del attrs["dilations"]  # an attribute only since opset 19
        graph.add_node("AveragePool", [form.source], [node.outputs[0]], attrs, node.name)
    else:
        graph.emit_layer("Conv", form.source, form.weight, form.bias, node.outputs[0],
                         {**attrs, "group": g["group"]}, node.name, form.dtype)
    return form.nodes if log.rewrote(pattern, form.nodes) else []


def _channel_matmul(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """Reshape(W @ Reshape(y, (N, C, S)), (N, K, *spatial)), W a constant (K, C): a map of the
    channels of y (N, C, *spatial), written as a 1x1 Conv (an einsum 'bchw,kc->bkhw' as
    TorchScript writes it: YOLOE's text embeddings applied to its class features). N may be
    symbolic, and the reshapes may read it off Shape: their static sizes fix it by the element
    count."""
    found, flat = _left_weight(graph, node.inputs[0]), node.inputs[1]
    weight, expand = found if found is not None else (None, [])
    flatten = graph.producer(flat)
    readers = node.outputs[0].outputs
    if weight is None or flatten is None or flatten.op != "Reshape" or len(readers) != 1 or readers[0].op != "Reshape" \
            or graph.shared(flat) is not None or graph.shared(node.outputs[0]) is not None:
        return []
    unflatten, data = readers[0], flatten.inputs[0]
    shape, flat_shape, out_shape = data.shape, flat.shape, unflatten.outputs[0].shape
    if weight.ndim == 3 and weight.shape[0] == 1:
        weight = weight[0]  # one map for every sample
    if weight.ndim != 2 or not shape or not flat_shape or not out_shape or len(shape) < 3 \
            or not all(isinstance(d, int) for d in list(shape[1:]) + list(out_shape[1:])):
        return []
    channels, spatial = shape[1], list(shape[2:])
    # (N, C, S) and (N, K, *spatial) with C, S, K, spatial static: N is the input's by the count
    if len(flat_shape) != 3 or list(flat_shape[1:]) != [channels, int(np.prod(spatial))] \
            or list(out_shape[1:]) != [weight.shape[0]] + spatial or weight.shape[1] != channels:
        return []
    kernel = weight.reshape(weight.shape + (1,) * len(spatial))
    graph.emit_layer("Conv", data, kernel, None, unflatten.outputs[0], {"kernel_shape": [1] * len(spatial)},
                     node.name)
    replaced = [unflatten, node, flatten, *expand]
    pattern = "Reshape+MatMul+Reshape" + ("+Expand" if expand else "")
    return replaced if log.rewrote(pattern, replaced) else []


def _left_weight(graph: Graph, tensor: Tensor) -> tuple[np.ndarray, list[Node]] | None:
    """The constant a MatMul multiplies by from the left, and the Expand that broadcast it along a
    batch axis (which MatMul broadcasting does anyway: YOLOE's embeddings with a dynamic batch)."""
    value = graph.constant(tensor)
    if value is not None:
        return value, []
    expand = graph.producer(tensor)
    if expand is None or expand.op != "Expand" or graph.shared(tensor) is not None:
        return None
    value, shape = graph.constant(expand.inputs[0]), tensor.shape
    if value is None or value.ndim != 3 or value.shape[0] != 1 or shape is None or len(shape) != 3 \
            or list(shape[1:]) != list(value.shape[1:]):
        return None
    return value, [expand]


def _compose_reshapes(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """Reshape(Reshape(x)) is one Reshape of x to the (static) final shape."""
    prior = graph.producer(node.inputs[0])
    shape = Graph.static_shape(node.outputs[0])
    if prior is None or prior.op not in RESHAPES or shape is None or graph.shared(node.inputs[0]):
        return []
    target = graph.add_constant(f"{node.name}_shape", np.array(shape, np.int64))
    graph.add_node("Reshape", [prior.inputs[0], target], [node.outputs[0]], {}, node.name)
    return [node, prior] if log.rewrote(f"{prior.op}+{node.op}", [node, prior]) else []


def _macs(graph: Graph, node: Node, weight: np.ndarray | None = None) -> int:
    """Multiply-adds per image of a conv-like node (with ``weight`` in its place), or one per
    output element for an elementwise node; unknown sizes count as 1."""
    out_shape = node.outputs[0].shape or ()
    elements = int(np.prod([d for d in out_shape[1:] if isinstance(d, int)] or [1]))
    if weight is None:
        if node.op == "Conv":
            weight = graph.value(node.inputs[1])  # a conv of the chain: its weight is constant
        elif node.op == "AveragePool":
            return elements * int(np.prod(attr(node, "kernel_shape", [1])))
        else:
            return elements
    return elements * int(np.prod(weight.shape[1:]))


def _compose_matrix(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """FC(BN(y)) = y @ (W * s).T + (W @ t + b) along the feature axis of the FC's input; through a
    Reshape/Flatten of (N, C, ...) to (N, C * rest) the BN's channel values repeat ``rest`` times
    (a pooled BN before a classifier or RepMLP's global perceptron)."""
    data = node.inputs[0]
    if graph.shared(data) is not None:
        return []
    flatten, prior = None, graph.producer(data)
    channels, axis, rank, repeat = None, -1, Graph.rank(data), 1
    if prior is not None and prior.op in ("Reshape", "Flatten"):
        flatten, unflat = prior, prior.inputs[0]
        before, after = Graph.static_shape(unflat), Graph.static_shape(data)
        if graph.shared(unflat) is not None or not before or not after or len(after) != 2 \
                or len(before) < 2 or before[0] != after[0]:
            return []
        channels, rank, repeat = before[1], len(before), int(np.prod(before[2:]))
        axis, prior = 1 - rank, graph.producer(unflat)
    if prior is None or not before_layer(graph, prior):
        return []
    fc = fc_form(graph, node)  # read only now: the weight may be large
    if fc is None:
        return []
    channels = fc.weight.shape[1] if channels is None else channels
    pattern = f"{prior.op}+{flatten.op + '+' if flatten else ''}{node.op}"
    try:
        affine = channel_affine(graph, prior, channels, axis, rank)
    except Refused as refused:
        log.refused(node, refused.within(f"cannot fold {prior.op} into {node.op}"), pattern)
        return []
    if affine is None:
        return []
    scale, shift = np.repeat(affine.scale, repeat), np.repeat(affine.shift, repeat)
    original = fc.matrix
    matrix = algebra.scale_matrix_weight(original, scale, 1)  # (out, in): scales the inputs
    bias = fc.bias + original @ shift
    if node.op == "MatMul" and np.any(bias):
        log.refused(node, Refused(f"folding {prior.op} into MatMul would need a bias Add (no fewer nodes)"), pattern)
        return []
    source = prior.inputs[affine.data_index]
    if flatten is not None:
        flat = graph.add_variable(f"{flatten.name}_out", data)
        graph.add_node(flatten.op, [source] + list(flatten.inputs[1:]), [flat], dict(flatten.attrs), flatten.name)
        source = flat
    if node.op == "Gemm":
        graph.emit_layer("Gemm", source, matrix, bias, node.outputs[0], {"transB": 1}, node.name, fc.dtype)
    else:
        graph.emit_layer("MatMul", source, matrix.T, None, node.outputs[0], {}, node.name, fc.dtype)
    replaced = [node, prior] + ([flatten] if flatten else [])
    return replaced if log.rewrote(pattern, replaced) else []
