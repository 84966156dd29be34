"""The library's entry points: optimize a model, inspect it, verify two models.

When the rewritten model fails the check, the rewrites are bisected: the pipeline is re-run
allowing only the first k rewrites (in the order they were applied) to find the first one whose
model fails; it is dropped, named in the report with its error, and the pipeline runs again
without it, until the model verifies. Every other rewrite is kept.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from . import int8
from .bench import BenchResult
from .bench import bench as latency_ab
from .calibration import ImagePreprocessing, load_calibration
from .errors import Refused, ReparamError, option
from .graph import Graph
from .inputs import graph_inputs, input_sizes, same_inputs, takes_feeds
from .int8 import QuantizeCheck
from .model_io import files_size, load_model, load_weights
from .passes import Pass, Policy
from .pipeline import run_passes, select_passes
from .report import GraphStats, PassReport, Refusal, Report, Rewrite, Verification
from .verify import Checker

ISOLATION_BUDGET = 10  # checks' worth of runs of rewritten models spent finding failing rewrites


class VerificationError(ReparamError):
    """The rewritten model's outputs differ from the original's (or, with ``strict``, a rewrite had
    to be dropped). Carries the model and the report for inspection."""

    def __init__(self, model: onnx.ModelProto, report: Report, message: str | None = None):
        check = report.verification.summary().replace("\n", ";") if report.verification else "not checked"
        super().__init__(message or f"verification failed: {check}")
        self.model, self.report = model, report


def optimize(model, *, only: str | Sequence[str] = (), skip: str | Sequence[str] = (), verify: bool = True,
             provider: str = "auto", input_shapes: dict[str, Sequence[int]] | None = None,
             inputs: dict[str, np.ndarray] | None = None, seed: int = 0, rtol: float | None = None,
             atol: float | None = None, strict: bool = False, weights_as_constants: bool = False,
             lazy_weights: bool = False, static_shape: bool = False, int8_ready: bool = False,
             keep_identity: bool = False,
             progress: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, Report]:
    """Rewrites a training-structure model into its deploy structure and, unless ``verify`` is
    False, checks in onnxruntime that the outputs are unchanged. A rewrite that fails the check is
    dropped and named in ``report.dropped``; the model returned has the others, verified. Raises
    VerificationError (holding model and report) when no verified model can be made, or when
    ``strict`` and a rewrite was dropped. The input is never modified.

    ``model``: a path, an onnx.ModelProto, or what ``torch.onnx.export(..., dynamo=True)``
    returns (its ONNXProgram, or the onnx_ir model it holds). Weights that are also graph inputs
    can be overridden at run time, so nothing reading them is folded; ``weights_as_constants``
    treats them as constants and drops them from the inputs. ``static_shape`` fixes the inputs'
    symbolic dims (to ``input_shapes``, a batch axis to 1 otherwise) in the model returned, for
    rewrites that hold for one size only (the report names those it refused). ``int8_ready``
    then equalizes the layers' weights across channels (the equalize pass) so that the model
    quantizes to INT8 as well as its training structure; the function stays the same, checked
    like every rewrite; ``keep_identity`` first takes out of each conv the centre taps an
    identity branch put there, as a per-channel Mul beside it (split_identity). ``progress`` is
    called with a short line at each stage (load, each pass of each sweep, verify, isolate).

    ``lazy_weights`` (for a model read from a file): the weights the rewrite leaves as they are stay
    in the input's files, and the model returned refers to them by absolute path; memory then holds
    the model without its weights plus the folded ones. Such a model is valid while those files are
    unchanged; ``onnx_reparam.save_model`` copies the weights into the output."""
    step = progress or (lambda message: None)
    _check_arguments(verify=verify, strict=strict, weights_as_constants=weights_as_constants,
                     lazy_weights=lazy_weights, static_shape=static_shape, int8_ready=int8_ready,
                     keep_identity=keep_identity, provider=provider, input_shapes=input_shapes, inputs=inputs)
    passes = select_passes(only, skip, int8_ready, keep_identity)
    report = Report()
    source = _as_model_source(model)
    said: set[str] = set()  # notes on the input, made at its first load

    def note_once(key: str, note: str) -> None:
        if key not in said:
            said.add(key)
            report.notes.append(note)

    def load(fixed: bool = static_shape) -> onnx.ModelProto:
        """A fresh model of our own: the rewrite turns the one it is given into its result."""
        loaded = load_model(source, report.input_files, lazy=True)
        if fixed:
            fixed_inputs = fix_input_sizes(loaded, input_shapes)
            if fixed_inputs:
                note_once("fixed", f"inputs fixed to static sizes by {option('static_shape=True')}: {fixed_inputs}")
        overridable = weights_as_inputs(loaded)
        if overridable and weights_as_constants:
            _drop_inputs(loaded, overridable)
        elif overridable:
            note_once("overridable", f"{len(overridable)} weights are also graph inputs (a caller may override "
                      f"them), so nothing reading them is folded; {option('weights_as_constants=True')} treats "
                      "them as constants")
        return loaded

    start = time.perf_counter()
    step("loading")
    original = load()
    report.seconds["load"] = time.perf_counter() - start
    report.before = GraphStats.of(original)
    if isinstance(source, (str, os.PathLike)):
        report.before.file_bytes = files_size(Path(source), report.input_files)

    def reference_run() -> Checker:
        start = time.perf_counter()
        step("running the input model for the check")
        checker = Checker(load(fixed=False), provider=provider, input_shapes=input_shapes, inputs=inputs, seed=seed,
                          rtol=rtol, atol=atol)
        report.seconds["verify"] = report.seconds.get("verify", 0.0) + time.perf_counter() - start
        return checker

    # The input model runs before any rewrite: one onnxruntime cannot run is bad input (exit 2)
    # whether or not anything is rewritten, and a big model's session memory is freed before
    # the rewritten weights exist.
    checker = reference_run() if verify else None

    start = time.perf_counter()
    optimized, report.passes, applied = _rewrite(original, passes, progress=progress, notes=report.notes)
    del original  # it became `optimized`
    report.seconds["rewrite"] = time.perf_counter() - start

    report.unverified = bool(applied) and checker is None
    if checker is not None and applied:
        start = time.perf_counter()
        step(f"verifying ({len(optimized.graph.node)} nodes against {report.before.nodes})")
        report.verification = checker.check(optimized)
        report.seconds["verify"] += time.perf_counter() - start
        if not report.verification.passed and not report.verification.inconclusive:
            start = time.perf_counter()
            step("a rewrite did not verify: isolating it")
            optimized, report.passes, report.verification, report.dropped, isolation = _drop_failing(
                load, passes, checker, optimized, report.passes, applied, report.verification)
            report.notes.append(isolation)
            report.seconds["isolate"] = time.perf_counter() - start
    report.after = GraphStats.of(optimized)
    if not lazy_weights:
        load_weights(optimized)
    report.peak_memory = peak_memory()
    if report.verification is not None and not report.verification.passed:
        raise VerificationError(optimized, report)
    if strict and report.dropped:
        raise VerificationError(optimized, report, f"{len(report.dropped)} rewrite(s) did not verify "
                                f"(strict): {report.dropped[0].node}: {report.dropped[0].text}")
    return optimized, report


def peak_memory() -> int | None:
    """The process's peak resident memory in bytes, where the platform says. On Linux from
    VmHWM: ru_maxrss carries over the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass  # no /proc (macOS, Windows): ru_maxrss is the platform's own figure
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def fix_input_sizes(model: onnx.ModelProto, shapes: dict[str, Sequence[int]] | None) -> str:
    """Gives every symbolic dim of the graph inputs a size, as the check chooses them (from
    ``shapes``, one size per dim name, else 1 on a batch axis); a dim name used in the outputs
    takes the same size, and the inferred shapes are dropped to be inferred again. Says which
    inputs changed, and how."""
    shapes = shapes or {}
    inputs = graph_inputs(model, list(shapes))
    chosen = input_sizes(inputs, shapes)
    sizes, fixed = {}, []
    for value in inputs:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if all(d.HasField("dim_value") for d in dims):
            continue
        shape = chosen[value.name]
        for dim, size in zip(dims, shape):
            if not dim.HasField("dim_value"):
                if dim.dim_param:
                    sizes[dim.dim_param] = size
                dim.dim_value = size
        fixed.append(f"{value.name} {'x'.join(map(str, shape))}")
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    if fixed:
        del model.graph.value_info[:]
    return ", ".join(fixed)


