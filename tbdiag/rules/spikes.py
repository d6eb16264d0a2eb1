"""How ``gradient_spike`` is checked: the tracker's worst jump per logging window, and the layers that carried it.

The writer keeps, for each window between logging steps, the step whose
global gradient norm stood furthest above the last 128 steps
(`tbdiag.measure.gradient_spikes`), with every layer's gradient norm there
(``spike_grad_norm``).  A window whose jump passes both the z-score and the
ratio is a spike; spikes in consecutive windows are one finding (a run that
jumps and stays up for a while).  The layers that carried it are those whose
squared gradient norm grew most over their own median before the spike
(``spike_grad_typical``, the tracker's, measured as the spike's norms are;
the logged gradient norms' in older logs), until they hold most of the jump;
the finding sits on the first.
Pure numpy, torch-free.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..contract.rundata import RunData, is_validation_tag
from .table import Finding, Rule

#: The tracker's ring (`tbdiag.measure.gradient_spikes.RING`): a loss at the spike is judged against as many steps.
RING = 128
#: Where the loss at the spike is unknown, a logged loss that fell below this share of its level across the step
#: is a model escaping a plateau (its gradient norm jumps while it learns), not damage.
ESCAPE = 0.5

#: The carriers named cover this share of the layers' summed growth of squared gradient norm ...
CARRIED_SHARE = 0.8
#: ... and are at most this many.
MAX_CARRIERS = 4


def _series(run: RunData, name: str, steps: np.ndarray) -> np.ndarray:
    s, v = run.model_series(name)
    out = np.full(len(steps), np.nan)
    pos = {int(x): i for i, x in enumerate(steps)}
    for step, value in zip(s, v):
        if int(step) in pos:
            out[pos[int(step)]] = value
    return out


def carriers(spike: np.ndarray, typical: np.ndarray) -> list[tuple[int, float]]:
    """``(row, growth)`` of the layers that carried a jump, largest share first.

    ``spike``: each layer's gradient norm at the spike step; ``typical``: its usual norm (NaN: unknown, then
    judged against 0).  ``growth`` is spike / typical (inf where typical is 0).
    """
    base = np.nan_to_num(typical, nan=0.0)
    excess = np.nan_to_num(spike, nan=0.0) ** 2 - base ** 2
    total = float(np.sum(excess[excess > 0]))
    if total <= 0:
        return []
    out, covered = [], 0.0
    for row in np.argsort(-excess):
        if excess[row] <= 0 or covered >= CARRIED_SHARE * total or len(out) >= MAX_CARRIERS:
            break
        covered += float(excess[row])
        growth = float(spike[row] / base[row]) if base[row] > 0 else math.inf
        out.append((int(row), growth))
    return out


def _training_losses(run: RunData) -> list[tuple[np.ndarray, np.ndarray]]:
    val_tags = run.table.extra.get("val_tags")
    return [(np.asarray(steps), np.asarray(values, dtype=np.float64)) for tag, (steps, values) in
            sorted(run.losses.items()) if len(values) and not is_validation_tag(tag, val_tags)]


def logged_loss_ratio(losses: list[tuple[np.ndarray, np.ndarray]], step: int) -> float:
    """The training loss logged at ``step`` over the median of those logged in the `RING` steps before; NaN when
    no loss was logged at that step."""
    for steps, values in losses:
        here = np.flatnonzero(steps == step)
        before = values[(steps < step) & (steps >= step - RING) & np.isfinite(values)]
        if here.size and before.size and np.median(before) > 0:
            return float(values[here[-1]] / np.median(before))
    return math.nan


def _logged_loss(losses: list[tuple[np.ndarray, np.ndarray]], step: int) -> float:
    for steps, values in losses:
        here = np.flatnonzero(steps == step)
        if here.size:
            return float(values[here[-1]])
    return math.nan


def start_level(losses: list[tuple[np.ndarray, np.ndarray]], n: int = 5) -> float:
    """The training loss of the untrained model: the median of the first ``n`` logged values; NaN without one."""
    for _, values in losses:
        first = values[np.isfinite(values)][:n]
        if first.size:
            return float(np.median(first))
    return math.nan


def loss_fell_across(losses: list[tuple[np.ndarray, np.ndarray]], step: int, n: int = 5) -> bool:
    """Whether the logged training loss fell to less than `ESCAPE` of its level across ``step`` (medians of ``n``
    values each side): the model escaping a plateau, whose gradients jump too."""
    for steps, values in losses:
        ok = np.isfinite(values)
        before, after = values[ok & (steps < step)][-n:], values[ok & (steps > step)][:n]
        if before.size and after.size:
            return bool(np.median(after) < ESCAPE * np.median(before))
    return False


def gradient_spike(run: RunData, rule: Rule) -> list[Finding]:
    """One finding per stretch of logging windows whose largest gradient jump passes the thresholds."""
    if run.stats.size == 0:
        return []
    spike_norms, grad_norms = run.column("spike_grad_norm"), run.column("grad_norm")
    usual = run.column("spike_grad_typical")
    steps = run.steps
    z = _series(run, "grad_spike_z", steps)
    ratio = _series(run, "grad_spike_ratio", steps)
    at = _series(run, "grad_spike_step", steps)
    loss_ratio = _series(run, "grad_spike_loss_ratio", steps)
    with np.errstate(invalid="ignore"):
        hit = (z >= rule.threshold) & (ratio >= rule.params["ratio"]) & np.isfinite(at)
    if not hit.any():
        return []
    losses = _training_losses(run)
    start = start_level(losses)
    for t in np.flatnonzero(hit):  # the loss at the step decides; where it is not known, the size and the curve
        logged = logged_loss_ratio(losses, int(at[t]))
        if not math.isfinite(loss_ratio[t]):
            loss_ratio[t] = logged
        if math.isfinite(loss_ratio[t]):
            hit[t] = loss_ratio[t] >= rule.params["loss"]
            value = _logged_loss(losses, int(at[t]))
            if hit[t] and math.isfinite(start) and math.isfinite(value):
                hit[t] = value >= rule.params["start"] * start  # worse than the untrained model
        else:
            hit[t] = ratio[t] >= rule.params["alone"] and not loss_fell_across(losses, int(at[t]))
    if not hit.any():
        return []
    names = run.layer_names
    findings: list[Finding] = []
    t = 0
    while t < len(steps):
        if not hit[t]:
            t += 1
            continue
        end = t
        while end + 1 < len(steps) and hit[end + 1]:
            end += 1
        worst = t + int(np.argmax(np.where(hit[t:end + 1], ratio[t:end + 1], -np.inf)))
        first = int(at[t])
        # each layer's usual gradient norm: the tracker's own median before the spike (the same measure), or, in
        # logs written before it kept one, the median of its logged norms at the logging steps before the first spike
        typical = usual[worst] if usual.size and np.isfinite(usual[worst]).any() else None
        if typical is None:
            before = steps < first
            history = grad_norms[before] if before.any() else grad_norms[~hit]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # 'All-NaN slice': a layer never logged before it
                typical = np.nanmedian(history, axis=0) if history.size else np.full(len(names), np.nan)
        carried = carriers(spike_norms[worst], typical)
        where = ", ".join(f"{names[row]} (x{growth:.3g})" if math.isfinite(growth) else names[row]
                          for row, growth in carried)
        loss = f"; the loss at that step was {loss_ratio[worst]:.3g}x its median" \
            if math.isfinite(loss_ratio[worst]) else ""
        more = f" (and in {end - t} following logging window{'s' if end - t > 1 else ''}, up to step {int(at[end])})" \
            if end > t else ""
        message = (f"the global gradient norm jumped to {ratio[worst]:.3g}x the median of the last 128 steps at "
                   f"step {int(at[worst])} ({z[worst]:.3g} robust standard deviations){more}{loss}; "
                   + (f"carried by {where}" if where else "no layer stands out"))
        findings.append(Finding(
            run=run.name, layer=names[carried[0][0]] if carried else None, issue=rule.name, severity=rule.severity,
            first_step=first, last_step=int(at[end]), value=float(ratio[worst]), message=message,
            threshold=rule.threshold, statistic="grad_spike_z", advice=rule.advice,
            ongoing=end == len(steps) - 1))
        t = end + 1
    return findings


__all__ = ["gradient_spike", "carriers"]
