"""The histogram summaries the writer encodes from bytes equal the ones built field by field, and a run
watched through the real writer puts readable histograms in TensorBoard's Histograms tab."""

from __future__ import annotations

import math

import numpy as np
import torch
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import summary_pb2

from tbdiag import DiagnosticWriter
from tbdiag.measure import stats
from tbdiag.summary.histograms import histogram_summary


def _field_by_field(tags, rows, numels) -> summary_pb2.Summary:
    """The plain protobuf build: what `histogram_summary` must equal."""
    out = summary_pb2.Summary()
    for tag, row, numel in zip(tags, np.asarray(rows, dtype=np.float64), numels):
        lo, hi, counts = row[0], row[1], row[3:] * row[2]  # counts scaled to the whole tensor
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        bins = len(counts)
        if hi <= lo:
            limits, buckets, centers = [hi], [counts.sum()], np.array([(lo + hi) / 2])
            weights = np.array([counts.sum()])
        else:
            limits = [lo + (hi - lo) * (j + 1) / bins for j in range(bins)]
            edges = [lo] + limits
            centers = np.array([(edges[j] + edges[j + 1]) / 2 for j in range(bins)])
            buckets, weights = list(counts), counts
        out.value.add(tag=tag, histo=summary_pb2.HistogramProto(
            min=lo, max=hi, num=float(numel) if numel is not None else float(counts.sum()),
            sum=float((centers * weights).sum()), sum_squares=float((centers**2 * weights).sum()),
            bucket_limit=limits, bucket=buckets))
    return out


def test_bytes_encoding_equals_the_field_by_field_build():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(310, 310, generator=g), torch.rand(40, generator=g), torch.full((5,), 2.0),
               torch.full((3,), float("nan")), torch.tensor([0.0, float("inf"), -3.0]), torch.zeros(0),
               torch.randn(70_000, generator=g) * 1e-30]
    flat, lengths, scales, order = stats.histogram_samples(tensors)
    rows = stats.host_histograms(flat.numpy(), lengths, scales)
    tags = [f"params/layer{i}.weight" for i in order]
    numels = [tensors[i].numel() if i < len(tensors) - 1 else None for i in order]
    got, want = histogram_summary(tags, rows, numels), _field_by_field(tags, rows, numels)
    assert len(got.value) == 5, "all-NaN and empty tensors have nothing to draw"
    for a, b in zip(got.value, want.value):
        assert a.tag == b.tag
        for name in ("min", "max", "num"):
            assert getattr(a.histo, name) == getattr(b.histo, name), (a.tag, name)
        np.testing.assert_allclose([a.histo.sum, a.histo.sum_squares], [b.histo.sum, b.histo.sum_squares],
                                   rtol=1e-12, atol=0)
        assert list(a.histo.bucket) == list(b.histo.bucket)
        np.testing.assert_allclose(a.histo.bucket_limit, b.histo.bucket_limit, rtol=1e-15)
    assert histogram_summary([], np.zeros((0, 33)), []).value == []


def test_watched_run_histograms_read_back_in_tensorboard(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.ReLU(), torch.nn.Linear(300, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2, histograms_every=2)
    for _ in range(3):
        loss = model(torch.randn(64, 20)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    tags = set(acc.Tags()["histograms"])
    assert {"params/0.weight", "grads/2.bias", "activations/0", "activations/2"} <= tags
    (first, second) = acc.Histograms("params/0.weight")
    assert (first.step, second.step) == (0, 2)
    h = second.histogram_value  # the weights after the last step (step 2)
    exact = model[2].weight.detach()  # 900 elements: every one binned
    h_exact = acc.Histograms("params/2.weight")[-1].histogram_value
    assert (h_exact.min, h_exact.max) == (float(exact.min()), float(exact.max()))
    assert h_exact.num == sum(h_exact.bucket) == exact.numel() and math.isclose(h_exact.bucket_limit[-1], h_exact.max)
    sampled = model[0].weight.detach()  # 6000 elements: a fixed sample, counts scaled to the whole tensor
    assert h.num == sampled.numel() and math.isclose(sum(h.bucket), sampled.numel())
    assert float(sampled.min()) <= h.min < h.max <= float(sampled.max())
