"""Statistics as pure tensor functions, computed on the tensors' own device.

Nothing here calls ``.item()``, ``.cpu()`` or anything else that waits for the
device: every function returns device tensors, which the watcher gathers into
one buffer and copies to the host once per logging step (`to_host`).
Nothing here modifies its inputs or draws random numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Sequence

import numpy as np
import torch

#: Sigmoid/tanh outputs this close to a bound (as a fraction of the output
#: range) count as saturated: |tanh| > 0.99, sigmoid < 0.01 or > 0.99.
SATURATION_MARGIN = 0.01

#: Histogram bins written per tensor.  TensorBoard redraws any histogram into
#: 30 buckets, so more bins cost bytes without changing the picture.
HISTOGRAM_BINS = 30

#: Tensors larger than this are histogrammed from a fixed, evenly spread subset
#: of this many elements (see `sample_stride`).  Only histograms use the
#: subset; the health statistics always read every element.  Measured error
#: (tests/test_histogram_accuracy.py): every bin's share of the tensor differs
#: from the exact share, over the same bin edges, by at most
#: `HISTOGRAM_SHARE_ERROR`; the sampled range lies inside the exact one.
HISTOGRAM_SAMPLE = 1 << 12

#: The bound asserted by tests/test_histogram_accuracy.py on Gaussian, uniform,
#: heavy-tailed (Student t, df=2), sparse (90% zeros), row-structured, conv-weight
#: and post-ReLU tensors of 3.7*10^4 to 4*10^6 elements: max over the 30 bins of
#: |sampled share - exact share|, measured at 0.002-0.007 (about a fifth
#: of a bin's average share of 0.033); asserted with a margin.  (A sample
#: of 8192 measured 0.001-0.007: twice the binning and copying for no
#: visible difference in a 30-bucket picture.)
HISTOGRAM_SHARE_ERROR = 0.02

#: Outputs of more elements than this are measured a piece of at most this many elements at a time
#: (`pieces`): what a statistic allocates per element (a float32 copy of a bfloat16 output, the deviations
#: from the mean, ``isfinite``'s masks: 7-11 bytes per element of the whole output) is then allocated for
#: one piece, at most 8 bytes per element of it (32 MiB; tests/test_stats_memory.py), not for the whole
#: output (a language model's logits: gigabytes).  The results are the whole output's up to float rounding
#: (the pieces' partial sums added up; the deviations taken from the whole output's mean).
STATS_CHUNK = 1 << 22


def gather(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` on ``device``, to be stacked or concatenated: those elsewhere copied there, without blocking
    the host where the copy goes to an accelerator (a model spread over several devices in one process).

    A copy to the CPU blocks (the host reads the result next); those are a model's CPU-offloaded parts.
    """
    non_blocking = device.type != "cpu"
    return [t if t.device == device else t.to(device, non_blocking=non_blocking) for t in tensors]