def _check_arguments(**arguments) -> None:
    for name in ("verify", "strict", "weights_as_constants", "lazy_weights", "static_shape", "int8_ready",
                 "keep_identity"):
        if not isinstance(arguments[name], bool):
            raise ReparamError(f"{name} must be True or False, not {arguments[name]!r}")
    if arguments["provider"] not in ("auto", "cuda", "cpu"):
        raise ReparamError(f"provider must be 'auto', 'cuda' or 'cpu', not {arguments['provider']!r}")
    shapes = arguments["input_shapes"]
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(k, str) and not isinstance(v, str) and all(isinstance(d, int) and d >= 0 for d in v)
            for k, v in shapes.items())):
        raise ReparamError("input_shapes must map input names to shapes, e.g. {'x': (1, 3, 224, 224)}")
    given = arguments["inputs"]
    if given is not None and not (isinstance(given, dict) and all(isinstance(v, np.ndarray) for v in given.values())):
        raise ReparamError("inputs must map input names to numpy arrays")


def _as_model_source(model):
    """A path or ModelProto as it is; an exporter's result as its ModelProto (without importing
    torch or onnx_ir unless the caller already has)."""
    if isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        return model
    if hasattr(model, "model_proto"):  # torch.onnx.ONNXProgram
        return model.model_proto
    if type(model).__module__.startswith("onnx_ir"):
        import onnx_ir
        return onnx_ir.serde.serialize_model(model)
    raise ReparamError(f"cannot read a model from {type(model).__name__}: give a path, an onnx.ModelProto, "
                       "a torch.onnx.ONNXProgram or an onnx_ir model")


