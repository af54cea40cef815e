"""The model's input, decided once (sitegen/inputs.py): grey models, a torchvision architecture's own
transform, the input size from the folder (not from its first image), crops larger than the images.

The folder-level cases through the CLI (stops and warnings) are in tests/test_hardening_images.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch import nn

from sitegen.build import prepare
from sitegen.config import DataConfig, from_dict
from sitegen.errors import ConfigError, ModelLoadError
from sitegen.images import PixelDataset, discover, load_pixels, normalise, read_rgb
from sitegen.inputs import (InputSizeError, decide_size, first_convolution, plan_inputs, plan_without_images,
                            torchvision_transform)
from sitegen.model_loading import build_architecture

REPO = Path(__file__).resolve().parents[1]
GREY_ARCH = f"{REPO / 'tests' / 'tiny_models.py'}:tiny_grey_cnn"
RGBA_ARCH = f"{REPO / 'tests' / 'tiny_models.py'}:tiny_rgba_cnn"


import hardening_corpus as corpus  # noqa: E402  (tests/ is on the import path: pyproject's pythonpath)


def _checkpoint(folder: Path, arch: str) -> Path:
    path = folder / "model.pt"
    torch.save(build_architecture(arch, None).state_dict(), path)
    return path


def _colour_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Random colour PNGs of ``size`` (width, height) in three class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"c{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")


# --- grey models -----------------------------------------------------------------------------------


def test_grey_pixels_are_the_luminance(tmp_path):
    """1-channel input pixels are ITU-R 601-2 luminance: checked against Pillow's "L" and against
    the weighted sum computed here in NumPy."""
    _colour_images(tmp_path, 3, (20, 12))
    images = discover(tmp_path)
    cfg = DataConfig(resize=0, crop=0, channels=1)
    for i in range(len(images)):
        px = load_pixels(images, i, cfg)
        assert px.shape == (12, 20, 1) and px.dtype == np.uint8
        rgb = np.asarray(Image.open(images.path(i)).convert("RGB"), dtype=np.float64)
        np.testing.assert_array_equal(px[..., 0], np.asarray(Image.open(images.path(i)).convert("L")))
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        assert np.abs(px[..., 0] - luma).max() <= 0.5 + 1e-9  # Pillow rounds the same sum to an integer
    x = normalise(load_pixels(images, 0, DataConfig(channels=1, mean=(0.5,), std=(0.25,))),
                  DataConfig(channels=1, mean=(0.5,), std=(0.25,)))
    want = (np.asarray(Image.open(images.path(0)).convert("L"), dtype=np.float32) / 255 - 0.5) / 0.25
    assert x.shape == (1, 12, 20)
    np.testing.assert_allclose(x[0].numpy(), want, rtol=0, atol=1e-6)


def test_grey_model_plan_reads_one_channel_and_one_number(tmp_path):
    _colour_images(tmp_path / "imgs", 6, (16, 16))
    model = build_architecture(GREY_ARCH, None)
    images = discover(tmp_path / "imgs")
    plan = plan_inputs(model, GREY_ARCH, images, DataConfig())
    assert plan.data.channels == 1 and plan.shape == (1, 16, 16)
    # No mean/std given: ImageNet's, weighted like the luminance (0.299·0.485 + 0.587·0.456 + 0.114·0.406).
    assert plan.data.mean == (0.459,) and plan.data.std == (0.2256,)
    assert any("grey" in n for n in plan.notes) and any("--mean/--std" in n for n in plan.notes)
    given = plan_inputs(model, GREY_ARCH, images, DataConfig(mean=(0.1307,), std=(0.3081,)))
    assert given.data.mean == (0.1307,) and given.data.std == (0.3081,)
    assert not any("--mean/--std" in n for n in given.notes)
    with pytest.raises(ConfigError, match=r"has 3 numbers, but the model reads 1 channel \(grey\)"):
        plan_inputs(model, GREY_ARCH, images, DataConfig(mean=(0.5, 0.5, 0.5)))
    # One number for an RGB model means every channel.
    rgb = plan_inputs(build_architecture(corpus.TINY_ARCH, None), corpus.TINY_ARCH, images, DataConfig(std=(0.5,)))
    assert rgb.data.channels == 3 and rgb.data.std == (0.5, 0.5, 0.5) and rgb.data.mean == (0.485, 0.456, 0.406)


def _grey(path: Path, tol: int) -> bool:
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return max(np.abs(a[..., 0] - a[..., 1]).max(), np.abs(a[..., 1] - a[..., 2]).max()) <= tol


def test_grey_model_builds_end_to_end_on_non_square_images(tmp_path, capfd):
    """A 1-channel CNN over 20×12 colour photos: every view builds, and every picture of the input
    (samples, top-k sprites, attribution, feature visualisation, the first layer's kernels) is grey."""
    root = tmp_path / "imgs"
    _colour_images(root, 12, (20, 12))
    out = tmp_path / "site"
    cfg = corpus.fast_config(tmp_path / "c.toml", topk={"k": 3},
                             attribution={"enabled": True}, sanity={"enabled": True},
                             kernels={"enabled": True},
                             activations={"enabled": True}, occlusion={"enabled": True},
                             featurevis={"enabled": True, "steps": 3}, tsne={"enabled": True, "iterations": 250,
                                                                           "perplexity": 3.0},
                             samples={"max_images": 2})
    code, _, err = corpus.run_cli(["build", str(_checkpoint(tmp_path, GREY_ARCH)), "--images", str(root),
                                   "--arch", GREY_ARCH, "-o", str(out), "--config", str(cfg), "--no-cache",
                                   "--mean", "0.5", "--std", "0.25"], capfd)
    assert code == 0, err
    assert "converted to grey" in err
    data = json.loads((out / "data" / "atlas.json").read_text())["data"]
    assert data["channels"] == 1 and data["input_size"] == [12, 20] and data["used"] == 12
    assert data["mean"] == [0.5] and data["std"] == [0.25]
    index = (out / "index.html").read_text()
    assert "grey (1 channel)" in index and "converted to grey" in index
    pictures = {
        "sample images": sorted((out / "img" / "images").glob("*.jpg")),
        "kernel mosaic": [out / "img" / "kernels" / "first-each.png", out / "img" / "kernels" / "first-shared.png"],
        "feature visualisation": sorted((out / "img").glob("conv*/*.fv.png")),
        "class visualisation": sorted((out / "img" / "featurevis-classes").glob("*.png")),
        "t-SNE thumbnails": sorted((out / "img" / "tsne").glob("*.jpg")),
    }
    for what, paths in pictures.items():
        assert paths, what
        for p in paths:
            assert _grey(p, 2 if p.suffix == ".jpg" else 0), (what, p)  # JPEG's chroma rounding
    sprites = sorted((out / "img").glob("conv*/*.webp"))  # top-k crops and attribution rows, lossy WebP
    assert sprites and all(_grey(p, 2) for p in sprites)
    kernels = (out / "kernels" / "index.html").read_text()
    assert "one grey channel" in kernels and "first-each.png" in kernels
    for page in ("occlusion/index.html", "activations/index.html", "tsne/index.html", "featurevis.html",
                 "sanity.html"):
        assert (out / page).is_file(), page


def test_rgba_models_are_refused(tmp_path, capfd):
    root = tmp_path / "imgs"
    corpus.write_good_images(root, 3)
    code, _, err = corpus.run_cli(["build", str(_checkpoint(tmp_path, RGBA_ARCH)), "--images", str(root),
                                   "--arch", RGBA_ARCH, "-o", str(tmp_path / "site"), "--no-cache"], capfd)
    corpus.assert_clean_failure(code, err, "first convolution (conv1) reads 4 channels (RGBA input)",
                                "1 channel (grey) or 3 (RGB)", "hint: wrap the model")
    assert not (tmp_path / "site").exists()


class _Functional(nn.Module):
    """Its first convolution is ``F.conv2d`` on a parameter; a Conv2d registered earlier runs later."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(4, 2, 1)
        self.stem = nn.Parameter(torch.randn(4, 1, 3, 3))

    def forward(self, x):
        x = x[:, :1] if x.shape[1] != 1 else x
        return self.late(F.conv2d(x, self.stem, padding=1))


def test_first_convolution_is_the_one_that_runs_first():
    assert first_convolution(_Functional(), (8, 8)) == ("stem", 1)
    grouped = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3))
    assert first_convolution(grouped, (8, 8)) == ("0", 3)  # weight (6, 1, 3, 3) × 3 groups
    assert first_convolution(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2)), (8, 8)) is None


def test_data_channels_is_checked_against_the_model(tmp_path):
    corpus.write_good_images(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"'data.channels' is 3, but the model's first convolution \(conv1\) reads 1"):
        plan_inputs(build_architecture(GREY_ARCH, None), GREY_ARCH, discover(tmp_path), DataConfig(channels=3))
    with pytest.raises(ModelLoadError, match="RGBA"):
        plan_without_images(build_architecture(RGBA_ARCH, None), RGBA_ARCH, DataConfig(), 16)


# --- torchvision's own transform -------------------------------------------------------------------


PHOTO_SIZES = [(300, 200), (200, 300), (364, 211), (317, 227), (260, 260)]


def test_torchvision_transforms_come_from_the_weights_metadata():
    r18 = torchvision_transform("torchvision:resnet18")
    assert (r18.resize, r18.crop, r18.weights) == (256, 224, "IMAGENET1K_V1")
    assert r18.mean == (0.485, 0.456, 0.406) and r18.std == (0.229, 0.224, 0.225)
    inc = torchvision_transform("torchvision:inception_v3")
    assert (inc.resize, inc.crop) == (342, 299)
    assert torchvision_transform("tests/tiny_models.py:tiny_cnn") is None
    assert torchvision_transform("torchvision:no_such_model") is None


def test_mixed_photos_with_a_torchvision_architecture_use_its_transform(tmp_path):
    """Photos of five sizes, no --resize/--crop: resnet18's documented 256/224 transform, every photo
    kept, and the pixels equal to what torchvision's own transform gives."""
    import torchvision
    from torchvision.models import get_model_weights

    corpus.photo_crops(tmp_path / "photos", PHOTO_SIZES)
    images = discover(tmp_path / "photos")
    model = torchvision.models.get_model("resnet18", weights=None)
    plan = plan_inputs(model, "torchvision:resnet18", images, DataConfig())
    assert plan.size == (224, 224) and (plan.data.resize, plan.data.crop) == (256, 224) and plan.data.channels == 3
    assert len(plan.images) == len(PHOTO_SIZES) and plan.images.skipped == []
    assert any("torchvision's evaluation transform for resnet18" in n for n in plan.notes)
    reference = get_model_weights("resnet18").DEFAULT.transforms()
    for i in range(len(images)):
        ours = normalise(load_pixels(plan.images, i, plan.data), plan.data)
        theirs = reference(read_rgb(images.path(i), 10**8))
        assert ours.shape == theirs.shape == (3, 224, 224)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # The user's own settings win over the architecture's.
    own = plan_inputs(model, "torchvision:resnet18", images, DataConfig(resize=64, crop=64))
    assert own.size == (64, 64) and own.notes == ()


def test_layers_uses_the_same_size_decision(tmp_path, capfd):
    """``sitegen layers --images`` decides the input as a build would: the 1×1 image sorting first
    stops it with the same message, and a config's resize/crop gives the mixed photos one size."""
    ckpt = _checkpoint(tmp_path, corpus.TINY_ARCH)
    corpus.size_corpus()[0].make(tmp_path / "one")  # one-pixel-first
    code, _, err = corpus.run_cli(["layers", str(ckpt), "--arch", corpus.TINY_ARCH, "--images", str(tmp_path / "one")],
                                  capfd)
    corpus.assert_clean_failure(code, err, "would be skipped for their size", "1×1 (1 image, e.g. 0.png)",
                                "--resize 16 --crop 16")
    corpus.photo_crops(tmp_path / "photos", corpus.MIXED_PHOTOS)
    cfg = corpus.fast_config(tmp_path / "c.toml", data={"resize": 48, "crop": 40})
    code, out, err = corpus.run_cli(["layers", str(ckpt), "--arch", corpus.TINY_ARCH, "--images",
                                     str(tmp_path / "photos"), "--config", str(cfg)], capfd)
    assert code == 0, err
    assert "layers for 40×40 input" in out


# --- the size, from the folder ---------------------------------------------------------------------


def test_the_first_image_no_longer_fixes_the_size(tmp_path):
    """A 1×1 PNG sorting first used to make the input 1×1 and every real image was skipped."""
    corpus.write_good_images(tmp_path, 120, size=8)
    Image.new("RGB", (1, 1)).save(tmp_path / "0.png")
    images = discover(tmp_path)
    assert images.records[0].rel == "0.png"
    d = decide_size(images, DataConfig(resize=0, crop=0))
    assert d.size == (8, 8) and d.majority == 120 and d.minority == [("0.png", (1, 1))]
    assert sorted(r.rel for r in d.images.records) == sorted(f"good{i:02d}.png" for i in range(120))
    assert d.images.skipped[-1][0] == "0.png" and "1×1 after preprocessing differs" in d.images.skipped[-1][1]
    assert any("0.png (1×1)" in n for n in d.notes)
    Image.new("RGB", (1, 1)).save(tmp_path / "00.png")  # 2 of 122: over 1 %
    with pytest.raises(InputSizeError, match=r"2 of the 122 readable images \(1.6 %\)"):
        decide_size(discover(tmp_path), DataConfig(resize=0, crop=0))


def test_damaged_files_with_sound_headers_do_not_decide_the_size(tmp_path):
    """Truncated PNGs of one size outnumber the good images: no image of that size decodes, so the
    good images' size is the input, and the damaged files are left to be listed as undecodable."""
    corpus.write_good_images(tmp_path, 3, size=16)
    data = corpus.png_bytes(size=(64, 64))
    for i in range(5):
        (tmp_path / f"bad{i}.png").write_bytes(data[: len(data) // 2])
    d = decide_size(discover(tmp_path), DataConfig(resize=0, crop=0))
    assert d.size == (16, 16) and len(d.images) == 8  # the damaged files stay, to be listed when read


def test_sampled_folders_still_catch_every_other_size(tmp_path):
    """Above the sample size only a sample's headers are read; an image of another size outside the
    sample is refused by the dataset (from its header, without decoding it) and listed."""
    corpus.write_good_images(tmp_path, 30, size=8)
    Image.new("RGB", (64, 48)).save(tmp_path / "good05x.png")  # between good05 and good06
    images = discover(tmp_path)
    d = decide_size(images, DataConfig(resize=0, crop=0), sample=10)
    assert d.sampled == 10 and d.size == (8, 8) and d.minority == []
    odd = [r.rel for r in d.images.records].index("good05x.png")
    decoded = []
    real_load = ImageFile.ImageFile.load
    ImageFile.ImageFile.load = lambda self: decoded.append(self.size) or real_load(self)
    try:
        px, _, error = PixelDataset(d.images, DataConfig(), [odd], (8, 8))[0]
    finally:
        ImageFile.ImageFile.load = real_load
    assert "good05x.png: size 64×48 after preprocessing differs from the input size 8×8" in error
    assert decoded == [] and px.shape == (8, 8, 3)


@pytest.mark.parametrize("fmt", ["jpg", "tif", "webp", "png"])
def test_exif_rotation_is_read_from_the_header(tmp_path, fmt):
    """The header's size is the decoded picture's, turned by its EXIF orientation (Pillow turns TIFFs
    itself; a PNG's EXIF is read when it comes before the pixels, as Pillow writes it)."""
    img = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90°: 10 wide, 20 high
    for i in range(3):
        img.save(tmp_path / f"r{i}.{fmt}", exif=exif.tobytes())
    images = discover(tmp_path)
    d = decide_size(images, DataConfig(resize=0, crop=0))
    assert d.size == (20, 10) and d.minority == []
    assert read_rgb(images.path(0), 10**6).size == (10, 20)


def test_prepare_resolves_the_data_config_once(tmp_path, tiny_checkpoint, paths):
    corpus.write_good_images(tmp_path / "imgs", 4, size=12)
    ctx = prepare(tiny_checkpoint, tmp_path / "imgs", from_dict({"model": {"arch": paths["tiny_arch"]}}), None)
    d = ctx.config.data
    assert (d.resize, d.crop, d.channels, d.mean, d.std) == (0, 0, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert ctx.input_size == (12, 12) and ctx.channels == 3 and ctx.input_notes == ()
    assert ctx.identity()["data"]["channels"] == 3  # part of every cache key


def test_grey_model_feature_vis_is_estimated(tmp_path):
    """The plan's feature-vis probe runs grey images through a grey model (it ran 3-channel ones:
    "estimate failed")."""
    from sitegen.build import prepare
    from sitegen.config import from_dict
    from sitegen.passes.featurevis import FeatureVisPass
    from sitegen.planning import Probe

    _colour_images(tmp_path / "imgs", 6, (16, 16))
    ckpt = tmp_path / "grey.pt"
    torch.save(build_architecture(GREY_ARCH, None).state_dict(), ckpt)
    cfg = from_dict({"model": {"arch": GREY_ARCH}, "featurevis": {"steps": 4}})
    ctx = prepare(ckpt, tmp_path / "imgs", cfg, None)
    plan = FeatureVisPass(cfg.featurevis).plan(ctx, Probe(ctx, target=0.01))
    assert plan.estimated and plan.seconds > 0
