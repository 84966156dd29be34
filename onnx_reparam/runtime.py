"""onnxruntime as the check runs it: the module itself (a clear error where it is missing or
broken), which IR versions and opsets it reads, the CUDA execution provider and why it is not used,
the device, and sessions (ORT's graph optimizations off unless asked; models over 2 GB given from
disk with their weights beside them).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from .errors import ReparamError, first_line, option
from .model_io import disk_arrays, fits_in_protobuf, on_disk, save_model

# Where onnxruntime-gpu has wheels (platform -> machine), as pyproject.toml's markers choose it.
GPU_WHEELS = {"linux": "x86_64", "win32": "amd64"}

def ort_module():
    try:
        import onnxruntime
        if not hasattr(onnxruntime, "InferenceSession"):  # a broken or doubled install imports but lacks the API
            raise AttributeError("module 'onnxruntime' has no attribute 'InferenceSession'")
    except (ImportError, AttributeError) as exc:
        raise ReparamError(f"onnxruntime is not usable ({first_line(exc)}); reinstall it: "
                           "pip install --force-reinstall onnxruntime-gpu (or onnxruntime)") from None
    return onnxruntime


def session_options(ort, optimized: bool = False):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # failures are raised and reported by us, in one line
    if not optimized:
        # A check runs a session a few times: repacking the weights for faster products would
        # cost a copy of each (and onnxruntime could no longer use the file's pages as they are).
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _probe(ir_version: int, opset: int) -> onnx.ModelProto:
    return onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        ir_version=ir_version, opset_imports=[onnx.helper.make_opsetid("", opset)])


@functools.cache
def runtime_limits() -> tuple[int, int]:
    """The newest IR version and default-domain opset the installed onnxruntime loads, found by
    trying (onnx's newest may be newer). Clear with ``runtime_limits.cache_clear()``."""
    ort = ort_module()
    options = session_options(ort)

    def loads(ir_version: int, opset: int) -> bool:
        try:
            ort.InferenceSession(_probe(ir_version, opset).SerializeToString(), options,
                                 providers=["CPUExecutionProvider"], enable_fallback=0)
            return True
        except Exception:  # noqa: BLE001 - a refusal is the answer we are looking for
            return False

    ir_version = next((v for v in range(onnx.IR_VERSION, 3, -1) if loads(v, 11)), 3)
    opset = next((v for v in range(onnx.defs.onnx_opset_version(), 6, -1) if loads(ir_version, v)), 7)
    return ir_version, opset


def check_runtime_can_read(model: onnx.ModelProto) -> None:
    """A model newer than the installed onnxruntime reads is bad input for the check: say so at
    once, with the way out, rather than let onnxruntime fail with a C++ signature."""
    ir_limit, opset_limit = runtime_limits()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if model.ir_version > ir_limit or opset > opset_limit:
        raise ReparamError(
            f"the model is IR {model.ir_version} / opset {opset}; the installed onnxruntime "
            f"{ort_module().__version__} reads up to IR {ir_limit} / opset {opset_limit}: convert it "
            f"(onnx.version_converter), upgrade onnxruntime, or skip the check with {option('verify=False')}")


@functools.cache
def cuda_status() -> str | None:
    """None when onnxruntime's CUDA execution provider really loads here, else why not. Clear with
    ``cuda_status.cache_clear()``."""
    ort = ort_module()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        way = "install onnxruntime-gpu" if GPU_WHEELS.get(sys.platform) == platform.machine().lower() else \
            f"onnxruntime-gpu has no wheel for {sys.platform} {platform.machine()}"
        return f"this onnxruntime {ort.__version__} has no CUDA execution provider ({way})"
    if hasattr(ort, "preload_dlls"):
        # CUDA/cuDNN from pip wheels are found only this way; what is missing, the check below says
        with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):  # it prints each one it misses
            ort.preload_dlls()
    missing = _cuda_library_problem(ort)
    if missing:  # found without a session, whose failure onnxruntime would log process-wide
        return f"the CUDA execution provider does not load: {missing}"
    try:
        session = ort.InferenceSession(_probe(*runtime_limits()).SerializeToString(), session_options(ort),
                                       providers=["CUDAExecutionProvider"], enable_fallback=0)
    except Exception as exc:  # noqa: BLE001 - its message is the cause we report
        return f"the CUDA execution provider does not load: {first_line(exc)}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "the CUDA execution provider does not load: no usable GPU (no device, or a driver too old " \
               "for this onnxruntime's CUDA)"
    return None


def _cuda_library_problem(ort) -> str | None:
    """The library onnxruntime's CUDA provider cannot open, found by loading the provider library
    ourselves (after the provider bridge it links against, as onnxruntime does); None when
    nothing is missing or the failure is of another kind (the session then says)."""
    capi = Path(ort.__file__).parent / "capi"
    library = next(iter(sorted(capi.glob("*onnxruntime_providers_cuda.*"))), None)
    if library is None:
        return "its library is not installed"
    bridge = next(iter(sorted(capi.glob("*onnxruntime_providers_shared.*"))), None)
    try:
        if bridge is not None:
            ctypes.CDLL(str(bridge), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(library))
    except OSError as exc:
        message = first_line(exc)
        if not any(s in message for s in ("cannot open shared object file", "Could not find module", "WinError 126")):
            return None
        return f"{message} (install the CUDA and cuDNN libraries onnxruntime-gpu {ort.__version__} was " \
               "built for: pip install \"onnx-reparam[cuda]\")"
    return None


def device_name(provider: str) -> str:
    """The device a provider runs on, for the report."""
    if provider.startswith("CUDA"):
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                     capture_output=True, text=True, timeout=10, check=False).stdout.strip()
                if out:
                    return out
            except (OSError, subprocess.SubprocessError):
                pass
        return "GPU 0"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def doubled_install() -> str | None:
    """Both onnxruntime and onnxruntime-gpu installed in one folder: they share the package's
    files, and removing either breaks the other. In two folders the first on sys.path is used and
    either may go."""
    try:
        folders = {Path(str(metadata.distribution(name).locate_file(""))).resolve()
                   for name in ("onnxruntime", "onnxruntime-gpu")}
    except metadata.PackageNotFoundError:
        return None
    if len(folders) > 1:
        return None
    return ("onnxruntime and onnxruntime-gpu are both installed and share one folder; keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (or onnxruntime)")


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU or its driver (where CUDA not being used is news);
    asked of the driver's files, not of onnxruntime."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidia0")) \
        or shutil.which("nvidia-smi") is not None


