"""The update ratio of large parameters from a fixed sample: bounded memory, a measured error.

Parameters up to `UPDATE_SAMPLE` elements are copied whole before the optimizer step, so their update ratio is
exact; larger ones are copied as a strided sample and their change scaled to the whole tensor.  Each test
trains for real and compares the logged ratio with the exact one, computed here from full copies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbdiag import DiagnosticWriter
from tbdiag.measure.probe import UPDATE_SAMPLE, WeightCopies, update_sample
from tbdiag.read.reader import load_logdir


def _train(tmp_path, model, opt, batches, steps=12, log_every=3):
    """Train while logging; return (logged ratios [logged steps, layers], exact ratios, layer names)."""
    names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    modules = dict(model.named_modules())
    exact = []
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=log_every, histograms=False, log_graph=False)
    for step in range(steps):
        loss = batches(step)
        opt.zero_grad()
        loss.backward()
        before = {n: [p.detach().clone() for p in modules[n].parameters(recurse=False)] for n in names}
        opt.step()
        if step % log_every == 0:
            row = []
            for n in names:
                params = list(modules[n].parameters(recurse=False))
                du = sum(float((p.detach() - b).double().pow(2).sum()) for p, b in zip(params, before[n]))
                w = sum(float(p.detach().double().pow(2).sum()) for p in params)
                row.append(np.sqrt(du / w))
            exact.append(row)
    writer.close()
    (run,) = load_logdir(str(tmp_path))
    cols = [run.layer_names.index(n) for n in names]
    return run.column("update_ratio")[:, cols].astype(np.float64), np.array(exact), names


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_small_parameters_are_exact_and_large_ones_within_two_percent(tmp_path, optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10))
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    logged, exact, names = _train(tmp_path, model, opt, lambda s: F.cross_entropy(model(x[s % 8 * 32:][:32]),
                                                                                   y[s % 8 * 32:][:32]))
    sizes = {n: sum(p.numel() for p in dict(model.named_modules())[n].parameters(recurse=False)) for n in names}
    for j, n in enumerate(names):
        err = np.abs(logged[:, j] / exact[:, j] - 1)
        if sizes[n] <= UPDATE_SAMPLE:
            assert err.max() < 1e-5, (n, err)  # whole copies: exact up to float32 rounding
        else:
            assert err.max() < 0.02, (n, sizes[n], err)


def test_a_sparse_embedding_update_is_still_seen(tmp_path):
    """SGD without momentum moves only the rows of the batch's tokens: the sample visits every row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8000, 64), nn.Flatten(), nn.Linear(4 * 64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = torch.randint(0, 8000, (512, 4))
    labels = (tokens[:, 0] % 2)
    logged, exact, names = _train(tmp_path, model, opt,
                                  lambda s: F.cross_entropy(model(tokens[s * 32:(s + 1) * 32]),
                                                            labels[s * 32:(s + 1) * 32]))
    j = names.index("0")
    assert (logged[:, j] > 0).all(), "a sparse update must not read as no update"
    err = np.abs(logged[:, j] / exact[:, j] - 1)
    assert err.max() < 0.25, err  # 128 of 8000 rows move: an estimate from the few samples that land on them


def test_copies_stay_small_whatever_the_parameters_size():
    big = [torch.randn(4096, 1024), torch.randn(50_000, 64), torch.randn(300), torch.randn(1024, 1024).t()]
    copies = WeightCopies()
    copies.capture(list(range(len(big))), big)
    positions, before, scales = copies.take(list(range(len(big))))
    numels = [b.numel() for b in before]
    assert numels[0] <= UPDATE_SAMPLE and numels[1] <= UPDATE_SAMPLE, numels
    assert numels[2] == 300 and scales[2] == 1.0  # small: whole
    assert numels[3] == 1024 * 1024 and scales[3] == 1.0  # not contiguous: whole (no transient full copy)
    view, scale = update_sample(big[0])
    assert view.data_ptr() == big[0].data_ptr() and scale == pytest.approx(np.sqrt(big[0].numel() / view.numel()))
    # every row of a [rows, 64] embedding is visited by the odd stride
    rows = torch.arange(50_000 * 64).view(50_000, 64)
    visited = torch.unique(update_sample(rows.float())[0].long() // 64)
    assert visited.numel() > 0.9 * min(50_000, UPDATE_SAMPLE)
