"""t-SNE of the penultimate codes (CS231n, "t-SNE visualization of CNN codes").

The code of an image is the input of the final classifier: by default the input of the model's last
``nn.Linear`` (in definition order), flattened.  All images are embedded, or a class-stratified
sample of ``tsne.max_points``; the codes go through PCA to ``tsne.pca_dims`` dimensions and then
t-SNE with a fixed seed, so a build is reproducible.

Besides the 2-D map the result holds how faithful it is: for every point, the fraction of its 10
nearest neighbours that share its class, in the map and in the original code space; and a square
image grid, each image of a stratified subset snapped to one cell by linear assignment.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from .. import progress
from ..config import TsneConfig
from ..context import BuildContext
from ..errors import ConfigError, LayerError
from ..hooks import get_module, model_guard
from ..model_loading import logits as class_scores
from ..planning import PassPlan, Probe, count
from .base import AnalysisPass, Result
from .sampling import labels_match_outputs, output_names, stratified_sample

NEIGHBOURS = 10
PROBE_POINTS = 64
"""Points the estimate embeds (with the configured iterations) to time t-SNE on this machine."""
PROBE_GRID = 256
"""Points the estimate snaps to a grid to time the assignment (cubic in the points)."""
FFT_FROM = 5000
"""openTSNE uses its FFT gradient from this many points on (bench/tsne_bench.py)."""
TOP = 5


def classifier_name(model: torch.nn.Module, configured: str) -> str | None:
    """The module whose input is the code: ``tsne.layer``, or else the last ``nn.Linear``."""
    if configured:
        try:
            get_module(model, configured)
        except LayerError:
            raise LayerError(f"config key 'tsne.layer' names {configured!r}, which is not a module of the model",
                             "name the classifier module (its input is the code), e.g. 'fc' or 'linear'") from None
        return configured
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def neighbour_agreement(points: np.ndarray, classes: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """For every point, the fraction of its ``k`` nearest other points (Euclidean) with its class."""
    n = len(points)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(n)
    _, ind = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    # Drop the point itself; with duplicate points it may not come first, so remove it by index.
    others = np.empty((n, k), dtype=np.int64)
    for i, row in enumerate(ind):
        rest = row[row != i]
        others[i] = rest[:k]
    return (classes[others] == classes[:, None]).mean(1)


def grid_assignment(xy: np.ndarray) -> tuple[int, np.ndarray]:
    """(side, cell of each point): the points, scaled to the unit square, each put in one cell of a
    side×side grid (side = ceil(sqrt(n))) so the summed squared distance to the cell centres is least."""
    n = len(xy)
    side = max(1, math.ceil(math.sqrt(n)))
    lo, hi = xy.min(0), xy.max(0)
    unit = (xy - lo) / np.where(hi > lo, hi - lo, 1.0)
    centres = (np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2) + 0.5) / side
    # Cell (r, c) is row r, column c: rows follow the map's y, columns its x.
    cost = ((unit[:, None, ::-1] - centres[None]) ** 2).sum(-1)
    rows, cells = linear_sum_assignment(cost)
    out = np.empty(n, dtype=np.int64)
    out[rows] = cells
    return side, out


def embed_seconds(probe: Probe, cfg: TsneConfig, n: int) -> float:
    """Estimated seconds of :func:`embed` on ``n`` points: timed on at most PROBE_POINTS random points
    of the PCA's dimension with the configured iterations (scikit-learn stops early once the
    embedding settles, which a run of fewer iterations would not show), scaled by n·log n.  Timed
    once per probe: the comparison's t-SNE of the old codes shares the measurement."""
    if n < 5:
        return 0.0
    m = min(n, PROBE_POINTS)
    x = np.random.default_rng(0).standard_normal((m, min(cfg.pca_dims, n)))
    t = probe.measure(f"tsne-embed:{m}x{x.shape[1]}:{cfg.method}:{cfg.iterations}:{cfg.perplexity}",
                      lambda: embed(x, cfg))
    return t * ((n * math.log(n)) / (m * math.log(m)) if n > m else 1.0)


