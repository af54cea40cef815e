"""t-SNE of penultimate codes: determinism, the grid assignment, neighbour agreement by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from sitegen.config import TsneConfig, from_dict
from sitegen.context import BuildContext
from sitegen.errors import ConfigError, LayerError
from sitegen.hooks import model_guard
from sitegen.images import discover as discover_images
from sitegen.layers import discover as discover_layers
from sitegen.model_loading import LoadedModel
from sitegen.passes.sampling import stratified_sample
from sitegen.passes.tsne import TsnePass, classifier_name, grid_assignment, neighbour_agreement


class CodeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.hidden = nn.Linear(12, 6)  # not the classifier: the last Linear is
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.conv(x)).mean(dim=(2, 3)))))


def make_ctx(model: nn.Module, folder: Path, table: dict | None = None) -> BuildContext:
    cfg = from_dict(table or {})
    images = discover_images(folder)
    h, w = np.asarray(Image.open(images.path(0))).shape[:2]
    layers = discover_layers(model, (3, h, w))
    return BuildContext(config=cfg, model=LoadedModel(model, "0" * 64, "test", folder / "m.pt", None),
                        images=images, layers=layers, all_layers=layers, input_size=(h, w),
                        device=torch.device("cpu"), workers=0)


def test_neighbour_agreement_on_a_hand_made_example():
    # Two tight clusters on a line; point 3 (class 1) sits inside the class-0 cluster.
    pts = np.array([[0.0], [1.0], [2.0], [2.5], [10.0], [11.0], [12.5]])
    cls = np.array([0, 0, 0, 1, 1, 1, 1])
    got = neighbour_agreement(pts, cls, k=2)
    # Nearest two by hand: 0->{1,2}, 1->{2,0}, 2->{3,1}, 3->{2,1}, 4->{5,6}, 5->{4,6}, 6->{5,4}.
    np.testing.assert_allclose(got, [1, 1, 0.5, 0, 1, 1, 1])
    # Duplicates: the point itself is left out even when a twin comes first.
    dup = neighbour_agreement(np.array([[0.0], [0.0], [5.0]]), np.array([0, 1, 1]), k=1)
    np.testing.assert_allclose(dup, [0, 0, 0])


def test_grid_assignment_is_a_permutation_and_keeps_corners():
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(49, 2))
    side, cells = grid_assignment(xy)
    assert side == 7 and sorted(cells.tolist()) == list(range(49))
    # Fewer points than cells: one cell each, none shared.
    side, cells = grid_assignment(xy[:40])
    assert side == 7 and len(set(cells.tolist())) == 40 and cells.max() < 49
    # Points already on a grid land in their own cells (row = y, column = x).
    g = np.array([[x, y] for y in range(3) for x in range(3)], dtype=float)
    side, cells = grid_assignment(g)
    assert cells.tolist() == list(range(9))


def test_stratified_sample_keeps_class_shares_and_is_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    a = stratified_sample(labels, 20, seed=3)
    assert len(a) == 20 and np.bincount(labels[a]).tolist() == [12, 6, 2]
    assert a.tolist() == stratified_sample(labels, 20, seed=3).tolist()
    assert a.tolist() != stratified_sample(labels, 20, seed=4).tolist()
    assert stratified_sample(labels, 500, seed=0).tolist() == list(range(100))


def test_classifier_is_the_last_linear_and_configurable():
    net = CodeNet()
    assert classifier_name(net, "") == "head"
    assert classifier_name(net, "hidden") == "hidden"
    with pytest.raises(LayerError, match="tsne.layer"):
        classifier_name(net, "fc")


def test_pass_is_deterministic_for_a_seed_and_reads_the_classifier_input(tmp_path, make_images):
    make_images(tmp_path / "imgs", 45, size=12, classes=3)
    model = CodeNet()
    ctx = make_ctx(model, tmp_path / "imgs")
    cfg = TsneConfig(max_points=30, seed=5, grid_max=16, iterations=250)
    a = TsnePass(cfg).run(ctx)
    b = TsnePass(cfg).run(ctx)
    np.testing.assert_array_equal(a.arrays["xy"], b.arrays["xy"])
    c = TsnePass(TsneConfig(max_points=30, seed=6, grid_max=16, iterations=250)).run(ctx)
    assert not np.array_equal(a.arrays["xy"], c.arrays["xy"])
    ids = a.arrays["images"]
    assert len(ids) == 30 and np.bincount(ctx.images.labels[ids]).tolist() == [10, 10, 10]
    assert a.meta["layer"] == "head" and a.meta["code_dims"] == 6 and a.meta["pca_dims"] == 6
    assert a.meta["colour_by"] == "label" and a.arrays["classes"].tolist() == ctx.images.labels[ids].tolist()
    # The codes are the head's input: recompute them, and the agreement in code space, independently.
    x = torch.stack([torch.from_numpy(np.array(Image.open(ctx.images.path(int(i))))) for i in ids])
    from sitegen.images import normalise
    with model_guard(model), torch.no_grad():
        codes = torch.relu(model.hidden(torch.relu(model.conv(normalise(x, ctx.config.data))).mean(dim=(2, 3))))
        logits = model.head(codes)
    d = ((codes[:, None] - codes[None]) ** 2).sum(-1).numpy()
    np.fill_diagonal(d, np.inf)
    near = np.argsort(d, axis=1, kind="stable")[:, :10]
    labels = a.arrays["classes"]
    np.testing.assert_allclose(a.arrays["agree_codes"], (labels[near] == labels[:, None]).mean(1), atol=1e-6)
    assert a.arrays["pred"].tolist() == logits.argmax(1).tolist()
    assert a.meta["agreement_codes"] == pytest.approx(float(a.arrays["agree_codes"].mean()))
    # The grid: 16 of the 30 points, one cell each of a 4×4 grid.
    assert a.meta["grid_side"] == 4 and sorted(a.arrays["grid_cells"].tolist()) == list(range(16))
    assert len(set(a.arrays["grid_points"].tolist())) == 16


def test_model_without_linear_is_skipped_and_opentsne_missing_is_explained(tmp_path, make_images, monkeypatch):
    make_images(tmp_path / "imgs", 12, size=12)
    conv_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    result = TsnePass(TsneConfig()).run(make_ctx(conv_only, tmp_path / "imgs"))
    assert "tsne.layer" in result.meta["skipped"] and not result.arrays
    import builtins
    real_import = builtins.__import__

    def no_opentsne(name, *args, **kwargs):
        if name.startswith("openTSNE"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_opentsne)
    with pytest.raises(ConfigError, match="openTSNE"):
        TsnePass(TsneConfig(method="opentsne")).run(make_ctx(CodeNet(), tmp_path / "imgs"))


def test_opentsne_method_is_seeded_and_agrees_in_shape():
    pytest.importorskip("openTSNE")  # optional: pip install openTSNE
    from sitegen.passes.tsne import embed

    x = np.random.default_rng(0).normal(size=(60, 8))
    a, perplexity = embed(x, TsneConfig(method="opentsne", iterations=300, seed=1))
    b, _ = embed(x, TsneConfig(method="opentsne", iterations=300, seed=1))
    assert a.shape == (60, 2) and np.array_equal(a, b)
    assert perplexity == pytest.approx(59 / 3)  # below the point count: (n - 1) / 3
