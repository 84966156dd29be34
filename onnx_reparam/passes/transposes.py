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

from ..graph import Graph, Node, Tensor
from ..model_io import LARGE_TENSOR
from . import PassLog

BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min"})
UNARY = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                   "Softplus", "Neg", "Abs", "Exp", "Sqrt", "Erf"})
MAX_STEPS = 32  # elementwise ops looked through for where a moved Transpose would end


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for node in graph.nodes():
        if id(node) in done or node.op not in BINARY | UNARY:
            continue
        done.update(id(n) for n in log.attempt(node, _sink, graph, node, log) or [])


def _sink(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """Rewrites ``node`` of Transposes (one permutation) and constants as the Transpose of ``node``
    of their inputs; [] when its inputs are not so."""
    if len(node.outputs) != 1 or not node.inputs:
        return []
    transposes, perm, others = [], None, []
    for tensor in node.inputs:
        producer = graph.producer(tensor)
        if graph.constant(tensor) is not None:
            continue
        if producer is None or producer.op != "Transpose" \
                or graph.shared(tensor, len([t for t in node.inputs if t is tensor])) is not None:
            others.append(tensor)
            continue
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
    # an input in the other layout: elementwise ops on a tensor the graph also transposes to the
    # inner layout (NHWC: an identity branch x * s + b beside convs reading Transpose(x))
    chains = {}
    for tensor in others:
        chain = _chain_on_transposed(graph, tensor, inverse)
        if chain is None:
            return []
        chains[tensor.name] = chain
    if len({id(t) for t in transposes}) + len(chains) < 2 and not _leads_to_a_meeting(graph, output, perm):
        return []  # moving it would change nothing but where the Transpose is
    inputs = []
    replaced = [node]
    for tensor in node.inputs:
        value = graph.constant(tensor)
        producer = graph.producer(tensor)
        if tensor.name in chains:
            inputs.append(_rewritten_chain(graph, *chains[tensor.name], inverse))
            replaced += chains[tensor.name][0]
            continue
        if value is None and producer is not None:  # the Transposes found above
            inputs.append(producer.inputs[0])
            continue
        if value is None:
            return []
        if value.ndim > len(perm) or value.nbytes > LARGE_TENSOR and graph.shared(tensor) is not None:
            return []  # a transposed copy of a large constant others read would grow the model
        inputs.append(_transposed_constant(graph, f"{node.name}_{tensor.name}", value, inverse))
    inner = graph.add_variable(f"{node.name}_untransposed", output, same_shape=False)
    inner.shape = [output.shape[axis] for axis in inverse]
    graph.add_node(node.op, inputs, [inner], dict(node.attrs), node.name)
    graph.add_node("Transpose", [inner], [output], {"perm": perm}, node.name)
    replaced += list({id(t): t for t in transposes}.values())
    return replaced if log.rewrote(f"Transpose+{node.op}", replaced) else []


def _transposed_constant(graph: Graph, name: str, value: np.ndarray, inverse: list[int]) -> Tensor:
    full = value.reshape((1,) * (len(inverse) - value.ndim) + value.shape)  # numpy broadcasting's alignment
    return graph.add_constant(f"{name}_transposed", np.transpose(full, inverse))


def _chain_on_transposed(graph: Graph, tensor: Tensor, inverse: list[int]) -> tuple[list[Node], Tensor] | None:
    """(the elementwise ops computing ``tensor`` from one computed tensor x with constants, last
    first; the Transpose of x by ``inverse`` the graph has), when x has one and each op's value
    is read by the next alone; None otherwise."""
    chain: list[Node] = []
    while len(chain) < MAX_STEPS:
        for reader in tensor.outputs:  # the graph's Transpose of this tensor to the inner layout
            order = reader.attrs.get("perm") if reader.op == "Transpose" else None
            if chain and order is not None and list(order) == inverse:
                return chain, reader.outputs[0]
        if graph.shared(tensor) is not None:  # a value the chain computes is read elsewhere too
            return None
        producer = graph.producer(tensor)
        if producer is None or producer.op not in BINARY | UNARY or len(producer.outputs) != 1:
            return None
        values = [graph.constant(t) for t in producer.inputs]
        data = [t for t, value in zip(producer.inputs, values) if value is None]
        constants = [value for value in values if value is not None]
        if len(data) != 1 or any(c.ndim > len(inverse) or c.nbytes > LARGE_TENSOR for c in constants):
            return None
        chain.append(producer)
        tensor = data[0]
    return None


def _rewritten_chain(graph: Graph, chain: list[Node], source: Tensor, inverse: list[int]) -> Tensor:
    """The ops of ``chain`` (last first) written on ``source``, the inner layout's tensor, their
    constants transposed to match; the last one's value."""
    current = source
    for op in reversed(chain):
        inputs = [current if graph.constant(t) is None else
                  _transposed_constant(graph, f"{op.name}_{t.name}", graph.value(t), inverse) for t in op.inputs]
        out = graph.add_variable(f"{op.name}_relaid", source)
        graph.add_node(op.op, inputs, [out], dict(op.attrs), op.name)
        current = out
    return current


def _leads_to_a_meeting(graph: Graph, tensor: Tensor, perm: list[int], depth: int = MAX_STEPS) -> bool:
    """Whether a Transpose by ``perm`` moved below the op writing ``tensor`` would, moving on down
    through elementwise ops, meet another Transpose by ``perm`` (they become one) or one that
    undoes it (both go) on the way to some reader."""
    if depth == 0 or tensor.name in graph.output_names:
        return False
    for reader in tensor.outputs:
        if len(reader.outputs) != 1:
            continue
        if reader.op == "Transpose":
            order = reader.attrs.get("perm")
            if order is not None and [perm[p] for p in order] == list(range(len(perm))):
                return True
            continue
        if reader.op not in BINARY | UNARY:
            continue
        others = [t for t in reader.inputs if t is not tensor and graph.constant(t) is None]
        if others and all(_transposed(graph, t, perm, depth) for t in others):
            return True
        if not others and _leads_to_a_meeting(graph, reader.outputs[0], perm, depth - 1):
            return True
    return False


def _transposed(graph: Graph, tensor: Tensor, perm: list[int], depth: int) -> bool:
    """Whether ``tensor`` is, or will be once Transposes move down, a Transpose by ``perm``."""
    producer = graph.producer(tensor)
    if producer is None or depth == 0:
        return False
    if producer.op == "Transpose":
        return list(producer.attrs.get("perm", [])) == perm
    data = [t for t in producer.inputs if graph.constant(t) is None]
    return producer.op in BINARY | UNARY and graph.shared(tensor) is None and bool(data) and \
        all(_transposed(graph, t, perm, depth - 1) for t in data)
