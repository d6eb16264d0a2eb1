"""The Diagnostics tab in a real browser, against a real ``tensorboard`` process.

A logdir written by real training (a run whose conv2 ReLUs are dead, and a
healthy one) is served by ``tensorboard`` on 127.0.0.1; headless Chromium
opens ``/#tbdiag`` and works inside the plugin's iframe like a person would.
The screenshots it takes are the ones in the README and docs
(``docs/diagnostics-tab.png``, ``docs/diagnostics-tab-3-runs.png``).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import plugin_helpers as h
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
SCREENSHOT = os.path.join(DOCS, "diagnostics-tab.png")
SCREENSHOT_3_RUNS = os.path.join(DOCS, "diagnostics-tab-3-runs.png")


def _chromium_path() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (CI installs the Debian package; see .ci/run)")
    return found


@pytest.fixture(scope="module")
def browser():
    path = _chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageWatch:
    """Collects what must never happen on the page: script errors and dialogs (alert, confirm...)."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def open_tab(browser, url: str, width: int = 1500, height: int = 1000):
    page = browser.new_page(viewport={"width": width, "height": height})
    watch = PageWatch(page)
    page.goto(url + "/#tbdiag")
    frame = page.frame_locator("iframe")  # TensorBoard loads the plugin's ES module into an iframe
    frame.locator("tr.layer-row").first.wait_for(timeout=60_000)
    return page, frame, watch


