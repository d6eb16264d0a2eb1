"""Throughput: the perf/* scalars, the input_bound rule, watch_loader, the /throughput route and the tab's strip.

Real training runs of the seed CNN read batches through a loader that sleeps
a known time per batch (a stand-in for decoding from disk, in the training
process).  The test times its own loop and compares the logged share of time
spent waiting for input with that direct measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import plugin_helpers as h  # noqa: E402
from cnn_slow_loader import cached_loader, slow_loader  # noqa: E402
from seed_cnn import Net  # noqa: E402

from tbdiag import DiagnosticWriter, report  # noqa: E402
from tbdiag.contract.rundata import RunData  # noqa: E402
from tbdiag.read.reader import load_logdir  # noqa: E402
from tbdiag.rules import (  # noqa: E402
    RULES_BY_NAME,
    evaluator,  # noqa: E402
    resolve,
)
from tbdiag.rules.throughput import INPUT_WAIT_TAG, SAMPLES_TAG, STEP_TIME_TAG  # noqa: E402
from tbdiag.watch.timing import StepTimer  # noqa: E402

LOG_EVERY = 5
STEPS = 31  # steps 1..30 fall in the logged windows (the first window opens at step 0's end)
BATCH = 64  # steps long enough that the loop's own code (add_scalar) is a small share of them


def train(logdir: str, data, *, optimizer: bool = True, steps: int = STEPS, watched_loader: bool = False,
          extra_delay: float = 0.0) -> dict:
    """Train the seed CNN; return the loop's own timing of steps 1..steps-1.

    ``fetch_share``: time inside the loader's ``__next__``; ``outside_share``: time outside forward..step (the
    loader plus the loop's own code, what tbdiag counts as input wait without ``watch_loader``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady step times on a shared machine
    try:
        return _train(logdir, data, optimizer=optimizer, steps=steps, watched_loader=watched_loader,
                      extra_delay=extra_delay)
    finally:
        torch.set_num_threads(threads)


def _train(logdir: str, data, *, optimizer: bool, steps: int, watched_loader: bool, extra_delay: float) -> dict:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt if optimizer else None, log_every=LOG_EVERY)
    if watched_loader:
        data = writer.watch_loader(data)
    it = iter(data)
    fetch = samples = compute = 0.0
    start = None
    for step in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        if optimizer:
            opt.zero_grad()
            loss.backward()
            opt.step()  # the step ends here
            t2 = time.perf_counter()
        else:  # a hand-written update: steps are counted from backward passes
            model.zero_grad()
            loss.backward()  # the step ends here
            t2 = time.perf_counter()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
        if step == 0:
            start = time.perf_counter()
        else:
            fetch, samples, compute = fetch + t1 - t0, samples + len(x), compute + t2 - t1
        if step % LOG_EVERY == 0:
            writer.add_scalar("train/loss", loss.item(), step)
        if extra_delay:
            time.sleep(extra_delay)  # slow code of the loop's own, outside the loader
    elapsed = time.perf_counter() - start
    writer.close()
    return {"fetch_share": fetch / elapsed, "outside_share": 1 - compute / elapsed,
            "ms": 1000 * elapsed / (steps - 1), "samples_per_sec": samples / elapsed}


def logged(logdir: str) -> RunData:
    (run,) = load_logdir(logdir)
    return run


def overall_share(run: RunData) -> float:
    """The logged windows' wait share, weighted by their length (each window has LOG_EVERY steps)."""
    steps, frac = run.perf[INPUT_WAIT_TAG]
    s2, ms = run.perf[STEP_TIME_TAG]
    assert list(steps) == list(s2)
    return float(np.sum(frac * ms) / np.sum(ms))


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("slow"))
    measured = train(logdir, slow_loader(0.05, batch=BATCH))
    return logdir, measured


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("fast"))
    measured = train(logdir, cached_loader(batch=BATCH))
    return logdir, measured


# ------------------------------------------------------------------ real runs


