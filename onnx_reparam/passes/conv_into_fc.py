"""Folds convolutions summed with a fully connected layer over the same rows of data into that
layer (RepMLP's local perceptron into its partition perceptron).

A leaf of an Add/Sum/Sub tree is read back through Reshape/Flatten/Squeeze/Unsqueeze (which keep
memory order) and BatchNormalization to one linear op (Conv, Gemm, MatMul), and from its input
through reshapes to a source tensor. If the op's input is (R, ...) and the leaf holds R rows of F
values, each output row is a linear map of the matching row of the source: a conv's matrix is the
conv of the identity basis (per group, block-diagonal), a BN scales the features of its channel
(repeated over the spatial positions of its layout). Leaves with the same source, the same rows and
the same shape add up to one matrix, written as the FC partner leaf's op (a grouped 1x1 Conv on
(R, F, 1, 1), a Gemm or a MatMul) followed by one Reshape to the sum's shape.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import gcd

import numpy as np

from .. import algebra
from ..errors import Refused
from ..graph import Graph, Node, Tensor
from ..linear import conv_form, fc_form, inference_bn
from ..matcher import Leaf, Tree, combination_nodes, emit_sum, find_trees, partial_sum
from ..routing import RESHAPES
from . import PassLog

MAX_ENTRIES = 1 << 27  # float64 entries of one folded matrix (1 GiB): larger ones are refused


def row_shape(tensor: Tensor) -> tuple | None:
    """The tensor's shape, its first axis (the rows) possibly a named symbolic size: each row is
    mapped alike, so the fold holds whatever that size is; tensors whose first axis has the same
    name have the same rows. None when any other size is unknown."""
    shape = tensor.shape
    if not shape or not all(isinstance(d, int) for d in shape[1:]) or not isinstance(shape[0], (int, str)) \
            or shape[0] == "":
        return None
    return tuple(shape)


@dataclass
class Branch:
    """A leaf traced to its linear op: leaf row r = op's map of source row r (then the BNs)."""
    leaf: Leaf
    source: Tensor  # the op's input before any reshape
    rows: int
    op: Node
    norms: list[Node]  # BNs between the op and the leaf, nearest the op first
    nodes: list[Node]  # the nodes from the leaf back to the op
    fc_input: Tensor | None  # the op's input when it is a fully connected layer (a partner)
    shape: tuple[int, int]  # (output, input) values per row


def trace(graph: Graph, leaf: Leaf) -> Branch | None:
    """The leaf back through reshapes and BNs to a Conv/Gemm/MatMul with a constant weight."""
    tensor = leaf.tensor
    nodes: list[Node] = []
    norms: list[Node] = []
    if graph.shared(tensor) is not None:
        return None
    while True:
        node = graph.producer(tensor)
        if node is None or (nodes and graph.shared(tensor) is not None):
            return None
        if node.op not in RESHAPES and node.op != "BatchNormalization":
            break
        nodes.append(node)
        if node.op == "BatchNormalization":
            norms.insert(0, node)
        tensor = node.inputs[0]
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or graph.constant(node.inputs[1]) is None:
        return None
    data, out = node.inputs[0], node.outputs[0]
    in_shape, out_shape = row_shape(data), row_shape(out)
    if in_shape is None or out_shape is None or len(in_shape) < 2 or in_shape[0] != out_shape[0]:
        return None
    source = data
    while (producer := graph.producer(source)) is not None and producer.op in RESHAPES:
        source = producer.inputs[0]
    is_fc = node.op != "Conv" or all(d == 1 for d in in_shape[2:])
    shape = (int(np.prod(out_shape[1:])), int(np.prod(in_shape[1:])))
    return Branch(leaf, source, in_shape[0], node, norms, nodes + [node], data if is_fc else None, shape)


@dataclass
class RowMap:
    """A branch's map of one row, built only once the fold is decided: ``groups`` block-diagonal
    blocks with each row scaled (its BNs), and a bias, in float64."""
    groups: int
    build: Callable[[int, np.ndarray, np.ndarray | None], np.ndarray]  # (group, row scale, add into)
    row_scale: np.ndarray
    bias: np.ndarray


