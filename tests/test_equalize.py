"""equalize (--int8-ready) and split_identity (--keep-identity): exact weight transforms for INT8,
each checked like every rewrite, with the cases that must not be rewritten."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, ops, rewrite
from onnx import numpy_helper

import onnx_reparam
from onnx_reparam import quantize as q
from onnx_reparam.passes.equalize import solve

pytestmark = pytest.mark.quick


def outlier_conv(b: GraphBuilder, x: str, c_in: int, c_out: int, channel: int = 1, gain: float = 50.0,
                 **attrs) -> str:
    """A 3x3 conv whose output channel ``channel`` is ``gain`` times the others (a BN gain folded in)."""
    weight = b.rand(c_out, c_in, 3, 3, scale=0.3)
    weight[channel] *= gain
    return b.conv(x, c_in, c_out, weight=b.const(weight, "w"), pads=[1, 1, 1, 1], **attrs)


def worst_ratio(model: onnx.ModelProto) -> float:
    return max(layer.outlier_ratio for layer in q.describe_weights(model))


def rewrites(report: onnx_reparam.Report, name: str) -> int:
    return sum(len(p.rewrites) for p in report.passes if p.name == name)


def reasons(report: onnx_reparam.Report, name: str) -> list[str]:
    return [r.text for p in report.passes if p.name == name for r in p.refusals]


@pytest.mark.parametrize("between", ["Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "none"])
def test_two_convs_through_a_homogeneous_op(between):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = outlier_conv(b, x, 4, 6)
    if between == "PRelu":
        y = b.node("PRelu", [y, b.const(b.rng.uniform(0.05, 0.3, (6, 1, 1)).astype(np.float32))])
    elif between in ("MaxPool", "AveragePool"):
        y = b.node(between, [y], kernel_shape=[2, 2], strides=[1, 1])
    elif between == "LeakyRelu":
        y = b.node(between, [y], alpha=0.1)
    elif between == "Relu":
        y = b.node(between, [y])
    model = b.model([b.conv(y, 6, 5, 3, pads=[1, 1, 1, 1])])
    before = worst_ratio(onnx_reparam.optimize(model, verify=False)[0])
    out, report = rewrite(model, int8_ready=True)
    assert rewrites(report, "equalize") == 1 and ops(out)["Conv"] == 2
    assert report.verification.passed
    assert worst_ratio(out) < before / 5


def test_conv_global_pool_flatten_gemm_head():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 8, 8])
    y = b.node("Relu", [outlier_conv(b, x, 3, 8, channel=5)])
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    out, report = rewrite(b.model([b.node("Gemm", [y, b.const(b.rand(10, 8)), b.const(b.rand(10))], transB=1)]),
                          int8_ready=True)
    assert rewrites(report, "equalize") == 1 and ops(out)["Gemm"] == 1


def test_reduce_mean_head_and_matmul_consumer():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.node("Relu", [outlier_conv(b, x, 3, 8, channel=2)])
    y = b.node("ReduceMean", [y, b.const(np.array([2, 3]))], keepdims=0)
    out, report = rewrite(b.model([b.node("MatMul", [y, b.const(b.rand(8, 4))])], opset=18), int8_ready=True)
    assert rewrites(report, "equalize") == 1 and ops(out)["MatMul"] == 1


def test_gemm_relu_gemm_and_grouped_consumer():
    b = GraphBuilder()
    x = b.input("x", [3, 6])
    w = b.rand(8, 6)
    w[3] *= 40
    y = b.node("Relu", [b.node("Gemm", [x, b.const(w), b.const(b.rand(8))], transB=1)])
    out, report = rewrite(b.model([b.node("Gemm", [y, b.const(b.rand(8, 2))])]), int8_ready=True)
    assert rewrites(report, "equalize") == 1
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = b.node("Relu", [outlier_conv(b, x, 4, 8, channel=6)])
    out, report = rewrite(b.model([b.conv(y, 8, 8, 3, groups=8, pads=[1, 1, 1, 1])]), int8_ready=True)
    assert rewrites(report, "equalize") == 1 and ops(out)["Conv"] == 2


def test_a_chain_is_one_rewrite_and_a_second_run_changes_nothing():
    b = GraphBuilder()
    y = b.input("x", [1, 4, 8, 8])
    for c_in, c_out in ((4, 6), (6, 6), (6, 5)):
        y = b.node("Relu", [outlier_conv(b, y, c_in, c_out, channel=c_in % 5)])
    model = b.model([y])
    out, report = rewrite(model, int8_ready=True)
    assert rewrites(report, "equalize") == 1
    _, report = rewrite(out, int8_ready=True)
    assert rewrites(report, "equalize") == 0


def test_float16_model():
    b = GraphBuilder(dtype=np.float16)
    x = b.input("x", [1, 4, 8, 8])
    y = b.node("Relu", [outlier_conv(b, x, 4, 6, gain=20.0)])
    out, report = rewrite(b.model([b.conv(y, 6, 4, 3, pads=[1, 1, 1, 1])]), int8_ready=True)
    assert rewrites(report, "equalize") == 1
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in out.graph.initializer)


@pytest.mark.parametrize("between,reason", [
    ("silu", "Sigmoid, which is not positively homogeneous"),
    ("relu6", "Clip saturates at a fixed value"),
    ("residual", "a residual Add's other input is not a layer's output"),
    ("output", "a value between the layers is a graph output"),
])
def test_must_not_equalize(between, reason):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = outlier_conv(b, x, 4, 4)
    outputs = []
    if between == "silu":
        y = b.node("Mul", [y, b.node("Sigmoid", [y])])
    elif between == "relu6":
        y = b.node("Clip", [y, b.const(np.array(0, np.float32)), b.const(np.array(6, np.float32))])
    elif between == "residual":
        y = b.node("Add", [y, b.node("Relu", [x])])  # a residual sum merge_branches leaves
    else:
        y = b.node("Relu", [y])
        outputs.append(y)
    _, report = rewrite(b.model([b.conv(y, 4, 3, 3, pads=[1, 1, 1, 1])] + outputs), int8_ready=True)
    assert rewrites(report, "equalize") == 0
    assert any(reason in text for text in reasons(report, "equalize")), reasons(report, "equalize")
    assert report.summary() and "equalization" in report.summary()  # named at default verbosity


def test_solver_balances_the_ranges_of_a_link():
    b = GraphBuilder()
    x = b.input("x", [1, 2, 4, 4])
    y = b.node("Relu", [outlier_conv(b, x, 2, 3, channel=0, gain=100.0)])
    model = b.model([b.conv(y, 3, 2, 1)])
    out, _ = rewrite(model, int8_ready=True)
    first, second = (numpy_helper.to_array(t).astype(np.float64) for t in out.graph.initializer
                     if t.dims and len(t.dims) == 4)
    out_range = np.abs(first).reshape(3, -1).max(axis=1)
    in_range = np.abs(second).transpose(1, 0, 2, 3).reshape(3, -1).max(axis=1)
    np.testing.assert_allclose(out_range, in_range, rtol=1e-2)
    assert solve({}, []) == 1


def test_equalize_is_asked_for():
    b = GraphBuilder()
    x = b.input("x", [1, 2, 4, 4])
    model = b.model([b.node("Relu", [outlier_conv(b, x, 2, 3, channel=0)])])
    assert not any(p.name == "equalize" for p in onnx_reparam.optimize(model, verify=False)[1].passes)
    with pytest.raises(onnx_reparam.ReparamError, match="runs only with int8_ready=True"):
        onnx_reparam.optimize(model, only="equalize")
    with pytest.raises(onnx_reparam.ReparamError, match="keep_identity must be True or False"):
        onnx_reparam.optimize(model, keep_identity="yes")


def identity_conv(b: GraphBuilder, x: str, channels: int, groups: int = 1, gain: float = 40.0, **attrs) -> str:
    """A 3x3 conv with a large centre tap on each channel's own input: an identity BN merged in."""
    weight = b.rand(channels, channels // groups, 3, 3, scale=0.3)
    rows = np.arange(channels)
    weight[rows, rows % (channels // groups), 1, 1] += gain * b.rng.uniform(0.5, 1.5, channels)
    attrs.setdefault("pads", [1, 1, 1, 1])
    return b.conv(x, channels, channels, weight=b.const(weight, "w"), groups=groups, **attrs)


@pytest.mark.parametrize("groups,dilation", [(1, 1), (4, 1), (2, 2)])
def test_split_identity(groups, dilation):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 7, 7])
    y = identity_conv(b, x, 4, groups, dilations=[dilation] * 2, pads=[dilation] * 4)
    out, report = rewrite(b.model([y]), keep_identity=True)
    assert rewrites(report, "split_identity") == 1
    assert ops(out) == {"Conv": 1, "Mul": 1, "Add": 1}
    weight = next(numpy_helper.to_array(t) for t in out.graph.initializer if len(t.dims) == 4)
    assert np.abs(weight).max() < 2.0  # the conv's range is its own weights', not the identity's


@pytest.mark.parametrize("case", ["stride", "off-centre pads", "no outlier", "channels differ", "even kernel"])
def test_must_not_split_identity(case):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    if case == "stride":
        y = identity_conv(b, x, 4, strides=[2, 2])
    elif case == "off-centre pads":  # the centre tap reads the position beside the output's own
        y = identity_conv(b, x, 4, pads=[2, 2, 0, 0])
    elif case == "no outlier":
        y = b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1])
    elif case == "channels differ":
        y = b.conv(x, 4, 6, 3, pads=[1, 1, 1, 1])
    else:
        weight = b.rand(4, 4, 2, 2)
        weight[np.arange(4), np.arange(4), 1, 1] += 50
        y = b.conv(x, 4, 4, weight=b.const(weight), pads=[0, 0, 1, 1])
    out, report = rewrite(b.model([y]), keep_identity=True)
    assert rewrites(report, "split_identity") == 0 and ops(out) == {"Conv": 1}
    if case in ("stride", "off-centre pads"):
        assert any("centre tap does not read the output's own position" in t for t in reasons(report, "split_identity"))


