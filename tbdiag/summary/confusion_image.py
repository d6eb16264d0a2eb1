"""A confusion matrix as a picture for TensorBoard's Images tab (PIL only, no plotting library).

Rows are true classes, columns predicted ones; a cell's colour is its share of
its row (row-normalised: each class's recall pattern, whatever its size), its
text the count.  Few classes get names and counts; many get colours alone, so
the picture stays bounded (at most about 640 pixels a side for the matrix).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Up to this many classes, cells carry their count and axes the class names.
MAX_LABELLED = 20
_MATRIX_PIXELS = 640
_LIGHT, _DARK = np.array([255, 255, 255]), np.array([21, 101, 192])  # white to the tab's blue


def _row_shares(counts: np.ndarray) -> np.ndarray:
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, counts / np.maximum(rows, 1), 0.0)


def render(counts: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``[H, W, 3]`` uint8 picture of a ``[C, C]`` confusion matrix."""
    counts = np.asarray(counts)
    n = counts.shape[0]
    shares = _row_shares(counts)
    labelled = n <= MAX_LABELLED
    cell = max(2, min(48, _MATRIX_PIXELS // max(n, 1))) if not labelled else max(24, min(48, _MATRIX_PIXELS // n))
    font = ImageFont.load_default()
    names = [str(x)[:14] for x in class_names]
    name_w = (max(int(font.getlength(x)) for x in names) + 10) if labelled and names else 0
    left, top = 18 + name_w, 18 + (14 if labelled else 0)
    width, height = left + n * cell + 4, top + n * cell + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colours = (_LIGHT + (_DARK - _LIGHT) * shares[..., None]).round().astype(np.uint8)
    block = np.kron(colours, np.ones((cell, cell, 1), dtype=np.uint8))  # each cell a cell x cell square
    image.paste(Image.fromarray(block, "RGB"), (left, top))
    draw.text((left, 2), "predicted", fill=(80, 80, 80), font=font)
    draw.text((2, top), "true", fill=(80, 80, 80), font=font)
    if labelled:
        for i, name in enumerate(names):
            y = top + i * cell + cell // 2
            draw.text((left - 6, y), name, fill=(40, 40, 40), font=font, anchor="rm")
            draw.text((left + i * cell + cell // 2, top - 4), name[: max(1, cell // 7)], fill=(40, 40, 40),
                      font=font, anchor="ms")
            for j in range(n):
                text = str(int(counts[i, j]))
                if font.getlength(text) > cell - 2:
                    continue
                ink = (255, 255, 255) if shares[i, j] > 0.5 else (40, 40, 40)
                draw.text((left + j * cell + cell // 2, y), text, fill=ink, font=font, anchor="mm")
    draw.rectangle([left - 1, top - 1, left + n * cell, top + n * cell], outline=(170, 170, 170))
    draw.text((left, top + n * cell + 4), "colour: share of the true class's samples", fill=(110, 110, 110),
              font=font)
    return np.asarray(image)