def pieces(x: torch.Tensor, chunk: int | None = None) -> list[torch.Tensor]:
    """Views of ``x`` that together hold each of its elements once, each of at most ``chunk`` elements
    (default `STATS_CHUNK`).

    Along the leading dimension (whole slices where a slice fits, else each slice in pieces); a contiguous
    ``x`` as a flat run.  Views only: no copy, whatever the strides.
    """
    chunk = STATS_CHUNK if chunk is None else chunk
    if x.numel() <= chunk or x.dim() == 0:
        return [x]
    if x.is_contiguous():
        x = x.view(-1)
    per = x[0].numel() if x.dim() > 1 else 1  # elements per index along the leading dimension
    if per <= chunk:
        return list(x.split(chunk // per, 0))
    return [p for sub in x.unbind(0) for p in pieces(sub, chunk)]


def activation_stats(out: torch.Tensor) -> torch.Tensor | np.ndarray:
    """``[mean, std, nonfinite count]`` of a layer output (float32, on its device): `moments` of one.

    An output of more than `STATS_CHUNK` elements is measured in `pieces` (`_moments_pieces`): the memory
    the statistics allocate stays bounded whatever its size.
    """
    x = out.detach()
    if x.numel() == 0:
        return np.full(3, np.nan, dtype=np.float32) if x.device.type == "cpu" else \
            torch.full((3,), float("nan"), device=x.device)
    if x.numel() > STATS_CHUNK:
        return _moments_pieces_cpu(x) if x.device.type == "cpu" else _moments_pieces(x)
    x = x if x.dtype == torch.float32 else x.float()
    return _moments_one_cpu(x, x.numel()) if x.device.type == "cpu" else _moments(x.reshape(1, -1), x.numel())[0]


def _float_pieces(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """`pieces` of ``x`` in float32 (each converted on its own: one piece's copy at a time)."""
    for p in pieces(x):
        yield p if p.dtype == torch.float32 else p.float()


def _moments_pieces_cpu(x: torch.Tensor) -> np.ndarray:
    """`_moments_one_cpu` of a large CPU output, a piece at a time: the same steps, the pieces' sums added
    up in float64 on the host."""
    n = x.numel()
    m = sum(float(p.sum()) for p in _float_pieces(x)) / n
    if not math.isfinite(m):  # (finiteness is the same in the output's own dtype: no float32 copy)
        bad = sum(p.numel() - int(torch.isfinite(p).sum()) for p in pieces(x))
        return np.array([m, math.nan, bad], dtype=np.float32)
    var = sum(float(torch.linalg.vector_norm(p)) ** 2 for p in _float_pieces(x)) / n - m * m
    if var < m * m:  # cancellation: two passes
        var = sum(float(torch.linalg.vector_norm(p - m)) ** 2 for p in _float_pieces(x)) / n
    return np.array([m, math.sqrt(max(var, 0.0)), 0.0], dtype=np.float32)


def _moments_pieces(x: torch.Tensor) -> torch.Tensor:
    """`_moments` of one large device output, a piece at a time (no host reads): the mean from the pieces'
    sums; the norm of the deviations as the norm of the pieces' norms; the pieces' finite counts added up."""
    n = x.numel()
    sums, finite = [], []
    for p in pieces(x):  # (the float32 copy of a piece freed before its finiteness mask is made)
        sums.append((p if p.dtype == torch.float32 else p.float()).sum())
        finite.append(torch.isfinite(p).sum())
    mean = torch.stack(sums).sum() / n
    std = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - mean) for p in _float_pieces(x)]))
    nonfinite = (n - torch.stack(finite).sum()).to(torch.float32)
    return torch.stack([mean, std / math.sqrt(n), nonfinite])


def moments(x: torch.Tensor) -> torch.Tensor | np.ndarray:
    """``[k, 3]``: ``[mean, std, nonfinite count]`` of each row of a float32 ``[k, n]`` tensor, ``n > 0``.

    The rows are layer outputs (one, or several of one size stacked: a deep
    stack of small layers then costs a few reductions in all instead of a
    few per layer; on a CPU the per-call overhead is most of a small layer's
    cost).  The standard deviation is the population one (``correction=0``).
    On CPUs it is computed from one read for the sum and one for the sum of
    squares (``E[x^2] - mean^2``), and recomputed in two passes (mean, then
    the norm of the deviations) for the rows where ``|mean| > std``, where
    that difference would cancel digits: the result stays within float32
    rounding of the two-pass value, at half its memory traffic; a one-pass
    Welford ``std_mean`` is an order of magnitude slower on CPUs.  The
    NaN/Inf count is exact; on the CPU it is counted only where the mean is
    not finite (a finite mean proves there is none; reading a CPU value is no
    device synchronisation; on other devices it is always counted).  On the
    CPU the values are on the host already and come back as a numpy array.
    """
    if x.device.type != "cpu":
        return _moments(x, x.shape[1])
    return _moments_one_cpu(x[0], x.shape[1])[None] if x.shape[0] == 1 else _moments_cpu(x, x.shape[1])


