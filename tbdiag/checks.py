"""How each rule of the table (`tbdiag.rules`) is checked against a run: stored statistics in, findings out.

All functions here are pure (numpy in, dataclasses out) so they are tested on
hand-made arrays without training anything.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .rules import RULES_BY_NAME, SEVERITY_RANK, Finding, Rule, resolve
from .rundata import RunData

# ---------------------------------------------------------------------------
# helpers


def streaks(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, end)`` of consecutive True values."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def persistent(mask: np.ndarray, valid: np.ndarray, persistence: int) -> list[tuple[int, int]]:
    """Streaks long enough to count.

    A run shorter than the persistence counts when every valid step agrees,
    so a short run that is sick from start to end is still diagnosed.
    """
    need = max(1, min(persistence, int(np.count_nonzero(valid))))
    return [(a, b) for a, b in streaks(mask) if b - a >= need]


def rolling_median(values: np.ndarray, window: int = 5) -> np.ndarray:
    """Trailing rolling median that ignores NaN (robust to single noisy batches)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        out[i] = np.median(chunk) if chunk.size else np.nan
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x == 0 or abs(x) >= 0.01 else f"{100 * x:.1g}%"


def _layer_finding(
    run: RunData,
    rule: Rule,
    layer: int,
    spans: list[tuple[int, int]],
    values: np.ndarray,
    message: str,
    threshold: float,
) -> Finding:
    first, last = spans[0][0], spans[-1][1] - 1
    steps = run.steps
    return Finding(
        run=run.name,
        layer=run.table.layers[layer].name,
        issue=rule.name,
        severity=rule.severity,
        first_step=int(run.steps[first]),
        last_step=int(run.steps[last]),
        value=float(values[last]),
        message=message,
        threshold=threshold,
        statistic=rule.statistic,
        advice=rule.advice,
        ongoing=last == len(run.steps) - 1,
        spans=tuple((int(steps[a]), int(steps[b - 1])) for a, b in spans),
    )


def _per_layer(
    run: RunData,
    rule: Rule,
    stat: np.ndarray,
    mask: np.ndarray,
    describe,
    threshold: float,
) -> list[Finding]:
    """Apply a per-layer mask ``[steps, layers]``; one finding per layer with a persistent streak."""
    out = []
    valid = np.isfinite(stat)
    for i in range(mask.shape[1]):
        spans = persistent(mask[:, i], valid[:, i], rule.persistence)
        if spans:
            last = spans[-1][1] - 1
            since = int(run.steps[spans[0][0]])
            msg = describe(run.table.layers[i].name, float(stat[last, i]), since)
            out.append(_layer_finding(run, rule, i, spans, stat[:, i], msg, threshold))
    return out


# ---------------------------------------------------------------------------
# the rules


def _dead_relu(run: RunData, rule: Rule) -> list[Finding]:
    dead = run.column("dead_frac")
    persist = run.column("dead_persist_frac")
    with np.errstate(invalid="ignore"):
        raw = dead >= rule.threshold
        # the same units dead over the logged batches of the streak (falls back to the raw fraction
        # where the writer did not record it)
        confirmed = np.where(np.isfinite(persist), persist >= rule.threshold, raw)
    valid = np.isfinite(dead)
    out = []
    for i in range(dead.shape[1]):
        need = max(1, min(rule.persistence, int(np.count_nonzero(valid[:, i]))))
        spans = [(a, b) for a, b in persistent(raw[:, i], valid[:, i], rule.persistence)
                 if confirmed[a + need - 1 : b, i].any()]
        if not spans:
            continue
        last = spans[-1][1] - 1
        name = run.table.layers[i].name
        msg = (f"{name}: {_pct(float(dead[last, i]))} of its ReLU units never fire over a batch, since step "
               f"{int(run.steps[spans[0][0]])} (threshold {_pct(rule.threshold)})")
        out.append(_layer_finding(run, rule, i, spans, dead[:, i], msg, rule.threshold))
    return out


def _vanishing(run: RunData, rule: Rule) -> list[Finding]:
    rms = run.column("grad_rms").astype(np.float64)
    finite = np.where(np.isfinite(rms), rms, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), _all_nan_ok():
        top = np.nanmax(finite, axis=1, keepdims=True)
        ratio = finite / top
        mask = (ratio < rule.threshold) | (finite < rule.params["absolute"])
    mask &= np.isfinite(finite)
    return _per_layer(
        run, rule, rms, mask,
        lambda name, v, since: f"{name}: gradient RMS {v:.2e} is below {rule.threshold:g}x the largest layer's "
        f"(or below {rule.params['absolute']:g}) since step {since}; this layer barely learns",
        rule.threshold,
    )


