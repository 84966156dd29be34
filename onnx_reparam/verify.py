"""Equivalence check: runs two models in onnxruntime on the same inputs and compares outputs.

ORT's own graph optimizations are disabled, so the two graphs are compared and not ORT's fusions of
them. The CUDA execution provider is used when it really loads (the session's provider list is read
back after creating it), else the CPU one; the report names the one that ran and, when CUDA was not
used, why.

The check runs on several inputs (seeded normal ones and a constant one, or the user's). The
input model is also evaluated in float64 (truth.py), and each output of the candidate must be about
as close to that evaluation as the input model is (compare.py says how). Without it, outputs are
compared with rtol/atol by the lowest float precision computing inside the graph, never widened by
a measured difference. An output with nothing finite to compare fails the check (inconclusive); a
shape or type that differs is a failure.
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
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from . import compare, truth
from .errors import ReparamError, first_line, one_line
from .model_io import disk_arrays, fits_in_protobuf, inferred_value_info, on_disk, save_model, tensor_bytes
from .report import OutputCheck, Verification

# (rtol, atol) by float type, where there is no float64 evaluation: an element passes when
# |a - b| <= atol + rtol * (scale of its channel).
TOLERANCES = {
    onnx.TensorProto.DOUBLE: (1e-9, 1e-12),
    onnx.TensorProto.FLOAT: (1e-4, 1e-6),
    onnx.TensorProto.FLOAT16: (1e-2, 1e-3),
}
LOOSEST = (5e-2, 1e-2)  # bfloat16, float8 and other low-precision floats
FLOAT_TYPES = {value for name, value in onnx.TensorProto.DataType.items()
               if name.startswith("FLOAT") or name in ("DOUBLE", "BFLOAT16")}
MAX_INPUT_BYTES = 1 << 32  # a generated input larger than this is a mistake in --input-shape
BATCH_FOR_CHECK = 1  # the size a dynamic batch axis gets when the user gives none
DEPLOY_LOAD_LIMIT = 1 << 28  # bytes of weights: larger candidates are not loaded a second time, optimized
TYPICAL_SIZE = 224  # an example size for a symbolic dim, in the message asking for one
# The float64 evaluation is given up (and the check compares with the input model, saying why) once it
# has taken more than the larger of these: seconds, or times the input model's runs in onnxruntime.
TRUTH_SECONDS, TRUTH_FACTOR = 60.0, 50.0


def _ort():
    try:
        import onnxruntime
        onnxruntime.InferenceSession  # a broken or doubled install imports but lacks the API
    except (ImportError, AttributeError) as exc:
        raise ReparamError(f"onnxruntime is not usable ({first_line(exc)}); reinstall it: "
                           "pip install --force-reinstall onnxruntime-gpu (or onnxruntime)") from None
    return onnxruntime


def _session_options(ort, optimized: bool = False):
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


@functools.lru_cache(maxsize=None)
def runtime_limits() -> tuple[int, int]:
    """The newest IR version and default-domain opset the installed onnxruntime loads, found by
    trying (onnx's newest may be newer). Clear with ``runtime_limits.cache_clear()``."""
    ort = _ort()
    options = _session_options(ort)

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
            f"{_ort().__version__} reads up to IR {ir_limit} / opset {opset_limit}: convert it "
            f"(onnx.version_converter), upgrade onnxruntime, or skip the check with --no-verify")


