"""Activation images show what the layer feeds forward (post-activation) on one fixed scale: dead is black."""

import io
import math

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

from tbdiag import DiagnosticWriter
from tbdiag.measure import stats

CHANNELS, SIDE = 8, 14
DEAD = (0, 3, 5)


class HalfDeadConv(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(CHANNELS, 2)
        with torch.no_grad():
            self.conv.bias[list(DEAD)] = -100.0  # these channels never fire

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


def _tiles(png: bytes) -> list[np.ndarray]:
    grid = np.asarray(Image.open(io.BytesIO(png)))
    cols = math.ceil(math.sqrt(CHANNELS))
    return [grid[r * (SIDE + 1): r * (SIDE + 1) + SIDE, q * (SIDE + 1): q * (SIDE + 1) + SIDE]
            for r, q in (divmod(k, cols) for k in range(CHANNELS))]


def _logged_tiles(tmp_path, inplace: bool) -> list[np.ndarray]:
    torch.manual_seed(0)
    model = HalfDeadConv(inplace)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1, images_every=1)
    x = torch.randn(4, 3, SIDE, SIDE)
    loss = model(x).square().mean()
    opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.IMAGES: 0})
    acc.Reload()
    return _tiles(acc.Images("images/conv")[0].encoded_image_string)


def test_dead_channels_are_black_and_live_ones_are_not(tmp_path):
    for inplace in (False, True):
        tiles = _logged_tiles(tmp_path / str(inplace), inplace)
        for k, tile in enumerate(tiles):
            if k in DEAD:
                assert tile.max() == 0, f"dead channel {k} is not black (inplace={inplace})"
            else:
                assert tile.max() > 0, f"live channel {k} is black (inplace={inplace})"


def test_feature_grid_scales():
    x = torch.tensor([[[[-2.0, 0.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    relu = stats.feature_grid(x.relu(), kind="relu")
    assert relu[1].max() == 0 and relu[0].max() == 1  # one scale for all channels: zeros stay black
    raw = stats.feature_grid(x)  # raw output: from the smallest to the largest value over all channels
    assert raw.min() == 0 and raw.max() == 1 and torch.allclose(raw[1], torch.full((2, 2), 2 / 6))
    assert torch.allclose(stats.feature_grid(torch.zeros(1, 1, 2, 2), kind="tanh"), torch.full((1, 2, 2), 0.5))
    assert torch.equal(stats.feature_grid(torch.full((1, 1, 2, 2), 0.25), kind="sigmoid"),
                       torch.full((1, 2, 2), 0.25))
