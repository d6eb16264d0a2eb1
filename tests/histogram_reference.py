"""Exact reference histograms, binned on the tensors' device: what the writer's sampled, host-binned
histograms are checked against (tests/test_histogram_accuracy.py, tests/test_stats.py)."""

from __future__ import annotations

from typing import Sequence

import torch

from tbdiag.stats import HISTOGRAM_BINS, histogram_sample


def histograms(tensors: Sequence[torch.Tensor], bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """Histograms of many tensors in a handful of kernels.

    Returns ``[len(tensors), 3 + bins]``: ``min, max, scale, counts...`` per
    tensor, where ``scale`` is ``numel / values histogrammed`` (1 unless the
    tensor was sampled) so counts can be reported per element of the whole
    tensor.  Non-finite values are left out of the counts; a tensor with no
    finite value gets NaN min/max.
    """
    if not tensors:
        return torch.zeros((0, 3 + bins))
    device = tensors[0].device
    samples = [histogram_sample(t) for t in tensors]
    lengths = torch.tensor([s.numel() for s in samples], device=device)
    scale = torch.tensor([t.numel() / max(1, s.numel()) for t, s in zip(tensors, samples)], device=device)
    flat = torch.cat(samples)
    finite = torch.isfinite(flat)
    big = torch.finfo(torch.float32).max
    lo = torch.segment_reduce(torch.where(finite, flat, big), "min", lengths=lengths, unsafe=True)
    hi = torch.segment_reduce(torch.where(finite, flat, -big), "max", lengths=lengths, unsafe=True)
    empty = lo > hi
    lo = torch.where(empty, torch.nan, lo)
    hi = torch.where(empty, torch.nan, hi)
    seg = torch.repeat_interleave(torch.arange(len(samples), device=device), lengths)
    width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    pos = ((flat - lo[seg]) / width[seg] * bins).floor().clamp_(0, bins - 1)
    pos = torch.where(finite, pos, 0).long() + seg * bins
    counts = torch.zeros(len(samples) * bins, device=device)
    counts.index_add_(0, pos, finite.float())
    return torch.cat([lo[:, None], hi[:, None], scale[:, None], counts.view(len(samples), bins)], dim=1)
