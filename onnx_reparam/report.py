"""What a run did: counts before/after, each pass's rewrites and refusals, verification, timings."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import Refused, option
from .model_io import tensor_bytes

if TYPE_CHECKING:  # bench reads the report's types: imported for annotations only
    from .bench import BenchResult

# Who left a pattern as it is, in a refusal's ``kind``.
KINDS = {
    "refused": "the pattern cannot be rewritten exactly",
    "unrunnable": "onnxruntime cannot run what the rewrite writes",
    "internal error": "a defect of this tool stopped the rewrite",
    "unverified": "the rewrite did not pass the check and was dropped",
    "withheld": "the rewrite was left out while isolating a failure, or its rule failed twice",
}


@dataclass
class Refusal:
    """A pattern that was found but left as it is: the original node(s), why (the same words for
    every instance), the pattern, what this instance concerns, and who refused it (KINDS)."""
    node: str
    reason: str
    pattern: str = ""
    detail: str = ""
    kind: str = "refused"

    @classmethod
    def of(cls, node: str, refused: Refused, pattern: str = "") -> Refusal:
        return cls(node, refused.reason, pattern, refused.detail, refused.kind)

    @property
    def text(self) -> str:
        """The reason with this instance's detail, as one refusal reads."""
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


@dataclass
class Rewrite:
    """One applied rewrite: the rule (pass and pattern), the original nodes it replaced, and the
    nodes it added (each tagged with the rule in the output model)."""
    pass_name: str
    pattern: str
    replaced: list[str]
    added: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        """Names this rewrite across runs of the pipeline on the same model."""
        return self.pass_name, self.pattern, tuple(self.replaced)


@dataclass
class PassReport:
    name: str
    rewrites: list[Rewrite] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


@dataclass
class GraphStats:
    nodes: int
    parameters: int
    ops: dict[str, int]
    weight_bytes: int = 0
    ir_version: int = 0
    opset: int = 0  # of the default domain
    inputs: list[str] = field(default_factory=list)  # "name: type [dims]", initializers left out
    outputs: list[str] = field(default_factory=list)
    file_bytes: int | None = None  # the model file and its external data, where the model is a file

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphStats:
        """Counts the weights wherever they are held: initializers, sparse ones (their stored
        values) and Constant nodes' values."""
        graph = model.graph
        tensors = list(graph.initializer) + [t.values for t in graph.sparse_initializer] + [
            a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors)
        ops = Counter(n.op_type for n in model.graph.node)
        weights = {t.name for t in graph.initializer}
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return cls(len(model.graph.node), params, dict(sorted(ops.items())), sum(map(tensor_bytes, tensors)),
                   model.ir_version, opset, [_value(v) for v in graph.input if v.name not in weights],
                   [_value(v) for v in graph.output])

    def envelope(self) -> str:
        """IR, opset, inputs and outputs, in one line."""
        return (f"IR {self.ir_version}, opset {self.opset}; inputs {', '.join(self.inputs) or 'none'}; "
                f"outputs {', '.join(self.outputs)}")


def _value(value: onnx.ValueInfoProto) -> str:
    """An input or output as ``name: float32 [N, 3, 224, 224]``."""
    if not value.type.HasField("tensor_type"):
        return f"{value.name}: not a tensor"
    tensor = value.type.tensor_type
    try:
        kind = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, TypeError, ValueError):
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type).lower() if tensor.elem_type else "?"
    if not tensor.HasField("shape"):
        return f"{value.name}: {kind}"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return f"{value.name}: {kind} [{', '.join(dims)}]"


NOTHING_COMPARED = "nothing compared (empty or non-finite output)"


@dataclass
class OutputCheck:
    name: str
    max_abs_error: float  # against the input model's output
    max_rel_error: float  # max |a - b| / max |a|, against the input model's output
    tolerance: float  # the bound: on the distance from float64 at the worst channel, or on the error of the largest
    passed: bool
    compared: int = 0  # finite values compared, over every input set
    note: str | None = None  # why it failed, or what it is
    ours: float | None = None  # the candidate's distance from the float64 evaluation (worst channel, relative)
    theirs: float | None = None  # the input model's own distance from it
    # "output"; "decided": computed through a decision on floats; "decision input": added for the check
    role: str = "output"
    differ: int = 0  # integer values that differ from the input model's
    integer: bool = False  # an output of integers (or booleans)


