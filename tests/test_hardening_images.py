"""Hostile and broken images: each bad file is refused with a message naming it, or — when
it is a legitimate image in an odd form — decoded to the right pixels; a folder of them still builds.

The corpus is in tests/hardening_corpus.py; every file is made in tmp_path.
"""
from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from sitegen.config import DataConfig
from sitegen.errors import ImageError
from sitegen.images import discover, header_size, load_pixels, read_rgb, shown





import hardening_corpus as corpus  # noqa: E402  (tests/ is on the import path: pyproject's pythonpath)

CASES = corpus.image_corpus()


@pytest.fixture
def deadline():
    """Fail (instead of hanging CI) if a FIFO or a loop makes the code under test block."""
    def on_alarm(signum, frame):
        raise TimeoutError("blocked for 120 s: a FIFO or a symlink loop was followed")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _expected_pixels(case, path_bytes: bytes) -> np.ndarray:
    """What a correct decoder gives, computed here from the bytes (independently of sitegen)."""
    img = Image.open(io.BytesIO(path_bytes))
    if case == "16-bit-png":
        arr = np.asarray(img, dtype=np.float64)
        grey = np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if case == "animated-gif":
        img.seek(0)
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


@pytest.mark.parametrize("bad", CASES, ids=[c.case for c in CASES])
def test_each_bad_image(tmp_path, bad, deadline):
    if bad.case == "fifo":
        corpus.need_fifo()
    root = tmp_path / "imgs"
    corpus.write_good_images(root, 1)  # so that the folder is not empty when the bad file is skipped
    bad.make(root / bad.name)
    images = discover(root)
    rels = [r.rel for r in images.records]
    if bad.outcome == "skipped":
        assert bad.name not in rels and bad.shown_as not in rels
        reasons = dict(images.skipped)
        assert bad.shown_as in reasons and bad.message in reasons[bad.shown_as], images.skipped
        return
    assert bad.name in rels
    i = rels.index(bad.name)
    if bad.outcome == "error":
        with pytest.raises(ImageError) as e:
            load_pixels(images, i, DataConfig())
        assert bad.name in str(e.value) and bad.message in str(e.value)
        return
    got = np.asarray(read_rgb(images.path(i), DataConfig().max_pixels, bad.name))
    want = _expected_pixels(bad.case, (root / bad.name).read_bytes())
    assert got.dtype == np.uint8 and got.shape == want.shape
    # The input size is decided from headers: a file's header gives its decoded, upright size.
    assert header_size(images.path(i), DataConfig().max_pixels) == (got.shape[1], got.shape[0])
    # CMYK -> RGB is the one conversion with rounding differences between code paths
    assert np.abs(got.astype(int) - want.astype(int)).max() <= (1 if bad.case == "cmyk-jpeg" else 0)


def test_animated_gif_gives_its_first_frame(tmp_path):
    (tmp_path / "a.gif").write_bytes(corpus.gif_bytes(frames=3))
    px = np.asarray(read_rgb(tmp_path / "a.gif", 10**6))
    # frame 0 was filled with (0, 255, 40); later frames differ in every channel
    assert tuple(px[0, 0]) == (0, 255, 40) and (px == px[0, 0]).all()


def test_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    for side, phrase in ((100_000, "decompression bomb"), (12_000, "over the limit")):
        (tmp_path / f"{side}.png").write_bytes(corpus.png_header_only(side, side))
        with pytest.raises(ImageError, match=phrase):
            read_rgb(tmp_path / f"{side}.png", DataConfig().max_pixels)
    assert decoded == []  # 10^10 and 1.4·10^8 pixels: refused before a single row was decoded


def test_pixel_limit_is_configurable(tmp_path):
    (tmp_path / "big.png").write_bytes(corpus.png_bytes(size=(300, 200)))
    with pytest.raises(ImageError) as e:
        read_rgb(tmp_path / "big.png", max_pixels=59_999)
    assert "300×200" in str(e.value) and "data.max_pixels" in str(e.value)
    assert read_rgb(tmp_path / "big.png", max_pixels=60_000).size == (300, 200)


def test_unreadable_file_chmod(tmp_path):
    if not corpus.unreadable_supported():
        pytest.skip("running as root: chmod 000 does not stop root reading (see the simulated test below)")
    p = tmp_path / "secret.png"
    p.write_bytes(corpus.png_bytes())
    p.chmod(0)
    try:
        images = discover(tmp_path)  # stat works on an unreadable file: it is found, then refused
        with pytest.raises(ImageError, match="secret.png: permission denied"):
            load_pixels(images, 0, DataConfig())
    finally:
        p.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """What chmod 000 does for a normal user, also under root: open() raises PermissionError."""
    p = tmp_path / "secret.png"
    p.write_bytes(corpus.png_bytes())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ImageError, match="secret.png: permission denied") as e:
        read_rgb(p, 10**6)
    assert "chmod" in str(e.value)  # the fix