def _exploding(run: RunData, rule: Rule) -> list[Finding]:
    rms = run.column("grad_rms")
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(rms) & (rms > rule.threshold)
    return _per_layer(
        run, rule, rms, mask,
        lambda name, v, since: f"{name}: gradient RMS {v:.3g} exceeds {rule.threshold:g} from step {since}; "
        "gradients are exploding",
        rule.threshold,
    )


def _saturated(run: RunData, rule: Rule) -> list[Finding]:
    sat = run.column("saturated_frac")
    with np.errstate(invalid="ignore"):
        mask = sat >= rule.threshold
    def describe(name: str, v: float, since: int) -> str:
        act = next((x.activation for x in run.table.layers if x.name == name), "") or "sigmoid/tanh"
        return (f"{name}: {_pct(v)} of its {act} outputs are saturated (within 1% of the bounds) since step "
                f"{since} (threshold {_pct(rule.threshold)})")
    return _per_layer(run, rule, sat, mask, describe, rule.threshold)


def _nonfinite(run: RunData, rule: Rule) -> list[Finding]:
    counts = {
        "activations": run.column("act_nonfinite"),
        "weights": run.column("weight_nonfinite"),
        "gradients": run.column("grad_nonfinite"),
    }
    with np.errstate(invalid="ignore"):
        bad = {k: np.nan_to_num(v, nan=0.0) > rule.threshold for k, v in counts.items()}
    anybad = bad["activations"] | bad["weights"] | bad["gradients"]
    steps_bad = np.flatnonzero(anybad.any(axis=1))
    if steps_bad.size == 0:
        return []
    t0 = int(steps_bad[0])
    # Localise: in the forward pass the first layer (model order) with NaN/Inf
    # output is where it appeared; failing that, the first NaN weights; NaN
    # gradients spread backwards from the loss, so the *last* such layer is
    # closest to the origin.
    where, layer = None, None
    for kind in ("activations", "weights"):
        idx = np.flatnonzero(bad[kind][t0])
        if idx.size:
            where, layer = kind, int(idx[0])
            break
    if layer is None:
        idx = np.flatnonzero(bad["gradients"][t0])
        where, layer = "gradients", int(idx[-1])
    n_layers = int(np.count_nonzero(anybad[t0]))
    count = float(counts[where][t0, layer])
    name = run.table.layers[layer].name
    last = int(steps_bad[-1])
    return [
        Finding(
            run=run.name, layer=name, issue=rule.name, severity=rule.severity,
            first_step=int(run.steps[t0]), last_step=int(run.steps[last]), value=count,
            message=f"{name}: first NaN/Inf at step {int(run.steps[t0])}, in its {where} ({int(count)} elements); "
                    f"{n_layers} layer(s) affected at that step",
            threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
            ongoing=last == len(run.steps) - 1,
            spans=tuple((int(run.steps[a]), int(run.steps[b - 1])) for a, b in streaks(anybad.any(axis=1))),
        )
    ]


def _frozen(run: RunData, rule: Rule) -> list[Finding]:
    changed = run.column("changed")
    grads = run.column("grad_params")
    gnorm = run.column("grad_norm")
    with np.errstate(invalid="ignore"):
        receives = (grads > 0) & np.isfinite(gnorm) & (gnorm > 0)
        mask = receives & (changed <= rule.threshold)
    valid = receives & np.isfinite(changed)
    out = []
    for i in range(mask.shape[1]):
        # "never changes": every comparable step agrees, for long enough
        if valid[:, i].sum() == 0 or (mask[:, i] != valid[:, i]).any():
            continue
        spans = persistent(mask[:, i], valid[:, i], rule.persistence)
        if not spans:
            continue
        info = run.table.layers[i]
        note = " (its parameters are in no optimizer param group)" if info.in_optimizer is False else ""
        msg = (f"{info.name}: receives gradients but its parameters have not changed since step "
               f"{int(run.steps[spans[0][0]])}{note}")
        out.append(_layer_finding(run, rule, i, spans, changed[:, i], msg, rule.threshold))
    return out


def _loss_series(run: RunData) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
    for tag, (steps, values) in sorted(run.losses.items()):
        if len(values):
            yield tag, steps, values


def _loss_divergence(run: RunData, rule: Rule) -> list[Finding]:
    out = []
    for tag, steps, values in _loss_series(run):
        nonfinite = np.flatnonzero(~np.isfinite(values))
        if nonfinite.size:
            i = int(nonfinite[0])
            out.append(Finding(
                run=run.name, layer=None, issue=rule.name, severity=rule.severity,
                first_step=int(steps[i]), last_step=int(steps[-1]), value=float(values[i]),
                message=f"loss '{tag}' became {values[i]} at step {int(steps[i])}",
                threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice, ongoing=True,
            ))
            continue
        smooth = rolling_median(values)
        start = smooth[min(len(smooth) - 1, 4)]  # the first full window
        if not np.isfinite(start):
            continue
        limit = start + rule.threshold * abs(start)
        mask = smooth > limit
        spans = persistent(mask, np.isfinite(smooth), rule.persistence) if len(values) >= rule.persistence else []
        if spans:
            a, b = spans[0][0], spans[-1][1] - 1
            out.append(Finding(
                run=run.name, layer=None, issue=rule.name, severity=rule.severity,
                first_step=int(steps[a]), last_step=int(steps[b]), value=float(smooth[b]),
                message=f"loss '{tag}' rose to {smooth[b]:.4g}, above its starting {start:.4g} by more than "
                        f"{_pct(rule.threshold)}, from step {int(steps[a])}",
                threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
                ongoing=b == len(values) - 1,
            ))
    return out


