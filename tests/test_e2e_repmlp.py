"""End to end on the RepMLP nets exported from PyTorch with both exporters: the training export,
rewritten, has every op of the deploy export at most as often, the same convolutions (none left in
the local perceptrons), no BN left in the partition perceptrons, and the outputs of both the
training and the deploy export (max relative error <= 1e-5)."""
from __future__ import annotations

import os
import sys

import onnx
import pytest
from conftest import ops

import onnx_reparam

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import export
import repmlp

pytestmark = pytest.mark.slow  # exports with torch at test time: .ci/run runs these

CASES = [(name, exporter) for name in repmlp.NETS for exporter in ("ts", "dynamo")]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("repmlp")


@pytest.mark.parametrize("name,exporter", CASES)
def test_repmlp_net_becomes_its_deploy_structure(out_dir, name, exporter):
    train_path, deploy_path = export.export_pair(name, out_dir, exporter)
    model, report = onnx_reparam.optimize(train_path)
    deploy = onnx.load(deploy_path)
    ours, theirs = ops(model), ops(deploy)
    assert all(ours[op] <= theirs[op] for op in ours), (ours, theirs)
    assert ours["Conv"] == theirs["Conv"] and ours["BatchNormalization"] <= theirs["BatchNormalization"]
    assert max(o.max_rel_error for o in report.verification.outputs) <= 1e-5
    against_deploy = onnx_reparam.verify(deploy, model)
    assert against_deploy.passed and against_deploy.outputs[0].max_rel_error <= 1e-5
    folds = [r for p in report.passes if p.name == "conv_into_fc" for r in p.rewrites]
    assert len(folds) == sum(isinstance(m, (repmlp.RepMLPBlock, repmlp.RepMLPNetBlock))
                             for m in export.build(name)[0].modules())
    assert not [r for p in report.passes if p.name == "conv_into_fc" for r in p.refusals]
