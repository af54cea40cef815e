"""``sitegen build``: collect (model, images, layers), run the passes (cached), render, publish."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config as config_mod
from . import progress
from .config import Config
from .context import BuildContext, default_device
from .images import discover as discover_images
from .images import probe_input
from .layers import LayerInfo, ReceptiveField
from .layers import discover as discover_layers
from .layers import select
from .model_loading import LoadedModel, load_model
from .output import check_target, discard, publish, staging_dir
from .passes import default_passes
from .passes.base import Cache, Result, run_cached
from .render.pages import RenderOptions
from .render.site import render


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sitegen"


@dataclass
class BuildReport:
    index: Path
    timings: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    images: int = 0
    skipped: int = 0
    layers: int = 0
    channels: int = 0
    site_bytes: int = 0
    site_files: int = 0
    unusable: int = 0
    """Listed images the dataset pass could not use (undecodable, another size); part of ``skipped``."""


def cached_layers(model: LoadedModel, input_shape: tuple[int, int, int], cache: Path | None) -> list[LayerInfo]:
    """Layer discovery (a probe forward/backward per layer) is cached like a pass result."""
    arch = hashlib.sha256(model.arch.encode("utf-8", "surrogateescape")).hexdigest()[:8]  # hash() is per-process
    key = f"layers-v1-{model.weights_hash[:16]}-{arch}-{'x'.join(map(str, input_shape))}"
    path = cache / f"{key}.json" if cache else None
    if path and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("arch") == model.arch:
                return [LayerInfo(**{**d, "shape": tuple(d["shape"]), "rf": ReceptiveField(**d["rf"])})
                        for d in data["layers"]]
        except (OSError, ValueError, TypeError, KeyError):
            pass
    layers = discover_layers(model.model, input_shape)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one job may write it at once
        tmp.write_text(json.dumps({"arch": model.arch, "layers": [l.to_dict() for l in layers]}), encoding="utf-8")
        os.replace(tmp, path)
    return layers


def prepare(model_path: str | Path, images_dir: str | Path, cfg: Config,
            cache_dir: Path | None, device: torch.device | None = None) -> BuildContext:
    """Everything a pass needs, with every input checked before any output is written.

    ``device`` None picks the GPU when PyTorch sees one (``context.default_device``).  The model
    (loaded here, sitegen's own copy) moves there before anything runs on it: every pass sends its
    batches to ``ctx.device``."""
    device = device or default_device()
    loaded = load_model(model_path, cfg.model.arch, cfg.model.trust_pickle)
    loaded.model.to(device)
    images = discover_images(images_dir, cfg.data.max_images)
    for rel, reason in images.skipped[:5]:
        progress.info(f"warning: skipping {rel}: {reason}")
    if len(images.skipped) > 5:
        progress.info(f"warning: skipping {len(images.skipped) - 5} more files (listed on the atlas's index page)")
    h, w = probe_input(images, cfg.data)
    all_layers = cached_layers(loaded, (3, h, w), cache_dir)
    chosen = select(all_layers, cfg.layers)
    return BuildContext(config=cfg, model=loaded, images=images, layers=chosen, all_layers=all_layers,
                        input_size=(h, w), device=device)


def run_passes(ctx: BuildContext, cache: Cache, report: BuildReport) -> dict[str, Result]:
    results: dict[str, Result] = {}
    ctx.results = results
    for p in default_passes(ctx.config):
        if ctx.dist.active and not p.distributed and not ctx.dist.is_main:
            continue  # a pass that does not split its work runs on rank 0 alone
        t = time.perf_counter()
        results[p.name], report.cached[p.name] = run_cached(p, ctx, cache)
        report.timings[f"pass:{p.name}"] = time.perf_counter() - t
        if report.cached[p.name]:
            progress.info(f"{p.name}: cached result reused")
    return results


def warn_unusable(reasons: list[str], shown: int = 5) -> None:
    """Say which images the dataset pass could not use (undecodable, another size...): they are
    left out of every view, which must not happen silently."""
    for reason in reasons[:shown]:
        progress.info(f"warning: skipping {reason}")
    if len(reasons) > shown:
        progress.info(f"warning: {len(reasons) - shown} more images could not be used "
                      "(all are listed on the atlas's index page)")


def build(model_path: str | Path, images_dir: str | Path, out: str | Path, cfg: Config, *,
          force: bool = False, cache_dir: Path | None = None) -> BuildReport:
    out = Path(out)
    check_target(out, force)
    t0 = time.perf_counter()
    ctx = prepare(model_path, images_dir, cfg, cache_dir)
    report = BuildReport(index=out / "index.html", images=len(ctx.images),
                         layers=len(ctx.layers), channels=sum(l.channels for l in ctx.layers))
    report.timings["prepare"] = time.perf_counter() - t0
    progress.info(f"{len(ctx.images)} images, {report.layers} layers, {report.channels} channels, "
                  f"device {ctx.device.type}")
    results = run_passes(ctx, Cache(cache_dir), report)
    report.unusable = len(results["topk"].arrays["failed"])
    report.skipped = len(ctx.images.skipped) + report.unusable
    if not ctx.dist.is_main:
        return report  # only rank 0 writes the site
    warn_unusable(results["topk"].meta.get("failed_reasons", []))
    t = time.perf_counter()
    title = cfg.site.title or f"{Path(model_path).name} atlas"
    staged = staging_dir(out)
    try:
        render(ctx, results, staged, RenderOptions(title=title, patch_size=cfg.site.patch_size,
                                                   image_format=cfg.site.image_format,
                                                   workers=cfg.site.render_workers))
        publish(staged, out)
    except BaseException:
        discard(staged)
        raise
    report.timings["render"] = time.perf_counter() - t
    report.timings["total"] = time.perf_counter() - t0
    report.site_files, report.site_bytes = site_size(out)
    if report.site_bytes > PAGES_LIMIT:
        progress.info(f"warning: the atlas is {report.site_bytes / 1e9:.2f} GB, over GitHub Pages' 1 GB limit; "
                      "docs/size.md shows which settings shrink it (layers, attribution.methods, site.patch_size)")
    return report


PAGES_LIMIT = 10**9
"""GitHub Pages publishes sites of at most 1 GB."""


def site_size(folder: Path) -> tuple[int, int]:
    """Files and bytes under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def load_config(path: str | Path | None, **sections: dict[str, Any]) -> Config:
    """The config file (or defaults) with command-line flags per section laid over it."""
    cfg = config_mod.load(path)
    for section, values in sections.items():
        if section == "layers":
            if values:
                cfg = dataclasses.replace(cfg, layers=tuple(values))
            continue
        cfg = config_mod.with_overrides(cfg, section, **values)
    return cfg
