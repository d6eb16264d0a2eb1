"""Statistics as pure functions on hand-made tensors."""

import math

import numpy as np
import pytest
import torch

from tbdiag.measure import stats


def _dead_fraction(y: torch.Tensor, dim: int) -> float:
    return float(stats.dead_units(y, dim).float().mean())


def test_dead_fraction_per_channel_and_per_feature():
    x = torch.randn(8, 4, 5, 5)
    x[:, 1] = -torch.rand(8, 5, 5)  # channel 1 never fires
    x[:, 3] = 0.0  # channel 3 is exactly zero after ReLU
    assert (_dead_fraction(torch.relu(x), dim=1)) == pytest.approx(0.5)
    feats = torch.randn(16, 10)
    feats[:, :7] = -1.0
    assert (_dead_fraction(feats, dim=1)) == pytest.approx(0.7)
    # a unit that fires for one sample only is alive
    feats[3, :7] = 0.1
    assert (_dead_fraction(feats, dim=1)) == 0.0


def test_unit_dim_channels_for_conv_features_for_sequences():
    assert stats.unit_dim((8, 16, 5, 5), channels_first=True) == 1
    assert stats.unit_dim((8, 12, 64), channels_first=False) == 2
    assert stats.unit_dim((8, 64), channels_first=True) == 1


def test_saturated_fraction():
    y = torch.tensor([0.999, -0.995, 0.5, 0.0])
    assert float(stats.saturated_fraction(y, "tanh")) == pytest.approx(0.5)
    s = torch.tensor([0.001, 0.999, 0.5, 0.2])
    assert float(stats.saturated_fraction(s, "sigmoid")) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sigmoid"):
        stats.saturated_fraction(y, "relu")


def test_activation_stats_and_nonfinite_counts():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, std, bad = stats.activation_stats(x).tolist()
    assert (mean, bad) == (2.5, 0.0) and std == pytest.approx(np.std([1, 2, 3, 4]))
    x = torch.tensor([1.0, float("nan"), float("inf"), 4.0])
    assert stats.activation_stats(x)[2] == 2
    assert stats.nonfinite_counts([x, torch.ones(3)]).tolist() == [2.0, 0.0]


def test_moments_of_stacked_outputs_match_each_output_in_float64():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 300, generator=g)
    rows[1] = 1000.0 + 0.01 * rows[1]  # |mean| >> std: the one-pass variance would cancel every digit
    rows[2, 7] = float("nan")
    rows[3, :2] = float("inf")
    rows[4] = 3.0  # constant
    got = stats.moments(rows)
    assert isinstance(got, np.ndarray) and got.shape == (5, 3)
    for i in (0, 1, 4):
        want = rows[i].double()
        assert got[i, 0] == pytest.approx(float(want.mean()), rel=1e-6)
        assert got[i, 1] == pytest.approx(float(want.std(correction=0)), rel=1e-3, abs=1e-6)
        assert got[i, 2] == 0
    assert np.isnan(got[2, 0]) and got[2, 2] == 1 and got[3, 2] == 2
    for i, row in enumerate(rows):  # one output alone gives what it gives in a stack
        np.testing.assert_allclose(stats.activation_stats(row), got[i], rtol=1e-6, equal_nan=True)
    # the accelerator formula (two passes, every count on the device), run here on the CPU
    device = stats._moments(rows, rows.shape[1]).numpy()
    np.testing.assert_allclose(device[[0, 1, 4]], got[[0, 1, 4]], rtol=1e-4, atol=1e-6)
    assert device[2, 2] == 1 and device[3, 2] == 2 and device[[0, 1, 4], 2].tolist() == [0, 0, 0]


def test_dead_units_of_stacked_outputs_match_each_output():
    g = torch.Generator().manual_seed(0)
    for shape, dim in (((8, 4, 5, 5), 1), ((16, 10), 1), ((6, 3, 12), 2), ((7,), 0)):
        ys = torch.randn(3, *shape, generator=g) - 0.8
        masks = stats.dead_units_rows(ys, dim)
        for y, mask in zip(ys, masks):
            assert torch.equal(mask, stats.dead_units(y, dim)), (shape, dim)
            want = y.amax(dim=[d for d in range(y.dim()) if d != dim]) <= 0 if y.dim() > 1 else y <= 0
            assert torch.equal(mask, want), (shape, dim)


def test_norms_match_torch():
    ts = [torch.randn(3, 4), torch.randn(7)]
    assert stats.norms(ts).tolist() == pytest.approx([float(t.norm()) for t in ts], rel=1e-6)


def _host_rows(tensors, bins):
    flat, lengths, scales, order = stats.histogram_samples(tensors)
    return stats.host_histograms(flat.numpy(), lengths, scales, bins=bins)[np.argsort(order)]  # in the order given


