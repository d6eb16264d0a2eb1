"""Activation images: a sample's feature maps tiled into one bounded PNG."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from tensorboard.compat.proto import summary_pb2


def tile(maps: np.ndarray, pad: int = 1) -> np.ndarray:
    """``[C, h, w]`` maps in [0, 1] -> one ``[H, W]`` uint8 grid, as square as possible."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError(f"feature maps must be [channels, height, width], got {maps.shape}")
    c, h, w = maps.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad), dtype=np.uint8)
    scaled = (np.clip(np.nan_to_num(maps), 0.0, 1.0) * 255).round().astype(np.uint8)
    for k in range(c):
        r, q = divmod(k, cols)
        grid[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = scaled[k]
    return grid


def image_summary(tag: str, maps: np.ndarray) -> summary_pb2.Summary:
    grid = tile(maps)
    buf = io.BytesIO()
    Image.fromarray(grid, mode="L").save(buf, format="PNG")
    image = summary_pb2.Summary.Image(
        height=grid.shape[0], width=grid.shape[1], colorspace=1, encoded_image_string=buf.getvalue()
    )
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)])
