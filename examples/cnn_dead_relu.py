"""The seed CNN trained twice on synthetic data: healthy, and with a dead-ReLU layer injected mid-run.

    python examples/cnn_dead_relu.py            # writes runs/healthy and runs/dead_relu, prints the report
    tensorboard --logdir runs                   # then open the Diagnostics tab

The CNN (``seed_cnn.py``) is the one of PyTorch's "Training a classifier"
tutorial, with activations applied functionally (``F.relu(self.conv2(x))``).
The data are CIFAR-10-shaped images made of one smooth random pattern per
class plus noise, so the task is learnable and nothing is downloaded.  In the sick run, conv2's
bias is pushed to -20 at step 120: from then on every channel of conv2 is
dead, and the report says so, naming the layer and the step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from seed_cnn import Net, synthetic_cifar

from tbdiag import DiagnosticWriter
from tbdiag.cli import main as tbdiag_main


def train(logdir: str, steps: int, log_every: int, inject_dead_at: int | None, batch: int = 64) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x_all, y_all = synthetic_cifar()
    writer = DiagnosticWriter(logdir)
    writer.watch(model, optimizer, log_every=log_every)
    for step in range(steps):
        if step == inject_dead_at:
            with torch.no_grad():
                model.conv2.bias.fill_(-20.0)  # the illness: every conv2 channel stops firing
        idx = torch.randint(0, len(x_all), (batch,))
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        writer.add_scalar("train/loss", loss.item(), step)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--inject-at", type=int, default=120, help="step at which conv2 dies in the sick run")
    args = parser.parse_args(argv)
    for name in ("healthy", "dead_relu"):
        shutil.rmtree(os.path.join(args.logdir, name), ignore_errors=True)
    print(f"training the healthy run ({args.steps} steps)...", flush=True)
    train(os.path.join(args.logdir, "healthy"), args.steps, args.log_every, inject_dead_at=None)
    print(f"training the sick run (conv2 killed at step {args.inject_at})...", flush=True)
    train(os.path.join(args.logdir, "dead_relu"), args.steps, args.log_every, inject_dead_at=args.inject_at)
    print(f"\n$ tbdiag report {args.logdir}\n", flush=True)
    tbdiag_main(["report", args.logdir])
    print(f"\nNow look at it in TensorBoard (Diagnostics tab):\n\n    tensorboard --logdir {args.logdir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
