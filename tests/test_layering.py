"""The rules of the house: which folder may import which, checked by import-linter on the real tree.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``).  Each test
that breaks one on purpose, in a copy of the tree, proves the check can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` (all contracts, or those ids) on the packages under ``root``, ahead of any install."""
    env = dict(os.environ, PYTHONPATH=str(root))
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(no_cache=True, no_logo=True, limit_to_contracts={contracts!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for name in ("tbdiag", "tb_plugin"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_every_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # a rule that reaches for torch, or for the training side
    ("tbdiag/rules/loss.py", "import torch", "read-side-torch-free"),
    ("tbdiag/rules/update.py", "from ..watch import shield", "read-side-torch-free"),
    ("tbdiag/read/reader.py", "from ..measure import stats", "read-side-torch-free"),
    # the training side reading event files
    ("tbdiag/watch/live.py", "from ..read import reader", "training-side-not-read"),
    # an encoder that needs torch
    ("tbdiag/summary/images.py", "import torch", "encoders-torch-free"),
    # tbdiag reaching into the plugin
    ("tbdiag/read/report.py", "import tb_plugin.payloads", "no-plugin-import"),
    # the contract importing what sits above it: a layer broken, and an import circle made
    ("tbdiag/contract/schema.py", "from ..rules import series", "layers"),
    ("tbdiag/rules/series.py", "from . import loss", "no-circles"),
    # a private module used from another package
    ("tbdiag/writer.py", "from .integrations import _common", "private-modules"),
])
def test_a_broken_rule_of_the_house_fails(tmp_path, module, line, broken):
    root = _copy_tree(tmp_path)
    assert _lint(root, broken).returncode == 0, "the copy keeps the contract before the sabotage"
    _append(root / module, line)
    result = _lint(root, broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "0 broken" not in result.stdout, result.stdout


def test_folders_stay_small():
    """At most 10 modules at the top of the package and 16 in any folder: a newcomer reads the tree."""
    top = [p for p in (ROOT / "tbdiag").glob("*.py")]
    assert len(top) <= 10, sorted(p.name for p in top)
    for folder in (ROOT / "tbdiag").rglob("*/"):
        if folder.name == "__pycache__":
            continue
        modules = list(folder.glob("*.py"))
        assert len(modules) <= 16, (folder, len(modules))
        if modules:
            init = folder / "__init__.py"
            assert init.exists(), f"{folder} has modules but no __init__.py"
