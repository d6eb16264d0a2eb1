"""A run's decoded diagnostics: what every reader hands to the rules.

Readers differ in where the bytes come from (the report reads event files with
TensorBoard's loader, the plugin asks TensorBoard's data provider); both end up
building a `RunData` with `RunData.from_samples`, and the rules only see this.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from . import schema
from .evaluation import Evaluation

#: Scalar tags treated as losses when the user does not name them: any tag
#: with a path component containing "loss" (``loss``, ``train/loss``,
#: ``Loss/train``, ``val_loss``).
DEFAULT_LOSS_PATTERN = re.compile(r"(^|/)[^/]*loss[^/]*($|/)", re.IGNORECASE)

#: Loss tags read as validation curves (the overfitting rule; never fed to the rules whose advice is about
#: the learning rate): a word ``val``, ``valid``, ``validation``, ``eval``, ``evaluation`` or ``test`` as a
#: path part, prefix or suffix (``val/loss``, ``loss/val``, ``eval_loss``, ``Loss/validation``, ``test-loss``).
#: A ``val_tags`` list in the layer table's extra names them instead.
VALIDATION_PATTERN = re.compile(r"(^|[/_.\- ])(val|valid|validation|eval|evaluation|test)($|[/_.\- ])",
                                re.IGNORECASE)


@dataclass
class RunData:
    """Decoded tbdiag data of one run.

    ``stats[t, i, c]`` is statistic ``schema.COLUMNS[c]`` of layer
    ``table.layers[i]`` at logging step ``steps[t]``; NaN where not measured.
    ``losses`` maps a scalar tag to ``(steps, values)``.
    """

    name: str
    table: schema.LayerTable
    steps: np.ndarray
    stats: np.ndarray
    losses: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: model-level statistic name -> ``(steps, values)`` at the logging steps that measured it
    model: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: evaluation tag -> its `add_evaluation` calls in step order (`tbdiag.contract.evaluation.group`)
    evaluations: dict[str, list[Evaluation]] = field(default_factory=dict)
    #: tbdiag's throughput scalar tag (`tbdiag.rules.throughput.PERF_TAGS`) -> ``(steps, values)``
    perf: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.table.layers]

    def column(self, name: str) -> np.ndarray:
        """``[steps, layers]`` series of one statistic."""
        return self.stats[:, :, schema.COLUMN_INDEX[name]]

    def model_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one model-level statistic (`schema.MODEL_COLUMNS`); empty when never measured."""
        return self.model.get(name, (np.zeros(0, dtype=np.int64), np.zeros(0)))

    @classmethod
    def from_samples(
        cls,
        name: str,
        table: schema.LayerTable | None,
        samples: Iterable[tuple[int, np.ndarray, Sequence[str]]],
        losses: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
        model_samples: Iterable[tuple[int, Mapping[str, float]]] = (),
        perf: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
    ) -> "RunData":
        """Assemble from ``(step, [layers, columns] array, column names)`` samples in any order
        (and model-level ``(step, {name: value})`` samples).

        A step logged twice (a resumed run rewriting it) keeps the last sample
        seen.  Rows beyond the layer table (a table written before the layer
        list grew) get placeholder names so no measurement is dropped.
        """
        by_step: dict[int, np.ndarray] = {}
        for step, arr, columns in samples:
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim != 2:
                continue
            by_step[int(step)] = schema.align_columns(arr, columns)
        table = table or schema.LayerTable(layers=[])
        n_layers = max([len(table.layers)] + [a.shape[0] for a in by_step.values()])
        if n_layers > len(table.layers):
            table.layers = list(table.layers) + [
                schema.LayerInfo(name=f"layer{i}", type="?") for i in range(len(table.layers), n_layers)
            ]
        steps = np.array(sorted(by_step), dtype=np.int64)
        stats = np.full((len(steps), n_layers, len(schema.COLUMNS)), np.nan, dtype=np.float32)
        for t, step in enumerate(steps):
            arr = by_step[int(step)]
            stats[t, : arr.shape[0]] = arr
        loss_arrays = {
            tag: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
            for tag, (s, v) in (losses or {}).items()
        }
        for tag, (s, v) in list(loss_arrays.items()):
            order = np.argsort(s, kind="stable")
            loss_arrays[tag] = (s[order], v[order])
        model_by_step: dict[int, Mapping[str, float]] = {}
        for step, values in model_samples:  # a step logged twice keeps the last sample, as above
            model_by_step[int(step)] = values
        model: dict[str, tuple[list[int], list[float]]] = {}
        for step in sorted(model_by_step):
            for key, value in model_by_step[step].items():
                if value == value:  # NaN: not measured at this step
                    model.setdefault(key, ([], []))
                    model[key][0].append(step)
                    model[key][1].append(float(value))
        model_arrays = {key: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
                        for key, (s, v) in model.items()}
        perf_arrays = {}
        for tag, (s, v) in (perf or {}).items():  # in step order, as the losses
            s, v = np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64)
            order = np.argsort(s, kind="stable")
            perf_arrays[tag] = (s[order], v[order])
        return cls(name=name, table=table, steps=steps, stats=stats, losses=loss_arrays, model=model_arrays,
                   perf=perf_arrays)


def is_loss_tag(tag: str, loss_tags: Sequence[str] | None = None) -> bool:
    """Whether a scalar tag is read as a loss curve by the loss rules."""
    if tag.startswith(schema.PLUGIN_NAME + "/") or tag.startswith("train/lr") or tag == "train/grad_norm":
        return False
    if loss_tags is not None:
        return tag in loss_tags
    return bool(DEFAULT_LOSS_PATTERN.search(tag))


def is_validation_tag(tag: str, val_tags: Sequence[str] | None = None) -> bool:
    """Whether a loss tag is a validation (held-out) curve rather than a training one."""
    if val_tags is not None:
        return tag in val_tags
    return bool(VALIDATION_PATTERN.search(tag))


def json_number(x: float | None) -> float | str | None:
    """A float that survives strict JSON: NaN/Inf become the strings "NaN", "Infinity", "-Infinity"."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x
