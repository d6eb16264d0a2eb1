"""epsilon_dominated and logit_divergence on hand-made statistics: where each fires and where it stays silent."""

import numpy as np

from tbdiag.rules import evaluator
from test_rules import make_run


def _eps(frac):
    run = make_run(eps_dominated_frac=frac)
    run.table.extra.update({"optimizer": "AdamW", "adam_eps": 1e-8})
    return run


def _found(run, issue):
    return [f for f in evaluator.evaluate(run) if f.issue == issue]


def test_epsilon_dominated_fires_on_a_persistent_majority_and_names_the_layer():
    frac = np.zeros((10, 3))
    frac[4:, 1] = 0.9
    (f,) = _found(_eps(frac), "epsilon_dominated")
    assert (f.layer, f.first_step, f.severity, f.ongoing) == ("l1", 40, "warning", True)
    assert "eps=1e-08" in f.message and "90%" in f.message
    blip = np.zeros((10, 3))
    blip[4:6, 1] = 0.9
    assert _found(_eps(blip), "epsilon_dominated") == []
    few = np.full((10, 3), 0.3)  # a minority of coordinates (key biases, LayerScale'd branches)
    assert _found(_eps(few), "epsilon_dominated") == []


def test_a_start_up_transient_is_not_counted_but_a_run_sick_from_the_start_is():
    transient = np.zeros((10, 3))
    transient[:4, 0] = 1.0  # LayerScale at 1e-6: tiny gradients until the gain grows
    assert _found(_eps(transient), "epsilon_dominated") == []
    (f,) = _found(_eps(np.tile([1.0, 0.0, 0.0], (10, 1))), "epsilon_dominated")
    assert (f.layer, f.first_step) == ("l0", 0)


def test_not_measured_is_silent():
    assert _found(make_run(), "epsilon_dominated") == []  # SGD, Adafactor: NaN throughout


def test_tiny_updates_and_vanishing_gradients_follow_from_it():
    frac = np.tile([1.0, 0.0, 0.0], (10, 1))
    ratio = np.tile([1e-7, 1e-3, 1e-3], (10, 1))
    rms = np.tile([1e-12, 1e-3, 1e-3], (10, 1))
    run = make_run(eps_dominated_frac=frac, update_ratio=ratio, grad_rms=rms)
    run.table.extra.update({"optimizer": "AdamW", "adam_eps": 1e-8})
    by_issue = {f.issue: f for f in evaluator.evaluate(run) if f.layer == "l0"}
    assert by_issue["epsilon_dominated"].severity == "warning"
    assert by_issue["vanishing_gradient"].severity == "info"
    assert by_issue["vanishing_gradient"].explained_by == "epsilon_dominated:l0"
    assert by_issue["update_too_small"].severity == "info"  # (explained by the vanishing gradient, in turn by eps)
    frac[:, 0] = 0.0  # without eps dominating, the vanishing gradient is a finding of its own
    run = make_run(eps_dominated_frac=frac, update_ratio=ratio, grad_rms=rms)
    run.table.extra.update({"optimizer": "AdamW"})
    assert [f.severity for f in evaluator.evaluate(run) if f.issue == "vanishing_gradient"] == ["warning"]


def _logz(mean, top=None):
    run = make_run(n_steps=len(mean))
    steps = run.steps.copy()
    run.model["logz_mean"] = (steps, np.asarray(mean, dtype=np.float64))
    run.model["logz_max"] = (steps, np.asarray(mean if top is None else top, dtype=np.float64) + 0.5)
    return run


def test_logit_divergence_fires_on_a_drift_far_from_the_start():
    healthy = 3.5 + 9 * (1 - np.exp(-np.arange(10) / 3))  # ln 32 rising to ~12 as the model grows confident
    assert _found(_logz(healthy), "logit_divergence") == []
    drifting = 3.5 - 8 * np.arange(10)  # the logits running very negative
    (f,) = _found(_logz(drifting), "logit_divergence")
    assert f.layer is None and f.first_step == 40 and f.value == drifting[-1]  # 32 nats away at step 40
    one_step = np.full(10, 3.5)
    one_step[4] = 60.0  # a single logged step: not persistent
    assert _found(_logz(one_step), "logit_divergence") == []


def test_logit_divergence_reads_the_largest_row_too():
    mean = np.full(10, 5.0)
    top = np.full(10, 6.0)
    top[5:] = 120.0
    (f,) = _found(_logz(mean, top), "logit_divergence")
    assert f.first_step == 50 and "largest row more than 60 nats" in f.message
    assert _found(make_run(), "logit_divergence") == []  # never measured
