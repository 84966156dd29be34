"""Nodes read as linear maps, for the passes to combine.

- per-channel affine maps y = x * scale + shift: inference BatchNormalization, and Mul/Add/Sub/Div
  by a constant that varies only along the channel axis;
- convolutions with constant weights: Conv, and AveragePool as a depthwise conv with a 1/k^2 kernel;
- fully connected layers with constant weights: Gemm and MatMul as an (out, in) matrix and a bias;
- conv chains: a conv whose input is a padded/cropped view (routing.py) of the output of a
  pointwise conv or inference BN composes into one conv on that map's input, when what
  the padding writes equals what the pointwise map gives on a zero input (docs/ARCHITECTURE.md,
  "Exactness conditions").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import algebra
from .compare import is_float
from .errors import Refused
from .graph import Graph, Node, Tensor, attr, conv_geometry, optional_input
from .routing import PadView, pad_view


def inference_bn(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of a BatchNormalization in inference mode; raises Refused if it is not one."""
    if attr(node, "training_mode", 0) or len([t for t in node.outputs if t.name]) > 1:
        raise Refused("BatchNormalization in training mode")
    params = [graph.constant(t) for t in node.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        raise Refused("BatchNormalization parameters are not constants")
    gamma, beta, mean, var = (np.asarray(p) for p in params)
    epsilon = attr(node, "epsilon", 1e-5)
    if not np.all(np.asarray(var, np.float64) + epsilon > 0):
        raise Refused("BatchNormalization variance + epsilon is not positive everywhere (its output is NaN or inf)")
    return algebra.bn_affine(gamma, beta, mean, var, epsilon)


@dataclass
class ChannelAffine:
    data_index: int  # which input of the node is the data
    scale: np.ndarray  # float64, per channel
    shift: np.ndarray


def channel_affine(graph: Graph, node: Node, channels: int, axis: int,
                   rank: int | None) -> ChannelAffine | None:
    """The node as y = x * scale + shift along the channel axis ``axis`` (negative, from the end)
    of a ``channels``-channel tensor of rank ``rank``; None if it is not an affine op with one
    constant; raises Refused if it is such an op but not that map."""
    if node.op == "BatchNormalization":
        affine = inference_bn(graph, node)
        if rank is None or 1 - rank != axis:
            raise Refused("BatchNormalization normalizes axis 1, which is not the layer's channel axis")
        if len(affine[0]) != channels:
            raise Refused(f"BatchNormalization has {len(affine[0])} channels, the layer {channels}")
        return ChannelAffine(0, *affine)
    if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return None
    first, second = (graph.constant(t) for t in node.inputs)
    if (first is None) == (second is None):
        return None
    index, const = (0, second) if second is not None else (1, first)
    vector = algebra.per_channel(np.asarray(const), channels, axis, rank)
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op == "Mul":
        return ChannelAffine(index, vector, zeros)
    if node.op == "Add":
        return ChannelAffine(index, ones, vector)
    if node.op == "Sub":
        return ChannelAffine(index, ones, -vector) if index == 0 else ChannelAffine(index, -ones, vector)
    if index == 1:
        return None  # c / x is not affine in x
    if not np.all(vector):
        raise Refused("division by a constant with zeros")
    return ChannelAffine(index, 1.0 / vector, zeros)


@dataclass
class ConvForm:
    """A convolution y = conv(x, weight) + bias with explicit pads (possibly negative: a crop)."""
    source: Tensor
    weight: np.ndarray  # float64 unless it is the stored weight itself
    bias: np.ndarray  # float64, one entry per output channel
    geometry: dict  # see graph.conv_geometry; auto_pad resolved
    dtype: np.dtype  # fused weights are cast back to this
    nodes: list[Node] = field(default_factory=list)  # the nodes it replaces, last one first


def conv_form(graph: Graph, node: Node) -> ConvForm | None:
    """Conv or AveragePool with constant parameters as a conv; None otherwise; raises Refused if
    it is one of them but not an exact conv."""
    if not node.inputs:
        return None
    source = node.inputs[0]
    if graph.constant(source) is not None:
        return None
    if node.op == "Conv" and len(node.inputs) > 1:
        weight = graph.constant(node.inputs[1])
        bias_input = optional_input(node, 2)
        bias = graph.constant(bias_input) if bias_input is not None else np.zeros(())
        if weight is None or bias is None:
            return None
        misfit(node, weight)
        bias = bias_vector(bias, weight.shape[0])
        geometry = conv_geometry(node, weight)
    elif node.op == "AveragePool":
        kernel = tuple(attr(node, "kernel_shape", ()))
        channels = source.shape[1] if source.shape is not None and len(source.shape) == len(kernel) + 2 else None
        if not isinstance(channels, int) or source.dtype is None:
            raise Refused("AveragePool over an input of unknown channel count")
        if attr(node, "ceil_mode", 0):
            raise Refused("AveragePool with ceil_mode=1")
        weight = algebra.average_kernel(channels, kernel)
        bias = np.zeros(channels)
        geometry = {**conv_geometry(node, weight), "group": channels}
    else:
        return None
    geometry = explicit_geometry(geometry, source)
    if node.op == "AveragePool" and any(geometry["pads"]) and not attr(node, "count_include_pad", 0):
        raise Refused("AveragePool excludes padding from its count (count_include_pad=0)")  # auto_pad too
    dtype = np.dtype(source.dtype) if node.op == "AveragePool" else weight.dtype
    return ConvForm(source, weight, bias, geometry, dtype, [node])


def misfit(node: Node, weight: np.ndarray) -> None:
    """Raises Refused when a Conv's or ConvTranspose's group and channels do not fit its weight (a
    model onnxruntime refuses to run)."""
    group, source = attr(node, "group", 1), node.inputs[0]
    channels = source.shape[1] if source.shape is not None and len(source.shape) == weight.ndim else None
    per_group = weight.shape[1] if node.op == "Conv" else weight.shape[0] // max(group, 1)
    if weight.ndim < 3 or group < 1 or weight.shape[0] % group or isinstance(channels, int) and channels != per_group * group:
        raise Refused(f"the {node.op}'s weight {'x'.join(map(str, weight.shape))} in {group} group(s) does not fit "
                      f"its {channels if isinstance(channels, int) else 'unknown'} input channels")


def bias_vector(bias: np.ndarray, channels: int) -> np.ndarray:
    """A stored bias (scalar or per channel) as a float64 vector over the channels."""
    return np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (channels,)).copy()