def test_slow_loader_is_input_bound_with_the_measured_share(slow_run):
    logdir, measured = slow_run
    run = logged(logdir)
    assert list(run.perf[INPUT_WAIT_TAG][0]) == list(range(LOG_EVERY, STEPS, LOG_EVERY))  # none at step 0
    # the loop gap: the loader plus the loop's own code (add_scalar), against the loop's own clock
    assert abs(overall_share(run) - measured["outside_share"]) < 0.05, (overall_share(run), measured)
    assert abs(overall_share(run) - measured["fetch_share"]) < 0.1, (overall_share(run), measured)
    assert measured["fetch_share"] > 0.35
    # step time and samples/s against the loop's own clock
    ms = run.perf[STEP_TIME_TAG][1]
    assert abs(np.mean(ms) - measured["ms"]) / measured["ms"] < 0.05
    sps = run.perf[SAMPLES_TAG][1]
    assert abs(len(sps) / np.sum(1 / sps) - measured["samples_per_sec"]) / measured["samples_per_sec"] < 0.05
    found = [f for f in report(logdir) if f.issue == "input_bound"]
    assert len(found) == 1
    f = found[0]
    assert f.severity == "warning" and f.layer is None and f.ongoing
    assert abs(f.value - measured["fetch_share"]) < 0.1
    assert "num_workers" in f.advice and "pin_memory" in f.advice


def test_cached_data_is_not_input_bound(fast_run):
    logdir, measured = fast_run
    run = logged(logdir)
    assert overall_share(run) < 0.1 and measured["fetch_share"] < 0.05
    assert not [f for f in report(logdir) if f.issue == "input_bound"]


def test_report_json_and_fail_on(slow_run, fast_run):
    def cli(logdir, *args):
        return subprocess.run([sys.executable, "-m", "tbdiag", "report", logdir, *args],
                              capture_output=True, text=True, check=False)

    proc = cli(slow_run[0], "--format", "json", "--fail-on", "warning")
    assert proc.returncode == 1, proc.stderr
    (f,) = [f for f in json.loads(proc.stdout)["findings"] if f["issue"] == "input_bound"]
    assert f["layer"] is None and f["severity"] == "warning" and "waits for its input" in f["message"]
    assert cli(slow_run[0], "--threshold", "input_bound.warning=0.99", "--fail-on", "warning").returncode == 0
    text = cli(slow_run[0]).stdout
    assert "input_bound" in text and "num_workers" in text
    assert cli(fast_run[0], "--fail-on", "warning").returncode == 0


def test_watch_loader_times_the_loader_only(tmp_path):
    """The loop sleeps 30 ms of its own after each step: the gap counts it, watch_loader does not."""
    gap_dir, exact_dir = str(tmp_path / "gap"), str(tmp_path / "exact")
    gap = train(gap_dir, slow_loader(0.03, batch=BATCH), steps=21, extra_delay=0.03)
    exact = train(exact_dir, slow_loader(0.03, batch=BATCH), steps=21, extra_delay=0.03, watched_loader=True)
    assert abs(overall_share(logged(exact_dir)) - exact["fetch_share"]) < 0.03
    assert overall_share(logged(gap_dir)) > gap["fetch_share"] + 0.15  # the loop's own sleep counted as waiting


def test_watch_loader_passes_the_loader_through(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    loader = slow_loader(0.0, batch=BATCH, seed=3)
    timed = writer.watch_loader(loader)
    assert len(timed) == len(loader) == 2048 // BATCH
    assert timed.dataset is loader.dataset and timed.sampler is loader.sampler and timed.batch_size is None
    got, want = list(timed), list(slow_loader(0.0, batch=BATCH, seed=3))
    assert len(got) == len(want) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                         for a, b in zip(got, want))
    with pytest.raises(TypeError, match="watch_loader"):
        writer.watch_loader(42)
    with pytest.raises(TypeError):
        len(writer.watch_loader(iter([1, 2])))  # a loader without len() keeps having none
    writer.close()


def test_without_an_optimizer_steps_are_backward_passes(tmp_path):
    measured = train(str(tmp_path), slow_loader(0.05, batch=BATCH), optimizer=False, steps=21)
    run = logged(str(tmp_path))
    assert list(run.perf[INPUT_WAIT_TAG][0]) == [5, 10, 15, 20]
    assert abs(overall_share(run) - measured["outside_share"]) < 0.05
    assert [f.severity for f in report(str(tmp_path)) if f.issue == "input_bound"] == ["warning"]


