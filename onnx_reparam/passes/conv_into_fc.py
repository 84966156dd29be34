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

from dataclasses import dataclass
from math import gcd

import numpy as np

from .. import algebra
from ..graph import Graph, Node, Tensor
from ..linear import ConvForm, conv_form, fc_form, inference_bn
from ..matcher import Leaf, Tree, combination_nodes, emit_sum, find_trees
from ..routing import RESHAPES
from . import PassLog


MAX_ENTRIES = 1 << 27  # float64 entries of one folded matrix (1 GiB): larger ones are refused


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
    tensor, nodes, norms = leaf.tensor, [], []
    if graph.shared_reason(tensor) is not None:
        return None
    while True:
        node = graph.producer(tensor)
        if node is None or (nodes and graph.shared_reason(tensor) is not None):
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
    in_shape, out_shape = Graph.static_shape(data), Graph.static_shape(out)
    if in_shape is None or out_shape is None or len(in_shape) < 2 or in_shape[0] != out_shape[0]:
        return None
    source = data
    while graph.producer(source) is not None and graph.producer(source).op in RESHAPES:
        source = graph.producer(source).inputs[0]
    is_fc = node.op != "Conv" or all(d == 1 for d in in_shape[2:])
    shape = (int(np.prod(out_shape[1:])), int(np.prod(in_shape[1:])))
    return Branch(leaf, source, in_shape[0], node, norms, nodes + [node], data if is_fc else None, shape)


