"""Moves a Transpose below the elementwise ops that read it, so that a layout change and the one
that undoes it meet (and drop_noops removes both) and the ops between them run in the conv's
layout: op(Transpose_p(a), Transpose_p(b), c) = Transpose_p(op(a, b, c')), c' the constant c
broadcast to the full rank and transposed by p's inverse.

tf2onnx with its optimizers off (and any NHWC graph) puts every conv between a Transpose to NCHW
and one back, and adds the bias, the BN's scale and shift and the branches in NHWC; once the
Transposes have moved down through those Adds, Muls and ReLUs, the graph is the NCHW one the other
passes fold. Only a Transpose read by nothing else moves (else it would stay and be joined by a
new one); an op whose output is a graph output still writes that name.
"""
from __future__ import annotations

import numpy as np

from ..graph import Graph, Node
from ..matcher import DEFAULT_DOMAINS
from . import PassLog

BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min"})
UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                   "Softplus", "Neg", "Abs", "Exp", "Sqrt", "Erf"})


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for node in graph.nodes():
        if id(node) in done or node.domain not in DEFAULT_DOMAINS or node.op not in BINARY | UNARY:
            continue
        done.update(id(n) for n in log.attempt(node, _sink, graph, node, log) or [])


def _sink(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """Rewrites ``node`` of Transposes (one permutation) and constants as the Transpose of ``node``
    of their inputs; [] when its inputs are not so."""
    if len(node.outputs) != 1 or not node.inputs:
        return []
    transposes, perm = [], None
    for tensor in node.inputs:
        producer = graph.producer(tensor)
        if graph.constant(tensor) is not None:
            continue
        if producer is None or producer.op != "Transpose" or producer.domain not in DEFAULT_DOMAINS \
                or graph.shared_reason(tensor, len([t for t in node.inputs if t is tensor])) is not None:
            return []
        order = producer.attrs.get("perm")
        rank = len(tensor.shape) if tensor.shape is not None else None
        if order is None or rank != len(order) or perm is not None and list(order) != perm:
            return []
        perm = list(order)
        transposes.append(producer)
    output = node.outputs[0]
    if perm is None or output.shape is None or len(output.shape) != len(perm):
        return []
    inverse = list(np.argsort(perm))
    inputs = []
    for tensor in node.inputs:
        value = graph.constant(tensor)
        if value is None:
            inputs.append(graph.producer(tensor).inputs[0])
            continue
        if value.ndim > len(perm):
            return []
        full = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)  # numpy broadcasting's alignment
        inputs.append(graph.add_constant(f"{node.name}_{tensor.name}_transposed", np.transpose(full, inverse)))
    inner = graph.add_variable(f"{node.name}_untransposed", output, same_shape=False)
    inner.shape = [output.shape[axis] for axis in inverse]
    graph.add_node(node.op, inputs, [inner], dict(node.attrs), node.name)
    graph.add_node("Transpose", [inner], [output], {"perm": perm}, node.name)
    replaced = [node] + list({id(t): t for t in transposes}.values())
    return replaced if log.rewrote(f"Transpose+{node.op}", replaced) else []
