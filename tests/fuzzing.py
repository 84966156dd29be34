"""Fuzz harness: the tool run as a hostile user would, on seeded random graphs of the patterns it
targets and on mutants of the shipped model, each checked against onnxruntime.

A random case is one of these kinds (HOSTILE), each a way a valid model has broken the tool:
a plain block; its weights as Constant nodes (one inside an If's branch) stored as external data
and run from another working folder; two inputs sharing a symbolic batch dim fixed by
``--static-shape`` for one of them; a wrong declared shape; nodes moved to a custom domain under
their standard names; int32, int64, double, float16 or bfloat16 data through the layout, constant,
affine and channel-MatMul rules; a model onnxruntime refuses to run.

For every case it records what a user must never see: an exception that is not a one-line error
(a traceback: exit 3), an input file changed, an output that fails ``check_model(full_check=True)``
or that onnxruntime does not load (where the input passes and loads), an output that differs from
the input's (with ``--no-verify``, so the check cannot hide it), an output that refers to the
input's files, a custom-domain node taken for a standard one, a model onnxruntime refuses not
rejected as bad input before any rewrite, a refusal without a reason, an internal error turned
into a refusal, and an affine op left beside a layer without a reason (``silent_leftovers``). The tests run a small budget (test_fuzz_harness.py); ``python benchmarks/fuzz.py``
a large one.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from conftest import GraphBuilder
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnx_reparam
from onnx_reparam.model_io import save_model
from onnx_reparam.verify import Checker

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "repvgg_a0_tiny_train.onnx"


HOSTILE = ("external", "shared_dims", "misdeclared", "custom", "dtype", "refused")
CUSTOM = "my.custom"


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    input_shapes: dict | None = None
    kind: str = "plain"  # or one of HOSTILE
    static_shape: bool = False  # run with --static-shape (and input_shapes)


@dataclass
class Findings:
    cases: int = 0
    skipped: int = 0  # generated graphs onnxruntime itself does not run: not the tool's input
    rewritten: int = 0
    dropped: int = 0  # rewrites the check caught and dropped (wrong, but never written)
    problems: list[str] = field(default_factory=list)
    # Unchecked outputs onnxruntime runs, but not with its default optimizations, where it loads
    # the input so: a defect of its optimizer the rewrite ran into (the check drops such rewrites).
    optimizer_defects: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)  # cases run (not skipped), by kind
    unevaluated: list[str] = field(default_factory=list)  # values onnx's evaluator could not compute

    def add(self, case: Case, what: str) -> None:
        self.problems.append(f"{case.name}: {what}")

    def summary(self) -> str:
        kinds = Counter(p.split(": ", 1)[1].split(":")[0] for p in self.problems)
        defects = (f", {len(self.optimizer_defects)} unchecked outputs onnxruntime's optimizer fails on "
                   f"({', '.join(self.optimizer_defects)})" if self.optimizer_defects else "")
        defects += (f", values of {len(self.unevaluated)} not compared: onnx's evaluator could not run them "
                    f"({', '.join(self.unevaluated)})" if self.unevaluated else "")
        return (f"{self.cases} cases ({self.skipped} skipped as invalid, {self.rewritten} rewritten, "
                f"{self.dropped} rewrites dropped by the check{defects}); problems: "
                + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"))


class RandomBlock:
    """A random sum of linear branches of x, with the exactness conditions left to chance:
    kernels 1-5, asymmetric pads, auto_pad, strides, dilations, groups, crops and pads before a
    conv, BN, Mul and AveragePool leaves, broadcasting constants, a second input, dynamic dims,
    shared intermediates and a nonlinearity after."""

    def __init__(self, seed: int, dtype=np.float32, second_input: bool = False, dynamic: str | None = None):
        self.rng = rng = np.random.default_rng(seed)
        self.b = b = GraphBuilder(seed, dtype)
        self.rank = int(rng.choice([1, 2, 2, 2, 3]))
        self.c = int(rng.choice([2, 4, 6]))
        self.size = int(rng.choice([5, 6, 8]))
        dynamic = dynamic or str(rng.choice(["none", "none", "batch", "spatial"]))
        shape = [1, self.c] + [self.size] * self.rank
        self.x = b.input("x", shape)
        self.z = b.input("z", shape) if rng.random() < 0.2 or second_input else None
        self.stride = int(rng.choice([1, 1, 2]))
        self.outputs: list[str] = []
        leaves = [self.leaf()]
        for _ in range(int(rng.integers(1, 4)) * 3):  # tries: a leaf of another shape is taken back
            if len(leaves) == 4:
                break
            nodes, outputs = len(b.nodes), len(self.outputs)
            leaf = self.leaf()
            if self.shape_of(leaf) == self.shape_of(leaves[0]):
                leaves.append(leaf)
            else:
                del b.nodes[nodes:], self.outputs[outputs:]
        if self.z is not None and self.stride == 1:
            leaves.append(b.conv(self.z, self.c, self.c, 1, rank=self.rank))
        if rng.random() < 0.3:
            leaves.append(b.const(b.rand(*self.constant_shape())))
        total = self.tree(leaves)
        if rng.random() < 0.5:
            total = b.node(str(rng.choice(["Relu", "Sigmoid"])), [total])
        self.model = b.model([total] + self.outputs)
        self.input_shapes = None
        if dynamic != "none":  # sizes were concrete while building; the user's model has names
            axis = 0 if dynamic == "batch" else 2
            for value in self.model.graph.input:
                value.type.tensor_type.shape.dim[axis].dim_param = "N" if axis == 0 else "H"
            for value in self.model.graph.output:
                for dim in value.type.tensor_type.shape.dim:
                    dim.Clear()  # unknown
            self.input_shapes = {v.name: tuple(shape) for v in self.model.graph.input}

    def shape_of(self, name: str) -> tuple | None:
        b = self.b
        graph = helper.make_graph(b.nodes, "probe", b.inputs, [helper.make_tensor_value_info(name, 1, None)],
                                  initializer=b.inits)
        try:
            inferred = onnx.shape_inference.infer_shapes(helper.make_model(graph), strict_mode=True)
        except Exception:  # noqa: BLE001 - shapes that do not fit
            return None
        dims = inferred.graph.output[0].type.tensor_type.shape.dim
        return tuple(d.dim_value for d in dims) or None

    def constant_shape(self) -> tuple[int, ...]:
        shapes = [(self.c,) + (1,) * self.rank, (1,), (2, self.c) + (1,) * self.rank,
                  (1, 1, self.c) + (1,) * self.rank, (1, self.c) + (1,) * self.rank]
        return shapes[int(self.rng.integers(len(shapes)))]

    def leaf(self) -> str:
        rng, b, x = self.rng, self.b, self.x
        kind = str(rng.choice(["conv", "conv", "conv", "bn", "x", "mul", "pool", "padded", "cropped", "chain"]))
        if kind in ("bn", "x", "mul") and self.stride != 1:
            kind = "conv"
        if kind == "bn":
            return b.bn(x, self.c)
        if kind == "x":
            return x
        if kind == "mul":
            return b.node("Mul", [x, b.const(b.rand(*self.constant_shape()) + 2)])
        if kind == "pool":
            k = int(rng.choice([2, 3]))
            attrs = {"kernel_shape": [k] * self.rank, "strides": [self.stride] * self.rank,
                     "count_include_pad": int(rng.integers(2))}
            if rng.random() < 0.5:
                attrs["auto_pad"] = str(rng.choice(["SAME_UPPER", "SAME_LOWER"]))
            else:
                attrs["pads"] = [int(rng.integers(0, k))] * self.rank * 2
            return b.bn(b.node("AveragePool", [x], **attrs), self.c)
        source = x
        if kind == "chain":  # DBB's 1x1 then kxk, the padding in between or in the kxk conv
            source = b.conv(x, self.c, self.c, 1, bias=bool(rng.integers(2)), rank=self.rank)
            if rng.random() < 0.5:
                source = b.bn(source, self.c)
            kind = "padded" if rng.random() < 0.5 else "conv"
        if kind == "padded":
            pads = [0, 0] + [int(rng.integers(0, 2)) for _ in range(self.rank)]
            pads += [0, 0] + [int(rng.integers(0, 2)) for _ in range(self.rank)]
            value = b.const(np.array(rng.choice([0.0, 0.5]), b.dtype))
            source = b.node("Pad", [source, b.const(np.array(pads, np.int64)), value])
        elif kind == "cropped":
            axes = list(range(2, 2 + self.rank))
            source = b.node("Slice", [x, b.const(np.array([1] * self.rank, np.int64)),
                                      b.const(np.array([-1] * self.rank, np.int64)), b.const(np.array(axes, np.int64))])
        return self.conv(source)

    def conv(self, source: str) -> str:
        rng, b = self.rng, self.b
        k = int(rng.choice([1, 3, 5, 2]))
        d = int(rng.choice([1, 1, 2]))
        groups = int(rng.choice([g for g in (1, 2, self.c) if self.c % g == 0]))
        attrs = {"strides": [self.stride] * self.rank, "dilations": [d] * self.rank}
        if rng.random() < 0.25:
            attrs["auto_pad"] = str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"]))
        else:
            reach = d * (k - 1)
            begin = int(rng.integers(0, reach + 1))
            attrs["pads"] = [begin] * self.rank + [reach - begin + int(rng.integers(-1, 2)) * (rng.random() < 0.2)] * self.rank
            attrs["pads"] = [max(p, 0) for p in attrs["pads"]]
        y = b.conv(source, self.c, self.c, k, groups, bias=bool(rng.integers(2)), rank=self.rank, **attrs)
        if rng.random() < 0.5:
            y = b.bn(y, self.c)
        if rng.random() < 0.1:
            self.outputs.append(y)  # an intermediate the user also reads
        return y

    def tree(self, terms: list[str]) -> str:
        while len(terms) > 1:
            op = str(self.rng.choice(["Add", "Add", "Sub", "Sum"]))
            take = int(self.rng.integers(2, len(terms) + 1)) if op == "Sum" else 2
            terms = [self.b.node(op, terms[:take])] + terms[take:]
        return terms[0]


class LayoutBlock:
    """A chain of what the layout, constant, affine and channel-MatMul rules rewrite, on data of
    any element type: Transpose pairs (with or without perm), Reshape pairs, Identity, Mul by one
    and Add of zero, a per-channel Mul then Add, a whole Slice, a MatMul over the channels of a
    flattened tensor, a MatMul over the last axis then a Mul along it."""

    def __init__(self, seed: int, dtype):
        rng = np.random.default_rng(seed)
        self.b = b = GraphBuilder(seed, dtype)
        c, h, w = int(rng.choice([2, 4])), 3, 3
        y = b.input("x", [1, c, h, w])

        def small(*shape):  # small integers: exact in every type
            return b.const(rng.integers(-3, 4, shape).astype(dtype))
        for _ in range(int(rng.integers(2, 6))):
            step = str(rng.choice(["transposes", "reshapes", "identity", "neutral", "affine", "slice",
                                   "channel_matmul", "matmul_affine"]))
            if step == "transposes":
                perm = [int(p) for p in rng.permutation(4)] if rng.random() < 0.5 else None
                first = b.node("Transpose", [y], **({"perm": perm} if perm else {}))
                y = b.node("Transpose", [first], **({"perm": list(np.argsort(perm))} if perm else {}))
            elif step == "reshapes":
                y = b.node("Reshape", [b.node("Reshape", [y, b.const(np.array([1, c, h * w], np.int64))]),
                                       b.const(np.array([1, c, h, w], np.int64))])
            elif step == "identity":
                y = b.node("Identity", [y])
            elif step == "neutral":
                op = str(rng.choice(["Mul", "Add"]))
                y = b.node(op, [y, b.const(np.array([1 if op == "Mul" else 0]).astype(dtype))])
            elif step == "affine":
                y = b.node("Add", [b.node("Mul", [y, small(1, c, 1, 1)]), small(1, c, 1, 1)])
            elif step == "slice":
                y = b.node("Slice", [y] + [b.const(np.array([v], np.int64)) for v in (0, h, 2)])
            elif step == "channel_matmul":
                out = int(rng.choice([2, 4]))
                flat = b.node("Reshape", [y, b.const(np.array([1, c, h * w], np.int64))])
                y = b.node("Reshape", [b.node("MatMul", [small(out, c), flat]), b.const(np.array([1, out, h, w], np.int64))])
                c = out
            else:
                y = b.node("Mul", [b.node("MatMul", [y, small(w, w)]), small(w)])
        self.model = b.model([y])


def random_case(seed: int) -> Case | None:
    """Half the seeds a plain random block, the others one of the HOSTILE kinds (drawn from a
    stream of its own, so the blocks stay as they were)."""
    draw = np.random.default_rng([seed, 19])
    kind = str(draw.choice(["plain"] * len(HOSTILE) + list(HOSTILE)))
    try:
        if kind == "dtype":
            dtype = draw.choice([np.int32, np.int64, np.float64, np.float16, ml_dtypes.bfloat16])
            if dtype != np.float16 and draw.random() < 0.7:
                return Case(f"random-{seed}-{np.dtype(dtype).name}", LayoutBlock(seed, dtype).model, kind=kind)
            block = RandomBlock(seed, dtype)
            return Case(f"random-{seed}-{np.dtype(dtype).name}", block.model, block.input_shapes, kind=kind)
        if kind == "shared_dims":
            block = RandomBlock(seed, second_input=True, dynamic="batch")
            shape = (2,) + block.input_shapes["x"][1:]
            return Case(f"random-{seed}-{kind}", block.model, {"x": shape}, kind=kind, static_shape=True)
        block = RandomBlock(seed)
    except Exception:  # noqa: BLE001 - shapes that do not add up: not a model at all
        return None
    model = {"plain": lambda m, r: m, "external": as_constants, "misdeclared": misdeclared,
             "custom": in_custom_domain, "refused": refused_by_onnxruntime}[kind](block.model, draw)
    return Case(f"random-{seed}" + ("" if kind == "plain" else f"-{kind}"), model, block.input_shapes, kind=kind)


def as_constants(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """Every weight a Constant node, one of them behind an If whose branches both give it (the
    case is saved with its Constant values as external data)."""
    graph = model.graph
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    hidden = constants.pop(int(rng.integers(len(constants)))) if constants else None
    del graph.initializer[:]
    nodes = constants + list(graph.node)
    if hidden is not None:
        branches = [helper.make_graph([hidden], f"branch{i}", [], [helper.make_tensor_value_info(
            hidden.output[0], hidden.attribute[0].t.data_type, list(hidden.attribute[0].t.dims))]) for i in (0, 1)]
        truth = helper.make_node("Constant", [], ["if_condition"], value=numpy_helper.from_array(np.array(True)))
        nodes = [truth, helper.make_node("If", ["if_condition"], [hidden.output[0]], then_branch=branches[0],
                                         else_branch=branches[1])] + nodes
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def misdeclared(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A wrong shape declared for an intermediate tensor or an output (onnxruntime runs it)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [v for v in list(inferred.graph.value_info) + list(model.graph.output)
              if v.type.tensor_type.HasField("shape") and len(v.type.tensor_type.shape.dim) >= 2]
    if not values:
        return model
    value = onnx.ValueInfoProto()
    value.CopyFrom(values[int(rng.integers(len(values)))])
    dims = value.type.tensor_type.shape.dim
    axis = int(rng.integers(len(dims)))
    dims[axis].dim_value = (dims[axis].dim_value if dims[axis].HasField("dim_value") else 1) + int(rng.integers(1, 3))
    outputs = [o for o in model.graph.output if o.name == value.name]
    if outputs:
        outputs[0].CopyFrom(value)
    else:
        model.graph.value_info.append(value)
    return model


def in_custom_domain(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """Some nodes moved to a custom domain under their standard names, their outputs' shapes
    declared (inference knows nothing of the domain)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.value_info.extend(inferred.graph.value_info)
    for node in model.graph.node:
        if rng.random() < 0.4:
            node.domain = CUSTOM
    model.opset_import.append(helper.make_opsetid(CUSTOM, 1))
    return model