def embed(x: np.ndarray, cfg: TsneConfig) -> tuple[np.ndarray, float]:
    """2-D t-SNE of ``x`` with the configured method and seed; also the perplexity used (t-SNE needs
    it below the number of points, so tiny sets get a smaller one)."""
    n = len(x)
    perplexity = float(min(cfg.perplexity, max(1.0, (n - 1) / 3)))
    if cfg.method == "opentsne":
        try:
            from openTSNE import TSNE as OpenTSNE
        except ImportError:
            raise ConfigError("config key 'tsne.method' is \"opentsne\" but openTSNE is not installed",
                              "pip install openTSNE, or use method = \"sklearn\"") from None
        # openTSNE counts the 250 early-exaggeration steps apart; scikit-learn's max_iter includes them.
        # One job: the same result on every machine (and the bench compares like with like).  Its
        # FFT-interpolated gradient is what can make it faster at scale ("auto" still picks Barnes-Hut
        # at 10,000 points); measured at 10,000 CIFAR codes on 2 cores, one thread: 39 s against 74 s
        # in one run, 57 s against 50 s in another (bench/results.json), so scikit-learn stays the default.
        emb = OpenTSNE(n_components=2, perplexity=perplexity, random_state=cfg.seed, initialization="pca",
                       early_exaggeration_iter=250, n_iter=cfg.iterations - 250, n_jobs=1,
                       negative_gradient_method="fft" if n >= FFT_FROM else "bh",
                       verbose=False).fit(x.astype(np.float64))
        return np.asarray(emb, dtype=np.float64), perplexity
    from sklearn.manifold import TSNE

    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
               max_iter=cfg.iterations, random_state=cfg.seed).fit_transform(x)
    return emb, perplexity


