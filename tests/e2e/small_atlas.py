"""The small atlas that the browser tests and the site-wide checks both open.

Built from the shared ResNet-20 on 10 CIFAR-10 images per class (every class present, so class
names are searchable), or from the demo model trained here when ../shared is absent.  Every view
stays on, with its work cut down (few sample images, few optimisation steps) so a build takes
seconds; the analyses themselves are tested elsewhere.  Both test modules build with the same
config into one pass cache, so the second build only renders.

Imported with importlib.util.spec_from_file_location (tests/ is not a package).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-test"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
PER_CLASS = 10
TITLE = 'e2e <atlas> & "friends"'
# A block and a conv of the first stage (the walk and the search use layer1.0), the stage's other
# blocks (for stage views), and the last block, whose 64 channels put tiles below the fold.
LAYERS = ["conv1", "layer1.0.conv1", "layer1.0", "layer1.1", "layer1.2", "layer3.2"]


def _cifar_images(root: Path) -> Path:
    """A folder of symlinks to the first PER_CLASS images of each CIFAR-10 class."""
    folder = root / "images"
    if folder.is_dir():
        return folder
    for cls in sorted(os.listdir(CIFAR)):
        (folder / cls).mkdir(parents=True)
        for name in sorted(os.listdir(CIFAR / cls))[:PER_CLASS]:
            (folder / cls / name).symlink_to(CIFAR / cls / name)
    return folder


def small_settings() -> dict[str, Any]:
    """Config sections that keep every view but shrink its work; unknown sections are left out so
    this keeps working while views are added or renamed."""
    from sitegen.config import Config

    wanted = {
        "samples": {"per_class": 1, "max_images": 3},
        "occlusion": {"stride": 8},
        "tsne": {"iterations": 250, "perplexity": 10.0, "grid_max": 64},
        "featurevis": {"steps": 4, "classes": False},
        "attribution": {"methods": ["guided"]},
    }
    fields = Config.__dataclass_fields__
    out = {}
    for section, keys in wanted.items():
        if section in fields:
            known = getattr(Config(), section).__dataclass_fields__
            out[section] = {k: v for k, v in keys.items() if k in known}
    return out


def build_small_atlas(out: Path, work: Path, cache: Path, compare: bool = False, **site: Any) -> Path:
    """Build the atlas into ``out`` (work files under ``work``, pass results cached in ``cache``).
    With ``compare``, a comparison build against an older checkpoint (``older_checkpoint``): every
    pass of the new model comes from the cache of the plain build."""
    from sitegen.build import build
    from sitegen.config import from_dict

    work.mkdir(parents=True, exist_ok=True)
    if CIFAR.is_dir() and RESNET20.is_file():
        checkpoint, images = RESNET20, _cifar_images(work)
        model = {"arch": f"{REPO / 'tests' / 'cifar_resnet.py'}:resnet20"}
        data = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]}
    else:
        from sitegen.demo import ensure_demo_assets

        assets = ensure_demo_assets(cache / "demo")
        checkpoint, images = assets.checkpoint, assets.images
        model = {"arch": assets.arch}
        data = {"mean": list(assets.mean), "std": list(assets.std)}
    extra = {"compare": {"checkpoint": str(older_checkpoint(checkpoint, work))}} if compare else {}
    cfg = from_dict({"model": model, "data": data, "layers": LAYERS,
                     "site": {"title": TITLE, **site}, **small_settings(), **extra})
    build(checkpoint, images, out, cfg, cache_dir=cache)
    return out


def older_checkpoint(checkpoint: Path, work: Path) -> Path:
    """The "old" model of the comparison build: the same weights plus seeded noise (5 % of each
    weight tensor's standard deviation; BatchNorm's running statistics kept), so channels, top images
    and some predictions differ."""
    import torch

    from sitegen.model_loading import extract, read_checkpoint

    path = work / "older.pt"
    if not path.is_file():
        sd = extract(read_checkpoint(checkpoint), checkpoint.name)
        g = torch.Generator().manual_seed(0)
        noisy = {k: v + 0.05 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=g)
                 if v.is_floating_point() and v.numel() > 1 and "running_" not in k else v for k, v in sd.items()}
        torch.save(noisy, path)
    return path
