"""Merges parallel linear branches of one tensor, summed by Add/Sum/Sub, into one Conv.

Each leaf of the sum is a linear function of some tensor X: Conv(X) is its kernel, BN(X) or a
per-channel Mul(X, c) a diagonal kernel, X itself the identity kernel, a constant a bias. Leaves of
the same X are embedded in one kernel size (offset (PB - pb) / dilation on each axis), regrouped to
the gcd of their group counts and added, with their signs. Leaves of other tensors stay in the sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd

import numpy as np

from .. import algebra
from ..graph import Graph, Node, Tensor, conv_geometry
from ..matcher import DEFAULT_DOMAINS, Leaf, Tree, find_trees
from . import PassLog, inference_bn


@dataclass
class Term:
    """A leaf as a linear function of ``source``: a conv kernel or a diagonal scale, plus a bias."""
    leaf: Leaf
    source: Tensor
    bias: np.ndarray | float
    dtype: np.dtype | None
    kernel: np.ndarray | None = None  # conv weight
    geometry: dict | None = None  # conv attributes, see conv_geometry
    scale: np.ndarray | float = 1.0  # diagonal scale (1.0: the identity); unused for convs
    scale_const: np.ndarray | None = None  # Mul's constant, checked once the rank is known
    producer: Node | None = None

    @property
    def is_conv(self) -> bool:
        return self.kernel is not None


@dataclass
class Group:
    source: Tensor
    terms: list[Term] = field(default_factory=list)


def interpret(graph: Graph, leaf: Leaf) -> tuple[Term | None, str | None]:
    """The leaf as a term; a constant leaf gives (None, None). A branch whose output is also read
    elsewhere is the identity of that output, with the reason it could not be taken apart."""
    tensor = leaf.tensor
    if graph.constant(tensor) is not None:
        return None, None
    node = graph.producer(tensor)
    term = _branch_term(graph, leaf, node) if node is not None and node.domain in DEFAULT_DOMAINS else None
    if term is not None:
        shared = graph.shared_reason(tensor)
        if shared is None:
            return term, None
        return Term(leaf, tensor, 0.0, None), f"{node.op} branch kept apart: {shared}"
    return Term(leaf, tensor, 0.0, None), None


def _branch_term(graph: Graph, leaf: Leaf, node: Node) -> Term | None:
    source = node.inputs[0] if node.inputs else None
    if source is None or graph.constant(source) is not None:
        return None
    if node.op == "Conv":
        weight = graph.constant(node.inputs[1])
        bias = graph.constant(node.inputs[2]) if len(node.inputs) > 2 else np.zeros(())
        if weight is None or bias is None:
            return None
        return Term(leaf, source, np.asarray(bias, np.float64), weight.dtype, kernel=weight,
                    geometry=conv_geometry(node, weight), producer=node)
    if node.op == "BatchNormalization":
        affine = inference_bn(graph, node)
        if isinstance(affine, str):
            return None
        scale, shift = affine
        return Term(leaf, source, shift, graph.constant(node.inputs[1]).dtype, scale=scale, producer=node)
    if node.op == "Mul":
        consts = [graph.constant(t) for t in node.inputs]
        if sum(c is not None for c in consts) != 1:
            return None
        index = 0 if consts[1] is not None else 1
        const = consts[1 - index]
        return Term(leaf, node.inputs[index], 0.0, const.dtype, scale_const=const, producer=node)
    return None


def run(graph: Graph, log: PassLog) -> None:
    done: set[int] = set()
    for tree in find_trees(graph, done):
        if _merge_tree(graph, tree, log):
            done.update(id(n) for n in tree.nodes)


def _merge_tree(graph: Graph, tree: Tree, log: PassLog) -> bool:
    groups: dict[str, Group] = {}
    constants: list[Leaf] = []
    kept_apart: dict[str, str] = {}
    for leaf in tree.leaves:
        term, note = interpret(graph, leaf)
        if term is None:
            constants.append(leaf)
            continue
        groups.setdefault(term.source.name, Group(term.source)).terms.append(term)
        if note:
            kept_apart[graph.producer(leaf.tensor).inputs[0].name] = note
    merged: list[tuple[Group, np.ndarray, np.ndarray, dict]] = []
    rest: list[Leaf] = []
    for name, group in groups.items():
        mergeable = len(group.terms) >= 2 and any(t.producer is not None for t in group.terms)
        result = _merge_group(graph, group) if mergeable else None
        if isinstance(result, tuple):
            merged.append((group,) + result)
            continue
        if isinstance(result, str):
            log.refused(tree.root.name, f"branches of '{name}' not merged: {result}")
        elif name in kept_apart and group.terms:
            log.refused(tree.root.name, kept_apart[name])
        rest.extend(t.leaf for t in group.terms)
    if not merged:
        return False
    rest += _absorb_constants(merged[0], constants)
    removed = len(tree.nodes) + sum(1 for g, *_ in merged for t in g.terms if t.producer is not None)
    added = len(merged) + _combination_nodes(len(merged) + len(rest), rest)
    if added > removed:
        log.refused(tree.root.name, "merging would not reduce the number of nodes")
        return False
    _emit(graph, tree, merged, rest)
    for group, *_ in merged:
        ops = "+".join(sorted(t.producer.op if t.producer else "identity" for t in group.terms))
        log.rewrote(f"branches({ops})", tree.root.name)
    return True


def _combination_nodes(addends: int, rest: list[Leaf]) -> int:
    if addends == 1:
        return 0
    negatives = sum(1 for leaf in rest if leaf.sign < 0)
    positives = addends - negatives
    return 1 + (negatives > 0) * ((positives > 1) + (negatives > 1))


def _absorb_constants(first: tuple, constants: list[Leaf]) -> list[Leaf]:
    """Per-channel constants in the sum become the merged conv's bias; others stay addends."""
    group, kernel, bias, attrs = first
    rank = kernel.ndim
    kept = []
    for leaf in constants:
        value = algebra.per_channel(np.asarray(leaf.tensor.values), kernel.shape[0], 1 - rank, rank)
        if isinstance(value, str):
            kept.append(leaf)
        else:
            bias += leaf.sign * value
    return kept


