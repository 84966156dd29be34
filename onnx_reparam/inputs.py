"""The inputs the check and bench run a model on: sizes for symbolic dims (one size per dim name),
seeded random inputs plus a constant one, the user's own from an .npz, and the errors that name
what does not fit.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from . import compare
from .errors import ReparamError, first_line, option

MAX_INPUT_BYTES = 1 << 32  # a generated input larger than this is a mistake in --input-shape
BATCH_FOR_CHECK = 1  # the size a dynamic batch axis gets when the user gives none
TYPICAL_SIZE = 224  # an example size for a symbolic dim, in the message asking for one

Shapes = Mapping[str, Sequence[int]]  # sizes by input name, as --input-shape gives them


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


def make_inputs(model: onnx.ModelProto, shapes: Shapes | None = None,
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
            raise ReparamError(f"input '{value.name}' is not a tensor; give its value with {option('inputs')}")
    chosen_shapes = input_sizes(inputs, shapes, chosen)
    for value in inputs:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = chosen_shapes[value.name]
        if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > MAX_INPUT_BYTES:
            raise ReparamError(f"input '{value.name}' of shape {'x'.join(map(str, shape))} would take more "
                               f"than {MAX_INPUT_BYTES >> 30} GiB; give a smaller {option('input_shapes')}")
        kinds[value.name] = (dtype, shape)
    sets = []
    for offset in (0, 1):
        rng = np.random.default_rng(seed + offset)
        sets.append({name: _random(rng, dtype, shape) for name, (dtype, shape) in kinds.items()})
    sets.append({name: np.ones(shape, dtype) if compare.is_float(dtype) else np.zeros(shape, dtype)
                 for name, (dtype, shape) in kinds.items()})
    return sets


def graph_inputs(model: onnx.ModelProto, named: Sequence[str] = ()) -> list[onnx.ValueInfoProto]:
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
        if value.name not in feeds:
            continue
        shape = np.shape(feeds[value.name])
        if (len(dims) != len(shape) or any(
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


def input_sizes(inputs: list[onnx.ValueInfoProto], shapes: Shapes,
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
                              f"{BATCH_FOR_CHECK} for the check ({option('input_shapes')} to choose)")
        else:
            unsized.append(f"'{dim.dim_param}' (axis {axis})" if dim.dim_param else f"axis {axis}")
            shape.append(TYPICAL_SIZE)
    if unsized:
        example = ",".join(map(str, shape))
        what = "a symbolic dim" if len(unsized) == 1 else "symbolic dims"
        raise ReparamError(f"input '{value.name}' has {what} {' and '.join(unsized)} with no size to run it at: "
                           f"give the sizes your data has, e.g. input_shapes={{'{value.name}': ({example.replace(',', ', ')})}} "
                           f"(--input-shape {value.name}:{example})")
    return tuple(shape)


def check_input_shape(value: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    """A given shape must keep the model's static dims (found here, not deep inside onnxruntime)."""
    if not value.type.tensor_type.HasField("shape"):
        return
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ReparamError(f"input '{value.name}' has {len(dims)} dims, {option('input_shapes')} gives {len(shape)}")
    for axis, (dim, size) in enumerate(zip(dims, shape)):
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise ReparamError(f"input '{value.name}' has size {dim.dim_value} on axis {axis}, "
                               f"{option('input_shapes')} gives {size}")


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if compare.is_float(dtype):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 8, shape).astype(dtype)


def load_inputs(path: str | os.PathLike, what: str = "inputs") -> dict[str, np.ndarray]:
    """Inputs from an .npz file, one array per model input name; ``what`` they are, for the error."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ReparamError(f"cannot read {what} from {path}: {first_line(exc)}") from None
