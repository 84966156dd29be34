"""Pattern matching over the graph: fixed-shape chains declared as data, and Add/Sum/Sub trees.

A chain is a tuple of op-type sets, one per node, each node reading the previous node's first
output. The tree collector gathers the leaves of nested Add/Sum/Sub nodes with their signs; passes
group the leaves by the tensor they are linear functions of.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .errors import Refused
from .graph import Graph, Node, Tensor


@dataclass(frozen=True)
class Chain:
    """Nodes n0 -> n1 -> ..., where n_{i+1} reads n_i's first output (at any input)."""
    name: str
    steps: tuple[frozenset[str], ...]


@dataclass
class ChainMatch:
    nodes: list[Node]
    input_index: list[int]  # for each node after the first, which input reads the previous node
    blocked: Refused | None  # why an inner value cannot be removed (graph output, other readers)


def _is(node: Node, ops: frozenset[str]) -> bool:
    return node.op in ops


def find_chains(graph: Graph, chain: Chain, skip: set[int]) -> Iterator[ChainMatch]:
    """Yields every occurrence of ``chain`` whose nodes are not in ``skip`` (ids of nodes already
    rewritten in this sweep). A match whose inner values are shared comes with ``blocked`` set."""
    for first in graph.nodes():
        if id(first) in skip or not _is(first, chain.steps[0]):
            continue
        nodes, indices, blocked = [first], [], None
        for step in chain.steps[1:]:
            value = nodes[-1].outputs[0]
            readers = [n for n in value.outputs if _is(n, step) and id(n) not in skip]
            if not readers:
                break
            blocked = blocked or graph.shared(value)
            nodes.append(readers[0])
            indices.append(next(i for i, t in enumerate(readers[0].inputs) if t is value))
        else:
            yield ChainMatch(nodes, indices, blocked)


TREE_OPS = frozenset({"Add", "Sum", "Sub"})


@dataclass
class Leaf:
    tensor: Tensor
    sign: float


@dataclass
class Tree:
    root: Node
    nodes: list[Node]
    leaves: list[Leaf]


def _inner_tree_node(graph: Graph, tensor: Tensor) -> Node | None:
    node = graph.producer(tensor)
    if node is not None and _is(node, TREE_OPS) and graph.shared(tensor) is None:
        return node
    return None


def find_trees(graph: Graph, skip: set[int]) -> Iterator[Tree]:
    """Yields each maximal Add/Sum/Sub tree: inner nodes feed only their parent and are not graph
    outputs; the root's output may go anywhere."""
    for root in graph.nodes():
        if id(root) in skip or not _is(root, TREE_OPS):
            continue
        out = root.outputs[0]
        if len(out.outputs) == 1 and out.name not in graph.output_names and _is(out.outputs[0], TREE_OPS):
            continue  # an inner node: its root collects it
        nodes: list[Node] = []
        leaves: list[Leaf] = []
        _collect(graph, root, 1.0, nodes, leaves)
        yield Tree(root, nodes, leaves)


def _collect(graph: Graph, node: Node, sign: float, nodes: list[Node], leaves: list[Leaf]) -> None:
    nodes.append(node)
    for i, tensor in enumerate(node.inputs):
        child_sign = -sign if node.op == "Sub" and i == 1 else sign
        child = _inner_tree_node(graph, tensor)
        if child is not None:
            _collect(graph, child, child_sign, nodes, leaves)
        else:
            leaves.append(Leaf(tensor, child_sign))


def partial_sum(graph: Graph, name: str, leaves: list[Leaf], output: Tensor) -> Tensor:
    """A tensor for the sum of ``leaves`` alone, part of the sum written to ``output``: of the
    output's type, and of the shape the leaves share where each has that static shape (other
    addends, computed or constant, may broadcast the whole sum beyond it), else of unknown shape."""
    shapes = {tuple(leaf.tensor.shape) if leaf.tensor.shape is not None else None for leaf in leaves}
    tensor = graph.add_variable(name, output, same_shape=False)
    shape = shapes.pop() if len(shapes) == 1 else None
    if shape is not None:
        tensor.shape = list(shape)
    return tensor


def combination_nodes(addends: int, rest: list[Leaf]) -> int:
    """Nodes emit_sum writes for ``addends`` tensors of which ``rest`` carry their signs (the
    others are positive)."""
    if addends == 1:
        return 0
    negatives = sum(1 for leaf in rest if leaf.sign < 0)
    positives = addends - negatives
    return 1 + (negatives > 0) * ((positives > 1) + (negatives > 1))


def emit_sum(graph: Graph, addends: list[Leaf], output: Tensor, name: str) -> None:
    """Writes the signed sum of the addends into ``output``: Add/Sum of the positive ones, minus
    the sum of the negative ones."""
    positives = [leaf.tensor for leaf in addends if leaf.sign > 0]
    negatives = [leaf.tensor for leaf in addends if leaf.sign < 0]
    if not negatives:
        _sum(graph, positives, output, name)
        return
    minuend = _sum(graph, positives, None, name, like=output)
    subtrahend = _sum(graph, negatives, None, name, like=output)
    graph.add_node("Sub", [minuend, subtrahend], [output], {}, name)


def _sum(graph: Graph, tensors: list[Tensor], output: Tensor | None, name: str,
         like: Tensor | None = None) -> Tensor:
    if output is None:
        if len(tensors) == 1:
            return tensors[0]
        output = graph.add_variable(f"{name}_sum", like, same_shape=False)
    graph.add_node("Add" if len(tensors) == 2 else "Sum", tensors, [output], {}, name)
    return output
