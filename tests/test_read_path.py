"""The reading side never imports torch: TensorBoard loads every installed plugin at start-up."""

import subprocess
import sys

import pytest

CHECK = "import sys; {body}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK.format(body=body)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("body", [
    "import tb_plugin.diagnostics_plugin",
    "import tbdiag, tbdiag.rules, tbdiag.contract.schema, tbdiag.read.reader, tbdiag.read.report, tbdiag.summary",
    "from tbdiag import cli; assert cli.main(['rules']) == 0",
], ids=["plugin", "package", "rules-command"])
def test_imports_without_torch(body):
    proc = _run(body)
    assert proc.returncode == 0, proc.stderr


def test_report_on_a_real_run_without_torch(scenario_logdir):
    proc = _run(f"from tbdiag import cli; code = cli.main(['report', {scenario_logdir!r}, '--format', 'json']); "
                "assert code == 0")
    assert proc.returncode == 0, proc.stderr
    assert '"findings"' in proc.stdout


def test_the_writer_is_still_one_import_away():
    proc = subprocess.run([sys.executable, "-c", "from tbdiag import DiagnosticWriter; import sys; "
                           "assert 'torch' in sys.modules; print(DiagnosticWriter.__mro__[1].__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SummaryWriter"
