"""The analysis-pass interface and its cache.

A pass has a ``name``, a ``version``, a config (a frozen dataclass, part of the cache key) and a
``run(ctx)`` that returns a :class:`Result`: JSON-able metadata plus NumPy arrays, saved as
``meta.json`` + ``arrays.npz`` and loaded without pickle.  A new pass fills in ``run``, and
``plan`` (its estimate, see :mod:`sitegen.planning`), nothing else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..context import BuildContext
from ..planning import PassPlan, Probe, no_estimate


@dataclass
class Result:
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "arrays.npz", **self.arrays)
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "Result":
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        with np.load(folder / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(meta=meta, arrays=arrays)


class AnalysisPass:
    """Subclasses set ``name`` and ``version`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    """Bump when the computation changes: old cached results then no longer match."""
    distributed: ClassVar[bool] = False
    """True when ``run`` splits its work across the ranks of a torchrun job itself; other passes
    run on rank 0 only."""

    def __init__(self, config: Any = None):
        self.config = config

    def run(self, ctx: BuildContext) -> Result:  # pragma: no cover - interface
        raise NotImplementedError

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """What ``run`` will do and how long it will take on this device, before it runs: the work
        counted from the config, the images and the layers; the seconds from ``probe`` timing this
        pass's own batch function on a few real images (:class:`sitegen.planning.Probe`).  Earlier
        results are not available (``ctx.results`` is empty).  A pass that does not override this is
        reported as "no estimate", never counted as free."""
        return no_estimate(self.name)

    def cache_key(self, ctx: BuildContext) -> str:
        """Everything the result depends on: weights, image list, layers, preprocessing, config, version."""
        payload = {
            "pass": self.name,
            "version": self.version,
            "config": dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else self.config,
            **ctx.identity(),
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8", "surrogateescape")
        return hashlib.sha256(blob).hexdigest()[:24]


class Cache:
    """Results on disk under ``root/<pass>-<key>/``; written to a temporary folder and renamed, so a
    killed build never leaves a half-written entry that looks complete."""

    def __init__(self, root: Path | None):
        self.root = root

    def folder(self, p: AnalysisPass, key: str) -> Path | None:
        return self.root / f"{p.name}-{key}" if self.root else None

    def get(self, p: AnalysisPass, key: str) -> Result | None:
        folder = self.folder(p, key)
        if folder is None or not (folder / "meta.json").is_file():
            return None
        try:
            return Result.load(folder)
        except (OSError, ValueError, KeyError):
            return None  # damaged entry: recompute

    def put(self, p: AnalysisPass, key: str, result: Result) -> None:
        folder = self.folder(p, key)
        if folder is None:
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}-", dir=folder.parent))
        try:
            result.save(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


SPAN = "_span"
"""Key of the array recording what a saved work item covers."""


class ItemStore:
    """Each finished work item of a pass, saved as ``item<i>.npz`` under ``ctx.scratch``.

    Why: feature visualisation and attribution are long lists of independent batches; a build
    killed part-way should not redo the batches it had finished.  One small file per item (not per
    image) keeps the cost negligible beside computing it.  The folder is named by the pass's cache
    key, so only the identical pass reads the files back; item indices are global, so the ranks of
    a torchrun job never share a file.  Arrays only, written atomically (temporary file and
    ``os.replace``), loaded without pickle; a damaged file reads as missing and the item is
    recomputed.  ``folder`` None (no cache) stores nothing.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder

    def _path(self, i: int) -> Path:
        return self.folder / f"item{int(i)}.npz"

    def load(self, i: int, keys: list[str], span: tuple[int, ...]) -> dict[str, np.ndarray] | None:
        """Item ``i``'s arrays ``keys``, or None when it is not saved, cannot be read, or covers
        another ``span`` than asked: what the item holds (layer, first and last unit...).  Batch
        sizes may differ between runs (they follow the device and the free memory), so the same
        index can name other work."""
        if self.folder is None or not self._path(i).is_file():
            return None
        try:
            with np.load(self._path(i), allow_pickle=False) as z:
                if not np.array_equal(z[SPAN], np.asarray(span, dtype=np.int64)):
                    return None
                return {k: z[k] for k in keys}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None

    def save(self, i: int, arrays: dict[str, np.ndarray], span: tuple[int, ...]) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".item{int(i)}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **{SPAN: np.asarray(span, dtype=np.int64)})
        os.replace(tmp, self._path(i))  # a kill leaves the whole file or none

    def clear(self) -> None:
        """Remove every item file (once the pass has its result; the items of a run cut into more
        batches too) and the folder when empty.  Ranks may clear at once: a file already gone is fine."""
        if self.folder is None or not self.folder.is_dir():
            return
        for path in [*self.folder.glob("item*.npz"), *self.folder.glob(".item*.tmp")]:
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # other files remain (another kind of checkpoint)


def _all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (ranks on other hosts may not see the same cache)."""
    import torch

    from ..distributed import all_reduce

    return bool(all_reduce(torch.tensor([int(flag)]), op=torch.distributed.ReduceOp.MIN).item())


def run_cached(p: AnalysisPass, ctx: BuildContext, cache: Cache) -> tuple[Result, bool]:
    """The pass's result from the cache, or computed and stored. Returns (result, was_cached)."""
    key = p.cache_key(ctx)
    hit = cache.get(p, key)
    if p.distributed and ctx.dist.active and not _all_ranks(hit is not None):
        hit = None  # a pass whose ranks work together runs on all of them or on none
    if hit is not None:
        return hit, True
    folder = cache.folder(p, key)
    ctx.scratch = folder.with_name(folder.name + ".partial") if folder is not None else None
    try:
        result = p.run(ctx)
    finally:
        ctx.scratch = None
    result.meta.setdefault("pass", p.name)
    result.meta.setdefault("version", p.version)
    if ctx.dist.is_main:
        cache.put(p, key, result)
    return result, False
