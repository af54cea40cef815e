"""What every analysis pass gets: the model, the images, the selected layers, the device.

Collected once before any pass runs (MkDocs-style: collect, then compute, then render).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from pathlib import Path

from .config import Config, as_dict
from .distributed import Dist
from .distributed import current as current_dist
from .images import ImageList, PixelDataset, channels_of, normalise
from .layers import LayerInfo
from .model_loading import LoadedModel
from .workpool import pool_workers


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def available_memory(device: torch.device) -> int:
    """Bytes free for this process's tensors now: the GPU's free memory, else the system's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown: assume a small machine


MEMORY_SHARE = {"cuda": 0.5, "cpu": 0.25}
"""Share of the free memory one batch may take: leaves room for the model, the decoded images,
the results and (on the CPU) everything else the machine runs."""


def channels_last_works(model: torch.nn.Module, input_size: tuple[int, int], device: torch.device,
                        channels: int = 3) -> bool:
    """Whether ``model`` runs on a channels-last batch.  A model that calls ``.view()`` on a feature
    map (``x.view(n, -1)`` after VGG's 7×7 maps, common in hand-written models) cannot: its view
    needs NCHW strides, so such a model must get contiguous batches."""
    from .hooks import model_guard

    x = torch.zeros((2, channels, *input_size), device=device).contiguous(memory_format=torch.channels_last)
    try:
        with model_guard(model), torch.no_grad():
            model(x)
        return True
    except Exception:  # any failure on NHWC input: give the model the layout it was written for
        return False


