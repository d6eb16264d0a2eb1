"""Shared helpers of the Diagnostics-tab tests: real training runs, real TensorBoard.

Nothing here mocks torch or TensorBoard: runs are written by
`tbdiag.DiagnosticWriter` watching a real model (or, for the 10,000-step
retention run, by TensorBoard's own event file writer with the schema's
encoder), and they are served by TensorBoard's own ingester, data provider and
WSGI application -- in process, or as a real ``tensorboard`` subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator

import numpy as np

DEAD_LAYER = "conv2"
XSS_NAME = "<img src=x onerror=alert(1)>"


# --------------------------------------------------------------------- runs


def train_run(logdir: str, *, dead: bool, steps: int = 60, log_every: int = 3, seed: int = 0,
              xss_layer: bool = False) -> None:
    """Train a small CNN for ``steps`` steps with `DiagnosticWriter` watching it.

    ``dead=True`` pushes conv2's bias to -10 so every ReLU unit after it is
    dead from the first step: the classic dying-ReLU failure, which the tab
    must flag on conv2.  ``xss_layer=True`` adds a layer whose name is an HTML
    payload, to prove the tab renders names as text.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from tbdiag import DiagnosticWriter

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3)
            self.conv2 = nn.Conv2d(8, 16, 3)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.fc1 = nn.Linear(16 * 4 * 4, 32)
            self.fc2 = nn.Linear(32, 10)
            if xss_layer:
                self.add_module(XSS_NAME, nn.Linear(10, 10))

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.relu(self.fc1(self.pool(x).flatten(1)))
            x = self.fc2(x)
            if xss_layer:
                x = getattr(self, XSS_NAME)(x)
            return x

    model = Net()
    if dead:
        with torch.no_grad():
            model.conv2.bias.fill_(-10.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=log_every, log_graph=False, histograms=False,
                 activation_histograms=False)
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(10, 256, generator=gen)  # a learnable labelling, so a healthy loss really falls
    for step in range(steps):
        x = torch.randn(16, 1, 16, 16, generator=gen)
        y = (x.flatten(1) @ teacher.T).argmax(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
    writer.close()


# ------------------------------------------------------------- TensorBoard


def tensorboard_flags(logdir: str, *extra: str):
    """TensorBoard's own parsed command-line flags (defaults included) for ``logdir``."""
    from tensorboard import default, program

    tb = program.TensorBoard(plugins=default.get_plugins())
    tb.configure(argv=["tensorboard", "--logdir", logdir, "--load_fast", "false", "--reload_interval", "0",
                       "--reload_task", "blocking", *extra])
    return tb.flags


def wsgi_app(logdir: str):
    """TensorBoard's WSGI application over ``logdir`` with the Python loader, fully loaded.

    Built the way ``tensorboard --load_fast=false`` builds it: the real flags
    (so the default 10-sample reservoir for unknown plugins applies), the real
    ingester and data provider, and the plugins TensorBoard finds itself --
    ours through the ``tensorboard_plugins`` entry point of the installed
    distribution, so registration is exercised too.
    """
    from tensorboard import default
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester

    flags = tensorboard_flags(logdir)
    ingester = data_ingester.LocalDataIngester(flags)
    ingester.start()  # reload_task=blocking, reload_interval=0: loads once, returns when done
    return application.TensorBoardWSGIApp(
        flags, default.get_plugins(), ingester.data_provider, None,
        ingester.deprecated_multiplexer,
    ), ingester
