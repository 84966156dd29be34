"""The onnx-reparam command: optimize, inspect, verify, passes.

Exit codes: 0 success, 1 verification failed (or, for ``inspect --check``, rewrites possible),
2 bad input or usage.
"""
from __future__ import annotations

import json
import os
import sys
import time
from functools import wraps
from pathlib import Path

import click

from . import api
from .errors import ReparamError
from .model_io import external_data_files, save_model
from .passes import default_passes
from .report import Report
from .verify import load_inputs, parse_input_shapes

EXIT_MISMATCH, EXIT_BAD_INPUT = 1, 2


def _one_line_errors(command):
    """Bad input ends with one line on stderr and exit code 2, never a traceback."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ReparamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except MemoryError:
            click.echo("error: out of memory", err=True)
            sys.exit(EXIT_BAD_INPUT)
    return wrapper


def _check_options(f):
    f = click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
                     show_default=True, help="onnxruntime execution provider for verification.")(f)
    f = click.option("--rtol", type=float, help="Relative tolerance (default by dtype: fp32 1e-4).")(f)
    f = click.option("--atol", type=float, help="Absolute tolerance (default by dtype: fp32 1e-6).")(f)
    f = click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:1x3x224x224",
                     help="Shape for an input with dynamic dims (repeatable).")(f)
    f = click.option("--inputs", "inputs_file", type=click.Path(),
                     help=".npz file with input arrays, by input name.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random inputs.")(f)
    return f


def _pass_options(f):
    f = click.option("--skip", multiple=True, metavar="PASS", help="Do not run this pass.")(f)
    f = click.option("--only", multiple=True, metavar="PASS", help="Run only this pass.")(f)
    return f


def _write_report(report: Report, path: str | None) -> None:
    if path:
        try:
            Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        except OSError as exc:
            raise ReparamError(f"cannot write report {path}: {exc.strerror}") from None


@click.group()
@click.version_option(package_name="onnx-reparam")
def main():
    """Rewrite training-structure ONNX models into their deploy structure, and prove it exact."""


@main.command()
@click.argument("input_path", metavar="IN", type=click.Path())
@click.argument("output_path", metavar="OUT", type=click.Path())
@_pass_options
@_check_options
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime equivalence check.")
@click.option("--force", is_flag=True, help="Write OUT even if verification fails.")
@click.option("--report", "report_path", type=click.Path(), help="Write a JSON report.")
@click.option("--quiet", is_flag=True, help="Print only errors.")
@_one_line_errors
def optimize(input_path, output_path, skip, only, provider, rtol, atol, input_shapes, inputs_file,
             seed, no_verify, force, report_path, quiet):
    """Rewrite IN into its deploy structure, verify it, write OUT."""
    source = Path(input_path)
    target = Path(output_path)
    if source.exists() and target.exists() and source.samefile(target) or \
            source.resolve() == target.resolve():
        raise ReparamError("OUT is the same file as IN; the input is never overwritten")
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ReparamError(f"{target}: is a directory")
    if not folder.is_dir() or not os.access(folder, os.W_OK) or \
            target.exists() and not os.access(target, os.W_OK):
        raise ReparamError(f"{target}: not writable")
    protected = external_data_files(source) if source.is_file() else set()
    inputs = load_inputs(inputs_file) if inputs_file else None
    try:
        model, report = api.optimize(source, only=only, skip=skip, verify=not no_verify,
                                     provider=provider, input_shapes=parse_input_shapes(input_shapes),
                                     inputs=inputs, seed=seed, rtol=rtol, atol=atol)
        failed = False
    except api.VerificationError as exc:
        model, report, failed = exc.model, exc.report, True
    if not failed or force:
        start = time.perf_counter()
        save_model(model, target, external_data=bool(protected) or None, protected=protected)
        report.seconds["save"] = time.perf_counter() - start
    _write_report(report, report_path)
    if not quiet:
        click.echo(report.summary())
        if failed:
            click.echo(f"{target} {'written anyway (--force)' if force else 'not written'}")
        else:
            click.echo(f"wrote {target}")
    if failed:
        if quiet:
            click.echo("error: verification failed", err=True)
        sys.exit(EXIT_MISMATCH)


@main.command()
@click.argument("input_path", metavar="IN", type=click.Path())
@_pass_options
@click.option("--check", is_flag=True, help="Exit 1 if anything would be rewritten.")
@click.option("--report", "report_path", type=click.Path(), help="Write a JSON report.")
@_one_line_errors
def inspect(input_path, skip, only, check, report_path):
    """Dry run: what would be rewritten in IN, what would be left and why."""
    report = api.inspect(input_path, only=only, skip=skip)
    _write_report(report, report_path)
    click.echo(report.summary())
    if check and report.rewrites:
        sys.exit(EXIT_MISMATCH)


@main.command()
@click.argument("reference", metavar="A", type=click.Path())
@click.argument("candidate", metavar="B", type=click.Path())
@_check_options
@_one_line_errors
def verify(reference, candidate, provider, rtol, atol, input_shapes, inputs_file, seed):
    """Check that models A and B compute the same outputs on the same inputs."""
    result = api.verify(reference, candidate, provider=provider,
                        input_shapes=parse_input_shapes(input_shapes),
                        inputs=load_inputs(inputs_file) if inputs_file else None, seed=seed,
                        rtol=rtol, atol=atol)
    click.echo(result.summary())
    if not result.passed:
        sys.exit(EXIT_MISMATCH)


@main.command("passes")
def list_passes():
    """List the passes, in the order they run."""
    for p in default_passes():
        click.echo(f"{p.name:16} {p.doc}")


if __name__ == "__main__":
    main()