def test_equalize_through_a_kept_identity():
    """After split_identity a block is Add(conv(x), x * d): equalization scales both parts."""
    b = GraphBuilder()
    y = b.input("x", [1, 4, 8, 8])
    y = b.node("Relu", [outlier_conv(b, y, 4, 4, channel=2)])
    for _ in range(2):
        y = b.node("Relu", [identity_conv(b, y, 4)])
    model = b.model([b.conv(y, 4, 3, 1)])
    out, report = rewrite(model, int8_ready=True, keep_identity=True)
    assert rewrites(report, "split_identity") == 2 and rewrites(report, "equalize") == 1
    assert ops(out) == {"Conv": 4, "Mul": 2, "Add": 2, "Relu": 3}
    assert worst_ratio(out) < worst_ratio(model) / 5


def test_through_concat_resize_cast_and_a_constant_div():
    """YOLO necks: layers concatenated along the channels, upsampled, then read by one conv."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    left = b.node("Relu", [outlier_conv(b, x, 3, 4, channel=1)])
    right = b.node("LeakyRelu", [outlier_conv(b, x, 3, 5, channel=4, gain=80.0)], alpha=0.1)
    right = b.node("Div", [right, b.const(np.array(2.0, np.float32))])
    right = b.node("Resize", [b.node("MaxPool", [right], kernel_shape=[2, 2], strides=[2, 2]), "",
                              b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    both = b.node("Concat", [left, right, x], axis=1)
    model = b.model([b.conv(both, 12, 6, 1)])
    model.graph.node.append(onnx.helper.make_node("Shape", [both], ["shape"]))  # reads no value
    model.graph.output.append(onnx.helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [4]))
    out, report = rewrite(model, int8_ready=True)
    assert rewrites(report, "equalize") == 1 and not reasons(report, "equalize")
    assert worst_ratio(out) < worst_ratio(model) / 5


def test_no_refusal_where_no_layer_follows():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.node("Sigmoid", [outlier_conv(b, x, 3, 4)])
    _, report = rewrite(b.model([y]), int8_ready=True)
    assert rewrites(report, "equalize") == 0 and not reasons(report, "equalize")


def test_concat_on_another_axis_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    y = b.node("Concat", [b.node("Relu", [outlier_conv(b, x, 3, 4)]), b.conv(x, 3, 4, 1)], axis=2)
    _, report = rewrite(b.model([b.conv(y, 4, 2, 1)]), int8_ready=True)
    assert any("Concat on another axis" in text for text in reasons(report, "equalize"))


def test_float16_weights_that_would_overflow_are_refused():
    """A nearly-dead channel (tiny weights) with a large bias, read by large weights: dividing the
    channel by s ~ sqrt(1e-4 / 600) puts its bias at ~2e6, past float16's 65504."""
    b = GraphBuilder(dtype=np.float16)
    x = b.input("x", [1, 2, 4, 4])
    weight = b.rand(3, 2, 3, 3, scale=0.3)
    weight[0] = np.float16(1e-4)
    bias = np.array([1000, 0.5, -0.5], np.float16)
    y = b.node("Relu", [b.node("Conv", [x, b.const(weight), b.const(bias)], pads=[1, 1, 1, 1])])
    second = b.rand(2, 3, 1, 1)
    second[:, 0] = np.float16(600)
    _, report = rewrite(b.model([b.conv(y, 3, 2, weight=b.const(second))]), int8_ready=True)
    assert rewrites(report, "equalize") == 0
    assert any("would overflow float16" in text for text in reasons(report, "equalize")), reasons(report, "equalize")


