"""A logging step's device work: results of several devices gathered on one, indices and scalars made on the
device (never from Python numbers mid-step), pooling across ranks in a few batched ops.

A CPU-only machine has two devices to mix: the CPU and ``meta`` (shapes without values, the same code paths
as an accelerator's: ``device.type != "cpu"``).  A model whose second half lives on ``meta`` stands for a
model spread over several GPUs in one process (``device_map="auto"``, pipeline stages).  Tensors made from
Python data show up under a `TorchDispatchMode` as ``aten.lift_fresh`` on the CPU; on an accelerator they are
a host-to-device copy the host waits for.  The CUDA tests at the end check the same on real devices.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tbdiag import DiagnosticWriter
from tbdiag.measure import distributed, layers, stats
from tbdiag.measure.probe import ProbeOptions, StepProbe
from tbdiag.read.reader import load_logdir

META = torch.device("meta")
CPU = torch.device("cpu")
#: Ops that take indices, and where: their index tensors must already be on the device
_INDEXING = {torch.ops.aten.index.Tensor: 1, torch.ops.aten.index_select.default: 2,
             torch.ops.aten.index_put_.default: 1, torch.ops.aten.index_put.default: 1,
             torch.ops.aten.index_add_.default: 2, torch.ops.aten.index_add.default: 2,
             torch.ops.aten.scatter_reduce_.two: 2, torch.ops.aten.scatter_reduce.two: 2,
             torch.ops.aten.gather.default: 2}


class DeviceWork(TorchDispatchMode):
    """Records the tensors made from Python data, host-to-device copies, and every indexing op's indices."""

    def __init__(self):
        super().__init__()
        self.from_python: list[str] = []  # aten.lift_fresh: torch.tensor / new_tensor / as_tensor of Python data
        self.to_device: list[torch.device] = []  # aten._to_copy from the CPU to another device
        self.indices: list[tuple[torch.Tensor, torch.Tensor]] = []  # (indexed tensor, index tensor)
        self.computed: dict[int, torch.Tensor] = {}  # every op's outputs (kept: ids stay unique)

    def made_here(self, t: torch.Tensor) -> bool:
        """Whether an op under this mode computed ``t`` (a tensor made from a Python list on a device is not)."""
        return self.computed.get(id(t)) is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                self.computed[id(t)] = t
        if func is torch.ops.aten.lift_fresh.default:
            self.from_python.append(str(args[0].shape))
        elif func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and out.device.type != "cpu":
            self.to_device.append(out.device)
        elif func in _INDEXING:
            index = args[_INDEXING[func]]
            for i in index if isinstance(index, (list, tuple)) else [index]:
                if i is not None:
                    self.indices.append((args[0], i))
        return out


# ------------------------------------------------------------------ gathering on one device


def test_gather_moves_only_what_is_elsewhere():
    a, b = torch.ones(3), torch.ones(2, device=META)
    got = stats.gather([a, b], META)
    assert [t.device for t in got] == [META, META] and got[1] is b
    got = stats.gather([a, torch.zeros(1)], CPU)
    assert got[0] is a


def test_per_tensor_results_of_two_devices_are_stacked_on_one():
    """Norms, histogram samples, NaN/Inf counts of tensors on two devices: one result, on the given device
    (stacking them where they were computed fails: "Tensor on device meta is not on the expected device")."""
    cpu_big, cpu_small, meta_t = torch.randn(10_000), torch.randn(5), torch.randn(7, 3, device=META)
    with pytest.raises(RuntimeError):
        torch.stack(torch._foreach_norm([cpu_small, meta_t]))
    norms = stats.norms([cpu_small, meta_t, cpu_big], META)
    assert norms.device == META and norms.shape == (3,)
    flat, lengths, _, order = stats.histogram_samples([cpu_small, meta_t, cpu_big], META)
    assert flat.device == META and lengths == [stats.HISTOGRAM_SAMPLE, 5, 21] and order == [2, 0, 1]
    counts = stats.nonfinite_counts([meta_t, cpu_small])
    assert counts.device == META and counts.shape == (2,)


