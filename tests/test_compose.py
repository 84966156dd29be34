"""compose: a layer with the padding and pointwise map before it becomes one layer (DBB's
1x1-then-kxk, Pad folded into Conv, BN before Conv/Gemm), only where exact and not costlier."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import GraphBuilder, misdeclare, ops, refusals, rewrite, unverified_output_is_right
from test_routing import border_scatter

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def pad(b: GraphBuilder, x: str, amount: int) -> str:
    return b.node("Pad", [x, b.const(np.array([0, 0, amount, amount] * 2, np.int64))])


def dbb_sequential(b: GraphBuilder, x: str, c: int, border: str = "bias", groups: int = 1,
                   outer_groups: int | None = None, pads: int = 0, bias_zero: bool = False,
                   internal: int | None = None) -> str:
    """1x1 conv -> pad with per-channel values -> 3x3 conv (no padding of its own)."""
    m = internal or c
    b1 = np.zeros(m, np.float32) if bias_zero else b.rand(m)
    inner = b.conv(x, c, m, 1, groups, weight=None, bias=False)
    inner = b.node("Add", [inner, b.const(b1.reshape(1, m, 1, 1))])  # bias as a per-channel Add
    values = {"bias": b1, "zeros": np.zeros(m, np.float32), "other": b1 + 1}[border]
    padded = border_scatter(b, pad(b, inner, 1), (1, m, 8, 8), 1, values)
    return b.conv(padded, m, c, 3, outer_groups or groups, pads=[pads] * 4)


def test_1x1_then_padded_kxk_is_one_conv():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    model, _report = rewrite(b.model([dbb_sequential(b, x, 4)]))
    assert ops(model) == {"Conv": 1}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute if a.ints}["pads"] == [1, 1, 1, 1]


@pytest.mark.parametrize("groups,outer_groups,internal", [(2, 2, 4), (2, 2, 8), (1, 1, 8), (4, 4, 8)])
def test_grouped_sequential_composes_per_group(groups, outer_groups, internal):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = dbb_sequential(b, x, 4, groups=groups, outer_groups=outer_groups, internal=internal)
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}


def test_border_other_than_the_bias_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    model, report = rewrite(b.model([dbb_sequential(b, x, 4, border="other")]))
    assert ops(model)["Conv"] == 2 and ops(model)["ScatterND"] == 1
    assert any("padded with values other than" in r for r in refusals(report))


def test_zero_border_with_non_zero_bias_becomes_conv_padding_only():
    # the zero border is the 3x3 conv's own padding; it still cannot absorb the biased 1x1
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    model, report = rewrite(b.model([dbb_sequential(b, x, 4, border="zeros")]))
    assert ops(model) == {"Conv": 2}
    assert any("non-zero bias" in r for r in refusals(report))


@pytest.mark.parametrize("bias_zero,merged", [(True, True), (False, False)])
def test_kxk_own_zero_padding_needs_a_zero_bias(bias_zero, merged):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    inner = b.conv(x, 4, 4, 1, bias=not bias_zero)
    model, report = rewrite(b.model([b.conv(inner, 4, 4, 3, pads=[1, 1, 1, 1])]))
    assert ops(model) == ({"Conv": 1} if merged else {"Conv": 2})
    if not merged:
        assert any("non-zero bias" in r for r in refusals(report))


def test_groups_that_do_not_compose_are_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 8, 6, 6])
    inner = b.conv(x, 8, 8, 1, groups=2, bias=False)
    model, report = rewrite(b.model([b.conv(inner, 8, 8, 3, groups=4)]))
    assert ops(model) == {"Conv": 2}
    assert any("groups 2 then 4 do not compose" in r for r in refusals(report))


def test_bottleneck_composition_that_adds_work_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 16, 6, 6])
    inner = b.conv(x, 16, 2, 1, bias=False)
    model, report = rewrite(b.model([b.conv(inner, 2, 16, 3)]))
    assert ops(model) == {"Conv": 2}
    assert any("would add work" in r for r in refusals(report))


def test_zero_pad_op_becomes_the_conv_padding():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    model, _ = rewrite(b.model([b.node("Relu", [b.conv(pad(b, b.node("Relu", [x]), 2), 4, 4, 3)])]))
    assert ops(model) == {"Conv": 1, "Relu": 2}


@pytest.mark.parametrize("conv_pads,merged", [([0, 0, 0, 0], False), ([1, 0, 1, 0], False)])
def test_crop_before_a_standalone_conv_stays(conv_pads, merged):
    # a crop alone would need negative conv pads; a crop padded again reads zeros, not data
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    cropped = b.node("Slice", [x] + [b.const(np.array(v, np.int64)) for v in ([1], [-1], [2])])
    model, report = rewrite(b.model([b.conv(cropped, 4, 4, 3, pads=conv_pads)]), verify=False)
    assert ops(model) == {"Conv": 1, "Slice": 1}
    assert refusals(report)


@pytest.mark.parametrize("op,kernel,pads,merged", [
    ("bn", 1, 0, True),
    ("bn", 3, 0, True),  # no padding: every tap reads data
    ("bn", 3, 1, False),  # the shift would meet the zero padding
    ("mul", 1, 0, True),  # a per-channel scale
    ("mul", 3, 1, True),  # a scale meets the zero padding as zero: exact
    ("add", 1, 0, True),  # YOLOv7's ImplicitA: x + a before a 1x1 head conv
    ("add", 3, 1, False),  # the padded zeros would have to be a
    ("scalar", 1, 0, False),  # GELU's x * 0.5: left to onnxruntime's fusion
])
def test_affine_before_conv(op, kernel, pads, merged):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = b.bn(x, 4) if op == "bn" else b.node("Add", [x, b.const(b.rand(1, 4, 1, 1))]) if op == "add" else \
        b.node("Mul", [x, b.const(b.rand(4, 1, 1) + 2 if op == "mul" else np.array(0.5, b.dtype))])
    model, report = rewrite(b.model([b.conv(y, 4, 6, kernel, pads=[pads] * 4)]))
    if merged:
        assert ops(model) == {"Conv": 1}
    elif op in ("bn", "add"):
        assert ops(model) == {"Conv": 1, "BatchNormalization" if op == "bn" else "Add": 1}
        assert any("non-zero bias" in r for r in refusals(report))
    else:
        assert ops(model) == {"Conv": 1, "Mul": 1} and not report.rewrites


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_before_gemm(trans_b):
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    w = b.rand(7, 5) if trans_b else b.rand(5, 7)
    y = b.node("Gemm", [b.bn(x, 5), b.const(w), b.const(b.rand(7))], transB=trans_b, alpha=0.5, beta=2.0)
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Gemm": 1}


def test_bn_before_matmul_would_need_an_add():
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    model, report = rewrite(b.model([b.node("MatMul", [b.bn(x, 5), b.const(b.rand(5, 4))])]))
    assert ops(model) == {"MatMul": 1, "BatchNormalization": 1}
    assert any("would need a bias Add" in r for r in refusals(report))


@pytest.mark.parametrize("op,layer,merged", [("Mul", "MatMul", True), ("Mul", "Gemm", True),
                                              ("Add", "Gemm", True), ("Add", "MatMul", False)])
def test_per_feature_constant_before_an_fc(op, layer, merged):
    # an Add before a MatMul would need a bias Add of its own: no fewer nodes, so it stays (and says so)
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    y = b.node(layer, [b.node(op, [x, b.const(b.rand(5) + 1)]), b.const(b.rand(5, 4))])
    model, report = rewrite(b.model([y]))
    assert ops(model) == ({layer: 1} if merged else {layer: 1, op: 1})
    assert merged or any("would need a bias Add" in r for r in refusals(report))


def test_bn_over_the_wrong_axis_before_matmul_is_refused():
    b = GraphBuilder()
    x = b.input("x", [2, 5, 5])
    y = b.node("MatMul", [b.bn(x, 5), b.const(b.rand(5, 4))])  # BN normalizes axis 1, MatMul reads axis 2
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"MatMul": 1, "BatchNormalization": 1}
    assert any("not the layer's channel axis" in r for r in refusals(report))


def test_reshape_of_a_reshape_is_one_reshape():
    b = GraphBuilder()
    x = b.input("x", [2, 4, 6, 6])
    y = b.node("Reshape", [b.node("Flatten", [x], axis=2), b.const(np.array([2, 144], np.int64))])
    model, _ = rewrite(b.model([b.node("Relu", [y])]))
    assert ops(model) == {"Reshape": 1, "Relu": 1}


def test_pool_reading_a_padded_input_stays_a_pool():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    pool = b.node("AveragePool", [pad(b, b.node("Relu", [x]), 1)], kernel_shape=[3, 3])
    model, _ = rewrite(b.model([pool]))
    assert ops(model) == {"Relu": 1, "AveragePool": 1}


def test_reshape_whose_input_is_read_elsewhere_stays():
    b = GraphBuilder()
    x = b.input("x", [2, 4, 6, 6])
    flat = b.node("Flatten", [x], axis=2)
    y = b.node("Reshape", [flat, b.const(np.array([2, 144], np.int64))])
    model, report = rewrite(b.model([y, b.node("Relu", [flat])]))
    assert ops(model) == {"Flatten": 1, "Reshape": 1, "Relu": 1} and not report.rewrites


def test_reshape_to_a_dynamic_shape_stays():
    b = GraphBuilder()
    x = b.input("x", ["n", 4, 6, 6])
    y = b.node("Reshape", [b.node("Flatten", [x], axis=2), b.const(np.array([-1, 144], np.int64))])
    model, report = rewrite(b.model([y]), input_shapes={"x": (2, 4, 6, 6)})
    assert ops(model) == {"Flatten": 1, "Reshape": 1} and not report.rewrites


def test_pooled_bn_folds_into_the_gemm_through_a_flatten():
    b = GraphBuilder()
    x = b.input("x", [2, 4, 3, 3])
    y = b.node("Gemm", [b.node("Flatten", [b.bn(x, 4)]), b.const(b.rand(5, 36)), b.const(b.rand(5))], transB=1)
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Flatten": 1, "Gemm": 1}


@pytest.mark.parametrize("case", ["batch_moved", "bn_read_elsewhere"])
def test_bn_before_a_flatten_that_is_not_per_sample_stays(case):
    b = GraphBuilder()
    x = b.input("x", [2, 4, 3, 3])
    norm = b.bn(x, 4)
    outputs = []
    if case == "batch_moved":  # (2, 4, 3, 3) -> (4, 18): rows are not samples, features not channels
        flat = b.node("Reshape", [norm, b.const(np.array([4, 18], np.int64))])
        weight = b.rand(5, 18)
    else:
        flat = b.node("Flatten", [norm])
        weight = b.rand(5, 36)
        outputs.append(b.node("Relu", [norm]))
    y = b.node("Gemm", [flat, b.const(weight), b.const(b.rand(5))], transB=1)
    model, _report = rewrite(b.model([y] + outputs), verify=False)
    assert ops(model)["BatchNormalization"] == 1 and ops(model)["Gemm"] == 1


@pytest.mark.parametrize("stride,pads", [(1, 1), (2, 0)])
def test_a_1x1_conv_after_a_conv_is_one_conv(stride, pads):
    # YOLOE-like: class embeddings (D channels) mapped to K < D classes right after the conv
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    embed = b.conv(x, 4, 16, 3, pads=[pads] * 4, strides=[stride] * 2)
    model, report = rewrite(b.model([b.node("Relu", [b.conv(embed, 16, 5, 1)])]))
    assert ops(model) == {"Conv": 1, "Relu": 1}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute if a.ints}["strides"] == [stride] * 2
    assert any(r.pattern == "Conv+Conv" for p in report.passes for r in p.rewrites)


@pytest.mark.parametrize("case", ["widening", "grouped", "shared", "nonlinear", "padded 1x1"])
def test_a_1x1_after_a_conv_that_must_stay(case):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    embed = b.conv(x, 4, 4 if case == "grouped" else 16, 3, 4 if case == "grouped" else 1, pads=[1] * 4)
    middle = b.node("Relu", [embed]) if case == "nonlinear" else embed
    c_in = 4 if case == "grouped" else 16
    head = b.conv(middle, c_in, 64 if case == "widening" else 5, 1, **({"pads": [1] * 4} if case == "padded 1x1" else {}))
    outputs = [head, embed] if case == "shared" else [head]
    model, report = rewrite(b.model(outputs))
    assert ops(model)["Conv"] == 2
    if case == "widening":
        assert any("would add work" in r for r in refusals(report))


def yoloe_head(b: GraphBuilder, x: str, batched: bool = True, spatial_shape=(6, 6)) -> str:
    """Class features -> einsum('bchw,bkc->bkhw') with constant text embeddings, as TorchScript
    writes it (Reshape, MatMul with the constant first, Reshape), then YOLOE's scale and bias."""
    features = b.bn(b.conv(x, 4, 16, 3, pads=[1] * 4), 16)
    flat = b.node("Reshape", [features, b.const(np.array([1, 16, int(np.prod(spatial_shape))], np.int64))])
    text = b.rand(1, 5, 16) if batched else b.rand(5, 16)
    logits = b.node("MatMul", [b.const(text), flat])
    grid = b.node("Reshape", [logits, b.const(np.array([1, 5, *spatial_shape], np.int64))])
    return b.node("Add", [b.node("Mul", [grid, b.const(np.float32(2.5))]), b.const(np.float32(-1.0))])