@functools.lru_cache(maxsize=None)
def cuda_status() -> str | None:
    """None when onnxruntime's CUDA execution provider really loads here, else why not. Clear with
    ``cuda_status.cache_clear()``."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime {ort.__version__} has no CUDA execution provider (install onnxruntime-gpu)"
    if hasattr(ort, "preload_dlls"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it misses
                ort.preload_dlls()  # CUDA/cuDNN from pip wheels are found only this way
        except Exception:  # noqa: BLE001 - the session below says what is missing
            pass
    missing = _cuda_library_problem(ort)
    if missing:  # found without a session, whose failure onnxruntime would log process-wide
        return f"the CUDA execution provider does not load: {missing}"
    try:
        session = ort.InferenceSession(_probe(*runtime_limits()).SerializeToString(), _session_options(ort),
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
                                     capture_output=True, text=True, timeout=10).stdout.strip()
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
        folders = {Path(metadata.distribution(name).locate_file("")).resolve()
                   for name in ("onnxruntime", "onnxruntime-gpu")}
    except metadata.PackageNotFoundError:
        return None
    if len(folders) > 1:
        return None
    return ("onnxruntime and onnxruntime-gpu are both installed and share one folder; keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (or onnxruntime)")


class Runner:
    """Creates ORT sessions on one execution provider, chosen once. ``notes`` says what the user
    should know about it (why CUDA was not used, a doubled install)."""

    def __init__(self, provider: str = "auto"):
        if provider not in ("auto", "cuda", "cpu"):
            raise ReparamError(f"unknown provider {provider!r} (auto, cuda or cpu)")
        self.notes = [note for note in (doubled_install(),) if note]
        reason = cuda_status() if provider != "cpu" else None
        if reason and provider == "cuda":
            raise ReparamError(f"--provider cuda: {reason}; use --provider cpu or auto")
        if reason:
            self.notes.insert(0, f"CUDA not used: {reason}")
        use_cuda = provider != "cpu" and reason is None
        self.requested = provider
        self.provider = "CUDAExecutionProvider" if use_cuda else "CPUExecutionProvider"
        self.device = device_name(self.provider)

    def cuda_cannot_run(self, problem: str) -> None:
        """The CUDA provider loads but cannot run the input model (a kernel it lacks or refuses):
        under auto, go on with the CPU and say why; with --provider cuda, that is the error."""
        reason = f"onnxruntime's CUDA provider cannot run the input model: {problem}"
        if self.requested == "cuda":
            raise ReparamError(f"--provider cuda: {reason}; use --provider cpu or auto")
        self.notes.insert(0, f"CUDA not used: {reason}")
        self.provider = "CPUExecutionProvider"
        self.device = device_name(self.provider)

    def session(self, model: onnx.ModelProto, optimized: bool = False, threads: int | None = None):
        """A session of the model (with ORT's optimizations when ``optimized``, as a deployment
        runs it); raises onnxruntime's own error if it does not load."""
        ort = _ort()
        options = _session_options(ort, optimized)
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
            ort = _ort()
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
    return tuple(int(part) for part in re.findall(r"\d+", _ort().__version__)[:2])


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """'name:1,3,224,224' or 'name:1x3x224x224' -> {'name': (1, 3, 224, 224)}; digits only."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        parts = dims.split("," if "," in dims else "x")
        if not sep or not name or not all(p.isdigit() and p.isascii() for p in parts):
            raise ReparamError(f"bad --input-shape {spec!r}: expected NAME:1,3,224,224 or NAME:1x3x224x224")
        if name in shapes:
            raise ReparamError(f"--input-shape given twice for '{name}'")
        shapes[name] = tuple(int(p) for p in parts)
    return shapes


def make_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                seed: int = 0, given: dict[str, np.ndarray] | None = None,
                chosen: list[str] | None = None) -> list[dict[str, np.ndarray]]:
    """The input sets of the check: the user's arrays as they are, or seeded normal ones (two seeds)
    and a constant one, shaped from the model with ``shapes`` filling in dynamic dims. A dynamic
    batch axis (axis 0) not in ``shapes`` is set to 1, and ``chosen`` says so."""
    shapes, given = shapes or {}, given or {}
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReparamError(f"seed must be a non-negative integer, not {seed!r}")
    inputs = graph_inputs(model, list(shapes) + list(given))
    names = {i.name for i in inputs}
    if given:
        missing = sorted(names - set(given))
        if missing:
            raise ReparamError(f"the inputs file has no array for input {', '.join(missing)}")
        return [dict(given)]
    kinds = {}
    for value in inputs:
        if not value.type.HasField("tensor_type"):
            raise ReparamError(f"input '{value.name}' is not a tensor; give its value with --inputs")
    chosen_shapes = input_sizes(inputs, shapes, chosen)
    for value in inputs:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = chosen_shapes[value.name]
        if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_INPUT_BYTES:
            raise ReparamError(f"input '{value.name}' of shape {'x'.join(map(str, shape))} would take more "
                               f"than {MAX_INPUT_BYTES >> 30} GiB; give a smaller --input-shape")
        kinds[value.name] = (dtype, shape)
    sets = []
    for offset in (0, 1):
        rng = np.random.default_rng(seed + offset)
        sets.append({name: _random(rng, dtype, shape) for name, (dtype, shape) in kinds.items()})
    sets.append({name: np.ones(shape, dtype) if compare.is_float(dtype) else np.zeros(shape, dtype)
                 for name, (dtype, shape) in kinds.items()})
    return sets


def graph_inputs(model: onnx.ModelProto, named: list[str] = ()) -> list[onnx.ValueInfoProto]:
    """The model's inputs that are not initializers; each name in ``named`` must be one of them."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = {i.name for i in inputs}
    for name in named:
        if name not in names:
            raise ReparamError(f"the model has no input '{name}' (inputs: {', '.join(sorted(names))})")
    return inputs


