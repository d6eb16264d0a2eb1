"""The seed CNN and a learnable CIFAR-10-shaped synthetic data set, shared by the examples, tests and benchmarks.

The CNN is the one of PyTorch's "Training a classifier" tutorial, with
activations applied functionally (``F.relu(self.conv2(x))``), as most
articles write it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The tutorial's widths by default (62K parameters); the benchmarks widen it (32/64/288/128: 0.55M)."""

    def __init__(self, c1: int = 6, c2: int = 16, f1: int = 120, f2: int = 84, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def synthetic_cifar(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10-shaped images: one smooth random pattern per class, plus noise (learnable, no download)."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(10, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 * patterns[y] + torch.randn(n, 3, 32, 32, generator=g)
    return x, y
