"""What a build will cost, estimated before the work: the pieces passes and views plug into.

A build's plan has two halves:

- **time**: each analysis pass answers ``plan(ctx, probe) -> PassPlan`` (its work and estimated
  seconds).  The :class:`Probe` times short real batches on this device: the pass's own batch
  function at one image and at a few, which gives a :class:`Fit` (seconds = fixed + per item × n);
  the pass multiplies it out over its work.  Layers between the measured ones are interpolated
  by :meth:`Probe.depth`, the share of a whole forward pass spent before the layer's output, read
  from one timed forward with a timestamp at every layer.
- **size**: each view answers ``estimate(ctx, sizes) -> list[SiteItem]`` (the files it will write,
  with bytes).  :class:`SizeSamples` gives the views real decoded images to draw and encode a few
  representative files from, so bytes are measured on the user's own images, not assumed.

A pass or view without an estimate answers ``None``; the plan then says "no estimate" for it
rather than counting it as free.  This module sits below both the passes and the renderer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .context import BuildContext
from .errors import ImageError
from .hooks import StopForward, get_module, model_guard, run_until
from .images import as_rgb, load_pixels, normalise


# ---------------------------------------------------------------- time


@dataclass(frozen=True)
class Fit:
    """Seconds of one call on ``n`` items: ``fixed + per_item · n`` (from two timed calls)."""

    fixed: float
    per_item: float

    def __call__(self, n: float) -> float:
        return self.fixed + self.per_item * n if n > 0 else 0.0

    def batched(self, total: int, batch: int) -> float:
        """Seconds for ``total`` items cut into calls of at most ``batch``."""
        if total <= 0:
            return 0.0
        batch = max(1, batch)
        full, rest = divmod(int(total), batch)
        return full * self(batch) + (self(rest) if rest else 0.0)

    def scaled(self, factor: float) -> "Fit":
        return Fit(self.fixed * factor, self.per_item * factor)


@dataclass
class PassPlan:
    """One pass's estimate: what it will do and how long that takes on this device."""

    name: str
    seconds: float | None
    """Estimated seconds; None when the pass has no estimate (said so, never counted as zero)."""
    work: dict[str, int] = field(default_factory=dict)
    """Counts of what it does: ``images``, ``units``, ``steps``, ``channels``, ``copies`` ..."""
    detail: str = ""
    """The work in words, e.g. ``2,880 units × 3 methods``."""
    note: str = ""
    """Why there is no estimate, or that the result is cached."""
    cached: bool = False

    @property
    def estimated(self) -> bool:
        return self.seconds is not None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": None if self.seconds is None else round(self.seconds, 3),
                "work": dict(self.work), "detail": self.detail, "note": self.note, "cached": self.cached}


def no_estimate(name: str, why: str = "this pass has no estimate") -> PassPlan:
    return PassPlan(name, None, note=why)


def count(n: int | float) -> str:
    """``12,345``: counts in plan lines."""
    return f"{int(round(n)):,}"