def same_inputs(a: onnx.ModelProto, b: onnx.ModelProto, names: tuple[str, str] = ("A", "B")) -> None:
    """Two models to run on the same inputs must take them: the same names, element types, ranks
    and static sizes (a symbolic dim in either takes any size)."""
    inputs = [{v.name: v for v in graph_inputs(m)} for m in (a, b)]
    for one, other, name in ((0, 1, names[0]), (1, 0, names[1])):
        only = sorted(set(inputs[one]) - set(inputs[other]))
        if only:
            raise ReparamError(f"{name} has input {', '.join(repr(n) for n in only)} that {names[other]} lacks: "
                               "the two models cannot run on the same inputs")
    for key in inputs[0]:
        kinds = [_described(m[key]) for m in inputs]
        dims = [[d.dim_value if d.HasField("dim_value") else None for d in m[key].type.tensor_type.shape.dim]
                for m in inputs]
        if kinds[0][0] != kinds[1][0] or len(dims[0]) != len(dims[1]) or any(
                x is not None and y is not None and x != y for x, y in zip(*dims)):
            raise ReparamError(f"input '{key}' is {kinds[0][1]} in {names[0]} but {kinds[1][1]} in {names[1]}: "
                               "the two models cannot run on the same inputs")


def takes_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], name: str = "B") -> None:
    """The model's static dims must fit the arrays the check runs it on (sizes chosen for another
    model's symbolic dims): an error naming the input and both shapes otherwise."""
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        shape = np.shape(feeds.get(value.name))
        if value.name in feeds and (len(dims) != len(shape) or any(
                d.HasField("dim_value") and d.dim_value != n for d, n in zip(dims, shape))):
            raise ReparamError(f"input '{value.name}' is run at {'x'.join(map(str, shape))}, but {name} takes "
                               f"{_described(value)[1]}: the two models cannot run on the same inputs")


def _described(value: onnx.ValueInfoProto) -> tuple[int, str]:
    """(element type, 'float 1x3xHxW') of an input."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return -1, "not a tensor"
    dims = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    return tensor.elem_type, f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()} {dims or 'scalar'}"


def input_sizes(inputs: list[onnx.ValueInfoProto], shapes: dict[str, tuple[int, ...]],
                chosen: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor input for a run: the one given, else its own with each symbolic
    dim at the size given for that dim name in another input, or a batch axis (axis 0) at
    BATCH_FOR_CHECK (``chosen`` says so). A dim name is one size everywhere it appears: sizes
    given that disagree on it are an error, as is a symbolic dim left without a size."""
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> its size, and the input that set it

    def bind(label: str, size: int, whose: str) -> None:
        known = sizes.setdefault(label, (size, whose))
        if known[0] != size:
            raise ReparamError(f"symbolic dim '{label}' is {known[0]} in input '{known[1]}' but {size} in "
                               f"input '{whose}': a dim name has one size in every input")

    tensors = [v for v in inputs if v.type.HasField("tensor_type")]
    result = {}
    for value in tensors:
        if value.name in shapes:
            shape = tuple(shapes[value.name])
            check_input_shape(value, shape)
            for dim, size in zip(value.type.tensor_type.shape.dim, shape):
                if not dim.HasField("dim_value") and dim.dim_param:
                    bind(dim.dim_param, size, value.name)
            result[value.name] = shape
    for value in tensors:
        if value.name not in shapes:
            result[value.name] = _own_shape(value, sizes, bind, chosen)
    return result


