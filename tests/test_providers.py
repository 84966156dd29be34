"""Execution providers, packaging and the latency A/B: CUDA when it really loads, the reason when
not, an install that fits each platform, and `bench`. Tests marked `gpu` run where CUDA loads."""
from __future__ import annotations

import json
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

import onnx
import pytest
import tomllib
from click.testing import CliRunner
from packaging.requirements import Requirement
from test_cli import block_model

import onnx_reparam
from onnx_reparam.cli import main
from onnx_reparam.runtime import Runner, cuda_status, doubled_install, gpu_present

pytestmark = pytest.mark.quick  # tiny graphs: the quick tier, -m quick

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = cuda_status()
gpu = pytest.mark.skipif(NO_CUDA is not None, reason=f"needs CUDA: {NO_CUDA}")

PLATFORMS = {  # (sys_platform, platform_machine): the onnxruntime package that has a wheel there
    ("linux", "x86_64"): "onnxruntime-gpu", ("win32", "AMD64"): "onnxruntime-gpu",
    ("linux", "aarch64"): "onnxruntime", ("darwin", "arm64"): "onnxruntime",
    ("darwin", "x86_64"): "onnxruntime", ("win32", "ARM64"): "onnxruntime",
}


@pytest.mark.parametrize("system,machine", sorted(PLATFORMS))
def test_each_platform_gets_the_onnxruntime_that_has_a_wheel_there(system, machine):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {"sys_platform": system, "platform_machine": machine}
    runtimes = [r.name for r in map(Requirement, project["dependencies"])
                if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(env))]
    assert runtimes == [PLATFORMS[system, machine]]
    cuda = [Requirement(r) for r in project["optional-dependencies"]["cuda"]]
    wanted = [r for r in cuda if r.marker.evaluate(env)]
    assert (wanted[0].extras == {"cuda", "cudnn"}) if PLATFORMS[system, machine] == "onnxruntime-gpu" else not wanted


class _Installed:
    def __init__(self, folder):
        self.folder = folder

    def locate_file(self, path):
        return Path(self.folder) / path


def test_a_doubled_onnxruntime_install_says_how_to_repair_it(monkeypatch, tmp_path):
    monkeypatch.setattr(metadata, "distribution", lambda name: _Installed(tmp_path))  # both in one folder
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in doubled_install()
    assert any("share one folder" in n for n in Runner("cpu").notes)


def test_two_onnxruntimes_in_two_folders_are_not_a_doubled_install(monkeypatch, tmp_path):
    # e.g. onnxruntime-gpu on PYTHONPATH before a CPU onnxruntime in the venv (seen on a GPU machine)
    monkeypatch.setattr(metadata, "distribution", lambda name: _Installed(tmp_path / name))
    assert doubled_install() is None and Runner("cpu").notes == []


def test_cuda_that_cannot_run_the_input_model_falls_back_to_cpu_and_says_why(monkeypatch, tmp_path):
    # Seen on an H200: cuDNN refuses a BatchNormalization (CUDNN_STATUS_BAD_PARAM) that the CPU runs.
    # Here CUDA "loads" but no session can be placed on it, which takes the same path.
    runtime = sys.modules["onnx_reparam.runtime"]
    monkeypatch.setattr(runtime, "cuda_status", lambda: None)
    monkeypatch.setattr(runtime, "device_name", lambda provider: provider[:4])
    if NO_CUDA is None:  # a real GPU: make its sessions fail as cuDNN's refusal did
        monkeypatch.setattr(runtime.Runner, "session", _cuda_refuses(runtime.Runner.session))
    _, report = onnx_reparam.optimize(block_model())
    check = report.verification
    assert check.passed and check.provider == "CPUExecutionProvider" and check.device.startswith("CPUE")
    assert check.cuda.startswith("CUDA not used: onnxruntime's CUDA provider cannot run the input model: ")
    onnx.save(block_model(), tmp_path / "a.onnx")
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                                       "--provider", "cuda"])
    assert result.exit_code == 2 and result.output.startswith(
        "error: CUDA asked for (provider 'cuda', --provider cuda): onnxruntime's CUDA provider cannot run the "
        "input model: ")
    assert result.output.endswith("; ask for cpu or auto\n") and not (tmp_path / "b.onnx").exists()


def _cuda_refuses(session):
    def refusing(self, *args, **kwargs):
        if self.provider.startswith("CUDA"):
            raise RuntimeError("CUDNN failure 2000: CUDNN_STATUS_BAD_PARAM")
        return session(self, *args, **kwargs)
    return refusing


def test_the_check_names_provider_device_and_runtime():
    _, report = onnx_reparam.optimize(block_model(), provider="cpu")
    assert report.verification.provider == "CPUExecutionProvider"
    assert report.verification.device.startswith("CPU") and "onnxruntime 1." in report.verification.device


