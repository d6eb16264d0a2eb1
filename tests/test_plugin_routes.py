"""The Diagnostics plugin's routes, through TensorBoard's own WSGI app and data provider.

The logdir is written by real training runs (`plugin_helpers.train_run`); the
app is built from TensorBoard's parsed flags, its `LocalDataIngester` and its
`TensorBoardWSGIApp`, with the plugin found through the installed entry point.
"""

from __future__ import annotations

import base64
import json
import os
import time

import numpy as np
import plugin_helpers as h
import pytest
from werkzeug.test import Client

from tbdiag import report
from tbdiag.contract import schema
from tbdiag.read.reader import load_logdir

P = "/data/plugin/tbdiag"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return h.session_logdir(tmp_path_factory, "trained", h.build_trained_logdir)


@pytest.fixture(scope="module")
def client(logdir):
    app, _ingester = h.wsgi_app(logdir)
    return Client(app)


def get(client: Client, url: str, status: int = 200):
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.get_data(as_text=True)[:500])
    assert r.headers["Content-Type"].startswith("application/json")
    return h.strict_json(r.get_data(as_text=True))


# ------------------------------------------------------------ registration


def test_entry_point_registers_the_tab(client):
    from tensorboard import default

    from tb_plugin.diagnostics_plugin import DiagnosticsPlugin

    assert DiagnosticsPlugin in default.get_plugins(), "tensorboard_plugins entry point not installed"
    listing = get(client, "/data/plugins_listing")
    assert listing["tbdiag"]["enabled"] is True
    assert listing["tbdiag"]["tab_name"] == "Diagnostics"
    assert listing["tbdiag"]["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/tbdiag/index.js"}
    r = client.get(P + "/index.js")
    assert r.status_code == 200 and b"export async function render" in r.get_data()
    # every module the entry imports, and the stylesheet, as TensorBoard serves them
    static = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tb_plugin", "static")
    for name in os.listdir(static):
        r = client.get(f"{P}/{name}")
        assert r.status_code == 200, name
        assert r.headers["Content-Type"].startswith("text/javascript" if name.endswith(".js") else "text/css"), name
        with open(os.path.join(static, name), "rb") as f:
            assert r.get_data() == f.read(), name


def test_tab_is_hidden_without_tbdiag_data(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "plain")) as w:
        w.add_scalar("train/loss", 1.0, 0)
    app, _ = h.wsgi_app(str(tmp_path))
    listing = get(Client(app), "/data/plugins_listing")
    assert listing["tbdiag"]["enabled"] is False
    assert get(Client(app), P + "/runs") == {"runs": []}


def test_is_active_returns_at_once(logdir):
    from tensorboard.plugins import base_plugin

    from tb_plugin.diagnostics_plugin import DiagnosticsPlugin

    _, ingester = h.wsgi_app(logdir)
    plugin = DiagnosticsPlugin(base_plugin.TBContext(data_provider=ingester.data_provider, logdir=logdir))
    t = time.perf_counter()
    for _ in range(100):
        plugin.is_active()
    assert (time.perf_counter() - t) / 100 < 1e-3


# ------------------------------------------------------------------ routes


def test_runs_lists_every_tbdiag_run(client):
    runs = {r["run"]: r for r in get(client, P + "/runs")["runs"]}
    assert set(runs) == {"sick", "healthy"}
    assert runs["sick"]["last_step"] == 38  # 40 steps logged every 2: 0, 2, ..., 38


def test_findings_are_the_report_findings(client, logdir):
    body = get(client, P + "/findings?run=sick")
    expected = [f.to_json() for f in report(logdir) if f.run == "sick"]
    assert expected, "the report found nothing: the sick run is not sick"
    assert body["findings"] == json.loads(json.dumps(expected))
    dead = [f for f in body["findings"] if f["issue"] == "dead_relu" and f["layer"] == h.DEAD_LAYER]
    assert dead and dead[0]["severity"] == "warning" and dead[0]["first_step"] == h.DEAD_FROM
    # the banner summary: one entry per kind, worst first
    assert body["summary"][0]["issue"] == "dead_relu" and h.DEAD_LAYER in body["summary"][0]["layers"]
    ranks = [("info", "warning", "error").index(e["severity"]) for e in body["summary"]]
    assert ranks == sorted(ranks, reverse=True)
    assert body["steps"] == {"count": 20, "first": 0, "last": 38}


def test_healthy_run_has_no_findings(client):
    body = get(client, P + "/findings?run=healthy")
    assert body["findings"] == [] and body["worst"] is None and body["layer_count"] == 4


