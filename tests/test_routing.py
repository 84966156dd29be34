"""routing.pad_view: which data-movement subgraphs are a pad (per-channel values) or crop of one tensor."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import GraphBuilder

from onnx_reparam import routing
from onnx_reparam.errors import Refused
from onnx_reparam.graph import Graph

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def view_of(b: GraphBuilder, output: str):
    graph = Graph(b.model([output]))
    tensor = graph.outputs[0]
    return routing.pad_view(graph, tensor)


def border_scatter(b: GraphBuilder, data: str, shape, pad: int, values) -> str:
    """ScatterND writing values[c] on every border position of a (N, C, H, W) tensor, as
    exporters write DBB's per-channel padding."""
    n, c, h, w = shape
    index = [p for p in itertools.product(range(n), range(c), range(h), range(w))
             if min(p[2], p[3]) < pad or p[2] >= h - pad or p[3] >= w - pad]
    updates = np.array([values[p[1]] for p in index], b.dtype)
    return b.node("ScatterND", [data, b.const(np.array(index, np.int64)), b.const(updates)])


def test_pad_with_zeros():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 6])
    view = view_of(b, b.node("Pad", [x, b.const(np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64))]))
    assert (view.begins, view.ends) == ((1, 2), (3, 0))
    np.testing.assert_array_equal(view.border, np.zeros(3))


def test_pad_then_per_channel_border_writes():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    values = np.array([0.5, -1.0, 2.0], np.float32)
    padded = b.node("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    view = view_of(b, border_scatter(b, padded, (1, 3, 6, 6), 1, values))
    assert (view.begins, view.ends) == ((1, 1), (1, 1))
    np.testing.assert_array_equal(view.border, values)
    assert [n.op for n in view.nodes] == ["Pad", "ScatterND"]


def test_slice_is_a_crop():
    b = GraphBuilder()
    x = b.input("x", [1, 2, 7, 7])
    starts, ends, axes = (np.array(v, np.int64) for v in ([1], [-1], [2]))
    view = view_of(b, b.node("Slice", [x, b.const(starts), b.const(ends), b.const(axes)]))
    assert (view.begins, view.ends, view.border) == ((-1, 0), (-1, 0), None)


@pytest.mark.parametrize("case,reason", [
    ("step", "not a pad or crop"),
    ("transpose", "not a pad or crop"),
    ("reflect", "not a pad or crop"),
    ("uneven_border", "not a pad or crop"),
    ("two_sources", "read 2 computed tensors"),
    ("channel_slice", "change the batch or channel axis"),
])
def test_not_a_view(case, reason):
    b = GraphBuilder()
    x = b.input("x", [1, 2, 6, 6])
    if case == "step":
        out = b.node("Slice", [x] + [b.const(np.array(v, np.int64)) for v in ([0], [6], [3], [2])])
    elif case == "transpose":
        out = b.node("Transpose", [x], perm=[0, 1, 3, 2])
    elif case == "reflect":
        out = b.node("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="reflect")
    elif case == "uneven_border":
        padded = b.node("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
        out = b.node("ScatterND", [padded, b.const(np.array([[0, 0, 0, 0]], np.int64)),
                                   b.const(np.array([3.0], np.float32))])
    elif case == "two_sources":
        z = b.input("z", [1, 2, 6, 6])
        out = b.node("Concat", [x, z], axis=2)
    else:
        out = b.node("Slice", [x] + [b.const(np.array(v, np.int64)) for v in ([1], [2], [1])])
    with pytest.raises(Refused, match=reason):
        view_of(b, out)


def test_not_routing_at_all():
    b = GraphBuilder()
    x = b.input("x", [1, 2, 6, 6])
    assert view_of(b, b.node("Relu", [x])) is None


def test_float16_tensor_larger_than_float16_can_count():
    # 4 * 32 * 32 = 4096 elements: float16 numbers only 2048 exactly; the probe runs in float64
    b = GraphBuilder(dtype=np.float16)
    x = b.input("x", [1, 4, 32, 32])
    values = np.array([1.5, -2.0, 0.25, 3.0], np.float16)
    padded = b.node("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    view = view_of(b, border_scatter(b, padded, (1, 4, 34, 34), 1, values))
    assert view.begins == (1, 1)
    np.testing.assert_array_equal(view.border, values.astype(np.float64))


def test_a_symbolic_batch_kept_by_the_ops_is_probed_with_two_samples():
    # constant pads treat every sample alike: the view holds for any batch (probed at 2: an op
    # mixing samples would show)
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 5, 6])
    graph = Graph(b.model([b.node("Pad", [x, b.const(np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64))])]))
    graph.infer_shapes()
    view = routing.pad_view(graph, graph.outputs[0])
    assert (view.begins, view.ends) == ((1, 2), (3, 0))


def test_a_border_written_at_indices_computed_from_a_symbolic_batch_names_it():
    # torch's dynamic-batch export of DBB: ScatterND indices built from Shape(x)
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 3, 3])
    padded = b.node("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    batch = b.node("Gather", [b.node("Shape", [x]), b.const(np.array([0], np.int64))], axis=0)
    rows = b.node("Range", [b.const(np.int64(0)), b.node("Squeeze", [batch]), b.const(np.int64(1))])
    index = b.node("Reshape", [rows, b.const(np.array([-1, 1], np.int64))])
    written = b.node("ScatterND", [padded, index, b.node("Expand", [b.const(np.zeros((1, 2, 5, 5), np.float32)),
                                                                     b.node("Shape", [padded])])])
    graph = Graph(b.model([written]))
    with pytest.raises(Refused) as refused:
        routing.pad_view(graph, graph.outputs[0])
    assert refused.value.size_dependent and "symbolic input sizes (x: N)" in refused.value.reason
    assert refused.value.reason.endswith("static_shape=True (--static-shape) fixes the sizes")


def test_ops_that_change_a_symbolic_batch_are_not_probed():
    # a Slice of the first sample: in and out batch differ, so no one probe size stands for all
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 5, 6])
    first = b.node("Slice", [x, b.const(np.array([0], np.int64)), b.const(np.array([1], np.int64)),
                             b.const(np.array([0], np.int64))])
    graph = Graph(b.model([b.node("Pad", [first, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])]))
    graph.infer_shapes()
    with pytest.raises(Refused, match="the ops change the batch or channel axis"):  # seen at batch 2 and 3
        routing.pad_view(graph, graph.outputs[0])
