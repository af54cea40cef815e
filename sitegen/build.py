"""``sitegen build``: collect (model, images, layers), run the passes (cached), render, publish."""
from __future__ import annotations

import contextlib
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
from .activation_rules import ActivationReport, describe_unruled
from .config import Config
from .context import BuildContext, default_device
from .images import discover as discover_images
from .inputs import plan_inputs
from .layers import LayerInfo, ReceptiveField
from .layers import discover as discover_layers
from .layers import select
from .model_loading import LoadedModel, load_like, load_model
from .distributed import current as current_dist
from .errors import ConfigError, LayerError, SitegenError
from .output import (MARKER, SITE_FILES, atlas_files, build_lock, check_target, discard, publish,
                     remove_stale_staging, staging_dir)
from .passes import default_passes
from .passes.base import Cache, Result, run_cached
from .render.pages import RenderOptions
from .render.site import asset_files, render
from .workpool import keep_freed_memory


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
    plan: Any = None
    """The build's :class:`sitegen.plan.Plan`: estimates made before the passes ran."""


def cached_layers(model: LoadedModel, input_shape: tuple[int, int, int], cache: Path | None) -> list[LayerInfo]:
    """Layer discovery (a traced forward; a probe backward per layer the arithmetic cannot follow)
    is cached like a pass result."""
    arch = hashlib.sha256(model.arch.encode("utf-8", "surrogateescape")).hexdigest()[:8]  # hash() is per-process
    # v3: the gradient probe (the fields of layers the arithmetic cannot follow) runs in float64
    # with gates at 1; a float32 probe could cut a deep layer's field short by underflow.
    key = f"layers-v3-{model.weights_hash[:16]}-{arch}-{'x'.join(map(str, input_shape))}"
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


def check_cache_dir(cache_dir: Path | None) -> bool:
    """A cache folder that exists (or can be made) and is a folder, before any work.
    True when this call made it (a build that then fails takes the empty folder away again)."""
    if cache_dir is None:
        return False
    hint = "point --cache-dir at a folder (it is created if missing), or pass --no-cache"
    if cache_dir.exists() and not cache_dir.is_dir():
        raise SitegenError(f"cache folder {str(cache_dir)!r} is a file, not a folder", hint)
    made = not cache_dir.exists()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SitegenError(f"cannot create the cache folder {str(cache_dir)!r}: {e.strerror}", hint) from None
    return made


def _remove_if_empty(folder: Path) -> None:
    """Take back a folder this run made and left empty (a failed build leaves no trace)."""
    try:
        folder.rmdir()  # only succeeds on an empty folder
    except OSError:
        pass


def selectable_hint(model: torch.nn.Module, patterns: tuple[str, ...], layers: list[LayerInfo]) -> None:
    """Explain a --layer / ``layers`` pattern that names a module of the model sitegen does not show
    (a ReLU, a pooling or linear layer): say what it is and what can be selected instead."""
    shown = {l.name for l in layers}
    modules = dict(model.named_modules())
    names = [l.name for l in layers]
    listed = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    for pat in patterns:
        if pat in modules and pat and pat not in shown:
            kind = type(modules[pat]).__name__
            why = (f"is a {kind} that gives no feature map in the model's forward pass"
                   if isinstance(modules[pat], torch.nn.Conv2d) else f"is a {kind} module")
            raise LayerError(f"layer {pat!r} {why}; sitegen shows the outputs of Conv2d layers and residual "
                             f"blocks: {listed}",
                             "pick one of those (`sitegen layers MODEL --arch ...` lists them with their shapes)")


def check_config_against(ctx: BuildContext) -> None:
    """Config values that name a module, an image or a size of this model and image list, checked
    here, before the dataset pass, rather than by the pass that reads them hours later."""
    from .passes.occlusion import OcclusionPass, geometry
    from .passes.sampling import sample_images
    from .passes.tsne import classifier_name

    cfg = ctx.config
    sample_images(ctx.images, cfg.samples)
    if cfg.occlusion.enabled:
        geometry(ctx.input_size, cfg.occlusion.size, cfg.occlusion.stride)
        OcclusionPass(cfg.occlusion, cfg.samples).layer_name(ctx)
    if cfg.tsne.enabled:
        classifier_name(ctx.net, cfg.tsne.layer)
    if cfg.featurevis.enabled and cfg.featurevis.image_size and ctx.layers:
        check_featurevis_size(ctx, cfg.featurevis.image_size)


