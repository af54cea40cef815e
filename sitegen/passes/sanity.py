"""The sanity pass: how much each attribution picture depends on the weights and on the image.

Adebayo et al. ("Sanity Checks for Saliency Maps", NeurIPS 2018) showed that guided backprop and
deconvnet pictures can barely change when a model's weights are re-initialised: they can look
convincing while showing the method rather than the model.  For every attribution method the atlas
shows and every shown layer, this pass measures it on a seeded sample of the layer's top units
(``sanity.units``, each the strongest unit of a different channel that fires; all of them when
fewer fire):

- **weights**: the unit's attribution with the trained weights against the same unit's attribution
  after re-initialising (each module's own ``reset_parameters``, seeded; BatchNorm's running
  statistics reset too) only the unit's own layer (``own``), and every module that runs between
  the input and the unit's layer (``cascade``: the end of Adebayo et al.'s cascading randomisation
  for this layer);
- **images**: the same unit (channel and feature-map position) attributed on its own top image
  against ``sanity.images`` other images of the data set (seeded);
- **edge**: the attribution against the Sobel edge magnitude of the input, the baseline Adebayo
  et al. compare with.

Each comparison is a *similarity*: the Spearman rank correlation of the per-pixel absolute
attribution (summed over the colour channels) inside the unit's window (its display window, cut to
the image); high similarity means the picture does not depend on what was changed.  A picture that
is all zero (the unit does not fire on that image or with those weights: the gradient and guided
backprop stop at its own ReLU) has no ranking; against a picture that is not blank its similarity is
0, and two blank pictures count as the same picture (1).  Beside it, the SSIM of the display crops
(the images the page shows, grey = 0) for the weight and image checks.

Where :func:`sitegen.attribution.image_independent` proves a method image-independent for a layer
(deconvnet with no max-pooling or other forward-reading operation below the layer), the image
similarity is exactly 1 by construction: it is measured on the layer's first ``CROSS_CHECK`` units
(a disagreement with the proof is reported) and the other units take the proved value, which saves
that method's backward passes over the other images.

The user's model is never touched: the weights are re-initialised in two deep copies (one per kind
of check), which are dropped when the pass ends.  Module ``m`` always gets the same random weights
(seeded by ``sanity.seed`` and its name), so the cascade copy is re-initialised progressively as the
layers go deeper and equals a fresh copy with every module up to the layer re-initialised.

Cost: per layer, ``units · (1 + images)`` pairs through the trained model and ``units`` through each
of the two re-initialised copies, every pair one forward (stopped at the layer) shared by every
method (:func:`sitegen.attribution.attribute_methods`).  Work items are layers; under torchrun the
ranks share them out and rank 0 gathers the figures (the copies are re-initialised identically on
every rank).

Arrays, for layer ``i`` of ``meta["layers"]`` (``U`` sampled units, ``I`` other images):
``L{i}.units`` int64 ``(U, 4)`` = channel, image index, y, x; ``L{i}.others`` int64 ``(U, I)`` (-1:
none left); and per method ``m``: ``L{i}.{m}.own``, ``.cascade``, ``.edge`` float64 ``(U,)``,
``.images`` ``(U, I)``, ``.ssim_own``, ``.ssim_cascade`` ``(U,)``, ``.ssim_images`` ``(U, I)``,
``.blank_own``, ``.blank_cascade`` bool ``(U,)``, ``.blank_images`` ``(U, I)`` (NaN where a check
could not run, e.g. a layer without weights of its own).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .. import progress
from ..attribution import AttributionWarning, attribute_methods, image_independent
from ..config import SanityConfig
from ..context import BuildContext
from ..crops import PixelCache, display_box
from ..distributed import all_reduce, gather_to_main
from ..errors import SitegenError
from ..hooks import StopForward, get_module, model_guard, run_until
from ..images import load_pixels, normalise
from ..planning import PassPlan, Probe, count
from ..workpool import map_items
from .base import AnalysisPass, ItemStore, Result

CHECKS = ("own", "cascade", "images", "edge")
"""The similarities, in the order the pages list them."""
CROSS_CHECK = 2
"""Units per layer whose other-image pictures are measured even where a method is proved
image-independent (the measurement checks the proof; the other units take the proved value)."""

WEIGHTS_HIGH = 0.5
"""A picture whose ranking of pixels (Spearman) and whose display crop (SSIM) both keep at least
this similarity after re-initialising every weight up to its layer still shows mostly what the
random network shows: read it as an image of the input."""
IMAGES_HIGH = 0.8
"""A picture whose Spearman and SSIM similarities to the same unit's pictures on other images are
both at least this is nearly the same picture whatever the image: a fixed pattern of the unit."""


# ---------------------------------------------------------------- similarities


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally shaped arrays (average ranks for ties).  A constant
    array has no ranking: against a non-constant one the similarity is 0, two constant ones are 1."""
    a, b = np.ravel(a), np.ravel(b)
    flat_a, flat_b = bool(np.ptp(a) == 0) if a.size else True, bool(np.ptp(b) == 0) if b.size else True
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float(np.clip((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)), -1.0, 1.0))


