"""The forward taps after the first logging step: ReLU modules that follow a layer directly are left untapped,
and their dead units, read from that layer's output instead, are exactly the ones their own output shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

from tbdiag import DiagnosticWriter
from tbdiag.read.reader import load_logdir


class Net(nn.Module):
    """ReLU modules in each position: after a layer, in place after a layer, shared between a layer's output
    and a residual sum (which no layer wrote, so that module keeps its tap)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(8, 16), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.ReLU(inplace=True)
        self.fc3, self.shared = nn.Linear(16, 16), nn.ReLU()
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc2.bias[:5] = -50.0  # five units of fc2 that never fire
            self.fc3.bias[:3] = -50.0

    def forward(self, x):
        h1 = self.act1(self.fc1(x))
        h2 = self.act2(self.fc2(h1))
        h3 = self.shared(self.fc3(h2))
        return self.head(self.shared(h3 + h1))


def _dead_fraction(y: torch.Tensor) -> float:
    return float((y.detach().amax(dim=0) <= 0).float().mean())


def test_untapped_relus_give_the_dead_units_their_own_outputs_show(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    # the test's own record of every ReLU output, by the row tbdiag attributes it to
    expected: dict[str, list[float]] = {"fc1": [], "fc2": [], "fc3": [], "shared": []}
    shared_calls = []
    model.act1.register_forward_hook(lambda m, a, y: expected["fc1"].append(_dead_fraction(y)))
    model.act2.register_forward_hook(lambda m, a, y: expected["fc2"].append(_dead_fraction(y)))

    def shared_hook(m, a, y):
        shared_calls.append(1)
        expected["fc3" if len(shared_calls) % 2 else "shared"].append(_dead_fraction(y))

    model.shared.register_forward_hook(shared_hook)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=1, log_graph=False, histograms_every=1)  # (a trace would run the hooks above)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    by_name = {layer.name: layer for layer in handle.layers}
    assert by_name["act1"].untapped and by_name["act2"].untapped, "ReLU modules after a layer: no tap of their own"
    assert by_name["fc1"].relu_after and by_name["fc2"].relu_after
    assert not by_name["shared"].untapped, "a ReLU that also takes a sum keeps its tap"
    writer.close()

    (run,) = load_logdir(str(tmp_path))
    assert run.steps.tolist() == list(range(12))
    dead = run.column("dead_frac")
    for name, fractions in expected.items():
        got = dead[:, run.layer_names.index(name)]
        np.testing.assert_array_equal(got, np.array(fractions, dtype=np.float32), err_msg=name)
    assert dead[-1, run.layer_names.index("fc2")] >= 5 / 16  # the units that never fire are seen as dead


class Mixed(nn.Module):
    """Small outputs of several shapes (measured in batches at the end of the forward once the taps have
    learned the model): convolution maps, same-width linear layers, a sampled wide layer, and a layer whose
    output an in-place ReLU rewrites after its hook."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv_act = nn.Conv2d(1, 4, 3), nn.ReLU()
        self.fc1, self.act1 = nn.Linear(64, 32), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(32, 32), nn.ReLU()
        self.fc3, self.act3 = nn.Linear(32, 32), nn.ReLU(inplace=True)
        self.wide, self.act_wide = nn.Linear(32, 96), nn.ReLU()  # 64 x 96 = 6144 elements: a sampled histogram
        self.head = nn.Linear(96, 3)

    def forward(self, x):
        h = self.conv_act(self.conv(x)).flatten(1)
        h = self.act2(self.fc2(self.act1(self.fc1(h))))
        h = self.act3(self.fc3(h))
        return self.head(self.act_wide(self.wide(h)))


def _train_mixed(tmp_path, steps: int, expected: dict | None = None, rewrite_at: int | None = None):
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    measured = ("conv", "fc1", "fc2", "fc3", "wide", "head")
    for name in measured if expected is not None else ():
        def record(m, a, y, name=name):
            y = y.detach().double()
            units = y.amax(dim=[d for d in range(y.dim()) if d != (1 if y.dim() == 4 else y.dim() - 1)])
            expected.setdefault(name, []).append(
                (float(y.mean()), float(y.std(correction=0)), float((units <= 0).double().mean()),
                 float(y.min()), float(y.max()), y.numel()))
        getattr(model, name).register_forward_hook(record, prepend=True)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=1, log_graph=False, histograms_every=1)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
        if rewrite_at == step:  # at this step only, an in-place op rewrites fc2's output after its hook
            handle_fc2 = model.act2.register_forward_pre_hook(lambda m, a: a[0].mul_(1.0))
        loss = F.cross_entropy(model(x), y)
        if rewrite_at == step:
            handle_fc2.remove()
        opt.zero_grad()
        loss.backward()
        opt.step()
    writer.close()
    return handle, load_logdir(str(tmp_path))[0]


def test_outputs_measured_in_batches_give_what_each_output_shows(tmp_path):
    expected: dict[str, list] = {}
    handle, run = _train_mixed(tmp_path, 8, expected)
    by_name = {layer.name: layer for layer in handle.layers}
    assert by_name["fc3"].output_changes, "the in-place ReLU after fc3 was seen: fc3 is measured in its hook"
    assert not any(by_name[n].output_changes for n in ("conv", "fc1", "fc2", "wide", "head"))
    mean, std, dead = run.column("act_mean"), run.column("act_std"), run.column("dead_frac")
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    for name, rows in expected.items():
        col = run.layer_names.index(name)
        want = np.array(rows)
        np.testing.assert_allclose(mean[:, col], want[:, 0], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(std[:, col], want[:, 1], rtol=1e-4, err_msg=name)
        if name != "head":  # (no ReLU follows the head)
            np.testing.assert_array_equal(dead[:, col], want[:, 2].astype(np.float32), err_msg=name)
        hists = acc.Histograms(f"activations/{name}")
        assert [h.step for h in hists] == list(range(8))
        for h, (*_, lo, hi, numel) in zip(hists, rows):
            if name == "wide":  # a fixed sample: inside the exact range
                assert lo <= h.histogram_value.min < h.histogram_value.max <= hi
            else:  # every element
                assert (h.histogram_value.min, h.histogram_value.max) == pytest.approx((lo, hi), rel=1e-6)
                assert sum(h.histogram_value.bucket) == numel


def test_an_output_rewritten_after_its_hook_is_not_measured_from_what_it_became(tmp_path):
    """A rewrite the learning forwards never saw: that step's row is left unmeasured, never measured wrong;
    the layer is measured in its hook from then on."""
    handle, run = _train_mixed(tmp_path, 6, rewrite_at=3)
    assert {layer.name: layer for layer in handle.layers}["fc2"].output_changes
    mean = run.column("act_mean")[:, run.layer_names.index("fc2")]
    assert np.isfinite(mean[[0, 1, 2, 4, 5]]).all() and np.isnan(mean[3])
