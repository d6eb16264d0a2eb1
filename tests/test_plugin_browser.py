"""The Diagnostics tab in a real browser, against a real ``tensorboard`` process.

A logdir written by real training (a run whose conv2 ReLUs are dead, and a
healthy one) is served by ``tensorboard`` on 127.0.0.1; headless Chromium
opens ``/#tbdiag`` and works inside the plugin's iframe like a person would.
The screenshot it takes is the one in the README (``docs/diagnostics-tab.png``).
"""

from __future__ import annotations

import os
import shutil

import plugin_helpers as h
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                          "diagnostics-tab.png")


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
        page, frame, watch = open_tab(browser, tb.url)
        select_only(frame, "sick")
        panel = frame.locator("section.panel[data-run='sick']")

        # the banner names the sick layer and the illness
        banner = panel.locator(".banner")
        assert "sev-warning" in banner.get_attribute("class")
        headline = banner.locator(".headline").inner_text()
        assert headline.startswith(f"WARNING\n{h.DEAD_LAYER}: dead") or f"{h.DEAD_LAYER}: dead" in headline, headline
        assert "100% of its ReLU units never fire" in headline

        # the table, in model order, flags conv2 (colour + word + tooltip) and not fc2
        names = panel.locator("tr.layer-row td.name").all_inner_texts()
        assert names == ["conv1", "conv2", "fc1", "fc2"]
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
        assert "Healthy" in healthy.locator(".banner").inner_text()
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
