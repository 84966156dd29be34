"""Equivalence check: runs two models in onnxruntime on the same inputs and compares outputs.

ORT's own graph optimizations are disabled, so the two graphs are compared and not ORT's fusions of
them. The CUDA execution provider is used when it really loads (the session's provider list is read
back after creating it), else the CPU one; the report names the one that ran.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import ReparamError, first_line
from .model_io import fits_in_protobuf, save_model
from .report import OutputCheck, Verification

# (rtol, atol) by output dtype: pass when max |a - b| <= atol + rtol * max |a|.
TOLERANCES = {
    np.dtype(np.float64): (1e-9, 1e-12),
    np.dtype(np.float32): (1e-4, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-3),
}
LOOSEST = (5e-2, 1e-2)  # bfloat16 and other low-precision floats


def _ort():
    import onnxruntime
    return onnxruntime


def _session_options(ort):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return options


_cuda_loads: bool | None = None  # probed once per process: loading the CUDA EP is slow and noisy


def cuda_available() -> bool:
    """Whether onnxruntime's CUDA execution provider really loads here (libraries, driver, GPU)."""
    global _cuda_loads
    if _cuda_loads is None:
        ort = _ort()
        _cuda_loads = False
        if "CUDAExecutionProvider" in ort.get_available_providers():
            probe = onnx.helper.make_model(onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
            ort.set_default_logger_severity(4)  # a failed load logs errors we answer ourselves
            try:
                session = ort.InferenceSession(probe.SerializeToString(),
                                               providers=["CUDAExecutionProvider"])
                _cuda_loads = session.get_providers()[0] == "CUDAExecutionProvider"
            except Exception:  # noqa: BLE001 - any failure means: no CUDA here
                pass
            finally:
                ort.set_default_logger_severity(2)
    return _cuda_loads


class Runner:
    """Creates ORT sessions on one execution provider, chosen once."""

    def __init__(self, provider: str = "auto"):
        if provider not in ("auto", "cuda", "cpu"):
            raise ReparamError(f"unknown provider {provider!r} (auto, cuda or cpu)")
        if provider == "cuda" and not cuda_available():
            raise ReparamError("the CUDA execution provider does not load here "
                               "(no onnxruntime-gpu, CUDA, cuDNN or GPU); use --provider cpu or auto")
        use_cuda = provider == "cuda" or provider == "auto" and cuda_available()
        self.provider = "CUDAExecutionProvider" if use_cuda else "CPUExecutionProvider"

    def session(self, model: onnx.ModelProto):
        ort = _ort()
        # TF32 would make both models differ from float32 arithmetic by ~1e-3; keep full precision.
        providers = [(self.provider, {"use_tf32": "0"})] if self.provider.startswith("CUDA") else []
        with tempfile.TemporaryDirectory(prefix="onnx-reparam-") as tmp:
            try:
                session = ort.InferenceSession(_session_source(model, Path(tmp)), _session_options(ort),
                                               providers=providers + ["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
                raise ReparamError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        if session.get_providers()[0] != self.provider:
            raise ReparamError(f"onnxruntime did not place the model on {self.provider}")
        return session


def _session_source(model: onnx.ModelProto, tmp: Path):
    if fits_in_protobuf(model):
        return model.SerializeToString()
    path = tmp / "model.onnx"
    save_model(model, path, external_data=True)
    return str(path)


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """'name:1x3x224x224' -> {'name': (1, 3, 224, 224)}."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 0:
            raise ReparamError(f"bad --input-shape {spec!r}: expected NAME:1x3x224x224")
        shapes[name] = shape
    return shapes


def make_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                seed: int = 0, given: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs shaped from the model, ``shapes`` filling in dynamic dims; arrays in
    ``given`` are used as they are."""
    shapes, given = shapes or {}, given or {}
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = {i.name for i in inputs}
    for name in list(shapes) + list(given):
        if name not in names:
            raise ReparamError(f"the model has no input '{name}' (inputs: {', '.join(sorted(names))})")
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in inputs:
        if value.name in given:
            feeds[value.name] = given[value.name]
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise ReparamError(f"input '{value.name}' is not a tensor; give its value with --inputs")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = shapes.get(value.name) or _static_shape(value)
        feeds[value.name] = _random(rng, dtype, shape)
    return feeds


def _static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = value.type.tensor_type.shape.dim
    shape = []
    for dim in dims:
        if not dim.HasField("dim_value"):
            label = dim.dim_param or "?"
            raise ReparamError(f"input '{value.name}' has a dynamic dim '{label}': give it with "
                               f"--input-shape {value.name}:" + "x".join(
                                   str(d.dim_value) if d.HasField("dim_value") else "N" for d in dims))
        shape.append(dim.dim_value)
    return tuple(shape)


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if np.issubdtype(dtype, np.floating) or dtype.kind == "V":
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 8, shape).astype(dtype)


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto, *, provider: str = "auto",
            input_shapes: dict[str, tuple[int, ...]] | None = None,
            inputs: dict[str, np.ndarray] | None = None, seed: int = 0,
            rtol: float | None = None, atol: float | None = None) -> Verification:
    """Runs both models on the same inputs; per output, max abs error and error relative to the
    reference's largest magnitude, against tolerances that suit the output's dtype."""
    ref_outputs = [o.name for o in reference.graph.output]
    cand_outputs = [o.name for o in candidate.graph.output]
    if ref_outputs != cand_outputs:
        raise ReparamError(f"the models' outputs differ: {ref_outputs} vs {cand_outputs}")
    feeds = make_inputs(reference, input_shapes, seed, inputs)
    runner = Runner(provider)
    expected = _run(runner, reference, feeds)
    actual = _run(runner, candidate, feeds)
    checks = [_check(name, a, b, rtol, atol) for name, a, b in zip(ref_outputs, expected, actual)]
    return Verification(runner.provider, checks)


def _run(runner: Runner, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = runner.session(model)
    wanted = {i.name for i in session.get_inputs()}
    if wanted != set(feeds):
        raise ReparamError(f"the models' inputs differ: expected {sorted(wanted)}, got {sorted(feeds)}")
    try:
        return session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
        raise ReparamError(f"onnxruntime failed to run the model: {first_line(exc)}") from None


def _check(name: str, expected, actual, rtol: float | None, atol: float | None) -> OutputCheck:
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return OutputCheck(name, float("inf"), float("inf"), 0.0, False)
    default_rtol, default_atol = TOLERANCES.get(expected.dtype, LOOSEST) \
        if np.issubdtype(expected.dtype, np.floating) or expected.dtype.kind == "V" else (0.0, 0.0)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a, b = expected.astype(np.float64), actual.astype(np.float64)
    if a.size == 0:
        return OutputCheck(name, 0.0, 0.0, atol, True)
    finite = np.isfinite(a) == np.isfinite(b)
    same_special = np.all(finite) and np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)], equal_nan=True)
    mask = np.isfinite(a)
    abs_error = float(np.max(np.abs(a[mask] - b[mask]), initial=0.0))
    scale = float(np.max(np.abs(a[mask]), initial=0.0))
    rel_error = abs_error / scale if scale > 0 else (0.0 if abs_error == 0 else float("inf"))
    bound = atol + rtol * scale
    return OutputCheck(name, abs_error, rel_error, bound, bool(same_special and abs_error <= bound))


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, one array per model input name."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ReparamError(f"cannot read inputs from {path}: {exc}") from None
