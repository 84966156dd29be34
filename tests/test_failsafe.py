"""A wrong or crashing rewrite costs only itself, checks that cannot pass by comparing nothing, and
the defects found by fuzzing the tool as a hostile user would (one test each, from its report)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import GraphBuilder, ops, refusals, rewrite
from onnx import helper, numpy_helper

import onnx_reparam
from onnx_reparam.cli import main
from onnx_reparam.passes import fold_affine, merge_branches
from onnx_reparam.runtime import runtime_limits

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def chain_model() -> onnx.ModelProto:
    """Three Conv+BN layers of 4, 5 and 4 channels: three independent folds."""
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = b.node("Relu", [b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4)])
    y = b.node("Relu", [b.bn(b.conv(y, 4, 5, 3, pads=[1] * 4), 5)])
    return b.model([b.bn(b.conv(y, 5, 4, 1), 4)])


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def one_line(text: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line]
    return len(lines) == 1 and "Traceback" not in text


@pytest.fixture
def wrong_fold_of_five_channels(monkeypatch):
    """A defect in one rewrite: the fold of the 5-channel conv gets a wrong weight."""
    real = fold_affine.scaled_weight

    def broken(layer, weight, scale, dtype):
        folded = real(layer, weight, scale, dtype)
        return folded * 1.1 if weight.shape[0] == 5 else folded
    monkeypatch.setattr(fold_affine, "scaled_weight", broken)


def test_one_bad_rewrite_is_dropped_and_named_and_the_good_ones_are_kept(wrong_fold_of_five_channels):
    original = chain_model()
    conv, norm = original.graph.node[3], original.graph.node[4]  # the 5-channel layer
    model, report = rewrite(original)
    assert ops(model) == {"Conv": 3, "BatchNormalization": 1, "Relu": 2}
    assert report.verification.passed and len(report.dropped) == 1
    dropped = report.dropped[0]
    assert dropped.node == f"{norm.name}, {conv.name}" and "fold_affine" in dropped.pattern
    assert dropped.kind == "unverified" and "did not verify" in dropped.reason and "from float64" in dropped.detail
    assert f"left {norm.name}, {conv.name} (Conv+BatchNormalization): its rewrite did not verify" in report.summary()


def test_bad_rewrite_exits_0_with_the_rest_written_or_1_with_strict(wrong_fold_of_five_channels, tmp_path):
    onnx.save(chain_model(), tmp_path / "in.onnx")
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 0 and "did not verify" in output and "PASSED" in output
    assert ops(onnx.load(tmp_path / "out.onnx"))["BatchNormalization"] == 1
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "strict.onnx", "--strict")
    assert code == 1 and not (tmp_path / "strict.onnx").exists()


def test_an_exception_in_one_rewrite_refuses_only_that_rewrite(monkeypatch):
    def crash(*args):
        raise AttributeError("'Variable' object has no attribute 'values'")
    monkeypatch.setattr(merge_branches, "_merge_group", crash)
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    y = b.node("Add", [b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4), b.bn(b.conv(x, 4, 4, 1), 4)])
    model, report = rewrite(b.model([y]))
    assert ops(model) == {"Conv": 2, "Add": 1}  # both BN folds done, the merge refused
    assert any(r.startswith("internal error: AttributeError") and "please report" in r for r in refusals(report))


def test_an_internal_error_is_exit_3_with_one_line(monkeypatch, tmp_path):
    onnx.save(chain_model(), tmp_path / "in.onnx")

    def crash(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(onnx_reparam.api, "optimize", crash)
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 3 and one_line(output) and output.startswith("internal error in ") and "boom" in output
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx", "--debug")
    assert code == 3 and "Traceback" in output


def test_a_constant_node_leaf_in_a_sum_without_fold_constants():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    shift = b.node("Constant", [], value=numpy_helper.from_array(b.rand(1, 4, 1, 1)))
    y = b.node("Add", [b.node("Add", [b.conv(x, 4, 4, 3, pads=[1] * 4), b.conv(x, 4, 4, 1)]), shift])
    model, report = rewrite(b.model([y]), skip="fold_constants")
    assert ops(model) == {"Conv": 1} and not report.dropped


# --- checks that must not pass by comparing nothing, and tolerances that fit the model ---

def test_nothing_compared_is_not_a_pass():
    model = chain_model()
    optimized, _ = onnx_reparam.optimize(model)
    nan = onnx_reparam.verify(model, optimized, inputs={"x": np.full((1, 4, 6, 6), np.nan, np.float32)})
    assert not nan.passed and nan.inconclusive and "nothing compared" in nan.summary()
    b = GraphBuilder()
    x = b.input("x", [0, 4, 6, 6])
    empty = b.model([b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4)])
    with pytest.raises(onnx_reparam.VerificationError, match="nothing compared"):
        onnx_reparam.optimize(empty)


def test_an_error_in_small_values_of_a_mixed_scale_output_fails():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    big = b.node("Mul", [b.conv(x, 4, 2, 1), b.const(np.float32(1e4))])
    small = b.conv(x, 4, 2, 1)
    model = b.model([b.node("Concat", [big, small], axis=1)])
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    weight = next(t for t in wrong.graph.initializer if t.name == model.graph.node[2].input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    result = onnx_reparam.verify(model, wrong)
    # 1% off in the small channels is far inside 1e-4 x the big channels' scale, not inside their own
    assert not result.passed and "from float64" in result.outputs[0].note
    assert result.outputs[0].note.startswith(("channel 2", "channel 3"))  # the small ones
    assert result.outputs[0].max_rel_error < 1e-4


def test_auto_on_a_machine_without_cuda_says_why():
    from onnx_reparam.runtime import cuda_status
    _, report = onnx_reparam.optimize(chain_model(), provider="auto")
    reason = cuda_status()
    if reason is None:
        assert report.verification.provider == "CUDAExecutionProvider"
    else:
        assert report.verification.provider == "CPUExecutionProvider"
        assert report.verification.cuda == f"CUDA not used: {reason}" and not report.verification.notes
        with pytest.raises(onnx_reparam.ReparamError, match=r"^CUDA asked for \(provider 'cuda', --provider cuda\): "):
            onnx_reparam.optimize(chain_model(), provider="cuda")


def test_the_cuda_probe_is_a_model_the_installed_runtime_loads():
    from onnx_reparam.runtime import _probe
    session = ort.InferenceSession(_probe(*runtime_limits()).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones(1, np.float32)})[0][0] == 1


# --- the thirteen defects ---

def test_1_out_named_like_the_inputs_external_data_is_refused(tmp_path):
    folder = tmp_path / "sub"
    folder.mkdir()
    onnx.save(chain_model(), folder / "in.onnx", save_as_external_data=True, location="in.data",
              size_threshold=0)
    before = (folder / "in.data").read_bytes()
    code, output = cli("optimize", folder / "in.onnx", folder / "in.data")
    assert code == 2 and "external data" in output and (folder / "in.data").read_bytes() == before


def test_1_an_existing_data_file_in_the_current_folder_does_not_stop_the_save(tmp_path, monkeypatch):
    onnx.save(chain_model(), tmp_path / "in.onnx", save_as_external_data=True, location="in.data",
              size_threshold=0)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.onnx.data").write_text("someone else's file")
    code, output = cli("optimize", "in.onnx", "out/out.onnx")
    assert code == 0, output
    assert (tmp_path / "out.onnx.data").read_text() == "someone else's file"
    assert ops(onnx.load(tmp_path / "out" / "out.onnx")) == {"Conv": 3, "Relu": 2}


def test_2_shape_with_start_and_end_folds_to_its_slice():
    b = GraphBuilder()
    x = b.input("x", [2, 4, 6, 6])
    channels = b.node("Shape", [x], start=1, end=2)
    target = b.node("Concat", [b.const(np.array([-1], np.int64)), channels], axis=0)
    model = b.model([b.node("Reshape", [b.conv(x, 4, 4, 1), target])])
    optimized, _report = onnx_reparam.optimize(model, verify=False)
    assert "Shape" not in ops(optimized)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)}
    expected, actual = (ort.InferenceSession(m.SerializeToString()).run(None, feeds)[0] for m in (model, optimized))
    assert expected.shape == actual.shape == (72, 4) and np.array_equal(expected, actual)


def test_3_float16_data_with_a_float32_bn_branch_merges_into_a_float16_conv():
    b = GraphBuilder(dtype=np.float16)
    x = b.input("x", [1, 4, 6, 6])
    params = [np.float32(v) * np.ones(4, np.float32) for v in (1.5, 0.1, 0.2, 0.9)]
    bn = b.node("BatchNormalization", [x] + [b.const(p) for p in params])
    model, _ = rewrite(b.model([b.node("Add", [b.conv(x, 4, 4, 3, pads=[1] * 4), bn])], opset=15))
    onnx.checker.check_model(model, full_check=True)
    assert ops(model) == {"Conv": 1} and {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize("constant_shape", [(2, 4, 1, 1), (1, 1, 4, 1, 1)])
def test_4_a_sum_broadcast_by_a_constant_gives_a_valid_model(constant_shape):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    shift = b.const(b.rand(*constant_shape))
    y = b.node("Add", [b.node("Add", [b.conv(x, 4, 4, 3, pads=[1] * 4), b.conv(x, 4, 4, 1)]), shift])
    model, _ = rewrite(b.model([y]))
    onnx.checker.check_model(model, full_check=True)
    assert ops(model)["Conv"] == 1


def test_5_a_negative_pad_before_a_conv_is_read_as_a_crop_and_refused_with_a_reason():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    cropped = b.node("Pad", [x, b.const(np.array([0, 0, -1, -1, 0, 0, -1, -1], np.int64))])
    model, report = rewrite(b.model([b.node("Relu", [b.conv(cropped, 4, 4, 3)])]))
    assert ops(model) == {"Pad": 1, "Conv": 1, "Relu": 1}
    assert any("negative pads" in r for r in refusals(report))


def test_5_a_negative_pad_then_zero_padding_is_not_the_uncropped_input():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 8, 8])
    cropped = b.node("Pad", [x, b.const(np.array([0, 0, -1, -1, 0, 0, -1, -1], np.int64))])
    model, report = rewrite(b.model([b.node("Relu", [b.conv(cropped, 4, 4, 3, pads=[1] * 4)])]))
    assert ops(model) == {"Pad": 1, "Conv": 1, "Relu": 1}
    assert any("pads a cropped input with zeros" in r for r in refusals(report))


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "--seed"),
    (["--input-shape", "x:100000000,4,6,6"], "would take more than"),
    (["--input-shape", "x:1,4,6,7"], "has size 6 on axis 3, input_shapes (--input-shape) gives 7"),
    (["--input-shape", "x:1X4X6X6"], "bad --input-shape"),
    (["--input-shape", "x:+1,4,6,6"], "bad --input-shape"),
    (["--input-shape", "x:1_0,4,6,6"], "bad --input-shape"),
    (["--skip", "nope"], "'nope' is not one of"),
    (["--only", "fold_affine", "--skip", "fold_affine"], "both in only and in skip"),
    (["--rtol", "nan"], "rtol"),
    (["--rtol", "-1"], "--rtol"),
])
def test_6_12_bad_options_are_exit_2(tmp_path, args, message):
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    onnx.save(b.model([b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4)]), tmp_path / "in.onnx")
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx", *args)
    assert code == 2 and message in output and one_line(output)
    assert not (tmp_path / "out.onnx").exists()


def test_6_a_node_name_that_is_not_utf8(tmp_path):
    data = chain_model().SerializeToString().replace(b"Conv9", b"C\xffnv9")
    (tmp_path / "in.onnx").write_bytes(data)
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code in (0, 2) and "Traceback" not in output
    assert code == 2 and one_line(output) or ops(onnx.load(tmp_path / "out.onnx"))["Conv"] == 3


def test_7_a_sparse_initializer_is_valid_input_and_stays_sparse():
    model = chain_model()
    values = numpy_helper.from_array(np.array([2.0], np.float32), "scale")
    indices = numpy_helper.from_array(np.array([1], np.int64), "indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 1, 1, 1]))
    model.graph.node.append(helper.make_node("Mul", [model.graph.output[0].name, "scale"], ["z"]))
    model.graph.output[0].name = "z"
    onnx.checker.check_model(model)
    optimized, report = rewrite(model)
    assert ops(optimized)["Conv"] == 3 and not report.dropped
    assert [t.values.name for t in optimized.graph.sparse_initializer] == ["scale"]


def test_8_an_unwritable_report_path_fails_before_out_is_written(tmp_path):
    onnx.save(chain_model(), tmp_path / "in.onnx")
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx", "--report", tmp_path / "no" / "r.json")
    assert code == 2 and "report" in output and not (tmp_path / "out.onnx").exists()


def test_9_stderr_is_one_line_when_onnxruntime_cannot_load_the_input(tmp_path):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    model = b.model([b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4)])
    model.graph.node.append(helper.make_node("NoSuchOp", [model.graph.output[0].name], ["z"], domain="custom.x"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("custom.x", 1))
    onnx.save(model, tmp_path / "in.onnx")
    result = subprocess.run([sys.executable, "-m", "onnx_reparam.cli", "optimize", str(tmp_path / "in.onnx"),
                             str(tmp_path / "out.onnx")], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and one_line(result.stderr), result.stderr
    assert "onnxruntime cannot run the input model" in result.stderr


def test_9_a_bn_with_non_positive_variance_is_refused_without_warnings():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    params = [np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), -np.ones(4, np.float32)]
    y = b.node("BatchNormalization", [b.conv(x, 4, 4, 3, pads=[1] * 4)] + [b.const(p) for p in params])
    with np.errstate(all="raise"):
        report = onnx_reparam.inspect(b.model([y]))
    assert report.rewrites == 0 and any("variance + epsilon is not positive" in r for r in refusals(report))


def test_10_a_conv_with_an_empty_bias_name_folds_its_bn():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    conv = b.node("Conv", [x, b.const(b.rand(4, 4, 3, 3)), ""], pads=[1] * 4)
    model, _ = rewrite(b.model([b.bn(conv, 4)]))
    assert ops(model) == {"Conv": 1}


def test_10_branches_kept_apart_by_unknown_sizes_say_why():
    b = GraphBuilder()
    x = b.input("x", [1, 4, "H", "W"])
    cropped = b.node("Slice", [x] + [b.const(np.array(v, np.int64)) for v in ([1, 1], [-1, -1], [2, 3])])
    y = b.node("Add", [b.node("Add", [b.conv(x, 4, 4, 3, auto_pad="SAME_UPPER"), b.conv(x, 4, 4, 1)]),
                       b.conv(cropped, 4, 4, 1)])
    report = onnx_reparam.inspect(b.model([y]))
    reasons = refusals(report)
    assert any("auto_pad SAME_UPPER with an input of unknown size" in r for r in reasons)
    assert any("Slice of 'x'" in r and "unknown or different shape" in r for r in reasons)


def test_11_a_model_newer_than_onnxruntime_reads_is_a_clear_error(tmp_path):
    model = chain_model()
    model.ir_version = onnx.IR_VERSION
    model.opset_import[0].version = onnx.defs.onnx_opset_version()
    onnx.save(model, tmp_path / "in.onnx")
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx")
    if (model.ir_version, model.opset_import[0].version) <= runtime_limits():
        pytest.skip("the installed onnxruntime reads onnx's newest IR and opset")
    assert code == 2 and one_line(output) and "--no-verify" in output and "reads up to IR" in output
    code, _ = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx", "--no-verify")
    assert code == 0


def test_13_a_channel_slice_from_channel_0_is_not_a_padding():
    b = GraphBuilder()
    x = b.input("x", [1, 8, 6, 6])
    first_half = b.node("Slice", [x] + [b.const(np.array(v, np.int64)) for v in ([0], [4], [1])])
    model, report = rewrite(b.model([b.node("Relu", [b.conv(first_half, 4, 4, 3, pads=[1] * 4)])]))
    assert ops(model) == {"Slice": 1, "Conv": 1, "Relu": 1} and not report.dropped


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_average_pool_with_auto_pad_excludes_padding_and_is_not_a_conv(auto_pad):
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    pool = b.node("AveragePool", [x], kernel_shape=[2, 2], auto_pad=auto_pad)
    y = b.node("Add", [b.bn(pool, 4), b.bn(b.conv(x, 4, 4, 1), 4)])
    model, report = rewrite(b.model([y]))
    assert not report.dropped and ops(model)["AveragePool"] == 1
    assert any("count_include_pad=0" in r for r in refusals(report))


# --- rewrites as records ---

@pytest.mark.parametrize("ir_version", [8, 10])
def test_every_new_node_says_which_rule_made_it(ir_version):
    model = chain_model()
    model.ir_version = ir_version
    optimized, report = rewrite(model)
    tagged = {}
    for node in optimized.graph.node:
        if node.op_type != "Conv":
            continue
        if ir_version >= 10:
            tagged[node.name] = {p.key: p.value for p in node.metadata_props}["onnx_reparam.rule"]
        else:
            tagged[node.name] = node.doc_string.removeprefix("onnx_reparam.rule: ")
    assert set(tagged.values()) == {"fold_affine: Conv+BatchNormalization"}
    records = next(p for p in report.passes if p.name == "fold_affine").rewrites
    assert sorted(name for r in records for name in r.added) == sorted(tagged)
    assert all(len(r.replaced) == 2 and r.pass_name == "fold_affine" for r in records)


def test_a_refusal_names_the_original_nodes_not_the_tool_made_ones():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    total = b.node("Add", [b.conv(x, 4, 4, 3, pads=[1] * 4), b.conv(x, 4, 4, 1)])
    model = b.model([b.bn(total, 4), b.node("Relu", [total])])  # the sum is read twice: BN stays
    _, report = rewrite(model)
    (refusal,) = [r for p in report.passes for r in p.refusals if "also read by" in r.reason]
    originals = {n.name for n in model.graph.node if n.op_type in ("Add", "Conv")}
    assert set(refusal.node.split(", ")) == originals and "_reparam" not in refusal.node
