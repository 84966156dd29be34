"""A model over 2 GB (protobuf's limit) loads, rewrites, verifies and saves with external data."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_reparam
from conftest import ops

ROWS, COLS = 4, 2**26 + 2**22  # two weights of 1.14 GB: each fits a protobuf, together they do not


@pytest.mark.large  # about 2 minutes and 15 GB of memory: .ci/run runs it after the README's command
def test_model_over_two_gigabytes_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    for i in range(2):
        weight = numpy_helper.from_array(rng.random((ROWS, COLS), dtype=np.float32), f"w{i}")
        scale = numpy_helper.from_array(rng.uniform(0.5, 1.5, COLS).astype(np.float32), f"s{i}")
        initializers += [weight, scale]
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]),
                  helper.make_node("Mul", [f"y{i}", f"s{i}"], [f"z{i}"])]
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, ROWS])],
        [helper.make_tensor_value_info(f"z{i}", onnx.TensorProto.FLOAT, [1, COLS]) for i in range(2)],
        initializers)
    del initializers
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    source = tmp_path / "big.onnx"
    onnx.save_model(model, source, save_as_external_data=True, location="big.onnx.data")
    del model, graph

    optimized, report = onnx_reparam.optimize(source)
    assert ops(optimized) == {"MatMul": 2} and report.verification.passed
    target = tmp_path / "out.onnx"
    onnx_reparam.save_model(optimized, target)
    del optimized
    assert (tmp_path / "out.onnx.data").stat().st_size > 2**31
    again = onnx_reparam.load_model(target)
    assert ops(again) == {"MatMul": 2} and [list(t.dims) for t in again.graph.initializer] == [[ROWS, COLS]] * 2
