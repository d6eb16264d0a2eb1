"""`tbdiag report` and `tbdiag.report`: JSON contract, exit codes, broken files, live runs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import scenarios
import torch
import torch.nn.functional as F

import tbdiag
from tbdiag import DiagnosticWriter


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tbdiag", *args], capture_output=True, text=True, check=False)


KEYS = {"run", "layer", "issue", "severity", "first_step", "last_step", "value", "message"}


def test_json_contract(scenario_logdir, scenario_report):
    assert scenario_report, "the sick scenarios have findings"
    for f in scenario_report:
        assert KEYS <= set(f)
        assert f["severity"] in ("info", "warning", "error")
        assert isinstance(f["first_step"], int) and f["first_step"] <= f["last_step"]
        assert f["layer"] is None or isinstance(f["layer"], str)
        assert f["value"] is None or isinstance(f["value"], (int, float, str))
    runs = {f["run"] for f in scenario_report}
    assert runs <= set(os.listdir(scenario_logdir))  # run names are paths relative to LOGDIR
    assert [f for f in scenario_report if f["layer"] is None and f["issue"] == "loss_divergence"]


def test_python_api_matches_the_cli(scenario_logdir, scenario_report):
    findings = tbdiag.report(scenario_logdir)
    assert [f.to_json() for f in findings] == scenario_report


def test_exit_codes(scenario_logdir, tmp_path):
    assert cli("report", scenario_logdir, "--fail-on", "error").returncode == 1
    healthy = tmp_path / "healthy"
    shutil.copytree(os.path.join(scenario_logdir, "healthy_cnn"), healthy / "healthy_cnn")
    ok = cli("report", str(healthy), "--fail-on", "warning")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # input_bound reads wall-clock time: on a machine busy with other work the loop's own code between steps
    # can reach its info level; every other rule must stay silent on the healthy run
    listed = [line.split() for line in ok.stdout.splitlines()[1:] if line.startswith(("INFO", "WARNING", "ERROR"))]
    assert "No findings" in ok.stdout or all(row[3] == "input_bound" and row[0] == "INFO" for row in listed), ok.stdout
    missing = cli("report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr and missing.stdout == ""
    (tmp_path / "empty").mkdir()
    empty = cli("report", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no tbdiag data" in empty.stderr
    bad = cli("report", scenario_logdir, "--threshold", "dead_relu")
    assert bad.returncode == 2 and "RULE=NUMBER" in bad.stderr


def test_thresholds_change_the_verdict(scenario_logdir):
    strict = json.loads(cli("report", scenario_logdir, "--format", "json", "--threshold", "dead_relu=1.01").stdout)
    assert not [f for f in strict["findings"] if f["issue"] == "dead_relu"]


def test_text_report_is_a_table_with_advice(scenario_logdir):
    out = cli("report", scenario_logdir).stdout
    assert out.splitlines()[0].split()[:4] == ["SEVERITY", "RUN", "LAYER", "ISSUE"]
    assert "dead_functional" in out and "conv2" in out and "What to try:" in out


def test_broken_event_file_is_skipped_with_a_warning(scenario_logdir, tmp_path):
    root = tmp_path / "logs"
    shutil.copytree(os.path.join(scenario_logdir, "dead_functional"), root / "dead_functional")
    (root / "broken").mkdir()
    src = next(p for p in (root / "dead_functional").iterdir() if "tfevents" in p.name)
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    (root / "broken" / src.name).write_bytes(bytes(data))
    (root / "dead_functional" / "events.out.tfevents.0.garbage").write_bytes(b"not an event file" * 10)
    proc = cli("report", str(root), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert "corrupt event file" in proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    assert ("dead_functional", "conv2", "dead_relu") in {(f["run"], f["layer"], f["issue"]) for f in findings}


def test_reads_a_run_still_being_written(tmp_path):
    model = scenarios.SeedCNN()
    with torch.no_grad():
        model.conv2.bias.fill_(-20.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path / "live"))
    writer.watch(model, opt, log_every=2)
    x, y = scenarios.teacher_data(16, (3, 32, 32))
    for step in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    writer.flush()  # still open: training goes on
    findings = tbdiag.report(str(tmp_path))
    assert ("conv2", "dead_relu") in {(f.layer, f.issue) for f in findings}
    for step in range(8, 12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    writer.flush()
    later = [f for f in tbdiag.report(str(tmp_path)) if f.issue == "dead_relu"]
    assert later[0].last_step == 10
    writer.close()


def test_rules_command_prints_the_table():
    out = cli("rules").stdout
    assert "dead_relu" in out and "source:" in out and "try:" in out


def test_report_rejects_a_bad_threshold_from_python(scenario_logdir):
    with pytest.raises(ValueError, match="unknown rule"):
        tbdiag.report(scenario_logdir, thresholds={"nope": 1})


def test_one_text_line_per_episode_across_layers():
    """A blow-up on every layer at once reads as one line naming the first layers, not one line per layer."""
    from tbdiag.read.report import render_json, render_text
    from tbdiag.rules.table import Finding

    def finding(layer, first=10, issue="exploding_gradient"):
        return Finding(run="r", layer=layer, issue=issue, severity="error", first_step=first, last_step=40,
                       value=50.0, message=f"{layer}: gradient RMS 50 exceeds 10 from step {first}")

    many = [finding(f"h.{i}.mlp") for i in range(51)] + [finding("lm_head", first=20)]
    text = render_text(many)
    rows = [line for line in text.splitlines() if line.startswith("ERROR")]
    assert len(rows) == 2, text
    assert "h.0.mlp +50" in rows[0] and "and 50 more layers from the same step: h.1.mlp, h.2.mlp" in rows[0]
    assert "lm_head" in rows[1] and "more layer" not in rows[1]
    assert "52 errors" in text
    assert len(json.loads(render_json(many))["findings"]) == 52, "the JSON keeps every finding"
