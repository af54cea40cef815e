"""Image discovery, decoding of every supported format and mode, and preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sitegen.config import DataConfig
from sitegen.errors import ImageError
from sitegen.images import discover, load_pixels, normalise, preprocess, read_rgb
from sitegen.inputs import decide_size


def test_imagefolder_labels_sorted_recursive(tmp_path):
    for cls in ("b_dog", "a_cat"):
        (tmp_path / cls / "deep").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "2.png")
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "deep" / "1.png")
    (tmp_path / "a_cat" / "notes.txt").write_text("hi")
    images = discover(tmp_path)
    assert [r.rel for r in images.records] == ["a_cat/2.png", "a_cat/deep/1.png", "b_dog/2.png", "b_dog/deep/1.png"]
    assert images.classes == ["a_cat", "b_dog"]
    assert [images.label_name(i) for i in range(4)] == ["a_cat", "a_cat", "b_dog", "b_dog"]
    assert images.skipped == [("a_cat/notes.txt", "not an image file extension")]


def test_flat_folder_has_no_labels(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    images = discover(tmp_path)
    assert images.classes == [] and images.records[0].label == -1 and images.label_name(0) == ""


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(ImageError, match="no images found"):
        discover(tmp_path)
    with pytest.raises(ImageError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="none of the 1 images"):
        decide_size(discover(tmp_path), DataConfig())


@pytest.mark.parametrize("fmt, mode", [
    ("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB"),
    ("PNG", "L"), ("PNG", "P"), ("PNG", "RGBA"), ("JPEG", "CMYK"), ("PNG", "I;16"), ("PNG", "LA"),
])
def test_formats_and_modes_become_rgb(tmp_path, fmt, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65536, (10, 12))).astype(np.uint16))
    elif mode == "P":
        img = base.convert("P")
    else:
        img = base.convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, fmt)
    out = read_rgb(path, 10**8)
    assert out.mode == "RGB" and out.size == (12, 10)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    px = np.asarray(read_rgb(tmp_path / "a.png", 10**8))
    assert abs(int(px[0, 0, 0]) - 128) <= 1


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    px = np.asarray(read_rgb(tmp_path / "a.gif", 10**8))
    assert px[0, 0, 0] > 200 and px[0, 0, 2] < 50


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 5, 10))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = read_rgb(tmp_path / "r.jpg", 10**8)
    assert out.size == (10, 20)
    px = np.asarray(out)
    assert px[:5, :, 0].mean() > 200 and px[-5:, :, 0].mean() < 50  # the strip is now on top


def test_truncated_and_bomb_are_errors(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="t.png"):
        read_rgb(tmp_path / "t.png", 10**8)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="over the limit"):
        read_rgb(tmp_path / "big.png", max_pixels=5000)


def test_resize_shorter_side_then_centre_crop():
    img = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3))
    out = preprocess(img, DataConfig(resize=10, crop=8))
    assert out.shape == (8, 8, 3)
    out = preprocess(img, DataConfig(resize=10))
    assert out.shape == (10, 20, 3)


def test_normalise_matches_hand_computation():
    px = np.array([[[255, 0, 51]]], dtype=np.uint8)
    cfg = DataConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.2))
    t = normalise(px, cfg)
    assert t.shape == (3, 1, 1)
    torch.testing.assert_close(t.flatten(), torch.tensor([1.0, -2.0, (0.2 - 0.5) / 0.2]))


def test_load_pixels_uses_preprocessing(tmp_path):
    Image.new("RGB", (30, 20), (10, 20, 30)).save(tmp_path / "a.png")
    images = discover(tmp_path)
    assert load_pixels(images, 0, DataConfig(resize=10, crop=10)).shape == (10, 10, 3)
    assert decide_size(images, DataConfig()).size == (20, 30)
