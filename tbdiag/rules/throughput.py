"""Throughput as the reading side sees it: tbdiag's ``perf/*`` scalars and the ``input_bound`` check.

The writer (`tbdiag.watch.timing.StepTimer`) logs three scalars at every
logging step, each aggregated over the steps since the previous one:

- ``perf/step_time_ms``: wall-clock milliseconds per step, end to end;
- ``perf/input_wait_frac``: the share of that time the training loop spent
  between the end of one step and the next training forward (the loader and
  the loop's own code), or, with `DiagnosticWriter.watch_loader`, inside the
  loader's ``__next__``;
- ``perf/samples_per_sec``: samples (dim 0 of each training forward's first
  input tensor) per second of wall-clock time.

Torch-free (the report and the TensorBoard plugin never import torch).
"""

from __future__ import annotations

import numpy as np

from ..contract.rundata import RunData
from .series import persistent
from .table import Finding, Rule

STEP_TIME_TAG = "perf/step_time_ms"
INPUT_WAIT_TAG = "perf/input_wait_frac"
SAMPLES_TAG = "perf/samples_per_sec"
#: tbdiag's own throughput scalars, in the order the tab draws them.
PERF_TAGS = (STEP_TIME_TAG, INPUT_WAIT_TAG, SAMPLES_TAG)


def is_perf_tag(tag: str) -> bool:
    """Whether a scalar tag is one of tbdiag's throughput scalars (read into `RunData.perf`)."""
    return tag in PERF_TAGS


def input_bound(run: RunData, rule: Rule) -> list[Finding]:
    """One model-level finding when the input wait share stays high: ``warning`` above the rule's
    ``warning`` setting, else ``info`` above its threshold, each for ``persistence`` logging steps."""
    steps, frac = run.perf.get(INPUT_WAIT_TAG, (np.zeros(0, dtype=np.int64), np.zeros(0)))
    if len(frac) == 0:
        return []
    valid = np.isfinite(frac)
    # a wait too short to matter is the loop's own bookkeeping on a tiny step, not a loader to fix
    wait_ms = frac * _aligned(run, STEP_TIME_TAG, steps)
    with np.errstate(invalid="ignore"):
        long_enough = ~np.isfinite(wait_ms) | (wait_ms >= rule.params["min_wait_ms"])
    for level, severity in ((rule.params["warning"], "warning"), (rule.threshold, "info")):
        with np.errstate(invalid="ignore"):
            spans = persistent(valid & (frac >= level) & long_enough, valid, rule.persistence)
        if spans:
            break
    else:
        return []
    a, b = spans[-1]
    share = float(np.mean(frac[a:b]))
    step_ms = _mean_over(run, STEP_TIME_TAG, steps[a:b])
    timing = (f" ({share * step_ms:.0f} of {step_ms:.0f} ms per step)" if step_ms is not None else "")
    first, last = int(steps[spans[0][0]]), int(steps[b - 1])
    return [Finding(
        run=run.name, layer=None, issue=rule.name, severity=severity,
        first_step=first, last_step=last, value=share,
        message=f"training waits for its input {100 * share:.0f}% of the time{timing}, since step {first}: "
                f"the model idles while the next batch is loaded (threshold {100 * level:.0f}%)",
        threshold=level, statistic=rule.statistic, advice=rule.advice,
        ongoing=b == len(frac),
        spans=tuple((int(steps[i]), int(steps[j - 1])) for i, j in spans),
    )]


def _aligned(run: RunData, tag: str, steps: np.ndarray) -> np.ndarray:
    """A perf series at the given logging steps (NaN where it was not logged)."""
    s, v = run.perf.get(tag, (np.zeros(0, dtype=np.int64), np.zeros(0)))
    out = np.full(len(steps), np.nan)
    at = {int(step): i for i, step in enumerate(s)}
    for i, step in enumerate(steps):
        j = at.get(int(step))
        if j is not None:
            out[i] = v[j]
    return out


def _mean_over(run: RunData, tag: str, steps: np.ndarray) -> float | None:
    """Mean of a perf series at the given logging steps; None when not logged there."""
    s, v = run.perf.get(tag, (np.zeros(0, dtype=np.int64), np.zeros(0)))
    picked = v[np.isin(s, steps)]
    picked = picked[np.isfinite(picked)]
    return float(np.mean(picked)) if picked.size else None
