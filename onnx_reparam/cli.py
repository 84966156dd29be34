"""The onnx-reparam command: optimize, inspect, verify, passes.

Exit codes: 0 success (rewrites that failed the check were dropped and named, the rest verified),
1 verification failed, or with --strict a rewrite had to be dropped (or, for ``inspect --check``,
rewrites possible), 2 bad input or usage, 3 internal error (a defect of this tool).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict
from functools import wraps
from pathlib import Path

import click
import numpy as np

from . import api
from .bench import MAX_ROUNDS, MAX_THREADS
from .calibration import ImagePreprocessing
from .errors import OPTIONS, ReparamError, first_line
from .inputs import load_inputs, parse_input_shapes
from .int8 import plot_svg
from .model_io import files_size, save_model
from .passes import default_passes, finishing_passes
from .pipeline import FINISHING_OPTIONS
from .report import Report

EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3


def _one_line_errors(command):
    """Bad input ends with one line on stderr and exit code 2, a defect of ours with one line and
    exit code 3 (the traceback only with --debug); never a bare traceback."""
    @wraps(command)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy/onnx warnings are not for the user
                return command(*args, **kwargs)
        except ReparamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except MemoryError:
            click.echo("error: out of memory", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except Exception as exc:  # noqa: BLE001 - anything else is our defect
            if debug:
                traceback.print_exc()
            where = traceback.extract_tb(exc.__traceback__)[-1]
            click.echo(f"internal error in {Path(where.filename).name}:{where.lineno}: {type(exc).__name__}: "
                       f"{first_line(exc)}; please report it (--debug shows the traceback)", err=True)
            sys.exit(EXIT_INTERNAL)
    return click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")(wrapper)


def _run_options(f):
    """How models are run: by the check, and by the bench."""
    f = click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
                     show_default=True, help="onnxruntime execution provider.")(f)
    f = click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1,3,224,224",
                     help="Shape of an input with dynamic dims, as 1,3,224,224 or 1x3x224x224 (repeatable).")(f)
    f = click.option("--seed", type=_Bounded(0, 2**63 - 1), metavar="N", default=0, show_default=True,
                     help="Seed of the random inputs.")(f)
    return f


def _check_options(f):
    f = _run_options(f)
    f = click.option("--rtol", type=_NonNegative(), metavar="X",
                     help="Relative tolerance: compare with the input model instead of its float64 evaluation.")(f)
    f = click.option("--atol", type=_NonNegative(), metavar="X",
                     help="Absolute tolerance: compare with the input model instead of its float64 evaluation.")(f)
    f = click.option("--inputs", "inputs_file", type=click.Path(),
                     help=".npz file with input arrays, by input name.")(f)
    return f


def _pass_options(f):
    names = click.Choice([p.name for p in default_passes() + finishing_passes()])
    f = click.option("--skip", multiple=True, type=names, metavar="PASS",
                     help="Do not run this pass (repeatable; the passes command lists them).")(f)
    f = click.option("--only", multiple=True, type=names, metavar="PASS",
                     help="Run only this pass (repeatable).")(f)
    f = click.option("--weights-as-constants", is_flag=True,
                     help="Treat weights that are also graph inputs (keep_initializers_as_inputs) as "
                          "constants, and drop them from the inputs.")(f)
    return f


def _output_options(verbose: str):
    def options(f):
        f = click.option("-q", "--quiet", is_flag=True, help="Print only errors.")(f)
        return click.option("-v", "--verbose", is_flag=True, help=verbose)(f)
    return options


REWRITE_DETAIL = ("Also list passes that rewrote nothing, every pattern left as it is, what each output was "
                  "compared on, and why CUDA was not used.")
RUN_DETAIL = "Also list the inputs, each model's fastest and slowest round, and why CUDA was not used."


class _Bounded(click.IntRange):
    """An int whose bounds refuse a mistake (a billion rounds), not a setting --help lists."""

    def _describe_range(self) -> str:
        return ""


class _NonNegative(click.FloatRange):
    """A finite float >= 0, its range left out of --help."""

    def __init__(self) -> None:
        super().__init__(0, 1e300)

    def _describe_range(self) -> str:
        return ""


class _Progress:
    """One status line on stderr, rewritten in place, for runs longer than a couple of seconds;
    only on a terminal and never with --quiet."""

    DELAY = 2.0

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.shown = False

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        if self.enabled and elapsed >= self.DELAY:
            sys.stderr.write(f"\r\033[Konnx-reparam {elapsed:5.1f}s: {message}")
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _writable(path: Path, what: str) -> None:
    """Checked before any work, so a bad path fails before anything is written."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ReparamError(f"{what} {path}: is a directory")
    if not folder.is_dir():
        raise ReparamError(f"{what} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        raise ReparamError(f"{what} {path}: not writable")


def _write_report(report: Report, path: str | None) -> None:
    if path:
        _write_text(path, _json(report.to_dict()), "report ")


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, default=float) + "\n"


