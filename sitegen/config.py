"""Typed, frozen configuration read from ``site_config.toml``.

Every section is a frozen dataclass; the loader walks the dataclass fields, so adding a key is
adding a field.  Errors name the TOML key (``data.mean``) and, for unknown keys, the closest
valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

MAX_SIDE = 16384
"""Largest data.resize / data.crop in pixels."""
PILLOW_MAX_PIXELS = 2 * 89_478_485
"""Pillow's hard limit (2 × PIL.Image.MAX_IMAGE_PIXELS): images above it are refused whatever
data.max_pixels says, so the key is capped there."""

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
    resize: int = -1
    """Shorter side in pixels after resizing; 0 keeps the size; -1 (automatic): a torchvision
    architecture's own evaluation resize when neither resize nor crop is set, else 0."""
    crop: int = -1
    """Centre crop in pixels; 0 means no crop; -1 (automatic): a torchvision architecture's own
    evaluation crop when neither resize nor crop is set, else none."""
    channels: int = 0
    """Channels the model reads: 1 (grey, luminance of the images) or 3 (RGB); 0 reads them off the
    model's first convolution."""
    mean: tuple[float, ...] = ()
    """Mean subtracted after scaling pixels to [0, 1]: one number, or one per channel; empty picks it
    (a torchvision architecture's weights', else ImageNet's; grey models: ImageNet's in grey)."""
    std: tuple[float, ...] = ()
    """Standard deviation the pixels are divided by: one number, or one per channel; empty picks it
    like ``mean``."""
    max_images: int = 0
    """Use only the first N images (sorted order); 0 uses all."""
    max_pixels: int = 89_478_485
    """Refuse images that declare more pixels than this (decompression bombs)."""

    def validate(self, key: str) -> None:
        # Upper bounds: a typo like 22400 would otherwise allocate gigabytes per image.
        _check(-1 <= self.resize <= MAX_SIDE, f"{key}.resize",
               f"must be between 0 (keeps the size) and {MAX_SIDE}, or -1 (automatic)")
        _check(-1 <= self.crop <= MAX_SIDE, f"{key}.crop",
               f"must be between 0 (no crop) and {MAX_SIDE}, or -1 (automatic)")
        _check(self.channels in (0, 1, 3), f"{key}.channels",
               "must be 1 (grey), 3 (RGB) or 0 (read off the model's first convolution)")
        for name, values in (("mean", self.mean), ("std", self.std)):
            _check(len(values) in (0, 1, 3), f"{key}.{name}",
                   "needs one number (every channel), three (one per RGB channel) or none (automatic)")
        _check(all(s > 0 for s in self.std), f"{key}.std", "must be > 0 (it divides the pixels)")
        _check(self.max_images >= 0, f"{key}.max_images", "must be ≥ 0 (0 uses all images)")
        _check(0 < self.max_pixels <= PILLOW_MAX_PIXELS, f"{key}.max_pixels",
               f"must be > 0 and ≤ {PILLOW_MAX_PIXELS} (Pillow refuses larger images as decompression bombs)")


@dataclass(frozen=True)
class TopKConfig:
    k: int = 9
    """How many distinct images to keep per channel."""
    batch_size: int = 0
    """Images per forward pass; 0 picks one from the model's memory use and the free memory (at most
    64 on the CPU, 256 on a GPU)."""
    checkpoint_every: int = 4096
    """Write the running state every N images so a killed build resumes (0 = never)."""
    precision: str = "fp32"
    """fp32, or bf16/fp16 autocast -- used only if a sample's top-k sets agree with fp32."""
    precision_sample: int = 512
    """Images on which the reduced precision is checked against fp32."""
    min_agreement: float = 0.95
    """Mean top-k overlap with fp32 needed to keep the reduced precision."""

    def validate(self, key: str) -> None:
        _check(1 <= self.k <= 100, f"{key}.k", "must be between 1 and 100")
        _check(self.checkpoint_every >= 0, f"{key}.checkpoint_every", "must be ≥ 0 (0 turns checkpoints off)")
        _check(self.precision in ("fp32", "bf16", "fp16"), f"{key}.precision", "must be fp32, bf16 or fp16")
        _check(self.precision_sample >= 1, f"{key}.precision_sample", "must be ≥ 1")
        _check(0 <= self.min_agreement <= 1, f"{key}.min_agreement", "must be between 0 and 1")
        _check(self.batch_size >= 0, f"{key}.batch_size", "must be ≥ 0 (0 picks one automatically)")


