"""Statistics as pure tensor functions, computed on the tensors' own device.

Nothing here calls ``.item()``, ``.cpu()`` or anything else that waits for the
device: every function returns device tensors, which the watcher gathers into
one buffer and copies to the host once per logging step (`to_host`).
Nothing here modifies its inputs or draws random numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

#: Sigmoid/tanh outputs this close to a bound (as a fraction of the output
#: range) count as saturated: |tanh| > 0.99, sigmoid < 0.01 or > 0.99.
SATURATION_MARGIN = 0.01

#: Histogram bins written per tensor.  TensorBoard redraws any histogram into
#: 30 buckets, so more bins cost bytes without changing the picture.
HISTOGRAM_BINS = 30

#: Tensors larger than this are histogrammed from a fixed, scattered subset of
#: this many elements (see `sample_indices`).  Only histograms use the subset;
#: the health statistics always read every element.
HISTOGRAM_SAMPLE = 1 << 16

_INDEX_CACHE: dict[tuple[int, str], torch.Tensor] = {}
# A prime larger than any tensor we sample, so i * _STRIDE_PRIME mod n visits
# positions spread over the whole tensor and never lines up with a row length.
_STRIDE_PRIME = 2_147_483_647


def activation_stats(out: torch.Tensor) -> torch.Tensor:
    """``[mean, std, nonfinite count]`` of a layer output (float32, on its device)."""
    x = out.detach()
    if not x.is_floating_point():
        x = x.float()
    n = x.numel()
    if n == 0:
        return torch.full((3,), float("nan"), device=x.device)
    x32 = x.float() if x.dtype != torch.float32 else x
    std, mean = torch.std_mean(x32, correction=0) if n > 1 else (torch.zeros((), device=x.device), x32.mean())
    nonfinite = (n - torch.isfinite(x32).sum()).to(torch.float32)
    return torch.stack([mean, std, nonfinite]).float()


def unit_dim(shape: Sequence[int], channels_first: bool) -> int:
    """Axis that indexes units: channels for convolution-like outputs, else the last (features)."""
    if len(shape) <= 1:
        return 0
    return 1 if channels_first and len(shape) >= 3 else len(shape) - 1


def dead_fraction(y: torch.Tensor, dim: int) -> torch.Tensor:
    """Fraction of units along ``dim`` whose ReLU output is <= 0 for every element of the batch.

    ``y`` is the activation's output (or its input: ``relu(x) == 0`` exactly
    when ``x <= 0``).  NaN elements do not count as dead.
    """
    x = y.detach()
    if x.numel() == 0:
        return torch.tensor(float("nan"), device=x.device)
    if x.dim() == 0:
        x = x.reshape(1)
    units = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    alive = (units > 0) | torch.isnan(units)
    return (~alive.any(dim=1)).float().mean()


def saturated_fraction(y: torch.Tensor, kind: str) -> torch.Tensor:
    """Fraction of sigmoid (``kind="sigmoid"``) or tanh outputs within 1% of their bounds."""
    x = y.detach().float()
    if x.numel() == 0:
        return torch.tensor(float("nan"), device=x.device)
    if kind == "sigmoid":
        sat = (x < SATURATION_MARGIN) | (x > 1 - SATURATION_MARGIN)
    elif kind == "tanh":
        sat = x.abs() > 1 - 2 * SATURATION_MARGIN
    else:
        raise ValueError(f"saturation is defined for 'sigmoid' and 'tanh', not {kind!r}")
    return sat.float().mean()


def norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 vector (one fused kernel per device and dtype)."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack([n.float() for n in torch._foreach_norm([t.detach() for t in tensors])])


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Count of NaN/Inf elements in each tensor (float32 vector)."""
    return torch.stack([(t.numel() - torch.isfinite(t.detach()).sum()).float() for t in tensors])


def sample_indices(numel: int, device: torch.device) -> torch.Tensor | None:
    """Deterministic scattered positions for histogramming a large tensor (None: use all).

    Position ``i`` is ``i * p mod numel`` for a large prime ``p``: spread over
    the whole tensor without lining up with rows or channels, identical at
    every step, and drawn without touching any random number generator.
    """
    if numel <= HISTOGRAM_SAMPLE:
        return None
    key = (numel, str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        i = torch.arange(HISTOGRAM_SAMPLE, dtype=torch.int64)
        idx = ((i * _STRIDE_PRIME) % numel).to(device)
        _INDEX_CACHE[key] = idx
    return idx


def histogram_sample(t: torch.Tensor) -> torch.Tensor:
    """The float32 values a histogram of ``t`` is computed from (all, or the fixed subset)."""
    flat = t.detach().reshape(-1)
    idx = sample_indices(flat.numel(), flat.device)
    if idx is not None:
        return flat.index_select(0, idx).float()
    # Always a copy: the caller may keep it while an in-place op (ReLU(inplace=True)) rewrites ``t``.
    return flat.to(torch.float32, copy=True)


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


def feature_grid(out: torch.Tensor, max_channels: int = 16, size: int = 32) -> torch.Tensor:
    """The first sample's first feature maps, each resized to ``size x size`` and scaled to [0, 1].

    Returns ``[channels, size, size]``; `images.grid` tiles it on the host.
    """
    x = out.detach()[0, :max_channels].float()
    if x.dim() == 2:  # Conv1d: [C, L] -> one row per channel
        x = x[:, None, :]
    elif x.dim() > 3:  # Conv3d: middle slice
        x = x[:, x.shape[1] // 2]
    x = torch.nn.functional.adaptive_avg_pool2d(x[:, None], (min(size, x.shape[-2]), min(size, x.shape[-1])))[:, 0]
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def to_host(parts: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Copy many device tensors to the host in one transfer; returns numpy arrays shaped as given."""
    if not parts:
        return []
    flat = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in parts])
    host = flat.cpu().numpy()
    out, offset = [], 0
    for p in parts:
        n = p.numel()
        out.append(host[offset : offset + n].reshape(tuple(p.shape)))
        offset += n
    return out
