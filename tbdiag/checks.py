"""How each rule of the table (`tbdiag.rules`) is checked against a run: stored statistics in, findings out.

All functions here are pure (numpy in, dataclasses out) so they are tested on
hand-made arrays without training anything.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from . import evaluation_checks, loop_checks, loss_checks, nonfinite_checks, throughput_checks, update_checks
from .rules import RULES_BY_NAME, SEVERITY_RANK, Finding, Rule, resolve
from .rundata import RunData
from .series import persistent

# ---------------------------------------------------------------------------
# helpers


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
    if rms.size == 0:  # no layer measured: a run with only evaluations or losses
        return []
    finite = np.where(np.isfinite(rms), rms, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), _all_nan_ok():
        top = np.nanmax(finite, axis=1, keepdims=True)
        ratio = finite / top
        mask = (ratio < rule.threshold) | (finite < rule.params["absolute"])
    mask &= np.isfinite(finite)
    mask &= ~update_checks.learns_by_update(run, rule)  # Adam & co. move a layer whatever its gradient's size
    return _per_layer(
        run, rule, rms, mask,
        lambda name, v, since: f"{name}: gradient RMS {v:.2e} is below {rule.threshold:g}x the largest layer's "
        f"(or below {rule.params['absolute']:g}) since step {since}; this layer barely learns"
        + (f" (its update/weight ratio is also below {rule.params['update']:g})"
           if update_checks.is_adaptive(update_checks.optimizer_of(run)) else ""),
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


_EVALUATORS = {
    "dead_relu": _dead_relu,
    "vanishing_gradient": _vanishing,
    "exploding_gradient": _exploding,
    "saturated_activation": _saturated,
    "nonfinite": nonfinite_checks.check_nonfinite,
    "frozen_layer": _frozen,
    "no_gradient": loop_checks.no_gradient,
    "eval_mode_training": loop_checks.eval_mode_training,
    "stale_gradients": loop_checks.stale_gradients,
    "softmax_output": loop_checks.softmax_output,
    "loss_divergence": loss_checks.loss_divergence,
    "loss_plateau": loss_checks.loss_plateau,
    "loss_spike": loss_checks.loss_spike,
    "loss_oscillation": loss_checks.loss_oscillation,
    "overfitting": loss_checks.overfitting,
    "update_too_large": update_checks.update_too_large,
    "update_too_small": update_checks.update_too_small,
    "prediction_collapse": evaluation_checks.prediction_collapse,
    "neglected_class": evaluation_checks.neglected_class,
    "input_bound": throughput_checks.input_bound,
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
    update_checks.explain(findings, run)
    loss_checks.explain(findings, run)
    evaluation_checks.explain(findings, run)
    order = {name: i for i, name in enumerate(run.layer_names)}
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], f.first_step, order.get(f.layer or "", -1), f.issue))
    return findings


def worst(findings: Sequence[Finding]) -> str | None:
    """Highest severity among findings, or None."""
    if not findings:
        return None
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__)
