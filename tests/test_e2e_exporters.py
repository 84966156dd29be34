"""Exports as users make them end as the static TorchScript export does: the dynamo exporter with
its optimizer off (each conv's zero bias built at run time from CastLike and Shape), and a
dynamic batch axis (no --input-shape needed)."""
from __future__ import annotations

import os
import sys

import onnx
import pytest
from conftest import FIXTURES, ops

import onnx_reparam

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import export

pytestmark = pytest.mark.slow  # exports with torch at test time: .ci/run runs these

ARCHS = ["repvgg_a0", "mobileone", "dbb", "repvit", "fastvit", "acnet"]
COUNTED = ("Conv", "BatchNormalization", "Add")


@pytest.fixture(scope="module")
def reference_counts(tmp_path_factory):
    """Conv/BN/Add after optimizing the static TorchScript export of each arch."""
    folder = tmp_path_factory.mktemp("ts")
    counts = {}
    for arch in ARCHS:
        train, _ = export.build(arch)
        path = export.export(train, folder / f"{arch}.onnx", "ts", export.input_shape(arch))
        model, _ = onnx_reparam.optimize(path, verify=False)
        counts[arch] = {op: ops(model)[op] for op in COUNTED}
    return counts


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamo_without_its_optimizer_folds_like_the_static_export(arch, tmp_path, reference_counts):
    train, _ = export.build(arch)
    path = export.export(train, tmp_path / f"{arch}.onnx", "dynamo-raw", export.input_shape(arch))
    model, report = onnx_reparam.optimize(path)
    assert report.verification.passed
    counts, reference = {op: ops(model)[op] for op in COUNTED}, reference_counts[arch]
    assert counts["Conv"] == reference["Conv"] and counts["BatchNormalization"] == reference["BatchNormalization"]
    assert counts["Add"] <= reference["Add"]  # TorchScript writes GELU with an Add more
    assert not {"CastLike", "Expand"} & set(ops(model))


@pytest.mark.parametrize("exporter", ["ts", "dynamo", "dynamo-raw"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_dynamic_batch_export_folds_like_the_static_one_or_says_which_size_stops_it(
        arch, exporter, tmp_path, reference_counts):
    train, _ = export.build(arch)
    shape = export.input_shape(arch)
    shape = shape if exporter == "ts" else (2,) + shape[1:]  # torch.export's batch dim starts at 2
    path = export.export(train, tmp_path / f"{arch}.onnx", exporter, shape, dynamic_batch=True)
    model, report = onnx_reparam.optimize(path)
    assert report.verification.passed
    size_bound = [r for p in report.passes for r in p.refusals if "--static-shape" in r.text]
    if not _as_folded(model, reference_counts[arch]):  # what is left depends on the batch size, named
        assert size_bound and all("symbolic input sizes (x: batch)" in r.text for r in size_bound), report.summary()
    static, report = onnx_reparam.optimize(path, static_shape=True)
    assert report.verification.passed and _as_folded(static, reference_counts[arch]), report.summary()
    assert [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim] == [1, *shape[1:]]
    assert any(n == f"inputs fixed to static sizes by static_shape=True (--static-shape): x 1x{'x'.join(map(str, shape[1:]))}"
               for n in report.notes)


def _as_folded(model, reference) -> bool:
    """The static export's Conv and BN counts, and no more Adds (TorchScript writes GELU with one more)."""
    counts = {op: ops(model)[op] for op in COUNTED}
    return counts["Conv"] == reference["Conv"] and counts["BatchNormalization"] == reference["BatchNormalization"] \
        and counts["Add"] <= reference["Add"]




@pytest.mark.parametrize("name", ["paddle_repvgg_acnet", "paddle_repvgg_acnet_dynamic"])
def test_a_paddle2onnx_export_reaches_one_conv_per_block(name):
    # models/paddle_fixtures.py (paddlepaddle 3.3.1, paddle2onnx 2.1.0): three RepVGG blocks and an
    # ACNet block, each to one Conv; its Identity chains (a + b -> Add, Identity) go, the graph
    # output keeps its name (the Add writes it: its Identity goes too), the Linear stays MatMul + Add
    model, report = onnx_reparam.optimize(FIXTURES / f"{name}.onnx")
    assert report.verification.passed
    assert ops(model) == {"Conv": 4, "Relu": 4, "GlobalAveragePool": 1, "Reshape": 1, "MatMul": 1, "Add": 1} \
        | ({"Shape": 1, "Slice": 1, "Concat": 1} if "dynamic" in name else {})
    assert [o.name for o in model.graph.output] == ["fetch_name_0"]


@pytest.mark.parametrize("name", ["tf2onnx_repvgg_acnet", "tf2onnx_repvgg_acnet_unoptimized"])
def test_a_tf2onnx_export_reaches_one_conv_per_block_with_or_without_its_optimizers(name):
    # models/tf_fixtures.py (tensorflow-cpu 2.21, tf2onnx 1.17, Keras NHWC): without its optimizers
    # every conv sits between Transposes and the bias, BN and branch sums are in NHWC (52 nodes)
    model, report = onnx_reparam.optimize(FIXTURES / f"{name}.onnx")
    assert report.verification.passed
    counts = ops(model)
    assert counts["Conv"] == 4 and not {"BatchNormalization", "Add"} & set(counts)
    assert counts["Transpose"] <= 2 and counts["Identity"] <= 1  # an Identity keeps the output's name
    assert len(model.graph.node) <= 13  # with its optimizers: 12


def test_ultralytics_blocks_merge_as_its_fuse_does_with_fewer_nodes():
    # models/ultralytics_fixtures.py (ultralytics 8.4, torch 2.14): RepConv with its identity BN,
    # RepC3, RepNCSPELAN4, C2fCIB with RepVGGDW; "fused" is the same net after ultralytics' fuse()
    fused = onnx.load(FIXTURES / "ultralytics_blocks_fused.onnx")
    model, report = onnx_reparam.optimize(FIXTURES / "ultralytics_blocks_train.onnx")
    assert report.verification.passed
    assert ops(model)["Conv"] == ops(fused)["Conv"] and "BatchNormalization" not in ops(model)
    assert len(model.graph.node) < len(fused.graph.node)  # fuse() keeps shape arithmetic and Adds
    assert onnx_reparam.verify(fused, model).passed  # and it is the function fuse() computes
