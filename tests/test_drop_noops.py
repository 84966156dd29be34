"""drop_noops: nodes that change nothing no longer stand between the nodes of a pattern."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, misdeclare, ops, refusals, rewrite, unverified_output_is_right
from onnx import helper

from onnx_reparam.graph import Graph

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def test_paddle_style_sum_through_identity_merges_all_three_branches():
    # a + b + c written as Add -> Identity -> Add (ACNet 3x3 + 1x3 + 3x1)
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    square = b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1])
    wide, tall = b.conv(x, 4, 4, (1, 3), pads=[0, 1, 0, 1]), b.conv(x, 4, 4, (3, 1), pads=[1, 0, 1, 0])
    y = b.node("Add", [b.node("Identity", [b.node("Add", [square, wide])]), tall])
    model, _ = rewrite(b.model([b.node("Relu", [y])]))
    assert ops(model) == {"Conv": 1, "Relu": 1}


def test_paddle_style_identity_branch_x_plus_0():
    # x + 0 as Identity -> Mul(1) -> Add(0) -> Identity, summed with a conv of x
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    same = b.node("Identity", [b.node("Add", [b.node("Mul", [b.node("Identity", [x]), b.const(np.float32(1))]),
                                               b.const(np.zeros((1,), np.float32))])])
    model, report = rewrite(b.model([b.node("Relu", [b.node("Add", [b.conv(x, 4, 4, 3, pads=[1] * 4), same])])]))
    assert ops(model) == {"Conv": 1, "Relu": 1}
    patterns = {r.pattern for p in report.passes if p.name == "drop_noops" for r in p.rewrites}
    assert patterns == {"Identity", "Mul by 1", "Add by 0"}


def test_a_transpose_pair_and_duplicate_transposes_of_one_tensor():
    # tf2onnx: each branch reads its own Transpose of the NHWC input
    b = GraphBuilder()
    x = b.input("x", [1, 6, 6, 4])
    first, second = (b.node("Transpose", [x], perm=[0, 3, 1, 2]) for _ in range(2))
    y = b.node("Add", [b.conv(first, 4, 4, 3, pads=[1] * 4), b.conv(second, 4, 4, 1)])
    back = b.node("Transpose", [b.node("Transpose", [y], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])
    model, _ = rewrite(b.model([b.node("Relu", [back])]))
    assert ops(model) == {"Transpose": 1, "Conv": 1, "Relu": 1}


def test_what_is_not_a_no_op_stays():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    ones_broadcasting = b.node("Mul", [x, b.const(np.ones((2, 1, 1, 1), np.float32))])  # makes batch 2
    twos = b.node("Mul", [x, b.const(np.full((1,), 2, np.float32))])
    kept_output = b.node("Identity", [x])  # a graph output keeps its name
    model, report = rewrite(b.model([ones_broadcasting, twos, kept_output]))
    assert ops(model) == {"Mul": 2, "Identity": 1} and not report.rewrites
    assert not refusals(report)


def test_transposes_that_do_not_cancel_or_are_read_twice_stay():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 5])
    rotated = b.node("Transpose", [b.node("Transpose", [x], perm=[0, 2, 3, 1])], perm=[0, 2, 3, 1])  # no identity
    inner = b.node("Transpose", [x], perm=[0, 1, 3, 2])
    undone = b.node("Transpose", [inner], perm=[0, 1, 3, 2])  # cancels, but inner is also an output
    other = b.node("Transpose", [x], perm=[0, 2, 1, 3])  # same input as `inner`, another perm
    model, report = rewrite(b.model([rotated, undone, inner, other]))
    assert ops(model) == {"Transpose": 5} and not report.rewrites


def test_a_constant_minus_the_data_is_not_a_no_op():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    zero = b.const(np.zeros((1,), np.float32))
    model, report = rewrite(b.model([b.node("Sub", [zero, x]), b.node("Div", [b.const(np.ones((1,), np.float32)), x])]))
    assert ops(model) == {"Sub": 1, "Div": 1} and not report.rewrites


def _sliced(starts, ends, axes, steps=None, batch="N"):
    # torch.export writes x[:, ...] as a Slice of axis 0 from 0 to INT64_MAX
    b = GraphBuilder()
    x = b.input("x", [batch, 4, 6, 6])
    params = [b.const(np.array(v, np.int64)) for v in (starts, ends, axes) + ((steps,) if steps else ())]
    return b.model([b.node("Relu", [b.node("Slice", [x] + params)])])


def test_a_slice_of_whole_axes_is_dropped():
    for model in (_sliced([0], [2**63 - 1], [0]), _sliced([0, 0], [6, 2**31 - 1], [2, 3], [1, 1])):
        optimized, report = rewrite(model)
        assert ops(optimized) == {"Relu": 1}
        assert [(r.pattern) for p in report.passes for r in p.rewrites if p.name == "drop_noops"] == ["Slice of whole axes"]


def test_a_slice_that_takes_part_of_an_axis_stays():
    for model in (_sliced([1], [2**63 - 1], [2]), _sliced([0], [5], [2]), _sliced([0], [2**63 - 1], [3], [2]),
                  _sliced([0], [3], [0])):  # the last: 3 of a batch of unknown size
        optimized, _ = rewrite(model)
        assert ops(optimized) == {"Slice": 1, "Relu": 1}



def test_shapes_inferred_again_after_a_drop_keep_unknown_ranks_unknown():
    # seen on paddle2onnx's dynamic flatten: a tensor of unknown rank, re-inferred once the
    # Identity went, became a scalar in the written model and onnxruntime refused the MatMul
    graph = Graph(helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Reshape", ["i", "target"], ["flat"]),
         helper.make_node("Relu", ["flat"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 1, 1]),
         helper.make_tensor_value_info("target", onnx.TensorProto.INT64, ["k"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])))
    graph.infer_shapes()
    assert graph.gs.tensors()["flat"].shape is None


def test_a_slice_is_whole_by_the_inferred_shape_not_a_wrong_declaration():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8])
    relu = b.node("Relu", [x])
    cut = b.node("Slice", [relu] + [b.const(np.array([v], np.int64)) for v in (0, 4, 2)])  # half of axis 2
    model = misdeclare(b.model([b.node("Relu", [cut])]), relu, [1, 3, 4])
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 4
    optimized, report = unverified_output_is_right(model)
    assert ops(optimized) == {"Relu": 2, "Slice": 1}
    assert any(f"'{relu}' is declared 1x3x4, inferred 1x3x8" in n for n in report.notes)


def test_adding_zero_goes_and_the_check_catches_a_sign_of_zero_that_matters():
    """-0.0 + 0.0 is +0.0, so 1/x after the dropped Add flips -inf to +inf: value-exact rules
    (as onnxruntime's), held to the check on the inputs given."""
    b = GraphBuilder()
    model = b.model([b.node("Reciprocal", [b.node("Add", [b.input("x", [1, 4]), b.const(np.zeros(1, np.float32))])])])
    optimized, report = rewrite(model)
    assert ops(optimized) == {"Reciprocal": 1} and report.verification.passed
    signed = {"x": np.array([[-0.0, 0.0, 1.0, -2.0]], np.float32)}
    kept, report = rewrite(model, inputs=signed)
    assert ops(kept) == {"Add": 1, "Reciprocal": 1}
    assert [d.text for d in report.dropped] == [f"its rewrite did not verify ({model.graph.output[0].name}: inf/NaN values differ)"]


NO_OPS = {
    "Transpose pair without perm": lambda b, y: b.node("Transpose", [b.node("Transpose", [y])]),
    "identity perm": lambda b, y: b.node("Transpose", [y], perm=[0, 1, 2, 3]),
    "Squeeze then Unsqueeze": lambda b, y: b.node("Unsqueeze", [b.node("Squeeze", [y, b.const(np.array([0]))]),
                                                                b.const(np.array([0]))]),
    "Flatten then Reshape back": lambda b, y: b.node("Reshape", [b.node("Flatten", [y], axis=2),
                                                                 b.const(np.array([1, 4, 5, 5]))]),
    "all-zero Pad": lambda b, y: b.node("Pad", [y, b.const(np.zeros(8, np.int64))]),
    "inference Dropout": lambda b, y: b.node("Dropout", [y]),
    "Reshape to its own shape": lambda b, y: b.node("Reshape", [y, b.const(np.array([1, 4, 5, 5]))]),
    "Expand to its own shape": lambda b, y: b.node("Expand", [y, b.const(np.array([1, 4, 5, 5]))]),
}

@pytest.mark.parametrize("kind", NO_OPS)
def test_a_no_op_by_its_meaning_does_not_stop_a_fold(kind):
    b = GraphBuilder()
    y = b.conv(b.input("x", [1, 4, 5, 5]), 4, 4, 3, pads=[1] * 4)
    model, report = rewrite(b.model([b.node("Relu", [b.bn(NO_OPS[kind](b, y), 4)])]))
    assert ops(model) == {"Conv": 1, "Relu": 1}, refusals(report)


def test_a_channel_shuffle_is_data_movement_that_changes_something():
    b = GraphBuilder()
    y = b.conv(b.input("x", [1, 4, 5, 5]), 4, 4, 3, pads=[1] * 4)
    grouped = b.node("Reshape", [y, b.const(np.array([1, 2, 2, 5, 5]))])
    shuffled = b.node("Reshape", [b.node("Transpose", [grouped], perm=[0, 2, 1, 3, 4]), b.const(np.array([1, 4, 5, 5]))])
    model, _ = rewrite(b.model([b.node("Relu", [shuffled])]))
    assert ops(model) == {"Conv": 1, "Reshape": 2, "Transpose": 1, "Relu": 1}


# Their must-not twins: same shape, but the data moves; or the Dropout's mask is read.
CHANGES = {
    "Transpose of a square image": (lambda b, y: b.node("Transpose", [y], perm=[0, 1, 3, 2]), "Transpose"),
    "Pad of one row, then the first rows": (
        lambda b, y: b.node("Slice", [b.node("Pad", [y, b.const(np.array([0, 0, 1, 0, 0, 0, 0, 0]))]),
                                      b.const(np.array([0])), b.const(np.array([5])), b.const(np.array([2]))]), "Slice"),
    "Dropout whose mask is read": (lambda b, y: b.node("Dropout", [y], n_out=2), "Dropout"),
}


@pytest.mark.parametrize("kind", CHANGES)
def test_data_movement_that_changes_the_data_stays(kind):
    b = GraphBuilder()
    y = b.conv(b.input("x", [1, 4, 5, 5]), 4, 4, 3, pads=[1] * 4)
    build, op = CHANGES[kind]
    moved = build(b, y)
    outputs = [b.node("Relu", [moved])]
    if op == "Dropout":
        outputs.append(b.node("Cast", [b.nodes[-2].output[1]], to=onnx.TensorProto.FLOAT))  # its mask, read
    model, _ = rewrite(b.model(outputs))
    assert ops(model)[op] == 1


def test_an_identity_naming_a_graph_output_goes_and_the_name_stays():
    # paddle2onnx's fetch_name_0, tf2onnx's Identity_graph_outputs
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    named = b.node("Identity", [b.node("Relu", [x])])
    model, _ = rewrite(b.model([named]))
    assert ops(model) == {"Relu": 1} and model.graph.output[0].name == named
    assert model.graph.node[0].output[0] == named


def test_an_identity_of_a_value_read_elsewhere_stays():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    relu = b.node("Relu", [x])
    model, _ = rewrite(b.model([b.node("Identity", [relu]), b.node("Sigmoid", [relu])]))
    assert ops(model) == {"Relu": 1, "Identity": 1, "Sigmoid": 1}
