"""The loss and update-size rules on hand-made curves: noise is never learning, and each illness has its name."""

import math

import numpy as np
from test_rules import make_run

from tbdiag.rules import evaluator

N = 200
STEPS = np.arange(N)


def _noise(sd, seed=0, n=N):
    return sd * np.random.default_rng(seed).standard_normal(n)


def serious(run, **kw):
    return [(f.issue, f.layer) for f in evaluator.evaluate(run, **kw) if f.severity != "info"]


def loss_run(extra=None, **curves):
    run = make_run(losses={tag.replace("__", "/"): c for tag, c in curves.items()})
    run.table.extra.update(extra or {})
    return run


def test_noisy_flat_curve_is_a_plateau_and_noisy_learning_is_not():
    flat = 2.30 + _noise(0.05)  # single batches wobble by several percent: not improvement
    assert serious(loss_run(train__loss=(STEPS, flat))) == [("loss_plateau", None)]
    learning = 2.3 * np.exp(-STEPS / 80) + 0.2 + _noise(0.1)
    assert serious(loss_run(train__loss=(STEPS, learning))) == []
    slow = 2.3 - 0.15 * STEPS / N + _noise(0.05)  # slow but steady: 6% over the run, far beyond its noise
    assert serious(loss_run(train__loss=(STEPS, slow))) == []
    converged = np.maximum(2.3 - STEPS / 10, 0.05) + np.abs(_noise(0.01))  # learned early, flat since
    assert serious(loss_run(train__loss=(STEPS, converged))) == []


def test_a_loss_at_chance_level_is_a_plateau_when_the_output_width_tells_the_classes():
    # labels shuffled apart from their inputs: the loss falls from a random start to ln 10 and stays
    chance = math.log(10) + 0.3 * np.exp(-STEPS / 10) + _noise(0.03)
    (f,) = evaluator.evaluate(loss_run({"output_width": 10}, train__loss=(STEPS, chance)))
    assert f.issue == "loss_plateau" and "chance level ln 10" in f.message and f.first_step == N // 2
    assert serious(loss_run(train__loss=(STEPS, chance))) == []  # no width recorded: no chance level
    learning = math.log(10) * np.exp(-STEPS / 60) + _noise(0.03)
    assert serious(loss_run({"output_width": 10}, train__loss=(STEPS, learning))) == []


def test_a_jump_far_above_the_running_best_is_a_spike_once_per_episode():
    v = 2.3 * np.exp(-STEPS / 20) + 0.01 + np.abs(_noise(0.005))
    v[120:] = 2.3 + _noise(0.05)[120:]  # a layer dies at 120: back to guessing
    found = evaluator.evaluate(loss_run({"output_width": 10}, train__loss=(STEPS, v)))
    spikes = [f for f in found if f.issue == "loss_spike"]
    assert [(f.first_step, f.severity) for f in spikes] == [(122, "warning")]
    assert [f.issue for f in found if f.severity != "info"] == ["loss_spike"], "the plateau after it is explained"
    two = v.copy()
    two[160:] = 0.01 + np.abs(_noise(0.005))[160:]  # recovers, then a second episode
    two[180:] = 2.3
    assert len([f for f in evaluator.evaluate(loss_run(train__loss=(STEPS, two))) if f.issue == "loss_spike"]) == 2
    # the normal early descent, noisy, never counts
    noisy = 2.3 * np.exp(-STEPS / 30) + 0.1 + np.abs(_noise(0.15))
    assert serious(loss_run(train__loss=(STEPS, noisy))) == []


def test_alternating_and_cycling_losses_are_oscillation_not_divergence():
    flip = np.where(STEPS % 2, 1.9, 0.1) + _noise(0.02)
    assert serious(loss_run(train__loss=(STEPS, flip))) == [("loss_oscillation", None)]
    cyclic = 1.0 - 0.9 * np.cos(2 * np.pi * STEPS / 20) + _noise(0.05)
    assert serious(loss_run(train__loss=(STEPS, cyclic))) == [("loss_oscillation", None)]
    # big batch noise around a falling loss is no oscillation
    batch4 = 1.5 * np.exp(-STEPS / 100) + 0.8 + np.abs(_noise(0.6))
    assert serious(loss_run(train__loss=(STEPS, batch4))) == []


def test_divergence_still_fires_on_a_real_rise_and_on_nan():
    up = np.concatenate([np.linspace(2.3, 1.0, 30), np.linspace(1.0, 9.0, 30)]) + _noise(0.02, n=60)
    assert serious(loss_run(train__loss=(np.arange(60), up))) == [("loss_divergence", None)]
    nan = 2.3 * np.exp(-STEPS / 40) + _noise(0.02)
    nan[150:] = np.nan
    (f,) = [f for f in evaluator.evaluate(loss_run(train__loss=(STEPS, nan))) if f.severity != "info"]
    assert (f.issue, f.first_step, f.severity) == ("loss_divergence", 150, "error")


def _val_curve(rise: float):
    vs = np.arange(0, N, 10)
    return vs, 2.3 * np.exp(-vs / 40) + 0.3 + rise * np.maximum(vs - 80, 0) + _noise(0.005, n=len(vs))


