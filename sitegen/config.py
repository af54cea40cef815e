"""Typed, frozen configuration read from ``site_config.toml``.

Every section is a frozen dataclass; the loader walks the dataclass fields, so adding a key is
adding a field.  Errors name the TOML key (``data.mean``) and, for unknown keys, the closest
valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    arch: str = ""
    """Architecture for a state dict: ``torchvision:resnet50``, ``path/net.py:factory`` or ``pkg.mod:factory``."""
    trust_pickle: bool = False
    """Allow unpickling a whole ``nn.Module`` (runs code from the file: only for files you trust)."""

    def validate(self, key: str) -> None:
        pass


@dataclass(frozen=True)
class DataConfig:
    resize: int = 0
    """Shorter side in pixels after resizing; 0 keeps the size."""
    crop: int = 0
    """Centre crop in pixels; 0 means no crop."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    max_images: int = 0
    """Use only the first N images (sorted order); 0 uses all."""
    max_pixels: int = 89_478_485
    """Refuse images that declare more pixels than this (decompression bombs)."""

    def validate(self, key: str) -> None:
        _check(self.resize >= 0, f"{key}.resize", "must be ≥ 0 (0 keeps the size)")
        _check(self.crop >= 0, f"{key}.crop", "must be ≥ 0 (0 means no crop)")
        _check(len(self.mean) == 3, f"{key}.mean", "needs three numbers, one per RGB channel")
        _check(len(self.std) == 3, f"{key}.std", "needs three numbers, one per RGB channel")
        _check(all(s > 0 for s in self.std), f"{key}.std", "must be > 0 (it divides the pixels)")
        _check(self.max_images >= 0, f"{key}.max_images", "must be ≥ 0 (0 uses all images)")
        _check(self.max_pixels > 0, f"{key}.max_pixels", "must be > 0")


@dataclass(frozen=True)
class TopKConfig:
    k: int = 9
    """How many distinct images to keep per channel."""
    batch_size: int = 0
    """Images per forward pass; 0 picks one from the model's memory use."""

    def validate(self, key: str) -> None:
        _check(1 <= self.k <= 100, f"{key}.k", "must be between 1 and 100")
        _check(self.batch_size >= 0, f"{key}.batch_size", "must be ≥ 0 (0 picks one automatically)")


@dataclass(frozen=True)
class SiteConfig:
    title: str = ""
    """Title of the atlas; empty uses the checkpoint's file name."""
    patch_size: int = 96
    """Side in pixels of each receptive-field patch image in the site."""
    dull_ratio: float = 0.05
    """A channel is dull when the std of its spatial means over the images is below this fraction of
    its layer's median std (and it is not dead): it barely varies, whatever the image."""

    def validate(self, key: str) -> None:
        _check(8 <= self.patch_size <= 512, f"{key}.patch_size", "must be between 8 and 512")
        _check(0 <= self.dull_ratio < 1, f"{key}.dull_ratio", "must be ≥ 0 and < 1 (0 marks no channel dull)")


@dataclass(frozen=True)
class SamplesConfig:
    """The sample images that occlusion maps and activation maps are drawn for."""

    per_class: int = 2
    """Images per class folder (the first ones in sorted order); without classes, evenly spaced images."""
    max_images: int = 20
    """At most this many sample images in all."""
    images: tuple[str, ...] = ()
    """Image paths relative to the images folder (as the atlas shows them); replaces the automatic choice."""

    def validate(self, key: str) -> None:
        _check(self.per_class >= 1, f"{key}.per_class", "must be ≥ 1")
        _check(1 <= self.max_images <= 1000, f"{key}.max_images", "must be between 1 and 1000")


@dataclass(frozen=True)
class OcclusionConfig:
    enabled: bool = True
    size: int = 0
    """Side in pixels of the grey square; 0 uses a quarter of the input's shorter side."""
    stride: int = 0
    """Step in pixels between occluder positions; 0 uses 1/16 of the shorter side (16×16 positions)."""
    layer: str = ""
    """Layer whose strongest channel map (c) follows; empty uses the last discovered layer."""
    batch_size: int = 0
    """Occluded copies per forward pass; 0 uses 256."""

    def validate(self, key: str) -> None:
        _check(self.size >= 0, f"{key}.size", "must be ≥ 0 (0 picks a quarter of the input side)")
        _check(self.stride >= 0, f"{key}.stride", "must be ≥ 0 (0 picks 1/16 of the input side)")
        _check(self.batch_size >= 0, f"{key}.batch_size", "must be ≥ 0 (0 uses 256)")


