"""The Python API: what optimize returns, what it leaves alone, and the report."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, ops
from test_cli import block_model

import onnx_reparam
from onnx_reparam.verify import Checker

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def test_optimize_returns_model_and_report_and_leaves_the_input_alone():
    model = block_model()
    before = model.SerializeToString()
    optimized, report = onnx_reparam.optimize(model)
    assert model.SerializeToString() == before
    assert isinstance(optimized, onnx.ModelProto) and ops(optimized) == {"Conv": 1, "Relu": 1}
    data = json.loads(json.dumps(report.to_dict()))
    assert data["before"]["nodes"] == 8 and data["after"]["nodes"] == 2
    assert data["verification"]["provider"] == report.verification.provider
    assert set(data["seconds"]) == {"load", "rewrite", "verify"}


def test_envelope_is_kept():
    model = block_model()
    model.doc_string, model.producer_name, model.graph.doc_string = "doc", "exporter", "graph doc"
    onnx.helper.set_model_props(model, {"author": "me"})
    optimized, _ = onnx_reparam.optimize(model)
    assert (optimized.doc_string, optimized.producer_name, optimized.graph.doc_string) == \
        ("doc", "exporter", "graph doc")
    assert optimized.metadata_props[0].key == "author" and optimized.ir_version == model.ir_version
    assert list(optimized.opset_import) == list(model.opset_import)
    assert [i.name for i in optimized.graph.input] == ["x"]
    assert [o.name for o in optimized.graph.output] == [o.name for o in model.graph.output]


def test_rewrites_that_fail_the_check_are_dropped_and_named():
    # With zero tolerance no float rewrite verifies: each is dropped, the model stays as it was.
    model, report = onnx_reparam.optimize(block_model(), rtol=0, atol=0)
    assert ops(model) == ops(block_model()) and report.verification.passed
    assert report.dropped and all("did not verify" in r.reason for r in report.dropped)
    assert "its rewrite did not verify" in report.summary()


def test_strict_raises_with_model_and_report_when_a_rewrite_is_dropped():
    with pytest.raises(onnx_reparam.VerificationError) as failure:
        onnx_reparam.optimize(block_model(), rtol=0, atol=0, strict=True)
    assert failure.value.report.dropped and failure.value.report.verification.passed
    assert "\n" not in str(failure.value) and "strict" in str(failure.value)


def test_inspect_does_not_verify():
    report = onnx_reparam.inspect(block_model())
    assert report.verification is None and report.rewrites == 3


def test_verify_with_user_inputs():
    model = block_model()
    optimized, _ = onnx_reparam.optimize(model)
    result = onnx_reparam.verify(model, optimized, inputs={"x": np.zeros((1, 4, 6, 6), np.float32)})
    assert result.passed


def test_graph_output_names_survive_a_merge_at_the_output():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 5, 5])
    y = b.node("Add", [b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1]), x])
    optimized, _ = onnx_reparam.optimize(b.model([y]))
    assert optimized.graph.output[0].name == y and optimized.graph.node[0].output[0] == y


def test_initializer_that_is_a_graph_input_is_not_folded():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 5, 5])
    model = b.model([b.bn(b.conv(x, 3, 4), 4)])
    weight = model.graph.initializer[0]
    model.graph.input.append(onnx.helper.make_tensor_value_info(weight.name, weight.data_type, weight.dims))
    optimized, report = onnx_reparam.optimize(model)
    assert report.rewrites == 0 and ops(optimized) == {"Conv": 1, "BatchNormalization": 1}


def test_static_shape_fixes_the_inputs_symbolic_dims_and_says_so():
    b = GraphBuilder()
    x = b.input("x", ["N", 4, "H", 6])
    model = b.model([b.node("Relu", [b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4)])])
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(onnx_reparam.ReparamError, match=r"symbolic dim 'H' \(axis 2\) with no size to run it at: give the sizes your data has, "
                       r"e.g. input_shapes=\{'x': \(1, 4, 224, 6\)\} \(--input-shape x:1,4,224,6\)"):
        onnx_reparam.optimize(model, static_shape=True)
    fixed, report = onnx_reparam.optimize(model, static_shape=True, input_shapes={"x": (2, 4, 5, 6)})
    assert report.verification.passed and ops(fixed) == {"Conv": 1, "Relu": 1}
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [2, 4, 5, 6]
    assert fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 2  # the same name, the same size
    assert "inputs fixed to static sizes by static_shape=True (--static-shape): x 2x4x5x6" in report.notes
    with pytest.raises(onnx_reparam.ReparamError, match="the model has no input 'y'"):  # not ignored unchecked
        onnx_reparam.optimize(model, static_shape=True, verify=False, input_shapes={"y": (2, 4, 5, 6)})
    kept, _ = onnx_reparam.optimize(model, input_shapes={"x": (2, 4, 5, 6)})
    assert kept.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "H"  # only when asked


def shared_batch_model() -> onnx.ModelProto:
    b = GraphBuilder()
    x, z = b.input("x", ["N", 3, 4, 4]), b.input("z", ["N", 3, 4, 4])
    model = b.model([b.node("Add", [b.bn(b.conv(x, 3, 3, 1), 3), z])])
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_a_symbolic_dim_shared_by_inputs_gets_one_size():
    fixed, report = onnx_reparam.optimize(shared_batch_model(), static_shape=True, input_shapes={"x": (2, 3, 4, 4)})
    assert report.verification.passed and ops(fixed) == {"Conv": 1, "Add": 1}
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in fixed.graph.input] == [[2, 3, 4, 4]] * 2
    onnx.checker.check_model(fixed, full_check=True)
    checker = Checker(shared_batch_model(), input_shapes={"z": (3, 3, 4, 4)})  # the check too
    assert {name: a.shape for name, a in checker.feed_sets[0].items()} == {"x": (3, 3, 4, 4), "z": (3, 3, 4, 4)}
    with pytest.raises(onnx_reparam.ReparamError, match="symbolic dim 'N' is 2 in input 'x' but 3 in input 'z'"):
        onnx_reparam.optimize(shared_batch_model(), static_shape=True, input_shapes={"x": (2, 3, 4, 4), "z": (3, 3, 4, 4)})


def in_custom_domain(model: onnx.ModelProto, domain: str = "my.custom") -> onnx.ModelProto:
    """Every node moved to a custom domain under its standard name, with the shapes its outputs
    had declared (inference knows nothing of the domain's ops)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.value_info.extend(inferred.graph.value_info)
    for node in model.graph.node:
        node.domain = domain
    model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return model


@pytest.mark.parametrize("build", ["blocks", "text head"])
def test_no_rule_takes_a_custom_domains_op_for_the_standard_one(build):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    if build == "blocks":
        dense = b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4)
        y = b.node("Add", [dense, b.node("Mul", [b.node("Identity", [x]), b.const(b.rand(1, 4, 1, 1))])])
        out = b.node("Reshape", [b.node("Reshape", [y, b.const(np.array([4, 36], np.int64))]),
                                 b.const(np.array([1, 4, 36], np.int64))])
    else:
        from test_compose import yoloe_head
        out = yoloe_head(b, x)
    model = in_custom_domain(b.model([out]))
    optimized, report = onnx_reparam.optimize(model, verify=False)
    def kinds(m):
        return sorted((n.domain, n.op_type) for n in m.graph.node)
    assert report.rewrites == 0 and kinds(optimized) == kinds(model)
