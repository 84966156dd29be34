"""Merges parallel linear branches of one tensor, summed by Add/Sum/Sub, into one Conv or Gemm.

Each leaf of the sum is a linear function of some tensor X: Conv(X) is its kernel (seen through
padding/cropping and a pointwise layer before it, linear.conv_chain), AveragePool a 1/k^2 depthwise
kernel, BN(X) or a per-channel Mul(X, c) a diagonal kernel, X itself the identity kernel, a constant
a bias. Leaves of the same X are embedded in one kernel size (offset (PB - pb) / dilation on each
axis; a crop is a negative pad), regrouped to the gcd of their group counts and added, with their
signs. Gemm/MatMul leaves (features on the last axis) add up to one weight matrix the same way.
Leaves of other tensors stay in the sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd

import numpy as np

from .. import algebra
from ..errors import Refused
from ..graph import Graph, Node, Tensor
from ..linear import conv_chain, fc_form, inference_bn
from ..matcher import Leaf, Tree, combination_nodes, emit_sum, find_trees, partial_sum
from ..routing import ROUTING_OPS, pad_view, view_source
from . import PassLog


@dataclass
class Term:
    """A leaf as a linear function of ``source``: a conv kernel or a diagonal scale, plus a bias."""
    leaf: Leaf
    source: Tensor
    bias: np.ndarray | float
    dtype: np.dtype | None
    # conv weight, or (out, in) matrix of a Gemm/MatMul; empty for a diagonal term
    kernel: np.ndarray = field(default_factory=lambda: np.zeros(0))
    geometry: dict = field(default_factory=dict)  # conv attributes (explicit pads); empty for a matrix
    scale: np.ndarray | float = 1.0  # diagonal scale (1.0: the identity); unused for convs
    scale_const: np.ndarray | None = None  # Mul's constant, checked once the rank is known
    nodes: list[Node] = field(default_factory=list)  # what computes the leaf from ``source``

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel.size) and bool(self.geometry)

    @property
    def is_matrix(self) -> bool:
        return bool(self.kernel.size) and not self.geometry


@dataclass
class Merged:
    """One group's terms as one layer: Conv (attrs set) or fully connected (weight (out, in))."""
    group: Group
    weight: np.ndarray
    bias: np.ndarray
    attrs: dict | None

    @property
    def node_count(self) -> int:
        matmul_with_bias = self.attrs is None and Graph.rank(self.group.source) != 2 and np.any(self.bias)
        return 2 if matmul_with_bias else 1


@dataclass
class Group:
    source: Tensor
    terms: list[Term] = field(default_factory=list)


def interpret(graph: Graph, leaf: Leaf) -> tuple[Term | None, tuple[str, Refused] | None]:
    """The leaf as a term; a constant leaf gives (None, None). A leaf that cannot be taken apart
    (its output also read elsewhere, a conv that is not exact as a merged branch) is the identity
    of its output, with the tensor it is a branch of and the reason."""
    tensor = leaf.tensor
    if graph.constant(tensor) is not None:
        return None, None
    node = graph.producer(tensor)
    opaque = Term(leaf, tensor, 0.0, None)
    if node is None:
        return opaque, None
    try:
        term = _branch_term(graph, leaf, node)
    except Refused as refused:
        return opaque, (node.inputs[0].name, refused.within(f"{node.op} branch kept apart"))
    if term is None:
        return opaque, None
    shared = graph.shared(tensor)
    if shared is not None:
        return opaque, (term.source.name, shared.within(f"{node.op} branch kept apart"))
    return term, _view_note(graph, node, term.source)


def _view_note(graph: Graph, node: Node, source: Tensor) -> tuple[str, Refused] | None:
    """When a branch reads ``source`` through data-movement ops that are not a pad/crop it can
    see through, the tensor those ops read and why."""
    producer = graph.producer(source)
    if producer is None or producer.op not in ROUTING_OPS:
        return None
    origin = view_source(graph, source)
    if origin is None:
        return None
    try:
        pad_view(graph, source)
    except Refused as refused:
        return origin.name, refused.within(f"{node.op} branch reads a {producer.op} of its input, kept apart",
                                           f"'{source.name}', {producer.op} of '{origin.name}'")
    return None


