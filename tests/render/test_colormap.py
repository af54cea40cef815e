"""The hand-made colour maps: viridis anchors and interpolation, category colours, overlays."""
from __future__ import annotations

import numpy as np

from sitegen.render.colormap import VIRIDIS_ANCHORS, categories, colorbar, overlay, scale, viridis


def test_viridis_hits_its_anchors_and_interpolates_between():
    np.testing.assert_array_equal(viridis(np.array([0.0, 1.0])), [[0x44, 0x01, 0x54], [0xfd, 0xe7, 0x25]])
    np.testing.assert_array_equal(viridis(0.5), VIRIDIS_ANCHORS[5].astype(np.uint8))
    mid = np.round((VIRIDIS_ANCHORS[2] + VIRIDIS_ANCHORS[3]) / 2)
    np.testing.assert_array_equal(viridis(0.25), mid)
    np.testing.assert_array_equal(viridis(np.array([-3.0, 7.0])), viridis(np.array([0.0, 1.0])))  # clipped
    np.testing.assert_array_equal(viridis(np.nan), [128, 128, 128])
    # Lightness rises along the map (it reads in greyscale).
    grey = viridis(np.linspace(0, 1, 50)) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(grey) > 0)
    bar = colorbar(100, 5)
    assert bar.shape == (5, 100, 3) and (bar[0, 0] == viridis(0.0)).all() and (bar[4, 99] == viridis(1.0)).all()


def test_scale_and_categories():
    np.testing.assert_allclose(scale(np.array([2.0, 4.0, 6.0]), 2, 6), [0, 0.5, 1])
    np.testing.assert_allclose(scale(np.array([3.0, 3.0]), 3, 3), [0.5, 0.5])
    colours = categories(25)
    assert len(set(colours)) == 25 and all(re_hex(c) for c in colours)


def re_hex(c: str) -> bool:
    return len(c) == 7 and c[0] == "#" and all(ch in "0123456789abcdef" for ch in c[1:])


def test_overlay_cells_cover_stride_blocks_from_the_corner():
    pixels = np.zeros((5, 5, 3), dtype=np.uint8)
    heat = np.array([[[100, 0, 0], [0, 100, 0], [0, 0, 100]]] * 3, dtype=np.uint8)  # 3×3 cells of 2 px
    out = overlay(pixels, heat, cell=2, alpha=0.5)
    assert out.shape == (5, 5, 3)
    assert out[0, 0].tolist() == [50, 0, 0] and out[1, 1].tolist() == [50, 0, 0]
    assert out[0, 2].tolist() == [0, 50, 0] and out[4, 4].tolist() == [0, 0, 50]