@pytest.mark.parametrize("batched", [True, False])
def test_text_embeddings_after_the_class_conv_fold_into_it(batched):
    b = GraphBuilder()
    model, report = rewrite(b.model([yoloe_head(b, b.input("x", [1, 4, 6, 6]), batched)]))
    assert ops(model) == {"Conv": 1}
    assert any(r.pattern == "Reshape+MatMul+Reshape" for p in report.passes for r in p.rewrites)


def test_a_matmul_that_is_not_a_map_of_channels_stays():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    flat = b.node("Reshape", [x, b.const(np.array([1, 4, 36], np.int64))])
    over_space = b.node("MatMul", [flat, b.const(b.rand(36, 36))])  # the constant on the right: over positions
    back = b.node("Reshape", [over_space, b.const(np.array([1, 4, 6, 6], np.int64))])
    regrouped = b.node("Reshape", [b.node("MatMul", [b.const(b.rand(4, 4)), flat]),
                                   b.const(np.array([1, 4, 36, 1], np.int64))])  # not the input's grid
    model, _ = rewrite(b.model([back, regrouped]))
    assert ops(model)["MatMul"] == 2


def test_reshapes_merge_by_inferred_shapes_not_a_wrong_declaration():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4])
    first = b.node("Reshape", [x, b.const(np.array([6, 4], np.int64))])
    second = b.node("Reshape", [first, b.const(np.array([4, -1], np.int64))])
    model = misdeclare(b.model([b.node("Relu", [second])]), second, [3, 8])  # it is 4x6
    optimized, report = unverified_output_is_right(model)
    assert ops(optimized) == {"Reshape": 1, "Relu": 1}
    assert f"'{second}' is declared 3x8, inferred 4x6" in " ".join(report.notes)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float64])