def test_bench_cli_gives_medians_and_the_ratio_as_json(tmp_path):
    onnx.save(block_model(), tmp_path / "a.onnx")
    onnx_reparam.save_model(onnx_reparam.optimize(block_model())[0], tmp_path / "b.onnx")
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                                       "--rounds", "20", "--warmup", "2", "--threads", "1",
                                       "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "B/A" in result.output and "20 interleaved rounds after 2 warm-up" in result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["threads"] == 1 and data["rounds"] == 20 and data["ratio_q1"] <= data["ratio"] <= data["ratio_q3"]
    assert 0 < data["a"]["q1_ms"] <= data["a"]["median_ms"] <= data["a"]["q3_ms"]
    if NO_CUDA is not None:
        assert data["provider"] == "CPUExecutionProvider" and "measured on the CPU" in data["notes"]


def test_optimize_bench_times_in_against_out(tmp_path):
    onnx.save(block_model(), tmp_path / "a.onnx")
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--bench"])
    assert result.exit_code == 0 and "latency on" in result.output and "B/A" in result.output


@pytest.mark.gpu
@gpu
def test_verification_and_bench_run_on_cuda(tmp_path):
    _, report = onnx_reparam.optimize(block_model(), provider="cuda")
    assert report.verification.passed and report.verification.provider == "CUDAExecutionProvider"
    result = onnx_reparam.bench(block_model(), block_model(), provider="cuda", rounds=5, warmup=1)
    assert result.provider == "CUDAExecutionProvider" and result.ratio > 0


@pytest.mark.skipif(NO_CUDA is None, reason="CUDA loads here")
def test_without_cuda_the_cause_is_named_and_cuda_requested_is_exit_2(tmp_path):
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        # onnxruntime-gpu without its CUDA libraries (or without a GPU): the library it misses, or that
        assert re.search(r"lib\w+\.so[.\d]*: cannot open|no usable GPU|does not load", NO_CUDA), NO_CUDA
    else:
        assert "has no CUDA execution provider (" in NO_CUDA
    onnx.save(block_model(), tmp_path / "a.onnx")
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"),
                                       "--provider", "cuda"])
    assert result.exit_code == 2 and result.output == \
        f"error: CUDA asked for (provider 'cuda', --provider cuda): {NO_CUDA}; ask for cpu or auto\n"
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")])
    # news only where there is a GPU; always under -v and in the JSON report
    assert result.exit_code == 0 and (f"CUDA not used: {NO_CUDA}" in result.output) == gpu_present()
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "-v",
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0 and f"CUDA not used: {NO_CUDA}" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["cuda"] == f"CUDA not used: {NO_CUDA}"


def test_without_a_gpu_wheel_the_cpu_build_is_not_told_to_install_one(monkeypatch):
    # the CPU onnxruntime is what pip installs on macOS, Linux aarch64 and Windows arm64
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    cuda_status.cache_clear()
    try:
        monkeypatch.setattr(sys, "platform", "darwin")
        monkeypatch.setattr(platform, "machine", lambda: "arm64")
        assert cuda_status().endswith("has no CUDA execution provider (onnxruntime-gpu has no wheel for darwin arm64)")
        cuda_status.cache_clear()
        monkeypatch.setattr(sys, "platform", "linux")
        monkeypatch.setattr(platform, "machine", lambda: "x86_64")
        assert cuda_status().endswith("has no CUDA execution provider (install onnxruntime-gpu)")
    finally:
        cuda_status.cache_clear()


def test_only_a_library_that_cannot_be_opened_counts_as_missing(monkeypatch):
    import ctypes

    import onnxruntime

    from onnx_reparam.runtime import _cuda_library_problem

    def fails(message):
        def load(path, mode=0):
            if "providers_cuda" in str(path):
                raise OSError(message)
        return load
    monkeypatch.setattr(ctypes, "CDLL", fails("libcudnn.so.9: cannot open shared object file: No such file"))
    assert _cuda_library_problem(onnxruntime).startswith("libcudnn.so.9: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", fails("undefined symbol: Provider_GetHost"))
    assert _cuda_library_problem(onnxruntime) is None  # not a missing library: the session decides
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: None)
    assert _cuda_library_problem(onnxruntime) is None


def test_bench_says_which_batch_it_chose_for_a_dynamic_axis():
    from conftest import GraphBuilder
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    model = b.model([b.node("Relu", [b.conv(x, 4, 4, 3, pads=[1] * 4)])])
    result = onnx_reparam.bench(model, model, provider="cpu", rounds=3, warmup=0)
    assert any("dynamic batch 'N' set to 1" in note for note in result.notes)
