"""End to end on every block family exported from PyTorch with both exporters: the training
export, rewritten, has no more nodes than the deploy export, the same convolutions, nothing of the
training structure left, and the outputs of both the training and the deploy export
(max relative error <= 1e-5)."""
from __future__ import annotations

import os
import sys

import onnx
import pytest
from conftest import ops

import onnx_reparam

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import export
import families

pytestmark = pytest.mark.slow  # exports with torch at test time: .ci/run runs these

TRAINING_OPS = {"BatchNormalization", "Pad", "Slice", "ScatterND", "AveragePool", "Sub", "Shape"}
CASES = [(name, exporter) for name in families.FAMILIES for exporter in ("ts", "dynamo")]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def check(train_path, deploy_path, tolerance):
    model, report = onnx_reparam.optimize(train_path)
    deploy = onnx.load(deploy_path)
    assert len(model.graph.node) <= len(deploy.graph.node), (ops(model), ops(deploy))
    assert ops(model)["Conv"] == ops(deploy)["Conv"] and ops(model)["Gemm"] <= ops(deploy)["Gemm"]
    assert not TRAINING_OPS & set(ops(model))
    assert max(o.max_rel_error for o in report.verification.outputs) <= tolerance
    against_deploy = onnx_reparam.verify(deploy, model)
    assert against_deploy.passed and against_deploy.outputs[0].max_rel_error <= tolerance
    # nothing of the block left unmerged (a GELU's Div reading a conv output may be refused)
    assert not [r for p in report.passes if p.name in ("compose", "merge_branches") for r in p.refusals]
    return model, report


@pytest.mark.parametrize("name,exporter", CASES)
def test_family_becomes_its_deploy_structure(out_dir, name, exporter):
    check(*export.export_pair(name, out_dir, exporter), tolerance=1e-5)


@pytest.mark.parametrize("name", ["dbb", "acnet", "mobileone"])
def test_float16_family(out_dir, name):
    model, _ = check(*export.export_pair(name, out_dir, "ts", half=True), tolerance=5e-3)
    assert model.graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