def _moments_one_cpu(x: torch.Tensor, n: int) -> np.ndarray:
    """`_moments_cpu` of one output, the same steps on Python floats: for one small layer numpy's per-call
    overhead would cost more than its two reductions."""
    m = float(x.sum()) / n
    if not math.isfinite(m):
        return np.array([m, math.nan, n - int(torch.isfinite(x).sum())], dtype=np.float32)
    var = float(torch.linalg.vector_norm(x)) ** 2 / n - m * m
    if var < m * m:  # cancellation: two passes
        var = float(torch.linalg.vector_norm(x - m)) ** 2 / n
    return np.array([m, math.sqrt(max(var, 0.0)), 0.0], dtype=np.float32)


def _moments_cpu(x: torch.Tensor, n: int) -> np.ndarray:
    """`moments` of the rows of a CPU ``[k, n]`` float32 tensor: one read for the sums, one for the squares."""
    m = x.sum(1).numpy().astype(np.float64) / n
    finite = np.isfinite(m)
    with np.errstate(invalid="ignore", over="ignore"):  # (rows with NaN/Inf: replaced below)
        var = torch.linalg.vector_norm(x, dim=1).numpy().astype(np.float64) ** 2 / n - m * m
        redo = finite & (var < m * m)
    if redo.any():  # cancellation: two passes for these rows
        r = np.flatnonzero(redo)
        mean = torch.from_numpy(m[r].astype(np.float32))
        var[r] = torch.linalg.vector_norm(x[torch.from_numpy(r)] - mean[:, None], dim=1).numpy() ** 2 / n
    out = np.zeros((len(m), 3), dtype=np.float32)
    out[:, 0] = m
    out[:, 1] = np.sqrt(np.maximum(var, 0.0))
    if not finite.all():  # NaN/Inf: counted where the mean says there are some
        bad = np.flatnonzero(~finite)
        out[bad, 1] = np.nan
        out[bad, 2] = n - torch.isfinite(x[torch.from_numpy(bad)]).sum(1).numpy()
    return out


def _moments(x: torch.Tensor, n: int) -> torch.Tensor:
    """`moments` of the rows of a ``[k, n]`` float32 device tensor (two passes, no host reads)."""
    mean = x.mean(1)
    std = torch.linalg.vector_norm(x - mean[:, None], dim=1) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    nonfinite = (n - torch.isfinite(x).sum(1)).to(torch.float32)
    return torch.stack([mean, std, nonfinite], dim=1)


def unit_dim(shape: Sequence[int], channels_first: bool) -> int:
    """Axis that indexes units: channels for convolution-like outputs, else the last (features)."""
    if len(shape) <= 1:
        return 0
    return 1 if channels_first and len(shape) >= 3 else len(shape) - 1


def dead_units(y: torch.Tensor, dim: int, below: float = 0.0) -> torch.Tensor:
    """Boolean mask over the units along ``dim``: True where ``y`` is <= ``below`` for the whole batch.

    ``y`` is a rectifier-like activation's pre-activation and ``below`` its
    cutoff (`tbdiag.measure.layers.DEAD_BELOW`); for the ReLU family (cutoff
    0) it may be the output as well: the ReLU output is <= 0 exactly where its
    input is.  The watcher ANDs the masks of consecutive logging steps: a unit
    that has not fired in three logged batches is dead with far more
    confidence than one silent over a single small batch.
    """
    x = y.detach()
    return _never_fired(x, dim, below=below) if x.dim() else _never_fired(x.reshape(1), 0, below=below)


def dead_units_rows(x: torch.Tensor, dim: int, below: float = 0.0) -> torch.Tensor:
    """`dead_units` of each of ``k`` outputs stacked as ``x`` (``[k, *shape]``): ``[k, units]``."""
    return _never_fired(x, dim + 1, first=1, below=below)