def select_only(frame, run: str) -> None:
    """Use the tab's run selector to show exactly ``run``."""
    for chip in frame.locator("label.run-chip").all():
        box = chip.locator("input")
        want = chip.get_attribute("data-run") == run
        if box.is_checked() != want:
            box.click()
    frame.locator(f"section.panel[data-run='{run}'] tr.layer-row").first.wait_for(timeout=30_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return h.session_logdir(tmp_path_factory, "trained", h.build_trained_logdir), str(
        tmp_path_factory.mktemp("tb-browser"))


def test_sick_layer_is_flagged_and_its_drilldown_opens(browser, trained):
    logdir, workdir = trained
    with h.TensorBoardProcess(logdir, load_fast=False, workdir=workdir) as tb:
        # TensorBoard reads the logdir in the background: the tab opens on the sick run's findings once all are read
        tb.wait_for("/data/plugin/tbdiag/findings?run=sick", lambda status, body: status == 200 and body["steps"] == {
            "count": 20, "first": 0, "last": 38})
        page, frame, watch = open_tab(browser, tb.url)
        select_only(frame, "sick")
        panel = frame.locator("section.panel[data-run='sick']")

        # the banner names the sick layer and the illness
        banner = panel.locator(".banner")
        assert "sev-warning" in banner.get_attribute("class")
        headline = banner.locator(".headline").inner_text()
        assert headline.startswith(f"WARNING\n{h.DEAD_LAYER}: dead") or f"{h.DEAD_LAYER}: dead" in headline, headline
        assert "100% of its ReLU units never fire" in headline

        # the table lists the sick layer first (the run has a warning: worst first), in model order on request;
        # it flags conv2 (colour + word + tooltip) and not fc2
        assert panel.locator("select.order-select").input_value() == "worst"
        names = panel.locator("tr.layer-row td.name").all_inner_texts()
        assert names[0] == h.DEAD_LAYER and sorted(names) == ["conv1", "conv2", "fc1", "fc2"], names
        panel.locator("select.order-select").select_option("model")
        names = panel.locator("tr.layer-row td.name").all_inner_texts()
        assert names == ["conv1", "conv2", "fc1", "fc2"]
        assert "model order" in panel.locator(".table-host .muted").inner_text()
        row = panel.locator(f"tr.layer-row[data-layer='{h.DEAD_LAYER}']")
        assert "row-warning" in row.get_attribute("class")
        chip = row.locator(".flag[data-issue='dead_relu']")
        assert chip.inner_text() == "dead"
        tooltip = chip.get_attribute("title")
        for words in ("dead_frac", "Threshold: 0.500", f"since step {h.DEAD_FROM}", "What to try", "LeakyReLU"):
            assert words in tooltip, (words, tooltip)
        assert panel.locator("tr.layer-row[data-layer='fc2'] .flag").count() == 0

        # the heatmap draws conv2's row (index 1) deep red after it died, pale before
        canvas = panel.locator("canvas.heat-canvas")
        pixel = """(c, xFrac) => {
            const dpr = c.width / c.clientWidth, h = Number(c.dataset.rowHeight), g = Number(c.dataset.gutter);
            const x = g + xFrac * (c.clientWidth - g - 4);
            const px = c.getContext('2d').getImageData(Math.round(x * dpr), Math.round(1.5 * h * dpr), 1, 1);
            return Array.from(px.data.slice(0, 3));
        }"""
        late, early = canvas.evaluate(pixel, 0.97), canvas.evaluate(pixel, 0.03)
        assert late[0] > 100 and late[1] < 40 and late[2] < 40, f"conv2's heatmap row is not red at the end: {late}"
        assert early[1] > 150, f"conv2's heatmap row is already red before it died: {early}"

        # click the layer: its charts open, with the dead_relu threshold drawn
        row.click()
        drill = panel.locator(".drill")
        drill.locator("canvas.chart[data-stat='dead_frac']").wait_for(timeout=10_000)
        assert drill.locator(".drill-head strong").inner_text() == h.DEAD_LAYER
        dead_chart = drill.locator("canvas.chart[data-stat='dead_frac']")
        assert int(dead_chart.get_attribute("data-threshold-lines")) >= 1
        assert "dead_relu = 50%" in drill.inner_text()
        # the threshold line is really drawn: a dashed red line at 50% on the canvas
        line_px = dead_chart.evaluate(
            """(c) => {
                const ctx = c.getContext('2d'); let red = 0;
                const d = ctx.getImageData(0, 0, c.width, c.height).data;
                for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 90 && d[i + 2] < 90) red++;
                return red;
            }"""
        )
        assert line_px > 20, "no threshold line pixels on the dead_frac chart"
        page.mouse.move(5, 5)  # no hover highlight in the picture
        page.wait_for_timeout(300)
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        page.screenshot(path=SCREENSHOT)

        # only flagged layers: fc2 (healthy) disappears from table and heatmap
        frame.locator("#only-flagged").check()
        assert panel.locator("tr.layer-row[data-layer='fc2']").count() == 0
        assert panel.locator("tr.layer-row").count() == 3
        assert canvas.get_attribute("data-layers") == "3"
        frame.locator("#only-flagged").uncheck()

        # a second run side by side: the healthy one says so
        frame.locator("label.run-chip[data-run='healthy'] input").check()
        healthy = frame.locator("section.panel[data-run='healthy']")
        healthy.locator("tr.layer-row").first.wait_for(timeout=30_000)
        assert frame.locator("section.panel").count() == 2
        assert "Healthy: no rule fired across 4 layers × 20 logged steps" in healthy.locator(".banner").inner_text()
        assert healthy.locator(".flag").count() == 0

        assert watch.errors == [] and watch.dialogs == []
        page.close()


def test_html_in_layer_and_run_names_is_shown_as_text(browser, tmp_path_factory):
    logdir = h.session_logdir(tmp_path_factory, "xss", h.build_xss_logdir)
    with h.TensorBoardProcess(logdir, load_fast=False, workdir=str(tmp_path_factory.mktemp("tb-xss"))) as tb:
        page, frame, watch = open_tab(browser, tb.url)
        panel = frame.locator("section.panel")
        assert panel.locator("h2.run-name").inner_text() == h.XSS_RUN
        assert frame.locator("label.run-chip").inner_text().strip() == h.XSS_RUN
        cell = panel.locator("tr.layer-row td.name").filter(has_text=h.XSS_NAME)
        assert cell.inner_text() == h.XSS_NAME
        # open its drill-down and hover the heatmap: more places that print the name
        cell.click()
        panel.locator(".drill-head strong").wait_for(timeout=10_000)
        assert panel.locator(".drill-head strong").inner_text() == h.XSS_NAME
        box = panel.locator("canvas.heat-canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] - 20, box["y"] + box["height"] - 30)
        page.wait_for_timeout(500)
        # nothing was parsed as HTML: no <img> element exists, no script ran
        assert frame.locator("img").count() == 0
        assert watch.dialogs == [], f"a name was executed as HTML: {watch.dialogs}"
        assert watch.errors == []
        page.close()


# ------------------------------------------------------------ runs side by side


SCREENSHOT_LOSS = os.path.join(DOCS, "diagnostics-loss-and-rules.png")


def test_the_loss_strip_marks_findings_and_every_rule_setting_is_editable(browser, trained):
    logdir, workdir = trained
    with h.TensorBoardProcess(logdir, load_fast=False, workdir=workdir) as tb:
        tb.wait_for("/data/plugin/tbdiag/findings?run=sick", lambda status, body: status == 200 and body["steps"] == {
            "count": 20, "first": 0, "last": 38})
        page, frame, watch = open_tab(browser, tb.url, width=1440, height=900)
        select_only(frame, "sick")
        panel = frame.locator("section.panel[data-run='sick']")

        # ---- the loss under the banner, the layer that died marked at its step, with its word and tooltip
        strip = panel.locator(".loss-strip")
        chart = strip.locator("canvas.loss-chart")
        chart.wait_for(timeout=10_000)
        assert strip.evaluate("(e) => e.previousElementSibling.classList.contains('banner')")
        assert "train/loss" in strip.locator(".section-title").inner_text()
        marks = json.loads(chart.get_attribute("data-marks"))
        assert {"issue": "dead_relu", "step": h.DEAD_FROM} in [{k: m[k] for k in ("issue", "step")} for m in marks]
        chip = strip.locator(".loss-marks .flag[data-issue='dead_relu']")
        assert chip.inner_text() == f"dead in {h.DEAD_LAYER} · step {h.DEAD_FROM}"
        assert "100% of its ReLU units never fire" in chip.get_attribute("title")
        assert "sev-warning" in chip.get_attribute("class")
        # the mark is drawn: a dashed warning-red line at the step's x, its word in a red box above the frame
        x = next(m["x"] for m in marks if m["issue"] == "dead_relu")
        red = chart.evaluate("""(c, x) => {
            const dpr = c.width / c.clientWidth, d = c.getContext('2d').getImageData(
                Math.round((x - 1) * dpr), 0, Math.round(3 * dpr), c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 190 && d[i + 1] < 100 && d[i + 2] < 100) n++;
            return n;
        }""", x)
        assert red > 40, red
        blue = chart.evaluate("""(c) => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] < 60 && d[i + 1] < 130 && d[i + 2] > 160) n++;
            return n;
        }""")
        assert blue > 100, "the loss curve is not drawn"
        # hovering the mark's step names it
        box = chart.bounding_box()
        page.mouse.move(box["x"] + x, box["y"] + box["height"] / 2)
        tip = strip.locator(".tip")
        tip.wait_for(state="visible", timeout=5_000)
        assert f"step {h.DEAD_FROM}" in tip.inner_text() and "dead:" in tip.inner_text(), tip.inner_text()

        # ---- Rules & thresholds: threshold, persistence and every param have an input
        frame.locator("details.thresholds summary").click()
        settings = frame.locator("details.thresholds input.thr-input")
        keys = settings.evaluate_all("(els) => els.map((e) => e.dataset.setting)")
        for key in ("dead_relu", "dead_relu.persistence", "vanishing_gradient.absolute", "vanishing_gradient.update",
                    "loss_spike.history", "loss_spike.z", "input_bound.warning", "neglected_class.min_support"):
            assert key in keys, key
        # a bad value: the server's reason next to the input, nothing applied
        persistence = frame.locator("input[data-setting='loss_spike.persistence']")
        persistence.fill("2.5")
        persistence.press("Enter")
        error = persistence.locator("xpath=following-sibling::div[contains(@class, 'thr-error')]")
        error.wait_for(state="visible", timeout=10_000)
        assert "whole number" in error.inner_text() and "invalid" in persistence.get_attribute("class")
        assert frame.locator("body").evaluate("() => document.querySelectorAll('input.thr-input.edited').length") == 0
        # a param edit reaches the charts' threshold lines: vanishing_gradient.absolute on conv2's gradient RMS
        panel.locator(f"tr.layer-row[data-layer='{h.DEAD_LAYER}']").click()
        drill = panel.locator(".drill")
        drill.locator("canvas.chart[data-stat='grad_rms']").wait_for(timeout=10_000)
        assert "vanishing_gradient (absolute) = 1.0e-7" in drill.inner_text()
        absolute = frame.locator("input[data-setting='vanishing_gradient.absolute']")
        absolute.fill("0.002")
        absolute.press("Enter")
        drill.get_by_text("vanishing_gradient (absolute) = 0.00200").wait_for(timeout=15_000)
        assert "edited" in frame.locator("input[data-setting='vanishing_gradient.absolute']").get_attribute("class")
        frame.locator("details.thresholds summary").click()  # closed again: the picture shows the run
        page.mouse.move(5, 5)
        page.wait_for_timeout(300)
        page.screenshot(path=SCREENSHOT_LOSS)
        frame.locator("details.thresholds summary").click()
        # a threshold edit reaches the loss marks: conv2 at 100% dead is silent above 100%
        dead = frame.locator("input[data-setting='dead_relu']")
        dead.fill("1.01")
        dead.press("Enter")
        strip.locator(".loss-marks .flag[data-issue='dead_relu']").wait_for(state="detached", timeout=15_000)
        assert "2 setting(s) differ from the defaults" in frame.locator(".rules-head").inner_text()
        frame.locator("button.reset").click()
        strip.locator(".loss-marks .flag[data-issue='dead_relu']").wait_for(timeout=15_000)
        assert watch.errors == [] and watch.dialogs == []
        page.close()


def select_runs(frame, runs: list[str]) -> None:
    """Show exactly ``runs``, in this order (panels follow the order runs were ticked in)."""
    chips = {chip.get_attribute("data-run"): chip.locator("input") for chip in frame.locator("label.run-chip").all()}
    shown = frame.locator("section.panel").evaluate_all("(ps) => ps.map((p) => p.dataset.run)")
    keep = 0  # the panels already shown in the wanted order stay
    while keep < min(len(shown), len(runs)) and shown[keep] == runs[keep]:
        keep += 1
    for name in shown[keep:]:
        chips[name].click()
    for name in runs[keep:]:
        chips[name].click()
    for name in runs:
        panel = frame.locator(f"section.panel[data-run='{name}']")
        panel.locator("tr.layer-row").first.wait_for(timeout=30_000)
        panel.locator("canvas.heat-canvas[data-layers]").wait_for(timeout=30_000)
    assert frame.locator("section.panel").evaluate_all("(ps) => ps.map((p) => p.dataset.run)") == runs


def layout_problems(page, frame) -> list[str]:
    """Everything wrong with how the panels sit: outside the window or the page, overlapping, canvases too wide."""
    page.wait_for_timeout(400)  # resize observers and a frame of drawing
    iframe = page.locator("iframe").bounding_box()
    left, right = iframe["x"], min(page.viewport_size["width"], iframe["x"] + iframe["width"])
    problems, boxes = [], []
    for panel in frame.locator("section.panel").all():
        run, box = panel.get_attribute("data-run"), panel.bounding_box()
        boxes.append((run, box))
        if box["x"] < left - 0.5 or box["x"] + box["width"] > right + 0.5:
            problems.append(f"panel {run} spans x {box['x']:.0f}..{box['x'] + box['width']:.0f}, "
                            f"window {left:.0f}..{right:.0f}")
        for canvas in panel.locator("canvas").all():
            cb = canvas.bounding_box()
            if cb is None:  # not displayed
                continue
            if cb["x"] < box["x"] - 0.5 or cb["x"] + cb["width"] > box["x"] + box["width"] + 0.5:
                problems.append(f"a canvas of {run} ({cb['width']:.0f}px at x {cb['x']:.0f}) leaves its panel "
                                f"({box['width']:.0f}px at x {box['x']:.0f})")
        # heatmaps are drawn for the width they have, not stretched from an old one
        stale = panel.locator("canvas.heat-canvas").evaluate(
            "(c) => Math.abs(c.width / (window.devicePixelRatio || 1) - c.clientWidth) > 1")
        if stale:
            problems.append(f"the heatmap of {run} was drawn for another width")
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        dx = min(ba["x"] + ba["width"], bb["x"] + bb["width"]) - max(ba["x"], bb["x"])
        dy = min(ba["y"] + ba["height"], bb["y"] + bb["height"]) - max(ba["y"], bb["y"])
        if dx > 0.5 and dy > 0.5:
            problems.append(f"panels {a} and {b} overlap by {dx:.0f} x {dy:.0f} px")
    overflow = frame.locator("body").evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    if overflow > 0:
        problems.append(f"the page scrolls sideways by {overflow}px")
    return problems


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    logdir = h.session_logdir(tmp_path_factory, "side-by-side", h.build_side_by_side_logdir)
    with h.TensorBoardProcess(logdir, load_fast=False, workdir=str(tmp_path_factory.mktemp("tb-side"))) as tb:
        yield tb


def test_one_to_six_runs_fit_side_by_side(browser, side_by_side):
    page, frame, watch = open_tab(browser, side_by_side.url)
    for n in range(1, 7):
        select_runs(frame, h.SIDE_BY_SIDE_RUNS[:n])
        assert layout_problems(page, frame) == [], f"{n} run(s) ticked"
    # three runs with a drill-down open, in a narrower window, then a wider one again
    select_runs(frame, ["sick", "healthy", "recovering"])
    sick = frame.locator("section.panel[data-run='sick']")
    sick.locator(f"tr.layer-row[data-layer='{h.DEAD_LAYER}']").click()
    sick.locator("canvas.chart[data-stat='dead_frac']").wait_for(timeout=10_000)
    for width in (1500, 1100, 760, 1500):
        page.set_viewport_size({"width": width, "height": 1000})
        assert layout_problems(page, frame) == [], f"window {width}px wide"
    widths = frame.locator("canvas.heat-canvas").evaluate_all("(cs) => cs.map((c) => c.clientWidth)")
    assert min(widths) > 300, f"heatmaps did not grow back with the window: {widths}"
    assert watch.errors == [] and watch.dialogs == []
    page.close()


def _move_slider(panel, step: int, log_every: int = 10) -> None:
    """Drag the panel's step slider to logged step ``step`` (the slider counts logged steps) and wait for its table."""
    panel.locator("input.step-slider").evaluate(
        f"(s) => {{ s.value = String({step // log_every}); s.dispatchEvent(new Event('input')); }}")
    panel.locator(".table-host .muted").filter(has_text=f"statistics at step {step} ").wait_for(timeout=10_000)


def test_three_runs_read_well_side_by_side(browser, side_by_side):
    page, frame, watch = open_tab(browser, side_by_side.url)
    select_runs(frame, ["sick", "healthy", "recovering"])
    banner = frame.locator("section.panel[data-run='healthy'] .banner").inner_text()
    assert "Healthy: no rule fired across 4 layers × 20 logged steps (steps 0–38)" in banner, banner
    assert "sev-warning" in frame.locator("section.panel[data-run='sick'] .banner").get_attribute("class")
    # the recovering run at a step where both of its findings hold, and the charts of one that ended later
    recovering = frame.locator("section.panel[data-run='recovering']")
    _move_slider(recovering, 50)
    recovering.locator("tr.layer-row[data-layer='block2']").click()
    recovering.locator("canvas.chart[data-stat='grad_rms']").wait_for(timeout=10_000)
    assert layout_problems(page, frame) == []
    page.mouse.move(5, 5)
    page.wait_for_timeout(300)
    page.screenshot(path=SCREENSHOT_3_RUNS)
    assert watch.errors == [] and watch.dialogs == []
    page.close()


def test_a_flag_shows_only_while_its_finding_holds(browser, side_by_side):
    page, frame, watch = open_tab(browser, side_by_side.url)
    select_runs(frame, ["recovering"])
    panel = frame.locator("section.panel[data-run='recovering']")
    # the banner still names both findings: they happened
    assert "1 × dead" in panel.locator(".banner").inner_text()

    def chips() -> dict[str, list[str]]:
        return {row.get_attribute("data-layer"): row.locator(".flag").all_inner_texts()
                for row in panel.locator("tr.layer-row").all()}

    # block1's ReLUs are dead at steps 30..80, block2's gradients vanish at 40..90; both recover
    expected = {
        20: {}, 30: {"block1": ["dead"]}, 50: {"block1": ["dead"], "block2": ["vanishing"]},
        90: {"block2": ["vanishing"]}, 100: {}, 150: {},
    }
    for step, flags in expected.items():
        _move_slider(panel, step)
        assert {k: v for k, v in chips().items() if v} == flags, f"at step {step}"
        tinted = panel.locator("tr.layer-row.row-warning").evaluate_all("(rs) => rs.map((r) => r.dataset.layer)")
        assert sorted(tinted) == sorted(flags), f"rows tinted at step {step}"
    assert watch.errors == [] and watch.dialogs == []
    page.close()


def test_answers_the_user_moved_on_from_are_dropped(browser, side_by_side):
    """`Requests` in the page itself: a newer request for the same thing, a closed panel, a closed drill-down."""
    page, frame, watch = open_tab(browser, side_by_side.url)
    got = frame.locator("body").evaluate("""async () => {
        const {Requests} = await import('/data/plugin/tbdiag/requests.js');
        const {state} = await import('/data/plugin/tbdiag/state.js');
        const pending = [];
        const realFetch = window.fetch;
        window.fetch = (url) => new Promise((resolve) => pending.push({url, resolve}));
        const answer = (i, body, status = 200) => pending[i].resolve(
            new Response(JSON.stringify(body), {status, headers: {'Content-Type': 'application/json'}}));
        state.thresholds = {dead_relu: '0.7'};
        const r = new Requests();
        const out = [];
        const older = r.get('table', 'layers', {run: 'a', step: 10});
        const newer = r.get('table', 'layers', {run: 'a', step: 20});
        const other = r.get('heatmap', 'heatmap', {run: 'a', stat: 'x'});
        answer(1, {step: 20}); answer(0, {step: 10}); answer(2, {heat: 1});  // out of order
        out.push(await older, await newer, await other);
        const closedPanel = r.get('series', 'series', {}); r.abandon(); answer(3, {late: 1});
        out.push(await closedPanel);
        const closedDrill = r.get('series', 'series', {}); r.forget('series'); answer(4, {late: 2});
        out.push(await closedDrill);
        const staleError = r.get('x', 'x'); const error = r.get('x', 'x');
        answer(5, {error: 'old'}, 400); answer(6, {error: 'new'}, 400);
        out.push(await staleError);
        try { await error; out.push('no error'); } catch (err) { out.push(err.message); }
        out.push(pending[1].url);
        window.fetch = realFetch; state.thresholds = {};
        return out;
    }""")
    assert got[:7] == [None, {"step": 20}, {"heat": 1}, None, None, None, "new"], got
    assert got[7] == "layers?run=a&step=20&threshold=dead_relu%3D0.7", got[7]
    assert watch.errors == [] and watch.dialogs == []
    page.close()


def test_a_late_answer_does_not_overwrite_a_newer_choice(browser, side_by_side):
    """The network answers out of order: what the user chose last is what stays on screen."""
    page, frame, watch = open_tab(browser, side_by_side.url)
    select_runs(frame, ["recovering"])
    panel = frame.locator("section.panel[data-run='recovering']")
    # from now on the server is slow to answer for gradient norms and for the table at step 30
    frame.locator("body").evaluate("""() => {
        const real = window.fetch;
        window.fetch = (url, ...rest) => /stat=grad_norm|step=30(&|$)/.test(String(url))
            ? new Promise((resolve) => setTimeout(() => resolve(real(url, ...rest)), 1500))
            : real(url, ...rest);
    }""")
    frame.locator("#stat-select").select_option("grad_norm")
    frame.locator("#stat-select").select_option("dead_frac")
    panel.locator("input.step-slider").evaluate("(s) => { s.value = '3'; s.dispatchEvent(new Event('input')); }")
    page.wait_for_timeout(400)  # the slider waits for the hand to stop before asking
    _move_slider(panel, 120)
    page.wait_for_timeout(2500)  # the slow answers have arrived by now
    assert panel.locator(".heatmap .section-title").inner_text().startswith("dead units")
    assert "statistics at step 120 " in panel.locator(".table-host .muted").inner_text()
    assert watch.errors == [] and watch.dialogs == []
    page.close()


SCREENSHOT_GPT2 = os.path.join(DOCS, "diagnostics-gpt2-dead-gelu.png")


def _build_gpt2_logdir(root: str) -> None:
    """A GPT-2 (8 blocks, AdamW, warm-up + cosine) whose block 6 MLP is dead, and its healthy twin."""
    import recipes
    import scenarios

    with scenarios.one_thread():
        recipes.gpt2_dead_mlp(os.path.join(root, "gpt2-dead-block6"), steps=120)
        recipes.gpt2(os.path.join(root, "gpt2-healthy"), steps=120)


def test_a_dead_gelu_block_is_in_the_banner_not_called_healthy(browser, tmp_path_factory):
    """The GELU behind h.6.mlp.c_fc outputs 0 and passes back 0: a stripe in the heatmap, and the banner says so."""
    pytest.importorskip("transformers")
    logdir = h.session_logdir(tmp_path_factory, "gpt2-dead-gelu", _build_gpt2_logdir)
    with h.TensorBoardProcess(logdir, load_fast=False, workdir=str(tmp_path_factory.mktemp("tb-gpt2"))) as tb:
        page, frame, watch = open_tab(browser, tb.url, width=1440, height=900)
        select_only(frame, "gpt2-dead-block6")
        panel = frame.locator("section.panel[data-run='gpt2-dead-block6']")
        banner = panel.locator(".banner")
        text = banner.inner_text()
        assert "Healthy" not in text, text
        assert "sev-warning" in banner.get_attribute("class") or "sev-error" in banner.get_attribute("class")
        headline = banner.locator(".headline").inner_text()
        assert "transformer.h.6.mlp.c_fc: dead" in headline and "GELU" in headline, headline
        row = panel.locator("tr.layer-row[data-layer='transformer.h.6.mlp.c_fc']")
        assert row.locator(".flag[data-issue='dead_relu']").count() == 1
        flagged = panel.locator("tr.layer-row .flag").evaluate_all(
            "els => els.filter(e => !e.classList.contains('sev-info')).map(e => e.closest('tr').dataset.layer)")
        assert flagged and all(".h.6." in layer for layer in flagged), flagged
        page.mouse.move(5, 5)
        page.wait_for_timeout(300)
        page.screenshot(path=SCREENSHOT_GPT2)

        frame.locator("label.run-chip[data-run='gpt2-healthy'] input").check()
        healthy = frame.locator("section.panel[data-run='gpt2-healthy']")
        healthy.locator("tr.layer-row").first.wait_for(timeout=30_000)
        assert "Healthy: no rule fired" in healthy.locator(".banner").inner_text()
        assert watch.errors == [] and watch.dialogs == []
        page.close()
