"""Shared helpers of the Diagnostics-tab tests: real training runs, real TensorBoard.

Nothing here mocks torch or TensorBoard: runs are written by
`tbdiag.DiagnosticWriter` watching a real model (or, for the 10,000-step
retention run, by TensorBoard's own event file writer with the schema's
encoder), and they are served by TensorBoard's own ingester, data provider and
WSGI application -- in process, or as a real ``tensorboard`` subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

DEAD_LAYER = "conv2"
DEAD_FROM = 16  # the training step at which the sick run's conv2 dies (a logged step: log_every=2)
XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_RUN = "<img src=x onerror=alert(2)>"  # no "/" in it: a run name is a directory name


# --------------------------------------------------------------------- runs


def train_run(logdir: str, *, dead: bool, steps: int = 40, log_every: int = 2, seed: int = 0,
              dead_from: int = DEAD_FROM, xss_layer: bool = False) -> None:
    """Train a small CNN for ``steps`` steps with `DiagnosticWriter` watching it.

    ``dead=True`` pushes conv2's bias to -10 at step ``dead_from``, so from
    then on every ReLU unit after it is dead: the classic dying-ReLU failure,
    which the tab must flag on conv2 from that step.  ``xss_layer=True`` adds a
    layer whose name is an HTML payload, to prove the tab renders names as text.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from tbdiag import DiagnosticWriter

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3)
            self.conv2 = nn.Conv2d(8, 16, 3)
            self.fc1 = nn.Linear(16 * 12 * 12, 32)
            self.fc2 = nn.Linear(32, 10)
            if xss_layer:
                self.add_module(XSS_NAME, nn.Linear(10, 10))

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.relu(self.fc1(x.flatten(1)))
            x = self.fc2(x)
            if xss_layer:
                x = getattr(self, XSS_NAME)(x)
            return x

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=log_every, log_graph=False, histograms=False,
                 activation_histograms=False)
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 16, 16, generator=gen)  # a pattern per class: a healthy loss really falls
    batches = []
    for _ in range(steps):
        y = torch.randint(0, 10, (64,), generator=gen)
        batches.append((torch.randn(64, 1, 16, 16, generator=gen) + templates[y], y))
    # a watched loader: the input wait is the loader's own time, not this loop's Python between steps (which a
    # busy machine stretches to half of a 4 ms step)
    for step, (x, y) in enumerate(writer.watch_loader(batches)):
        if dead and step == dead_from:
            with torch.no_grad():
                model.conv2.bias.fill_(-10.0)  # the illness: every conv2 channel stops firing
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


def write_long_run(logdir: str, *, logged_steps: int, log_every: int, layers: int = 6,
                   dead_layer: int = 3, dead_from_index: int, nan_layer: int = 5, nan_index: int) -> dict:
    """Write a run of ``logged_steps`` logging steps in seconds, chunked exactly as the writer does.

    Training 10,000 logging steps for real would take far too long for a
    test, so the statistics are synthesised -- healthy noise, then layer
    ``dead_layer`` goes fully dead from logging index ``dead_from_index`` on,
    and layer ``nan_layer`` gets NaN gradients at exactly one logging index
    ``nan_index`` -- and written with the schema's own encoder through a
    `SummaryWriter`'s file writer, with ``STEPS_PER_TAG`` steps per tag like
    `DiagnosticWriter`.  Returns the steps a reader must report.
    """
    from torch.utils.tensorboard import SummaryWriter

    from tbdiag.contract import schema

    rng = np.random.default_rng(0)
    col = schema.COLUMN_INDEX
    table = schema.LayerTable(
        layers=[schema.LayerInfo(name=f"block{i}.linear", type="Linear", params=1000 + i, trainable_params=1000 + i,
                                 activation="relu") for i in range(layers)],
        log_every=log_every, has_optimizer=True,
    )
    writer = SummaryWriter(logdir)
    fw = writer._get_file_writer()
    fw.add_summary(schema.encode_layers(table), 0)
    for t in range(logged_steps):
        step = t * log_every
        stats = np.full((layers, len(schema.COLUMNS)), np.nan, dtype=np.float32)  # not set: not measured
        for name in ("act_nonfinite", "grad_nonfinite", "weight_nonfinite"):
            stats[:, col[name]] = 0
        stats[:, col["act_mean"]] = 0.1 + 0.01 * rng.standard_normal(layers)
        stats[:, col["act_std"]] = 1.0
        stats[:, col["dead_frac"]] = 0.05 * rng.random(layers)
        stats[:, col["saturated_frac"]] = np.nan
        stats[:, col["grad_norm"]] = 0.5 * (1 + 0.1 * rng.standard_normal(layers))
        stats[:, col["grad_rms"]] = 1e-3 * (1 + 0.1 * rng.standard_normal(layers))
        stats[:, col["weight_norm"]] = 10.0
        stats[:, col["update_ratio"]] = 1e-3
        stats[:, col["changed"]] = 1.0
        stats[:, col["grad_params"]] = 2
        if t >= dead_from_index:
            stats[dead_layer, col["dead_frac"]] = 1.0
        if t == nan_index:
            stats[nan_layer, col["grad_nonfinite"]] = 7
            stats[nan_layer, col["grad_norm"]] = np.nan
            stats[nan_layer, col["grad_rms"]] = np.nan
        first_of_chunk = (t - t % schema.STEPS_PER_TAG) * log_every
        fw.add_summary(schema.encode_health(first_of_chunk, stats), step)
    writer.close()
    return {
        "dead_layer": table.layers[dead_layer].name, "dead_step": dead_from_index * log_every,
        "nan_layer": table.layers[nan_layer].name, "nan_step": nan_index * log_every,
        "last_step": (logged_steps - 1) * log_every, "logged_steps": logged_steps,
    }