def refused_by_onnxruntime(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A conv given a group count its channels do not divide, or one input channel too few in
    its weight: onnx's checker passes it, onnxruntime refuses to run it."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        return model
    node = convs[int(rng.integers(len(convs)))]
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    if rng.random() < 0.5:
        for a in node.attribute:
            if a.name == "group":
                a.i = weight.dims[0] + 1
                break
        else:
            node.attribute.append(helper.make_attribute("group", int(weight.dims[0]) + 1))
    else:
        array = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(np.concatenate([array, array[:, :1]], axis=1), weight.name))
    return model


def mutant_case(seed: int) -> Case:
    """The shipped RepVGG with one random change: a shared weight, an intermediate made an
    output, a BN epsilon or variance, a conv's pads or group, fp16 weights, a dynamic batch."""
    rng = np.random.default_rng(seed)
    model = onnx.load(SHIPPED)
    graph = model.graph
    kind = str(rng.choice(["share", "output", "bn", "pads", "dynamic", "keep_inputs", "bias_name"]))
    convs = [n for n in graph.node if n.op_type == "Conv"]
    norms = [n for n in graph.node if n.op_type == "BatchNormalization"]
    inits = {t.name: t for t in graph.initializer}
    input_shapes = None
    if kind == "share":
        a, b = rng.choice(len(convs), 2, replace=False)
        if inits[convs[a].input[1]].dims == inits[convs[b].input[1]].dims:
            convs[b].input[1] = convs[a].input[1]
    elif kind == "output":
        node = norms[int(rng.integers(len(norms)))]
        graph.output.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    elif kind == "bn":
        node = norms[int(rng.integers(len(norms)))]
        var = inits[node.input[4]]
        values = numpy_helper.to_array(var).copy()
        values[int(rng.integers(values.size))] = float(rng.choice([0.0, 1e-12, 1e6]))
        var.CopyFrom(numpy_helper.from_array(values, var.name))
        for a in node.attribute:
            if a.name == "epsilon":
                a.f = float(rng.choice([0.0, 1e-3, 1.0]))
    elif kind == "pads":
        node = convs[int(rng.integers(len(convs)))]
        for a in node.attribute:
            if a.name == "pads":
                a.ints[:] = [int(v) for v in rng.integers(0, 3, len(a.ints))]
    elif kind == "dynamic":
        graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
        input_shapes = {graph.input[0].name: (2,) + tuple(d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:])}
    elif kind == "keep_inputs":
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in list(graph.initializer)[: int(rng.integers(1, 6))])
    elif kind == "bias_name":
        node = convs[int(rng.integers(len(convs)))]
        if len(node.input) == 2:
            node.input.append("")
    return Case(f"mutant-{seed}-{kind}", model, input_shapes)


