"""Exports as users make them end as the static TorchScript export does: the dynamo exporter with
its optimizer off (each conv's zero bias built at run time from CastLike and Shape), and a
dynamic batch axis (no --input-shape needed)."""
from __future__ import annotations

import os
import sys

import pytest

import onnx_reparam
from conftest import ops

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
import export  # noqa: E402

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
