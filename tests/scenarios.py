"""Small real CPU training runs, each healthy or sick with exactly one illness.

Every scenario trains a real model on a learnable synthetic task (labels from
a fixed random "teacher", so a healthy model's loss really falls), watched by
`DiagnosticWriter`, logging its loss as ``train/loss``.  The tests read the
runs back with `tbdiag report`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from seed_cnn import Net as SeedCNN  # noqa: E402  (examples/seed_cnn.py: the seed articles' CNN)
from seed_cnn import synthetic_cifar  # noqa: E402

from tbdiag import DiagnosticWriter  # noqa: E402


@contextlib.contextmanager
def one_thread():
    """Train on one CPU thread, then restore torch's setting: the tests are sized (and timed) for one, and the
    CPU is shared with the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

LOG_EVERY = 5


# ----------------------------------------------------------------- data


def teacher_data(n: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0):
    """Inputs and labels from a fixed random linear teacher: learnable, no downloads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    w = torch.randn(math.prod(shape), classes, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    return x, y


def token_data(n: int, length: int = 12, vocab: int = 20, seed: int = 0, ragged: bool = False):
    """Token sequences labelled by which of 4 token groups is most frequent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g) if ragged else torch.full((n,), length)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    x = x * mask
    groups = torch.stack([((x % 4 == k) & mask).sum(1) for k in range(4)], 1)
    return x, groups.argmax(1), lengths


# ----------------------------------------------------------------- models


class MLP(nn.Module):
    """Linear + activation blocks in ``self.net`` (layers are named ``net.0``, ``net.2``, ...)."""

    def __init__(self, width: int, depth: int, act: Callable[[], nn.Module], d_in: int = 20, d_out: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), act()]
            d = width
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


mlp = MLP


class Block(nn.Module):
    """A torchvision-style BasicBlock: BatchNorm, one nn.ReLU(inplace=True) used twice."""

    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.c1(x)))
        out = self.bn2(self.c2(out))
        out += x
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d_model=d, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class PackedLSTM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, 4)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


# ----------------------------------------------------------------- training


@dataclass
class Scenario:
    name: str
    build: Callable[[str], None]  # writes one run into the given directory
    issue: str | None = None  # the illness the report must find (None: healthy)
    layers: tuple[str, ...] = ()  # where it may be found; the first one must be among them


def train(
    logdir: str,
    model: nn.Module,
    data,
    steps: int = 80,
    lr: float = 0.05,
    optimizer: torch.optim.Optimizer | None = None,
    batch: int = 32,
    forward: Callable | None = None,
    corrupt_at: int | None = None,
    clip: float | None = None,
    seed: int = 0,
) -> None:
    torch.manual_seed(seed)
    x_all, y_all, *rest = data
    opt = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=LOG_EVERY)
    n = len(x_all)
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % n
        x, y = x_all[idx].clone(), y_all[idx]
        if corrupt_at is not None and step == corrupt_at:
            x[3] = float("nan")  # one corrupted sample
        out = forward(model, x, [r[idx] for r in rest]) if forward else model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
    writer.close()


def _dead_bias(logdir: str) -> None:
    torch.manual_seed(1)
    model = mlp(64, 2, nn.ReLU)
    with torch.no_grad():
        model.net[2].bias.fill_(-20.0)  # strongly negative bias: every unit of net.2 is dead
    train(logdir, model, teacher_data(512, (20,)))


def _dead_functional(logdir: str) -> None:
    torch.manual_seed(2)
    model = SeedCNN()
    with torch.no_grad():
        model.conv2.bias.fill_(-20.0)  # behind F.relu(self.conv2(x))
    train(logdir, model, synthetic_cifar(512), lr=0.01)


def _dead_inplace(logdir: str) -> None:
    torch.manual_seed(3)
    model = mlp(64, 2, lambda: nn.ReLU(inplace=True))
    with torch.no_grad():
        model.net[2].bias.fill_(-20.0)
    train(logdir, model, teacher_data(512, (20,)))


def _vanishing(logdir: str) -> None:
    torch.manual_seed(4)
    train(logdir, mlp(32, 10, nn.Sigmoid), teacher_data(512, (20,)), lr=0.1)


def _big_init(model: nn.Module, std: float) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, std)
    return model


def _exploding(logdir: str) -> None:
    torch.manual_seed(5)
    model = _big_init(mlp(128, 5, nn.ReLU), 1.0)  # ~10x the Kaiming scale
    train(logdir, model, teacher_data(512, (20,)), lr=1e-9, steps=40)  # tiny steps: no NaN follows


def _exploding_then_nan(logdir: str) -> None:
    torch.manual_seed(6)
    model = _big_init(mlp(128, 5, nn.ReLU), 1.0)
    train(logdir, model, teacher_data(512, (20,)), lr=0.05, steps=40)