def spearman_many(a: np.ndarray, bs: np.ndarray) -> np.ndarray:
    """:func:`spearman` of ``a`` against each of ``bs`` (``(K, *a.shape)``) at once: ``a``'s ranks
    are computed once and the ``K`` rankings together (the same figures to float rounding;
    a ranking equal to ``a``'s is exactly 1)."""
    from scipy.stats import rankdata

    a = np.ravel(a)
    b = np.asarray(bs).reshape(len(bs), -1)
    out = np.zeros(len(b))
    if not len(b):
        return out
    flat_a = bool(np.ptp(a) == 0) if a.size else True
    flat_b = np.ptp(b, axis=1) == 0 if a.size else np.ones(len(b), bool)
    out[flat_a & flat_b] = 1.0  # two blank pictures are the same picture; one blank has no ranking in common
    live = ~flat_b if not flat_a else np.zeros(len(b), bool)
    if live.any():
        ra = _ranks(a)
        ra -= ra.mean()
        rb = rankdata(b[live], method="average", axis=1)
        rb -= rb.mean(axis=1, keepdims=True)
        rho = (rb @ ra) / np.sqrt((ra @ ra) * np.einsum("ij,ij->i", rb, rb))
        rho[np.all(rb == ra, axis=1)] = 1.0
        out[live] = np.clip(rho, -1.0, 1.0)
    return out


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their average rank (scipy.stats.rankdata's "average")."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((2 * ends - counts + 1) / 2.0)[inverse]


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) of two grey images with values in [0, 255]:
    a uniform ``window`` (at most the image side, odd, at least 3; NaN on smaller images), the
    usual constants, the mean over the positions where the window fits inside the image."""
    return float(ssim_many(a, np.asarray(b)[None], window)[0])


def ssim_many(a: np.ndarray, bs: np.ndarray, window: int = 7) -> np.ndarray:
    """:func:`ssim` of ``a`` against each of ``bs`` (``(K, *a.shape)``) at once (``a``'s local
    means and variances computed once, the ``K`` images filtered together)."""
    from scipy.ndimage import uniform_filter

    bs = np.asarray(bs)
    side = min(a.shape)
    w = min(window, side - (1 - side % 2))
    if w < 3:
        return np.full(len(bs), np.nan)
    a, b = a.astype(np.float64)[None], bs.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean = lambda t: uniform_filter(t, size=(1, w, w), mode="reflect")  # noqa: E731 - not across images
    ma, mb = mean(a), mean(b)
    n = w * w
    cov = n / (n - 1)  # sample covariance, as skimage's structural_similarity
    va, vb, vab = cov * (mean(a * a) - ma * ma), cov * (mean(b * b) - mb * mb), cov * (mean(a * b) - ma * mb)
    s = ((2 * ma * mb + c1) * (2 * vab + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    r = w // 2
    return s[:, r:s.shape[1] - r, r:s.shape[2] - r].mean(axis=(1, 2))


def sobel_magnitude(pixels: np.ndarray) -> np.ndarray:
    """The edge map Adebayo et al. compare with: Sobel gradient magnitude of the grey image
    (the mean of the RGB channels) of an ``(H, W, 3)`` uint8 image."""
    from scipy.ndimage import sobel

    grey = pixels.astype(np.float64).mean(axis=2)
    return np.hypot(sobel(grey, axis=0, mode="reflect"), sobel(grey, axis=1, mode="reflect"))


# ---------------------------------------------------------------- re-initialised copies


def _seed(*parts: Any) -> int:
    blob = json.dumps(parts, default=str).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def _has_own_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def reinitialise(module: nn.Module, seed: int) -> str:
    """Re-draw ``module``'s own weights, seeded: its ``reset_parameters`` (BatchNorm's also resets
    the running statistics), else every direct parameter from a normal distribution with the trained
    tensor's mean and standard deviation.  Returns which way was taken (``"reset_parameters"`` or
    ``"normal"``).  The global random state is left as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for name in ("reset_parameters", "_reset_parameters"):
            reset = getattr(module, name, None)
            if callable(reset):
                try:
                    reset()
                    return "reset_parameters"
                except Exception:  # a custom reset that fails on this copy: draw the weights instead
                    break
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.numel():
                mean, std = float(p.float().mean()), float(p.float().std()) if p.numel() > 1 else 0.0
                p.normal_(mean, std if np.isfinite(std) else 0.0)
        return "normal"