def test_histograms_exact_for_small_tensors():
    t = torch.arange(100, dtype=torch.float32)
    for rows in (_host_rows([t], 10), np.insert(stats.device_histograms(t, [100], bins=10).numpy(), 2, 1.0, axis=1)):
        lo, hi, scale, counts = float(rows[0, 0]), float(rows[0, 1]), float(rows[0, 2]), rows[0, 3:].tolist()
        assert (lo, hi, scale) == (0.0, 99.0, 1.0)
        assert counts == [10.0] * 10
    # NaN/Inf are left out; an all-NaN tensor has NaN range
    rows = _host_rows([torch.tensor([1.0, float("nan"), 3.0]), torch.full((3,), float("nan"))], 2)
    assert rows[0, 3:].tolist() == [1.0, 1.0]
    assert math.isnan(float(rows[1, 0]))


def test_histogram_samples_are_deterministic_and_spread():
    n = 1_000_003
    positions = torch.arange(n, dtype=torch.float32)  # exact in float32 below 2**24: values are positions
    idx = stats.histogram_sample(positions).reshape(-1).long()
    assert stats.HISTOGRAM_SAMPLE // 2 <= len(idx) <= stats.HISTOGRAM_SAMPLE
    assert torch.equal(idx, stats.histogram_sample(positions).reshape(-1).long())
    assert len(torch.unique(idx)) == len(idx)
    # hits every tenth of the tensor about equally
    buckets = torch.bincount(idx * 10 // n, minlength=10)
    assert buckets.min() > 0.8 * len(idx) / 10
    assert stats.sample_stride(100) is None


def test_histogram_samples_say_which_tensor_each_sample_is():
    """Sampled and whole tensors are gathered in two groups; ``order`` maps each sample back to its tensor."""
    sizes = [50_000, 7, 4096, 4097, 300, 1]
    tensors = [torch.full((n,), float(i)) for i, n in enumerate(sizes)]
    tensors[0] = tensors[0].reshape(250, 200).t()  # not contiguous: sampled in row-major order all the same
    flat, lengths, scales, order = stats.histogram_samples(tensors)
    assert sorted(order) == list(range(len(sizes)))
    for i, piece, n, scale in zip(order, flat.split(lengths), lengths, scales):
        assert torch.all(piece == float(i)), i
        assert n == min(sizes[i], stats.HISTOGRAM_SAMPLE) and scale == pytest.approx(sizes[i] / n)
    # each tensor's own sample is the piece gathered for it
    for i, piece in zip(order, flat.split(lengths)):
        assert torch.equal(stats.histogram_sample(tensors[i]).reshape(-1), piece)


def test_samples_of_stacked_rows_are_each_rows_own_sample():
    g = torch.Generator().manual_seed(0)
    for n in (300, stats.HISTOGRAM_SAMPLE, 19_840, 50_001):
        x = torch.randn(5, n, generator=g)
        rows = stats.histogram_sample_rows(x)
        assert rows.shape == (5, min(n, stats.HISTOGRAM_SAMPLE))
        for row, got in zip(x, rows):
            assert torch.equal(got, stats.histogram_sample(row).reshape(-1)), n
        x[0, 0] = 123.0
        assert rows[0, 0] != 123.0, "a copy: the stack it came from is reused"


def test_histogram_sample_is_a_copy():
    t = torch.randn(100)
    s = stats.histogram_sample(t)
    t.relu_()
    assert (s < 0).any(), "an in-place op after the hook must not change what gets histogrammed"


def test_feature_grid_bounded_and_normalised():
    out = torch.randn(4, 64, 100, 100)
    grid = stats.feature_grid(out, max_channels=16, size=32)
    assert grid.shape == (16, 32, 32)
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1


def test_to_host_one_buffer_many_shapes():
    a, b = torch.arange(6.0).reshape(2, 3), torch.tensor([7.0])
    ha, hb = stats.to_host([a, b])
    assert ha.shape == (2, 3) and hb.tolist() == [7.0]


def test_statistics_do_not_modify_inputs():
    x = torch.randn(8, 4, 5, 5)
    before = x.clone()
    stats.dead_units(x, 1), stats.activation_stats(x), stats.histogram_samples([x]), stats.feature_grid(x)
    assert torch.equal(x, before)


def test_the_stack_buffer_reuses_its_memory_on_the_cpu_only():
    from tbdiag.measure.probe import StackBuffer

    buffer = StackBuffer()
    a = [torch.randn(4, 5, dtype=torch.bfloat16) for _ in range(3)]
    first = buffer.stack(a)
    assert first.dtype == torch.float32 and first.shape == (3, 4, 5)
    assert torch.equal(first, torch.stack(a).float())
    second = buffer.stack([torch.ones(2, 5)])  # smaller: the same memory
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    on_meta = buffer.stack([torch.empty(4, 5, device="meta", dtype=torch.float16)] * 2)  # other devices: a plain stack
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32 and on_meta.shape == (2, 4, 5)