def check_featurevis_size(ctx: BuildContext, side: int) -> None:
    """A ``featurevis.image_size`` the model cannot run at (a deep layer of Inception v3 needs 75 px)
    is a config error now, not an internal error in the middle of the feature-visualisation pass:
    one forward of a blank side×side image up to the deepest shown layer."""
    from .hooks import capture_outputs, model_guard, run_until

    last = ctx.layers[-1].name
    x = torch.zeros((1, ctx.channels, side, side), device=ctx.device)
    try:
        with model_guard(ctx.net), torch.inference_mode(), capture_outputs(ctx.net, [last], stop_after_last=True):
            run_until(ctx.net, x)
    except RuntimeError as e:
        h, w = ctx.input_size
        raise ConfigError(f"config key 'featurevis.image_size' = {side}: the model cannot run at {side}×{side} px "
                          f"up to {last} ({str(e).splitlines()[0][:160]})",
                          f"set featurevis.image_size = 0 (the input size, {w}×{h} px) or a larger size") from None


def prepare(model_path: str | Path, images_dir: str | Path, cfg: Config,
            cache_dir: Path | None, *, exclude: tuple[Path, ...] = (),
            device: torch.device | None = None) -> BuildContext:
    """Everything a pass needs, with every input checked before any output is written.  Folders in
    ``exclude`` (the output) are never read as images.

    ``device`` None picks the GPU when PyTorch sees one (``context.default_device``).  The model
    (loaded here, sitegen's own copy) moves there before anything runs on it: every pass sends its
    batches to ``ctx.device``."""
    device = device or default_device()
    loaded = load_model(model_path, cfg.model.arch, cfg.model.trust_pickle)
    loaded.model.to(device)
    # The checkpoint to compare with must fit the model: checked before any image is read.
    old = load_like(cfg.compare.checkpoint, loaded, cfg.model.trust_pickle) if cfg.compare.checkpoint else None
    images = discover_images(images_dir, cfg.data.max_images, exclude=exclude)
    for rel, reason in images.skipped[:5]:
        progress.info(f"warning: skipping {rel}: {reason}")
    if len(images.skipped) > 5:
        progress.info(f"warning: skipping {len(images.skipped) - 5} more files (listed on the atlas's index page)")
    for note in images.notes:
        progress.info(f"warning: {note}")
    # The input (channels, size, resize/crop, mean/std) is decided here, once; everything after
    # reads it from the resolved data config.
    plan = plan_inputs(loaded.model, loaded.arch, images, cfg.data, say=progress.info)
    cfg = dataclasses.replace(cfg, data=plan.data)
    all_layers = cached_layers(loaded, plan.shape, cache_dir)
    try:
        chosen = select(all_layers, cfg.layers)
    except LayerError:
        selectable_hint(loaded.model, cfg.layers, all_layers)
        raise
    ctx = BuildContext(config=cfg, model=loaded, images=plan.images, layers=chosen, all_layers=all_layers,
                       input_size=plan.size, input_notes=plan.notes, compare=old, device=device)
    check_config_against(ctx)
    return ctx


def run_passes(ctx: BuildContext, cache: Cache, report: BuildReport, plan: Any = None) -> dict[str, Result]:
    from .plan import announce

    results: dict[str, Result] = {}
    ctx.results = results
    started = time.perf_counter()
    for p in default_passes(ctx.config):
        if ctx.dist.active and not p.distributed and not ctx.dist.is_main:
            continue  # a pass that does not split its work runs on rank 0 alone
        announce(plan, p.name, time.perf_counter() - started)
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


def warn_unruled(results: dict[str, Result], layers: int) -> None:
    """Name the activations guided backprop and deconvnet have no rule for (their pictures are
    then closer to the gradient's); the index page and the affected channel pages say so too."""
    attribution = results.get("attribution")
    if attribution is not None and {"guided", "deconvnet"} & set(attribution.meta.get("methods", [])):
        line = describe_unruled(ActivationReport.from_dict(attribution.meta.get("activations", {})), layers)
        if line:
            progress.info(f"warning: {line}")


def build(model_path: str | Path, images_dir: str | Path, out: str | Path, cfg: Config, *,
          force: bool = False, cache_dir: Path | None = None, plan_only: bool = False) -> BuildReport:
    """Build the atlas; with ``plan_only``, stop after the plan (``sitegen plan``): nothing is
    written, no lock is taken, and the report carries the plan."""
    out = Path(out).expanduser()
    made_cache = check_cache_dir(cache_dir)
    main = current_dist().is_main
    try:
        if plan_only:  # what the build would refuse, the plan refuses too (it writes nothing)
            check_target(out, force, images=Path(images_dir).expanduser(),
                         site_files=(*SITE_FILES, *asset_files()))
            return _build(model_path, images_dir, out, cfg, cache_dir, plan_only=True)
        # One build at a time writes an atlas (rank 0 of a job writes it; the other ranks never do).
        with build_lock(out) if main else contextlib.nullcontext():
            if main:
                remove_stale_staging(out)
            check_target(out, force, images=Path(images_dir).expanduser(),
                         site_files=(*SITE_FILES, *asset_files()))
            return _build(model_path, images_dir, out, cfg, cache_dir)
    except BaseException:
        if made_cache:
            _remove_if_empty(cache_dir)
        raise


