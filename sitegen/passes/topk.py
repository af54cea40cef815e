"""The dataset pass: each channel's top-k distinct images, and running per-channel statistics.

One batched forward over all images.  For every selected layer and channel it keeps the k images
with the largest spatial maximum of that channel (with the position of the maximum), ties broken
by the lower image index.  Memory is O(channels × (k + window)): each layer's output is reduced
inside its forward hook and dropped; the reductions of a window of batches are merged into the
running top-k at once, which keeps the per-batch work to a handful of tensor operations per layer
(on the CPU, per-operation overhead, not arithmetic, is what a naive per-batch merge costs).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import progress
from ..config import TopKConfig
from ..context import BuildContext
from ..hooks import StopForward, get_module, model_guard, run_until
from ..planning import PassPlan, Probe, count
from .base import AnalysisPass, Result

WINDOW_IMAGES = 1024
"""Images whose per-channel maxima are buffered before a merge: bounded memory, few merges."""


class RunningTopK:
    """Streaming top-k per channel over images arriving in increasing index order."""

    def __init__(self, channels: int, k: int, device: torch.device):
        self.k = k
        self.values = torch.full((channels, 0), float("-inf"), device=device)
        self.images = torch.zeros((channels, 0), dtype=torch.int64, device=device)
        self.pos = torch.zeros((channels, 0), dtype=torch.int64, device=device)

    def threshold(self) -> torch.Tensor:
        """(C, 1): a new value must exceed this to enter (-inf while fewer than k are kept)."""
        if self.values.shape[1] < self.k:
            return torch.full_like(self.values[:, :1], float("-inf")) if self.values.shape[1] else \
                torch.full((self.values.shape[0], 1), float("-inf"), device=self.values.device)
        return self.values[:, -1:]

    def merge(self, values: torch.Tensor, images: torch.Tensor, pos: torch.Tensor) -> None:
        """Merge ``values`` (N, C) of images ``images`` (N,), increasing and all later than the kept
        ones; ``pos`` (N, C) holds the map position of every entry that can enter (others -1).

        Among equal values the kept entries are already ordered by image index and the new ones
        follow in index order, so a stable descending sort breaks ties by the lower image index.
        """
        c = values.shape[1]
        v = torch.cat([self.values, values.T], dim=1)
        order = stable_top(v, self.k)
        self.values = v.gather(1, order)
        self.images = torch.cat([self.images, images.expand(c, -1)], dim=1).gather(1, order)
        self.pos = torch.cat([self.pos, pos.T], dim=1).gather(1, order)

    def padded(self) -> dict[str, torch.Tensor]:
        """(C, k) arrays, empty slots as value -inf and image index 2**62 (so they sort last)."""
        c, kept = self.values.shape
        pad = self.k - kept
        def fill(t, value):
            return torch.cat([t, torch.full((c, pad), value, dtype=t.dtype, device=t.device)], dim=1)
        return {"values": fill(self.values, float("-inf")), "images": fill(self.images, 2**62),
                "pos": fill(self.pos, 0)}

    def load_padded(self, st: dict[str, torch.Tensor]) -> None:
        # Every channel has seen the same images, so row 0 tells how many slots are filled.
        keep = int(torch.isfinite(st["values"][0]).sum()) if len(st["values"]) else 0
        self.values, self.images, self.pos = (st[k][:, :keep] for k in ("values", "images", "pos"))


def stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``values`` (R, W), the column indices of its k largest (fewer where W < k), ties
    by the lower column: the first k of a stable descending sort, NaN counting as the largest.

    For float32 a selection instead of a sort: each value's bits, mapped to integers in the same
    order (negative floats have their other bits flipped; -0.0 made +0.0 and every NaN the same
    NaN first, so both compare as the sort compares them), go to the upper half of an int64 key
    whose lower half falls with the column; the keys are distinct, so ``torch.topk`` (not stable)
    picks what the stable sort would.  About 4 x faster than the sort on (64, 1033) (373 against
    1,488 us), which the dataset pass runs at every merge of every layer."""
    k = min(k, values.shape[1])
    if values.dtype != torch.float32 or values.shape[1] >= 2**31:
        return torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    v = torch.where(torch.isnan(values), float("nan"), values + 0.0)  # -0.0 + 0.0 is +0.0
    bits = v.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    # ordered >= -(2**31) + 2**23 (-inf's key; NaN is positive), so the subtraction cannot wrap.
    key = (ordered << 32) - torch.arange(values.shape[1], dtype=torch.int64, device=values.device)
    return torch.topk(key, k, dim=1, sorted=True).indices


