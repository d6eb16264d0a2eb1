"""The Diagnostics tab at the scale people train: six 12-block GPT-2 runs side by side.

Six runs of `recipes.gpt2` (100 layer rows each: 88 layers and 12 attention modules) at six learning rates, one
with a dead MLP block (``dead_block=6``: its GELU never fires) and one whose
weights are poisoned with a NaN at step 30 (what a blow-up at lr 0.1 leaves:
NaN everywhere from then on).  A real ``tensorboard`` serves them; headless
Chromium ticks all six at 1440x900 and at 1920x1080, and checks what a person
needs to read them without hovering: the sick layer first in its table with
its flag in view, a labelled row for every layer in the heatmap (rows never
measured for the statistic left out, and said so), NaN told apart from "not
measured", one colour scale across the runs, and drill-down charts scaled to
the data.  The screenshots are ``docs/diagnostics-gpt2-6-runs-1440.png`` and
``docs/diagnostics-gpt2-6-runs-1920.png``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
import urllib.parse
import warnings

import numpy as np
import plugin_helpers as h
import pytest
from test_plugin_browser import CHROMIUM_ARGS, DOCS, _chromium_path, layout_problems, open_tab, select_runs

pytestmark = pytest.mark.browser

STEPS, LOG_EVERY, N_LAYER = 60, 5, 12
DEAD_RUN, NAN_RUN = "gpt2-lr3e-3-dead-h6", "gpt2-lr1e-1-nan"
DEAD_LAYER, NAN_LAYER = "transformer.h.6.mlp.c_fc", "transformer.h.9.mlp.c_proj"
HEALTHY_RUNS = ["gpt2-lr3e-4", "gpt2-lr1e-3", "gpt2-lr1e-2", "gpt2-lr3e-2"]
#: the order the runs are ticked in (the panels follow it): the worst run opens first, the dead one next
RUNS = [NAN_RUN, DEAD_RUN, *HEALTHY_RUNS]
SIZES = [(1440, 900), (1920, 1080)]
MAGENTA = (255, 0, 255)


def _build(root: str) -> None:
    """Six GPT-2 runs, 12 blocks, 60 steps logged every 5: ~15 s on one thread."""
    import recipes
    import scenarios
    import torch
    import transformers

    with scenarios.one_thread():
        for name, lr in zip(HEALTHY_RUNS, (3e-4, 1e-3, 1e-2, 3e-2)):
            recipes.gpt2(os.path.join(root, name), steps=STEPS, log_every=LOG_EVERY, n_layer=N_LAYER, lr=lr)
        recipes.gpt2(os.path.join(root, DEAD_RUN), steps=STEPS, log_every=LOG_EVERY, n_layer=N_LAYER, lr=3e-3,
                     dead_block=6)
        # lr 0.1 without warm-up, and at step 30 one weight of h.9's MLP output goes NaN: from there the loss,
        # every gradient and (through AdamW) every weight is NaN
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(recipes.gpt2_config(N_LAYER))
        opt = recipes.adamw(model, 0.1, weight_decay=0.1)
        data = recipes.stride_sequences(4096, 0)

        def loss_of(m, step):
            if step == 30:
                with torch.no_grad():
                    m.transformer.h[9].mlp.c_proj.weight[0, 0] = float("nan")
            x = data[torch.arange(step * 16, (step + 1) * 16) % len(data)]
            return m(input_ids=x, labels=x).loss

        with warnings.catch_warnings():  # tbdiag warns where the NaN appeared: it is the point here
            warnings.simplefilter("ignore", RuntimeWarning)
            recipes.train_loop(os.path.join(root, NAN_RUN), model, opt, recipes.warmup_cosine(opt, STEPS, 0),
                               loss_of, STEPS, LOG_EVERY)


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def gpt2_six(tmp_path_factory):
    pytest.importorskip("transformers")
    logdir = h.session_logdir(tmp_path_factory, "gpt2-6-runs", _build)
    with h.TensorBoardProcess(logdir, load_fast=False, workdir=str(tmp_path_factory.mktemp("tb-gpt2-6"))) as tb:
        last = (STEPS // LOG_EVERY - 1) * LOG_EVERY
        tb.wait_for("/data/plugin/tbdiag/runs", lambda status, body: status == 200 and sorted(
            (r["run"], r["last_step"]) for r in body["runs"]) == sorted((r, last) for r in RUNS))
        for run in RUNS:  # every step of every run read: the tab opens on the worst run
            tb.wait_for(f"/data/plugin/tbdiag/findings?run={run}",
                        lambda status, body: status == 200 and body["steps"]["count"] == STEPS // LOG_EVERY)
        yield tb


def route(tb, path: str, **params) -> dict:
    status, body = h.get_json(f"{tb.url}/data/plugin/tbdiag/{path}?{urllib.parse.urlencode(params)}")
    assert status == 200, body
    return body


def heatmap_data(tb, run: str, stat: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """The /heatmap answer, its matrix and its mask of NaN values."""
    heat = route(tb, "heatmap", run=run, stat=stat)
    matrix = np.frombuffer(base64.b64decode(heat["values"]), "<f4").reshape(heat["shape"])
    nan = np.zeros(heat["shape"], bool) if heat["nan_values"] is None else \
        np.frombuffer(base64.b64decode(heat["nan_values"]), np.uint8).reshape(heat["shape"]).astype(bool)
    return heat, matrix, nan


PIXEL = """(c, [x, y]) => {
    const dpr = c.width / c.clientWidth;
    return Array.from(c.getContext('2d').getImageData(Math.round(x * dpr), Math.round(y * dpr), 1, 1).data.slice(0, 3));
}"""
CELL = """(c, [row, step, steps]) => {
    const h = Number(c.dataset.rowHeight), g = Number(c.dataset.gutter), w = c.clientWidth - g - 4;
    const dpr = c.width / c.clientWidth;
    const x = g + (step + 0.5) * w / steps, y = (row + 0.5) * h;
    return Array.from(c.getContext('2d').getImageData(Math.round(x * dpr), Math.round(y * dpr), 1, 1).data.slice(0, 3));
}"""


def panel_of(frame, run: str):
    return frame.locator(f"section.panel[data-run='{run}']")


def choose_stat(frame, stat: str, label: str) -> None:
    frame.locator("#stat-select").select_option(stat)
    for run in RUNS:
        title = panel_of(frame, run).locator(".heatmap .section-title")
        deadline = time.time() + 30
        while not title.inner_text().startswith(label):
            assert time.time() < deadline, f"{run}: the heatmap did not switch to {stat}"
            time.sleep(0.2)
    frame.locator("body").evaluate("() => new Promise((r) => requestAnimationFrame(() => r()))")


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h_}" for w, h_ in SIZES])
def test_six_gpt2_runs_read_without_hovering(chromium, gpt2_six, size):
    width, height = size
    tb = gpt2_six
    page, frame, watch = open_tab(chromium, tb.url, width=width, height=height)
    select_runs(frame, RUNS)
    assert layout_problems(page, frame) == []
    # six runs: one row of six at 1920px, two rows of three at 1440px
    assert frame.locator("#panels").get_attribute("data-columns") == ("6" if width >= 1920 else "3")

    # ---- the table: the sick layer first, its flag in view, its name whole
    for run, layer, word in ((DEAD_RUN, DEAD_LAYER, "dead"), (NAN_RUN, NAN_LAYER, "NaN/Inf")):
        panel = panel_of(frame, run)
        assert panel.locator("select.order-select").input_value() == "worst", run
        first = panel.locator("tr.layer-row").first
        assert first.get_attribute("data-layer") == layer, run
        assert word in first.locator("td.flags .flag").all_inner_texts(), run
        assert first.locator("td.name").inner_text().replace("\n", "") == layer.removeprefix("transformer."), run
        assert "worst first" in panel.locator(".table-host .muted").inner_text()
    for run in HEALTHY_RUNS:  # worst first where a layer has more than an info finding (lr 3e-2: growing)
        panel = panel_of(frame, run)
        severities = route(tb, "rules")["severities"]
        sick = [f["layer"] for f in route(tb, "findings", run=run)["findings"]
                if f["layer"] and severities.index(f["severity"]) > 0]
        order = panel.locator("select.order-select").input_value()
        first = panel.locator("tr.layer-row").first.get_attribute("data-layer")
        assert (order, first in sick) == ("worst", True) if sick else (order, first) == ("model", "transformer.wte")

    for run in RUNS:
        panel = panel_of(frame, run)
        pbox = panel.bounding_box()
        host = panel.locator(".table-host")
        assert host.evaluate("(e) => e.scrollWidth <= e.clientWidth + 1"), f"{run}: the table scrolls sideways"
        right = min(pbox["x"] + pbox["width"], host.bounding_box()["x"] + host.bounding_box()["width"])

        def inside(b, left=pbox["x"], right=right):
            return b["x"] >= left - 0.5 and b["x"] + b["width"] <= right + 0.5
        flags_head = panel.locator("table.layers th.col-flags").bounding_box()
        assert inside(flags_head) and flags_head["width"] >= 50, (run, flags_head, pbox)
        for chip in panel.locator("tr.layer-row").first.locator(".flag").all():
            box = chip.bounding_box()
            assert inside(box), (run, box, pbox)
            assert chip.evaluate("(e) => e.scrollWidth <= e.clientWidth + 1"), f"{run}: a flag's word is cut"
        # every name is shown whole (shortened by the shared "transformer.", wrapped at dots, never cut)
        cut = panel.locator("tr.layer-row td.name").evaluate_all(
            "(tds) => tds.filter((td) => td.scrollWidth > td.clientWidth + 1).map((td) => td.textContent)")
        assert cut == [], f"{run}: names cut short: {cut[:5]}"
        assert "names without “transformer.”" in panel.locator(".table-host .muted").inner_text()

    # ---- NaN is a value ("NaN", magenta), not "not measured" ("–")
    nan_row = panel_of(frame, NAN_RUN).locator(f"tr.layer-row[data-layer='{NAN_LAYER}']")
    cells = dict(zip(panel_of(frame, NAN_RUN).locator("table.layers th").all_inner_texts(),
                     nan_row.locator("td").all_inner_texts()))
    grad_rms = nan_row.locator("td.col-stat").first
    assert grad_rms.inner_text() == "NaN" and "not-finite" in grad_rms.get_attribute("class")
    assert grad_rms.evaluate("(e) => getComputedStyle(e).color") == "rgb(192, 0, 192)"
    assert "–" in cells.values(), f"an unmeasured statistic (dead units of a layer no GELU reads) shows '–': {cells}"
    assert nan_row.locator("td.col-stat", has_text="–").count() >= 1

    # the screenshot: what a person sees first, before touching anything
    page.mouse.move(5, 5)
    page.wait_for_timeout(300)
    shot = os.path.join(DOCS, f"diagnostics-gpt2-6-runs-{width}.png")
    page.screenshot(path=shot)

    # ---- the heatmap of gradient norms: a labelled row per measured layer, NaN in magenta
    choose_stat(frame, "grad_norm", "gradient L2 norm")
    heat, matrix, nan = heatmap_data(tb, NAN_RUN, "grad_norm")
    unmeasured = [name for name, row, bad in zip(heat["layers"], matrix, nan) if np.isnan(row).all() and not bad.any()]
    assert 0 < len(unmeasured) < len(heat["layers"]) and all(".mlp.act" in n or n.endswith(".attn") or n == "lm_head"
                                                                     for n in unmeasured)
    for run in RUNS:
        panel = panel_of(frame, run)
        canvas = panel.locator("canvas.heat-canvas")
        note = panel.locator(".heat-note")
        assert note.get_attribute("data-hidden") == str(len(unmeasured)), run
        assert f"{len(unmeasured)} of 100 layers not shown: never measured" in note.inner_text(), run
        rows = json.loads(canvas.get_attribute("data-rows"))
        labels = json.loads(canvas.get_attribute("data-labels"))
        assert len(rows) == 100 - len(unmeasured) == int(canvas.get_attribute("data-layers")), run
        assert not set(rows) & set(unmeasured)
        assert int(canvas.get_attribute("data-row-height")) >= 11, run
        assert len(labels) == len(rows) and all(labels), f"{run}: unlabelled heatmap rows"
        # the blocks are labelled once each ("h.6 ln_1"), every row by its name inside its block
        assert sum(label.startswith("h.") for label in labels) == N_LAYER, labels
        assert labels[rows.index(DEAD_LAYER)].endswith("mlp.c_fc") and labels[rows.index("transformer.wte")] == "wte"
        assert canvas.evaluate("(c) => c.height / (window.devicePixelRatio || 1)") >= 11 * len(rows)

    nan_canvas = panel_of(frame, NAN_RUN).locator("canvas.heat-canvas")
    rows = json.loads(nan_canvas.get_attribute("data-rows"))
    steps = heat["shape"][1]
    i = heat["layers"].index(NAN_LAYER)
    assert nan[i, -1] and np.isnan(matrix[i, -1]), "the route marks the NaN gradient norm as a value"
    assert tuple(nan_canvas.evaluate(CELL, [rows.index(NAN_LAYER), steps - 1, steps])) == MAGENTA
    assert tuple(nan_canvas.evaluate(CELL, [rows.index(NAN_LAYER), 0, steps])) != MAGENTA
    legend = panel_of(frame, NAN_RUN).locator(".heatmap .legend").inner_text()
    assert "not measured" in legend and "NaN/Inf" in legend
    # the mark left of a row is the word of its worst flag, in that flag's colour
    dead_canvas = panel_of(frame, DEAD_RUN).locator("canvas.heat-canvas")
    rows = json.loads(dead_canvas.get_attribute("data-rows"))
    chip = dead_canvas.evaluate("""(c, row) => {
        const h = Number(c.dataset.rowHeight), g = Number(c.dataset.gutter), w = Number(c.dataset.chipWidth);
        return [g - w + 1.5, (row + 0.5) * h - 3.5];
    }""", rows.index(DEAD_LAYER))
    r, g, b = dead_canvas.evaluate(PIXEL, chip)
    assert r > 180 and g < 110 and b < 110, f"no warning-red flag mark left of {DEAD_LAYER}: {(r, g, b)}"

    # ---- exactly 0 on a log scale (the dead layer passes back no gradient): black, not the ramp's minimum
    _, dead_matrix, _ = heatmap_data(tb, DEAD_RUN, "grad_norm")
    assert (dead_matrix[heat["layers"].index(DEAD_LAYER)] == 0).all()
    for step in (0, steps // 2, steps - 1):
        assert tuple(dead_canvas.evaluate(CELL, [rows.index(DEAD_LAYER), step, steps])) == (0, 0, 0)
    positive = [k for k, name in enumerate(rows) if (dead_matrix[heat["layers"].index(name)] > 0).all()]
    assert positive and all(tuple(dead_canvas.evaluate(CELL, [k, 0, steps])) != (0, 0, 0) for k in positive)
    dead_legend = panel_of(frame, DEAD_RUN).locator(".heatmap .legend")
    assert "exactly 0" in dead_legend.inner_text()
    assert dead_legend.locator(".swatch.zero").evaluate("(e) => getComputedStyle(e).backgroundColor") == "rgb(0, 0, 0)"
    x, y = dead_canvas.evaluate("""(c, [row, step, steps]) => {
        const h = Number(c.dataset.rowHeight), g = Number(c.dataset.gutter), w = c.clientWidth - g - 4;
        return [g + (step + 0.5) * w / steps, (row + 0.5) * h];
    }""", [rows.index(DEAD_LAYER), steps // 2, steps])
    dead_canvas.hover(position={"x": x, "y": y})  # scrolled into view first: the panel may be below the fold
    tip = panel_of(frame, DEAD_RUN).locator(".heatmap .tip")
    tip.wait_for(state="visible", timeout=5_000)
    assert f"{DEAD_LAYER} · step" in tip.inner_text() and "gradient L2 norm 0 ·" in tip.inner_text(), tip.inner_text()
    page.mouse.move(5, 5)

    # ---- one colour scale: the same value is the same colour in every panel
    healthy = {run: heatmap_data(tb, run, "grad_norm")[1] for run in HEALTHY_RUNS[:2]}
    a, b = (healthy[run] for run in HEALTHY_RUNS[:2])
    same = [k for k in range(a.shape[0]) if np.isfinite(a[k, 0]) and a[k, 0] == b[k, 0]]
    assert len(same) > 10, "the runs start from the same weights and batch: equal step-0 gradient norms"
    layers = heat["layers"]

    def colours(run: str) -> list[tuple[int, ...]]:
        canvas = panel_of(frame, run).locator("canvas.heat-canvas")
        shown = json.loads(canvas.get_attribute("data-rows"))
        return [tuple(canvas.evaluate(CELL, [shown.index(layers[k]), 0, steps])) for k in same]

    scales = {frame.locator(f"section.panel[data-run='{run}'] canvas.heat-canvas").evaluate(
        "(c) => c.dataset.scaleLo + ':' + c.dataset.scaleHi") for run in RUNS}
    assert len(scales) == 1, f"one colour scale for all six runs: {scales}"
    assert colours(HEALTHY_RUNS[0]) == colours(HEALTHY_RUNS[1])
    assert "one scale for 6 runs" in panel_of(frame, NAN_RUN).locator(".heatmap .legend").inner_text()
    frame.locator("#shared-scale").uncheck()  # each run its own scale: the same value, other colours
    page.wait_for_timeout(300)
    scales = {frame.locator(f"section.panel[data-run='{run}'] canvas.heat-canvas").evaluate(
        "(c) => c.dataset.scaleLo + ':' + c.dataset.scaleHi") for run in HEALTHY_RUNS[:2]}
    assert len(scales) == 2
    assert colours(HEALTHY_RUNS[0]) != colours(HEALTHY_RUNS[1])
    frame.locator("#shared-scale").check()
    page.wait_for_timeout(300)
    assert colours(HEALTHY_RUNS[0]) == colours(HEALTHY_RUNS[1])

    # ---- dead units: measured on the 12 layers a GELU reads; the others are left out, and the note says so
    choose_stat(frame, "dead_frac", "dead units")
    canvas = dead_canvas
    assert canvas.get_attribute("data-layers") == "12"
    assert panel_of(frame, DEAD_RUN).locator(".heat-note").get_attribute("data-hidden") == "88"  # 100 rows - 12
    rows = json.loads(canvas.get_attribute("data-rows"))
    assert all(r.endswith(".mlp.c_fc") for r in rows)
    assert json.loads(canvas.get_attribute("data-labels"))[6] == "h.6 mlp.c_fc"
    red = canvas.evaluate(CELL, [rows.index(DEAD_LAYER), steps - 1, steps])
    assert red[0] > 100 and red[1] < 40 and red[2] < 40, f"the dead block is not a red stripe: {red}"

    assert layout_problems(page, frame) == []
    assert watch.errors == [] and watch.dialogs == []
    page.close()


def test_drilldown_charts_are_scaled_to_their_data(chromium, gpt2_six):
    tb = gpt2_six
    page, frame, watch = open_tab(chromium, tb.url, width=1440, height=900)
    select_runs(frame, [NAN_RUN, DEAD_RUN, HEALTHY_RUNS[1]])

    def open_charts(run: str, layer: str):
        panel = panel_of(frame, run)
        panel.locator(f"tr.layer-row[data-layer='{layer}']").click()
        panel.locator(".drill canvas.chart").first.wait_for(timeout=10_000)
        page.wait_for_timeout(300)
        return panel.locator(".drill")

    def chart(drill, stat: str) -> dict:
        c = drill.locator(f"canvas.chart[data-stat='{stat}']")
        out = c.evaluate("(c) => Object.assign({}, c.dataset)")
        out["legend"] = c.locator("xpath=following-sibling::div[1]").inner_text()
        return out

    # a healthy layer: its gradient RMS fills the chart; the exploding (10) and vanishing (1e-7) limits, decades
    # away, are not drawn -- the legend says where they are
    layer = "transformer.h.3.attn.c_proj"
    drill = open_charts(HEALTHY_RUNS[1], layer)
    series = [v for v in route(tb, "series", run=HEALTHY_RUNS[1], layer=layer, stat="grad_rms")["series"]["grad_rms"]
              if isinstance(v, float) and v > 0]
    lo, hi = min(series), max(series)
    c = chart(drill, "grad_rms")
    y_min, y_max = float(c["yMin"]), float(c["yMax"])
    assert y_min <= lo and y_max >= hi
    assert math.log10(y_max / y_min) <= math.log10(hi / lo) + 0.3, (y_min, y_max, lo, hi)
    assert c["thresholdLines"] == "0"
    assert "exploding_gradient = 10.0: above the range" in c["legend"]
    assert "vanishing_gradient (absolute) = 1.0e-7: below the range" in c["legend"]
    labels = json.loads(c["yLabels"])
    assert len(set(labels)) == len(labels) == 2

    # the dead layer: a nearly constant activation mean is drawn flat, with labels that differ; the 50% dead
    # threshold is drawn across its 100%; its gradient is exactly 0 on a log scale: on the bottom edge, labelled
    drill = open_charts(DEAD_RUN, DEAD_LAYER)
    mean = [v for v in route(tb, "series", run=DEAD_RUN, layer=DEAD_LAYER, stat="act_mean")["series"]["act_mean"]
            if isinstance(v, float)]
    c = chart(drill, "act_mean")
    span = float(c["yMax"]) - float(c["yMin"])
    assert float(c["yMin"]) <= min(mean) and float(c["yMax"]) >= max(mean)
    assert span >= 0.1 * max(abs(v) for v in mean) > 5 * (max(mean) - min(mean)), "a tiny drift drawn as a climb"
    labels = json.loads(c["yLabels"])
    assert len(set(labels)) == len(labels) == 2, labels
    c = chart(drill, "dead_frac")
    assert c["thresholdLines"] == "1" and "dead_relu = 50%" in c["legend"]
    c = chart(drill, "grad_rms")
    assert c["zeroBand"] == "true" and json.loads(c["yLabels"]) == ["0"]
    assert "every value exactly 0" in c["legend"] and "above the range" in c["legend"]
    zero_row = drill.locator("canvas.chart[data-stat='grad_rms']").evaluate("""(c) => {
        const ctx = c.getContext('2d'), dpr = c.width / c.clientWidth;
        const y = Math.round((c.height / dpr - 18 - 1) * dpr);  // the bottom edge of the plot
        const d = ctx.getImageData(Math.round(60 * dpr), y - 2, c.width - Math.round(70 * dpr), 4).data;
        let blue = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 150 && d[i] < 80) blue++;
        return blue;
    }""")
    assert zero_row > 20, "the zeros are not drawn on the bottom edge"

    # NaN gradients: magenta ticks where they are, and the legend counts them
    drill = open_charts(NAN_RUN, NAN_LAYER)
    c = chart(drill, "grad_rms")
    assert int(c["notFinite"]) >= 5 and "NaN/Inf at" in c["legend"]
    magenta = drill.locator("canvas.chart[data-stat='grad_rms']").evaluate("""(c) => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 240 && d[i + 1] < 20 && d[i + 2] > 240) n++;
        return n;
    }""")
    assert magenta > 20
    assert watch.errors == [] and watch.dialogs == []
    page.close()


def test_the_loss_is_pinned_above_the_histogram_cards_in_time_series(chromium, gpt2_six):
    """TensorBoard's Time Series sorts its card groups by tag name: activations/, grads/ and params/ (one
    histogram card per tag and run, 2,244 on this sweep) all come before train/loss.  The tab's link opens it
    with the run's loss curves pinned (TensorBoard's own ``pinnedCards`` URL parameter): the loss is the first
    card, at the top of the page.  Without the link, Time Series' tag filter and its saved pins do it."""
    tb = gpt2_six
    page, frame, watch = open_tab(chromium, tb.url, width=1440, height=900)
    link = panel_of(frame, NAN_RUN).locator(".loss-strip a.timeseries-link")
    link.wait_for(timeout=15_000)
    href = link.get_attribute("href")
    assert href.endswith("#timeseries") and json.loads(urllib.parse.unquote(
        urllib.parse.urlparse(href).query.removeprefix("pinnedCards="))) == [{"plugin": "scalars", "tag": "train/loss"}]
    link.click()
    page.locator("metrics-card-group-toolbar").first.wait_for(timeout=60_000)
    # the groups, in TensorBoard's order: the histograms first, the loss's group after them
    deadline = time.time() + 60
    while True:
        # each group's toolbar reads "activations456 cards": its name, then how many cards it holds
        groups = [" ".join(t.split()) for t in page.locator("metrics-card-group-toolbar").all_inner_texts()]
        counts = {m.group(1): int(m.group(2)) for m in (re.match(r"^(.*?)\s*(\d+) cards?$", g) for g in groups) if m}
        if "train" in counts or time.time() > deadline:
            break
        time.sleep(0.5)
    names = list(counts)
    assert {"activations", "grads", "params", "train"} <= set(names), groups
    assert names.index("activations") < names.index("train") and names.index("params") < names.index("train"), names
    histograms = sum(counts[g] for g in ("activations", "grads", "params"))
    assert histograms == 2244, counts  # 76 activations, 149 parameters x (weights, gradients), x 6 runs
    pinned = page.locator("metrics-pinned-view scalar-card")
    pinned.first.wait_for(timeout=30_000)
    assert pinned.count() == 1 and pinned.first.inner_text().replace("\n", "").startswith("train/loss")
    box = pinned.first.bounding_box()
    assert box["y"] + box["height"] <= 900, f"the pinned loss card is not in the first screen: {box}"
    page.wait_for_timeout(1500)  # the chart's lines drawn
    page.screenshot(path=os.path.join(DOCS, "timeseries-loss-pinned.png"))
    # without the link: Time Series' own tag filter finds the loss among the histograms, and a card pinned
    # there stays pinned (TensorBoard saves scalar pins): plain /#timeseries opens with the loss on top
    page.goto(tb.url + "/#timeseries")
    page.reload()
    page.locator("metrics-tag-filter input").fill("loss")
    card = page.locator("metrics-filtered-view scalar-card").first
    card.wait_for(timeout=30_000)
    assert card.inner_text().replace("\n", "").startswith("train/loss")
    card.locator("button[title='Pin card']").click()
    page.goto(tb.url + "/#timeseries")
    page.reload()
    pinned = page.locator("metrics-pinned-view scalar-card")
    pinned.first.wait_for(timeout=30_000)
    assert pinned.first.inner_text().replace("\n", "").startswith("train/loss")
    assert watch.errors == [] and watch.dialogs == []
    page.close()
