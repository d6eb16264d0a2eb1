"""The NaN sentinel: NaN/Inf placed at the exact step and layer whatever ``log_every``.

Real training runs write real event files, read back by `tbdiag.report`.
NaN is born after layer ``b`` at step 23: in its forward output (a forward
hook of the test's model turns it to NaN), or in its backward (a custom
autograd function returns a NaN gradient).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbdiag
from tbdiag import DiagnosticWriter
from tbdiag.watch import sentinel

BAD_STEP = 23


class NanGrad(torch.autograd.Function):
    """Identity forward; at the bad step its backward returns NaN (the gradient is born sick)."""

    @staticmethod
    def forward(ctx, x, sick):
        ctx.sick = sick
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad * float("nan") if ctx.sick else grad), None


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0, bn: bool = False):
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.norm = nn.BatchNorm1d(32) if bn else nn.Identity()
        self.b = nn.Linear(32, 32)
        self.drop = nn.Dropout(dropout)
        self.c = nn.Linear(32, 4)
        self.sick_backward = False

    def forward(self, x):
        h = self.b(torch.relu(self.norm(self.a(x))))
        h = NanGrad.apply(h, self.sick_backward)
        return self.c(self.drop(torch.relu(h)))


def data(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(steps)]


def train(logdir, *, watch=True, log_every=10, steps=40, sick=None, stop_on=(), optimizer=True, model_kw=None,
          on_finding=None, compile=False):
    """Train ``Net``; ``sick`` is "forward" or "backward" (NaN born after layer b at BAD_STEP) or None."""
    torch.manual_seed(0)
    model = Net(**(model_kw or {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state = {"step": 0}
    if sick == "forward":
        model.b.register_forward_hook(lambda m, i, out: out + float("nan") if state["step"] == BAD_STEP else None)
    writer = DiagnosticWriter(str(logdir)) if watch else None
    if watch:
        writer.watch(model, opt if optimizer else None, log_every=log_every, stop_on=stop_on, on_finding=on_finding)
    run = torch.compile(model, backend="eager") if compile else model
    try:
        for step, (x, y) in enumerate(data(steps)):
            state["step"] = step
            model.sick_backward = sick == "backward" and step == BAD_STEP
            loss = F.cross_entropy(run(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if watch:
                writer.add_scalar("train/loss", loss.item(), step)
    finally:
        if watch:
            writer.close()
    return model


def nonfinite(logdir):
    return [f for f in tbdiag.report(str(logdir)) if f.issue == "nonfinite"]


@pytest.mark.parametrize("log_every", [10, 100])
def test_nan_born_in_forward_is_placed_at_its_step_and_layer(tmp_path, log_every):
    with pytest.warns(RuntimeWarning, match=r"step 23 in b \(forward\)"):
        train(tmp_path, sick="forward", log_every=log_every)
    (f,) = nonfinite(tmp_path)
    assert (f.layer, f.first_step, f.severity) == ("b", BAD_STEP, "error")
    assert f.message.startswith("b: first NaN/Inf at step 23, in its output (forward)"), f.message
    assert f.ongoing


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer", "no_optimizer"])
def test_nan_born_in_backward_is_placed_at_its_step_in_backward_order(tmp_path, optimizer):
    with pytest.warns(RuntimeWarning, match="NaN/Inf first appeared at step 23 in b"):
        train(tmp_path, sick="backward", optimizer=optimizer)
    (f,) = nonfinite(tmp_path)
    # NaN gradients flow from b back to a; b is the first layer in backward order that holds them
    assert (f.layer, f.first_step) == ("b", BAD_STEP)
    assert "in its gradients (backward)" in f.message, f.message


def test_nan_in_the_input_is_reported_as_such(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step, (x, y) in enumerate(data(30)):
            if step == 17:
                x[2, 3] = float("nan")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    (f,) = nonfinite(tmp_path)
    assert (f.layer, f.first_step) == ("a", 17)
    assert "in the model's input" in f.message


def test_healthy_run_is_silent_and_bit_identical(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        watched = train(tmp_path, log_every=10, model_kw={"dropout": 0.3, "bn": True})
    plain = train(None, watch=False, model_kw={"dropout": 0.3, "bn": True})
    assert nonfinite(tmp_path) == []
    for (name, p), q in zip(watched.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), name


def test_the_replay_leaves_training_untouched(tmp_path):
    """The one replay (dropout, BatchNorm) restores the random state and the buffers: same run as unwatched."""
    kw = {"dropout": 0.3, "bn": True}
    with pytest.warns(RuntimeWarning, match=r"step 23 in b \(forward\)"):
        watched = train(tmp_path, sick="forward", model_kw=kw, steps=BAD_STEP + 1)
    after_watched = torch.rand(3)
    plain = train(None, watch=False, sick="forward", model_kw=kw, steps=BAD_STEP + 1)
    after_plain = torch.rand(3)
    assert torch.equal(after_watched, after_plain), "the replay consumed random numbers"
    for (name, p), q in zip(watched.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q) or torch.allclose(p, q, equal_nan=True) and p.isnan().equal(q.isnan()), name
    (f,) = nonfinite(tmp_path)
    assert (f.layer, f.first_step) == ("b", BAD_STEP)


def test_works_under_torch_compile(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"step 23 in b"):
        train(tmp_path, sick="forward", compile=True, steps=26)
    (f,) = nonfinite(tmp_path)
    assert (f.layer, f.first_step) == ("b", BAD_STEP)


def test_old_runs_without_the_sentinel_fall_back_to_the_logged_counts(tmp_path):
    """A run without the sentinel's statistics (an older writer): placed at the first logged step holding NaN."""
    from tbdiag.read import reader
    from tbdiag.rules import evaluator

    with pytest.warns(RuntimeWarning):
        train(tmp_path, sick="forward", log_every=10)
    (run,) = reader.load_logdir(str(tmp_path))
    run.model = {k: v for k, v in run.model.items() if not k.startswith("nonfinite")}
    (f,) = [f for f in evaluator.evaluate(run) if f.issue == "nonfinite"]
    assert f.first_step == BAD_STEP  # the step the sentinel found it at is logged, with its counts
    assert "first NaN/Inf at step 23" in f.message


