"""The corpus of hostile and broken inputs, written into a test's tmp_path on demand.

No binary fixtures are committed: every bad file is made here from a few bytes or a tiny image.
Loaded by the tests/test_hardening_*.py files with importlib (tests/ is not a package).
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from sitegen import config as config_mod
from sitegen.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = f"{REPO / 'tests' / 'tiny_models.py'}:tiny_cnn"

# Markup in names: no "/" (not allowed in a file name) and no "." before the extension (module names
# cannot hold one); the injected code would set the page title, which the browser test looks for.
CANARY = "PWNED"
XSS_FILE = "\"><img src=x onerror=document['title']='PWNED'>"
XSS_CLASS = "\"><script>document['title']='PWNED'<\u2044script><b>x"
XSS_QUOTE = "' onmouseover='x' a='"
NON_UTF8 = os.fsdecode(b"caf\xe9-\xff")  # latin-1 bytes: not UTF-8, kept by Python as surrogate escapes


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """``sitegen ARGV`` in this process: (exit code, stdout, stderr).

    capfd (not capsys): its stderr replaces unencodable characters the way a real terminal's does,
    so names that are not UTF-8 do not fail in the test's capture instead of in sitegen.
    """
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, *needles: str) -> None:
    """Exit code 2, one 'error:' message holding every needle, no traceback, not an internal error."""
    assert code == 2, err
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    assert "error: " in err, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def fast_config(path: Path, **tables: dict) -> Path:
    """A site_config.toml switching off every optional pass (each section with ``enabled``), so a
    build runs only what a test needs; extra keys per section in ``tables``."""
    lines = []
    defaults = config_mod.Config()
    for f in dataclasses.fields(defaults):
        section = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        keys = dict(tables.get(f.name, {}))
        if any(g.name == "enabled" for g in dataclasses.fields(section)):
            keys.setdefault("enabled", False)
        if keys:
            lines.append(f"[{f.name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


# ----------------------------------------------------------------------------- image bytes

def png_bytes(size=(16, 16), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size=(32, 32), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rotated_bytes(fmt: str, size=(24, 16), seed=0) -> bytes:
    """An image stored ``size`` (width, height) with EXIF orientation 6: shown turned by 90°."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


def gif_bytes(frames=3, size=(16, 16)) -> bytes:
    imgs = [Image.new("RGB", size, (80 * i, 255 - 80 * i, 40)) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:], duration=50, loop=0)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width×height, with a few bytes of data: decoding it
    would need width×height×3 bytes, so refusing it from the header is the only cheap answer."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- the image corpus

@dataclasses.dataclass(frozen=True)
class BadImage:
    case: str
    name: str
    make: Callable[[Path], None]
    outcome: str
    """'skipped' (left out at discovery), 'error' (ImageError when read, the build lists it),
    or 'decodes' (a legitimate image in an odd form: must give correct RGB pixels)."""
    message: str = ""
    """Part of the reason the atlas gives ('error' and 'skipped')."""
    listed: str = ""
    """The path the atlas lists, when it is not ``name`` (a file inside a folder named like an image)."""

    @property
    def shown_as(self) -> str:
        return self.listed or self.name


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _symlink_loop(p: Path) -> None:
    os.symlink(p.name, p)  # points at itself


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _folder(p: Path) -> None:
    p.mkdir()
    (p / "note.txt").write_text("a folder named like an image")


def _dangling(p: Path) -> None:
    os.symlink(p.parent / "does-not-exist.png", p)


