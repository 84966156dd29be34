"""The fuzz harness (fuzzing.py) on a small budget: no traceback, no changed input, no invalid or
wrong output even without verification, every refusal with a reason, no affine op left beside a
layer without one. The large budget runs from benchmarks/fuzz.py."""
from __future__ import annotations

import fuzzing
import pytest
from conftest import GraphBuilder

import onnx_reparam
from onnx_reparam.passes import fold_affine


def test_a_few_fuzz_cases_find_nothing():
    findings = fuzzing.fuzz(random_cases=30, mutants=6, first_seed=1000)
    assert not findings.problems, "\n".join(findings.problems)
    assert findings.rewritten >= 15, findings.summary()


@pytest.mark.slow  # a fuzz budget: .ci/run runs it
def test_small_fuzz_budget_finds_nothing():
    findings = fuzzing.fuzz(random_cases=120, mutants=30)
    assert not findings.problems, "\n".join(findings.problems)
    assert findings.rewritten >= 60 and findings.skipped <= findings.cases // 3, findings.summary()
    assert set(findings.kinds) >= set(fuzzing.HOSTILE), findings.kinds  # every hostile kind was run


def test_the_harness_finds_a_planted_defect(monkeypatch):
    real = fold_affine.scaled_weight
    monkeypatch.setattr(fold_affine, "scaled_weight", lambda *args: real(*args) * 1.01)
    findings = fuzzing.fuzz(random_cases=0, mutants=2)
    assert any("wrong output with --no-verify" in p for p in findings.problems)
    findings = fuzzing.fuzz(random_cases=10, mutants=0)
    assert any("wrong output with --no-verify" in p for p in findings.problems)
    assert findings.dropped > 0  # the verified runs dropped the wrong folds and kept the rest


def test_the_invariant_finds_an_affine_left_beside_a_layer_without_a_word(monkeypatch):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    model = b.model([b.node("Relu", [b.bn(b.conv(x, 3, 4, 3), 4)])])
    folded, report = onnx_reparam.optimize(model)
    assert fuzzing.silent_leftovers(folded, report) == []
    monkeypatch.setattr(fold_affine, "run", lambda graph, log: None)  # a rule that silently does nothing
    left, report = onnx_reparam.optimize(model)
    bn = next(n.name for n in model.graph.node if n.op_type == "BatchNormalization")
    assert fuzzing.silent_leftovers(left, report) == [f"BatchNormalization '{bn}'"]


@pytest.mark.parametrize("name", ["repvgg_a0_tiny_train.onnx", "fixtures/timm_repvit_m0_9_half.onnx",
                                  "fixtures/yolov7_tiny_train_dynamic.onnx", "fixtures/rtdetr_tiny.onnx",
                                  "fixtures/tf2onnx_repvgg_acnet_unoptimized.onnx"])
def test_exports_leave_nothing_beside_a_layer_without_a_reason(name):
    model, report = onnx_reparam.optimize(fuzzing.SHIPPED.parent / name, verify=False)
    assert fuzzing.silent_leftovers(model, report) == []
