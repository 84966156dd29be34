"""The command line: the main job, bad input (one line, non-zero exit), atomic and safe output."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import GraphBuilder, ops

import onnx_reparam
from onnx_reparam.cli import main
from onnx_reparam.errors import ReparamError
from onnx_reparam.runtime import cuda_status

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick


def block_model(shape=(1, 4, 6, 6)) -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input("x", list(shape))
    c = shape[1]
    dense = b.bn(b.conv(x, c, c, 3, bias=False, pads=[1, 1, 1, 1]), c)
    point = b.bn(b.conv(x, c, c, 1, bias=False), c)
    y = b.node("Add", [b.node("Add", [dense, point]), b.bn(x, c)])
    return b.model([b.node("Relu", [y])])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(block_model(), path)
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(output: str) -> bool:
    lines = [line for line in output.strip().splitlines() if line]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output


def test_optimize_writes_deploy_structure_and_keeps_input(model_path, tmp_path):
    before = digest(model_path)
    code, output = run("optimize", model_path, tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert code == 0, output
    provider = "CPUExecutionProvider" if cuda_status() else "CUDAExecutionProvider"  # auto: CUDA where it loads
    assert f"verification PASSED on {provider}" in output
    assert re.search(r"^nodes +8 +2$", output, re.M)
    assert ops(onnx.load(tmp_path / "out.onnx")) == {"Conv": 1, "Relu": 1}
    assert digest(model_path) == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["passed"] and report["after"]["nodes"] == 2
    assert {p["name"] for p in report["passes"]} == {"fold_constants", "drop_noops", "transposes", "compose", "fold_affine",
                                                       "merge_branches", "conv_into_fc"}


def test_quiet_prints_nothing(model_path, tmp_path):
    assert run("optimize", model_path, tmp_path / "out.onnx", "--quiet") == (0, "")


def test_skip_and_only(model_path, tmp_path):
    code, output = run("optimize", model_path, tmp_path / "a.onnx", "--only", "fold_affine")
    assert code == 0 and ops(onnx.load(tmp_path / "a.onnx"))["Add"] == 2
    code, output = run("optimize", model_path, tmp_path / "b.onnx", "--skip", "fold_affine")
    assert code == 0 and "nothing rewritten" in output  # BN(conv) leaves are not branches of x
    code, output = run("optimize", model_path, tmp_path / "c.onnx", "--skip", "nope")
    assert code == 2 and one_line_error(output) and "'nope' is not one of" in output


@pytest.mark.parametrize("case", ["missing", "not_onnx", "truncated", "empty", "directory"])
def test_unreadable_input_is_one_line(case, model_path, tmp_path):
    path = tmp_path / "bad.onnx"
    if case == "not_onnx":
        path.write_text("this is not a model\n" * 10)
    elif case == "truncated":
        path.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 2 and one_line_error(output), output
    assert not (tmp_path / "out.onnx").exists()


def test_missing_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(block_model(), path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 2 and one_line_error(output) and "missing external data" in output


def test_external_data_input_gives_external_data_output(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(block_model((1, 16, 6, 6)), path, save_as_external_data=True, location="ext.bin",
              size_threshold=0)
    before = digest(tmp_path / "ext.bin")
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 0, output
    assert (tmp_path / "out.onnx.data").exists() and digest(tmp_path / "ext.bin") == before
    assert ops(onnx.load(tmp_path / "out.onnx")) == {"Conv": 1, "Relu": 1}


def test_unsupported_opset(tmp_path):
    model = block_model()
    model.opset_import[0].version = 6
    path = tmp_path / "old.onnx"
    path.write_bytes(model.SerializeToString())
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 2 and one_line_error(output) and "unsupported opset 6" in output


def test_training_mode_bn_is_skipped_not_an_error(tmp_path):
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5, 5])
    path = tmp_path / "train.onnx"
    onnx.save(b.model([b.bn(b.conv(x, 3, 4), 4, n_out=3, training_mode=1)]), path)
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 0, output
    assert "BatchNormalization in training mode" in output and "unchanged" in output


def test_dynamic_dims_need_input_shape(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(block_model(("N", 4, "H", "W")), path)
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 2 and one_line_error(output) and "--input-shape" in output
    code, output = run("optimize", path, tmp_path / "out.onnx", "--input-shape", "x:2x4x7x7")
    assert code == 0 and "PASSED" in output
    dims = onnx.load(tmp_path / "out.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]  # the model keeps its dynamic dims
    code, output = run("optimize", path, tmp_path / "out.onnx", "--input-shape", "x:2by4")
    assert code == 2 and one_line_error(output)
    code, output = run("optimize", path, tmp_path / "out.onnx", "--input-shape", "y:1x4x7x7")
    assert code == 2 and "has no input 'y'" in output


def test_output_equal_to_input_is_refused(model_path):
    before = digest(model_path)
    code, output = run("optimize", model_path, model_path)
    assert code == 2 and one_line_error(output) and digest(model_path) == before


def test_unwritable_output(model_path, tmp_path):
    code, output = run("optimize", model_path, tmp_path / "no" / "such" / "dir" / "out.onnx")
    assert code == 2 and one_line_error(output)
    (tmp_path / "file").write_text("")
    code, output = run("optimize", model_path, tmp_path / "file" / "out.onnx")
    assert code == 2 and one_line_error(output)


def test_nothing_to_rewrite_writes_unchanged(tmp_path):
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    model = b.model([b.node("Relu", [b.conv(x, 3, 4)])])
    path = tmp_path / "plain.onnx"
    onnx.save(model, path)
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 0 and "nothing rewritten" in output
    assert onnx.load(tmp_path / "out.onnx").graph == onnx.load(path).graph


def test_rewrites_that_do_not_verify_are_dropped_and_the_rest_written(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    code, output = run("optimize", model_path, out, "--rtol", "0", "--atol", "0")
    assert code == 0 and "its rewrite did not verify" in output and "PASSED" in output and out.exists()


def test_strict_writes_nothing_unless_forced(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    code, output = run("optimize", model_path, out, "--rtol", "0", "--atol", "0", "--strict")
    assert code == 1 and "its rewrite did not verify" in output and not out.exists()
    assert not list(tmp_path.glob(".onnx-reparam-*"))  # no temporary files left behind
    code, output = run("optimize", model_path, out, "--rtol", "0", "--atol", "0", "--strict", "--force")
    assert code == 1 and out.exists()


def test_user_inputs_from_npz(model_path, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.ones((1, 4, 6, 6), np.float32))
    code, output = run("optimize", model_path, tmp_path / "out.onnx", "--inputs", tmp_path / "in.npz")
    assert code == 0 and "PASSED" in output


def test_inspect_and_check(model_path, tmp_path):
    code, output = run("inspect", model_path)
    assert code == 0 and "merge_branches: rewrote 1 x branches" in output
    assert run("inspect", model_path, "--check")[0] == 1
    run("optimize", model_path, tmp_path / "out.onnx")
    code, output = run("inspect", tmp_path / "out.onnx", "--check")
    assert code == 0 and "nothing rewritten" in output


def test_verify_two_models(model_path, tmp_path):
    run("optimize", model_path, tmp_path / "out.onnx")
    code, output = run("verify", model_path, tmp_path / "out.onnx")
    assert code == 0 and "PASSED" in output
    other = tmp_path / "other.onnx"
    model = block_model()
    model.graph.initializer[0].raw_data = np.ones(4 * 4 * 9, np.float32).tobytes()
    onnx.save(model, other)
    code, output = run("verify", model_path, other)
    assert code == 1 and "MISMATCH" in output
    code, output = run("verify", model_path, tmp_path / "out.onnx", "--provider", "cuda")
    reason = cuda_status()
    if reason is None:  # a machine with a GPU and its libraries
        assert code == 0 and "PASSED on CUDAExecutionProvider" in output
    else:
        assert code == 2 and one_line_error(output) and reason in output


def test_console_script_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnx_reparam.cli", "optimize", str(tmp_path / "nope.onnx"),
                             str(tmp_path / "out.onnx")], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_models_that_cannot_take_the_same_inputs_are_a_usage_error(tmp_path):
    small, large, second = (tmp_path / n for n in ("small.onnx", "large.onnx", "second.onnx"))
    onnx.save(block_model((1, 4, 6, 6)), small)
    onnx.save(block_model((1, 4, 8, 8)), large)
    b = GraphBuilder()
    onnx.save(b.model([b.node("Add", [b.input("x", [1, 4, 6, 6]), b.input("q", [1, 4, 6, 6])])]), second)
    code, output = run("verify", small, large)
    assert code == 2 and one_line_error(output)
    assert f"input 'x' is float 1x4x6x6 in {small} but float 1x4x8x8 in {large}" in output
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(block_model((1, 4, "H", "W")), dynamic)
    code, output = run("verify", dynamic, small, "--input-shape", "x:1,4,8,8")
    assert code == 2 and one_line_error(output)
    assert f"input 'x' is run at 1x4x8x8, but {small} takes float 1x4x6x6" in output
    code, output = run("bench", dynamic, small, "--input-shape", "x:1,4,8,8", "--rounds", 1)
    assert code == 2 and one_line_error(output) and f"but {small} takes float 1x4x6x6" in output
    code, output = run("bench", small, second, "--rounds", 1)
    assert code == 2 and one_line_error(output) and f"{second} has input 'q' that {small} lacks" in output


@pytest.mark.parametrize("option", [("--threads", 100000), ("--rounds", 10**9), ("--warmup", -1), ("--threads", 0)])
def test_absurd_bench_settings_are_refused_up_front(model_path, option):
    code, output = run("bench", model_path, model_path, *option)
    assert code == 2 and "Invalid value for" in output and option[0] in output
    with pytest.raises(ReparamError, match=f"{option[0][2:]} must be an integer from"):
        onnx_reparam.bench(model_path, model_path, **{option[0][2:]: option[1]})


def unrunnable_models() -> dict[str, onnx.ModelProto]:
    """Valid to onnx's checker, refused by onnxruntime when run."""
    b = GraphBuilder()
    transposed = b.node("ConvTranspose", [b.input("x", [1, 32, 4, 4]), b.const(b.rand(32, 2, 3, 3))], group=3)
    b.bn(transposed, 6)
    graph = onnx.helper.make_graph(b.nodes, "t", b.inputs, [onnx.helper.make_tensor_value_info(
        b.nodes[-1].output[0], onnx.TensorProto.FLOAT, [1, 6, 6, 6])], initializer=b.inits)
    models = {"ConvTranspose, 32 channels in 3 groups": onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)}
    b = GraphBuilder()
    padded = b.node("Pad", [b.input("x", [1, 4, 5, 5]), b.const(np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64))])
    models["a Pad on the channel axis before a Conv"] = b.model([b.bn(b.conv(padded, 4, 4, 1), 4)])
    return models


