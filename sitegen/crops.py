"""Unit windows in input pixels: which pixels a unit's crop covers, cutting and resizing them, and
the cache of decoded images they are cut from.

Facts about images and units, shared by the analysis passes (the attribution pass stores each
unit's picture inside exactly the window the page shows) and the renderer (which draws the
receptive-field patches): both import this module, neither imports the other.

A window is a unit's receptive field cut from the preprocessed input; the part of the field that
lies outside the image is drawn grey (``GREY``), as in Chu et al.'s figures, so a patch's position
in its square says where the unit's field met the image border.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np
from PIL import Image

GREY = 128
"""The value drawn where a window passes the image border (and an attribution's zero)."""


def display_box(rf_box: tuple[int, int, int, int], image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The window drawn for a unit: its receptive field, but never wider than the image.

    Deep units of small-image models see far more than the image (ResNet-56's last blocks: 249 px
    on 32 px CIFAR images), and the whole field would show the image as a dot in a grey square.
    The window keeps the field's centre, so the grey still shows where the unit sits relative to
    the image border.  A field that is not square (Inception's 1×7 and 7×1 convolutions) gets the
    square as wide as its longer side; a pooled layer's field, the whole input, gets the square
    around the whole image.
    """
    x0, y0, x1, y1 = rf_box
    side = min(max(x1 - x0, y1 - y0), max(image_hw))
    cx2, cy2 = x0 + x1, y0 + y1  # twice the centre, to stay in integers
    nx0, ny0 = (cx2 - side) // 2, (cy2 - side) // 2
    return (nx0, ny0, nx0 + side, ny0 + side)


def crop_box(pixels: np.ndarray, box: tuple[int, int, int, int], fill: int = GREY) -> np.ndarray:
    """Pixels inside ``box`` = (x0, y0, x1, y1) (end exclusive, may pass the borders); grey outside."""
    x0, y0, x1, y1 = box
    h, w = pixels.shape[:2]
    out = np.full((y1 - y0, x1 - x0, pixels.shape[2]), fill, dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = pixels[sy0:sy1, sx0:sx1]
    return out


def resize_square(patch: np.ndarray, size: int) -> np.ndarray:
    """``patch`` (H, W[, C] uint8) as a ``size`` × ``size`` picture; ``patch`` itself where it already
    is one (a sprite of windows at their own pixels: no round trip through PIL per window)."""
    if patch.shape[:2] == (size, size):
        return patch
    img = Image.fromarray(patch)
    if img.size != (size, size):
        # Enlarging small fields with NEAREST keeps pixels visible; shrinking large ones with BOX
        # averages rather than aliases.
        resample = Image.Resampling.NEAREST if img.size[0] < size else Image.Resampling.BOX
        img = img.resize((size, size), resample)
    return np.asarray(img)


class PixelCache:
    """Decoded, preprocessed images by index, least recently used dropped past a byte budget.

    Safe to share between threads (the render's thread pool, where processes cannot fork): the
    bookkeeping is under a lock, the decoding outside it."""

    def __init__(self, load: Callable[[int], np.ndarray], budget_bytes: int = 512 << 20):
        self.load, self.budget, self.used = load, budget_bytes, 0
        self.items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, i: int) -> np.ndarray:
        with self._lock:
            arr = self.items.get(i)
            if arr is not None:
                self.items.move_to_end(i)
                return arr
        arr = self.load(i)
        with self._lock:
            if i not in self.items:  # another thread may have decoded it meanwhile
                self.items[i] = arr
                self.used += arr.nbytes
            while self.used > self.budget and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.used -= old.nbytes
        return arr