@dataclass
class FCForm:
    """A fully connected layer y = x @ matrix.T + bias over the last axis of ``source``."""
    source: Tensor
    weight: np.ndarray  # (out, in): a view of the stored weight, as stored
    alpha: float  # Gemm's alpha
    bias: np.ndarray  # (out,), float64, Gemm's beta applied
    dtype: np.dtype  # of the stored weight

    @property
    def matrix(self) -> np.ndarray:
        """(out, in) in float64 with alpha applied: a new array each time (read it once)."""
        return np.multiply(self.weight, self.alpha, dtype=np.float64)


def fc_form(graph: Graph, node: Node) -> FCForm | None:
    """Gemm (transA 0) or MatMul with a constant 2-D weight and a constant per-feature bias."""
    if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight = graph.constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or not is_float(weight.dtype) or graph.constant(node.inputs[0]) is not None:
        return None
    if node.op == "Gemm" and attr(node, "transA", 0):
        return None
    if node.op == "MatMul" or not attr(node, "transB", 0):
        weight = weight.T
    bias_input = optional_input(node, 2) if node.op == "Gemm" else None
    bias = graph.constant(bias_input) if bias_input is not None else np.zeros(())
    if bias is None:
        return None
    try:
        bias = algebra.per_channel(np.asarray(bias), weight.shape[0], -1, 2)
    except Refused:
        return None  # not a layer with a bias: the Gemm broadcasts its C over more than features
    alpha, beta = (float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))) if node.op == "Gemm" else (1.0, 1.0)
    return FCForm(node.inputs[0], weight, alpha, bias * beta, weight.dtype)


