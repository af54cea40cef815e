"""Kernel pictures hold exactly the weights after the documented normalisation
(v = 0.5 + w / (2 m), stored as round(255 v); m per filter or per layer)."""
from __future__ import annotations

import numpy as np

from sitegen.render.views.kernels import GAP, grey_grid, kernel_pages_of, mosaic, rgb_tiles, tile_scale


def expected(w, m):
    return np.round(np.clip(0.5 + w / (2 * m), 0, 1) * 255).astype(np.uint8)


def test_rgb_tiles_each_and_shared_scales():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3, 5, 5)).astype(np.float32)
    w[4] *= 0.01  # a weak filter: full range on its own scale, near grey on the layer's
    w[5] = 0  # an all-zero filter is mid-grey, not a division by zero
    each = rgb_tiles(w, each=True)
    shared = rgb_tiles(w, each=False)
    assert each.shape == (6, 5, 5, 3) and each.dtype == np.uint8
    for f in range(5):
        m = np.abs(w[f].astype(np.float64)).max()
        np.testing.assert_array_equal(each[f], expected(w[f].astype(np.float64), m).transpose(1, 2, 0))
        assert each[f].min() == 0 or each[f].max() == 255  # each filter reaches an end of the range
    np.testing.assert_array_equal(each[5], 128)
    m = np.abs(w.astype(np.float64)).max()
    np.testing.assert_array_equal(shared, expected(w.astype(np.float64), m).transpose(0, 2, 3, 1))
    assert np.abs(shared[4].astype(int) - 128).max() <= 3


def test_mosaic_places_tiles_row_major_enlarged():
    tiles = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    out = mosaic(tiles, columns=3, scale=2, gap=1)
    assert out.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3)
    for i, t in enumerate(tiles):
        r, c = divmod(i, 3)
        y, x = 1 + r * 5, 1 + c * 7
        block = out[y:y + 4, x:x + 6]
        np.testing.assert_array_equal(block[::2, ::2], t)
        np.testing.assert_array_equal(block[1::2, 1::2], t)
    assert (out[6:10, 1 + 2 * 7:1 + 2 * 7 + 6] == 255).all()  # the sixth cell is empty


def test_grey_grid_row_is_filter_column_is_input_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 3, 3, 3))
    peak = float(np.abs(w).max()) * 2  # a layer-wide peak larger than this block's
    scale = tile_scale(3)
    out = grey_grid(w, peak, scale)
    step = 3 * scale + GAP
    for f in range(4):
        for c in range(3):
            y, x = GAP + f * step, GAP + c * step
            cell = out[y:y + 3 * scale:scale, x:x + 3 * scale:scale]
            np.testing.assert_array_equal(cell[..., 0], expected(w[f, c], peak))
            assert (cell[..., 0] == cell[..., 2]).all()


def test_paging_of_wide_layers():
    assert kernel_pages_of((64, 64, 3, 3), 64) == (1, 1)
    assert kernel_pages_of((2048, 512, 1, 1), 64) == (32, 8)
    assert tile_scale(1) == 8 and tile_scale(3) == 8 and tile_scale(7) == 3
