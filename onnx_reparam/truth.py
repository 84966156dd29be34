"""The float64 evaluation of a model ("truth"): the same graph and weights with every float type
widened to double (weights, inputs, Cast targets, constants), run by onnx's reference evaluator,
which has every standard op; the slow ones run as truth_ops.FAST_OPS, float64 kernels of our own.

The check holds both models to this evaluation: a rewrite is good when it is no further from it
than the model the user exported. ``evaluate`` raises NoTruth, with the reason, where it cannot be
computed (an op the evaluator lacks, a custom domain, random ops, weights over the size limit).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .compare import is_float
from .errors import first_line
from .model_io import read_array, sparse_array, tensor_bytes
from .truth_ops import FAST_OPS

NARROW_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16} | {
    value for name, value in TensorProto.DataType.items() if name.startswith(("FLOAT8", "FLOAT4"))}
WEIGHT_LIMIT = 1 << 30  # bytes of weights: a bigger model's float64 copy would cost twice that again
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
GRID_SAMPLE_MODES = {b"bilinear": b"linear", b"bicubic": b"cubic"}
DTYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype"}  # ops whose output type is an attribute


class NoTruth(Exception):
    """The float64 evaluation cannot be computed; the message says why."""


def widened(model: onnx.ModelProto, jitter: float = 0.0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(the model with every float type widened to double and its initializers turned into
    inputs, the initializers' values in float64 by name). The weights are fed, not copied into
    a second model. ``jitter``: each float weight is multiplied by 1 + jitter * u, u uniform in
    [-1/2, 1/2] (seeded): weights as far off as one rounding to a type of that roundoff."""
    graph = model.graph
    for node in _all_nodes(graph):
        if node.op_type in RANDOM_OPS:
            raise NoTruth(f"it draws random numbers ({node.op_type} '{node.name}')")
    weights = {t.name: _wide(read_array(t)) for t in graph.initializer}
    weights.update((t.values.name, _wide(sparse_array(t))) for t in graph.sparse_initializer)
    if jitter:
        rng = np.random.default_rng(0)
        weights = {name: w * (1 + jitter * (rng.random(w.shape) - 0.5)) if w.dtype == np.float64 else w
                   for name, w in weights.items()}
    inputs = [_wide_value(v) for v in graph.input if v.name not in weights]
    inputs += [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                                  array.shape) for name, array in weights.items()]
    wide_graph = onnx.helper.make_graph([_wide_node(n) for n in graph.node], graph.name, inputs,
                                        [_wide_value(v) for v in graph.output])
    wide = onnx.helper.make_model(wide_graph, opset_imports=list(model.opset_import))
    wide.ir_version = model.ir_version
    for function in model.functions:
        copy = wide.functions.add()
        copy.CopyFrom(function)
        del copy.node[:]
        copy.node.extend(_wide_node(n) for n in function.node)
    return wide, weights


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _all_nodes(sub)


def _wide(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if is_float(array.dtype) else array


def _wide_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    if copy.type.tensor_type.elem_type in NARROW_FLOATS:
        copy.type.tensor_type.elem_type = TensorProto.DOUBLE
    return copy


def _wide_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for a in copy.attribute:
        if a.type == onnx.AttributeProto.INT and a.name == DTYPE_ATTRIBUTES.get(copy.op_type) and a.i in NARROW_FLOATS:
            a.i = TensorProto.DOUBLE
        elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type in NARROW_FLOATS:
            a.t.CopyFrom(numpy_helper.from_array(_wide(numpy_helper.to_array(a.t)), a.t.name))
        elif a.type == onnx.AttributeProto.FLOAT and copy.op_type == "Constant" and a.name == "value_float":
            a.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(np.float64(a.f))))
        elif a.type == onnx.AttributeProto.GRAPH:
            _widen_subgraph(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for g in a.graphs:
                _widen_subgraph(g)
    if copy.op_type == "GridSample":  # opset 16's spelling of its modes; the evaluator knows opset 20's
        for a in copy.attribute:
            if a.name == "mode" and a.s in GRID_SAMPLE_MODES:
                a.s = GRID_SAMPLE_MODES[a.s]
    if copy.op_type == "ConstantOfShape" and not any(a.name == "value" for a in copy.attribute):
        copy.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.zeros(1))))
    return copy


def _widen_subgraph(graph: onnx.GraphProto) -> None:
    """A body of If/Loop/Scan, widened in place (the node holding it is already a copy)."""
    for t in graph.initializer:
        if t.data_type in NARROW_FLOATS:
            t.CopyFrom(numpy_helper.from_array(_wide(numpy_helper.to_array(t)), t.name))
    for values in (graph.input, graph.output, graph.value_info):
        for v in values:
            v.CopyFrom(_wide_value(v))
    nodes = [_wide_node(n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


class Evaluation:
    """The float64 evaluation of ``names`` (graph outputs or intermediate tensors), ready to run
    on one input set at a time. ``jitter``: with the weights moved as by one rounding (see
    ``widened``). Raises NoTruth when it cannot be made."""

    def __init__(self, model: onnx.ModelProto, names: list[str], jitter: float = 0.0):
        weight_bytes = sum(map(tensor_bytes, model.graph.initializer))
        if weight_bytes > WEIGHT_LIMIT:
            raise NoTruth(f"its weights ({weight_bytes / (1 << 30):.1f} GiB) are over the "
                          f"{WEIGHT_LIMIT >> 30} GiB a float64 copy is made for")
        from onnx.reference import ReferenceEvaluator
        wide, self.weights = widened(model, jitter)
        self.names = names
        try:
            self.evaluator = ReferenceEvaluator(wide, new_ops=FAST_OPS)
        except Exception as exc:  # noqa: BLE001 - its message names the op it lacks
            raise NoTruth(f"onnx's reference evaluator cannot run it: {first_line(exc)}") from None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray | None]:
        """The values on one input set; None for a float tensor that did not come out in float64
        (a path the widening cannot reach). Raises NoTruth when the evaluator fails."""
        wide_feeds = {**self.weights, **{k: _wide(np.asarray(v)) for k, v in feeds.items()}}
        try:
            # inf and NaN are values like others here (the comparison handles them): no warnings
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                values = self.evaluator.run(self.names, wide_feeds)
        except Exception as exc:  # noqa: BLE001 - an op the evaluator lacks for these types, etc.
            raise NoTruth(f"onnx's reference evaluator failed: {first_line(exc)}") from None
        return [v if not is_float(v.dtype) or v.dtype == np.float64 else None for v in map(np.asarray, values)]


def evaluate(model: onnx.ModelProto, feed_sets: list[dict[str, np.ndarray]], names: list[str],
             jitter: float = 0.0) -> list[list[np.ndarray | None]]:
    """The float64 values of ``names`` on each input set (see Evaluation)."""
    evaluation = Evaluation(model, names, jitter)
    return [evaluation.run(feeds) for feeds in feed_sets]