def _build(model_path: str | Path, images_dir: str | Path, out: Path, cfg: Config,
           cache_dir: Path | None, *, plan_only: bool = False) -> BuildReport:
    from .plan import comparison, make_plan

    # A build allocates and frees maps of a few MiB in every batch: by default glibc hands each back
    # to the system and faults fresh pages in for the next (a bare forward of the shared ResNet-56
    # over 10,000 images 21.5 s against 17.0 s with the memory kept; its pass workers keep it too).
    keep_freed_memory()
    t0 = time.perf_counter()
    ctx = prepare(model_path, images_dir, cfg, cache_dir, exclude=(out,))
    report = BuildReport(index=out / "index.html", images=len(ctx.images))
    report.timings["prepare"] = time.perf_counter() - t0
    # The plan: what to show so the site fits site.max_bytes, and each pass's estimate (raises
    # before any work when the plan is over the budget and may not be reduced).
    t = time.perf_counter()
    report.plan, ctx = make_plan(ctx, Cache(cache_dir))
    report.timings["plan"] = time.perf_counter() - t
    report.layers, report.channels = len(ctx.layers), sum(l.channels for l in ctx.layers)
    cfg = ctx.config
    if plan_only:
        return report
    for line in report.plan.lines():
        progress.info(line)
    results = run_passes(ctx, Cache(cache_dir), report, report.plan)
    report.unusable = len(results["topk"].arrays["failed"])
    report.skipped = len(ctx.images.skipped) + report.unusable
    if not ctx.dist.is_main:
        return report  # only rank 0 writes the site
    warn_unusable(results["topk"].meta.get("failed_reasons", []))
    warn_unruled(results, len(ctx.layers))
    t = time.perf_counter()
    title = cfg.site.title or f"{Path(model_path).name} atlas"
    staged = staging_dir(out)
    try:
        measured = {k.split(":", 1)[1]: v for k, v in report.timings.items() if k.startswith("pass:")}
        render(ctx, results, staged, RenderOptions(title=title, patch_size=cfg.site.patch_size,
                                                   image_format=cfg.site.image_format,
                                                   left_out=report.plan.page_notes(),
                                                   build=report.plan.record(measured, report.cached),
                                                   workers=cfg.site.render_workers))
        publish(staged, out)
    except BaseException:
        discard(staged)
        raise
    report.timings["render"] = time.perf_counter() - t
    report.timings["total"] = time.perf_counter() - t0
    report.site_files, report.site_bytes = site_size(out)
    for line in comparison(report.plan, report.timings, report.cached, report.site_bytes, report.site_files):
        progress.info(line)
    if report.site_bytes > PAGES_LIMIT:
        progress.info(f"warning: the atlas is {report.site_bytes / 1e9:.2f} GB, over GitHub Pages' 1 GB limit; "
                      "docs/size.md shows which settings shrink it (layers, attribution.methods, site.patch_size)")
    return report


PAGES_LIMIT = 10**9
"""GitHub Pages publishes sites of at most 1 GB."""


def site_size(folder: Path) -> tuple[int, int]:
    """Files and bytes of the atlas in ``folder``: the files its marker lists, and the marker (not
    the user's own files beside it in a --force folder); every file when there is no marker."""
    listed = atlas_files(folder)
    if listed is None:
        files = [p for p in folder.rglob("*") if p.is_file()]
    else:
        files = [p for p in (folder / f for f in [*listed, MARKER]) if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def load_config(path: str | Path | None, flags: dict[str, tuple[str, str]] | None = None,
                **sections: dict[str, Any]) -> Config:
    """The config file (or defaults) with command-line flags per section laid over it.

    ``flags`` maps a config key set from the command line to (flag, value as typed): a bad value is
    reported by the flag the user typed (``--k -3``), with the key it sets."""
    cfg = config_mod.load(path)
    for section, values in sections.items():
        if section == "layers":
            if values:
                cfg = dataclasses.replace(cfg, layers=tuple(values))
            continue
        try:
            cfg = config_mod.with_overrides(cfg, section, **values)
        except ConfigError as e:
            key = getattr(e, "key", "")
            flag = (flags or {}).get(key.split("[", 1)[0])
            if flag is None:
                raise
            raise ConfigError(f"{flag[0]} {flag[1]} {e.why} (config key {key!r})", e.hint) from None
    return cfg