def image_corpus() -> list[BadImage]:
    jpeg = jpeg_bytes()
    png = png_bytes(size=(64, 64))
    return [
        BadImage("zero-byte", "zero.jpg", _write(b""), "error", "not an image"),
        BadImage("truncated-jpeg", "truncated.jpg", _write(jpeg[: len(jpeg) // 2]), "error", "truncated"),
        BadImage("truncated-png", "truncated.png", _write(png[: len(png) // 2]), "error", "truncated"),
        BadImage("text-as-png", "notes.png", _write(b"<html>not an image</html>\n" * 4), "error", "not an image"),
        BadImage("bomb-png", "bomb.png", _write(png_header_only(100_000, 100_000)), "error", "decompression bomb"),
        BadImage("over-pixel-limit", "huge.png", _write(png_header_only(12_000, 12_000)), "error", "over the limit"),
        BadImage("symlink-loop", "loop.jpg", _symlink_loop, "skipped", "symbolic links"),
        BadImage("dangling-symlink", "gone.png", _dangling, "skipped", "cannot stat"),
        BadImage("fifo", "pipe.jpg", _fifo, "skipped", "not a regular file"),
        BadImage("folder-named-jpg", "folder.jpg", _folder, "skipped", "not an image file extension",
                 listed="folder.jpg/note.txt"),
        BadImage("wrong-extension", "really-a-png.jpg", _write(png_bytes()), "decodes"),
        BadImage("animated-gif", "animated.gif", _write(gif_bytes()), "decodes"),
        BadImage("cmyk-jpeg", "cmyk.jpg", _write(jpeg_bytes(mode="CMYK")), "decodes"),
        BadImage("16-bit-png", "deep.png", _write(png_bytes(mode="I;16")), "decodes"),
        BadImage("one-pixel", "dot.png", _write(png_bytes(size=(1, 1))), "decodes"),
        BadImage("exif-rotated-jpeg", "turned.jpg", _write(rotated_bytes("JPEG")), "decodes"),
        BadImage("exif-rotated-tiff", "turned.tif", _write(rotated_bytes("TIFF")), "decodes"),
        BadImage("non-utf8-name", NON_UTF8 + ".png", _write(png_bytes(seed=3)), "decodes"),
        BadImage("html-name", XSS_FILE + ".jpg", _write(jpeg_bytes(seed=4)), "decodes"),
        BadImage("quote-name", XSS_QUOTE + ".png", _write(png_bytes(seed=5)), "decodes"),
    ]


def unreadable_supported() -> bool:
    """chmod 000 only hides a file from a user that is not root (CI runs as root)."""
    return hasattr(os, "geteuid") and os.geteuid() != 0


def write_good_images(folder: Path, n: int, size: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"good{i:02d}.png")


def need_fifo() -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")


# ----------------------------------------------------------------------------- folders of mixed sizes

def photo_crops(folder: Path, sizes: list[tuple[int, int]], prefix: str = "photo") -> list[Path]:
    """Crops of scikit-learn's two sample photographs (427×640: a temple, a flower), one JPEG per
    (width, height) in ``sizes``, taken at different places so that no two are alike."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i, (w, h) in enumerate(sizes):
        src = photos[i % len(photos)]
        y, x = (37 * i) % (src.shape[0] - h), (53 * i) % (src.shape[1] - w)
        p = folder / f"{prefix}{i:02d}.jpg"
        Image.fromarray(src[y:y + h, x:x + w]).save(p, quality=90)
        made.append(p)
    return made


MIXED_PHOTOS = [(96, 64)] * 4 + [(64, 96)] * 3 + [(80, 80)] * 3 + [(120, 72)] * 2
"""Photo sizes (width, height) of a folder where no size is the majority, as a camera roll's."""


def _one_pixel_first(n: int, size: int) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        write_good_images(root, n, size=size)
        Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "0.png")  # sorts before good00.png
    return make


def _good(n: int, size: int = 16) -> Callable[[Path], None]:
    return lambda root: write_good_images(root, n, size=size)


def _photos(root: Path) -> None:
    photo_crops(root, MIXED_PHOTOS)


@dataclasses.dataclass(frozen=True)
class SizeCase:
    """A folder whose images do not all get one size, or a crop that does not fit them."""

    case: str
    make: Callable[[Path], None]
    flags: tuple[str, ...]
    """Flags added to ``sitegen build``."""
    outcome: str
    """'stops' (exit 2 before any pass, nothing written) or 'builds'."""
    phrases: tuple[str, ...]
    """In the terminal's output."""
    skipped: tuple[str, ...] = ()
    """Files the atlas lists as skipped for their size ('builds')."""
    note: str = ""
    """Shown on the index page ('builds')."""


def size_corpus() -> list[SizeCase]:
    return [
        # One odd image sorting first used to fix the input size, and every real image was skipped.
        SizeCase("one-pixel-first", _one_pixel_first(12, 16), (), "stops",
                 ("1 of the 13 readable images (7.6 %) would be skipped for their size", "12 are 16×16",
                  "1×1 (1 image, e.g. 0.png)", "--resize 16 --crop 16")),
        SizeCase("one-pixel-in-121", _one_pixel_first(120, 8), (), "builds",
                 ("warning: skipping 1 of 121 images", "0.png (1×1)"), skipped=("0.png",)),
        SizeCase("mixed-photos", _photos, (), "stops",
                 ("8 of the 12 readable images (66 %) would be skipped for their size", "4 are 96×64",
                  "64×96 (3 images", "--resize 64 --crop 64")),
        SizeCase("mixed-photos-resize-only", _photos, ("--resize", "64"), "stops",
                 ("would be skipped for their size", "(--resize 64)", "--resize 64 --crop 64")),
        SizeCase("mixed-photos-fixed", _photos, ("--resize", "64", "--crop", "64"), "builds", ()),
        SizeCase("crop-far-too-large", _good(12), ("--crop", "1000"), "stops",
                 ("the crop 1000", "99.9 % of a typical input would be black padding", "--resize 1000",
                  "--crop 16")),
        SizeCase("crop-below-resize", _good(12), ("--resize", "8", "--crop", "16"), "stops",
                 ("the crop 16", "75.0 %", "--resize 16 (instead of 8)", "--crop 8")),
        SizeCase("crop-a-little-large", _good(12), ("--crop", "20"), "builds",
                 ("warning: the crop 20 is larger than 12 of 12 images", "36 %", "--resize 20"),
                 note="padded with black"),
    ]
