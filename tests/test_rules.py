"""Rules on hand-made statistics: each fires on a sick series and stays silent on a healthy one."""

import json
import math

import numpy as np
import pytest

from tbdiag import rules
from tbdiag.contract import schema
from tbdiag.contract.rundata import RunData
from tbdiag.read.report import render_json
from tbdiag.rules import evaluator, series

C = schema.COLUMN_INDEX


def make_run(n_steps=10, n_layers=3, losses=None, **cols):
    """A healthy baseline; ``cols`` override columns with [steps, layers] arrays."""
    stats = np.full((n_steps, n_layers, len(schema.COLUMNS)), np.nan, np.float32)
    stats[..., C["act_mean"]] = 0.1
    stats[..., C["act_std"]] = 1.0
    stats[..., C["act_nonfinite"]] = 0
    stats[..., C["dead_frac"]] = 0.05
    stats[..., C["grad_norm"]] = 0.1
    stats[..., C["grad_rms"]] = 1e-3
    stats[..., C["grad_nonfinite"]] = 0
    stats[..., C["weight_norm"]] = 5
    stats[..., C["weight_nonfinite"]] = 0
    stats[..., C["update_ratio"]] = 1e-3
    stats[..., C["changed"]] = 1
    stats[0, :, C["changed"]] = np.nan
    stats[..., C["grad_params"]] = 2
    for name, value in cols.items():
        stats[..., C[name]] = value
    table = schema.LayerTable(layers=[schema.LayerInfo(name=f"l{i}", type="Linear") for i in range(n_layers)])
    steps = np.arange(n_steps) * 10
    return RunData("run", table, steps, stats, losses or {})


def issues(run, **kw):
    return [(f.issue, f.layer, f.severity) for f in evaluator.evaluate(run, **kw)]


def test_healthy_run_has_no_findings():
    assert issues(make_run(losses={"loss": (np.arange(40), np.linspace(2.3, 0.5, 40))})) == []


def test_dead_relu_needs_persistence_and_reports_since_when():
    dead = np.full((10, 3), 0.05)
    dead[6:, 1] = 0.9
    (f,) = evaluator.evaluate(make_run(dead_frac=dead))
    assert (f.issue, f.layer, f.first_step, f.last_step, f.ongoing) == ("dead_relu", "l1", 60, 90, True)
    assert "90%" in f.message and "since step 60" in f.message
    blip = np.full((10, 3), 0.05)
    blip[4:6, 1] = 0.9  # two logging steps: noise
    assert issues(make_run(dead_frac=blip)) == []


def test_dead_relu_needs_the_same_units_dead_across_batches():
    # a small batch leaves many healthy units silent by chance: the fraction is high, but not the same units
    noisy = np.full((10, 3), 0.55)
    persist = np.full((10, 3), 0.2)
    assert issues(make_run(dead_frac=noisy, dead_persist_frac=persist)) == []
    # a layer killed at step 40: the same units stay dead, reported from the first dead step
    dead = np.full((10, 3), 0.05)
    dead[4:, 0] = 1.0
    persist = np.full((10, 3), 0.02)
    persist[6:, 0] = 1.0  # three logged batches after the kill
    (f,) = evaluator.evaluate(make_run(dead_frac=dead, dead_persist_frac=persist))
    assert (f.layer, f.first_step) == ("l0", 40)


def test_vanishing_relative_and_absolute():
    rms = np.tile([1e-9, 1e-3, 1e-2], (10, 1))
    assert ("vanishing_gradient", "l0", "warning") in issues(make_run(grad_rms=rms))
    rms = np.tile([3e-8, 3e-8, 4e-8], (10, 1))  # all tiny: the absolute floor
    assert len(issues(make_run(grad_rms=rms))) == 3
    assert issues(make_run(grad_rms=np.tile([1e-4, 1e-3, 1e-2], (10, 1)))) == []


def test_exploding_fires_when_confirmed_or_far_beyond():
    rms = np.full((10, 3), 1e-3)
    rms[7:9, 2] = [50.0, 80.0]  # two logged steps in a row: a blow-up, named from its first
    (f,) = evaluator.evaluate(make_run(grad_rms=rms))
    assert (f.issue, f.layer, f.first_step, f.severity) == ("exploding_gradient", "l2", 70, "error")
    rms = np.full((10, 3), 1e-3)
    rms[7, 2] = 5000.0  # one step, but 500x the threshold: at once
    (f,) = evaluator.evaluate(make_run(grad_rms=rms))
    assert (f.issue, f.layer, f.first_step, f.last_step) == ("exploding_gradient", "l2", 70, 70)


