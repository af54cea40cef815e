"""Comparing two checkpoints of one architecture: what changed from an earlier model (the *old*
one, ``compare.checkpoint``, ``--compare``) to the model of the atlas (the *new* one).

Three passes, run in a comparison build only:

- :class:`CompareTopKPass` is that build's dataset pass: its result is the atlas's ``topk``.  Each
  batch is decoded once and fed to both models, each with reducers of its own, so the new model's
  top-k and statistics are exactly those of the one-model pass and the old model's come from the
  same read.  A :class:`CompareTap` reads from the same batches, for both models, each channel's
  per-image maximum on a fixed, seeded sample of at most ``compare.sample`` images, the penultimate
  codes of the t-SNE sample, and the predictions, kept as per-class counts plus the images whose
  prediction changed: memory stays flat in the number of images.
- :class:`OldFeatureVisPass`: feature visualisation of the old model's channels (same seeds and
  settings as the new model's, so the two images of a channel start from the same noise).
- :class:`ComparePass` computes the figures from those arrays: per channel the Jaccard overlap of the
  two top-k image sets and the Pearson correlation of the per-image maxima; the channels that died
  or came alive; per layer the matching of new channels to old ones, identity against the best
  one-to-one matching by linear assignment on the correlation matrix (Li et al., "Convergent
  Learning", ICLR 2016); per-class accuracy under both; and the share of each image's 10 nearest
  neighbours that the two code spaces have in common, with a t-SNE map of the old codes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from .. import progress
from ..config import CompareConfig, FeatureVisConfig, TopKConfig, TsneConfig
from ..context import BuildContext
from ..errors import ModelLoadError, SitegenError
from ..hooks import get_module
from ..model_loading import logits as class_scores
from ..planning import Fit, PassPlan, Probe, count
from .base import AnalysisPass, Result
from .featurevis import FeatureVisPass
from .sampling import labels_match_outputs, output_names, stratified_sample
from .topk import Checkpoint, Tap, TopKPass, _merge_ranks
from .tsne import NEIGHBOURS, classifier_name, embed

SAME = 1e-9
"""Figures within this of 1 count as unchanged (float rounding of identical inputs)."""
PROBE_SAMPLE = 512
"""Images of random maxima the comparison's estimate times the correlation matrix on."""


def old_identity(ctx: BuildContext) -> dict[str, Any]:
    """What the old model's results depend on besides the new model's: its weights and architecture."""
    if ctx.compare is None:
        raise SitegenError("a comparison pass ran without the checkpoint to compare with",
                           "give --compare OLD.pt (or compare.checkpoint in the config)")
    return {"old_weights": ctx.compare.weights_hash, "old_arch": ctx.compare.arch}