def _branch_term(graph: Graph, leaf: Leaf, node: Node) -> Term | None:
    """The leaf computed by ``node`` as a term, None if it is not a linear map; raises Refused if
    it is one that cannot be merged exactly."""
    source = node.inputs[0] if node.inputs else None
    if source is None or graph.constant(source) is not None:
        return None
    if node.op in ("Conv", "AveragePool"):
        form, _ = conv_chain(graph, node)
        if form is None:
            return None
        return Term(leaf, form.source, form.bias, form.dtype, kernel=form.weight,
                    geometry=form.geometry, nodes=form.nodes)
    if node.op == "BatchNormalization":
        scale, shift = inference_bn(graph, node)
        return Term(leaf, source, shift, graph.value(node.inputs[1]).dtype, scale=scale, nodes=[node])
    if node.op == "Mul":
        first, second = (graph.constant(t) for t in node.inputs)
        if (first is None) == (second is None):
            return None
        index, const = (0, second) if second is not None else (1, first)
        return Term(leaf, node.inputs[index], 0.0, np.asarray(const).dtype, scale_const=const, nodes=[node])
    if node.op in ("Gemm", "MatMul"):
        return _matrix_term(graph, leaf, node, source)
    return None


def _matrix_term(graph: Graph, leaf: Leaf, node: Node, source: Tensor) -> Term | None:
    """Gemm/MatMul with a constant 2-D weight as an (out, in) matrix and a bias vector."""
    fc = fc_form(graph, node)
    if fc is None:
        return None
    return Term(leaf, source, fc.bias, fc.dtype, kernel=fc.matrix, nodes=[node])


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for tree in find_trees(graph, done):
        if log.attempt(tree.root, _merge_tree, graph, tree, log):
            done.update(id(n) for n in tree.nodes)


def _merge_tree(graph: Graph, tree: Tree, log: PassLog) -> bool:
    groups: dict[str, Group] = {}
    constants: list[Leaf] = []
    kept_apart: list[tuple[str, Refused]] = []
    for leaf in tree.leaves:
        term, note = interpret(graph, leaf)
        if term is None:
            constants.append(leaf)
            continue
        groups.setdefault(term.source.name, Group(term.source)).terms.append(term)
        if note:
            kept_apart.append(note)
    for source, why in kept_apart:
        if source in groups:  # it had partners in this sum (a plain residual has none)
            log.refused(tree.root, why, "branches")
    for refused in _behind_a_layout(graph, groups):
        log.refused(tree.root, refused, "branches")
    merged: list[Merged] = []
    rest: list[Leaf] = []
    for name, group in groups.items():
        if len(group.terms) >= 2 and any(t.nodes for t in group.terms):
            try:
                merged.append(_merge_group(graph, group))
                continue
            except Refused as refused:
                log.refused(tree.root, refused.within("branches not merged", f"branches of '{name}'"), "branches")
        rest.extend(t.leaf for t in group.terms)
    if not merged:
        return False
    rest += _absorb_constants(graph, merged[0], constants)
    removed = len(tree.nodes) + sum(len(t.nodes) for m in merged for t in m.group.terms)
    added = sum(m.node_count for m in merged) + combination_nodes(len(merged) + len(rest), rest)
    if added > removed:
        log.refused(tree.root, Refused("merging would not reduce the number of nodes"), "branches")
        return False
    _emit(graph, tree, merged, rest)
    patterns = ("+".join(sorted("+".join(n.op for n in reversed(t.nodes)) or "identity" for t in m.group.terms))
                for m in merged)
    replaced = tree.nodes + [n for m in merged for t in m.group.terms for n in t.nodes]
    return log.rewrote(" & ".join(f"branches({ops})" for ops in patterns), replaced)


def _behind_a_layout(graph: Graph, groups: dict[str, Group]) -> list[Refused]:
    """Why a lone BN or scaling branch of x is not merged where a layer branch of x reaches the sum
    through data movement, Transpose(conv(Transpose(x))) as an NHWC export writes it: the merge
    sees layers of one layout only."""
    found = []
    for name, group in groups.items():
        if len(group.terms) != 1 or group.terms[0].is_conv or group.terms[0].is_matrix or not group.terms[0].nodes:
            continue
        for other in groups.values():
            leaf = other.terms[0].leaf.tensor
            layer_output = view_source(graph, leaf) if not other.terms[0].nodes else None
            layer = graph.producer(layer_output) if layer_output is not None else None
            if layer is None or layer.op not in ("Conv", "Gemm", "MatMul") or not layer.inputs:
                continue
            reads = view_source(graph, layer.inputs[0]) or layer.inputs[0]
            if reads.name == name:
                found.append(Refused(f"a {group.terms[0].nodes[0].op} branch is kept apart: the {layer.op} branch of the "
                                     "same tensor reaches the sum through data movement (another layout)",
                                     f"branches of '{name}'"))
                break
    return found