class Randomiser:
    """Two deep copies of the model whose weights up to a layer are re-initialised.

    ``own(layer)``: a copy with only the layer's own modules (the layer and its sub-modules)
    re-initialised, restored from the trained model afterwards.  ``cascade(layer)``: a copy with
    every module that runs before the layer's output re-initialised; asked for layers in execution
    order, it re-initialises only the modules not yet done.  Modules with weights or buffers of their
    own are re-initialised one by one with seeds from ``seed`` and their names."""

    def __init__(self, model: nn.Module, layers: list[str], input_shape: tuple[int, int, int], seed: int):
        self.model, self.seed = model, seed
        self.reason = ""
        self.how: dict[str, str] = {}
        self.before = self._probe(model, layers, input_shape)
        try:
            self._own = copy.deepcopy(model)
            self._cascade = copy.deepcopy(model)
        except Exception as e:  # noqa: BLE001 - any object a model holds may refuse to be copied
            self._own = self._cascade = None
            self.reason = f"the model cannot be copied ({type(e).__name__}: {e}), so its weights were not re-initialised"
        self._done: set[str] = set()

    @staticmethod
    def _probe(model: nn.Module, layers: list[str], input_shape: tuple[int, int, int]) -> dict[str, list[str]]:
        """For each layer, the modules with weights or buffers of their own that start running
        before the layer's output exists, in execution order (one forward of zeros)."""
        order: list[str] = []
        before: dict[str, list[str]] = {}
        wanted = set(layers)
        handles = []

        def pre(name):
            def hook(_m, _i):
                if name not in order:
                    order.append(name)
            return hook

        def post(name):
            def hook(_m, _i, _o):
                if name not in before:
                    before[name] = list(order)
                if wanted.issubset(before):
                    raise StopForward()
            return hook

        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        try:
            for name, m in model.named_modules():
                if _has_own_state(m):
                    handles.append(m.register_forward_pre_hook(pre(name)))
            for name in layers:
                handles.append(get_module(model, name).register_forward_hook(post(name)))
            with model_guard(model), torch.no_grad():
                run_until(model, torch.zeros((1, *input_shape), device=device))
        finally:
            for h in handles:
                h.remove()
        return before

    @staticmethod
    def own_modules(model: nn.Module, layer: str) -> list[str]:
        root = get_module(model, layer)
        return [f"{layer}.{n}" if n else layer for n, m in root.named_modules() if _has_own_state(m)]

    @property
    def available(self) -> bool:
        return self._own is not None

    def _reinit(self, copy_: nn.Module, name: str) -> None:
        self.how[name] = reinitialise(copy_.get_submodule(name), _seed(self.seed, "weights", name))

    @contextlib.contextmanager
    def own(self, layer: str) -> Iterator[nn.Module | None]:
        """The copy with only ``layer``'s own modules re-initialised (None when there are none)."""
        names = self.own_modules(self.model, layer)
        if not names:
            yield None
            return
        try:
            for name in names:
                self._reinit(self._own, name)
            yield self._own
        finally:
            with torch.no_grad():  # back to the trained weights, read from the user's model
                for name in names:
                    src, dst = self.model.get_submodule(name), self._own.get_submodule(name)
                    for (_, a), (_, b) in zip(src.named_parameters(recurse=False), dst.named_parameters(recurse=False)):
                        b.copy_(a)
                    for (_, a), (_, b) in zip(src.named_buffers(recurse=False), dst.named_buffers(recurse=False)):
                        b.copy_(a)

    def cascade(self, layer: str) -> nn.Module:
        """The copy with every module that runs up to ``layer``'s output re-initialised."""
        for name in self.before.get(layer, []) + self.own_modules(self.model, layer):
            if name not in self._done:
                self._reinit(self._cascade, name)
                self._done.add(name)
        return self._cascade

    def cascade_count(self, layer: str) -> int:
        return len(set(self.before.get(layer, [])) | set(self.own_modules(self.model, layer)))

    def close(self) -> None:
        self._own = self._cascade = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- the sample


@dataclass
class LayerSample:
    """The sampled top units of one layer and the other images each is attributed on."""

    index: int
    name: str
    units: np.ndarray
    """int64 (U, 4): channel, image index, y, x of each unit (its channel's strongest unit)."""
    others: np.ndarray
    """int64 (U, I): other images of each unit; -1 where the data set has no more."""
    boxes: np.ndarray
    """int64 (U, 4): each unit's display window (x0, y0, x1, y1), which may pass the image border."""
    side: int
    """Side of the display crops compared by SSIM (the attribution pass's stored side)."""

    def __len__(self) -> int:
        return len(self.units)