def _saturated(logdir: str) -> None:
    torch.manual_seed(7)
    model = _big_init(mlp(64, 2, nn.Tanh), 2.0)
    train(logdir, model, teacher_data(512, (20,)), lr=0.001)


def _nan_input(logdir: str) -> None:
    torch.manual_seed(8)
    train(logdir, SeedCNN(), synthetic_cifar(512), lr=0.01, corrupt_at=23, steps=40)


def _frozen(logdir: str) -> None:
    torch.manual_seed(9)
    model = mlp(64, 2, nn.ReLU)
    left_out = {id(p) for p in model.net[2].parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in left_out], lr=0.05, momentum=0.9)
    train(logdir, model, teacher_data(512, (20,)), optimizer=opt)


def _healthy_cnn(logdir: str) -> None:
    torch.manual_seed(10)
    train(logdir, SeedCNN(), synthetic_cifar(512), lr=0.01)


def _healthy_cnn_batch4(logdir: str) -> None:
    # the tutorial's batch of 4: many fc units are silent over 4 samples by chance, without being dead
    # (lr 0.01: at the tutorial's 0.001 the loss has not left ln 10 after 120 steps, a real plateau)
    torch.manual_seed(16)
    train(logdir, SeedCNN(), synthetic_cifar(512), lr=0.01, batch=4, steps=120)


def _healthy_resnet(logdir: str) -> None:
    torch.manual_seed(11)
    train(logdir, SmallResNet(), teacher_data(256, (3, 16, 16)), lr=0.05, steps=40)


def _healthy_transformer(logdir: str) -> None:
    torch.manual_seed(12)
    model = TinyTransformer()
    x, y, _ = token_data(512)
    train(logdir, model, (x, y), optimizer=torch.optim.Adam(model.parameters(), lr=3e-3))


def _healthy_lstm(logdir: str) -> None:
    torch.manual_seed(13)
    model = PackedLSTM()
    x, y, lengths = token_data(512, ragged=True)
    train(logdir, model, (x, y, lengths), optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
          forward=lambda m, xb, rest: m(xb, rest[0]))


def _healthy_deep_mlp(logdir: str) -> None:
    torch.manual_seed(14)
    model = mlp(64, 12, nn.ReLU)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.zero_()
    train(logdir, model, teacher_data(512, (20,)), lr=0.01)


def _healthy_finetune(logdir: str) -> None:
    torch.manual_seed(15)
    model = SeedCNN()
    for name, p in model.named_parameters():
        if not name.startswith("fc3"):
            p.requires_grad_(False)  # an intentionally frozen backbone
    train(logdir, model, synthetic_cifar(512), optimizer=torch.optim.SGD(model.fc3.parameters(), lr=0.5, momentum=0.9))


SICK = [
    Scenario("dead_bias", _dead_bias, "dead_relu", ("net.2", "net.3")),
    Scenario("dead_functional", _dead_functional, "dead_relu", ("conv2",)),
    Scenario("dead_inplace", _dead_inplace, "dead_relu", ("net.2", "net.3")),
    # the first layers lose the most gradient; deeper ones may be flagged too, never the output layer
    Scenario("vanishing_sigmoid", _vanishing, "vanishing_gradient", tuple(f"net.{2 * i}" for i in range(10))),
    Scenario("exploding_init", _exploding, "exploding_gradient", ("net.0", "net.2", "net.4", "net.6", "net.8", "net.10")),
    Scenario("exploding_then_nan", _exploding_then_nan, "exploding_gradient",
             ("net.0", "net.2", "net.4", "net.6", "net.8", "net.10")),
    Scenario("saturated_tanh", _saturated, "saturated_activation", ("net.0", "net.2")),
    Scenario("nan_input", _nan_input, "nonfinite", ("conv1",)),
    Scenario("missing_from_optimizer", _frozen, "frozen_layer", ("net.2",)),
]
HEALTHY = [
    Scenario("healthy_cnn", _healthy_cnn),
    Scenario("healthy_cnn_batch4", _healthy_cnn_batch4),
    Scenario("healthy_resnet", _healthy_resnet),
    Scenario("healthy_transformer", _healthy_transformer),
    Scenario("healthy_lstm", _healthy_lstm),
    Scenario("healthy_deep_mlp", _healthy_deep_mlp),
    Scenario("healthy_finetune", _healthy_finetune),
]
ALL = {s.name: s for s in SICK + HEALTHY}


def build_all(root: str, names=None) -> dict[str, str]:
    """Write the named scenarios (default: all) as runs under ``root``; returns name -> run directory."""
    out = {}
    for name in names or ALL:
        path = os.path.join(root, name)
        ALL[name].build(path)
        out[name] = path
    return out


if __name__ == "__main__":  # python tests/scenarios.py DIR: write every scenario for a look in TensorBoard
    import sys

    build_all(sys.argv[1] if len(sys.argv) > 1 else "runs/scenarios")
