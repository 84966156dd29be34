"""The graph layer: an onnx-graphsurgeon graph plus the questions every pass asks of it. This
package is the only code that imports onnx-graphsurgeon (tested with 0.6.1, the range
pyproject.toml allows); passes and readers ask a Graph, and hold its Nodes and Tensors.

Rules match op types of the default domain only, and that is decided here, once: a node of any
other domain (``my.custom:Reshape``) carries its domain in its op type while the graph is being
rewritten, so no rule takes it for the standard op of the same name; ``spelled_out`` gives
onnx-graphsurgeon, shape inference and the exported model the op types as the model has them.

Passes never edit an initializer in place: fused weights are fresh constants with fresh names, so a
weight shared with another node stays as that node needs it. Nor do they edit the graph directly:
``add_node`` only writes down a node, and ``commit`` puts a rewrite's nodes in at once (or
``discard`` forgets them), so a rewrite that fails half-way leaves the graph as it was.
"""
from __future__ import annotations

import contextlib
import gc
import re
from typing import TypeAlias

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir import tensor as gs_tensor

from ..errors import Refused
from ..kernels import dtype_code, unrunnable
from ..model_io import (
    LARGE_TENSOR,
    append_array,
    inferred_value_info,
    on_disk,
    read_array,
    sparse_array,
)
from . import folding
from .values import (
    DEFAULT_DOMAINS,
    DiskValues,
    dims,
    import_model,
    stored_tensor,
    weights_as_placeholders,
)

Node: TypeAlias = gs.Node
Tensor: TypeAlias = gs.Tensor
_FRESH_SUFFIX = re.compile(r"(_reparam\d+)+$")
RULE_KEY = "onnx_reparam.rule"