@dataclass(frozen=True)
class TsneConfig:
    enabled: bool = True
    layer: str = ""
    """Module whose input is the code (the classifier); empty uses the model's last nn.Linear."""
    max_points: int = 2000
    """Above this many images, a class-stratified sample of this size is embedded."""
    pca_dims: int = 50
    """Dimensions kept by PCA before t-SNE."""
    perplexity: float = 30.0
    iterations: int = 1000
    """Optimisation steps (scikit-learn needs at least 250)."""
    seed: int = 0
    method: str = "sklearn"
    """``sklearn`` (scikit-learn's Barnes-Hut t-SNE) or ``opentsne`` (needs ``pip install openTSNE``)."""
    grid_max: int = 1024
    """Images placed in the square image grid (a stratified subset of the embedded points)."""

    def validate(self, key: str) -> None:
        _check(self.max_points >= 10, f"{key}.max_points", "must be ≥ 10")
        _check(self.pca_dims >= 2, f"{key}.pca_dims", "must be ≥ 2")
        _check(self.perplexity > 0, f"{key}.perplexity", "must be > 0 (typical values are 5 to 50)")
        _check(self.iterations >= 250, f"{key}.iterations", "must be ≥ 250")
        _check(self.method in ("sklearn", "opentsne"), f"{key}.method", 'must be "sklearn" or "opentsne"')
        _check(1 <= self.grid_max <= 4096, f"{key}.grid_max", "must be between 1 and 4096")


@dataclass(frozen=True)
class KernelsConfig:
    enabled: bool = True
    block: int = 64
    """Filters (rows) and input channels (columns) per kernel-grid picture; wider layers are paged."""

    def validate(self, key: str) -> None:
        _check(4 <= self.block <= 512, f"{key}.block", "must be between 4 and 512")


@dataclass(frozen=True)
class ActivationsConfig:
    enabled: bool = True
    max_side: int = 32
    """Feature maps larger than this are max-pooled down to it for the pictures (peaks survive)."""

    def validate(self, key: str) -> None:
        _check(4 <= self.max_side <= 256, f"{key}.max_side", "must be between 4 and 256")


@dataclass(frozen=True)
class Config:
    layers: tuple[str, ...] = ()
    """Layer names or glob patterns (``layer3.*``) to show; empty shows every discovered layer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    tsne: TsneConfig = field(default_factory=TsneConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {why}")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a TOML value against a field type; TOML integers are accepted for floats."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a table ([{key}]), not {type(value).__name__}")
        return _build(typ, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, e.g. {key.split('.')[-1]} = [...]")
        item = typing.get_args(typ)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, not {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be a whole number, not {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, not {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string in quotes, not {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ!r} for {key}")  # a bug in a dataclass, not user input


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}{_closest(name, names)}")
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def from_dict(table: Mapping[str, Any]) -> Config:
    cfg = _build(Config, table, "")
    cfg.validate()
    return cfg


def load(path: str | Path | None) -> Config:
    """Read and validate a TOML config; ``None`` gives the defaults."""
    if path is None:
        return from_dict({})
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist", "check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p.name} is not valid TOML: {e}", "see site_config.toml for the format") from None
    try:
        return from_dict(table)
    except ConfigError as e:
        raise ConfigError(f"{p.name}: {e.message}", e.hint) from None


def with_overrides(cfg: Config, section: str, **values: Any) -> Config:
    """A copy of ``cfg`` with command-line flags (those not None) replacing keys of one section."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return cfg
    table = {**dataclasses.asdict(getattr(cfg, section)), **given}
    table = {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
    new_section = _build(type(getattr(cfg, section)), table, section)
    new = dataclasses.replace(cfg, **{section: new_section})
    new.validate()
    return new


def as_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (for cache keys and the site's record of how it was built)."""
    return dataclasses.asdict(cfg)
