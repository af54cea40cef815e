"""Bounded fuzzing of the two parsers that read what users download: the image loader and
the config parser.  No input may make them raise anything but sitegen's own error types.

Hypothesis with derandomize=True: the same examples every run (a fixed seed derived from each test),
a fixed number of them, no deadline; the whole file runs in well under 20 s on 2 cores.
"""
from __future__ import annotations

import io
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sitegen import config
from sitegen.config import DataConfig
from sitegen.errors import ConfigError, ImageError
from sitegen.images import EXTENSIONS, header_size, preprocess, read_rgb, to_model_mode
from sitegen.progress import for_terminal

def fuzz(examples: int) -> settings:
    """Fixed examples (derandomize), a fixed count, no deadline, nothing stored between runs."""
    return settings(derandomize=True, deadline=None, database=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seed_images() -> dict[str, bytes]:
    """One small valid file per format: the starting points the mutations damage."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    seeds = {}
    for fmt, ext, img in [("PNG", ".png", base), ("JPEG", ".jpg", base), ("GIF", ".gif", base.convert("P")),
                          ("BMP", ".bmp", base), ("TIFF", ".tif", base), ("WEBP", ".webp", base),
                          ("PNG", ".png", base.convert("RGBA")), ("JPEG", ".jpg", base.convert("CMYK"))]:
        buf = io.BytesIO()
        img.save(buf, fmt)
        seeds[f"{fmt}-{img.mode}"] = (ext, buf.getvalue())
    # EXIF (rotated on load) and animation: the parsers most likely to trip on damage
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "camera"
    for fmt, ext in (("JPEG", ".jpg"), ("TIFF", ".tif"), ("WEBP", ".webp"), ("PNG", ".png")):
        buf = io.BytesIO()
        base.save(buf, fmt, exif=exif)
        seeds[f"{fmt}-exif"] = (ext, buf.getvalue())
    buf = io.BytesIO()
    frames = [base.convert("P"), base.rotate(90).convert("P")]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    seeds["GIF-animated"] = (".gif", buf.getvalue())
    return seeds


SEEDS = _seed_images()


@st.composite
def damaged_images(draw):
    """A valid image of some format with a few bytes flipped, a cut, or a splice."""
    ext, data = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "zero-run"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 8] = b"\xff" * 8 if draw(st.booleans()) else b"\0" * 8
    return draw(st.sampled_from([ext, *sorted(EXTENSIONS)])), bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _decode(folder: Path, ext: str, data: bytes) -> None:
    path = folder / f"fuzz{ext}"
    path.write_bytes(data)
    try:  # the input size is decided from headers: they fail cleanly too
        upright = header_size(path, max_pixels=1 << 20)
    except ImageError:
        upright = None
    try:
        img = read_rgb(path, max_pixels=1 << 20)
    except ImageError:
        return
    # When it decodes, it is an RGB picture that preprocessing accepts, in RGB and in grey, and its
    # header gave its size (EXIF rotation included), which the size decision relies on.
    assert img.mode == "RGB" and img.size[0] > 0 and img.size[1] > 0
    assert upright == img.size
    px = preprocess(img, DataConfig(resize=8, crop=8))
    assert px.shape == (8, 8, 3) and px.dtype == np.uint8
    grey = preprocess(to_model_mode(img, 1), DataConfig(resize=8, crop=8))
    assert grey.shape == (8, 8, 1) and grey.dtype == np.uint8


@fuzz(600)
@given(image=damaged_images())
def test_fuzz_damaged_images(scratch, image):
    _decode(scratch, *image)


@fuzz(150)
@given(ext=st.sampled_from(sorted(EXTENSIONS)), data=st.binary(max_size=512),
       magic=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\0", b"RIFF"]))
def test_fuzz_random_bytes_behind_real_magic(scratch, ext, data, magic):
    _decode(scratch, ext, magic + data)


# ----------------------------------------------------------------------------- config

SECTIONS = {name: [f for f in getattr(config.Config(), name).__dataclass_fields__]
            for name in config.Config.__dataclass_fields__ if name != "layers"}
toml_scalars = st.one_of(
    st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(max_size=12), st.sampled_from([0, 1, -1, 3, 100, 101, 16385, 2**63 - 1]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def config_tables(draw):
    """Mostly real section and key names (so validation is reached), with values of any TOML type."""
    table = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*sorted(SECTIONS), "layers", "dta"]))
        if section == "layers":
            table["layers"] = draw(toml_values)
            continue
        keys = SECTIONS.get(section, ["x"]) + ["unknwon"]
        table[section] = {draw(st.sampled_from(keys)): draw(toml_values) for _ in range(draw(st.integers(0, 3)))}
    return table


@fuzz(250)
@given(table=config_tables())
def test_fuzz_config_tables(table):
    try:
        cfg = config.from_dict(table)
    except ConfigError:
        return
    cfg.validate()  # what loads is valid


@st.composite
def toml_texts(draw):
    """TOML-looking text: real headers and keys, '=', values, brackets and junk, in any order."""
    names = sorted({n for keys in SECTIONS.values() for n in keys} | set(SECTIONS))
    tokens = st.one_of(
        st.sampled_from([f"[{s}]\n" for s in SECTIONS] + ["[[topk]]\n", "[data\n", "\n", " = ", "=", "[", "]",
                                                           "{", "}", ",", '"', "'''", "#", "nan", "inf", "-",
                                                           "true", "1979-05-27", "0x1F", "1e999", "\\u0000"]),
        st.sampled_from(names),
        st.text(alphabet=string.printable, max_size=8),
        st.text(max_size=4),
    )
    return "".join(draw(st.lists(tokens, max_size=30)))


@fuzz(400)
@given(text=toml_texts())
def test_fuzz_config_text(scratch, text):
    path = scratch / "fuzz.toml"
    try:
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return
    try:
        config.load(path)
    except ConfigError:
        pass


@fuzz(100)
@given(data=st.binary(max_size=256))
def test_fuzz_config_bytes(scratch, data):
    path = scratch / "fuzz.toml"
    path.write_bytes(data)
    try:
        config.load(path)
    except ConfigError:
        pass


def test_decoder_bugs_become_image_errors(scratch, monkeypatch):
    """Pillow's plugins raise all sorts (IndexError, struct.error, ...) on damaged files; read_rgb
    turns any of them into the file's ImageError, which is what the fuzz tests rely on."""
    import sitegen.images

    def broken(*args, **kwargs):
        raise IndexError("a decoder bug")

    monkeypatch.setattr(sitegen.images.ImageOps, "exif_transpose", broken)
    path = scratch / "x.png"
    path.write_bytes(SEEDS["PNG-RGB"][1])
    with pytest.raises(ImageError, match="x.png: cannot decode \\(a decoder bug\\)"):
        read_rgb(path, 1 << 20)


# ----------------------------------------------------------------------------- names on the terminal

def _controls(text: str) -> list[str]:
    import unicodedata

    bidi = {"\u200e", "\u200f", "\u061c", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}
    return [c for c in text if unicodedata.category(c) == "Cc" or c in bidi]


@fuzz(300)
@given(name=st.text(alphabet=st.characters(codec=None, exclude_categories=("Cs",)), max_size=24))
def test_fuzz_names_reach_the_terminal_without_control_characters(name):
    """A file name can hold ESC sequences, newlines or bidi overrides that would recolour, forge or
    reorder what the terminal shows: escaped, visibly, and text without them passes unchanged."""
    shown = for_terminal(name)
    assert _controls(shown) == []
    if not _controls(name):
        assert shown == name
    else:
        assert len(shown) > len(name)  # every one became a visible escape


# ----------------------------------------------------------------------------- an atlas is never data

@st.composite
def image_trees(draw):
    """Folders up to three deep, each holding a few image files, some holding the atlas marker."""
    names = st.sampled_from(["a", "b", "img", "atlas", "layers", "x y", ".hidden"])
    folders = draw(st.lists(st.lists(names, min_size=1, max_size=3).map("/".join), min_size=1, max_size=6,
                            unique=True))
    marked = draw(st.lists(st.sampled_from(folders), max_size=3, unique=True))
    top = draw(st.integers(0, 2))
    return folders, marked, top


@fuzz(40)
@given(tree=image_trees())
def test_fuzz_discovery_never_reads_inside_an_atlas(tmp_path_factory, tree):
    from sitegen.errors import ImageError as NoImages
    from sitegen.images import discover
    from sitegen.output import MARKER

    folders, marked, top = tree
    root = tmp_path_factory.mktemp("tree")
    png = SEEDS["PNG-RGB"][1]
    for f in folders:
        (root / f).mkdir(parents=True, exist_ok=True)
        (root / f / "p.png").write_bytes(png)
    for f in marked:
        (root / f / MARKER).write_text('{"files": ["p.png"]}')
    for i in range(top):
        (root / f"top{i}.png").write_bytes(png)
    inside = lambda rel: any(rel == m or rel.startswith(m + "/") for m in marked)  # noqa: E731
    expected = sorted({f"{f}/p.png" for f in folders if not inside(f)} | {f"top{i}.png" for i in range(top)})
    try:
        found = discover(root)
    except NoImages:
        assert expected == []
        return
    assert sorted(r.rel for r in found.records) == expected
    outermost = {m for m in marked if not any(m != o and m.startswith(o + "/") for o in marked)}
    assert {rel for rel, _ in found.skipped if rel.endswith("/")} == {m + "/" for m in outermost}
