"""The activation statistics of a large output in bounded memory, with the results of the whole output.

A language model's logits can be gigabytes: a statistic that allocates a few
bytes per element (a float32 copy of a bfloat16 output, the deviations from
the mean, ``isfinite``'s masks) would run a logging step out of memory.  An
output of more than `stats.STATS_CHUNK` elements is measured a piece at a
time.  The memory each statistic allocates is measured here by a
`TorchDispatchMode` that follows the storages its ops create until they are
freed (the peak of what is alive at once), on the CPU; the CUDA test reads the
caching allocator's peak.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tbdiag.measure import stats

SHAPE = (8, 512, 4096)  # 16.8M elements, 64 MiB of float32: four pieces of `STATS_CHUNK`
N = math.prod(SHAPE)
#: Bytes a statistic may allocate per element of one piece: a float32 copy of a bfloat16 piece (4) and its
#: deviations from the mean (4); ``isfinite``'s ``abs`` and masks (CompositeImplicit: 4 + 3) on a float32
#: piece; measured at most 8.
BYTES_PER_PIECE_ELEMENT = 12


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes alive at once in storages created by the ops run under it (views and in-place
    results of existing storages are not new memory)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive on it]
        self.now = self.peak = 0

    def _free(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[ptr]
                self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.live:
                self.live[ptr][1] += 1
            elif ptr in inputs:
                continue  # a view of an input, or written in place
            else:
                self.live[ptr] = [storage.nbytes(), 1]
                self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._free, ptr)
        return out


def peak_bytes(fn):
    with PeakBytes() as mode:
        result = fn()
    return result, mode.peak


def test_the_counter_sees_temporaries_and_not_views():
    x = torch.randn(1000)
    _, peak = peak_bytes(lambda: (x - 1).sum())
    assert peak == 4000 + 4  # the difference, and the sum while the difference is alive
    _, peak = peak_bytes(lambda: x.view(10, 100)[3].sum())
    assert peak == 4  # the scalar


@pytest.fixture(scope="module")
def big():
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g)


def _outputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "gaussian": x,
        "offset": x + 3.0,  # |mean| > std: the two-pass recomputation (cancellation)
        "nonfinite": torch.where(x > 3.5, float("nan"), x),
        "bfloat16": (x + 3.0).bfloat16(),
        "transposed": (x + 3.0).transpose(0, 2),  # not contiguous: pieces along the leading dimension
    }


def _reference(t: torch.Tensor) -> tuple[float, float, int]:
    d = t.double()
    finite = torch.isfinite(d)
    return float(d.mean()), float(d.std(correction=0)), int(t.numel() - finite.sum())


@pytest.mark.parametrize("chunk", [1 << 20, stats.STATS_CHUNK])
@pytest.mark.parametrize("name", ["gaussian", "offset", "nonfinite", "bfloat16", "transposed"])
def test_activation_stats_of_a_large_output_in_pieces(big, monkeypatch, name, chunk):
    """Both paths, the CPU's (host floats) and the accelerator's (device tensors, run here on the CPU): the
    peak memory is bounded by the piece, not the output, and the moments are the whole output's."""
    t = _outputs(big)[name]
    monkeypatch.setattr(stats, "STATS_CHUNK", chunk)
    bound = BYTES_PER_PIECE_ELEMENT * chunk
    mean, std, bad = _reference(t)
    got_cpu, peak_cpu = peak_bytes(lambda: stats.activation_stats(t))
    got_dev, peak_dev = peak_bytes(lambda: stats._moments_pieces(t))
    assert peak_cpu <= bound and peak_dev <= bound, (peak_cpu / chunk, peak_dev / chunk)
    # the pieces' sums in float32, added up: within float32 accumulation error of the exact (float64) moments
    for got in (np.asarray(got_cpu), got_dev.numpy()):
        assert got[2] == bad
        if bad:
            assert np.isnan(got[0]) and np.isnan(got[1])
        else:
            assert got[0] == pytest.approx(mean, rel=1e-5, abs=1e-5)
            assert got[1] == pytest.approx(std, rel=5e-4)

    # and the unchunked functions, on this output, give the same numbers up to float32 rounding (theirs is the
    # larger error at 16.8M elements: one float32 norm of the whole output, 6e-4 off the exact std)
    monkeypatch.setattr(stats, "STATS_CHUNK", N + 1)
    whole_cpu, whole_peak = peak_bytes(lambda: stats.activation_stats(t))
    whole_dev = stats._moments(t.float().reshape(1, -1), N)[0]
    np.testing.assert_allclose(np.asarray(got_cpu), np.asarray(whole_cpu), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got_dev.numpy(), whole_dev.numpy(), rtol=1e-3, atol=1e-5)
    if name != "gaussian":  # (a plain float32 output needs no memory on the CPU either way)
        assert whole_peak > 3 * N, "without pieces the statistics allocate per element of the output"


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
def test_saturated_fraction_of_a_large_output_in_pieces(big, monkeypatch, kind):
    y = (torch.sigmoid(3 * big) if kind == "sigmoid" else torch.tanh(3 * big)).bfloat16()
    got, peak = peak_bytes(lambda: stats.saturated_fraction(y, kind))
    assert peak <= BYTES_PER_PIECE_ELEMENT * stats.STATS_CHUNK
    monkeypatch.setattr(stats, "STATS_CHUNK", N + 1)
    whole, whole_peak = peak_bytes(lambda: stats.saturated_fraction(y, kind))
    assert whole_peak > 4 * N
    assert float(got) == pytest.approx(float(whole), rel=1e-6)  # counts: exact either way


def test_dead_units_and_histogram_sample_of_a_large_output_allocate_per_unit_only(big):
    for dim in (2, 1):  # features last; channels-first
        _, peak = peak_bytes(lambda dim=dim: stats.dead_units(big, dim, -3.1))
        assert peak <= 2 * 4 * SHAPE[0] * SHAPE[1]  # the maxima over the trailing axes, at most
    _, peak = peak_bytes(lambda: stats.histogram_sample(big))
    assert peak <= 4 * stats.HISTOGRAM_SAMPLE


def test_pieces_cover_every_element_once_as_views():
    x = torch.arange(2 * 3 * 50, dtype=torch.float32).view(2, 3, 50)
    for t in (x, x.transpose(0, 2), x[:, :, ::3], x.transpose(1, 2)[1]):
        for chunk in (1, 7, 50, 64, 10_000):
            parts = stats.pieces(t, chunk)
            assert all(p.numel() <= chunk or p.numel() == 1 for p in parts)
            assert all(p.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for p in parts)
            assert sorted(torch.cat([p.reshape(-1) for p in parts]).tolist()) == sorted(t.reshape(-1).tolist())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_stats_of_lm_head_sized_logits_stay_within_a_piece_on_cuda(dtype):
    """The caching allocator's own peak: what the statistics add over the output itself is bounded by the piece."""
    x = torch.randn(SHAPE, device="cuda").to(dtype)
    x += 3.0  # the two-pass path
    y = torch.sigmoid(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = stats.activation_stats(x)
    sat = stats.saturated_fraction(y, "sigmoid")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= BYTES_PER_PIECE_ELEMENT * stats.STATS_CHUNK + (1 << 20), extra / stats.STATS_CHUNK
    mean, std, bad = _reference(x)
    assert got.device.type == "cuda" and float(got[2]) == bad
    assert float(got[0]) == pytest.approx(mean, rel=1e-5) and float(got[1]) == pytest.approx(std, rel=1e-4)
    assert 0.0 <= float(sat) <= 1.0