def _extend(base: str, extra: dict[str, Any]) -> str:
    blob = json.dumps(extra, sort_keys=True, default=str)
    return hashlib.sha256(f"{base}\0{blob}".encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _sample_key(cfg: CompareConfig) -> dict[str, Any]:
    """The compare settings a result depends on (not the checkpoint's path: its weights hash is in)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint"}


def old_context(ctx: BuildContext) -> BuildContext:
    """The build context with the old model in the new one's place (same images, layers, device)."""
    old_identity(ctx)
    return dataclasses.replace(ctx, model=ctx.compare, compare=None)


# ---------------------------------------------------------------- the dataset pass of both models


class CompareTap(Tap):
    """Per-image figures of both models (model 0 the new one, 1 the old one), from the batches of
    the dataset pass: the channel maxima of the sample images, the codes of the t-SNE sample, and
    the predictions (per-class counts, and the images whose top class differs between the two)."""

    full_forward = True  # the predictions need each model's output

    def __init__(self, ctx: BuildContext, names: list[str], sample: np.ndarray, code_images: np.ndarray,
                 classifier: str | None):
        n = len(ctx.images)
        self.names = names
        self.labels = torch.from_numpy(ctx.images.labels)
        self.n_labels = max(len(ctx.images.classes), 1)
        self.sample = np.asarray(sample, dtype=np.int64)
        self.sample_row = torch.full((n,), -1, dtype=torch.int64)
        self.sample_row[torch.from_numpy(self.sample)] = torch.arange(len(self.sample))
        self.maxima = [{name: np.zeros((len(self.sample), ctx.layer(name).channels), np.float32) for name in names}
                       for _ in range(2)]
        self.sample_seen = np.zeros(len(self.sample), np.int8)
        """0 not yet read, 1 read, 2 could not be decoded."""
        self.code_images = np.asarray(code_images, dtype=np.int64)
        self.code_row = torch.full((n,), -1, dtype=torch.int64)
        self.code_row[torch.from_numpy(self.code_images)] = torch.arange(len(self.code_images))
        self.codes: list[np.ndarray | None] = [None, None]
        self.codes_seen = np.zeros(len(self.code_images), np.int8)
        self.classifier = classifier
        self.codes_reason = "" if classifier else \
            "the model has no nn.Linear classifier; set tsne.layer to the module whose input is the code"
        self._code_batch: list[torch.Tensor | None] = [None, None]
        self.pred_reason = ""
        self.outputs = 0
        self.total = np.zeros(self.n_labels, np.int64)
        self.correct = np.zeros((2, self.n_labels), np.int64)
        self.counted = 0
        self._changed: list[np.ndarray] = []
        self._changed_prob: list[np.ndarray] = []
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- hooks and batches

    def attach(self, j: int, net: torch.nn.Module) -> list:
        if not self.classifier:
            return []

        def keep_code(_module, inputs) -> None:
            self._code_batch[j] = inputs[0].detach().flatten(1).float()

        return [get_module(net, self.classifier).register_forward_pre_hook(keep_code)]

    def batch(self, j: int, batch, reducers: dict, output) -> None:
        ids, ok = batch.indices, batch.ok
        rows = self.sample_row[ids]
        sel = rows >= 0
        if bool(sel.any()):
            r = rows[sel].numpy()
            for name in self.names:
                last = reducers[name].last
                self.maxima[j][name][r] = last[sel.to(last.device)].float().cpu().numpy()
            if j == 0:
                self.sample_seen[r] = np.where(ok[sel].numpy(), 1, 2)
        self._keep_codes(j, ids, ok)
        self._keep_predictions(j, ids, ok, output)

    def _keep_codes(self, j: int, ids: torch.Tensor, ok: torch.Tensor) -> None:
        code, self._code_batch[j] = self._code_batch[j], None
        if self.codes_reason:
            return
        if code is None:
            self.codes_reason = f"the module {self.classifier!r} did not run in a forward pass; set tsne.layer " \
                                "to the classifier module (its input is the code)"
            return
        rows = self.code_row[ids]
        sel = rows >= 0
        if not bool(sel.any()):
            return
        if self.codes[j] is None:
            self.codes[j] = np.zeros((len(self.code_images), code.shape[1]), np.float32)
        self.codes[j][rows[sel].numpy()] = code[sel.to(code.device)].cpu().numpy()
        if j == 0:
            self.codes_seen[rows[sel].numpy()] = np.where(ok[sel].numpy(), 1, 2)

    def _keep_predictions(self, j: int, ids: torch.Tensor, ok: torch.Tensor, output) -> None:
        if self.pred_reason:
            return
        try:
            scores = class_scores(output).float()
        except ModelLoadError as e:
            self.pred_reason = e.message
            return
        self.outputs = int(scores.shape[1])
        prob, top = scores.softmax(1).max(1)
        prob, top = prob.cpu(), top.cpu()
        if j == 0:
            self._first = (top, prob)
            return
        new_top, new_prob = self._first
        self._first = None
        good = ok.numpy()
        labels = self.labels[ids].numpy()
        labelled = good & (labels >= 0)
        self.counted += int(good.sum())
        self.total += np.bincount(labels[labelled], minlength=self.n_labels)[: self.n_labels]
        for m, t in enumerate((new_top.numpy(), top.numpy())):
            hit = labelled & (t == labels)
            self.correct[m] += np.bincount(labels[hit], minlength=self.n_labels)[: self.n_labels]
        changed = good & (new_top.numpy() != top.numpy())
        if changed.any():
            self._changed.append(np.stack([ids.numpy()[changed], new_top.numpy()[changed], top.numpy()[changed]], 1))
            self._changed_prob.append(np.stack([new_prob.numpy()[changed], prob.numpy()[changed]], 1))

    # -- checkpoints and ranks

    def changed(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.concatenate(self._changed) if self._changed else np.zeros((0, 3), np.int64)
        probs = np.concatenate(self._changed_prob) if self._changed_prob else np.zeros((0, 2), np.float32)
        order = np.argsort(rows[:, 0], kind="stable")
        return rows[order].astype(np.int64), probs[order].astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        rows, probs = self.changed()
        out = {f"maxima.{j}.{li}": self.maxima[j][n] for j in range(2) for li, n in enumerate(self.names)}
        out.update({"sample_seen": self.sample_seen, "codes_seen": self.codes_seen, "total": self.total,
                    "correct": self.correct, "counted": np.array([self.counted]), "changed": rows,
                    "changed_prob": probs, "outputs": np.array([self.outputs]),
                    "reasons": np.array([self.codes_reason, self.pred_reason], dtype=str)})
        for j in range(2):
            if self.codes[j] is not None:
                out[f"codes.{j}"] = self.codes[j]
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for j in range(2):
            for li, n in enumerate(self.names):
                self.maxima[j][n] = arrays[f"maxima.{j}.{li}"].astype(np.float32)
            self.codes[j] = arrays[f"codes.{j}"].astype(np.float32) if f"codes.{j}" in arrays else None
        self.sample_seen, self.codes_seen = arrays["sample_seen"].astype(np.int8), arrays["codes_seen"].astype(np.int8)
        self.total, self.correct = arrays["total"].astype(np.int64), arrays["correct"].astype(np.int64)
        self.counted, self.outputs = int(arrays["counted"][0]), int(arrays["outputs"][0])
        self._changed, self._changed_prob = [arrays["changed"].astype(np.int64)], [arrays["changed_prob"]]
        self.codes_reason, self.pred_reason = (str(x) for x in arrays["reasons"])

    def merge_ranks(self) -> None:
        """Every rank read its own shard: sum the per-image arrays (each row was filled by one rank
        alone, the others left zeros) and the counts, and gather the changed images."""
        from .. import distributed as d

        def total(a: np.ndarray) -> np.ndarray:
            return d.all_reduce(torch.from_numpy(np.ascontiguousarray(a))).numpy()

        for j in range(2):
            for n in self.names:
                self.maxima[j][n] = total(self.maxima[j][n])
        self.sample_seen = total(self.sample_seen.astype(np.int64)).astype(np.int8)
        dims = int(d.all_reduce(torch.tensor([max((c.shape[1] for c in self.codes if c is not None), default=0)]),
                                op=d.dist.ReduceOp.MAX)[0])
        for j in range(2):
            mine = self.codes[j] if self.codes[j] is not None else np.zeros((len(self.code_images), dims), np.float32)
            self.codes[j] = total(mine) if dims else None
        self.codes_seen = total(self.codes_seen.astype(np.int64)).astype(np.int8)
        self.total, self.correct = total(self.total), total(self.correct)
        self.counted = int(total(np.array([self.counted]))[0])
        self.outputs = int(d.all_reduce(torch.tensor([self.outputs]), op=d.dist.ReduceOp.MAX)[0])
        parts = d.all_gather_objects(self.changed())
        self._changed = [p[0] for p in parts]
        self._changed_prob = [p[1] for p in parts]
        reasons = d.all_gather_objects((self.codes_reason, self.pred_reason))
        self.codes_reason = next((r[0] for r in reasons if r[0]), "")
        self.pred_reason = next((r[1] for r in reasons if r[1]), "")

    def arrays(self) -> dict[str, np.ndarray]:
        """The result's per-image arrays (``sample.*``, ``codes.*``, ``pred.*``)."""
        out: dict[str, np.ndarray] = {"sample.images": self.sample, "sample.ok": self.sample_seen == 1}
        for j, who in enumerate(("new", "old")):
            for li, n in enumerate(self.names):
                out[f"sample.{who}.L{li}"] = self.maxima[j][n]
        if not self.codes_reason and self.codes[0] is not None and self.codes[1] is not None:
            out.update({"codes.images": self.code_images, "codes.ok": self.codes_seen == 1,
                        "codes.new": self.codes[0], "codes.old": self.codes[1]})
        if not self.pred_reason:
            rows, probs = self.changed()
            out.update({"pred.total": self.total, "pred.correct": self.correct, "pred.counted": np.array([self.counted]),
                        "pred.changed": rows, "pred.changed_prob": probs})
        return out


class CompareTopKPass(TopKPass):
    """The dataset pass of a comparison build: the new model's top-k (the atlas's own, under the usual
    keys ``L{i}.*``), the old model's (``old.L{i}.*``), and the :class:`CompareTap`'s arrays, from one
    read of the images."""

    name = "topk"
    version = 1

    def __init__(self, config: TopKConfig, compare: CompareConfig, tsne: TsneConfig):
        super().__init__(config)
        self.compare = compare
        self.tsne = tsne

    def cache_key(self, ctx: BuildContext) -> str:
        return _extend(super().cache_key(ctx), {
            "comparison": self.version, "topk_version": TopKPass.version, **old_identity(ctx),
            "compare": _sample_key(self.compare),
            "codes": {"layer": self.tsne.layer, "max_points": self.tsne.max_points, "seed": self.tsne.seed},
        })

    def _probe_fit(self, ctx: BuildContext, probe: Probe, names: list[str], batch: int) -> Fit:
        """This pass's stream timed as it runs: each batch decoded once and fed to both models, whole
        forwards (the predictions and the codes need the outputs), the tap reading from both."""
        old_identity(ctx)
        have = max(1, len(ctx.images))
        classifier = classifier_name(ctx.net, self.tsne.layer)

        def run(m: int) -> None:
            ids = sorted(i % have for i in range(m))
            tap = CompareTap(ctx, names, np.unique(ids), np.unique(ids), classifier)
            self._stream_nets(ctx, [ctx.net, ctx.compare.model], names, ids, None, None, "probe", tap)

        return probe.fit("topk:both models", run, cap=batch)

    def _probe_words(self, names: list[str]) -> str:
        return "whole forwards of both models"

    def run(self, ctx: BuildContext) -> Result:
        old_identity(ctx)  # a clear error when the old model is missing
        old = ctx.compare
        names = [l.name for l in ctx.layers]
        labels = ctx.images.labels
        sample = stratified_sample(labels, self.compare.sample, self.compare.seed)
        code_images = stratified_sample(labels, self.tsne.max_points, self.tsne.seed)
        tap = CompareTap(ctx, names, sample, code_images, classifier_name(ctx.net, self.tsne.layer))
        shard = list(ctx.dist.shard(len(ctx.images)))
        dtype, agreement = self._choose_precision(ctx, names, shard)
        ckpt = Checkpoint(ctx.scratch, ctx.dist.rank, self.config.checkpoint_every,
                          (ctx.dist.world, shard[0] if shard else 0, len(shard)))
        (new, older), failed = self._stream_nets(ctx, [ctx.net, old.model], names, shard, dtype, ckpt,
                                                 "dataset pass (both models)", tap)
        if ctx.dist.active:
            failed = _merge_ranks(new, failed, self.config.k)
            _merge_ranks(older, [], self.config.k)
            tap.merge_ranks()
        ckpt.clear()
        failed = sorted(failed)
        result = self._result(ctx, names, new, failed)
        for key, arr in self._result(ctx, names, older, failed).arrays.items():
            if key != "failed":
                result.arrays[f"old.{key}"] = arr
        result.arrays.update(tap.arrays())
        result.meta["precision"] = {"used": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
                                    "requested": self.config.precision, "agreement": agreement}
        result.meta["compare"] = {
            "checkpoint": old.path.name, "weights_sha256": old.weights_hash, "classifier": tap.classifier,
            "codes_reason": tap.codes_reason, "predictions_reason": tap.pred_reason, "outputs": tap.outputs,
        }
        for reason in (tap.codes_reason, tap.pred_reason):
            if reason:
                progress.info(f"warning: comparison: {reason}")
        return result


class OldFeatureVisPass(FeatureVisPass):
    """Feature visualisation of the old model's channels: the feature-vis pass run on the old model
    (its cache entry keyed by the old weights)."""

    name = "featurevis_old"

    def __init__(self, config: FeatureVisConfig):
        # One image per channel; the class images are the new model's alone.
        super().__init__(dataclasses.replace(config, classes=False))

    def cache_key(self, ctx: BuildContext) -> str:
        return super().cache_key(old_context(ctx))

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """The feature-vis estimate for the old model (the same architecture and settings, no class
        images): the ascents the probe timed for the new model stand for the old one's."""
        return super().plan(old_context(ctx), probe)

    def run(self, ctx: BuildContext) -> Result:
        return super().run(old_context(ctx))


# ---------------------------------------------------------------- the figures


def topk_overlap(a_images: np.ndarray, a_valid: np.ndarray, b_images: np.ndarray,
                 b_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (channel): images the two top-k sets share, and their Jaccard overlap
    |A ∩ B| / |A ∪ B| (1 when both are empty).  Rows hold distinct image indices; slots that are not
    ``valid`` (fewer usable images than k) are left out."""
    same = (a_images[:, :, None] == b_images[:, None, :]) & a_valid[:, :, None] & b_valid[:, None, :]
    shared = same.any(2).sum(1)
    union = a_valid.sum(1) + b_valid.sum(1) - shared
    jaccard = np.where(union > 0, shared / np.maximum(union, 1), 1.0)
    return shared.astype(np.int64), jaccard.astype(np.float64)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Ca, Cb) Pearson correlations between the columns of ``a`` (n, Ca) and ``b`` (n, Cb), in
    float64.  A column without variance (a channel with one value on every image, e.g. a dead one)
    correlates with nothing (0), except with a column of the very same constant (1): a channel
    that stays the same has not changed."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = len(a)
    if n == 0:
        return np.zeros((a.shape[1], b.shape[1]))
    da, db = a - a.mean(0), b - b.mean(0)
    sa, sb = np.sqrt((da * da).sum(0)), np.sqrt((db * db).sum(0))
    flat_a, flat_b = np.ptp(a, axis=0) == 0, np.ptp(b, axis=0) == 0
    za = np.where(flat_a, 0.0, da / np.where(flat_a, 1.0, sa))
    zb = np.where(flat_b, 0.0, db / np.where(flat_b, 1.0, sb))
    corr = np.clip(za.T @ zb, -1.0, 1.0)
    both = flat_a[:, None] & flat_b[None, :]
    if both.any():
        corr[both] = (a[0][:, None] == b[0][None, :])[both].astype(np.float64)
    return corr


def best_matching(corr: np.ndarray) -> np.ndarray:
    """For each new channel (row), the old channel (column) of the one-to-one matching with the
    largest summed correlation (linear assignment; equal sums keep the identity)."""
    c = corr.shape[0]
    if c == 0:
        return np.zeros(0, np.int64)
    cost = -corr - SAME * np.eye(c, corr.shape[1])  # exact ties prefer the channel's own index
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(c, np.int64)
    out[rows] = cols
    return out


def nearest(points: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each point's k nearest other points (Euclidean)."""
    n = len(points)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), np.int64)
    _, ind = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    out = np.empty((n, k), np.int64)
    for i, row in enumerate(ind):  # drop the point itself (with duplicates it may not come first)
        out[i] = row[row != i][:k]
    return out


def shared_neighbours(a: np.ndarray, b: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """For each point, the fraction of its k nearest neighbours in code space ``a`` that are also
    among its k nearest in code space ``b`` (the same points, in the same order)."""
    na, nb = nearest(np.asarray(a, np.float64), k), nearest(np.asarray(b, np.float64), k)
    if na.shape[1] == 0:
        return np.ones(len(a))
    same = (na[:, :, None] == nb[:, None, :]).any(2).sum(1)
    return same / na.shape[1]


def align(xy: np.ndarray, to: np.ndarray) -> np.ndarray:
    """``xy`` rotated, reflected, scaled and moved to lie as close as possible to ``to`` (orthogonal
    Procrustes): two t-SNE maps come out in arbitrary orientations, this puts them side by side."""
    a, b = xy - xy.mean(0), to - to.mean(0)
    if not np.any(a) or not np.any(b):
        return xy
    rot, scale = orthogonal_procrustes(a, b)
    return a @ rot * (scale / float((a * a).sum())) + to.mean(0)


class ComparePass(AnalysisPass):
    """The comparison's figures, from the arrays of :class:`CompareTopKPass` (``results["topk"]``)
    and the t-SNE pass's map."""

    name = "compare"
    version = 2
    config: CompareConfig

    def __init__(self, config: CompareConfig, topk: TopKConfig, tsne: TsneConfig):
        super().__init__(config)
        self.topk = topk
        self.tsne = tsne

    def cache_key(self, ctx: BuildContext) -> str:
        payload = {"pass": self.name, "version": self.version, "compare": _sample_key(self.config),
                   "topk": dataclasses.asdict(self.topk), "tsne": dataclasses.asdict(self.tsne),
                   "dataset_pass": CompareTopKPass.version, **ctx.identity(), **old_identity(ctx)}
        blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8", "surrogateescape")
        return hashlib.sha256(blob).hexdigest()[:24]

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """Per layer, the correlation matrix of the channels' maxima over the sample (``S × C × C``),
        the linear assignment on it (about ``C³``) and the top-k overlaps: the first two timed on
        random maxima of the widest layer (at most PROBE_SAMPLE images, scaled to the sample) and
        scaled to the other widths; then the codes' shared neighbours (timed on at most 64 points,
        scaled by n²) and the t-SNE of the old codes (the t-SNE estimate's own measurement)."""
        from .tsne import PROBE_POINTS, embed_seconds

        names = [l.name for l in ctx.layers]
        widths = [ctx.layer(n).channels for n in names]
        sample = len(stratified_sample(ctx.images.labels, self.config.sample, self.config.seed))
        rng = np.random.default_rng(0)
        seconds = 0.0
        if widths and sample:
            c = max(widths)
            s = max(2, min(sample, PROBE_SAMPLE))
            a = rng.standard_normal((s, c)).astype(np.float32)
            b = (a + rng.standard_normal((s, c)).astype(np.float32)).astype(np.float32)
            k = max(1, min(self.topk.k, len(ctx.images)))
            ia, ib = rng.integers(0, len(ctx.images), (c, k)), rng.integers(0, len(ctx.images), (c, k))
            valid = np.ones((c, k), bool)
            holder: dict[str, np.ndarray] = {}
            t_corr = probe.measure(f"compare-corr:{s}x{c}", lambda: holder.update(corr=correlation_matrix(a, b)))
            corr = holder.get("corr")
            corr = correlation_matrix(a, b) if corr is None else corr
            t_match = probe.measure(f"compare-match:{c}", lambda: best_matching(corr))
            t_overlap = probe.measure(f"compare-overlap:{c}x{k}", lambda: topk_overlap(ia, valid, ib, valid))
            for w in widths:
                seconds += t_corr * (sample / s) * (w / c) ** 2 + t_match * (w / c) ** 3 + t_overlap * w / c
        codes = classifier_name(ctx.net, self.tsne.layer)
        points = len(stratified_sample(ctx.images.labels, self.tsne.max_points, self.tsne.seed)) if codes else 0
        if points >= 2:
            m = min(points, PROBE_POINTS)
            dims = int(getattr(get_module(ctx.net, codes), "in_features", 0) or 512)
            x, y = rng.standard_normal((m, dims)), rng.standard_normal((m, dims))
            seconds += probe.measure(f"compare-neighbours:{m}x{dims}", lambda: shared_neighbours(x, y)) * (points / m) ** 2
            if ctx.config.tsne.enabled:
                seconds += embed_seconds(probe, self.tsne, points)
        return PassPlan(self.name, seconds, {"layers": len(names), "sample": sample, "points": points},
                        f"{len(names)} layers × {count(sample)} sampled images")

    def run(self, ctx: BuildContext) -> Result:
        top = ctx.results["topk"]
        if "sample.images" not in top.arrays:
            raise SitegenError("the comparison's figures need the dataset pass of both models",
                               "this is a bug in sitegen; rerun with --no-cache and report it")
        old = ctx.compare
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {
            "old": {"checkpoint": old.path.name, "weights_sha256": old.weights_hash},
            "new": {"checkpoint": ctx.model.path.name, "weights_sha256": ctx.model.weights_hash},
            "same_file": old.weights_hash == ctx.model.weights_hash,
            "k": int(top.meta["k"]),
        }
        ok = top.arrays["sample.ok"]
        meta["sample"] = {"images": int(ok.sum()), "of": len(ctx.images), "seed": self.config.seed}
        layers = []
        with progress.bar("comparing channels", len(ctx.layers), "layers") as advance:
            for li, info in enumerate(ctx.layers):
                layers.append(self._layer(top, li, info.name, ok, arrays))
                advance(1)
        layers_ranked = sorted(range(len(layers)), key=lambda i: (-layers[i]["change"], i))
        meta["layers"] = layers
        meta["ranking"] = [layers[i]["name"] for i in layers_ranked]
        meta["predictions"] = self._predictions(ctx, top, arrays)
        meta["codes"] = self._codes(ctx, top, arrays)
        meta["nothing_changed"] = (
            all(l["unchanged"] for l in layers)
            and meta["predictions"].get("changed", 0) == 0
            and meta["codes"].get("shared_mean", 1.0) >= 1 - SAME)
        return Result(meta=meta, arrays=arrays)

    def _layer(self, top: Result, li: int, name: str, ok: np.ndarray, arrays: dict) -> dict[str, Any]:
        a = top.arrays
        new_valid, old_valid = np.isfinite(a[f"L{li}.values"]), np.isfinite(a[f"old.L{li}.values"])
        shared, jaccard = topk_overlap(a[f"L{li}.images"], new_valid, a[f"old.L{li}.images"], old_valid)
        corr = correlation_matrix(a[f"sample.new.L{li}"][ok], a[f"sample.old.L{li}"][ok])
        identity = np.diag(corr).copy()
        match = best_matching(corr)
        match_corr = corr[np.arange(len(match)), match]
        dead_new, dead_old = a[f"L{li}.max"] <= 0, a[f"old.L{li}.max"] <= 0
        change = 1.0 - identity
        arrays.update({f"L{li}.shared": shared, f"L{li}.jaccard": jaccard, f"L{li}.corr": identity,
                       f"L{li}.match": match, f"L{li}.match_corr": match_corr,
                       f"L{li}.dead_new": dead_new, f"L{li}.dead_old": dead_old,
                       f"L{li}.change": change})
        c = len(identity)
        moved = int((match != np.arange(c)).sum())
        mean_identity = float(identity.mean()) if c else 1.0
        mean_matched = float(match_corr.mean()) if c else 1.0
        ranked = np.lexsort((np.arange(c), jaccard, -change))  # most changed first; ties: lower overlap, index
        return {
            "name": name, "channels": c,
            "change": float(change.mean()) if c else 0.0,
            "mean_jaccard": float(jaccard.mean()) if c else 1.0,
            "mean_correlation": mean_identity,
            "matched_correlation": mean_matched,
            "fits": "identity" if moved == 0 or mean_matched <= mean_identity + SAME else "matching",
            "moved": moved,
            "newly_dead": [int(i) for i in np.flatnonzero(dead_new & ~dead_old)],
            "newly_alive": [int(i) for i in np.flatnonzero(~dead_new & dead_old)],
            "dead_both": int((dead_new & dead_old).sum()),
            "most_changed": [int(i) for i in ranked[: self.config.channels]],
            "unchanged": bool(c == 0 or (jaccard.min() >= 1 - SAME and identity.min() >= 1 - SAME
                                         and not (dead_new != dead_old).any())),
        }

    def _predictions(self, ctx: BuildContext, top: Result, arrays: dict) -> dict[str, Any]:
        reason = top.meta["compare"]["predictions_reason"]
        if reason or "pred.changed" not in top.arrays:
            return {"available": False, "reason": reason or "the models' outputs were not read"}
        a = top.arrays
        outputs = int(top.meta["compare"]["outputs"])
        counted = int(a["pred.counted"][0])
        rows, probs = a["pred.changed"], a["pred.changed_prob"]
        listed = np.arange(len(rows))
        if len(rows) > self.config.changed_images:  # evenly spread over the changed images
            listed = np.unique(np.linspace(0, len(rows) - 1, self.config.changed_images).round().astype(np.int64)) \
                if self.config.changed_images else np.zeros(0, np.int64)
        arrays.update({"pred.changed": rows, "pred.changed_prob": probs, "pred.listed": listed})
        names = output_names(ctx.images, outputs)
        out: dict[str, Any] = {"available": True, "images": counted, "changed": int(len(rows)),
                               "listed": int(len(listed)), "outputs": outputs, "output_names": names}
        if labels_match_outputs(ctx.images, outputs):
            total, correct = a["pred.total"], a["pred.correct"]
            out["per_class"] = [{"class": names[c], "images": int(total[c]),
                                 "new": float(correct[0, c] / total[c]) if total[c] else None,
                                 "old": float(correct[1, c] / total[c]) if total[c] else None}
                                for c in range(len(total))]
            n = int(total.sum())
            out["accuracy"] = {"images": n, "new": float(correct[0].sum() / n) if n else None,
                               "old": float(correct[1].sum() / n) if n else None}
        else:
            out["accuracy_reason"] = ("the images have no class folders" if not ctx.images.classes else
                                      f"the images have {len(ctx.images.classes)} class folders but the model "
                                      f"{outputs} outputs, so folders cannot be read as the model's classes")
        return out

    def _codes(self, ctx: BuildContext, top: Result, arrays: dict) -> dict[str, Any]:
        reason = top.meta["compare"]["codes_reason"]
        if reason or "codes.new" not in top.arrays:
            return {"available": False, "reason": reason or "no codes were read"}
        a = top.arrays
        ok = a["codes.ok"]
        ids = a["codes.images"][ok]
        new, old = a["codes.new"][ok], a["codes.old"][ok]
        shared = shared_neighbours(new, old)
        labels = ctx.images.labels[ids]
        arrays.update({"codes.images": ids, "codes.shared": shared.astype(np.float32)})
        # Each image's neighbours: NEIGHBOURS, or every other image when there are fewer.
        out: dict[str, Any] = {"available": True, "points": int(len(ids)),
                               "neighbours": min(NEIGHBOURS, max(len(ids) - 1, 0)),
                               "classifier": top.meta["compare"]["classifier"],
                               "shared_mean": float(shared.mean()) if len(shared) else 1.0}
        if ctx.images.classes:
            out["per_class"] = [{"class": ctx.images.classes[c], "points": int((labels == c).sum()),
                                 "shared": float(shared[labels == c].mean())}
                                for c in np.unique(labels) if c >= 0]
        out["map"] = self._old_map(ctx, ids, old, arrays)
        return out

    def _old_map(self, ctx: BuildContext, ids: np.ndarray, old: np.ndarray, arrays: dict) -> dict[str, Any]:
        """The old codes' t-SNE map (the t-SNE pass's settings), turned to lie over the new map."""
        t = ctx.results.get("tsne")
        if t is None:
            return {"available": False, "reason": "t-SNE is off (tsne.enabled = false)"}
        if "skipped" in t.meta:
            return {"available": False, "reason": t.meta["skipped"]}
        where = {int(n): j for j, n in enumerate(ids)}
        points = [int(n) for n in t.arrays["images"] if int(n) in where]
        if len(points) < 5 or len(points) != len(t.arrays["images"]):
            return {"available": False, "reason": "the t-SNE map and the compared codes hold different images"}
        rows = np.array([where[n] for n in points])
        codes = old[rows].astype(np.float64)
        dims = min(self.tsne.pca_dims, codes.shape[1], len(codes))
        reduced = PCA(n_components=dims, random_state=self.tsne.seed).fit_transform(codes)
        with progress.bar("t-SNE of the old codes", 1, "embeddings") as advance:
            xy, _ = embed(reduced, self.tsne)
            advance(1)
        arrays["tsne.old_xy"] = align(xy, t.arrays["xy"].astype(np.float64)).astype(np.float32)
        arrays["tsne.rows"] = rows  # row in codes.* of each t-SNE point
        return {"available": True, "points": len(points)}
