"""The model's input, decided once before any pass: channels, resize and crop, size, mean and std.

Every part of the build (the dataset, normalisation, layer discovery, every pass and view) reads the
result from one place, the resolved :class:`~sitegen.config.DataConfig` of the build context:

- **channels**: ``data.channels``, else those the model's first convolution reads (1: the images'
  luminance, ITU-R 601-2 as Pillow's "L"; 3: RGB).  Other counts (RGBA models) are refused.
- **resize, crop**: the ones given; with neither given, a torchvision architecture
  (``torchvision:NAME``) gets the evaluation transform its weights document (read from
  torchvision's weight metadata, nothing is downloaded), any other model none.
- **size**: the most common size after preprocessing among a sample of the images (sizes read from
  the file headers).  The other sizes are skipped and named; when they are more than
  :data:`MAX_SKIPPED` of the images, the build stops before any pass, with the flags that fix it.
  A crop larger than the resized images pads them with black: a warning, or an error when most of
  a typical input would be padding.
- **mean, std**: the ones given (one number, or one per channel); else the torchvision weights',
  else ImageNet's (for a grey model, ImageNet's weighted like the luminance).

Decisions taken automatically and warnings are returned as notes: the terminal prints them and the
atlas's index page shows them.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import DataConfig
from .errors import ConfigError, ImageError, ModelLoadError
from .images import (GREY_WEIGHTS, ImageList, default_stats, header_size, load_pixels, per_channel,
                     resized_size, size_after)

SAMPLE = 2000
"""Images whose header sizes decide the input size (evenly spaced over the folder; all if fewer)."""
MAX_SKIPPED = 0.01
"""Largest share of the images that may be skipped for their size before the build stops."""
MAX_PADDING = 0.5
"""Largest share of a typical input that may be black padding (a crop larger than the images)."""
DECODE_TRIES = 50
"""Images of one size decoded at most (spread over them) to find one that reads: damaged files have
sound headers, so the most common size is confirmed by decoding an image of it."""


class InputSizeError(ImageError):
    """A folder whose images do not share a size after preprocessing, or a crop far larger than them."""


# --- torchvision's evaluation transforms -----------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """The evaluation preprocessing a torchvision architecture's default weights document."""

    model: str
    weights: str
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


def torchvision_transform(arch: str) -> Transform | None:
    """The documented transform of ``torchvision:NAME`` (its DEFAULT weights' ``transforms()``,
    metadata only: nothing is downloaded); None for other architectures or without one."""
    source, _, name = arch.rpartition(":")
    if source != "torchvision":
        return None
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name).DEFAULT
        t = weights.transforms()
        resize, crop = t.resize_size, t.crop_size
        return Transform(model=name, weights=str(weights).rpartition(".")[2],
                         resize=int(resize[0] if isinstance(resize, (list, tuple)) else resize),
                         crop=int(crop[0] if isinstance(crop, (list, tuple)) else crop),
                         mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std),
                         interpolation=str(getattr(t.interpolation, "value", t.interpolation)))
    except Exception:  # noqa: BLE001 -- a model without weight metadata (or a torchvision without the API)
        return None


def preprocessing(arch: str, data: DataConfig) -> tuple[DataConfig, list[str], Transform | None]:
    """``data`` with resize and crop resolved (never -1), the notes saying what was chosen, and
    the torchvision transform used (None when the user's own settings apply)."""
    if data.resize >= 0 or data.crop >= 0:
        return dataclasses.replace(data, resize=max(0, data.resize), crop=max(0, data.crop)), [], None
    tv = torchvision_transform(arch)
    if tv is None:
        return dataclasses.replace(data, resize=0, crop=0), [], None
    note = (f"input: torchvision's evaluation transform for {tv.model} ({tv.weights} weights): shorter side "
            f"resized to {tv.resize}, centre crop {tv.crop}")
    if tv.interpolation.lower() != "bilinear":
        note += f" (torchvision resizes with {tv.interpolation.lower()} interpolation, sitegen with bilinear)"
    note += "; set --resize/--crop (data.resize/data.crop) to choose others, 0 to keep the images' size"
    return dataclasses.replace(data, resize=tv.resize, crop=tv.crop), [note], tv


# --- channels --------------------------------------------------------------------------------------


class _FirstConvolution(Exception):
    def __init__(self, weight: torch.Tensor, channels: int):
        self.weight, self.channels = weight, channels


