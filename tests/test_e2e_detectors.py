"""Detectors built by their own code. With their decisions inside the graph, built by ultralytics
from its own YAML files (models/ultralytics_e2e_fixtures.py): a YOLOv6 with RepVGG blocks and NonMaxSuppression in the
graph (ultralytics' export-time NMSModel), and a small RT-DETR (RepC3 neck, TopK query selection,
deformable attention), and YOLOE-11 whose class embeddings are set, exported unfused with a
static and a dynamic batch. Every exact rewrite is kept, the Conv count of ultralytics' own fuse() is
reached with no BatchNormalization left, and the detections are checked through the floats the
decisions read, held to the float64 evaluation. And yolov7-tiny from WongKinYiu/yolov7, whose head
folds as its own ``fuse()`` folds it."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FIXTURES, fixture_manifest, verified_fixture

MANIFEST = fixture_manifest("ultralytics_e2e_manifest.json")
YOLOE = sorted(name for name in MANIFEST if name.startswith("yoloe"))


@pytest.mark.parametrize("name", sorted(set(MANIFEST) - set(YOLOE)))
def test_a_detector_with_decisions_inside_is_rewritten_and_checked_through_its_floats(name):
    _, report, ops = verified_fixture(FIXTURES / name)
    deploy = MANIFEST[name]["deploy"]
    assert ops["Conv"] == deploy["Conv"] and ops["BatchNormalization"] == 0 and ops["Add"] <= deploy["Add"]
    roles = Counter(o.role for o in report.verification.outputs)
    assert roles["decided"] == 1 and roles["decision input"] >= 1
    assert all(o.ours is not None for o in report.verification.outputs if o.role == "decision input")
    assert "no float64 evaluation" not in report.verification.summary()


@pytest.mark.parametrize("name", YOLOE)
def test_yoloe_text_embeddings_fold_into_its_class_convs_with_a_static_or_dynamic_batch(name):
    # each level's BN -> einsum with the (normalized, batch-expanded) text embeddings -> scale and
    # bias is one 1x1 conv, as ultralytics' exporter fuses it: its Conv and MatMul counts reached
    model, report, ops = verified_fixture(FIXTURES / name)
    deploy = MANIFEST[name]["deploy"]
    assert {op: ops.get(op, 0) for op in ("Conv", "BatchNormalization", "MatMul")} == \
        {op: deploy[op] for op in ("Conv", "BatchNormalization", "MatMul")} and ops["Add"] <= deploy["Add"]
    assert all(o.ours is not None and o.theirs is not None for o in report.verification.outputs)
    if name.endswith("dynamic.onnx"):  # the check ran batch 1: the rewrite holds at others too
        images = np.random.default_rng(0).standard_normal((3, 3, 128, 128)).astype(np.float32)
        before, after = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
                         for m in (str(FIXTURES / name), model.SerializeToString()))
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-3 * np.abs(before).max())


YOLOV7 = fixture_manifest("yolov7_manifest.json")


@pytest.mark.parametrize("name", sorted(YOLOV7))
def test_yolov7_implicit_constants_fold_as_its_own_fuse_folds_them(name):
    # yolov7-tiny from WongKinYiu/yolov7's code (models/yolov7_fixtures.py): ImplicitA, a per-channel
    # constant added before each 1x1 head conv, and ImplicitM, multiplied after it, go into the conv
    _, report, ops = verified_fixture(FIXTURES / name)
    assert {op: ops.get(op, 0) for op in ("Conv", "BatchNormalization", "Add", "Mul")} == YOLOV7[name]["deploy"]
    assert Counter(r.pattern for p in report.passes for r in p.rewrites)["Add+Conv"] == 3


YOLOV6 = fixture_manifest("yolov6_manifest.json")


@pytest.mark.parametrize("name", sorted(YOLOV6))
def test_yolov6_end2end_from_its_own_code_reaches_its_deploy_counts(name):
    # YOLOv6-N from meituan/YOLOv6's code (models/yolov6_fixtures.py), exported as its export_onnx.py
    # --end2end --ort does (NonMaxSuppression inside) but in training structure: every exact merge
    # kept, its own fuse_model + switch_to_deploy counts reached, the detections held through the
    # floats they are decided on, both distances from float64 reported
    _, report, ops = verified_fixture(FIXTURES / name)
    deploy = YOLOV6[name]["deploy"]
    assert {op: ops.get(op, 0) for op in deploy} == deploy
    held = [o for o in report.verification.outputs if not o.integer and o.role != "decided"]
    assert held and all(o.ours is not None and o.theirs is not None for o in held)
    assert "from float64, the input model" in report.summary()
    verified_fixture(FIXTURES / name, int8_ready=True)
