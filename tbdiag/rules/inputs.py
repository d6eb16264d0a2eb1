"""How the rules about what goes into the model (`tbdiag.rules`) read a run: pure numpy.

``input_scale`` reads the scale of the model's first floating input
(``input_mean``, ``input_std``, ``input_min``, ``input_max``) and
``padding_in_loss`` the share of labelled positions that are padding
(``padding_labelled_frac``), both measured by `tbdiag.watch.input_watch` from
the logging step's batch, step 0 included.  Inputs at the wrong scale are a
cause: the dead units, exploding gradients and stalled loss that follow are
its consequences (`explain`).
"""

from __future__ import annotations

import numpy as np

from ..contract.rundata import RunData
from .loop import model_finding
from .table import Finding, Rule
from .update import NORM_TYPES

#: Findings that inputs far outside the expected range bring about, once those inputs are in the model.
INPUT_CONSEQUENCES = ("dead_relu", "saturated_activation", "exploding_gradient", "activation_growth",
                      "vanishing_gradient", "update_too_large", "loss_plateau")


def _series(run: RunData, name: str) -> np.ndarray:
    """A model statistic at each of ``run.model_series``'s steps (NaN where it was not measured)."""
    return run.model_series(name)[1].astype(np.float64)


def input_rms(run: RunData) -> np.ndarray:
    """The root mean square of the model's floating input at each logged step: sqrt(mean^2 + std^2)."""
    mean, std = _series(run, "input_mean"), _series(run, "input_std")
    return np.sqrt(mean * mean + std * std)


def normalises_its_input(run: RunData) -> bool:
    """Whether the first layer the model runs normalises (BatchNorm, LayerNorm, ...): then it takes raw inputs."""
    layers = run.table.layers
    return bool(layers) and bool(NORM_TYPES.search(layers[0].type or ""))


def input_scale(run: RunData, rule: Rule) -> list[Finding]:
    """The model's floating input has an RMS above ``threshold``: far from the unit scale its layers expect."""
    if normalises_its_input(run):
        return []
    rms = input_rms(run)
    lo, hi = _series(run, "input_min"), _series(run, "input_max")
    with np.errstate(invalid="ignore"):
        fires = rms > rule.threshold

    def describe(since: int, until: int) -> str:
        at = int(np.flatnonzero(fires)[0])
        return (f"the model's input ranges from {lo[at]:.4g} to {hi[at]:.4g} (RMS {rms[at]:.3g}) from step {since} "
                f"to step {until}: a network initialised for inputs of about unit scale sees values "
                f"{rms[at]:.0f}x larger (raw 0-255 pixels, unnormalised features), so its first layers start "
                "saturated or dead and their gradients are as many times too large")
    return model_finding(run, rule, "input_mean", fires, None if not fires.any() else float(rms[fires][-1]),
                          describe)


def padding_in_loss(run: RunData, rule: Rule) -> list[Finding]:
    """A share of the labelled positions above ``threshold`` is padding (attention mask 0, label not -100)."""
    _, share = run.model_series("padding_labelled_frac")
    with np.errstate(invalid="ignore"):
        fires = share > rule.threshold
    worst = float(np.nanmax(share[fires])) if fires.any() else None

    def describe(since: int, until: int) -> str:
        return (f"up to {worst:.0%} of the labelled positions are padding (attention mask 0, label not -100) "
                f"at logging steps {since} to {until}: the loss averages the easy prediction of pad tokens with "
                "the text's, so it reads lower than the model's real loss, and the model learns to emit padding")
    return model_finding(run, rule, "padding_labelled_frac", fires, worst, describe)


def explain(findings: list[Finding], run: RunData) -> None:
    """Demote the consequences of an input at the wrong scale (`INPUT_CONSEQUENCES`) to ``info``."""
    cause = next((f for f in findings if f.issue == "input_scale" and f.severity != "info"), None)
    if cause is None:
        return
    for f in findings:
        if f.issue in INPUT_CONSEQUENCES and f.explained_by is None and f.first_step >= cause.first_step:
            f.severity = "info"
            f.explained_by = "input_scale"
            f.message += f" (follows from the input's scale: see input_scale since step {cause.first_step})"


__all__ = ["INPUT_CONSEQUENCES", "explain", "input_rms", "input_scale", "normalises_its_input", "padding_in_loss"]