def test_huge_but_finite_outputs_are_not_called_nan(tmp_path):
    """The per-step check sums the output; a sum that overflows while every element is finite must be told
    apart by the exact check, not reported as NaN/Inf."""

    class Huge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x):
            return self.fc(x) * 0 + 3e38  # every element finite; their float32 sum is +Inf

    torch.manual_seed(0)
    model = Huge()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=5, histograms=False, log_graph=False)
    x = torch.randn(16, 4)
    assert not torch.isfinite(model(x).sum()) and torch.isfinite(model(x)).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            loss = (model(x) / 1e38).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        writer.close()
    assert not [w for w in caught if "NaN/Inf" in str(w.message)]
    assert [f for f in tbdiag.report(str(tmp_path)) if f.issue == "nonfinite"] == []


class Gate(nn.Module):
    """A layer that turns its output to Inf when the dropout mask of its input's first row is ``pattern``."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(32))
        self.pattern: torch.Tensor | None = None

    def forward(self, h):
        out = h * self.scale
        if self.pattern is not None and torch.equal(h[0] == 0, self.pattern):
            out = out + float("inf")
        return out


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop, self.gate, self.head = nn.Linear(8, 32), nn.Dropout(0.5), Gate(), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.gate(self.drop(torch.relu(self.lin(x)) + 1.0)))  # zeros only where dropped


def _dropnet_run(logdir, pattern=None):
    """Train `DropNet` up to BAD_STEP; returns the dropout mask of the first row at BAD_STEP."""
    torch.manual_seed(0)
    model = DropNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = {}
    model.gate.register_forward_pre_hook(lambda m, args: seen.__setitem__("mask", args[0][0] == 0))
    writer = DiagnosticWriter(str(logdir)) if logdir is not None else None
    if writer is not None:
        writer.watch(model, opt, log_every=10, log_graph=False)
    for step, (x, y) in enumerate(data(BAD_STEP + 1)):
        model.gate.pattern = pattern if step == BAD_STEP else None
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if writer is not None:
        writer.close()
    return seen["mask"]


def test_the_replay_draws_the_same_dropout_mask(tmp_path):
    """A forward that draws random numbers is replayed with its own random state: Inf that only this step's
    dropout mask produces (one pattern of 32 units: another draw matches it with odds of 2**-32) is placed
    at its layer.  The sentinel keeps the random state only for such forwards, so this is the path that
    copies it."""
    mask = _dropnet_run(None)  # unwatched: the mask the watched run's step draws too (watching draws nothing)
    assert 0 < int(mask.sum()) < 32
    with pytest.warns(RuntimeWarning, match=rf"step {BAD_STEP} in gate \(forward\)"):
        again = _dropnet_run(tmp_path, pattern=mask)
    assert torch.equal(again, mask)
    (f,) = nonfinite(tmp_path)
    assert (f.layer, f.first_step) == ("gate", BAD_STEP)


# ------------------------------------------------------------------ the per-step check's cost and exactness


@pytest.fixture
def like_an_accelerator(monkeypatch):
    """The sentinel as on an accelerator: its check stays on the device until the next logging step."""
    monkeypatch.setattr(sentinel, "READ_FREE", frozenset())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "sum_first"])
def test_the_check_is_exact(dtype, exact):
    """NaN, +Inf or -Inf anywhere (first, middle, last, in a strided view) is seen; huge finite values are not
    taken for Inf, even where every float32 sum of them overflows."""
    big = torch.finfo(dtype).max
    for n in (1, 7, 1000, 100_003):
        healthy = torch.full((n,), big / 2, dtype=dtype)
        healthy[::2] = -big
        assert sentinel._all_finite([healthy, healthy[::3]])
        for bad in (math.nan, math.inf, -math.inf):
            for at in {0, n // 2, n - 1}:
                x = torch.randn(n).to(dtype)
                x[at] = bad
                assert not sentinel._all_finite([healthy, x]), (n, bad, at)
                # dense, overlapping (expanded), transposed and strided views, each holding x[at]
                for view in (x, x.view(1, -1).expand(3, -1).t(), torch.stack([x, x], 1).t(), x[at % 2::2]):
                    assert float(sentinel._flag([view], exact)) != 0.0, (n, bad, at, view.stride())
                    assert not sentinel._all_finite([view])


def test_outputs_it_cannot_reduce_are_left_out():
    """float8 (no reductions in torch), empty and integer outputs: not checked, never a fault."""
    out = (torch.zeros(3).to(torch.float8_e4m3fn), torch.empty(0), torch.ones(2, dtype=torch.int64), torch.ones(2))
    assert [t.shape for t in sentinel._floats(out)] == [torch.Size([2])]


def _big_outputs(dtype):
    """Outputs of 2**20 elements (4 MiB in float32): contiguous, transposed (dense), a strided view (not dense);
    and a small one."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1 << 20, generator=g).to(dtype), torch.randn(1024, 1024, generator=g).to(dtype).t(),
            torch.randn(1024, 2048, generator=g).to(dtype)[:, ::2], torch.randn(10, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["read", "device"])
