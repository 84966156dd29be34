"""fold_affine: a per-channel affine op after Conv/ConvTranspose/Gemm/MatMul folds into the layer."""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, ops, refusals, rewrite
from onnx import numpy_helper

import onnx_reparam

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick

GEOMETRIES = list(itertools.product([1, 2, 3], [1, 2], [True, False], [1, 2], [0, 1], [1, 2]))


@pytest.mark.parametrize("rank,groups,bias,stride,pad,dilation", GEOMETRIES)
def test_conv_bn(rank, groups, bias, stride, pad, dilation):
    b = GraphBuilder()
    x = b.input("x", [2, 4] + [7] * rank)
    y = b.conv(x, 4, 6, 3, groups, bias, rank, strides=[stride] * rank, pads=[pad] * 2 * rank,
               dilations=[dilation] * rank)
    model, report = rewrite(b.model([b.bn(y, 6)]))
    assert ops(model) == {"Conv": 1}
    assert report.verification.passed


@pytest.mark.parametrize("groups,bias,stride", list(itertools.product([1, 2, 3], [True, False], [1, 2])))
def test_conv_transpose_bn_per_group_axis(groups, bias, stride):
    b = GraphBuilder()
    x = b.input("x", [1, 6, 5, 5])
    w = b.const(b.rand(6, 12 // groups, 3, 3))
    inputs = [x, w] + ([b.const(b.rand(12))] if bias else [])
    y = b.node("ConvTranspose", inputs, group=groups, strides=[stride, stride], pads=[1, 1, 1, 1])
    model, _ = rewrite(b.model([b.bn(y, 12)]))
    assert ops(model) == {"ConvTranspose": 1}


@pytest.mark.parametrize("trans_b,with_c", list(itertools.product([0, 1], [True, False])))
def test_gemm_bn(trans_b, with_c):
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    w = b.const(b.rand(4, 5) if trans_b else b.rand(5, 4))
    inputs = [x, w] + ([b.const(b.rand(4))] if with_c else [])
    y = b.node("Gemm", inputs, transB=trans_b, alpha=0.5, beta=2.0)
    model, _ = rewrite(b.model([b.bn(y, 4)]))
    assert ops(model) == {"Gemm": 1}


def test_matmul_bias_bn_becomes_matmul_add():
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    y = b.node("Add", [b.node("MatMul", [x, b.const(b.rand(5, 4))]), b.const(b.rand(4))])
    model, _ = rewrite(b.model([b.bn(y, 4)]))
    assert ops(model) == {"MatMul": 1, "Add": 1}


def test_matmul_mul_folds_into_weight_any_rank():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5])
    y = b.node("Mul", [b.node("MatMul", [x, b.const(b.rand(5, 4))]), b.const(b.rand(4))])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"MatMul": 1}


def test_matmul_bias_then_affine_chain_on_3d():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5])
    y = b.node("Add", [b.node("MatMul", [x, b.const(b.rand(5, 4))]), b.const(b.rand(4))])
    y = b.node("Mul", [y, b.const(b.rand(1, 1, 4))])
    model, _ = rewrite(b.model([b.node("Sub", [y, b.const(b.rand(4))])]))
    assert ops(model) == {"MatMul": 1, "Add": 1}


def test_matmul_bias_alone_is_left_silently():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5])
    y = b.node("Add", [b.node("MatMul", [x, b.const(b.rand(5, 4))]), b.const(b.rand(4))])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"MatMul": 1, "Add": 1} and report.rewrites == 0 and not refusals(report)


def test_bn_on_3d_matmul_is_not_the_feature_axis():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5])
    y = b.node("MatMul", [x, b.const(b.rand(5, 4))])
    model, report = rewrite(b.model([b.bn(y, 3)]))
    assert ops(model) == {"MatMul": 1, "BatchNormalization": 1}
    assert any("not the layer's channel axis" in r for r in refusals(report))


@pytest.mark.parametrize("op,const_first", [("Mul", False), ("Mul", True), ("Add", False), ("Add", True),
                                            ("Sub", False), ("Sub", True), ("Div", False)])
@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (1,), ()])
def test_conv_elementwise_constant(op, const_first, shape):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    y = b.conv(x, 3, 6, 3, pads=[1, 1, 1, 1])
    c = b.const(b.rng.uniform(0.5, 1.5, shape).astype(np.float32))
    z = b.node(op, [c, y] if const_first else [y, c])
    model, _ = rewrite(b.model([z]))
    assert ops(model) == {"Conv": 1}


