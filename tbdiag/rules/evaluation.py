"""How the evaluation rules (`prediction_collapse`, `neglected_class`) are checked against a run.

They read the confusion matrices `DiagnosticWriter.add_evaluation` stored
(`tbdiag.contract.evaluation`), one evaluation tag at a time; persistence counts
consecutive evaluation calls of that tag, up to its latest.  Their findings
are model-level (``layer`` is None) and their steps are evaluation steps.
Pure functions, registered in `tbdiag.rules.evaluator`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..contract.evaluation import Evaluation, collapsed, neglected, top_share
from ..contract.rundata import RunData
from .table import Finding, Rule


def _spans(mask: Sequence[bool], persistence: int) -> list[tuple[int, int]]:
    """The index range ``[a, n)`` of the trailing True values, when at least ``persistence`` long.

    Evaluation rules judge the model as it is now: a class learned late, or
    an early epoch that predicted one class, is no finding once the latest
    evaluations are fine.  A tag with fewer calls than the persistence counts
    when every call agrees, so one evaluation of a collapsed model is still
    diagnosed.
    """
    n = len(mask)
    start = n
    while start > 0 and mask[start - 1]:
        start -= 1
    return [(start, n)] if n and n - start >= max(1, min(persistence, n)) else []


def _finding(run: RunData, rule: Rule, evals: list[Evaluation], spans: list[tuple[int, int]], value: float,
             message: str, threshold: float) -> Finding:
    last = spans[-1][1] - 1
    return Finding(
        run=run.name, layer=None, issue=rule.name, severity=rule.severity,
        first_step=evals[spans[0][0]].step, last_step=evals[last].step, value=value, message=message,
        threshold=threshold, statistic=rule.statistic, advice=rule.advice, ongoing=last == len(evals) - 1,
        spans=tuple((evals[a].step, evals[b - 1].step) for a, b in spans),
    )


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def subject(tag: str, class_name: str | None = None) -> str:
    """How a finding names what it is about: the evaluation tag (and class), as the message's first words."""
    return f"eval '{tag}'" + (f", class '{class_name}'" if class_name is not None else "")


def prediction_collapse(run: RunData, rule: Rule) -> list[Finding]:
    """Nearly every prediction is one class, and the samples of the other classes go unrecognised."""
    out = []
    for tag, evals in run.evaluations.items():
        limit = rule.params["other_recall"]
        mask = [collapsed(ev, rule.threshold, limit) for ev in evals]
        spans = _spans(mask, rule.persistence)
        if not spans:
            continue
        ev = evals[spans[-1][1] - 1]
        c, share, recall = top_share(ev)
        msg = (f"{subject(tag)}: {_pct(share)} of predictions are class '{ev.class_names[c]}' at step {ev.step} "
               f"(threshold {_pct(rule.threshold)}); the other classes' samples are recognised {_pct(recall)} of "
               f"the time")
        out.append(_finding(run, rule, evals, spans, share, msg, rule.threshold))
    return out


def weak_classes(ev: Evaluation, rule: Rule) -> list[int]:
    """The classes `neglected_class` counts as neglected in one evaluation (what the tab marks)."""
    return neglected(ev, rule.threshold, rule.params["min_support"])


def neglected_class(run: RunData, rule: Rule) -> list[Finding]:
    """A class recognised far less often than the others (or never predicted), per evaluation tag."""
    out = []
    for tag, evals in run.evaluations.items():
        weak = [set(weak_classes(ev, rule)) for ev in evals]
        for c in sorted(set().union(*weak)):
            # a class is the same class across calls by its name (the count of classes may grow)
            name = next(ev.class_names[c] for ev, w in zip(evals, weak) if c in w)
            mask = [c < ev.n_classes and ev.class_names[c] == name and c in w for ev, w in zip(evals, weak)]
            spans = _spans(mask, rule.persistence)
            if not spans:
                continue
            ev = evals[spans[-1][1] - 1]
            recall = ev.recall
            others = np.delete(recall, c)
            median = float(np.nanmedian(others)) if np.isfinite(others).any() else float("nan")
            never = int(ev.predicted[c]) == 0
            msg = (f"{subject(tag, name)}: recall {_pct(float(recall[c]))} against a median of {_pct(median)} for "
                   f"the other classes at step {ev.step}"
                   + (" (never predicted)" if never else "")
                   + f"; {int(ev.support[c])} samples, most often taken for "
                   f"'{ev.class_names[_most_confused(ev, c)]}'")
            out.append(_finding(run, rule, evals, spans, float(recall[c]), msg, rule.threshold))
    return out


def _most_confused(ev: Evaluation, c: int) -> int:
    row = ev.counts[c].copy()
    row[c] = -1
    return int(np.argmax(row))


def explain(findings: list[Finding], run: RunData) -> None:
    """Demote a neglected class to ``info`` while its evaluation tag has collapsed onto one class.

    When nearly every prediction is one class every other class is neglected;
    the collapse is the finding, the neglected classes follow from it.
    """
    for tag in run.evaluations:
        name = subject(tag)
        causes = [f for f in findings if f.issue == "prediction_collapse" and f.message.startswith(name + ": ")]
        for f in findings:
            if (f.issue != "neglected_class" or f.explained_by is not None
                    or not f.message.startswith(name + ", class ")):
                continue
            cause = next((c for c in causes if all(c.holds_at(a) and c.holds_at(b) for a, b in f.spans)), None)
            if cause is not None:
                f.severity = "info"
                f.explained_by = f"{cause.issue}:{name}"
                f.message += " (explained by the prediction collapse)"