def explicit_geometry(geometry: dict, source: Tensor) -> dict:
    """Turns auto_pad into explicit pads, which needs the input's spatial sizes for SAME_* (the
    batch and channel sizes may stay symbolic); raises Refused where they are unknown."""
    auto_pad = geometry["auto_pad"]
    if auto_pad in ("NOTSET", ""):
        return geometry
    spatial = len(geometry["kernel"])
    if auto_pad == "VALID":
        return {**geometry, "pads": (0,) * 2 * spatial, "auto_pad": "NOTSET"}
    shape = source.shape
    if shape is None or len(shape) != spatial + 2:
        raise Refused(f"auto_pad {auto_pad} with an input of unknown size")
    for a in range(spatial):
        if not isinstance(shape[2 + a], int) or shape[2 + a] < 0:
            raise Refused(f"auto_pad {auto_pad} with an input of unknown size", Graph.axis_size(source, 2 + a))
    pairs = [algebra.same_pads(shape[2 + a], geometry["kernel"][a], geometry["strides"][a],
                               geometry["dilations"][a], auto_pad == "SAME_UPPER") for a in range(spatial)]
    return {**geometry, "pads": tuple(p[0] for p in pairs) + tuple(p[1] for p in pairs), "auto_pad": "NOTSET"}


def before_layer(graph: Graph, node: Node) -> bool:
    """Whether ``node`` is an affine map that folds into a layer reading it: an inference
    BatchNormalization, or Mul/Add/Sub/Div by a constant of more than one value (YOLOv7's
    ImplicitA). A scalar constant stays: before a layer it is usually part of a formula onnxruntime
    fuses (GELU's x * 0.5), which folding would break for no node a deploy export saves."""
    if node.op == "BatchNormalization":
        return True
    if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return False
    consts = [graph.constant(t) for t in node.inputs]
    return sum(c is not None for c in consts) == 1 and any(c is not None and c.size > 1 for c in consts)


def pointwise_form(graph: Graph, tensor: Tensor) -> ConvForm | None:
    """The producer of ``tensor`` as a pointwise conv (1x1 Conv with stride 1 and no padding, or an
    affine map ``before_layer`` takes), when ``tensor`` is read by one node only."""
    node = graph.producer(tensor)
    if node is None or graph.shared(tensor) is not None or tensor.shape is None:
        return None
    rank = len(tensor.shape)
    try:
        form = conv_form(graph, node)
        if form is not None:
            return form if _pointwise(form.geometry) and node.op == "Conv" else None
        channels = tensor.shape[1] if rank >= 3 else None
        if not isinstance(channels, int) or not before_layer(graph, node):
            return None
        affine = channel_affine(graph, node, channels, 1 - rank, rank)
    except Refused:
        return None  # not a map to compose with: the rewrite that would take it says why
    if affine is None:
        return None
    spatial = rank - 2
    weight = algebra.diagonal_kernel(affine.scale, channels, spatial)
    geometry = {"kernel": (1,) * spatial, "strides": (1,) * spatial, "dilations": (1,) * spatial,
                "pads": (0,) * 2 * spatial, "group": channels, "auto_pad": "NOTSET"}
    dtype = np.dtype(tensor.dtype)
    return ConvForm(node.inputs[affine.data_index], weight, affine.shift, geometry, dtype, [node])


def _pointwise(geometry: dict) -> bool:
    """A 1x..x1 kernel with stride 1 and no padding: a map of channels at each position."""
    return all(k == 1 for k in geometry["kernel"]) and all(s == 1 for s in geometry["strides"]) \
        and not any(geometry["pads"])