def test_one_large_gradient_that_settles_is_not_an_explosion():
    # HF's std-0.02 convs before BatchNorm: a 14x gradient at step 0, gone by the next logged step
    rms = np.full((10, 3), 1e-3)
    rms[0, 1] = 14.0
    rms[7, 2] = 50.0
    assert evaluator.evaluate(make_run(grad_rms=rms)) == []
    # still unconfirmed at the last logged step: wait for the next one
    rms = np.full((10, 3), 1e-3)
    rms[9, 2] = 50.0
    assert evaluator.evaluate(make_run(grad_rms=rms)) == []
    # a run of one logged step that is all explosion is still named
    found = evaluator.evaluate(make_run(n_steps=1, grad_rms=np.array([[1e-3, 1e-3, 50.0]])))
    assert [(f.issue, f.layer) for f in found if f.issue == "exploding_gradient"] == [("exploding_gradient", "l2")]


def test_saturation():
    sat = np.full((10, 3), 0.1)
    sat[:, 0] = 0.8
    assert issues(make_run(saturated_frac=sat)) == [("saturated_activation", "l0", "warning")]


def test_nonfinite_localises_first_step_and_first_layer():
    act = np.zeros((10, 3))
    act[4:, 1:] = 7  # first in the forward pass: l1
    grad = np.zeros((10, 3))
    grad[4:, :] = 3
    (f,) = evaluator.evaluate(make_run(act_nonfinite=act, grad_nonfinite=grad))
    assert (f.issue, f.layer, f.first_step, f.value) == ("nonfinite", "l1", 40, 7)
    assert "activations" in f.message


def test_nonfinite_in_gradients_only_points_at_the_last_layer():
    grad = np.zeros((10, 3))
    grad[5:, :] = 1
    (f,) = evaluator.evaluate(make_run(grad_nonfinite=grad))
    assert f.layer == "l2" and f.first_step == 50


def test_frozen_layer_vs_intentionally_frozen():
    changed = np.ones((10, 3))
    changed[0] = np.nan
    changed[:, 2] = 0
    changed[0, 2] = np.nan
    run = make_run(changed=changed)
    run.table.layers[2].in_optimizer = False
    (f,) = evaluator.evaluate(run)
    assert (f.issue, f.layer) == ("frozen_layer", "l2") and "optimizer" in f.message
    # requires_grad=False: no gradients, so nothing to flag
    grads = np.full((10, 3), 2.0)
    grads[:, 2] = 0
    gnorm = np.full((10, 3), 0.1)
    gnorm[:, 2] = np.nan
    assert issues(make_run(changed=changed, grad_params=grads, grad_norm=gnorm)) == []
    # changed once in a while: not frozen
    changed[5, 2] = 1
    assert issues(make_run(changed=changed)) == []


def test_loss_divergence_and_nan_loss():
    up = np.concatenate([np.linspace(2.3, 1.0, 30), np.linspace(1.0, 9.0, 30)])
    (f,) = [f for f in evaluator.evaluate(make_run(losses={"train/loss": (np.arange(60), up)})) if f.severity != "info"]
    assert f.issue == "loss_divergence" and f.layer is None and f.severity == "error"
    nan = np.linspace(2.3, 1.0, 30)
    nan[17] = np.nan
    (f,) = evaluator.evaluate(make_run(losses={"train/loss": (np.arange(30), nan)}))
    assert f.issue == "loss_divergence" and f.first_step == 17
    noisy = 1.0 + 0.3 * np.random.default_rng(0).standard_normal(100)
    noisy[:10] += 1.0  # starts higher, then noisy but flat
    assert [x for x in issues(make_run(losses={"loss": (np.arange(100), noisy)})) if x[0] == "loss_divergence"] == []


def test_loss_plateau():
    flat = 2.302 + 0.001 * np.sin(np.arange(50))
    (f,) = evaluator.evaluate(make_run(losses={"loss": (np.arange(50), flat)}))
    assert f.issue == "loss_plateau" and f.severity == "warning"
    short = flat[:10]  # too few values to judge
    assert issues(make_run(losses={"loss": (np.arange(10), short)})) == []


def test_thresholds_are_overridable_and_validated():
    dead = np.full((10, 3), 0.3)
    assert issues(make_run(dead_frac=dead)) == []
    assert len(issues(make_run(dead_frac=dead), thresholds={"dead_relu": 0.25})) == 3
    assert issues(make_run(dead_frac=dead), thresholds={"dead_relu": 0.25, "dead_relu.persistence": 11}) == [
        ("dead_relu", f"l{i}", "warning") for i in range(3)
    ]  # a run shorter than the persistence counts when every step agrees
    with pytest.raises(ValueError, match="unknown rule 'dead_reluu'"):
        rules.resolve({"dead_reluu": 0.3})
    with pytest.raises(ValueError, match="vanishing_gradient.absolute"):
        rules.resolve({"vanishing_gradient.nope": 1})
    with pytest.raises(ValueError, match="must be a number"):
        rules.resolve({"dead_relu": "lots"})
    assert rules.parse_threshold_args(["dead_relu=0.7"]) == {"dead_relu": 0.7}
    with pytest.raises(ValueError, match="RULE=NUMBER"):
        rules.parse_threshold_args(["dead_relu"])


