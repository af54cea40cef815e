"""The embedded demo: digit images, deterministic training and the cached checkpoint.

One full training runs per test session (module-scoped fixture); the determinism test trains a
tiny budget twice instead, so the suite stays well under a minute on two CPU cores.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from sklearn.datasets import load_digits
from torchvision.models.resnet import BasicBlock

from sitegen import demo


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    assert demo.write_images(folder) == demo.NUM_IMAGES
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoAssets:
    """The real thing: images written and the ResNet trained once for the whole module."""
    messages: list[str] = []
    found = demo.ensure_demo_assets(tmp_path_factory.mktemp("cache") / "demo", progress=messages.append)
    assert any("epoch" in m for m in messages)
    return found


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# --- images -------------------------------------------------------------------------------------


def test_images_have_imagefolder_layout_size_and_mode(digits_folder: Path):
    digits = load_digits()
    pngs = sorted(digits_folder.rglob("*.png"))
    assert len(pngs) == demo.NUM_IMAGES == len(digits.images)
    assert sorted(p.name for p in digits_folder.iterdir()) == list(demo.CLASSES)
    indices = sorted(int(p.stem) for p in pngs)
    assert indices == list(range(demo.NUM_IMAGES))
    for p in pngs:
        assert p.name == f"{int(p.stem):04d}.png"
        assert p.parent.name == str(digits.target[int(p.stem)])
    for p in pngs[::97]:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)


@pytest.mark.parametrize("index", [0, 1000, 1796])
def test_image_matches_the_source_digit(digits_folder: Path, index: int):
    digits = load_digits()
    path = digits_folder / str(digits.target[index]) / f"{index:04d}.png"
    rgb = np.asarray(Image.open(path), dtype=np.int16)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # grey
    # Averaging 4×4 blocks undoes the upscaling up to the blur of the bicubic kernel.
    small = rgb[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    expected = digits.images[index] * (255.0 / 16.0)
    assert np.abs(small - expected).mean() < 20
    assert np.corrcoef(small.ravel(), expected.ravel())[0, 1] > 0.9
    # White digit on black, like the source.
    assert rgb[0, 0, 0] < 30 and rgb.max() > 200


def test_images_are_byte_identical_when_rewritten(digits_folder: Path, tmp_path: Path):
    assert demo.write_images(tmp_path) == demo.NUM_IMAGES
    assert _tree_digest(tmp_path) == _tree_digest(digits_folder)


def test_normalisation_constants_fit_the_images(digits_folder: Path):
    x = np.stack([np.asarray(Image.open(p)) for p in sorted(digits_folder.rglob("*.png"))]) / 255.0
    for c in range(3):
        assert x[..., c].mean() == pytest.approx(demo.DEMO_MEAN[c], abs=0.002)
        assert x[..., c].std() == pytest.approx(demo.DEMO_STD[c], abs=0.002)


def test_dataset_is_read_back_normalised_and_in_index_order(digits_folder: Path):
    x, y = demo.load_dataset(digits_folder)
    assert x.shape == (demo.NUM_IMAGES, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.tolist() == load_digits().target.tolist()
    assert abs(float(x.mean())) < 0.01 and float(x.std()) == pytest.approx(1.0, abs=0.01)


# --- the architecture ---------------------------------------------------------------------------


def test_architecture_uses_torchvision_blocks_with_a_shared_inplace_relu():
    model = demo.build()
    assert isinstance(model, demo.DemoResNet)
    names = dict(model.named_modules())
    for stage in ("layer1", "layer2", "layer3"):
        assert [type(b) for b in names[stage]] == [BasicBlock, BasicBlock]
    assert names["layer1.0"].downsample is None
    for stage, width in (("layer2", 32), ("layer3", 64)):
        conv, bn = names[f"{stage}.0.downsample"]
        assert conv.stride == (2, 2) and conv.kernel_size == (1, 1) and conv.out_channels == width
        assert isinstance(bn, nn.BatchNorm2d)
    assert isinstance(model.relu, nn.ReLU) and model.relu.inplace
    assert all(isinstance(b.relu, nn.ReLU) and b.relu.inplace for b in model.modules() if isinstance(b, BasicBlock))
    assert model.conv1.bias is None and model.conv1.kernel_size == (3, 3)
    assert model.fc.in_features == 64
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert demo.build(num_classes=5).fc.out_features == 5


# --- training -----------------------------------------------------------------------------------


def test_training_is_deterministic_and_restores_the_setting(digits_folder: Path):
    before = torch.are_deterministic_algorithms_enabled()
    a = demo.train(digits_folder, seed=3, epochs=1, max_train=96)
    b = demo.train(digits_folder, seed=3, epochs=1, max_train=96)
    assert torch.are_deterministic_algorithms_enabled() == before
    assert not a.training and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = demo.train(digits_folder, seed=4, epochs=1, max_train=96)
    assert not torch.equal(sa["fc.weight"], c.state_dict()["fc.weight"])


def test_full_training_reaches_90_percent_on_held_out_digits(assets: demo.DemoAssets):
    assert assets.accuracy >= 0.9


def test_checkpoint_loads_with_weights_only_into_build(assets: demo.DemoAssets):
    saved = torch.load(assets.checkpoint, weights_only=True)
    assert set(saved) == {"state_dict", "accuracy"} and saved["accuracy"] == assets.accuracy
    model = demo.build()
    model.load_state_dict(saved["state_dict"], strict=True)
    assert demo.evaluate(model, assets.images) == pytest.approx(assets.accuracy)


def test_checkpoint_loads_through_sitegen_with_the_demo_arch(assets: demo.DemoAssets):
    from sitegen.model_loading import load_model

    loaded = load_model(assets.checkpoint, assets.arch)
    assert isinstance(loaded.model, demo.DemoResNet)
    assert assets.arch == "sitegen.demo:build"
    assert assets.mean == demo.DEMO_MEAN and assets.std == demo.DEMO_STD


# --- caching ------------------------------------------------------------------------------------


def test_second_call_reuses_the_cache_without_training(assets: demo.DemoAssets, monkeypatch: pytest.MonkeyPatch):
    def no_training(*args, **kwargs):
        raise AssertionError("cached demo assets were retrained")

    monkeypatch.setattr(demo, "train", no_training)
    mtime = assets.checkpoint.stat().st_mtime_ns
    again = demo.ensure_demo_assets(assets.checkpoint.parent)
    assert again == assets
    assert assets.checkpoint.stat().st_mtime_ns == mtime
    manifest = json.loads((assets.checkpoint.parent / demo.MANIFEST_NAME).read_text())
    assert manifest["version"] == demo.VERSION and manifest["images"] == demo.NUM_IMAGES
    assert not [p.name for p in assets.checkpoint.parent.iterdir() if ".tmp-" in p.name]


def _spoil_version(cache: Path) -> None:
    manifest = json.loads((cache / demo.MANIFEST_NAME).read_text())
    manifest["version"] = -1
    (cache / demo.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda c: (c / demo.MANIFEST_NAME).unlink(), id="no-manifest"),
    pytest.param(_spoil_version, id="old-version"),
    pytest.param(lambda c: (c / demo.CHECKPOINT_NAME).write_bytes(b"half a file"), id="truncated-checkpoint"),
    pytest.param(lambda c: next((c / demo.IMAGES_NAME).rglob("*.png")).unlink(), id="missing-image"),
])
def test_incomplete_or_stale_assets_are_rebuilt(assets: demo.DemoAssets, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, spoil):
    cache = tmp_path / "demo"
    shutil.copytree(assets.checkpoint.parent, cache)
    spoil(cache)
    calls = []
    real_train = demo.train

    def quick_train(folder, *args, **kwargs):
        calls.append(folder)
        return real_train(folder, epochs=1, max_train=64)

    monkeypatch.setattr(demo, "train", quick_train)
    rebuilt = demo.ensure_demo_assets(cache)
    assert calls == [cache / demo.IMAGES_NAME]
    assert len(list(rebuilt.images.rglob("*.png"))) == demo.NUM_IMAGES
    torch.load(rebuilt.checkpoint, weights_only=True)
    assert demo.ensure_demo_assets(cache) == rebuilt  # complete again: reused
    assert len(calls) == 1


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / demo.CHECKPOINT_NAME
    target.write_bytes(b"old")

    def dies_halfway(p: Path) -> None:
        p.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo._replace_file(target, dies_halfway)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [demo.CHECKPOINT_NAME]


def test_old_leftovers_of_killed_runs_are_removed_but_fresh_ones_kept(tmp_path: Path):
    import os

    old_dir, old_file, fresh = tmp_path / "digits.tmp-1", tmp_path / "demo-resnet.pt.tmp-2", tmp_path / "digits.tmp-3"
    old_dir.mkdir(), (old_dir / "0").mkdir(), old_file.write_bytes(b"x"), fresh.mkdir()
    for p in (old_dir, old_file):
        os.utime(p, (0, 0))
    demo._remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name]