def _write_text(path: str, text: str, what: str = "") -> None:
    """Writes an output file the command was asked for; a failure is one line (exit 2)."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise ReparamError(f"cannot write {what}{path}: {exc.strerror}") from None


class _OneLineErrors(click.Group):
    """Usage errors as one line too ("error: ..."), exit code 2, like every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(EXIT_BAD_INPUT)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-reparam")
def main():
    """Rewrite training-structure ONNX models into their deploy structure, and prove it exact."""


@main.command(short_help="Rewrite IN into its deploy structure, verify it, write OUT.")
@click.argument("input_path", metavar="IN", type=click.Path())
@click.argument("output_path", metavar="OUT", type=click.Path())
@_pass_options
@_check_options
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime equivalence check.")
@click.option("--force", is_flag=True, help="Write OUT even if verification fails.")
@click.option("--strict", is_flag=True,
              help="Fail (exit 1, nothing written) when a rewrite had to be dropped for not verifying.")
@click.option("--static-shape", is_flag=True,
              help="Fix the inputs' symbolic dims in OUT (to --input-shape, a batch axis to 1) so that "
                   "rewrites that hold for one size only apply.")
@click.option("--int8-ready", is_flag=True,
              help="Then equalize the layers' weights across channels (exact) so that OUT quantizes to INT8 well.")
@click.option("--keep-identity", is_flag=True,
              help="Keep the centre taps an identity branch adds to a conv apart, as a per-channel Mul (for INT8).")
@click.option("--calibration", "calibration_path", type=click.Path(), metavar="CALIB",
              help="With --int8-ready: choose by INT8 measured on this data (.npz or image folder) among fused, "
                   "--int8-ready and --int8-ready --keep-identity.")
@click.option("--int8-target", type=click.Choice(["qdq", "weights"]), default="qdq", show_default=True,
              help="With --calibration: measure onnxruntime QDQ or weight-only INT8 (both per tensor).")
@click.option("--report", "report_path", type=click.Path(), help="Write a JSON report.")
@click.option("--bench", "run_bench", is_flag=True, help="Then time IN against OUT (see `bench`).")
@_output_options(REWRITE_DETAIL)
@_one_line_errors
def optimize(input_path, output_path, skip, only, weights_as_constants, provider, rtol, atol, input_shapes,
             inputs_file, seed, no_verify, force, strict, static_shape, int8_ready, keep_identity, calibration_path,
             int8_target, report_path, run_bench, quiet, verbose):
    """Rewrite IN into its deploy structure, verify it, write OUT."""
    if calibration_path and not int8_ready:
        raise ReparamError("--calibration chooses how to make the model INT8-ready: give --int8-ready too")
    if calibration_path and (keep_identity or no_verify):
        raise ReparamError(f"--calibration chooses whether to keep the identity apart, among verified models: "
                           f"drop {'--keep-identity' if keep_identity else '--no-verify'}")
    source = Path(input_path)
    target = Path(output_path)
    if source.exists() and target.exists() and source.samefile(target) or \
            source.resolve() == target.resolve():
        raise ReparamError("OUT is the same file as IN; the input is never overwritten")
    _writable(target, "OUT")
    if report_path:
        _writable(Path(report_path), "report")
    inputs = load_inputs(inputs_file) if inputs_file else None
    progress = _Progress(not quiet)
    options = {"only": only, "skip": skip, "provider": provider, "input_shapes": parse_input_shapes(input_shapes),
               "inputs": inputs, "seed": seed, "rtol": rtol, "atol": atol, "strict": strict,
               "weights_as_constants": weights_as_constants, "lazy_weights": True, "static_shape": static_shape}
    try:
        if calibration_path:
            model, report = api.optimize_for_int8(source, calibration_path, target=int8_target, progress=progress,
                                                  **options)
        else:
            model, report = api.optimize(source, verify=not no_verify, int8_ready=int8_ready,
                                         keep_identity=keep_identity, progress=progress, **options)
        failed = False
    except api.VerificationError as exc:
        model, report, failed = exc.model, exc.report, True
    finally:
        progress.clear()
    protected = report.input_files
    if target.resolve() in protected or (target.parent / (target.name + ".data")).resolve() in protected:
        raise ReparamError(f"{target} would overwrite the input's external data; choose another output name")
    if not failed or force:
        start = time.perf_counter()
        progress(f"saving {target}")
        save_model(model, target, external_data=bool(protected) or None, protected=protected)
        progress.clear()
        report.seconds["save"] = time.perf_counter() - start
        if report.after is not None:
            data = target.parent / (target.name + ".data")
            report.after.file_bytes = files_size(target, [data] if data.exists() else [])
        if run_bench:
            report.bench = api.bench(source, model, names=(str(source), str(target)), provider=provider,
                                     input_shapes=parse_input_shapes(input_shapes), seed=seed)
    _write_report(report, report_path)
    if not quiet:
        click.echo(report.summary(verbose))
        if failed:
            click.echo(f"{target} {'written anyway (--force)' if force else 'not written'}")
        else:
            click.echo(f"wrote {target}" + (" (not verified)" if report.unverified else ""))
    if failed:
        if quiet:
            click.echo("error: verification failed", err=True)
        sys.exit(EXIT_MISMATCH)


