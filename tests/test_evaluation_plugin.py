"""The Evaluation section of the Diagnostics tab: the /evaluation route and the section in a real browser.

The logdir is the evaluation example's two runs (`examples/cnn_evaluation.py`):
the seed CNN evaluated after every epoch, once where "cat" is a rare class
that looks like "dog" (neglected), once balanced (no finding).  The browser
test saves ``docs/diagnostics-evaluation.png``, the README's screenshot.
"""

from __future__ import annotations

import os
import sys

import plugin_helpers as h
import pytest
from werkzeug.test import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(ROOT, "docs", "diagnostics-evaluation.png")
P = "/data/plugin/tbdiag"


def _build(root: str) -> None:
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import cnn_evaluation

    cnn_evaluation.train(os.path.join(root, "eval_hard_cat"), hard_cat=True)
    cnn_evaluation.train(os.path.join(root, "eval_balanced"), hard_cat=False)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return h.session_logdir(tmp_path_factory, "evaluation", _build)


@pytest.fixture(scope="module")
def client(logdir):
    return Client(h.wsgi_app(logdir)[0])


def get(client: Client, url: str, status: int = 200):
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.get_data(as_text=True)[:500])
    return h.strict_json(r.get_data(as_text=True))


def test_route_serves_every_evaluation_with_the_weak_class_marked(client):
    body = get(client, f"{P}/evaluation?run=eval_hard_cat")
    (tag,) = body["tags"]
    evs = tag["evaluations"]
    assert tag["tag"] == "val" and [e["step"] for e in evs] == list(range(6))
    last = evs[-1]
    cat = last["class_names"].index("cat")
    assert last["weak"] == [cat] and last["recall"][cat] < 0.1 and not last["collapsed"]
    assert len(last["counts"]) == 10 and sum(map(sum, last["counts"])) == last["total"] == 1000
    assert [f["issue"] for f in tag["findings"]] == ["neglected_class"] and "'cat'" in tag["findings"][0]["message"]
    # the banner's source counts it too
    findings = get(client, f"{P}/findings?run=eval_hard_cat")
    assert any(k["issue"] == "neglected_class" for k in findings["summary"])

    balanced = get(client, f"{P}/evaluation?run=eval_balanced")["tags"][0]
    assert balanced["findings"] == [] and balanced["evaluations"][-1]["weak"] == []
    assert balanced["evaluations"][-1]["accuracy"] > 0.9
    # a threshold override changes what is marked, as everywhere else in the tab
    strict = get(client, f"{P}/evaluation?run=eval_balanced&threshold=neglected_class=1")["tags"][0]
    assert strict["evaluations"][-1]["weak"]


@pytest.mark.parametrize("query, words", [
    ("", "missing required query parameter 'run'"),
    ("?run=nope", "no tbdiag data for run 'nope'"),
    ("?run=eval_hard_cat&threshold=neglected_class=x", "must be a number"),
    ("?run=eval_hard_cat&threshold=neglected_class.nope=1", "unknown setting"),
])
def test_route_bad_requests_are_400(client, query, words):
    body = get(client, f"{P}/evaluation{query}", status=400)
    assert words in body["error"]


@pytest.mark.browser
def test_the_section_in_a_browser(logdir, tmp_path):
    from test_plugin_browser import CHROMIUM_ARGS, _chromium_path, open_tab, select_only

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with sync_api.sync_playwright() as p, h.TensorBoardProcess(logdir, load_fast=False, workdir=str(tmp_path)) as tb:
        browser = p.chromium.launch(executable_path=_chromium_path(), args=CHROMIUM_ARGS)
        page, frame, watch = open_tab(browser, tb.url, width=1500, height=1400)
        select_only(frame, "eval_hard_cat")
        panel = frame.locator("section.panel[data-run='eval_hard_cat']")
        section = panel.locator(".evaluation .eval-tag[data-tag='val']")
        section.wait_for(timeout=30_000)
        assert "neglected" in panel.locator(".banner").inner_text()

        # the grid: 10 x 10 cells with class names as text, the latest evaluation first
        assert section.get_attribute("data-step") == "5"
        assert section.locator("td.eval-cell").count() == 100
        heads = section.locator("th.eval-row").all_inner_texts()
        assert heads[:4] == ["airplane", "automobile", "bird", "cat"]
        assert "weak" in section.locator("th.eval-row").nth(3).get_attribute("class")
        cat_to_dog = section.locator("td.eval-cell[data-row='3'][data-col='5']")
        assert int(cat_to_dog.inner_text()) > 50  # most cats are taken for dogs

        # the metrics table marks cat, and only cat
        weak_rows = section.locator("tr.eval-class.weak")
        assert weak_rows.count() == 1 and weak_rows.get_attribute("data-class") == "cat"
        assert weak_rows.locator(".flag").inner_text() == "neglected"

        # hover a cell: what it counts
        cat_to_dog.hover()
        assert section.locator(".eval-hover").inner_text().startswith("true cat → predicted dog:")

        # the slider moves across evaluations: the first one is another matrix
        late = section.locator("td.eval-cell").all_inner_texts()
        section.locator("input.eval-slider").fill("0")
        assert section.get_attribute("data-step") == "0"
        assert "step 0" in section.locator(".section-title").inner_text()
        assert section.locator("td.eval-cell").all_inner_texts() != late

        # row-normalised: shares of each true class
        section.locator("input.eval-slider").fill("5")
        section.locator("input.eval-normalise").check()
        assert cat_to_dog.inner_text().endswith("%")

        # the accuracy chart is drawn (blue pixels of the series)
        blue = section.locator("canvas.eval-accuracy").evaluate(
            """(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] < 60 && d[i + 1] > 80 && d[i + 2] > 170) n++;
                return n; }""")
        assert blue > 50, blue
        section.locator("input.eval-normalise").uncheck()
        frame.locator(".evaluation").first.screenshot(path=SCREENSHOT)

        # side by side with the balanced run: its section has no weak class
        frame.locator("label.run-chip[data-run='eval_balanced'] input").check()
        other = frame.locator("section.panel[data-run='eval_balanced'] .eval-tag[data-tag='val']")
        other.wait_for(timeout=30_000)
        assert other.locator("tr.eval-class.weak").count() == 0
        assert frame.locator(".eval-tag").count() == 2
        assert not watch.errors and not watch.dialogs, (watch.errors, watch.dialogs)
        browser.close()
