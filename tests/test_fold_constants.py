"""fold_constants: subgraphs computed from constants only become constants; nothing else moves."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, ops, rewrite
from onnx import helper, numpy_helper

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


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


def test_castlike_of_a_constant_folds_to_the_type_it_is_cast_like():
    # the dynamo exporter's zero bias: Expand(CastLike(0, x), Shape(weight, start=0, end=1))
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    w = b.const(b.rand(4, 4, 3, 3))
    zero = b.node("CastLike", [b.const(np.array(0, np.int64)), x])
    bias = b.node("Expand", [zero, b.node("Shape", [w], start=0, end=1)])
    model, _ = rewrite(b.model([b.bn(b.node("Conv", [x, w, bias], pads=[1] * 4), 4)]))
    assert ops(model) == {"Conv": 1}
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT}


def test_castlike_of_a_computed_value_and_a_shape_of_dynamic_dims_stay():
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    computed = b.node("CastLike", [b.node("Relu", [x]), x])
    batch = b.node("Shape", [x], start=0, end=1)  # the dynamic batch: not a constant
    model, report = rewrite(b.model([computed, b.node("Cast", [batch], to=onnx.TensorProto.FLOAT)]))
    assert ops(model)["CastLike"] == 1 and ops(model)["Shape"] == 1 and not report.rewrites


def test_a_gather_of_a_static_dim_folds_while_the_batch_is_dynamic():
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    channels = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([1], np.int64))], axis=0)
    target = b.node("Concat", [b.const(np.array([-1], np.int64)), channels], axis=0)
    model, _ = rewrite(b.model([b.node("Reshape", [b.node("Relu", [x]), target])]), input_shapes={"x": (2, 4, 6, 6)})
    assert ops(model) == {"Relu": 1, "Reshape": 1}


def test_a_weight_shared_through_identity_stays_one_weight():
    # TorchScript writes equal weights once, each further reader through an Identity of it
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    first = b.conv(x, 4, 4, 3, pads=[1] * 4)
    model = b.model([first])
    weight = model.graph.node[0].input[1]
    model.graph.node.append(helper.make_node("Identity", [weight], ["shared"]))
    model.graph.node.append(helper.make_node("Conv", ["x", "shared"], ["second"], pads=[1] * 4))
    model.graph.output.append(helper.make_tensor_value_info("second", onnx.TensorProto.FLOAT, [1, 4, 6, 6]))
    optimized, _ = rewrite(model)
    assert ops(optimized) == {"Conv": 2}
    assert [n.input[1] for n in optimized.graph.node if n.op_type == "Conv"] == [weight, weight]
    sizes = [t.ByteSize() for t in optimized.graph.initializer]
    assert sum(sizes) <= sum(t.ByteSize() for t in model.graph.initializer)  # no copy per reader


def _view(b: GraphBuilder, x: str, *sizes) -> str:
    """x.view(batch, *sizes) as TorchScript writes it with a dynamic batch: the batch read off
    Shape(x) with a scalar Gather, Unsqueezed, concatenated with the sizes the export knew."""
    batch = b.node("Gather", [b.node("Shape", [x]), b.const(np.array(0, np.int64))], axis=0)
    pieces = [b.node("Unsqueeze", [batch, b.const(np.array([0], np.int64))])]
    for axis in range(2, 4):  # h and w: a scalar Gather of a static dim
        size = b.node("Gather", [b.node("Shape", [x]), b.const(np.array(axis, np.int64))], axis=0)
        pieces.append(b.node("Unsqueeze", [size, b.const(np.array([0], np.int64))]))
    pieces.insert(1, b.const(np.array(sizes, np.int64)))
    return b.node("Reshape", [x, b.node("Concat", pieces, axis=0)])


def test_a_view_with_a_dynamic_batch_reshapes_to_minus_one_and_its_shape_arithmetic_goes():
    # YOLO heads' x.view(bs, anchors, outputs, ny, nx): the batch becomes -1, ny and nx constants
    b = GraphBuilder()
    x = b.input("x", ["N", 6, 4, 4])
    model, report = rewrite(b.model([_view(b, b.node("Relu", [x]), 2, 3)]), input_shapes={"x": (2, 6, 4, 4)})
    assert ops(model) == {"Relu": 1, "Reshape": 1}
    shape = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == model.graph.node[1].input[1]))
    assert shape.tolist() == [-1, 2, 3, 4, 4]
    assert any(r.pattern == "Reshape to one computed size" for p in report.passes for r in p.rewrites)


def test_a_shape_with_two_computed_sizes_is_left_computed():
    # -1 can stand for one size only: the element count decides no more
    b = GraphBuilder()
    x = b.input("x", ["N", 6, "H", 4])
    batch = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([0], np.int64))], axis=0)
    height = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([2], np.int64))], axis=0)
    target = b.node("Concat", [batch, b.const(np.array([2, 3], np.int64)), height, b.const(np.array([4], np.int64))],
                    axis=0)
    model, report = rewrite(b.model([b.node("Reshape", [b.node("Relu", [x]), target])]),
                            input_shapes={"x": (2, 6, 4, 4)})
    assert ops(model)["Concat"] == 1 and ops(model)["Shape"] >= 1
    assert any("2 sizes of the Reshape's target are computed: -1 stands for one only" in r.text
               for p in report.passes for r in p.refusals)


def test_a_target_with_a_zero_that_copies_a_dim_keeps_its_computed_size():
    # a 0 copies the input's size there: with it, -1 would no longer be the one unknown the count fixes
    b = GraphBuilder()
    x = b.input("x", ["N", 6, 4, 4])
    batch = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([0], np.int64))], axis=0)
    target = b.node("Concat", [batch, b.const(np.array([0, 16], np.int64))], axis=0)
    model, report = rewrite(b.model([b.node("Reshape", [b.node("Relu", [x]), target])]),
                            input_shapes={"x": (2, 6, 4, 4)})
    assert ops(model)["Concat"] == 1
    assert not any(r.pattern == "Reshape to one computed size" for p in report.passes for r in p.rewrites)
