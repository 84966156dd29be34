"""transposes: a Transpose moves below the elementwise ops reading it, so layout changes meet and
cancel and NHWC-written bias adds, BN scales and branch sums fold as NCHW ones do."""
from __future__ import annotations

import pytest
from conftest import GraphBuilder, ops, rewrite

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick

TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def nhwc_branches(b: GraphBuilder, x: str, perms=(TO_NHWC, TO_NHWC)) -> str:
    """tf2onnx without its optimizers: conv branches between Transposes, bias and sum in NHWC."""
    outs = []
    for kernel, perm in zip((3, 1), perms):
        conv = b.conv(b.node("Transpose", [x], perm=TO_NCHW), 4, 4, kernel, pads=[kernel // 2] * 4, bias=False)
        outs.append(b.node("Add", [b.node("Transpose", [conv], perm=perm), b.const(b.rand(4))]))
    return b.node("Relu", [b.node("Add", outs)])


def test_nhwc_branches_become_one_conv_between_two_transposes():
    b = GraphBuilder()
    x = b.input("x", [1, 6, 6, 4])
    model, report = rewrite(b.model([nhwc_branches(b, x)]))
    assert ops(model) == {"Transpose": 2, "Conv": 1, "Relu": 1}
    assert any(r.pattern == "Transpose+Add" for p in report.passes for r in p.rewrites)


def test_a_constant_of_lower_rank_broadcasts_as_before():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 5, 3])
    y = b.node("Mul", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), b.const(b.rand(5, 1, 4))])
    back = b.node("Transpose", [b.node("Sigmoid", [y])], perm=[0, 3, 1, 2])  # undoes the first
    out = b.node("Relu", [back])
    model, _ = rewrite(b.model([out]), only="transposes")
    assert [n.op_type for n in model.graph.node] == ["Mul", "Sigmoid", "Transpose", "Transpose", "Relu"]
    model, _ = rewrite(b.model([out]))
    assert [n.op_type for n in model.graph.node] == ["Mul", "Sigmoid", "Relu"]


def test_a_transpose_that_would_meet_nothing_stays():
    # moving it would only move it: kept where the exporter put it (and no constant is copied)
    b = GraphBuilder()
    x = b.input("x", [1, 4, 5, 3])
    out = b.node("Sigmoid", [b.node("Add", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), b.const(b.rand(4))])])
    model, _ = rewrite(b.model([out]))
    assert [n.op_type for n in model.graph.node] == ["Transpose", "Add", "Sigmoid"]


def test_what_must_not_move_stays():
    b = GraphBuilder()
    x = b.input("x", [1, 6, 6, 4])
    mixed = nhwc_branches(b, x, perms=(TO_NHWC, [0, 3, 2, 1]))  # NHWC and NWHC: no common layout
    seen = b.node("Transpose", [x], perm=TO_NCHW)
    shared = b.node("Add", [b.node("Relu", [seen]), seen])  # the Relu's Transpose is read by the Add too
    model, _ = rewrite(b.model([mixed, shared]), only="transposes")
    perms = sorted(tuple(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute)
    assert perms == sorted([tuple(TO_NCHW)] * 3 + [tuple(TO_NHWC), (0, 3, 2, 1)])  # none moved or merged
    producers = {o: n for n in model.graph.node for o in n.output}
    relu = next(n for n in model.graph.node if n.op_type == "Relu" and n.output[0] != mixed)
    assert producers[relu.input[0]].op_type == "Transpose"


def test_a_large_constant_others_read_is_not_copied_transposed():
    # the move would meet the Transpose back, but a transposed copy of a 96 KiB constant that the
    # other Add still reads would grow the model: it stays
    b = GraphBuilder()
    x = b.input("x", [1, 4, 128, 48])
    big = b.const(b.rand(128, 48, 4))
    moved = b.node("Add", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), big])
    back = b.node("Relu", [b.node("Transpose", [moved], perm=[0, 3, 1, 2])])
    other = b.node("Add", [b.node("Transpose", [b.node("Relu", [x])], perm=[0, 2, 3, 1]), big])
    model, _ = rewrite(b.model([back, other]))
    assert ops(model) == {"Transpose": 3, "Add": 2, "Relu": 2}
