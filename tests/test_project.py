"""What a newcomer and a packager rely on: the license, the architecture notes, and bounds that
agree with each other."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from onnx_reparam.passes import default_passes

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_permissive_and_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_architecture_notes_cover_every_pass():
    notes = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert all(f"`{p.name}`" in notes for p in default_passes()) and "## Adding a rule" in notes


def test_python_bound_admits_no_version_the_test_extra_cannot_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    supported = SpecifierSet(project["requires-python"])
    torch = next(Requirement(r) for r in project["optional-dependencies"]["test"] if r.startswith("torch"))
    assert str(torch.specifier) == "==2.13.0"  # its wheels start at Python 3.10
    assert not supported.contains("3.9") and supported.contains("3.10")
