"""Shared fixtures: the real CIFAR-10 files in ../shared, and small image folders made per test."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-test"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "resnet56-4bfd9763.th"
CIFAR_ARCH = f"{REPO / 'tests' / 'cifar_resnet.py'}"
TINY_ARCH = f"{REPO / 'tests' / 'tiny_models.py'}:tiny_cnn"


def _need_shared() -> None:
    if not (CIFAR.is_dir() and RESNET20.is_file()):
        pytest.skip("../shared (CIFAR-10 images and ResNet checkpoints) is not present")


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """make(n_per_class) -> a folder of symlinks to the first n images of each CIFAR class."""
    _need_shared()
    made: dict[int, Path] = {}

    def make(n_per_class: int) -> Path:
        if n_per_class not in made:
            root = tmp_path_factory.mktemp(f"cifar{n_per_class}")
            for cls in sorted(os.listdir(CIFAR)):
                (root / cls).mkdir()
                for name in sorted(os.listdir(CIFAR / cls))[:n_per_class]:
                    (root / cls / name).symlink_to(CIFAR / cls / name)
            made[n_per_class] = root
        return made[n_per_class]

    return make


@pytest.fixture(scope="session")
def resnet20_path():
    _need_shared()
    return RESNET20


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A checkpoint dict holding tests/tiny_models.py:tiny_cnn's weights under "state_dict"."""
    from sitegen.model_loading import build_architecture

    model = build_architecture(TINY_ARCH, None)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return path


def write_images(folder: Path, n: int, size: int = 16, classes: int = 0, seed: int = 0) -> list[Path]:
    """Random RGB PNGs (in class sub-folders c0, c1, ... when classes > 0)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / f"c{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def make_images():
    """The :func:`write_images` helper (tests cannot import conftest directly)."""
    return write_images


@pytest.fixture(scope="session")
def paths():
    """Locations of the repository's test architectures and the shared files."""
    return {"repo": REPO, "cifar_arch": CIFAR_ARCH, "tiny_arch": TINY_ARCH, "cifar": CIFAR,
            "resnet20": RESNET20, "resnet56": RESNET56}


@pytest.fixture
def inline_items(monkeypatch):
    """The passes' items run in this process (no worker pool, sitegen.workpool), for tests that
    count or replace the per-item calls here."""
    from sitegen.context import BuildContext

    monkeypatch.setattr(BuildContext, "pass_workers", lambda self, batch: 1)


@pytest.fixture
def pooled_and_inline(monkeypatch):
    """``run(fn)`` -> (fn() with its items on a pool of 2 workers, fn() inline on one torch thread):
    a pool's results must equal the one-thread run's, byte for byte."""
    from sitegen import workpool
    from sitegen.context import BuildContext

    if not workpool.can_fork():
        pytest.skip("no fork on this platform: the passes run their items inline")

    def run(fn):
        monkeypatch.setattr(BuildContext, "pass_workers", lambda self, batch: 2)
        pooled = fn()
        monkeypatch.setattr(BuildContext, "pass_workers", lambda self, batch: 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            inline = fn()
        finally:
            torch.set_num_threads(threads)
        return pooled, inline

    return run
