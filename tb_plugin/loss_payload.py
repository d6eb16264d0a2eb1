"""The ``/losses`` route's answer: a run's loss curves and the findings to mark on them.

The curves are exactly what the loss rules read (`RunData.losses`: the scalar
tags `tbdiag.contract.rundata.is_loss_tag` picks, or the ``loss_tags`` the
writer was given), training curves first, then validation curves
(`is_validation_tag`, or ``val_tags``).  The marks are driven by the findings
list alone, so a rule added later shows up without touching this module:

- every model-level finding (``layer`` null: ``loss_spike``, ``loss_divergence``,
  ``stale_gradients``, ...), with the stretches of steps where it holds;
- every layer-level kind above the least severity, not explained by another
  finding, once: at the first step any layer shows it, naming the layers
  (``nonfinite`` at its birth step, a layer that died mid-run), so the chart
  says what happened to the model where the loss shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tbdiag import rules
from tbdiag.contract.rundata import is_validation_tag, json_number

from .run_source import RunView

#: Layers a grouped mark names before "and N more".
_NAMED_LAYERS = 4


def _series(view: RunView) -> list[dict[str, Any]]:
    data = view.data
    val_tags = data.table.extra.get("val_tags")
    out = []
    for tag, (steps, values) in sorted(data.losses.items()):
        if not len(steps):
            continue
        role = "validation" if is_validation_tag(tag, list(val_tags) if val_tags is not None else None) else "training"
        out.append({"tag": tag, "role": role, "steps": [int(s) for s in steps],
                    "values": [json_number(v) for v in values]})
    out.sort(key=lambda s: s["role"] != "training")  # stable: tag order within each role
    return out


def _spans(f: rules.Finding) -> list[list[int]]:
    return [list(span) for span in (f.spans or ((f.first_step, f.last_step),))]


def _model_mark(f: rules.Finding) -> dict[str, Any]:
    return {**f.to_json(), "word": rules.word_of(f.issue), "layers": [], "spans": _spans(f), "where": "model"}


def _layer_mark(group: Sequence[rules.Finding]) -> dict[str, Any]:
    """One mark for a kind of layer-level finding: the earliest, naming every layer that shows it."""
    first = min(group, key=lambda f: (f.first_step, -rules.SEVERITY_RANK[f.severity]))
    layers = [f.layer for f in sorted(group, key=lambda f: f.first_step)]
    more = len(layers) - _NAMED_LAYERS
    who = ", ".join(layers[:_NAMED_LAYERS]) + (f" and {more} more" if more > 0 else "")
    n = len(layers)
    return {
        **first.to_json(),
        "severity": max((f.severity for f in group), key=lambda s: rules.SEVERITY_RANK[s]),
        "word": rules.word_of(first.issue),
        "layers": layers,
        "spans": [[first.first_step, first.first_step]],
        "where": "layers",
        "message": f"{first.message}" if n == 1 else f"{first.message} ({n} layers: {who})",
    }


def marks(findings: Sequence[rules.Finding]) -> list[dict[str, Any]]:
    """The findings a loss chart marks, in step order (see the module's docstring)."""
    least = rules.SEVERITIES[0]
    out = [_model_mark(f) for f in findings if f.layer is None]
    by_issue: dict[str, list[rules.Finding]] = {}
    for f in findings:
        if f.layer is not None and f.severity != least and not f.explained_by:
            by_issue.setdefault(f.issue, []).append(f)
    out += [_layer_mark(group) for group in by_issue.values()]
    out.sort(key=lambda m: (m["first_step"], -rules.SEVERITY_RANK[m["severity"]], m["issue"]))
    return out


def loss_payload(view: RunView) -> dict[str, Any]:
    """The run's loss curves and marks (its findings were evaluated with the request's overrides)."""
    return {"run": view.data.name, "series": _series(view), "marks": marks(view.findings)}