def test_layer_table_in_model_order_with_flags(client, logdir):
    body = get(client, P + "/layers?run=sick")
    names = [row["name"] for row in body["layers"]]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    assert body["step"] == 38 and body["step_index"] == 19
    conv2 = body["layers"][1]
    assert conv2["type"] == "Conv2d" and conv2["params"] == 8 * 16 * 9 + 16
    assert conv2["stats"]["dead_frac"] == 1.0
    flag = next(f for f in conv2["flags"] if f["issue"] == "dead_relu")
    # everything the tooltip needs: what was measured, the threshold, since when, what to try
    assert flag["word"] == "dead" and flag["threshold"] == 0.5 and flag["first_step"] == h.DEAD_FROM
    assert "dead_frac" in flag["statistic"] and "LeakyReLU" in flag["advice"] and flag["active"] is True
    assert conv2["worst"] == "warning"
    assert body["layers"][3]["flags"] == [] and body["layers"][3]["worst"] is None
    assert "grad_rms" in body["key_stats"] and "dead_frac" in body["key_stats"]
    assert "saturated_frac" not in body["key_stats"]  # no sigmoid/tanh in this model: column hidden
    # the statistics are the ones stored: compare with the report's reader at the same step
    run = next(r for r in load_logdir(logdir) if r.name == "sick")
    t = int(np.flatnonzero(run.steps == 38)[0])
    got = np.array([row["stats"]["grad_norm"] for row in body["layers"]], dtype=np.float32)
    np.testing.assert_array_equal(got, run.column("grad_norm")[t])


def test_layer_table_at_an_earlier_step(client):
    body = get(client, P + "/layers?run=sick&step=11")  # between logged steps 10 and 12
    assert body["step"] == 10 and body["step_index"] == 5
    # before conv2 died its flag is listed but not active, and the row is not marked
    conv2 = body["layers"][1]
    assert conv2["stats"]["dead_frac"] < 0.5
    assert [f["active"] for f in conv2["flags"] if f["issue"] == "dead_relu"] == [False]
    assert conv2["worst"] is None


def test_series_of_the_sick_layer_with_threshold_lines(client):
    body = get(client, P + f"/series?run=sick&layer={h.DEAD_LAYER}")
    assert body["steps"] == list(range(0, 40, 2))
    assert set(body["series"]) == set(schema.COLUMNS)
    dead = body["series"]["dead_frac"]
    onset = body["steps"].index(h.DEAD_FROM)
    assert dead[onset:] == [1.0] * (20 - onset) and max(dead[:onset]) < 0.5
    assert body["thresholds"]["dead_frac"][0]["value"] == 0.5
    grad_lines = {line["label"]: line for line in body["thresholds"]["grad_rms"]}
    assert grad_lines["exploding_gradient"]["value"] == 10.0
    assert len(next(line for line in grad_lines.values() if "values" in line)["values"]) == 20
    assert any(f["issue"] == "dead_relu" for f in body["findings"])
    only = get(client, P + f"/series?run=sick&layer={h.DEAD_LAYER}&stat=dead_frac&stat=grad_rms")
    assert set(only["series"]) == {"dead_frac", "grad_rms"} and set(only["thresholds"]) <= {"dead_frac", "grad_rms"}


def test_heatmap_is_every_layer_by_every_step(client, logdir):
    body = get(client, P + "/heatmap?run=sick&stat=grad_norm")
    assert body["scale"] == "log" and body["shape"] == [4, 20]
    matrix = np.frombuffer(base64.b64decode(body["values"]), dtype="<f4").reshape(body["shape"])
    run = next(r for r in load_logdir(logdir) if r.name == "sick")
    np.testing.assert_array_equal(matrix, run.column("grad_norm").T)
    assert body["flagged"][h.DEAD_LAYER]["worst"] == "warning"
    assert "dead_relu" in body["flagged"][h.DEAD_LAYER]["issues"]


def test_rules_table_and_threshold_overrides(client):
    body = get(client, P + "/rules?threshold=dead_relu=0.7")
    rules = {r["name"]: r for r in body["rules"]}
    assert rules["dead_relu"]["threshold"] == 0.7 and rules["dead_relu"]["advice"]
    assert rules["dead_relu"]["word"] == "dead" and rules["dead_relu"]["reads"][0] == "dead_frac"
    assert [s["name"] for s in body["statistics"]] == list(schema.COLUMNS)
    assert body["severities"] == ["info", "warning", "error"]
    # conv2 is 100% dead: a threshold above 100% silences it, everywhere the tab looks
    quiet = "threshold=dead_relu=1.01"
    assert not [f for f in get(client, P + f"/findings?run=sick&{quiet}")["findings"] if f["issue"] == "dead_relu"]
    conv2 = get(client, P + f"/layers?run=sick&{quiet}")["layers"][1]
    assert "dead_relu" not in [f["issue"] for f in conv2["flags"]]
    # ...and its exactly-zero gradient, no longer explained by a dead layer, is a warning of its own (no_gradient,
    # which explains the same layer's vanishing gradient)
    severity = {f["issue"]: (f["severity"], f["explained_by"]) for f in conv2["flags"]}
    assert severity["no_gradient"] == ("warning", None)
    assert severity["vanishing_gradient"] == ("info", "no_gradient:conv2")
    assert get(client, P + f"/series?run=sick&layer=conv2&stat=dead_frac&{quiet}")["thresholds"]["dead_frac"][0][
        "value"] == 1.01
    # and the default comes back without the parameter (findings are cached per threshold setting)
    assert any(f["issue"] == "dead_relu" for f in get(client, P + "/findings?run=sick")["findings"])