def sample_layer(ctx: BuildContext, topk: Result, li: int, cfg: SanityConfig, side: int) -> LayerSample:
    """``cfg.units`` channels that fire (their strongest top-k value > 0), drawn with a generator
    seeded by ``cfg.seed`` and the layer's name (another layer selection does not change a layer's
    sample); each contributes its strongest unit.  Each unit gets ``cfg.images`` other usable
    images, seeded by the layer and the channel."""
    name = topk.meta["layers"][li]
    info = ctx.layer(name)
    values = topk.arrays[f"L{li}.values"][:, 0]
    firing = np.flatnonzero(np.isfinite(values) & (values > 0))
    rng = np.random.default_rng(_seed(cfg.seed, "units", name))
    chosen = np.sort(rng.choice(firing, size=min(cfg.units, len(firing)), replace=False)) if len(firing) else firing
    image = topk.arrays[f"L{li}.images"][chosen, 0].astype(np.int64)
    y = topk.arrays[f"L{li}.y"][chosen, 0].astype(np.int64)
    x = topk.arrays[f"L{li}.x"][chosen, 0].astype(np.int64)
    usable = np.setdiff1d(np.arange(len(ctx.images)), topk.arrays["failed"].astype(np.int64))
    others = np.full((len(chosen), cfg.images), -1, dtype=np.int64)
    for u, (c, own) in enumerate(zip(chosen.tolist(), image.tolist())):
        pos = int(np.searchsorted(usable, own))
        pool = len(usable) - 1  # every usable image but the unit's own
        take = min(cfg.images, pool)
        if take > 0:
            pick = np.random.default_rng(_seed(cfg.seed, "images", name, c)).choice(pool, size=take, replace=False)
            others[u, :take] = usable[pick + (pick >= pos)]
    boxes = np.array([display_box(info.rf.box(int(yy), int(xx)), ctx.input_size) for yy, xx in zip(y, x)],
                     dtype=np.int64).reshape(-1, 4)
    units = np.stack([chosen.astype(np.int64), image, y, x], axis=1) if len(chosen) else np.zeros((0, 4), np.int64)
    return LayerSample(li, name, units, others, boxes, side)


# ---------------------------------------------------------------- attributions of pairs


@dataclass
class Pictures:
    """Per method, each pair's absolute attribution inside its window (cut to the image) and its
    display crop in grey levels (the page's picture, grey = 0)."""

    magnitude: dict[str, list[np.ndarray]]
    display: dict[str, list[np.ndarray]]
    blank: dict[str, list[bool]]


