"""Each illness diagnosed on the right layer through `tbdiag report --format json`; healthy runs stay silent."""

import pytest
import scenarios

SERIOUS = {"warning", "error"}


def _of(findings, run):
    return [f for f in findings if f["run"] == run]


@pytest.mark.parametrize("case", scenarios.SICK, ids=lambda s: s.name)
def test_illness_found_on_the_right_layer(scenario_report, case):
    found = [f for f in _of(scenario_report, case.name) if f["issue"] == case.issue and f["severity"] in SERIOUS]
    assert found, f"{case.issue} not reported for {case.name}: {_of(scenario_report, case.name)}"
    layers = {f["layer"] for f in found}
    assert case.layers[0] in layers, f"{case.issue} reported on {layers}, expected on {case.layers[0]}"
    assert layers <= set(case.layers), f"{case.issue} also reported on healthy layers: {layers - set(case.layers)}"


@pytest.mark.parametrize("case", scenarios.HEALTHY, ids=lambda s: s.name)
def test_healthy_run_gets_no_warning(scenario_report, case):
    serious = [f for f in _of(scenario_report, case.name) if f["severity"] in SERIOUS]
    assert serious == [], serious


def test_dead_layer_is_the_only_serious_finding_on_layers(scenario_report):
    # Consequences of the dead conv2 (zero gradients above it, dead ReLUs after it) are explained, not repeated.
    layer_findings = [f for f in _of(scenario_report, "dead_functional") if f["layer"] and f["severity"] in SERIOUS]
    assert {(f["layer"], f["issue"]) for f in layer_findings} == {("conv2", "dead_relu")}
    explained = [f for f in _of(scenario_report, "dead_functional") if f["explained_by"]]
    assert explained and all(f["severity"] == "info" for f in explained)


def test_nan_from_one_sample_found_within_one_logging_interval(scenario_report):
    (nonfinite,) = [f for f in _of(scenario_report, "nan_input") if f["issue"] == "nonfinite"]
    assert 23 <= nonfinite["first_step"] <= 23 + scenarios.LOG_EVERY
    assert nonfinite["layer"] == "conv1" and nonfinite["severity"] == "error"


def test_exploding_flagged_before_the_loss_turns_nan(scenario_report):
    run = _of(scenario_report, "exploding_then_nan")
    exploding = min(f["first_step"] for f in run if f["issue"] == "exploding_gradient")
    nan_loss = [f for f in run if f["issue"] == "loss_divergence"]
    nonfinite = [f for f in run if f["issue"] == "nonfinite"]
    assert nan_loss and nonfinite
    assert exploding < nan_loss[0]["first_step"] and exploding < nonfinite[0]["first_step"]
    # and without a later NaN, only the explosion
    calm = _of(scenario_report, "exploding_init")
    assert not [f for f in calm if f["issue"] in ("nonfinite", "loss_divergence")]


def test_frozen_layer_message_names_the_optimizer(scenario_report):
    (frozen,) = [f for f in _of(scenario_report, "missing_from_optimizer") if f["issue"] == "frozen_layer"]
    assert "optimizer" in frozen["message"]


def test_vanishing_is_not_also_called_frozen(scenario_report):
    run = _of(scenario_report, "vanishing_sigmoid")
    assert not [f for f in run if f["issue"] == "frozen_layer" and f["severity"] in SERIOUS]
