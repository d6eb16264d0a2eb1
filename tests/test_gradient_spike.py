"""gradient_spike: a jump of the gradient norm at any step (not only logging steps), with the layers that carried it.

The tracker (`tbdiag.measure.gradient_spikes`) is tested as a pure device-state
function; the rule (`tbdiag.rules.spikes`) on real training: one bad batch
between logging steps is named at its exact step, with clipping too (the norm
is taken before it), without an optimizer, and on the layer it hit; the same
runs without the bad batch stay silent.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

import tbdiag
from tbdiag import DiagnosticWriter
from tbdiag.measure.gradient_spikes import SpikeTracker, robust_jump
from tbdiag.measure.probe import ProbeOptions, StepProbe
from tbdiag.rules.spikes import carriers, logged_loss_ratio, loss_fell_across, start_level

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_AT = 57  # not a logging step (log_every=10)


# ------------------------------------------------------------------ pure pieces


def test_robust_jump_is_median_and_mad():
    history = torch.tensor([1.0, 1.1, 0.9, 1.0, float("nan"), 1.05, 0.95])
    z, ratio = robust_jump(history, torch.tensor(3.0))
    med = 1.0
    mad = float(np.median(np.abs(np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95]) - med)))
    assert float(ratio) == pytest.approx(3.0)
    assert float(z) == pytest.approx((3.0 - med) / (1.4826 * mad), rel=1e-4)


def test_a_flat_history_does_not_make_every_wobble_infinite():
    """A clipped run sits at the clip value (MAD 0): the spread floor keeps a 0.5% wobble under 1 unit."""
    z, _ = robust_jump(torch.ones(64), torch.tensor(1.005))
    assert 0 < float(z) < 1


def _tracker_window(values, min_history=4):
    tracker = SpikeTracker(ring=16, min_history=min_history)
    for step, v in enumerate(values):
        norms = torch.tensor([v * 0.6, v * 0.8])  # two parameters, global norm v
        tracker.observe(step, norms, [0, 1], 2, loss=torch.tensor(2.0 + (step == 9)))
    probe = StepProbe(len(values) - 1, ProbeOptions())
    tracker.add_to(probe, [0, 1])
    items = {(kind, str(key)): t for (kind, key), t in zip(probe.layout, probe.parts)}
    return probe, items


def test_the_tracker_keeps_the_steepest_jump_of_the_window_and_its_norms():
    values = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 4.0, 1.0, 20.0, 1.1, 1.0]
    probe, items = _tracker_window(values)
    assert float(items[("model", "grad_spike_step")]) + probe.model_offsets["grad_spike_step"] == 9
    assert float(items[("model", "grad_spike_ratio")]) == pytest.approx(20.0, rel=0.05)
    assert float(items[("model", "grad_spike_loss_ratio")]) == pytest.approx(1.5)
    assert items[("spike_g_norm", "[0, 1]")].tolist() == pytest.approx([12.0, 16.0])
    # each parameter's usual norm before the spike: the median of the same measure over the ring before step 9
    before = sorted(values[:9])
    assert items[("spike_g_typical", "[0, 1]")].tolist() == pytest.approx([0.6 * before[4], 0.8 * before[4]])


def test_the_usual_norm_spans_windows_and_counts_a_missing_gradient_as_zero():
    """The ring of per-parameter norms runs across judged windows (of 4 steps here); a step where a parameter had no
    gradient counts 0 for it."""
    tracker = SpikeTracker(ring=8, min_history=2, window=4)
    for step in range(11):
        if step == 3:
            tracker.observe(step, torch.tensor([2.0]), [1], 2)
        else:
            tracker.observe(step, torch.tensor([1.0, 2.0]) * (10.0 if step == 10 else 1.0), [0, 1], 2)
    probe = StepProbe(10, ProbeOptions())
    tracker.add_to(probe, [0, 1])
    items = {(kind, str(key)): t for (kind, key), t in zip(probe.layout, probe.parts)}
    assert float(items[("model", "grad_spike_step")]) + probe.model_offsets["grad_spike_step"] == 10
    assert items[("spike_g_typical", "[0, 1]")].tolist() == pytest.approx([1.0, 2.0])  # steps 2..9: one 0 of 8
    assert items[("spike_g_norm", "[0, 1]")].tolist() == pytest.approx([10.0, 20.0])


def test_the_first_steps_are_not_judged():
    """Before `min_history` steps nothing is kept: the initial transient has no history to jump from."""
    _, items = _tracker_window([5.0, 1.0, 1.0], min_history=4)
    assert items == {}


def test_carriers_are_the_layers_whose_squared_norm_grew_most():
    spike = np.array([1.0, 20.0, 2.0, 15.0])
    typical = np.array([1.0, 1.0, 1.0, np.nan])
    rows = carriers(spike, typical)
    assert [r for r, _ in rows] == [1, 3]  # 399 + 225 of 627: 80% covered after two, not after one
    assert rows[0][1] == pytest.approx(20.0) and math.isinf(rows[1][1])
    assert [r for r, _ in carriers(np.array([1.0, 30.0, 2.0, 10.0]), typical)] == [1]  # 899 of 1002: one is enough


def test_the_logged_loss_tells_damage_from_a_plateau_escape():
    steps = np.arange(20)
    damage = (steps, np.where(steps == 12, 6.0, 2.0))
    escape = (steps, np.where(steps < 12, 2.0, 0.5))  # a plateau left: a quarter of the loss
    assert logged_loss_ratio([damage], 12) == pytest.approx(3.0)
    assert math.isnan(logged_loss_ratio([damage], 25))
    assert loss_fell_across([escape], 12) and not loss_fell_across([damage], 12)
    assert start_level([damage]) == 2.0 and math.isnan(start_level([]))


# ------------------------------------------------------------------ real training


class Net(nn.Module):
    """An MLP, plus a linear ``side`` read of the raw input added to its logits."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, width), nn.Linear(width, width), nn.Linear(width, 5)
        self.side = nn.Linear(20, 5)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))) + self.side(x)