def row_map(graph: Graph, branch: Branch) -> RowMap:
    """The branch's map of one row; raises Refused where it has none."""
    node = branch.op
    shape = row_shape(node.inputs[0])
    if shape is None:
        raise Refused("its input's shape is unknown")
    if node.op == "Conv":
        form = conv_form(graph, node)
        if form is None:
            raise Refused("a conv with a computed weight or bias")
        # A kernel that reaches beyond the partition is exact too: its outer taps only ever meet
        # the conv's zero padding, which the conv-as-matrix leaves out.
        geometry, spatial, weight = form.geometry, shape[2:], form.weight
        groups, out_channels = geometry["group"], weight.shape[0]
        if branch.shape[0] * branch.shape[1] // groups > MAX_ENTRIES:
            raise Refused(f"its {branch.shape[0]}x{branch.shape[1]} matrix is too large to build")
        per = out_channels // groups

        def build(g: int, scale: np.ndarray, out: np.ndarray | None) -> np.ndarray:
            return algebra.conv_as_matrix(weight[g * per:(g + 1) * per], spatial, geometry["strides"],
                                          geometry["pads"], geometry["dilations"], scale, out)
        bias = np.repeat(form.bias, branch.shape[0] // out_channels)
    elif len(shape) != 2:
        raise Refused("a fully connected layer over more than one axis")
    else:
        fc = fc_form(graph, node)
        if fc is None:
            raise Refused("a fully connected layer with a computed or non-per-feature bias, or a transposed input")
        groups, bias = 1, fc.bias

        def build(g: int, scale: np.ndarray, out: np.ndarray | None) -> np.ndarray:
            return algebra.scaled_rows(fc.weight, fc.alpha * scale, out)
    row_scale = np.ones(branch.shape[0])
    for norm in branch.norms:
        affine = inference_bn(graph, norm)
        layout = row_shape(norm.inputs[0])
        if layout is None or layout[0] != branch.rows:
            raise Refused("a BatchNormalization over a layout with other rows")
        repeat = int(np.prod(layout[2:]))  # BN on (rows, S, h, w): its channel value per h*w
        scale, shift = np.repeat(affine[0], repeat), np.repeat(affine[1], repeat)
        row_scale, bias = row_scale * scale, bias * scale + shift
    return RowMap(groups, build, row_scale, bias)


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for tree in find_trees(graph, done):
        if log.attempt(tree.root, _fold_tree, graph, tree, log):
            done.update(id(n) for n in tree.nodes)


def _fold_tree(graph: Graph, tree: Tree, log: PassLog) -> bool:
    branches = {id(leaf): trace(graph, leaf) for leaf in tree.leaves}
    partners = [b for b in branches.values() if b is not None and b.fc_input is not None]
    fc_input = partners[0].fc_input if partners else None
    if fc_input is None:
        return False
    partner = partners[0]
    output = row_shape(tree.root.outputs[0])
    members: list[tuple[Branch, RowMap]] = []
    rest: list[Leaf] = []
    for leaf in tree.leaves:
        branch = branches[id(leaf)]
        try:
            member = partner if branch is partner else _member(branch, partner, output)
            members.append((member, row_map(graph, member)))
            continue
        except Refused as refused:
            rest.append(leaf)
            if branch is not None and branch.fc_input is None:
                log.refused(tree.root, refused.within("conv branch not folded into the fully connected layer"), "fc")
    if output is None or len(members) < 2 or not any(b is partner for b, _ in members):
        return False
    groups = 0
    for _, found in members:
        groups = gcd(groups, found.groups)
    partner_groups = next(found.groups for b, found in members if b is partner)
    if groups < partner_groups:
        log.refused(tree.root, Refused(f"folding would take the fully connected layer from {partner_groups} groups "
                                       f"to {groups}"), "fc")
        return False
    removed = len(tree.nodes) + sum(len(b.nodes) for b, _ in members)
    if 2 + combination_nodes(1 + len(rest), rest) > removed:
        return False
    # One block of the result at a time, in a reused float64 scratch: the partner's rows first,
    # then every other branch's added in place; each block is rounded once into the weight.
    members.sort(key=lambda member: member[0] is not partner)
    dtype = graph.layer_dtype(fc_input, graph.value(partner.op.inputs[1]).dtype)
    out_rows, in_cols = partner.shape
    weight = np.empty((out_rows, in_cols // groups), dtype)
    block = np.empty((out_rows // groups, in_cols // groups))
    for j in range(groups):
        block.fill(0.0)
        for branch, found in members:
            per = found.groups // groups  # its consecutive blocks on the diagonal of one of ours
            rows, cols = out_rows // found.groups, in_cols // found.groups
            scale = branch.leaf.sign * found.row_scale
            for at, g in enumerate(range(j * per, (j + 1) * per)):
                found.build(g, scale[g * rows:(g + 1) * rows],
                            block[at * rows:(at + 1) * rows, at * cols:(at + 1) * cols])
        weight[j * block.shape[0]:(j + 1) * block.shape[0]] = block
    del block
    bias = np.sum([branch.leaf.sign * found.bias for branch, found in members], axis=0)
    _emit(graph, tree, partner.op.op, fc_input, weight, groups, bias, output, [b.leaf for b, _ in members], rest)
    return log.rewrote("fc(" + "+".join(sorted(b.op.op for b, _ in members)) + ")",
                       tree.nodes + [n for b, _ in members for n in b.nodes])


def _member(branch: Branch | None, partner: Branch, output: tuple[int, ...] | None) -> Branch:
    """The leaf's branch, to be summed into the partner FC; raises Refused where it cannot be."""
    if branch is None:
        raise Refused("not a linear map of rows")
    if output is None:
        raise Refused("the sum's shape is unknown")
    if branch.source is not partner.source:
        raise Refused("it reads another tensor than the fully connected layer",
                      f"'{branch.source.name}', the fully connected layer '{partner.source.name}'")
    if branch.rows != partner.rows:
        raise Refused(f"it sees the data as {branch.rows} rows, the fully connected layer as {partner.rows}")
    if branch.shape != partner.shape:
        raise Refused(f"it maps {branch.shape[1]} values to {branch.shape[0]} per row, the fully connected "
                      f"layer {partner.shape[1]} to {partner.shape[0]}")
    if row_shape(branch.leaf.tensor) != output or row_shape(partner.leaf.tensor) != output:
        raise Refused("the branches are laid out differently")
    return branch


def _emit(graph: Graph, tree: Tree, op: str, fc_input: Tensor, weight: np.ndarray, groups: int, bias: np.ndarray,
          output_shape: tuple[int, ...], folded: list[Leaf], rest: list[Leaf]) -> None:
    """Writes the summed map as the partner's kind of op (``op`` of ``fc_input``): a grouped 1x1
    Conv (``weight`` is (out, in per group)) or a Gemm, then one Reshape to the sum's shape (and
    the leaves left)."""
    name, output = tree.root.name, tree.root.outputs[0]
    target = output if not rest else partial_sum(graph, f"{name}_fc", folded, output)
    rows = graph.add_variable(f"{name}_rows", output, same_shape=False)
    if op == "Conv":
        spatial = len(fc_input.shape) - 2
        weight = weight.reshape(weight.shape + (1,) * spatial)
        graph.emit_layer("Conv", fc_input, weight, bias, rows, {"group": groups}, name)
    else:
        graph.emit_layer("Gemm", fc_input, weight, bias, rows, {"transB": 1}, name)
    shape = graph.add_constant(f"{name}_shape", np.array([d if isinstance(d, int) else -1 for d in output_shape],
                                                         np.int64))
    graph.add_node("Reshape", [rows, shape], [target], {}, name)
    if rest:
        emit_sum(graph, [Leaf(target, 1.0)] + rest, output, name)
