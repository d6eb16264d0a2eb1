"""On a CPU: what tbdiag would synchronise on an accelerator, counted as host reads of device values.

``tests/test_cuda_sync.py`` counts real device syncs, and only where a GPU is
present.  These tests run the same loops and the same budget
(`sync_budget`) on a CPU, with `host_reads.HostReads` counting every host
read of a device value made inside tbdiag, and the NaN sentinel in the mode
it takes on an accelerator (``sentinel.READ_FREE`` emptied: nothing is read
between logging steps).  A test adds a sync to a hook on purpose and checks
that the count catches it.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from host_reads import TBDIAG_DIR, HostReads, profiled_reads, report
from sync_budget import LOG_EVERY, MATRIX, MATRIX_IDS, TRACE_READS, build, check_steps, graph_trace

import tbdiag
from tbdiag import DiagnosticWriter
from tbdiag.measure import attention, graph, stats
from tbdiag.watch import sentinel, watcher


def cpu_branches(path: str, function: str) -> bool:
    """The statistics' CPU-only branches (`stats.*_cpu`), which read on the host by design."""
    return path == "measure/stats.py" and function.endswith("_cpu")


def counting(loop) -> HostReads:
    return HostReads(loop.batch, model=loop.model, transfers=[(stats, "to_host")], cpu_branches=cpu_branches,
                     outside_mode=[(graph, "graph_events")])


def counter(reads: HostReads):
    def count(fn, budget):
        mark = len(reads.reads)
        fn()
        return reads.count(mark), report(reads.reads[mark:])
    return count


@pytest.fixture
def like_an_accelerator(monkeypatch):
    """The sentinel as on an accelerator: its check stays on the device until the next logging step."""
    monkeypatch.setattr(sentinel, "READ_FREE", frozenset())


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the counter itself


def _in_tbdiag(source: str, **names):
    """Run ``source`` as if it were code of tbdiag (its frames' file is below tbdiag/)."""
    code = compile(source, TBDIAG_DIR + "watch/_host_reads_probe.py", "exec")
    exec(code, dict(names))


READS = {
    "item": "x.sum().item()",
    "float": "float(x[0])",
    "int": "int(x[1])",
    "bool": "bool(x[0] > 0)",
    "format": "f'{x[0]:.2f}'",
    "tolist": "x.tolist()",
    "cpu": "x.cpu()",
    "to_cpu": "x.to('cpu')",
    "numpy": "x.numpy()",
    "asarray": "np.asarray(x)",
    "equal": "torch.equal(x, x + 0)",
    "nonzero": "x.nonzero()",
    "masked_select": "x.masked_select(x > 0)",
    "boolean_index": "x[x > 0]",
    "boolean_index_put": "x[x > 0] = 0.0",
}


@pytest.mark.parametrize("source", list(READS.values()), ids=list(READS))
def test_the_counter_counts_each_kind_of_host_read(source):
    x = torch.randn(8)
    with HostReads(x) as reads:
        _in_tbdiag(source, x=x, torch=torch, np=np)
    assert reads.count() == 1, report(reads.reads)


def test_the_counter_counts_only_tbdiags_reads_of_device_values():
    x = torch.randn(8)
    with HostReads(x) as reads:
        x.sum().item()  # the user's own read
        _in_tbdiag("y = x * 2; z = y.to(torch.float64); torch.stack([y, y])", x=x, torch=torch)  # no reads
        _in_tbdiag("float(torch.tensor(3.0)); torch.equal(torch.get_rng_state(), torch.get_rng_state())",
                   torch=torch)  # host values
        _in_tbdiag("float(torch.full((), 2.0, device='cpu'))", torch=torch)  # made on a device: counted
        _in_tbdiag("y = (x * 2).cpu(); y.numpy()", x=x)  # one copy to the host, then a host value
        _in_tbdiag("fn(x)", x=x, fn=lambda t: t.max().item())  # code that tbdiag calls: its read counts
        _in_tbdiag("y = x + 1; float(y[0]); float(y[0])", x=x)  # two reads of two views: two
        thread = threading.Thread(target=_in_tbdiag, args=("x.sum().item()",), kwargs={"x": x})
        thread.start()  # another thread: not this training loop's
        thread.join()
    assert [r.what for r in reads.reads] == [
        "aten._local_scalar_dense", "Tensor.cpu", "aten._local_scalar_dense", "aten._local_scalar_dense",
        "aten._local_scalar_dense"], report(reads.reads)
    assert reads.reads[0].where.startswith("watch/_host_reads_probe.py:1")
    assert reads.reads[2].where.startswith("test_host_reads.py:")  # the lambda tbdiag called


