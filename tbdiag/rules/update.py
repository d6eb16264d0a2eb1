"""How the update-size rules of the table (`tbdiag.rules`) read the update/weight ratio: pure numpy.

The update/weight ratio (`update_ratio`: how far one optimizer step moves a
layer's weights, relative to their size) is the most direct sign of whether a
layer learns.  Under an adaptive optimizer (Adam and its kin) it is also the
only honest one: Adam divides each gradient by its own running scale, so a
tiny gradient still moves the weight by about the learning rate.
"""

from __future__ import annotations

import re

import numpy as np

from ..contract.rundata import RunData
from .series import persistent
from .table import Finding, Rule

#: Optimizers that scale each parameter's step by its own gradient history (or sign), recognised by class
#: name: Adam, AdamW, NAdam, RAdam, Adamax, SparseAdam, fused/8-bit variants, RMSprop, Adagrad, Adadelta,
#: Adafactor, LAMB, Lion, Sophia.
ADAPTIVE_OPTIMIZERS = re.compile(r"adam|rmsprop|adagrad|adadelta|adafactor|lamb|lion|sophia", re.IGNORECASE)


def is_adaptive(optimizer: str | None) -> bool:
    """Whether the optimizer class named ``optimizer`` (the layer table's ``optimizer``) is adaptive."""
    return bool(optimizer) and bool(ADAPTIVE_OPTIMIZERS.search(str(optimizer)))


def optimizer_of(run: RunData) -> str | None:
    """The optimizer's class name the writer recorded (None for runs written without one, or older runs)."""
    name = run.table.extra.get("optimizer")
    return str(name) if name else None


#: Layer types that normalise (LayerNorm, RMSNorm and HF's LlamaRMSNorm/T5LayerNorm, BatchNorm*, GroupNorm,
#: InstanceNorm): their gains sit near 1.0 and their biases near 0, far from a weight matrix's scale.
NORM_TYPES = re.compile(r"norm", re.IGNORECASE)


def lr_fraction(run: RunData) -> np.ndarray:
    """``[steps]``: the largest group learning rate at each logging step over its peak in the run.

    NaN where the writer recorded none (runs without ``optimizer=``, older runs).
    """
    out = np.full(len(run.steps), np.nan)
    steps, values = run.model_series("lr_max")
    finite = np.isfinite(values)
    if not finite.any() or not np.max(values[finite]) > 0:
        return out
    peak = float(np.max(values[finite]))
    at = dict(zip(steps.tolist(), (values / peak).tolist()))
    return np.array([at.get(int(step), np.nan) for step in run.steps])


def weight_rms(run: RunData) -> np.ndarray:
    """``[steps, layers]``: the RMS of a layer's own parameters (weight_norm over the root of their count)."""
    counts = np.array([max(layer.params, 1) for layer in run.table.layers], dtype=np.float64)
    return run.column("weight_norm").astype(np.float64) / np.sqrt(counts)


def _growing_from_zero(run: RunData, zero_init: float) -> np.ndarray:
    """``[steps, layers]``: True while a layer that started near zero by design has not yet grown to half its size."""
    norm = run.column("weight_norm").astype(np.float64)
    rms = weight_rms(run)
    out = np.zeros(norm.shape, dtype=bool)
    for i in range(norm.shape[1]):
        rows = np.flatnonzero(np.isfinite(norm[:, i]))
        if rows.size and rms[rows[0], i] < zero_init:
            with np.errstate(invalid="ignore"):
                out[:, i] = norm[:, i] < 0.5 * norm[rows[-1], i]
    return out


