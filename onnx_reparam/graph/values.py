"""onnx-graphsurgeon's side of the graph layer: importing a model with the shapes inference gives,
weights held on disk until needed, and exports that copy no weights."""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.importers.onnx_importer import (
    get_itemsize,
    get_onnx_tensor_dtype,
    get_onnx_tensor_shape,
)
from onnx_graphsurgeon.ir import tensor as gs_tensor
from onnx_graphsurgeon.util import misc

from ..model_io import inferred_shapes, read_array, shape_disagreement

DEFAULT_DOMAINS = ("", "ai.onnx", None)

def import_model(model: onnx.ModelProto) -> tuple[gs.Graph, list[str], str | None]:
    """The onnx-graphsurgeon graph of ``model``, the declared shapes inference contradicts, and
    why sizes ONNX's inference lost are left unnamed (or None).
    Shapes come from inference, declared ones only where it has none: a rule must not trust a
    declaration onnxruntime does not check. They go into the import, then out of the caller's
    model again."""
    inferred, unnamed = inferred_shapes(model)
    declared = list(model.graph.value_info)
    conflicts = [d for d in (shape_disagreement(v, inferred[v.name]) for v in
                             declared + list(model.graph.output) if v.name in inferred) if d]
    del model.graph.value_info[:]
    model.graph.value_info.extend([v for v in declared if v.name not in inferred] + list(inferred.values()))
    try:
        with quiet_onnx_graphsurgeon():
            graph = gs.import_onnx(model)
    finally:
        del model.graph.value_info[:]
        model.graph.value_info.extend(declared)
    tensors = graph.tensors()
    for output in model.graph.output:
        if output.name in inferred and output.name in tensors:
            tensor, trusted = tensors[output.name], inferred[output.name].type.tensor_type
            tensor.shape = dims(trusted.shape)
            if trusted.elem_type:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(trusted.elem_type)
    return graph, conflicts, unnamed


def dims(shape: onnx.TensorShapeProto) -> list:
    """A shape as onnx-graphsurgeon holds it: sizes, dim names, None where unknown."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


@contextlib.contextmanager
def quiet_onnx_graphsurgeon():
    """onnx-graphsurgeon's warnings (an op it skips, a type numpy lacks) silenced for the while:
    the report says what matters."""
    level = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        yield
    finally:
        gs.logger.G_LOGGER.severity = level


@contextlib.contextmanager
def weights_as_placeholders(graph: gs.Graph, larger_than: int, restore: bool = True):
    """While exporting: constants over ``larger_than`` bytes stand in as dims-only tensors, so the
    export copies no weights. Yields, by name, what each stand-in stands for: the stored tensor or
    the new array; the graph gets them back afterwards unless ``restore`` is False."""
    swapped: list[tuple[gs.Constant, object]] = []
    new_values: dict[str, onnx.TensorProto | np.ndarray] = {}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, gs_tensor.SparseValues):
            continue
        values = tensor._values
        if isinstance(values, gs_tensor.LazyValues):
            stored = stored_tensor(values)
            if values.nbytes <= larger_than:
                continue
            placeholder = onnx.TensorProto(name=tensor.name, dims=list(stored.dims), data_type=stored.data_type)
            new_values[tensor.name] = stored
        else:
            array = np.asarray(values)
            if array.nbytes <= larger_than:
                continue
            new_values[tensor.name] = array
            placeholder = onnx.TensorProto(name=tensor.name, dims=list(array.shape),
                                           data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        swapped.append((tensor, values))
        tensor._values = gs_tensor.LazyValues(placeholder)
    try:
        yield new_values
    finally:
        for tensor, values in swapped if restore else ():
            tensor._values = values


class DiskValues(gs_tensor.LazyValues):
    """The values of an initializer on disk (see model_io). To onnx-graphsurgeon, which exports
    ``tensor`` when it evaluates constant subgraphs in onnxruntime, ``tensor`` is the initializer
    read in; ``stored`` is the one on disk, which the export to a model keeps."""

    def __init__(self, stored: onnx.TensorProto):  # LazyValues' would read ``tensor``
        self.stored = stored
        self.shape = get_onnx_tensor_shape(stored)
        self.dtype = get_onnx_tensor_dtype(stored)
        self.nbytes = misc.volume(self.shape) * get_itemsize(self.dtype)

    @property
    def tensor(self) -> onnx.TensorProto:
        return numpy_helper.from_array(self.load(), self.stored.name)

    def load(self) -> np.ndarray:
        return read_array(self.stored)


def stored_tensor(values: gs_tensor.LazyValues) -> onnx.TensorProto:
    """The initializer behind lazily loaded values, as the model stores it."""
    return values.stored if isinstance(values, DiskValues) else values.tensor
