"""The Transformer section's payload: a run's attention modules and MoE routers, and what their findings name.

The section is a few heatmaps of the existing ``/heatmap`` route (blocks x
steps, one row per attention module or router: every other row of those
statistics is NaN, "not measured", and the heatmap leaves it out).  This
payload says which of them the run has at all (none: the section stays
hidden), the threshold each rule applies to them (drawn on the heatmap's
legend and under the cells past it), and, per module, the head its findings
name: the ``*_head`` column its rule reads, counted over the logged steps
the finding holds.  A module's findings here are those of the rules that
read the section's statistics; its others (an eps-dominated router) stay in
the layer table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from tbdiag import rules
from tbdiag.contract import statistics
from tbdiag.contract.rundata import RunData

from .run_source import RunView
from .threshold_lines import threshold_lines

#: The section's heatmaps, in the order it shows them, and the kind of module a measured row of each is.
HEATMAPS: tuple[tuple[str, str], ...] = (
    ("attn_logit_max", "attention"),
    ("attn_entropy", "attention"),
    ("expert_top_share", "router"),
)


def _measured_rows(data: RunData, stat: str) -> np.ndarray:
    """Which layers hold a value of ``stat`` at some logged step (an attention module, a router)."""
    return (~np.isnan(data.column(stat))).any(axis=0)  # an infinite logit is a value too


def _head_column(rule: rules.Rule | None) -> str | None:
    """The column naming the head a rule's finding is about (the first ``*_head`` statistic it reads)."""
    if rule is None:
        return None
    return next((s for s in rule.reads if s.endswith("_head")), None)


def _flagged_indices(data: RunData, finding: rules.Finding) -> np.ndarray:
    """Indices of the logged steps at which a finding holds."""
    spans = finding.spans or ((finding.first_step, finding.last_step),)
    mask = np.zeros(len(data.steps), dtype=bool)
    for first, last in spans:
        mask |= (data.steps >= first) & (data.steps <= last)
    return np.flatnonzero(mask)


def named_head(data: RunData, layer: int, finding: rules.Finding, column: str) -> dict[str, Any] | None:
    """The head a finding names: the one its head column holds most often over the steps the finding holds.

    A finding is a streak of logged steps; the head holding the max logit (or the lowest entropy) can
    change along it, so the head is the most frequent one, with how often, and the head at its last step.
    None when the column holds no head at those steps.
    """
    at = _flagged_indices(data, finding)
    if not at.size:
        return None
    heads = data.column(column)[at, layer]
    finite = heads[np.isfinite(heads)]
    if not finite.size:
        return None
    head, times = Counter(int(h) for h in finite).most_common(1)[0]
    last = data.column(column)[at[-1], layer]
    label = statistics.statistic(column).label  # "head of the max attention logit"
    what = label.removeprefix("head of ")
    text = (f"head {head} holds {what} at {times} of {len(at)} flagged logged steps"
            + (f" (at step {int(data.steps[at[-1]])}, the last: head {int(last)})"
               if np.isfinite(last) and int(last) != head else ""))
    return {"head": head, "statistic": column, "steps_on_head": times, "steps_flagged": len(at),
            "last_head": int(last) if np.isfinite(last) else None, "text": text}


def transformer_payload(view: RunView, resolved: Mapping[str, rules.Rule]) -> dict[str, Any]:
    """The run's attention modules and routers, the heatmaps the section shows, and the heads findings name."""
    data, findings = view.data, view.findings
    lines = threshold_lines(data, resolved)
    heatmaps, kinds = [], {}
    for stat, kind in HEATMAPS:
        rows = _measured_rows(data, stat)
        if not rows.any():
            continue
        described = statistics.statistic(stat)
        heatmaps.append({
            "stat": stat, "label": described.label, "scale": described.scale, "kind": kind,
            "modules": int(rows.sum()),
            # a limit that moves with the data has no single place on a colour legend
            "lines": [line for line in lines.get(stat, []) if "value" in line],
        })
        for i in np.flatnonzero(rows):
            kinds.setdefault(int(i), kind)
    shown = {stat for stat, _ in HEATMAPS}
    modules = []
    for i, kind in sorted(kinds.items()):
        name = data.table.layers[i].name
        own = []
        for f in findings:
            rule = resolved.get(f.issue)
            # the section's findings: those of rules reading its statistics (the layer table has the rest)
            if f.layer != name or rule is None or not shown.intersection(rule.reads):
                continue
            column = _head_column(rule)
            own.append({"issue": f.issue, "word": rules.word_of(f.issue), "severity": f.severity,
                        "first_step": f.first_step, "last_step": f.last_step,
                        "head": named_head(data, i, f, column) if column else None})
        modules.append({"layer": name, "kind": kind, "findings": own})
    return {"run": data.name, "heatmaps": heatmaps, "modules": modules}


__all__ = ["HEATMAPS", "named_head", "transformer_payload"]