class Runner:
    """Creates ORT sessions on one execution provider, chosen once. ``cuda`` says why CUDA is not
    used ("" when it is, or was not asked for); ``notes`` what else the user should know about it
    (a doubled install)."""

    def __init__(self, provider: str = "auto"):
        if provider not in ("auto", "cuda", "cpu"):
            raise ReparamError(f"unknown provider {provider!r} (auto, cuda or cpu)")
        self.notes = [note for note in (doubled_install(),) if note]
        reason = cuda_status() if provider != "cpu" else None
        if reason and provider == "cuda":
            raise ReparamError(f"CUDA asked for (provider 'cuda', --provider cuda): {reason}; ask for cpu or auto")
        self.cuda = f"CUDA not used: {reason}" if reason else ""
        use_cuda = provider != "cpu" and reason is None
        self.requested = provider
        self.provider = "CUDAExecutionProvider" if use_cuda else "CPUExecutionProvider"
        self.device = device_name(self.provider)

    def cuda_cannot_run(self, problem: str) -> None:
        """The CUDA provider loads but cannot run the input model (a kernel it lacks or refuses):
        under auto, go on with the CPU and say why; with --provider cuda, that is the error."""
        reason = f"onnxruntime's CUDA provider cannot run the input model: {problem}"
        if self.requested == "cuda":
            raise ReparamError(f"CUDA asked for (provider 'cuda', --provider cuda): {reason}; ask for cpu or auto")
        self.cuda = f"CUDA not used: {reason}"
        self.provider = "CPUExecutionProvider"
        self.device = device_name(self.provider)

    def session(self, model: onnx.ModelProto, optimized: bool = False, threads: int | None = None):
        """A session of the model (with ORT's optimizations when ``optimized``, as a deployment
        runs it); raises onnxruntime's own error if it does not load."""
        ort = ort_module()
        options = session_options(ort, optimized)
        if threads:
            options.intra_op_num_threads = threads
        # TF32 would make both models differ from float32 arithmetic by ~1e-3; keep full precision.
        # A check runs each session a few times: cuDNN's exhaustive search for the fastest conv
        # algorithm would cost more than the runs; a deployment-like session (a bench) keeps it.
        cuda = {"use_tf32": "0", **({} if optimized else {"cudnn_conv_algo_search": "HEURISTIC"})}
        providers = [(self.provider, cuda)] if self.provider.startswith("CUDA") else []
        with tempfile.TemporaryDirectory(prefix="onnx-reparam-") as tmp:
            source, weights, folder = _session_source(model, Path(tmp))
            if weights:  # kept alive until the session has copied them
                options.add_external_initializers(list(weights), list(weights.values()))
            if folder:
                options.add_session_config_entry(EXTERNAL_FOLDER_OPTION, folder)
            session = ort.InferenceSession(source, options,
                                           providers=providers + ["CPUExecutionProvider"],
                                           enable_fallback=0)  # ORT's fallback prints to stdout
        if session.get_providers()[0] != self.provider:
            raise RuntimeError(f"onnxruntime did not place the model on {self.provider}")
        return session

    def run(self, model: onnx.ModelProto, feed_sets: list[dict[str, np.ndarray]],
            optimized: bool = False) -> list[list[np.ndarray]]:
        session = self.session(model, optimized)
        wanted = {i.name for i in session.get_inputs()}
        if wanted != set(feed_sets[0]):
            raise ReparamError(f"the models' inputs differ: expected {sorted(wanted)}, got {sorted(feed_sets[0])}")
        return [session.run(None, feeds) for feeds in feed_sets]