def test_chain_conv_bn_mul_add_folds_completely():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    y = b.bn(b.conv(x, 3, 4, 1, bias=False), 4)
    y = b.node("Add", [b.node("Mul", [y, b.const(b.rand(4, 1, 1))]), b.const(b.rand(1, 4, 1, 1))])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1} and report.rewrites == 3


def test_weights_from_constant_nodes():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    w = b.node("Constant", [], value=numpy_helper.from_array(b.rand(4, 3, 3, 3)))
    model, _ = rewrite(b.model([b.bn(b.node("Conv", [x, w]), 4)]))
    assert ops(model) == {"Conv": 1}


# --- must not fire -------------------------------------------------------------------------------

def test_training_mode_bn_is_left_with_reason():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5, 5])
    model, report = rewrite(b.model([b.bn(b.conv(x, 3, 4), 4, n_out=3, training_mode=1)]), verify=False)
    assert ops(model) == {"Conv": 1, "BatchNormalization": 1}
    assert "BatchNormalization in training mode" in refusals(report)


def test_constant_varying_over_space_is_not_per_channel():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.node("Mul", [b.conv(x, 3, 4, 3, pads=[1, 1, 1, 1]), b.const(b.rand(1, 4, 4, 4))])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1, "Mul": 1}
    assert any("non-channel axis" in r for r in refusals(report))


def test_constant_of_higher_rank_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    y = b.node("Add", [b.conv(x, 3, 4), b.const(b.rand(1, 1, 4, 1, 1))])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1, "Add": 1}
    assert any("larger rank" in r for r in refusals(report))


def test_division_of_constant_by_output_is_not_affine():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    model, report = rewrite(b.model([b.node("Div", [b.const(b.rand(4, 1, 1)), b.conv(x, 3, 4)])]))
    assert ops(model) == {"Conv": 1, "Div": 1} and report.rewrites == 0


def test_division_by_zero_constant_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    c = b.const(np.array([1, 0, 2, 3], np.float32).reshape(4, 1, 1))
    model, report = rewrite(b.model([b.node("Div", [b.conv(x, 3, 4), c])]))
    assert ops(model) == {"Conv": 1, "Div": 1}
    assert "division by a constant with zeros" in refusals(report)


def test_conv_output_that_is_a_graph_output_is_kept():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    y = b.conv(x, 3, 4)
    model, report = rewrite(b.model([b.bn(y, 4), y]))
    assert ops(model) == {"Conv": 1, "BatchNormalization": 1}
    assert any("is a graph output" in r for r in refusals(report))


def test_conv_output_read_elsewhere_is_kept():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    y = b.conv(x, 3, 4)
    model, report = rewrite(b.model([b.bn(y, 4), b.node("Relu", [y])]))
    assert ops(model) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    assert any("is also read by" in r for r in refusals(report))


def test_shared_weight_is_copied_not_edited():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    w = b.const(b.rand(4, 3, 3, 3))
    folded = b.bn(b.conv(x, 3, 4, weight=w, bias=False), 4)
    plain = b.conv(x, 3, 4, weight=w, bias=False)
    model, _ = rewrite(b.model([folded, plain]))
    assert ops(model) == {"Conv": 2}
    weights = {n.input[1] for n in model.graph.node}
    assert w in weights and len(weights) == 2  # the plain conv still reads the original weight


def test_bn_parameters_that_are_graph_inputs_are_not_constants():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    y = b.conv(x, 3, 4)
    params = [b.input(n, [4]) for n in ("g", "beta", "mean", "var")]
    model, report = rewrite(b.model([b.node("BatchNormalization", [y] + params)]), verify=False)
    assert ops(model) == {"Conv": 1, "BatchNormalization": 1}
    assert "BatchNormalization parameters are not constants" in refusals(report)


def test_conv_with_runtime_weight_is_left():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    w = b.input("w", [4, 3, 3, 3])
    model, report = rewrite(b.model([b.bn(b.node("Conv", [x, w]), 4)]), verify=False)
    assert ops(model) == {"Conv": 1, "BatchNormalization": 1} and report.rewrites == 0