def test_to_host_concatenates_on_the_given_device(monkeypatch):
    """The device parts are gathered on the transfer's device before the one concatenation."""
    seen = []
    real_cat = torch.cat

    def cat(tensors, *args, **kwargs):
        seen.append({t.device for t in tensors})
        out = real_cat(tensors, *args, **kwargs)
        return torch.zeros(out.shape) if out.is_meta else out  # (meta has no values to copy to the host)

    monkeypatch.setattr(torch, "cat", cat)
    host = stats.to_host([torch.ones(2), torch.ones(3, device=META), np.zeros(1, np.float32),
                          torch.ones(2, 2, device=META)], META)
    assert seen == [{META}]
    assert [h.shape for h in host] == [(2,), (3,), (1,), (2, 2)]


class TwoDevices(nn.Module):
    """Two identical halves, the first on ``first``, the second on ``second``; in each, outputs of one shape
    from a Linear (parameters: moments and a histogram), a LayerNorm without parameters (moments) and a GELU
    on a residual sum that a ReLU follows (its dead units only): one batch of stacked outputs with rows of
    every kind, measured at the end of the forward."""

    def __init__(self, first: torch.device | str, second: torch.device | str, detach: bool = False):
        super().__init__()
        self.first, self.second, self.detach = torch.device(first), torch.device(second), detach
        self.a_fc, self.a_norm, self.a_gelu, self.a_relu = (nn.Linear(32, 32), nn.LayerNorm(32, elementwise_affine=False),
                                                            nn.GELU(), nn.ReLU())
        self.b_fc, self.b_norm, self.b_gelu, self.b_relu = (nn.Linear(32, 32), nn.LayerNorm(32, elementwise_affine=False),
                                                            nn.GELU(), nn.ReLU())
        self.head = nn.Linear(32, 3)
        self.a_fc.to(self.first)
        for m in (self.b_fc, self.head):
            m.to(self.second)

    def forward(self, x):
        h = self.a_norm(self.a_fc(x))
        h = self.a_relu(self.a_gelu(h + x))
        h = (h.detach() if self.detach else h).to(self.second)  # (no gradient flows back from the meta device)
        g = self.b_norm(self.b_fc(h))
        g = self.b_relu(self.b_gelu(g + h))
        return self.head(g)


def _batches(monkeypatch) -> list[set[tuple[str, str]]]:
    """Spy on the probe's batched measurement: per call, the (device, layer) pairs of the outputs it stacks."""
    batches = []
    real = StepProbe.flush_outputs

    def flush(self):
        batches.append({(out.device.type, layer.name) for layer, out, _, measured in self.held if not measured})
        return real(self)

    monkeypatch.setattr(StepProbe, "flush_outputs", flush)
    return batches


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_a_model_on_two_devices_is_measured_without_tripping_the_shield(tmp_path):
    """CPU and meta: per-tensor results of both devices are gathered on one before they are stacked (norms,
    histogram samples, layer outputs' samples); after the first logging step no tensor is made from Python
    data, and every index is a tensor on the indexed one's device, computed there or kept from the previous
    logging step (a tensor made from a Python list on the meta device dispatches nothing: it is neither)."""
    torch.manual_seed(0)
    model = TwoDevices(CPU, META, detach=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=1, log_graph=False, histograms_every=1)
    x, y = torch.randn(64, 32), torch.randint(0, 3, (64,), device=META)
    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            with DeviceWork() if step >= 2 else contextlib.nullcontext() as work:
                _step(model, opt, x, y)
            records.append(work)
    writer.close()
    assert handle.shield.fault is None, [str(w.message) for w in caught]
    meta_note = "tbdiag: meta tensors carry no values: no statistics are logged for them"
    assert {str(w.message) for w in caught} == {meta_note}
    for work in records[2:]:
        assert work.from_python == [], "tensors made from Python data during a logging step"
        assert all(index.device == indexed.device for indexed, index in work.indices)
    kept = [index for indexed, index in records[2].indices if indexed.is_meta and not records[2].made_here(index)]
    assert kept, "the device histograms index with their segment map, made once"
    for indexed, index in records[3].indices:
        assert records[3].made_here(index) or any(index is k for k in kept), "an index made from Python numbers"


