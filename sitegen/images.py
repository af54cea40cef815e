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
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import DataConfig
from .errors import ImageError

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


def _walk(root: Path) -> Iterable[Path]:
    """Files under ``root`` in sorted order; symlinked folders are not followed (no loops)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def discover(root: str | Path, max_images: int = 0) -> ImageList:
    """All image files under ``root`` (by extension), with labels from an ImageFolder layout."""
    root = Path(root)
    if not root.exists():
        raise ImageError(f"image folder {str(root)!r} does not exist", "pass a folder of images with --images")
    if not root.is_dir():
        raise ImageError(f"{str(root)!r} is not a folder", "pass a folder of images with --images")
    files: list[tuple[str, os.stat_result]] = []
    skipped: list[tuple[str, str]] = []
    for p in _walk(root):
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
    return ImageList(root=root, records=records, classes=classes, skipped=skipped)


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


def read_rgb(path: Path, max_pixels: int, shown_as: str | None = None) -> Image.Image:
    """Decode one image (first frame, EXIF orientation applied) as RGB, or raise ImageError."""
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
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except ImageError:
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


def preprocess(img: Image.Image, cfg: DataConfig) -> np.ndarray:
    """Resize the shorter side, centre-crop; returns uint8 HxWx3 (the 'input pixels' of the atlas)."""
    if cfg.resize:
        w, h = img.size
        s = cfg.resize / min(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    if cfg.crop:
        w, h = img.size
        c = cfg.crop
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))  # pads with black where the image is smaller
    return np.asarray(img, dtype=np.uint8).copy()


def load_pixels(images: ImageList, i: int, cfg: DataConfig) -> np.ndarray:
    return preprocess(read_rgb(images.path(i), cfg.max_pixels, images.records[i].rel), cfg)


def normalise(pixels: np.ndarray | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W), scaled to [0, 1] then standardised."""
    t = torch.as_tensor(pixels).to(torch.float32).div_(255.0)
    t = t.movedim(-1, -3)
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=t.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=t.device).view(3, 1, 1)
    # Contiguous NCHW, as torchvision's ToTensor gives: a channels-last input makes every feature
    # map channels-last, and per-channel spatial reductions over those are ~50x slower on the CPU.
    return ((t - mean) / std).contiguous()


class PixelDataset(torch.utils.data.Dataset):
    """Decoded, preprocessed uint8 pixels; a failed decode gives an all-zero image and ok=False.

    Failures are returned, not raised, so one bad file does not stop a DataLoader; the dataset
    pass records them and the atlas lists them.
    """

    def __init__(self, images: ImageList, cfg: DataConfig, indices: Sequence[int], size: tuple[int, int]):
        self.images, self.cfg, self.indices, self.size = images, cfg, list(indices), size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        h, w = self.size
        try:
            px = load_pixels(self.images, i, self.cfg)
            if px.shape[:2] != (h, w):
                raise ImageError(f"{self.images.records[i].rel}: size {px.shape[1]}×{px.shape[0]} after "
                                 f"preprocessing differs from {w}×{h}",
                                 "set data.resize and data.crop so every image has the same size")
            return torch.from_numpy(px), i, ""
        except ImageError as e:
            return torch.zeros((h, w, 3), dtype=torch.uint8), i, str(e)


def probe_input(images: ImageList, cfg: DataConfig, tries: int = 1000) -> tuple[int, int]:
    """(H, W) of the first readable image after preprocessing: the model's input size.  Looks well
    past a damaged first batch (a failed decode costs little: sizes are refused from the header)."""
    errors: list[ImageError] = []
    for i in range(min(tries, len(images))):
        try:
            px = load_pixels(images, i, cfg)
            return int(px.shape[0]), int(px.shape[1])
        except ImageError as e:
            errors.append(e)
    # The first problem's own hint (e.g. "raise data.max_pixels") is the fix to show.
    raise ImageError(f"none of the first {min(tries, len(images))} images in {str(images.root)!r} could be read "
                     f"(first problem: {errors[0].message if errors else '?'})", errors[0].hint if errors else None)


def warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} files, e.g. {skipped[0][0]}: {skipped[0][1]}", stacklevel=2)
