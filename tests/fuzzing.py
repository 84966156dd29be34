"""Fuzz harness: the tool run as a hostile user would, on seeded random graphs of the patterns it
targets and on mutants of the shipped model, each checked against onnxruntime.

For every case it records what a user must never see: an exception that is not a one-line error
(a traceback), an input file changed, an output that fails ``check_model(full_check=True)``, an
output that differs from the input's (with ``--no-verify``, so the check cannot hide it), a refusal
without a reason, and an internal error turned into a refusal. The tests run a small budget
(test_fuzz_harness.py); ``python benchmarks/fuzz.py`` a large one.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnx_reparam
from conftest import GraphBuilder
from onnx_reparam.verify import Checker

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "repvgg_a0_tiny_train.onnx"


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    input_shapes: dict | None = None


@dataclass
class Findings:
    cases: int = 0
    skipped: int = 0  # generated graphs onnxruntime itself does not run: not the tool's input
    rewritten: int = 0
    dropped: int = 0  # rewrites the check caught and dropped (wrong, but never written)
    problems: list[str] = field(default_factory=list)

    def add(self, case: Case, what: str) -> None:
        self.problems.append(f"{case.name}: {what}")

    def summary(self) -> str:
        kinds = Counter(p.split(": ", 1)[1].split(":")[0] for p in self.problems)
        return (f"{self.cases} cases ({self.skipped} skipped as invalid, {self.rewritten} rewritten, "
                f"{self.dropped} rewrites dropped by the check); problems: "
                + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"))


class RandomBlock:
    """A random sum of linear branches of x, with the exactness conditions left to chance:
    kernels 1-5, asymmetric pads, auto_pad, strides, dilations, groups, crops and pads before a
    conv, BN, Mul and AveragePool leaves, broadcasting constants, a second input, dynamic dims,
    shared intermediates and a nonlinearity after."""

    def __init__(self, seed: int):
        self.rng = rng = np.random.default_rng(seed)
        self.b = b = GraphBuilder(seed)
        self.rank = int(rng.choice([1, 2, 2, 2, 3]))
        self.c = int(rng.choice([2, 4, 6]))
        self.size = int(rng.choice([5, 6, 8]))
        dynamic = str(rng.choice(["none", "none", "batch", "spatial"]))
        shape = [1, self.c] + [self.size] * self.rank
        self.x = b.input("x", shape)
        self.z = b.input("z", shape) if rng.random() < 0.2 else None
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


def random_case(seed: int) -> Case | None:
    try:
        block = RandomBlock(seed)
    except Exception:  # noqa: BLE001 - shapes that do not add up: not a model at all
        return None
    return Case(f"random-{seed}", block.model, block.input_shapes)


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


def _valid_reference(case: Case) -> bool:
    try:
        onnx.checker.check_model(case.model, full_check=True)
        Checker(case.model, input_shapes=case.input_shapes, provider="cpu")
        return True
    except Exception:  # noqa: BLE001 - the generator made something that is not a model
        return False


def run_case(case: Case, findings: Findings) -> None:
    findings.cases += 1
    if not _valid_reference(case):
        findings.skipped += 1
        return
    with tempfile.TemporaryDirectory(prefix="onnx-reparam-fuzz-") as tmp:
        path = Path(tmp) / "in.onnx"
        onnx.save(case.model, path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            unverified, report = onnx_reparam.optimize(path, verify=False)
        except onnx_reparam.ReparamError as exc:
            findings.add(case, f"valid model rejected: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - exactly what the harness looks for
            findings.add(case, f"traceback: {type(exc).__name__}: {exc}")
            return
        _inspect_report(case, report, findings)
        if report.rewrites:
            findings.rewritten += 1
            try:
                onnx.checker.check_model(unverified, full_check=True)
            except Exception as exc:  # noqa: BLE001
                findings.add(case, f"invalid output: {str(exc).splitlines()[0]}")
            result = Checker(case.model, input_shapes=case.input_shapes, provider="cpu").check(unverified)
            if not result.passed and not result.inconclusive:
                findings.add(case, f"wrong output with --no-verify: {result.worst()}")
            try:
                _, verified = onnx_reparam.optimize(path, input_shapes=case.input_shapes, provider="cpu")
                findings.dropped += len(verified.dropped)
            except onnx_reparam.VerificationError as exc:
                if not exc.report.verification.inconclusive:  # all inf/NaN: nothing to blame
                    findings.add(case, f"verified run failed: {exc}")
            except onnx_reparam.ReparamError as exc:
                findings.add(case, f"verified run failed: {exc}")
            except Exception as exc:  # noqa: BLE001
                findings.add(case, f"traceback: {type(exc).__name__}: {exc}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            findings.add(case, "input changed")


def _inspect_report(case: Case, report, findings: Findings) -> None:
    for p in report.passes:
        for r in p.refusals:
            if not r.reason.strip():
                findings.add(case, "refusal without a reason")
            elif r.reason.startswith("internal error"):
                findings.add(case, f"internal error: {r.reason}")


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