MIN_ITEMS = 8
"""The probe's largest call has at least this many items (or the pass's whole batch): extrapolating
from one or two items to a batch of 64 would turn noise into the per-item cost."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Probe:
    """Short timed runs of real batches on this device, shared by every pass's estimate.

    Measurements are cached by key, so passes that need the same one (a forward to a layer) pay
    once.  ``seconds_spent`` adds up what the probe cost.  Sizes are chosen so that one timed call
    takes about ``target`` seconds: a CIFAR ResNet is probed with dozens of images, a ResNet-50 at
    224 px with a handful.
    """

    def __init__(self, ctx: BuildContext, target: float | None = None):
        self.ctx = ctx
        self.target = target if target is not None else (0.05 if ctx.device.type == "cuda" else 0.2)
        self.seconds_spent = 0.0
        self._fits: dict[str, Fit] = {}
        self._once: dict[str, float] = {}
        self._pixels: list[np.ndarray] = []
        self._next = 0
        self._decode: float | None = None
        self._depth: dict[str, float] | None = None
        self._forward: Fit | None = None

    # -- real images

    def pixels(self, n: int) -> np.ndarray:
        """uint8 (n, H, W, 3): the first decodable images, repeated when there are fewer than ``n``."""
        t = time.perf_counter()
        while len(self._pixels) < min(n, 64) and self._next < min(len(self.ctx.images), 256):
            idx, self._next = self._next, self._next + 1
            try:
                self._pixels.append(load_pixels(self.ctx.images, idx, self.ctx.config.data))
            except ImageError:
                continue
        self.seconds_spent += time.perf_counter() - t
        if not self._pixels:
            h, w = self.ctx.input_size
            self._pixels.append(np.full((h, w, 3), 128, dtype=np.uint8))
        reps = [self._pixels[j % len(self._pixels)] for j in range(n)]
        return np.stack(reps)

    def inputs(self, n: int) -> torch.Tensor:
        """The normalised batch of :meth:`pixels` on the device."""
        x = normalise(torch.from_numpy(self.pixels(n)).to(self.ctx.device), self.ctx.config.data)
        return x.contiguous(memory_format=torch.channels_last) if self.ctx.channels_last else x

    def decode_seconds(self) -> float:
        """Seconds to read, decode and preprocess one image (median of a few)."""
        if self._decode is None:
            times = []
            for idx in range(min(5, len(self.ctx.images))):
                t = time.perf_counter()
                try:
                    load_pixels(self.ctx.images, idx, self.ctx.config.data)
                except ImageError:
                    continue
                times.append(time.perf_counter() - t)
            self.seconds_spent += sum(times)
            self._decode = float(np.median(times)) if times else 0.0
        return self._decode

    # -- timing

    def time(self, fn: Callable[[], Any]) -> float:
        _sync(self.ctx.device)
        t = time.perf_counter()
        fn()
        _sync(self.ctx.device)
        dt = time.perf_counter() - t
        self.seconds_spent += dt
        return dt

    def best(self, fn: Callable[[], Any], target: float, repeats: int = 3) -> float:
        """The fastest of up to ``repeats`` timed calls, repeating only while they are short."""
        best = self.time(fn)
        for _ in range(repeats - 1):
            if best > target / 3:
                break
            best = min(best, self.time(fn))
        return best

    def fit(self, key: str, fn: Callable[[int], Any], cap: int, target: float | None = None,
            warm: bool = True, workers: int = 1) -> Fit:
        """Time ``fn(n)`` for n = 1, 2, 4, ... until a call takes ``target`` seconds and n is at least
        MIN_ITEMS (or n reaches ``cap``), and fit ``fixed + per_item · n`` through the last two sizes.

        The first call runs untimed (``warm``: memory allocation, kernel selection and caches are
        one-off costs a long pass pays once).  Short calls are repeated and the fastest kept: on a
        busy machine a call of milliseconds is often paused for longer than it runs.  The sizes
        double rather than jump from one measurement, so a single slow call cannot make the probe
        stop at a size too small to tell the per-item cost from the per-call cost.  The per-item
        cost is kept at least 5 % of the larger call's mean, so no fit says a batch costs nothing.

        ``workers`` > 1: the pass runs its batches on a pool of that many one-thread processes
        (:mod:`sitegen.workpool`): ``fn`` is timed on one thread and the fit divided by the workers.
        """
        if workers > 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                one = self.fit(f"{key}:one thread", fn, cap, target, warm)
            finally:
                torch.set_num_threads(threads)
            return one.scaled(1 / workers)
        if key in self._fits:
            return self._fits[key]
        target = self.target if target is None else target
        cap = max(1, int(cap))
        if warm:
            self.time(lambda: fn(1))
        points = [(1, self.best(lambda: fn(1), target))]
        while points[-1][0] < cap and (points[-1][1] < target or points[-1][0] < MIN_ITEMS):
            n = min(cap, 2 * points[-1][0])
            points.append((n, self.best(lambda: fn(n), target)))
        if len(points) == 1:
            result = Fit(0.0, points[0][1])
        else:
            (n1, t1), (n2, t2) = points[-2], points[-1]
            per = max((t2 - t1) / (n2 - n1), 0.05 * t2 / n2)
            result = Fit(max(0.0, t2 - per * n2), per)
        self._fits[key] = result
        return result

    def remember(self, key: str) -> Fit | None:
        return self._fits.get(key)

    def measure(self, key: str, fn: Callable[[], Any]) -> float:
        """Seconds of one call of ``fn`` (the fastest of a few when it is short), timed once per
        ``key``: passes that need the same measurement (the t-SNE of the codes, run for the new and
        for the old model's codes) share it."""
        if key not in self._once:
            self._once[key] = self.best(fn, self.target)
        return self._once[key]

    # -- depth: where a layer sits in the forward pass, in compute

    def _profile(self) -> None:
        """One timed forward of a real batch with a timestamp at every discovered layer."""
        ctx = self.ctx
        names = [l.name for l in ctx.all_layers]
        seen: dict[str, float] = {}
        handles = []

        def hook_for(name: str):
            def hook(_m, _i, _o):
                if name not in seen:
                    _sync(ctx.device)
                    seen[name] = time.perf_counter()
            return hook

        n = 2 if max(ctx.input_size) > 64 else 8
        x = self.inputs(n)
        with model_guard(ctx.net), torch.inference_mode():
            ctx.net(x)  # warm-up
            try:
                for name in names:
                    handles.append(get_module(ctx.net, name).register_forward_hook(hook_for(name)))
                _sync(ctx.device)
                t0 = time.perf_counter()
                ctx.net(x)
                _sync(ctx.device)
                total = time.perf_counter() - t0
            finally:
                for h in handles:
                    h.remove()
        self.seconds_spent += 2 * total
        total = max(total, 1e-9)
        self._depth = {name: min(1.0, max(0.0, (seen[name] - t0) / total)) for name in names if name in seen}

    def depth(self, layer: str | None) -> float:
        """Share (0..1] of a whole forward pass's time spent when ``layer``'s output is ready (None:
        the whole model)."""
        if layer is None:
            return 1.0
        if self._depth is None:
            self._profile()
        assert self._depth is not None
        if layer in self._depth:
            return max(self._depth[layer], 1e-3)
        order = [l.name for l in self.ctx.all_layers]
        return max(1e-3, (order.index(layer) + 1) / len(order)) if layer in order else 1.0

    def anchors(self, layers: Sequence[str], count: int = 3) -> list[str]:
        """Up to ``count`` of ``layers`` spread over the depth: always the shallowest and the deepest,
        so every other layer lies between two measured ones."""
        ordered = sorted(dict.fromkeys(layers), key=self.depth)
        if len(ordered) <= count:
            return ordered
        picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, count)).astype(int))
        return [ordered[i] for i in picks]

    def interpolate(self, fits: dict[str, Fit], layer: str) -> Fit:
        """A layer's fit from the measured layers around it, linear in :meth:`depth`."""
        if layer in fits:
            return fits[layer]
        points = sorted((self.depth(name), f) for name, f in fits.items())
        x = self.depth(layer)
        if x <= points[0][0]:
            return points[0][1]
        if x >= points[-1][0]:
            return points[-1][1]
        for (x0, f0), (x1, f1) in zip(points, points[1:]):
            if x0 <= x <= x1:
                w = (x - x0) / (x1 - x0) if x1 > x0 else 0.0
                return Fit(f0.fixed + w * (f1.fixed - f0.fixed), f0.per_item + w * (f1.per_item - f0.per_item))
        return points[-1][1]  # pragma: no cover - the loop covers every x between the ends

    def per_layer(self, key: str, layers: Sequence[str], measure: Callable[[str], Fit], count: int = 3) -> dict[str, Fit]:
        """``measure`` run on up to ``count`` anchor layers; every other layer interpolated."""
        fits = {}
        for name in self.anchors(layers, count):
            cache_key = f"{key}@{name}"
            if cache_key not in self._fits:
                self._fits[cache_key] = measure(name)
            fits[name] = self._fits[cache_key]
        return {name: self.interpolate(fits, name) for name in layers}

    def forward(self, layer: str | None = None) -> Fit:
        """A plain forward of n images up to ``layer``'s output (None: the whole model)."""
        ctx = self.ctx

        def run(n: int) -> None:
            x = self.inputs(n)
            with model_guard(ctx.net), torch.inference_mode():
                if layer is None:
                    ctx.net(x)
                else:
                    h = get_module(ctx.net, layer).register_forward_hook(_stop)
                    try:
                        run_until(ctx.net, x)
                    finally:
                        h.remove()

        return self.fit(f"forward@{layer}", run, cap=ctx.batch_size(0))