# ---------------------------------------------------------------- the timer


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_aggregates_cover_every_step_since_the_last_log():
    """Only non-logging steps wait (40 ms before steps 2 and 7): the logged share still counts them."""
    clock = FakeClock()
    timer = StepTimer(clock)
    x = torch.zeros(8, 3)
    out = []
    for step in range(11):
        clock.t += 0.04 if step % LOG_EVERY == 2 else 0.0  # the wait before this step's forward
        timer.forward_begins((x,), {})
        clock.t += 0.01  # compute
        timer.step_ends()
        if step % LOG_EVERY == 0:
            out.append(timer.flush())
        clock.t += 0.001 if step % LOG_EVERY == 0 else 0.0  # tbdiag's own work at a logging step
        timer.ready()
    assert out[0] == []  # step 0: no earlier step end to measure from
    for i, values in enumerate(out[1:]):
        d = dict(values)
        # the first window opens after step 0's end; later ones at a flush, before tbdiag's 1 ms of work
        window = 5 * 0.01 + 0.04 + (0.001 if i else 0.0)
        assert d[STEP_TIME_TAG] == pytest.approx(1000 * window / 5)
        assert d[INPUT_WAIT_TAG] == pytest.approx(0.04 / window)
        assert d[SAMPLES_TAG] == pytest.approx(5 * 8 / window)


def test_evaluation_between_steps_is_not_input_wait():
    clock = FakeClock()
    timer = StepTimer(clock)
    timer.step_ends(); timer.flush(); timer.ready()  # noqa: E702  (step 0)
    clock.t += 1.0  # an evaluation pass...
    timer.other_forward()  # ...whose forwards restart the wait clock
    clock.t += 0.002
    timer.forward_begins((torch.zeros(4),), {})
    clock.t += 0.01
    timer.step_ends()
    d = dict(timer.flush())
    assert d[INPUT_WAIT_TAG] == pytest.approx(0.002 / 1.012)


# ---------------------------------------------------------------- the rule


def perf_run(fracs, steps=None, step_ms=100.0) -> RunData:
    steps = steps or [5 * (i + 1) for i in range(len(fracs))]
    return RunData.from_samples("r", None, [], perf={INPUT_WAIT_TAG: (steps, fracs),
                                                     STEP_TIME_TAG: (steps, [step_ms] * len(fracs))})


def test_rule_levels_and_persistence():
    def found(fracs, thresholds=None):
        return evaluator.evaluate(perf_run(fracs), thresholds, rules=["input_bound"])

    assert found([0.01, 0.05, 0.1, 0.14]) == []
    assert [f.severity for f in found([0.2, 0.22, 0.2, 0.21])] == ["info"]
    (f,) = found([0.0, 0.6, 0.62, 0.64, 0.66])
    assert (f.severity, f.first_step, f.last_step, f.ongoing) == ("warning", 10, 25, True)
    assert f.value == pytest.approx(0.63) and "63%" in f.message and "63 of 100 ms" in f.message
    assert found([0.0, 0.6, 0.6, 0.0, 0.0, 0.0]) == []  # two logging steps: not persistent
    assert [f.severity for f in found([0.6] * 4, {"input_bound.warning": 0.7})] == ["info"]
    assert found([], None) == []
    # a tiny step's own loop code: 40% of a 2 ms step is 0.8 ms of waiting, below min_wait_ms
    tiny = perf_run([0.4] * 4, step_ms=2.0)
    assert evaluator.evaluate(tiny, rules=["input_bound"]) == []
    assert [f.severity for f in evaluator.evaluate(tiny, {"input_bound.min_wait_ms": 0.5}, rules=["input_bound"])] \
        == ["warning"]
    assert RULES_BY_NAME["input_bound"].params["warning"] == 0.3
    with pytest.raises(ValueError, match="input_bound.warning"):
        resolve({"input_bound.warnign": 0.5})


# ------------------------------------------------------------ the plugin route