def test_a_residual_stream_takes_one_scale():
    """x1 = x0 + conv2(relu(conv1(x0))): the stem that writes x0 and every conv2 scale the stream's
    channels together; conv1s and the last conv take them (ResNet-like, RepViT's channel mixer)."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    stream = b.node("Relu", [outlier_conv(b, x, 3, 6, channel=2, gain=60.0)])
    for _ in range(2):
        inner = b.node("Relu", [b.conv(stream, 6, 8, 1)])
        stream = b.node("Relu", [b.node("Add", [outlier_conv(b, inner, 8, 6, channel=4, gain=30.0), stream])])
    model = b.model([b.conv(stream, 6, 4, 1)])
    out, report = rewrite(model, int8_ready=True)
    assert rewrites(report, "equalize") == 1 and not reasons(report, "equalize"), reasons(report, "equalize")
    assert worst_ratio(out) < worst_ratio(model) / 4


def test_a_residual_sum_with_a_concat_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    left = b.node("Relu", [outlier_conv(b, x, 3, 2)])
    both = b.node("Concat", [left, b.node("Relu", [b.conv(x, 3, 2, 1)])], axis=1)
    y = b.node("Add", [both, b.node("Relu", [b.conv(x, 3, 4, 1)])])
    _, report = rewrite(b.model([b.conv(y, 4, 2, 1)]), int8_ready=True)
    assert rewrites(report, "equalize") == 0
    assert any("a residual Add and a Concat" in text for text in reasons(report, "equalize")), \
        reasons(report, "equalize")


def test_an_equalized_model_one_channel_off_fails_the_check():
    """The check holds an equalized model as it holds any rewrite: one output channel of a layer
    off by 2e-3 of its scale (a scale not compensated downstream) is caught."""
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = b.node("Relu", [outlier_conv(b, x, 4, 6, channel=3)])
    model = b.model([b.conv(y, 6, 5, 3, pads=[1, 1, 1, 1])])
    equalized, report = rewrite(model, int8_ready=True)
    assert rewrites(report, "equalize") == 1
    assert onnx_reparam.verify(model, equalized).passed
    first = next(t for t in equalized.graph.initializer if tuple(t.dims) == (6, 4, 3, 3))
    weight = numpy_helper.to_array(first).copy()
    weight[3] *= 1 + 2e-3
    first.CopyFrom(numpy_helper.from_array(weight, first.name))
    assert not onnx_reparam.verify(model, equalized).passed
