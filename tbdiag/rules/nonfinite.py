"""How the ``nonfinite`` rule is checked: the sentinel's exact step and layer, the logged counts as evidence.

The writer's sentinel (`tbdiag.watch.sentinel`) records the step where NaN/Inf was
born, at any ``log_every``, and the layer and pass (forward, backward, the
model's input) where it could tell.  The per-layer NaN/Inf counts of the
logging steps say how far it spread and for how long; for runs written
without the sentinel (or where it could not name the layer: an accelerator
without ``stop_on``) they also place it, at the first logging step that holds
any: the first layer in model order with a non-finite output or weights, else
the last one with non-finite gradients (gradients flow backwards).
Pure numpy, torch-free.
"""

from __future__ import annotations

import math

import numpy as np

from ..contract.rundata import RunData
from .series import streaks
from .table import Finding, Rule

#: ``nonfinite_where`` codes (`tbdiag.watch.sentinel.WHERE_CODES`) as the report words them.
_WHERE_WORDS = {0: "in its output (forward)", 1: "in its gradients (backward)", 2: "in the model's input"}
_COUNTS = (("activations", "act_nonfinite"), ("weights", "weight_nonfinite"), ("gradients", "grad_nonfinite"))


def _sentinel(run: RunData) -> tuple[int, int | None, int | None] | None:
    """(step, layer row or None, where code or None) the sentinel recorded, or None."""
    steps, values = run.model_series("nonfinite_step")
    finite = np.isfinite(values)
    if not finite.any():
        return None
    at = int(np.flatnonzero(finite)[np.argmin(values[finite])])
    logged_at = int(steps[at])

    def value_of(name: str) -> int | None:
        s, v = run.model_series(name)
        hit = np.flatnonzero((s == logged_at) & np.isfinite(v))
        return int(v[hit[0]]) if hit.size else None

    layer = value_of("nonfinite_layer")
    if layer is not None and not 0 <= layer < len(run.table.layers):
        layer = None
    return int(values[at]), layer, value_of("nonfinite_where")


def check_nonfinite(run: RunData, rule: Rule) -> list[Finding]:
    """One finding per run: where and when NaN/Inf first appeared, and how far it spread."""
    counts = {kind: run.column(column) for kind, column in _COUNTS}
    with np.errstate(invalid="ignore"):
        bad = {kind: np.nan_to_num(v, nan=0.0) > rule.threshold for kind, v in counts.items()}
    anybad = bad["activations"] | bad["weights"] | bad["gradients"]
    bad_rows = anybad.any(axis=1) if anybad.size else np.zeros(len(run.steps), dtype=bool)
    steps_bad = np.flatnonzero(bad_rows)
    sentinel = _sentinel(run)
    if steps_bad.size == 0 and sentinel is None:
        return []

    # the logging step that shows the spread: the first one holding NaN/Inf at or after the sentinel's step
    t0 = None
    if steps_bad.size:
        later = steps_bad[run.steps[steps_bad] >= sentinel[0]] if sentinel is not None else steps_bad
        t0 = int(later[0]) if later.size else int(steps_bad[0])
    where, layer, count = None, None, math.nan
    if t0 is not None:
        for kind in ("activations", "weights"):
            idx = np.flatnonzero(bad[kind][t0])
            if idx.size:
                where, layer = kind, int(idx[0])
                break
        if layer is None:
            idx = np.flatnonzero(bad["gradients"][t0])
            where, layer = "gradients", int(idx[-1])
        count = float(counts[where][t0, layer])
    words = f"in its {where}"
    first_step = int(run.steps[t0]) if t0 is not None else 0
    if sentinel is not None:
        first_step, s_layer, s_where = sentinel
        if s_layer is not None:
            layer = s_layer
            count = float(counts[where][t0, s_layer]) if t0 is not None and where is not None else math.nan
        if s_where is not None:
            words = _WHERE_WORDS.get(s_where, words)
        elif layer is not None:  # the step from the device-side check, the layer from the next logged step
            words = (f"in the model's output (the step from the per-step check; the layer is the first holding "
                     f"NaN/Inf at the next logged step, {int(run.steps[t0])}, {words})")
        else:
            words = "in the model's output"
    name = run.table.layers[layer].name if layer is not None else None
    spread = (f"; {int(np.count_nonzero(anybad[t0]))} layer(s) hold NaN/Inf at logged step {int(run.steps[t0])}"
              if t0 is not None else "")
    if where is not None and t0 is not None and math.isfinite(count) and count > 0:
        spread = f" ({int(count)} elements at logged step {int(run.steps[t0])})" + spread
    spans = [(int(run.steps[a]), int(run.steps[b - 1])) for a, b in streaks(bad_rows)]
    if not spans or spans[0][0] > first_step:
        # the sentinel's step comes before the first logged step that shows it: the span starts there
        follows = spans and int(np.searchsorted(run.steps, first_step)) == int(np.searchsorted(run.steps, spans[0][0]))
        spans = [(first_step, spans[0][1])] + spans[1:] if follows else [(first_step, first_step)] + spans
    last = spans[-1][1]
    return [Finding(
        run=run.name, layer=name, issue=rule.name, severity=rule.severity,
        first_step=first_step, last_step=last, value=None if math.isnan(count) else count,
        message=f"{name or 'model'}: first NaN/Inf at step {first_step}, {words}{spread}",
        threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
        ongoing=bool(len(run.steps)) and last >= int(run.steps[-1]), spans=tuple(spans),
    )]
