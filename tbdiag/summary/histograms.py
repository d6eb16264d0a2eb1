"""Histogram summaries for TensorBoard's Histograms tab, encoded without a Python call per bucket.

A logging step writes a histogram per parameter, gradient and activation
(about 80 for a 26-layer MLP).  Building each `HistogramProto` field by field
converts every bucket limit and count to a Python float; here the arithmetic
is vectorised over all rows and each value's bytes are assembled from numpy
buffers (packed doubles are their little-endian bytes), then parsed once by
protobuf's C implementation.  The result is the same `Summary` message the
field-by-field build gives (tests/test_histogram_summary.py holds them equal).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from tensorboard.compat.proto import summary_pb2


# wire-format keys: (field number << 3) | wire type; 1 = 64-bit, 2 = length-delimited
def _DOUBLE(field: int) -> int:
    return field << 3 | 1


def _BYTES(field: int) -> int:
    return field << 3 | 2


# HistogramProto: min=1, max=2, num=3, sum=4, sum_squares=5 (doubles), bucket_limit=6, bucket=7 (packed doubles);
# Summary.Value: tag=1, histo=5; Summary: value=1


@functools.lru_cache(maxsize=1024)
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@functools.lru_cache(maxsize=64)
def _histo_layout(buckets: int) -> np.dtype:
    """The bytes of one HistogramProto with ``buckets`` buckets, as a packed numpy record."""
    length = _varint(8 * buckets)
    return np.dtype([
        ("k1", "u1"), ("min", "<f8"), ("k2", "u1"), ("max", "<f8"), ("k3", "u1"), ("num", "<f8"),
        ("k4", "u1"), ("sum", "<f8"), ("k5", "u1"), ("sum_squares", "<f8"),
        ("k6", "u1"), ("n6", "u1", (len(length),)), ("bucket_limit", "<f8", (buckets,)),
        ("k7", "u1"), ("n7", "u1", (len(length),)), ("bucket", "<f8", (buckets,)),
    ])


def _histos(lo, hi, num, total, total_sq, limits, counts) -> list[bytes]:
    """Serialised HistogramProtos, one per row, built as one numpy record array."""
    n, buckets = limits.shape
    layout = _histo_layout(buckets)
    rec = np.zeros(n, dtype=layout)
    for field, key in (("min", 1), ("max", 2), ("num", 3), ("sum", 4), ("sum_squares", 5)):
        rec["k%d" % key] = _DOUBLE(key)
    rec["min"], rec["max"], rec["num"], rec["sum"], rec["sum_squares"] = lo, hi, num, total, total_sq
    length = np.frombuffer(_varint(8 * buckets), dtype=np.uint8)
    rec["k6"], rec["n6"], rec["bucket_limit"] = _BYTES(6), length, limits
    rec["k7"], rec["n7"], rec["bucket"] = _BYTES(7), length, counts
    raw, size = rec.tobytes(), layout.itemsize
    return [raw[i * size : (i + 1) * size] for i in range(n)]


def histogram_summary(tags: Sequence[str], rows: np.ndarray, numels: Sequence[int | None]) -> summary_pb2.Summary:
    """One `Summary` with a histogram value per row of ``[min, max, scale, counts...]``.

    ``scale`` is ``numel / values binned`` (the counts are scaled to the whole
    tensor); ``numels[i]`` is the tensor's element count, or None to report
    the scaled count.  A row without a finite value (NaN range) is left out:
    nothing to draw; the nonfinite rule reports it.  A row whose values are
    all equal becomes a single bucket at that value.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.size == 0:
        return summary_pb2.Summary()
    lo, hi = rows[:, 0], rows[:, 1]
    counts = rows[:, 3:] * rows[:, 2:3]
    bins = counts.shape[1]
    limits = lo[:, None] + (hi - lo)[:, None] * np.arange(1, bins + 1) / bins
    centers = (np.concatenate([lo[:, None], limits[:, :-1]], axis=1) + limits) / 2
    totals = counts.sum(axis=1)
    point = hi <= lo  # one distinct value: a single bucket at it
    middle = (lo + hi) / 2
    sums = np.where(point, middle * totals, (centers * counts).sum(axis=1))
    sums_sq = np.where(point, middle**2 * totals, (centers**2 * counts).sum(axis=1))
    nums = np.array([totals[i] if n is None else float(n) for i, n in enumerate(numels)], dtype=np.float64)
    keep = np.isfinite(lo) & np.isfinite(hi)
    spread, single = np.flatnonzero(keep & ~point), np.flatnonzero(keep & point)
    histos: dict[int, bytes] = {}
    for at, lim, cnt in ((spread, limits, counts), (single, hi[:, None], totals[:, None])):
        if at.size:
            made = _histos(lo[at], hi[at], nums[at], sums[at], sums_sq[at], lim[at], cnt[at])
            histos.update(zip(at.tolist(), made))
    out = []
    for i in sorted(histos):
        tag = tags[i].encode()
        value = b"".join((bytes((_BYTES(1),)), _varint(len(tag)), tag, bytes((_BYTES(5),)),
                          _varint(len(histos[i])), histos[i]))
        out.append(b"".join((bytes((_BYTES(1),)), _varint(len(value)), value)))
    return summary_pb2.Summary.FromString(b"".join(out))


__all__ = ["histogram_summary"]
