"""The model and images behind ``sitegen demo``: a small ResNet trained here on handwritten digits.

The demo must work offline with nothing but sitegen's own dependencies, so it uses the 1,797 8×8
digits that scikit-learn ships (``sklearn.datasets.load_digits``), writes them as 32×32 PNGs in an
ImageFolder layout, and trains a CIFAR-sized ResNet on them in a few seconds on a laptop CPU.
Training reads the images back from those PNGs with sitegen's own decoding and normalisation, so
the network sees at training time exactly the tensors the atlas will later feed it.

The blocks are torchvision's ``BasicBlock``, which applies one ``nn.ReLU(inplace=True)`` module
twice per block: the demo thereby exercises shared, in-place ReLU modules, as the CIFAR test model
exercises functional ``F.relu``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.resnet import BasicBlock, conv1x1

from .config import DataConfig
from .images import normalise, read_rgb

Progress = Callable[[str], None]

ARCH = "sitegen.demo:build"
CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
SIDE = 32
"""Width and height of the written images and of the network's input."""
NUM_IMAGES = 1797
"""How many digits ``load_digits`` has; a folder with fewer is incomplete."""
HELD_OUT = 297
"""The last this-many digits (by dataset index) are never trained on; they measure accuracy."""

# Per-channel mean and standard deviation of the written PNGs after /255, over all 1,797 images
# and all pixels (the digits are grey, so the three channels agree), computed once with
#   a = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))]) / 255
#   a.mean(), a.std()  ->  0.30923, 0.34879
# and rounded.  They are constants, not recomputed, so a checkpoint's meaning never drifts.
DEMO_MEAN: tuple[float, float, float] = (0.309, 0.309, 0.309)
DEMO_STD: tuple[float, float, float] = (0.349, 0.349, 0.349)

VERSION = 1
"""Bump whenever the images, the architecture or the training change: cached assets are rebuilt."""
CHECKPOINT_NAME = "demo-resnet.pt"
IMAGES_NAME = "digits"
MANIFEST_NAME = "demo-manifest.json"

# Chosen by measurement: 10 epochs of one-cycle SGD reach 96-98% held-out accuracy (seeds 0-2)
# for ~27 s of single-core CPU time, ~15 s on two idle cores; 8 epochs gave 95-97%.
EPOCHS = 10
BATCH_SIZE = 64
LEARNING_RATE = 0.4
WEIGHT_DECAY = 5e-4


class DemoResNet(nn.Module):
    """ResNet for 3×32×32 inputs: a 16-channel stem, then 2 BasicBlocks each at widths 16, 32, 64."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, stride=1)
        self.layer2 = _stage(16, 32, stride=2)
        self.layer3 = _stage(32, 64, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Two BasicBlocks; the first one changes width or resolution through a 1×1 conv + BN shortcut,
    exactly as torchvision's ``ResNet._make_layer`` builds it."""
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(in_planes, planes, stride, downsample), BasicBlock(planes, planes))


def _init_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation, with the last BN of every residual branch at zero so
    each block starts as the identity (trains faster and more stably from scratch)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)


def build(num_classes: int = 10) -> nn.Module:
    """The factory behind the arch spec ``sitegen.demo:build`` (untrained weights)."""
    return DemoResNet(num_classes)


# ---------------------------------------------------------------------------------------------
# Images


def _digit_png(pixels: np.ndarray) -> Image.Image:
    """One 8×8 digit (values 0..16, white on black) as a 32×32 RGB image."""
    grey = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
    # Bicubic keeps strokes smooth; Pillow clamps its overshoot to 0..255 in 8-bit mode.
    big = Image.fromarray(grey, "L").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    return big.convert("RGB")


def write_images(folder: Path) -> int:
    """Write every scikit-learn digit as ``folder/<digit>/<index:04d>.png``; returns the count.

    The bytes are deterministic (no timestamps in PNG files, fixed compression settings), so
    rebuilding the folder gives identical files.
    """
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    digits = load_digits()
    folder = Path(folder)
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        _digit_png(pixels).save(folder / CLASSES[int(target)] / f"{i:04d}.png", optimize=False, compress_level=6)
    return len(digits.images)


def _image_files(folder: Path) -> list[tuple[int, int, Path]]:
    """(dataset index, label, path) of every written digit, in dataset-index order."""
    found = []
    for label, name in enumerate(CLASSES):
        for path in (Path(folder) / name).glob("*.png"):
            found.append((int(path.stem), label, path))
    return sorted(found)