def test_a_channel_matmul_on_data_no_conv_takes_stays(dtype):
    b = GraphBuilder(dtype=dtype)
    x = b.input("x", [1, 4, 3, 3])
    flat = b.node("Reshape", [x, b.const(np.array([1, 4, 9], np.int64))])
    mixed = b.node("MatMul", [b.const(np.arange(32).reshape(8, 4).astype(dtype) - 16), flat])
    model = b.model([b.node("Reshape", [mixed, b.const(np.array([1, 8, 3, 3], np.int64))])])
    optimized, report = unverified_output_is_right(model)
    assert ops(optimized) == {"Reshape": 2, "MatMul": 1}  # ONNX has no integer Conv; onnxruntime's CPU no double one
    name = {np.int32: "int32", np.int64: "int64", np.float64: "double"}[dtype]
    assert any(f"onnxruntime cannot run the Conv it would write on {name} data" in r
               for r in refusals(report))


def _batch_of(b: GraphBuilder, x: str) -> str:
    return b.node("Slice", [b.node("Shape", [x]), b.const(np.array([0], np.int64)), b.const(np.array([1], np.int64))])


def test_text_embeddings_expanded_to_a_dynamic_batch_fold_into_the_class_conv():
    # YOLOE exported with a dynamic batch: the (1, K, C) embeddings are Expanded to (N, K, C) only
    # for the MatMul to broadcast them, which it would do anyway; the reshapes read N off Shape
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    features = b.bn(b.conv(x, 4, 16, 3, pads=[1] * 4), 16)
    batch = _batch_of(b, features)
    flat = b.node("Reshape", [features, b.node("Concat", [batch, b.const(np.array([16, 36], np.int64))], axis=0)])
    text = b.node("Expand", [b.const(b.rand(1, 5, 16)),
                             b.node("Concat", [batch, b.const(np.array([5, 16], np.int64))], axis=0)])
    logits = b.node("MatMul", [text, flat])
    grid = b.node("Reshape", [logits, b.node("Concat", [batch, b.const(np.array([5, 6, 6], np.int64))], axis=0)])
    model, report = rewrite(b.model([b.node("Sigmoid", [grid])]), input_shapes={"x": (2, 4, 6, 6)})
    assert ops(model) == {"Conv": 1, "Sigmoid": 1}, report.summary(verbose=True)


