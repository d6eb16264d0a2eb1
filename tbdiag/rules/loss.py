"""How the loss rules of the table (`tbdiag.rules`) read loss curves: pure numpy, loss scalars in, findings out.

A loss curve is noisy: every value comes from another batch.  Each rule here
measures that noise on the curve itself (`tbdiag.rules.series.noise_sd`) and asks
for more than noise before it speaks, so batch-to-batch wobble is never
"improvement", "a spike" or "an oscillation".

Training curves feed `loss_divergence`, `loss_plateau`, `loss_spike` and
`loss_oscillation`; validation curves (`tbdiag.contract.rundata.is_validation_tag`)
feed only `overfitting`, which pairs each with its training curve.
"""

from __future__ import annotations

import math
import re
from typing import Iterator

import numpy as np

from ..contract.rundata import RunData, is_validation_tag
from .series import noise_sd, persistent, rolling_median, streaks
from .table import Finding, Rule

#: Standard error of a median of normal noise, in units of sd / sqrt(n).
_MEDIAN_SE = 1.2533
#: Values at the start of a curve that make its starting level.
_START = 5


def _val_tags(run: RunData) -> list[str] | None:
    tags = run.table.extra.get("val_tags")
    return list(tags) if tags is not None else None


def _curves(run: RunData, validation: bool) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(tag, steps, values)`` of the run's training (or validation) loss curves, with values."""
    val_tags = _val_tags(run)
    for tag, (steps, values) in sorted(run.losses.items()):
        if len(values) and is_validation_tag(tag, val_tags) == validation:
            yield tag, steps, values


def _finding(run: RunData, rule: Rule, steps: np.ndarray, first: int, last: int, value: float, message: str,
             threshold: float) -> Finding:
    return Finding(
        run=run.name, layer=None, issue=rule.name, severity=rule.severity,
        first_step=int(steps[first]), last_step=int(steps[last]), value=float(value), message=message,
        threshold=threshold, statistic=rule.statistic, advice=rule.advice, ongoing=last == len(steps) - 1,
    )


def _start_level(values: np.ndarray) -> float:
    """Where a curve starts: the median of its first values, or its first value if lower.

    The median shrugs off one wild first batch; the first value keeps a loss that blows up within the first
    values (a learning rate far too high, no warm-up) from raising its own starting line.
    """
    return float(min(values[0], np.median(values[:_START])))


# ---------------------------------------------------------------------------
# divergence


def loss_divergence(run: RunData, rule: Rule) -> list[Finding]:
    """NaN/Inf, or even the lows of the curve sustained above (1 + threshold) x its start."""
    out = []
    for tag, steps, values in _curves(run, validation=False):
        nonfinite = np.flatnonzero(~np.isfinite(values))
        if nonfinite.size:
            i = int(nonfinite[0])
            f = _finding(run, rule, steps, i, len(values) - 1, values[i],
                         f"loss '{tag}' became {values[i]} at step {int(steps[i])}", rule.threshold)
            f.ongoing = True
            out.append(f)
            continue
        if len(values) < _START + rule.persistence:
            continue
        start = _start_level(values)
        limit = start + rule.threshold * abs(start)
        # the lowest of the last 5 values: a curve flipping between low and high is not above its start
        lows = np.array([values[max(0, i - _START + 1): i + 1].min() for i in range(len(values))])
        mask = lows > limit
        mask[:_START] = False
        spans = persistent(mask, np.ones_like(mask), rule.persistence)
        if spans:
            a, b = spans[0][0], spans[-1][1] - 1
            level = float(np.median(values[max(0, b - _START + 1): b + 1]))
            out.append(_finding(
                run, rule, steps, a, b, level,
                f"loss '{tag}' rose to {level:.4g}, above its starting {start:.4g} by more than "
                f"{rule.threshold:.0%}, from step {int(steps[a])}", rule.threshold))
    return out


# ---------------------------------------------------------------------------
# plateau


