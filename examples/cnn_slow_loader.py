"""The seed CNN trained twice: with a slow input pipeline, and with its data cached after decoding.

    python examples/cnn_slow_loader.py          # writes runs/slow_loader and runs/cached_loader, prints the report
    tensorboard --logdir runs                   # then open the Diagnostics tab

The slow run reads its batches through a ``DataLoader`` whose data set
"decodes" every batch on request (a ``time.sleep`` of 50 ms stands for
reading and decoding images from disk) in the training process
(``num_workers=0``): the model idles while each batch is made, and
``tbdiag report`` says ``input_bound`` with the share of time spent waiting.
The fixed run decodes once and keeps the decoded tensors in memory (the
other fixes the finding lists, ``num_workers``, ``pin_memory``,
``persistent_workers`` and ``prefetch_factor``, overlap the decoding with
training instead).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Iterable

import torch
import torch.nn.functional as F
from seed_cnn import Net, synthetic_cifar
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from tbdiag import DiagnosticWriter
from tbdiag.cli import main as tbdiag_main


class DecodingDataset(Dataset):
    """Indexed by a list of sample indices (one batch, from a `BatchSampler`); each batch costs ``delay`` s."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, delay: float):
        self.x, self.y, self.delay = x, y, delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)  # reading and decoding the batch's files
        return self.x[indices], self.y[indices]


class CachedBatches:
    """The decoded data kept in memory: each epoch one shuffle, then batches as slices (no per-batch work)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int = 0):
        self.x, self.y, self.batch = x, y, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.generator)
        x, y = self.x[perm], self.y[perm]
        for i in range(len(self)):
            yield x[i * self.batch : (i + 1) * self.batch], y[i * self.batch : (i + 1) * self.batch]


def slow_loader(delay: float = 0.05, batch: int = 64, seed: int = 0) -> DataLoader:
    """Batches of the synthetic CIFAR-shaped set, each taking ``delay`` seconds to decode, in the training process."""
    x, y = synthetic_cifar()
    sampler = BatchSampler(RandomSampler(x, generator=torch.Generator().manual_seed(seed)), batch, drop_last=True)
    return DataLoader(DecodingDataset(x, y, delay), sampler=sampler, batch_size=None, num_workers=0)


def cached_loader(batch: int = 64, seed: int = 0) -> CachedBatches:
    """The same batches, decoded once and kept in memory."""
    x, y = synthetic_cifar()
    return CachedBatches(x, y, batch, seed)


def train(logdir: str, data: Iterable, steps: int, log_every: int) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, optimizer, log_every=log_every)
    step = 0
    while step < steps:
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            writer.add_scalar("train/loss", loss.item(), step)
            step += 1
            if step == steps:
                break
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--steps", type=int, default=101)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the slow loader takes per batch")
    args = parser.parse_args(argv)
    for name in ("slow_loader", "cached_loader"):
        shutil.rmtree(os.path.join(args.logdir, name), ignore_errors=True)
    print(f"training with the slow loader ({args.steps} steps, {1000 * args.delay:.0f} ms per batch)...", flush=True)
    train(os.path.join(args.logdir, "slow_loader"), slow_loader(args.delay), args.steps, args.log_every)
    print("training with the decoded data cached in memory...", flush=True)
    train(os.path.join(args.logdir, "cached_loader"), cached_loader(), args.steps, args.log_every)
    print(f"\n$ tbdiag report {args.logdir}\n", flush=True)
    tbdiag_main(["report", args.logdir])
    print(f"\nNow look at it in TensorBoard (Diagnostics tab):\n\n    tensorboard --logdir {args.logdir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
