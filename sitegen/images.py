"""Find, decode and preprocess the user's images.

Folders are searched recursively in sorted order; an ImageFolder layout (``class/xxx.jpg``) gives
class labels.  Every decoding problem becomes an :class:`ImageError`; the build skips such files with
a warning and lists them on the atlas's index page.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import DataConfig
from .errors import ConfigError, ImageError

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Truncated files must fail loudly rather than decode as partly grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageRecord:
    rel: str
    """Path relative to the images folder, with '/' separators (what the atlas shows)."""
    label: int
    """Index into ``ImageList.classes``; -1 without an ImageFolder layout."""
    size: int
    mtime_ns: int


@dataclass
class ImageList:
    root: Path
    records: list[ImageRecord]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(relative path, reason) of files that could not be used."""
    notes: list[str] = field(default_factory=list)
    """Warnings about the folder as a whole (e.g. images beside class folders, which drop the labels)."""

    def __len__(self) -> int:
        return len(self.records)

    def path(self, i: int) -> Path:
        return self.root / self.records[i].rel

    def label_name(self, i: int) -> str:
        lab = self.records[i].label
        return self.classes[lab] if lab >= 0 else ""

    def digest(self) -> str:
        """Identity of the image list for cache keys: paths, sizes and mtimes."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.rel}\0{r.size}\0{r.mtime_ns}\0{r.label}\n".encode("utf-8", "surrogateescape"))
        h.update(json.dumps(self.classes).encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)


_SURROGATES = re.compile("[\ud800-\udfff]")


def shown(name: str) -> str:
    """A file or folder name as the atlas shows it: bytes that are not UTF-8 (which Python keeps as
    surrogate escapes, so the file can still be opened) become U+FFFD, so pages and JSON stay valid
    UTF-8.  Use it for display only; ``ImageList.path`` needs the name as it is."""
    return _SURROGATES.sub("\ufffd", name)


ATLAS_MARKER = ".sitegen-atlas.json"
"""The file every atlas folder holds (sitegen.output.MARKER): a folder with it is a site, not data."""


def _walk(root: Path, exclude: Sequence[Path] = (), left_out: list | None = None) -> Iterable[Path]:
    """Files under ``root`` in sorted order; symlinked folders are not followed (no loops).  Atlas
    folders (those holding the atlas marker) and the folders in ``exclude`` are not entered: their
    pages and pictures are a site, not images; each one left out is appended to ``left_out``."""
    skip = {os.path.realpath(p) for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
        dirnames.sort()
        for d in list(dirnames):
            path = os.path.join(dirpath, d)
            if os.path.realpath(path) in skip or os.path.isfile(os.path.join(path, ATLAS_MARKER)):
                dirnames.remove(d)
                if left_out is not None:
                    left_out.append(Path(path))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def discover(root: str | Path, max_images: int = 0, exclude: Sequence[str | Path] = ()) -> ImageList:
    """All image files under ``root`` (by extension), with labels from an ImageFolder layout.
    Never inside an atlas (a folder with the atlas marker) or a folder in ``exclude`` (the output)."""
    root = Path(root)
    if not root.exists():
        raise ImageError(f"image folder {str(root)!r} does not exist", "pass a folder of images with --images")
    if not root.is_dir():
        raise ImageError(f"{str(root)!r} is not a folder", "pass a folder of images with --images")
    if (root / ATLAS_MARKER).is_file():
        raise ImageError(f"{str(root)!r} is a sitegen atlas, not a folder of images",
                         "pass the folder of images the atlas was built from with --images")
    files: list[tuple[str, os.stat_result]] = []
    skipped: list[tuple[str, str]] = []
    sites: list[Path] = []
    for p in _walk(root, [Path(e) for e in exclude], sites):
        rel = p.relative_to(root).as_posix()
        if p.suffix.lower() not in EXTENSIONS:
            if not p.name.startswith("."):
                skipped.append((rel, "not an image file extension"))
            continue
        try:
            st = p.stat()
        except OSError as e:
            skipped.append((rel, f"cannot stat: {e.strerror}"))
            continue
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO (or a device) named x.jpg would block forever
            skipped.append((rel, "not a regular file"))
            continue
        files.append((rel, st))
    for site in sites:
        is_atlas = (site / ATLAS_MARKER).is_file()
        skipped.append((site.relative_to(root).as_posix() + "/",
                        "a sitegen atlas (its pages and pictures are not images)" if is_atlas
                        else "the output folder of this build"))
    if max_images:
        files = files[:max_images]
    if not files:
        raise ImageError(f"no images found in {str(root)!r}",
                         f"sitegen reads {', '.join(sorted(EXTENSIONS))} files, searched recursively")
    # ImageFolder: labels only when every image sits in a first-level sub-folder.
    in_folders = all("/" in rel for rel, _ in files)
    classes = sorted({rel.split("/", 1)[0] for rel, _ in files}) if in_folders else []
    index = {c: i for i, c in enumerate(classes)}
    records = [ImageRecord(rel, index[rel.split("/", 1)[0]] if in_folders else -1, st.st_size, st.st_mtime_ns)
               for rel, st in files]
    notes = []
    stray = [rel for rel, _ in files if "/" not in rel]
    if not in_folders and len(stray) < len(files):
        # Mostly class folders, but some images at the top: one stray file drops every label.
        notes.append(f"{len(stray)} {'image is' if len(stray) == 1 else 'images are'} at the top of the images "
                     f"folder, outside the class folders (e.g. {stray[0]}), so the class labels of the "
                     f"{len(files) - len(stray)} images in sub-folders are not used; move "
                     f"{'it' if len(stray) == 1 else 'them'} into a class folder (or out) to keep the labels")
    return ImageList(root=root, records=records, classes=classes, skipped=skipped, notes=notes)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Greyscale, palette, alpha, CMYK and 16-bit images as 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-12)
        return Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_ORIENTATION = 0x0112
_TURNED = frozenset({5, 6, 7, 8})
"""EXIF orientations that turn the picture by 90° (width and height swap when it is shown upright)."""


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the picture once its EXIF orientation is applied, from the header alone.
    Pillow's TIFF reader gives the upright size already (it turns the pixels itself when loading).
    A PNG keeps its EXIF where Pillow would have to decode the pixels to find it: read only when it
    came before them (PNGs with EXIF rotations are rare; the decoded size is checked again)."""
    w, h = img.size
    try:
        if img.format == "TIFF" or (img.format == "PNG" and "exif" not in img.info):
            return w, h
        turned = img.getexif().get(_ORIENTATION) in _TURNED
    except Exception:  # noqa: BLE001 -- an unreadable EXIF block: exif_transpose will ignore it too
        return w, h
    return (h, w) if turned else (w, h)


