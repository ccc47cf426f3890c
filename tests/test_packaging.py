"""Packaging: pyproject, the Makefile and CI agree with each other and with the installed env."""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()
CI_RUN = ROOT / ".ci" / "run"


def _requirement(name: str) -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    (req,) = [r for r in reqs if r.name == name]
    return req


def _recipe(target: str) -> list[str]:
    """Recipe lines (tab-indented) of a Makefile target."""
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)+)", MAKEFILE, re.MULTILINE)
    assert match, f"Makefile has no {target!r} target with a recipe"
    return [line.strip() for line in match.group(1).splitlines()]


def test_console_script_points_to_cli_main():
    assert PYPROJECT["project"]["scripts"] == {"tuner": "tuner.cli:main"}
    # the installed metadata says the same (catches a stale editable install)
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="tuner")
    assert entry.value == "tuner.cli:main"


def test_installed_torch_satisfies_the_torch_range():
    installed = Version(torch.__version__)  # e.g. 2.13.0+cpu
    spec = _requirement("torch").specifier
    assert spec.contains(installed.base_version), f"torch {installed} is outside {spec}"


def test_makefile_pins_torch_inside_the_range_before_installing_the_project():
    recipe = "\n".join(_recipe("$(STAMP)"))
    pin = re.search(r"pip install torch==([\w.]+)", recipe)
    assert pin, "the venv recipe must install a pinned torch"
    assert _requirement("torch").specifier.contains(pin.group(1))
    assert recipe.index("torch==") < recipe.index('-e ".[dev,ray]"'), "torch must be installed first"


def test_ci_runs_the_makefile_test_target_and_that_runs_pytest():
    commands = [
        line.strip()
        for line in CI_RUN.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == "make test"
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"
    assert any("python -m pytest" in line and "$(PYTEST_ARGS)" in line for line in _recipe("test"))


def test_pytest_config_registers_slow_and_finds_tests():
    config = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    assert any(m.startswith("slow:") for m in config["markers"])
    assert "pytest" in PYPROJECT["project"]["optional-dependencies"]["dev"]