def weights_as_inputs(model: onnx.ModelProto) -> list[str]:
    """Initializers that are also graph inputs (torch's keep_initializers_as_inputs, IR < 4)."""
    weights = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in weights]


def _drop_inputs(model: onnx.ModelProto, names: list[str]) -> None:
    kept = [i for i in model.graph.input if i.name not in set(names)]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    if model.ir_version < 4:  # from IR 4 on an initializer need not be an input
        model.ir_version = 4


def _rewrite(original: onnx.ModelProto, passes: tuple[Pass, ...], policy=None, progress=None,
             notes: list[str] | None = None) -> tuple[onnx.ModelProto, list[PassReport], list[Rewrite]]:
    """Rewrites ``original`` into the result (in place, so weights are not copied); what the
    graph found wrong in its declarations goes to ``notes``."""
    graph = Graph(original)
    if graph.shape_conflicts and notes is not None:
        notes.append("declared shapes that shape inference contradicts, not trusted (the rewrite uses the "
                     f"inferred ones): {'; '.join(graph.shape_conflicts)}")
    if graph.unnamed_sizes and notes is not None:
        notes.append(f"sizes ONNX's shape inference lost are left unknown ({graph.unnamed_sizes}); a rule that "
                     "needs one refuses, saying so")
    reports, applied = run_passes(graph, passes, policy, progress)
    return (graph.to_model(original) if applied else original), reports, applied


