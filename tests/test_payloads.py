"""The plugin's response bodies on hand-made runs: shapes, flags by step, threshold lines, the served tables.

`tb_plugin.payloads` is pure (a `RunView` in, a dict out), so each route's
body is checked here without training, TensorBoard or HTTP; the routes test
checks the same bodies come through TensorBoard's app.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tb_plugin import payloads
from tb_plugin.query import BadRequest
from tb_plugin.run_source import RunView
from tbdiag import rules
from tbdiag.contract import schema, statistics
from tbdiag.contract.rundata import RunData
from tbdiag.rules import evaluator

C = schema.COLUMN_INDEX
STEPS = np.arange(12) * 10  # logged steps 0, 10, ..., 110
LAYERS = ["stem", "block1", "block2", "head"]


def recovering_run() -> RunData:
    """Healthy, except block1 dead at steps 30..80 and block2's gradients vanishing at 40..90; both recover.

    No sigmoid/tanh anywhere: saturated_frac is never measured.  The head's
    activation mean is missing at the last step (NaN, with no NaN/Inf counted in
    its output: not measured), its gradient norm +Inf there.
    """
    stats = np.full((len(STEPS), len(LAYERS), len(schema.COLUMNS)), np.nan, np.float32)
    for name, value in (("act_mean", 0.2), ("act_std", 1.0), ("act_nonfinite", 0), ("dead_frac", 0.05),
                        ("grad_norm", 0.5), ("grad_rms", 1e-3), ("grad_nonfinite", 0), ("weight_norm", 10.0),
                        ("weight_nonfinite", 0), ("update_ratio", 1e-3), ("changed", 1.0), ("grad_params", 2)):
        stats[..., C[name]] = value
    stats[3:9, 1, C["dead_frac"]] = 1.0
    stats[4:10, 2, C["grad_rms"]] = 1e-9
    stats[:, 0, C["grad_rms"]] = np.linspace(1e-3, 2e-3, len(STEPS))  # the largest layer moves
    stats[-1, 3, C["act_mean"]] = np.nan
    stats[-1, 3, C["grad_norm"]] = np.inf
    table = schema.LayerTable(layers=[schema.LayerInfo(name=n, type="Linear", params=100, activation="relu")
                                      for n in LAYERS])
    return RunData("recovering", table, STEPS.copy(), stats, {})


def view_of(data: RunData, thresholds=None) -> RunView:
    return RunView(data=data, findings=evaluator.evaluate(data, thresholds), version=1, memo={})


def strict(body):
    """The body as a browser receives it: strict JSON, round-tripped."""
    return json.loads(json.dumps(body, allow_nan=False))


@pytest.fixture()
def view() -> RunView:
    return view_of(recovering_run())


def test_findings_payload(view):
    body = strict(payloads.findings_payload(view))
    assert set(body) == {"run", "findings", "summary", "severity_counts", "worst", "steps", "layer_count"}
    assert body["layer_count"] == 4 and body["steps"] == {"count": 12, "first": 0, "last": 110}
    assert [(f["issue"], f["layer"]) for f in body["findings"]] == [
        ("dead_relu", "block1"), ("vanishing_gradient", "block2")]
    assert all("spans" not in f for f in body["findings"]), "the report's finding objects, unchanged"
    assert [(k["issue"], k["word"], k["count"], k["first_step"]) for k in body["summary"]] == [
        ("dead_relu", "dead", 1, 30), ("vanishing_gradient", "vanishing", 1, 40)]
    assert list(body["severity_counts"]) == ["error", "warning", "info"] and body["worst"] == "warning"


def test_a_healthy_run_still_counts_its_layers():
    data = recovering_run()
    data.stats[:, :, C["dead_frac"]] = 0.05
    data.stats[:, :, C["grad_rms"]] = 1e-3
    body = payloads.findings_payload(view_of(data))
    assert body["findings"] == [] and body["worst"] is None and body["layer_count"] == 4


@pytest.mark.parametrize("step, dead, vanishing", [
    (20, False, False),   # before either finding
    (30, True, False),    # block1 dead from 30
    (50, True, True),     # both hold
    (85, False, True),    # between logged steps: 80 is shown, block1 still dead at 80
    (90, False, True),    # block1 recovered at 90, block2 still vanishing
    (100, False, False),  # both ended: no flag, although both findings started earlier
    (None, False, False),  # the last step
])
def test_flags_are_active_only_where_the_finding_holds(view, step, dead, vanishing):
    body = strict(payloads.layers_payload(view, step))
    rows = {row["name"]: row for row in body["layers"]}
    if step == 85:
        assert body["step"] == 80 and body["step_index"] == 8
        dead = True
    flag = {f["issue"]: f for name in ("block1", "block2") for f in rows[name]["flags"]}
    assert flag["dead_relu"]["active"] is dead and flag["dead_relu"]["word"] == "dead"
    assert flag["vanishing_gradient"]["active"] is vanishing
    assert rows["block1"]["worst"] == ("warning" if dead else None)
    assert rows["block2"]["worst"] == ("warning" if vanishing else None)
    assert rows["stem"]["flags"] == [] and rows["stem"]["worst"] is None


def test_layers_payload_shape(view):
    body = strict(payloads.layers_payload(view, None))
    assert body["step"] == 110 and body["step_index"] == 11 and body["steps"]["count"] == 12
    assert [(row["index"], row["name"]) for row in body["layers"]] == list(enumerate(LAYERS))
    head = body["layers"][3]
    assert set(head["stats"]) == set(schema.COLUMNS)
    # not measured is null, a NaN or Inf value a string: the tab prints "–" for the first, "NaN" or "+Inf" else
    assert head["stats"]["act_mean"] is None and head["stats"]["grad_norm"] == "Infinity"
    assert head["stats"]["saturated_frac"] is None
    assert body["layers"][0]["stats"]["act_mean"] == pytest.approx(0.2)
    # the key columns in the table's order, without the one never measured in this run
    assert body["key_stats"] == [s for s in statistics.KEY_STATS if s != "saturated_frac"]
    assert body["model_findings"] == []
    with pytest.raises(BadRequest, match="before the run's first logged step"):
        payloads.layers_payload(view, -1)


def test_nan_values_are_told_apart_from_not_measured(view):
    """NaN where the layer counted NaN/Inf in what the statistic is computed from is a value; elsewhere null."""
    data = recovering_run()
    data.stats[-1, 3, C["act_nonfinite"]] = 3  # the head's output held NaN at the last step
    head = strict(payloads.series_payload(view_of(data), "head", rules.resolve({}), ["act_mean", "saturated_frac"]))
    assert head["series"]["act_mean"][:-1] == [pytest.approx(0.2)] * 11 and head["series"]["act_mean"][-1] == "NaN"
    assert head["series"]["saturated_frac"] == [None] * 12  # no sigmoid/tanh: never measured
    assert strict(payloads.series_payload(view, "head", rules.resolve({}), ["act_mean"]))["series"]["act_mean"][-1] \
        is None  # the same gap without NaN/Inf counted in the output: not measured
    data.stats[5, 1, C["grad_norm"]] = np.nan  # a gap in the measurements: no NaN counted in the gradients
    data.stats[7, 2, C["grad_norm"]] = np.nan
    data.stats[7, 2, C["grad_nonfinite"]] = 12  # NaN gradients: the norm is NaN, a value
    mask = payloads.nan_values(data.stats)
    assert not mask[5, 1, C["grad_norm"]] and mask[7, 2, C["grad_norm"]]
    # and the head's NaN activation mean and its dead units over 3 batches (NaN there, its output NaN)
    assert mask.sum() == 3 and mask[-1, 3, C["dead_persist_frac"]]
    data.table.layers[3].activation = ""  # nothing consumes the head's output: no dead units to be NaN
    assert payloads.nan_values(data.stats, payloads.applicable(data)).sum() == 2
    assert payloads.json_cells(np.array([1.0, np.nan, np.nan, np.inf]), np.array([0, 1, 0, 0], bool)) == [
        1.0, "NaN", None, "Infinity"]


def test_series_payload_draws_the_rules_declared_lines(view):
    resolved = rules.resolve({"vanishing_gradient.absolute": 1e-8})
    body = strict(payloads.series_payload(view, "block2", resolved))
    assert body["steps"] == STEPS.tolist() and set(body["series"]) == set(schema.COLUMNS)
    assert body["series"]["grad_rms"][5] == pytest.approx(1e-9)
    declared = {(r.name, line.statistic) for r in rules.RULES for line in r.lines}
    drawn = {(line["rule"], stat) for stat, lines in body["thresholds"].items() for line in lines}
    assert drawn == declared
    grad = {line["label"]: line for line in body["thresholds"]["grad_rms"]}
    assert grad["exploding_gradient"] == {"rule": "exploding_gradient", "severity": "error", "direction": "above",
                                          "label": "exploding_gradient", "value": 10.0}
    assert grad["vanishing_gradient (absolute)"]["value"] == 1e-8  # the override
    relative = grad["vanishing: 0.0001 x largest layer's"]
    assert relative["direction"] == "below" and "value" not in relative
    largest = np.nanmax(view.data.column("grad_rms"), axis=1)
    np.testing.assert_allclose(relative["values"], 1e-4 * largest, rtol=1e-6)  # moves with the largest layer
    assert body["thresholds"]["changed"][0]["direction"] == "below"
    (finding,) = body["findings"]
    assert finding["issue"] == "vanishing_gradient" and finding["spans"] == [[40, 90]]
    only = strict(payloads.series_payload(view, "block2", resolved, ["dead_frac"]))
    assert set(only["series"]) == {"dead_frac"} and set(only["thresholds"]) == {"dead_frac"}
    with pytest.raises(BadRequest, match="has no layer 'nope'"):
        payloads.series_payload(view, "nope", resolved)


def test_heatmap_payload(view):
    body = strict(payloads.heatmap_payload(view, "grad_rms"))
    assert (body["stat"], body["label"], body["scale"]) == ("grad_rms", "gradient RMS", "log")
    assert body["shape"] == [4, 12] and body["layers"] == LAYERS and body["encoding"] == "float32-le-base64"
    matrix = np.frombuffer(base64.b64decode(body["values"]), "<f4").reshape(body["shape"])
    np.testing.assert_array_equal(matrix, view.data.column("grad_rms").T)
    assert body["min"] == pytest.approx(1e-9) and body["max"] == pytest.approx(2e-3)
    assert body["flagged"] == {
        "block1": {"worst": "warning", "worst_issue": "dead_relu", "issues": ["dead_relu"], "first_step": 30},
        "block2": {"worst": "warning", "worst_issue": "vanishing_gradient", "issues": ["vanishing_gradient"],
                   "first_step": 40},
    }
    assert body["nan_values"] is None  # no NaN value in grad_rms (+Inf is in the float32 array itself)
    data = recovering_run()
    data.stats[-1, 3, C["act_nonfinite"]] = 3  # now the head's output held NaN: its NaN mean is a value
    act = strict(payloads.heatmap_payload(view_of(data), "act_mean"))
    nan = np.frombuffer(base64.b64decode(act["nan_values"]), np.uint8).reshape(act["shape"])
    assert nan.sum() == 1 and nan[3, -1] == 1
    frac = strict(payloads.heatmap_payload(view, "dead_frac"))
    assert frac["scale"] == "fraction" and frac["min"] == pytest.approx(0.05) and frac["max"] == 1.0
    empty = strict(payloads.heatmap_payload(view, "saturated_frac"))
    assert empty["min"] is None and empty["max"] is None


def test_rules_payload_serves_every_fact_the_tab_shows():
    body = strict(payloads.rules_payload(rules.rules_json({"dead_relu": 0.7})))
    assert set(body) == {"rules", "severities", "statistics", "key_stats", "heatmap_default"}
    assert body["severities"] == list(rules.SEVERITIES)
    assert [s["name"] for s in body["statistics"]] == list(schema.COLUMNS)
    assert body["statistics"][0] == {"name": "act_mean", "meaning": "mean of the layer's output over the batch",
                                     "label": "activation mean", "short": "act mean", "scale": "linear",
                                     "chart": "with_finding", "key_column": None,
                                     "nonfinite_count": "act_nonfinite", "consumed_by": ""}
    assert body["key_stats"] == list(statistics.KEY_STATS) and body["heatmap_default"] in schema.COLUMNS
    by_name = {r["name"]: r for r in body["rules"]}
    assert by_name["dead_relu"]["threshold"] == 0.7
    assert by_name["dead_relu"]["reads"][0] == "dead_frac" and by_name["nonfinite"]["word"] == "NaN/Inf"
    assert by_name["loss_plateau"]["reads"] == [] and by_name["loss_plateau"]["lines"] == []


def test_runs_payload_and_json_values():
    body = payloads.runs_payload({"b": {"last_step": 3}, "a": {"last_step": 5}})
    assert body == {"runs": [{"run": "a", "last_step": 5}, {"run": "b", "last_step": 3}]}
    assert payloads.json_values(np.array([1.0, np.nan, np.inf, -np.inf], np.float32)) == [
        1.0, "NaN", "Infinity", "-Infinity"]


def test_loss_marks_come_from_the_findings_list_alone():
    """Model-level findings each with their spans; layer findings once per kind at their first step, naming the
    layers; explained and least-severe layer findings left out; a kind no rule declares is marked too."""
    from tb_plugin.loss_payload import loss_payload, marks

    data = recovering_run()
    data.losses = {"train/loss": (np.arange(120), np.linspace(2.0, 1.0, 120)),
                   "val/loss": (np.arange(0, 120, 10), np.linspace(2.0, 1.2, 12))}
    found = evaluator.evaluate(data)
    spike = rules.Finding(run="recovering", layer=None, issue="gradient_spike", severity="warning", first_step=50,
                          last_step=50, value=9.0, message="gradient norm jumped 9x", spans=((50, 50),))
    late_dead = rules.Finding(run="recovering", layer="block2", issue="dead_relu", severity="warning", first_step=60,
                              last_step=80, value=1.0, message="block2: dead")
    explained = rules.Finding(run="recovering", layer="stem", issue="no_gradient", severity="info", first_step=10,
                              last_step=80, value=0.0, message="stem: no gradient", explained_by="dead_relu:block1")
    out = strict(marks([*found, spike, late_dead, explained]))
    by_issue = {m["issue"]: m for m in out}
    dead = by_issue["dead_relu"]
    assert (dead["where"], dead["first_step"], dead["layers"], dead["word"]) == ("layers", 30, ["block1", "block2"],
                                                                                  "dead")
    assert "2 layers: block1, block2" in dead["message"]
    assert by_issue["gradient_spike"]["where"] == "model" and by_issue["gradient_spike"]["spans"] == [[50, 50]]
    assert by_issue["gradient_spike"]["word"] == rules.word_of("gradient_spike") == "grad spike"  # the rule's word
    unknown = rules.Finding(run="recovering", layer=None, issue="from_a_newer_tbdiag", severity="warning",
                            first_step=70, last_step=70, value=None, message="?")
    assert {m["issue"]: m for m in strict(marks([unknown]))}["from_a_newer_tbdiag"]["word"] == "from_a_newer_tbdiag"
    assert "no_gradient" not in by_issue
    assert [m["first_step"] for m in out] == sorted(m["first_step"] for m in out)
    body = strict(loss_payload(RunView(data=data, findings=found, version=1, memo={})))
    assert [(s["tag"], s["role"]) for s in body["series"]] == [("train/loss", "training"), ("val/loss", "validation")]
    data.table.extra["val_tags"] = []  # the writer said: no validation curves
    body = strict(loss_payload(RunView(data=data, findings=found, version=1, memo={})))
    assert [s["role"] for s in body["series"]] == ["training", "training"]
