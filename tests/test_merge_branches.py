"""merge_branches: an Add/Sum/Sub tree of linear branches of one tensor becomes one Conv."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, ops, refusals, rewrite

import onnx_reparam

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def repvgg_block(b: GraphBuilder, x: str, c_in: int, c_out: int, groups=1, stride=1, dilation=1,
                 bias=False, identity=True, rank=2) -> str:
    """BN(Conv kxk) + BN(Conv 1x1) (+ BN(x)), the RepVGG training block without its ReLU."""
    s, d = [stride] * rank, [dilation] * rank
    dense = b.bn(b.conv(x, c_in, c_out, 3, groups, bias, rank, strides=s, dilations=d,
                        pads=[dilation] * 2 * rank), c_out)
    point = b.bn(b.conv(x, c_in, c_out, 1, groups, bias, rank, strides=s), c_out)
    y = b.node("Add", [dense, point])
    return b.node("Add", [y, b.bn(x, c_in)]) if identity else y


@pytest.mark.parametrize("groups,stride,dilation,bias,rank", [
    (g, s, d, bias, r) for g, s, d, bias, r in itertools.product([1, 2, 4], [1, 2], [1, 2], [True, False], [1, 2, 3])
    if not (r == 3 and g == 2)])
def test_repvgg_block_merges_to_one_conv(groups, stride, dilation, bias, rank):
    b = GraphBuilder()
    x = b.input("x", [2, 8] + [9] * rank)
    y = repvgg_block(b, x, 8, 8, groups, stride, dilation, bias, identity=stride == 1, rank=rank)
    model, _report = rewrite(b.model([b.node("Relu", [y])]))
    assert ops(model) == {"Conv": 1, "Relu": 1}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(a.ints) if a.ints else a.i for a in conv.attribute}
    assert attrs["group"] == groups and attrs["kernel_shape"] == [3] * rank
    assert attrs["pads"] == [dilation] * 2 * rank and attrs["strides"] == [stride] * rank


def test_depthwise_block_with_identity():
    b = GraphBuilder()
    x = b.input("x", [1, 6, 8, 8])
    model, _ = rewrite(b.model([repvgg_block(b, x, 6, 6, groups=6)]))
    assert ops(model) == {"Conv": 1}


def test_channel_change_block_has_no_identity_and_merges():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    model, _ = rewrite(b.model([repvgg_block(b, x, 4, 6, identity=False)]))
    assert ops(model) == {"Conv": 1}


def test_sum_node_and_bare_identity_and_mul_scaling():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    k3 = b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1])
    scaled = b.node("Mul", [x, b.const(b.rand(1, 4, 1, 1))])
    model, _ = rewrite(b.model([b.node("Sum", [k3, x, scaled, b.conv(x, 4, 4, 1)])]))
    assert ops(model) == {"Conv": 1}


def test_identity_and_bn_only_become_a_depthwise_conv():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    model, _ = rewrite(b.model([b.node("Add", [x, b.bn(x, 4)])]))
    assert ops(model) == {"Conv": 1}


def test_sub_in_the_tree_is_a_negative_branch():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = b.node("Sub", [b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1]), b.bn(x, 4)])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}


def test_constant_leaf_becomes_bias():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = b.node("Add", [b.node("Add", [b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1]), x]), b.const(b.rand(4, 1, 1))])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}


def test_residual_from_another_tensor_stays_in_the_add():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    other = b.input("r", [1, 4, 6, 6])
    y = b.node("Add", [repvgg_block(b, x, 4, 4), other])
    model, _report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1, "Add": 1}


def test_two_sources_merge_separately():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    z = b.input("z", [1, 4, 6, 6])
    y = b.node("Add", [repvgg_block(b, x, 4, 4), repvgg_block(b, z, 4, 4)])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 2, "Add": 1}


def test_mixed_groups_use_the_gcd():
    b = GraphBuilder()
    x = b.input("x", [1, 8, 6, 6])
    y = b.node("Add", [b.conv(x, 8, 8, 3, groups=4, pads=[1, 1, 1, 1]),
                       b.conv(x, 8, 8, 3, groups=2, pads=[1, 1, 1, 1])])
    model, _ = rewrite(b.model([b.node("Add", [y, x])]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert ops(model) == {"Conv": 1} and next(a.i for a in conv.attribute if a.name == "group") == 2


def test_merge_that_costs_more_multiply_adds_is_refused():
    # groups 4 (3x3) and 2 (1x1) merge only at groups 2: 8*4*9 = 288 MACs per position against
    # 144 + 32 + 8 for the three branches
    b = GraphBuilder()
    x = b.input("x", [1, 8, 6, 6])
    y = b.node("Add", [b.conv(x, 8, 8, 3, groups=4, pads=[1, 1, 1, 1]), b.conv(x, 8, 8, 1, groups=2)])
    model, report = rewrite(b.model([b.node("Add", [y, x])]))
    assert ops(model) == {"Conv": 2, "Add": 2}
    assert any("multiply-adds than the branches (288 vs 184" in r for r in refusals(report))


def test_auto_pad_same_with_known_shape():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 7, 7])
    y = b.node("Add", [b.conv(x, 4, 4, 3, auto_pad="SAME_UPPER"), b.conv(x, 4, 4, 1)])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}


def test_stride_two_pad_disagreement_resolved_by_known_length():
    # On length 8 at stride 2, a 3x3 with pads (1, 0) and a 1x1 with none both give 4 outputs, but
    # they imply end pads 0 and 1 for the merged 3x3: only the known length shows 0 is exact.
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    y = b.node("Add", [b.conv(x, 4, 4, 3, strides=[2, 2], pads=[1, 1, 0, 0]),
                       b.conv(x, 4, 4, 1, strides=[2, 2])])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}


def test_asymmetric_kernels_embed_by_the_general_rule():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 7, 7])
    y = b.node("Sum", [b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1]), b.conv(x, 4, 4, (1, 3), pads=[0, 1, 0, 1]),
                       b.conv(x, 4, 4, (3, 1), pads=[1, 0, 1, 0])])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}


def test_fp16_block():
    b = GraphBuilder(dtype=np.float16)
    x = b.input("x", [1, 4, 6, 6])
    model, _report = rewrite(b.model([repvgg_block(b, x, 4, 4)]))
    assert ops(model) == {"Conv": 1}


# --- must not fire, or only partly ---------------------------------------------------------------

def test_identity_with_stride_two_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 1, 1])  # a 1x1 map keeps the Add legal at stride 2
    model, report = rewrite(b.model([b.node("Add", [b.conv(x, 4, 4, 1, strides=[2, 2]), x])]))
    assert ops(model) == {"Conv": 1, "Add": 1}
    assert any("needs stride 1" in r for r in refusals(report))


def test_different_strides_are_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 1, 1])
    y = b.node("Add", [b.conv(x, 4, 4, 3, strides=[2, 2], pads=[1, 1, 1, 1]),
                       b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1])])
    model, report = rewrite(b.model([y]), skip="conv_into_fc")
    assert ops(model) == {"Conv": 2, "Add": 1}
    assert any("strides differ" in r for r in refusals(report))
    # on a 1x1 input both convs are fully connected maps of the same row: conv_into_fc adds them
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1, "Reshape": 1}


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_dilated_branches_become_sparse_taps_of_the_large_kernel(rank):
    # UniRepLKNet: 7x7 + 3x3 at dilation 3 + 3x3 at dilation 2 + 5x5 -> one 7x7 at dilation 1
    b = GraphBuilder()
    x = b.input("x", [1, 4] + [9] * rank)
    branches = [b.conv(x, 4, 4, k, groups=4, rank=rank, pads=[p] * 2 * rank, dilations=[d] * rank)
                for k, d, p in ((7, 1, 3), (3, 3, 3), (3, 2, 2), (5, 1, 2))]
    model, _ = rewrite(b.model([b.node("Sum", branches)]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert ops(model) == {"Conv": 1}
    assert {a.name: list(a.ints) for a in conv.attribute}["dilations"] == [1] * rank


def test_dilations_with_a_common_factor_keep_it():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 13, 13])
    y = b.node("Add", [b.conv(x, 4, 4, 5, pads=[4] * 4, dilations=[2, 2]),
                       b.conv(x, 4, 4, 3, pads=[4] * 4, dilations=[4, 4])])
    model, _ = rewrite(b.model([y]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(a.ints) for a in conv.attribute}
    assert ops(model) == {"Conv": 1} and attrs["dilations"] == [2, 2] and attrs["kernel_shape"] == [5, 5]


def test_dilated_merge_that_grows_the_kernel_is_refused():
    # 3x3 + 3x3 at dilation 2 would be a 5x5 of 400 taps against 144 + 144
    b = GraphBuilder()
    x = b.input("x", [1, 4, 9, 9])
    y = b.node("Add", [b.conv(x, 4, 4, 3, pads=[2, 2, 2, 2], dilations=[2, 2]),
                       b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1])])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 2, "Add": 1}
    assert any("multiply-adds than the branches (400 vs 288" in r for r in refusals(report))


def test_offset_not_on_the_dilated_grid_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 9, 9])
    y = b.node("Add", [b.conv(x, 4, 4, 3, pads=[1, 1, 3, 3], dilations=[2, 2]),
                       b.conv(x, 4, 4, 1)])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 2, "Add": 1}
    assert any("non-multiple of dilation" in r for r in refusals(report))


def test_identity_with_channel_change_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = b.node("Add", [b.conv(x, 4, 1, 3, pads=[1, 1, 1, 1]), x])  # broadcasts over channels
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1, "Add": 1}
    assert any("channel counts differ" in r for r in refusals(report))


def test_unknown_length_with_disagreeing_end_pads_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 4, "H", "W"])
    y = b.node("Add", [b.conv(x, 4, 4, 3, strides=[2, 2], pads=[1, 1, 0, 0]),
                       b.conv(x, 4, 4, 1, strides=[2, 2])])
    model, report = rewrite(b.model([y]), input_shapes={"x": (1, 4, 8, 8)})
    assert ops(model) == {"Conv": 2, "Add": 1}
    assert any("input length is unknown" in r for r in refusals(report))


def test_branch_output_that_is_a_graph_output_stays_apart():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    k3 = b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1])
    k1 = b.conv(x, 4, 4, 1)
    y = b.node("Add", [b.node("Add", [k3, k1]), x])
    model, report = rewrite(b.model([y, k1]))
    assert ops(model) == {"Conv": 2, "Add": 1}  # 3x3 + identity merged, 1x1 kept for its reader
    assert any("kept apart" in r and "graph output" in r for r in refusals(report))


def test_inner_add_read_elsewhere_is_a_leaf():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    inner = b.node("Add", [b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1]), b.conv(x, 4, 4, 1)])
    outer = b.node("Add", [inner, b.bn(x, 4)])
    model, _report = rewrite(b.model([outer, b.node("Relu", [inner])]))
    assert ops(model)["Conv"] == 1 and ops(model)["Add"] == 1  # inner merged; outer keeps BN + it
    assert ops(model)["BatchNormalization"] == 1


def test_shared_weights_between_branches_and_elsewhere():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    w = b.const(b.rand(4, 4, 3, 3))
    y = b.node("Add", [b.conv(x, 4, 4, 3, weight=w, pads=[1, 1, 1, 1]), x])
    other = b.conv(x, 4, 4, 3, weight=w, pads=[1, 1, 1, 1], bias=False)
    model, _ = rewrite(b.model([y, other]))
    assert ops(model) == {"Conv": 2}
    assert w in {n.input[1] for n in model.graph.node}


def test_add_of_unrelated_tensors_is_silent():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    z = b.input("z", [1, 4, 6, 6])
    _model, report = rewrite(b.model([b.node("Add", [b.conv(x, 4, 4, 1), b.conv(z, 4, 4, 1)])]))
    assert report.rewrites == 0 and not refusals(report)


def test_average_pool_branch_is_a_depthwise_kernel():
    # DBB's depthwise form: kxk conv + BN(AvgPool(x)) + x
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    pool = b.bn(b.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), 4)
    y = b.node("Sum", [b.bn(b.conv(x, 4, 4, 3, groups=4, pads=[1, 1, 1, 1]), 4), pool, x])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 1}


@pytest.mark.parametrize("crop", [1, 2])
def test_acnet_branches_reading_crops_merge_as_negative_pads(crop):
    # K=5, p = 2 - crop: the 1x5 branch reads rows [crop, H - crop) with pads (0, p), the 5x1
    # branch columns [crop, W - crop) with pads (p, 0)
    b = GraphBuilder()
    x = b.input("x", [1, 4, 9, 9])
    p = 2 - crop

    def cropped(axis):
        return b.node("Slice", [x] + [b.const(np.array(v, np.int64)) for v in ([crop], [-crop], [axis])])

    square = b.bn(b.conv(x, 4, 4, 5, pads=[p] * 4), 4)
    hor = b.bn(b.conv(cropped(2), 4, 4, (1, 5), pads=[0, p, 0, p]), 4)
    ver = b.bn(b.conv(cropped(3), 4, 4, (5, 1), pads=[p, 0, p, 0]), 4)
    model, _ = rewrite(b.model([b.node("Add", [b.node("Add", [square, hor]), ver])]))
    assert ops(model) == {"Conv": 1}


def test_crop_padded_again_by_the_branch_is_refused():
    # the branch pads its cropped input with zeros where the source has data: not the same conv
    b = GraphBuilder()
    x = b.input("x", [1, 4, 9, 9])
    cropped = b.node("Slice", [x] + [b.const(np.array(v, np.int64)) for v in ([1], [-1], [2])])
    y = b.node("Add", [b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1]), b.conv(cropped, 4, 4, (1, 3), pads=[1, 1, 1, 1])])
    model, _report = rewrite(b.model([y]), verify=False)
    assert ops(model)["Conv"] == 2


@pytest.mark.parametrize("trans_b,alpha,beta", [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_parallel_gemm_heads_averaged_become_one_gemm(trans_b, alpha, beta):
    b = GraphBuilder()
    x = b.input("x", [3, 6])

    def head():
        w = b.rand(5, 6) if trans_b else b.rand(6, 5)
        return b.node("Gemm", [x, b.const(w), b.const(b.rand(5))], transB=trans_b, alpha=alpha, beta=beta)

    y = b.node("Div", [b.node("Add", [head(), head()]), b.const(np.array(2.0, np.float32))])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Gemm": 1}


def test_fc_residual_tree_with_sub_and_bn():
    # fc(x) + x - BN(x) on (N, C): all linear in x, one Gemm
    b = GraphBuilder()
    x = b.input("x", [3, 6])
    fc = b.node("Gemm", [x, b.const(b.rand(6, 6)), b.const(b.rand(6))], transB=1)
    model, _ = rewrite(b.model([b.node("Sub", [b.node("Add", [fc, x]), b.bn(x, 6)])]))
    assert ops(model) == {"Gemm": 1}


def test_matmul_heads_on_tokens_keep_matmul_and_bias():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 6])
    heads = [b.node("Add", [b.node("MatMul", [x, b.const(b.rand(6, 4))]), b.const(b.rand(4))]) for _ in range(3)]
    model, _ = rewrite(b.model([b.node("Sum", heads)]))
    assert ops(model) == {"MatMul": 1, "Add": 1}


def test_fc_tree_with_bn_over_a_non_feature_axis_is_refused():
    b = GraphBuilder()
    x = b.input("x", [2, 6, 6])  # BN normalizes axis 1, the MatMul's features are axis 2
    y = b.node("Add", [b.node("MatMul", [x, b.const(b.rand(6, 6))]), b.bn(x, 6)])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"MatMul": 1, "BatchNormalization": 1, "Add": 1}
    assert any("not the feature axis" in r for r in refusals(report))


def test_gemm_with_trans_a_is_not_a_branch():
    b = GraphBuilder()
    x = b.input("x", [6, 3])
    y = b.node("Add", [b.node("Gemm", [x, b.const(b.rand(6, 5))], transA=1),
                       b.node("Gemm", [x, b.const(b.rand(6, 5))], transA=1)])
    model, _ = rewrite(b.model([y]))
    assert ops(model) == {"Gemm": 2, "Add": 1}


def test_a_dynamic_batch_does_not_stop_a_merge_that_needs_the_spatial_sizes():
    # stride 2 with end pads that agree only for this input length, and auto_pad SAME: both need
    # H and W, which are static; the batch is not needed and stays symbolic
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 8, 8])
    keras_like = b.conv(x, 4, 4, 3, strides=[2, 2], pads=[0, 0, 1, 1])
    y = b.node("Add", [keras_like, b.conv(x, 4, 4, 1, strides=[2, 2])])
    same = b.node("Add", [b.conv(x, 4, 4, 3, auto_pad="SAME_UPPER"), b.conv(x, 4, 4, 1)])
    model, report = rewrite(b.model([y, same]))
    assert ops(model) == {"Conv": 2} and not refusals(report)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_a_refusal_for_an_unknown_spatial_size_names_the_axis_and_its_symbol():
    b = GraphBuilder()
    x = b.input("x", ["N", 4, "H", 8])
    y = b.node("Add", [b.conv(x, 4, 4, 3, strides=[2, 2], pads=[0, 0, 1, 1]), b.conv(x, 4, 4, 1, strides=[2, 2])])
    report = onnx_reparam.inspect(b.model([y]))
    assert any(r.startswith("branches not merged: axis 2 (symbolic size 'H'): end pads")
               for r in refusals(report)), refusals(report)


def test_a_computed_addend_that_broadcasts_the_sum_leaves_the_merged_branch_its_own_shape():
    # found by the fuzz harness: an If's (2, C, 1, 1) value added to (1, C, H, W) branches; the
    # merged branch was declared (2, C, H, W) and the output failed check_model's shape inference
    b = GraphBuilder()
    x = b.input("x", [1, 4, 5, 5])
    cond = b.const(np.array(True))
    value = b.const(b.rand(2, 4, 1, 1))
    branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", [value], ["picked"])], "then", [],
                                    [onnx.helper.make_tensor_value_info("picked", onnx.TensorProto.FLOAT, [2, 4, 1, 1])])
    computed = b.node("If", [cond], then_branch=branch, else_branch=branch)
    y = b.node("Add", [b.node("Add", [b.conv(x, 4, 4, 3, pads=[1] * 4), b.conv(x, 4, 4, 1)]), computed])
    model, _ = rewrite(b.model([y]), verify=False)
    onnx.checker.check_model(model, full_check=True)
    assert ops(model)["Conv"] == 1


@pytest.mark.parametrize("read_elsewhere", [None, "scale", "conv"])
def test_an_nhwc_identity_branch_beside_transposed_conv_branches_merges(read_elsewhere):
    # tf2onnx without its optimizers: the convs read Transpose(x) and come back through a
    # Transpose; the identity BN is x * s + b on x itself, in the other layout: written on the
    # convs' Transpose(x), it joins them. Where its x * s is read elsewhere too, it is not a branch
    # of x alone, and it stays; where the conv's NHWC value is read elsewhere, no Transpose moves
    # and the merge says why
    b = GraphBuilder()
    x = b.input("x", [1, 6, 6, 4])

    def conv_branch(k: int) -> str:
        nchw = b.node("Transpose", [x], perm=[0, 3, 1, 2])
        return b.node("Transpose", [b.conv(nchw, 4, 4, k, pads=[k // 2] * 4)], perm=[0, 2, 3, 1])
    scaled = b.node("Mul", [x, b.const(b.rand(4) + 0.5)])
    identity = b.node("Add", [scaled, b.const(b.rand(4))])
    wide = conv_branch(3)
    y = b.node("Relu", [b.node("Add", [b.node("Add", [wide, conv_branch(1)]), identity])])
    extra = {None: [], "scale": [b.node("Sigmoid", [scaled])], "conv": [b.node("Sigmoid", [wide])]}[read_elsewhere]
    model, report = rewrite(b.model([y, *extra]))
    if read_elsewhere is None:
        assert ops(model) == {"Transpose": 2, "Conv": 1, "Relu": 1}
        return
    assert ops(model)["Mul"] == 1 and report.verification.passed and not report.dropped
    if read_elsewhere == "conv":
        assert any("a Mul branch is kept apart: the Conv branch of the same tensor reaches the sum through data "
                   "movement (another layout)" in r for r in refusals(report)), refusals(report)
