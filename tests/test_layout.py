"""The package's layout holds: four parts in the order a trial flows, imports only one way.

``vae`` (the model maths and the engine) imports none of the others; ``store`` (the SQL store and the
files beside it) may import ``vae``; ``study`` (from spec to workers) may import ``store`` and
``vae``; ``results`` (what reads a study) may import all three. The top-level modules shared by all
(the training config ``spec``, ``errors``, atomic writes) import no part; the rest of the top level (the CLI,
``train``, the public API) may import anything. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

TUNER = Path(__file__).resolve().parents[1] / "tuner"
PARTS = ("vae", "store", "study", "results")
SHARED = ("spec", "errors", "atomic")  # top-level modules every part may import (they import no part)
MAY_IMPORT = {
    "vae": {"vae"},
    "store": {"store", "vae"},
    "study": {"study", "store", "vae"},
    "results": {"results", "study", "store", "vae"},
    "shared": set(),
}


def _part(module: str) -> str | None:
    """'tuner.vae.engine' -> 'vae'; 'tuner.spec' -> 'shared'; other top-level modules -> 'top'."""
    parts = module.split(".")
    if parts[0] != "tuner" or len(parts) == 1:
        return None
    if parts[1] in PARTS:
        return parts[1]
    return "shared" if parts[1] in SHARED else "top"


def _imported(tree: ast.AST, package: Path) -> list[tuple[int, str]]:
    """(line, module) of every tuner module a file imports; ``from tuner import x`` counts x when it
    is a module or a package of the tree (else it is an attribute of tuner's __init__, like __version__)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                path = package.parent.joinpath(*sub.split("."))
                if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
                    found.append((node.lineno, sub))
    return found


def wrong_way_imports(package: Path) -> list[str]:
    """'file:line imports module (part -> part)' for every import against the layout's direction."""
    wrong = []
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        mine = _part(module)
        if mine in (None, "top"):
            continue
        for line, target in _imported(ast.parse(path.read_text()), package):
            theirs = _part(target)
            if theirs is None or theirs == "shared" or theirs in MAY_IMPORT[mine]:
                continue
            wrong.append(f"{path.relative_to(package.parent)}:{line} imports {target} ({mine} -> {theirs})")
    return wrong


def test_every_import_goes_the_layouts_way() -> None:
    assert wrong_way_imports(TUNER) == []


def test_the_check_finds_a_wrong_way_import(tmp_path: Path) -> None:
    """A tree with one deliberate import against the direction (vae -> study): the check names it."""
    package = tmp_path / "tuner"
    for part in PARTS:
        (package / part).mkdir(parents=True)
        (package / part / "__init__.py").write_text("")
    (package / "__init__.py").write_text("__version__ = '0'\n")
    (package / "spec.py").write_text("")
    (package / "study" / "worker.py").write_text("from tuner.vae import engine\nfrom tuner import __version__\n")
    (package / "vae" / "engine.py").write_text("import torch\n\ndef f():\n    from tuner.study import worker\n")
    (package / "store" / "files.py").write_text("from tuner import spec, study\n")
    assert wrong_way_imports(package) == [
        "tuner/store/files.py:1 imports tuner.study (store -> study)",
        "tuner/vae/engine.py:4 imports tuner.study (vae -> study)",
        "tuner/vae/engine.py:4 imports tuner.study.worker (vae -> study)",
    ]


@pytest.mark.parametrize("part", PARTS)
def test_each_part_says_what_it_holds_and_may_import(part: str) -> None:
    doc = ast.get_docstring(ast.parse((TUNER / part / "__init__.py").read_text()))
    assert doc and "May import" in doc, part


def test_no_module_is_much_over_500_lines() -> None:
    long = {str(p.relative_to(TUNER)): n for p in TUNER.rglob("*.py") if (n := len(p.read_text().splitlines())) > 520}
    assert long == {}


def test_the_public_api_and_the_command_still_load() -> None:
    import subprocess

    code = ("import tuner\nfrom tuner import Population, train_config, Worker, StudySpec, rank_study\n"
            "assert all(hasattr(tuner, n) for n in tuner.__all__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tuner", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "worker" in proc.stdout, proc.stderr