def test_a_pad_with_axes_before_a_conv_folds_with_a_dynamic_batch():
    # opset 18's Pad(x, pads, value, axes): shape inference loses the batch's name on the way, so
    # the batch is seen kept at two probe sizes (a Slice of the first sample is not: test_routing)
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    padded = b.node("Pad", [x, b.const(np.array([1, 1, 1, 1], np.int64)), b.const(np.array(0, b.dtype)),
                            b.const(np.array([2, 3], np.int64))])
    model, report = rewrite(b.model([b.conv(padded, 4, 4, 3)], opset=18), input_shapes={"x": (2, 4, 6, 6)})
    assert ops(model) == {"Conv": 1} and report.verification.passed


def _batched_text(b: GraphBuilder, embeddings: np.ndarray, rows: int, mix=None) -> str:
    """The logits of a YOLOE-like head with a dynamic batch on input x:
    ``embeddings`` expanded to (N, rows, C), then ``mix`` (a function of the builder and the
    expanded tensor), then MatMul over the channels of a 1x1 conv's output."""
    x = b.input("x", ["N", 4, 6, 6])
    features = b.conv(x, 4, 16, 1)
    batch = _batch_of(b, features)
    flat = b.node("Reshape", [features, b.node("Concat", [batch, b.const(np.array([16, 36], np.int64))], axis=0)])
    text = b.node("Expand", [b.const(embeddings), b.node("Concat", [batch, b.const(np.array([rows, 16], np.int64))],
                                                                  axis=0)])
    text = mix(b, text) if mix else text
    grid = b.node("Reshape", [b.node("MatMul", [text, flat]),
                              b.node("Concat", [batch, b.const(np.array([rows, 6, 6], np.int64))], axis=0)])
    return grid