@dataclass(frozen=True)
class AttributionConfig:
    enabled: bool = True
    """Attribute every top-k unit of every selected layer to the input pixels."""
    methods: tuple[str, ...] = ("guided", "deconvnet", "gradient")
    """Rules to compute, in the order the page's switch shows them: guided, deconvnet, gradient."""
    batch_size: int = 0
    """Distinct images per forward (each image's units of the layer all go back from it); 0 picks one
    from the model's memory use and the free memory (at most 64 on the CPU, 256 on a GPU)."""
    max_side: int = 64
    """Stored attribution crops are at most this many pixels wide (larger windows are shrunk)."""

    def validate(self, key: str) -> None:
        known = ("guided", "deconvnet", "gradient")
        _check(len(self.methods) > 0, f"{key}.methods", "needs at least one method (or set enabled = false)")
        for i, m in enumerate(self.methods):
            _check(m in known, f"{key}.methods[{i}]", f"must be one of {', '.join(known)}, not {m!r}")
        _check(len(set(self.methods)) == len(self.methods), f"{key}.methods", "lists a method twice")
        _check(self.batch_size >= 0, f"{key}.batch_size", "must be ≥ 0 (0 picks one automatically)")
        _check(8 <= self.max_side <= 512, f"{key}.max_side", "must be between 8 and 512")


@dataclass(frozen=True)
class SanityConfig:
    """The checks of the attribution pictures: how much they change when the weights are
    randomised, from image to image, and how close they are to plain edges (docs/sanity.md)."""

    enabled: bool = True
    """Run the checks (they need the attribution pass)."""
    units: int = 16
    """Top units sampled per layer (each a different channel's strongest unit); all when fewer fire."""
    images: int = 4
    """Other images each sampled unit is attributed on for the image check."""
    seed: int = 0
    """Seed of the unit sample, the other images and the re-initialised weights."""
    batch_size: int = 0
    """(image, unit) pairs per forward+backward; 0 picks one as the attribution pass does."""

    def validate(self, key: str) -> None:
        _check(16 <= self.units <= 4096, f"{key}.units", "must be between 16 and 4096 (fewer gives too noisy a mean)")
        _check(4 <= self.images <= 256, f"{key}.images", "must be between 4 and 256")
        _check(self.seed >= 0, f"{key}.seed", "must be ≥ 0")
        _check(self.batch_size >= 0, f"{key}.batch_size", "must be ≥ 0 (0 picks one automatically)")


@dataclass(frozen=True)
class FeatureVisConfig:
    enabled: bool = True
    """Optimise an image for every channel of the selected layers (and every class)."""
    steps: int = 50
    """Gradient-ascent steps per image (at most, when ``stop_gain`` is set)."""
    lr: float = 0.2
    """Step size of the first step: each step moves the image parameters by this much in RMS
    (normalised gradient); it falls linearly to ``lr_end`` at the last step."""
    lr_end: float = 0.01
    """Step size of the last step (``lr_end = lr`` keeps it constant)."""
    precision: str = "auto"
    """The steps' forward and backward in ``fp32``, or ``bf16`` (autocast); ``auto`` uses bf16 where the
    device computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32."""
    jitter: int = -1
    """Random shift in pixels applied before each step; -1 picks 1/16 of the image side, 0 disables."""
    seed: int = 0
    """Seed of the starting noise and the jitter: the same seed gives the same images."""
    decorrelate: bool = True
    """Fourier (1/f) parameterisation with decorrelated colours, as Lucid; false optimises raw pixels."""
    image_size: int = 0
    """Side in pixels of the optimised images; 0 uses the model's input size."""
    classes: bool = True
    """Also optimise one image per output class (maximising its logit)."""
    batch_size: int = 0
    """Channels optimised at once, one per batch element; 0 picks one from the model's memory use and
    the free memory (at most 64 on the CPU, 256 on a GPU)."""
    stop_gain: float = 0.0
    """An image stops before ``steps`` once its objective has converged: the mean over the last
    ``stop_window`` steps beats the mean over the window before by less than this fraction of its
    size.  0 runs every image for all ``steps``."""
    stop_window: int = 8
    """Steps per window of the convergence test (``stop_gain``)."""

    def validate(self, key: str) -> None:
        _check(1 <= self.steps <= 10_000, f"{key}.steps", "must be between 1 and 10000")
        _check(0 <= self.stop_gain < 1, f"{key}.stop_gain", "must be ≥ 0 and < 1 (0 never stops early)")
        _check(1 <= self.stop_window <= 1000, f"{key}.stop_window", "must be between 1 and 1000")
        _check(0 < self.lr <= 10, f"{key}.lr", "must be > 0 and ≤ 10")
        _check(0 < self.lr_end <= 10, f"{key}.lr_end", "must be > 0 and ≤ 10")
        _check(self.precision in ("auto", "fp32", "bf16"), f"{key}.precision", 'must be "auto", "fp32" or "bf16"')
        _check(self.jitter >= -1, f"{key}.jitter", "must be ≥ 0 pixels, or -1 for 1/16 of the image side")
        _check(self.seed >= 0, f"{key}.seed", "must be ≥ 0")
        _check(self.image_size == 0 or 8 <= self.image_size <= 1024, f"{key}.image_size",
               "must be 0 (the model's input size) or between 8 and 1024")
        _check(self.batch_size >= 0, f"{key}.batch_size", "must be ≥ 0 (0 picks one automatically)")