def default_workers() -> int:
    """DataLoader decoding processes: none on tiny machines, where they only compete with compute."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus - 1)


CPU_LARGE_BATCH = 16
"""Batch cap on the CPU for inputs over 64×64 px: a ResNet-50 forward at 224 px on 2 cores took
52 ms an image in batches of 16 and 131 ms in batches of 64 (one run, 2026-12-02)."""


@dataclass
class Batch:
    indices: torch.Tensor
    """Image indices (into ``ctx.images``) of this batch, int64, on the CPU."""
    pixels: torch.Tensor
    """uint8 (N, H, W, C), on the CPU (C = ``BuildContext.channels``)."""
    inputs: torch.Tensor
    """Normalised float (N, C, H, W) on the device."""
    ok: torch.Tensor
    """bool (N,): False where the image could not be decoded (its pixels are zeros)."""
    errors: list[str]


@dataclass
class BuildContext:
    config: Config
    model: LoadedModel
    images: ImageList
    layers: list[LayerInfo]
    """The selected layers, in execution order."""
    all_layers: list[LayerInfo]
    input_size: tuple[int, int]
    input_notes: tuple[str, ...] = ()
    """How the input was decided, where automatically, and warnings about it (the index page lists them)."""
    compare: LoadedModel | None = None
    """An earlier checkpoint of the same architecture, shown beside the model (``compare.checkpoint``);
    None for the atlas of one model."""
    device: torch.device = field(default_factory=default_device)
    workers: int = field(default_factory=default_workers)
    results: dict = field(default_factory=dict)
    """Results of the passes run so far, by pass name (later passes read earlier ones)."""
    dist: Dist = field(default_factory=current_dist)
    """This process's rank in a torchrun job (rank 0 of 1 otherwise)."""
    scratch: Path | None = None
    """A folder the running pass may use for checkpoints (beside its cache entry); None = no cache."""
    _channels_last: bool | None = field(default=None, repr=False)
    """Cached answer of :attr:`channels_last`."""
    _backward_layout: dict = field(default_factory=dict, repr=False)
    """Cached answers of :meth:`backward_channels_last`, by image size."""

    @property
    def channels(self) -> int:
        """Channels of the model's input: 1 (grey) or 3 (RGB)."""
        return channels_of(self.config.data)

    @property
    def net(self) -> torch.nn.Module:
        return self.model.model

    def layer(self, name: str) -> LayerInfo:
        return next(l for l in self.all_layers if l.name == name)

    def identity(self) -> dict:
        """What results depend on, besides a pass's own config (for cache keys)."""
        return {
            "weights": self.model.weights_hash,
            "arch": self.model.arch,
            "images": self.images.digest(),
            "data": as_dict(self.config.data),
            "layers": [l.name for l in self.layers],
            # The fields decide every crop window the passes store: a field measured differently
            # (another sitegen, a probe-measured layer) must not reuse results cut at the old windows.
            "fields": [[l.rf.size, l.rf.stride, l.rf.offset, l.rf.size_x, l.rf.stride_x, l.rf.offset_x]
                       for l in self.layers],
            "input": list(self.input_size),
        }

    def batch_size(self, requested: int = 0) -> int:
        """``requested``, or the largest batch up to 256 on a GPU / 64 on the CPU (where per-image
        time bottoms out on 2 cores for CIFAR-sized inputs, measured in bench/; CPU_LARGE_BATCH for
        inputs over 64×64 px, whose larger batches leave the caches) whose feature maps fit in a
        share of the free memory: a ResNet-50 at 224 px gets smaller batches than a CIFAR ResNet."""
        if requested:
            return requested
        h, w = self.input_size
        cap = 256 if self.device.type == "cuda" else 64 if h * w <= 64 * 64 else CPU_LARGE_BATCH
        budget = available_memory(self.device) * MEMORY_SHARE.get(self.device.type, 0.25)
        return int(max(1, min(cap, budget // max(1, self.bytes_per_image()))))

    def pass_workers(self, batch: int) -> int:
        """Processes that run the items of the passes with many small forwards and backwards
        (:mod:`sitegen.workpool`): on the CPU one per torch thread, as many as batches of ``batch``
        images fit in half the free memory; 1 elsewhere."""
        fit = int(available_memory(self.device) * 0.5 // max(1, batch * self.bytes_per_image()))
        return pool_workers(self.device, fit)

    def bytes_per_image(self) -> int:
        """Memory one image's pass may hold: every discovered layer's float32 output, three times
        (a backward keeps the activations, their gradients and the copies of the ReLUs' inputs),
        which bounds the attribution and feature-vis passes; the dataset pass holds far less."""
        return 3 * 4 * sum(int(torch.Size(l.shape).numel()) for l in self.all_layers) + 3 * 4 * \
            self.input_size[0] * self.input_size[1]

    def __post_init__(self) -> None:
        # Decided here, once, before any pass hooks the model: probing later, inside a pass, would
        # run the probe through that pass's hooks (and its early stop).
        if self._channels_last is None:
            self._channels_last = self.device.type == "cuda" and channels_last_works(
                self.net, self.input_size, self.device, self.channels)

    @property
    def channels_last(self) -> bool:
        """Whether batches go to the model channels-last (NHWC): on a GPU, where cuDNN's fastest
        convolutions take NHWC, and only if the model accepts it.  On the CPU, NCHW keeps the
        per-channel reductions of the dataset pass fast (~50x slower on NHWC maps there)."""
        return bool(self._channels_last)

    def backward_channels_last(self, size: tuple[int, int] | None = None) -> bool:
        """Whether the passes that run a backward (attribution, sanity checks, feature vis) give the
        model NHWC inputs of ``size`` (default: the input size): on a GPU where batches are NHWC,
        and on the CPU wherever the model accepts it, because oneDNN's convolutions run a forward
        and backward of the shared ResNet-56 10–25 % faster on NHWC (bench/attribution_bench.py);
        those passes make no per-channel reductions over the maps, which NHWC would slow.

        Call it outside any pass's hooks (the probe runs a forward): the passes ask at the start of
        ``run`` and ``plan``; the answer is kept."""
        size = tuple(size or self.input_size)
        if self.device.type == "cuda":
            return self.channels_last
        if size not in self._backward_layout:
            self._backward_layout[size] = self.device.type == "cpu" and channels_last_works(
                self.net, size, self.device, self.channels)
        return self._backward_layout[size]

    def backward_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` in the layout :meth:`backward_channels_last` chooses for their size."""
        if inputs.dim() == 4 and self.backward_channels_last(tuple(inputs.shape[2:])):
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def batches(self, indices: Sequence[int] | None = None, batch_size: int = 0) -> Iterator[Batch]:
        """Decoded, normalised batches in index order (failures flagged, never raised)."""
        idx = list(range(len(self.images))) if indices is None else list(indices)
        ds = PixelDataset(self.images, self.config.data, idx, self.input_size)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size(batch_size), shuffle=False, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", collate_fn=_collate,
            persistent_workers=False,
        )
        for pixels, ids, errors in loader:
            inputs = normalise(pixels.to(self.device, non_blocking=True), self.config.data)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            yield Batch(indices=ids, pixels=pixels, inputs=inputs, ok=ok, errors=list(errors))


def _collate(items):
    pixels = torch.stack([it[0] for it in items])
    ids = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return pixels, ids, [it[2] for it in items]