class _ConvolutionSpy(TorchFunctionMode):
    """Stops the forward at the first 2-d convolution, whether a module or ``F.conv2d`` runs it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.conv2d, torch.nn.functional.conv2d):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
            raise _FirstConvolution(weight, int(weight.shape[1]) * int(groups))
        return func(*args, **kwargs)


def first_convolution(model: nn.Module, size: tuple[int, int]) -> tuple[str, int] | None:
    """(name, input channels) of the first convolution the model runs on an image of ``size``;
    the first ``nn.Conv2d`` it holds if no convolution runs before the forward fails; None if none."""
    from .hooks import model_guard

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    found: _FirstConvolution | None = None
    try:
        with model_guard(model), torch.no_grad(), _ConvolutionSpy():
            model(torch.zeros((1, 3, *size), device=device))
    except _FirstConvolution as e:
        found = e
    except Exception:  # noqa: BLE001 -- e.g. a fixed-size head; the modules below still tell
        pass
    if found is not None:
        name = next((n.rpartition(".")[0] or n for n, p in model.named_parameters() if p is found.weight), "")
        return name or "a convolution", found.channels
    conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    return (conv[0], int(conv[1].in_channels)) if conv else None


def input_channels(model: nn.Module, size: tuple[int, int], data: DataConfig) -> int:
    """The channels of the model's input: ``data.channels`` (checked against the model), or those
    of its first convolution; 3 for a model without one."""
    first = first_convolution(model, size)
    if first is not None and first[1] not in (1, 3):
        name, c = first
        what = "RGBA" if c == 4 else f"{c}-channel"
        raise ModelLoadError(
            f"the model's first convolution ({name}) reads {c} channels ({what} input); sitegen feeds "
            "images as 1 channel (grey) or 3 (RGB)",
            "wrap the model so that it takes RGB or grey images (e.g. a forward that adds the extra "
            "channels itself), and build the atlas of the wrapper")
    if data.channels:
        if first is not None and first[1] != data.channels:
            raise ConfigError(f"config key 'data.channels' is {data.channels}, but the model's first convolution "
                              f"({first[0]}) reads {first[1]}", "set data.channels = 0 to read it off the model")
        return data.channels
    return first[1] if first is not None else 3


def normalisation(data: DataConfig, channels: int, tv: Transform | None) -> tuple[DataConfig, list[str]]:
    """``data`` with ``channels`` set and mean/std as one number per channel; notes for defaults."""
    notes = []
    picked_mean, picked_std = default_stats(channels)
    if tv is not None and channels == 3:
        picked_mean, picked_std = tv.mean, tv.std
    resolved = {}
    for key, given, picked in (("mean", data.mean, picked_mean), ("std", data.std, picked_std)):
        if not given:
            resolved[key] = tuple(picked)
            continue
        if len(given) not in (1, channels):
            example = "one number, e.g. --mean 0.5 --std 0.25" if channels == 1 else \
                "one number, or three (one per RGB channel)"
            raise ConfigError(f"--{key} / data.{key} has {len(given)} numbers, but the model reads "
                              f"{channels} channel{'s' if channels > 1 else ''} ({'grey' if channels == 1 else 'RGB'})",
                              f"give {example}")
        resolved[key] = per_channel(given, channels)
    if channels == 1:
        notes.append("input: the model's first convolution reads 1 channel: images are converted to grey "
                     f"(luminance {GREY_WEIGHTS[0]}·R + {GREY_WEIGHTS[1]}·G + {GREY_WEIGHTS[2]}·B)")
        if not data.mean or not data.std:
            notes.append(f"input: no --mean/--std given for the grey model: using ImageNet's in grey (mean "
                         f"{resolved['mean'][0]}, std {resolved['std'][0]}); pass the values the model was "
                         "trained with")
    return dataclasses.replace(data, channels=channels, **resolved), notes


# --- the size --------------------------------------------------------------------------------------


def _pct(share: float, digits: int = 0) -> str:
    """A share as a percentage rounded down, so that 99.97 % of padding never reads "100"."""
    scale = 10 ** digits
    return f"{math.floor(share * 100 * scale) / scale:.{digits}f} %"


def _wxh(hw: Sequence[int]) -> str:
    return f"{hw[1]}×{hw[0]}"


def _sample(n: int, limit: int) -> list[int]:
    """At most ``limit`` indices of ``range(n)``, evenly spread (all of them if n ≤ limit)."""
    if n <= limit:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, limit).round().astype(int).tolist()))


def _spread(items: list[int], limit: int) -> list[int]:
    return [items[k] for k in _sample(len(items), limit)]


def _flags(resize: int, crop: int) -> str:
    return " ".join(f"--{k} {v}" for k, v in (("resize", resize), ("crop", crop)) if v)


@dataclass
class SizeDecision:
    size: tuple[int, int]
    """(H, W) of the model's input."""
    images: ImageList
    """The images, less those of another size in the sample (moved to ``skipped``)."""
    sampled: int
    """Images whose headers were read."""
    readable: int
    """Of those, images with a size (and, for the chosen size, one that decodes)."""
    majority: int
    """Sampled images of the chosen size."""
    minority: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    """(path, (H, W) after preprocessing) of the sampled images of another size: skipped."""
    notes: list[str] = field(default_factory=list)