def test_fp16_conv_bn_is_computed_in_float64_and_cast_back():
    b = GraphBuilder(dtype=np.float16)
    x = b.input("x", [1, 4, 6, 6])
    model, _report = rewrite(b.model([b.bn(b.conv(x, 4, 8, 3, pads=[1, 1, 1, 1]), 8)]))
    assert ops(model) == {"Conv": 1}
    assert model.graph.initializer[0].data_type == 10  # FLOAT16


@pytest.mark.parametrize("pads,count_include_pad,ceil_mode,folded", [
    ([0, 0, 0, 0], 0, 0, True),
    ([1, 1, 1, 1], 1, 0, True),
    ([1, 1, 1, 1], 0, 0, False),  # the border average divides by fewer taps: not a conv
    ([0, 0, 0, 0], 0, 1, False),
])
def test_average_pool_bn_becomes_a_depthwise_conv(pads, count_include_pad, ceil_mode, folded):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    pool = b.node("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=pads,
                  count_include_pad=count_include_pad, ceil_mode=ceil_mode)
    model, _ = rewrite(b.model([b.bn(pool, 3)]))
    assert ops(model) == ({"Conv": 1} if folded else {"AveragePool": 1, "BatchNormalization": 1})


def test_a_sparse_weight_folds_by_its_dense_value():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 5, 5])
    weight = b.rand(4, 4, 3, 3)
    weight[np.abs(weight) < 0.8] = 0
    model = b.model([b.bn(b.conv(x, 4, 4, 3, bias=False, pads=[1] * 4, weight=b.const(weight, "w")), 4)])
    del model.graph.initializer[[t.name for t in model.graph.initializer].index("w1")]
    where = np.flatnonzero(weight)  # linear indices: onnx-graphsurgeon misreads them
    model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
        numpy_helper.from_array(weight.ravel()[where], "w1"), numpy_helper.from_array(where, "w_indices"), weight.shape))
    optimized, report = rewrite(model)
    assert ops(optimized) == {"Conv": 1} and "float64 evaluation" in report.verification.truth


def bfloat16(array: np.ndarray, name: str) -> onnx.TensorProto:
    return onnx.helper.make_tensor(name, onnx.TensorProto.BFLOAT16, array.shape, array.astype(np.float32).ravel())


def test_bfloat16_layers_fold_without_an_internal_error():
    """onnxruntime's CPU runs no bfloat16 Conv or MatMul; the fold still writes what the input
    model has, in its type, and the values are those of onnx's reference evaluator."""
    rng = np.random.default_rng(0)
    weight, scale, shift = rng.standard_normal((4, 4, 3, 3)), rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4),
             onnx.helper.make_node("BatchNormalization", ["y", "s", "b", "m", "v"], ["z"])]
    bf16 = onnx.TensorProto.BFLOAT16
    graph = onnx.helper.make_graph(nodes, "bf16", [onnx.helper.make_tensor_value_info("x", bf16, [1, 4, 5, 5])],
                                   [onnx.helper.make_tensor_value_info("z", bf16, [1, 4, 5, 5])],
                                   initializer=[bfloat16(a, n) for a, n in ((weight, "w"), (scale, "s"), (shift, "b"),
                                                                          (np.zeros(4), "m"), (np.ones(4), "v"))])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    optimized, report = onnx_reparam.optimize(model, verify=False)
    assert ops(optimized) == {"Conv": 1} and not any("internal error" in r for r in refusals(report))
    assert {t.data_type for t in optimized.graph.initializer} == {bf16}
    from onnx.reference import ReferenceEvaluator
    x = {"x": rng.standard_normal((1, 4, 5, 5)).astype(ml_dtypes.bfloat16)}
    expected, actual = (ReferenceEvaluator(m).run(None, x)[0].astype(np.float32) for m in (model, optimized))
    np.testing.assert_allclose(actual, expected, atol=0.05 * np.abs(expected).max())  # bfloat16: 8 bits


def _levit_linear_bn(b: GraphBuilder, x: str, c_in: int, c_out: int, tokens: int) -> str:
    """LeViT's LinearNorm as TorchScript exports it: MatMul, Flatten(axis=2), BN, Reshape back."""
    flat = b.node("Flatten", [b.node("MatMul", [x, b.const(b.rand(c_in, c_out))])], axis=2)
    return b.node("Reshape", [b.bn(flat, c_out), b.const(np.array([1, tokens, c_out], np.int64))])