def matrix_of(graph: Graph, branch: Branch) -> tuple[list[np.ndarray], np.ndarray] | str:
    """The branch's map of one row as block-diagonal blocks (one per group) and a bias, in float64."""
    node = branch.op
    shape = Graph.static_shape(node.inputs[0])
    if node.op == "Conv":
        form = conv_form(graph, node)
        if not isinstance(form, ConvForm):
            return form or "a conv with a computed weight or bias"
        # A kernel that reaches beyond the partition is exact too: its outer taps only ever meet
        # the conv's zero padding, which the conv-as-matrix leaves out.
        geometry, spatial = form.geometry, shape[2:]
        groups, out_channels = geometry["group"], form.weight.shape[0]
        if branch.shape[0] * branch.shape[1] // groups > MAX_ENTRIES:
            return f"its {branch.shape[0]}x{branch.shape[1]} matrix is too large to build"
        per = out_channels // groups
        blocks = [algebra.conv_as_matrix(form.weight[g * per:(g + 1) * per], spatial, geometry["strides"],
                                         geometry["pads"], geometry["dilations"]) for g in range(groups)]
        bias = np.repeat(form.bias, branch.shape[0] // out_channels)
    elif len(shape) != 2:
        return "a fully connected layer over more than one axis"
    else:
        fc = fc_form(graph, node)
        if fc is None:
            return "a fully connected layer with a computed or non-per-feature bias, or a transposed input"
        blocks, bias = [fc.matrix], fc.bias
    for norm in branch.norms:
        affine = inference_bn(graph, norm)
        if isinstance(affine, str):
            return affine
        layout = Graph.static_shape(norm.inputs[0])
        if layout is None or layout[0] != branch.rows:
            return "a BatchNormalization over a layout with other rows"
        repeat = int(np.prod(layout[2:]))  # BN on (rows, S, h, w): its channel value per h*w
        scale, shift = np.repeat(affine[0], repeat), np.repeat(affine[1], repeat)
        starts = np.cumsum([0] + [b.shape[0] for b in blocks])
        blocks = [b * scale[s:s + b.shape[0], None] for b, s in zip(blocks, starts)]
        bias = bias * scale + shift
    return blocks, bias


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for tree in find_trees(graph, done):
        if log.attempt(tree.root, _fold_tree, graph, tree, log):
            done.update(id(n) for n in tree.nodes)


def _fold_tree(graph: Graph, tree: Tree, log: PassLog) -> bool:
    branches = {id(leaf): trace(graph, leaf) for leaf in tree.leaves}
    partners = [b for b in branches.values() if b is not None and b.fc_input is not None]
    if not partners:
        return False
    partner = partners[0]
    output = Graph.static_shape(tree.root.outputs[0])
    members, rest = [], []
    for leaf in tree.leaves:
        branch = branches[id(leaf)]
        reason = None if branch is partner else _mismatch(branch, partner, output)
        if reason is None:
            found = matrix_of(graph, branch)
            reason = found if isinstance(found, str) else None
        if reason is None:
            members.append((branch, *found))
            continue
        rest.append(leaf)
        if branch is not None and branch.fc_input is None:
            log.refused(tree.root, f"conv branch not folded into the fully connected layer: {reason}", "fc")
    if len(members) < 2 or not any(b is partner for b, _, _ in members):
        return False
    groups = 0
    for _, blocks, _ in members:
        groups = gcd(groups, len(blocks))
    partner_blocks = next(blocks for b, blocks, _ in members if b is partner)
    if groups < len(partner_blocks):
        log.refused(tree.root, f"folding would take the fully connected layer from {len(partner_blocks)} groups "
                    f"to {groups}", "fc")
        return False
    weight = [np.zeros(b.shape) for b in partner_blocks]
    bias = np.zeros(partner.shape[0])
    for branch, blocks, branch_bias in members:
        for total, block in zip(weight, algebra.block_diagonal(blocks, groups)):
            if branch.leaf.sign > 0:
                total += block
            else:
                total -= block
        bias += branch.leaf.sign * branch_bias
    removed = len(tree.nodes) + sum(len(b.nodes) for b, _, _ in members)
    if 2 + combination_nodes(1 + len(rest), rest) > removed:
        return False
    _emit(graph, tree, partner, weight, bias, output, rest)
    return log.rewrote("fc(" + "+".join(sorted(b.op.op for b, _, _ in members)) + ")",
                       tree.nodes + [n for b, _, _ in members for n in b.nodes])


def _mismatch(branch: Branch | None, partner: Branch, output: tuple[int, ...] | None) -> str | None:
    """Why a leaf cannot be summed into the partner FC, or None when it can."""
    if branch is None:
        return "not a linear map of rows"
    if output is None:
        return "the sum's shape is unknown"
    if branch.source is not partner.source:
        return f"it reads '{branch.source.name}', the fully connected layer '{partner.source.name}'"
    if branch.rows != partner.rows:
        return f"it sees the data as {branch.rows} rows, the fully connected layer as {partner.rows}"
    if branch.shape != partner.shape:
        return (f"it maps {branch.shape[1]} values to {branch.shape[0]} per row, the fully connected "
                f"layer {partner.shape[1]} to {partner.shape[0]}")
    if Graph.static_shape(branch.leaf.tensor) != output or Graph.static_shape(partner.leaf.tensor) != output:
        return "the branches are laid out differently"
    return None


def _emit(graph: Graph, tree: Tree, partner: Branch, blocks: list[np.ndarray], bias: np.ndarray,
          output_shape: tuple[int, ...], rest: list[Leaf]) -> None:
    name, output = tree.root.name, tree.root.outputs[0]
    dtype = graph.constant(partner.op.inputs[1]).dtype
    exact_shape = not any(graph.constant(leaf.tensor) is not None for leaf in rest)
    target = output if not rest else graph.add_variable(f"{name}_fc", output, exact_shape)
    rows = graph.add_variable(f"{name}_rows", output, same_shape=False)
    if partner.op.op == "Conv":
        spatial = len(Graph.static_shape(partner.fc_input)) - 2
        weight = np.empty((bias.shape[0], blocks[0].shape[1]), partner.fc_input.dtype or dtype)
        start = 0
        for block in blocks:  # cast block by block: no float64 copy of the whole weight
            weight[start:start + block.shape[0]] = block
            start += block.shape[0]
        weight = weight.reshape((bias.shape[0], -1) + (1,) * spatial)
        graph.emit_layer("Conv", partner.fc_input, weight, bias, rows, {"group": len(blocks)}, name, dtype)
    else:
        matrix = algebra.block_diagonal(blocks, 1)[0]
        graph.emit_layer("Gemm", partner.fc_input, matrix, bias, rows, {"transB": 1}, name, dtype)
    shape = graph.add_constant(f"{name}_shape", np.array(output_shape, np.int64))
    graph.add_node("Reshape", [rows, shape], [target], {}, name)
    if rest:
        emit_sum(graph, [Leaf(target, 1.0)] + rest, output, name)