@dataclass
class Verification:
    provider: str
    outputs: list[OutputCheck]
    error: str | None = None  # the candidate could not be run at all
    notes: list[str] = field(default_factory=list)  # e.g. the size a dynamic batch was given
    cuda: str = ""  # why CUDA was not used ("" when it was, or was not asked for)
    gpu: bool = False  # an NVIDIA GPU or driver is here: ``cuda`` is news, printed without -v
    inputs: int = 0  # input sets compared
    bound: str = ""  # what the outputs were held to
    device: str = ""  # the device and onnxruntime version that ran the check
    truth: str = ""  # how the float64 evaluation was made and what it cost, or why there is none
    failing_sets: list[int] = field(default_factory=list)  # the input sets on which an output failed

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def inconclusive(self) -> bool:
        """Failed only because nothing could be compared: no rewrite is to blame."""
        return not self.passed and self.error is None and all(o.passed or o.note == NOTHING_COMPARED
                                                              for o in self.outputs)

    def summary(self, verbose: bool = False) -> str:
        """The verdict and one line per output; under ``verbose``, also why CUDA was not used on
        a machine without a GPU, and what each output was compared on."""
        verdict = "PASSED" if self.passed else "INCONCLUSIVE" if self.inconclusive else "FAILED"
        lines = [f"verification {verdict} on {self.provider}"
                 + (f" ({self.inputs} input sets; {self.bound})" if self.inputs else "")]
        if self.truth:
            lines.append(f"  {self.truth}")
        if self.device:
            lines.append(f"  {self.device}")
        if self.cuda and (self.gpu or verbose):
            lines.append(f"  {self.cuda}")
        lines += [f"  {note}" for note in self.notes]
        if self.error:
            lines.append(f"  {self.error}")
        for o in self.outputs:
            lines.append(f"  {o.name}: {_output_line(o)}")
            if verbose:
                lines.append(f"    {_output_detail(o)}")
        return "\n".join(lines)

    def worst(self) -> str:
        """The failure in a few words, for a dropped rewrite's reason."""
        if self.error:
            return self.error
        return "; ".join(f"{o.name}: {o.note}" for o in self.outputs if not o.passed)


def _output_detail(o: OutputCheck) -> str:
    """What an output was compared on, for -v."""
    kind = "integer values" if o.integer else "finite values"
    errors = "" if o.integer else f"; max abs err {o.max_abs_error:.3g}, max rel err {o.max_rel_error:.3g} " \
                                  "against the input model"
    return f"{o.compared:,} {kind} compared ({o.role}){errors}"


def _output_line(o: OutputCheck) -> str:
    mark = "ok" if o.passed else f"MISMATCH: {o.note}" if o.note else "MISMATCH"
    if o.role == "decided":
        agreement = (f"{o.compared - o.differ} of {o.compared} values as the input model's" if o.integer
                     else f"max rel err {o.max_rel_error:.3g} against the input model")
        return f"{agreement} (computed through a decision on floats: {o.note})"
    kind = " (read by a decision; added for the check)" if o.role == "decision input" else ""
    if o.integer:
        return f"{o.compared - o.differ} of {o.compared} values as the input model's{kind} {mark}"
    if o.ours is not None:
        return (f"ours {o.ours:.2g} from float64, the input model {o.theirs:.2g} (bound {o.tolerance:.2g}; "
                f"relative to each channel's largest value); max rel err {o.max_rel_error:.2g} against the "
                f"input model{kind} {mark}")
    return (f"max abs err {o.max_abs_error:.3g} (bound {o.tolerance:.3g}: atol + rtol x the largest value), "
            f"max rel err {o.max_rel_error:.3g}{kind} {mark}")


