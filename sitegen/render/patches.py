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


WEBP_LOSSLESS_EFFORT = 25
"""libwebp's lossless effort (``quality`` in lossless mode, 0-100) at ``method`` 0, for sheets the
browser enlarges: on CIFAR sprites at their own 32 px (4 rows of 9 windows) 0.9 ms a sheet and
34 KB, where the same sheet enlarged to 96 px cost 10.4 ms and 40 KB lossy (measured); lossy
coding's 2×2 chroma blocks would be enlarged with the pixels."""

ENLARGED_FROM = 3
"""Windows at most ``size / ENLARGED_FROM`` px are stored at their own pixels (and coded
losslessly); larger ones are drawn at ``size`` and coded lossy, as every window was before.
Measured on crops of scikit-learn's photographs resized to 224 px (one row of 9 windows): lossless
at their own pixels against lossy enlarged to 96 px, 3.6 against 5.7 kB at 16 px, 13.4 against
11.1 kB at 32 px, but 28.7 against 13.5 kB at 48 px and 79.3 against 20.8 kB at 80 px."""


def cell_size(rows: list[list[np.ndarray]], size: int) -> int:
    """The side of a sheet's cells.  Where the largest window is at most a third of ``size`` (the
    side the page shows: a CIFAR model's 32-px images at 96), its own pixels: the page enlarges
    them (``image-rendering: pixelated``, as nearest-neighbour enlargement here would), with 9
    times fewer pixels to encode and store; otherwise ``size`` (larger windows shrunk to it,
    smaller ones enlarged)."""
    side = max((max(cell.shape[:2]) for row in rows for cell in row), default=size)
    return max(1, int(side)) if side * ENLARGED_FROM <= size else int(size)


def sprite(rows: list[list[np.ndarray]], size: int, columns: int) -> np.ndarray:
    """A (rows × columns) grid of square cells of :func:`cell_size` px; missing cells stay white."""
    cell_px = cell_size(rows, size)
    sheet = np.full((len(rows) * cell_px, columns * cell_px, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            sheet[r * cell_px:(r + 1) * cell_px, c * cell_px:(c + 1) * cell_px] = resize_square(cell, cell_px)
    return sheet


def sprite_bytes(rows: list[list[np.ndarray]], size: int, columns: int, fmt: str) -> bytes:
    """The sprite file's bytes: lossless where the page enlarges its cells (smaller than ``size``)."""
    return encode(sprite(rows, size, columns), fmt, lossless=cell_size(rows, size) < size)


def save_sprite(rows: list[list[np.ndarray]], size: int, columns: int, path: Path, fmt: str) -> int:
    """Write a sprite (:func:`sprite_bytes`); returns its size in bytes."""
    return _write(path, sprite_bytes(rows, size, columns, fmt))


def encode(arr: np.ndarray, fmt: str = "png", lossless: bool = False) -> bytes:
    """The file's bytes as :func:`save_image` writes them (the size estimate encodes samples with it);
    ``lossless`` matters for WebP only (PNG always is)."""
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "webp" and lossless:
        img.save(buf, "WEBP", lossless=True, quality=WEBP_LOSSLESS_EFFORT, method=0)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    else:
        img.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def save_image(arr: np.ndarray, path: Path, fmt: str = "png", lossless: bool = False) -> int:
    """Write an image (:func:`encode`); returns its size in bytes."""
    return _write(path, encode(arr, fmt, lossless))


def _write(path: Path, data: bytes) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)