def _stop(_m, _i, _o) -> None:
    raise StopForward()


# ---------------------------------------------------------------- size


@dataclass(frozen=True)
class SiteItem:
    """Files a view will write, with their estimated bytes.

    ``layer`` ties them to a shown layer ('' for whole-model files): leaving the layer out removes
    them.  ``tag`` names what else can remove or shrink them (``attribution:deconvnet`` for one
    method's sprite rows, ``featurevis`` for the optimised images).
    """

    view: str
    what: str
    files: int
    bytes: float
    layer: str = ""
    tag: str = ""
    example: str = ""
    """One of the files' paths in the site (the output marker lists every path)."""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.view, self.what, self.layer, self.tag)


class SizeSamples:
    """Real decoded images (and the few measurements views share), for drawing representative files.

    Views draw a few files exactly as they will (their own drawing code, the user's images) and
    encode them in memory; the mean bytes of those times the file count is the estimate.  What is
    measured once is cached by key (``remember``/``recall``).
    """

    def __init__(self, ctx: BuildContext, probe: Probe | None = None, seed: int = 0):
        self.ctx = ctx
        self.probe = probe
        self.rng = np.random.default_rng(seed)
        self._pixels: dict[int, np.ndarray] = {}
        self._memo: dict[str, Any] = {}
        self.seconds_spent = 0.0

    def image_ids(self, n: int) -> list[int]:
        """Up to ``n`` image indices spread over the list (so several classes are represented)."""
        total = len(self.ctx.images)
        if total == 0:
            return []
        return sorted(set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist()))

    def pixels(self, i: int) -> np.ndarray:
        """Image ``i`` as the model reads it (H×W×C, C the model's input channels); a plain grey image
        when it cannot be decoded."""
        if i not in self._pixels:
            try:
                self._pixels[i] = load_pixels(self.ctx.images, i, self.ctx.config.data)
            except ImageError:
                h, w = self.ctx.input_size
                self._pixels[i] = np.full((h, w, self.ctx.channels), 128, dtype=np.uint8)
        return self._pixels[i]

    def shown(self, i: int) -> np.ndarray:
        """Image ``i`` as the pages draw it: RGB (a grey model's input repeated over three channels)."""
        return as_rgb(self.pixels(i))

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            t = time.perf_counter()
            self._memo[key] = compute()
            self.seconds_spent += time.perf_counter() - t
        return self._memo[key]

    def mean_text_bytes(self, texts: Iterable[str]) -> float:
        lengths = [len(t.encode("utf-8", "surrogateescape")) for t in texts]
        return float(np.mean(lengths)) if lengths else 0.0


def total(items: Iterable[SiteItem]) -> tuple[int, float]:
    items = list(items)
    return sum(i.files for i in items), float(sum(i.bytes for i in items))


def human_bytes(n: float) -> str:
    """``1.23 GB``, ``45.6 MB``, ``789 kB`` (decimal units, as GitHub states its limits)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def human_seconds(s: float | None) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``2 h 10 min``."""
    if s is None or not math.isfinite(s):
        return "?"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec:02d} s"
    h, rest = divmod(int(round(s)), 3600)
    return f"{h} h {rest // 60:02d} min"