class _HeaderRead(Exception):
    """Stops :func:`read_rgb` after the header: carries the upright size (see :func:`header_size`)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__(size)
        self.size = size


def read_rgb(path: Path, max_pixels: int, shown_as: str | None = None,
             check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """Decode one image (first frame, EXIF orientation applied) as RGB, or raise ImageError.

    ``check_size(width, height)`` (upright size from the header) may raise ImageError to refuse the
    image before its pixels are decoded."""
    name = shown_as or path.name
    if not path.is_file():  # a FIFO would block open(); a folder or a broken link cannot be read
        raise ImageError(f"{name}: not a regular file", "remove it from the images folder")
    try:
        # Pillow warns above its own limit; ours (data.max_pixels, checked below) is the one that applies.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img_file = Image.open(path)
        with img_file as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}×{h} pixels is over the limit of {max_pixels}",
                                 "raise data.max_pixels if the image is genuine")
            if check_size is not None:
                check_size(*_upright_size(img))
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except (ImageError, _HeaderRead):
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except Image.DecompressionBombError:
        # Pillow's hard limit (2 × Image.MAX_IMAGE_PIXELS), reached before our check: data.max_pixels
        # is capped at it, so this image is over the limit the user set too.
        raise ImageError(f"{name}: declares more pixels than the limit of {max_pixels} (a possible "
                         "decompression bomb); it was not decoded", "shrink the image or remove it") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied", "make the file readable (chmod +r) or remove it") from None
    except Exception as e:  # noqa: BLE001 -- damaged files make Pillow's plugins raise almost anything
        # (struct.error, IndexError, TypeError, ...): any failure to decode one file is that file's problem.
        raise ImageError(f"{name}: cannot decode ({str(e)[:120] or type(e).__name__})") from None


def header_size(path: Path, max_pixels: int, shown_as: str | None = None) -> tuple[int, int]:
    """(width, height) of an image, upright, read from its header without decoding the pixels;
    ImageError for a file :func:`read_rgb` would refuse before decoding (not an image, over the
    pixel limit, unreadable).  A file whose pixels are damaged still has a size here."""
    def stop(w: int, h: int) -> None:
        raise _HeaderRead((w, h))

    try:
        read_rgb(path, max_pixels, shown_as, check_size=stop)
    except _HeaderRead as found:
        return found.size
    raise AssertionError("read_rgb returned without checking the size")  # pragma: no cover


def channels_of(cfg: DataConfig) -> int:
    """Channels of the model's input: ``data.channels`` once decided (1 or 3); RGB until then."""
    return cfg.channels or 3


GREY_WEIGHTS = (0.299, 0.587, 0.114)
"""Luminance of an RGB pixel, ITU-R 601-2 (Pillow's "L" conversion): what grey models are shown."""


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """An RGB image as the model reads it: itself, or its luminance ("L") for 1 channel."""
    return img.convert("L") if channels == 1 else img