def _never_fired(x: torch.Tensor, unit: int, first: int = 0, below: float = 0.0) -> torch.Tensor:
    """True per unit (axis ``unit``) where no element is > ``below``: the maximum over the axes from ``first`` on.

    A unit with a NaN output is not alive: ``amax`` propagates the NaN and a
    NaN is not above the cutoff.  (Its layer's fraction is NaN anyway once the
    output holds a NaN, `tbdiag.summary.assembly.Assembler`; the mask stays
    a mask, and all-dead is neutral in the AND over logged batches.)

    The axes after the units go first (a contiguous reduction), then those
    before: on ``[N, C, H, W]`` two such reductions cost half of one over
    ``(0, 2, 3)`` at once, which strides through memory.
    """
    if x.dim() > unit + 1:
        x = x.amax(dim=list(range(unit + 1, x.dim())))
    if unit > first:
        x = x.amax(dim=list(range(first, unit)))
    # not "x <= below": a maximum that is NaN (any NaN among the unit's outputs) never fired either
    return ~(x > below)


def saturated_fraction(y: torch.Tensor, kind: str) -> torch.Tensor:
    """Fraction of sigmoid (``kind="sigmoid"``) or tanh outputs within 1% of their bounds."""
    if kind not in ("sigmoid", "tanh"):
        raise ValueError(f"saturation is defined for 'sigmoid' and 'tanh', not {kind!r}")
    x = y.detach()
    if x.numel() == 0:
        return torch.full((), float("nan"), device=x.device)
    if x.numel() > STATS_CHUNK:  # counted a piece at a time (bounded memory), exactly
        return (torch.stack([_saturated(p, kind).sum() for p in _float_pieces(x)]).sum() / x.numel()).float()
    return _saturated(x.float(), kind).float().mean()


