"""How ``massive_activations`` is checked: the largest block-output outlier, and whether it grows with damage.

The writer measures, at logging steps, max|h| / median|h| of every repeated
block's output (transformer layers) and keeps the largest
(``massive_act_ratio``, with ``massive_act_block``, its position in the layer
table's ``blocks``).  Sun et al. (2024) find such outliers in healthy
trained language models, so the finding is ``info``; it is a warning when
the ratio grew ``growth`` x from its first logged value while the training
loss went up: its smoothed last value above its best by ``damage`` x what
was learned.
Pure numpy, torch-free.
"""

from __future__ import annotations

import numpy as np

from ...contract.rundata import RunData
from ..series import persistent, rolling_median
from ..table import Finding, Rule


def _loss_damaged(run: RunData, damage: float) -> bool:
    """Whether a training loss ended above its best by ``damage`` x what it had learned (start - best)."""
    for _, values in run.losses.values():
        v = rolling_median(values[np.isfinite(values)])
        if v.size < 5:
            continue
        start, best, end = v[0], np.min(v), v[-1]
        if end - best > damage * max(start - best, 1e-12):
            return True
    return False


def massive_activations(run: RunData, rule: Rule) -> list[Finding]:
    """At most one finding per run: the block whose output holds the largest outlier."""
    steps, ratio = run.model_series("massive_act_ratio")
    if ratio.size == 0:
        return []
    _, peak = run.model_series("massive_act_max")
    _, block = run.model_series("massive_act_block")
    valid = np.isfinite(ratio)
    with np.errstate(invalid="ignore"):
        spans = persistent(valid & (ratio >= rule.threshold), valid, rule.persistence)
    if not spans:
        return []
    a, last = spans[0][0], spans[-1][1] - 1
    worst = a + int(np.nanargmax(ratio[a:]))
    blocks = run.table.extra.get("blocks") or []
    at = int(block[worst]) if worst < block.size and np.isfinite(block[worst]) else -1
    name = blocks[at] if 0 <= at < len(blocks) else None
    first = ratio[np.isfinite(ratio)][0]
    grew = ratio[worst] >= rule.params["growth"] * first
    severity = "warning" if grew and _loss_damaged(run, rule.params["damage"]) else rule.severity
    peak_text = f"max |h| {peak[worst]:.3g}, " if worst < peak.size else ""
    message = (f"massive activations: a block output's largest value is {ratio[worst]:.3g}x its median magnitude "
               f"({peak_text}at step {int(steps[worst])}; {first:.3g}x at the first logged step)"
               + ("; it grew while the training loss got worse" if severity != rule.severity else
                  "; normal in trained language models unless it grows as the loss gets worse"))
    return [Finding(
        run=run.name, layer=name, issue=rule.name, severity=severity, first_step=int(steps[a]),
        last_step=int(steps[last]), value=float(ratio[worst]), message=message, threshold=rule.threshold,
        statistic="massive_act_ratio", advice=rule.advice, ongoing=spans[-1][1] == len(steps))]


__all__ = ["massive_activations"]
