"""Evaluation summaries: a classifier's confusion matrix per evaluation call, and what follows from it.

`DiagnosticWriter.add_evaluation` turns targets and outputs into a confusion
matrix and hands it here to be encoded; the report and the TensorBoard tab
decode it here.  Everything else (per-class precision, recall, F1, support,
accuracy) is computed from the counts at read time, so no derived number can
disagree with the matrix it came from.  Pure numpy: the reading side never
imports torch.

Layout
------
``tbdiag/eval/<tag>/<step, 10 digits>``
    One int64 tensor ``[C, C]`` per evaluation call: ``counts[i, j]`` is the
    number of samples of true class ``i`` predicted as class ``j``.  The
    plugin content is JSON ``{"version": 1, "tag": <tag>, "class_names":
    [...]}``.  Each call has a tag of its own: TensorBoard's loaders keep only
    10 (Python) or 100 (Rust) samples per tag of a plugin they do not know,
    so one tag per call means no evaluation is ever sampled away, and each
    call carries its own class names (the class count may grow between calls).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

PLUGIN_NAME = "tbdiag"  # the same plugin as every tbdiag summary (`tbdiag.contract.schema.PLUGIN_NAME`)
EVAL_VERSION = 1
EVAL_TAG_PREFIX = "tbdiag/eval/"


@dataclass(frozen=True)
class Evaluation:
    """One evaluation call: the confusion matrix of one tag at one step.

    ``counts[i, j]``: samples of true class ``i`` predicted as class ``j``.
    Rates of a class with no samples (recall) or no predictions (precision)
    are NaN: there is nothing to measure, which is not the same as 0.
    """

    tag: str
    step: int
    counts: np.ndarray
    class_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def support(self) -> np.ndarray:
        """Samples of each true class (row sums)."""
        return self.counts.sum(axis=1)

    @property
    def predicted(self) -> np.ndarray:
        """Predictions of each class (column sums)."""
        return self.counts.sum(axis=0)

    @property
    def correct(self) -> np.ndarray:
        return np.diagonal(self.counts).copy()

    @property
    def recall(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.support > 0, self.correct / self.support, np.nan)

    @property
    def precision(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.predicted > 0, self.correct / self.predicted, np.nan)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return np.where(np.isnan(p) | np.isnan(r), np.where(np.isnan(r), np.nan, 0.0), f1)

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.total) if self.total else float("nan")

    def to_json(self) -> dict[str, Any]:
        """The summary the tab shows: counts, class names and every per-class metric (NaN as "NaN")."""
        def values(a: np.ndarray) -> list[Any]:
            return [None if np.isnan(x) else float(x) for x in np.asarray(a, dtype=np.float64)]

        return {
            "tag": self.tag,
            "step": self.step,
            "class_names": list(self.class_names),
            "counts": self.counts.astype(np.int64).tolist(),
            "support": self.support.astype(np.int64).tolist(),
            "predicted": self.predicted.astype(np.int64).tolist(),
            "precision": values(self.precision),
            "recall": values(self.recall),
            "f1": values(self.f1),
            "accuracy": None if np.isnan(self.accuracy) else self.accuracy,
            "total": self.total,
        }


def confusion_counts(targets: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes]`` int64 counts from integer label arrays already checked to be in range."""
    flat = np.asarray(targets, dtype=np.int64) * n_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def default_class_names(n_classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n_classes))


# -------------------------------------------------------------- encode/decode


def eval_tag(tag: str, step: int) -> str:
    """The summary tag of the evaluation ``tag`` at ``step``."""
    return f"{EVAL_TAG_PREFIX}{tag}/{step:010d}"


def is_eval_tag(tag: str) -> bool:
    return tag.startswith(EVAL_TAG_PREFIX)


