"""`tbdiag.report(logdir)` and the text/JSON renderings `tbdiag report` prints."""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from .. import rules
from ..contract.rundata import RunData
from ..rules import evaluator
from ..rules.table import Finding
from .reader import NoDataError, load_logdir

__all__ = ["report", "findings_for", "render_text", "render_json", "NoDataError"]


def report(
    logdir: str,
    thresholds: Mapping[str, float] | None = None,
    loss_tags: Sequence[str] | None = None,
) -> list[Finding]:
    """Findings for every run under ``logdir``, most severe first.

    ``thresholds`` overrides rule thresholds (``{"dead_relu": 0.7}``; see
    `tbdiag.rules.resolve`).  Raises `NoDataError` when ``logdir`` is missing
    or holds no tbdiag data.
    """
    rules.resolve(thresholds)  # reject a bad override before reading anything
    return findings_for(load_logdir(logdir, loss_tags=loss_tags), thresholds)


def findings_for(runs: Sequence[RunData], thresholds: Mapping[str, float] | None = None) -> list[Finding]:
    """Evaluate the rules on each run; all findings, most severe first, then by run and step."""
    findings: list[Finding] = []
    for run in runs:
        findings.extend(evaluator.evaluate(run, thresholds))
    findings.sort(key=lambda f: (-rules.SEVERITY_RANK[f.severity], f.run, f.first_step))
    return findings


def render_json(findings: Sequence[Finding]) -> str:
    """One strict-JSON object (NaN/Inf encoded as strings)."""
    return json.dumps({"findings": [f.to_json() for f in findings]}, indent=2, allow_nan=False)


#: Layers named in one line of the text report before "...".
_NAMED = 5


def _episodes(findings: Sequence[Finding]) -> list[list[Finding]]:
    """Findings grouped into one episode when one run's layers show the same issue over the same steps.

    A blow-up shows on every layer at once: one line says so, not fifty identical ones (the JSON keeps
    every finding).  Order is kept: a group stands where its first finding stood.
    """
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        key = (f.severity, f.run, f.issue, f.first_step, f.last_step, f.explained_by) if f.layer else (id(f),)
        groups.setdefault(key, []).append(f)
    return list(groups.values())


def render_text(findings: Sequence[Finding], runs_checked: int | None = None) -> str:
    if not findings:
        return "No findings: every watched layer looks healthy." + (
            f" ({runs_checked} run(s) checked)" if runs_checked else ""
        )
    rows = [("SEVERITY", "RUN", "LAYER", "ISSUE", "STEPS", "FINDING")]
    for group in _episodes(findings):
        f = group[0]
        steps = str(f.first_step) if f.first_step == f.last_step else f"{f.first_step}-{f.last_step}"
        layer = f.layer if f.layer is not None else "-"
        message = f.message
        if len(group) > 1:
            others = [g.layer for g in group[1:]]
            layer = f"{layer} +{len(others)}"
            shown = ", ".join(others[:_NAMED])
            plural = "s" if len(others) > 1 else ""
            more = ", ...)" if len(others) > _NAMED else ")"
            message += f" (and {len(others)} more layer{plural} from the same step: {shown}{more}"
        rows.append((f.severity.upper(), f.run, layer, f.issue, steps, message))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    counts = {s: sum(1 for f in findings if f.severity == s) for s in reversed(rules.SEVERITIES)}
    lines.append("")
    lines.append(", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n))
    advice = {}
    for f in findings:
        if f.severity != "info" and f.issue not in advice:
            advice[f.issue] = f.advice
    if advice:
        lines.append("")
        lines.append("What to try:")
        lines.extend(f"  {issue}: {text}" for issue, text in advice.items())
    return "\n".join(lines)