def test_a_cpu_logging_step_makes_no_tensor_from_python_data(tmp_path, monkeypatch):
    """On the CPU: batches mixing rows with and without a histogram (a Linear, a LayerNorm without parameters, a
    GELU) take leading rows (views), not rows picked by a list (an index tensor made from Python numbers)."""
    torch.manual_seed(0)
    model = TwoDevices(CPU, CPU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _batches(monkeypatch)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=1, log_graph=False, histograms_every=1)
    x, y = torch.randn(64, 32), torch.randint(0, 3, (64,))
    for step in range(4):
        with DeviceWork() if step >= 2 else contextlib.nullcontext() as work:
            _step(model, opt, x, y)
        if work is not None:
            assert work.from_python == [] and work.to_device == []
    writer.close()
    assert handle.shield.fault is None
    by_name = {layer.name: layer for layer in handle.layers}
    assert by_name["a_gelu"].relu_after == by_name["b_gelu"].relu_after == "relu"
    for prefix in ("a_", "b_"):
        assert any({("cpu", prefix + n) for n in ("fc", "norm", "gelu")} <= batch for batch in batches[-3:])
    (run,) = load_logdir(str(tmp_path))
    for name in ("a_fc", "a_norm", "b_fc", "b_norm"):
        assert np.isfinite(run.column("act_mean")[:, run.layer_names.index(name)]).all(), name


def test_a_batch_on_a_device_takes_its_rows_by_slices():
    """The batched measurement's device path (meta): outputs of a Linear, of a parameter-free LayerNorm and of a
    GELU, stacked; no index tensor at all (the old list of row positions was one, made at every flush)."""
    net = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32, elementwise_affine=False), nn.GELU())
    table = layers.discover(net)
    fc, norm, gelu = table
    gelu.relu_after = "relu"
    outs = [torch.randn(64, 32, device=META) for _ in table]
    for step in range(2):
        probe = StepProbe(step, ProbeOptions())
        probe.batch = True
        with DeviceWork() as work:
            for layer, out in zip((gelu, norm, fc), outs):  # (the GELU first: the rows are put in order)
                probe.record_output(layer, (), out, describe=False)
            probe.flush_outputs()
            kinds = probe.flush_activations()
        assert work.indices == [] and work.from_python == []
        assert {kind for kind, _ in probe.layout} == {"act", "act_hist_src", "dead"}
        assert [key for kind, key in probe.layout if kind == "act_hist_src"] == [[fc.row]]
        assert sorted(key for kind, key in probe.layout if kind == "act") == [fc.row, norm.row]
        assert kinds == {gelu.row: "relu"}


# ------------------------------------------------------------------ pooling across ranks


def _rank_parts(layers: int, device: torch.device) -> tuple[list, list, list]:
    g = torch.Generator().manual_seed(0)
    parts, kinds, weights = [], [], []
    for i in range(layers):
        act = torch.stack([torch.randn((), generator=g), torch.rand((), generator=g), torch.tensor(float(i % 2))])
        parts += [act.to(device), (torch.rand(9, generator=g) > 0.5).to(device)]
        kinds += ["act", "dead"]
        weights += [float(64 * (i + 1)), None]
        if i % 4 == 0:
            parts.append(torch.rand(1, generator=g).to(device))
            kinds.append("frac")
            weights.append(float(32 * (i + 1)))
    for n in (2 * layers, 3):
        parts.append(torch.rand(n, generator=g).to(device))
        kinds.append("norm")
        weights.append([1.0 if k % 3 else 0.5 for k in range(n)])
    return parts, kinds, weights


