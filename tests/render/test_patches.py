"""Sprite sheets: cells at the windows' own pixels up to the patch size, lossless where enlarged."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sitegen.crops import resize_square
from sitegen.render.patches import cell_size, save_sprite, sprite, sprite_bytes


def _cells(n: int, side: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_small_windows_are_stored_at_their_own_pixels_and_losslessly():
    rows = [_cells(9, 32), _cells(9, 32, seed=1)]
    data = sprite_bytes(rows, 96, 9, "webp")
    assert data[12:16] == b"VP8L"  # WebP's lossless bitstream
    sheet = _decode(data)
    assert sheet.shape == (2 * 32, 9 * 32, 3)
    for r, row in enumerate(rows):
        for j, cell in enumerate(row):
            np.testing.assert_array_equal(sheet[r * 32:(r + 1) * 32, j * 32:(j + 1) * 32], cell)
    # What the page shows (the sheet enlarged 3x, nearest neighbour) is the sheet the renderer
    # drew at 96 px before: the same pixels.
    shown = sheet.repeat(3, axis=0).repeat(3, axis=1)
    before = np.full((2 * 96, 9 * 96, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for j, cell in enumerate(row):
            before[r * 96:(r + 1) * 96, j * 96:(j + 1) * 96] = resize_square(cell, 96)
    np.testing.assert_array_equal(shown, before)


def test_large_windows_are_shrunk_to_the_patch_size_and_coded_lossy():
    rows = [_cells(4, 200)]
    assert cell_size(rows, 96) == 96
    data = sprite_bytes(rows, 96, 4, "webp")
    assert data[12:16] == b"VP8 "  # lossy
    assert _decode(data).shape == (96, 4 * 96, 3)


def test_windows_over_a_third_of_the_patch_are_enlarged_and_coded_lossy_as_before():
    # Lossless at their own pixels would be larger than lossy at 96 px for photographs from here.
    rows = [_cells(4, 33)]
    assert cell_size(rows, 96) == 96 and cell_size([_cells(1, 32)], 96) == 32
    data = sprite_bytes(rows, 96, 4, "webp")
    assert data[12:16] == b"VP8 "
    assert _decode(data).shape == (96, 4 * 96, 3)


def test_cells_of_two_sizes_take_the_larger_and_enlarge_the_smaller():
    patches, attributions = _cells(3, 24), _cells(3, 12, seed=2)
    assert cell_size([patches, attributions], 96) == 24
    sheet = sprite([patches, attributions], 96, 4)
    assert sheet.shape == (48, 96, 3)
    np.testing.assert_array_equal(sheet[24:48, 0:24], resize_square(attributions[0], 24))
    assert (sheet[:, 72:] == 255).all()  # the missing fourth column stays white


def test_png_and_the_written_file(tmp_path):
    rows = [_cells(2, 5)]
    n = save_sprite(rows, 96, 2, tmp_path / "a" / "0.png", "png")
    data = (tmp_path / "a" / "0.png").read_bytes()
    assert n == len(data) and data == sprite_bytes(rows, 96, 2, "png")
    np.testing.assert_array_equal(_decode(data), np.concatenate(rows[0], axis=1))