def conv_chain(graph: Graph, node: Node) -> tuple[ConvForm | None, Refused | None]:
    """``node`` as a conv on the furthest tensor it can be traced back to (through a pad/crop view
    and one pointwise map before it, or, for a 1x1 ``node``, the conv before it), and, when it
    stops short, why; raises Refused when ``node`` is a conv op but not an exact conv."""
    outer = conv_form(graph, node)
    if outer is None:
        return None, None
    try:
        view = pad_view(graph, outer.source) if graph.shared(outer.source) is None else None
    except Refused as refused:  # not a view: said only where fixing the sizes would make it one
        return outer, refused if refused.size_dependent else None
    data = view.source if view is not None else outer.source
    inner = pointwise_form(graph, data)
    note = None
    if inner is not None:
        try:
            return _compose(outer, view, inner), None
        except Refused as refused:
            note = refused
    if view is not None:
        try:
            return _through_view(outer, view, np.zeros(outer.weight.shape[1] * outer.geometry["group"])), note
        except Refused as refused:
            note = note or refused
    elif inner is None:
        return _after_conv(graph, outer) or outer, note
    return outer, note


def _after_conv(graph: Graph, outer: ConvForm) -> ConvForm | None:
    """A 1x1 conv (one group) right after a conv (one group, read by nothing else) as one conv
    with the first one's geometry: a linear map of channels composes with any conv exactly."""
    if outer.geometry["group"] != 1 or not _pointwise(outer.geometry):
        return None
    producer = graph.producer(outer.source)
    if producer is None or producer.op != "Conv" or graph.shared(outer.source) is not None:
        return None
    try:
        inner = conv_form(graph, producer)
    except Refused:
        return None  # the conv before is refused where it is looked at itself
    if inner is None or inner.geometry["group"] != 1:
        return None
    weight = algebra.pointwise_after(outer.weight, inner.weight)
    bias = outer.bias + algebra.input_shift_bias(outer.weight, 1, inner.bias)
    return ConvForm(inner.source, weight, bias, inner.geometry, outer.dtype, outer.nodes + inner.nodes)


def _through_view(outer: ConvForm, view: PadView, ring_value: np.ndarray) -> ConvForm:
    """The conv reading the view's source, its pads grown by the view's padding (shrunk by its
    cropping), when the view pads with ``ring_value`` and the conv's own zero padding does not
    land inside the source."""
    spatial = len(outer.geometry["kernel"])
    pads = list(outer.geometry["pads"])
    for axis, (begin, end) in enumerate(zip(view.begins, view.ends)):
        for side, amount in ((axis, begin), (axis + spatial, end)):
            if amount < 0 and pads[side] > 0:
                raise Refused("the conv pads a cropped input with zeros")
            pads[side] += amount
    if view.border is not None and (len(view.border) != len(ring_value)
                                    or not _close(view.border, ring_value, outer.dtype)):
        raise Refused("the input is padded with values other than what the layer before gives on zeros")
    return ConvForm(view.source, outer.weight, outer.bias, {**outer.geometry, "pads": tuple(pads)},
                    outer.dtype, outer.nodes + view.nodes)


def _compose(outer: ConvForm, view: PadView | None, inner: ConvForm) -> ConvForm:
    """outer(view(inner(x))) as one conv on x; raises Refused where every value the outer conv
    reads from padding does not equal what ``inner`` gives on zero input, its bias."""
    if any(outer.geometry["pads"]) and np.any(inner.bias):
        raise Refused("the conv pads with zeros a tensor whose layer has a non-zero bias")
    if view is not None:
        outer = _through_view(outer, view, inner.bias)
    composed = algebra.compose_pointwise(outer.weight, outer.geometry["group"], inner.weight,
                                         inner.geometry["group"])
    if composed is None:
        raise Refused(f"groups {inner.geometry['group']} then {outer.geometry['group']} do not compose "
                      "into one grouped conv")
    weight, groups = composed
    bias = outer.bias + algebra.input_shift_bias(outer.weight, outer.geometry["group"], inner.bias)
    geometry = {**outer.geometry, "group": groups}
    return ConvForm(inner.source, weight, bias, geometry, outer.dtype, outer.nodes + inner.nodes)


def _close(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> bool:
    """Equal up to the rounding of values computed in ``dtype`` (the exporter computed one side in
    it, this library the other in float64)."""
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else 0.0
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
    return bool(np.all(np.abs(np.asarray(a, np.float64) - b) <= 16 * eps * scale))
