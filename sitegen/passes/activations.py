"""Activation maps: every selected layer's feature maps for each sample image.

One forward per batch of sample images with every selected layer captured and reduced in its hook:
each channel's exact spatial maximum and minimum (a map with maximum ≤ 0 is never active for that
image), and the map itself, max-pooled down to at most ``activations.max_side`` pixels a side (max
pooling keeps the peaks a picture must show) and stored as float16 to bound the cache.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import progress
from ..config import ActivationsConfig, SamplesConfig
from ..context import BuildContext
from ..hooks import capture_outputs, model_guard, run_until
from ..images import normalise
from ..planning import PassPlan, Probe, count
from .base import AnalysisPass, Result
from .sampling import key_with, sample_images


def shrink(maps: torch.Tensor, max_side: int) -> torch.Tensor:
    """(N, C, H, W) max-pooled so neither side exceeds ``max_side`` (unchanged when already small)."""
    h, w = maps.shape[-2:]
    if h <= max_side and w <= max_side:
        return maps
    return F.adaptive_max_pool2d(maps, (min(h, max_side), min(w, max_side)))


class ActivationsPass(AnalysisPass):
    name = "activations"
    version = 1
    config: ActivationsConfig

    def __init__(self, config: ActivationsConfig, samples: SamplesConfig):
        super().__init__(config)
        self.samples = samples

    def cache_key(self, ctx: BuildContext) -> str:
        return key_with(super().cache_key(ctx), self.samples)

    def reduce(self, _name: str, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What is kept of a layer's output, in its forward hook: maxima, minima and the pooled maps."""
        flat = out.detach().flatten(2)
        # float16 halves the cache; clamped so a huge activation saturates rather than becoming inf.
        return flat.amax(2), flat.amin(2), shrink(out.detach(), self.config.max_side).clamp(-65000, 65000).half()

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """A forward of every sample image with every layer captured and reduced: timed as the pass
        runs it on 1 and on a few real images, plus their decoding."""
        names = [l.name for l in ctx.layers]
        samples = len(sample_images(ctx.images, self.samples))
        batch = ctx.batch_size(0)

        def run(m: int) -> None:
            x = probe.inputs(m)
            with model_guard(ctx.net), torch.inference_mode(), \
                    capture_outputs(ctx.net, names, stop_after_last=True, transform=self.reduce) as store:
                run_until(ctx.net, x)
                for n in names:
                    [t.cpu() for t in store[n]]

        fit = probe.fit("activations", run, cap=batch)
        seconds = fit.batched(samples, batch) + samples * probe.decode_seconds()
        return PassPlan(self.name, seconds, {"images": samples, "layers": len(names)},
                        f"{count(samples)} images × {len(names)} layers")

    def run(self, ctx: BuildContext) -> Result:
        names = [l.name for l in ctx.layers]
        side = self.config.max_side
        reduce = self.reduce

        wanted = sample_images(ctx.images, self.samples)
        ids: list[int] = []
        failed: list[int] = []
        parts: dict[str, list[tuple[torch.Tensor, ...]]] = {n: [] for n in names}
        with model_guard(ctx.net), torch.inference_mode(), \
                capture_outputs(ctx.net, names, stop_after_last=True, transform=reduce) as store, \
                progress.bar("activation maps", len(wanted), "images") as advance:
            for b in ctx.batches(wanted):
                store.clear()
                run_until(ctx.net, b.inputs)
                ok = b.ok.to(b.inputs.device)
                for n in names:
                    parts[n].append(tuple(t[ok].cpu() for t in store[n]))
                ids += [int(i) for i, good in zip(b.indices, b.ok) if good]
                failed += [int(i) for i, good in zip(b.indices, b.ok) if not good]
                advance(len(b.indices))
        arrays: dict[str, np.ndarray] = {"images": np.array(ids, dtype=np.int64),
                                         "failed": np.array(failed, dtype=np.int64)}
        for li, n in enumerate(names):
            if parts[n]:
                mx, mn, maps = (torch.cat([p[j] for p in parts[n]]) for j in range(3))
            else:
                c, h, w = ctx.layer(n).shape
                mx = mn = torch.zeros((0, c))
                maps = torch.zeros((0, c, min(h, side), min(w, side)), dtype=torch.float16)
            arrays[f"L{li}.max"] = mx.float().numpy()
            arrays[f"L{li}.min"] = mn.float().numpy()
            arrays[f"L{li}.maps"] = maps.numpy()
        return Result(meta={"layers": names, "max_side": side}, arrays=arrays)


def sample_maps(ctx: BuildContext, names: list[str], pixels: np.ndarray, max_side: int) -> dict[str, tuple]:
    """One image's ``(max, min, maps)`` per layer exactly as the pass keeps them (``pixels`` uint8
    (H, W, 3)): what the site's size estimate draws an activation picture from."""
    p = ActivationsPass(ActivationsConfig(max_side=max_side), SamplesConfig())
    x = normalise(torch.from_numpy(pixels[None]).to(ctx.device), ctx.config.data)
    with model_guard(ctx.net), torch.inference_mode(), \
            capture_outputs(ctx.net, names, stop_after_last=True, transform=p.reduce) as store:
        run_until(ctx.net, x)
        return {n: tuple(t[0].float().cpu().numpy() for t in store[n]) for n in names}