@pytest.mark.parametrize("kind", unrunnable_models())
def test_a_model_onnxruntime_cannot_run_is_bad_input_before_any_rewrite(tmp_path, kind):
    path = tmp_path / "in.onnx"
    onnx.save(unrunnable_models()[kind], path)
    code, output = run("optimize", path, tmp_path / "out.onnx")
    assert code == 2 and one_line_error(output) and "onnxruntime cannot run the input model" in output
    assert not (tmp_path / "out.onnx").exists()
    stages = []
    with pytest.raises(ReparamError, match="cannot run the input model"):
        onnx_reparam.optimize(path, progress=stages.append)
    assert not any(s.startswith("sweep") for s in stages)  # refused before any rewrite
    _, report = onnx_reparam.optimize(path, verify=False)  # unchecked, as asked: no internal error
    assert not any(r.kind == "internal error" for p in report.passes for r in p.refusals)


def two_block_model() -> onnx.ModelProto:
    """Two RepVGG-like blocks (their identity BNs with large gains on a few channels) and a head."""
    b = GraphBuilder()
    y = b.input("x", [1, 4, 6, 6])
    for _ in range(2):
        dense = b.bn(b.conv(y, 4, 4, 3, bias=False, pads=[1, 1, 1, 1]), 4)
        point = b.bn(b.conv(y, 4, 4, 1, bias=False), 4)
        identity = b.bn(y, 4)
        y = b.node("Relu", [b.node("Add", [b.node("Add", [dense, point]), identity])])
    b.inits[-1].CopyFrom(onnx.numpy_helper.from_array(np.array([1e-3, 1, 1, 1e-3], np.float32), b.inits[-1].name))
    y = b.node("Flatten", [b.node("GlobalAveragePool", [y])], axis=1)
    return b.model([b.node("Gemm", [y, b.const(b.rand(3, 4)), b.const(b.rand(3))], transB=1)])