@dataclass(frozen=True)
class SiteConfig:
    title: str = ""
    """Title of the atlas; empty uses the checkpoint's file name."""
    patch_size: int = 96
    """Side in pixels of each receptive-field patch as the pages show it (smaller windows are stored
    at their own pixels and enlarged by the page)."""
    image_format: str = "webp"
    """Channel sprites as ``webp`` (lossy, quality 90; lossless where the page enlarges the windows)
    or ``png`` (lossless); activation-map pictures in the same format, lossless in both; see
    docs/size.md for the measurements behind the default."""
    dull_ratio: float = 0.05
    """A channel is dull when the std of its spatial means over the images is below this fraction of
    its layer's median std (and it is not dead): it barely varies, whatever the image."""
    max_bytes: int = 10**9
    """Size budget of the site in bytes (GitHub Pages publishes at most 1 GB); 0 lifts it.  Over it, a
    build that was not given layers leaves parts out in a documented order (docs/planning.md) and
    says which; a build given layers stops before any work."""
    render_workers: int = 0
    """Processes that draw the pictures and write the pages; 0 uses every core.  The site is the same
    byte for byte whatever the count."""

    def validate(self, key: str) -> None:
        _check(self.render_workers >= 0, f"{key}.render_workers", "must be ≥ 0 (0 uses every core)")
        _check(8 <= self.patch_size <= 512, f"{key}.patch_size", "must be between 8 and 512")
        _check(self.image_format in ("webp", "png"), f"{key}.image_format", 'must be "webp" or "png"')
        _check(0 <= self.dull_ratio < 1, f"{key}.dull_ratio", "must be ≥ 0 and < 1 (0 marks no channel dull)")
        _check(self.max_bytes >= 0, f"{key}.max_bytes", "must be ≥ 0 bytes (0 lifts the limit)")


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
    """Step in pixels between occluder positions; 0 uses 1/12 of the shorter side (about 12×12 positions)."""
    layer: str = ""
    """Layer whose strongest channel map (c) follows; empty uses the last discovered layer: the last
    convolution's output, or for a residual network the last block's output (that convolution's
    branch plus the shortcut, after the activation), which is the feature map the classifier pools."""
    batch_size: int = 0
    """Occluded copies per forward pass; 0 uses 256 (64 for inputs over 64×64 px on the CPU)."""

    def validate(self, key: str) -> None:
        _check(self.size >= 0, f"{key}.size", "must be ≥ 0 (0 picks a quarter of the input side)")
        _check(self.stride >= 0, f"{key}.stride", "must be ≥ 0 (0 picks 1/12 of the input side)")
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
class CompareConfig:
    """A comparison build: the atlas of the model with an earlier checkpoint of it beside it."""

    checkpoint: str = ""
    """The earlier checkpoint (same architecture) to compare the model with; also ``--compare``.
    Empty builds the atlas of one model."""
    sample: int = 2000
    """Images (a class-stratified, seeded sample) on which each channel's per-image maxima are kept
    for the correlations and the channel matching."""
    seed: int = 0
    """Seed of that sample: the same seed gives the same images."""
    channels: int = 10
    """Most-changed channels listed per layer on the changes page."""
    changed_images: int = 200
    """Images whose prediction changed that are listed (each with its page); all are counted."""

    def validate(self, key: str) -> None:
        _check(10 <= self.sample <= 100_000, f"{key}.sample", "must be between 10 and 100000")
        _check(self.seed >= 0, f"{key}.seed", "must be ≥ 0")
        _check(1 <= self.channels <= 1000, f"{key}.channels", "must be between 1 and 1000")
        _check(0 <= self.changed_images <= 100_000, f"{key}.changed_images", "must be between 0 and 100000")


@dataclass(frozen=True)
class Config:
    layers: tuple[str, ...] = ()
    """Layer names or glob patterns (``layer3.*``) to show; empty shows every discovered layer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topk: TopKConfig = field(default_factory=TopKConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    sanity: SanityConfig = field(default_factory=SanityConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    tsne: TsneConfig = field(default_factory=TsneConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    featurevis: FeatureVisConfig = field(default_factory=FeatureVisConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)


def _error(key: str, why: str, hint: str | None = None) -> ConfigError:
    """``config key 'KEY' WHY``, keeping the key and the reason apart (a flag that set the key
    is named instead of it: see :func:`sitegen.build.load_config`)."""
    err = ConfigError(f"config key {key!r} {why}", hint)
    err.key, err.why = key, why
    return err


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise _error(key, why)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a TOML value against a field type; TOML integers are accepted for floats."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            raise _error(key, f"must be a table ([{key}]), not {type(value).__name__}")
        return _build(typ, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise _error(key, f"must be a list, e.g. {key.split('.')[-1]} = [...]")
        item = typing.get_args(typ)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if not isinstance(value, bool):
            raise _error(key, f"must be true or false, not {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(key, f"must be a whole number, not {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(key, f"must be a number, not {value!r}")
        if not math.isfinite(value):  # TOML allows nan and inf; no key means anything by them
            raise _error(key, f"must be a finite number, not {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise _error(key, f"must be a string in quotes, not {value!r}")
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
    except RecursionError:  # tomllib recurses per nesting level of arrays and inline tables
        raise ConfigError(f"{p.name} nests arrays or tables too deeply", "see site_config.toml for the format") from None
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
