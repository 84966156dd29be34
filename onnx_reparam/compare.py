"""How a candidate's outputs are judged: against a float64 evaluation of the input model (truth),
or, where there is none, against the input model's own outputs.

Values are grouped where they share one scale: the channels of a feature map (axis 1 of an output
with three or more dims), the whole output otherwise (logits, boxes, vectors), so a logit near zero
is held to the scale of the logits, and a small-valued channel beside a large one to its own.

With truth, a model's distance in a group is max |model - truth| / s, s the group's largest
|truth| over the input sets (at least DEAD times the output's, so an all-zero channel is held to
the output's scale).
The candidate passes when, in every group, its distance is at most FACTOR times the largest of:
the input model's distance there; its median over groups (a group where the input model happens to
land on the truth is not held to zero); the distance of the float64 evaluation run with every weight
moved as by one rounding to the least precise float type computing in the graph (a rewrite must
write its fused weights in that type: where a channel's output is small beside its terms, as after
a BN whose mean cancels the conv's output, that rounding is a larger error than the input model's
own; in float16 onnxruntime's CPU computes the input model's layers in float32, so it always is);
ROUNDOFF_LEVEL units of that roundoff. The rounded-weights run is made up front for float16
graphs, and for others only once a candidate fails without it. So a rewrite passes when it is
about as exact as the model the user exported, and a channel the rewrite got wrong fails even
where the input model is noisy.

The float64 evaluation is made on the first input set. On the others the candidate is first held
to the input model within the same bound; only a set where it is beyond gets its own float64
evaluation and is judged by it (a failure always rests on truth, and an exact rewrite costs one
float64 run: about 3x faster than evaluating every set).

Without truth (see truth.py for why it can be missing), each value must be within atol + rtol x
its group's largest |reference|; the bound is never widened by a measured difference (onnxruntime's
own optimized run performs the very folds under test).

Discrete outputs, those computed through a decision on floats (ArgMax, TopK's indices,
NonMaxSuppression, NonZero, rounding, a Cast to integers, also of a comparison's mask), change under
any rounding difference; they are not held to the reference. The float tensors those decisions
read are checked in their place (added as outputs of both models for the check), and the discrete
outputs' agreement is reported.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .report import NOTHING_COMPARED, OutputCheck

FACTOR = 4  # a candidate may be this many times further from truth than the input model
# The input model's distance is taken as at least this many units of roundoff: a candidate's
# weights are rounded once more than the input model's (whose weights define the truth), which
# moves a sum of K products by up to K/2 units of its terms' size; on a small layer (3x3 over 4
# channels) an exact merge lands 6 to 7 units from the truth where the input model lands 1.5.
ROUNDOFF_LEVEL = 4
DEAD = 2.0 ** -20  # a group's scale is at least this fraction of its output's largest magnitude
PIECE = 1 << 22  # values of an output compared at a time
ROUNDOFF: dict[int, float] = {onnx.TensorProto.DOUBLE: 2.0 ** -52, onnx.TensorProto.FLOAT: 2.0 ** -23,
            onnx.TensorProto.FLOAT16: 2.0 ** -10, onnx.TensorProto.BFLOAT16: 2.0 ** -7}
LOOSEST_ROUNDOFF = 2.0 ** -3  # float8 and the like


def is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.kind == "V"  # ml_dtypes' bfloat16 and float8 are 'V'


def grouped(shape: tuple[int, ...]) -> bool:
    """Whether an output of this shape is compared per channel (axis 1)."""
    return len(shape) >= 3 and 0 not in shape


def _pieces(arrays: list[np.ndarray]):
    """Matching pieces of same-shaped arrays, at most PIECE values each: whole channels where the
    output is grouped, runs of the flattened output where not."""
    shape = arrays[0].shape
    if grouped(shape):
        step = max(1, PIECE // (arrays[0].size // shape[1]))
        for c in range(0, shape[1], step):
            yield [a[:, c:c + step] for a in arrays]
    else:
        flat = [a.reshape(-1) for a in arrays]
        for i in range(0, max(flat[0].size, 1), PIECE):
            yield [a[i:i + PIECE] for a in flat]


def _group_max(values: np.ndarray, is_grouped: bool) -> np.ndarray:
    if is_grouped:
        return values.max(axis=tuple(i for i in range(values.ndim) if i != 1), initial=0.0)
    return np.array([values.max(initial=0.0)])


def _wide(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.float64, copy=False)


def _per_group(arrays: list[np.ndarray], piece_max) -> np.ndarray:
    """Per group, the max of ``piece_max`` over the pieces of ``arrays``."""
    is_grouped = grouped(arrays[0].shape)
    parts = [_group_max(piece_max(*piece), is_grouped) for piece in _pieces(arrays)]
    if is_grouped:
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.max(parts, axis=0) if parts else np.zeros(1)


def _magnitude(t: np.ndarray) -> np.ndarray:
    m = np.abs(_wide(t))
    m[~np.isfinite(m)] = 0
    return m


def _distance(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """|a - t| where both are finite, else 0."""
    a, t = _wide(a), _wide(t)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(a - t)
    d[~(np.isfinite(a) & np.isfinite(t))] = 0
    return d


@dataclass
class Baseline:
    """What a candidate's output is held to: the truth's scale per group on each input set, per
    group the input model's distance from truth (largest over the sets) and the distance of the
    weights' rounding (see the module's doc)."""
    scales: list[np.ndarray]
    theirs: np.ndarray
    roundoff: float
    rounding: np.ndarray | None = None

    def bounds(self) -> np.ndarray:
        level = np.maximum(self.theirs, _median(self.theirs))
        if self.rounding is not None and self.rounding.shape == level.shape:
            level = np.maximum(level, np.maximum(self.rounding, _median(self.rounding)))
        return FACTOR * np.maximum(level, ROUNDOFF_LEVEL * self.roundoff)


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if values.size else 0.0


def baseline(truths: list[np.ndarray | None], references: list[np.ndarray], roundoff: float,
             rounded: np.ndarray | None = None) -> Baseline | None:
    """The input model's distance from truth on one output over the input sets that have one
    (None: a set not evaluated in float64, whose |reference| stands in for its scale), and that
    of ``rounded`` (the evaluation with rounded weights, on the first set); None when the shapes
    disagree (the input model is the reference either way). A group's scale is its largest
    |truth| over all the sets: on a degenerate input (the constant set) a channel may be a single
    small value left by cancellation, whose error is that of the terms cancelled, not its own."""
    if any(t is not None and t.shape != np.shape(r) for t, r in zip(truths, references)):
        return None
    largest = [_per_group([np.asarray(r) if t is None else t], _magnitude) for t, r in zip(truths, references)]
    if len({g.shape for g in largest}) == 1:  # the same groups in every set
        largest = [np.max(largest, axis=0)] * len(largest)
    scales = [np.maximum(g, max(float(g.max(initial=0.0)) * DEAD, np.finfo(np.float64).tiny)) for g in largest]
    theirs = None
    for t, r, scale in zip(truths, references, scales):
        if t is None:
            continue
        distance = _per_group([np.asarray(r), t], _distance) / scale
        theirs = distance if theirs is None or theirs.shape != distance.shape else np.maximum(theirs, distance)
    rounding = None
    if rounded is not None and truths[0] is not None and rounded.shape == truths[0].shape:
        rounding = _per_group([rounded, truths[0]], _distance) / scales[0]
    return Baseline(scales, theirs if theirs is not None else np.zeros(0), roundoff, rounding)


def against_truth(base: Baseline, set_index: int, truth: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """The candidate's distance from truth (or, on a set without one, from the input model) per
    group on one input set, relative to the group's scale (the caller takes the largest over the
    sets)."""
    return _per_group([np.asarray(actual), truth], _distance) / base.scales[set_index]


def verdict_from_truth(check: OutputCheck, base: Baseline, ours: np.ndarray) -> None:
    """Sets the check's distances and verdict from the candidate's per-group distances."""
    bounds = base.bounds()
    check.ours, check.theirs = float(ours.max(initial=0.0)), float(base.theirs.max(initial=0.0))
    worst = int(np.argmax(ours / bounds)) if ours.size else 0
    check.tolerance = float(bounds[worst]) if bounds.size else 0.0
    beyond = np.flatnonzero(ours > bounds)
    if beyond.size and check.note is None:
        check.passed = False
        g = int(beyond[np.argmax((ours / bounds)[beyond])])
        where = f"channel {g}" if ours.size > 1 else "the output"
        check.note = (f"{where}: ours {ours[g]:.2g} from float64, the input model {base.theirs[g]:.2g} there "
                      f"(bound {bounds[g]:.2g})" + (f"; {beyond.size} of {ours.size} channels beyond" if ours.size > 1
                                                     else ""))


def against_reference(check: OutputCheck, expected: np.ndarray, actual: np.ndarray,
                      bound: tuple[float, float] | None) -> None:
    """Adds one input set's output to ``check``: errors relative to the input model's output,
    inf/NaN agreement, equality of integers; with ``bound`` (rtol, atol), whether each value is
    within atol + rtol x its group's largest |expected| (the check without truth)."""
    e, a = np.asarray(expected), np.asarray(actual)
    if e.shape != a.shape:
        check.passed, check.note = False, f"shape {list(a.shape)}, expected {list(e.shape)}"
        return
    if e.dtype != a.dtype:
        check.passed, check.note = False, f"type {a.dtype}, expected {e.dtype}"
        return
    if not is_float(e.dtype):
        differ = int(np.count_nonzero(e != a))
        check.compared += e.size
        check.differ += differ
        if differ:
            check.max_abs_error = max(check.max_abs_error, float(np.max(np.abs(_wide(e) - _wide(a)))))
        return
    scales = _per_group([e], _magnitude)  # per group: the bound's scale without truth
    largest = float(scales.max(initial=0.0))
    worst, beyond, first = 0.0, 0, 0
    for pe, pa in _pieces([e, a]):
        finite = np.isfinite(pe)
        if not (np.array_equal(finite, np.isfinite(pa)) and np.array_equal(pe[~finite], pa[~finite], equal_nan=True)):
            check.passed, check.note = False, "inf/NaN values differ"
        check.compared += int(finite.sum())
        error = _distance(pa, pe)
        worst = max(worst, float(error.max(initial=0.0)))
        if bound is not None:
            rtol, atol = bound
            scale: np.ndarray | float
            if grouped(e.shape):  # this piece's channels
                scale = scales[first:first + pe.shape[1]].reshape((1, -1) + (1,) * (e.ndim - 2))
                first += pe.shape[1]
            else:
                scale = largest
            beyond += int(np.count_nonzero(error > atol + rtol * scale))
            check.tolerance = max(check.tolerance, atol + rtol * largest)
    check.max_abs_error = max(check.max_abs_error, worst)
    if largest > 0:
        check.max_rel_error = max(check.max_rel_error, worst / largest)
    elif worst > 0:
        check.max_rel_error = float("inf")
    if beyond and check.note is None:
        check.passed, check.note = False, f"{beyond} of {e.size} values beyond their channel's bound"


