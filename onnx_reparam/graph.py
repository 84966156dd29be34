"""The graph layer: an onnx-graphsurgeon graph plus the questions every pass asks of it.

Passes never edit an initializer in place: fused weights are fresh constants with fresh names, so a
weight shared with another node stays as that node needs it.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .model_io import inferred_value_info

Node = gs.Node
Tensor = gs.Tensor
_FRESH_SUFFIX = re.compile(r"(_reparam\d+)+$")


class Graph:
    """A model being rewritten. ``gs`` is the onnx-graphsurgeon graph; the rest is bookkeeping."""

    def __init__(self, model: onnx.ModelProto):
        # Inferred shapes go into the import, then out of the caller's model again.
        known = len(model.graph.value_info)
        model.graph.value_info.extend(inferred_value_info(model))
        try:
            self.gs = gs.import_onnx(model)
        finally:
            del model.graph.value_info[known:]
        self.output_names = {t.name for t in self.gs.outputs}
        # An initializer that is also a graph input can be overridden at run time: not a constant.
        self.overridable = {i.name for i in model.graph.input} & {t.name for t in model.graph.initializer}
        self._names = set(self.gs.tensors()) | {n.name for n in self.gs.nodes}
        self._counter = 0

    def infer_shapes(self) -> None:
        """Fills in shapes ONNX can infer now that were unknown at import (after constant folding,
        slice bounds and reshape targets are constants)."""
        model = gs.export_onnx(self.gs, do_type_check=False)
        del model.graph.value_info[:]
        tensors = self.gs.tensors()
        for info in inferred_value_info(model):
            tensor = tensors.get(info.name)
            if isinstance(tensor, gs.Variable) and self.static_shape(tensor) is None \
                    and info.type.HasField("tensor_type"):
                dims = info.type.tensor_type.shape.dim
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]

    def nodes(self) -> list[Node]:
        """A snapshot of the nodes, safe to iterate while rewriting."""
        return list(self.gs.nodes)

    def constant(self, tensor: Tensor | None) -> np.ndarray | None:
        """The value of an initializer or Constant node output; None for anything computed or
        overridable at run time."""
        if isinstance(tensor, gs.Constant):
            return None if tensor.name in self.overridable else np.asarray(tensor.values)
        node = self.producer(tensor) if tensor is not None else None
        if node is None or node.op != "Constant" or len(node.attrs) != 1:
            return None
        value = next(iter(node.attrs.values()))
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)

    @staticmethod
    def producer(tensor: Tensor) -> Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def shared_reason(self, tensor: Tensor, consumers: int = 1) -> str | None:
        """Why ``tensor`` cannot disappear in a rewrite (graph output, other readers), or None."""
        if tensor.name in self.output_names:
            return f"'{tensor.name}' is a graph output"
        if len(tensor.outputs) > consumers:
            others = ", ".join(sorted({n.name or n.op for n in tensor.outputs}))
            return f"'{tensor.name}' is also read by {others}"
        return None

    @staticmethod
    def rank(tensor: Tensor) -> int | None:
        return len(tensor.shape) if tensor.shape is not None else None

    @staticmethod
    def static_shape(tensor: Tensor) -> tuple[int, ...] | None:
        shape = tensor.shape
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        return tuple(shape)

    def fresh_name(self, base: str) -> str:
        base = _FRESH_SUFFIX.sub("", base)  # a rewrite of a rewrite keeps one suffix
        while True:
            self._counter += 1
            name = f"{base}_reparam{self._counter}"
            if name not in self._names:
                self._names.add(name)
                return name

    def add_constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.fresh_name(base), np.ascontiguousarray(values))

    def add_variable(self, base: str, like: Tensor) -> gs.Variable:
        return gs.Variable(self.fresh_name(base), dtype=like.dtype, shape=like.shape)

    def add_node(self, op: str, inputs: list[Tensor], outputs: list[Tensor], attrs: dict,
                 name: str) -> Node:
        """Adds a node writing ``outputs``; an output that had a producer is taken over from it, so
        the old producer goes dead and clean-up removes it."""
        for tensor in outputs:
            tensor.inputs.clear()
        node = gs.Node(op, name=self.fresh_name(name), attrs=attrs, inputs=inputs, outputs=outputs)
        self.gs.nodes.append(node)
        return node

    def cleanup(self) -> None:
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()

    def to_model(self, original: onnx.ModelProto) -> onnx.ModelProto:
        """Exports the graph inside the original model's envelope: IR version, opsets, metadata,
        doc strings and functions are kept as they were."""
        model = gs.export_onnx(self.gs, do_type_check=False)
        for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version",
                      "doc_string"):
            setattr(model, field, getattr(original, field))
        for field in ("opset_import", "metadata_props", "functions"):
            del getattr(model, field)[:]
            getattr(model, field).extend(getattr(original, field))
        model.graph.doc_string = original.graph.doc_string
        return model


def attr(node: Node, name: str, default):
    return node.attrs.get(name, default)


def conv_geometry(node: Node, weight: np.ndarray) -> dict:
    """Conv attributes with ONNX defaults filled in; pads as (begin..., end...)."""
    spatial = weight.ndim - 2
    return {
        "kernel": tuple(weight.shape[2:]),
        "strides": tuple(attr(node, "strides", [1] * spatial)),
        "dilations": tuple(attr(node, "dilations", [1] * spatial)),
        "pads": tuple(attr(node, "pads", [0] * 2 * spatial)),
        "group": int(attr(node, "group", 1)),
        "auto_pad": _decode(attr(node, "auto_pad", "NOTSET")),
    }


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
