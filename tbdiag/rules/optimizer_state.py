"""How the optimizer-state rule (`tbdiag.rules`) reads a run: Adam updates that no longer follow the gradient.

``epsilon_dominated`` reads ``eps_dominated_frac``: per layer, the share of its
Adam-family coordinates (that received a gradient) whose ``√v̂`` is below the
optimizer's ε (`tbdiag.measure.optimizer_state`).  NaN where not measured (SGD,
Adafactor, runs without ``optimizer=``), so other optimizers never fire.
Pure numpy.
"""

from __future__ import annotations

import numpy as np

from ..contract.rundata import RunData
from .series import persistent
from .table import Finding, Rule
from .update import is_adaptive, optimizer_of


def _eps_text(run: RunData) -> str:
    eps = run.table.extra.get("adam_eps")
    return f"eps={float(eps):g}" if isinstance(eps, (int, float)) else "eps"


def epsilon_dominated(run: RunData, rule: Rule) -> list[Finding]:
    """At least ``threshold`` of a layer's Adam coordinates have √v̂ below ε, logging step after logging step.

    A stretch that begins at the layer's first measured step and ends before its
    last one is a start-up transient, not counted: a branch that starts at ~0 by
    design (LayerScale at 1e-6, ReZero, zero-initialised gates) passes back
    gradients ~1e-6 of their later size until its gain has grown, a few steps.
    """
    frac = run.column("eps_dominated_frac").astype(np.float64)
    valid = np.isfinite(frac)
    with np.errstate(invalid="ignore"):
        mask = valid & (frac >= rule.threshold)
    eps = _eps_text(run)
    n = len(run.steps)
    out = []
    for i, info in enumerate(run.table.layers):
        rows = np.flatnonzero(valid[:, i])
        spans = [(a, b) for a, b in persistent(mask[:, i], valid[:, i], rule.persistence)
                 if not (a == rows[0] and b - 1 < rows[-1])]
        if not spans:
            continue
        first, last = spans[0][0], spans[-1][1] - 1
        since = int(run.steps[first])
        value = float(frac[last, i])
        out.append(Finding(
            run=run.name, layer=info.name, issue=rule.name, severity=rule.severity,
            first_step=since, last_step=int(run.steps[last]), value=value,
            message=f"{info.name}: for {value:.0%} of its coordinates Adam's sqrt(v_hat) is below {eps} since step "
                    f"{since}: the optimizer divides by {eps} there, not by the gradient's own scale, so its "
                    "updates shrink with the gradient instead of following it (the update collapse of Wortsman et "
                    "al. 2023)",
            threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice, ongoing=last == n - 1,
            spans=tuple((int(run.steps[a]), int(run.steps[b - 1])) for a, b in spans),
        ))
    return out


def explain(findings: list[Finding], run: RunData) -> None:
    """A layer's tiny updates, and under an adaptive optimizer its vanishing gradient, follow from ε dominating
    its Adam updates: they are ``info``, explained by ``epsilon_dominated`` (unless already explained).

    Under Adam a small gradient alone does not stop a layer (the update is normalised); it stops it only once
    the gradient reaches ε, which is this finding.  A finding that another cause explains keeps that cause.
    """
    causes = {f.layer: f for f in findings if f.issue == "epsilon_dominated" and f.layer is not None}
    if not causes:
        return
    adaptive = is_adaptive(optimizer_of(run))
    for f in findings:
        cause = causes.get(f.layer)
        if cause is None or f.explained_by is not None:
            continue
        if f.issue == "update_too_small" or (f.issue == "vanishing_gradient" and adaptive):
            f.severity = "info"
            f.explained_by = f"{cause.issue}:{cause.layer}"
            f.message += " (follows from eps dominating its Adam updates)"
    for f in causes.values():  # ε dominates because the gradient vanished for a reason named elsewhere
        vanishing = next((g for g in findings if g.issue == "vanishing_gradient" and g.layer == f.layer
                          and g.explained_by is not None and not g.explained_by.startswith("epsilon_dominated")),
                         None)
        if vanishing is not None and f.explained_by is None:
            f.severity = "info"
            f.explained_by = vanishing.explained_by
            f.message += f" (its gradient vanishes: {vanishing.explained_by})"


__all__ = ["epsilon_dominated", "explain"]