@main.command(short_help="Dry run: what would be rewritten, what not, and why.")
@click.argument("input_paths", metavar="IN...", nargs=-1, required=True, type=click.Path())
@_pass_options
@click.option("--check", is_flag=True, help="Exit 1 if anything would be rewritten (for CI and pre-commit).")
@click.option("--report", "report_path", type=click.Path(), help="Write a JSON report (one IN only).")
@_output_options(REWRITE_DETAIL)
@_one_line_errors
def inspect(input_paths, skip, only, weights_as_constants, check, report_path, quiet, verbose):
    """Dry run: what would be rewritten in each IN, what would be left and why."""
    if report_path and len(input_paths) > 1:
        raise ReparamError("--report takes one IN")
    if report_path:
        _writable(Path(report_path), "report")
    rewritable = []
    for path in input_paths:
        report = api.inspect(path, only=only, skip=skip, weights_as_constants=weights_as_constants)
        _write_report(report, report_path)
        if report.rewrites:
            rewritable.append(path)
        if not quiet:
            if len(input_paths) > 1:
                click.echo(f"== {path}")
            click.echo(report.summary(verbose))
    if check and rewritable:
        if quiet or len(input_paths) > 1:
            click.echo(f"{len(rewritable)} model(s) can be re-parameterized: {', '.join(rewritable)}", err=True)
        sys.exit(EXIT_MISMATCH)


@main.command(short_help="Check that A and B compute the same outputs.")
@click.argument("reference", metavar="A", type=click.Path())
@click.argument("candidate", metavar="B", type=click.Path())
@_check_options
@click.option("--report", "report_path", type=click.Path(), help="Write the verification as JSON.")
@_output_options("Also say what each output was compared on, and why CUDA was not used.")
@_one_line_errors
def verify(reference, candidate, provider, rtol, atol, input_shapes, inputs_file, seed, report_path, quiet,
           verbose):
    """Check that models A and B compute the same outputs on the same inputs."""
    if report_path:
        _writable(Path(report_path), "report")
    result = api.verify(reference, candidate, names=(reference, candidate), provider=provider,
                        input_shapes=parse_input_shapes(input_shapes),
                        inputs=load_inputs(inputs_file) if inputs_file else None, seed=seed,
                        rtol=rtol, atol=atol)
    if report_path:
        _write_report(Report(verification=result), report_path)
    if not quiet:
        click.echo(result.summary(verbose))
    if not result.passed:
        if quiet:
            click.echo("error: verification " + ("inconclusive" if result.inconclusive else "failed"), err=True)
        sys.exit(EXIT_MISMATCH)


@main.command(short_help="Time B against A on the same inputs.")
@click.argument("model_a", metavar="A", type=click.Path())
@click.argument("model_b", metavar="B", type=click.Path())
@_run_options
@click.option("--rounds", type=_Bounded(1, MAX_ROUNDS), metavar="N", default=50, show_default=True,
              help="Timed rounds.")
