"""Per-channel sprite sheets and image files.

The windows the sheets are made of (``display_box``, ``crop_box``, ``resize_square``) are cut by
:mod:`sitegen.crops`, which the analysis passes share.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..crops import resize_square


WEBP_QUALITY = 90
WEBP_METHOD = 2
"""libwebp's effort (0 fastest, 6 smallest files) at the same quality setting.  Encoding was two
thirds of the render's time at method 4 (libwebp's default): on CIFAR sprites (4 rows of 9 patches
of 96 px) method 2 took 13.5 ms a sprite against 30.7 ms, for files 4.5 % larger (61.0 against
58.4 KB); methods 1 and 0 save little more time for larger files."""


def sprite(rows: list[list[np.ndarray]], size: int, columns: int) -> np.ndarray:
    """A (rows × columns) grid of size×size cells; missing cells stay white."""
    sheet = np.full((len(rows) * size, columns * size, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            sheet[r * size:(r + 1) * size, c * size:(c + 1) * size] = resize_square(cell, size)
    return sheet


def encode(arr: np.ndarray, fmt: str = "png") -> bytes:
    """The file's bytes as :func:`save_image` writes them (the size estimate encodes samples with it)."""
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "webp":
        img.save(buf, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    else:
        img.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def save_image(arr: np.ndarray, path: Path, fmt: str = "png") -> int:
    """Write an image; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode(arr, fmt)
    path.write_bytes(data)
    return len(data)