def resized_size(w: int, h: int, resize: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``resize`` (0: unchanged).  The longer side
    is truncated as torchvision's ``Resize`` does, so that with a torchvision architecture's own
    transform the model gets exactly the pixels torchvision would give it."""
    if resize <= 0:
        return w, h
    if w <= h:
        return resize, max(1, int(resize * h / w))
    return max(1, int(resize * w / h)), resize


def size_after(w: int, h: int, cfg: DataConfig) -> tuple[int, int]:
    """(height, width) of an upright w×h image after resizing and cropping: the model's input."""
    nw, nh = resized_size(w, h, cfg.resize)
    return (cfg.crop, cfg.crop) if cfg.crop > 0 else (nh, nw)


def preprocess(img: Image.Image, cfg: DataConfig) -> np.ndarray:
    """Resize the shorter side, centre-crop; returns uint8 H×W×C (the 'input pixels' of the atlas):
    C = 3 for an RGB image, 1 for a grey ("L") one."""
    nw, nh = resized_size(*img.size, cfg.resize)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    if cfg.crop > 0:
        w, h = img.size
        c = cfg.crop
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))  # pads with black where the image is smaller
    px = np.asarray(img, dtype=np.uint8)
    return (px[..., None] if px.ndim == 2 else px).copy()


def load_pixels(images: ImageList, i: int, cfg: DataConfig,
                expect: tuple[int, int] | None = None) -> np.ndarray:
    """Image ``i`` as the model's input pixels: uint8 H×W×C, C = ``channels_of(cfg)``.  With
    ``expect`` (H, W), an image of another size after preprocessing is refused from its header,
    before its pixels are decoded."""
    rel = images.records[i].rel
    check = None
    if expect is not None:
        def check(w: int, h: int) -> None:
            got = size_after(w, h, cfg)
            if got != tuple(expect):
                raise size_error(rel, got, expect)

    img = read_rgb(images.path(i), cfg.max_pixels, rel, check_size=check)
    px = preprocess(to_model_mode(img, channels_of(cfg)), cfg)
    if expect is not None and px.shape[:2] != tuple(expect):  # e.g. a PNG's late EXIF rotation
        raise size_error(rel, px.shape[:2], expect)
    return px


def size_error(rel: str, got: Sequence[int], want: Sequence[int]) -> ImageError:
    return ImageError(f"{rel}: size {got[1]}×{got[0]} after preprocessing differs from the input size "
                      f"{want[1]}×{want[0]}", "set data.resize and data.crop so every image has the same size")


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """Input pixels (..., H, W, C) as an RGB picture: a grey image (C = 1) in grey, never false colour."""
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def display_pixels(images: ImageList, i: int, cfg: DataConfig) -> np.ndarray:
    """Image ``i`` as the atlas shows it: the input pixels as uint8 H×W×3."""
    return as_rgb(load_pixels(images, i, cfg))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def grey_of(rgb: Sequence[float]) -> float:
    """The luminance-weighted average of three per-channel numbers (ImageNet's mean in grey)."""
    return round(sum(w * v for w, v in zip(GREY_WEIGHTS, rgb)), 4)


def default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) when none are given: ImageNet's, or for a grey model ImageNet's weighted like
    the luminance (the mean of a grey ImageNet image; the std the same weighted average)."""
    if channels == 1:
        return (grey_of(IMAGENET_MEAN),), (grey_of(IMAGENET_STD),)
    return IMAGENET_MEAN, IMAGENET_STD


def per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """One number for every channel, or one per channel, as a tuple of ``channels`` numbers."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(f"{len(values)} normalisation numbers for a {channels}-channel input",
                         "give one number, or one per channel, to --mean/--std (data.mean/data.std)")
    return values


def normalise(pixels: np.ndarray | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float (..., C, H, W), scaled to [0, 1] then standardised with
    ``data.mean``/``data.std`` (one number or one per channel; empty: :func:`default_stats`)."""
    t = torch.as_tensor(pixels).to(torch.float32).div_(255.0)
    c = t.shape[-1]
    t = t.movedim(-1, -3)
    mean0, std0 = default_stats(c)
    mean = torch.tensor(per_channel(cfg.mean or mean0, c), dtype=torch.float32, device=t.device).view(c, 1, 1)
    std = torch.tensor(per_channel(cfg.std or std0, c), dtype=torch.float32, device=t.device).view(c, 1, 1)
    # Contiguous NCHW, as torchvision's ToTensor gives: a channels-last input makes every feature
    # map channels-last, and per-channel spatial reductions over those are ~50x slower on the CPU.
    return ((t - mean) / std).contiguous()


class PixelDataset(torch.utils.data.Dataset):
    """Decoded, preprocessed uint8 pixels; a failed decode gives an all-zero image and ok=False.

    Failures are returned, not raised, so one bad file does not stop a DataLoader; the dataset
    pass records them and the atlas lists them.  An image of another size than the input is
    refused from its header (not decoded).
    """

    def __init__(self, images: ImageList, cfg: DataConfig, indices: Sequence[int], size: tuple[int, int]):
        self.images, self.cfg, self.indices, self.size = images, cfg, list(indices), size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        h, w = self.size
        try:
            return torch.from_numpy(load_pixels(self.images, i, self.cfg, expect=(h, w))), i, ""
        except ImageError as e:
            return torch.zeros((h, w, channels_of(self.cfg)), dtype=torch.uint8), i, str(e)


def warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} files, e.g. {skipped[0][0]}: {skipped[0][1]}", stacklevel=2)