def test_the_check_reads_each_output_once_and_allocates_no_full_size_temporary(monkeypatch, dtype, mode):
    """One reduction per output tensor (two, amin and amax, for a strided view where the exact check runs), and
    no allocation beyond a few scalars: the profiler sees every CPU allocation, those inside a kernel too (a
    float32 copy for a float32 sum of a float16 tensor, or ``aminmax``'s contiguous copy, would show)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    if mode == "device":
        monkeypatch.setattr(sentinel, "READ_FREE", frozenset())
    outputs = _big_outputs(dtype)
    s = sentinel.Sentinel(list, None, read_always=False)
    s.forward_ends(0, None, outputs)

    class FullSizeReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and any(isinstance(a, torch.Tensor) and a.numel() >= 1 << 16 for a in args):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with FullSizeReads() as mode_ops:
        s.forward_ends(1, None, outputs)
    exact = mode == "device" or dtype == torch.float16
    assert len(mode_ops.ops) == (4 if exact else 3), mode_ops.ops

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s.forward_ends(2, None, outputs)
    largest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)
    assert largest <= 256, f"{largest} bytes allocated by one op"
    assert s.found is None and (s._first is None or int(s._first) == sentinel._NO_STEP)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 3e38), (torch.bfloat16, 3e38), (torch.float16, 6e4)],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu_mode", "accelerator_mode"])
def test_huge_but_finite_outputs_of_any_dtype_are_not_called_nan(tmp_path, monkeypatch, dtype, big, accelerator):
    """Every element finite, every sum of them Inf (float16: already past 65,504): never reported as NaN/Inf."""
    if accelerator:
        monkeypatch.setattr(sentinel, "READ_FREE", frozenset())

    class Huge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)

        def forward(self, x):
            return (self.fc(x) * 0 + big).to(dtype)

    torch.manual_seed(0)
    model = Huge()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=5, histograms=False, log_graph=False)
    x = torch.randn(16, 4)
    assert not torch.isfinite(model(x).sum()) and torch.isfinite(model(x)).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            loss = (model(x).float() / big).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert handle.shield.fault is None
        writer.close()
    assert not [w for w in caught if "NaN/Inf" in str(w.message)]
    assert [f for f in tbdiag.report(str(tmp_path)) if f.issue == "nonfinite"] == []


def test_nonfinite_counts_are_exact_and_read_in_one_transfer():
    """Weights and gradients whose norms are NaN/Inf: their exact NaN/Inf counts, both kinds in one read."""
    from host_reads import HostReads

    from tbdiag.measure.probe import count_nonfinite

    params = [torch.ones(4, requires_grad=True), torch.ones(3, requires_grad=True), torch.ones(5, requires_grad=True)]
    with torch.no_grad():
        params[0][1:3] = math.nan
        params[2][0] = -math.inf
    for p in params:
        p.grad = torch.zeros_like(p)
    params[1].grad[:] = math.inf
    items = [(("w_norm", None), np.array([math.nan, 2.0, math.inf], dtype=np.float32)),
             (("g_norm", [0, 1, 2]), np.array([0.0, math.inf, 0.0], dtype=np.float32))]
    with HostReads(*params, *[p.grad for p in params]) as reads:
        counts = count_nonfinite(items, params)
    assert counts == {("w_norm", 0): 2.0, ("w_norm", 2): 1.0, ("g_norm", 1): 3.0}
    assert [r.what for r in reads.reads] == ["Tensor.cpu"], reads.reads
    assert count_nonfinite([(("w_norm", None), np.array([1.0, 2.0, 3.0], dtype=np.float32))], params) == {}