class Graph:
    """A model being rewritten. ``gs`` is the onnx-graphsurgeon graph; the rest is bookkeeping."""

    def __init__(self, model: onnx.ModelProto):
        self.gs, self.shape_conflicts, self.unnamed_sizes = import_model(model)
        for tensor in self.gs.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(values, gs_tensor.LazyValues) and type(values) is gs_tensor.LazyValues \
                    and on_disk(values.tensor) is not None:
                tensor._values = DiskValues(values.tensor)
            elif isinstance(tensor, gs.Variable) and isinstance(tensor.dtype, int):  # a type onnx-graphsurgeon lacks
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype)  # bfloat16: ml_dtypes'
        for node in self.gs.nodes:
            if node.domain not in DEFAULT_DOMAINS:
                node.op = f"{node.domain}:{node.op}"
        # What the input model runs already: a rewrite may write it again without asking onnxruntime.
        self._kinds = {(n.op, frozenset(dtype_code(t.dtype) for t in n.inputs if t.name)) for n in self.gs.nodes}
        self.output_names = {t.name for t in self.gs.outputs}
        # An initializer that is also a graph input can be overridden at run time: not a constant.
        self.overridable = {i.name for i in model.graph.input} & {t.name for t in model.graph.initializer}
        self._names = set(self.gs.tensors()) | {n.name for n in self.gs.nodes}
        self._counter = 0
        self._pending: list[tuple[str, list[Tensor], list[Tensor], dict, str]] = []
        self._read: dict[str, np.ndarray] = {}  # initializers read so far
        self._rewires: list[tuple[Tensor, Tensor]] = []
        # Tool-made node name -> the original nodes it stands for, and the rule that made it.
        self.origins: dict[str, tuple[str, ...]] = {}
        self.rules: dict[str, str] = {}
        for node in self.nodes():  # a Constant node's value is a weight like any other: held as one
            value = self.constant(node.outputs[0]) if node.op == "Constant" and len(node.outputs) == 1 else None
            if value is not None and node.outputs[0].name not in self.output_names:
                node.outputs.pop().to_constant(value)

    def infer_shapes(self) -> None:
        """Fills in shapes ONNX can infer now that were unknown at import (after constant folding,
        slice bounds and reshape targets are constants)."""
        with weights_as_placeholders(self.gs, LARGE_TENSOR), self.spelled_out():
            model = gs.export_onnx(self.gs, do_type_check=False)
        del model.graph.value_info[:]
        tensors = self.gs.tensors()
        names = {d for t in self.inputs for d in (t.shape or []) if isinstance(d, str)}  # the inputs' dim names
        for info in inferred_value_info(model):
            tensor = tensors.get(info.name)
            if isinstance(tensor, gs.Variable) and self.static_shape(tensor) is None \
                    and info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                tensor.shape = _kept_names(tensor.shape, dims(info.type.tensor_type.shape), names)

    @contextlib.contextmanager
    def spelled_out(self):
        """For the while: every node's op type as the model has it, not marked with its domain."""
        custom = [(node, node.op) for node in self.gs.nodes if node.domain not in DEFAULT_DOMAINS]
        for node, op in custom:
            node.op = op.split(":", 1)[1] if op.startswith(f"{node.domain}:") else op
        try:
            yield
        finally:
            for node, op in custom:
                node.op = op

    def nodes(self) -> list[Node]:
        """A snapshot of the nodes, safe to iterate while rewriting."""
        return list(self.gs.nodes)

    def in_order(self, nodes) -> list[Node]:
        """``nodes`` (of this graph) sorted as the graph holds them."""
        order = {id(n): i for i, n in enumerate(self.gs.nodes)}
        return sorted(nodes, key=lambda n: order[id(n)])

    @property
    def inputs(self) -> list[Tensor]:
        return list(self.gs.inputs)

    @property
    def outputs(self) -> list[Tensor]:
        return list(self.gs.outputs)

    @property
    def opset(self) -> int:
        """The default domain's opset the model imports."""
        return int(self.gs.opset or onnx.defs.onnx_opset_version())

    def constant(self, tensor: Tensor | None) -> np.ndarray | None:
        """The value of an initializer or Constant node output; None for anything computed or
        overridable at run time. An initializer is read from the model once (one copy, held until
        the graph is exported), not into onnx-graphsurgeon's tensor, which would keep it for good."""
        if isinstance(tensor, gs.Constant):
            if tensor.name in self.overridable:
                return None
            if isinstance(tensor._values, gs_tensor.SparseValues):  # stored sparse: its dense value
                return sparse_array(tensor._values.tensor)
            if isinstance(tensor._values, gs_tensor.LazyValues):
                if tensor.name not in self._read:
                    self._read[tensor.name] = read_array(stored_tensor(tensor._values))
                return self._read[tensor.name]
            return np.asarray(tensor.values)
        node = self.producer(tensor) if tensor is not None else None
        if node is None or node.op != "Constant" or len(node.attrs) != 1:
            return None
        value = next(iter(node.attrs.values()))
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)

    def value(self, tensor: Tensor) -> np.ndarray:
        """The value of a tensor the caller has found to be a constant."""
        value = self.constant(tensor)
        if value is None:
            raise ValueError(f"'{tensor.name}' is not a constant")
        return value

    @staticmethod
    def producer(tensor: Tensor) -> Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def shared(self, tensor: Tensor, consumers: int = 1) -> Refused | None:
        """Why ``tensor`` cannot disappear in a rewrite (graph output, other readers), or None."""
        if tensor.name in self.output_names:
            return Refused("an inner value is a graph output", f"'{tensor.name}'")
        if len(tensor.outputs) > consumers:
            others = ", ".join(sorted({self.label(n) for n in tensor.outputs}))
            return Refused("an inner value is also read by other nodes", f"'{tensor.name}' is read by {others}")
        return None

    @staticmethod
    def rank(tensor: Tensor) -> int | None:
        return len(tensor.shape) if tensor.shape is not None else None

    @staticmethod
    def axis_size(tensor: Tensor, axis: int) -> str:
        """How big ``tensor`` is on ``axis``, for a refusal: a number, a symbolic name, or unknown."""
        size = tensor.shape[axis] if tensor.shape is not None and axis < len(tensor.shape) else None
        if isinstance(size, int) and size >= 0:
            return f"axis {axis} (size {size})"
        return f"axis {axis} (symbolic size '{size}')" if size else f"axis {axis} (unknown size)"

    @staticmethod
    def static_shape(tensor: Tensor) -> tuple[int, ...] | None:
        shape = tensor.shape
        if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        return tuple(shape)

    def constant_subgraphs(self, limit: int) -> tuple[list[tuple[Tensor, np.ndarray]], list[Node], dict[str, str]]:
        """The values computed only from constants (folding.py says which) that the rest of the
        graph reads, evaluated in onnxruntime, and the nodes that compute them; values over
        ``limit`` bytes are left out, and so are those it could not compute, with why."""
        nodes, targets = folding.foldable(self.nodes(), lambda t: self.constant(t) is not None, limit,
                                          self.output_names)
        if not targets:
            return [], [], {}
        values, problems = folding.evaluate(nodes, targets, self.opset, self.gs.import_domains)
        kept = [(t, values[t.name]) for t in targets if t.name in values and values[t.name].nbytes <= limit]
        return kept, folding.cone(nodes, [t for t, _ in kept]), problems

    def is_stored(self, tensor: Tensor) -> bool:
        """An initializer the caller cannot override: a weight as the model stores it."""
        return isinstance(tensor, gs.Constant) and tensor.name not in self.overridable

    def fresh_name(self, base: str) -> str:
        base = _FRESH_SUFFIX.sub("", base)  # a rewrite of a rewrite keeps one suffix
        while True:
            self._counter += 1
            name = f"{base}_reparam{self._counter}"
            if name not in self._names:
                self._names.add(name)
                return name

    def add_constant(self, base: str, values: np.ndarray) -> gs.Constant:
        values = np.asarray(values)  # np.ascontiguousarray would make a scalar 1-D
        return gs.Constant(self.fresh_name(base), values if values.flags.c_contiguous else values.copy(order="C"))

    def add_variable(self, base: str, like: Tensor, same_shape: bool = True) -> gs.Variable:
        """A new tensor of ``like``'s type, and of its shape unless ``same_shape`` is False (a
        partial sum that a constant addend may still broadcast to the full shape)."""
        return gs.Variable(self.fresh_name(base), dtype=like.dtype, shape=like.shape if same_shape else None)

    def add_node(self, op: str, inputs: list[Tensor], outputs: list[Tensor], attrs: dict,
                 name: str) -> None:
        """Writes down a node of the rewrite being built; ``commit`` adds it to the graph."""
        self._pending.append((op, list(inputs), list(outputs), dict(attrs), name))

    def emit_layer(self, op: str, source: Tensor, weight: np.ndarray, bias: np.ndarray | None,
                   output: Tensor, attrs: dict, name: str, dtype: np.dtype | None = None) -> None:
        """Writes one linear layer ``output = op(source)`` with fresh constants: Conv/Gemm with
        weight and bias, or MatMul (weight stored (in, out)) followed by an Add of the bias when
        there is one. Weights take the data's type, which ONNX requires of these ops (``dtype``
        where the data's type is unknown)."""
        dtype = self.layer_dtype(source, dtype or weight.dtype)
        weight_const = self.add_constant(f"{name}_weight", np.asarray(weight).astype(dtype, copy=False))
        bias_const = self.add_constant(f"{name}_bias", np.asarray(bias).astype(dtype, copy=False)) \
            if bias is not None else None
        if op != "MatMul":
            inputs = [source, weight_const] + ([bias_const] if bias_const is not None else [])
            self.add_node(op, inputs, [output], attrs, name)
        elif bias_const is None:
            self.add_node("MatMul", [source, weight_const], [output], {}, name)
        else:
            product = self.add_variable(f"{name}_product", output, same_shape=False)
            self.add_node("MatMul", [source, weight_const], [product], {}, name)
            self.add_node("Add", [product, bias_const], [output], {}, name)

    @staticmethod
    def layer_dtype(source: Tensor, fallback: np.dtype) -> np.dtype:
        """The type of a layer's weights: its data's (ONNX requires it), ``fallback`` where unknown."""
        return np.dtype(source.dtype) if source.dtype is not None else np.dtype(fallback)

    def add_rewire(self, old: Tensor, new: Tensor) -> None:
        """Writes down that every reader of ``old`` is to read ``new`` (``old`` is then dead)."""
        self._rewires.append((old, new))

    def unrunnable(self) -> Refused | None:
        """Why a node written down since the last commit cannot be in the model: onnxruntime
        cannot run its op at its element types (kernels.py asks it), unless the input model has
        that op at those types already."""
        opset = self.opset
        for op, inputs, outputs, attrs, _ in self._pending:
            types = tuple(dtype_code(t.dtype) if t.name else None for t in inputs)
            if (op, frozenset(t for t in types if t is not None)) in self._kinds \
                    or any(t is None and i.name for t, i in zip(types, inputs)):
                continue
            ranks = tuple(len(t.shape) if t.shape is not None else None for t in inputs)
            produced = tuple(dtype_code(t.dtype) or types[0] for t in outputs)
            plain = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()))
            problem = unrunnable(op, opset, types, ranks, produced, plain)
            if problem:
                return Refused(problem, kind="unrunnable")
        return None

    def discard(self) -> None:
        """Forgets the nodes and rewirings written down since the last commit."""
        self._pending.clear()
        self._rewires.clear()

    def label(self, node: Node) -> str:
        """A name for a node a user can find in their model: the original node(s) it came from."""
        return ", ".join(self.origin(node))

    def origin(self, node: Node) -> tuple[str, ...]:
        if node.name in self.origins:
            return self.origins[node.name]
        return (node.name or f"<{node.op} writing '{node.outputs[0].name if node.outputs else ''}'>",)

    def commit(self, replaced: list[Node], rule: str) -> list[Node]:
        """Adds the written-down nodes to the graph. Each output that had a producer is taken over
        from it, so the replaced nodes go dead and clean-up removes them. The new nodes remember
        the original nodes of ``replaced`` and the rule that made them."""
        origins = tuple(sorted({o for n in replaced for o in self.origin(n)}))
        going = {id(n) for n in replaced}
        for tensor in {t.name: t for n in replaced for t in n.inputs}.values():
            if tensor.name in self._read and all(id(reader) in going for reader in tensor.outputs):
                del self._read[tensor.name]  # read by nothing once these go: not held meanwhile
        added = []
        for op, inputs, outputs, attrs, name in self._pending:
            for tensor in outputs:
                tensor.inputs.clear()
            node = gs.Node(op, name=self.fresh_name(name), attrs=attrs, inputs=inputs, outputs=outputs)
            self.gs.nodes.append(node)
            self.origins[node.name], self.rules[node.name] = origins, rule
            added.append(node)
        self._pending.clear()
        for old, new in self._rewires:
            for reader in list(old.outputs):
                for index, tensor in enumerate(reader.inputs):
                    if tensor is old:
                        reader.inputs[index] = new
        self._rewires.clear()
        return added

    def cleanup(self) -> None:
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        live = self.gs.tensors()
        for name in [name for name in self._read if name not in live]:
            del self._read[name]  # a weight folded away is not held until the export

    def holds_new_weights(self) -> bool:
        """Whether a rewrite's weights over LARGE_TENSOR bytes are in the graph (the cyclic
        garbage collection that frees them early is worth its time only then)."""
        return any(isinstance(getattr(t, "_values", None), np.ndarray) and t._values.nbytes > LARGE_TENSOR
                   for t in self.gs.tensors().values())

    def to_model(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Writes the graph into ``model``, the model it was read from, and returns it: the
        envelope (IR version, opsets, metadata, doc strings, functions) stays as it was, weights
        still read stay where they are (not copied), dead ones are deleted, new ones added one at
        a time. The graph is not to be used afterwards."""
        collect = self.holds_new_weights()
        with weights_as_placeholders(self.gs, 0, restore=False) as values, self.spelled_out():
            exported = gs.export_onnx(self.gs, do_type_check=False)  # each array freed once stored
        # Nothing may still point into the model's initializers when they are deleted below.
        self._read.clear()
        self.gs = None
        if collect:  # the graph is reference cycles: its weights go now, not at a later collection
            gc.collect()
        graph = model.graph
        stored = {t.name for t in graph.initializer}
        values = {name: value for name, value in values.items()
                  if not isinstance(value, onnx.TensorProto) or name not in stored}
        sparse = {t.values.name for t in graph.sparse_initializer}
        wanted = [t.name for t in exported.graph.initializer if t.name not in sparse]
        keep = set(wanted)
        for index in reversed(range(len(graph.initializer))):
            if graph.initializer[index].name not in keep:
                del graph.initializer[index]
        present = stored & keep
        small = {t.name: t for t in exported.graph.initializer if t.name not in values}
        for name in wanted:
            if name in present:
                continue
            value = values.pop(name, None)
            if value is None:
                graph.initializer.append(small[name])
            elif isinstance(value, onnx.TensorProto):  # stored elsewhere (a Constant node's value)
                graph.initializer.append(value)
                graph.initializer[-1].name = name
            else:
                append_array(graph.initializer, name, value)
        for field in ("node", "value_info", "input", "output"):
            del getattr(graph, field)[:]
            getattr(graph, field).extend(getattr(exported.graph, field))
        read = {name for node in graph.node for name in node.input}
        kept_sparse = [t for t in graph.sparse_initializer if t.values.name in read]
        del graph.sparse_initializer[:]
        graph.sparse_initializer.extend(kept_sparse)
        for node in graph.node:  # every tool-made node says which rule made it
            rule = self.rules.get(node.name)
            if rule is None:
                continue
            if model.ir_version >= 10:  # nodes have metadata from IR 10 on
                node.metadata_props.add(key=RULE_KEY, value=rule)
            else:
                node.doc_string = f"{RULE_KEY}: {rule}"
        return model


def _kept_names(known: list | None, inferred: list, names: set[str]) -> list:
    """``inferred``, but where it has no number for a size ``known`` gave one of the inputs' dim
    ``names`` ('batch', proved at import): the rewrites keep every tensor's values, so its sizes too."""
    if not known or len(known) != len(inferred):
        return inferred
    return [old if not isinstance(new, int) and old in names else new for old, new in zip(known, inferred)]


def optional_input(node: Node, index: int) -> Tensor | None:
    """Input ``index`` of the node, None when it is left out (absent, or named "")."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    return node.inputs[index]


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