def _loss_plateau(run: RunData, rule: Rule) -> list[Finding]:
    out = []
    for tag, steps, values in _loss_series(run):
        if len(values) < rule.persistence or not np.isfinite(values).all():
            continue
        smooth = rolling_median(values)
        start = smooth[min(len(smooth) - 1, 4)]
        best = float(np.min(smooth[5:])) if len(smooth) > 5 else float(np.min(smooth))
        scale = abs(start) if start != 0 else 1.0
        improvement = (start - best) / scale
        if improvement < rule.threshold:
            out.append(Finding(
                run=run.name, layer=None, issue=rule.name, severity=rule.severity,
                first_step=int(steps[0]), last_step=int(steps[-1]), value=float(improvement),
                message=f"loss '{tag}' has not improved by {_pct(rule.threshold)} over {len(values)} values "
                        f"(best {best:.4g} vs starting {start:.4g})",
                threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice, ongoing=True,
            ))
    return out


_EVALUATORS = {
    "dead_relu": _dead_relu,
    "vanishing_gradient": _vanishing,
    "exploding_gradient": _exploding,
    "saturated_activation": _saturated,
    "nonfinite": _nonfinite,
    "frozen_layer": _frozen,
    "loss_divergence": _loss_divergence,
    "loss_plateau": _loss_plateau,
}
assert set(_EVALUATORS) == set(RULES_BY_NAME), "every rule in the table needs an evaluator"


class _all_nan_ok:
    """Silence numpy's 'All-NaN slice' warning inside a block (expected for layers without gradients)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _explain(findings: list[Finding], run: RunData) -> None:
    """Demote consequences to ``info`` when their cause is also found.

    - A (nearly) fully dead layer passes no gradient, so vanishing gradients in
      the layers up to and including it follow from it; and it feeds a constant
      to the layers after it, so their ReLUs die with it.
    - A layer whose gradients vanish gets updates below float precision: its
      weights stop changing although it is in the optimizer.
    """
    order = {name: i for i, name in enumerate(run.layer_names)}
    dead = [f for f in findings if f.issue == "dead_relu" and (f.value or 0) >= 0.9]
    vanishing = {f.layer for f in findings if f.issue == "vanishing_gradient"}

    def demote(f: Finding, cause: Finding | None, why: str) -> None:
        f.severity = "info"
        f.explained_by = f"{cause.issue}:{cause.layer}" if cause is not None else None
        f.message += f" ({why})"

    for f in findings:
        if f.layer is None or f.explained_by is not None:
            continue
        pos = order.get(f.layer, -1)
        if f.issue in ("vanishing_gradient", "dead_relu"):
            for d in dead:
                dpos = order.get(d.layer or "", -1)
                upstream = f.issue == "vanishing_gradient" and pos <= dpos
                downstream = f.issue == "dead_relu" and pos > dpos
                if (upstream or downstream) and f.first_step >= d.first_step and f is not d:
                    demote(f, d, f"explained by the dead layer {d.layer}")
                    break
        elif f.issue == "frozen_layer" and f.layer in vanishing:
            info = run.table.layers[pos] if pos >= 0 else None
            if info is None or info.in_optimizer is not False:
                cause = next(v for v in findings if v.issue == "vanishing_gradient" and v.layer == f.layer)
                demote(f, cause, "its gradients are too small to change the weights: see vanishing_gradient")


def evaluate(
    run: RunData,
    thresholds: Mapping[str, float] | None = None,
    rules: Sequence[str] | None = None,
) -> list[Finding]:
    """All findings for one run, most severe first, then by step and model order."""
    table = resolve(thresholds)
    findings: list[Finding] = []
    for name, rule in table.items():
        if rules is not None and name not in rules:
            continue
        findings.extend(_EVALUATORS[name](run, rule))
    _explain(findings, run)
    order = {name: i for i, name in enumerate(run.layer_names)}
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], f.first_step, order.get(f.layer or "", -1), f.issue))
    return findings


def worst(findings: Sequence[Finding]) -> str | None:
    """Highest severity among findings, or None."""
    if not findings:
        return None
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__)
