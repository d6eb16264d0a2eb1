"""Device-host synchronisations caused by watching a model on CUDA.

Non-logging steps must cause none (checked with
``torch.cuda.set_sync_debug_mode("error")``, which raises on any sync), and a
logging step exactly one: the single host transfer of its statistics (counted
from the warnings ``set_sync_debug_mode("warn")`` emits for each sync).
Skipped where CUDA is not present.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from scenarios import SeedCNN, SmallResNet
from torch import nn

import tbdiag
from tbdiag import DiagnosticWriter

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LOG_EVERY = 4


def mlp():
    # sigmoid/tanh too: the saturation statistics
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.ReLU(), nn.Linear(256, 128), nn.Tanh(),
                         nn.Linear(128, 64), nn.Sigmoid(), nn.Linear(64, 10))


@contextlib.contextmanager
def sync_debug(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def count_syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug("warn"):
            fn()
    # one warning per synchronising call; not the one-off "debug mode is a prototype feature" notice
    return sum("called a synchronizing" in str(w.message) for w in caught)


def test_the_counter_counts():
    x = torch.ones(3, device="cuda")
    assert count_syncs(lambda: x.sum().item()) == 1
    assert count_syncs(lambda: torch.cat([x, x]).cpu()) == 1
    assert count_syncs(lambda: (x.sum().item(), x.cpu())) == 2
    assert count_syncs(lambda: x * 2) == 0


@pytest.mark.parametrize("make", [SeedCNN, SmallResNet, mlp], ids=["seed_cnn", "resnet_bn_inplace", "mlp_sigmoid_tanh"])
@pytest.mark.parametrize("with_optimizer", [True, False], ids=["optimizer", "no_optimizer"])
def test_zero_syncs_off_logging_steps_and_one_on_them(tmp_path, make, with_optimizer):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    writer = DiagnosticWriter(str(tmp_path))
    # images at every logging step, so the image path is covered too
    handle = writer.watch(model, opt if with_optimizer else None, log_every=LOG_EVERY, images_every=LOG_EVERY)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # warm-up: step 0 (graph, layer table), lazy CUDA/cuDNN initialisation, and a second logging step
    for _ in range(LOG_EVERY + 1):
        step()
    torch.cuda.synchronize()
    assert handle.step == LOG_EVERY + 1

    with sync_debug("error"):  # any synchronisation raises
        for _ in range(LOG_EVERY - 1):
            step()
    assert handle.step % LOG_EVERY == 0, "the next step is a logging step"

    assert count_syncs(step) == 1, "a logging step transfers its statistics to the host once"

    with sync_debug("error"):
        for _ in range(LOG_EVERY - 1):
            step()
    writer.flush()
    assert not writer._errors
    writer.close()


def _mlp_run(tmp_path, **watch_kwargs):
    """A watched MLP on CUDA and its training step (``step(sick=True)``: a NaN input)."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=LOG_EVERY, **watch_kwargs)

    def step(sick=False):
        loss = F.cross_entropy(model(x * float("nan") if sick else x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return writer, handle, step


def test_the_nan_sentinel_adds_no_sync_and_finds_the_exact_step(tmp_path):
    """NaN at a non-logging step: still no sync there; the next logging step's one transfer carries its step."""
    writer, handle, step = _mlp_run(tmp_path)

    for _ in range(LOG_EVERY + 1):
        step()
    torch.cuda.synchronize()
    bad = handle.step + 1
    with sync_debug("error"):
        step()
        step(sick=True)  # a non-logging step
        while handle.step % LOG_EVERY:
            step()
    assert count_syncs(step) == 1
    writer.close()
    (f,) = [f for f in tbdiag.report(str(tmp_path)) if f.issue == "nonfinite"]
    assert f.first_step == bad


def test_stop_on_nonfinite_reads_the_sentinel_every_step(tmp_path):
    """stop_on=("nonfinite",) costs one sync per step, and stops at the step."""
    writer, handle, step = _mlp_run(tmp_path, stop_on=("nonfinite",))

    for _ in range(LOG_EVERY + 1):
        step()
    torch.cuda.synchronize()
    assert count_syncs(step) == 1
    bad = handle.step
    with pytest.raises(tbdiag.TrainingHealthError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step(sick=True)
    assert caught.value.step == bad and caught.value.layer == "1"  # the first Linear of the Sequential
    writer.close()
