"""How ``expert_collapse`` is checked: a router's busiest expert and its idle experts, over logged batches.

The writer measures each mixture-of-experts router's top-k choices at
logging steps (``expert_top_share``, ``experts_idle_frac`` on the router's
row).  A router is collapsed where, for ``persistence`` logged batches in a
row, its busiest expert takes at least the threshold of the tokens or at
least ``idle`` of its experts get none.  Pure numpy, torch-free.
"""

from __future__ import annotations

import numpy as np

from ...contract.rundata import RunData
from ..series import persistent
from ..table import Finding, Rule


def expert_collapse(run: RunData, rule: Rule) -> list[Finding]:
    """One finding per router with a persistent collapse."""
    if run.stats.size == 0:
        return []
    share = run.column("expert_top_share").astype(np.float64)
    idle = run.column("experts_idle_frac").astype(np.float64)
    valid = np.isfinite(share)
    with np.errstate(invalid="ignore"):
        sick = valid & ((share >= rule.threshold) | (idle >= rule.params["idle"]))
    findings = []
    for row in np.flatnonzero(valid.any(axis=0)):
        spans = persistent(sick[:, row], valid[:, row], rule.persistence)
        if not spans:
            continue
        a, b = spans[0][0], spans[-1][1] - 1
        last = spans[-1][1] - 1
        message = (f"the router sends {100 * share[last, row]:.0f}% of the tokens to its busiest expert and "
                   f"{100 * idle[last, row]:.0f}% of its experts get none (since step {int(run.steps[a])})")
        findings.append(Finding(
            run=run.name, layer=run.layer_names[row], issue=rule.name, severity=rule.severity,
            first_step=int(run.steps[a]), last_step=int(run.steps[b]), value=float(share[last, row]),
            message=message, threshold=rule.threshold, statistic="expert_top_share", advice=rule.advice,
            ongoing=spans[-1][1] == len(run.steps),
            spans=tuple((int(run.steps[s]), int(run.steps[e - 1])) for s, e in spans)))
    return findings


__all__ = ["expert_collapse"]
