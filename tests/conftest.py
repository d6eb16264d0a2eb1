import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import scenarios  # noqa: E402


@pytest.fixture
def one_thread():
    """The test trains on one CPU thread (`scenarios.one_thread`)."""
    with scenarios.one_thread():
        yield


@pytest.fixture(scope="session")
def scenario_logdir(tmp_path_factory):
    """Every sick and healthy scenario trained once, as runs under one logdir."""
    root = tmp_path_factory.mktemp("scenarios")
    scenarios.build_all(str(root))
    return str(root)


@pytest.fixture(scope="session")
def scenario_report(scenario_logdir):
    """`tbdiag report --format json` over the scenarios, run as a user would (a subprocess)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tbdiag", "report", scenario_logdir, "--format", "json"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["findings"]