def _saturated(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return (x < SATURATION_MARGIN) | (x > 1 - SATURATION_MARGIN)
    return x.abs() > 1 - 2 * SATURATION_MARGIN


def norms(tensors: Sequence[torch.Tensor], device: torch.device | None = None,
          scales: Sequence[float] | None = None) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 vector on ``device`` (default: the first tensor's; one fused
    kernel per device and dtype, the norms computed where their tensors are and gathered, `gather`).

    ``scales``: one factor per tensor, applied to its norm (a sample's norm scaled to its whole tensor's)
    rather than to its elements: the same result for a pass over a few numbers, not over the samples.
    """
    if not tensors:
        return torch.zeros(0)
    # accumulated in float32 whatever the tensors' dtype (bfloat16/float16 models): a norm is a long sum;
    # no_grad rather than a detach per tensor (a dispatch each)
    with torch.no_grad():
        values = torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
        if scales is not None and any(scale != 1.0 for scale in scales):
            torch._foreach_mul_(values, list(scales))  # (Python scalars: kernel arguments, no host-to-device copy)
        return torch.stack(gather(values, tensors[0].device if device is None else device))


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Count of NaN/Inf elements in each tensor (float32 vector, on the first tensor's device)."""
    counts = [(t.numel() - torch.isfinite(t.detach()).sum()).float() for t in tensors]
    return torch.stack(gather(counts, counts[0].device))


#: Elements per contiguous run of a sample: one 64-byte cache line of float32.
SAMPLE_RUN = 16


#: The fractional column step between consecutive runs of a sample (the golden ratio's conjugate): the runs' columns
#: then form a Kronecker sequence, spread over the row for any number of runs.
_PHASE = (math.sqrt(5) - 1) / 2


@functools.lru_cache(maxsize=4096)
def sample_stride(numel: int, sample: int = HISTOGRAM_SAMPLE, run: int = SAMPLE_RUN,
                  row: int | None = None) -> int | None:
    """Distance between the starts of the sampled runs of a flattened tensor (None: read it all).

    A sample is ``sample / run`` runs of ``run`` consecutive elements (by
    default `HISTOGRAM_SAMPLE` in runs of `SAMPLE_RUN`), their starts ``0, s,
    2s, ...`` spread evenly over the whole tensor.  Runs of whole cache lines
    read only the sampled lines (single scattered elements would pull in every
    line of a tensor up to 16x the sample).  A strided view: one copy, no
    index tensor, no random numbers, identical at every step.

    ``s`` also decides which columns the runs land in.  With the row length
    ``row`` known (the tensor's last dimension), ``s`` is chosen within 1/64
    of the largest spacing that fits so that each run starts as near a golden
    fraction of a row to the right of the one before as that allows: the
    columns spread over the row, for any number of runs.  (A spacing of one row plus one column
    would put every run of a fused query-key-value weight in its query
    columns.)  Otherwise, and as a tie-break, ``s`` shares no factor with
    ``numel``.
    """
    if numel <= sample:
        return None
    runs = sample // run
    widest = (numel - run) // (runs - 1)
    if row is not None and run < row < numel and widest > row:
        target = _PHASE * row  # the column offset wanted from one run to the next
        # within 1/64 of the widest spacing: the runs still reach the last 98% of the tensor
        return min(range(widest - widest // 64, widest + 1),
                   key=lambda step: (round(min(abs(step % row - target), row - abs(step % row - target))),
                                     math.gcd(step, numel) != 1, -step))
    step = widest
    while step > run and math.gcd(step, numel) != 1:
        step -= 1
    return step if math.gcd(step, numel) == 1 else widest


def _sample_view(t: torch.Tensor) -> torch.Tensor:
    """The sampled elements of a tensor as a strided ``[runs, SAMPLE_RUN]`` view, or all of it, flat."""
    step = sample_stride(t.numel(), row=t.shape[-1] if t.dim() > 1 else None)
    if step is None:
        return t.reshape(-1)
    if not t.is_contiguous():
        t = t.reshape(-1)  # (a copy: the strides below index the elements in row-major order)
    return _runs(t, step)


def _runs(x: torch.Tensor, step: int, rows: bool = False) -> torch.Tensor:
    """The sampled runs of a contiguous tensor, a strided ``[runs, SAMPLE_RUN]`` view; with ``rows``, those
    of each row of a contiguous ``[k, n]`` tensor, ``[k, runs, SAMPLE_RUN]``."""
    shape, strides = (HISTOGRAM_SAMPLE // SAMPLE_RUN, SAMPLE_RUN), (step, 1)
    if rows:
        shape, strides = (x.shape[0], *shape), (x.shape[1], *strides)
    return x.as_strided(shape, strides, x.storage_offset())


def histogram_sample(t: torch.Tensor) -> torch.Tensor:
    """The float32 values a histogram of ``t`` is computed from (all, or the fixed subset); always a copy.

    ``[runs, SAMPLE_RUN]`` for a sampled tensor, flat otherwise (`histogram_samples` takes either)."""
    # Always a copy: the caller may keep it while an in-place op (ReLU(inplace=True)) rewrites ``t``.
    return _sample_view(t.detach()).to(torch.float32, copy=True)


def histogram_sample_rows(x: torch.Tensor) -> torch.Tensor:
    """`histogram_sample` of each row of a ``[k, n]`` tensor (outputs of one size, stacked), in one copy.

    Returns float32 ``[k, length]``: the rows' samples side by side, taken
    through one strided view of all rows (the same elements `histogram_sample`
    takes from each row alone), not a view and a copy per row.
    """
    k, n = x.shape
    step = sample_stride(n)
    if step is None:
        return x.to(torch.float32, copy=True)
    out = torch.empty((k, HISTOGRAM_SAMPLE), dtype=torch.float32, device=x.device)
    out.view(k, -1, SAMPLE_RUN).copy_(_runs(x.contiguous(), step, rows=True))
    return out


def histogram_samples(tensors: Sequence[torch.Tensor], device: torch.device | None = None
                      ) -> tuple[torch.Tensor, list[int], list[float], list[int]]:
    """The values each tensor's histogram is binned from, for many tensors, in one float32 buffer on ``device``
    (default: the first tensor's; samples of tensors elsewhere are copied there, `gather`).

    Returns ``(flat, lengths, scales, order)``: the concatenated samples (all
    values, or `sample_stride`'s fixed subset of a large tensor), each
    sample's length and its tensor's ``numel / length``, and which input
    each sample is (``order[i]`` indexes ``tensors``): the sampled tensors
    come first, then the small ones, so that each group is one ``cat``
    (a copy per tensor costs a dispatch each; two copies in all cost two).
    Lengths and scales come from shapes alone, so they are known on the host
    without reading the device.  Bin with `host_histograms` once
    ``flat`` is on the host: the device does two gathering copies and no
    reductions.
    """
    if not tensors:
        return torch.zeros(0), [], [], []
    with torch.no_grad():  # (rather than a detach per tensor)
        device = tensors[0].device if device is None else device
        # [runs, SAMPLE_RUN] views of sampled tensors, else flat; on ``device`` (a copy of the sample only)
        sources = gather([_sample_view(t) for t in tensors], device)
        runs = [i for i, f in enumerate(sources) if f.dim() == 2]
        whole = [i for i, f in enumerate(sources) if f.dim() == 1]
        order = runs + whole
        lengths = [sources[i].numel() for i in order]
        scales = [tensors[i].numel() / max(1, n) for i, n in zip(order, lengths)]
        n_runs = sum(lengths[: len(runs)])
        out = torch.empty(sum(lengths), dtype=torch.float32, device=device)
        if runs:
            torch.cat([sources[i] for i in runs], out=out[:n_runs].view(-1, SAMPLE_RUN))
        if whole:
            torch.cat([sources[i] for i in whole], out=out[n_runs:])
        return out, lengths, scales, order


#: Samples binned together by `host_histograms`: temporaries of a few hundred KiB stay in the CPU's cache,
#: and a step's few hundred histograms take a dozen numpy calls per group instead of per tensor.
_HOST_CHUNK = 1 << 16


def host_histograms(
    flat: np.ndarray, lengths: Sequence[int], scales: Sequence[float], bins: int = HISTOGRAM_BINS
) -> np.ndarray:
    """Histograms of `histogram_samples`' output, binned on the host (float32 arithmetic).

    The same float32 arithmetic as `device_histograms`, so both give the
    same rows (tests/test_histogram_accuracy.py).  Consecutive tensors are
    binned in groups of up to `_HOST_CHUNK` values; equal-length samples (the
    common case: every large tensor's sample is `HISTOGRAM_SAMPLE` long) as
    one 2-D block.

    Returns ``[len(lengths), 3 + bins]`` float32: ``min, max, scale, counts...``.
    """
    n = len(lengths)
    out = np.zeros((n, 3 + bins), dtype=np.float32)
    if n == 0:
        return out
    flat = np.asarray(flat, dtype=np.float32).reshape(-1)
    lengths_a = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths_a)[:-1]])
    nonempty = lengths_a > 0
    finite = np.isfinite(flat)
    all_finite = bool(finite.all())
    big = np.finfo(np.float32).max
    lo = np.full(n, big, dtype=np.float32)
    hi = np.full(n, -big, dtype=np.float32)
    if nonempty.any() and flat.size:
        at = starts[nonempty]
        lo[nonempty] = np.minimum.reduceat(flat if all_finite else np.where(finite, flat, big), at)
        hi[nonempty] = np.maximum.reduceat(flat if all_finite else np.where(finite, flat, -big), at)
    empty = lo > hi
    lo[empty] = np.nan
    hi[empty] = np.nan
    width = np.maximum(hi - lo, np.finfo(np.float32).tiny)
    counts = out[:, 3:]
    i = 0
    while i < n:
        j, total = i + 1, int(lengths_a[i])
        while j < n and total + lengths_a[j] <= _HOST_CHUNK:
            total += int(lengths_a[j])
            j += 1
        _bin_group(flat[starts[i] : starts[i] + total], finite[starts[i] : starts[i] + total], lengths_a[i:j],
                   lo[i:j], width[i:j], empty[i:j], all_finite, counts[i:j])
        i = j
    out[:, 0] = lo
    out[:, 1] = hi
    out[:, 2] = np.asarray(scales, dtype=np.float32)
    return out