def _int8(case: Case) -> dict:
    """Every third case also runs the INT8 passes (--int8-ready --keep-identity)."""
    asked = zlib.crc32(case.name.encode()) % 3 == 0
    return {"int8_ready": asked, "keep_identity": asked}


def _passes(check, model: onnx.ModelProto) -> bool:
    try:
        check(model)
        return True
    except Exception:  # noqa: BLE001 - the answer asked for
        return False


def _runs(case: Case) -> bool:
    return _passes(lambda m: Checker(m, input_shapes=case.input_shapes, provider="cpu"), case.model)


def run_case(case: Case, findings: Findings) -> None:
    findings.cases += 1
    full = _passes(lambda m: onnx.checker.check_model(m, full_check=True), case.model)
    runs = _runs(case)
    if case.kind == "refused" and full and not runs:
        findings.kinds[case.kind] += 1
        with _saved(case, findings) as path:
            _expect_rejection(case, path, findings)
        return
    # What the generator made must be a model: valid (its declaration wrong or its ops custom, if
    # so made) and run by onnxruntime (or, for types its CPU lacks, by onnx's evaluator).
    if not (full or case.kind in ("misdeclared", "custom") and _passes(onnx.checker.check_model, case.model)) \
            or not (runs or case.kind in ("custom", "dtype")):
        findings.skipped += 1
        return
    findings.kinds[case.kind] += 1
    with _saved(case, findings) as path:
        unverified = _unverified_run(case, path, findings)
        if unverified is None:
            return
        if case.kind == "custom":
            _custom_nodes_kept(case, unverified, findings)
        if runs:
            try:
                model, verified = onnx_reparam.optimize(path, input_shapes=case.input_shapes, provider="cpu",
                                                        static_shape=case.static_shape, **_int8(case))
                findings.dropped += len(verified.dropped)
                for leftover in silent_leftovers(model, verified):
                    findings.add(case, f"left without a reason: {leftover}")
                if _loads_optimized(path) and not _passes(lambda m: _session(m, optimized=True), model):
                    findings.add(case, "verified output onnxruntime's default optimizations do not load")
            except onnx_reparam.VerificationError as exc:
                if not exc.report.verification.inconclusive:  # all inf/NaN: nothing to blame
                    findings.add(case, f"verified run failed: {exc}")
            except onnx_reparam.ReparamError as exc:
                findings.add(case, f"verified run failed: {exc}")
            except Exception as exc:  # noqa: BLE001
                findings.add(case, f"traceback: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _saved(case: Case, findings: Findings):
    """The case saved in a folder of its own (an "external" case with its Constant values as
    external data), the working folder elsewhere while it is used; checks the input unchanged."""
    with tempfile.TemporaryDirectory(prefix="onnx-reparam-fuzz-") as tmp:
        folder, elsewhere = Path(tmp) / "in", Path(tmp) / "elsewhere"
        folder.mkdir(), elsewhere.mkdir()
        path = folder / "in.onnx"
        if case.kind == "external":
            copy = onnx.ModelProto()
            copy.CopyFrom(case.model)  # onnx.save would point the case's own tensors at the file
            onnx.save(copy, path, save_as_external_data=True, convert_attribute=True, size_threshold=0,
                      location="in.data")
        else:
            onnx.save(case.model, path)
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
        with contextlib.chdir(elsewhere):
            yield path
        if {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} != before:
            findings.add(case, "input changed")


def _session(model, optimized: bool):
    """An onnxruntime session of a model (or path) on the CPU: with its default optimizations, as
    a user's session has them, or with none, as the check runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are raised; onnxruntime need not also print them
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], enable_fallback=0)


def _loads_optimized(path: Path) -> bool:
    return _passes(lambda m: _session(m, optimized=True), path)


def _unverified_run(case: Case, path: Path, findings: Findings) -> onnx.ModelProto | None:
    """optimize with --no-verify, written to OUT beside the input as the command line writes it;
    OUT inspected. None when there is nothing more to look at."""
    shapes = case.input_shapes if case.static_shape else None
    try:
        unverified, report = onnx_reparam.optimize(path, verify=False, static_shape=case.static_shape,
                                                   input_shapes=shapes, **_int8(case))
        out = path.parent.parent / "out" / "out.onnx"
        out.parent.mkdir()
        save_model(unverified, out, external_data=case.kind == "external")
    except onnx_reparam.ReparamError as exc:
        findings.add(case, f"valid model rejected: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - exactly what the harness looks for
        findings.add(case, f"traceback: {type(exc).__name__}: {exc}")
        return None
    _inspect_report(case, report, findings)
    if not report.rewrites:
        return unverified
    findings.rewritten += 1
    held = {e.value for t in onnx.external_data_helper._get_all_tensors(onnx.load(out, load_external_data=False))
            for e in t.external_data if e.key == "location"}
    if held - {"out.onnx.data"}:
        findings.add(case, f"output refers to files not its own: {sorted(held)}")
        return unverified
    if case.kind != "custom":
        try:
            onnx.checker.check_model(out, full_check=True)
        except Exception as exc:  # noqa: BLE001
            findings.add(case, f"invalid output: {str(exc).splitlines()[0]}")
    if _runs(case):
        try:
            _session(out, optimized=False)
        except Exception as exc:  # noqa: BLE001
            findings.add(case, f"output onnxruntime does not load: {str(exc).splitlines()[0]}")
            return unverified
        if _loads_optimized(path) and not _loads_optimized(out):
            # Valid, and run without optimizations: a defect of onnxruntime's optimizer that the
            # unchecked rewrite ran into. The check drops such a rewrite (run_case checks that).
            findings.optimizer_defects.append(case.name)
        checker = Checker(case.model, input_shapes=case.input_shapes, provider="cpu")
        checker.deployable = False  # the values only: loading optimized was looked at above
        result = checker.check(unverified)
        if not result.passed and not result.inconclusive:
            findings.add(case, f"wrong output with --no-verify: {result.worst()}")
    elif case.kind == "dtype":
        _evaluator_agrees(case, unverified, findings)
    return unverified


def _evaluator_agrees(case: Case, unverified: onnx.ModelProto, findings: Findings) -> None:
    """For a type onnxruntime's CPU does not run: both models in onnx's reference evaluator."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in case.model.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = (rng.standard_normal(shape) * 3).astype(dtype)
    try:
        expected, actual = (ReferenceEvaluator(m).run(None, feeds) for m in (case.model, unverified))
    except Exception as exc:  # noqa: BLE001 - the evaluator lacks an op: nothing to compare with, said
        findings.unevaluated.append(f"{case.name} ({type(exc).__name__})")
        return
    for want, got in zip(expected, actual):
        a, b = np.asarray(want, np.float64), np.asarray(got, np.float64)
        slack = 0.05 * np.abs(a).max() if a.dtype != np.float64 or case.model.graph.input[0].type.tensor_type.elem_type \
            == onnx.TensorProto.BFLOAT16 else 0.0
        if a.shape != b.shape or np.abs(a - b).max(initial=0) > slack + 1e-9 * np.abs(a).max(initial=0):
            findings.add(case, f"wrong output with --no-verify: onnx's evaluator gives another value "
                               f"({np.abs(a - b).max(initial=0) if a.shape == b.shape else 'shape'})")


def _custom_nodes_kept(case: Case, unverified: onnx.ModelProto, findings: Findings) -> None:
    def custom(model):
        return Counter((n.domain, n.op_type, str(sorted((a.name, str(a)) for a in n.attribute)))
                       for n in model.graph.node if n.domain == CUSTOM)
    if custom(unverified) != custom(case.model):
        findings.add(case, "custom-domain node taken for a standard one")


def _expect_rejection(case: Case, path: Path, findings: Findings) -> None:
    """A model onnxruntime refuses: bad input (ReparamError) before any rewrite when checked;
    without the check, no traceback and no internal error."""
    stages: list[str] = []
    try:
        onnx_reparam.optimize(path, provider="cpu", input_shapes=case.input_shapes, progress=stages.append)
        findings.add(case, "model onnxruntime refuses not rejected")
    except onnx_reparam.ReparamError as exc:
        if "cannot run the input model" not in str(exc) or any(s.startswith("sweep") for s in stages):
            findings.add(case, f"model onnxruntime refuses rejected late or for another reason: {exc}")
    except Exception as exc:  # noqa: BLE001
        findings.add(case, f"traceback: {type(exc).__name__}: {exc}")
    try:
        _, report = onnx_reparam.optimize(path, verify=False)
        _inspect_report(case, report, findings)
    except onnx_reparam.ReparamError:
        pass
    except Exception as exc:  # noqa: BLE001
        findings.add(case, f"traceback: {type(exc).__name__}: {exc}")


def _inspect_report(case: Case, report, findings: Findings) -> None:
    for p in report.passes:
        for r in p.refusals:
            if not r.reason.strip():
                findings.add(case, "refusal without a reason")
            elif r.kind == "internal error":
                findings.add(case, r.text)


LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
LAYOUT = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Expand"})


def silent_leftovers(model: onnx.ModelProto, report) -> list[str]:
    """The invariant: every BatchNormalization, and every Add/Mul/Sub/Div of a per-channel constant
    that reads from or feeds a layer with a constant weight (directly or through layout ops), left
    in ``model`` (optimize's output) is folded, or a refusal in ``report`` names it, the layer or a
    node between them. Returns those left without a word."""
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    named = {part for p in report.passes for r in p.refusals for part in r.node.split(", ")}

    def original(name: str) -> str:  # a node the tool made is named after the one it replaced
        return re.sub(r"(_reparam\d+)+$", "", name)

    def layer(node) -> bool:
        return node.op_type in LAYERS and len(node.input) > 1 and node.input[1] in constants

    def affine(node) -> bool:
        if node.op_type == "BatchNormalization":
            return True
        if node.op_type not in ("Add", "Mul", "Sub", "Div") or len(node.input) != 2:
            return False
        values = [constants.get(name) for name in node.input]
        if sum(v is not None for v in values) != 1:
            return False
        value = next(v for v in values if v is not None)
        return value.size > 1 and sum(d > 1 for d in value.shape) == 1

    def back(name: str) -> list:
        """The nodes from ``name`` back through layout ops to the first other node."""
        path = []
        while (node := producer.get(name)) is not None:
            path.append(node)
            if node.op_type not in LAYOUT:
                break
            name = node.input[0]
        return path

    def forward(name: str) -> list:
        path = []
        while len(readers.get(name, [])) == 1:
            node = readers[name][0]
            path.append(node)
            if node.op_type not in LAYOUT:
                break
            name = node.output[0]
        return path

    def asked_for(node) -> bool:  # an identity kept apart (--keep-identity) is the user's choice
        rules = [entry.value for entry in node.metadata_props if entry.key == "onnx_reparam.rule"]
        return any(rule.startswith("split_identity") for rule in rules) or "split_identity" in node.doc_string

    silent = []
    for node in graph.node:
        if not affine(node) or asked_for(node):
            continue
        data = next(name for name in node.input if name not in constants)
        before, after = back(data), forward(node.output[0])
        touches = (before and layer(before[-1])) or (after and layer(after[-1]))
        bias = node.op_type in ("Add", "Sub") and before and before[0].op_type == "MatMul"  # an FC's own
        nearby = {original(n.name) for n in [node, *before, *after, *readers.get(node.output[0], [])]}
        if touches and not bias and not nearby & named:
            silent.append(f"{node.op_type} '{node.name}'")
    return silent


def fuzz(random_cases: int, mutants: int, first_seed: int = 0) -> Findings:
    findings = Findings()
    for seed in range(first_seed, first_seed + random_cases):
        case = random_case(seed)
        if case is None:
            findings.cases += 1
            findings.skipped += 1
            continue
        run_case(case, findings)
    for seed in range(first_seed, first_seed + mutants):
        run_case(mutant_case(seed), findings)
    return findings