@pytest.mark.parametrize("device", [CPU, META], ids=["cpu", "meta"])
def test_pooling_makes_no_scalar_from_python_numbers_per_layer(monkeypatch, device):
    """50 layers: the weights reach the device as one tensor made once and kept, not a scalar per layer
    (``new_tensor``/``as_tensor``: ~60 host-to-device copies per logging step under NCCL)."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(2))  # two ranks with the same numbers
    parts, kinds, weights = _rank_parts(50, device)
    distributed._device_weights.cache_clear()
    with DeviceWork() as first:
        distributed.reduce_parts(parts, kinds, weights, 2)
    with DeviceWork() as later:
        pooled = distributed.reduce_parts(parts, kinds, weights, 2)
    assert len(first.from_python) <= 1 and len(first.to_device) <= 1, "one tensor of weights, once"
    assert later.from_python == [] and later.to_device == [], "kept for the next logging steps"
    assert [p.shape for p in pooled] == [p.shape for p in parts]
    assert all(p.device == device for p in pooled)
    if device == CPU:  # two ranks with the same numbers: the same moments, fractions and dead units
        for part, kind, weight, value in zip(parts, kinds, weights, pooled):
            if kind == "dead":
                assert torch.equal(value, part)
            elif kind == "act":  # (NaN/Inf counts add up)
                torch.testing.assert_close(value, part * torch.tensor([1.0, 1.0, 2.0]), rtol=1e-6, atol=1e-7)
            elif kind == "frac":
                torch.testing.assert_close(value, part, rtol=1e-6, atol=1e-7)
            else:  # squared norms add up: a replica's counted 1/world each, a shard's in full
                torch.testing.assert_close(value, part * (2 * torch.tensor(weight)).sqrt(), rtol=1e-6, atol=1e-7)


def test_pooling_gathers_parts_of_two_devices(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: None)
    parts, kinds, weights = _rank_parts(4, CPU)
    parts[1] = parts[1].to(META)  # a dead-unit mask of a layer on another device
    pooled = distributed.reduce_parts(parts, kinds, weights, 1, META)
    assert all(p.device == META for p in pooled)


# ------------------------------------------------------------------ on CUDA


def _count_syncs(fn) -> int:
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("called a synchronizing" in str(w.message) for w in caught)


def _train(model: nn.Module, device_in, device_out, logdir: str, steps: int, log_every: int, step_hook=None):
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(logdir)
    handle = writer.watch(model, opt, log_every=log_every, log_graph=False)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(64, 32, generator=g).to(device_in), torch.randint(0, 3, (64,), generator=g).to(device_out))
            for _ in range(steps)]  # (on the devices before training: a copy from the host would be a sync)

    def step(i):
        x, y = data[i]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(steps):
        (step_hook or (lambda s, i: s(i)))(step, i)
    writer.close()
    return handle, load_logdir(logdir)[0]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_two_gpus_is_measured_like_the_same_model_on_one_device(tmp_path):
    """Half the model on cuda:0, half on cuda:1: the statistics are logged (and are those of the same model
    trained on the CPU), and the shield never trips."""
    torch.manual_seed(0)
    split = TwoDevices("cuda:0", "cuda:1")
    torch.manual_seed(0)
    reference = TwoDevices(CPU, CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle, run = _train(split, "cuda:0", "cuda:1", str(tmp_path / "split"), 7, 3)
    assert handle.shield.fault is None, [str(w.message) for w in caught]
    assert not [w for w in caught if "tbdiag" in str(w.message)], [str(w.message) for w in caught]
    _, ref = _train(reference, CPU, CPU, str(tmp_path / "cpu"), 7, 3)
    assert list(run.steps) == list(ref.steps) == [0, 3, 6] and run.layer_names == ref.layer_names
    for col in ("act_mean", "act_std", "weight_norm", "grad_norm", "update_ratio"):
        values = run.column(col)
        measured = ~np.isnan(ref.column(col))
        assert measured.any() and np.isfinite(values[measured]).all(), col
        np.testing.assert_allclose(values, ref.column(col), rtol=2e-3, atol=1e-5, err_msg=col)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_mixing_rows_with_and_without_histograms_add_no_sync_on_cuda(tmp_path):
    """A Linear, a parameter-free LayerNorm and a GELU of one shape, on one GPU: a logging step synchronises
    once (its host transfer), not again mid-forward to copy a list of row positions to the device."""
    counts = []

    def hook(step, i):
        if i in (6, 9):  # logging steps after the first ones (table written, taps learned)
            torch.cuda.synchronize()
            counts.append(_count_syncs(lambda: step(i)))
        else:
            step(i)

    handle, run = _train(TwoDevices("cuda", "cuda"), "cuda", "cuda", str(tmp_path), 10, 3, hook)
    assert handle.shield.fault is None
    assert counts == [1, 1]
    assert np.isfinite(run.column("act_mean")[:, run.layer_names.index("b_norm")]).all()
