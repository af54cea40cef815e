"""Fixed colour maps for heatmaps, drawn without matplotlib.

``viridis`` interpolates linearly between eleven anchor colours of matplotlib's viridis (at 0, 0.1,
..., 1): perceptually ordered, readable in greyscale and by colour-blind readers.  ``categories``
gives distinct colours for class maps and scatter plots (Tableau 10, then evenly spread hues).
"""
from __future__ import annotations

import colorsys

import numpy as np

VIRIDIS_ANCHORS = np.array([
    (0x44, 0x01, 0x54), (0x48, 0x24, 0x75), (0x41, 0x44, 0x87), (0x35, 0x5f, 0x8d), (0x2a, 0x78, 0x8e),
    (0x21, 0x91, 0x8c), (0x22, 0xa8, 0x84), (0x44, 0xbf, 0x70), (0x7a, 0xd1, 0x51), (0xbd, 0xdf, 0x26),
    (0xfd, 0xe7, 0x25),
], dtype=np.float64)

TABLEAU10 = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
             "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def viridis(values: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) for ``values`` in [0, 1] (clipped); NaN is drawn mid-grey."""
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    pos = np.clip(np.nan_to_num(v), 0.0, 1.0) * (len(VIRIDIS_ANCHORS) - 1)
    lo = np.minimum(pos.astype(np.int64), len(VIRIDIS_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = VIRIDIS_ANCHORS[lo] * (1 - frac) + VIRIDIS_ANCHORS[lo + 1] * frac
    rgb[nan] = 128
    return np.round(rgb).astype(np.uint8)


def scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` mapped linearly so ``lo`` -> 0 and ``hi`` -> 1 (all 0.5 when lo == hi)."""
    v = np.asarray(values, dtype=np.float64)
    if not hi > lo:
        return np.full(v.shape, 0.5)
    return (v - lo) / (hi - lo)


def colorbar(length: int = 256, thickness: int = 12) -> np.ndarray:
    """A horizontal viridis bar, low values on the left."""
    row = viridis(np.linspace(0.0, 1.0, length))
    return np.repeat(row[None], thickness, axis=0)


def greybar(length: int = 256, thickness: int = 12) -> np.ndarray:
    """A horizontal black-to-white bar (for weights drawn in grey)."""
    row = np.round(np.linspace(0.0, 255.0, length)).astype(np.uint8)
    return np.repeat(np.repeat(row[None, :, None], thickness, axis=0), 3, axis=2)


def categories(n: int) -> list[str]:
    """``n`` distinct colours as ``#rrggbb``: Tableau 10, then hues spread by the golden angle."""
    out = list(TABLEAU10[:n])
    for i in range(len(out), n):
        r, g, b = colorsys.hls_to_rgb(((i - 10) * 0.618034) % 1.0, 0.5 + 0.15 * ((i // 10) % 2), 0.65)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def upscale(arr: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an (H, W[, 3]) array by an integer factor."""
    return arr if factor == 1 else np.repeat(np.repeat(arr, factor, axis=0), factor, axis=1)


def overlay(pixels: np.ndarray, heat_rgb: np.ndarray, cell: int, alpha: float = 0.6) -> np.ndarray:
    """The image with a coarse heatmap (rows, cols, 3) laid over it, each heatmap cell covering a
    ``cell``×``cell`` block from the top-left corner (the last row/column may be cut by the border)."""
    h, w = pixels.shape[:2]
    heat = upscale(heat_rgb, cell)[:h, :w].astype(np.float64)
    return np.round(pixels.astype(np.float64) * (1 - alpha) + heat * alpha).astype(np.uint8)