@pytest.mark.parametrize("url, words", [
    ("/findings", "missing required query parameter 'run'"),
    ("/findings?run=", "missing required query parameter 'run'"),
    ("/findings?run=nope", "no tbdiag data for run 'nope'"),
    ("/findings?run=sick&threshold=dead_relu", "RULE=NUMBER"),
    ("/findings?run=sick&threshold=bogus=1", "unknown rule 'bogus'"),
    ("/findings?run=sick&threshold=dead_relu=abc", "must be a number"),
    ("/findings?run=sick&threshold=dead_relu=nan", "finite"),
    ("/findings?run=sick&threshold=dead_relu.persistence=0", "whole number"),
    ("/layers?run=sick&step=abc", "must be an integer"),
    ("/layers?run=sick&step=-5", "before the run's first logged step"),
    ("/series?run=sick", "missing required query parameter 'layer'"),
    ("/series?run=sick&layer=nope", "has no layer 'nope'"),
    ("/series?run=sick&layer=conv2&stat=bogus", "unknown statistic 'bogus'"),
    ("/heatmap?run=sick", "missing required query parameter 'stat'"),
    ("/heatmap?run=sick&stat=bogus", "unknown statistic"),
    ("/rules?threshold=frozen_layer.bogus=1", "unknown setting"),
    ("/rules?threshold=loss_spike.persistence=2.5", "whole number"),
    ("/rules?threshold=vanishing_gradient.update=1e400", "finite"),
    ("/losses", "missing required query parameter 'run'"),
    ("/losses?run=nope", "no tbdiag data for run 'nope'"),
    ("/losses?run=sick&threshold=loss_spike.history=abc", "must be a number"),
    ("/losses?run=sick&threshold=loss_spike.bogus=1", "loss_spike.history"),
])
def test_bad_parameters_answer_400_with_a_reason(client, url, words):
    body = get(client, P + url, status=400)
    assert words in body["error"]


# ------------------------------------------------------------------ losses


def test_losses_are_the_scalars_the_loss_rules_read_with_the_findings_marked(client, logdir):
    run = next(r for r in load_logdir(logdir) if r.name == "sick")
    body = get(client, P + "/losses?run=sick")
    (series,) = body["series"]
    assert series["tag"] == "train/loss" and series["role"] == "training"
    assert series["steps"] == run.losses["train/loss"][0].tolist() == list(range(40))
    assert series["values"] == pytest.approx(run.losses["train/loss"][1].tolist())
    # a layer finding is marked once, at the step the layer died, naming it; model-level ones with their spans
    marks = {m["issue"]: m for m in body["marks"]}
    dead = marks["dead_relu"]
    assert (dead["where"], dead["first_step"], dead["layers"], dead["word"]) == ("layers", h.DEAD_FROM, ["conv2"], "dead")
    assert dead["severity"] == "warning" and dead["advice"]
    findings = get(client, P + "/findings?run=sick")["findings"]
    model_level = [f for f in findings if f["layer"] is None]
    assert model_level and all(marks[f["issue"]]["where"] == "model" and marks[f["issue"]]["spans"] for f in model_level)
    assert [m["first_step"] for m in body["marks"]] == sorted(m["first_step"] for m in body["marks"])
    # explained and info layer findings are not marked: only what the chart should tell
    assert "no_gradient" not in marks and "vanishing_gradient" not in marks
    # a threshold edit reaches the marks: conv2 at 100% dead is silent above 100%
    quiet = get(client, P + "/losses?run=sick&threshold=dead_relu%3D1.01")
    assert "dead_relu" not in {m["issue"] for m in quiet["marks"]}
    # the healthy run: no layer finding to mark (a model-level one only where a finding is: on a loaded machine
    # the tiny run may wait for its input)
    healthy = get(client, P + "/losses?run=healthy")["marks"]
    issues = {f["issue"] for f in get(client, P + "/findings?run=healthy")["findings"]}
    assert not [m for m in healthy if m["where"] == "layers"] and {m["issue"] for m in healthy} <= issues


