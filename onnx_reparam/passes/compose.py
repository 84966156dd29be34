"""Composes a layer with the linear maps right before it: a conv with the padding/cropping
subgraph and the pointwise conv or inference BN feeding it; a Gemm/MatMul with the BN feeding it;
a reshape with the reshape feeding it; a constant MatMul over the channels of a reshaped tensor
with the 1x1 conv it is.

conv_k(pad_v(conv_1x1(x))) is one conv_k on x with the pads added, exact when every padded value
equals what the 1x1 conv gives on zeros (its bias): DBB's 1x1-then-kxk branch. BN(x) before a conv
or FC folds into its input side (W' = W * s per input channel, b' = b + W t), exact when the conv
reads no zero padding or the shift is zero. A 1x1 conv right after a conv (no nonlinearity between,
one group each) is one conv with the first one's geometry: W' = W_1x1 W, b' = W_1x1 b + b_1x1.
A composition that would cost more multiply-adds than the layers it replaces (a 1x1 bottleneck
before a kxk conv, a 1x1 widening after one) is left alone.
"""
from __future__ import annotations

import numpy as np

from .. import algebra
from ..errors import Refused, first_line
from ..graph import Graph, Node, Tensor, attr
from ..linear import before_layer, channel_affine, conv_chain, conv_form, fc_form, inference_bn
from ..routing import MAX_NODES, MAX_PROBED, PROBE_BATCH, RESHAPES, ROUTING_OPS, copies, evaluate
from ..truth import RANDOM_OPS
from . import PassLog


def run(graph: Graph, log: PassLog) -> None:
    for node in reversed(graph.nodes()):  # the last first: a BN on another's way is gone by then
        if node.op == "BatchNormalization" and log.attempt(node, _bn_into_readers, graph, node, log):
            graph.cleanup()  # the BN is dead: it no longer reads what an earlier BN's walk passes
    done: set[int] = set()
    for node in graph.nodes():
        if id(node) in done:
            continue
        if node.op in ("Conv", "AveragePool"):
            compose = _compose_conv
        elif node.op == "MatMul":
            compose = _compose_matmul
        elif node.op == "Gemm":
            compose = _compose_matrix
        elif node.op in RESHAPES or node.op == "Transpose":
            compose = _compose_reshapes
        else:
            continue
        done.update(id(n) for n in log.attempt(node, compose, graph, node, log) or [])