def decide_size(images: ImageList, data: DataConfig, sample: int = SAMPLE) -> SizeDecision:
    """The model's input size for ``images`` under ``data`` (resize and crop resolved).

    The most common size after preprocessing among (a sample of) the images, by their headers;
    one image of that size is decoded to be sure the size is real.  Raises :class:`InputSizeError`
    when more than :data:`MAX_SKIPPED` of them have another size, or when a typical image would be
    mostly padding; ``ImageError`` when none can be read.
    """
    picked = _sample(len(images), sample)
    groups: dict[tuple[int, int], list[int]] = {}
    upright: dict[int, tuple[int, int]] = {}
    problems: list[tuple[int, ImageError]] = []
    for i in picked:
        try:
            w, h = header_size(images.path(i), data.max_pixels, images.records[i].rel)
        except ImageError as e:
            problems.append((i, e))
            continue
        upright[i] = (w, h)
        groups.setdefault(size_after(w, h, data), []).append(i)
    # Largest group first; among equals the one whose first image sorts first.
    order = sorted(groups, key=lambda s: (-len(groups[s]), groups[s][0]))
    chosen = None
    for s in order:
        for i in _spread(groups[s], DECODE_TRIES):
            try:
                px = load_pixels(images, i, data)
            except ImageError as e:
                problems.append((i, e))
                continue
            if tuple(px.shape[:2]) == s:
                chosen = s
                break
        if chosen is not None:
            break
        del groups[s]  # no image of this size decodes: they are damaged files, listed when read
    if chosen is None:
        problems.sort(key=lambda p: p[0])
        first = problems[0][1] if problems else None
        of = f"the {len(picked)}" if len(picked) == len(images) else f"{len(picked)} sampled"
        raise ImageError(f"none of {of} images in {str(images.root)!r} could be read "
                         f"(first problem: {first.message if first else '?'})", first.hint if first else None)

    readable = sum(len(v) for v in groups.values())
    minority = [(images.records[i].rel, s) for s, members in groups.items() if s != chosen for i in members]
    minority.sort(key=lambda m: m[0])
    decision = SizeDecision(size=chosen, images=images, sampled=len(picked), readable=readable,
                            majority=len(groups[chosen]), minority=minority)
    _check_padding(decision, groups, upright, data, images)
    share = len(minority) / readable
    if share > MAX_SKIPPED:
        raise _mixed_sizes(decision, groups, upright, data, len(images))
    if minority:
        reason = (f"size {{}} after preprocessing differs from the input size {_wxh(chosen)} "
                  f"(the size of {decision.majority} of {readable} images)")
        drop = {rel for rel, _ in minority}
        records = [r for r in images.records if r.rel not in drop]
        skipped = list(images.skipped) + [(rel, reason.format(_wxh(s))) for rel, s in minority]
        decision.images = dataclasses.replace(images, records=records, skipped=skipped)
        names = ", ".join(f"{rel} ({_wxh(s)})" for rel, s in minority[:5])
        more = f" and {len(minority) - 5} more" if len(minority) > 5 else ""
        decision.notes.append(
            f"warning: skipping {len(minority)} of {readable} images whose size after preprocessing is not "
            f"{_wxh(chosen)} (the size of the others): {names}{more}; {_fix(groups, upright, data)} "
            "would keep them")
    return decision


def _fix(groups: dict, upright: dict, data: DataConfig) -> str:
    """The flags that give every image one size: a crop no larger than the resized images."""
    if data.crop > 0:
        return _flags(data.resize, data.crop)
    if data.resize > 0:
        return _flags(data.resize, data.resize)
    sides = [min(upright[i]) for members in groups.values() for i in members]
    side = int(min(224, median(sides))) if sides else 224
    return _flags(side, side)