def _own_shape(value: onnx.ValueInfoProto, sizes: dict, bind, chosen: list[str] | None) -> tuple[int, ...]:
    dims = value.type.tensor_type.shape.dim
    shape, unsized = [], []
    for axis, dim in enumerate(dims):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.dim_param in sizes:
            shape.append(sizes[dim.dim_param][0])
        elif axis == 0:  # a batch axis: any size shows the same
            shape.append(BATCH_FOR_CHECK)
            if dim.dim_param:
                bind(dim.dim_param, BATCH_FOR_CHECK, value.name)
            if chosen is not None:
                chosen.append(f"input '{value.name}': dynamic batch '{dim.dim_param or '?'}' set to "
                              f"{BATCH_FOR_CHECK} for the check (--input-shape to choose)")
        else:
            unsized.append(f"'{dim.dim_param}' (axis {axis})" if dim.dim_param else f"axis {axis}")
            shape.append(TYPICAL_SIZE)
    if unsized:
        example = ",".join(map(str, shape))
        what = "a symbolic dim" if len(unsized) == 1 else "symbolic dims"
        raise ReparamError(f"input '{value.name}' has {what} {' and '.join(unsized)} with no size to run it at: "
                           f"give the sizes your data has, e.g. --input-shape {value.name}:{example}")
    return tuple(shape)


def check_input_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    """A given shape must keep the model's static dims (found here, not deep inside onnxruntime)."""
    if not value.type.tensor_type.HasField("shape"):
        return
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ReparamError(f"input '{value.name}' has {len(dims)} dims, --input-shape gives {len(shape)}")
    for axis, (dim, size) in enumerate(zip(dims, shape)):
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise ReparamError(f"input '{value.name}' has size {dim.dim_value} on axis {axis}, "
                               f"--input-shape gives {size}")


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if compare.is_float(dtype):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 8, shape).astype(dtype)