def write_recovering_run(logdir: str) -> dict:
    """A hand-made run whose findings end before the run does, written with the schema's own encoder.

    Four layers, 16 logged steps every 10 training steps, healthy throughout
    except: ``block1``'s ReLUs are all dead at logged indices 3..8 and recover,
    and ``block2``'s gradient RMS collapses to 1e-9 at indices 4..9 and
    recovers.  Returns the layers, the steps where each finding holds, and a
    step after both ended.
    """
    from torch.utils.tensorboard import SummaryWriter

    from tbdiag.contract import schema

    log_every, logged = 10, 16
    names = ["stem", "block1", "block2", "head"]
    col = schema.COLUMN_INDEX
    table = schema.LayerTable(
        layers=[schema.LayerInfo(name=n, type="Linear", params=100, trainable_params=100, activation="relu")
                for n in names],
        log_every=log_every, has_optimizer=True,
    )
    writer = SummaryWriter(logdir)
    fw = writer._get_file_writer()
    fw.add_summary(schema.encode_layers(table), 0)
    for t in range(logged):
        stats = np.full((len(names), len(schema.COLUMNS)), np.nan, dtype=np.float32)
        for name in ("act_nonfinite", "grad_nonfinite", "weight_nonfinite"):
            stats[:, col[name]] = 0
        stats[:, col["act_mean"]] = 0.2
        stats[:, col["act_std"]] = 1.0
        stats[:, col["dead_frac"]] = 0.05
        stats[:, col["grad_norm"]] = 0.5
        stats[:, col["grad_rms"]] = 1e-3
        stats[:, col["weight_norm"]] = 10.0
        stats[:, col["update_ratio"]] = 1e-3
        stats[:, col["changed"]] = 1.0
        stats[:, col["grad_params"]] = 2
        if 3 <= t <= 8:
            stats[1, col["dead_frac"]] = 1.0
        if 4 <= t <= 9:
            stats[2, col["grad_rms"]] = 1e-9
            stats[2, col["grad_norm"]] = 1e-8
        fw.add_summary(schema.encode_health((t - t % schema.STEPS_PER_TAG) * log_every, stats), t * log_every)
    writer.close()
    return {
        "dead_layer": "block1", "dead_steps": (30, 80),
        "vanishing_layer": "block2", "vanishing_steps": (40, 90),
        "after": 120, "last_step": (logged - 1) * log_every,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 30.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode("utf-8") or "{}")


class TensorBoardProcess:
    """A real ``tensorboard`` process on 127.0.0.1 and a free port, stopped on exit."""

    def __init__(self, logdir: str, *, load_fast: bool, workdir: str, reload_interval: int = 2,
                 python: str = sys.executable):
        self.logdir = logdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"tensorboard-{self.port}.log")
        # run from workdir: a stale *.egg-info in the repository root must not shadow the installed entry points
        self._cmd = [
            python, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
            "--port", str(self.port), "--load_fast", "true" if load_fast else "false",
            "--reload_interval", str(reload_interval),
        ]
        self._workdir = workdir
        self._proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> TensorBoardProcess:  # noqa: PYI034  (Self needs Python 3.11)
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(self._cmd, cwd=self._workdir, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/data/plugins_listing", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.__exit__(None, None, None)
        raise RuntimeError(f"tensorboard did not come up within 60 s:\n{self.log()}")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        except OSError:
            return ""

    def wait_for(self, path: str, ready, timeout: float = 90.0) -> dict:
        """Poll ``path`` until ``ready(status, body)`` holds (TensorBoard loads logdirs in the background)."""
        deadline = time.time() + timeout
        last: tuple[int, dict] = (0, {})
        while time.time() < deadline:
            try:
                last = get_json(self.url + path)
                if ready(*last):
                    return last[1]
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"{path} not ready after {timeout} s; last answer {str(last)[:500]}\n{self.log()}")


def session_logdir(tmp_path_factory, name: str, build) -> str:
    """A logdir built once per test session, shared by every plugin test module that asks for it."""
    root = tmp_path_factory.getbasetemp() / f"tbdiag-plugin-{name}"
    done = root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        build(str(root))
        done.write_text("ok")
    return str(root)


def build_trained_logdir(root: str) -> None:
    """Two real runs: "sick" (conv2's ReLUs dead from step DEAD_FROM on) and "healthy"."""
    train_run(os.path.join(root, "sick"), dead=True)
    train_run(os.path.join(root, "healthy"), dead=False, seed=1)


#: Runs of the side-by-side logdir: three written here, each copied once under a second name.
SIDE_BY_SIDE_RUNS = ["sick", "healthy", "recovering", "sick-copy", "healthy-copy", "recovering-copy"]


def build_side_by_side_logdir(root: str) -> None:
    """Six runs to tick side by side: the trained sick and healthy runs, a hand-made run whose findings end
    (`write_recovering_run`), and a copy of each under another name."""
    import shutil

    train_run(os.path.join(root, "sick"), dead=True)
    train_run(os.path.join(root, "healthy"), dead=False, seed=1)
    write_recovering_run(os.path.join(root, "recovering"))
    for name in ("sick", "healthy", "recovering"):
        shutil.copytree(os.path.join(root, name), os.path.join(root, f"{name}-copy"))


def build_xss_logdir(root: str) -> None:
    """One real run whose run name and one layer name are HTML payloads (a dead conv2 too, so it is flagged)."""
    train_run(os.path.join(root, XSS_RUN), dead=True, dead_from=0, xss_layer=True, steps=12)


def strict_json(text: str):
    """Parse JSON the way a browser's JSON.parse does: bare NaN/Infinity are errors."""
    def reject(token: str):
        raise ValueError(f"invalid JSON constant {token}")
    return json.loads(text, parse_constant=reject)
