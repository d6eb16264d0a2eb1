"""The threshold lines a drill-down chart draws, from the rules' own declarations.

A rule states its limits per rule (`tbdiag.rules.ThresholdLine`); a chart is
per statistic.  Evaluating the declarations with the thresholds the user set
(query overrides included) groups them by statistic, so each line is drawn
where the rule looks.  A limit that moves with the data -- relative to the
largest layer's value at each step -- becomes one value per logged step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from tbdiag import rules
from tbdiag.contract.rundata import RunData


def _largest(data: RunData, statistic: str) -> np.ndarray:
    """The largest finite value of ``statistic`` over layers, at each logged step (NaN where none)."""
    values = data.column(statistic).astype(np.float64)
    finite = np.where(np.isfinite(values), values, np.nan)
    if finite.size == 0:
        return np.full(len(data.steps), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # steps where no layer has a value: NaN is right
        return np.nanmax(finite, axis=1)


def line_json(rule: rules.Rule, line: rules.ThresholdLine, data: RunData) -> dict[str, Any]:
    """One line: ``value`` (a constant) or ``values`` (a numpy array, one per logged step)."""
    setting = rule.setting(line.setting)
    out: dict[str, Any] = {
        "rule": rule.name, "severity": rule.severity, "direction": line.direction,
        "label": line.label.format(value=setting),
    }
    if line.relative_to_largest:
        out["values"] = setting * _largest(data, line.statistic)
    else:
        out["value"] = setting
    return out


def threshold_lines(data: RunData, resolved: Mapping[str, rules.Rule]) -> dict[str, list[dict[str, Any]]]:
    """``{statistic: [line, ...]}`` for every line every rule declares, in rule order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rule in resolved.values():
        for line in rule.lines:
            out.setdefault(line.statistic, []).append(line_json(rule, line, data))
    return out
