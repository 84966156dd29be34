"""Helpers to build tiny graphs with onnx.helper, and to rewrite and check them.

The oracle is the library's own ``verify.Checker`` (ORT optimizations off, strict tolerances),
which ``optimize`` runs on every rewrite; tests add node counts and refusal reasons on top.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_reparam

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"  # committed exports


def verified_fixture(path: Path, **options) -> tuple[onnx.ModelProto, onnx_reparam.Report, Counter]:
    """optimize() of a committed export, its check passed with nothing dropped; (model, report,
    the model's op counts)."""
    model, report = onnx_reparam.optimize(path, **options)
    assert report.verification.passed and not report.dropped, report.summary(verbose=True)
    return model, report, Counter(n.op_type for n in model.graph.node)


def fixture_manifest(name: str) -> dict:
    """What a fixture script wrote beside its exports (e.g. the deploy structure's op counts)."""
    return json.loads((FIXTURES / name).read_text())


class GraphBuilder:
    """Accumulates nodes and initializers; every weight is seeded random, every BN non-trivial."""

    def __init__(self, seed: int = 0, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes, self.inits, self.inputs = [], [], []
        self._n = 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def input(self, name: str, shape, dtype=None) -> str:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype or self.dtype))
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def const(self, array, base: str = "c") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def rand(self, *shape, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str:
        outputs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self._name(op), **attrs))
        return outputs[0]

    def conv(self, x: str, c_in: int, c_out: int, kernel=3, groups: int = 1, bias: bool = True,
             rank: int = 2, weight: str | None = None, **attrs) -> str:
        kernel = (kernel,) * rank if isinstance(kernel, int) else tuple(kernel)
        w = weight or self.const(self.rand(c_out, c_in // groups, *kernel, scale=0.3), "w")
        inputs = [x, w] + ([self.const(self.rand(c_out), "b")] if bias else [])
        return self.node("Conv", inputs, group=groups, **attrs)

    def bn(self, x: str, channels: int, n_out: int = 1, **attrs) -> str:
        gamma = self.rng.uniform(0.5, 1.5, channels).astype(self.dtype)
        beta = self.rand(channels, scale=0.1)
        mean = self.rand(channels, scale=0.1)
        var = self.rng.uniform(0.5, 1.5, channels).astype(self.dtype)
        params = [self.const(a, "bn") for a in (gamma, beta, mean, var)]
        return self.node("BatchNormalization", [x] + params, n_out, **attrs)

    def model(self, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        graph = helper.make_graph(self.nodes, "test", self.inputs,
                                  [helper.make_tensor_value_info(o, elem, None) for o in outputs],
                                  initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
        # The checker wants output shapes; ONNX's inference fills them in.
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.value_info[:]
        onnx.checker.check_model(model)
        return model


def misdeclare(model: onnx.ModelProto, name: str, dims: list) -> onnx.ModelProto:
    """Declares a wrong shape for tensor ``name`` (value_info, or the graph output's type): what
    onnxruntime runs anyway and ``check_model(full_check=True)`` rejects."""
    outputs = [o for o in model.graph.output if o.name == name]
    if outputs:
        outputs[0].CopyFrom(helper.make_tensor_value_info(name, outputs[0].type.tensor_type.elem_type, dims))
    else:
        model.graph.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    return model


def unverified_output_is_right(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx_reparam.Report]:
    """optimize() without verification, its output checked against the input model's in onnxruntime."""
    optimized, report = onnx_reparam.optimize(model, verify=False)
    from onnx_reparam.verify import Checker
    result = Checker(model, provider="cpu").check(optimized)
    assert result.passed, result.summary()
    return optimized, report


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def refusals(report: onnx_reparam.Report) -> list[str]:
    return [r.text for p in report.passes for r in p.refusals]


def rewrite(model: onnx.ModelProto, **options):
    """optimize() with verification on: raises if the rewrite changed any output."""
    optimized, report = onnx_reparam.optimize(model, **options)
    onnx.checker.check_model(optimized)
    return optimized, report


@pytest.fixture
def builder() -> GraphBuilder:
    return GraphBuilder()