def train(logdir: str, bad: str | None = None, clip: float | None = None, optimizer: bool = True,
          log_loss_every: int = 1, steps: int = 100, width: int = 64, spikes: bool = True) -> list:
    """A small classifier (Adam); ``bad``: at step `BAD_AT` the batch's inputs are x100 (``"inputs"``), or only
    the ``side`` layer's input is (``"side"``); the twin has no bad batch.  ``width`` 256 makes gradients large
    enough to be read on a sample at every step (`tbdiag.measure.sampled_norms`)."""
    torch.manual_seed(0)
    model = Net(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt if optimizer else None, log_every=10, gradient_spikes=spikes)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(2000, 20, generator=g)
    y_all = x_all[:, :5].argmax(1)
    hit = {}
    model.side.register_forward_pre_hook(lambda m, args: (args[0] * 100,) if hit.get("side") else None)
    for step in range(steps):
        i = torch.randint(0, 2000, (32,), generator=g)
        x, y = x_all[i], y_all[i]
        if step == BAD_AT and bad == "inputs":
            x = x * 100
        hit["side"] = step == BAD_AT and bad == "side"
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if step % log_loss_every == 0:
            writer.add_scalar("train/loss", loss.item(), step)
    writer.close()
    return [f for f in tbdiag.report(logdir) if f.issue == "gradient_spike"]


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no_clip", "clip_1"])
def test_a_bad_batch_between_logging_steps_is_named_at_its_step(tmp_path, clip):
    (f,) = train(str(tmp_path / "sick"), bad="inputs", clip=clip)
    assert (f.first_step, f.last_step, f.severity) == (BAD_AT, BAD_AT, "warning")
    assert f.value > 20 and f"step {BAD_AT}" in f.message
    assert f.layer in ("fc1", "fc2", "fc3", "side")
    assert train(str(tmp_path / "twin"), clip=clip) == []


def test_gradients_read_on_a_sample_still_name_the_bad_batch(tmp_path):
    """At width 256 the hidden layer's gradient (65,536 elements) is read on its 4,096-element sample at every
    step: the bad batch is still named at its step, and the twin stays silent."""
    (f,) = train(str(tmp_path / "sick"), bad="inputs", width=256)
    assert (f.first_step, f.last_step) == (BAD_AT, BAD_AT) and f.value > 20
    assert train(str(tmp_path / "twin"), width=256) == []


def test_without_the_per_step_tracker_nothing_is_read_between_logging_steps(tmp_path):
    """``gradient_spikes=False``: no spike statistics and no finding (the bad batch is not seen); the health
    statistics of the logging steps are there."""
    from tbdiag.read.reader import load_logdir

    assert train(str(tmp_path / "off"), bad="inputs", spikes=False) == []
    (run,) = load_logdir(str(tmp_path / "off"))
    assert run.steps.size == 10 and np.isfinite(run.column("grad_norm")).any()  # the rest is logged
    assert not np.isfinite(run.column("spike_grad_norm")).any()
    assert run.model_series("grad_spike_z")[0].size == 0


