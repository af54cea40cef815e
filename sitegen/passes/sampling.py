"""Which images the whole-model views look at, and what the model's outputs are called.

Shared by the occlusion, activation-map and t-SNE passes, so the same images appear in each and
the choice never depends on anything but the image list and the config (no randomness beyond a
seeded generator).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from ..config import SamplesConfig
from ..errors import ConfigError
from ..images import ImageList


def sample_images(images: ImageList, cfg: SamplesConfig) -> list[int]:
    """The sample images' indices: those named in ``samples.images`` (in that order), or else the
    first ``per_class`` images of every class, taken round-robin over the classes (so a small
    ``max_images`` still covers many classes) and returned in index order; without class folders,
    ``max_images`` evenly spaced images."""
    if cfg.images:
        return _named(images, cfg.images)
    n = len(images)
    if not images.classes:
        count = min(cfg.max_images, n)
        return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))
    by_class: dict[int, list[int]] = {}
    for i, r in enumerate(images.records):
        members = by_class.setdefault(r.label, [])
        if len(members) < cfg.per_class:
            members.append(i)
    chosen: list[int] = []
    for rank in range(cfg.per_class):
        for label in sorted(by_class):
            if rank < len(by_class[label]) and len(chosen) < cfg.max_images:
                chosen.append(by_class[label][rank])
    return sorted(chosen)


def _named(images: ImageList, names: tuple[str, ...]) -> list[int]:
    index = {r.rel: i for i, r in enumerate(images.records)}
    out: list[int] = []
    for name in names:
        key = name.replace("\\", "/")
        key = key[2:] if key.startswith("./") else key
        if key not in index:
            example = images.records[0].rel
            raise ConfigError(f"config key 'samples.images' names {name!r}, which is not among the images",
                              f"give paths relative to the images folder, as the atlas shows them (e.g. {example!r})")
        if index[key] not in out:
            out.append(index[key])
    return out


def stratified_sample(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` indices into ``labels``, each class keeping its share (largest remainder),
    drawn with a seeded generator; sorted.  All indices when there are no more than ``cap``."""
    n = len(labels)
    if n <= cap:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * cap / n
    quota = np.floor(exact).astype(int)
    remainder = cap - int(quota.sum())
    # Ties in the remainders go to the lower class label: argsort is stable.
    quota[np.argsort(-(exact - quota), kind="stable")[:remainder]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def labels_match_outputs(images: ImageList, num_outputs: int) -> bool:
    """Folder labels can be read as the model's class indices only when there are exactly as many
    class folders as outputs (sorted folder names, as torchvision's ImageFolder numbers them)."""
    return bool(images.classes) and len(images.classes) == num_outputs


def output_names(images: ImageList, num_outputs: int) -> list[str]:
    """A name per model output: the class folders when they line up with the outputs, else ``class k``."""
    if labels_match_outputs(images, num_outputs):
        return list(images.classes)
    return [f"class {k}" for k in range(num_outputs)]


def key_with(base_key: str, *configs: object) -> str:
    """A pass's cache key extended by config sections other than its own (e.g. ``[samples]``)."""
    blob = json.dumps([dataclasses.asdict(c) for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(f"{base_key}\0{blob}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
