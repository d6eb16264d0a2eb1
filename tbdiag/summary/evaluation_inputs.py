"""What `DiagnosticWriter.add_evaluation` accepts, turned into labels and class probabilities.

Targets are class indices ``[N]``.  Outputs are predicted labels ``[N]``,
one binary score per sample ``[N]`` / ``[N, 1]`` (a logit or a probability
of class 1), or class scores ``[N, C]`` (logits, or probabilities when every
row is non-negative and sums to 1).  Torch tensors (any device or dtype),
numpy arrays and lists are all accepted; a wrong shape or label raises a
ValueError saying what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Prepared:
    """One evaluation's inputs, checked: labels, predictions, probabilities (None for labels)."""

    targets: np.ndarray  # int64 [N]
    predictions: np.ndarray  # int64 [N]
    probabilities: np.ndarray | None  # float64 [N, C], rows summing to 1
    n_classes: int  # the fewest classes these inputs need


def as_array(x: Any, what: str) -> np.ndarray:
    """A numpy copy of a tensor, array or list (torch tensors leave their device, bf16 becomes float32)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach()
        if x.is_floating_point():
            x = x.float()
        x = x.cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"add_evaluation: {what} must be a tensor, array or list of numbers ({e})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"add_evaluation: {what} must hold numbers, got {arr.dtype}")
    return arr


def _squeeze_column(arr: np.ndarray) -> np.ndarray:
    return arr[:, 0] if arr.ndim == 2 and arr.shape[1] == 1 else arr


def _labels(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"add_evaluation: {what} must be whole class indices, got non-integer values")
    labels = arr.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"add_evaluation: {what} holds the negative label {int(labels.min())}; class indices "
                         "start at 0 (drop ignored samples, e.g. targets != -100, before calling)")
    return labels


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows of probabilities from class scores: kept as they are when already probabilities, else softmax."""
    scores = np.asarray(scores, dtype=np.float64)
    is_prob = ((scores >= 0) & (scores <= 1)).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    return scores if is_prob else _softmax(scores)


def prepare(targets: Any, outputs: Any) -> Prepared:
    """Check and convert ``targets`` and ``outputs``; raises ValueError naming what is wrong."""
    t = _squeeze_column(as_array(targets, "targets"))
    o = _squeeze_column(as_array(outputs, "outputs"))
    if t.ndim != 1:
        hint = " (one-hot targets: pass targets.argmax(1))" if t.ndim == 2 else ""
        raise ValueError(f"add_evaluation: targets must be class indices of shape [N], got shape {t.shape}{hint}")
    if o.ndim not in (1, 2):
        raise ValueError(f"add_evaluation: outputs must be labels [N] or class scores [N, C], got shape {o.shape} "
                         "(for per-pixel outputs flatten first, e.g. outputs.movedim(1, -1).reshape(-1, C))")
    if len(t) == 0:
        raise ValueError("add_evaluation: no samples (targets is empty)")
    if len(o) != len(t):
        raise ValueError(f"add_evaluation: {len(t)} targets but {len(o)} outputs; pass one output per target")
    labels = _labels(t, "targets")
    if o.ndim == 1:
        whole = o.dtype == bool or np.issubdtype(o.dtype, np.integer) or (
            np.isfinite(o).all() and (o == np.round(o)).all() and o.min() >= 0)
        if whole:  # predicted labels
            predictions = _labels(o, "outputs")
            return Prepared(labels, predictions, None, int(max(labels.max(), predictions.max())) + 1)
        # one score per sample: a binary classifier's probability or logit of class 1
        p = o.astype(np.float64)
        if not ((p >= 0) & (p <= 1)).all():
            p = 1.0 / (1.0 + np.exp(-np.clip(np.nan_to_num(p), -500, 500)))
        scores = np.stack([1 - p, p], axis=1)
    else:
        if o.shape[1] < 2:
            raise ValueError(f"add_evaluation: class scores need at least 2 columns, got shape {o.shape}")
        # a NaN score never wins the argmax; infinities become the largest finite scores
        scores = np.nan_to_num(o.astype(np.float64), nan=-1e30, posinf=1e30, neginf=-1e30)
    n = scores.shape[1]
    if labels.max() >= n:
        raise ValueError(f"add_evaluation: targets hold label {int(labels.max())} but outputs score only {n} "
                         f"classes (labels 0..{n - 1}); pass scores for every class")
    probabilities = class_probabilities(scores)
    return Prepared(labels, probabilities.argmax(axis=1).astype(np.int64), probabilities, n)