def _at_batch_3_as_the_input_model(model, optimized) -> None:
    """The rewrite holds at a batch the check did not run (it runs batch 2)."""
    import onnxruntime as ort
    x = np.random.default_rng(1).standard_normal((3, 4, 6, 6)).astype(np.float32)
    before, after = (ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0] for m in (model, optimized))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def test_embeddings_expanded_beyond_the_batch_fold_as_the_rows_they_repeat():
    # (1, 1, C) expanded to (N, K, C) repeats one row K times for every sample: the map is those
    # K equal rows, the same for every sample
    b = GraphBuilder()
    grid = _batched_text(b, b.rand(1, 1, 16), 5)
    model = b.model([b.node("Sigmoid", [grid])])
    optimized, _ = rewrite(model, input_shapes={"x": (2, 4, 6, 6)})
    assert ops(optimized) == {"Conv": 1, "Sigmoid": 1}
    _at_batch_3_as_the_input_model(model, optimized)


def test_normalized_embeddings_expanded_to_a_dynamic_batch_fold_into_the_class_conv():
    # YOLOE's own export: the expanded embeddings are L2-normalized (ReduceL2, Clip, an Expand to
    # their own shape, Div) before the MatMul: one matrix for every sample, computed from constants
    def normalized(b: GraphBuilder, text: str) -> str:
        norm = b.node("Clip", [b.node("ReduceL2", [text], axes=[-1], keepdims=1), b.const(np.float32(1e-12))])
        return b.node("Div", [text, b.node("Expand", [norm, b.node("Shape", [text])])])

    b = GraphBuilder()
    grid = _batched_text(b, b.rand(1, 5, 16), 5, normalized)
    model = b.model([b.node("Sigmoid", [grid])])
    optimized, report = rewrite(model, input_shapes={"x": (2, 4, 6, 6)})
    assert ops(optimized) == {"Conv": 1, "Sigmoid": 1}, report.summary(verbose=True)
    _at_batch_3_as_the_input_model(model, optimized)


