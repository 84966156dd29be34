"""The protobuf wire format, as far as loading and saving large models needs it: a model file
scanned without reading its large initializers' bytes (they stay on disk, external data pointing at
the file itself), and a model written field by field, each initializer's bytes copied straight
from where they are, in pieces.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ReparamError

COPY_CHUNK = 1 << 24  # bytes: weights are copied from file to file in pieces of this size


def read_bytes(location: str, offset: int, length: int) -> bytes:
    return b"".join(chunks(location, offset, length, max(length, 1)))  # one piece: joined without a copy



def chunks(location: str, offset: int, length: int, size: int = COPY_CHUNK):
    """The bytes of a range of a file, in pieces of at most ``size`` bytes."""
    try:
        with open(location, "rb") as f:
            f.seek(offset)
            while length:
                chunk = f.read(min(length, size))
                if not chunk:
                    raise ReparamError(f"{location} is shorter than when it was loaded: was it changed meanwhile?")
                yield chunk
                length -= len(chunk)
    except OSError as exc:
        raise ReparamError(f"cannot read weights from {location}: {exc.strerror or exc}") from None

LARGE_TENSOR = 1 << 16  # bytes: larger initializers are left out of checker and shape inference

# The protobuf wire format, as far as the scan needs it (field numbers from onnx.proto).
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
_VARINT, _FIXED64, LENGTH, _FIXED32 = 0, 1, 2, 5


def read_skeleton(path: Path) -> onnx.ModelProto:
    """The model without the bytes of its large initializers, which stay on disk."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ReparamError(f"{path}: empty file, not an ONNX model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _skeleton(data, str(path.resolve()))
    except _WireError as exc:
        raise ReparamError(f"{path}: not an ONNX model or truncated ({exc})") from None
    except DecodeError as exc:
        raise ReparamError(f"{path}: not an ONNX model or truncated ({exc})") from None
    except OSError as exc:
        raise ReparamError(f"{path}: cannot read ({exc.strerror})") from None



def _skeleton(data: mmap.mmap, location: str) -> onnx.ModelProto:
    model_parts, graph_parts, initializers = [], [], []
    for number, wire, start, end, field_start in _fields(data, 0, len(data)):
        if number != MODEL_GRAPH or wire != LENGTH:
            model_parts.append(data[field_start:end])
            continue
        # A message field given twice is merged: its contents concatenated.
        for inner, inner_wire, start2, end2, field_start2 in _fields(data, start, end):
            if inner == GRAPH_INITIALIZER and inner_wire == LENGTH:
                initializers.append(_initializer(data, start2, end2, location))
            else:
                graph_parts.append(data[field_start2:end2])
        graph_parts.append(b"")  # the graph is present even if empty
    model = onnx.ModelProto.FromString(b"".join(model_parts))
    if graph_parts:
        model.graph.ParseFromString(b"".join(graph_parts))
        model.graph.initializer.extend(initializers)
    return model



def _initializer(data: mmap.mmap, start: int, end: int, location: str) -> onnx.TensorProto:
    raw, parts = None, []
    for number, wire, value_start, value_end, field_start in _fields(data, start, end):
        if number == TENSOR_RAW_DATA and wire == LENGTH:
            raw = (value_start, value_end)  # the last one counts
        else:
            parts.append(data[field_start:value_end])
    if raw is None or raw[1] - raw[0] <= LARGE_TENSOR:
        return onnx.TensorProto.FromString(data[start:end])
    tensor = onnx.TensorProto.FromString(b"".join(parts))
    point_at(tensor, location, raw[0], raw[1] - raw[0])
    return tensor



def point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL



class _WireError(Exception):
    pass



def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError(f"bad varint at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7



def _fields(data, pos: int, end: int):
    """(field number, wire type, value start, value end, field start) of each field in data[pos:end]."""
    while pos < end:
        field_start = pos
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, value_end = _varint(data, pos, end)
        elif wire == LENGTH:
            length, pos = _varint(data, pos, end)
            value_end = pos + length
        elif wire in (_FIXED64, _FIXED32):
            value_end = pos + (8 if wire == _FIXED64 else 4)
        else:
            raise _WireError(f"unexpected wire type {wire} at byte {field_start}")
        if number == 0 or value_end > end:
            raise _WireError(f"field {number} at byte {field_start} runs past its message")
        yield number, wire, pos, value_end, field_start
        pos = value_end



def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)



def key(number: int, wire: int = LENGTH) -> bytes:
    return varint_bytes(number << 3 | wire)



def without(message, fields: tuple[str, ...]):
    """A copy of ``message`` without ``fields``, made without reading them (ListFields would copy
    a tensor's bytes)."""
    copy = type(message)()
    for field in message.DESCRIPTOR.fields:
        if field.name in fields:
            continue
        value = getattr(message, field.name)
        if hasattr(value, "extend"):  # repeated (protobuf's field labels differ across versions)
            getattr(copy, field.name).extend(value)
        elif not message.HasField(field.name):
            continue
        elif hasattr(value, "CopyFrom"):
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy



def copy_bytes(source: onnx.TensorProto | tuple[str, int, int], out) -> None:
    """Writes a tensor's bytes: its raw_data, or a range of the file it is on disk in."""
    if isinstance(source, onnx.TensorProto):
        out.write(source.raw_data)
        return
    for chunk in chunks(*source):
        out.write(chunk)
