"""Error of the sampled histograms (the one approximation tbdiag makes) against exact ones.

Tensors larger than `stats.HISTOGRAM_SAMPLE` are histogrammed from an evenly
spread subset (`stats.sample_stride`).  Here the histogram written through the
real path (`histogram_samples` on the device, `host_histograms` on the writer
thread) is compared with an exact histogram of every element over the same
bin edges (elements outside the sampled range land in the end bins, as in the
sampled one).  The bound asserted is the one documented in tbdiag/measure/stats.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbdiag.measure import stats


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(512, 2048, generator=g) * torch.logspace(-3, 0, 512)[:, None]  # a scale per row
    sparse = torch.randn(1000, 1000, generator=g)
    sparse[torch.rand(1000, 1000, generator=g) < 0.9] = 0.0
    t2 = torch.distributions.StudentT(2.0).sample((4_000_000,))  # heavy tails
    conv = torch.randn(64, 64, 3, 3, generator=g) * 0.05
    return {
        "gaussian 310x310": torch.randn(310, 310, generator=g),
        "uniform 1M": torch.rand(1_000_000, generator=g) * 2 - 1,
        "student-t df=2, 4M": t2,
        "90% zeros 1000x1000": sparse,
        "row scales 1e-3..1, 512x2048": rows,
        "conv 64x64x3x3": conv,
        "activations 64x16x16x16 (post-ReLU)": torch.relu(torch.randn(64, 16, 16, 16, generator=g)),
        "small (exact) 5000": torch.randn(5000, generator=g),
    }


def _exact_shares(t: torch.Tensor, lo: float, hi: float, bins: int) -> np.ndarray:
    x = t.detach().reshape(-1).numpy().astype(np.float32)
    width = np.float32(max(hi - lo, np.finfo(np.float32).tiny))
    pos = np.clip(np.floor((x - np.float32(lo)) / width * np.float32(bins)), 0, bins - 1).astype(np.int64)
    return np.bincount(pos, minlength=bins) / x.size


def _sampled_rows(tensors: list[torch.Tensor]) -> np.ndarray:
    flat, lengths, scales, order = stats.histogram_samples(tensors)
    return stats.host_histograms(flat.numpy(), lengths, scales)[np.argsort(order)]  # in the order given


def test_sampled_histograms_within_documented_error():
    named = _tensors()
    rows = _sampled_rows(list(named.values()))
    errors = {}
    for (name, t), row in zip(named.items(), rows):
        lo, hi, scale, counts = float(row[0]), float(row[1]), float(row[2]), row[3:].astype(np.float64)
        x = t.reshape(-1)
        # the sampled range lies inside the exact one; scaled counts add up to the tensor's size
        assert float(x.min()) <= lo and hi <= float(x.max()), name
        assert counts.sum() * scale == pytest.approx(t.numel(), rel=1e-6), name
        shares = counts / counts.sum()
        errors[name] = float(np.abs(shares - _exact_shares(t, lo, hi, len(counts))).max())
        if t.numel() <= stats.HISTOGRAM_SAMPLE:
            assert errors[name] == 0.0, name  # small tensors: every element, exact
    print("max |sampled - exact| bin share:", {k: round(v, 4) for k, v in errors.items()})
    assert max(errors.values()) <= stats.HISTOGRAM_SHARE_ERROR, errors


def test_host_binning_equals_device_binning():
    """The writer-thread binning (CPU runs) gives exactly the rows the batched on-device binning
    (accelerators) gives: one picture whichever device trains."""
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(310, 310, generator=g), torch.randn(300, generator=g),
               torch.tensor([1.0, float("nan"), 3.0, float("inf")]), torch.full((3,), float("nan")),
               torch.full((5,), 2.0), torch.zeros(0), torch.randn(70_000, generator=g).half()]
    flat, lengths, scales, order = stats.histogram_samples(tensors)
    device_rows = np.insert(stats.device_histograms(flat, lengths).numpy(), 2, scales, axis=1)
    host_rows = stats.host_histograms(flat.numpy(), lengths, scales)
    assert np.array_equal(device_rows, host_rows, equal_nan=True)