def test_embeddings_that_differ_between_samples_stay():
    # a running sum over the batch makes sample n's map (n + 1) times the first: no one matrix
    b = GraphBuilder()
    grid = _batched_text(b, b.rand(1, 5, 16), 5,
                         lambda b, t: b.node("CumSum", [t, b.const(np.array(0, np.int64))]))
    model = b.model([b.node("Sigmoid", [grid])])
    optimized, report = rewrite(model, input_shapes={"x": (2, 4, 6, 6)})
    assert ops(optimized)["MatMul"] == 1
    assert any("the MatMul's constant operand is not one matrix repeated for every sample" in r
               for r in refusals(report))


@pytest.mark.parametrize("areas,kept", [(1, False), (4, True)])
def test_reshapes_and_transposes_in_memory_order_are_one_reshape(areas, kept):
    # YOLO12's area attention: (1, C, H, W) -> (1, C, HW) -> (1, HW, C) -> (areas, HW/areas, 2, C/2)
    # -> (areas, 2, C/2, HW/areas). With one area the transposes undo each other: the memory order
    # is x's, one Reshape; with four the positions are regrouped, and the chain stays
    b = GraphBuilder()
    x = b.input("x", [1, 8, 4, 4])
    flat = b.node("Reshape", [b.conv(x, 8, 8, 1), b.const(np.array([1, 8, -1], np.int64))])
    rows = b.node("Transpose", [flat], perm=[0, 2, 1])
    split = b.node("Reshape", [rows, b.const(np.array([areas, 16 // areas, 2, 4], np.int64))])
    heads = b.node("Transpose", [split], perm=[0, 2, 3, 1])
    model, report = rewrite(b.model([b.node("Relu", [heads])]))
    expected = {"Conv": 1, "Reshape": 2, "Transpose": 2, "Relu": 1} if kept else {"Conv": 1, "Reshape": 1, "Relu": 1}
    assert ops(model) == expected
    assert any(r.pattern == "data movement in memory order" for p in report.passes for r in p.rewrites) != kept


def _pre_norm_attention(b: GraphBuilder, pool_pads=(0, 0), q_bias: bool = True, extra=None) -> list[str]:
    """NextViT's E-MHSA with a spatial reduction, as TorchScript writes it: a pre-norm BN on
    (1, C, H, W), flattened to tokens (1, N, C) for q; the tokens transposed back, average-pooled
    4 to 1, normalized again (BatchNorm1d) and transposed for k and v (Linear: MatMul + Add)."""
    x = b.input("x", [1, 8, 4, 4])
    norm = b.bn(b.node("Relu", [x]), 8)
    tokens = b.node("Transpose", [b.node("Reshape", [norm, b.const(np.array([1, 8, 16], np.int64))])], perm=[0, 2, 1])

    def linear(t: str, bias: bool = True) -> str:
        product = b.node("MatMul", [t, b.const(b.rand(8, 8))])
        return b.node("Add", [product, b.const(b.rand(8))]) if bias else product
    pooled = b.node("AveragePool", [b.node("Transpose", [tokens], perm=[0, 2, 1])], kernel_shape=[4], strides=[4],
                    pads=list(pool_pads))
    reduced = b.node("Transpose", [b.bn(pooled, 8)], perm=[0, 2, 1])
    outputs = [linear(tokens, q_bias), linear(reduced), linear(reduced)]
    return outputs + ([extra(b, norm)] if extra else [])


def test_a_pre_norm_bn_folds_into_q_and_through_the_pool_into_k_and_v():
    # timm's merge_pre_bn(q, norm1), merge_pre_bn(k, norm1, norm): both BNs go, the pool stays a pool
    b = GraphBuilder()
    model, report = rewrite(b.model(_pre_norm_attention(b)))
    assert ops(model)["BatchNormalization"] == 0 and ops(model)["AveragePool"] == 1 and ops(model)["MatMul"] == 3
    assert "Conv" not in ops(model)
    assert sum(r.pattern.startswith("BatchNormalization+data movement") for p in report.passes for r in p.rewrites) == 2


@pytest.mark.parametrize("case,reason", [
    ("padded pool", "pads its input"),
    ("other reader", "it also feeds Sigmoid"),
    ("no bias", "has no bias Add to take the BatchNormalization's shift"),
])
def test_a_pre_norm_bn_that_cannot_fold_into_every_reader_stays_with_its_reason(case, reason):
    b = GraphBuilder()
    outputs = _pre_norm_attention(b, pool_pads=(1, 1) if case == "padded pool" else (0, 0), q_bias=case != "no bias",
                                  extra=(lambda b, t: b.node("Sigmoid", [t])) if case == "other reader" else None)
    model, report = rewrite(b.model(outputs))
    assert ops(model)["BatchNormalization"] >= 1 and not report.dropped
    assert any(reason in r and "BatchNormalization before several layers not folded" in r for r in refusals(report)), \
        refusals(report)


@pytest.mark.parametrize("pads", [0, 1])
def test_a_bn_read_by_two_convs_folds_into_both_unless_one_reads_padding(pads):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    norm = b.bn(b.node("Relu", [x]), 4)
    pointwise = b.conv(norm, 4, 4, 1)
    flat = b.node("Reshape", [b.node("Reshape", [pointwise, b.const(np.array([1, 4, 36], np.int64))]),
                              b.const(np.array([1, 144], np.int64))])  # a rewrite after: nothing half-written
    model, report = rewrite(b.model([flat, b.conv(norm, 4, 4, 3, pads=[pads] * 4)]))
    assert ops(model)["BatchNormalization"] == pads and ops(model)["Reshape"] == 1 and not report.dropped
    if pads:
        assert any("reads zero padding, where the shift would be missing" in r for r in refusals(report))
