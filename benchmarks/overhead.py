"""Step-time overhead of tbdiag against the tools users pick instead, side by side.

One process.  Every configuration trains its own copy of the same model (same
initial weights, same batches) with its own optimizer and its own logger.
Configurations take turns in blocks of steps, and the order rotates every
round.  After each block, untimed, the configuration's writer is flushed and
a garbage collection runs, so the work one leaves behind (a writer thread's
tail, garbage) does not land on the next one.  Overhead of a configuration is
the median over rounds of (its block time / the baseline's block time) - 1.

Configurations
    baseline   the loss scalar each step (torch.utils.tensorboard.SummaryWriter)
    A/A        a second copy of the baseline: the run's noise floor
    tb         the seed-style loop: loss scalar each step; every N steps
               add_histogram of every parameter and every gradient
    tbX        the same loop through tensorboardX
    wandb      wandb.watch(model, log="all", log_freq=N), offline, loss via wandb.log
    tbdiag     DiagnosticWriter.watch(model, optimizer, log_every=N), default content

Workloads (one thread, batch 64, synthetic data)
    cnn        the seed articles' CIFAR classifier CNN ("Training a Classifier":
               conv(3,c1,5)-pool-conv(c1,c2,5)-pool-fc-fc-fc with F.relu) at width
               32/64/288/128 on 32x32 inputs: 0.55M parameters
    mlp        a 26-layer MLP (Linear+ReLU, width 310): 2.4M parameters
    resnet     a ResNet-20-style CIFAR ResNet (BatchNorm, ReLU(inplace=True)), 16/32/64
               channels, on 16x16 inputs (a quarter of CIFAR's compute per step, so that
               100-step blocks stay affordable): 0.27M parameters

Besides the table it measures, for tbdiag, the cost of one logging step (its
step time minus the median non-logging step of the same blocks) against one
memory pass over the parameters and gradients (``torch._foreach_norm`` over
all of them: every element read once), and the event bytes tbdiag writes per
layer per logged step besides histograms and images.

    python benchmarks/overhead.py            # the full run (about 15 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # smoke run, under a minute
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


@dataclass
class Workload:
    name: str
    title: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int = 10


WORKLOADS = {
    "cnn": Workload("cnn", "seed CNN", lambda: Net(32, 64, 288, 128), (3, 32, 32)),
    "mlp": Workload("mlp", "26-layer MLP", deep_mlp, (256,)),
    "resnet": Workload("resnet", "ResNet-20 + BatchNorm", SmallResNet, (3, 16, 16)),
    # not in the default set: the main example's CNN at the tutorial's widths (62K parameters)
    "example": Workload("example", "seed CNN, tutorial widths", Net, (3, 32, 32)),
}


# ----------------------------------------------------------- configurations


class Config:
    """One trainer: a model copy, its optimizer, its logger; runs blocks of steps."""

    label = "?"

    def __init__(self, workload: Workload, state: dict, data: list, log_every: int, tmp: str):
        self.model = workload.make()
        self.model.load_state_dict(state)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.data = data
        self.log_every = log_every
        self.step = 0
        self.logdir = os.path.join(tmp, self.label.replace("/", ""))
        self.step_times: list[float] = []
        self.logging_flags: list[bool] = []
        self.setup()

    def setup(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.logdir)

    def log_step(self, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, self.step)

    def block(self, steps: int, record: bool) -> float:
        t_block = time.perf_counter()
        for _ in range(steps):
            x, y = self.data[self.step % len(self.data)]
            t0 = time.perf_counter()
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.log_step(loss.item())
            if record:
                self.step_times.append(time.perf_counter() - t0)
                self.logging_flags.append(self.step % self.log_every == 0)
            self.step += 1
        return time.perf_counter() - t_block

    def settle(self) -> None:
        """Finish the background writing this block left behind, outside the timed region."""
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

    def settle(self) -> None:
        pass  # wandb writes from its own service process

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.run.finish(quiet=True) if _wandb_finish_has_quiet() else self.run.finish()


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


PEERS = {"tb": None, "tbX": "tensorboardX", "wandb": "wandb"}


def available_configs(only: list[str] | None) -> tuple[list[type[Config]], list[str]]:
    import importlib.util

    notes = []
    configs: list[type[Config]] = [Baseline, AA]
    for cls in (SeedLoop, SeedLoopX, WandbWatch, TbdiagWatch):
        if only and cls.label not in only:
            continue
        module = PEERS.get(cls.label)
        if module and importlib.util.find_spec(module) is None:
            notes.append(f"{cls.label}: skipped ({module} is not installed; pip install -e '.[bench]')")
            continue
        configs.append(cls)
    return configs, notes


# ------------------------------------------------------------- measurement


@dataclass
class Result:
    workload: str
    log_every: int
    step_ms: float
    block_steps: int
    rounds: int
    overhead: dict[str, float] = field(default_factory=dict)  # label -> median ratio - 1
    spread: dict[str, float] = field(default_factory=dict)  # label -> (q75 - q25) of the ratio
    log_step_ms: float = float("nan")
    param_pass_ms: float = float("nan")
    bytes_per_layer: float = float("nan")
    layers: int = 0
    params: int = 0


def memory_pass_ms(model: nn.Module, repeats: int = 30) -> float:
    """Median time of one read of every parameter and gradient element (one fused norm kernel)."""
    tensors = [p.detach() for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch._foreach_norm(tensors)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def tbdiag_event_bytes(logdir: str) -> tuple[int, int]:
    """(bytes of tbdiag's per-step records besides histograms/images/graph/table, logged steps)."""
    from tensorboard.compat.proto import event_pb2

    from tbdiag import schema

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
    data = [
        (torch.randn((args.batch, *workload.input_shape), generator=gen),
         torch.randint(0, workload.classes, (args.batch,), generator=gen))
        for _ in range(args.batches)
    ]
    tmp = tempfile.mkdtemp(prefix=f"tbdiag-bench-{workload.name}-{log_every}-")
    os.environ["WANDB_DIR"] = tmp
    trainers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in configs:
            trainers.append(cls(workload, state, data, log_every, tmp))

        # calibrate: one step of the baseline, then a block size that is a multiple of log_every
        base = trainers[0]
        t0 = time.perf_counter()
        base.block(3, record=False)
        step_s = (time.perf_counter() - t0) / 3
        per_block = max(1, round(args.block_seconds / step_s / log_every))
        block_steps = per_block * log_every
        # warm-up: step 0 (graph, layer table, first-time costs) and allocator warm-up.  Any run of
        # block_steps consecutive steps holds the same number of logging steps, so blocks need no alignment.
        for tr in trainers:
            tr.step = 0
            tr.block(min(block_steps, max(3, log_every // 10)), record=False)

        ratios: dict[str, list[float]] = {tr.label: [] for tr in trainers[1:]}
        order = list(range(len(trainers)))
        for r in range(args.rounds):
            rot = order[r % len(order):] + order[: r % len(order)]
            times = {}
            for i in rot:
                tr = trainers[i]
                times[tr.label] = tr.block(block_steps, record=True)
                # work one configuration leaves behind (writer threads, garbage) must not land on the next
                tr.settle()
                gc.collect()
            for tr in trainers[1:]:
                ratios[tr.label].append(times[tr.label] / times["baseline"])
        base_ms = statistics.median(base.step_times) * 1e3

        result = Result(workload.name, log_every, base_ms, block_steps, args.rounds, layers=0, params=n_params)
        for label, rs in ratios.items():
            result.overhead[label] = statistics.median(rs) - 1
            q = statistics.quantiles(rs, n=4) if len(rs) >= 2 else [rs[0]] * 3
            result.spread[label] = q[2] - q[0]

        tb = next((tr for tr in trainers if tr.label == "tbdiag"), None)
        if tb is not None:
            logging_t = [t for t, f in zip(tb.step_times, tb.logging_flags) if f]
            plain_t = [t for t, f in zip(tb.step_times, tb.logging_flags) if not f]
            if logging_t and plain_t:
                result.log_step_ms = (statistics.median(logging_t) - statistics.median(plain_t)) * 1e3
            result.param_pass_ms = memory_pass_ms(tb.model)
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


def print_table(results: list[Result], labels: list[str], out=sys.stdout) -> None:
    peers = [l for l in labels if l not in ("baseline", "A/A", "tbdiag")]
    head = ["workload", "log_every", "step ms", "A/A"] + peers + (["tbdiag"] if "tbdiag" in labels else [])
    if "tbdiag" in labels:
        head += [f"tbdiag/{p}" for p in peers]
    rows = []
    for r in results:
        row = [WORKLOADS[r.workload].title + f" ({r.params / 1e6:.2f}M)", str(r.log_every), f"{r.step_ms:.1f}",
               f"{fmt_pct(r.overhead['A/A'])}"]
        row += [fmt_pct(r.overhead[p]) for p in peers]
        if "tbdiag" in labels:
            row.append(fmt_pct(r.overhead["tbdiag"]))
            for p in peers:
                peer = r.overhead[p]
                row.append(f"{r.overhead['tbdiag'] / peer:.2f}" if peer > abs(r.overhead["A/A"]) else "n/a")
        rows.append(row)
    _markdown(head, rows, out)
    if "tbdiag" in labels:
        print(file=out)
        head2 = ["workload", "log_every", "layers", "tbdiag logging step ms", "memory pass ms (params+grads)",
                 "logging step / pass", "event bytes / layer / logged step"]
        rows2 = [[WORKLOADS[r.workload].title, str(r.log_every), str(r.layers), f"{r.log_step_ms:.2f}",
                  f"{r.param_pass_ms:.3f}", f"{r.log_step_ms / r.param_pass_ms:.1f}x", f"{r.bytes_per_layer:.0f}"]
                 for r in results]
        _markdown(head2, rows2, out)


def _markdown(head: list[str], rows: list[list[str]], out) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |", file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |", file=out)


def _crc_status() -> str:
    try:
        from tbdiag import recordio
    except ImportError:
        return "tbdiag record writer: TensorBoard's"
    return f"tbdiag record writer: {recordio.describe()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (under a minute): fewer, shorter rounds")
    p.add_argument("--workloads", default="cnn,mlp,resnet", help="comma-separated: cnn, mlp, resnet, example")
    p.add_argument("--log-every", default="10,100", help="comma-separated log_every values")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds per workload (default 5, quick 2)")
    p.add_argument("--block-seconds", type=float, default=None,
                   help="target seconds per block; rounded up to whole multiples of log_every (default 1.0)")
    p.add_argument("--configs", default=None, help="only these peers/tbdiag (comma-separated labels)")
    p.add_argument("--batches", type=int, default=8, help="distinct synthetic batches cycled through")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {BATCH}, quick 16)")
    args = p.parse_args(argv)
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
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
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
          "block time / baseline block time - 1; tbdiag/peer = ratio of overheads (n/a where the peer is within "
          "the A/A noise).")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
