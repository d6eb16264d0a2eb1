"""Step-time overhead of tbdiag against the tools users pick instead, side by side.

One process.  Every configuration trains its own copy of the same model (same
initial weights, same batches) with its own optimizer and its own logger.
Configurations take turns in blocks of steps, and the order rotates every
round.  A block's time runs from its first step to the end of its drain: the
configuration's writer is flushed (its background thread finishes what the
block left behind) and a garbage collection runs, both inside the timed
region, so each configuration pays for all of its own work and leaves nothing
for the next one.  Nothing is untimed between blocks.  Overhead of a
configuration is the median over rounds of (its block time / the baseline's
block time) - 1.

Besides the overhead, a configuration's cost per logged step is split by
where it lands, each against the baseline's steps at the same positions in
the same round: the logging step itself, the other (non-logging) steps of the
block (a background thread's work, which holds the GIL for most of it, shows
there), and the drain at the block's end.

Configurations
    baseline   the loss scalar each step (torch.utils.tensorboard.SummaryWriter)
    A/A        a second copy of the baseline: the run's noise floor
    tb         the seed-style loop: loss scalar each step; every N steps
               add_histogram of every parameter and every gradient
    tbX        the same loop through tensorboardX
    wandb      wandb.watch(model, log="all", log_freq=N), offline, loss via wandb.log
    tbdiag     DiagnosticWriter.watch(model, optimizer, log_every=N), default content (health
               statistics every N steps, histograms every 10 N)
    tbdiag+h   the same with histograms_every=N: histograms as often as the peers log them
    tbdiag-s   the default content with gradient_spikes=False: no gradient read between logging steps

Workloads (one thread, batch 64, synthetic data)
    cnn        the seed articles' CIFAR classifier CNN ("Training a Classifier":
               conv(3,c1,5)-pool-conv(c1,c2,5)-pool-fc-fc-fc with F.relu) at width
               32/64/288/128 on 32x32 inputs: 0.55M parameters
    mlp        a 26-layer MLP (Linear+ReLU, width 310): 2.4M parameters
    resnet     a ResNet-20-style CIFAR ResNet (BatchNorm, ReLU(inplace=True)), 16/32/64
               channels, on 16x16 inputs (a quarter of CIFAR's compute per step, so that
               100-step blocks stay affordable): 0.27M parameters
    gpt2       Hugging Face GPT-2, 6 blocks x 256, vocabulary 8,192, AdamW, 8 sequences of 128
               tokens, causal-LM loss from labels: 6.9M parameters
    llama      Hugging Face Llama (RMSNorm, SwiGLU, rotary, grouped-query attention), 6 blocks
               x 256, the same vocabulary, optimizer and batches

For tbdiag it also sets the cost of its logging step (as above: against the
baseline's steps at the same positions, not against tbdiag's own other steps,
which carry its background work) against one memory pass over the parameters
and gradients (``torch._foreach_norm`` over all of them: every element read
once) and against one pass over those and every leaf module's output (what the
health statistics read, since they are never sampled), and counts the event bytes tbdiag writes per layer per logged step
besides histograms and images.

    python benchmarks/overhead.py --one-core  # the README's run: everything on one core
    python benchmarks/overhead.py            # the same, free to use a spare core for background threads
    python benchmarks/overhead.py --quick    # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "examples")]

from seed_cnn import Net  # noqa: E402  (the examples' seed CNN)

BATCH = 64  # --batch changes it (--quick uses 16)

#: What a block's and a step's time is read from: wall-clock time, or with ``--clock cpu`` the CPU time of
#: this whole process (every thread: a writer thread's work counts wherever it ran).
clock: Callable[[], float] = time.perf_counter


# ---------------------------------------------------------------- workloads


def deep_mlp(depth: int = 26, width: int = 310, d_in: int = 256, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out = out + (x if self.short is None else self.short(x))
        return self.relu(out)


class SmallResNet(nn.Module):
    """ResNet-20 for 32x32 inputs (3 stages x 3 basic blocks, 16/32/64 channels)."""

    def __init__(self, classes: int = 10, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The transformer recipe's optimizer (its Adam state is part of what a watched step reads)."""
    return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)


