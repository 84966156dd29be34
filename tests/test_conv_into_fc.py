"""conv_into_fc: convs summed with a fully connected layer over the same rows fold into it
(RepMLP's local perceptron into its partition perceptron), only where the data provably match."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import GraphBuilder, ops, refusals, rewrite

import onnx_reparam

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def reshape(b: GraphBuilder, x: str, *shape) -> str:
    """A symbolic first size is written 0 (kept from the input: shape inference keeps its name)."""
    return b.node("Reshape", [x, b.const(np.array([d if isinstance(d, int) else 0 for d in shape], np.int64))])


def partition_block(b: GraphBuilder, rows=6, c=4, o=4, h=4, w=4, kernels=(1, 3), groups=1, fc_groups=None,
                    fc="conv", bn_layout="1d", conv_input=None, conv_shape=None, sign="Add"):
    """RepMLP's partition + local perceptron on partitions p of shape (rows, c, h, w)."""
    p = b.input("p", [rows, c, h, w])
    fc_groups = fc_groups or groups
    if fc == "conv":
        out = b.conv(reshape(b, p, rows, c * h * w, 1, 1), c * h * w, o * h * w, 1, fc_groups, bias=False)
        out = reshape(b, out, rows, o * h * w)
    else:
        x = b.input("q", [rows, c * h * w]) if fc == "other" else reshape(b, p, rows, c * h * w)
        weight = b.const(b.rand(c * h * w, o * h * w, scale=0.05))
        out = b.node("MatMul", [x, weight]) if fc == "matmul" else b.node("Gemm", [x, weight])
    if bn_layout == "1d":
        out = b.bn(out, o * h * w)
    else:  # RepMLPNet: BN2d over (rows, o, h, w)
        out = reshape(b, b.bn(reshape(b, out, rows, o, h, w), o), rows, o * h * w)
    source = conv_input(b, p) if conv_input else p
    for k in kernels:
        y = b.bn(b.conv(source, c, o, k, groups, bias=False, pads=[k // 2] * 4), o)
        out = b.node(sign, [out, reshape(b, y, *(conv_shape or (rows, o * h * w)))])
    return out


@pytest.mark.parametrize("fc,bn_layout,groups", [
    ("conv", "1d", 1), ("conv", "1d", 2), ("conv", "2d", 4), ("gemm", "1d", 1), ("matmul", "2d", 1)])
def test_local_convs_fold_into_the_fc(fc, bn_layout, groups):
    b = GraphBuilder()
    model, report = rewrite(b.model([partition_block(b, kernels=(1, 3), groups=groups, fc=fc, bn_layout=bn_layout)]))
    expected = {"Conv": 1} if fc == "conv" else {"Gemm": 1}
    assert ops(model) == {**expected, "Reshape": 2}
    assert any("fc(" in r.pattern for p in report.passes for r in p.rewrites)


def test_subtracted_conv_folds_with_its_sign():
    b = GraphBuilder()
    model, _ = rewrite(b.model([partition_block(b, kernels=(3,), sign="Sub")]))
    assert ops(model) == {"Conv": 1, "Reshape": 2}


def test_conv_groups_finer_than_the_fc_fold():
    b = GraphBuilder()
    model, _ = rewrite(b.model([partition_block(b, groups=4, fc_groups=2)]))
    assert ops(model) == {"Conv": 1, "Reshape": 2}


def test_conv_groups_coarser_than_the_fc_are_refused():
    b = GraphBuilder()
    model, report = rewrite(b.model([partition_block(b, kernels=(3,), groups=2, fc_groups=4)]))
    assert ops(model)["Conv"] == 2
    assert any("from 4 groups to 2" in r for r in refusals(report))


@pytest.mark.parametrize("kernels", [(3,), (5,), (1, 3, 5)])
def test_a_kernel_larger_than_the_partition_folds(kernels):
    # RepMLPNet's 3x3 local conv over a 2x2 partition: taps outside it only meet zero padding
    b = GraphBuilder()
    model, report = rewrite(b.model([partition_block(b, h=2, w=2, kernels=kernels)]))
    assert ops(model) == {"Conv": 1, "Reshape": 2} and not refusals(report)


def test_conv_behind_a_transpose_is_not_the_same_data():
    b = GraphBuilder()
    block = partition_block(b, kernels=(3,), conv_input=lambda b, p: b.node("Transpose", [p], perm=[0, 1, 3, 2]))
    model, report = rewrite(b.model([block]))
    assert ops(model)["Conv"] == 2
    assert any("it reads" in r and "Transpose" in r or "transpose" in r for r in refusals(report))


def test_conv_over_other_rows_is_refused():
    # the conv sees the 6 partitions as 3 images of twice the height: not one map per partition
    b = GraphBuilder()
    block = partition_block(b, kernels=(3,), conv_input=lambda b, p: reshape(b, p, 3, 4, 8, 4))
    model, report = rewrite(b.model([block]))
    assert ops(model)["Conv"] == 2
    assert any("as 3 rows" in r for r in refusals(report))


def test_fc_of_another_tensor_is_not_the_partner():
    b = GraphBuilder()
    model, report = rewrite(b.model([partition_block(b, kernels=(3,), fc="other")]))
    assert ops(model)["Conv"] == 1 and ops(model)["Gemm"] == 1
    assert any("the fully connected layer 'q'" in r for r in refusals(report))


def test_shared_conv_branch_stays():
    b = GraphBuilder()
    p = b.input("p", [6, 4, 4, 4])
    fc = reshape(b, b.conv(reshape(b, p, 6, 64, 1, 1), 64, 64, 1, bias=False), 6, 64)
    conv = reshape(b, b.conv(p, 4, 4, 3, pads=[1] * 4), 6, 64)
    model, _ = rewrite(b.model([b.node("Add", [fc, conv]), conv]))
    assert ops(model)["Conv"] == 2


@pytest.mark.parametrize("fc", ["conv", "gemm"])
def test_rows_of_a_symbolic_count_fold(fc):
    # each row is mapped alike: the fold holds for any number of rows (torch.export's dynamic
    # batch of RepMLPNet: rows '32*batch')
    b = GraphBuilder()
    model, _report = rewrite(b.model([partition_block(b, rows="R", kernels=(1, 3), fc=fc)]),
                            input_shapes={"p": (6, 4, 4, 4)})
    assert ops(model) == ({"Conv": 1} if fc == "conv" else {"Gemm": 1}) | {"Reshape": 2}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "R"
    assert onnx_reparam.verify(b.model([partition_block(GraphBuilder(), rows="R", fc=fc)]), model,
                               input_shapes={"p": (11, 4, 4, 4)}).passed