def test_rule_table_reads_like_a_table():
    for rule in rules.RULES:
        assert rule.statistic and rule.source and rule.why and rule.advice
        assert rule.severity in rules.SEVERITIES and rule.persistence >= 1
    names = {r.name for r in rules.RULES}
    assert {"dead_relu", "vanishing_gradient", "exploding_gradient", "saturated_activation", "nonfinite",
            "frozen_layer", "loss_divergence", "loss_plateau"} <= names


def test_findings_json_is_strict_even_with_nan():
    f = rules.Finding(run="r", layer=None, issue="nonfinite", severity="error", first_step=1, last_step=2,
                      value=math.nan, message="m", threshold=math.inf)
    parsed = json.loads(render_json([f]))
    assert parsed["findings"][0]["value"] == "NaN" and parsed["findings"][0]["threshold"] == "Infinity"


def test_streaks():
    assert series.streaks(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)]
    assert series.streaks(np.array([], bool)) == []


class _RecordingRun(RunData):
    """A RunData that remembers which statistics a rule asked for."""

    def __init__(self, run: RunData) -> None:
        super().__init__(run.name, run.table, run.steps, run.stats, run.losses)
        self.read: set[str] = set()

    def column(self, name: str) -> np.ndarray:
        self.read.add(name)
        return super().column(name)


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.name)
def test_each_rule_reads_exactly_the_statistics_it_declares(rule):
    run = _RecordingRun(make_run(losses={"loss": (np.arange(40), np.linspace(2.3, 0.5, 40))}))
    evaluator.evaluate(run, rules=[rule.name])
    assert run.read == set(rule.reads), f"{rule.name} declares {rule.reads}, reads {sorted(run.read)}"


def test_rule_declarations_name_real_statistics_settings_and_words():
    from tbdiag.contract import statistics

    words = [rule.word for rule in rules.RULES]
    assert all(words) and len(set(words)) == len(words), "every rule needs its own flag word"
    for rule in rules.RULES:
        assert set(rule.reads) <= set(statistics.BY_NAME), rule.name
        for line in rule.lines:
            assert line.statistic in statistics.BY_NAME, (rule.name, line)
            assert line.direction in rules.DIRECTIONS, (rule.name, line)
            assert line.setting == "" or line.setting in rule.params, (rule.name, line)
            assert line.label.format(value=rule.setting(line.setting)), (rule.name, line)
    # the rule table as served: JSON all the way down
    table = json.loads(json.dumps(rules.rules_json({"vanishing_gradient.absolute": 1e-8})))
    vanishing = next(r for r in table if r["name"] == "vanishing_gradient")
    assert vanishing["word"] == "vanishing" and vanishing["reads"] == ["grad_rms", "update_ratio"]
    assert {(line["setting"], line["relative_to_largest"]) for line in vanishing["lines"]} == {
        ("absolute", False), ("", True)}


def test_a_finding_holds_only_where_its_streaks_are():
    dead = np.full((10, 3), 0.05)
    dead[1:4, 0] = 0.9  # dead at steps 10..30, recovers, dead again at 60..90
    dead[6:, 0] = 0.9
    (f,) = evaluator.evaluate(make_run(dead_frac=dead))
    assert (f.first_step, f.last_step, f.spans) == (10, 90, ((10, 30), (60, 90)))
    assert [s for s in range(0, 100, 10) if f.holds_at(s)] == [10, 20, 30, 60, 70, 80, 90]
    assert "spans" not in f.to_json(), "the report's JSON is unchanged"
    # without spans (a finding built by hand) it holds from its first to its last step
    g = rules.Finding(run="r", layer="l0", issue="dead_relu", severity="warning", first_step=10, last_step=30,
                      value=1.0, message="m")
    assert [g.holds_at(s) for s in (0, 10, 30, 40)] == [False, True, True, False]


def test_word_of_falls_back_to_the_kind():
    assert rules.word_of("dead_relu") == "dead" and rules.word_of("something_new") == "something_new"


def _with_lr(run, lrs):
    run.model["lr_max"] = (run.steps.copy(), np.asarray(lrs, dtype=np.float64))
    return run