def load_dataset(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The PNGs read back as sitegen reads them: (N, 3, 32, 32) normalised floats and labels,
    ordered by dataset index."""
    cfg = DataConfig(mean=DEMO_MEAN, std=DEMO_STD)
    pixels, labels = [], []
    for _, label, path in _image_files(folder):
        pixels.append(np.asarray(read_rgb(path, cfg.max_pixels), dtype=np.uint8))
        labels.append(label)
    if not pixels:
        raise FileNotFoundError(f"no digit images under {folder}")
    return normalise(np.stack(pixels), cfg), torch.tensor(labels, dtype=torch.int64)


def split(n: int) -> tuple[slice, slice]:
    """Training and held-out parts: the last ``HELD_OUT`` images are held out (fewer if n is small)."""
    held = min(HELD_OUT, n // 6)
    return slice(0, n - held), slice(n - held, n)


# ---------------------------------------------------------------------------------------------
# Training


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Light augmentation: translate the batch by up to ``max_shift`` pixels, filling with the
    value of a black pixel (the background), so the net does not rely on exact centring."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    pad = max_shift
    fill = float(-DEMO_MEAN[0] / DEMO_STD[0])
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    h, w = x.shape[-2:]
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int,
         progress: Progress | None) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    # One-cycle: a short warm-up then annealing to ~0 gives high accuracy in very few epochs.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LEARNING_RATE, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=0.25)
    model.train()  # batchnorm uses batch statistics while training
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            loss = F.cross_entropy(model(_shift(x[idx], generator)), y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        if progress:
            progress(f"demo training: epoch {epoch + 1}/{epochs}, loss {total / len(x):.3f}")


def train(images_folder: Path, seed: int = 0, epochs: int = EPOCHS, max_train: int | None = None,
          progress: Progress | None = None) -> nn.Module:
    """Train a DemoResNet on the written digits (held-out images excluded); returns it in eval mode.

    Deterministic for a given seed, thread count and PyTorch build: seeded initialisation, a seeded
    generator for shuffling and augmentation, and deterministic algorithms enforced for the duration
    (the caller's setting is restored afterwards).  ``max_train`` trains on only the first images,
    for quick tests.
    """
    x, y = load_dataset(images_folder)
    train_part, _ = split(len(x))
    x, y = x[train_part][:max_train], y[train_part][:max_train]
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        model = DemoResNet(len(CLASSES))
        _fit(model, x, y, seed, epochs, progress)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, images_folder: Path) -> float:
    """Top-1 accuracy of ``model`` on the held-out digits, in eval mode."""
    x, y = load_dataset(images_folder)
    _, held = split(len(x))
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x[held].split(256)])
    return float((predictions == y[held]).float().mean())


# ---------------------------------------------------------------------------------------------
# Cached assets


@dataclass(frozen=True)
class DemoAssets:
    checkpoint: Path
    images: Path
    arch: str = ARCH
    mean: tuple[float, float, float] = DEMO_MEAN
    std: tuple[float, float, float] = DEMO_STD
    accuracy: float = 0.0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count_images(folder: Path) -> int:
    return len(_image_files(folder)) if folder.is_dir() else 0


def _cached(cache_dir: Path) -> DemoAssets | None:
    """The assets in ``cache_dir`` if the manifest says they are complete and current, else None.

    The manifest is written last, so its presence with the right version, image count and
    checkpoint hash means every earlier step finished.
    """
    try:
        manifest = json.loads((cache_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        checkpoint, images = cache_dir / CHECKPOINT_NAME, cache_dir / IMAGES_NAME
        if (manifest.get("version") != VERSION or manifest.get("images") != _count_images(images)
                or manifest.get("checkpoint_sha256") != _sha256(checkpoint)):
            return None
        return DemoAssets(checkpoint=checkpoint, images=images, accuracy=float(manifest["accuracy"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_images_atomically(target: Path) -> int:
    """Write the images into a temporary sibling folder, then rename it into place, so the
    folder under the final name is always complete."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        count = write_images(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return count


def _remove_leftovers(cache_dir: Path, min_age_s: float = 3600.0) -> None:
    """Delete temporary files and folders that killed runs left behind.

    Only old ones: a fresh one may belong to a run that is still going in another process.
    """
    now = time.time()
    for p in cache_dir.glob("*.tmp-*"):
        try:
            if now - p.stat().st_mtime < min_age_s:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: leftovers waste space but never break the demo


def _replace_file(target: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary name, then rename: a killed run never leaves a half file."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_demo_assets(cache_dir: Path, progress: Progress | None = None) -> DemoAssets:
    """The demo's images and trained checkpoint under ``cache_dir``, built on first use only."""
    cache_dir = Path(cache_dir)
    found = _cached(cache_dir)
    if found is not None:
        if progress:
            progress(f"using the demo model in {cache_dir} (held-out accuracy {found.accuracy:.1%})")
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Remove the manifest first so stale assets are never taken as complete if this run dies.
    (cache_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _remove_leftovers(cache_dir)
    images, checkpoint = cache_dir / IMAGES_NAME, cache_dir / CHECKPOINT_NAME
    if progress:
        progress(f"writing scikit-learn's handwritten digits to {images}")
    count = _write_images_atomically(images)
    if progress:
        progress("training the demo ResNet on them (once; 15 to 30 s on a laptop CPU)")
    started = time.perf_counter()
    model = train(images, progress=progress)
    accuracy = evaluate(model, images)
    if progress:
        progress(f"demo model trained in {time.perf_counter() - started:.0f} s, "
                 f"held-out accuracy {accuracy:.1%}")
    _replace_file(checkpoint, lambda p: torch.save({"state_dict": model.state_dict(), "accuracy": accuracy}, p))
    manifest = {"version": VERSION, "images": count, "accuracy": accuracy, "checkpoint_sha256": _sha256(checkpoint)}
    _replace_file(cache_dir / MANIFEST_NAME,
                  lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8"))
    return DemoAssets(checkpoint=checkpoint, images=images, accuracy=accuracy)