def _bin_group(x: np.ndarray, finite: np.ndarray, lengths: np.ndarray, lo: np.ndarray, width: np.ndarray,
               empty: np.ndarray, all_finite: bool, counts: np.ndarray) -> None:
    """Bin consecutive samples ``x`` (``lengths`` each) into ``counts`` rows: `host_histograms`' inner loop.

    floor((x - lo) / width * bins) clamped to [0, bins - 1], as `device_histograms` computes it; clamping
    first and truncating gives the same integer for every finite x.  NaN/Inf and empty samples count nowhere.
    """
    k, bins = len(lengths), counts.shape[1]
    if lengths[0] > 0 and (lengths == lengths[0]).all():  # one [k, length] block: per-row values broadcast
        pos = x.reshape(k, -1) - lo[:, None]
        pos /= width[:, None]
        offsets = (np.arange(k, dtype=np.intp) * bins)[:, None]
        skip = None if all_finite and not empty.any() else ~(finite.reshape(k, -1) & ~empty[:, None])
    else:
        pos = x - np.repeat(lo, lengths)
        pos /= np.repeat(width, lengths)
        offsets = np.repeat(np.arange(k, dtype=np.intp) * bins, lengths)
        skip = None if all_finite and not empty.any() else ~(finite & ~np.repeat(empty, lengths))
    pos *= np.float32(bins)
    if skip is not None:
        pos[skip] = 0  # counted with weight 0 below
    np.clip(pos, 0, bins - 1, out=pos)
    index = pos.astype(np.intp)
    index += offsets
    weights = None if skip is None else (~skip).reshape(-1).astype(np.float64)
    counts[:] = np.bincount(index.reshape(-1), weights=weights, minlength=k * bins).reshape(k, bins)


