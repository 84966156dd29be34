"""Cross-layer equalization (``--int8-ready``): layers joined through ReLU-like ops trade scale per
channel, so that no channel's weights dwarf the rest of their tensor on an INT8 grid.

Where the channels of a tensor T, written by layers P (a layer, or a sum of layers and per-channel
scalings), reach layers Q only through ops that are positively homogeneous per channel (f(x / s) =
f(x) / s for s > 0: Relu, LeakyRelu, PRelu, max and average pools, a mean or max over other axes,
a flatten of a [N, C, 1, 1] tensor), dividing channel c of every P (its weights and bias) by s_c
and multiplying input channel c of every Q by s_c leaves the model's function unchanged (Nagel et
al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019). With
s_c = sqrt(r_P(c) / r_Q(c)), r the largest |w| of that channel on each side, both sides get the
same range; applied link after link until no scale moves by more than CONVERGED. A per-channel
Mul on either side (an identity branch kept apart by split_identity) is scaled along: it stays
in float in a weight-only quantization, so its values take no part in the ranges. A Concat along
the channels puts each writer's channels at their offset among the reader's input channels; a
residual Add of two values joins their links into one, whose channels then take one scale (the
whole residual stream), provided every input of that Add is reached from a writer of the link.

The fused weights of re-parameterized networks need it: an identity or BN branch lands on one tap
of one channel (QARepVGG's diagnosis), and its gain can be 100x the median channel's. Runs only
when asked, once the other passes have reached their fixed point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import algebra
from ..errors import Refused
from ..graph import Graph, Node, Tensor, attr
from ..linear import channel_affine
from . import PassLog
from .fold_affine import Linear, linear_of

PRODUCERS = frozenset({"Conv", "Gemm"})
CONSUMERS = frozenset({"Conv", "Gemm", "MatMul"})
# Per channel, f(x / s) = f(x) / s for every s > 0 (PRelu's slope, LeakyRelu's alpha are unchanged).
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "MaxPool", "GlobalMaxPool", "AveragePool",
                         "GlobalAveragePool"})
FLATTENING = frozenset({"Flatten", "Reshape", "Squeeze"})
REDUCING = frozenset({"ReduceMean", "ReduceMax"})
CONVERGED = 1e-3  # largest |log s| of a sweep over the links that counts as no change
WORTH_IT = 0.01  # a component whose ranges all stay within 1% is already equalized
MAX_SWEEPS = 1000
PATTERN = "equalization"


@dataclass
class Member:
    """A layer (weight, bias) or a per-channel scaling (its vector as ``weight``) being rescaled.
    The solver moves only the factors on its output and input channels; a layer's ranges come from
    ``pairs``, the largest |w| of each (output, input) channel pair, which the factors scale."""
    node: Node
    weight: np.ndarray  # float64, as read
    bias: np.ndarray | None
    linear: Linear | None  # None for a scaling
    data_index: int = 0  # a scaling's data input
    pairs: np.ndarray = field(init=False)  # [out, in per group]
    reads: np.ndarray = field(init=False)  # the input channel of each pair
    out_scale: np.ndarray = field(init=False)
    in_scale: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        weight = self.weight
        if self.linear is None:
            self.pairs = self.reads = np.zeros((0, 0))
            self.out_scale, self.in_scale = np.ones(weight.size), np.ones(weight.size)
            return
        if self.node.op == "Conv":
            self.pairs = np.abs(weight).reshape(weight.shape[:2] + (-1,)).max(axis=2)
            self.reads = algebra.input_channels(weight.shape[0], weight.shape[1], int(attr(self.node, "group", 1)))
        else:
            self.pairs = np.abs(weight.T if _out_axis(self.node) == 1 else weight)
            self.reads = np.broadcast_to(np.arange(self.pairs.shape[1]), self.pairs.shape)
        self.out_scale = np.ones(self.pairs.shape[0])
        self.in_scale = np.ones(int(self.reads.max()) + 1)

    @property
    def is_layer(self) -> bool:
        return self.linear is not None

    def scaled(self) -> np.ndarray:
        """|w| of each pair with the factors applied."""
        return self.pairs * self.out_scale[:, None] * self.in_scale[self.reads]

    def out_ranges(self) -> np.ndarray:
        return self.scaled().max(axis=1)

    def in_ranges(self) -> np.ndarray:
        ranges = np.zeros(self.in_scale.size)
        np.maximum.at(ranges, self.reads.ravel(), self.scaled().ravel())
        return ranges

    def scale_out(self, factor: np.ndarray) -> None:
        self.out_scale = self.out_scale * factor

    def scale_in(self, factor: np.ndarray, offset: int = 0) -> None:
        self.in_scale[offset:offset + factor.size] *= factor

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The weight (a scaling's vector) and bias with the factors applied."""
        if self.linear is None:
            return self.weight * self.out_scale * self.in_scale, None
        weight = self.weight
        if self.node.op == "Conv":
            factor = self.out_scale[:, None] * self.in_scale[self.reads]
            weight = weight * factor.reshape(factor.shape + (1,) * (weight.ndim - 2))
        else:
            factor = self.out_scale[:, None] * self.in_scale[None, :]
            weight = weight * (factor.T if _out_axis(self.node) == 1 else factor)
        return weight, self.bias * self.out_scale if self.bias is not None else None