def lexsort_topk(values: torch.Tensor, images: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the indices of the k largest values, ties by the lower image index (two stable
    sorts make a lexicographic sort: first by image, then by value)."""
    by_image = torch.sort(images, dim=1, stable=True).indices
    v = values.gather(1, by_image)
    by_value = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return by_image.gather(1, by_value)


class RunningStats:
    """Per-channel statistics over images, for the dead- and dull-channel reports."""

    def __init__(self, channels: int, device: torch.device):
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.sum, self.sumsq, self.fires = z(), z(), z()
        self.max = torch.full((channels,), float("-inf"), dtype=torch.float64, device=device)

    def update(self, spatial_max: torch.Tensor, spatial_mean: torch.Tensor) -> None:
        m = spatial_mean.double()
        self.n += m.shape[0]
        self.sum += m.sum(0)
        self.sumsq += (m * m).sum(0)
        self.fires += (spatial_max > 0).sum(0)
        if len(spatial_max):
            self.max = torch.maximum(self.max, spatial_max.amax(0).double())

    def state(self) -> dict[str, torch.Tensor]:
        return {"n": torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device),
                "sum": self.sum, "sumsq": self.sumsq, "fires": self.fires, "max": self.max}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        self.n = int(st["n"][0])
        self.sum, self.sumsq, self.fires, self.max = st["sum"], st["sumsq"], st["fires"], st["max"]

    def arrays(self) -> dict[str, np.ndarray]:
        n = max(self.n, 1)
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp_min(0)
        return {"mean": mean.cpu().numpy(), "std": var.sqrt().cpu().numpy(),
                "max": self.max.cpu().numpy(), "fire_rate": (self.fires / n).cpu().numpy()}


class LayerReducer:
    """Forward hook folding one layer's output into buffered per-channel maxima and means, plus the
    argmax position of the few entries that beat the current k-th value (the only ones that can
    enter the top-k); ``flush`` merges the buffer into the running top-k and statistics."""

    def __init__(self, channels: int, k: int, device: torch.device):
        self.top = RunningTopK(channels, k, device)
        self.stats = RunningStats(channels, device)
        self.images = torch.zeros(0, dtype=torch.int64)
        self.ok: torch.Tensor | None = None
        self._thresh = self.top.threshold()
        # The window's rows (maxima, spatial sums, positions, image ids), written batch by batch into
        # buffers that grow by doubling and are kept from window to window.  Small tensors kept
        # for each batch until the merge, between the batch's freed feature maps, fragmented the
        # heap: the dataset pass over 10,000 images grew the build's memory by 336 MiB, over 1,000
        # by 230 MiB.
        self._buffers: tuple[torch.Tensor, ...] | None = None
        self._rows = 0
        self._size = 1
        self.last: torch.Tensor | None = None
        """The latest batch's per-image maxima (N, C), -inf for failed images: what a :class:`Tap` reads."""

    def _room(self, n: int, c: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The buffers' next ``n`` rows (maxima, sums, positions (N, C); ids (N,))."""
        need = self._rows + n
        if self._buffers is None or need > len(self._buffers[0]):
            # A window holds fewer than WINDOW_IMAGES + one batch's rows (the pass merges once
            # it holds WINDOW_IMAGES or more).
            cap = max(need, min(2 * len(self._buffers[0]), WINDOW_IMAGES + n)) if self._buffers is not None else n
            grown = (torch.empty((cap, c), dtype=torch.float32, device=device),
                     torch.empty((cap, c), dtype=torch.float32, device=device),
                     torch.empty((cap, c), dtype=torch.int64, device=device),
                     torch.empty(cap, dtype=torch.int64, device=device))
            if self._buffers is not None:
                for new, old in zip(grown, self._buffers):
                    new[:self._rows] = old[:self._rows]
            self._buffers = grown
        return tuple(b[self._rows:need] for b in self._buffers)

    def __call__(self, _module, _inputs, out: torch.Tensor) -> None:
        maxima, sums, pos, ids = self._room(out.shape[0], out.shape[1], out.device)
        maxima.copy_(out.amax(dim=(2, 3)))
        # Sums, divided by the map's size at the merge: one division per window instead of one
        # per batch and layer (an operation's overhead is what such small tensors cost).
        torch.sum(out, dim=(2, 3), dtype=torch.float32, out=sums)
        self._size = out.shape[2] * out.shape[3]
        if self.ok is not None:  # images that failed to decode never enter a top-k nor the stats
            maxima.masked_fill_(~self.ok[:, None], float("-inf"))
        pos.fill_(-1)
        n, c = torch.nonzero(maxima > self._thresh.T, as_tuple=True)
        if len(n):
            pos[n, c] = out[n, c].flatten(1).argmax(1)  # first occurrence of the maximum
        ids.copy_(self.images)
        self.last = maxima
        self._rows += len(maxima)

    def flush(self) -> None:
        if not self._rows:  # nothing buffered since the last merge
            return
        maxima, sums, pos, ids = (b[:self._rows] for b in self._buffers)
        good = torch.isfinite(maxima[:, 0])
        self.stats.update(maxima[good], sums[good] / self._size)
        self.top.merge(maxima, ids, pos)
        self._thresh = self.top.threshold()
        self._rows = 0

    def state(self) -> dict[str, torch.Tensor]:
        """The running state after a flush (buffers empty), for checkpoints and the rank merge."""
        return {**{f"top.{k}": v for k, v in self.top.padded().items()},
                **{f"stats.{k}": v for k, v in self.stats.state().items()}}

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        self.top.load_padded({k[4:]: v for k, v in st.items() if k.startswith("top.")})
        self.stats.load_state({k[6:]: v for k, v in st.items() if k.startswith("stats.")})
        self._thresh = self.top.threshold()


class Tap:
    """What else a dataset pass collects from the batches it reads (the comparison of two models
    reads per-image figures of both from the same batches).  It sees every batch once per model,
    right after that model ran on it, with the model's reducers (each holds the batch's per-image
    maxima in ``last``) and, when ``full_forward``, the model's output."""

    full_forward = False
    """Run each model to its output instead of stopping after the deepest selected layer."""

    def attach(self, j: int, net: torch.nn.Module) -> list:
        """Hooks on model ``j`` (their handles, removed when the pass ends)."""
        return []

    def batch(self, j: int, batch, reducers: dict[str, "LayerReducer"], output) -> None:
        pass

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to keep in the pass's checkpoint, so a resumed pass restores them too."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        pass


def _stop(_module, _inputs, _out) -> None:
    raise StopForward()  # nothing after the deepest selected layer is needed


class TopKPass(AnalysisPass):
    name = "topk"
    version = 3  # the spatial means summed in float32 (under bf16/fp16 autocast they were averaged in it)
    distributed = True
    config: TopKConfig

    def run(self, ctx: BuildContext) -> Result:
        names = [l.name for l in ctx.layers]
        shard = list(ctx.dist.shard(len(ctx.images)))
        dtype, agreement = self._choose_precision(ctx, names, shard)
        ckpt = Checkpoint(ctx.scratch, ctx.dist.rank, self.config.checkpoint_every,
                          (ctx.dist.world, shard[0] if shard else 0, len(shard)))
        reducers, failed = self._stream(ctx, names, shard, dtype, ckpt)
        if ctx.dist.active:
            failed = _merge_ranks(reducers, failed, self.config.k)
        ckpt.clear()
        result = self._result(ctx, names, reducers, sorted(failed))
        result.meta["precision"] = {"used": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
                                    "requested": self.config.precision, "agreement": agreement}
        return result

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """One forward over every image (this rank's share), timed as the pass runs it: ``_stream``
        on 1 and on a few real images (decoding, hooks and reductions included)."""
        names = [l.name for l in ctx.layers]
        n = len(ctx.dist.shard(len(ctx.images)))
        batch = ctx.batch_size(self.config.batch_size)
        fit = self._probe_fit(ctx, probe, names, batch)
        seconds = fit.batched(n, batch)
        detail = f"{count(n)} images, {self._probe_words(names)}"
        if self.config.precision != "fp32":  # the check streams a sample twice first, with one model
            sample = min(n, self.config.precision_sample)
            seconds += 2 * TopKPass._probe_fit(self, ctx, probe, names, batch).batched(sample, batch)
            detail += f" (+ {self.config.precision} check on {count(sample)}; timed in fp32)"
        return PassPlan(self.name, seconds, {"images": n, "layers": len(names), "batch": batch}, detail)

    def _probe_fit(self, ctx: BuildContext, probe: Probe, names: list[str], batch: int):
        """``_stream`` timed on 1 and on a few real images (the probe's sizes)."""
        have = max(1, len(ctx.images))

        def run(m: int) -> None:
            self._stream(ctx, names, sorted(i % have for i in range(m)), None, label="probe")

        return probe.fit("topk", run, cap=batch)

    def _probe_words(self, names: list[str]) -> str:
        return f"forward to {names[-1]}"

    def _stream(self, ctx: BuildContext, names: list[str], indices: list[int], dtype: torch.dtype | None,
                ckpt: "Checkpoint | None" = None, label: str = "dataset pass"):
        """One pass over ``indices`` (increasing): the filled reducers and the failed images."""
        per_net, failed = self._stream_nets(ctx, [ctx.net], names, indices, dtype, ckpt, label)
        return per_net[0], failed

    def _stream_nets(self, ctx: BuildContext, nets: list[torch.nn.Module], names: list[str], indices: list[int],
                     dtype: torch.dtype | None, ckpt: "Checkpoint | None" = None, label: str = "dataset pass",
                     tap: Tap | None = None):
        """One pass over ``indices`` (increasing), each batch decoded once and fed to every model of
        ``nets`` in turn: a dict of filled reducers per model, and the failed images."""
        per_net = [{n: LayerReducer(ctx.layer(n).channels, self.config.k, ctx.device) for n in names} for _ in nets]
        flat = {(j, n): r for j, reducers in enumerate(per_net) for n, r in reducers.items()}
        done, failed = ckpt.restore(flat, ctx.device, tap) if ckpt else (0, [])
        if done:
            progress.info(f"{label}: resuming after {done} images from a checkpoint")
        every = (ckpt.every if ckpt else 0) or WINDOW_IMAGES
        full = tap is not None and tap.full_forward
        handles = []
        buffered = 0
        try:
            for j, (net, reducers) in enumerate(zip(nets, per_net)):
                for n in names:
                    handles.append(get_module(net, n).register_forward_hook(reducers[n]))
                if not full:
                    handles.append(get_module(net, names[-1]).register_forward_hook(_stop))
                if tap is not None:
                    handles += tap.attach(j, net)
            with contextlib.ExitStack() as stack:
                for net in nets:
                    stack.enter_context(model_guard(net))
                stack.enter_context(torch.inference_mode())
                stack.enter_context(_autocast(ctx.device, dtype))
                advance = stack.enter_context(progress.bar(label, len(indices), "images"))
                advance(done)
                for batch in ctx.batches(indices=indices[done:], batch_size=self.config.batch_size):
                    failed += [(int(i), e) for i, e in zip(batch.indices, batch.errors) if e]
                    ok = None if bool(batch.ok.all()) else batch.ok.to(ctx.device)
                    ids = batch.indices.to(ctx.device)
                    for j, (net, reducers) in enumerate(zip(nets, per_net)):
                        for r in reducers.values():
                            r.images, r.ok = ids, ok
                        if full:
                            output = net(batch.inputs)
                        else:
                            run_until(net, batch.inputs)
                            output = None
                        if tap is not None:
                            tap.batch(j, batch, reducers, output)
                    buffered += len(ids)
                    done += len(ids)
                    # The window doubles from one batch up to WINDOW_IMAGES: each merge raises the
                    # k-th value that an image must beat to need its argmax position, so merging
                    # early spares the argmax of most of the first window's maps.
                    if buffered >= min(WINDOW_IMAGES, every, max(done - buffered, 1)):
                        for r in flat.values():
                            r.flush()
                        buffered = 0
                        if ckpt:
                            ckpt.maybe_save(flat, done, failed, tap)
                    advance(len(ids))
                for r in flat.values():
                    r.flush()
        finally:
            for h in handles:
                h.remove()
        return per_net, failed

    def _choose_precision(self, ctx: BuildContext, names: list[str], shard: list[int]):
        """Reduced precision only where it keeps the same top-k: on a sample of this rank's images,
        the mean overlap of each channel's top-k set under autocast with its fp32 set must reach
        ``min_agreement``; otherwise the pass falls back to fp32 and says so."""
        requested = self.config.precision
        if requested == "fp32":
            return None, None
        dtype = torch.bfloat16 if requested == "bf16" else torch.float16
        sample = shard[: self.config.precision_sample]
        exact, _ = self._stream(ctx, names, sample, None, label="precision check (fp32)")
        low, _ = self._stream(ctx, names, sample, dtype, label=f"precision check ({requested})")
        agreement = topk_agreement(exact, low)
        if agreement < self.config.min_agreement:
            progress.info(f"warning: {requested} changes the top-{self.config.k} sets (agreement "
                          f"{agreement:.3f} < {self.config.min_agreement}); using fp32")
            return None, agreement
        progress.info(f"{requested}: top-{self.config.k} agreement with fp32 on {len(sample)} images: {agreement:.3f}")
        return dtype, agreement

    def _result(self, ctx, names, reducers, failed) -> Result:
        arrays: dict[str, np.ndarray] = {}
        for li, n in enumerate(names):
            t = reducers[n].top
            w = ctx.layer(n).shape[2]
            pos = t.pos.cpu().numpy()
            arrays[f"L{li}.values"] = t.values.cpu().numpy().astype(np.float32)
            arrays[f"L{li}.images"] = t.images.cpu().numpy()
            arrays[f"L{li}.y"] = pos // w
            arrays[f"L{li}.x"] = pos % w
            for key, arr in reducers[n].stats.arrays().items():
                arrays[f"L{li}.{key}"] = arr
        arrays["failed"] = np.array([i for i, _ in failed], dtype=np.int64)
        meta = {"layers": names, "k": self.config.k, "failed_reasons": [e for _, e in failed],
                "images_used": len(ctx.images) - len(failed)}
        return Result(meta=meta, arrays=arrays)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def topk_agreement(a: dict[str, LayerReducer], b: dict[str, LayerReducer]) -> float:
    """Mean over every channel of |top-k set A ∩ top-k set B| / k."""
    total, count = 0.0, 0
    for name in a:
        ia, ib = a[name].top.images, b[name].top.images
        if ia.shape[1] == 0:
            continue
        same = (ia[:, :, None] == ib[:, None, :]).any(2).float().sum(1) / ia.shape[1]
        total += float(same.sum())
        count += same.numel()
    return total / count if count else 1.0


def _merge_ranks(reducers: dict[str, LayerReducer], failed: list, k: int) -> list:
    """Every rank ends with the global top-k and statistics: gather each rank's k candidates per
    channel and keep the best k with the single-process tie-break; sum the statistics."""
    from .. import distributed as d

    for r in reducers.values():
        st = r.state()
        values = d.all_gather_cat(st["top.values"], dim=1)
        images = d.all_gather_cat(st["top.images"], dim=1)
        pos = d.all_gather_cat(st["top.pos"], dim=1)
        order = lexsort_topk(values, images, k)
        merged = {"values": values.gather(1, order), "images": images.gather(1, order), "pos": pos.gather(1, order)}
        r.top.load_padded(merged)
        stats = {key[6:]: d.all_reduce(v) for key, v in st.items() if key.startswith("stats.") and key != "stats.max"}
        stats["max"] = d.all_reduce(st["stats.max"], op=d.dist.ReduceOp.MAX)
        r.stats.load_state(stats)
    return [item for part in d.all_gather_objects(failed) for item in part]


class Checkpoint:
    """The running state written atomically every ``every`` images, so a killed pass resumes.

    It lives beside the pass's cache entry (its key covers weights, images and config, so a
    checkpoint can only be resumed by the identical pass) and is removed once the pass finishes.
    It also records the job's shape, ``(world size, first image, image count)`` of this rank's
    shard: a build resumed with another ``--workers`` count splits the images differently, and a
    rank restoring a state that covers images outside its new shard would count them twice.
    Arrays only, loaded without pickle.
    """

    def __init__(self, folder: Path | None, rank: int, every: int, shard: tuple[int, int, int] = (1, 0, 0)):
        self.path = folder / f"rank{rank}.npz" if folder is not None and every > 0 else None
        self.every, self.last, self.shard = every, 0, tuple(int(v) for v in shard)

    def restore(self, reducers: dict, device: torch.device, tap: Tap | None = None) -> tuple[int, list]:
        if self.path is None or not self.path.is_file():
            return 0, []
        try:
            with np.load(self.path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            if tuple(int(v) for v in data["shard"]) != self.shard:
                progress.info("dataset pass: the checkpoint was written by a job split another way "
                              "(another --workers count); starting over")
                return 0, []
            for li, (name, r) in enumerate(reducers.items()):
                r.load_state({k.split(":", 1)[1]: torch.from_numpy(v).to(device)
                              for k, v in data.items() if k.startswith(f"L{li}:")})
            failed = [(int(i), str(m)) for i, m in zip(data["failed"], data["failed_reasons"])]
            if tap is not None:
                tap.load_state({k[4:]: v for k, v in data.items() if k.startswith("tap:")})
            self.last = int(data["done"][0])
            return self.last, failed
        except (OSError, ValueError, KeyError):
            return 0, []  # a damaged checkpoint: start over

    def maybe_save(self, reducers: dict, done: int, failed: list, tap: Tap | None = None) -> None:
        if self.path is None or done - self.last < self.every:
            return
        arrays = {f"L{li}:{k}": v.cpu().numpy() for li, r in enumerate(reducers.values())
                  for k, v in r.state().items()}
        arrays["done"] = np.array([done], dtype=np.int64)
        arrays["shard"] = np.array(self.shard, dtype=np.int64)
        arrays["failed"] = np.array([i for i, _ in failed], dtype=np.int64)
        arrays["failed_reasons"] = np.array([m for _, m in failed], dtype=str)
        if tap is not None:
            arrays.update({f"tap:{k}": v for k, v in tap.state().items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new checkpoint, never half
        self.last = done

    def clear(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


@dataclass(frozen=True)
class ChannelTop:
    """One channel's top-k, as read back from a result (for the renderer and tests)."""

    values: np.ndarray
    images: np.ndarray
    y: np.ndarray
    x: np.ndarray


def channel_top(result: Result, layer: str, channel: int, prefix: str = "") -> ChannelTop:
    """``prefix`` ``"old."`` reads the old model's top-k from a comparison build's result."""
    li = result.meta["layers"].index(layer)
    a = result.arrays
    valid = np.isfinite(a[f"{prefix}L{li}.values"][channel])  # fewer usable images than k leaves -inf slots
    pick = lambda key: a[f"{prefix}L{li}.{key}"][channel][valid]  # noqa: E731
    return ChannelTop(pick("values"), pick("images"), pick("y"), pick("x"))