def test_update_too_small_reads_the_schedule():
    ratio = np.full((10, 3), 1e-3)
    ratio[6:, 1] = 3e-6  # the last four logged steps of a cosine tail
    tail = np.array([1.0, 1.0, 0.95, 0.8, 0.6, 0.4, 0.08, 0.03, 0.01, 0.003]) * 1e-3
    assert issues(_with_lr(make_run(update_ratio=ratio), tail)) == []
    # the same ratios with the learning rate still at its peak: the layer really barely moves
    assert issues(_with_lr(make_run(update_ratio=ratio), np.full(10, 1e-3))) == [("update_too_small", "l1", "warning")]
    # a learning rate set too low from the start is its own peak: never excused as a tail
    low = np.full((10, 3), 2e-6)
    assert len(issues(_with_lr(make_run(update_ratio=low), np.full(10, 1e-7)))) == 3
    # without a recorded learning rate (older runs) the ratio alone decides, as before
    assert issues(make_run(update_ratio=ratio)) == [("update_too_small", "l1", "warning")]


def test_update_too_small_holds_norm_layers_to_their_own_scale():
    run = make_run(update_ratio=np.tile([1e-3, 1.1e-6, 1.1e-6], (10, 1)))
    run.table.layers[1].type = "LlamaRMSNorm"  # a gain at 1.0 under Adam: 1e-6 is healthy for it
    assert issues(run) == [("update_too_small", "l2", "warning")]
    run = make_run(update_ratio=np.tile([1e-3, 1e-8, 1e-3], (10, 1)))
    run.table.layers[1].type = "LayerNorm"  # far below even its own scale
    assert issues(run) == [("update_too_small", "l1", "warning")]


def test_update_too_large_spares_a_layer_growing_from_zero_by_design():
    ratio = np.full((10, 3), 1e-3)
    ratio[:4, 1] = [1.0, 0.5, 0.3, 0.15]  # LayerScale at 1e-6: its first steps move it by ~100%
    norm = np.full((10, 3), 5.0)
    norm[:, 1] = [1e-5, 2e-3, 6e-3, 1.2e-2, 2e-2, 2.4e-2, 2.6e-2, 2.7e-2, 2.8e-2, 2.8e-2]
    run = make_run(update_ratio=ratio, weight_norm=norm)
    for layer in run.table.layers:
        layer.params = 64
    assert issues(run) == []
    # the same ratios on a layer that started at a normal scale are too large
    norm[:, 1] = 5.0
    run = make_run(update_ratio=ratio, weight_norm=norm)
    for layer in run.table.layers:
        layer.params = 64
    assert issues(run) == [("update_too_large", "l1", "warning")]


def test_activation_growth():
    std = np.ones((10, 3))
    std[:, 0] = np.geomspace(1.0, 50.0, 10)  # a projection behind a LayerScale grows 50x while learning: healthy
    std[:, 2] = [1, 1, 40, 200, 400, 600, 800, 800, 800, 800]  # lr too high: 800x within a few intervals
    assert issues(make_run(act_std=std, act_mean=np.zeros((10, 3)))) == [("activation_growth", "l2", "warning")]
    (f,) = evaluator.evaluate(make_run(act_std=std, act_mean=np.zeros((10, 3))))
    assert f.first_step == 30
    # a zero-initialised branch, or a projection at 0.01 behind a uniform attention, grows to the model's scale
    std = np.ones((10, 5))
    std[:, 1] = np.geomspace(1e-7, 1.0, 10)
    std[:, 2] = np.geomspace(0.008, 2.0, 10)
    assert issues(make_run(n_layers=5, act_std=std, act_mean=np.zeros((10, 5)))) == []


def test_vanishing_under_adam_follows_the_schedule():
    rms = np.tile([1e-2, 1e-2, 5e-7], (10, 1))  # a layer's gradient 2e4x below the largest one's
    ratio = np.full((10, 3), 1e-3)
    ratio[6:, :] = [2e-6, 2e-6, 2e-6]  # the cosine tail: every layer's update shrinks with the rate
    tail = np.array([1.0, 1.0, 0.95, 0.8, 0.6, 0.4, 0.08, 0.03, 0.01, 0.003]) * 1e-3
    run = _with_lr(make_run(grad_rms=rms, update_ratio=ratio), tail)
    run.table.extra["optimizer"] = "AdamW"
    assert [f for f in issues(run) if f[0] == "vanishing_gradient"] == []
    # the same ratios at a constant rate: that layer's Adam step no longer moves it
    run = _with_lr(make_run(grad_rms=rms, update_ratio=ratio), np.full(10, 1e-3))
    run.table.extra["optimizer"] = "AdamW"
    assert ("vanishing_gradient", "l2", "warning") in issues(run)