def finish(check: OutputCheck) -> None:
    """The verdict's last words: integers that differ, an output with nothing compared."""
    if check.role == "decided":
        return
    if check.differ and check.note is None:
        check.passed, check.note = False, f"{check.differ} of {check.compared} values differ"
    if check.compared == 0 and check.passed:
        check.passed, check.note = False, NOTHING_COMPARED


# --- discrete outputs ---

# Ops whose outputs jump under any rounding difference of their float inputs: integer picks, and
# rounding. (TopK's values are continuous: only its indices are a decision.)
DECISIONS = {"ArgMax", "ArgMin", "TopK", "NonMaxSuppression", "NonZero", "Unique", "Hardmax", "Round", "Floor",
             "Ceil", "Sign", "Cast"}
# Comparisons and their logic give masks: a Where choosing by one is taken to be continuous (a
# LeakyReLU spelled as Where(x > 0, x, a * x)); a decision reading one reads the floats compared.
MASKS = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "IsInf", "IsNaN", "And", "Or", "Xor", "Not"}
MAX_DECISION_INPUTS = 32  # float tensors added as outputs for the check


def decision_inputs(model: onnx.ModelProto, tensor_types: Callable[[], dict[str, int]],
                    float_types: set[int]) -> tuple[set[str], list[str]]:
    """(graph outputs computed through a decision on float data, the float tensors those decisions
    read, themselves not decided). ``tensor_types`` gives the element types of tensors by name
    (inferred; asked only when the graph has a decision op). Tensors computed from constants and
    shapes alone are not data; a Cast is a decision only from a float (or a mask of floats) to a
    non-float type."""
    graph = model.graph
    if not any(node.op_type in DECISIONS for node in graph.node):
        return set(), []
    types = tensor_types()
    initializers = {t.name for t in graph.initializer}
    data = {i.name for i in graph.input if i.name not in initializers}
    decided: set[str] = set()
    masks: dict[str, list[str]] = {}  # a mask of float data: the floats it compares
    floats = {name for name, t in types.items() if t in float_types}
    feeders: list[str] = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if not any(i in data for i in inputs) or node.op_type in ("Shape", "Size"):
            continue
        data.update(node.output)
        if any(i in decided for i in inputs):
            decided.update(node.output)
            continue
        read = [i for i in inputs if i in data and i in floats]
        read += [f for i in inputs for f in masks.get(i, []) if f not in read]
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type in MASKS and read:
            masks.update(dict.fromkeys(node.output, read))
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if standard and node.op_type in DECISIONS and read and (node.op_type != "Cast" or to not in float_types):
            decided.update(node.output[1:2] if node.op_type == "TopK" else node.output)
            feeders += [i for i in read if i not in feeders]
    outputs = {o.name for o in graph.output if o.name in decided}
    names = {o.name for o in graph.output}
    return outputs, [f for f in feeders if f not in names][:MAX_DECISION_INPUTS] if outputs else []