# Where onnxruntime finds external data of a model given as bytes (onnxruntime 1.21 and later).
EXTERNAL_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"


def _session_source(model: onnx.ModelProto, tmp: Path) -> tuple[bytes | str, dict, str | None]:
    """The model as onnxruntime loads it: (its bytes, OrtValues by name, the folder its external
    data is in). Weights still on disk stay there: onnxruntime reads them from their files (in the
    folder given), or, before 1.21, gets them as OrtValues over memory maps (it then copies them,
    and the mapped pages count as resident too). When the bytes would be over 2 GB, or a weight
    on disk has a type numpy cannot map, it is the path of a copy written to ``tmp`` with external
    data. The results are the same either way."""
    if fits_in_protobuf(model, on_disk_too=False):
        places = [place for place in map(on_disk, model.graph.initializer) if place is not None]
        if not places:
            return model.SerializeToString(), {}, None
        if _ort_version() >= (1, 21):
            folder = os.path.commonpath([os.path.dirname(location) for location, _, _ in places])
            return _serialized_relative_to(model, folder), {}, folder
        arrays = disk_arrays(model)
        if arrays is not None:
            ort = ort_module()
            return model.SerializeToString(), {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}, None
    path = tmp / "model.onnx"
    save_model(model, path, external_data=True)
    return str(path), {}, None


def _serialized_relative_to(model: onnx.ModelProto, folder: str) -> bytes:
    """The model's bytes with each on-disk weight's location relative to ``folder`` (onnxruntime
    refuses absolute ones); the model itself is left as it was."""
    entries = [entry for t in model.graph.initializer if on_disk(t) is not None
               for entry in t.external_data if entry.key == "location"]
    absolute = [entry.value for entry in entries]
    try:
        for entry in entries:
            entry.value = os.path.relpath(entry.value, folder)
        return model.SerializeToString()
    finally:
        for entry, location in zip(entries, absolute):
            entry.value = location


def _ort_version() -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", ort_module().__version__)[:2])
