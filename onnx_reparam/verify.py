"""Equivalence check: runs two models in onnxruntime on the same inputs and compares outputs.

ORT's own graph optimizations are disabled, so the two graphs are compared and not ORT's fusions of
them. The CUDA execution provider is used when it really loads (the session's provider list is read
back after creating it), else the CPU one; the report names the one that ran and, when CUDA was not
used, why.

The check runs on several inputs (seeded normal ones and a constant one, or the user's). The
input model is also evaluated in float64 (truth.py) on the first, and on any other where the
candidate is not within the bound of the input model, and each output of the candidate must be
about as close to that evaluation as the input model is (compare.py says how). Without it, outputs are
compared with rtol/atol by the lowest float precision computing inside the graph, never widened by
a measured difference. An output with nothing finite to compare fails the check (inconclusive); a
shape or type that differs is a failure.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import onnx

from . import compare, truth
from .errors import ReparamError, first_line, one_line
from .inputs import Shapes, make_inputs
from .model_io import inferred_value_info, tensor_bytes
from .report import OutputCheck, Verification
from .runtime import Runner, check_runtime_can_read, gpu_present, ort_module

# (rtol, atol) by float type, where there is no float64 evaluation: an element passes when
# |a - b| <= atol + rtol * (scale of its channel).
TOLERANCES: dict[int, tuple[float, float]] = {
    onnx.TensorProto.DOUBLE: (1e-9, 1e-12),
    onnx.TensorProto.FLOAT: (1e-4, 1e-6),
    onnx.TensorProto.FLOAT16: (1e-2, 1e-3),
}
LOOSEST = (5e-2, 1e-2)  # bfloat16, float8 and other low-precision floats
FLOAT_TYPES = {value for name, value in onnx.TensorProto.DataType.items()
               if name.startswith("FLOAT") or name in ("DOUBLE", "BFLOAT16")}
DEPLOY_LOAD_LIMIT = 1 << 28  # bytes of weights: larger candidates are not loaded a second time, optimized
# The float64 evaluation is given up (and the check compares with the input model, saying why) once it
# has taken more than the larger of these: seconds, or times the input model's runs in onnxruntime.
TRUTH_SECONDS, TRUTH_FACTOR = 60.0, 50.0


def lowest_precision(model: onnx.ModelProto) -> int:
    """The least precise float type the graph computes in: its initializers, Cast targets, inputs
    and outputs (a model cast to float16 inside keeps float32 at its edges)."""
    graph = model.graph
    found = {t.data_type for t in graph.initializer}
    found |= {v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for node in graph.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type in ("Cast", "CastLike"):
                found.add(a.i)
            elif a.name == "value" and node.op_type == "Constant":
                found.add(a.t.data_type)
    floats = [t for t in found if t in FLOAT_TYPES]
    return max(floats, key=lambda t: TOLERANCES.get(t, LOOSEST)) if floats else onnx.TensorProto.FLOAT


class Checker:
    """The input model's outputs (at once) and their float64 evaluation (when first needed) on
    the check's inputs, computed once; ``check`` judges a candidate by them (compare.py says
    how). Problems running the input model are bad input (ReparamError); problems running the
    candidate are a failed check. ``runs`` counts the model runs, by model."""

    def __init__(self, reference: onnx.ModelProto, *, provider: str = "auto",
                 input_shapes: Shapes | None = None,
                 inputs: dict[str, np.ndarray] | None = None, seed: int = 0,
                 rtol: float | None = None, atol: float | None = None):
        for name, value in (("rtol", rtol), ("atol", atol)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not np.isfinite(value) or value < 0):
                raise ReparamError(f"{name} must be a finite number >= 0, not {value!r}")
        check_runtime_can_read(reference)
        self.output_names = [o.name for o in reference.graph.output]
        self.chosen: list[str] = []
        self.feed_sets = make_inputs(reference, input_shapes, seed, inputs, self.chosen)
        self.runner = Runner(provider)
        self.runs = {"input model": 0, "float64": 0, "candidate": 0}
        self.precision = lowest_precision(reference)  # the float type the bounds follow
        self.decided, self.extra = compare.decision_inputs(reference, lambda: tensor_types(reference), FLOAT_TYPES)
        self.expected = self._run_reference(reference)
        # onnxruntime's optimizers have defects a rewrite can run into (onnxruntime 1.31's layout
        # level drops a graph output that is a depthwise conv of 6 channels summed with another):
        # a candidate must load with the default optimizations a user's session has, where the
        # input model does (and is small enough for a second, optimized session).
        unloaded: str | None = None
        if sum(map(tensor_bytes, reference.graph.initializer)) > DEPLOY_LOAD_LIMIT:
            unloaded = f"weights over {DEPLOY_LOAD_LIMIT >> 20} MiB"
        else:
            problem = self._load_problem(reference)
            unloaded = problem and f"the input model does not load with them either ({problem})"
        self.deployable = not unloaded
        if unloaded:
            self.chosen.append(f"the rewritten model is not loaded with onnxruntime's default optimizations: {unloaded}")
        given = rtol is not None or atol is not None
        default_rtol, default_atol = TOLERANCES.get(self.precision, LOOSEST)
        self.bound = (default_rtol if rtol is None else rtol, default_atol if atol is None else atol)
        # per input set, the float64 values (None: a set not evaluated, see _settle); None: no evaluation
        self.truth: list[list[np.ndarray | None] | None] | None = None
        self.truth_seconds = 0.0
        self.untrue: dict[int, str] = {}  # input sets refused a float64 evaluation of their own, and why
        self.evaluated: onnx.ModelProto | None = None  # the input model once evaluated: for later runs
        self.rounding_tried = False  # the rounded-weights run is made once, when first needed
        self.rounded: list[np.ndarray | None] | None = None
        self.truth_note = ""
        self.unheld: list[str] = []  # float outputs without a float64 value although there is an evaluation
        self.baselines: list[compare.Baseline | None] = []  # by evaluate(), one per output
        self._pending: onnx.ModelProto | None = None if given else reference  # evaluated by evaluate()
        if given:
            self.truth_note = "no float64 evaluation: rtol/atol were given"
        self.notes = self.runner.notes + self.chosen

    def evaluate(self) -> Checker:
        """Makes the float64 evaluation and the input model's distances from it, once: when the
        first candidate is checked (a run that rewrites nothing needs neither)."""
        if not self.baselines:
            reference, self._pending = self._pending, None
            if reference is not None:
                self._evaluate_truth(reference)
            self.baselines = self._baselines()
        return self

    def _load_problem(self, model: onnx.ModelProto) -> str | None:
        """Why onnxruntime with its default optimizations does not load the model, or None."""
        try:
            self.runner.session(model, optimized=True)
        except Exception as exc:  # noqa: BLE001 - the answer asked for
            return first_line(exc)
        return None

    def _run_reference(self, reference: onnx.ModelProto) -> list[list[np.ndarray]]:
        try:
            start = time.perf_counter()
            with _extra_outputs(reference, self.extra):
                outputs = self.runner.run(reference, self.feed_sets)
            self.reference_seconds = time.perf_counter() - start
            self.runs["input model"] += len(self.feed_sets)
            return outputs
        except ReparamError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            problem = one_line(exc)
        if self.runner.provider.startswith("CUDA"):
            self.runner.cuda_cannot_run(problem)
            return self._run_reference(reference)
        raise ReparamError(f"onnxruntime cannot run the input model: {problem}")

    def _evaluate_truth(self, reference: onnx.ModelProto) -> None:
        """The float64 evaluation on the first input set; the others are evaluated by _settle,
        where a candidate needs it."""
        start = time.perf_counter()
        try:
            first = truth.Evaluation(reference, self.output_names + self.extra).run(self.feed_sets[0])
        except truth.NoTruth as exc:
            self.truth_note = f"no float64 evaluation of the input model: {exc}"
            return
        self.truth = [first] + [None] * (len(self.feed_sets) - 1)
        self.truth_seconds = time.perf_counter() - start
        self.runs["float64"] += 1
        which = f" on input set 1 of {len(self.feed_sets)}" if len(self.feed_sets) > 1 else ""
        self.truth_note = (f"float64 evaluation of the input model (onnx reference evaluator){which}: "
                           f"{self.truth_seconds:.2f}s")
        self.evaluated = reference
        if compare.ROUNDOFF.get(self.precision, compare.LOOSEST_ROUNDOFF) >= compare.ROUNDOFF[onnx.TensorProto.FLOAT16]:
            self._evaluate_rounded()  # float16: every fused weight's rounding shows

    def _evaluate_rounded(self) -> bool:
        """The float64 evaluation on the first input set with every weight moved as by one
        rounding to the graph's float type (compare.py says why); False when it was made before
        or cannot be made."""
        if self.evaluated is None or self.rounding_tried:
            return False
        self.rounding_tried = True
        start = time.perf_counter()
        roundoff = compare.ROUNDOFF.get(self.precision, compare.LOOSEST_ROUNDOFF)
        precision = onnx.TensorProto.DataType.Name(self.precision).lower()
        try:
            self.rounded = truth.evaluate(self.evaluated, self.feed_sets[:1], self.output_names + self.extra,
                                          jitter=roundoff)[0]
        except truth.NoTruth as exc:
            self.truth_note += f"; no run with its weights rounded as to {precision}: {exc}"
            return False
        self.runs["float64"] += 1
        self.truth_note += (f"; once more with its weights rounded as to {precision}: "
                            f"{time.perf_counter() - start:.2f}s")
        return True

    def _settle(self, sets: list[int], why: str) -> None:
        """Evaluates the input sets in float64 (``why``, for the truth note), while the evaluation's
        time stays within its budget; a set refused one is held to rtol/atol against the input
        model, and the truth note says why."""
        budget = max(TRUTH_SECONDS, TRUTH_FACTOR * self.reference_seconds)
        assert self.truth is not None and self.evaluated is not None  # called only after a first evaluation
        evaluation: truth.Evaluation | None = None  # made once for the sets evaluated here
        for i in sets:
            start = time.perf_counter()
            if self.truth_seconds > budget:
                self.untrue[i] = f"the float64 evaluation took {self.truth_seconds:.1f}s, over its budget of {budget:.1f}s"
            else:
                try:
                    evaluation = evaluation or truth.Evaluation(self.evaluated, self.output_names + self.extra)
                    self.truth[i] = evaluation.run(self.feed_sets[i])
                except truth.NoTruth as exc:
                    self.untrue[i] = str(exc)
            self.truth_seconds += time.perf_counter() - start
            if i in self.untrue:
                rtol, atol = self.bound
                self.truth_note += (f"; input set {i + 1} held to rtol {rtol:g}, atol {atol:g} against the input "
                                    f"model, without a float64 evaluation of its own: {self.untrue[i]}")
            else:
                self.runs["float64"] += 1
                self.truth_note += f"; on input set {i + 1} too ({why}): {time.perf_counter() - start:.2f}s"
        self.baselines = self._baselines()

    def _baselines(self) -> list[compare.Baseline | None]:
        """Per output (and added decision input), the input model's distance from truth; None
        where it is not a float output with a float64 value. The float outputs that get none
        although there is a float64 evaluation are named in the truth note."""
        roundoff = compare.ROUNDOFF.get(self.precision, compare.LOOSEST_ROUNDOFF)
        bases: list[compare.Baseline | None] = []
        unheld: list[str] = []
        for i, name in enumerate(self.output_names + self.extra):
            references = [outputs[i] for outputs in self.expected]
            if self.truth is None or name in self.decided or not compare.is_float(np.asarray(references[0]).dtype):
                bases.append(None)
                continue
            truths = [values[i] if values is not None else None for values in self.truth]
            rounded = self.rounded[i] if self.rounded is not None else None
            held = all(values is None or values[i] is not None for values in self.truth)
            base = compare.baseline(truths, references, roundoff, rounded) if held else None
            if base is None:
                unheld.append(name)
            bases.append(base)
        self.unheld = unheld
        return bases

    def _about(self, truth_note: str) -> dict:
        """What every verification says besides its verdict."""
        return {"notes": list(self.notes), "cuda": self.runner.cuda, "gpu": gpu_present(), "truth": truth_note}

    def _describe(self) -> str:
        if any(b is not None for b in self.baselines):
            return (f"each output held to a float64 evaluation of the input model: at most {compare.FACTOR}x "
                    "the input model's own distance from it, per channel of a feature map; on an input set "
                    "without one, held to the input model within that bound")
        rtol, atol = self.bound
        name = onnx.TensorProto.DataType.Name(self.precision).lower()
        if self.truth_note.endswith("rtol/atol were given"):
            return f"rtol {rtol:g}, atol {atol:g} (given, or by the {name} type where not), against the input model"
        return f"rtol {rtol:g}, atol {atol:g} for {name} arithmetic, against the input model"

    def check(self, candidate: onnx.ModelProto, sets: list[int] | None = None,
              name: str = "the rewritten model") -> Verification:
        """Runs the candidate (called ``name`` in messages) on the check's inputs (the sets
        numbered in ``sets``, or all) and judges each output."""
        self.evaluate()
        names = [o.name for o in candidate.graph.output]
        truth_note = self.truth_note + (f"; compared with the input model, without a float64 value of their "
                                        f"own (a type or shape the widening does not reach): {', '.join(self.unheld)}"
                                        if self.unheld else "")
        if names != self.output_names:
            return Verification(self.runner.provider, [], error=f"the outputs differ: {self.output_names} vs {names}",
                                **self._about(truth_note))
        chosen = list(range(len(self.feed_sets))) if sets is None else sets
        produced = _tensor_names(candidate)
        missing = [name for name in self.extra if name not in produced]  # a rewrite took it away
        extra = [] if missing else self.extra
        try:
            with _extra_outputs(candidate, extra):
                session = self.runner.session(candidate)
            judges = [_Judge(self, i, name, not missing) for i, name in enumerate(self.output_names + extra)]
            for i in chosen:  # one set's outputs at a time: they may be as large as a weight
                outputs = session.run(None, self.feed_sets[i])
                self.runs["candidate"] += 1
                for judge, actual in zip(judges, outputs):
                    judge.add(i, actual)
                del outputs
        except Exception as exc:  # noqa: BLE001 - the rewritten model is ours: a failed check
            return Verification(self.runner.provider, [], error=f"onnxruntime cannot run {name}: "
                                f"{one_line(exc)}", **self._about(truth_note))
        problem = self._load_problem(candidate) if self.deployable else None
        if problem:
            return Verification(self.runner.provider, [], error=f"onnxruntime with its default optimizations cannot "
                                f"load {name} (a defect of its optimizer the rewrite runs into): {problem}",
                                **self._about(truth_note))
        judged = [judge.verdict() for judge in judges]
        checks = [check for check, _ in judged]
        failing = sorted({i for _, sets_failed in judged for i in sets_failed})
        if missing and self.decided:
            truth_note += (f"; {', '.join(sorted(self.decided))} held to the input model: the rewrite removed "
                                f"'{missing[0]}', a float tensor their decisions read")
        judged_by_truth = [i for i in failing if self.truth is not None and self.truth[i] is not None]
        if self.truth is not None:
            # truth decides: on a set beyond the bound from the input model; on every set once a
            # candidate fails by it (the input model's distance is the largest over all the sets)
            pending = [i for i, values in enumerate(self.truth) if values is None and i not in self.untrue]
            beyond = sorted({i for judge in judges for i in judge.unsettled})
            if judged_by_truth and pending:
                self._settle(pending, "a candidate failed by float64: the bound is the input model's distance over every set")
                return self.check(candidate, sets, name)
            if beyond and not failing:
                self._settle(beyond, "a candidate beyond the bound from the input model there")
                return self.check(candidate, sets, name)
        if judged_by_truth and self._evaluate_rounded():  # is the failure the fused weights' rounding?
            self.baselines = self._baselines()
            return self.check(candidate, sets, name)
        return Verification(self.runner.provider, checks, inputs=len(chosen), bound=self._describe(),
                            device=f"{self.runner.device}; onnxruntime {ort_module().__version__}",
                            failing_sets=failing, **self._about(truth_note))


class _Judge:
    """One output's verdict, built one input set at a time."""

    def __init__(self, checker: Checker, index: int, name: str, decisions_checked: bool):
        role = "decision input" if index >= len(checker.output_names) else \
            "decided" if decisions_checked and name in checker.decided else "output"
        self.checker, self.index = checker, index
        self.check = OutputCheck(name, 0.0, 0.0, 0.0, True, role=role)
        self.base = checker.baselines[index]
        self.ours: np.ndarray | None = None
        self.failing: list[int] = []
        self.unsettled: list[int] = []  # sets without truth where the candidate is beyond the bound from the input model

    def add(self, i: int, actual: np.ndarray) -> None:
        check, base, checker = self.check, self.base, self.checker
        expected = checker.expected[i][self.index]
        check.integer = not compare.is_float(np.asarray(expected).dtype)
        fine, differ = check.passed, check.differ
        held = base is not None and i not in checker.untrue
        compare.against_reference(check, expected, actual, None if held or check.role == "decided" else checker.bound)
        values = checker.truth[i] if checker.truth is not None else None
        truth = values[self.index] if values is not None else None  # held: not None on a set evaluated
        if held and np.shape(actual) == np.shape(expected) and check.note is None:
            assert base is not None
            if truth is not None:
                distance = compare.against_truth(base, i, truth, actual)
                self.ours = distance if self.ours is None else np.maximum(self.ours, distance)
                fine = fine and not np.any(distance > base.bounds())
            elif np.any(compare.against_truth(base, i, expected, actual) > base.bounds()):
                self.unsettled.append(i)
        if fine != check.passed or differ != check.differ or not fine:
            self.failing.append(i)

    def verdict(self) -> tuple[OutputCheck, list[int]]:
        """The output's verdict over the sets added, and the sets on which it failed."""
        check = self.check
        if check.role == "decided":
            check.passed, check.note = True, "not held to the input model; the floats it is computed from are"
            return check, []
        if self.ours is not None and self.base is not None:
            compare.verdict_from_truth(check, self.base, self.ours)
        compare.finish(check)
        return check, self.failing if not check.passed else []


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the model's tensors by name: declared, else inferred."""
    graph = model.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info) + inferred_value_info(model)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer}


@contextlib.contextmanager
def _extra_outputs(model: onnx.ModelProto, names: list[str]):
    """The model with ``names`` as extra graph outputs for the while (a check's own additions:
    the caller's model is as it was afterwards)."""
    count = len(model.graph.output)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        yield model
    finally:
        del model.graph.output[count:]