def test_the_layer_that_carried_it_is_named(tmp_path):
    """Only the side layer's input is x100 at that step: its weight gradient carries the jump (the logits'
    gradient is bounded by the softmax, so the other layers' barely move)."""
    (f,) = train(str(tmp_path / "sick"), bad="side")
    assert f.first_step == BAD_AT and f.layer == "side", f.message
    assert "carried by side (x" in f.message and "fc1" not in f.message


def test_without_an_optimizer_a_step_is_a_backward(tmp_path):
    (f,) = train(str(tmp_path / "sick"), bad="inputs", optimizer=False)
    assert f.first_step == BAD_AT
    assert train(str(tmp_path / "twin"), optimizer=False) == []


def test_with_the_loss_logged_only_at_logging_steps_the_size_decides(tmp_path):
    """No loss at the spike step: a jump of at least 10x the median, with a loss that did not fall across it."""
    (f,) = train(str(tmp_path / "sick"), bad="inputs", log_loss_every=10)
    assert f.first_step == BAD_AT
    assert train(str(tmp_path / "twin"), log_loss_every=10) == []


def test_a_hugging_face_output_carries_the_loss_at_the_spike(tmp_path):
    """A tiny GPT-2 (its output has .loss): one batch between logging steps whose labels are shifted by half the
    vocabulary (a misaligned shard): the loss there is 3x, the gradient norm ~5x its median."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=10)
    g = torch.Generator().manual_seed(0)
    start, stride = torch.randint(0, 32, (512, 1), generator=g), torch.randint(1, 4, (512, 1), generator=g)
    data = (start + stride * torch.arange(16)) % 32
    for step in range(80):
        ids = data[torch.randint(0, 512, (16,), generator=g)]
        labels = (ids + 16) % 32 if step == BAD_AT else ids
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()  # (no loss scalar: the model's own output carries it)
    writer.close()
    (f,) = [f for f in tbdiag.report(str(tmp_path)) if f.issue == "gradient_spike"]
    assert f.first_step == BAD_AT, f.message
    assert "the loss at that step was" in f.message


def test_the_tracker_makes_no_tensor_from_python_data():
    """On an accelerator a tensor made from Python data is a host-to-device copy at every step: none, whether the
    output carries a loss or not, and in the logging step's hand-over; a step where some parameters have no
    gradient places the norms with an index made once per set of positions (when its rows are judged)."""
    from test_device_side import DeviceWork

    tracker = SpikeTracker(ring=8, min_history=2)
    norms, loss = torch.rand(3), torch.tensor(2.0)
    made = []
    for step in range(8):
        partial = step in (4, 6)
        with DeviceWork() as work:
            tracker.observe(step, norms[:2] if partial else norms, [0, 2] if partial else [0, 1, 2], 3,
                            loss if step % 2 else None)
        assert work.to_device == [], step
        made += work.from_python
    assert made == ["torch.Size([2])"]
    with DeviceWork() as work:
        tracker.add_to(StepProbe(6, ProbeOptions()), [0, 1, 2])
    assert work.from_python == []


@pytest.mark.parametrize("where", ["observe", "norms_at_backward"])
def test_a_fault_in_the_tracker_never_reaches_the_training(tmp_path, monkeypatch, where):
    """A fault in the per-step tracker (in the optimizer's hook, or in the autograd callback at the end of the
    backward) detaches tbdiag with one warning; the training goes on, bit-identical to an unwatched twin."""
    from tbdiag.measure import gradient_spikes
    from tbdiag.watch import spike_watch

    def broken(*args, **kwargs):
        raise RuntimeError("fault injected by the test")

    if where == "observe":
        monkeypatch.setattr(gradient_spikes.SpikeTracker, "observe", broken)
    else:
        monkeypatch.setattr(spike_watch.SpikeWatch, "_norms", broken)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    finals = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        writer = DiagnosticWriter(str(tmp_path / str(watched))) if watched else None
        if writer is not None:
            writer.watch(model, opt, log_every=10)
        with pytest.warns(RuntimeWarning, match="tbdiag stopped watching") if watched else contextlib.nullcontext():
            for _ in range(5):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        if writer is not None:
            writer.close()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))



def test_a_torch_autograd_grad_call_reads_no_gradients(tmp_path, monkeypatch):
    """``torch.autograd.grad`` writes no ``.grad``: the ``.grad`` there are another backward's (another thread's,
    being written or freed meanwhile), so the end of such a backward reads none; a ``.backward()`` does."""
    from tbdiag.watch import spike_watch

    reads = []
    real = spike_watch.SpikeWatch._norms
    monkeypatch.setattr(spike_watch.SpikeWatch, "_norms", lambda self: reads.append(1) or real(self))
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=10)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert reads == []
    nn.functional.cross_entropy(model(x), y).backward()
    assert reads == [1]
    writer.close()