def _absorb_constants(graph: Graph, first: Merged, constants: list[Leaf]) -> list[Leaf]:
    """Per-channel constants in the sum become the merged layer's bias; others stay addends."""
    if first.attrs is None:
        axis, rank = -1, Graph.rank(first.group.source)
    else:
        axis, rank = 1 - first.weight.ndim, first.weight.ndim
    kept = []
    for leaf in constants:
        try:
            first.bias += leaf.sign * algebra.per_channel(graph.value(leaf.tensor), first.weight.shape[0], axis, rank)
        except Refused:
            kept.append(leaf)  # not a bias: it stays an addend of the sum
    return kept


def _merge_group(graph: Graph, group: Group) -> Merged:
    """The group's terms as one layer; raises Refused where they do not merge."""
    if any(t.is_matrix for t in group.terms):
        return _merge_matrices(group)
    convs = [t for t in group.terms if t.is_conv]
    diagonals = [t for t in group.terms if not t.is_conv]
    rank = convs[0].kernel.ndim if convs else graph.rank(group.source)
    if rank is None or rank < 3:
        raise Refused("no spatial axes (input rank unknown or below 3)")
    if any(t.kernel.ndim != rank for t in convs):
        raise Refused("branch kernels have different ranks")
    if Graph.rank(group.source) not in (None, rank):
        raise Refused("input rank differs from the kernels' rank")
    spatial = rank - 2
    shape = group.source.shape  # spatial sizes are used where known; batch and channels may be symbolic
    in_channels, out_channels = _channels(group.source, convs, diagonals, rank)
    scales = _diagonal_scales(diagonals, out_channels, 1 - rank, rank)
    unit = {"kernel": (1,) * spatial, "strides": (1,) * spatial, "dilations": (1,) * spatial,
            "pads": (0,) * 2 * spatial}
    cost = sum(t.kernel.size for t in convs) + out_channels * len(diagonals)
    _common_dilation(convs, spatial)
    geometries = [t.geometry for t in convs] + [unit] * len(diagonals)
    strides = {g["strides"] for g in geometries}
    if len(strides) != 1:
        reason = "an identity or diagonal branch needs stride 1" if diagonals else "strides differ"
        raise Refused(f"{reason} (strides {sorted(strides)})")
    stride = strides.pop()
    plans, dilations = [], []
    for axis in range(spatial):
        dilations.append(max({g["dilations"][axis] for g in geometries if g["kernel"][axis] > 1} or {1}))
        branches = [algebra.AxisBranch(g["kernel"][axis], g["pads"][axis], g["pads"][axis + spatial])
                    for g in geometries]
        length = shape[2 + axis] if shape is not None and len(shape) == rank else None
        where = Graph.axis_size(group.source, 2 + axis)
        try:
            plan = algebra.plan_axis(branches, stride[axis], dilations[-1],
                                     length if isinstance(length, int) and length >= 0 else None)
        except Refused as refused:
            raise refused.within(where) from None
        if min(plan.pad_begin, plan.pad_end) < 0:
            raise Refused(f"{where}: every branch crops its input (merged pads {plan.pad_begin}, {plan.pad_end})")
        plans.append(plan)
    groups = 0
    for t in convs:
        groups = gcd(groups, t.geometry["group"])
    groups = groups or out_channels  # diagonal terms only: depthwise
    size = tuple(p.kernel for p in plans)
    kernel = np.zeros((out_channels, in_channels // groups) + size)
    if kernel.size > cost:
        raise Refused(f"the merged conv would cost more multiply-adds than the branches ({kernel.size} vs {cost} "
                      "per position)")
    bias = np.zeros(out_channels)
    for i, term in enumerate(convs + diagonals):
        small = algebra.regroup_kernel(term.kernel, term.geometry["group"], groups) if term.is_conv \
            else algebra.diagonal_kernel(np.broadcast_to(scales[i - len(convs)], (out_channels,)), groups, spatial)
        algebra.add_embedded(kernel, small, tuple(p.offsets[i] for p in plans), term.leaf.sign)
        bias += term.leaf.sign * np.broadcast_to(term.bias, (out_channels,))
    attrs = {"kernel_shape": list(size), "strides": list(stride), "dilations": dilations,
             "pads": [p.pad_begin for p in plans] + [p.pad_end for p in plans], "group": groups}
    return Merged(group, kernel, bias, attrs)


def _common_dilation(convs: list[Term], spatial: int) -> None:
    """Gives every conv term the gcd of the dilations on each axis: a kernel dilated f times more
    becomes one with f - 1 zeros between its taps."""
    for axis in range(spatial):
        common = 0
        for t in convs:
            if t.geometry["kernel"][axis] > 1:
                common = gcd(common, t.geometry["dilations"][axis])
        for t in convs:
            factor = t.geometry["dilations"][axis] // common if t.geometry["kernel"][axis] > 1 else 1
            if factor > 1:
                factors = tuple(factor if a == axis else 1 for a in range(spatial))
                t.kernel = algebra.dilate_kernel(t.kernel, factors)
                dilations = tuple(common if a == axis else d for a, d in enumerate(t.geometry["dilations"]))
                t.geometry = {**t.geometry, "kernel": t.kernel.shape[2:], "dilations": dilations}


def _diagonal_scales(diagonals: list[Term], channels: int, axis: int,
                     rank: int | None) -> list[np.ndarray | float]:
    """Each identity/diagonal term's scale, a Mul constant checked to be per channel."""
    scales = []
    for t in diagonals:
        if t.scale_const is None:
            scales.append(t.scale)
            continue
        try:
            scales.append(algebra.per_channel(t.scale_const, channels, axis, rank))
        except Refused as refused:
            raise refused.within("Mul branch") from None
    return scales


def _merge_matrices(group: Group) -> Merged:
    """Fully connected terms (features on the last axis) summed into one (out, in) matrix."""
    matrices = [t for t in group.terms if t.is_matrix]
    diagonals = [t for t in group.terms if not t.is_matrix]
    if any(t.is_conv for t in diagonals):
        raise Refused("convolution and fully connected branches on one tensor")
    rank = Graph.rank(group.source)
    shapes = {t.kernel.shape for t in matrices}
    if len(shapes) != 1:
        raise Refused(f"fully connected weights differ in shape {sorted(shapes)}")
    out_features, in_features = shapes.pop()
    last = group.source.shape[-1] if group.source.shape else None
    if isinstance(last, int) and last != in_features:
        raise Refused(f"input has {last} features, the weights {in_features}")
    if diagonals and out_features != in_features:
        raise Refused(f"an identity or diagonal branch needs as many outputs as inputs ({out_features} vs "
                      f"{in_features})")
    if any(t.nodes and t.nodes[0].op == "BatchNormalization" for t in diagonals) and rank != 2:
        raise Refused("BatchNormalization normalizes axis 1, which is not the feature axis")
    scales = _diagonal_scales(diagonals, out_features, -1, rank)
    weight = np.zeros((out_features, in_features))
    bias = np.zeros(out_features)
    for term in matrices:
        weight += term.leaf.sign * term.kernel
        bias += term.leaf.sign * np.broadcast_to(term.bias, (out_features,))
    for term, scale in zip(diagonals, scales):
        weight[np.diag_indices(out_features)] += term.leaf.sign * np.broadcast_to(scale, (out_features,))
        bias += term.leaf.sign * np.broadcast_to(term.bias, (out_features,))
    return Merged(group, weight, bias, None)


def _channels(source: Tensor, convs: list[Term], diagonals: list[Term],
              rank: int) -> tuple[int, int]:
    """(input, output) channel counts agreed on by every term; raises Refused where they disagree."""
    ins = {t.kernel.shape[1] * t.geometry["group"] for t in convs}
    outs = {t.kernel.shape[0] for t in convs}
    if source.shape is not None and isinstance(source.shape[1], int):
        ins.add(source.shape[1])
    for t in diagonals:
        if np.ndim(t.scale):
            outs.add(int(np.size(t.scale)))
        const = t.scale_const
        if const is not None and const.ndim >= rank - 1 and const.shape[const.ndim + 1 - rank] > 1:
            outs.add(const.shape[const.ndim + 1 - rank])  # a size-1 axis is a broadcast, not a count
    if diagonals:
        ins |= outs
        outs = ins
    if len(ins) > 1 or len(outs) > 1:
        raise Refused(f"channel counts differ (in {sorted(ins)}, out {sorted(outs)})")
    if not outs:
        raise Refused("channel count unknown")
    out_channels = next(iter(outs))
    return next(iter(ins), out_channels), out_channels


def _emit(graph: Graph, tree: Tree, merged: list[Merged], rest: list[Leaf]) -> None:
    output = tree.root.outputs[0]
    direct = not rest and len(merged) == 1
    addends = list(rest)
    name = tree.root.name
    for m in merged:
        dtype = next(t.dtype for t in m.group.terms if t.dtype is not None)
        target = output if direct else partial_sum(graph, f"{name}_branch", [t.leaf for t in m.group.terms], output)
        if m.attrs is not None:
            graph.emit_layer("Conv", m.group.source, m.weight, m.bias, target, m.attrs, name, dtype)
        elif Graph.rank(m.group.source) == 2:
            graph.emit_layer("Gemm", m.group.source, m.weight, m.bias, target, {"transB": 1}, name, dtype)
        else:
            bias = m.bias if m.node_count == 2 else None
            graph.emit_layer("MatMul", m.group.source, m.weight.T, bias, target, {}, name, dtype)
        addends.append(Leaf(target, 1.0))
    if not direct:
        emit_sum(graph, addends, output, name)