def _drop_failing(load, passes: tuple[Pass, ...], checker: Checker, model: onnx.ModelProto,
                  reports: list[PassReport], applied: list[Rewrite], failure: Verification):
    """Finds and drops the rewrites whose model fails the check; returns the model with the rest,
    its reports and verification, the dropped rewrites, and a note on what isolating did.

    The first failing rewrite is found by bisecting the rewrites in the order they were applied
    (the pipeline re-run allowing only the first k), each step run on one input set that failed;
    it is dropped and the rest checked again on every set. A rule (pass and pattern) that fails
    twice has all its rewrites withheld: after its first culprit, a failure that goes when the
    rule's other rewrites are withheld counts as its second. Isolating stops when it has run the
    candidate ISOLATION_BUDGET checks' worth of times, and says it gave up."""
    dropped: dict[tuple, Refused] = {}
    withheld: dict[tuple[str, str], Refused] = {}
    strikes: dict[tuple[str, str], int] = {}
    budget = ISOLATION_BUDGET * len(checker.feed_sets)
    start = checker.runs["candidate"]

    isolating = Refused("left out while isolating a failure", kind="withheld")

    def policy(allowed: set[tuple] | None = None, also: tuple[str, str] | None = None) -> Policy:
        def decide(rw: Rewrite) -> Refused | None:
            rule = (rw.pass_name, rw.pattern)
            if rw.key in dropped:
                return dropped[rw.key]
            if rule in withheld or rule == also:
                return withheld.get(rule) or isolating
            return None if allowed is None or rw.key in allowed else isolating
        return decide

    def spent() -> int:
        return checker.runs["candidate"] - start

    def withhold(rule: tuple[str, str], why: str) -> None:
        strikes[rule] = strikes.get(rule, 0) + 1
        withheld[rule] = Refused(f"its rule is withheld: {strikes[rule]} of its rewrites did not verify", why,
                                 kind="withheld")

    while spent() < budget:
        keys = [rw.key for rw in applied]
        probe = failure.failing_sets[:1] or None
        passing, failing = 0, len(keys)  # allowing the first `passing` rewrites verifies
        while failing - passing > 1 and spent() < budget:
            middle = (passing + failing) // 2
            if checker.check(_rewrite(load(), passes, policy(set(keys[:middle])))[0], probe).passed:
                passing = middle
            else:
                failing = middle
        if failing - passing > 1:
            break
        culprit = applied[failing - 1]
        rule = (culprit.pass_name, culprit.pattern)
        if strikes.get(rule):
            withhold(rule, failure.worst())
        else:
            strikes[rule] = 1
            dropped[culprit.key] = Refused("its rewrite did not verify", failure.worst(), kind="unverified")
        model, reports, applied = _rewrite(load(), passes, policy())
        failure = checker.check(model)
        if failure.passed:
            break
        others = rule not in withheld and any((rw.pass_name, rw.pattern) == rule for rw in applied)
        if others and spent() < budget:
            trial = _rewrite(load(), passes, policy(also=rule))[0]
            if checker.check(trial, failure.failing_sets[:1] or None).passed:
                withhold(rule, failure.worst())
                model, reports, applied = _rewrite(load(), passes, policy())
                failure = checker.check(model)
                if failure.passed:
                    break
    records = [Refusal.of(", ".join(key[2]), why, f"{key[0]}: {key[1]}") for key, why in dropped.items()]
    records += [Refusal.of(f"every {rule[1]} rewrite", why, f"{rule[0]}: {rule[1]}") for rule, why in withheld.items()]
    what = f"{len(dropped)} rewrite(s) dropped" + (f", {len(withheld)} rule(s) withheld" if withheld else "")
    runs = f"{spent()} runs of the rewritten model"
    if failure.passed:
        note = f"isolating the failure: {what}, in {runs}"
    else:
        note = (f"gave up isolating the failure after {runs} (budget: {ISOLATION_BUDGET} checks' worth); "
                f"{what}, and the model still fails")
    return model, reports, failure, records, note


# What optimize_for_int8 chooses among: a label, and the INT8 options of each.
INT8_CANDIDATES = (("fused", False, False), ("--int8-ready", True, False),
                   ("--int8-ready --keep-identity", True, True))  # label, int8_ready, keep_identity
INT8_TARGETS = {"qdq": "onnxruntime QDQ per tensor (MinMax, the last Gemm/MatMul in float)",
                "weights": "weight-only INT8 per tensor"}