def test_validation_loss_is_served_and_overfitting_is_marked_on_it(tmp_path):
    """A real training run (falling train/loss) with a validation curve that turns up after step 15."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = str(tmp_path / "overfit")
    h.train_run(run_dir, dead=False, seed=1)
    val = [2.2, 1.9, 1.7, 1.55, 1.6, 1.8, 2.0, 2.25]  # every 5 steps: best at step 15, then 45% above it
    with SummaryWriter(run_dir) as w:
        for i, v in enumerate(val):
            w.add_scalar("val/loss", v, 5 * i)
    client = Client(h.wsgi_app(str(tmp_path))[0])
    body = get(client, P + "/losses?run=overfit")
    assert [(s["tag"], s["role"]) for s in body["series"]] == [("train/loss", "training"), ("val/loss", "validation")]
    assert body["series"][1]["steps"] == list(range(0, 40, 5)) and body["series"][1]["values"] == pytest.approx(val)
    (over,) = [m for m in body["marks"] if m["issue"] == "overfitting"]
    assert over["where"] == "model" and over["word"] == "overfitting" and over["severity"] == "warning"
    assert over["spans"][0][0] >= 15 and over["spans"][-1][1] == 35, over
    assert "val/loss" in over["message"]


# ---------------------------------------------------------- NaN / Inf / cache


def _write_steps(logdir: str, steps: range, layers: int = 3, bad: bool = True) -> None:
    from torch.utils.tensorboard import SummaryWriter

    table = schema.LayerTable(layers=[schema.LayerInfo(name=f"l{i}", type="Linear") for i in range(layers)])
    w = SummaryWriter(logdir)
    fw = w._get_file_writer()
    fw.add_summary(schema.encode_layers(table), 0)
    for step in steps:
        stats = np.full((layers, len(schema.COLUMNS)), np.nan, dtype=np.float32)
        for name in ("act_mean", "act_std", "grad_norm", "grad_rms", "weight_norm"):
            stats[:, schema.COLUMN_INDEX[name]] = 0.5
        if bad:
            stats[0, schema.COLUMN_INDEX["grad_norm"]] = np.inf
            stats[0, schema.COLUMN_INDEX["grad_rms"]] = -np.inf
            stats[1, schema.COLUMN_INDEX["act_mean"]] = np.nan
            stats[1, schema.COLUMN_INDEX["act_nonfinite"]] = 3
        fw.add_summary(schema.encode_health(step - step % schema.STEPS_PER_TAG, stats), step)
    w.close()


def test_nonfinite_statistics_stay_valid_json(tmp_path):
    _write_steps(str(tmp_path / "nan"), range(12))
    client = Client(h.wsgi_app(str(tmp_path))[0])
    found = get(client, P + "/findings?run=nan")["findings"]
    assert any(f["issue"] == "nonfinite" for f in found)
    row = get(client, P + "/layers?run=nan")["layers"][0]
    assert row["stats"]["grad_norm"] == "Infinity" and row["stats"]["grad_rms"] == "-Infinity"
    series = get(client, P + "/series?run=nan&layer=l1")
    assert series["series"]["act_mean"] == ["NaN"] * 12
    heat = get(client, P + "/heatmap?run=nan&stat=grad_norm")
    assert np.isinf(np.frombuffer(base64.b64decode(heat["values"]), dtype="<f4")).sum() == 12


def test_cache_reuses_decoded_runs_and_picks_up_new_steps(tmp_path):
    from tensorboard import context

    from tb_plugin.run_source import RunSource

    run_dir = str(tmp_path / "growing")
    _write_steps(run_dir, range(20), bad=False)
    _, ingester = h.wsgi_app(str(tmp_path))
    source = RunSource(ingester.data_provider)
    ctx = context.RequestContext()
    first, v1 = source.run_data(ctx, "", "growing")
    again, v2 = source.run_data(ctx, "", "growing")
    assert again is first and v2 == v1, "an unchanged run must not be decoded again"
    f1 = source.view(ctx, "", "growing").findings
    assert source.view(ctx, "", "growing").findings is f1
    # training goes on: a new event file with later steps; TensorBoard reloads
    _write_steps(run_dir, range(20, 35), bad=False)
    ingester.deprecated_multiplexer.AddRunsFromDirectory(str(tmp_path))
    ingester.deprecated_multiplexer.Reload()
    grown, v3 = source.run_data(ctx, "", "growing")
    assert v3 != v1 and grown.steps.tolist() == list(range(35))
    assert source.view(ctx, "", "growing").findings is not f1
    assert os.path.isdir(run_dir)
