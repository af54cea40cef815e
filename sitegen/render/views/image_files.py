"""Where an image's page and pictures live, and how pictures are written: shared by every view
that shows whole images (image pages, occlusion, activation maps, t-SNE, kernels), none of which
imports another for them.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ImageError
from ...images import display_pixels

DISPLAY = 192
"""Images are shown at least this many CSS pixels wide (CIFAR's 32 px are enlarged, pixelated)."""


SLUG_MAX = 60
"""Most characters of the readable part of an image's name (the whole name stays under 80)."""
HASH_LEN = 8
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")


def image_name(rel: str) -> str:
    """The stable, file-name-safe name of an image's page and pictures, from its path relative to
    the images folder: a readable slug plus a short hash of the exact path, e.g. ``dog/0001.jpg`` ->
    ``dog-0001-jpg-3f2a9c1e``.

    It depends on the path alone, not on the image's index, so adding or removing other images
    never moves a page (permalinks survive rebuilds).  The hash (sha256 of the path's UTF-8 bytes,
    surrogate escapes as the original bytes) keeps paths apart that the slug cannot tell apart
    (``a b.jpg`` / ``a_b.jpg``, case, non-ASCII, truncation).  Only ``[A-Za-z0-9-]``, never empty,
    never starting with a dot, at most SLUG_MAX + 1 + HASH_LEN characters.
    """
    if not isinstance(rel, str):
        raise TypeError(f"image_name takes the image's relative path, not {type(rel).__name__}")
    try:
        raw = rel.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (not from os.walk)
        raw = rel.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).hexdigest()[:HASH_LEN]
    ascii_text = unicodedata.normalize("NFKD", rel).encode("ascii", "ignore").decode("ascii")
    slug = _NOT_ALNUM.sub("-", ascii_text).strip("-")
    if len(slug) > SLUG_MAX:  # keep the start (class folder) and the end (file name)
        head, tail = SLUG_MAX // 3, SLUG_MAX - SLUG_MAX // 3 - 2
        slug = f"{slug[:head].rstrip('-')}--{slug[-tail:].lstrip('-')}"
    return f"{slug or 'image'}-{digest}"


def image_url(rel: str) -> str:
    """The image page of the image at ``rel`` (its path relative to the images folder), relative to
    the site root.  Every link to an image page goes through here."""
    return f"images/{image_name(rel)}.html"


def picture_url(rel: str) -> str:
    """The image as the pages show it (a JPEG), relative to the site root."""
    return f"img/images/{image_name(rel)}.jpg"


def display_factor(input_size: tuple[int, int]) -> int:
    """Integer enlargement that shows an input at least DISPLAY pixels wide."""
    return max(1, math.ceil(DISPLAY / max(1, input_size[1])))


def save_jpeg(arr: np.ndarray, path: Path, quality: int = 90) -> int:
    """Photographs as JPEG: a few thousand image pages stay small (PNG would be ~5× larger)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def save_png(arr: np.ndarray, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=6)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def safe_pixels(ctx, n: int) -> np.ndarray:
    """The preprocessed image ``n``; a grey square if it can no longer be read (the site still builds)."""
    try:
        return display_pixels(ctx.images, n, ctx.config.data)
    except ImageError:
        h, w = ctx.input_size
        return np.full((h, w, 3), 128, dtype=np.uint8)


def activations_url(rel: str) -> str:
    """The activation-maps page of the image at ``rel``, relative to the site root: named like its
    image page, so it too keeps its address when other images come or go."""
    return f"activations/{image_name(rel)}.html"


def map_urls(n: int) -> dict[str, str]:
    return {key: f"img/occlusion/{n}-{key}.png" for key in ("prob", "best", "total")}


def usable(results: dict, name: str) -> bool:
    r = results.get(name)
    return r is not None and "skipped" not in r.meta and "images" in r.arrays and len(r.arrays["images"]) > 0


def top_list(classes: np.ndarray, probs: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    return [{"name": names[int(c)] if int(c) < len(names) else f"class {int(c)}", "prob": float(p)}
            for c, p in zip(classes, probs)]
