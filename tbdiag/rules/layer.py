"""The per-layer health rules: dead units, vanishing and exploding gradients, saturation, frozen layers.

Each reads one or two per-layer statistics (`tbdiag.contract.statistics`) over
the logged steps and returns one finding per layer with a persistent streak.
Pure numpy: hand-made arrays in, findings out.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..contract import schema
from ..contract.rundata import RunData
from . import loop, update
from .series import needed, persistent, streaks
from .table import Finding, Rule


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


def dead_relu(run: RunData, rule: Rule) -> list[Finding]:
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
        need = needed(valid[:, i], rule.persistence)
        spans = [(a, b) for a, b in persistent(raw[:, i], valid[:, i], rule.persistence)
                 if confirmed[a + need - 1 : b, i].any()]
        if not spans:
            continue
        last = spans[-1][1] - 1
        name, kind = run.table.layers[i].name, run.table.layers[i].activation or "relu"
        act = schema.ACTIVATION_NAMES.get(kind, kind)
        msg = (f"{name}: {_pct(float(dead[last, i]))} of its {act} units never fire over a batch, since step "
               f"{int(run.steps[spans[0][0]])} (threshold {_pct(rule.threshold)})")
        out.append(_layer_finding(run, rule, i, spans, dead[:, i], msg, rule.threshold))
    return out


def vanishing_gradient(run: RunData, rule: Rule) -> list[Finding]:
    rms = run.column("grad_rms").astype(np.float64)
    if rms.size == 0:  # no layer measured: a run with only evaluations or losses
        return []
    finite = np.where(np.isfinite(rms), rms, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), _all_nan_ok():
        top = np.nanmax(finite, axis=1, keepdims=True)
        ratio = finite / top
        mask = (ratio < rule.threshold) | (finite < rule.params["absolute"])
    mask &= np.isfinite(finite)
    mask &= ~update.learns_by_update(run, rule)  # Adam & co. move a layer whatever its gradient's size
    return _per_layer(
        run, rule, rms, mask,
        lambda name, v, since: f"{name}: gradient RMS {v:.2e} is below {rule.threshold:g}x the largest layer's "
        f"(or below {rule.params['absolute']:g}) since step {since}; this layer barely learns"
        + (f" (its update/weight ratio is also below {rule.params['update']:g})"
           if update.is_adaptive(update.optimizer_of(run)) else ""),
        rule.threshold,
    )


def exploding_gradient(run: RunData, rule: Rule) -> list[Finding]:
    rms = run.column("grad_rms")
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(rms) & (rms > rule.threshold)
        extreme = mask & (rms > rule.threshold * rule.params["at_once"])
    # One logged step of a large gradient that the next one does not confirm is not an explosion (a stock HF
    # conv at std 0.02 before a BatchNorm has a 14x gradient at step 0, gone by step 10); two in a row, or one
    # far beyond the threshold, is.  NaN/Inf gradients are the nonfinite rule's, at once.
    valid = np.isfinite(rms)
    for i in range(mask.shape[1]):
        need = needed(valid[:, i], rule.persistence)
        for a, b in streaks(mask[:, i]):
            if b - a < need and not extreme[a:b, i].any():
                mask[a:b, i] = False
    return _per_layer(
        run, replace(rule, persistence=1), rms, mask,
        lambda name, v, since: f"{name}: gradient RMS {v:.3g} exceeds {rule.threshold:g} from step {since}; "
        "gradients are exploding",
        rule.threshold,
    )


def activation_growth(run: RunData, rule: Rule) -> list[Finding]:
    mean = run.column("act_mean").astype(np.float64)
    std = run.column("act_std").astype(np.float64)
    rms = np.sqrt(mean ** 2 + std ** 2)
    early = np.full(rms.shape[1], np.nan)
    for i in range(rms.shape[1]):
        rows = np.flatnonzero(np.isfinite(rms[:, i]))
        if rows.size:
            early[i] = rms[rows[0], i]
    if not np.isfinite(early).any():
        return []
    # Against the larger of the layer's own start and the model's typical one: a projection that starts near 0
    # (std-0.02 weights behind a uniform attention, a zero-initialised branch) grows to the model's scale by design.
    base = np.fmax(early, np.nanmedian(early))
    with np.errstate(invalid="ignore", divide="ignore"):
        growth = rms / base
        mask = np.isfinite(growth) & (growth > rule.threshold)
    return _per_layer(
        run, rule, growth, mask,
        lambda name, v, since: f"{name}: its output RMS is {v:.3g}x its early level (its own at the first logged "
        f"step, or the median layer's if larger) since step {since} (threshold {rule.threshold:g}x); activations "
        "are growing out of bounds",
        rule.threshold,
    )


def saturated_activation(run: RunData, rule: Rule) -> list[Finding]:
    sat = run.column("saturated_frac")
    with np.errstate(invalid="ignore"):
        mask = sat >= rule.threshold
    def describe(name: str, v: float, since: int) -> str:
        act = next((x.activation for x in run.table.layers if x.name == name), "") or "sigmoid/tanh"
        return (f"{name}: {_pct(v)} of its {act} outputs are saturated (within 1% of the bounds) since step "
                f"{since} (threshold {_pct(rule.threshold)})")
    return _per_layer(run, rule, sat, mask, describe, rule.threshold)


def frozen_layer(run: RunData, rule: Rule) -> list[Finding]:
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


class _all_nan_ok:
    """Silence numpy's 'All-NaN slice' warning inside a block (expected for layers without gradients)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def explain(findings: list[Finding], run: RunData) -> None:
    """Demote consequences to ``info`` when their cause is also found.

    - A (nearly) fully dead layer passes no gradient, so vanishing gradients in
      the layers up to and including it follow from it; and it feeds a constant
      to the layers after it, so their ReLUs die with it.
    - A layer whose gradients vanish gets updates below float precision: its
      weights stop changing although it is in the optimizer.
    - Gradients that are exactly zero (a fully masked attention) are ``no_gradient``'s
      to name; the same layer's vanishing gradient follows from them.
    - A dead layer's gradients are exactly zero (its units pass none back), and
      so are those of the layers that feed only it: ``no_gradient`` findings of
      exactly-zero gradients on it and on the layers right before it (every
      trainable layer in between has them too) follow from it.
    """
    order = {name: i for i, name in enumerate(run.layer_names)}
    dead = [f for f in findings if f.issue == "dead_relu" and (f.value or 0) >= 0.9]
    vanishing = {f.layer for f in findings if f.issue == "vanishing_gradient"}
    zero = {f.layer for f in findings if f.issue == "no_gradient" and loop.zero_gradient(run, f)}

    def feeds(pos: int, dpos: int) -> bool:
        """Every layer with trainable parameters in the optimizer from ``pos`` up to the dead layer at ``dpos``
        gets exactly zero gradients."""
        infos = run.table.layers
        return 0 <= pos <= dpos and all(infos[j].name in zero or infos[j].trainable_params <= 0
                                        or infos[j].in_optimizer is not True for j in range(pos, dpos))

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
            else:
                if f.issue == "vanishing_gradient" and f.layer in zero:  # nothing to vanish: no_gradient says it
                    cause = next(z for z in findings if z.issue == "no_gradient" and z.layer == f.layer)
                    demote(f, cause, "its gradients are exactly zero: see no_gradient")
        elif f.issue == "no_gradient" and f.layer in zero:
            for d in dead:
                if feeds(pos, order.get(d.layer or "", -1)) and f.first_step >= d.first_step:
                    demote(f, d, f"explained by the dead layer {d.layer}: units that never fire pass no gradient back")
                    break
        elif f.issue == "frozen_layer" and f.layer in vanishing:
            info = run.table.layers[pos] if pos >= 0 else None
            if info is None or info.in_optimizer is not False:
                cause = next(v for v in findings if v.issue == "vanishing_gradient" and v.layer == f.layer)
                demote(f, cause, "its gradients are too small to change the weights: see vanishing_gradient")