def test_symlinked_folder_loops_are_not_followed(tmp_path, deadline):
    corpus.write_good_images(tmp_path / "a", 2)
    (tmp_path / "a" / "up").symlink_to(tmp_path)           # a/up -> the root: a loop
    (tmp_path / "a" / "self").symlink_to(tmp_path / "a")   # a/self -> a
    images = discover(tmp_path)
    assert [r.rel for r in images.records] == ["a/good00.png", "a/good01.png"]


def test_symlinked_files_are_followed(tmp_path):
    """Links to image files are ordinary (the CIFAR fixtures are folders of them)."""
    corpus.write_good_images(tmp_path / "store", 1)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "link.png").symlink_to(tmp_path / "store" / "good00.png")
    images = discover(tmp_path / "imgs")
    assert [r.rel for r in images.records] == ["link.png"]
    assert load_pixels(images, 0, DataConfig()).shape == (16, 16, 3)


def test_non_utf8_names_are_found_read_and_shown(tmp_path):
    cls = corpus.NON_UTF8
    (tmp_path / cls).mkdir()
    (tmp_path / cls / (cls + ".png")).write_bytes(corpus.png_bytes())
    images = discover(tmp_path)
    assert images.classes == [cls] and images.label_name(0) == cls
    assert load_pixels(images, 0, DataConfig()).shape == (16, 16, 3)
    text = shown(images.records[0].rel)
    assert text == "caf\ufffd-\ufffd/caf\ufffd-\ufffd.png"
    text.encode("utf-8")  # what pages and JSON hold is valid UTF-8
    assert images.digest()  # the cache key survives the name too
    assert shown("plain/name.png") == "plain/name.png"


# ----------------------------------------------------------------------------- through the CLI

def _corpus_folder(root: Path) -> list:
    """Two class folders, each with good images and one copy of every case that fits there."""
    made = []
    for cls in ("a", corpus.NON_UTF8):
        corpus.write_good_images(root / cls, 4, seed=len(made))
        for bad in CASES:
            if bad.case == "fifo" and not hasattr(os, "mkfifo"):
                continue
            bad.make(root / cls / bad.name)
            made.append((cls, bad))
    if corpus.unreadable_supported():
        locked = root / "a" / "locked.png"
        locked.write_bytes(corpus.png_bytes())
        locked.chmod(0)
    return made


def test_build_over_the_whole_corpus(tmp_path, capfd, deadline):
    root = tmp_path / "imgs"
    made = _corpus_folder(root)
    out = tmp_path / "site"
    cfg = corpus.fast_config(tmp_path / "fast.toml", topk={"k": 3})
    code, stdout, err = corpus.run_cli(
        ["-q", "build", str(_tiny_checkpoint(tmp_path)), "--images", str(root), "--arch", corpus.TINY_ARCH,
         "-o", str(out), "--config", str(cfg), "--no-cache", "--resize", "16", "--crop", "16"], capfd)
    assert code == 0, err
    assert "Traceback" not in err
    raw = (out / "data" / "atlas.json").read_bytes()
    atlas = json.loads(raw.decode("utf-8"))  # strict UTF-8: the non-UTF-8 class name did not leak
    skipped = {s["path"]: s["reason"] for s in atlas["data"]["skipped"]}
    index = (out / "index.html").read_bytes().decode("utf-8")
    for cls, bad in made:
        rel = shown(f"{cls}/{bad.shown_as}")
        if bad.outcome == "decodes":
            assert rel not in skipped, (rel, skipped.get(rel))
            continue
        assert rel in skipped and bad.message in skipped[rel], (rel, skipped.get(rel))
        # listed on the index page, as text
        assert _html_text(rel) in index, rel
    if corpus.unreadable_supported():
        assert "permission denied" in skipped["a/locked.png"]
    assert atlas["data"]["classes"] == ["a", "caf\ufffd-\ufffd"]
    used = atlas["data"]["used"]
    assert used == 2 * (4 + sum(b.outcome == "decodes" for b in CASES))
    for page in out.rglob("*.html"):
        page.read_bytes().decode("utf-8")  # every page is valid UTF-8


def _html_text(s: str) -> str:
    import html

    return html.escape(s, quote=True).replace("&#x27;", "&#39;")


def _tiny_checkpoint(folder: Path) -> Path:
    import torch

    from sitegen.model_loading import build_architecture

    path = folder / "tiny.pt"
    torch.save(build_architecture(corpus.TINY_ARCH, None).state_dict(), path)
    return path