@dataclass
class Report:
    before: GraphStats | None = None
    after: GraphStats | None = None
    passes: list[PassReport] = field(default_factory=list)
    verification: Verification | None = None
    dropped: list[Refusal] = field(default_factory=list)  # rewrites that failed the check
    notes: list[str] = field(default_factory=list)  # about the model as a whole
    input_files: set = field(default_factory=set)  # the input's external data files (never written)
    peak_memory: int | None = None  # bytes: the process's peak resident memory
    unverified: bool = False  # rewritten, and not checked because the caller said so
    bench: BenchResult | None = None  # IN against OUT, when asked for
    seconds: dict[str, float] = field(default_factory=dict)
    # int8_ready with calibration data: each candidate's INT8 SQNR (dB) and the one written
    int8: dict[str, float] = field(default_factory=dict)
    int8_choice: str = ""
    int8_measure: str = ""  # what was measured, on what

    @property
    def rewrites(self) -> int:
        return sum(len(p.rewrites) for p in self.passes)

    def to_dict(self) -> dict:
        result = asdict(self)
        result["input_files"] = sorted(str(p) for p in self.input_files)
        if self.verification is not None:
            result["verification"]["passed"] = self.verification.passed
            result["verification"]["inconclusive"] = self.verification.inconclusive
        return result

    def summary(self, verbose: bool = False) -> str:
        """What a person reads: the op types whose counts changed, sizes, what each pass
        rewrote, what was left and why (grouped; only re-parameterization patterns unless
        ``verbose``), the check and the time per stage."""
        lines = []
        if self.before:
            lines.append(f"IN  {self.before.envelope()}")
        if self.after and self.before and self.after.envelope() != self.before.envelope():
            lines.append(f"OUT {self.after.envelope()}")
        if self.before and self.after:
            lines += _op_table(self.before, self.after)
        for p in self.passes:
            counts = Counter(r.pattern for r in p.rewrites)
            if counts or verbose:
                done = ", ".join(f"{n} x {what}" for what, n in counts.items()) or "nothing"
                lines.append(f"{p.name}: rewrote {done}")
        refusals = [r for p in self.passes for r in p.refusals]
        shown = [r for r in refusals if verbose or is_reparam(r)]
        for (pattern, reason), group in _grouped(shown):
            kind = f" ({pattern})" if pattern else ""
            if len(group) == 1:
                lines.append(f"  left {group[0].node}{kind}: {group[0].text}")
            else:
                nodes = "; ".join(r.node for r in group[:3]) + ("; ..." if len(group) > 3 else "")
                lines.append(f"  left {len(group)} x{kind}: {reason}: {nodes}")
        if len(shown) < len(refusals):
            lines.append(f"  ({len(refusals) - len(shown)} other patterns left as they are; -v lists them)")
        if self.int8:
            lines.append(f"INT8, {self.int8_measure}: " + ", ".join(f"{label} {value:.1f} dB" for label, value in
                                                               self.int8.items()) + f"; written: {self.int8_choice}")
        lines += [f"note: {note}" for note in self.notes]
        if not self.rewrites:
            lines.append("nothing rewritten: the model is unchanged")
        elif self.unverified:
            lines.append(f"NOT VERIFIED: the check was skipped ({option('verify=False')}): the rewritten model "
                         "was not run")
        if self.verification is not None:
            lines.append(self.verification.summary(verbose))
        if self.seconds:
            lines.append("time " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        if self.bench is not None:
            lines.append(self.bench.summary(verbose))
        return "\n".join(lines)


def is_reparam(refusal: Refusal) -> bool:
    """Whether a refusal concerns a re-parameterization pattern (BN folds, branch merges, conv
    chains, FC folds), an INT8 transform the user asked for, or a rewrite that failed, rather than
    a plain scale or reshape that happens to sit next to a layer (GELU's x / sqrt(2) after a conv)."""
    if refusal.kind != "refused":
        return True
    pattern = refusal.pattern
    return pattern.startswith(("branches", "fc", "Conv chain", "AveragePool", "equalization", "identity kept apart")) \
        or "BatchNormalization" in pattern


def _grouped(refusals: list[Refusal]) -> list[tuple[tuple[str, str], list[Refusal]]]:
    """Refusals with the same pattern and reason (their details aside) as one group."""
    groups: dict[tuple[str, str], list[Refusal]] = {}
    for r in refusals:
        groups.setdefault((r.pattern, r.reason), []).append(r)
    return list(groups.items())


def _op_table(before: GraphStats, after: GraphStats) -> list[str]:
    changed = sorted(op for op in set(before.ops) | set(after.ops) if before.ops.get(op, 0) != after.ops.get(op, 0))
    width = max([len(op) for op in changed] + [len("parameters")])
    lines = [f"{'':{width}}  {'before':>10}  {'after':>10}"]
    for op in changed:
        lines.append(f"{op:{width}}  {before.ops.get(op, 0):>10,}  {after.ops.get(op, 0):>10,}")
    lines.append(f"{'nodes':{width}}  {before.nodes:>10,}  {after.nodes:>10,}")
    lines.append(f"{'parameters':{width}}  {before.parameters:>10,}  {after.parameters:>10,}")
    lines.append(f"{'weights':{width}}  {_size(before.weight_bytes):>10}  {_size(after.weight_bytes):>10}")
    if before.file_bytes is not None and after.file_bytes is not None:
        lines.append(f"{'file':{width}}  {_size(before.file_bytes):>10}  {_size(after.file_bytes):>10}")
    return lines


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""