def _findings(run: RunData, rule: Rule, ratio: np.ndarray, mask: np.ndarray, describe) -> list[Finding]:
    out = []
    valid = np.isfinite(ratio)
    n = len(run.steps)
    for i in range(mask.shape[1]):
        rows = np.flatnonzero(valid[:, i])
        spans = persistent(mask[:, i], valid[:, i], rule.persistence)
        if rule.name == "update_too_small" and rows.size:
            # a stretch from the first measured step that ends before the last one is a learning-rate warm-up
            spans = [(a, b) for a, b in spans if not (a == rows[0] and b - 1 < rows[-1])]
        if not spans:
            continue
        first, last = spans[0][0], spans[-1][1] - 1
        name = run.table.layers[i].name
        out.append(Finding(
            run=run.name, layer=name, issue=rule.name, severity=rule.severity,
            first_step=int(run.steps[first]), last_step=int(run.steps[last]), value=float(ratio[last, i]),
            message=describe(name, float(ratio[last, i]), int(run.steps[first])),
            threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice, ongoing=last == n - 1,
            spans=tuple((int(run.steps[a]), int(run.steps[b - 1])) for a, b in spans),
        ))
    return out


def update_too_large(run: RunData, rule: Rule) -> list[Finding]:
    """One optimizer step moves the layer's weights by more than ``threshold`` of their size."""
    ratio = run.column("update_ratio").astype(np.float64)
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(ratio) & (ratio > rule.threshold)
    mask &= ~_growing_from_zero(run, rule.params["zero_init"])
    return _findings(
        run, rule, ratio, mask,
        lambda name, v, since: f"{name}: each optimizer step moves its weights by {v:.2g} of their size "
        f"(above {rule.threshold:g}) since step {since}; cs231n's healthy ratio is about 1e-3")


def update_too_small(run: RunData, rule: Rule) -> list[Finding]:
    """The layer's weights move, but by less than ``threshold`` of their size per step (0 is frozen_layer's)."""
    ratio = run.column("update_ratio").astype(np.float64)
    norms = np.array([bool(NORM_TYPES.search(layer.type)) for layer in run.table.layers], dtype=bool)
    limit = np.where(norms, rule.threshold * rule.params["norm_scale"], rule.threshold)
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(ratio) & (ratio > 0) & (ratio < limit)
        mask &= ~(lr_fraction(run) < rule.params["lr_floor"])[:, None]  # a decayed schedule tail is planned
    by_name = dict(zip(run.layer_names, limit))
    return _findings(
        run, rule, ratio, mask,
        lambda name, v, since: f"{name}: each optimizer step moves its weights by only {v:.2g} of their size "
        f"(below {by_name[name]:g}) since step {since}, with the learning rate near its peak; it learns far "
        "slower than a healthy ~1e-3")


def learns_by_update(run: RunData, rule: Rule) -> np.ndarray:
    """``[steps, layers]``: True where an adaptive optimizer still moves the layer enough to learn.

    All False when the optimizer is not adaptive (or not recorded): there the
    gradient alone tells, as the vanishing_gradient rule has always read it.
    The ``update`` bar follows the schedule: an adaptive step is proportional to
    the learning rate, so at a tenth of the peak rate a tenth of the update is
    the same learning (and a schedule decayed to 0 stops every layer alike).
    """
    ratio = run.column("update_ratio").astype(np.float64)
    if not is_adaptive(optimizer_of(run)):
        return np.zeros(ratio.shape, dtype=bool)
    schedule = np.nan_to_num(lr_fraction(run), nan=1.0)[:, None]
    with np.errstate(invalid="ignore"):
        return np.isfinite(ratio) & (ratio >= rule.params["update"] * schedule)


def explain(findings: list[Finding], run: RunData) -> None:
    """Demote a too-small update to ``info`` when the same layer's vanishing gradient or death explains it."""
    causes = {f.layer: f for f in findings
              if f.layer is not None and f.issue in ("vanishing_gradient", "dead_relu", "saturated_activation")}
    for f in findings:
        cause = causes.get(f.layer)
        if f.issue == "update_too_small" and cause is not None and f.explained_by is None:
            f.severity = "info"
            f.explained_by = f"{cause.issue}:{cause.layer}"
            f.message += f" (follows from its {cause.issue.replace('_', ' ')})"


__all__ = ["ADAPTIVE_OPTIMIZERS", "NORM_TYPES", "is_adaptive", "optimizer_of", "lr_fraction", "weight_rms",
           "update_too_large", "update_too_small", "learns_by_update", "explain"]
