"""The Diagnostics tab's Transformer section, on a real attention instability and its fixed twin.

The logdir holds three real runs: "sick", the small pre-LN transformer of `attention_runs.tiny_lm` at lr 0.1
without warm-up and without qk-layernorm (Wortsman et al. 2023: both blocks' attention logits pass 100 and
their attention collapses to one-hot by step 10); "qk_norm", the same run with qk-layernorm (no attention finding); and
"spike", a small MLP with no attention at all and one bad batch between logging steps (`test_gradient_spike`),
whose gradient spike the Loss strip marks; and "moe", a tiny Mixtral whose biased router sends every token to
two of its four experts without a balancing loss (`test_moe_and_massive`).  The /transformer route is read through TensorBoard's own WSGI
app; the section is checked in headless Chromium against a real ``tensorboard`` process, at 1440 x 900, and
its screenshot is ``docs/diagnostics-transformer.png``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import plugin_helpers as h
import pytest
from werkzeug.test import Client

import tbdiag
from tbdiag.contract import schema
from tbdiag.contract.rundata import RunData
from tbdiag.read.reader import load_logdir
from tbdiag.rules import Finding

P = "/data/plugin/tbdiag"
ATTENTION = ["blocks.0.attn", "blocks.1.attn"]
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
SCREENSHOT = os.path.join(DOCS, "diagnostics-transformer.png")
SCREENSHOT_MOE = os.path.join(DOCS, "diagnostics-transformer-moe.png")


def _build(root: str) -> None:
    import torch
    from attention_runs import tiny_lm

    torch.set_num_threads(1)
    tiny_lm(os.path.join(root, "sick"), steps=150, lr=0.1)
    tiny_lm(os.path.join(root, "qk_norm"), steps=150, lr=0.1, qk_norm=True)
    from test_gradient_spike import train

    train(os.path.join(root, "spike"), bad="inputs")
    from test_moe_and_massive import biased_router, tiny_mixtral, train_lm

    torch.manual_seed(0)
    model = tiny_mixtral(aux=0.0)
    biased_router(model)
    train_lm(os.path.join(root, "moe"), model, steps=40)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return h.session_logdir(tmp_path_factory, "transformer", _build)


@pytest.fixture(scope="module")
def client(logdir):
    app, _ingester = h.wsgi_app(logdir)
    return Client(app)


def get(client: Client, url: str, status: int = 200) -> dict:
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.get_data(as_text=True)[:500])
    return h.strict_json(r.get_data(as_text=True))


# ------------------------------------------------------------------ the route


def test_route_names_the_attention_modules_their_thresholds_and_the_heads(client, logdir):
    sick = get(client, f"{P}/transformer?run=sick")
    assert [m["stat"] for m in sick["heatmaps"]] == ["attn_logit_max", "attn_entropy"]  # no router in this model
    logit, entropy = sick["heatmaps"]
    assert logit["modules"] == 2 and logit["lines"] == [{"rule": "attention_logit_growth", "severity": "warning",
                                                          "direction": "above", "label": "attention_logit_growth",
                                                          "value": 100.0}]
    assert entropy["lines"][0]["direction"] == "below" and entropy["lines"][0]["value"] == 0.1
    assert [m["layer"] for m in sick["modules"]] == ATTENTION
    report = tbdiag.report(os.path.join(logdir, "sick"))
    for module in sick["modules"]:
        by_issue = {f["issue"]: f for f in module["findings"]}
        assert {"attention_logit_growth", "attention_entropy_collapse"} <= set(by_issue)
        growth = by_issue["attention_logit_growth"]
        head = growth["head"]
        # the head named is the one the run's own column holds most often over the finding's steps
        (run,) = load_logdir(os.path.join(logdir, "sick"))
        i = run.layer_names.index(module["layer"])
        at = (run.steps >= growth["first_step"]) & (run.steps <= growth["last_step"])
        heads = run.column("attn_logit_head")[at, i].astype(int)
        assert head["head"] == np.bincount(heads).argmax() and head["steps_on_head"] == np.bincount(heads).max()
        assert head["steps_flagged"] == int(at.sum()) and head["text"].startswith(f"head {head['head']} holds")
        # the report's message names the head at the finding's last step: the same column
        message = next(f.message for f in report if f.layer == module["layer"] and f.issue == growth["issue"])
        assert f"(head {head['last_head']})" in message
    twin = get(client, f"{P}/transformer?run=qk_norm")
    assert [m["layer"] for m in twin["modules"]] == ATTENTION
    assert all(m["findings"] == [] for m in twin["modules"])
    mlp = get(client, f"{P}/transformer?run=spike")
    assert mlp == {"run": "spike", "heatmaps": [], "modules": []}  # the tab hides the section


def test_route_lists_routers_with_their_expert_load_threshold(client):
    moe = get(client, f"{P}/transformer?run=moe")
    assert [m["stat"] for m in moe["heatmaps"]] == ["attn_logit_max", "attn_entropy", "expert_top_share"]
    load = moe["heatmaps"][2]
    assert load["kind"] == "router" and load["modules"] == 2
    assert load["lines"] == [{"rule": "expert_collapse", "severity": "warning", "direction": "above",
                              "label": "expert_collapse", "value": 0.9}]
    kinds = {m["layer"]: m["kind"] for m in moe["modules"]}
    assert kinds == {"model.layers.0.self_attn": "attention", "model.layers.1.self_attn": "attention",
                     "model.layers.0.mlp.gate": "router", "model.layers.1.mlp.gate": "router"}
    gate = next(m for m in moe["modules"] if m["layer"] == "model.layers.0.mlp.gate")
    (collapse,) = [f for f in gate["findings"] if f["issue"] == "expert_collapse"]
    assert collapse["word"] == "experts" and collapse["head"] is None  # a router has no head to name
    assert all(f["issue"] in ("expert_collapse", "attention_logit_growth", "attention_entropy_collapse")
               for m in moe["modules"] for f in m["findings"])  # an eps-dominated router stays in the table
    # the drill-down's charts get the rule's lines too: the busiest expert's share and the idle experts
    series = get(client, f"{P}/series?run=moe&layer=model.layers.0.mlp.gate")
    assert series["thresholds"]["expert_top_share"][0]["value"] == 0.9
    assert series["thresholds"]["experts_idle_frac"][0]["value"] == 0.25


def test_route_applies_threshold_overrides_and_answers_400_with_a_reason(client):
    moved = get(client, f"{P}/transformer?run=sick&threshold=attention_logit_growth%3D1e9")
    assert moved["heatmaps"][0]["lines"][0]["value"] == 1e9
    assert all(f["issue"] != "attention_logit_growth" for m in moved["modules"] for f in m["findings"])
    assert "run" in get(client, f"{P}/transformer", 400)["error"]
    assert "nope" in get(client, f"{P}/transformer?run=nope", 400)["error"]
    bad = get(client, f"{P}/transformer?run=sick&threshold=attention_logit_growth%3Dhigh", 400)["error"]
    assert "attention_logit_growth" in bad and "number" in bad
    assert "unknown" in get(client, f"{P}/transformer?run=sick&threshold=no_such_rule%3D1", 400)["error"].lower()


def test_the_head_named_is_the_most_frequent_over_the_findings_steps():
    from tb_plugin.transformer_payload import named_head

    steps = np.arange(6, dtype=np.int64) * 10
    stats = np.full((6, 1, len(schema.COLUMNS)), np.nan, dtype=np.float32)
    stats[:, 0, schema.COLUMN_INDEX["attn_logit_head"]] = [0, 2, 2, 2, 1, np.nan]
    run = RunData("r", schema.LayerTable(layers=[schema.LayerInfo("h.0.attn", "Attention")]), steps, stats)
    f = Finding(run="r", layer="h.0.attn", issue="attention_logit_growth", severity="warning", first_step=10,
                last_step=40, value=1.0, message="", spans=((10, 20), (30, 40)))
    named = named_head(run, 0, f, "attn_logit_head")
    assert (named["head"], named["steps_on_head"], named["steps_flagged"], named["last_head"]) == (2, 3, 4, 1)
    assert named["text"] == ("head 2 holds the max attention logit at 3 of 4 flagged logged steps "
                             "(at step 40, the last: head 1)")
    f.first_step, f.last_step, f.spans = 50, 50, None  # a step where no head was recorded
    assert named_head(run, 0, f, "attn_logit_head") is None


# ------------------------------------------------------------------ the tab


@pytest.mark.browser
def test_the_sick_block_its_finding_and_its_head_show_at_1440_by_900(logdir, client, tmp_path_factory):
    from test_plugin_browser import CHROMIUM_ARGS, _chromium_path, open_tab, select_only, select_runs

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    heads = {m["layer"]: {f["issue"]: f["head"] for f in m["findings"]}
             for m in get(client, f"{P}/transformer?run=sick")["modules"]}
    workdir = str(tmp_path_factory.mktemp("tb-transformer"))
    with sync_api.sync_playwright() as p, h.TensorBoardProcess(logdir, load_fast=False, workdir=workdir) as tb:
        browser = p.chromium.launch(executable_path=_chromium_path(), args=CHROMIUM_ARGS)
        tb.wait_for(f"{P}/findings?run=sick", lambda status, body: status == 200 and body["steps"]["last"] == 145)
        page, frame, watch = open_tab(browser, tb.url, width=1440, height=900)

        # a model without attention has no Transformer section; its gradient spike is marked on the Loss strip
        from test_gradient_spike import BAD_AT

        select_only(frame, "spike")
        mlp = frame.locator("section.panel[data-run='spike']")
        mlp.locator(".heat-canvas[data-rows]").first.wait_for(timeout=30_000)
        page.wait_for_timeout(500)
        assert mlp.locator(".transformer").is_hidden()
        loss = frame.locator(".loss-strip[data-run='spike'] canvas[data-marks]")
        loss.wait_for(timeout=30_000)
        marks = json.loads(loss.get_attribute("data-marks"))
        assert {"issue": "gradient_spike", "step": BAD_AT} in [{k: m[k] for k in ("issue", "step")} for m in marks]

        select_only(frame, "sick")
        panel = frame.locator("section.panel[data-run='sick']")
        section = panel.locator(".transformer")
        section.locator(".section-heatmap[data-stat='attn_entropy'] canvas.section-heat-canvas[data-rows]").wait_for(timeout=30_000)
        assert "2 attention modules · 2 flagged" in section.locator(".transformer-title").inner_text()
        listed = section.locator(".transformer-flags li").evaluate_all("(li) => li.map((e) => e.dataset.layer)")
        assert listed == ATTENTION
        # each flagged module in words above the heatmaps: its findings and the heads they name
        listed = section.locator(".transformer-flags li[data-layer='blocks.0.attn']").inner_text()
        for issue, head in heads["blocks.0.attn"].items():
            assert f"head {head['head']}" in listed, (issue, listed)
        assert "attn logits since step 10" in listed
        logit = section.locator(".section-heatmap[data-stat='attn_logit_max']")
        canvas = logit.locator("canvas.section-heat-canvas")
        canvas.wait_for(timeout=30_000)
        # one row per attention module, labelled by its block, every other layer left out
        assert json.loads(canvas.get_attribute("data-rows")) == ATTENTION
        assert panel.locator("canvas.heat-canvas").count() == 1  # the panel's own heatmap stays the only one
        assert json.loads(canvas.get_attribute("data-labels")) == ["blocks.0 attn", "blocks.1 attn"]
        # the threshold is on the legend, and the cells past it are underlined in the warning colour
        assert "attention_logit_growth above 100" in logit.locator(".legend").inner_text()
        assert int(canvas.get_attribute("data-past-threshold")) > 0
        underline = """(c, [row, xFrac]) => {
            const dpr = c.width / c.clientWidth, h = Number(c.dataset.rowHeight), g = Number(c.dataset.gutter);
            const x = g + xFrac * (c.clientWidth - g - 4);
            const px = c.getContext('2d').getImageData(Math.round(x * dpr), Math.round(((row + 1) * h - 1) * dpr), 1, 1);
            return Array.from(px.data.slice(0, 3));
        }"""
        late, early = canvas.evaluate(underline, [0, 0.95]), canvas.evaluate(underline, [0, 0.02])
        assert late[0] > 200 and late[1] < 80 and late[2] < 80, f"no warning underline once past 100: {late}"
        assert not (early[0] > 200 and early[1] < 80), f"underlined before the logits passed 100: {early}"
        entropy = section.locator(".section-heatmap[data-stat='attn_entropy']")
        assert "attention_entropy_collapse below 10%" in entropy.locator(".legend").inner_text()
        # entropy: low is the alarming end, so the collapsed cells (after step 10) are the deep red ones
        ent = entropy.locator("canvas.section-heat-canvas")
        cell = """(c, xFrac) => {
            const dpr = c.width / c.clientWidth, h = Number(c.dataset.rowHeight), g = Number(c.dataset.gutter);
            const x = g + xFrac * (c.clientWidth - g - 4);
            return Array.from(c.getContext('2d').getImageData(Math.round(x * dpr), Math.round(0.3 * h * dpr), 1, 1)
                .data.slice(0, 3));
        }"""
        assert ent.evaluate(cell, 0.9)[1] < 60, "a collapsed entropy is not drawn deep red"
        assert ent.evaluate(cell, 0.005)[1] > 150, "the healthy first step is not drawn pale"

        # a click on block 0's row opens its charts, the thresholds drawn, the head named in words
        box = canvas.bounding_box()
        row_h = float(canvas.get_attribute("data-row-height"))
        gutter = float(canvas.get_attribute("data-gutter"))
        canvas.click(position={"x": gutter + (box["width"] - gutter) * 0.8, "y": row_h * 0.5})
        drill = panel.locator(".drill")
        drill.locator("canvas.chart[data-stat='attn_logit_max']").wait_for(timeout=10_000)
        assert drill.locator(".drill-head strong").inner_text() == "blocks.0.attn"
        for stat in ("attn_logit_max", "attn_entropy"):
            assert int(drill.locator(f"canvas.chart[data-stat='{stat}']").get_attribute("data-threshold-lines")) >= 1
        text = drill.inner_text()
        assert "attention_logit_growth = 100" in text and "attention_entropy_collapse = 10%" in text
        named = heads["blocks.0.attn"]["attention_logit_growth"]
        note = drill.locator(".drill-findings li", has=frame.locator(".flag[data-issue='attention_logit_growth']"))
        assert note.locator(".head-note").get_attribute("data-head") == str(named["head"])
        assert named["text"] in note.locator(".head-note").inner_text()
        page.mouse.move(5, 5)
        section.evaluate("(e) => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(300)
        os.makedirs(DOCS, exist_ok=True)
        page.screenshot(path=SCREENSHOT)

        # a mixture of experts: its routers' load is a heatmap of its own, the collapsed router flagged
        select_only(frame, "moe")
        moe = frame.locator("section.panel[data-run='moe'] .transformer")
        load = moe.locator(".section-heatmap[data-stat='expert_top_share'] canvas.section-heat-canvas[data-rows]")
        load.wait_for(timeout=30_000)
        assert json.loads(load.get_attribute("data-rows")) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
        assert json.loads(load.get_attribute("data-labels")) == ["layers.0 mlp.gate", "layers.1 mlp.gate"]
        assert int(load.get_attribute("data-past-threshold")) > 0
        assert "expert_collapse above 90%" in moe.locator(".section-heatmap[data-stat='expert_top_share'] .legend").inner_text()
        assert "experts since step 0" in moe.locator(".transformer-flags li[data-layer='model.layers.0.mlp.gate']").inner_text()
        page.mouse.move(5, 5)
        moe.evaluate("(e) => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(300)
        page.screenshot(path=SCREENSHOT_MOE)

        # the fixed twin: the same section, nothing past a threshold, nothing flagged
        select_only(frame, "qk_norm")
        twin = frame.locator("section.panel[data-run='qk_norm'] .transformer")
        twin.locator(".section-heatmap[data-stat='attn_entropy'] canvas.section-heat-canvas[data-rows]").wait_for(timeout=30_000)
        assert "none flagged" in twin.locator(".transformer-title").inner_text()
        for stat in ("attn_logit_max", "attn_entropy"):
            c = twin.locator(f".section-heatmap[data-stat='{stat}'] canvas.section-heat-canvas")
            assert json.loads(c.get_attribute("data-rows")) == ATTENTION
            assert c.get_attribute("data-past-threshold") == "0"
        twin_hi = float(twin.locator(".section-heatmap[data-stat='attn_logit_max'] canvas.section-heat-canvas").get_attribute("data-scale-hi"))
        assert twin_hi == 100.0, "the twin's logits stay under 100: the threshold is the top of its own scale"

        # side by side, both runs' max-logit maps share one colour scale (the sick run's range)
        select_runs(frame, ["sick", "qk_norm"])
        his = {}
        for run in ("sick", "qk_norm"):
            c = frame.locator(f"section.panel[data-run='{run}'] .section-heatmap[data-stat='attn_logit_max'] canvas.section-heat-canvas")
            c.wait_for(timeout=30_000)
            page.wait_for_function(
                "(c) => Number(c.dataset.scaleHi) > 1000", arg=c.element_handle(), timeout=10_000)
            his[run] = float(c.get_attribute("data-scale-hi"))
        assert his["sick"] == his["qk_norm"] > 1000, his
        assert watch.errors == [] and watch.dialogs == []
        page.close()
        browser.close()
