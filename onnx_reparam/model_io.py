"""Loading and saving ONNX models: validation with one-line errors, external data, atomic writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import ReparamError, first_line

MIN_OPSET = 9  # BatchNormalization lost `spatial`/`consumed_inputs` quirks by opset 9
# Protobuf cannot serialize 2 GB; keep a margin for everything that is not tensor data.
PROTOBUF_LIMIT = 2**31 - 2**27
# Two values per byte: numpy's itemsize does not give their raw size.
PACKED_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, name)}
LARGE_TENSOR = 1 << 16  # bytes: larger initializers are left out of checker and shape inference


def load_model(source: str | os.PathLike | onnx.ModelProto, data_files: set[Path] | None = None) -> onnx.ModelProto:
    """Reads and validates a model; a ModelProto is copied, never modified. The external data
    files it reads are added to ``data_files``."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        external_dir = None
    else:
        path = Path(source)
        if not path.exists():
            raise ReparamError(f"{path}: no such file")
        if not path.is_file():
            raise ReparamError(f"{path}: not a file")
        model = _parse(path)
        external_dir = path.parent
    _check_structure(model)
    if external_dir is not None and _external_tensors(model):
        if data_files is not None:
            data_files |= {(external_dir / external_data_helper.ExternalDataInfo(t).location).resolve()
                           for t in _external_tensors(model)}
        _load_external(model, external_dir)
    _check_tensor_sizes(model)
    _check(model)
    return model


def _parse(path: Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise ReparamError(f"{path}: not an ONNX model or truncated ({exc})") from None
    except OSError as exc:
        raise ReparamError(f"{path}: cannot read ({exc.strerror})") from None
    return model


def _check_structure(model: onnx.ModelProto) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ReparamError("not an ONNX model, or truncated: no IR version, graph or opset")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    latest = onnx.defs.onnx_opset_version()
    if not default or not MIN_OPSET <= default[0] <= latest:
        found = default[0] if default else "none"
        raise ReparamError(f"unsupported opset {found} for the default domain "
                           f"(supported: {MIN_OPSET} to {latest})")


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in external_data_helper._get_all_tensors(model)
            if external_data_helper.uses_external_data(t)]


def _load_external(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in _external_tensors(model):
        info = external_data_helper.ExternalDataInfo(tensor)
        location = base_dir / info.location
        if not location.is_file():
            raise ReparamError(f"missing external data: {location} (needed by tensor '{tensor.name}')")
    try:
        external_data_helper.load_external_data_for_model(model, str(base_dir))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ReparamError(f"cannot read external data: {exc}") from None


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    """A truncated file or external data file shows up as raw data shorter than the dims say."""
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or tensor.data_type in PACKED_TYPES:
            continue
        expected, held = tensor_bytes(tensor), len(tensor.raw_data)
        if held != expected:
            raise ReparamError(f"initializer '{tensor.name}' holds {held} bytes, its shape needs "
                               f"{expected}: the file or its external data is truncated")


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the model serializes as one protobuf (ByteSize itself is slow on big models)."""
    return sum(tensor_bytes(t) for t in external_data_helper._get_all_tensors(model)) < PROTOBUF_LIMIT


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Size from the dims: reading raw_data would copy the bytes."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape: all that
    checker and shape inference need, without serializing the weights (or failing at 2 GB)."""
    graph = model.graph
    light = onnx.ModelProto(
        ir_version=model.ir_version, opset_import=list(model.opset_import), functions=list(model.functions),
        graph=onnx.helper.make_graph(graph.node, graph.name, list(graph.input), list(graph.output),
                                     value_info=graph.value_info, sparse_initializer=graph.sparse_initializer))
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if tensor_bytes(tensor) <= LARGE_TENSOR:
            light.graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            light.graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    return light


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(_light(model))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ReparamError(f"invalid ONNX model: {first_line(exc)}") from None


def inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Shapes ONNX can infer for intermediate tensors; none where inference fails (it is an aid,
    and the passes refuse what they cannot prove without it)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_light(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - any failure just means fewer known shapes
        return []
    known = {v.name for v in model.graph.value_info} | {v.name for v in model.graph.output} | \
        {v.name for v in model.graph.input}
    return [v for v in inferred.graph.value_info if v.name not in known]


EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay in the model file


def _save_with_external_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Writes tensors of EXTERNAL_THRESHOLD bytes or more to ``data_name`` beside ``path``, the
    rest to ``path``. (onnx's own save checks whether ``data_name`` exists relative to the current
    directory, not to the model, and refuses when it does.)"""
    with open(path.parent / data_name, "wb") as data:
        for tensor in external_data_helper._get_all_tensors(model):
            if not tensor.HasField("raw_data") or tensor_bytes(tensor) < EXTERNAL_THRESHOLD:
                continue
            offset = data.tell()
            data.write(tensor.raw_data)
            external_data_helper.set_external_data(tensor, data_name, offset, data.tell() - offset)
            tensor.ClearField("raw_data")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
               protected: set[Path] = frozenset()) -> None:
    """Writes ``model`` to ``path`` atomically (temporary files in the same folder, then renames).

    External data is used when asked, or when the model does not fit in one protobuf (2 GB); it goes
    to ``<name>.data`` beside the model. ``protected`` files (the input's own data) are never written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ReparamError(f"{path}: folder {folder} does not exist")
    if external_data is None:
        external_data = not fits_in_protobuf(model)
    data_name = path.name + ".data"
    if external_data and (folder / data_name).resolve() in protected:
        raise ReparamError(f"{folder / data_name} is the input's external data; choose another output name")
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".onnx-reparam-") as tmp:
            tmp_model = Path(tmp) / path.name
            if external_data:
                _save_with_external_data(model, tmp_model, data_name)
                # The tensors now point at the file; read them back so the caller's model is whole.
                external_data_helper.load_external_data_for_model(model, tmp)
                if (Path(tmp) / data_name).exists():
                    os.replace(Path(tmp) / data_name, folder / data_name)
            else:
                with open(tmp_model, "wb") as f:
                    f.write(model.SerializeToString())
            os.replace(tmp_model, path)
    except OSError as exc:
        raise ReparamError(f"cannot write {path}: {exc.strerror or exc}") from None
