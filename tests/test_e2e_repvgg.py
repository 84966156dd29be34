"""End to end on RepVGG exported from PyTorch: the training export, rewritten, has the deploy
export's op histogram and computes the same outputs (max relative error <= 1e-5)."""
from __future__ import annotations

import os
import sys

import onnx
import pytest
from conftest import ops

import onnx_reparam

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import export

pytestmark = pytest.mark.slow  # exports with torch at test time: .ci/run runs these

CASES = [(arch, exporter) for arch in ("repvgg_a0", "repvgg_b1g4") for exporter in export.EXPORTERS]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("repvgg")
    return {case: export.export_pair(case[0], out, case[1], scale=0.125, size=32) for case in CASES}


@pytest.mark.parametrize("arch,exporter", CASES)
def test_training_export_becomes_deploy_export(exported, arch, exporter):
    train_path, deploy_path = exported[(arch, exporter)]
    model, report = onnx_reparam.optimize(train_path)
    deploy = onnx.load(deploy_path)
    if exporter == "dynamo-raw":  # the unoptimized deploy export keeps shape arithmetic we fold
        assert all(ops(model)[op] <= ops(deploy)[op] for op in ops(model)) and ops(model)["Conv"] == ops(deploy)["Conv"]
    else:
        assert ops(model) == ops(deploy)
    assert report.verification.passed
    assert max(o.max_rel_error for o in report.verification.outputs) <= 1e-5
    # and the rewritten model matches the network's own conversion, not just the training export
    against_deploy = onnx_reparam.verify(deploy, model)
    assert against_deploy.passed and against_deploy.outputs[0].max_rel_error <= 1e-5
    if arch == "repvgg_a0":
        assert ops(model)["Conv"] == 22 and ops(model)["Relu"] == 22


def test_a0_has_nothing_left_to_refuse(exported):
    _, report = onnx_reparam.optimize(exported[("repvgg_a0", "ts")][0])
    assert not [r for p in report.passes for r in p.refusals]
    assert report.after.parameters < report.before.parameters


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_dynamic_batch_export_needs_no_input_shape(tmp_path, exporter):
    train, _deploy = export.build("repvgg_a0", 0.125, 10)
    path = export.export(train, tmp_path / "dyn.onnx", exporter, dynamic_batch=True)
    model, report = onnx_reparam.optimize(path)
    assert ops(model)["Conv"] == 22 and report.verification.passed
    assert "dynamic batch 'batch' set to 1 for the check" in "; ".join(report.verification.notes)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # stays dynamic
    model, report = onnx_reparam.optimize(path, input_shapes={"x": (3, 3, 32, 32)})
    assert ops(model)["Conv"] == 22 and report.verification.passed