def _window_in_image(box: np.ndarray, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return max(x0, 0), max(y0, 0), min(x1, hw[1]), min(y1, hw[0])


def attribute_pairs(ctx: BuildContext, model: nn.Module, layer: str, images: np.ndarray, units: np.ndarray,
                    boxes: np.ndarray, side: int, methods: list[str], pixels: PixelCache, batch: int) -> Pictures:
    """Attribute unit ``units[p]`` (channel, y, x) on image ``images[p]`` for every pair ``p``, every
    method from one forward per batch; reduce each to what the comparisons read.  The windows of
    one layer's units all have one side, so each batch's display crops are made together."""
    from .attribution import crop_windows, display_crops

    out = Pictures({m: [] for m in methods}, {m: [] for m in methods}, {m: [] for m in methods})
    h, w = ctx.input_size
    for start in range(0, len(images), batch):
        s = slice(start, start + batch)
        stacked = torch.from_numpy(np.stack([pixels(int(i)) for i in images[s]])).to(ctx.device)
        inputs = ctx.backward_inputs(normalise(stacked, ctx.config.data))
        with warnings.catch_warnings():
            # Rule-less activations: the attribution pass has said so for these very methods and model.
            warnings.simplefilter("ignore", AttributionWarning)
            grads = attribute_methods(model, inputs, layer, [tuple(u) for u in units[s].tolist()], methods)
        bx = boxes[s]
        windows = np.unique(bx[:, 2] - bx[:, 0])
        for m in methods:
            g = grads.pop(m).detach().float().cpu()
            mags = g.abs().sum(1).double().numpy()
            grey = np.empty((len(bx), side, side))
            for window in windows.tolist():  # one side per layer; grouped all the same
                at = np.flatnonzero(bx[:, 2] - bx[:, 0] == window)
                crops = crop_windows(g[at], bx[at, 0], bx[at, 1], int(window))
                grey[at] = display_crops(crops, side).astype(np.float64).mean(axis=3)
            for p, box in enumerate(bx):
                x0, y0, x1, y1 = _window_in_image(box, (h, w))
                mag = mags[p, y0:y1, x0:x1]
                out.magnitude[m].append(mag)
                out.blank[m].append(not bool(np.any(mag > 0)))
                out.display[m].append(grey[p])
    return out


# ---------------------------------------------------------------- the pass


ARRAYS = ("own", "cascade", "edge", "images", "ssim_own", "ssim_cascade", "ssim_images",
          "blank_own", "blank_cascade", "blank_images")


class SanityPass(AnalysisPass):
    name = "sanity"
    version = 3  # as the attribution pass: BatchNorm folded, channels-last inputs
    distributed = True
    config: SanityConfig

    def cache_key(self, ctx: BuildContext) -> str:
        """Also the units the top-k pass found and the attribution pass's methods and windows."""
        h = hashlib.sha256(super().cache_key(ctx).encode("ascii"))
        topk, attr = ctx.results.get("topk"), ctx.results.get("attribution")
        if topk is not None:
            h.update(json.dumps([topk.meta["layers"], topk.meta["k"]]).encode("utf-8", "surrogateescape"))
            for key in sorted(topk.arrays):
                if key.endswith((".images", ".y", ".x", ".values")) or key == "failed":
                    h.update(key.encode("utf-8", "surrogateescape"))
                    h.update(np.ascontiguousarray(topk.arrays[key]).tobytes())
        if attr is not None:
            h.update(json.dumps([attr.meta.get(k) for k in ("layers", "methods", "windows", "sides", "percentile")],
                                default=str).encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:24]

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """Per layer, ``U = min(sanity.units, channels)`` sampled units (every channel counted as
        firing) and ``U · (1 + images)`` (image, unit) pairs through the trained model, ``U`` through
        each re-initialised copy.  A pair is one forward to the layer and one backward per method, the
        attribution pass's batch: its fits (timed at up to three layers, the others interpolated by
        depth) are shared with the attribution estimate.  Beside them, each unit's comparisons
        (Spearman of the window, SSIM of the display crop, per method and check; a Sobel map of its
        image) timed on arrays of the smallest and the largest window, interpolated by area; the
        two model copies and their re-initialisation timed once; the structural proofs timed at the
        deepest layer and scaled to the others by depth."""
        from .attribution import AttributionPass

        cfg, acfg = self.config, ctx.config.attribution
        methods = list(acfg.methods)
        names = [l.name for l in ctx.layers]
        if not names or not len(ctx.images):
            return PassPlan(self.name, 0.0, {"units": 0}, "no layer or image to check")
        others = min(cfg.images, max(0, len(ctx.images) - 1))
        batch = ctx.batch_size(cfg.batch_size)
        workers = ctx.pass_workers(batch)  # the layers' comparisons run in the pool's workers too
        fits = AttributionPass(acfg).unit_fits(ctx, probe, ctx.batch_size(acfg.batch_size))
        h, w = ctx.input_size
        shape = (ctx.channels, h, w)

        def window(name: str) -> tuple[int, int]:
            """(pixels of the window inside the image, side of the display crop) of a layer's units."""
            x0, y0, x1, y1 = display_box(ctx.layer(name).rf.box(0, 0), ctx.input_size)
            side = x1 - x0
            return min(side, h) * min(side, w), min(side, acfg.max_side)

        rng = np.random.default_rng(0)
        sizes = {name: window(name) for name in names}
        small, large = min(sizes.values()), max(sizes.values())

        def compare_seconds(area: int, side: int) -> float:
            a, b = rng.random(area), rng.random(area)
            c, d = rng.random((side, side)) * 255, rng.random((side, side)) * 255
            return probe.measure(f"sanity-compare:{area}:{side}", lambda: (spearman(a, b), ssim(c, d)))

        t_small, t_large = compare_seconds(*small), compare_seconds(*large)

        def per_comparison(area: int) -> float:
            if large[0] == small[0]:
                return t_large
            return t_small + (t_large - t_small) * (area - small[0]) / (large[0] - small[0])

        pixels = probe.pixels(1)[0]
        t_sobel = probe.measure(f"sanity-sobel:{h}x{w}", lambda: sobel_magnitude(pixels))
        seconds, units, pairs = 0.0, 0, 0
        for name in names:
            u = min(cfg.units, ctx.layer(name).channels)
            own = bool(Randomiser.own_modules(ctx.net, name))
            seconds += fits[name].batched(u * (1 + others), batch) + (1 + own) * fits[name].batched(u, batch)
            seconds += u * (len(methods) * (2 + own + others) * per_comparison(sizes[name][0]) + t_sobel) / workers
            units += u
            pairs += u * (1 + others + 1 + own)

        def copies() -> None:
            rand = Randomiser(ctx.net, names, shape, cfg.seed)
            try:
                if rand.available:
                    rand.cascade(names[-1])
            finally:
                rand.close()

        seconds += probe.measure(f"sanity-copies:{','.join(names)}", copies)
        deepest = max(names, key=probe.depth)
        t_proof = probe.measure(f"sanity-proof@{deepest}", lambda: image_independent(ctx.net, deepest, methods[0], shape))
        seconds += t_proof * len(methods) * sum(probe.depth(n) for n in names) / probe.depth(deepest)
        seconds /= max(1, ctx.dist.world)
        seconds += min(len(ctx.images), pairs) * probe.decode_seconds() / max(1, ctx.dist.world)
        return PassPlan(self.name, seconds, {"units": units, "pairs": pairs, "methods": len(methods),
                                             "layers": len(names), "batch": batch},
                        f"{count(units)} units × {1 + others} images + 2 re-initialised copies, "
                        f"{len(methods)} method{'s' if len(methods) > 1 else ''}")

    def run(self, ctx: BuildContext) -> Result:
        topk, attr = ctx.results.get("topk"), ctx.results.get("attribution")
        if topk is None or attr is None:
            raise SitegenError("the sanity pass needs the top-k and attribution passes' results",
                               "run them first (sitegen.passes.default_passes does), or set [sanity] enabled = false")
        cfg = self.config
        methods = list(attr.meta["methods"])
        layers = list(topk.meta["layers"])
        samples = [sample_layer(ctx, topk, li, cfg, attr.meta["sides"][attr.meta["layers"].index(name)])
                   for li, name in enumerate(layers)]
        batch = ctx.batch_size(cfg.batch_size)
        ctx.backward_channels_last()  # the layout's probe forward runs here, before any hooks
        if ctx.dist.active:  # the same batches on every rank, as the attribution pass
            batch = int(all_reduce(torch.tensor([batch]), op=torch.distributed.ReduceOp.MIN).item())
        proofs = {name: {m: image_independent(ctx.net, name, m, (ctx.channels, *ctx.input_size)) for m in methods}
                  for name in layers}
        pixels = PixelCache(lambda i: load_pixels(ctx.images, i, ctx.config.data), budget_bytes=256 << 20)
        mine = list(ctx.dist.items(len(samples)))  # layers, in execution order
        store = ItemStore(ctx.scratch)
        figures: dict[int, dict[str, np.ndarray]] = {}
        rand = Randomiser(ctx.net, layers, (ctx.channels, *ctx.input_size), cfg.seed)
        if rand.reason and ctx.dist.is_main:
            progress.info(f"warning: sanity checks: {rand.reason}; only the image and edge checks ran")
        try:
            total = sum(len(samples[li]) * (3 + cfg.images) for li in mine)
            keys = [f"{m}.{a}" for m in methods for a in ARRAYS]
            span = lambda li: (li, len(samples[li]), cfg.images, len(methods))  # noqa: E731

            def work(li: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
                """Layer ``li``'s figures, and how the modules re-initialised so far were (a pool
                worker re-initialises its own copies)."""
                s = samples[li]
                proved = frozenset(m for m in methods if proofs[s.name][m])
                return self._layer(ctx, s, methods, rand, pixels, batch, proved), dict(rand.how)

            how: dict[str, str] = {}
            with progress.bar("sanity checks", total, "pairs") as advance:
                todo = []
                for li in mine:
                    saved = store.load(li, keys, span(li))
                    if saved is None:
                        todo.append(li)
                    else:
                        figures[li] = saved
                        if rand.available:  # the modules it re-initialised, as a computed layer would
                            rand.cascade(samples[li].name)
                        advance(len(samples[li]) * (3 + cfg.images))
                # In execution order: the cascade copy (each worker's own) is re-initialised
                # progressively, deeper with each layer it takes.
                for li, (saved, their_how) in map_items(work, todo, ctx.pass_workers(batch)):
                    store.save(li, saved, span(li))
                    figures[li] = saved
                    how.update(their_how)
                    advance(len(samples[li]) * (3 + cfg.images))
        finally:
            how, reason = {**rand.how, **how}, rand.reason
            own_counts = {name: len(Randomiser.own_modules(ctx.net, name)) for name in layers}
            cascade_counts = {name: rand.cascade_count(name) for name in layers}
            rand.close()
        if ctx.dist.active:
            for part in gather_to_main((sorted(figures.items()), how)) or []:
                items, their_how = part
                figures.update(dict(items))
                how.update(their_how)
        store.clear()
        arrays: dict[str, np.ndarray] = {}
        for s in samples:
            arrays[f"L{s.index}.units"] = s.units
            arrays[f"L{s.index}.others"] = s.others
            for key, value in figures.get(s.index, {}).items():
                arrays[f"L{s.index}.{key}"] = value
        fallback = sorted(n for n, way in how.items() if way != "reset_parameters")
        if ctx.dist.is_main:  # rank 0 holds every layer's figures; the others would repeat the warnings
            self._check_proofs(samples, methods, proofs, arrays)
        if fallback and ctx.dist.is_main:
            progress.info(f"warning: sanity checks: {len(fallback)} module(s) have no reset_parameters "
                          f"({', '.join(fallback[:5])}{', ...' if len(fallback) > 5 else ''}); their weights "
                          "were redrawn from a normal distribution with the trained mean and std")
        meta = {"layers": layers, "methods": methods, "units": cfg.units, "images": cfg.images, "seed": cfg.seed,
                "weights_reason": reason, "fallback_modules": fallback,
                "own_modules": [own_counts[n] for n in layers], "cascade_modules": [cascade_counts[n] for n in layers],
                "proofs": {n: {m: [p.independent, p.reason] for m, p in proofs[n].items()} for n in layers},
                "thresholds": {"weights": WEIGHTS_HIGH, "images": IMAGES_HIGH}}
        return Result(meta=meta, arrays=arrays)

    @staticmethod
    def _check_proofs(samples: list[LayerSample], methods: list[str], proofs: dict, arrays: dict) -> None:
        """A proof of image independence must agree with the measurement; say so if it does not
        (it would be a bug in the structural audit, and the page shows the proof)."""
        for s in samples:
            for m in methods:
                measured = arrays.get(f"L{s.index}.{m}.images")
                if proofs[s.name][m] and measured is not None and np.isfinite(measured).any() \
                        and float(np.nanmin(measured)) < 0.999:
                    progress.info(f"warning: sanity checks: {m} at {s.name} was proved the same for every image, "
                                  f"but measured {float(np.nanmin(measured)):.3f}; please report this")

    def _layer(self, ctx: BuildContext, s: LayerSample, methods: list[str], rand: Randomiser,
               pixels: PixelCache, batch: int, proved: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """Every figure of one layer's sample: the trained model on the units' own images and on
        the other images (one list of pairs), then the two re-initialised copies."""
        n, k = len(s), s.others.shape[1]
        nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
        res = {f"{m}.{a}": (np.zeros((n, k) if a.endswith("images") else (n,), bool) if a.startswith("blank")
                            else nan(n, k) if a.endswith("images") else nan(n))
               for m in methods for a in ARRAYS}
        if n == 0:
            return res
        c, own_img, y, x = s.units.T
        unit_cyx = np.stack([c, y, x], axis=1)
        has = s.others >= 0
        # A method proved image-independent here gives the same picture on every image: its other-
        # image pairs are measured for the first CROSS_CHECK units only (a check of the proof) and
        # take the proved value (1, the same picture) for the rest.
        measured = [m for m in methods if m not in proved]
        checked = has & (np.arange(n)[:, None] < CROSS_CHECK) if measured != methods else has
        rest = has & ~checked
        pair_img = np.concatenate([own_img, s.others[checked]])
        owner = np.concatenate([np.arange(n), np.nonzero(checked)[0]])
        trained = attribute_pairs(ctx, ctx.net, s.name, pair_img, unit_cyx[owner], s.boxes[owner], s.side,
                                  methods, pixels, batch)
        unproved = None
        if measured and rest.any():
            rest_owner = np.nonzero(rest)[0]
            unproved = attribute_pairs(ctx, ctx.net, s.name, s.others[rest], unit_cyx[rest_owner], s.boxes[rest_owner],
                                       s.side, measured, pixels, batch)
        copies: dict[str, Pictures] = {}
        if rand.available:
            with rand.own(s.name) as model:
                if model is not None:
                    copies["own"] = attribute_pairs(ctx, model, s.name, own_img, unit_cyx, s.boxes, s.side,
                                                    methods, pixels, batch)
            copies["cascade"] = attribute_pairs(ctx, rand.cascade(s.name), s.name, own_img, unit_cyx, s.boxes,
                                                s.side, methods, pixels, batch)
        h, w = ctx.input_size
        edges = []
        for u in range(n):
            x0, y0, x1, y1 = _window_in_image(s.boxes[u], (h, w))
            edges.append(sobel_magnitude(pixels(int(own_img[u])))[y0:y1, x0:x1])
        other_pos = {(int(u), int(j)): n + q for q, (u, j) in enumerate(zip(*np.nonzero(checked)))}
        rest_pos = {(int(u), int(j)): q for q, (u, j) in enumerate(zip(*np.nonzero(rest)))}
        for m in methods:
            base, disp = trained.magnitude[m], trained.display[m]
            for u in range(n):
                # Every picture this unit's is compared with, then all comparisons at once.
                against: list[tuple[str, int | None, Pictures, int]] = [(kind, None, pics, u)
                                                                        for kind, pics in copies.items()]
                for j in range(k):
                    q = other_pos.get((u, j))
                    if q is not None:
                        against.append(("images", j, trained, q))
                    elif (u, j) in rest_pos and m in measured:
                        against.append(("images", j, unproved, rest_pos[(u, j)]))
                    elif (u, j) in rest_pos:  # proved: the very picture of its own image
                        res[f"{m}.images"][u, j] = res[f"{m}.ssim_images"][u, j] = 1.0
                        res[f"{m}.blank_images"][u, j] = trained.blank[m][u]
                rho = spearman_many(base[u], np.stack([edges[u]] + [p.magnitude[m][q] for *_, p, q in against]))
                res[f"{m}.edge"][u] = rho[0]
                if not against:
                    continue
                sims = ssim_many(disp[u], np.stack([p.display[m][q] for *_, p, q in against]))
                for (kind, j, pics, q), r, sim in zip(against, rho[1:], sims):
                    at = (u,) if j is None else (u, j)
                    res[f"{m}.{kind}"][at] = r
                    res[f"{m}.ssim_{kind}"][at] = sim
                    res[f"{m}.blank_{kind}"][at] = pics.blank[m][q]
        return res


# ---------------------------------------------------------------- reading the result


def _mean(values: np.ndarray) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _both(spearman_mean: float | None, ssim_mean: float | None) -> float | None:
    """The lower of the two similarities (Spearman alone where no SSIM could be computed: windows
    under 3 px).  The Spearman correlation of absolute values is raised by what every picture of a
    unit shares, the shape of its receptive field (more paths reach its centre), whatever the
    weights; requiring the picture as shown (SSIM) to survive too keeps that from deciding alone."""
    if spearman_mean is None:
        return None
    return spearman_mean if ssim_mean is None else min(spearman_mean, ssim_mean)


def verdict(f: dict[str, Any]) -> str:
    """One word for a method's figures at one layer, read by the pages and data/atlas.json:

    - ``"fixed"``: proved the same picture for every image (it shows the method and the weights
      through it, never the image);
    - ``"input"``: changes little when every weight up to the layer is re-initialised (Spearman and
      SSIM similarities both ≥ ``WEIGHTS_HIGH``): read it as an image of the input, not of the unit;
    - ``"unit"``: nearly the same picture on other images (both ≥ ``IMAGES_HIGH``): a fixed pattern
      of the unit rather than what it saw in this image;
    - ``"both"``: depends on the weights and on the image: both checks passed;
    - ``"unknown"``: not measured (no unit fires, or the weights could not be re-initialised)."""
    if f.get("images_proved"):
        return "fixed"
    w = _both(f.get("weights_cascade"), f.get("ssim_cascade"))
    i = _both(f.get("images"), f.get("ssim_images"))
    if w is not None and w >= WEIGHTS_HIGH:
        return "input"
    if i is not None and i >= IMAGES_HIGH:
        return "unit"
    if w is None or i is None:
        return "unknown"
    return "both"


def layer_figures(result: Result, layer: str) -> dict[str, Any] | None:
    """A layer's figures per method (means over the sampled units; None where not measured) with
    the verdict; None when the pass did not look at this layer."""
    names = result.meta["layers"]
    if layer not in names:
        return None
    li = names.index(layer)
    a = result.arrays
    units = a[f"L{li}.units"]
    methods: dict[str, Any] = {}
    for m in result.meta["methods"]:
        get = lambda key, m=m: a.get(f"L{li}.{m}.{key}", np.zeros(0))  # noqa: E731
        proved, reason = result.meta["proofs"][layer][m]
        images = _mean(get("images"))
        f = {"weights_own": _mean(get("own")), "weights_cascade": _mean(get("cascade")),
             "images": 1.0 if proved else images, "images_measured": images, "images_proved": bool(proved),
             "proof": reason, "edge": _mean(get("edge")),
             "ssim_own": _mean(get("ssim_own")), "ssim_cascade": _mean(get("ssim_cascade")),
             "ssim_images": _mean(get("ssim_images")),
             "blank_cascade": _mean(get("blank_cascade").astype(np.float64)) if len(units) else None,
             "blank_images": _mean(get("blank_images")[a[f"L{li}.others"] >= 0].astype(np.float64))
             if len(units) else None}
        f["verdict"] = verdict(f)
        methods[m] = f
    return {"units": int(len(units)), "images_per_unit": int(result.meta["images"]),
            "own_modules": int(result.meta["own_modules"][li]),
            "cascade_modules": int(result.meta["cascade_modules"][li]), "methods": methods}