def _classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _next_token(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Causal LM loss the way Hugging Face computes it from ``labels`` (shifted inside the model)."""
    return model(input_ids=x, labels=x).loss


VOCAB = 8192  # the transformer workloads' vocabulary: an LM head the size of the blocks, not a toy's
SEQ = 128


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # config notes about token ids this synthetic vocabulary lacks
    return transformers


def gpt2_small() -> nn.Module:
    """GPT-2, 6 blocks x 256 wide (Hugging Face's class, random init): 6.9M parameters with its tied head."""
    transformers = _quiet_transformers()

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=256, n_layer=6, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def llama_small() -> nn.Module:
    """Llama (RMSNorm, SwiGLU, rotary, grouped-query attention), 6 blocks x 256 wide, random init."""
    transformers = _quiet_transformers()

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(cfg)


@dataclass
class Workload:
    name: str
    title: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int = 10
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = _sgd
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = _classify
    tokens: bool = False  # inputs are token ids in [0, classes), batch x input_shape
    batch: int | None = None  # its own batch size (sequences); None: --batch

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One synthetic batch: (inputs, targets)."""
        if self.tokens:
            x = torch.randint(0, self.classes, (self.batch or batch, *self.input_shape), generator=gen)
            return x, x
        return (torch.randn((batch, *self.input_shape), generator=gen),
                torch.randint(0, self.classes, (batch,), generator=gen))


WORKLOADS = {
    "cnn": Workload("cnn", "seed CNN", lambda: Net(32, 64, 288, 128), (3, 32, 32)),
    "mlp": Workload("mlp", "26-layer MLP", deep_mlp, (256,)),
    "resnet": Workload("resnet", "ResNet-20 + BatchNorm", SmallResNet, (3, 16, 16)),
    "gpt2": Workload("gpt2", "GPT-2 6x256, AdamW", gpt2_small, (SEQ,), classes=VOCAB, optimizer=_adamw,
                     loss=_next_token, tokens=True, batch=8),
    "llama": Workload("llama", "Llama 6x256, AdamW", llama_small, (SEQ,), classes=VOCAB, optimizer=_adamw,
                      loss=_next_token, tokens=True, batch=8),
    # not in the default set: the main example's CNN at the tutorial's widths (62K parameters)
    "example": Workload("example", "seed CNN, tutorial widths", Net, (3, 32, 32)),
}


# ----------------------------------------------------------- configurations


@dataclass
class Block:
    """One timed block of one configuration: its total and where the time went."""

    first_step: int  # the step counter at the block's first step (every configuration's is the same)
    seconds: float  # first step's start to the drain's end: what the user's loop paid
    step_seconds: list[float]  # each step: forward, backward, optimizer step and the logging call
    logging: list[bool]  # whether each step is a logging step (step % log_every == 0)
    drain_seconds: float  # the drain at the block's end (writer flush, garbage collection)


class Config:
    """One trainer: a model copy, its optimizer, its logger; runs blocks of steps."""

    label = "?"

    def __init__(self, workload: Workload, state: dict, data: list, log_every: int, tmp: str):
        self.model = workload.make()
        self.model.load_state_dict(state)
        self.model.train()
        self.opt = workload.optimizer(self.model)
        self.loss_of = workload.loss
        self.data = data
        self.log_every = log_every
        self.step = 0
        self.logdir = os.path.join(tmp, self.label.replace("/", ""))
        self.blocks: list[Block] = []  # the measured blocks, one per round
        self.setup()

    def setup(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.logdir)

    def log_step(self, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, self.step)

    def block(self, steps: int) -> Block:
        """Run ``steps`` training steps and the drain, all timed.

        The drain is part of the block so that the work a logger defers (a writer thread's histograms,
        encoding and file writes) is paid by the configuration that made it, never by the next block, and
        never left out: a user's training has no untimed pauses to hide it in.
        """
        first = self.step
        step_seconds: list[float] = []
        logging: list[bool] = []
        t_block = clock()
        for _ in range(steps):
            x, y = self.data[self.step % len(self.data)]
            t0 = clock()
            loss = self.loss_of(self.model, x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.log_step(loss.item())
            step_seconds.append(clock() - t0)
            logging.append(self.step % self.log_every == 0)
            self.step += 1
        t_drain = clock()
        self.drain()
        gc.collect()  # cyclic garbage this block made (the setup heap is frozen: see run_workload)
        t_end = clock()
        return Block(first, t_end - t_block, step_seconds, logging, t_end - t_drain)

    def drain(self) -> None:
        """Wait for the writing this block left behind (the writer thread's queue) and flush the file."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Baseline(Config):
    label = "baseline"


class AA(Config):
    label = "A/A"


class SeedLoop(Config):
    """The seed articles' loop: histograms of every parameter and gradient every N steps."""

    label = "tb"

    def log_step(self, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, self.step)
        if self.step % self.log_every == 0:
            for name, p in self.model.named_parameters():
                self.writer.add_histogram(f"params/{name}", p, self.step)
                if p.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", p.grad, self.step)


class SeedLoopX(SeedLoop):
    label = "tbX"

    def setup(self) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(self.logdir)

    def drain(self) -> None:
        """Wait until tensorboardX's writer thread has taken every event off its queue, then flush.

        Its ``flush()`` does not wait for the queue (a ``multiprocessing.Queue`` whose feeder thread pickles
        each event for the writer thread), so without this loop its writing would land on the next block.
        The one event the writer thread may be writing when the queue runs empty is not waited for.
        """
        for file_writer in self.writer.all_writers.values():
            events = file_writer.event_writer._event_queue
            while getattr(events, "_buffer", None) or not events.empty():
                time.sleep(0.0002)  # lets the feeder and writer threads take the GIL
        self.writer.flush()


class WandbWatch(Config):
    label = "wandb"

    def setup(self) -> None:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.run = wandb.init(project="tbdiag-overhead", dir=self.logdir_make(), mode="offline",
                                  reinit="finish_previous" if _wandb_has_reinit_modes() else True,
                                  settings=wandb.Settings(console="off", silent=True, x_disable_stats=True)
                                  if _wandb_has_setting("x_disable_stats") else wandb.Settings(console="off"))
            self.run.watch(self.model, log="all", log_freq=self.log_every)

    def logdir_make(self) -> str:
        os.makedirs(self.logdir, exist_ok=True)
        return self.logdir

    def log_step(self, loss: float) -> None:
        self.run.log({"train/loss": loss}, step=self.step)

    def drain(self) -> None:
        """Wait until wandb's service processes have gone quiet: what they still do lands on the next block.

        wandb hands each logged step to a thread of its own in this process, which sends it to its service
        process (``wandb-core``), which serialises and writes it; both run after ``log()`` returns, on
        another core, and so hold up the next configuration's block (its writer thread finds the core
        taken, the GIL held).  Their CPU time is read from ``/proc/.../task/*/schedstat`` (nanoseconds):
        quiet is three 1 ms windows in a row in which this process's other threads and its child processes
        used under 10% of a core.  Without ``/proc`` (not Linux) nothing is waited for.
        """
        deadline = time.perf_counter() + 10.0
        quiet, before = 0, _background_cpu_ns()
        while before is not None and quiet < 3 and time.perf_counter() < deadline:
            time.sleep(0.001)
            now = _background_cpu_ns()
            if now is None:
                return
            quiet = quiet + 1 if now - before < 100_000 else 0
            before = now

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.run.finish(quiet=True) if _wandb_finish_has_quiet() else self.run.finish()


def _background_cpu_ns() -> int | None:
    """CPU time used so far by this process's other threads and its child processes, or None without /proc."""
    me, this = os.getpid(), str(threading.get_native_id())
    threads: list[str] = []
    pids: set[str] = set()
    try:
        for task in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{task}/children") as f:
                pids.update(f.read().split())
            if task != this:
                threads.append(f"/proc/{me}/task/{task}")
    except OSError:
        return None
    for pid in pids:
        try:
            threads += [f"/proc/{pid}/task/{task}" for task in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # exited meanwhile
    total = 0
    for task in threads:
        try:
            with open(f"{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def _wandb_has_reinit_modes() -> bool:
    import wandb

    return tuple(int(x) for x in wandb.__version__.split(".")[:2]) >= (0, 19)


def _wandb_has_setting(name: str) -> bool:
    import wandb

    return name in getattr(wandb.Settings, "model_fields", {})


def _wandb_finish_has_quiet() -> bool:
    import inspect

    import wandb

    return "quiet" in inspect.signature(wandb.sdk.wandb_run.Run.finish).parameters


class TbdiagWatch(Config):
    label = "tbdiag"

    def setup(self) -> None:
        from tbdiag import DiagnosticWriter

        self.writer = DiagnosticWriter(self.logdir)
        self.handle = self.writer.watch(self.model, self.opt, log_every=self.log_every)

    def layer_count(self) -> int:
        return len(self.handle.layers)


class TbdiagEveryHistogram(TbdiagWatch):
    """tbdiag with histograms at every logging step, the content the histogram peers log."""

    label = "tbdiag+h"

    def setup(self) -> None:
        from tbdiag import DiagnosticWriter

        self.writer = DiagnosticWriter(self.logdir)
        self.handle = self.writer.watch(self.model, self.opt, log_every=self.log_every,
                                        histograms_every=self.log_every)


class TbdiagNoSpikes(TbdiagWatch):
    """tbdiag without the per-step gradient norms of gradient_spike: what the rest costs."""

    label = "tbdiag-s"

    def setup(self) -> None:
        from tbdiag import DiagnosticWriter

        self.writer = DiagnosticWriter(self.logdir)
        self.handle = self.writer.watch(self.model, self.opt, log_every=self.log_every, gradient_spikes=False)


PEERS = {"tb": None, "tbX": "tensorboardX", "wandb": "wandb"}


def available_configs(only: list[str] | None) -> tuple[list[type[Config]], list[str]]:
    import importlib.util

    notes = []
    configs: list[type[Config]] = [Baseline, AA]
    for cls in (SeedLoop, SeedLoopX, WandbWatch, TbdiagWatch, TbdiagEveryHistogram, TbdiagNoSpikes):
        if only and cls.label not in only:
            continue
        module = PEERS.get(cls.label)
        if module and importlib.util.find_spec(module) is None:
            notes.append(f"{cls.label}: skipped ({module} is not installed; pip install -e '.[bench]')")
            continue
        configs.append(cls)
    return configs, notes


# ------------------------------------------------------------- measurement


#: Where a configuration's cost per logged step lands (ms, against the baseline), in the order printed.
COSTS = {
    "logging": "logging step",
    "other": "other steps / log",
    "drain": "drain / log",
    "total": "total / log",
}


@dataclass
class Result:
    workload: str
    log_every: int
    step_ms: float
    block_steps: int
    rounds: int
    overhead: dict[str, float] = field(default_factory=dict)  # label -> median ratio - 1
    spread: dict[str, float] = field(default_factory=dict)  # label -> (q75 - q25) of the ratio
    costs: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> COSTS key -> ms per logged step
    param_pass_ms: float = float("nan")
    full_pass_ms: float = float("nan")  # parameters, gradients and every leaf module's output
    bytes_per_layer: float = float("nan")
    layers: int = 0
    params: int = 0


def split_costs(tr: Config, base: Config) -> dict[str, float]:
    """``tr``'s cost per logged step by where it lands, in ms, each against the baseline's same steps.

    Every configuration runs the same step numbers in a round, so the baseline's step at the same position
    is the reference for each step: the difference is what ``tr``'s logger added there.

    - ``logging``: median of ``tr``'s logging steps minus the median of the baseline's steps at the same
      positions.  Subtracting ``tr``'s own other steps instead would take its background work off twice:
      those steps are slower by exactly that work.
    - ``other``: per round, the summed excess of the block's non-logging steps over the baseline's, divided
      by the logging steps in the block; median over rounds.  A writer thread's work (binning, encoding,
      file writes, under the GIL) and per-step hooks show here.
    - ``drain``: per round, the excess of the drain at the block's end over the baseline's, per logging
      step; median over rounds.  It holds what the block's last logging steps left unwritten, which in
      training lands on the steps that follow.
    - ``total``: per round, the excess of the whole block over the baseline's block, per logging step;
      median over rounds.  Medians do not add, so the three parts sum to it only roughly.
    """
    logged, logged_base, other, drain, total = [], [], [], [], []
    for b, ref in zip(tr.blocks, base.blocks):
        if b.first_step != ref.first_step or b.logging != ref.logging:
            raise RuntimeError(f"{tr.label}: block at step {b.first_step} does not line up with the baseline's")
        n_logs = sum(b.logging)
        logged += [t for t, f in zip(b.step_seconds, b.logging) if f]
        logged_base += [t for t, f in zip(ref.step_seconds, ref.logging) if f]
        rest = sum(t for t, f in zip(b.step_seconds, b.logging) if not f)
        rest_base = sum(t for t, f in zip(ref.step_seconds, ref.logging) if not f)
        other.append((rest - rest_base) / n_logs)
        drain.append((b.drain_seconds - ref.drain_seconds) / n_logs)
        total.append((b.seconds - ref.seconds) / n_logs)
    ms = {"logging": statistics.median(logged) - statistics.median(logged_base), "other": statistics.median(other),
          "drain": statistics.median(drain), "total": statistics.median(total)}
    return {k: v * 1e3 for k, v in ms.items()}


def _pass_ms(tensors: list[torch.Tensor], repeats: int = 30) -> float:
    """Median time of one read of every element of ``tensors`` (one fused norm kernel)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch._foreach_norm(tensors)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _params_and_grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]


def memory_pass_ms(model: nn.Module) -> float:
    """Median time of one read of every parameter and gradient element."""
    return _pass_ms(_params_and_grads(model))


def full_pass_ms(model: nn.Module, x: torch.Tensor) -> float:
    """Median time of one read of every parameter, gradient and leaf module output of a forward on ``x``.

    What the health statistics must read at a logging step (they are never sampled): for models whose
    activations outweigh their parameters (convolutions on images), far more than the parameters alone.
    """
    outputs: list[torch.Tensor] = []
    leaves = [m for m in model.modules() if next(iter(m.children()), None) is None]
    def keep(module: nn.Module, args: tuple, out) -> None:
        if isinstance(out, torch.Tensor):
            outputs.append(out.detach().clone())

    hooks = [m.register_forward_hook(keep) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return _pass_ms(_params_and_grads(model) + [t for t in outputs if t.is_floating_point()])


def tbdiag_event_bytes(logdir: str) -> tuple[int, int]:
    """(bytes of tbdiag's per-step records besides histograms/images/graph/table, logged steps)."""
    from tensorboard.compat.proto import event_pb2

    from tbdiag.contract import schema

    total, steps = 0, set()
    for root, _, files in os.walk(logdir):
        for name in files:
            if "tfevents" not in name:
                continue
            with open(os.path.join(root, name), "rb") as f:
                raw = f.read()
            pos = 0
            while pos + 12 <= len(raw):
                (length,) = struct.unpack("<Q", raw[pos : pos + 8])
                record = raw[pos + 12 : pos + 12 + length]
                size = 12 + length + 4
                pos += size
                event = event_pb2.Event.FromString(record)
                if not event.HasField("summary"):
                    continue
                # share of this record that belongs to per-step diagnostics (an event may hold several values)
                values = event.summary.value
                keep = [v for v in values if _counts_as_step_data(v, schema)]
                if not keep:
                    continue
                if any(schema.is_health_tag(v.tag) for v in keep):
                    steps.add(event.step)
                share = sum(v.ByteSize() for v in keep) / max(1, sum(v.ByteSize() for v in values))
                total += round(size * share)
    return total, len(steps)


def _counts_as_step_data(value, schema) -> bool:
    tag = value.tag
    if tag == "train/loss" or tag == schema.LAYERS_TAG or tag.startswith("tbdiag/model_summary"):
        return False  # the user's own scalar; one-off records
    if value.HasField("histo") or value.HasField("image"):
        return False
    if tag.startswith(("params/", "grads/", "activations/", "images/")):
        return False
    return True


def run_workload(workload: Workload, log_every: int, args, configs: list[type[Config]]) -> Result:
    torch.manual_seed(0)
    proto = workload.make()
    state = copy.deepcopy(proto.state_dict())
    n_params = sum(p.numel() for p in proto.parameters())
    gen = torch.Generator().manual_seed(1)
    data = [workload.sample(args.batch, gen) for _ in range(args.batches)]
    tmp = tempfile.mkdtemp(prefix=f"tbdiag-bench-{workload.name}-{log_every}-")
    os.environ["WANDB_DIR"] = tmp
    trainers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in configs:
            trainers.append(cls(workload, state, data, log_every, tmp))

        # calibrate: one step of the baseline, then a block size that is a multiple of log_every
        base = trainers[0]
        step_s = statistics.mean(base.block(3).step_seconds)  # the steps alone: the drain is a one-off here
        per_block = max(1, round(args.block_seconds / step_s / log_every))
        block_steps = per_block * log_every
        # warm-up: step 0 (graph, layer table, first-time costs) and allocator warm-up.  Any run of
        # block_steps consecutive steps holds the same number of logging steps, so blocks need no alignment.
        for tr in trainers:
            tr.step = 0
            tr.block(min(block_steps, max(3, log_every // 10)))

        # The heap holds every configuration's imports and models (torch, tensorboard, tensorboardX, wandb:
        # ~200k objects, ~100 ms for a full collection on 2 cores), the same for all and none of their doing.
        # Frozen, it is left out of every collection: the collection that ends each block, and any automatic
        # one, walks only what the training loops made since, and an automatic full collection cannot put
        # 100 ms of the shared heap on whichever block happens to trigger it.
        gc.collect()
        gc.freeze()
        try:
            ratios: dict[str, list[float]] = {tr.label: [] for tr in trainers[1:]}
            order = list(range(len(trainers)))
            for r in range(args.rounds):
                # The rotation moves each configuration through every place in the order: what one block
                # does to the machine (caches, clock, other processes) lands on every other one in turn.
                rot = order[r % len(order):] + order[: r % len(order)]
                times = {}
                for i in rot:
                    tr = trainers[i]
                    tr.blocks.append(tr.block(block_steps))
                    times[tr.label] = tr.blocks[-1].seconds
                for tr in trainers[1:]:
                    ratios[tr.label].append(times[tr.label] / times["baseline"])
        finally:
            gc.unfreeze()
        base_ms = statistics.median(t for b in base.blocks for t in b.step_seconds) * 1e3

        result = Result(workload.name, log_every, base_ms, block_steps, args.rounds, layers=0, params=n_params)
        for label, rs in ratios.items():
            result.overhead[label] = statistics.median(rs) - 1
            q = statistics.quantiles(rs, n=4) if len(rs) >= 2 else [rs[0]] * 3
            result.spread[label] = q[2] - q[0]
        for tr in trainers[1:]:
            result.costs[tr.label] = split_costs(tr, base)

        tb = next((tr for tr in trainers if tr.label == "tbdiag"), None)
        if tb is not None:
            result.param_pass_ms = memory_pass_ms(tb.model)
            result.full_pass_ms = full_pass_ms(tb.model, data[0][0])
            result.layers = tb.layer_count()
            tb.writer.flush()
            total, steps = tbdiag_event_bytes(tb.logdir)
            if steps and result.layers:
                result.bytes_per_layer = total / steps / result.layers
        for tr in trainers:
            tr.close()
    del trainers
    gc.collect()
    shutil.rmtree(tmp, ignore_errors=True)
    return result


# ------------------------------------------------------------------ output


def fmt_pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _ours(labels: list[str]) -> list[str]:
    """tbdiag's configurations (default content first), as columns after the peers'."""
    return [label for label in labels if label.startswith("tbdiag")]


def print_table(results: list[Result], labels: list[str], out=sys.stdout) -> None:
    ours = _ours(labels)
    peers = [l for l in labels if l not in ("baseline", "A/A") and l not in ours]
    head = ["workload", "log_every", "step ms", "A/A"] + peers + ours
    if "tbdiag" in labels:
        head += [f"tbdiag/{p}" for p in peers]
    rows = []
    for r in results:
        row = [WORKLOADS[r.workload].title + f" ({r.params / 1e6:.2f}M)", str(r.log_every), f"{r.step_ms:.1f}"]
        row += [f"{fmt_pct(r.overhead[p])} ({r.spread[p] * 100:.1f})" for p in ["A/A"] + peers + ours]
        if "tbdiag" in labels:
            for p in peers:
                peer = r.overhead[p]
                row.append(f"{r.overhead['tbdiag'] / peer:.2f}" if peer > abs(r.overhead["A/A"]) else "n/a")
        rows.append(row)
    _markdown(head, rows, out)
    print(file=out)
    print_costs(results, labels, peers, out)
    if "tbdiag" in labels:
        print(file=out)
        head3 = ["workload", "log_every", "layers", "tbdiag logging step ms", "memory pass ms (params+grads)",
                 "logging step / pass", "total / log / pass", "full pass ms (+ outputs)", "logging step / full pass",
                 "event bytes / layer / logged step"]
        rows3 = []
        for r in results:
            cost = r.costs["tbdiag"]
            rows3.append([WORKLOADS[r.workload].title, str(r.log_every), str(r.layers), f"{cost['logging']:.2f}",
                          f"{r.param_pass_ms:.3f}", f"{cost['logging'] / r.param_pass_ms:.1f}x",
                          f"{cost['total'] / r.param_pass_ms:.1f}x", f"{r.full_pass_ms:.3f}",
                          f"{cost['logging'] / r.full_pass_ms:.1f}x", f"{r.bytes_per_layer:.0f}"])
        _markdown(head3, rows3, out)


def print_costs(results: list[Result], labels: list[str], peers: list[str], out=sys.stdout) -> None:
    """Each configuration's cost per logged step (ms over the baseline), split by where it lands.

    One row per workload, log_every and part, the columns as in the overhead table, so that a logger that
    looks cheap on its logging step but moves the work to a thread shows it in the rows below.
    """
    others = ["A/A"] + peers + _ours(labels)
    head = ["workload", "log_every", "ms per logged step"] + others
    if "tbdiag" in labels:
        head += [f"tbdiag/{p}" for p in peers]
    rows = []
    for r in results:
        for i, (key, name) in enumerate(COSTS.items()):
            row = [WORKLOADS[r.workload].title if i == 0 else "", str(r.log_every) if i == 0 else "", name]
            row += [f"{r.costs[label][key]:+.2f}" for label in others]
            if "tbdiag" in labels:
                noise = abs(r.costs["A/A"][key])
                for p in peers:
                    peer = r.costs[p][key]
                    row.append(f"{r.costs['tbdiag'][key] / peer:.2f}" if peer > noise else "n/a")
            rows.append(row)
    _markdown(head, rows, out)


def _markdown(head: list[str], rows: list[list[str]], out) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |", file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |", file=out)


def _crc_status() -> str:
    try:
        from tbdiag.contract import records
    except ImportError:
        return "tbdiag record writer: TensorBoard's"
    return f"tbdiag record writer: {records.describe()}"


def pin_to_one_core(cpu: int, argv: list[str] | None, script: str | None = None) -> None:
    """Run this benchmark on one CPU, from its first instruction: re-executes itself pinned.

    Pinning after start-up would leave threads that already exist (and their caches) elsewhere; an
    affinity set before ``exec`` holds for every thread and child process the run will make, so a writer
    thread or a logger's service process competes with the training loop for the same core, as it does on
    a machine whose cores are all busy with training, data workers or other jobs.
    """
    allowed = sorted(os.sched_getaffinity(0))
    target = allowed[-1] if cpu < 0 else cpu
    if allowed == [target]:
        return
    os.sched_setaffinity(0, {target})
    script = os.path.abspath(__file__) if script is None else script
    os.execv(sys.executable, [sys.executable, script, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (under a minute): fewer, shorter rounds")
    p.add_argument("--workloads", default="cnn,mlp,resnet,gpt2,llama",
                   help="comma-separated: cnn, mlp, resnet, gpt2, llama, example")
    p.add_argument("--one-core", nargs="?", type=int, const=-1, default=None, metavar="CPU",
                   help="pin the whole process (its threads and child processes) to one CPU (default: the last "
                        "one it may use), so that a writer thread's work is paid inside the step time")
    p.add_argument("--log-every", default="10,100", help="comma-separated log_every values")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds per workload (default 5, quick 2)")
    p.add_argument("--block-seconds", type=float, default=None,
                   help="target seconds per block; rounded up to whole multiples of log_every (default 1.0)")
    p.add_argument("--configs", default=None, help="only these peers/tbdiag (comma-separated labels)")
    p.add_argument("--batches", type=int, default=8, help="distinct synthetic batches cycled through")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {BATCH}, quick 16)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (the figure the README gives, on a quiet machine); cpu: this process's "
                        "CPU time, all threads, which other processes on the machine barely disturb (child "
                        "processes, wandb's service, are not counted: a peer that uses one looks cheaper)")
    args = p.parse_args(argv)
    if args.one_core is not None:
        pin_to_one_core(args.one_core, argv)
    if args.clock == "cpu":
        global clock
        clock = time.process_time
    if args.quick:
        args.rounds = args.rounds or 2
        args.block_seconds = args.block_seconds or 0.2
        args.batch = args.batch or 16
        if args.log_every == "10,100":
            args.log_every = "10"
    args.rounds = args.rounds or 5
    args.batch = args.batch or BATCH
    args.block_seconds = args.block_seconds or 1.0

    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    configs, notes = available_configs(args.configs.split(",") if args.configs else None)
    labels = [c.label for c in configs]
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPUs {sorted(os.sched_getaffinity(0))}, "
          f"batch {args.batch}, clock {args.clock}, "
          f"rounds {args.rounds}, block ~{args.block_seconds}s; {_crc_status()}", file=sys.stderr)
    results = []
    for log_every in [int(x) for x in args.log_every.split(",")]:
        for name in args.workloads.split(","):
            t0 = time.perf_counter()
            r = run_workload(WORKLOADS[name], log_every, args, configs)
            results.append(r)
            print(f"  {name} log_every={log_every}: {r.block_steps} steps/block, {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr)
    print_table(results, labels)
    aa = max(abs(r.overhead["A/A"]) for r in results)
    print(f"\nA/A noise floor (largest |A/A| above): {aa * 100:.1f}%. Overhead = median over {args.rounds} rounds of "
          "block time / baseline block time - 1, in brackets the interquartile range of that ratio over the rounds "
          "(percentage points); "
          "a block is timed from its first step to the end of its drain "
          "(writer flushed, wandb's service idle, garbage collected), nothing untimed between blocks. tbdiag/peer = ratio of overheads "
          "(n/a where the peer is within the A/A noise).")
    print("Per logged step, against the baseline's steps at the same positions: logging step = median of the "
          "logging steps - the baseline's median there; other steps = the block's non-logging steps' summed excess; "
          "drain = the block-end drain's excess; total = the whole block's excess; each per logging step in the "
          "block, median over rounds (medians do not add up exactly). "
          "The pass ratios use the logging step above and the passes measured in this run (full pass: parameters, "
          "gradients and every leaf module output of one forward).")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
