"""Host-side assembly of one logging step: the probe's numbers in, the health table and what to write out.

Pure numpy: the probe's measurements arrive as ``((kind, key), array)``
items, already on the host, and leave as a `StepRecord` the writer encodes.
Per-parameter numbers are summed into their layers' rows with one
``bincount`` per column, never a Python loop over layers.

Item kinds and keys (what `tbdiag.measure.probe.StepProbe` measures):

=============  ===================  =============================================
kind           key                  value
=============  ===================  =============================================
``act``        layer row            ``[mean, std, NaN/Inf count]`` of its output
``dead``       layer row            per-unit mask: never fired (rectifier-like)
``sat``        layer row            ``[saturated fraction]``
``w_norm``     None (all params)    per-parameter weight norms
``g_norm``     parameter positions  per-parameter gradient norms
``u_norm``     parameter positions  per-parameter update norms
``spike_g_norm`` parameter positions per-parameter gradient norms at the window's
                                    largest gradient jump (`tbdiag.measure.gradient_spikes`)
``experts``    layer row            ``[busiest expert's share of tokens, idle fraction]``
                                    of a mixture-of-experts router
``p_hist``     parameter positions  concatenated histogram samples (CPU), or
                                    ``[tensors, 2 + bins]`` binned rows (accelerators)
``g_hist``     parameter positions  the same, of the gradients
``a_hist``     layer rows           the same, of the layer outputs
``image``      layer row            ``[channels, h, w]`` feature maps in [0, 1]
``model``      statistic name       one model-level value (`schema.MODEL_COLUMNS`)
``eps``        parameter positions  ``[k, 2]``: Adam coordinates with sqrt(v_hat) < eps, and
                                    those counted (`tbdiag.measure.optimizer_state`)
``attn``       layer row            ``[heads, 3]`` per head: max logit, mean normalised
                                    entropy, first-key share (`attention_columns`)
=============  ===================  =============================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..contract import schema

#: Model-level statistics also written as scalars, for a curve in TensorBoard's Scalars tab.
LOG_Z_TAGS = {"logz_mean": "train/log_z/mean", "logz_max": "train/log_z/max"}

#: Items keyed by one layer row, and by a list of rows (remapped when the rows are reordered).
_ROW_KEYED = {"act", "dead", "sat", "image", "experts", "attn"}

#: The statistics `attention_columns` makes of an ``attn`` item, in its order.
ATTENTION_COLUMNS = ("attn_logit_max", "attn_logit_head", "attn_entropy", "attn_entropy_min", "attn_entropy_head",
                     "attn_sink")


def attention_columns(heads: np.ndarray) -> list[float]:
    """A layer's `ATTENTION_COLUMNS` from its ``[heads, 3]`` per-head statistics (`tbdiag.measure.attention.head_stats`):
    the largest logit and its head, the heads' mean entropy, the lowest head's and its index, the mean first-key
    share.  Heads that measured nothing (NaN) are left out; all NaN when none did."""
    heads = np.asarray(heads, dtype=np.float64).reshape(-1, 3)
    measured = np.flatnonzero(np.isfinite(heads[:, 1]))
    if measured.size == 0:
        return [math.nan] * len(ATTENTION_COLUMNS)
    top, entropy, sink = heads[measured].T
    hi, lo = int(np.argmax(top)), int(np.argmin(entropy))
    return [float(top[hi]), float(measured[hi]), float(entropy.mean()), float(entropy[lo]), float(measured[lo]),
            float(sink.mean())]
_ROWS_KEYED = {"a_hist"}


@dataclass
class StepRecord:
    """Everything one logging step writes: what the watcher hands the writer."""

    step: int
    health: np.ndarray  # [layers, len(schema.COLUMNS)] float32
    scalars: list[tuple[str, float]] = field(default_factory=list)
    # (tags, samples, sample lengths, numel / length, numels): binned on the writer thread
    histogram_samples: list[tuple[list[str], np.ndarray, list[int], list[float], list[int | None]]] = \
        field(default_factory=list)
    # (tags, [tensors, 3 + bins] rows of min, max, scale, counts, numels): binned on the device already
    histogram_rows: list[tuple[list[str], np.ndarray, list[int | None]]] = field(default_factory=list)
    images: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (tag, [channels, h, w] in [0, 1])
    model: dict[str, float] = field(default_factory=dict)  # model-level statistics by name (schema.MODEL_COLUMNS)


@dataclass
class ParamLayout:
    """Where each parameter of the probe's per-parameter vectors belongs."""

    rows: np.ndarray  # layer row of each parameter
    numels: np.ndarray  # element count of each parameter
    tags: list[str]  # "<layer>.<param>"

    @classmethod
    def of(cls, index: Sequence[tuple[int, Any, str]]) -> "ParamLayout":
        """From ``(row, parameter, tag)`` triples (anything with ``numel()`` as the parameter)."""
        return cls(np.fromiter((row for row, _, _ in index), dtype=np.intp, count=len(index)),
                   np.fromiter((p.numel() for _, p, _ in index), dtype=np.float64, count=len(index)),
                   [tag for _, _, tag in index])


