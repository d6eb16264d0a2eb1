"""Which rule threshold belongs on which statistic's chart.

The rules module states thresholds per rule; a chart is per statistic.  This
table joins the two so the drill-down can draw each line where the rule looks,
with the thresholds the user set (query overrides included).  A rule whose
limit moves with the data -- the vanishing-gradient ratio against the largest
layer at each step -- gets a per-step line rather than a constant.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from tbdiag import rules, schema
from tbdiag.rundata import RunData


def _const(rule: rules.Rule, value: float, direction: str, label: str) -> dict[str, Any]:
    return {"rule": rule.name, "severity": rule.severity, "value": value, "direction": direction, "label": label}


def _vanishing_relative(data: RunData, layer: int, rule: rules.Rule) -> dict[str, Any]:
    rms = data.column("grad_rms").astype(np.float64)
    finite = np.where(np.isfinite(rms), rms, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # steps where no layer has a gradient: NaN is right
        top = np.nanmax(finite, axis=1) if finite.size else np.full(len(data.steps), np.nan)
    return {
        "rule": rule.name, "severity": rule.severity, "values": rule.threshold * top, "direction": "below",
        "label": f"vanishing: {rule.threshold:g} x largest layer's",
    }


#: statistic -> functions (data, layer index, resolved rules) -> line
_LINES: dict[str, list[Callable[[RunData, int, dict[str, rules.Rule]], dict[str, Any]]]] = {
    "dead_frac": [
        lambda d, i, r: _const(r["dead_relu"], r["dead_relu"].threshold, "above", "dead_relu"),
    ],
    "saturated_frac": [
        lambda d, i, r: _const(r["saturated_activation"], r["saturated_activation"].threshold, "above",
                               "saturated_activation"),
    ],
    "grad_rms": [
        lambda d, i, r: _const(r["exploding_gradient"], r["exploding_gradient"].threshold, "above",
                               "exploding_gradient"),
        lambda d, i, r: _const(r["vanishing_gradient"], r["vanishing_gradient"].params["absolute"], "below",
                               "vanishing_gradient (absolute)"),
        lambda d, i, r: _vanishing_relative(d, i, r["vanishing_gradient"]),
    ],
    "act_nonfinite": [lambda d, i, r: _const(r["nonfinite"], r["nonfinite"].threshold, "above", "nonfinite")],
    "grad_nonfinite": [lambda d, i, r: _const(r["nonfinite"], r["nonfinite"].threshold, "above", "nonfinite")],
    "weight_nonfinite": [lambda d, i, r: _const(r["nonfinite"], r["nonfinite"].threshold, "above", "nonfinite")],
    "changed": [lambda d, i, r: _const(r["frozen_layer"], r["frozen_layer"].threshold, "below", "frozen_layer")],
}
assert set(_LINES) <= set(schema.COLUMNS)


def threshold_lines(data: RunData, layer: int, resolved: dict[str, rules.Rule]) -> dict[str, list[dict[str, Any]]]:
    """``{statistic: [line, ...]}``; a line has ``value`` (constant) or ``values`` (a numpy array, one per step)."""
    return {stat: [make(data, layer, resolved) for make in makers] for stat, makers in _LINES.items()}