def test_bn_after_a_matmul_through_flatten_and_reshape_folds_into_its_weights():
    b = GraphBuilder()
    x = b.input("x", [1, 6, 5])
    model, report = rewrite(b.model([b.node("Relu", [_levit_linear_bn(b, x, 5, 4, 6)])]))
    assert ops(model) == {"MatMul": 1, "Add": 1, "Relu": 1}  # the Flatten/Reshape pair then goes too
    assert report.verification.passed and not refusals(report)


def test_a_per_channel_mul_after_a_transpose_of_a_conv_folds_along_the_moved_axis():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    nhwc = b.node("Transpose", [b.conv(x, 3, 4, 3, pads=[1] * 4)], perm=[0, 2, 3, 1])
    scaled = b.node("Mul", [nhwc, b.const(b.rand(4) + 0.5)])
    model, _ = rewrite(b.model([b.node("Relu", [scaled])]))
    assert ops(model) == {"Conv": 1, "Transpose": 1, "Relu": 1}


def test_data_movement_that_spreads_a_channel_over_several_is_refused():
    # a conv channel's 2x2 map becomes rows of two channels of the BN: no one scale per conv channel
    b = GraphBuilder()
    x = b.input("x", [1, 3, 2, 2])
    moved = b.node("Reshape", [b.conv(x, 3, 4, 1), b.const(np.array([1, 8, 2, 1], np.int64))])
    model, report = rewrite(b.model([b.node("Relu", [b.bn(moved, 8)])]))
    assert ops(model)["BatchNormalization"] == 1
    assert any("spreads a channel of the Conv over several channels of the BatchNormalization" in r
               for r in refusals(report))


def test_a_padding_between_layer_and_bn_is_not_folded_through():
    # the padded zeros would come out of the BN as its shift; folded, they would stay zeros
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    padded = b.node("Pad", [b.conv(x, 3, 4, 1), b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    moved = b.node("Transpose", [padded], perm=[0, 1, 3, 2])
    model, report = rewrite(b.model([b.bn(moved, 4)]))
    assert ops(model)["BatchNormalization"] == 1
    assert any("write values of their own" in r for r in refusals(report))


def test_a_moved_layer_output_read_elsewhere_keeps_its_bn_and_says_why():
    b = GraphBuilder()
    x = b.input("x", [1, 6, 5])
    flat = b.node("Flatten", [b.node("MatMul", [x, b.const(b.rand(5, 4))])], axis=2)
    model, report = rewrite(b.model([b.bn(flat, 4), flat]))
    assert ops(model)["BatchNormalization"] == 1
    assert any("cannot fold BatchNormalization into MatMul through data movement: an inner value is a graph "
               "output" in r for r in refusals(report))


def test_an_nhwc_bias_after_the_back_transpose_folds_into_the_conv():
    # tf2onnx with its optimizers off: Transpose -> Conv -> Transpose -> Add(bias over C) -> Relu
    b = GraphBuilder()
    x = b.input("x", [1, 6, 6, 3])
    conv = b.conv(b.node("Transpose", [x], perm=[0, 3, 1, 2]), 3, 4, 3, bias=False, pads=[1] * 4)
    biased = b.node("Add", [b.node("Transpose", [conv], perm=[0, 2, 3, 1]), b.const(b.rand(4))])
    model, _ = rewrite(b.model([b.node("Relu", [biased])]))
    assert ops(model) == {"Transpose": 2, "Conv": 1, "Relu": 1}


def test_a_bn_through_data_movement_with_a_dynamic_batch_says_static_shape_folds_it():
    b = GraphBuilder()
    x = b.input("x", ["N", 6, 5])
    flat = b.node("Flatten", [b.node("MatMul", [x, b.const(b.rand(5, 4))])], axis=2)
    model = b.model([b.bn(flat, 4)])
    kept, report = rewrite(model, input_shapes={"x": (1, 6, 5)})
    assert ops(kept)["BatchNormalization"] == 1
    assert any("symbolic shape: static_shape=True (--static-shape) fixes the sizes" in r for r in refusals(report))
    folded, _ = rewrite(model, input_shapes={"x": (1, 6, 5)}, static_shape=True)
    assert "BatchNormalization" not in ops(folded)