def remap_rows(items: list, old_to_new: Sequence[int]) -> list:
    """This step's items with layer rows renumbered (the rows were put in first-forward order)."""
    out = []
    for (kind, key), value in items:
        if kind in _ROW_KEYED:
            key = old_to_new[key]
        elif kind in _ROWS_KEYED:
            key = [old_to_new[k] for k in key]
        out.append(((kind, key), value))
    return out


def eps_dominated_rows(health: np.ndarray, params: ParamLayout, positions: Sequence[int], counts: np.ndarray) -> None:
    """``eps_dominated_frac`` of each layer: its parameters' dominated coordinates over those counted (NaN where
    no Adam-family state was read, or no coordinate received a gradient)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1, 2)
    rows = params.rows[np.asarray(positions, dtype=np.intp)]
    n = health.shape[0]
    dominated = np.bincount(rows, weights=counts[:, 0], minlength=n)
    counted = np.bincount(rows, weights=counts[:, 1], minlength=n)
    has = counted > 0
    health[has, schema.COLUMN_INDEX["eps_dominated_frac"]] = dominated[has] / counted[has]
def _nonfinite_outputs_not_dead(health: np.ndarray) -> None:
    """Dead-unit fractions of a layer whose output held NaN/Inf become the value NaN.

    After a blow-up the output is NaN: no unit can be told fired or dead, and
    0% dead (NaN read as firing) or 100% (NaN read as silent) would both be a
    number that is not there.  NaN with the output's count above 0 is what
    `Statistic.nonfinite_count` calls the value NaN, not "not measured".
    """
    col = schema.COLUMN_INDEX
    with np.errstate(invalid="ignore"):
        blown = health[:, col["act_nonfinite"]] > 0
    for name in ("dead_frac", "dead_persist_frac"):
        health[blown, col[name]] = np.nan


class Assembler:
    """Turns each logging step's items into a `StepRecord`; keeps what spans steps (weight norms, dead masks)."""

    def __init__(self) -> None:
        self._prev_weight_norms: np.ndarray | None = None
        self._dead_history: dict[int, list[np.ndarray]] = {}  # last two logged dead-unit masks per row

    def remap_rows(self, old_to_new: Sequence[int]) -> None:
        self._dead_history = {old_to_new[i]: masks for i, masks in self._dead_history.items()}

    def assemble(self, step: int, items: list, hist_meta: Mapping[str, tuple[list[int], list[float]]],
                 params: ParamLayout, layer_names: Sequence[str], nonfinite: Mapping[tuple[str, int], float],
                 lrs: Sequence[float] = (), scalars: bool = True) -> StepRecord:
        """The health table and everything else to write for one logging step."""
        n, n_params = len(layer_names), len(params.tags)
        health = np.full((n, len(schema.COLUMNS)), np.nan, dtype=np.float32)
        record = StepRecord(step, health)
        norms = {kind: np.full(n_params, np.nan) for kind in ("w_norm", "g_norm", "u_norm", "spike_g_norm",
                                                                    "spike_g_typical")}
        for (kind, key), value in items:
            if kind in norms:
                norms[kind][slice(None) if key is None else key] = value
            elif kind == "attn":
                health[key, [schema.COLUMN_INDEX[c] for c in ATTENTION_COLUMNS]] = attention_columns(value)
            elif kind in ("act", "dead", "sat", "experts"):
                self._layer_item(health, kind, key, value)
            elif kind in ("p_hist", "g_hist", "a_hist"):
                if kind == "a_hist":
                    tags, numels = [f"activations/{layer_names[i]}" for i in key], [None] * len(key)
                else:
                    prefix = "params/" if kind == "p_hist" else "grads/"
                    tags, numels = [prefix + params.tags[k] for k in key], [int(params.numels[k]) for k in key]
                lengths, scales = hist_meta[kind]
                if value.ndim == 2:  # binned on the device: [tensors, 2 + bins]; the scale column goes in
                    rows = np.insert(np.asarray(value, dtype=np.float32), 2, np.asarray(scales, np.float32), axis=1)
                    record.histogram_rows.append((tags, rows, numels))
                else:
                    record.histogram_samples.append((tags, value, lengths, scales, numels))
            elif kind == "image":
                record.images.append((f"images/{layer_names[key]}", value))
            elif kind == "model":
                record.model[key] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
            elif kind == "eps":
                eps_dominated_rows(health, params, key, value)
        _nonfinite_outputs_not_dead(health)
        g_norm, has_g = self._parameter_rows(health, params, norms, nonfinite)
        finite_lrs = [lr for lr in lrs if math.isfinite(lr)]
        if finite_lrs:
            record.model["lr_max"] = max(finite_lrs)
        if scalars:
            if has_g.any():  # NaN/Inf in any gradient makes the global norm NaN/Inf, as clip_grad_norm_ reports
                record.scalars.append(("train/grad_norm", math.sqrt(float(np.sum(g_norm[has_g] ** 2)))))
            # a group without a readable rate (relative-step Adafactor) gets no chart of NaNs
            record.scalars.extend((f"train/lr/group{gi}", lr) for gi, lr in enumerate(lrs) if math.isfinite(lr))
            # the output's log Z as curves in the Scalars tab (the logit_divergence rule reads the model-level values)
            record.scalars.extend((tag, record.model[name]) for name, tag in LOG_Z_TAGS.items() if name in record.model)
        return record

    def _layer_item(self, health: np.ndarray, kind: str, row: int, value: np.ndarray) -> None:
        col = schema.COLUMN_INDEX
        if kind == "act":
            health[row, col["act_mean"]], health[row, col["act_std"]], health[row, col["act_nonfinite"]] = value
        elif kind == "experts":
            health[row, col["expert_top_share"]], health[row, col["experts_idle_frac"]] = value
        elif kind == "dead":
            health[row, col["dead_frac"]], health[row, col["dead_persist_frac"]] = self.dead_fractions(row, value)
        else:
            health[row, col["saturated_frac"]] = value[0]

    def _parameter_rows(self, health: np.ndarray, params: ParamLayout, norms: dict[str, np.ndarray],
                        nonfinite: Mapping[tuple[str, int], float]) -> tuple[np.ndarray, np.ndarray]:
        """Per-parameter norms and NaN/Inf counts summed into their layers' rows.

        Returns the per-parameter gradient norms and which parameters received a gradient.
        """
        col = schema.COLUMN_INDEX
        n, n_params = health.shape[0], len(params.tags)
        w_norm, g_norm, u_norm = norms["w_norm"], norms["g_norm"], norms["u_norm"]
        changed = np.full(n_params, np.nan)
        if self._prev_weight_norms is not None and self._prev_weight_norms.shape == w_norm.shape:
            changed = (w_norm != self._prev_weight_norms).astype(np.float64)
        self._prev_weight_norms = w_norm.copy()

        def bad(kind: str) -> np.ndarray:
            return np.array([nonfinite.get((kind, k), 0.0) for k in range(n_params)]) if nonfinite \
                else np.zeros(n_params)

        def per_layer(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
            if mask is None:
                return np.bincount(params.rows, weights=values, minlength=n)
            return np.bincount(params.rows[mask], weights=values[mask], minlength=n)

        rows = per_layer(np.ones(n_params)) > 0
        health[rows, col["weight_norm"]] = np.sqrt(per_layer(w_norm ** 2))[rows]
        health[rows, col["weight_nonfinite"]] = per_layer(bad("w_norm"))[rows]
        # a gradient with NaN/Inf has a non-finite norm but still counts as received
        has_g = np.isfinite(g_norm) | np.array([("g_norm", k) in nonfinite for k in range(n_params)], dtype=bool)
        n_grads = per_layer(has_g.astype(np.float64))
        health[rows, col["grad_params"]] = n_grads[rows]
        got = n_grads > 0
        gn = np.sqrt(per_layer(g_norm ** 2, has_g))
        health[got, col["grad_norm"]] = gn[got]
        health[got, col["grad_rms"]] = (gn / np.sqrt(np.maximum(per_layer(params.numels, has_g), 1.0)))[got]
        health[got, col["grad_nonfinite"]] = per_layer(bad("g_norm"), has_g)[got]
        ch = per_layer(changed, has_g) / np.maximum(n_grads, 1.0)  # NaN where a comparison is missing
        done = got & np.isfinite(ch)
        health[done, col["changed"]] = ch[done]
        for kind, column in (("spike_g_norm", "spike_grad_norm"), ("spike_g_typical", "spike_grad_typical")):
            spike = norms[kind]  # the layers' share of the window's largest gradient jump, and their usual share
            if np.isfinite(spike).any():
                health[got, col[column]] = np.sqrt(per_layer(np.nan_to_num(spike) ** 2))[got]
        upd = np.isfinite(u_norm)
        if upd.any():
            has_u = per_layer(upd.astype(np.float64)) > 0
            denom = np.sqrt(per_layer(w_norm ** 2, upd))
            num = np.sqrt(per_layer(u_norm ** 2, upd))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(denom > 0, num / denom, np.nan)
            health[has_u, col["update_ratio"]] = ratio[has_u]
        return g_norm, has_g

    def dead_fractions(self, row: int, mask: np.ndarray) -> tuple[float, float]:
        """Units dead in this batch, and dead in this and the previous two logged batches (fractions)."""
        dead = np.asarray(mask) > 0
        if dead.size == 0:
            return math.nan, math.nan
        history = [m for m in self._dead_history.get(row, []) if m.shape == dead.shape]
        persist = dead.copy()
        for m in history:
            persist &= m
        self._dead_history[row] = ([dead] + history)[:2]
        return np.count_nonzero(dead) / dead.size, np.count_nonzero(persist) / dead.size
