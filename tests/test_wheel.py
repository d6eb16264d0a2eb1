"""tbdiag installed the way users install it: a built wheel, in a virtual environment, not editable.

Moving files is exactly when a wheel silently loses a subpackage or the tab's
static files while every editable-install test stays green.  Here the wheel is
built from a clean copy of the tracked sources with ``python -m build``,
installed into a new virtual environment, and used from there: every module
imports, a watched run is written, ``tbdiag report`` names its sick layer, and a
real ``tensorboard`` serves the tab and every JavaScript module it loads.

The virtual environment reaches this interpreter's packages (torch,
tensorboard, ...) through a plain path entry, so the editable install's import
hook never runs there: tbdiag itself can only come from the wheel, which the
test asserts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build")

from plugin_helpers import TensorBoardProcess, get_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _sources(dest: Path) -> Path:
    """The files a fresh clone has (git's tracked files, or the tree less build outputs without git)."""
    src = dest / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if tracked.returncode == 0 and tracked.stdout:
        for rel in tracked.stdout.decode().split("\0"):
            if rel and (ROOT / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, src / rel)
    else:
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", "runs", ".venv", "test-artifacts"))
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, the virtual environment's python) with tbdiag installed from the wheel alone."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _sources(tmp)
    dist = tmp / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("tbdiag-*.whl")

    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this interpreter's dependencies as a plain path: no .pth of theirs runs, so no editable import hook
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_dependencies.pth").write_text("\n".join(sorted(here)) + "\n")
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return wheel, python


def _run(python: Path, code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_wheel_ships_every_module_and_static_file(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("tbdiag", "tb_plugin"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            assert rel in names, f"{rel} is missing from the wheel"
    for path in (ROOT / "tb_plugin" / "static").iterdir():
        assert f"tb_plugin/static/{path.name}" in names, f"static/{path.name} is missing from the wheel"
    assert "tb_plugin/http_api.md" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "tbdiag = tbdiag.cli:main" in text
    assert "tbdiag = tb_plugin.diagnostics_plugin:DiagnosticsPlugin" in text


def test_every_module_imports_from_the_installed_wheel(installed, tmp_path):
    _, python = installed
    code = (
        "import importlib, pkgutil, sys, tbdiag, tb_plugin\n"
        "prefix = sys.prefix\n"
        "for pkg in (tbdiag, tb_plugin):\n"
        "    assert pkg.__file__.startswith(prefix), (pkg.__name__, pkg.__file__, prefix)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name.startswith('tbdiag.integrations.') or m.name.endswith('.__main__'):\n"
        "            continue  # optional extras (imported in their own tests); the command's entry\n"
        "        mod = importlib.import_module(m.name)\n"
        "        assert mod.__file__.startswith(prefix), (m.name, mod.__file__)\n"
        "print(len(list(pkgutil.walk_packages(tbdiag.__path__, 'tbdiag.'))))\n"
    )
    result = _run(python, code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 40  # the package's modules, all found in the wheel


def test_report_and_tab_from_the_installed_wheel(installed, tmp_path):
    _, python = installed
    logdir = tmp_path / "runs"
    train = ("import sys; sys.path.insert(0, sys.argv[1]); import plugin_helpers\n"
             "plugin_helpers.train_run(sys.argv[2], dead=True)\n")
    result = _run(python, train, str(TESTS), str(logdir / "sick"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    tbdiag_cli = python.parent / ("tbdiag.exe" if os.name == "nt" else "tbdiag")
    assert tbdiag_cli.exists(), "the wheel's console script was not installed"
    report = subprocess.run([str(tbdiag_cli), "report", str(logdir), "--format", "json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    findings = json.loads(report.stdout)["findings"]
    assert any(f["issue"] == "dead_relu" and f["layer"] == "conv2" and f["run"] == "sick" for f in findings)

    with TensorBoardProcess(str(logdir), load_fast=False, workdir=str(tmp_path), python=str(python)) as tb:
        runs = tb.wait_for("/data/plugin/tbdiag/runs", lambda status, body: status == 200 and body.get("runs"))
        assert [r["run"] for r in runs["runs"]] == ["sick"]
        status, listing = get_json(tb.url + "/data/plugins_listing")
        assert status == 200 and listing["tbdiag"]["enabled"]
        # the tab's module and every module it imports, transitively, served as JavaScript
        import urllib.request

        todo, seen = ["index.js"], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            with urllib.request.urlopen(f"{tb.url}/data/plugin/tbdiag/{name}", timeout=30) as r:
                assert r.status == 200 and "javascript" in r.headers["Content-Type"], name
                source = r.read().decode("utf-8")
            assert source.strip(), name
            todo += re.findall(r"""^import\s[^;]*?from\s+['"]\./([\w.-]+\.js)['"]""", source, flags=re.M)
        assert len(seen) == len(list((ROOT / "tb_plugin" / "static").glob("*.js")))