def _levels(values: np.ndarray) -> tuple[float, float, float, float]:
    """(first, best, last level, noise standard error of a level difference) of a curve.

    The first level is the median of the first tenth (at least 5 values); the
    later levels are medians of consecutive quarters counted back from the end
    (the last one is the last level, the lowest the best).  A converged run
    keeps its descent in the first window, a run that learned and then broke
    keeps its best, and medians of many values shrug off single wild batches
    while the few windows compared keep noise from passing for improvement.
    """
    n = len(values)
    w0, w1 = max(_START, n // 10), max(_START, n // 4)
    first = float(np.median(values[:w0]))
    later = [float(np.median(values[end - w1:end])) for end in range(n, w0 + w1 - 1, -w1)] or [
        float(np.median(values[-w1:]))]
    se = _MEDIAN_SE * noise_sd(values) * math.sqrt(1.0 / w0 + 1.0 / w1)
    return first, min(later), later[0], se


def output_classes(run: RunData) -> int | None:
    """The number of classes the model's output scores (its last dimension), when the writer recorded it."""
    width = run.table.extra.get("output_width")
    return int(width) if isinstance(width, (int, float)) and width >= 2 else None


def loss_plateau(run: RunData, rule: Rule) -> list[Finding]:
    """No improvement beyond the curve's own noise, or a classification loss stuck at chance level (ln C)."""
    out = []
    z, band = rule.params["z"], rule.params["chance_band"]
    classes = output_classes(run)
    for tag, steps, values in _curves(run, validation=False):
        if len(values) < rule.persistence or not np.isfinite(values).all():
            continue
        first, best, last, se = _levels(values)
        need = max(z * se, rule.threshold * abs(first))
        chance = math.log(classes) if classes is not None else None
        if first - best < need:
            at_chance = chance is not None and last >= (1 - band) * chance
            out.append(_finding(
                run, rule, steps, 0, len(values) - 1, (first - best) / abs(first) if first else first - best,
                f"loss '{tag}' has not fallen beyond its noise over {len(values)} values: from {first:.4g} to at "
                f"best {best:.4g} (noise {se:.2g}; needs a fall of {need:.2g})"
                + (f", and sits at the chance level ln {classes} = {chance:.4g} of a {classes}-way output"
                   if at_chance else ""), rule.threshold))
            continue
        if chance is None:
            continue
        half = len(values) // 2
        h_first, h_best, h_last, h_se = _levels(values[half:])
        if h_last >= (1 - band) * chance and h_first - h_best < max(z * h_se, rule.threshold * abs(h_first)):
            out.append(_finding(
                run, rule, steps, half, len(values) - 1, h_last,
                f"loss '{tag}' stays at {h_last:.4g}, the chance level ln {classes} = {chance:.4g} of a "
                f"{classes}-way output, since step {int(steps[half])}: the model predicts no better than "
                "guessing (labels that do not match the inputs?). Chance assumes the data uses all "
                f"{classes} outputs as classes", chance))
    return out


# ---------------------------------------------------------------------------
# spike


def _episodes(mask: np.ndarray, persistence: int, gap: int) -> list[tuple[int, int]]:
    """Streaks of at least ``persistence``, merged when fewer than ``gap`` values apart."""
    spans = [(a, b) for a, b in streaks(mask) if b - a >= persistence]
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a - merged[-1][1] < gap:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _spike_size(jump: float, noise: float, learned: float) -> str:
    parts = [f"{jump / noise:.0f}x its batch-to-batch noise"] if noise > 0 else []
    if learned > 0:
        parts.append(f"{min(jump / learned, 9.99):.0%} of what was learned")
    return f" ({'; '.join(parts)})" if parts else ""


def _beyond_its_bounces(jump: np.ndarray, candidate: np.ndarray, history: float) -> np.ndarray:
    """Where a departure from the running best exceeds ``history`` x the largest bounce the curve made before.

    A bounce is a departure that was not itself a spike candidate, counted once it is two smoothing windows
    old (so the rise of a jump is not its own history).  Noisy labels or SGD with momentum make a curve
    bounce by design; a spike departs from that history, and a second breakdown after a recovery still counts.
    """
    out = np.ones(len(jump), dtype=bool)
    lag = 2 * _START
    largest = 0.0
    for t in range(len(jump)):
        if t >= lag and not candidate[t - lag] and np.isfinite(jump[t - lag]):
            largest = max(largest, float(jump[t - lag]))
        out[t] = jump[t] > history * largest
    return out


def loss_spike(run: RunData, rule: Rule) -> list[Finding]:
    """The smoothed loss jumps far above its running best: in noise units and against what was learned."""
    out = []
    z = rule.params["z"]
    for tag, steps, values in _curves(run, validation=False):
        if len(values) < 2 * _START or not np.isfinite(values).all():
            continue
        smooth = rolling_median(values, _START)
        best = np.minimum.accumulate(np.concatenate([[np.inf] * (_START - 1), smooth[_START - 1:]]))
        prev_best = np.concatenate([[np.inf], best[:-1]])
        start = _start_level(values)
        learned = np.maximum(start - prev_best, 0.0)
        scale = np.maximum(learned, 0.0)
        with np.errstate(invalid="ignore"):
            jump = smooth - prev_best
        need = np.maximum.reduce([np.full(len(values), z * noise_sd(values)), rule.threshold * scale,
                                  rule.params["relative"] * np.abs(np.where(np.isfinite(prev_best), prev_best, 0))])
        with np.errstate(invalid="ignore"):
            mask = np.isfinite(prev_best) & (jump > need) & (need > 0)
        mask &= _beyond_its_bounces(jump, mask, rule.params["history"])
        for a, b in _episodes(mask, rule.persistence, gap=_START):
            top = a + int(np.argmax(smooth[a:b]))
            out.append(_finding(
                run, rule, steps, a, b - 1, smooth[top],
                f"loss '{tag}' jumped from its best {prev_best[a]:.4g} to {smooth[top]:.4g} at step {int(steps[a])}"
                + _spike_size(jump[top], noise_sd(values), learned[a]), rule.threshold))
    return out


# ---------------------------------------------------------------------------
# oscillation


def _swings(smooth: np.ndarray, h: float) -> list[tuple[int, int, float]]:
    """Zig-zag of a curve: ``(from index, to index, change)`` of every move of at least ``h`` between turns."""
    moves: list[tuple[int, int, float]] = []
    lo = hi = 0  # before the first move: the lowest and highest value so far
    pivot = ext = 0  # the last turn, and the extreme since it
    direction = 0
    for i in range(1, len(smooth)):
        x = smooth[i]
        if direction == 0:
            lo, hi = (i if x < smooth[lo] else lo), (i if x > smooth[hi] else hi)
            if x - smooth[lo] >= h:
                direction, pivot, ext = 1, lo, i
            elif smooth[hi] - x >= h:
                direction, pivot, ext = -1, hi, i
        elif direction * (x - smooth[ext]) > 0:
            ext = i  # the move goes on
        elif direction * (smooth[ext] - x) >= h:  # turned by at least h
            moves.append((pivot, ext, float(smooth[ext] - smooth[pivot])))
            pivot, ext, direction = ext, i, -direction
    if direction:
        moves.append((pivot, ext, float(smooth[ext] - smooth[pivot])))
    return moves


def loss_oscillation(run: RunData, rule: Rule) -> list[Finding]:
    """Repeated swings up and down, each as large as the loss's level, without a rising trend."""
    out = []
    progress = rule.params["progress"]
    for tag, steps, values in _curves(run, validation=False):
        if len(values) < 4 * _START or not np.isfinite(values).all():
            continue
        smooth = rolling_median(values, _START)
        level = float(np.median(values[len(values) // 10:]))
        learned = max(0.0, _start_level(values) - float(np.median(values[-max(_START, len(values) // 4):])))
        h = max(rule.threshold * abs(level), progress * learned)
        if h <= 0:
            continue
        moves = _swings(smooth, h)
        ups = [m for m in moves if m[2] > 0]
        downs = [m for m in moves if m[2] < 0]
        if len(ups) < rule.persistence or len(downs) < rule.persistence:
            continue
        troughs = [smooth[a] for a, _, _ in ups]
        if troughs[-1] > troughs[0] + h:
            continue  # the lows climb: a rising loss, loss_divergence's to judge
        peaks = [smooth[b] for _, b, _ in ups]
        lo, hi = float(np.median(troughs)), float(np.median(peaks))
        a, b = ups[0][0], max(m[1] for m in moves)
        out.append(_finding(
            run, rule, steps, a, b, (hi - lo) / abs(level) if level else hi - lo,
            f"loss '{tag}' swings between about {lo:.3g} and {hi:.3g} ({len(ups)} rises and {len(downs)} falls of "
            f"more than {h:.3g}) from step {int(steps[a])}, without settling", rule.threshold))
    return out


# ---------------------------------------------------------------------------
# overfitting


def _plain(tag: str) -> str:
    """A tag without its validation/training word, to pair ``val/loss`` with ``train/loss``."""
    parts = re.split(r"[/_.\- ]", tag.lower())
    return "/".join(p for p in parts if p and p not in ("val", "valid", "validation", "eval", "evaluation", "test",
                                                         "train", "training"))


def _training_partner(run: RunData, val_tag: str) -> str | None:
    train = [tag for tag, _, _ in _curves(run, validation=False)]
    same = [t for t in train if _plain(t) == _plain(val_tag)]
    if len(same) == 1:
        return same[0]
    return train[0] if len(train) == 1 else None


def overfitting(run: RunData, rule: Rule) -> list[Finding]:
    """A validation loss rising past its best (beyond its noise) while the paired training loss falls."""
    out = []
    z = rule.params["z"]
    for tag, steps, values in _curves(run, validation=True):
        ok = np.isfinite(values)
        steps, values = steps[ok], values[ok]
        partner = _training_partner(run, tag)
        if partner is None or len(values) < rule.persistence + 2:
            continue
        best_i = int(np.argmin(values))
        best = float(values[best_i])
        need = max(rule.threshold * abs(best), z * noise_sd(values))
        tail = values[-rule.persistence:]
        if best_i >= len(values) - rule.persistence or not (tail > best + need).all():
            continue
        t_steps, t_values = run.losses[partner]
        t_ok = np.isfinite(t_values) & (t_steps >= steps[best_i])
        t_steps, t_values = t_steps[t_ok], t_values[t_ok]
        if len(t_values) < 2 * _START:
            continue
        w = max(_START // 2, len(t_values) // 5)
        t_first, t_last = float(np.median(t_values[:w])), float(np.median(t_values[-w:]))
        if t_last >= t_first:
            continue  # training loss not falling: not overfitting
        rise = np.flatnonzero(values[best_i:] > best + need)
        a = best_i + int(rise[0])
        out.append(_finding(
            run, rule, steps, a, len(values) - 1, values[-1],
            f"validation loss '{tag}' rose from its best {best:.4g} (step {int(steps[best_i])}) to {values[-1]:.4g} "
            f"while the training loss '{partner}' fell from {t_first:.4g} to {t_last:.4g}: the model is "
            "memorising the training set", rule.threshold))
    return out


def explain(findings: list[Finding], run: RunData) -> None:
    """Demote loss findings that follow from another one on the same run to ``info``.

    An oscillating loss also jumps above its best and rises above its start
    at every peak, and may not fall on average: those are the oscillation.  A
    loss that jumps and keeps climbing is diverging: the jump is its start.
    A loss that stops learning or jumps once a layer has died or turned NaN
    follows from that layer.  Runs after the layer rules' findings are in.
    """
    by_issue = {f.issue: f for f in findings if f.layer is None and f.explained_by is None}
    # a layer that died (nearly all its units) or turned NaN takes the loss with it: a plateau or a jump
    # that begins with it or after it is its symptom, not a second illness
    broken = [f for f in findings if f.layer is not None and f.explained_by is None
              and (f.issue == "nonfinite" or (f.issue == "dead_relu" and (f.value or 0) >= 0.9))]
    causes = {"loss_spike": ("loss_oscillation", "loss_divergence"),
              "loss_divergence": ("loss_oscillation",),
              "loss_plateau": ("loss_oscillation", "loss_divergence", "loss_spike")}
    for f in findings:
        if f.layer is not None or f.issue not in causes or f.explained_by is not None:
            continue
        if f.issue == "loss_divergence" and not np.isfinite(f.value if f.value is not None else np.nan):
            continue  # a NaN loss is divergence whatever came before
        cause = next((by_issue[c] for c in causes[f.issue] if c in by_issue), None)
        if cause is not None:
            f.severity = "info"
            f.explained_by = cause.issue
            f.message += f" (part of the {cause.issue.replace('_', ' ')})"
            continue
        layer = next((b for b in broken if f.issue in ("loss_plateau", "loss_spike") and f.first_step >= b.first_step),
                     None)
        if layer is not None:
            f.severity = "info"
            f.explained_by = f"{layer.issue}:{layer.layer}"
            f.message += f" (follows from {layer.issue} in {layer.layer} since step {layer.first_step})"


__all__ = ["explain", "loss_divergence", "loss_plateau", "loss_spike", "loss_oscillation", "overfitting",
           "output_classes"]