@dataclass
class Link:
    """The channels that ``producers`` write (all of them, summed) reach each consumer one to one,
    at its input channels offset..offset + C (a Concat before it puts them there). ``visited``:
    the values the channels pass through, by name and offset; ``joins``: residual Adds on the way,
    where other producers' channels are added to these (their links become one)."""
    producers: list[Node]
    consumers: list[tuple[Node, int]]
    visited: set[tuple[str, int]] = field(default_factory=set)
    joins: list[Node] = field(default_factory=list)
    concat: bool = False  # the channels pass a Concat


def run(graph: Graph, log: PassLog) -> None:
    members: dict[str, Member] = {}
    links = []
    for node in graph.nodes():
        if node.op in PRODUCERS | {"Add"}:
            link = log.attempt(node, _link_or_refusal, graph, node, members, log)
            if link is not None:
                links.append(link)
    joined = []
    for link in _joined(links):
        problem = _join_problem(graph, link)
        if problem is None:
            joined.append(link)
        else:
            log.refused(link.producers[0].name, problem, PATTERN)
    for component in _components(joined):
        log.attempt(component[0].producers[0], _equalize, graph, component, members, log)


def _joined(links: list[Link]) -> list[Link]:
    """Links that meet at a residual Add are one: the sum's channels must take one scale."""
    parent = list(range(len(links)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    seen: dict[tuple[str, int], int] = {}
    for i, link in enumerate(links):
        for value in link.visited:
            if value in seen:
                parent[root(i)] = root(seen[value])
            else:
                seen[value] = i
    groups: dict[int, list[Link]] = {}
    for i, link in enumerate(links):
        groups.setdefault(root(i), []).append(link)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        consumers = list(dict.fromkeys((n.name, offset) for link in group for n, offset in link.consumers))
        nodes = {n.name: n for link in group for n, _ in link.consumers}
        merged.append(Link([p for link in group for p in link.producers], [(nodes[n], o) for n, o in consumers],
                           set().union(*(link.visited for link in group)),
                           list({id(j): j for link in group for j in link.joins}.values()),
                           any(link.concat for link in group)))
    return merged


def _join_problem(graph: Graph, link: Link) -> Refused | None:
    """Why the channels of a joined link cannot take one scale: an input of a residual Add that no
    producer of the link writes (through homogeneous ops), or a Concat on the way."""
    names = {name for name, _ in link.visited}
    for join in link.joins:
        for tensor in join.inputs:
            if tensor.name not in names:
                return Refused("a residual Add's other input is not a layer's output reached through ops that "
                               "keep the channels' scales", f"'{tensor.name}' into {join.name}")
    if link.joins and link.concat:
        return Refused("a residual Add and a Concat on the same channels", link.joins[0].name)
    return None


def _link_or_refusal(graph: Graph, node: Node, members: dict[str, Member], log: PassLog) -> Link | None:
    try:
        return _link_from(graph, node, members)
    except Refused as refused:  # named as the output model names it: a fused layer's origins are many
        log.refused(node.name, refused, PATTERN)
        return None


def _link_from(graph: Graph, node: Node, members: dict[str, Member]) -> Link | None:
    """The link whose producers write ``node``'s output, when that output is a whole sum (not a
    part of a larger one); None where its channels reach no layer; Refused where they reach
    something else on the way."""
    producers = _sources(graph, node.outputs[0], members)
    if producers is None or not any(members[p.name].is_layer for p in producers):
        return None
    readers = node.outputs[0].outputs
    if len(readers) == 1 and readers[0].op == "Add" and _sources(graph, readers[0].outputs[0], members) is not None:
        return None  # a part of a sum: the sum's link covers it
    consumers: list[tuple[Node, int]] = []
    outputs: list[str] = []
    visited: set[tuple[str, int]] = set()
    joins: list[Node] = []
    concat = False
    frontier: list[tuple[Tensor, int | None, int]] = [(node.outputs[0], Graph.rank(node.outputs[0]), 0)]
    while frontier:
        tensor, rank, offset = frontier.pop()
        if (tensor.name, offset) in visited:
            continue  # reached again through a residual Add
        visited.add((tensor.name, offset))
        if tensor.name in graph.output_names:
            outputs.append(tensor.name)
        for reader in tensor.outputs:
            for index in [i for i, t in enumerate(reader.inputs) if t is tensor]:
                if reader.op in ("Shape", "Size"):
                    continue  # reads the shape, which no scale changes
                step = _step(graph, reader, index, rank, members)
                if step is None:
                    if not _reaches_layer(reader):
                        return None  # nothing to trade scales with there
                    raise Refused(_why_not(reader), f"{node.name} reaches {reader.name}")
                if isinstance(step, str):  # a consumer
                    consumers.append((reader, offset))
                else:
                    if reader.op == "Add":
                        joins.append(reader)
                    concat = concat or reader.op == "Concat"
                    frontier.append((reader.outputs[0], step[0], offset + step[1]))
    if consumers and outputs:
        raise Refused("a value between the layers is a graph output, whose scale must stay",
                      ", ".join(f"'{name}'" for name in outputs))
    return Link(producers, consumers, visited, joins, concat) if consumers else None


def _step(graph: Graph, reader: Node, index: int, rank: int | None,
          members: dict[str, Member]) -> str | tuple[int | None, int] | None:
    """What ``reader`` does with the channels it reads at ``index``: "consumer" (it takes them as
    its input channels), (rank, offset) of its output where it passes them on scaled as they
    came (the offset a Concat adds), or None where it does neither."""
    if _consumes(graph, reader, index, rank, members):
        return "consumer"
    if reader.op in HOMOGENEOUS and index == 0 or reader.op == "Div" and index == 0 \
            and graph.constant(reader.inputs[1]) is not None or reader.op == "Cast" and _float_cast(reader) \
            or reader.op in ("Resize", "Upsample") and index == 0 and _linear_resize(reader):
        return Graph.rank(reader.outputs[0]), 0
    if reader.op in FLATTENING and index == 0 and _channels_kept(reader):
        return 2, 0
    if reader.op in REDUCING and index == 0 and _reduced_rank(graph, reader, rank) is not None:
        return _reduced_rank(graph, reader, rank), 0
    if reader.op == "Concat":
        offset = _concat_offset(reader, index, rank)
        return (rank, offset) if offset is not None else None
    if reader.op == "Add" and _residual(graph, reader, rank):
        return rank, 0  # the other input must take the same scale: checked when the links are joined
    return None


def _residual(graph: Graph, node: Node, rank: int | None) -> bool:
    """An Add of two computed values of the same channels (a residual sum)."""
    if len(node.inputs) != 2 or any(graph.constant(t) is not None for t in node.inputs):
        return False
    channels = [_channels(t, rank) for t in [*node.inputs, node.outputs[0]]]
    return channels[0] is not None and len(set(channels)) == 1


def _float_cast(node: Node) -> bool:
    """A cast between float types: the same value in another precision."""
    source, target = node.inputs[0].dtype, node.outputs[0].dtype
    return source is not None and target is not None and np.issubdtype(np.dtype(source), np.floating) \
        and np.issubdtype(np.dtype(target), np.floating)


def _linear_resize(node: Node) -> bool:
    """Every Resize mode is linear in its input within a channel, except crop-and-resize, which
    writes an extrapolation value where it samples outside."""
    mode = attr(node, "coordinate_transformation_mode", "half_pixel")
    return (mode.decode() if isinstance(mode, bytes) else mode) != "tf_crop_and_resize"


def _concat_offset(node: Node, index: int, rank: int | None) -> int | None:
    """Where input ``index`` of a Concat along the channel axis starts among its output channels;
    None for another axis or an input of unknown channels."""
    if rank is None or rank < 2:
        return None
    axis = int(attr(node, "axis", 0)) % rank
    if axis != (1 if rank > 2 else rank - 1):
        return None
    offset = 0
    for tensor in node.inputs[:index]:
        size = _channels(tensor, rank)
        if size is None:
            return None
        offset += size
    return offset


def _reaches_layer(node: Node) -> bool:
    """Whether any layer with a weight reads, directly or further on, what ``node`` writes."""
    seen: set[int] = set()
    frontier = [node]
    while frontier:
        current = frontier.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current is not node and current.op in CONSUMERS:
            return True
        frontier += [reader for t in current.outputs for reader in t.outputs]
    return False


def _consumes(graph: Graph, reader: Node, index: int, rank: int | None, members: dict[str, Member]) -> bool:
    """The reader takes the tensor's channels as its input channels: a layer reading it as its
    data, or a scaling of it."""
    if reader.op == "Mul":
        member = _member(graph, reader, members, rank)
        return member is not None and member.data_index == index
    return reader.op in CONSUMERS and index == 0 and _reads_channels(reader, rank) \
        and _member(graph, reader, members) is not None


def _sources(graph: Graph, tensor: Tensor, members: dict[str, Member]) -> list[Node] | None:
    """The layers and scalings whose sum is ``tensor`` (one, or the leaves of an Add tree whose
    inner values nothing else reads), None when it is not such a sum."""
    node = graph.producer(tensor)
    if node is None:
        return None
    if node.op in PRODUCERS or node.op == "Mul":
        return [node] if _member(graph, node, members) is not None else None
    if node.op != "Add" or len(node.inputs) != 2 or any(graph.shared(t) for t in node.inputs):
        return None
    parts = [_sources(graph, t, members) for t in node.inputs]
    return parts[0] + parts[1] if parts[0] is not None and parts[1] is not None else None


def _member(graph: Graph, node: Node, members: dict[str, Member], rank: int | None = None) -> Member | None:
    """The node as a layer with constant weight and bias, or as a Mul by a per-channel constant
    (a scaling); None for anything else."""
    if node.name in members:
        return members[node.name]
    if node.op == "Mul":
        data = next((t for t in node.inputs if graph.constant(t) is None), None)
        rank = Graph.rank(data) if rank is None and data is not None else rank
        channels = _channels(data, rank) if data is not None else None
        if rank is None or channels is None:
            return None
        try:
            affine = channel_affine(graph, node, channels, 1 - rank if rank > 2 else -1, rank)
        except Refused:
            return None
        if affine is None or not np.issubdtype(graph.value(node.inputs[1 - affine.data_index]).dtype, np.floating):
            return None
        members[node.name] = Member(node, affine.scale, None, None, affine.data_index)
    else:
        linear = linear_of(graph, node)
        if linear is None:
            return None
        members[node.name] = Member(node, np.asarray(linear.weight, np.float64), np.asarray(linear.bias, np.float64),
                                    linear)
    return members[node.name]


def _channels(tensor: Tensor, rank: int | None) -> int | None:
    shape = tensor.shape
    if shape is None or rank is None or len(shape) != rank or rank < 2:
        return None
    size = shape[1] if rank > 2 else shape[-1]
    return size if isinstance(size, int) and size > 0 else None


def _reads_channels(node: Node, rank: int | None) -> bool:
    """The layer's input channels are the tensor's channels: axis 1 of a conv's input, the last
    axis of a 2-D input of a Gemm or MatMul."""
    if node.op == "Conv":
        return rank is not None and rank >= 3
    return rank == 2 and not (node.op == "Gemm" and attr(node, "transA", 0))


def _reduced_rank(graph: Graph, node: Node, rank: int | None) -> int | None:
    """The rank after a mean or max over axes other than the channels' (a global pool written as
    ReduceMean), None when it reduces the channel axis or its axes are not known."""
    if rank is None or rank < 3:
        return None
    axes_input = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
    axes = graph.constant(axes_input) if axes_input is not None else attr(node, "axes", None)
    if axes is None:
        return None
    reduced = {int(a) % rank for a in np.ravel(axes)}
    if not reduced or reduced & {0, 1}:
        return None
    return rank if attr(node, "keepdims", 1) else rank - len(reduced)


def _channels_kept(node: Node) -> bool:
    """[N, C, 1, ..., 1] -> [N, C]: channel c becomes feature c (N may be symbolic: the same on both)."""
    before, after = node.inputs[0].shape, node.outputs[0].shape
    if before is None or after is None or len(after) != 2 or len(before) < 2:
        return False
    return isinstance(after[1], int) and list(before[:2]) == list(after) and all(d == 1 for d in before[2:])


def _why_not(reader: Node) -> str:
    if reader.op == "Concat":
        return "the layer's output reaches a Concat on another axis than the channels', or of unknown channel counts"
    if reader.op in ("Add", "Sum", "Sub"):
        return f"the layer's output reaches a {reader.op} with a constant or broadcast addend, or of unknown channels"
    if reader.op == "Clip":
        return "a Clip saturates at a fixed value (ReLU6): scaling its input moves where it clips"
    if reader.op in ("ConvTranspose", "Gemm", "MatMul", "Conv"):
        return f"the layer's output reaches a {reader.op} whose weight equalization does not rescale"
    if reader.op in HOMOGENEOUS | FLATTENING | REDUCING | {"Mul"}:
        return f"the layer's output reaches a {reader.op} that mixes its channels with other axes or values"
    return f"the layer's output reaches a {reader.op}, which is not positively homogeneous (f(x/s) is not f(x)/s)"


def _components(links: list[Link]) -> list[list[Link]]:
    """Links that share a node are solved together."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for link in links:
        names = [n.name for n in link.producers] + [n.name for n, _ in link.consumers]
        for name in names[1:]:
            parent[root(name)] = root(names[0])
    components: dict[str, list[Link]] = {}
    for link in links:
        components.setdefault(root(link.producers[0].name), []).append(link)
    return list(components.values())


def _out_axis(node: Node) -> int:
    if node.op == "Conv":
        return 0
    return 0 if node.op == "Gemm" and attr(node, "transB", 0) else 1


def solve(members: dict[str, Member], links: list[Link]) -> int:
    """Moves the factors link after link until equalized; returns the sweeps it took."""
    for sweep in range(1, MAX_SWEEPS + 1):
        moved = 0.0
        for link in links:
            producers = [members[n.name] for n in link.producers]
            r_out = np.max([p.out_ranges() for p in producers if p.is_layer], axis=0)
            quantized = [(members[n.name], offset) for n, offset in link.consumers if members[n.name].is_layer]
            if not quantized:
                continue
            r_in = np.max([c.in_ranges()[offset:offset + r_out.size] for c, offset in quantized], axis=0)
            usable = (r_out > 0) & (r_in > 0)
            scale = np.ones_like(r_out)
            scale[usable] = np.sqrt(r_out[usable] / r_in[usable])
            for producer in producers:
                producer.scale_out(1 / scale)
            for consumer, offset in link.consumers:
                members[consumer.name].scale_in(scale, offset)
            moved = max(moved, float(np.abs(np.log(scale)).max()))
        if moved < CONVERGED:
            return sweep
    return MAX_SWEEPS


def _equalize(graph: Graph, links: list[Link], members: dict[str, Member], log: PassLog) -> bool:
    names = list(dict.fromkeys([n.name for link in links for n in link.producers] +
                               [n.name for link in links for n, _ in link.consumers]))
    component = {name: members[name] for name in names}
    solve(component, links)
    change = max(float(np.abs(np.log(np.concatenate([m.out_scale, m.in_scale]))).max())
                 for m in component.values() if m.is_layer)
    if change < WORTH_IT:
        return False
    for member in component.values():
        dtype = Graph.layer_dtype(member.node.inputs[member.data_index], np.dtype(np.float32))
        weight, bias = member.result()
        largest = max(np.abs(weight).max(), np.abs(bias).max() if bias is not None else 0.0)
        if np.issubdtype(dtype, np.floating) and largest > np.finfo(dtype).max / 16:
            raise Refused(f"the equalized weights would overflow {dtype}", f"{member.node.name}: {largest:.3g}")
    for member in component.values():
        _emit(graph, member)
    return log.rewrote(PATTERN, [m.node for m in component.values()])


def _emit(graph: Graph, member: Member) -> None:
    node = member.node
    weight, bias = member.result()
    if member.linear is None:  # a scaling: the vector along the data's channel axis
        data = node.inputs[member.data_index]
        rank = Graph.rank(data) or 2
        dtype = Graph.layer_dtype(data, np.dtype(np.float32))
        shape = (-1,) + (1,) * (rank - 2) if rank > 2 else (-1,)
        const = graph.add_constant(f"{node.name}_scale", weight.reshape(shape).astype(dtype))
        inputs = [data, const] if member.data_index == 0 else [const, data]
        graph.add_node("Mul", inputs, [node.outputs[0]], {}, node.name)
        return
    linear = member.linear
    dtype = Graph.layer_dtype(node.inputs[0], linear.dtype)
    had_bias = linear.op != "MatMul" and len(node.inputs) > 2 and bool(node.inputs[2].name)
    bias = bias if had_bias or (bias is not None and np.any(bias)) else None
    graph.emit_layer(linear.op, node.inputs[0], weight.astype(dtype), bias, node.outputs[0], linear.attrs,
                     node.name, dtype)
