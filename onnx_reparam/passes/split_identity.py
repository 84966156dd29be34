"""Keeps the identity apart (``--keep-identity``): a conv whose largest weights are the centre taps
of each channel's own input (what an identity or BN branch merged into it adds) becomes that conv
without them plus a per-channel Mul of its input, so an INT8 grid is set by the conv's other weights.

conv(x; W) + b = conv(x; W - D e) + b + D * x, e the centre tap of channel c's own input channel:
exact whenever output position p reads input position p at the centre tap (stride 1, odd kernels,
pads of (k - 1) * d / 2 on both sides of each axis) and channel c's group reads input channel c
(as many input channels as output channels). D_c is the part of that tap beyond the largest other
|w| of row c. The conv is split only where its largest |w| falls by at least GAIN (one bit of the
grid or more); the Mul stays in float under weight-only quantization.
"""
from __future__ import annotations

import numpy as np

from ..errors import Refused
from ..graph import Graph, Node
from ..linear import conv_form
from . import PassLog

GAIN = 2.0
PATTERN = "identity kept apart"


def run(graph: Graph, log: PassLog) -> None:
    for node in graph.nodes():
        if node.op == "Conv":
            log.attempt(node, _split, graph, node, log)


def without_identity(weight: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(W - D e, D) in float64: D, per output channel, how far its own input channel's centre tap
    exceeds the row's other weights; None where no output channel has its own input channel or
    the kernel has no centre."""
    channels, per_group = weight.shape[0], weight.shape[1]
    if per_group * groups != channels or any(k % 2 == 0 for k in weight.shape[2:]):
        return None
    rows = np.arange(channels)
    own = (rows,) + (rows % per_group,) + tuple(np.full(channels, k // 2) for k in weight.shape[2:])
    rest = np.asarray(weight, np.float64).copy()
    centre = rest[own]
    others = np.abs(rest)
    others[own] = 0
    largest_other = others.reshape(channels, -1).max(axis=1)
    part = centre - np.clip(centre, -largest_other, largest_other)
    rest[own] -= part
    return rest, part


def _split(graph: Graph, node: Node, log: PassLog) -> bool:
    form = conv_form(graph, node)
    if form is None:
        return False
    geometry = form.geometry
    split = without_identity(form.weight, geometry["group"])
    if split is None or not np.any(split[1]):
        return False
    weight, part = split
    if np.abs(form.weight).max() < GAIN * np.abs(weight).max():
        return False
    spatial = len(geometry["kernel"])
    centred = tuple((k - 1) * d // 2 for k, d in zip(geometry["kernel"], geometry["dilations"]))
    if any(s != 1 for s in geometry["strides"]) or tuple(geometry["pads"]) != centred * 2:
        log.refused(node, Refused("the centre tap does not read the output's own position (stride or pads)",
                                  f"strides {list(geometry['strides'])}, pads {list(geometry['pads'])}"), PATTERN)
        return False
    dtype = Graph.layer_dtype(form.source, form.dtype)
    output = node.outputs[0]
    conv_out = graph.add_variable(f"{node.name}_conv", output)
    attrs = {"kernel_shape": list(geometry["kernel"]), "strides": list(geometry["strides"]),
             "dilations": list(geometry["dilations"]), "pads": list(geometry["pads"]), "group": geometry["group"]}
    graph.emit_layer("Conv", form.source, weight.astype(dtype), form.bias, conv_out, attrs, node.name, dtype)
    identity = graph.add_variable(f"{node.name}_identity", output)
    scale = graph.add_constant(f"{node.name}_identity_scale", part.reshape((-1,) + (1,) * spatial).astype(dtype))
    graph.add_node("Mul", [form.source, scale], [identity], {}, f"{node.name}_identity")
    graph.add_node("Add", [conv_out, identity], [output], {}, f"{node.name}_sum")
    return log.rewrote(PATTERN, [node])