def test_optimize_int8_ready_and_keep_identity(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(two_block_model(), source)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["optimize", str(source), str(out), "--int8-ready", "--keep-identity"])
    assert result.exit_code == 0, result.output
    assert "equalize: rewrote 1 x equalization" in result.output
    assert "split_identity: rewrote" in result.output and "verification PASSED" in result.output
    assert ops(onnx.load(out))["Mul"] >= 1
    listed = CliRunner().invoke(main, ["passes"]).output
    assert "equalize         (only with --int8-ready)" in listed and "(only with --keep-identity)" in listed
    result = CliRunner().invoke(main, ["optimize", str(source), str(out), "--skip", "equalize"])
    assert result.exit_code == 2 and "pass equalize runs only with int8_ready=True (--int8-ready)" in result.output


def test_quantize_check_command(tmp_path):
    fused = tmp_path / "fused.onnx"
    onnx_reparam.save_model(onnx_reparam.optimize(two_block_model())[0], fused)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 4, 6, 6)).astype(np.float32))
    hints, report = tmp_path / "hints.json", tmp_path / "qc.json"
    plot = tmp_path / "levels.svg"
    result = CliRunner().invoke(main, ["quantize-check", str(fused), "--data", str(data), "--int8-hints", str(hints),
                                       "--report", str(report), "--plot", str(plot)])
    assert plot.read_text().startswith("<svg")
    assert result.exit_code == 0, result.output
    assert "worst outlier ratio" in result.output and "optimize --int8-ready" in result.output
    assert "QDQ/tensor" in result.output and "most sensitive layers" in result.output
    loaded = json.loads(hints.read_text())
    assert "nodes_to_exclude" in loaded["onnxruntime"] and loaded["activation_ranges"]
    assert json.loads(report.read_text())["measured"]["as given"]["QDQ/tensor"]["sqnr"]
    for args, message in ((["--int8-hints", str(hints)], "--int8-hints needs --data"),
                          (["--data", str(tmp_path / "none.npz")], "no such file or folder"),
                          (["--mean", "1,2"], "--mean takes three numbers")):
        result = CliRunner().invoke(main, ["quantize-check", str(fused), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.count("\n") == 1


def test_optimize_int8_ready_chosen_on_calibration_data(tmp_path):
    source, out, data = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    onnx.save(two_block_model(), source)
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 4, 6, 6)).astype(np.float32))
    result = CliRunner().invoke(main, ["optimize", str(source), str(out), "--int8-ready", "--calibration", str(data),
                                       "--int8-target", "weights"])
    assert result.exit_code == 0, result.output
    assert "INT8, weight-only INT8 per tensor, output SQNR on 4 samples after calibrating on 4: fused" in result.output
    assert "written: " in result.output and "verification PASSED" in result.output
    for args, message in ((["--calibration", str(data)], "give --int8-ready too"),
                          (["--int8-ready", "--keep-identity", "--calibration", str(data)], "drop --keep-identity")):
        result = CliRunner().invoke(main, ["optimize", str(source), str(out), *args])
        assert result.exit_code == 2 and message in result.output, result.output