def test_the_counter_leaves_training_untouched():
    """Under the counter a run trains to the same weights (its wrappers only count)."""
    def train(counted: bool):
        loop = build("mlp", "cpu")
        with counting(loop) if counted else warnings.catch_warnings():
            for _ in range(3):
                loop.step()
        return [p.detach().clone() for p in loop.model.parameters()]

    for a, b in zip(train(True), train(False)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ watched training


def _graph_reads(loop, case: str) -> int:
    """The reads of step 0's graph trace alone: none but for `TRACE_READS`' models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = profiled_reads(graph_trace(loop))
    assert n == 0 or case in TRACE_READS, f"the graph trace of {case} reads {n} values on the host"
    return n


def _watched(tmp_path, loop, reads: HostReads, stop_on=(), **kwargs):
    for _ in range(2):  # unwatched: what the loop reads by itself is the user's (none, here)
        loop.step()
    assert reads.count() == 0, report(reads.reads)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(loop.model, loop.optimizer, log_every=LOG_EVERY, images_every=LOG_EVERY, histograms_every=LOG_EVERY, stop_on=stop_on,
                          **kwargs)
    return writer, handle


@pytest.mark.parametrize("case,with_optimizer,stop_on", MATRIX, ids=MATRIX_IDS)
def test_no_host_read_between_logging_steps_and_one_on_them(tmp_path, like_an_accelerator, case, with_optimizer,
                                                            stop_on):
    """From step 0 on: 0 host reads on a step that is not logged, 1 on a logging step (+1 a step with stop_on)."""
    if case in ("hf_outputs", "hf_moe"):
        pytest.importorskip("transformers")
    loop = build(case, "cpu", with_optimizer)
    traced = _graph_reads(loop, case)
    with counting(loop) as reads:
        writer, handle = _watched(tmp_path, loop, reads, stop_on=stop_on)
        check_steps(loop, handle, counter(reads), 3 * LOG_EVERY + 1, stop_on=stop_on, graph=traced)
        writer.close()
    assert reads.exempt, "the CPU statistics were read (the exemption is not vacuous)"


def test_a_nan_costs_no_read_until_the_logging_step(tmp_path, like_an_accelerator):
    """NaN at a step that is not logged: no read there; the logging step transfers once, plus one read of the
    NaN/Inf counts of the weights and gradients (not one per kind); the report has the exact step."""
    loop = build("mlp", "cpu")
    with counting(loop) as reads:
        writer, handle = _watched(tmp_path, loop, reads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            check_steps(loop, handle, counter(reads), 3 * LOG_EVERY, sick_at=LOG_EVERY + 1)
        writer.close()
    (f,) = [f for f in tbdiag.report(str(tmp_path)) if f.issue == "nonfinite"]
    assert f.first_step == LOG_EVERY + 1


@pytest.mark.parametrize("case", ["mlp", "hf_outputs"])
def test_on_a_cpu_the_sentinel_reads_once_per_step(tmp_path, case):
    """The CPU's own mode: the sentinel reads its check every step, once, whatever the number of outputs."""
    if case in ("hf_outputs", "hf_moe"):
        pytest.importorskip("transformers")
    loop = build(case, "cpu")
    traced = _graph_reads(loop, case)
    with counting(loop) as reads:
        writer, handle = _watched(tmp_path, loop, reads)
        check_steps(loop, handle, counter(reads), 2 * LOG_EVERY + 1, stop_on=("nonfinite",), graph=traced)
        writer.close()


# ------------------------------------------------------------------ sabotage: the check can fail


def _sabotage_sentinel(monkeypatch):
    """The sentinel's hook reads its output's value: one sync per step on an accelerator."""
    original = sentinel.Sentinel.forward_ends

    def forward_ends(self, step, module, output):
        original(self, step, module, output)
        float(output.detach().float().mean())

    monkeypatch.setattr(sentinel.Sentinel, "forward_ends", forward_ends)
    return "test_host_reads.py"


def _sabotage_optimizer_hook(monkeypatch):
    """The optimizer step hook asks whether some gradient is non-zero: a bool() of a device value."""
    original = watcher.Watcher._opt_post

    def _opt_post(self, optimizer, args, kwargs):
        p = optimizer.param_groups[0]["params"][0]
        if p.grad is not None and bool((p.grad != 0).any()):
            pass
        return original(self, optimizer, args, kwargs)

    monkeypatch.setattr(watcher.Watcher, "_opt_post", _opt_post)
    return "_opt_post"


@pytest.mark.parametrize("sabotage", [_sabotage_sentinel, _sabotage_optimizer_hook], ids=["item_in_sentinel",
                                                                                         "bool_in_step_hook"])
def test_a_sync_added_to_a_hook_fails_the_check(tmp_path, monkeypatch, like_an_accelerator, sabotage):
    """Proof that the check can fail: one host read added to a hook is caught, named, on every step."""
    site = sabotage(monkeypatch)
    loop = build("mlp", "cpu")
    with counting(loop) as reads:
        writer, handle = _watched(tmp_path, loop, reads)
        with pytest.raises(AssertionError) as caught:
            check_steps(loop, handle, counter(reads), 2 * LOG_EVERY + 1)
        writer.close()
    message = str(caught.value)
    assert message.startswith("syncs per step [2, 1, 1, 2, 1, 1, 2], budget [1, 0, 0, 1, 0, 0, 1]"), message
    assert site in message


# ------------------------------------------------------------------ the gradient-spike tracker judges every step


@pytest.mark.parametrize("case,with_optimizer", [("mlp", True), ("seed_cnn", False), ("autocast_bf16", True),
                                                 ("hf_outputs", True), ("hf_moe", True)])
def test_the_spike_tracker_judges_every_step_with_no_read_between_logging_steps(tmp_path, monkeypatch,
                                                                                 like_an_accelerator, case,
                                                                                 with_optimizer):
    """Every step's gradient norm is judged against the ring from step 2 on (instead of 16), at no host read
    between logging steps; the logging steps carry the window's largest jump (the test is not vacuous)."""
    if case.startswith("hf_"):
        pytest.importorskip("transformers")
    from tbdiag.measure import gradient_spikes
    from tbdiag.read.reader import load_logdir

    monkeypatch.setattr(gradient_spikes, "MIN_HISTORY", 2)
    loop = build(case, "cpu", with_optimizer)
    traced = _graph_reads(loop, case)
    with counting(loop) as reads:
        writer, handle = _watched(tmp_path, loop, reads)
        check_steps(loop, handle, counter(reads), 4 * LOG_EVERY + 1, graph=traced)
        writer.close()
    (run,) = load_logdir(str(tmp_path))
    steps, at = run.model_series("grad_spike_step")
    assert steps.tolist() == [LOG_EVERY, 2 * LOG_EVERY, 3 * LOG_EVERY, 4 * LOG_EVERY]
    assert all(s - LOG_EVERY < a <= s for s, a in zip(steps, at)), at  # a step of the window just ended
def test_a_sync_in_the_attention_measurement_fails_the_check(tmp_path, monkeypatch, like_an_accelerator):
    """The attention statistics are in the budget: a host read added to them is caught at every logging step,
    once per attention module (two here)."""
    original = attention.head_stats

    def head_stats(logits, valid):
        float(logits[0, 0, 0, 0])
        return original(logits, valid)

    monkeypatch.setattr(attention, "head_stats", head_stats)
    loop = build("attention", "cpu")
    traced = _graph_reads(loop, "attention")
    with counting(loop) as reads:
        writer, handle = _watched(tmp_path, loop, reads)
        with pytest.raises(AssertionError) as caught:
            check_steps(loop, handle, counter(reads), 2 * LOG_EVERY + 1, graph=traced)
        writer.close()
    message = str(caught.value)
    assert message.startswith(f"syncs per step [{3 + traced}, 0, 0, 3, 0, 0, 3], budget [{1 + traced}, 0, 0, 1, 0, 0, 1]"), \
        message
    assert "test_host_reads.py" in message
