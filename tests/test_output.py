"""What a person reads (the op table, grouped refusals, -q/-v) and the conventions of the CLI and
the library that issue 13 asked for."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import GraphBuilder, ops
from test_cli import block_model, one_line_error

import onnx_reparam
from onnx_reparam.cli import main
from onnx_reparam.report import Refusal, Report, Verification

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def model_path(tmp_path):
    onnx.save(block_model(), tmp_path / "in.onnx")
    return tmp_path / "in.onnx"


def test_summary_is_an_op_table_of_what_changed(model_path, tmp_path):
    code, output = cli("optimize", model_path, tmp_path / "out.onnx")
    assert code == 0
    table = dict(re.findall(r"^(\w+) +([\d,.]+ ?\w*  +[\d,.]+ ?\w*)$", output, re.M))
    assert set(table) == {"Add", "BatchNormalization", "Conv", "nodes", "parameters", "weights", "file"}
    assert table["Conv"].split() == ["2", "1"] and "Relu" not in table  # unchanged ops are left out
    assert "rewrote nothing" not in output  # idle passes only with -v
    assert "rewrote nothing" in cli("optimize", model_path, tmp_path / "v.onnx", "-v")[1]


def test_identical_refusals_are_one_line_with_a_count():
    report = Report()
    from onnx_reparam.report import PassReport
    report.passes = [PassReport("merge_branches", refusals=[
        Refusal(f"Add{i}", "branches not merged: strides differ", "branches", f"branches of 'x{i}'")
        for i in range(5)])]
    lines = [line for line in report.summary().splitlines() if "left" in line]
    assert lines == ["  left 5 x (branches): branches not merged: strides differ: Add0; Add1; Add2; ..."]


def test_refusals_of_non_reparam_patterns_only_with_verbose():
    b = GraphBuilder()
    x = b.input("x", [1, 4, 6, 6])
    conv = b.conv(x, 4, 4, 3, pads=[1] * 4)
    gelu_div = b.node("Div", [conv, b.const(np.float32(1.4142135))])
    model = b.model([b.node("Mul", [conv, b.node("Erf", [gelu_div])])])
    report = onnx_reparam.inspect(model)
    assert any("cannot fold Div" in r.reason for p in report.passes for r in p.refusals)
    assert "cannot fold Div" not in report.summary() and "-v lists them" in report.summary()
    assert "cannot fold Div" in report.summary(verbose=True)


@pytest.mark.parametrize("arch", ["fastvit", "repmlpnet", "repvit"])
def test_family_exports_print_no_refusal_of_a_non_reparam_pattern(arch, tmp_path):
    import export
    train_path, _ = export.export_pair(arch, tmp_path, "ts")
    code, output = cli("optimize", train_path, tmp_path / "out.onnx")
    assert code == 0 and "PASSED" in output
    # a BatchNormalization left is named at default verbosity (RepMLPNet's prebn1: its partitions
    # mix its channels); nothing else is
    assert not [line for line in output.splitlines()
                if line.strip().startswith("left ") and "BatchNormalization" not in line], output


def test_help_quiet_and_verbose(model_path, tmp_path):
    code, output = cli("-h")
    assert code == 0 and "optimize" in output
    code, output = cli("optimize", "-h")
    flat = " ".join(output.split())
    assert code == 0 and "--only PASS" in flat and "the passes command lists them" in flat
    assert cli("optimize", model_path, tmp_path / "q.onnx", "-q") == (0, "")


def test_verify_has_report_and_quiet(model_path, tmp_path):
    cli("optimize", model_path, tmp_path / "out.onnx")
    code, output = cli("verify", model_path, tmp_path / "out.onnx", "-q", "--report", tmp_path / "r.json")
    assert (code, output) == (0, "")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verification"]["passed"] and data["verification"]["outputs"][0]["compared"] > 0


def test_json_report_has_rewrite_and_refusal_records(model_path, tmp_path):
    cli("optimize", model_path, tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    record = next(p for p in data["passes"] if p["name"] == "fold_affine")["rewrites"][0]
    assert set(record) == {"pass_name", "pattern", "replaced", "added"}
    assert record["pattern"] == "Conv+BatchNormalization" and len(record["replaced"]) == 2


def test_shapes_with_commas_or_x(tmp_path):
    b = GraphBuilder()
    x = b.input("x", ["N", 4, "H", 6])
    onnx.save(b.model([b.bn(b.conv(x, 4, 4, 3, pads=[1] * 4), 4)]), tmp_path / "in.onnx")
    for spec in ("x:2,4,6,6", "x:2x4x6x6"):  # H must be given; a batch alone would be chosen
        code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx", "--input-shape", spec)
        assert code == 0 and "PASSED" in output
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 2 and one_line_error(output)
    assert "a symbolic dim 'H' (axis 2) with no size" in output and "--input-shape x:1,4,224,6" in output


def keep_weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    return model


def test_weights_that_are_inputs_are_reported_and_can_be_constants(tmp_path):
    onnx.save(keep_weights_as_inputs(block_model()), tmp_path / "in.onnx")
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 0 and "weights are also graph inputs" in output and "--weights-as-constants" in output
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx", "--weights-as-constants")
    assert code == 0 and "PASSED" in output
    out = onnx.load(tmp_path / "out.onnx")
    assert ops(out) == {"Conv": 1, "Relu": 1} and [i.name for i in out.graph.input] == ["x"]


def test_library_takes_a_pass_name_or_a_list_and_rejects_wrong_types():
    one = onnx_reparam.inspect(block_model(), only="fold_affine")
    assert [p.name for p in one.passes] == ["fold_affine"]
    assert [p.name for p in onnx_reparam.inspect(block_model(), skip=["fold_affine", "compose"]).passes] == \
        ["fold_constants", "drop_noops", "transposes", "merge_branches", "conv_into_fc"]
    for options in ({"rtol": "x"}, {"seed": -1}, {"verify": "yes"}, {"provider": "gpu"},
                    {"input_shapes": {"x": "1x4x6x6"}}, {"only": [1]}):
        with pytest.raises(onnx_reparam.ReparamError):
            onnx_reparam.optimize(block_model(), **options)
    with pytest.raises(onnx_reparam.ReparamError, match="cannot read a model from int"):
        onnx_reparam.optimize(3)


def test_optimize_takes_what_the_dynamo_exporter_returns():
    import repvgg
    import torch
    net = repvgg.randomize_bn(repvgg.RepVGGBlock(4, 4, 1), 0).eval()
    program = torch.onnx.export(net, (torch.randn(1, 4, 8, 8),), dynamo=True, verbose=False)
    from_program, report = onnx_reparam.optimize(program)
    assert report.verification.passed and ops(from_program)["Conv"] == 1
    from_ir, _ = onnx_reparam.optimize(program.model)
    from_proto, _ = onnx_reparam.optimize(program.model_proto)
    assert ops(from_ir) == ops(from_program) == ops(from_proto)


def test_pre_commit_hook_and_inspect_check_on_several_files(model_path, tmp_path):
    hooks = (Path(__file__).resolve().parent.parent / ".pre-commit-hooks.yaml").read_text()
    assert "entry: onnx-reparam inspect --check -q" in hooks and "files:" in hooks
    deployed = tmp_path / "deploy.onnx"
    cli("optimize", model_path, deployed)
    assert cli("inspect", "--check", "-q", deployed)[0] == 0
    code, output = cli("inspect", "--check", "-q", deployed, model_path)
    assert code == 1 and str(model_path) in output


def test_progress_is_shown_on_a_terminal_after_a_delay_and_cleared(monkeypatch, tmp_path):
    import io

    from onnx_reparam import cli as cli_module

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(cli_module._Progress, "DELAY", 0.0)
    progress = cli_module._Progress(True)
    onnx_reparam.optimize(block_model(), verify=False, progress=progress)
    progress.clear()
    shown = terminal.getvalue()
    assert "sweep 1: fold_affine" in shown and shown.endswith("\r\033[K")
    assert cli_module._Progress(False).enabled is False  # --quiet


def test_json_report_has_stage_times_and_peak_memory(model_path, tmp_path):
    cli("optimize", model_path, tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert {"load", "rewrite", "verify", "save"} <= set(data["seconds"]) and data["peak_memory"] > 2**20


def test_weights_held_in_constant_nodes_are_counted(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [onnx.helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(
                 rng.standard_normal((8, 4, 3, 3)).astype(np.float32))),
             onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4),
             onnx.helper.make_node("Constant", [], ["s"], value=onnx.numpy_helper.from_array(
                 rng.uniform(1, 2, (1, 8, 1, 1)).astype(np.float32))),
             onnx.helper.make_node("Mul", ["y", "s"], ["z"])]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 4, 6, 6])],
                                   [onnx.helper.make_tensor_value_info("z", 1, [1, 8, 6, 6])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10),
              tmp_path / "in.onnx")
    code, output = cli("optimize", tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert code == 0 and re.search(r"^parameters +296 +296$", output, re.MULTILINE), output
    assert re.search(r"^weights +1\.2 KB +1\.2 KB$", output, re.MULTILINE), output


def test_help_summaries_are_whole_and_ranges_are_not_listed():
    code, output = cli("-h")
    commands = output.split("Commands:")[1]
    assert code == 0 and "..." not in commands  # click cuts a summary over 45 characters
    assert "Time B against A on the same inputs." in commands
    for command in ("optimize", "verify", "bench"):
        assert "<=x<=" not in cli(command, "-h")[1]


def test_cuda_not_used_is_news_only_where_there_is_a_gpu():
    check = Verification("CPUExecutionProvider", [], cuda="CUDA not used: no onnxruntime-gpu",
                         notes=["input 'x': dynamic batch 'N' set to 1 for the check"])
    assert "CUDA not used" not in check.summary()
    assert "  CUDA not used: no onnxruntime-gpu" in check.summary(verbose=True).splitlines()
    check.gpu = True
    lines = check.summary().splitlines()
    assert "  CUDA not used: no onnxruntime-gpu" in lines  # a line of its own, the batch note another
    assert "  input 'x': dynamic batch 'N' set to 1 for the check" in lines


def test_no_verify_says_the_output_was_not_verified(model_path, tmp_path):
    code, output = cli("optimize", model_path, tmp_path / "out.onnx", "--no-verify")
    assert code == 0 and "NOT VERIFIED: the check was skipped (verify=False (--no-verify))" in output
    assert output.endswith(f"wrote {tmp_path / 'out.onnx'} (not verified)\n")
    assert "NOT VERIFIED" not in cli("inspect", model_path)[1]  # a dry run writes nothing to verify


def test_verify_and_bench_verbose_say_more(model_path, tmp_path):
    cli("optimize", model_path, tmp_path / "out.onnx")
    plain = cli("verify", model_path, tmp_path / "out.onnx")[1]
    code, verbose = cli("verify", model_path, tmp_path / "out.onnx", "-v")
    assert code == 0 and "finite values compared (output); max abs err" in verbose and "compared (" not in plain
    plain = cli("bench", model_path, tmp_path / "out.onnx", "--rounds", "3", "--warmup", "0")[1]
    code, verbose = cli("bench", model_path, tmp_path / "out.onnx", "--rounds", "3", "--warmup", "0", "-v")
    assert code == 0 and "  input x: float32 1x4x6x6" in verbose and "fastest" in verbose
    assert "fastest" not in plain and "input x" not in plain


def test_bounds_say_what_they_are_relative_to(model_path, tmp_path):
    _, output = cli("optimize", model_path, tmp_path / "out.onnx")
    assert "relative to each channel's largest value)" in output
    _, output = cli("optimize", model_path, tmp_path / "out2.onnx", "--rtol", "1e-4")
    assert "(bound " in output and ": atol + rtol x the largest value)" in output


def test_summary_names_ir_opset_inputs_outputs_and_file_sizes(model_path, tmp_path):
    code, output = cli("optimize", model_path, tmp_path / "out.onnx")
    model = onnx.load(model_path)
    assert output.splitlines()[0] == (f"IN  IR {model.ir_version}, opset {model.opset_import[0].version}; "
                                      "inputs x: float32 [1, 4, 6, 6]; outputs " + _outputs(model))
    sizes = re.search(r"^file +([\d.]+ \w+) +([\d.]+ \w+)$", output, re.M)
    assert code == 0 and sizes, output
    code, output = cli("optimize", model_path, tmp_path / "static.onnx", "--static-shape")
    assert code == 0 and not output.splitlines()[1].startswith("OUT")  # static already: the same


def _outputs(model) -> str:
    out = model.graph.output[0]
    dims = ", ".join(str(d.dim_value) for d in out.type.tensor_type.shape.dim)
    return f"{out.name}: float32 [{dims}]"


def test_an_unwritable_report_is_found_before_the_run(model_path, tmp_path):
    code, output = cli("inspect", model_path, "--report", tmp_path / "missing" / "r.json")
    assert code == 2 and output == f"error: report {tmp_path / 'missing' / 'r.json'}: folder {tmp_path / 'missing'} does not exist\n"
