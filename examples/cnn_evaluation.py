"""The seed CNN with an evaluation pass per epoch on a held-out split, where one class is hard.

    python examples/cnn_evaluation.py           # writes runs/eval_hard_cat and runs/eval_balanced, prints the report
    tensorboard --logdir runs                   # then open the Diagnostics tab (its Evaluation section)

The data are CIFAR-10-shaped synthetic images (one smooth random pattern per
class plus noise, ``seed_cnn.synthetic_cifar``'s recipe) named after
CIFAR-10's classes.  In the hard run "cat" looks almost exactly like "dog" and
is rare in the training split (as a minority class often is): the model learns
to answer "dog" for both, and `neglected_class` names "cat".  The balanced run
is the same model and data without that: every class is learned, no finding.
After each epoch one call records the evaluation::

    writer.add_evaluation("val", y_val, model(x_val), epoch, class_names=CLASSES)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from seed_cnn import Net

from tbdiag import DiagnosticWriter
from tbdiag.cli import main as tbdiag_main

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CAT, DOG = CLASSES.index("cat"), CLASSES.index("dog")


def split(n: int, seed: int, hard_cat: bool, cat_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images; with ``hard_cat``, cats look like dogs and make up ``cat_share`` of the split."""
    g = torch.Generator().manual_seed(0)  # the class patterns: the same for every split
    patterns = F.interpolate(torch.randn(10, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    if hard_cat:
        patterns[CAT] = patterns[DOG] + 0.05 * (patterns[CAT] - patterns[DOG])
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    if hard_cat:  # a minority class: most would-be cats are dogs
        keep = torch.rand(n, generator=g) < cat_share * 10
        y = torch.where((y == CAT) & ~keep, torch.full_like(y, DOG), y)
    x = 0.5 * patterns[y] + torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def train(logdir: str, hard_cat: bool, epochs: int = 6, n_train: int = 2048, batch: int = 64) -> None:
    torch.manual_seed(0)
    x_train, y_train = split(n_train, seed=1, hard_cat=hard_cat, cat_share=0.03)
    x_val, y_val = split(1000, seed=2, hard_cat=hard_cat, cat_share=0.10)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, optimizer, log_every=8)
    step = 0
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(n_train).split(batch):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            writer.add_scalar("train/loss", loss.item(), step)
            step += 1
        model.eval()
        with torch.no_grad():
            writer.add_evaluation("val", y_val, model(x_val), epoch, class_names=CLASSES)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    for name, hard in (("eval_hard_cat", True), ("eval_balanced", False)):
        shutil.rmtree(os.path.join(args.logdir, name), ignore_errors=True)
        print(f"training {name} ({args.epochs} epochs, an evaluation after each)...", flush=True)
        train(os.path.join(args.logdir, name), hard_cat=hard, epochs=args.epochs)
    print(f"\n$ tbdiag report {args.logdir}\n", flush=True)
    tbdiag_main(["report", args.logdir])
    print(f"\nNow look at it in TensorBoard (Diagnostics tab):\n\n    tensorboard --logdir {args.logdir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
