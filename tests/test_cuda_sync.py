"""Device-host synchronisations caused by watching a model on CUDA.

The budget and the loops are `sync_budget`'s (the same that
``tests/test_host_reads.py`` checks on a CPU with its stand-in counter): from
step 0 on, no sync on a step that is not logged, one on a logging step (its
single host transfer), one more per step with ``stop_on=("nonfinite",)``
(at step 0 also the graph trace's own, measured alone: none for plain models).

Three checks that a sync cannot slip through:

- counted, not raised: ``set_sync_debug_mode("warn")`` warns once per
  synchronising call.  (In "error" mode the RuntimeError is raised inside a
  hook, the shield catches it and detaches tbdiag, and the step looks clean.)
- the shield is asserted intact after every step.
- on a step that must not sync, a ``torch.cuda._sleep`` kernel queued first is
  still running when the step's host code has returned: a sync of any kind
  (the debug mode does not see the caching allocator's, for one) would have
  waited for it.

Skipped where CUDA is not present.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings

import pytest
import torch
from sync_budget import LOG_EVERY, MATRIX, MATRIX_IDS, TRACE_READS, build, check_steps, graph_trace

import tbdiag
from tbdiag import DiagnosticWriter
from tbdiag.watch import sentinel

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: How long the stream is kept busy under a step that must not sync; a step's host code takes far less.
SLEEP_S = 0.3


@contextlib.contextmanager
def sync_debug(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def count_syncs(fn) -> tuple[int, str]:
    """Synchronising calls made by ``fn()`` and where (file:line of each warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug("warn"):
            fn()
    # one warning per synchronising call; not the one-off "debug mode is a prototype feature" notice
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    return len(syncs), "; ".join(f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs) or "none"


_cycles_per_s: list[float] = []


def _sleep(seconds: float) -> None:
    """Queue a kernel that keeps the current stream busy for about ``seconds``."""
    if not _cycles_per_s:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _cycles_per_s.append(10_000_000 / (start.elapsed_time(end) / 1000))
    torch.cuda._sleep(int(seconds * _cycles_per_s[0]))


def hidden_sync(fn) -> str | None:
    """Run ``fn()`` behind a queued sleep kernel; what gives away a sync it made (None: none)."""
    torch.cuda.synchronize()
    _sleep(SLEEP_S)
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    idle = torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    if idle or elapsed > SLEEP_S / 2:
        return f"the host waited for the device ({elapsed * 1000:.0f} ms; stream idle after: {idle})"
    return None


def gpu_counter(baseline: int):
    """`sync_budget.Counter` on the GPU: warn-mode counts, and the sleep check where nothing may sync."""
    def count(fn, budget):
        if budget == 0 and baseline == 0:
            counted: list = []
            hidden = hidden_sync(lambda: counted.append(count_syncs(fn)))
            n, detail = counted[0]
            return (n if hidden is None else max(n, 1)), (detail if hidden is None else f"{detail}; {hidden}")
        return count_syncs(fn)
    return count


def _watched(tmp_path, loop, stop_on=(), case="mlp"):
    """Warm up unwatched (lazy CUDA/cuBLAS/cuDNN initialisation); measure what the loop syncs by itself, and what
    step 0's graph trace syncs by itself (nothing, but for `TRACE_READS`' models)."""
    for _ in range(2):
        loop.step()
    torch.cuda.synchronize()
    baseline, _ = count_syncs(loop.step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's notes; count_syncs records the syncs' warnings itself)
        traced, where = count_syncs(graph_trace(loop))
    assert traced == 0 or case in TRACE_READS, f"the graph trace of {case} syncs {traced} times: {where}"
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(loop.model, loop.optimizer, log_every=LOG_EVERY, images_every=LOG_EVERY, histograms_every=LOG_EVERY, stop_on=stop_on)
    return writer, handle, baseline, traced


# ------------------------------------------------------------------ the instruments


def test_the_counter_counts():
    x = torch.ones(3, device="cuda")
    assert count_syncs(lambda: x.sum().item())[0] == 1
    assert count_syncs(lambda: torch.cat([x, x]).cpu())[0] == 1
    assert count_syncs(lambda: (x.sum().item(), x.cpu()))[0] == 2
    assert count_syncs(lambda: x * 2)[0] == 0


def test_the_sleep_check_sees_a_sync():
    x = torch.ones(3, device="cuda")
    assert hidden_sync(lambda: x * 2) is None
    assert hidden_sync(lambda: x.sum().item()) is not None
    assert hidden_sync(lambda: torch.cuda.current_stream().synchronize()) is not None


# ------------------------------------------------------------------ watched training


@pytest.mark.parametrize("case,with_optimizer,stop_on", MATRIX, ids=MATRIX_IDS)
def test_zero_syncs_off_logging_steps_and_one_on_them(tmp_path, case, with_optimizer, stop_on):
    """From step 0 (graph, layer table) on, images at every logging step."""
    if case in ("hf_outputs", "hf_moe"):
        pytest.importorskip("transformers")
    loop = build(case, "cuda", with_optimizer)
    writer, handle, baseline, traced = _watched(tmp_path, loop, stop_on, case)
    check_steps(loop, handle, gpu_counter(baseline), 3 * LOG_EVERY + 1, stop_on=stop_on, baseline=baseline,
                graph=traced)
    writer.flush()
    assert not writer._errors
    writer.close()


def test_the_nan_sentinel_adds_no_sync_and_finds_the_exact_step(tmp_path):
    """NaN at a non-logging step: still no sync there; the next logging step's transfer carries its step, and
    one more read brings the NaN/Inf counts of the weights and gradients."""
    loop = build("mlp", "cuda")
    writer, handle, baseline, _ = _watched(tmp_path, loop)
    sick = LOG_EVERY + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        check_steps(loop, handle, gpu_counter(baseline), 3 * LOG_EVERY, baseline=baseline, sick_at=sick)
    writer.close()
    (f,) = [f for f in tbdiag.report(str(tmp_path)) if f.issue == "nonfinite"]
    assert f.first_step == sick


def test_stop_on_nonfinite_stops_at_the_step(tmp_path):
    """stop_on=("nonfinite",) costs one sync per step, and stops at the step, naming the layer."""
    loop = build("mlp", "cuda")
    writer, handle, baseline, _ = _watched(tmp_path, loop, stop_on=("nonfinite",))
    check_steps(loop, handle, gpu_counter(baseline), LOG_EVERY + 2, stop_on=("nonfinite",), baseline=baseline)
    bad = handle.step
    with pytest.raises(tbdiag.TrainingHealthError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loop.step(sick=True)
    assert caught.value.step == bad and caught.value.layer == "1"  # the first Linear of the Sequential
    writer.close()


def test_a_sync_added_to_a_hook_fails_the_check(tmp_path, monkeypatch):
    """Proof that the check can fail: one ``.item()`` added to the sentinel's hook is counted on every step."""
    original = sentinel.Sentinel.forward_ends

    def forward_ends(self, step, module, output):
        original(self, step, module, output)
        output.detach().float().mean().item()

    monkeypatch.setattr(sentinel.Sentinel, "forward_ends", forward_ends)
    loop = build("mlp", "cuda")
    writer, handle, baseline, _ = _watched(tmp_path, loop)
    with pytest.raises(AssertionError, match=r"syncs per step \[2, 1, 1, 2"):
        check_steps(loop, handle, gpu_counter(baseline), LOG_EVERY + 1, baseline=baseline)
    writer.close()


# ------------------------------------------------------------------ the sentinel's memory


@pytest.mark.parametrize("read", [False, True], ids=["device_mode", "read_mode"])
def test_the_sentinel_allocates_no_full_size_temporary(read):
    """Language-model logits (4 x 1024 x 32,000 in bfloat16: 256 MiB): the per-step check allocates a few
    scalars, where ``torch.isfinite(t).all()`` allocates masks of the whole tensor."""
    logits = torch.randn(4, 1024, 32_000, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(4, 1024, 512, device="cuda", dtype=torch.bfloat16)
    s = sentinel.Sentinel(list, None, read_always=read)
    s.forward_ends(0, None, (logits, hidden))  # allocator warm-up for the scalars
    torch.cuda.synchronize()

    def peak(fn) -> int:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    assert peak(lambda: torch.isfinite(logits).all()) >= logits.numel()  # the measurement sees a mask
    assert peak(lambda: s.forward_ends(1, None, (logits, hidden))) < 1 << 20
    assert s.found is None
    bad = logits.clone()
    bad[3, 1000, 31_999] = float("inf")
    if not read:
        s.forward_ends(2, None, (bad, hidden))
        assert int(s._first) == 2
