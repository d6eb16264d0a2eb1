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
from torch import nn

from tbdiag import DiagnosticWriter

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LOG_EVERY = 4


class SeedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(x + self.b2(self.c2(self.relu(self.b1(self.c1(x))))))


def resnet():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), Block(16),
                         Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


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


@pytest.mark.parametrize("make", [SeedCNN, resnet, mlp], ids=["seed_cnn", "resnet_bn_inplace", "mlp_sigmoid_tanh"])
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