def test_validation_rising_while_training_falls_is_overfitting_not_divergence():
    train = 2.3 * np.exp(-STEPS / 40) + 0.05 + np.abs(_noise(0.03))
    for tag in ("val__loss", "loss__val", "eval_loss", "Loss__validation", "test_loss"):
        found = evaluator.evaluate(loss_run(train__loss=(STEPS, train), **{tag: _val_curve(0.004)}))
        assert [(f.issue, f.severity) for f in found] == [("overfitting", "warning")], (tag, found)
        assert "memorising" in found[0].message and found[0].first_step > 80
    assert serious(loss_run(train__loss=(STEPS, train), val__loss=_val_curve(0.0))) == []
    # the training loss rising too: not overfitting (and the validation curve never feeds divergence)
    rising = 2.3 + 0.02 * STEPS
    found = serious(loss_run(train__loss=(STEPS, rising), val__loss=_val_curve(0.004)))
    assert ("overfitting", None) not in found and found == [("loss_divergence", None)]


def test_validation_tags_can_be_named():
    train = 2.3 * np.exp(-STEPS / 40) + 0.05 + np.abs(_noise(0.03))
    run = loss_run({"val_tags": ["heldout/loss"]}, train__loss=(STEPS, train), heldout__loss=_val_curve(0.004))
    assert serious(run) == [("overfitting", None)]


def test_update_ratio_bands_and_persistence():
    ratio = np.full((10, 3), 1e-3)
    ratio[2:, 1] = 0.7  # every step rewrites most of the layer
    ratio[:, 2] = 1e-7  # a param group at lr ~0
    assert sorted(serious(make_run(update_ratio=ratio))) == [("update_too_large", "l1"), ("update_too_small", "l2")]
    blip = np.full((10, 3), 1e-3)
    blip[4:6, 0] = 0.7
    assert serious(make_run(update_ratio=blip)) == []
    warmup = np.full((10, 3), 1e-3)
    warmup[:4] = 1e-7  # a learning-rate warm-up from ~0
    assert serious(make_run(update_ratio=warmup)) == []
    frozen = np.full((10, 3), 1e-3)
    frozen[:, 0] = 0.0  # no update at all is frozen_layer's to judge
    assert ("update_too_small", "l0") not in serious(make_run(update_ratio=frozen))


def test_vanishing_gradient_under_adaptive_optimizers_is_judged_by_the_update():
    rms = np.tile([1e-9, 1e-3, 1e-2], (10, 1))
    moving = make_run(grad_rms=rms)
    moving.table.extra["optimizer"] = "AdamW"
    assert serious(moving) == []  # Adam moves the layer whatever its gradient's size
    stuck = make_run(grad_rms=rms, update_ratio=np.tile([1e-8, 1e-3, 1e-3], (10, 1)))
    stuck.table.extra["optimizer"] = "Adam"
    found = evaluator.evaluate(stuck)
    assert [(f.issue, f.layer, f.severity) for f in found] == [
        ("vanishing_gradient", "l0", "warning"), ("update_too_small", "l0", "info")]
    sgd = make_run(grad_rms=rms)
    sgd.table.extra["optimizer"] = "SGD"
    assert serious(sgd) == [("vanishing_gradient", "l0")]


def test_a_loss_that_stops_learning_when_a_layer_dies_follows_from_that_layer():
    """The dying layer is the illness; the loss stuck at chance level after it is its symptom (info)."""
    n_steps = 20  # logged every 10 steps, loss every step
    dead = np.full((n_steps, 3), 0.05, np.float32)
    dead[8:, 1] = 1.0  # l1 dies at step 80
    steps = np.arange(n_steps * 10)
    loss = np.where(steps < 80, 2.3 * np.exp(-steps / 30) + 0.1, 2.30) + _noise(0.02, n=steps.size)
    run = make_run(n_steps=n_steps, dead_frac=dead, dead_persist_frac=dead, losses={"train/loss": (steps, loss)})
    run.table.extra["output_width"] = 10
    found = {(f.issue, f.layer): f for f in evaluator.evaluate(run)}
    assert found[("dead_relu", "l1")].severity == "warning"
    loss_findings = [f for (issue, layer), f in found.items() if layer is None]
    assert loss_findings, "the jump back to chance level is still reported"
    by_issue = {f.issue: f for f in loss_findings}
    for f in loss_findings:  # explained by the layer, or part of a loss finding that is
        cause = f.explained_by if f.explained_by == "dead_relu:l1" else by_issue[f.explained_by].explained_by
        assert f.severity == "info" and cause == "dead_relu:l1", (f.issue, f.severity, f.message)
    # the same loss curve without the dead layer: nothing explains it away
    healthy = make_run(n_steps=n_steps, losses={"train/loss": (steps, loss)})
    healthy.table.extra["output_width"] = 10
    assert any(f.severity == "warning" for f in evaluator.evaluate(healthy) if f.layer is None)


def test_a_blow_up_inside_the_first_values_is_divergence():
    """lr far too high without warm-up: the loss leaves its starting value at once and never comes back."""
    v = np.concatenate([[2.3, 4.0, 6.5, 8.0, 9.0], 9.0 + np.abs(_noise(0.2))[5:]])
    found = [f for f in evaluator.evaluate(loss_run(train__loss=(STEPS, v))) if f.issue == "loss_divergence"]
    assert len(found) == 1 and "starting 2.3" in found[0].message, [f.message for f in found]
    # a healthy fast start (the first values fall) keeps the median of the first values as its start
    healthy = 2.3 * np.exp(-STEPS / 20) + 0.05 + np.abs(_noise(0.01))
    assert serious(loss_run(train__loss=(STEPS, healthy))) == []