def lowest_precision(model: onnx.ModelProto) -> int:
    """The least precise float type the graph computes in: its initializers, Cast targets, inputs
    and outputs (a model cast to float16 inside keeps float32 at its edges)."""
    graph = model.graph
    found = {t.data_type for t in graph.initializer}
    found |= {v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for node in graph.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type in ("Cast", "CastLike"):
                found.add(a.i)
            elif a.name == "value" and node.op_type == "Constant":
                found.add(a.t.data_type)
    floats = [t for t in found if t in FLOAT_TYPES]
    return max(floats, key=lambda t: TOLERANCES.get(t, LOOSEST)) if floats else onnx.TensorProto.FLOAT


class Checker:
    """The input model's outputs (at once) and their float64 evaluation (when first needed) on
    the check's inputs, computed once; ``check`` judges a candidate by them (compare.py says
    how). Problems running the input model are bad input (ReparamError); problems running the
    candidate are a failed check. ``runs`` counts the model runs, by model."""

    def __init__(self, reference: onnx.ModelProto, *, provider: str = "auto",
                 input_shapes: dict[str, tuple[int, ...]] | None = None,
                 inputs: dict[str, np.ndarray] | None = None, seed: int = 0,
                 rtol: float | None = None, atol: float | None = None):
        for name, value in (("rtol", rtol), ("atol", atol)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not np.isfinite(value) or value < 0):
                raise ReparamError(f"{name} must be a finite number >= 0, not {value!r}")
        check_runtime_can_read(reference)
        self.output_names = [o.name for o in reference.graph.output]
        self.chosen: list[str] = []
        self.feed_sets = make_inputs(reference, input_shapes, seed, inputs, self.chosen)
        self.runner = Runner(provider)
        self.runs = {"input model": 0, "float64": 0, "candidate": 0}
        self.precision = lowest_precision(reference)  # the float type the bounds follow
        self.decided, self.extra = compare.decision_inputs(reference, lambda: tensor_types(reference), FLOAT_TYPES)
        self.expected = self._run_reference(reference)
        # onnxruntime's optimizers have defects a rewrite can run into (onnxruntime 1.31's layout
        # level drops a graph output that is a depthwise conv of 6 channels summed with another):
        # a candidate must load with the default optimizations a user's session has, where the
        # input model does (and is small enough for a second, optimized session).
        if sum(map(tensor_bytes, reference.graph.initializer)) > DEPLOY_LOAD_LIMIT:
            unloaded = f"weights over {DEPLOY_LOAD_LIMIT >> 20} MiB"
        else:
            problem = self._load_problem(reference)
            unloaded = problem and f"the input model does not load with them either ({problem})"
        self.deployable = not unloaded
        if unloaded:
            self.chosen.append(f"the rewritten model is not loaded with onnxruntime's default optimizations: {unloaded}")
        given = rtol is not None or atol is not None
        default_rtol, default_atol = TOLERANCES.get(self.precision, LOOSEST)
        self.bound = (default_rtol if rtol is None else rtol, default_atol if atol is None else atol)
        self.truth, self.rounded, self.truth_note = None, None, ""
        self.reference: onnx.ModelProto | None = None
        self.unheld: list[str] = []  # float outputs without a float64 value although there is an evaluation
        self.baselines: list[compare.Baseline | None] | None = None
        self._pending: onnx.ModelProto | None = None if given else reference  # evaluated by evaluate()
        if given:
            self.truth_note = "no float64 evaluation: rtol/atol were given"
        self.note = "; ".join(self.runner.notes + self.chosen) or None

    def evaluate(self) -> Checker:
        """Makes the float64 evaluation and the input model's distances from it, once: when the
        first candidate is checked (a run that rewrites nothing needs neither)."""
        if self.baselines is None:
            reference, self._pending = self._pending, None
            if reference is not None:
                self._evaluate_truth(reference)
            self.baselines = self._baselines()
        return self

    def _load_problem(self, model: onnx.ModelProto) -> str | None:
        """Why onnxruntime with its default optimizations does not load the model, or None."""
        try:
            self.runner.session(model, optimized=True)
        except Exception as exc:  # noqa: BLE001 - the answer asked for
            return first_line(exc)
        return None

    def _run_reference(self, reference: onnx.ModelProto) -> list[list[np.ndarray]]:
        try:
            start = time.perf_counter()
            with _extra_outputs(reference, self.extra):
                outputs = self.runner.run(reference, self.feed_sets)
            self.reference_seconds = time.perf_counter() - start
            self.runs["input model"] += len(self.feed_sets)
            return outputs
        except ReparamError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            problem = one_line(exc)
        if self.runner.provider.startswith("CUDA"):
            self.runner.cuda_cannot_run(problem)
            return self._run_reference(reference)
        raise ReparamError(f"onnxruntime cannot run the input model: {problem}")

    def _evaluate_truth(self, reference: onnx.ModelProto) -> None:
        start = time.perf_counter()
        names = self.output_names + self.extra
        try:
            budget = max(TRUTH_SECONDS, TRUTH_FACTOR * self.reference_seconds)
            self.truth = truth.evaluate(reference, self.feed_sets, names, budget=budget)
        except truth.NoTruth as exc:
            self.truth_note = f"no float64 evaluation of the input model: {exc}"
            return
        self.runs["float64"] += len(self.feed_sets)
        self.truth_note = (f"float64 evaluation of the input model (onnx reference evaluator): "
                           f"{time.perf_counter() - start:.2f}s")
        self.reference = reference  # for the rounded-weights run, made when first needed
        if compare.ROUNDOFF.get(self.precision, compare.LOOSEST_ROUNDOFF) >= compare.ROUNDOFF[onnx.TensorProto.FLOAT16]:
            self._evaluate_rounded()  # float16: every fused weight's rounding shows

    def _evaluate_rounded(self) -> bool:
        """The float64 evaluation on the first input set with every weight moved as by one
        rounding to the graph's float type (compare.py says why); False when it was made before
        or cannot be made."""
        if self.reference is None:
            return False
        reference, self.reference = self.reference, None
        start = time.perf_counter()
        roundoff = compare.ROUNDOFF.get(self.precision, compare.LOOSEST_ROUNDOFF)
        precision = onnx.TensorProto.DataType.Name(self.precision).lower()
        try:
            self.rounded = truth.evaluate(reference, self.feed_sets[:1], self.output_names + self.extra,
                                          jitter=roundoff)[0]
        except truth.NoTruth as exc:
            self.truth_note += f"; no run with its weights rounded as to {precision}: {exc}"
            return False
        self.runs["float64"] += 1
        self.truth_note += (f"; once more with its weights rounded as to {precision}: "
                            f"{time.perf_counter() - start:.2f}s")
        return True

    def _baselines(self) -> list[compare.Baseline | None]:
        """Per output (and added decision input), the input model's distance from truth; None
        where it is not a float output with a float64 value. The float outputs that get none
        although there is a float64 evaluation are named in the truth note."""
        roundoff = compare.ROUNDOFF.get(self.precision, compare.LOOSEST_ROUNDOFF)
        bases: list[compare.Baseline | None] = []
        unheld = []
        for i, name in enumerate(self.output_names + self.extra):
            references = [outputs[i] for outputs in self.expected]
            if self.truth is None or name in self.decided or not compare.is_float(np.asarray(references[0]).dtype):
                bases.append(None)
                continue
            truths = [values[i] for values in self.truth]
            rounded = self.rounded[i] if self.rounded is not None else None
            base = compare.baseline(truths, references, roundoff, rounded) \
                if all(t is not None for t in truths) else None
            if base is None:
                unheld.append(name)
            bases.append(base)
        self.unheld = unheld
        return bases

    def _describe(self) -> str:
        if any(b is not None for b in self.baselines):
            return (f"each output held to a float64 evaluation of the input model: at most {compare.FACTOR}x "
                    "the input model's own distance from it, per channel of a feature map")
        rtol, atol = self.bound
        name = onnx.TensorProto.DataType.Name(self.precision).lower()
        if self.truth_note.endswith("rtol/atol were given"):
            return f"rtol {rtol:g}, atol {atol:g} (given, or by the {name} type where not), against the input model"
        return f"rtol {rtol:g}, atol {atol:g} for {name} arithmetic, against the input model"

    def check(self, candidate: onnx.ModelProto, sets: list[int] | None = None,
              name: str = "the rewritten model") -> Verification:
        """Runs the candidate (called ``name`` in messages) on the check's inputs (the sets
        numbered in ``sets``, or all) and judges each output."""
        self.evaluate()
        names = [o.name for o in candidate.graph.output]
        truth_note = self.truth_note + (f"; compared with the input model, without a float64 value of their "
                                        f"own (a type or shape the widening does not reach): {', '.join(self.unheld)}"
                                        if self.unheld else "")
        header = dict(note=self.note, truth=truth_note)
        if names != self.output_names:
            return Verification(self.runner.provider, [], error=f"the outputs differ: {self.output_names} vs {names}",
                                **header)
        chosen = list(range(len(self.feed_sets))) if sets is None else sets
        produced = _tensor_names(candidate)
        missing = [name for name in self.extra if name not in produced]  # a rewrite took it away
        extra = [] if missing else self.extra
        try:
            with _extra_outputs(candidate, extra):
                session = self.runner.session(candidate)
            judges = [_Judge(self, i, name, not missing) for i, name in enumerate(self.output_names + extra)]
            for i in chosen:  # one set's outputs at a time: they may be as large as a weight
                outputs = session.run(None, self.feed_sets[i])
                self.runs["candidate"] += 1
                for judge, actual in zip(judges, outputs):
                    judge.add(i, actual)
                del outputs
        except Exception as exc:  # noqa: BLE001 - the rewritten model is ours: a failed check
            return Verification(self.runner.provider, [], error=f"onnxruntime cannot run {name}: "
                                f"{one_line(exc)}", **header)
        problem = self._load_problem(candidate) if self.deployable else None
        if problem:
            return Verification(self.runner.provider, [], error=f"onnxruntime with its default optimizations cannot "
                                f"load {name} (a defect of its optimizer the rewrite runs into): {problem}", **header)
        judged = [judge.verdict() for judge in judges]
        checks = [check for check, _ in judged]
        failing = sorted({i for _, sets_failed in judged for i in sets_failed})
        if missing and self.decided:
            header["truth"] += (f"; {', '.join(sorted(self.decided))} held to the input model: the rewrite removed "
                                f"'{missing[0]}', a float tensor their decisions read")
        if failing and self._evaluate_rounded():  # is the failure the fused weights' rounding?
            self.baselines = self._baselines()
            return self.check(candidate, sets, name)
        return Verification(self.runner.provider, checks, inputs=len(chosen), bound=self._describe(),
                            device=f"{self.runner.device}; onnxruntime {_ort().__version__}",
                            failing_sets=failing, **header)

class _Judge:
    """One output's verdict, built one input set at a time."""

    def __init__(self, checker: Checker, index: int, name: str, decisions_checked: bool):
        role = "decision input" if index >= len(checker.output_names) else \
            "decided" if decisions_checked and name in checker.decided else "output"
        self.checker, self.index = checker, index
        self.check = OutputCheck(name, 0.0, 0.0, 0.0, True, role=role)
        self.base = checker.baselines[index]
        self.ours: np.ndarray | None = None
        self.failing: list[int] = []

    def add(self, i: int, actual: np.ndarray) -> None:
        check, base, checker = self.check, self.base, self.checker
        expected = checker.expected[i][self.index]
        check.integer = not compare.is_float(np.asarray(expected).dtype)
        fine, differ = check.passed, check.differ
        compare.against_reference(check, expected, actual,
                                  None if base is not None or check.role == "decided" else checker.bound)
        if base is not None and np.shape(actual) == np.shape(expected) and check.note is None:
            distance = compare.against_truth(base, i, checker.truth[i][self.index], actual)
            self.ours = distance if self.ours is None else np.maximum(self.ours, distance)
            fine = fine and not np.any(distance > base.bounds())
        if fine != check.passed or differ != check.differ or not fine:
            self.failing.append(i)

    def verdict(self) -> tuple[OutputCheck, list[int]]:
        """The output's verdict over the sets added, and the sets on which it failed."""
        check = self.check
        if check.role == "decided":
            check.passed, check.note = True, "not held to the input model; the floats it is computed from are"
            return check, []
        if self.ours is not None:
            compare.verdict_from_truth(check, self.base, self.ours)
        compare.finish(check)
        return check, self.failing if not check.passed else []


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the model's tensors by name: declared, else inferred."""
    graph = model.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info) + inferred_value_info(model)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer}


@contextlib.contextmanager
def _extra_outputs(model: onnx.ModelProto, names: list[str]):
    """The model with ``names`` as extra graph outputs for the while (a check's own additions:
    the caller's model is as it was afterwards)."""
    count = len(model.graph.output)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        yield model
    finally:
        del model.graph.output[count:]


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, one array per model input name."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ReparamError(f"cannot read inputs from {path}: {first_line(exc)}") from None