def optimize_for_int8(model, calibration, *, target: str = "qdq", images: ImagePreprocessing | None = None,
                      progress: Callable[[str], None] | None = None,
                      **options) -> tuple[onnx.ModelProto, Report]:
    """``optimize`` for INT8, choosing by measurement: the model fused, with ``int8_ready``, and
    with ``int8_ready`` and ``keep_identity`` (each verified as ``optimize`` verifies), each
    quantized as ``target`` says ("qdq": onnxruntime's quantize_static per tensor; "weights":
    weight-only per tensor) with the first half of ``calibration`` (an .npz or image folder path,
    or a list of feed sets) and measured on the second half (the SQNR of its float outputs
    against its own FP32 ones); the best is returned, its report saying what each got
    (``report.int8``) and which was written (``report.int8_choice``). ``options`` go to optimize."""
    if target not in INT8_TARGETS:
        raise ReparamError(f"target must be one of {', '.join(INT8_TARGETS)}, not {target!r}")
    for name in ("int8_ready", "keep_identity"):
        if name in options:
            raise ReparamError(f"{name} is chosen by measurement here; give calibration data only")
    step = progress or (lambda message: None)
    loaded = load_model(_as_model_source(model))
    samples = calibration if isinstance(calibration, list) else load_calibration(calibration, loaded, images)
    if len(samples) < 2:
        raise ReparamError("calibration data needs at least 2 samples: half calibrate, half evaluate")
    half = len(samples) // 2
    results: dict[str, tuple[onnx.ModelProto, Report]] = {}
    measured: dict[str, float] = {}
    problems = []
    start = time.perf_counter()
    for label, ready, keep in INT8_CANDIDATES:
        step(f"INT8 candidate {label}: rewriting")
        try:
            results[label] = optimize(loaded, progress=progress, int8_ready=ready, keep_identity=keep, **options)
        except VerificationError as exc:
            problems.append(f"{label}: no verified model ({exc})")
            continue
        step(f"INT8 candidate {label}: quantizing")
        outcome = int8.measure(results[label][0], samples[:half], samples[half:], target)
        measured[label] = outcome.worst
        if outcome.error:
            problems.append(f"{label}: not measured: {outcome.error}")
    if not results:
        raise VerificationError(loaded, Report(notes=problems), "no candidate verified: " + "; ".join(problems))
    choice = max(measured, key=lambda label: measured[label])
    chosen, report = results[choice]
    report.int8, report.int8_choice = measured, choice
    report.int8_measure = (f"{INT8_TARGETS[target]}, output SQNR on {len(samples) - half} samples after calibrating "
                           f"on {half}")
    report.notes += problems
    report.seconds["int8 choice"] = time.perf_counter() - start
    return chosen, report


def quantize_check(model, *, data: str | os.PathLike | None = None, train=None,
                   images: ImagePreprocessing | None = None) -> QuantizeCheck:
    """How ``model`` will take INT8 (see int8.py): its weights and theirs after
    ``optimize(int8_ready=True)`` (verified), and given calibration ``data`` (an .npz path or a
    folder of images, preprocessed as ``images`` says) INT8 measured on it, of the model as given
    and after ``optimize(int8_ready=True)`` with and without keep_identity. ``train``: the
    training export the model was fused from."""
    loaded = load_model(_as_model_source(model))
    samples = load_calibration(data, loaded, images) if data is not None else None
    described = ""
    variants: dict[str, onnx.ModelProto] = {}
    notes = []
    if samples:
        folder = data is not None and Path(data).is_dir()
        fitted = (images or ImagePreprocessing()).fitted(graph_inputs(loaded)[0])
        described = f"{data}" + (f" (images: {fitted.describe()})" if folder else "")
    for label, keep_identity in (("optimize --int8-ready", False), ("+ --keep-identity", True)):
        if keep_identity and not samples:
            break  # without data only the weights after --int8-ready are shown
        try:
            variants[label] = optimize(loaded, int8_ready=True, keep_identity=keep_identity,
                                       inputs=samples[0] if samples else None)[0]
        except VerificationError as exc:
            notes.append(f"{label}: no verified model ({exc}); not measured")
    result = int8.check(loaded, samples, described, load_model(_as_model_source(train)) if train is not None else None,
                        variants)
    result.notes += notes
    return result


def inspect(model, *, only: str | Sequence[str] = (), skip: str | Sequence[str] = (),
            weights_as_constants: bool = False) -> Report:
    """Dry run: what would be rewritten and what would be left, and why."""
    report = optimize(model, only=only, skip=skip, verify=False, weights_as_constants=weights_as_constants)[1]
    report.unverified = False  # nothing is written: there is nothing to verify
    return report


def bench(a, b, **options) -> BenchResult:
    """Latency A/B of two models with the same inputs (each as optimize takes it). Options:
    names, provider, input_shapes, seed, rounds, warmup, threads."""
    models = load_model(_as_model_source(a)), load_model(_as_model_source(b))
    same_inputs(*models, options.get("names", ("A", "B")))
    return latency_ab(*models, **options)


def verify(reference, candidate, *, names: tuple[str, str] = ("A", "B"), **options) -> Verification:
    """The same equivalence check optimize runs, on any two models with the same inputs and
    outputs (each as optimize takes it), called ``names`` in messages. Options: provider,
    input_shapes, inputs, seed, rtol, atol."""
    models = load_model(_as_model_source(reference)), load_model(_as_model_source(candidate))
    same_inputs(*models, names)
    checker = Checker(models[0], **options)
    takes_feeds(models[1], checker.feed_sets[0], names[1])
    return checker.check(models[1], name=names[1])