@click.option("--warmup", type=_Bounded(0, MAX_ROUNDS), metavar="N", default=5, show_default=True,
              help="Untimed rounds first.")
@click.option("--threads", type=_Bounded(1, MAX_THREADS), metavar="N",
              help="onnxruntime intra-op threads (default: its own).")
@click.option("--json", "json_path", type=click.Path(), help="Write the result as JSON (for CI).")
@_output_options(RUN_DETAIL)
@_one_line_errors
def bench(model_a, model_b, provider, input_shapes, rounds, warmup, threads, seed, json_path, quiet, verbose):
    """Latency of B against A on the same inputs: interleaved rounds, medians, B/A."""
    if json_path:
        _writable(Path(json_path), "JSON output")
    result = api.bench(model_a, model_b, names=(model_a, model_b), provider=provider,
                       input_shapes=parse_input_shapes(input_shapes), seed=seed, rounds=rounds, warmup=warmup,
                       threads=threads)
    if json_path:
        _write_text(json_path, _json(asdict(result)))
    if not quiet:
        click.echo(result.summary(verbose))


@main.command("passes")
def list_passes():
    """List the passes, in the order they run."""
    for p in default_passes():
        click.echo(f"{p.name:16} {p.doc}")
    for p in finishing_passes():
        click.echo(f"{p.name:16} (only with {OPTIONS[FINISHING_OPTIONS[p.name] + '=True']}) {p.doc}")


@main.command("quantize-check", short_help="How MODEL will take INT8: weight outliers, and with data, SQNR.")
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.option("--data", "data_path", type=click.Path(), metavar="CALIB",
              help="Calibration data: an .npz of input arrays (samples along the first axis) or a folder of images.")
@click.option("--train", "train_path", type=click.Path(), metavar="TRAIN.onnx",
              help="The training export MODEL was fused from: name the identity-branch BN gains in each layer.")
@click.option("--image-size", type=_Bounded(1, 65536), metavar="N",
              help="Images: shorter side resized to N, centre NxN crop (default: the model's input size, else 224).")
@click.option("--mean", default="0.485,0.456,0.406", show_default=True, metavar="R,G,B",
              help="Images: subtracted after dividing by 255.")
@click.option("--std", default="0.229,0.224,0.225", show_default=True, metavar="R,G,B", help="Images: divided by.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]),
              help="Images: the input's layout (default: NHWC where the model's input ends in 3 channels).")
@click.option("--report", "report_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(), metavar="FILE.svg",
              help="Draw each layer's INT8 resolution (median |w| in grid levels), as given and after --int8-ready.")
@click.option("--int8-hints", "hints_path", type=click.Path(), metavar="FILE.json",
              help="Write the keep list (onnxruntime nodes_to_exclude, TensorRT layer precisions) and activation "
                   "ranges (needs --data).")
@_output_options("List every layer and the whole sensitivity ranking.")
@_one_line_errors
def quantize_check(model_path, data_path, train_path, image_size, mean, std, layout, report_path, plot_path, hints_path,
                   quiet, verbose):
    """How MODEL will take INT8: weight ranges and outliers per layer; with --data, INT8 SQNR and top-1
    agreement against FP32 (weight-only and onnxruntime QDQ, per tensor and per channel), of MODEL and
    of MODEL after --int8-ready, and which layers are most sensitive. A measurement on your data, not an
    accuracy guarantee: that needs labelled data."""
    for path, what in ((report_path, "report"), (hints_path, "hints"), (plot_path, "plot")):
        if path:
            _writable(Path(path), what)
    if hints_path and not data_path:
        raise ReparamError("--int8-hints needs --data: the keep list and activation ranges are measured on it")
    images = ImagePreprocessing(image_size, _triple(mean, "--mean"), _triple(std, "--std"), layout)
    result = api.quantize_check(model_path, data=data_path, train=train_path, images=images)
    if report_path:
        _write_text(report_path, _json(result.to_dict()))
    if hints_path:
        _write_text(hints_path, _json(result.hints()))
    if plot_path:
        _write_text(plot_path, plot_svg(result))
    if not quiet:
        click.echo(result.summary(verbose))


def _triple(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(np.isfinite(values)):
        raise ReparamError(f"{name} takes three numbers, R,G,B (got {text!r})")
    return values[0], values[1], values[2]



if __name__ == "__main__":
    main()
