"""What a newcomer and a packager rely on: the license, the architecture notes, and bounds that
agree with each other."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from onnx_reparam.passes import default_passes, finishing_passes

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_permissive_and_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_architecture_notes_cover_every_pass():
    notes = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert all(f"`{p.name}`" in notes for p in default_passes() + finishing_passes()) and "## Adding a rule" in notes


def test_python_bound_admits_no_version_the_test_extra_cannot_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    supported = SpecifierSet(project["requires-python"])
    torch = next(Requirement(r) for r in project["optional-dependencies"]["test"] if r.startswith("torch"))
    assert str(torch.specifier) == "==2.13.0"  # its wheels start at Python 3.10
    assert not supported.contains("3.9") and supported.contains("3.10")


def test_the_reparam_benchmark_runs():
    # it broke once unnoticed (an API change upstream of it); the smallest net at benchmark size
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reparam.py"), "--arch", "fc_heads",
                          "--exporter", "ts", "--rounds", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"fc_heads +ts +14 -> +5 \( +5\) .* same ops", run.stdout), run.stdout[-2000:]


def test_the_int8_benchmark_measures(tmp_path):
    """Its models come from timm (not installed for the tests); what it measures them with runs
    here, on a small RepVGG-like model."""
    import importlib.util

    import numpy as np
    spec = importlib.util.spec_from_file_location("int8_benchmark", ROOT / "benchmarks" / "int8.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    from test_cli import two_block_model
    model = two_block_model()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    outcomes = benchmark.measure(model, feeds, feeds)
    assert list(outcomes) == ["weights/tensor", "weights/channel", "QDQ/tensor", "QDQ/channel"]
    assert benchmark.classifier(model) == [model.graph.node[-1].name]
    assert benchmark.latency_ratio(model, model, rounds=2) > 0