@functools.lru_cache(maxsize=16)
def _segments(device: torch.device, lengths: tuple[int, ...]) -> torch.Tensor:
    """Which tensor each element of a concatenated sample belongs to, on ``device``.

    A step's sample layout follows from the tensors' shapes alone, so it is the
    same at every logging step: built once (the lengths reach the device with a
    non-blocking copy, no synchronisation) and reused.
    """
    counts = torch.tensor(lengths, dtype=torch.int64).to(device, non_blocking=True)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), counts, output_size=sum(lengths))


def device_histograms(flat: torch.Tensor, lengths: Sequence[int], bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """`host_histograms` without the scale column, binned where the samples are, for all tensors at once.

    For accelerators: a handful of batched kernels over ``flat`` (no per-tensor
    launches, no synchronisation: no boolean indexing, no output sized by a
    device value) turn a step's samples into one ``[len(lengths), 2 + bins]``
    float32 result (``min, max, counts...``), a few hundred bytes per tensor
    where the samples are 32 KiB, and that is what rides in the step's single
    host transfer.  The same float32 arithmetic as `host_histograms`, so both
    give the same rows.  On a CPU the host path is faster (numpy bins each
    sample where it sits in cache) and runs on the writer thread instead.
    """
    n = len(lengths)
    device = flat.device
    if n == 0:
        return torch.zeros((0, 2 + bins), device=device)
    seg = _segments(device, tuple(int(x) for x in lengths))
    finite = torch.isfinite(flat)
    big = torch.finfo(torch.float32).max
    lo = torch.full((n,), big, device=device).scatter_reduce_(0, seg, torch.where(finite, flat, big), "amin")
    hi = torch.full((n,), -big, device=device).scatter_reduce_(0, seg, torch.where(finite, flat, -big), "amax")
    empty = lo > hi  # no finite value (or no value at all)
    lo = torch.where(empty, torch.nan, lo)
    hi = torch.where(empty, torch.nan, hi)
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    pos = ((flat - lo[seg]) / width[seg] * float(bins)).clamp_(0, bins - 1)
    index = torch.where(finite, pos, 0).long() + seg * bins
    counts = torch.zeros(n * bins, device=device).index_add_(0, index, finite.float())
    return torch.cat([lo[:, None], hi[:, None], counts.view(n, bins)], dim=1)


def feature_grid(out: torch.Tensor, max_channels: int = 16, size: int = 32, kind: str | None = None) -> torch.Tensor:
    """The first sample's first feature maps, each resized to ``size x size``, on one fixed scale in [0, 1].

    ``kind`` says what ``out`` is, and so its scale: the output of a ``"relu"``
    (0 is black, the largest value shown is white: a dead channel is all
    black), of a ``"sigmoid"`` (its own [0, 1]) or a ``"tanh"`` ([-1, 1]);
    ``None``: a raw layer output, scaled from the smallest to the largest value
    of all channels shown.  One scale for all channels: per-channel
    normalisation would stretch a dead channel's zeros into the same picture
    as a live one.  Returns ``[channels, size, size]``; `images.tile` tiles it.
    """
    x = out.detach()[0, :max_channels].float()
    if x.dim() == 2:  # Conv1d: [C, L] -> one row per channel
        x = x[:, None, :]
    elif x.dim() > 3:  # Conv3d: middle slice
        x = x[:, x.shape[1] // 2]
    x = torch.nn.functional.adaptive_avg_pool2d(x[:, None], (min(size, x.shape[-2]), min(size, x.shape[-1])))[:, 0]
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if kind == "sigmoid":
        return x.clamp(0, 1)
    if kind == "tanh":
        return ((x + 1) / 2).clamp(0, 1)
    lo = torch.zeros((), device=x.device) if kind == "relu" else x.amin()
    return ((x - lo) / (x.amax() - lo).clamp_min(1e-12)).clamp(0, 1)


def to_host(parts: Sequence[torch.Tensor | np.ndarray], device: torch.device | None = None) -> list[np.ndarray]:
    """Copy many device tensors to the host in one transfer; returns numpy arrays shaped as given.

    The device tensors are gathered on ``device`` (default: the first one's), concatenated there and copied
    to the host at once; those on other devices (a model spread over several) reach it without blocking.
    Host values (numpy arrays: statistics computed on the host already, and
    CPU tensors) are passed through: the arrays may share memory with
    ``parts``, which are freshly computed results nobody writes to afterwards.
    """
    out: list[np.ndarray | None] = [
        p if isinstance(p, np.ndarray) else _host_float32(p) if p.device.type == "cpu" else None for p in parts]
    remote = [(i, p) for i, p in enumerate(parts) if out[i] is None]
    if remote:  # one concatenation on the device, one copy to the host
        device = remote[0][1].device if device is None or device.type == "cpu" else device
        flat = torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float32, non_blocking=True)
                          for _, p in remote])
        host, offset = flat.cpu().numpy(), 0
        for i, p in remote:
            n = p.numel()
            out[i] = host[offset : offset + n].reshape(tuple(p.shape))
            offset += n
    return out  # type: ignore[return-value]


def _host_float32(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a float32 numpy array (its own memory when it is float32 already)."""
    t = t.detach()
    return (t if t.dtype == torch.float32 else t.to(torch.float32)).numpy()