class TsnePass(AnalysisPass):
    name = "tsne"
    version = 1
    config: TsneConfig

    def run(self, ctx: BuildContext) -> Result:
        t0 = time.perf_counter()
        layer = classifier_name(ctx.net, self.config.layer)
        if layer is None:
            return Result(meta={"skipped": "the model has no nn.Linear classifier; set tsne.layer to the module "
                                           "whose input is the code"}, arrays={})
        labels = ctx.images.labels
        picked = stratified_sample(labels, self.config.max_points, self.config.seed)
        ids, codes, logits = self._codes(ctx, layer, picked.tolist())
        if len(ids) < 5:
            return Result(meta={"skipped": f"only {len(ids)} usable images; t-SNE needs at least 5"}, arrays={})
        probs = torch.from_numpy(logits).softmax(1)
        k = probs.shape[1]
        pred = probs.argmax(1).numpy()
        top = probs.topk(min(TOP, k), dim=1)
        # Colour (and judge neighbours) by the true class; without class folders, by the prediction.
        by_label = bool(ctx.images.classes)
        classes = labels[ids] if by_label else pred
        dims = min(self.config.pca_dims, codes.shape[1], len(ids))
        reduced = PCA(n_components=dims, random_state=self.config.seed).fit_transform(codes.astype(np.float64))
        t1 = time.perf_counter()
        with progress.bar("t-SNE", 1, "embeddings") as advance:
            xy, perplexity = embed(reduced, self.config)
            advance(1)
        t2 = time.perf_counter()
        agree_map = neighbour_agreement(xy, classes)
        agree_codes = neighbour_agreement(codes.astype(np.float64), classes)
        in_grid = stratified_sample(classes, self.config.grid_max, self.config.seed)
        side, cells = grid_assignment(xy[in_grid])
        t3 = time.perf_counter()
        names = output_names(ctx.images, k)
        per_class = [{"class": int(c), "count": int((classes == c).sum()),
                      "map": float(agree_map[classes == c].mean()), "codes": float(agree_codes[classes == c].mean())}
                     for c in np.unique(classes)]
        meta = {
            "layer": layer, "code_dims": int(codes.shape[1]), "pca_dims": int(dims), "points": len(ids),
            "of_images": len(ctx.images), "perplexity": perplexity, "seed": self.config.seed,
            "method": self.config.method, "neighbours": NEIGHBOURS, "grid_side": side,
            "colour_by": "label" if by_label else "prediction",
            "class_names": list(ctx.images.classes) if by_label else names, "output_names": names,
            "labels_match_outputs": labels_match_outputs(ctx.images, k),
            "agreement_map": float(agree_map.mean()), "agreement_codes": float(agree_codes.mean()),
            "per_class": per_class,
            "seconds": {"codes": round(t1 - t0, 3), "tsne": round(t2 - t1, 3), "after": round(t3 - t2, 3)},
        }
        arrays = {
            "images": np.array(ids, dtype=np.int64), "xy": xy.astype(np.float32),
            "classes": classes.astype(np.int64), "pred": pred.astype(np.int64),
            "top_classes": top.indices.numpy().astype(np.int64), "top_probs": top.values.numpy().astype(np.float32),
            "agree_map": agree_map.astype(np.float32), "agree_codes": agree_codes.astype(np.float32),
            "grid_points": in_grid.astype(np.int64), "grid_cells": cells,
        }
        return Result(meta=meta, arrays=arrays)

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """The codes (a whole forward per embedded image), then PCA, t-SNE and the image grid.  t-SNE is
        timed on random points of the same dimension (at most PROBE_POINTS of them, the configured
        iterations: scikit-learn stops early once the embedding settles, which a run of fewer
        iterations would not show) and scaled by n·log n; the neighbour agreement by n²; the grid's
        assignment on PROBE_GRID points, scaled by the cube of the points."""
        layer = classifier_name(ctx.net, self.config.layer)
        if layer is None:
            return PassPlan(self.name, 0.0, note="skipped: the model has no nn.Linear classifier")
        n = len(stratified_sample(ctx.images.labels, self.config.max_points, self.config.seed))
        seconds = probe.forward(None).batched(n, ctx.batch_size(0)) + n * probe.decode_seconds()
        work = {"images": n, "iterations": self.config.iterations}
        if n < 5:
            return PassPlan(self.name, seconds, work, f"{count(n)} codes (too few for t-SNE)")
        rng = np.random.default_rng(0)
        m = min(n, PROBE_POINTS)
        seconds += embed_seconds(probe, self.config, n)
        dims = int(getattr(get_module(ctx.net, layer), "in_features", 0) or 512)
        codes = rng.standard_normal((m, dims))
        classes = rng.integers(0, 10, m)
        t_nn = probe.time(lambda: neighbour_agreement(codes, classes))
        seconds += t_nn * (n / m) ** 2  # brute-force neighbours in the code space
        g = min(self.config.grid_max, n)
        gm = min(g, PROBE_GRID)
        t_grid = probe.time(lambda: grid_assignment(rng.standard_normal((gm, 2))))
        seconds += t_grid * (g / gm) ** 3
        return PassPlan(self.name, seconds, work,
                        f"{count(n)} codes, t-SNE {self.config.iterations} iterations")

    def _codes(self, ctx: BuildContext, layer: str, indices: list[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Codes (inputs of ``layer``) and logits of the decodable images among ``indices``."""
        seen: list[torch.Tensor] = []

        def keep_input(_module, inputs) -> None:
            seen.append(inputs[0].detach().flatten(1).float().cpu())

        ids: list[int] = []
        codes, logits = [], []
        handle = get_module(ctx.net, layer).register_forward_pre_hook(keep_input)
        try:
            with model_guard(ctx.net), torch.inference_mode(), \
                    progress.bar("codes for t-SNE", len(indices), "images") as advance:
                for b in ctx.batches(indices):
                    seen.clear()
                    out = class_scores(ctx.net(b.inputs)).float().cpu()
                    if not seen:
                        raise LayerError(f"the module {layer!r} did not run in a forward pass",
                                         "set tsne.layer to the classifier module (its input is the code)")
                    ok = b.ok
                    codes.append(seen[-1][ok])
                    logits.append(out[ok])
                    ids += [int(i) for i, good in zip(b.indices, ok) if good]
                    advance(len(b.indices))
        finally:
            handle.remove()
        if not ids:
            return [], np.zeros((0, 1)), np.zeros((0, 1))
        return ids, torch.cat(codes).numpy(), torch.cat(logits).numpy()
