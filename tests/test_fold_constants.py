"""fold_constants: subgraphs computed from constants only become constants; nothing else moves."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from conftest import GraphBuilder, ops, rewrite


def weight_plus_identity(b: GraphBuilder, x: str) -> tuple[str, str]:
    """DBB's IdentityBasedConv1x1 as exported: Conv(x, W + I)."""
    w = b.const(b.rand(4, 4, 1, 1), "w")
    eye = b.const(np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1))
    return b.node("Conv", [x, b.node("Add", [w, eye])]), w


def test_weight_sum_is_folded():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y, _ = weight_plus_identity(b, x)
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}
    assert report.passes[0].name == "fold_constants" and report.passes[0].rewrites


def test_shape_arithmetic_is_folded():
    b = GraphBuilder()
    x = b.input("x", [2, 4, 6, 6])
    shape = b.node("Shape", [x])
    flat = b.node("Reshape", [x, b.node("Concat", [b.node("Slice", [shape] + [b.const(np.array([v], np.int64)) for v in (0, 1)]),
                                                     b.const(np.array([-1], np.int64))], axis=0)])
    model, _ = rewrite(b.model([flat]))
    assert ops(model) == {"Reshape": 1}


def test_initializer_that_is_also_an_input_is_not_folded():
    # such an initializer is a default the caller may override at run time
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y, w = weight_plus_identity(b, x)
    model = b.model([y])
    model.graph.input.append(helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, [4, 4, 1, 1]))
    optimized, report = rewrite(model)
    assert ops(optimized) == {"Add": 1, "Conv": 1} and not report.rewrites


def test_constant_nodes_alone_are_no_rewrite():
    b = GraphBuilder()
    x = b.input("x", [1, 4])
    c = b.node("Constant", [], value=helper.make_tensor("v", onnx.TensorProto.FLOAT, [4], [1, 2, 3, 4]))
    model = b.model([b.node("Add", [x, c])])
    optimized, report = rewrite(model)
    assert not report.rewrites and optimized.graph == model.graph
