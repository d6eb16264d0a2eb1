"""How the learning-rate schedule rule (`tbdiag.rules`) reads a run: pure numpy.

It reads the learning rate the writer records at every logging step
(``lr_max``, the largest param group's) against the rate the optimizer was
configured with (``lr_initial``, which torch's LR schedulers keep in each
param group).  Two mistakes, both common and both seen elsewhere only as
slow learning (`update_too_small`, `frozen_layer`, `loss_plateau`, which
`explain` attributes to them):

- a rate that sits at exactly 0 for a stretch of the run: a warm-up scheduler
  never stepped (it stays at its first value, 0), a lambda returning 0, a
  schedule built for fewer steps than the run takes (a linear decay reaches 0
  and stays there);
- a rate that, by the time it stops changing, has never come near the
  configured one: a warm-up scheduler stepped once per epoch instead of once
  per step, so the warm-up lasts epochs; ``num_warmup_steps`` counted in the
  wrong unit.

What stays silent: a warm-up itself (it changes at every logged step, and
starts at 0 for one step only), cosine or linear decay to about 0 at the end,
constant-then-decay and WSD schedules, step decay after a peak at the
configured rate, schedules that rise above the configured rate (OneCycleLR,
CyclicLR), and runs without a scheduler (no ``initial_lr``: the rate set is
the one used).
"""

from __future__ import annotations

import math

import numpy as np

from ..contract.rundata import RunData
from .series import streaks
from .table import Finding, Rule

#: Findings that a learning rate at 0, or far below its configured value, brings about.
SCHEDULE_CONSEQUENCES = ("update_too_small", "frozen_layer", "loss_plateau", "vanishing_gradient")


def _configured(run: RunData) -> float:
    _, values = run.model_series("lr_initial")
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else math.nan


def at_zero(lr: np.ndarray, persistence: int, share: float) -> list[tuple[int, int]]:
    """Stretches ``[a, b)`` of logged steps with the rate at exactly 0, at least ``persistence`` long and at least
    ``share`` of the logged steps (a schedule that touches 0 on its last step or two is a plan)."""
    need = max(persistence, math.ceil(share * len(lr)))
    return [(a, b) for a, b in streaks(lr == 0) if b - a >= need]


def below_configured(lr: np.ndarray, configured: float, ratio: float, persistence: int) -> list[tuple[int, int]]:
    """Stretches where the highest rate so far is below ``ratio`` x the configured one while the rate mostly stands
    still (unchanged since the previous logged step at half of them or more): a warm-up stepped per epoch climbs
    in stairs, one a step rises at every logged step."""
    if not math.isfinite(configured) or configured <= 0 or lr.size == 0:
        return []
    finite = np.where(np.isfinite(lr), lr, 0.0)
    peak = np.maximum.accumulate(finite)
    low = np.isfinite(lr) & (peak < ratio * configured)
    still = np.zeros(lr.shape, dtype=bool)
    still[1:] = lr[1:] == lr[:-1]
    out = []
    for a, b in streaks(low):  # (a stretch at 0 throughout is `at_zero`'s)
        if b - a >= persistence and (lr[a:b] > 0).any() and np.count_nonzero(still[a + 1:b]) >= (b - a - 1) / 2:
            out.append((a, b))
    return out


def lr_schedule(run: RunData, rule: Rule) -> list[Finding]:
    """A learning rate stuck at 0, or never reaching ``threshold`` x the configured rate while it stands still."""
    steps, lr = run.model_series("lr_max")
    if steps.size == 0:
        return []
    configured = _configured(run)
    last_logged = int(run.steps[-1]) if len(run.steps) else int(steps[-1])
    out = []

    def finding(spans: list[tuple[int, int]], value: float, message: str) -> Finding:
        first, last = spans[0][0], spans[-1][1] - 1
        return Finding(
            run=run.name, layer=None, issue=rule.name, severity=rule.severity,
            first_step=int(steps[first]), last_step=int(steps[last]), value=value, message=message,
            threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
            ongoing=int(steps[last]) >= last_logged,
            spans=tuple((int(steps[a]), int(steps[b - 1])) for a, b in spans))

    zero = at_zero(lr, rule.persistence, rule.params["zero_share"])
    if zero:
        a, b = zero[0]
        peak = float(np.nanmax(lr)) if np.isfinite(lr).any() else 0.0
        before = "from the first logged step" if a == 0 else \
            f"after reaching {float(np.nanmax(lr[:a])):.3g}" if np.isfinite(lr[:a]).any() else ""
        out.append(finding(zero, 0.0, (
            f"the learning rate is exactly 0 from step {int(steps[a])} to step {int(steps[b - 1])} "
            f"({b - a} logged steps, {before}): nothing moves the weights (AdamW's weight decay is scaled by "
            "the rate too). "
            + ("A warm-up that starts at 0 and was never stepped stays there: call scheduler.step() after each "
               "optimizer.step()" if a == 0 and peak == 0 else
               "A schedule built for fewer steps than the run takes has decayed to 0 before the end: check "
               "num_training_steps (steps, not epochs; with gradient accumulation, optimizer steps)"))))
    low = below_configured(lr, configured, rule.threshold, rule.persistence)
    if low:
        a, b = low[0]
        peak = float(np.nanmax(lr[:b]))
        out.append(finding(low, peak / configured, (
            f"the learning rate peaks at {peak:.3g} by step {int(steps[b - 1])}, {peak / configured:.1%} of the "
            f"{configured:.3g} the optimizer was configured with, and stands still between logged steps: a "
            "warm-up scheduler stepped once per epoch instead of once per step (its warm-up then lasts as many "
            "epochs as it has steps), or num_warmup_steps far larger than meant")))
    return out


def explain(findings: list[Finding], run: RunData) -> None:
    """Demote slow learning that follows from the schedule (`SCHEDULE_CONSEQUENCES`, while it holds) to ``info``."""
    causes = [f for f in findings if f.issue == "lr_schedule"]
    for f in findings:
        if f.issue not in SCHEDULE_CONSEQUENCES or f.explained_by is not None:
            continue
        cause = next((c for c in causes if f.first_step <= c.last_step and f.last_step >= c.first_step), None)
        if cause is not None:
            f.severity = "info"
            f.explained_by = "lr_schedule"
            f.message += f" (follows from the learning rate: see lr_schedule from step {cause.first_step})"


__all__ = ["SCHEDULE_CONSEQUENCES", "at_zero", "below_configured", "explain", "lr_schedule"]
