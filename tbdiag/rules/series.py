"""Reading a series of logged values: runs of agreeing steps, smoothing, noise.

Pure numpy, shared by every checker (`tbdiag.rules.evaluator`, `tbdiag.rules.loss`,
`tbdiag.rules.update`): what counts as "persistent" and what counts as
"noise" is decided here once.
"""

from __future__ import annotations

import numpy as np

#: MAD -> standard deviation for normal noise.
_MAD_TO_SD = 1.4826


def streaks(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, end)`` of consecutive True values."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def needed(valid: np.ndarray, persistence: int) -> int:
    """How many agreeing steps a streak needs: the persistence, or every valid step of a run shorter than it
    (so a short run that is sick from start to end is still diagnosed)."""
    return max(1, min(persistence, int(np.count_nonzero(valid))))


def persistent(mask: np.ndarray, valid: np.ndarray, persistence: int) -> list[tuple[int, int]]:
    """Streaks long enough to count (`needed`)."""
    need = needed(valid, persistence)
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


def noise_sd(values: np.ndarray) -> float:
    """Batch-to-batch noise of a curve, as the standard deviation of one value around its trend.

    From the median absolute deviation of second differences: a trend, even a
    curved one (the fast-then-slow fall of a loss), barely moves them, and
    single outliers do not count, so a falling curve and a flat one of equal
    noise agree.  (Independent noise of sd s gives second differences of sd
    s * sqrt(6).)
    """
    v = np.asarray(values, dtype=np.float64)
    d = np.diff(v[np.isfinite(v)], n=2)
    if d.size < 2:
        return 0.0
    return float(_MAD_TO_SD * np.median(np.abs(d - np.median(d))) / np.sqrt(6.0))


__all__ = ["streaks", "persistent", "rolling_median", "noise_sd"]