def test_throughput_route(slow_run, fast_run, tmp_path):
    root = tmp_path / "logdir"
    root.mkdir()
    os.symlink(slow_run[0], root / "slow")
    os.symlink(fast_run[0], root / "fast")
    with h.TensorBoardProcess(str(root), load_fast=False, workdir=str(tmp_path)) as tb:
        base = tb.url + "/data/plugin/tbdiag/throughput"
        body = tb.wait_for("/data/plugin/tbdiag/throughput?run=slow", lambda s, b: s == 200 and b.get("findings"))
        tags = [s["tag"] for s in body["series"]]
        assert tags == [STEP_TIME_TAG, INPUT_WAIT_TAG, SAMPLES_TAG]
        assert body["series"][1]["steps"] == [5, 10, 15, 20, 25, 30]
        assert body["findings"][0]["severity"] == "warning" and body["findings"][0]["spans"]
        assert [line["value"] for line in body["lines"][INPUT_WAIT_TAG]] == [0.15, 0.3]
        status, fast = h.get_json(base + "?run=fast")
        assert status == 200 and fast["findings"] == [] and len(fast["series"]) == 3
        status, over = h.get_json(base + "?run=slow&threshold=input_bound.warning=0.99")
        assert over["findings"][0]["severity"] == "info" and over["lines"][INPUT_WAIT_TAG][1]["value"] == 0.99
        for query, reason in (("", "missing required query parameter 'run'"), ("?run=nope", "no tbdiag data"),
                              ("?run=slow&threshold=input_bound.x=1", "unknown setting")):
            status, err = h.get_json(base + query)
            assert status == 400 and reason in err["error"], (query, err)


# ------------------------------------------------------------------ the tab


@pytest.mark.browser
def test_tab_shows_the_throughput_strip(slow_run, fast_run, tmp_path):
    """Both runs side by side: each panel has its strip with three charts; the slow one is flagged."""
    from test_plugin_browser import CHROMIUM_ARGS, DOCS, _chromium_path, open_tab

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")

    root = tmp_path / "logdir"
    root.mkdir()
    os.symlink(slow_run[0], root / "slow_loader")
    os.symlink(fast_run[0], root / "cached_loader")
    with h.TensorBoardProcess(str(root), load_fast=False, workdir=str(tmp_path)) as tb, \
            sync_api.sync_playwright() as p:
        tb.wait_for("/data/plugin/tbdiag/runs", lambda s, b: s == 200 and len(b.get("runs", [])) == 2)
        browser = p.chromium.launch(executable_path=_chromium_path(), args=CHROMIUM_ARGS)
        page, frame, watch = open_tab(browser, tb.url, width=1500, height=900)
        for chip in frame.locator("label.run-chip").all():  # tick both runs
            if not chip.locator("input").is_checked():
                chip.locator("input").click()
        for run in ("slow_loader", "cached_loader"):
            strip = frame.locator(f"section.panel[data-run='{run}'] .throughput")
            strip.locator("canvas[data-tag='perf/samples_per_sec']").wait_for(timeout=30_000)
            assert strip.locator("canvas.chart").count() == 3
            titles = strip.locator(".chart-title").all_inner_texts()
            assert [t.split(" ·")[0] for t in titles] == ["Step time", "Input wait", "Samples/s"]
            # the charts are drawn: the canvases have a size and something on them
            drawn = strip.locator("canvas").first.evaluate(
                "c => c.width > 0 && c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v)")
            assert drawn
        slow = frame.locator("section.panel[data-run='slow_loader']")
        assert slow.locator(".throughput .flag.sev-warning").inner_text() == "input-bound"
        assert "input-bound" in slow.locator(".banner").inner_text()
        assert not frame.locator("section.panel[data-run='cached_loader'] .throughput .flag").count()
        wait_title = slow.locator(".throughput .chart-title").nth(1).inner_text()
        share = float(wait_title.split("last ")[1].rstrip("%")) / 100
        assert abs(share - slow_run[1]["fetch_share"]) < 0.15, (wait_title, slow_run[1])
        page.wait_for_timeout(300)
        os.makedirs(DOCS, exist_ok=True)
        page.screenshot(path=os.path.join(DOCS, "diagnostics-throughput.png"),
                        clip={"x": 0, "y": 0, "width": 1500, "height": 620})
        assert not watch.errors and not watch.dialogs
        browser.close()