def _merge_group(graph: Graph, group: Group) -> tuple[np.ndarray, np.ndarray, dict] | str:
    """The merged kernel, bias and Conv attributes of a group's terms, or why they do not merge."""
    convs = [t for t in group.terms if t.is_conv]
    diagonals = [t for t in group.terms if not t.is_conv]
    rank = convs[0].kernel.ndim if convs else graph.rank(group.source)
    if rank is None or rank < 3:
        return "no spatial axes (input rank unknown or below 3)"
    if any(t.kernel.ndim != rank for t in convs):
        return "branch kernels have different ranks"
    if Graph.rank(group.source) not in (None, rank):
        return "input rank differs from the kernels' rank"
    spatial = rank - 2
    shape = Graph.static_shape(group.source)
    channels = _channels(group.source, convs, diagonals, rank)
    if isinstance(channels, str):
        return channels
    in_channels, out_channels = channels
    for t in diagonals:
        if t.scale_const is not None:
            scale = algebra.per_channel(t.scale_const, out_channels, 1 - rank, rank)
            if isinstance(scale, str):
                return f"Mul branch: {scale}"
            t.scale = scale
    geometries = [_explicit_geometry(t.geometry, shape) for t in convs]
    if any(isinstance(g, str) for g in geometries):
        return next(g for g in geometries if isinstance(g, str))
    unit = {"kernel": (1,) * spatial, "strides": (1,) * spatial, "dilations": (1,) * spatial,
            "pads": (0,) * 2 * spatial}
    geometries += [unit] * len(diagonals)
    strides = {g["strides"] for g in geometries}
    if len(strides) != 1:
        reason = "an identity or diagonal branch needs stride 1" if diagonals else "strides differ"
        return f"{reason} (strides {sorted(strides)})"
    stride = strides.pop()
    plans, dilations = [], []
    for axis in range(spatial):
        dilation = {g["dilations"][axis] for g in geometries if g["kernel"][axis] > 1} or {1}
        if len(dilation) != 1:
            return f"dilations differ on axis {axis}: {sorted(dilation)}"
        dilations.append(dilation.pop())
        branches = [algebra.AxisBranch(g["kernel"][axis], g["pads"][axis], g["pads"][axis + spatial])
                    for g in geometries]
        plan = algebra.plan_axis(branches, stride[axis], dilations[-1],
                                 shape[2 + axis] if shape else None)
        if isinstance(plan, str):
            return f"axis {axis}: {plan}"
        plans.append(plan)
    groups = 0
    for t in convs:
        groups = gcd(groups, t.geometry["group"])
    groups = groups or out_channels  # diagonal terms only: depthwise
    size = tuple(p.kernel for p in plans)
    kernel = np.zeros((out_channels, in_channels // groups) + size)
    bias = np.zeros(out_channels)
    for i, term in enumerate(convs + diagonals):
        small = algebra.regroup_kernel(term.kernel, term.geometry["group"], groups) if term.is_conv \
            else algebra.diagonal_kernel(np.broadcast_to(term.scale, (out_channels,)), groups, spatial)
        algebra.add_embedded(kernel, small, tuple(p.offsets[i] for p in plans), term.leaf.sign)
        bias += term.leaf.sign * np.broadcast_to(term.bias, (out_channels,))
    attrs = {"kernel_shape": list(size), "strides": list(stride), "dilations": dilations,
             "pads": [p.pad_begin for p in plans] + [p.pad_end for p in plans], "group": groups}
    return kernel, bias, attrs


def _channels(source: Tensor, convs: list[Term], diagonals: list[Term],
              rank: int) -> tuple[int, int] | str:
    """(input, output) channel counts agreed on by every term, or why they disagree."""
    ins = {t.kernel.shape[1] * t.geometry["group"] for t in convs}
    outs = {t.kernel.shape[0] for t in convs}
    if source.shape is not None and isinstance(source.shape[1], int):
        ins.add(source.shape[1])
    for t in diagonals:
        if np.ndim(t.scale):
            outs.add(len(t.scale))
        const = t.scale_const
        if const is not None and const.ndim >= rank - 1 and const.shape[const.ndim + 1 - rank] > 1:
            outs.add(const.shape[const.ndim + 1 - rank])  # a size-1 axis is a broadcast, not a count
    if diagonals:
        ins |= outs
        outs = ins
    if len(ins) > 1 or len(outs) > 1:
        return f"channel counts differ (in {sorted(ins)}, out {sorted(outs)})"
    if not outs:
        return "channel count unknown"
    out_channels = next(iter(outs))
    return next(iter(ins), out_channels), out_channels


def _explicit_geometry(geometry: dict, shape: tuple[int, ...] | None) -> dict | str:
    """Turns auto_pad into explicit pads, which needs the input's spatial size for SAME_*."""
    auto_pad = geometry["auto_pad"]
    if auto_pad in ("NOTSET", ""):
        return geometry
    spatial = len(geometry["kernel"])
    if auto_pad == "VALID":
        return {**geometry, "pads": (0,) * 2 * spatial}
    if shape is None:
        return f"auto_pad {auto_pad} with an input of unknown size"
    pairs = [algebra.same_pads(shape[2 + a], geometry["kernel"][a], geometry["strides"][a],
                               geometry["dilations"][a], auto_pad == "SAME_UPPER") for a in range(spatial)]
    return {**geometry, "pads": tuple(p[0] for p in pairs) + tuple(p[1] for p in pairs)}


def _emit(graph: Graph, tree: Tree, merged: list, rest: list[Leaf]) -> None:
    output = tree.root.outputs[0]
    direct = not rest and len(merged) == 1
    addends = list(rest)
    for group, kernel, bias, attrs in merged:
        dtype = next(t.dtype for t in group.terms if t.dtype is not None)
        weight = graph.add_constant(f"{tree.root.name}_weight", kernel.astype(dtype))
        bias_const = graph.add_constant(f"{tree.root.name}_bias", bias.astype(dtype))
        target = output if direct else graph.add_variable(f"{tree.root.name}_branch", output)
        graph.add_node("Conv", [group.source, weight, bias_const], [target], attrs, tree.root.name)
        addends.append(Leaf(target, 1.0))
    if not direct:
        positives = [leaf.tensor for leaf in addends if leaf.sign > 0]
        negatives = [leaf.tensor for leaf in addends if leaf.sign < 0]
        if not negatives:
            _sum(graph, positives, output, tree.root.name)
        else:
            minuend = _sum(graph, positives, None, tree.root.name, like=output)
            subtrahend = _sum(graph, negatives, None, tree.root.name, like=output)
            graph.add_node("Sub", [minuend, subtrahend], [output], {}, tree.root.name)


def _sum(graph: Graph, tensors: list[Tensor], output: Tensor | None, name: str,
         like: Tensor | None = None) -> Tensor:
    if output is None:
        if len(tensors) == 1:
            return tensors[0]
        output = graph.add_variable(f"{name}_sum", like)
    graph.add_node("Add" if len(tensors) == 2 else "Sum", tensors, [output], {}, name)
    return output
