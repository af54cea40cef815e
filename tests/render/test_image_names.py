"""Image pages have stable names: derived from the image's path relative to the images folder, never
from its position in the image list, so a permalink survives images being added or removed."""
from __future__ import annotations

import hashlib
import re
from types import SimpleNamespace

import numpy as np
import pytest

from sitegen.render.views.image_files import activations_url, image_name, image_url, picture_url
from sitegen.render.views.image_pages import ImagePagesView

SAFE = re.compile(r"[A-Za-z0-9._-]+")
HOSTILE = [
    '"><img src=x onerror=alert(1)>.jpg',
    "cl<a>ss/\"'><svg onload=alert(1)>.png",
    "café/naïve ünïcødé.jpg",
    "猫/犬.jpg",
    "\U0001f436/🐶🐱.png",
    "a/\udcff\udcfe.jpg",  # bytes that are not UTF-8, kept as surrogate escapes by os.walk
    "../../etc/passwd",
    ".hidden.jpg",
    "",
    "x" * 300 + "/" + "y" * 300 + ".png",
    "é" * 1000 + ".jpg",
    "dir/" + "-" * 200 + ".jpg",
    "CON.jpg",
    "a\nb\tc\x00.jpg",
]


def check_safe(rel: str) -> str:
    url = image_url(rel)
    name = image_name(rel)
    assert url == f"images/{name}.html"
    assert SAFE.fullmatch(name), (rel, name)
    assert name.isascii() and not name.startswith((".", "-")), (rel, name)
    assert len(name) <= 80 and len(f"{name}.html".encode()) <= 255, (rel, name)
    return name


def test_the_name_is_a_readable_slug_plus_a_hash_of_the_exact_path():
    digest = hashlib.sha256("dog/0001.jpg".encode("utf-8")).hexdigest()[:8]
    assert image_url("dog/0001.jpg") == f"images/dog-0001-jpg-{digest}.html"
    assert picture_url("dog/0001.jpg") == f"img/images/dog-0001-jpg-{digest}.jpg"
    assert activations_url("dog/0001.jpg") == f"activations/dog-0001-jpg-{digest}.html"
    raw = "a/\udcff.jpg"
    assert image_name(raw).endswith(hashlib.sha256(b"a/\xff.jpg").hexdigest()[:8])


def test_paths_the_slug_cannot_tell_apart_get_different_names():
    pairs = [("a b.jpg", "a_b.jpg"), ("a b.jpg", "a-b.jpg"), ("Dog.jpg", "dog.jpg"), ("café.jpg", "cafe.jpg"),
             ("猫.jpg", "犬.jpg"), ("a/b.jpg", "a-b.jpg"), ("x" * 300 + "1.png", "x" * 300 + "2.png")]
    for a, b in pairs:
        assert image_url(a) != image_url(b), (a, b)
    names = [image_name(r) for r in HOSTILE]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("rel", HOSTILE)
def test_hostile_names_give_safe_bounded_names(rel):
    name = check_safe(rel)
    assert name == image_name(rel)  # deterministic
    for bad in ("<", ">", '"', "'", "/", "\\", " ", "=", "\x00"):
        assert bad not in name


def test_the_readable_part_keeps_what_it_can():
    assert image_name("café/naïve.jpg").startswith("cafe-naive-jpg-")
    assert image_name("猫.jpg").startswith("jpg-")
    assert image_name("猫").startswith("image-")
    long = image_name("class" + "x" * 300 + "/photo-0042.jpg")
    assert long.startswith("class") and "photo-0042-jpg-" in long


def test_index_does_not_change_the_url():
    with pytest.raises(TypeError):
        image_url(3)  # an index is not a name


class _Images:
    def __init__(self, rels):
        self.records = [SimpleNamespace(rel=r) for r in rels]

    def label_name(self, n):
        return ""


class _Result:
    def __init__(self, ids):
        self.meta = {"neighbours": 1, "output_names": ["a"]}
        self.arrays = {"images": np.array(ids), "top_classes": np.zeros((len(ids), 1), int),
                       "top_probs": np.ones((len(ids), 1)), "agree_map": np.zeros(len(ids)),
                       "agree_codes": np.zeros(len(ids))}


def _page_paths(rels, ids):
    ctx = SimpleNamespace(images=_Images(rels), input_size=(8, 8))
    pages = ImagePagesView().pages(ctx, {"layers": []}, {"tsne": _Result(ids)}, SimpleNamespace(title="t"))
    return {ctx.images.records[p.context["n"]].rel: p.path for p in pages}


def test_the_same_image_keeps_its_page_when_others_are_added_or_removed():
    before = ["cat/1.jpg", "dog/1.jpg", "dog/2.jpg"]
    after = ["ant/1.jpg", "bee/1.jpg", "cat/1.jpg", "dog/2.jpg"]  # two added before, one removed between
    a = _page_paths(before, list(range(len(before))))
    b = _page_paths(after, list(range(len(after))))
    assert a["cat/1.jpg"] == b["cat/1.jpg"] == image_url("cat/1.jpg")
    assert a["dog/2.jpg"] == b["dog/2.jpg"] == image_url("dog/2.jpg")
    # the same path at two positions in the list: the same URL
    assert before.index("cat/1.jpg") != after.index("cat/1.jpg")
    assert before.index("dog/2.jpg") != after.index("dog/2.jpg")
    assert len(set(a.values())) == 3 and all(p.startswith("images/") for p in a.values())