@pytest.mark.parametrize("layout, needles", [
    ("only-bad", ["none of the 6 images", "could be read", "bomb.png"]),
    ("empty", ["no images found"]),
    ("missing", ["does not exist", "--images"]),
    ("a-file", ["is not a folder"]),
])
def test_build_without_usable_images_fails_cleanly(tmp_path, capfd, layout, needles, deadline):
    root = tmp_path / "imgs"
    if layout == "only-bad":
        root.mkdir()
        for bad in CASES:
            if bad.outcome == "error":
                bad.make(root / bad.name)
    elif layout == "empty":
        root.mkdir()
        (root / "readme.txt").write_text("no images here")
    elif layout == "a-file":
        root.write_bytes(corpus.png_bytes())
    out = tmp_path / "site"
    code, _, err = corpus.run_cli(
        ["build", str(_tiny_checkpoint(tmp_path)), "--images", str(root), "--arch", corpus.TINY_ARCH,
         "-o", str(out), "--no-cache"], capfd)
    corpus.assert_clean_failure(code, err, *needles)
    assert not out.exists()
    assert not list(tmp_path.glob(".site.building-*"))


def test_pixel_limit_from_the_config_file(tmp_path, capfd):
    """data.max_pixels set in the TOML refuses every 16×16 image: the build says so and stops."""
    root = tmp_path / "imgs"
    corpus.write_good_images(root, 3)
    cfg = corpus.fast_config(tmp_path / "c.toml", data={"max_pixels": 200})
    code, _, err = corpus.run_cli(
        ["build", str(_tiny_checkpoint(tmp_path)), "--images", str(root), "--arch", corpus.TINY_ARCH,
         "-o", str(tmp_path / "site"), "--config", str(cfg), "--no-cache"], capfd)
    corpus.assert_clean_failure(code, err, "16×16 pixels is over the limit of 200", "data.max_pixels")


# ----------------------------------------------------------------------------- sizes

SIZE_CASES = corpus.size_corpus()


@pytest.mark.parametrize("sc", SIZE_CASES, ids=[c.case for c in SIZE_CASES])
def test_size_cases(tmp_path, capfd, sc, deadline):
    """Folders whose images do not share a size, and crops that do not fit: the build either stops
    before any pass with the flags that fix it, or builds and names every image it leaves out."""
    root = tmp_path / "imgs"
    sc.make(root)
    out = tmp_path / "site"
    cfg = corpus.fast_config(tmp_path / "fast.toml", topk={"k": 2})
    code, _, err = corpus.run_cli(
        ["build", str(_tiny_checkpoint(tmp_path)), "--images", str(root), "--arch", corpus.TINY_ARCH,
         "-o", str(out), "--config", str(cfg), "--no-cache", *sc.flags], capfd)
    for phrase in sc.phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"
    if sc.outcome == "stops":
        corpus.assert_clean_failure(code, err)
        assert "topk" not in err and "dataset" not in err  # stopped before any pass
        assert not out.exists() and not list(tmp_path.glob(".site.building-*"))
        return
    assert code == 0, err
    atlas = json.loads((out / "data" / "atlas.json").read_text(encoding="utf-8"))
    data = atlas["data"]
    skipped = {s["path"]: s["reason"] for s in data["skipped"]}
    assert sorted(skipped) == sorted(sc.skipped), skipped
    for rel in sc.skipped:
        assert "after preprocessing differs from the input size" in skipped[rel]
    # Nothing lost silently: every image file is used or listed as skipped.
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert data["images"] + len(skipped) == len(files) and data["used"] == data["images"]
    index = (out / "index.html").read_text(encoding="utf-8")
    for rel in sc.skipped:
        assert rel in index
    if sc.note:
        assert sc.note in index
        assert any(sc.note in n for n in data["notes"]), data["notes"]


def _one_image_list(root: Path, name: str, data: bytes):
    root.mkdir(exist_ok=True)
    (root / name).write_bytes(data)
    return discover(root)


def test_an_image_of_another_size_is_refused_from_its_header(tmp_path, monkeypatch):
    """With the input size known, the declared size decides: the pixels are never decoded."""
    images = _one_image_list(tmp_path / "imgs", "big.png", corpus.png_header_only(9000, 9000))

    def no_decode(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageError, match="big.png: size 9000×9000 after preprocessing differs from the input size 16×16"):
        load_pixels(images, 0, DataConfig(), (16, 16))
    with pytest.raises(ImageError, match="size 32×32 after preprocessing differs from the input size 16×16"):
        load_pixels(images, 0, DataConfig(resize=32, crop=32), (16, 16))


def test_exif_rotation_is_counted_before_the_size_check(tmp_path):
    """A 20×10 JPEG whose EXIF turns it upright to 10×20 has the upright size."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(buf, "JPEG", exif=exif)
    images = _one_image_list(tmp_path / "imgs", "turned.jpg", buf.getvalue())
    assert load_pixels(images, 0, DataConfig(), (20, 10)).shape == (20, 10, 3)
    with pytest.raises(ImageError, match="size 10×20 after preprocessing differs from the input size 20×10"):
        load_pixels(images, 0, DataConfig(), (10, 20))
