"""Loading and saving ONNX models: validation with one-line errors, external data, atomic writes.

Large initializers are not read at load: a model file is scanned at the protobuf wire level, and each
initializer over LARGE_TENSOR bytes becomes a tensor "on disk" (external data with the absolute
path of the file holding it, its offset and length), whether its bytes sit in the model file itself
or in its external data. Passes read the weights they fold (``read_array``); ``save_model`` copies
the others from their file into the output one at a time. So the model is held once, without
its weights, plus the folded ones. ``load_weights`` reads them all in, for callers that want a
self-contained model.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Set
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from .errors import ReparamError, first_line
from .wire import (
    GRAPH_INITIALIZER,
    LARGE_TENSOR,
    MODEL_GRAPH,
    TENSOR_RAW_DATA,
    copy_bytes,
    key,
    point_at,
    read_bytes,
    read_skeleton,
    varint_bytes,
    without,
)

MIN_OPSET = 9  # BatchNormalization lost `spatial`/`consumed_inputs` quirks by opset 9
# Protobuf cannot serialize 2 GB; keep a margin for everything that is not tensor data.
PROTOBUF_LIMIT = 2**31 - 2**27
# Two values per byte: numpy's itemsize does not give their raw size.
PACKED_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, name)}


def load_model(source: str | os.PathLike | onnx.ModelProto, data_files: set[Path] | None = None,
               lazy: bool = False) -> onnx.ModelProto:
    """Reads and validates a model; a ModelProto is copied, never modified. The external data
    files it reads are added to ``data_files``. With ``lazy``, large initializers of a model read
    from a file stay on disk (see the module's doc); otherwise they are read in."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ReparamError(f"{path}: no such file")
        if not path.is_file():
            raise ReparamError(f"{path}: not a file")
        model = read_skeleton(path)
        _locate_external(model, path.parent, data_files)
    _check_structure(model)
    _check_tensor_sizes(model)
    _check(model)
    if not lazy:
        load_weights(model)
    return model


def files_size(path: Path, data_files: Iterable[Path] = ()) -> int | None:
    """Bytes of a model file and its external data files; None where one cannot be read."""
    try:
        return sum(os.path.getsize(p) for p in {Path(path).resolve(), *data_files})
    except OSError:
        return None


def load_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reads every initializer still on disk into the model, which is then self-contained."""
    for tensor in model.graph.initializer:
        place = on_disk(tensor)
        if place is not None:
            _take_in(tensor, read_bytes(*place))
    return model


def _take_in(tensor: onnx.TensorProto, data: bytes) -> None:
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.ClearField("data_location")


def on_disk(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(file, offset, length) of an initializer load_model left on disk; None for one in memory."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {entry.key: entry.value for entry in tensor.external_data}
    if not os.path.isabs(info.get("location", "")):
        return None  # relative: external data nobody located (a ModelProto loaded without it)
    return info["location"], int(info["offset"]), int(info["length"])


def read_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's value, read from its file when it is on disk."""
    place = on_disk(tensor)
    if place is None:
        return numpy_helper.to_array(tensor)
    if not _plain(tensor):
        whole = onnx.TensorProto(dims=tensor.dims, data_type=tensor.data_type, raw_data=read_bytes(*place))
        return numpy_helper.to_array(whole)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(read_bytes(*place), dtype=dtype).reshape(tuple(tensor.dims))


def sparse_array(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse initializer's dense value. Its indices are linear (shape [NNZ]) or coordinates
    ([NNZ, rank]); onnx-graphsurgeon 0.6.1 reads linear ones wrongly."""
    values, indices = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dense.shape)
    dense.reshape(-1)[indices.reshape(-1)] = values.reshape(-1)
    return dense


def _plain(tensor: onnx.TensorProto) -> bool:
    """Whether numpy takes the tensor's raw bytes as they are (not bfloat16, float8 or 4-bit
    types, which onnx's helpers convert, nor on a big-endian machine)."""
    return tensor.data_type not in PACKED_TYPES and sys.byteorder == "little" and \
        onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind in "fiucb"


def append_array(tensors, name: str, array: np.ndarray) -> None:
    """Appends ``array`` to a repeated TensorProto field; a plain numeric one is filled in place
    (from_array and append would each copy its bytes once more)."""
    if array.dtype.kind not in "fiucb" or sys.byteorder != "little":  # strings, ml_dtypes' types
        tensors.append(numpy_helper.from_array(array, name))
        return
    tensor = tensors.add(name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def disk_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    """The initializers on disk as read-only memory maps of their files (nothing is read until
    used), by name; None when one has a type numpy cannot map (bfloat16, 4-bit)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        place = on_disk(tensor)
        if place is None:
            continue
        if not _plain(tensor):
            return None
        location, offset, _ = place
        arrays[tensor.name] = np.memmap(location, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type),
                                        mode="r", offset=offset, shape=tuple(tensor.dims))
    return arrays


def _check_structure(model: onnx.ModelProto) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ReparamError("not an ONNX model, or truncated: no IR version, graph or opset")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    latest = onnx.defs.onnx_opset_version()
    if not default or not MIN_OPSET <= default[0] <= latest:
        found = default[0] if default else "none"
        raise ReparamError(f"unsupported opset {found} for the default domain "
                           f"(supported: {MIN_OPSET} to {latest})")


def _locate_external(model: onnx.ModelProto, folder: Path, data_files: set[Path] | None) -> None:
    """Points the model's external data at its files by absolute path (checked to lie in the
    model's folder, as onnx requires, wherever the process runs): the main graph's large
    initializers stay on disk, every other tensor stored outside (small initializers, Constant
    values, subgraphs' and functions' tensors, sparse ones) is read in, so that the model made
    from it never refers to the input's files."""
    root = folder.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and on_disk(tensor) is None:
            location, offset, length = _external_place(tensor, root, data_files)
            if length <= LARGE_TENSOR:
                _take_in(tensor, read_bytes(location, offset, length))
            else:
                point_at(tensor, location, offset, length)
    sparse = [part for t in model.graph.sparse_initializer for part in (t.values, t.indices)]
    for tensor in itertools.chain(external_data_helper._get_all_tensors(model), sparse):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and on_disk(tensor) is None:
            _take_in(tensor, read_bytes(*_external_place(tensor, root, data_files)))


def _external_place(tensor: onnx.TensorProto, root: Path, data_files: set[Path] | None) -> tuple[str, int, int]:
    """(file, offset, length) of a tensor's external data, checked to lie in the model's folder."""
    info = external_data_helper.ExternalDataInfo(tensor)
    location = (root / info.location).resolve()
    label = f"tensor '{tensor.name}'" if tensor.name else "a tensor without a name (a Constant's value)"
    if os.path.isabs(info.location) or not location.is_relative_to(root):
        raise ReparamError(f"{label}: external data location '{info.location}' lies outside the model's folder")
    if not location.is_file():
        raise ReparamError(f"missing external data: {location} (needed by {label})")
    if data_files is not None:
        data_files.add(location)
    offset, size = int(info.offset or 0), location.stat().st_size
    length = int(info.length) if info.length else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise ReparamError(f"{label}: its external data runs past the end of {location} (the file is truncated)")
    return str(location), offset, length


def _check_tensor_sizes(model: onnx.ModelProto) -> None:
    """A truncated file or external data file shows up as raw data shorter than the dims say."""
    for tensor in model.graph.initializer:
        place = on_disk(tensor)
        if tensor.data_type in PACKED_TYPES or place is None and not tensor.HasField("raw_data"):
            continue
        expected, held = tensor_bytes(tensor), (place[2] if place else len(tensor.raw_data))
        if held != expected:
            raise ReparamError(f"initializer '{tensor.name}' holds {held} bytes, its shape needs "
                               f"{expected}: the file or its external data is truncated")


def fits_in_protobuf(model: onnx.ModelProto, on_disk_too: bool = True) -> bool:
    """Whether the model serializes as one protobuf (ByteSize itself is slow on big models), with
    the initializers still on disk written in, or (``on_disk_too`` False) as it is."""
    tensors = external_data_helper._get_all_tensors(model)
    return sum(tensor_bytes(t) for t in tensors if on_disk_too or on_disk(t) is None) < PROTOBUF_LIMIT


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


def inferred_shapes(model: onnx.ModelProto) -> tuple[dict[str, onnx.ValueInfoProto], str | None]:
    """The types and shapes ONNX infers for the model's tensors (graph outputs included) from
    its inputs and weights alone: the declared value_info and output shapes are left out, since
    onnxruntime runs a model whose declarations are wrong. Empty where inference fails. With
    them, why the sizes ONNX's inference lost were not named (see _name_input_sizes), or None."""
    light = _light(model)
    del light.graph.value_info[:]
    for value in light.graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # noqa: BLE001 - any failure just means fewer known shapes
        return {}, None
    inputs = {v.name for v in model.graph.input}
    found = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)
             if v.name not in inputs and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    return found, _name_input_sizes(light, found)


def _name_input_sizes(light: onnx.ModelProto, found: dict[str, onnx.ValueInfoProto]) -> str | None:
    """Gives the sizes ONNX's inference lost (a Reshape to -1 on a symbolic batch, a Slice of
    computed bounds) the names onnxruntime's symbolic inference proves they have: an input's
    dim name ('batch') or a number. It stops at the first size it cannot prove (it is asked
    not to assume two sizes equal): then nothing is named, and the reason is returned."""
    names = {d.dim_param for v in light.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    if not names or not any(_unnamed(d, names) for v in found.values() for d in v.type.tensor_type.shape.dim):
        return None
    stops = _Stops()
    try:
        from onnxruntime.tools import symbolic_shape_infer as ssi
        level, propagate = ssi.logger.level, ssi.logger.propagate
        ssi.logger.setLevel(logging.DEBUG)  # where it stops is a debug message: ours, not the user's log
        ssi.logger.propagate = False
        ssi.logger.addHandler(stops)
        try:
            # SymbolicShapeInference.infer_shapes, less its way of stopping: it saves the model
            # into the working directory (sym_shape_infer_temp.onnx and its weights) before raising
            inference = ssi.SymbolicShapeInference(2**31 - 1, auto_merge=False, guess_output_rank=False, verbose=0)
            inference._preprocess(light)
            complete = False
            while inference.run_:
                complete = inference._infer_impl()
        finally:
            ssi.logger.removeHandler(stops)
            ssi.logger.setLevel(level)
            ssi.logger.propagate = propagate
    except Exception as exc:  # noqa: BLE001 - it stops at a size it cannot prove: ONNX's sizes stand
        return f"onnxruntime's symbolic shape inference failed: {first_line(exc)}"
    if not complete:
        return f"onnxruntime's symbolic shape inference stopped at {stops.where or 'a size it could not prove'}"
    inference._update_output_from_vi()
    proved = inference.out_mp_
    for value in list(proved.graph.value_info) + list(proved.graph.output):
        if value.name not in found or not value.type.HasField("tensor_type"):
            continue
        ours, theirs = found[value.name].type.tensor_type.shape.dim, value.type.tensor_type.shape.dim
        if len(ours) != len(theirs):
            continue
        for dim, proof in zip(ours, theirs):
            if _unnamed(dim, names) and (proof.HasField("dim_value") or proof.dim_param in names):
                dim.CopyFrom(proof)
    return None


class _Stops(logging.Handler):
    """Where onnxruntime's symbolic shape inference stopped: the op and node its debug message names."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.where: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Stopping at") and self.where is None:
            self.where = message.removeprefix("Stopping at incomplete shape inference at ")


def _unnamed(dim: onnx.TensorShapeProto.Dimension, names: Set[str]) -> bool:
    return not dim.HasField("dim_value") and dim.dim_param not in names


def shape_disagreement(declared: onnx.ValueInfoProto, inferred: onnx.ValueInfoProto) -> str | None:
    """How a declared type and shape contradict the inferred one, or None."""
    a, b = declared.type.tensor_type, inferred.type.tensor_type
    if not declared.type.HasField("tensor_type"):
        return None
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        name = onnx.TensorProto.DataType.Name
        return f"'{declared.name}' is declared {name(a.elem_type).lower()}, inferred {name(b.elem_type).lower()}"
    if not a.HasField("shape"):
        return None
    dims = [[d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim] for t in (a, b)]
    if len(dims[0]) != len(dims[1]) or any(isinstance(x, int) and isinstance(y, int) and x != y
                                           for x, y in zip(*dims)):
        shown = ["x".join(map(str, d)) or "a scalar" for d in dims]
        return f"'{declared.name}' is declared {shown[0]}, inferred {shown[1]}"
    return None

EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay in the model file
ALIGN_THRESHOLD, ALIGNMENT = 1 << 20, 1 << 16  # external data this large starts at a multiple of 64 KiB


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
               protected: Set[Path] = frozenset()) -> None:
    """Writes ``model`` to ``path`` atomically (temporary files in the same folder, then renames),
    one initializer at a time: those still on disk are copied from their file, none is held twice.
    The model is not modified.

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
            with open(tmp_model, "wb") as out:
                if external_data:
                    with open(Path(tmp) / data_name, "wb") as data:
                        _write(model, out, data, data_name)
                    if os.path.getsize(Path(tmp) / data_name):
                        os.replace(Path(tmp) / data_name, folder / data_name)
                else:
                    _write(model, out)
            os.replace(tmp_model, path)
    except OSError as exc:
        raise ReparamError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write(model: onnx.ModelProto, out, data=None, data_name: str | None = None) -> None:
    """Serializes ``model`` into ``out`` as protobuf would, but each initializer's bytes straight
    from where they are (a message's fields may come in any order; protobuf's own ByteSize and
    SerializeToString would copy them, slowly). With ``data``, initializers of EXTERNAL_THRESHOLD
    bytes or more go there as external data named ``data_name``."""
    # per initializer: its fields but the bytes, where its bytes are, their length if inline, their
    # offset in ``data`` if not
    records: list[tuple[bytes, onnx.TensorProto | tuple[str, int, int] | None, int | None, int | None]] = []
    offset = 0
    for tensor in model.graph.initializer:
        place = on_disk(tensor)
        if place is None and (not tensor.HasField("raw_data") or tensor.data_type in PACKED_TYPES):
            records.append((tensor.SerializeToString(), None, None, None))  # typed fields: small or rare
            continue
        length = place[2] if place else tensor_bytes(tensor)
        header = without(tensor, ("raw_data", "external_data", "data_location"))
        if data is not None and length >= EXTERNAL_THRESHOLD:
            if length >= ALIGN_THRESHOLD:  # as onnx does: onnxruntime maps such data instead of reading it
                offset = -(-offset // ALIGNMENT) * ALIGNMENT
            point_at(header, data_name or "", offset, length)
            records.append((header.SerializeToString(), place or tensor, None, offset))
            offset += length
        else:
            records.append((header.SerializeToString(), place or tensor, length, None))
    rest = without(model.graph, ("initializer",)).SerializeToString()
    sizes = [len(fields) + (0 if inline is None else len(key(TENSOR_RAW_DATA)) + len(varint_bytes(inline)) + inline)
             for fields, _, inline, _ in records]
    graph_size = len(rest) + sum(len(key(GRAPH_INITIALIZER)) + len(varint_bytes(n)) + n for n in sizes)
    out.write(without(model, ("graph",)).SerializeToString())
    out.write(key(MODEL_GRAPH) + varint_bytes(graph_size) + rest)
    for (fields, source, inline, at), size in zip(records, sizes):
        out.write(key(GRAPH_INITIALIZER) + varint_bytes(size) + fields)
        if source is None:
            continue
        if inline is not None:  # its bytes follow as raw_data
            out.write(key(TENSOR_RAW_DATA) + varint_bytes(inline))
            copy_bytes(source, out)
        else:
            data.write(bytes((at or 0) - data.tell()))
            copy_bytes(source, data)