def _bn_into_readers(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """BN(x) = x * s + t read by several layers, or through a Transpose or a pool, folds into
    each (timm's merge_pre_bn: NextViT's pre-norm BN before q and, pooled, k and v): W' = W s and
    b' = b + W t along each layer's input channels, when every element a layer reads comes from
    one BN channel per input channel (seen by running the data movement on channel numbers), the
    pools are average pools with no padding (an average of x * s + t is avg(x) * s + t), and a
    conv reads no zero padding. A BN after a layer read by nothing else is fold_affine's; one
    plain path, the rules below take. A BN after an average pool folds forward where it can (the
    pool stays a pool, as in timm's deploy form), else fold_affine makes the pair one depthwise
    conv."""
    out, producer = node.outputs[0], graph.producer(node.inputs[0])
    if producer is not None and producer.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") \
            and graph.shared(node.inputs[0]) is None:
        return []  # fold_affine folds it into that layer (a layer read elsewhere too, it cannot)
    after_pool = producer is not None and producer.op == "AveragePool"
    movers, layers, problem, branched = [], [], None, False
    stack = [out]
    while stack and problem is None:
        tensor = stack.pop()
        branched = branched or len(tensor.outputs) > 1
        if tensor.name in graph.output_names:
            problem = Refused("its value is a graph output")
        for reader in tensor.outputs:
            if reader.inputs[0] is not tensor:
                problem = Refused(f"it is not the data input of {reader.op} '{reader.name}'")
            elif reader.op in LAYOUT_OPS or reader.op in POOLS:
                movers.append(reader)
                stack.append(reader.outputs[0])
            elif reader.op in ("MatMul", "Gemm", "Conv"):
                layers.append(reader)
            else:
                problem = Refused(f"it also feeds {reader.op} '{reader.name}'")
    if not branched and not any(m.op == "Transpose" or m.op in POOLS for m in movers):
        return []  # one plain path: the rules for a BN before a conv or FC take it
    pattern = f"BatchNormalization+data movement+{len(layers)} x " + "/".join(sorted({n.op for n in layers}))
    try:
        if problem is not None:
            raise problem
        scale, shift = inference_bn(graph, node)
        replaced = _fold_into_layers(graph, node, movers, layers, scale, shift)
    except Refused as refused:
        graph.discard()  # the layers written before the one that cannot take it
        if not after_pool:  # after a pool, fold_affine takes it (or says why not)
            log.refused(node, refused.within("BatchNormalization before several layers not folded"), pattern)
        return []
    graph.add_rewire(out, node.inputs[0])
    return replaced if log.rewrote(pattern, replaced) else []


def _fold_into_layers(graph: Graph, node: Node, movers: list[Node], layers: list[Node], scale: np.ndarray,
                      shift: np.ndarray) -> list[Node]:
    """Writes each layer with the BN folded into it; the nodes replaced (the BN, the layers, the
    bias Adds of MatMuls); raises Refused where one cannot take it."""
    shape = Graph.static_shape(node.outputs[0])
    if shape is None or len(shape) < 2 or np.prod(shape) > MAX_PROBED:
        raise Refused("its output's shape is not static" if shape is None else "its output is not (N, C, ...)")
    channels = {node.outputs[0].name: np.broadcast_to(
        np.arange(shape[1], dtype=np.float64).reshape((1, -1) + (1,) * (len(shape) - 2)), shape)}
    for mover in graph.in_order(movers):
        numbers = channels[mover.inputs[0].name]
        if mover.op in POOLS:
            pads = attr(mover, "pads", [])
            if any(pads) or attr(mover, "ceil_mode", 0) or attr(mover, "auto_pad", "NOTSET") not in (
                    "NOTSET", "VALID", b"NOTSET", b"VALID"):
                raise Refused(f"{mover.op} '{mover.name}' pads its input")
            if numbers.ndim < 3 or np.any(numbers != numbers[(slice(None),) * 2 + (slice(0, 1),) * (numbers.ndim - 2)]):
                raise Refused(f"{mover.op} '{mover.name}' averages over several channels of the BatchNormalization")
        try:
            channels[mover.outputs[0].name] = evaluate(graph, [mover], {mover.inputs[0].name: np.ascontiguousarray(
                numbers)}, mover.outputs[0])
        except Exception as exc:  # its shapes are computed, or the evaluators cannot run it: said
            raise Refused(f"the data movement '{mover.name}' could not be run on channel numbers",
                          f"{type(exc).__name__}: {first_line(exc)}") from exc
    replaced = [node]
    for layer in layers:
        numbers = channels[layer.inputs[0].name]
        axis = 1 if layer.op == "Conv" else numbers.ndim - 1
        moved = np.moveaxis(numbers, axis, -1).reshape(-1, numbers.shape[axis])
        if np.any(moved != moved[:1]):
            raise Refused(f"an input channel of {layer.op} '{layer.name}' mixes channels of the BatchNormalization")
        index = moved[0].astype(np.int64)
        replaced += _scaled_layer(graph, layer, scale[index], shift[index])
    return replaced


def _scaled_layer(graph: Graph, layer: Node, scale: np.ndarray, shift: np.ndarray) -> list[Node]:
    """Writes ``layer`` reading x * scale + shift (per input channel) from x; the nodes it replaces."""
    if layer.op == "Conv":
        form = conv_form(graph, layer)
        if form is None:
            raise Refused(f"Conv '{layer.name}' has no constant weight")
        g = form.geometry
        if any(g["pads"]) and np.any(shift):
            raise Refused(f"Conv '{layer.name}' reads zero padding, where the shift would be missing")
        weight = algebra.scale_conv_input(form.weight, g["group"], scale)
        bias = form.bias + algebra.input_shift_bias(form.weight, g["group"], shift)
        attrs = {"kernel_shape": list(g["kernel"]), "strides": list(g["strides"]), "dilations": list(g["dilations"]),
                 "pads": list(g["pads"]), "group": g["group"]}
        graph.emit_layer("Conv", layer.inputs[0], weight, bias, layer.outputs[0], attrs, layer.name, form.dtype)
        return [layer]
    fc = fc_form(graph, layer)
    if fc is None:
        raise Refused(f"{layer.op} '{layer.name}' has no constant weight")
    matrix = fc.matrix
    weight, bias = algebra.scale_matrix_weight(matrix, scale, 1), fc.bias + matrix @ shift  # (out, in): the inputs
    if layer.op == "Gemm":
        graph.emit_layer("Gemm", layer.inputs[0], weight, bias, layer.outputs[0], {"transB": 1}, layer.name, fc.dtype)
        return [layer]
    readers = layer.outputs[0].outputs
    add = readers[0] if len(readers) == 1 and readers[0].op == "Add" else None
    own = None
    if add is not None and layer.outputs[0].name not in graph.output_names:
        other = add.inputs[1] if add.inputs[0] is layer.outputs[0] else add.inputs[0]
        own = graph.constant(other)
    if np.any(bias) and (own is None or np.asarray(own).shape[-1:] != bias.shape or np.asarray(own).ndim > 1):
        raise Refused(f"MatMul '{layer.name}' has no bias Add to take the BatchNormalization's shift")
    graph.emit_layer("MatMul", layer.inputs[0], weight.T, None, layer.outputs[0], {}, layer.name, fc.dtype)
    if add is None or own is None:
        return [layer]
    dtype = np.asarray(own).dtype
    total = graph.add_constant(f"{add.name}_bias", (np.asarray(own, np.float64) + bias).astype(dtype))
    graph.add_node("Add", [layer.outputs[0], total], [add.outputs[0]], {}, add.name)
    return [layer, add]


def _compose_conv(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    try:
        form, note = conv_chain(graph, node)
    except Refused:
        return []  # not an exact conv: the rules that would fold or merge it say why
    if note:
        log.refused(node, note, f"{node.op} chain")
    if form is None or len(form.nodes) == 1:
        return []
    pattern = "+".join(n.op for n in reversed(form.nodes))
    pads = form.geometry["pads"]
    if min(pads) < 0:
        log.refused(node, Refused(f"composing would need negative pads {list(pads)}"), pattern)
        return []
    before = sum(_macs(graph, n) for n in form.nodes)
    after = _macs(graph, node, form.weight)
    if after > before:
        log.refused(node, Refused("composing would add work", f"{after} multiply-adds per image, {before} now"),
                    pattern)
        return []
    g = form.geometry
    attrs: dict[str, object] = {"kernel_shape": list(g["kernel"]), "strides": list(g["strides"]),
             "dilations": list(g["dilations"]), "pads": list(pads)}
    if node.op == "AveragePool" and all(n.op in ROUTING_OPS for n in form.nodes[1:]):
        # only padding/reshaping was absorbed: it stays a pool (padding counted, as it was)
        attrs["count_include_pad"] = 1
        if not any(d > 1 for d in g["dilations"]):
            del attrs["dilations"]  # an attribute only since opset 19
        graph.add_node("AveragePool", [form.source], [node.outputs[0]], attrs, node.name)
    else:
        graph.emit_layer("Conv", form.source, form.weight, form.bias, node.outputs[0],
                         {**attrs, "group": g["group"]}, node.name, form.dtype)
    return form.nodes if log.rewrote(pattern, form.nodes) else []


def _compose_matmul(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """A MatMul whose left operand is made of constants (and sizes) maps channels; else it is an
    FC the BN before it may fold into."""
    left = _left_operand(graph, node.inputs[0])
    return _compose_matrix(graph, node, log) if left is None else _channel_matmul(graph, node, log, left)


def _channel_matmul(graph: Graph, node: Node, log: PassLog,
                    left: tuple[list[Node], list[Tensor]]) -> list[Node]:
    """Reshape(W @ Reshape(y, (N, C, S)), (N, K, *spatial)), W a constant (K, C): a map of the
    channels of y (N, C, *spatial), written as a 1x1 Conv (an einsum 'bchw,kc->bkhw' as
    TorchScript writes it: YOLOE's text embeddings applied to its class features). N may be
    symbolic, and the reshapes may read it off Shape: their static sizes fix it by the element
    count. W may be computed from constants and the batch size (YOLOE's embeddings expanded to
    the batch, then normalized): it is taken when it is one matrix repeated for every sample."""
    flat = node.inputs[1]
    flatten = graph.producer(flat)
    readers = node.outputs[0].outputs
    if flatten is None or flatten.op != "Reshape" or len(readers) != 1 or readers[0].op != "Reshape" \
            or graph.shared(flat) is not None or graph.shared(node.outputs[0]) is not None:
        return []
    unflatten, data = readers[0], flatten.inputs[0]
    shape, flat_shape, out_shape = data.shape, flat.shape, unflatten.outputs[0].shape
    if not shape or not flat_shape or not out_shape or len(shape) < 3 \
            or not all(isinstance(d, int) for d in list(shape[1:]) + list(out_shape[1:])):
        return []
    weight = _per_sample(graph, node.inputs[0], *left, shape[0])
    if weight.ndim == 3 and weight.shape[0] == 1:
        weight = weight[0]  # one map for every sample
    channels, spatial = shape[1], list(shape[2:])
    # (N, C, S) and (N, K, *spatial) with C, S, K, spatial static: N is the input's by the count.
    # Sizes the flatten computes (x.flatten(2) reads N and C off Shape) follow from a proved N:
    # the MatMul takes C, and the count S.
    sizes = [channels, int(np.prod(spatial))]
    if weight.ndim != 2 or len(flat_shape) != 3 or list(out_shape[1:]) != [weight.shape[0]] + spatial \
            or weight.shape[1] != channels or any(d != size and (isinstance(d, int) or flat_shape[0] != shape[0])
                                                  for d, size in zip(flat_shape[1:], sizes)):
        return []
    kernel = weight.reshape(weight.shape + (1,) * len(spatial))
    graph.emit_layer("Conv", data, kernel, None, unflatten.outputs[0], {"kernel_shape": [1] * len(spatial)},
                     node.name)
    replaced = [unflatten, node, flatten, *_owned(graph, left[0], node)]
    pattern = "Reshape+MatMul+Reshape" + ("+Expand" if any(n.op == "Expand" for n in left[0]) else "")
    return replaced if log.rewrote(pattern, replaced) else []


def _left_operand(graph: Graph, tensor: Tensor) -> tuple[list[Node], list[Tensor]] | None:
    """(the nodes computing ``tensor`` from constants and the shapes of other tensors, in graph
    order; those other tensors), or None where it reads values the graph computes."""
    found: dict[int, Node] = {}
    shaped: dict[str, Tensor] = {}
    stack = [tensor]
    while stack:
        value = stack.pop()
        node = graph.producer(value)
        if graph.constant(value) is not None or (node is not None and id(node) in found):
            continue
        if node is None or ":" in node.op or node.op in RANDOM_OPS or len(found) == MAX_NODES:  # custom domain
            return None
        found[id(node)] = node
        if node.op in ("Shape", "Size"):
            shaped[node.inputs[0].name] = node.inputs[0]
        else:
            stack.extend(t for t in node.inputs if t.name)
    computed = {t.name for n in found.values() for t in n.outputs}
    return graph.in_order(found.values()), [t for t in shaped.values() if t.name not in computed]


def _per_sample(graph: Graph, tensor: Tensor, nodes: list[Node], shaped: list[Tensor], batch: int | str) -> np.ndarray:
    """The value of ``tensor`` (computed by ``nodes`` from constants and the shapes of ``shaped``)
    for one sample: its value at batch 1, once it is seen to be that value repeated for every
    sample at batch sizes 2 and 3 (the sizes of ``shaped`` being batch-first, the batch of the
    MatMul's data); raises Refused when it is not."""
    if not nodes:
        return graph.value(tensor)
    for t in shaped:
        if not t.shape or t.shape[0] != batch or not all(isinstance(d, int) for d in t.shape[1:]):
            raise Refused("the MatMul's constant operand is computed from sizes other than the batch's",
                          f"'{tensor.name}' reads the shape of '{t.name}' {list(t.shape or [])}")
    values = []
    for size in (1, PROBE_BATCH, PROBE_BATCH + 1):
        feeds = {t.name: np.zeros((size, *t.shape[1:]), np.dtype(t.dtype)) for t in shaped}
        try:
            values.append(evaluate(graph, nodes, feeds, tensor))
        except Exception as exc:  # neither evaluator runs them: said
            raise Refused("the MatMul's constant operand could not be evaluated",
                          f"{type(exc).__name__}: {first_line(exc)}") from exc
    one = values[0]
    if one.ndim == 0 or one.shape[0] != 1 or one.size > MAX_PROBED or any(
            not np.array_equal(v, np.repeat(one, size, axis=0))
            for v, size in zip(values[1:], (PROBE_BATCH, PROBE_BATCH + 1))):
        raise Refused("the MatMul's constant operand is not one matrix repeated for every sample",
                      f"'{tensor.name}' seen at batch sizes 1, {PROBE_BATCH} and {PROBE_BATCH + 1}")
    return one


def _owned(graph: Graph, nodes: list[Node], reader: Node) -> list[Node]:
    """Those of ``nodes`` whose outputs only ``reader`` and each other read (they go with it)."""
    going, owned = {id(reader)}, []
    outputs = {t.name for t in graph.outputs}
    for node in reversed(nodes):
        if all(t.name not in outputs and all(id(r) in going for r in t.outputs) for t in node.outputs):
            going.add(id(node))
            owned.append(node)
    return owned


def _compose_reshapes(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """Reshape(Reshape(x)) is one Reshape of x to the (static) final shape; so is any chain of
    reshapes and transposes that keeps x's memory order (a Transpose undone by a later one across
    reshapes: YOLO12's area attention with a single area), seen by running the chain on x's
    element numbers (routing.copies)."""
    prior = graph.producer(node.inputs[0])
    shape = Graph.static_shape(node.outputs[0])
    if prior is None or shape is None or 0 in shape or graph.shared(node.inputs[0]):
        return []  # (a 0 in a Reshape target copies the input's size)
    if node.op in RESHAPES and prior.op in RESHAPES:
        source, replaced, pattern = prior.inputs[0], [node, prior], f"{prior.op}+{node.op}"
    elif prior.op in LAYOUT_OPS and not any(r.op in LAYOUT_OPS for r in node.outputs[0].outputs):
        try:
            moved = copies(graph, node.outputs[0])  # the chain ends here: it is read as a whole
        except Refused:
            return []  # data movement that does something: the rules that read it say why
        if moved is None or not {n.op for n in moved.nodes} <= LAYOUT_OPS or "Transpose" not in {
                n.op for n in moved.nodes} or not np.array_equal(moved.index.ravel(), np.arange(moved.index.size)):
            return []
        source, pattern = moved.source, "data movement in memory order"
        replaced = [node, *_owned(graph, [n for n in moved.nodes if n is not node], node)]
    else:
        return []
    target = graph.add_constant(f"{node.name}_shape", np.array(shape, np.int64))
    graph.add_node("Reshape", [source, target], [node.outputs[0]], {}, node.name)
    return replaced if log.rewrote(pattern, replaced) else []


LAYOUT_OPS = RESHAPES | {"Transpose"}
POOLS = ("AveragePool", "GlobalAveragePool")  # averages: x * s + t averaged is avg(x) * s + t


def _macs(graph: Graph, node: Node, weight: np.ndarray | None = None) -> int:
    """Multiply-adds per image of a conv-like node (with ``weight`` in its place), or one per
    output element for an elementwise node; unknown sizes count as 1."""
    out_shape = node.outputs[0].shape or ()
    elements = int(np.prod([d for d in out_shape[1:] if isinstance(d, int)] or [1]))
    if weight is None:
        if node.op == "Conv":
            weight = graph.value(node.inputs[1])  # a conv of the chain: its weight is constant
        elif node.op == "AveragePool":
            return elements * int(np.prod(attr(node, "kernel_shape", [1])))
        else:
            return elements
    return elements * int(np.prod(weight.shape[1:]))


def _compose_matrix(graph: Graph, node: Node, log: PassLog) -> list[Node]:
    """FC(BN(y)) = y @ (W * s).T + (W @ t + b) along the feature axis of the FC's input; through a
    Reshape/Flatten of (N, C, ...) to (N, C * rest) the BN's channel values repeat ``rest`` times
    (a pooled BN before a classifier or RepMLP's global perceptron)."""
    data = node.inputs[0]
    if graph.shared(data) is not None:
        return []
    flatten, prior = None, graph.producer(data)
    channels, axis, rank, repeat = None, -1, Graph.rank(data), 1
    if prior is not None and prior.op in ("Reshape", "Flatten"):
        flatten, unflat = prior, prior.inputs[0]
        before, after = Graph.static_shape(unflat), Graph.static_shape(data)
        if graph.shared(unflat) is not None or not before or not after or len(after) != 2 \
                or len(before) < 2 or before[0] != after[0]:
            return []
        channels, rank, repeat = before[1], len(before), int(np.prod(before[2:]))
        axis, prior = 1 - rank, graph.producer(unflat)
    if prior is None or not before_layer(graph, prior):
        return []
    fc = fc_form(graph, node)  # read only now: the weight may be large
    if fc is None:
        return []
    channels = fc.weight.shape[1] if channels is None else channels
    pattern = f"{prior.op}+{flatten.op + '+' if flatten else ''}{node.op}"
    try:
        affine = channel_affine(graph, prior, channels, axis, rank)
    except Refused as refused:
        log.refused(node, refused.within(f"cannot fold {prior.op} into {node.op}"), pattern)
        return []
    if affine is None:
        return []
    scale, shift = np.repeat(affine.scale, repeat), np.repeat(affine.shift, repeat)
    original = fc.matrix
    matrix = algebra.scale_matrix_weight(original, scale, 1)  # (out, in): scales the inputs
    bias = fc.bias + original @ shift
    if node.op == "MatMul" and np.any(bias):
        log.refused(node, Refused(f"folding {prior.op} into MatMul would need a bias Add (no fewer nodes)"), pattern)
        return []
    source = prior.inputs[affine.data_index]
    if flatten is not None:
        flat = graph.add_variable(f"{flatten.name}_out", data)
        graph.add_node(flatten.op, [source] + list(flatten.inputs[1:]), [flat], dict(flatten.attrs), flatten.name)
        source = flat
    if node.op == "Gemm":
        graph.emit_layer("Gemm", source, matrix, bias, node.outputs[0], {"transB": 1}, node.name, fc.dtype)
    else:
        graph.emit_layer("MatMul", source, matrix.T, None, node.outputs[0], {}, node.name, fc.dtype)
    replaced = [node, prior] + ([flatten] if flatten else [])
    return replaced if log.rewrote(pattern, replaced) else []