def _mixed_sizes(d: SizeDecision, groups: dict, upright: dict, data: DataConfig, total: int) -> InputSizeError:
    by_size = Counter({s: len(m) for s, m in groups.items() if s != d.size})
    listed = ", ".join(f"{_wxh(s)} ({n} image{'s' if n > 1 else ''}, e.g. {d.images.records[groups[s][0]].rel})"
                       for s, n in by_size.most_common(4))
    if len(by_size) > 4:
        listed += f" and {len(by_size) - 4} other sizes"
    scope = f"of the {d.readable} readable images" if d.sampled == total else \
        f"of {d.readable} readable images in a sample of {d.sampled} (of {total})"
    now = _flags(data.resize, data.crop) or "no resize or crop"
    fix = _fix(groups, upright, data)
    return InputSizeError(
        f"{len(d.minority)} {scope} ({_pct(len(d.minority) / d.readable, 1 if len(d.minority) < 0.1 * d.readable else 0)}) would be skipped for their size: "
        f"after preprocessing ({now}) {d.majority} are {_wxh(d.size)}; the rest: {listed}",
        f"add `{fix}` (data.resize / data.crop) so that every image has one size, or remove the odd images")


def _check_padding(d: SizeDecision, groups: dict, upright: dict, data: DataConfig, images: ImageList) -> None:
    """A crop larger than the resized images pads them with black: refuse when a typical input would
    be mostly padding, warn (naming the images) when some are padded at all."""
    c = data.crop
    if c <= 0:
        return
    resized = {i: resized_size(*upright[i], data.resize) for members in groups.values() for i in members}
    share = {i: 1.0 - min(w, c) * min(h, c) / (c * c) for i, (w, h) in resized.items()}
    padded = sorted((i for i, s in share.items() if s > 0), key=lambda i: (-share[i], i))
    if not padded:
        return
    grow = f"--resize {c}" if data.resize == 0 else f"--resize {c} (instead of {data.resize})"
    typical = sorted(share, key=lambda i: (share[i], i))[len(share) // 2]
    if share[typical] > MAX_PADDING:
        w, h = resized[typical]
        raise InputSizeError(
            f"the crop {c} (--crop / data.crop) is larger than the images after resizing (typically {w}×{h}): "
            f"{_pct(share[typical], 1)} of a typical input would be black padding",
            f"add {grow} so that the shorter side is {c} before the crop, or crop at most {min(w, h)} "
            f"(--crop {min(w, h)})")
    worst = padded[0]
    w, h = resized[worst]
    d.notes.append(
        f"warning: the crop {c} is larger than {len(padded)} of {len(share)} images after resizing "
        f"(e.g. {images.records[worst].rel}, {w}×{h}): they are padded with black, up to "
        f"{_pct(share[worst])} of the input; add {grow} to avoid it")


# --- everything together ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InputPlan:
    data: DataConfig
    """Resolved: resize and crop ≥ 0, channels 1 or 3, one mean and one std per channel."""
    size: tuple[int, int]
    """(H, W) of the model's input."""
    images: ImageList | None
    """The images to use (those of another size moved to ``skipped``); None without images."""
    notes: tuple[str, ...] = ()
    """What was decided automatically, and warnings: for the terminal and the index page."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input."""
        return (self.data.channels, *self.size)


def plan_inputs(model: nn.Module, arch: str, images: ImageList, data: DataConfig,
                say: Callable[[str], None] | None = None) -> InputPlan:
    """Decide the model's input for ``images`` (see the module doc); ``say`` prints each note."""
    data, notes, tv = preprocessing(arch, data)
    sized = decide_size(images, data)
    channels = input_channels(model, sized.size, data)
    data, more = normalisation(data, channels, tv)
    notes = notes + more + sized.notes
    for note in notes:
        if say:
            say(note)
    return InputPlan(data=data, size=sized.size, images=sized.images, notes=tuple(notes))


def plan_without_images(model: nn.Module, arch: str, data: DataConfig, side: int = 0,
                        say: Callable[[str], None] | None = None) -> InputPlan:
    """The input for a square image of ``side`` pixels (0: the crop, the resize, else 224) when
    there are no images to look at (``sitegen layers`` without ``--images``)."""
    data, notes, tv = preprocessing(arch, data)
    if side:
        notes = []  # the size given replaces the transform's: its note would mislead
    side = side or data.crop or data.resize or 224
    channels = input_channels(model, (side, side), data)
    data, more = normalisation(data, channels, tv)
    notes = notes + more
    for note in notes:
        if say:
            say(note)
    return InputPlan(data=data, size=(side, side), images=None, notes=tuple(notes))