def encode(tag: str, step: int, counts: np.ndarray, class_names: Sequence[str]) -> summary_pb2.Summary:
    """Summary holding one evaluation call's confusion matrix, class names in the plugin content."""
    counts = np.ascontiguousarray(counts, dtype="<i8")
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(class_names):
        raise ValueError(f"a confusion matrix must be [C, C] with C class names, got {counts.shape} and "
                         f"{len(class_names)} names")
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_INT64,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in counts.shape]
        ),
        tensor_content=counts.tobytes(),
    )
    content = json.dumps({"version": EVAL_VERSION, "tag": tag, "class_names": list(class_names)}).encode()
    metadata = summary_pb2.SummaryMetadata(
        summary_description="tbdiag evaluation: confusion matrix counts [true class, predicted class]",
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    value = summary_pb2.Summary.Value(tag=eval_tag(tag, step), tensor=tensor, metadata=metadata)
    return summary_pb2.Summary(value=[value])


def decode(summary_tag: str, content: bytes, step: int, array: np.ndarray) -> Evaluation:
    """An `Evaluation` from a stored value; raises ValueError when it cannot be read.

    Class names missing from the content (or of the wrong count) become the
    class indices, so a damaged name list never hides the counts.
    """
    counts = np.asarray(array)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"{summary_tag}: a confusion matrix must be square, got shape {counts.shape}")
    try:
        meta = json.loads(content.decode("utf-8")) if content else {}
    except (ValueError, UnicodeDecodeError):
        meta = {}
    meta = meta if isinstance(meta, Mapping) else {}
    tag = meta.get("tag")
    if not isinstance(tag, str):  # the tag without its step
        tag = summary_tag[len(EVAL_TAG_PREFIX):].rpartition("/")[0]
    names = meta.get("class_names")
    n = counts.shape[0]
    if not (isinstance(names, list) and len(names) == n):
        names = default_class_names(n)
    return Evaluation(tag=tag, step=int(step), counts=counts.astype(np.int64), class_names=tuple(map(str, names)))


def group(evaluations: Iterable[Evaluation]) -> dict[str, list[Evaluation]]:
    """``{tag: evaluations in step order}``; a step stored twice keeps the last one seen."""
    by_tag: dict[str, dict[int, Evaluation]] = {}
    for ev in evaluations:
        by_tag.setdefault(ev.tag, {})[ev.step] = ev
    return {tag: [steps[s] for s in sorted(steps)] for tag, steps in sorted(by_tag.items())}


# ------------------------------------------------------------ rule measures


def top_share(ev: Evaluation) -> tuple[int, float, float]:
    """``(class, share of all predictions, recall over the samples of every other class)`` of the most-predicted class.

    The second number says how much of the prediction mass one class takes;
    the third whether the model still recognises anything else (NaN when
    every sample belongs to that class: nothing else to recognise).
    """
    predicted = ev.predicted
    if ev.total == 0:
        return 0, float("nan"), float("nan")
    c = int(np.argmax(predicted))
    share = float(predicted[c] / ev.total)
    others = np.arange(ev.n_classes) != c
    other_support = ev.support[others].sum()
    other_recall = float(ev.correct[others].sum() / other_support) if other_support else float("nan")
    return c, share, other_recall


def collapsed(ev: Evaluation, threshold: float, other_recall: float) -> bool:
    """Whether nearly every prediction goes to one class while the other classes go unrecognised."""
    _, share, recall = top_share(ev)
    return bool(share >= threshold and recall <= other_recall)


def neglected(ev: Evaluation, ratio: float, min_support: float) -> list[int]:
    """Classes whose recall is at most ``ratio`` x the median recall of the other classes.

    Only classes with at least ``min_support`` samples count (a class of three
    samples has a recall of 0, 1/3, 2/3 or 1: noise), on both sides of the
    comparison.  Never predicted is recall 0, so it is caught too.  Silent
    when the others are not recognised either (a median of 0): that is not one
    class neglected but a model that has learned nothing yet.
    """
    recall = ev.recall
    counted = np.flatnonzero(ev.support >= max(1.0, min_support))
    if counted.size < 2:
        return []
    out = []
    for c in counted.tolist():
        others = recall[[o for o in counted.tolist() if o != c]]
        median = float(np.median(others))
        if median > 0 and recall[c] <= ratio * median:
            out.append(c)
    return out
