"""Feature visualisation: an image optimised to excite each channel, and each output class.

The recipe is the one of "How convolutional neural networks see the world" (Keras blog) made
readable with Lucid/Lucent's regularisers:

- start from low-amplitude noise around grey;
- the image is parameterised in the Fourier domain with a 1/f amplitude scaling and decorrelated
  colours (Olah et al., "Feature Visualization", 2017): a step of a given size then changes low
  frequencies more than high ones, which suppresses the high-frequency patterns plain pixel ascent
  produces; ``decorrelate = false`` optimises raw pixels (through a sigmoid) instead;
- each step shifts the image by a random jitter of a few pixels, so the image cannot rely on exact
  pixel positions;
- the objective is the channel's mean activation over its feature map (or a class's logit); each
  step is gradient *ascent* with the gradient normalised by its RMS, per image, so the step size is
  the RMS change of the parameters per step whatever the layer's gradient scale;
- the step size falls linearly from ``lr`` to ``lr_end`` over the steps: large steps while far from
  the optimum, small ones at the end, where the random shifts would otherwise keep the image
  moving.  On the shared ResNet-56, 50 steps from 0.2 to 0.01 reach the objective of 64 steps at a
  constant 0.05 (the recipe before it): per channel a median of 103 % of it, over 91 % for
  95 % of the channels (``bench/featurevis_bench.py --quality`` reports the distribution);
- the steps' forward and backward may run in bfloat16 (``precision``; the pass picks it where the
  device computes bf16 natively): the gradient only needs a direction, and every stored objective
  is measured in float32;
- the steps (not the measurements) run eval-mode BatchNorm folded into the convolution before it
  (or, where another call reads that convolution's output, as the multiply-add it is) and give the
  model channels-last images where it accepts them (``fast_steps``, :class:`_StepMode`,
  :mod:`sitegen.fastops`); with the fold, 48 steps left the shared ResNet-20's 5th percentile at
  0.895 of the 64-step recipe's objective (0.914 without it: chaos in the steps' rounding, not a
  trend), 50 steps at 0.92, so the default is 50;
- optionally (``stop_window``, ``stop_gain``), each image stops on its own once its objective has
  converged, and the batch's later steps run on the images still climbing.  At the default 50
  steps images rarely converge before the end (the objective keeps rising while the step size is
  large; measured: a few per cent of the steps saved), so it is off by default; it pays on long
  runs.

Many channels are optimised at once, one per batch element: in eval mode the images of a batch do
not interact, and summing their objectives gives each image its own gradient.  The forward is cut
short after the layer (``capture_outputs(stop_after_last=True)``).  On the CPU the batches run on a
pool of one-thread processes (:mod:`sitegen.workpool`), the deepest first.

The ReLU problem: a channel whose pre-activation is negative everywhere has a zero gradient through
its ReLU, and so does every unit behind a ReLU that is off, and gradient ascent cannot start.
Lucid's remedy, used here for the first quarter of the steps, is the *redirected ReLU*: where a
sample's ordinary ReLU gradient is zero everywhere, the gradient passes anyway wherever it would
raise the input (never where it would push an already negative input lower).  Afterwards the true
gradient is used, so the final image is optimised for the real objective.  A channel that still
ends with a mean activation ≤ 0 is reported as *never excited*.

A grey model (1 input channel) gets grey images: one channel is optimised (its "colour matrix" is
1×1) and the stored picture repeats it in R, G and B.

Results per layer ``i``: ``L{i}.images`` uint8 (C, H, W, 3), ``L{i}.objective`` (C,) the channel's
mean activation on the final (stored, uint8) image, ``L{i}.start`` (C,) the same on the starting
noise, ``L{i}.steps`` (C,) int16 the steps each image took; ``classes.*`` likewise for the logits;
``colour`` the colour matrix used (3×3; 1×1 for grey).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import progress
from ..activation_rules import classify
from ..config import FeatureVisConfig
from ..context import BuildContext
from ..distributed import all_reduce, gather_to_main
from ..errors import ModelLoadError, SitegenError
from ..fastops import FastOps, find_folds
from ..hooks import capture_outputs, get_module, model_guard, run_until
from ..images import as_rgb, default_stats, per_channel
from ..model_loading import logits
from ..planning import PassPlan, Probe, count
from ..workpool import map_items
from .base import AnalysisPass, ItemStore, Result

REDIRECT_FRACTION = 0.25
"""Share of the steps (the first ones) run with redirected ReLU gradients."""

PROBE_STEPS = 4
"""Steps of the ascents the estimate times (one of them redirected, as a quarter of the real ones)."""
MEASURE_STEPS = 2 / 3
"""The objective measured on the start and the final image: two forwards without a backward, about
two thirds of one step."""

# Lucid's square root of the ImageNet colour covariance (columns: principal colour directions scaled
# by the square root of their variance), normalised as Lucid does by its largest column norm; used
# when no images are at hand to estimate one.
_LUCID = np.array([[0.26, 0.09, 0.02],
                   [0.27, 0.00, -0.05],
                   [0.27, -0.09, 0.03]], dtype=np.float64)
IMAGENET_COLOUR = _LUCID / np.linalg.norm(_LUCID, axis=0).max()

FOURIER_SCALE = 4.0
"""Lucid divides the inverse FFT by this constant so the starting image is faint."""


class FeatureVisError(SitegenError):
    """A model whose layer or output cannot be optimised for."""


@dataclass(frozen=True)
class Ascent:
    """The knobs of one optimisation (from :class:`FeatureVisConfig` and the data config)."""

    steps: int
    lr: float
    jitter: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    """One number per input channel (3 for RGB, 1 for grey)."""
    std: tuple[float, ...]
    decorrelate: bool = True
    colour: tuple[tuple[float, ...], ...] = tuple(map(tuple, IMAGENET_COLOUR))
    """channels × channels."""
    seed: int = 0
    lr_end: float | None = None
    """The step size falls linearly from ``lr`` at the first step to this at the last; None keeps
    ``lr`` throughout."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: the steps' forward and backward under bfloat16 autocast (the start and
    the final image are measured in fp32 whatever this says)."""
    fast_steps: bool = False
    """The steps' forward and backward take two shortcuts (:class:`_StepMode`): eval-mode BatchNorm
    as one multiply-add per element in the map's own precision, and the images in channels-last
    memory (``channels_last``).  The start and the final image are measured without them."""
    channels_last: bool = False
    """With ``fast_steps``: the images go to the model channels-last (NHWC), where oneDNN's and
    cuDNN's fastest convolutions are; only for a model that accepts it."""
    stop_window: int = 0
    """Steps per window of the convergence test; 0 runs every image for all ``steps``."""
    stop_gain: float = 0.0
    """An image stops once its mean objective over the last window beats the window before by
    less than this fraction of its size (see :func:`ascend`)."""

    @property
    def channels(self) -> int:
        return len(self.mean)


@dataclass
class AscentResult:
    images: np.ndarray
    """uint8 (N, H, W, 3): the optimised images as stored and shown."""
    objective: np.ndarray
    """float32 (N,): each image's objective, measured on the uint8 image without jitter."""
    start: np.ndarray
    """float32 (N,): the objective of the starting noise (uint8, without jitter)."""
    steps: np.ndarray | None = None
    """int16 (N,): the steps each image took (fewer than ``Ascent.steps`` where it converged)."""
    history: np.ndarray | None = None
    """float32 (steps, N): the objective at every step, on the jittered input that step used (NaN
    after the image stopped)."""


# --- colours and parameterisation ----------------------------------------------------------------


def colour_sqrt(pixels: np.ndarray) -> np.ndarray:
    """The "SVD square root" of the pixel colour covariance, normalised as Lucid's.

    ``pixels`` is uint8 (..., C).  With cov = U diag(λ) Uᵀ the matrix is U diag(√λ), divided by its
    largest column norm: mapping decorrelated unit-variance noise through it gives colours with the
    data's correlations, the strongest direction at unit scale.  For grey pixels (C = 1) it is [[1]].
    """
    c = pixels.shape[-1]
    flat = pixels.reshape(-1, c).astype(np.float64) / 255.0
    if c == 1:
        return np.ones((1, 1))
    if len(flat) < 3:
        return IMAGENET_COLOUR
    cov = np.cov(flat, rowvar=False)
    lam, u = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    lam, u = np.clip(lam[order], 0, None), u[:, order]
    u *= np.where(u.sum(0) < 0, -1.0, 1.0)  # a fixed sign per direction: deterministic, first ≈ +grey
    m = u * np.sqrt(lam)
    norm = np.linalg.norm(m, axis=0).max()
    if not np.isfinite(norm) or norm <= 0:  # a constant-colour data set has no correlations to use
        m, norm = IMAGENET_COLOUR, 1.0
    return m / norm


def fourier_scale(h: int, w: int, decay: float = 1.0) -> torch.Tensor:
    """(h, w // 2 + 1) amplitude of each rfft2 coefficient: 1/f, unitary (Lucid's ``fft_image``)."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    freq = torch.sqrt(fx * fx + fy * fy)
    scale = 1.0 / torch.clamp(freq, min=1.0 / max(h, w)) ** decay
    return (scale * np.sqrt(h * w)).float()


def default_colour(channels: int) -> np.ndarray:
    """The colour matrix without images to estimate one: Lucid's ImageNet one, or [[1]] for grey."""
    return IMAGENET_COLOUR if channels == 3 else np.eye(channels)


class ImageParam:
    """N images as optimisable parameters: ``rgb()`` maps them to (N, C, H, W) in (0, 1), C the
    model's input channels (3, or 1 for a grey model)."""

    def __init__(self, init: torch.Tensor, a: Ascent):
        self.a = a
        self.params = init.clone().requires_grad_(True)
        h, w = a.size
        dev = init.device
        self.colour = torch.tensor(np.asarray(a.colour, dtype=np.float32), device=dev)
        self.scale = fourier_scale(h, w).to(dev)[None, None] if a.decorrelate else None

    @staticmethod
    def shape(n: int, a: Ascent) -> tuple[int, ...]:
        h, w = a.size
        return (n, a.channels, h, w // 2 + 1, 2) if a.decorrelate else (n, a.channels, h, w)

    def rgb(self, params: torch.Tensor | None = None) -> torch.Tensor:
        """The images of ``params`` (default: all of them; a subset of rows may be given)."""
        params = self.params if params is None else params
        if not self.a.decorrelate:
            return torch.sigmoid(params)
        spectrum = torch.view_as_complex(params) * self.scale
        t = torch.fft.irfft2(spectrum, s=self.a.size) / FOURIER_SCALE
        t = torch.einsum("ij,njhw->nihw", self.colour, t)  # decorrelated -> RGB (grey: ×1)
        return torch.sigmoid(t)


def starting_params(units: list[int], a: Ascent, key: str, device: torch.device | None = None) -> torch.Tensor:
    """Low-amplitude noise (σ = 0.01, as Lucid) for the images of ``units`` in the group ``key``:
    each unit's noise comes from its own seed (seed, key, unit), so an image does not depend on
    which other units share its batch."""
    shape = ImageParam.shape(1, a)[1:]
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(_seed(a.seed, f"{key}\0{u}"))) * 0.01
             for u in units]
    out = torch.stack(noise) if noise else torch.zeros(ImageParam.shape(0, a))
    return out.to(device or torch.device("cpu"))


def _seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()[:8], "little") \
        & 0x7FFF_FFFF_FFFF_FFFF


def jitter(x: torch.Tensor, amount: int, g: torch.Generator) -> torch.Tensor:
    """Shift the batch by a random (dy, dx) in [-amount, amount], filling the border by reflection."""
    if amount <= 0:
        return x
    h, w = x.shape[-2:]
    pad = min(amount, h - 1, w - 1)
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    return padded[..., dy:dy + h, dx:dx + w]


# --- redirected ReLU -------------------------------------------------------------------------------


class _RedirectedReLU(torch.autograd.Function):
    """ReLU forward; backward as Lucid's ``redirected_relu_grad``, per sample of the batch.

    ``grad`` is d(objective)/d(output), the objective being *maximised*.  Where a sample's ordinary
    ReLU gradient is zero everywhere, the redirected one is used: the incoming gradient wherever the
    input is > 0, and where it is ≤ 0 only if it would raise the input.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        # The output is saved, as autograd's own ReLU saves it (no copy of the input: one map less
        # written per ReLU, 2-3 % of a feature-vis ascent); a model that later changed it in place
        # could not be trained either, and autograd would say so here as it does there.  The output
        # tells a positive input from the rest, which is all the backward needs.
        if inplace:
            ctx.mark_dirty(x)
            y = torch.relu_(x)
        else:
            y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (y,) = ctx.saved_tensors
        relu_grad = torch.ops.aten.threshold_backward(grad, y, 0)  # grad where x > 0, else 0
        # A sample is blocked when its whole gradient is zero: its largest magnitude is 0 (NaN is
        # not).  amax of the magnitudes rather than any(): torch's any() of a bfloat16 map runs
        # 3.7 x slower (600 against 160 us for a 64x16x32x32 map, measured), and it ran on every
        # ReLU of every redirected step.
        if grad.dim() < 2:
            blocked = relu_grad.abs().amax() == 0
        else:  # over the sample's own dims, in place (flatten would copy a channels-last map)
            blocked = relu_grad.abs().amax(dim=tuple(range(1, grad.dim())), keepdim=True) == 0
        if not bool(blocked.any()):  # every sample has an ordinary gradient: nothing to redirect
            return relu_grad, None
        redirected = torch.where((y <= 0) & (grad < 0), torch.zeros_like(grad), grad)
        return torch.where(blocked, redirected, relu_grad), None


class _RedirectMode(TorchFunctionMode):
    """Sends every ReLU of the forward (nn.ReLU, F.relu, torch.relu, in place or not) through
    :class:`_RedirectedReLU`; everything else runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = classify(func, args, kwargs)
        if call is not None and call.kind == "relu":
            return _RedirectedReLU.apply(call.x, call.inplace)
        return func(*args, **kwargs)


# --- cheaper steps ---------------------------------------------------------------------------------


_StepMode = FastOps
"""The steps' shortcuts (:mod:`sitegen.fastops`): eval-mode BatchNorm as its affine map in the
map's own precision, gradients of channels-last maps kept channels-last.  Used only for the steps' gradient (a direction); every stored
objective is measured with the real BatchNorm."""


# --- objectives ------------------------------------------------------------------------------------

Objective = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``objective(x, rows)``: normalised input batch (n, C, H, W) -> objective per image (n,), where
``rows`` (n,) says which of the units each image of ``x`` is for (None: all of them, in order)."""


def _pick(units: torch.Tensor, rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return (units if rows is None else units[rows.cpu()]).to(device)


@contextlib.contextmanager
def channel_objective(model: nn.Module, layer: str, channels: torch.Tensor) -> Iterator[Objective]:
    """Image ``i``'s objective: the spatial mean of channel ``channels[i]`` of ``layer``; the forward
    stops after the layer."""
    get_module(model, layer)
    with capture_outputs(model, [layer], stop_after_last=True) as store:
        def objective(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            store.clear()
            run_until(model, x)
            if layer not in store:
                raise FeatureVisError(f"layer {layer!r} never ran during the forward pass")
            out = store[layer]
            if out.dim() != 4:
                raise FeatureVisError(f"layer {layer!r} outputs shape {tuple(out.shape)}, not a feature map",
                                      "choose convolutional layers (`sitegen layers` lists them)")
            picked = out[torch.arange(len(x), device=out.device), _pick(channels, rows, out.device)]
            return picked.flatten(1).mean(1)

        yield objective


@contextlib.contextmanager
def class_objective(model: nn.Module, classes: torch.Tensor) -> Iterator[Objective]:
    """Image ``i``'s objective: the logit of class ``classes[i]`` (the model's output)."""
    def objective(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        out = logits(model(x))  # a tensor, or Inception's tuple, or a dict with "logits"
        return out[torch.arange(len(x), device=out.device), _pick(classes, rows, out.device)]

    yield objective


# --- the ascent ------------------------------------------------------------------------------------


def step_size(a: Ascent, step: int) -> float:
    """The RMS change of the parameters at ``step`` (0-based): ``lr``, or falling linearly from
    ``lr`` to ``lr_end`` over the steps."""
    if a.lr_end is None or a.steps <= 1:
        return a.lr
    return a.lr + (a.lr_end - a.lr) * step / (a.steps - 1)


def converged(values: torch.Tensor, window: int, gain: float) -> torch.Tensor:
    """Which images have stopped improving, from their objectives at the latest ``2 * window`` steps
    (``values`` (2·window, n), oldest first): the mean of the last window beats the mean of the
    window before by less than ``gain`` times its magnitude.  Means over windows, because each step
    measures a randomly shifted image and the single values jitter."""
    before, last = values[:window].mean(0), values[window:].mean(0)
    return (last - before) < gain * last.abs()


def ascend(objective: Objective, init: torch.Tensor, a: Ascent, key: str, record: bool = False,
           folds: dict | None = None) -> AscentResult:
    """Normalised gradient ascent of ``objective`` from the parameters ``init`` (see module doc).

    With ``a.stop_window`` set, each image stops on its own once its objective has converged
    (:func:`converged`, tested after every step from ``2 * stop_window`` steps past the redirected
    phase on): the forward and backward then run on the images still climbing only, and a stopped
    image keeps the parameters it stopped with.  A step's random shift is drawn whether or not
    images have stopped, so each image sees the same shifts as in a full-length run.

    The caller runs it under :func:`sitegen.hooks.model_guard` (eval mode, frozen parameters):
    only the image receives gradients.  Deterministic for given ``init``, ``a`` and ``key`` (and
    thread count and device: the stops follow the objective's floating-point values).
    """
    param = ImageParam(init, a)
    g = torch.Generator().manual_seed(_seed(a.seed, key + "\0jitter"))
    dev = init.device
    n = len(init)
    mean = torch.tensor(a.mean, dtype=torch.float32, device=dev).view(1, a.channels, 1, 1)
    std = torch.tensor(a.std, dtype=torch.float32, device=dev).view(1, a.channels, 1, 1)
    start = _measure(objective, _quantise(param.rgb().detach()), mean, std)
    redirect_until = int(round(a.steps * REDIRECT_FRACTION))
    params = param.params.detach()
    active = torch.arange(n)  # rows still climbing (on the CPU: it indexes, it is not computed on)
    taken = np.full(n, a.steps, dtype=np.int16)
    values = torch.full((a.steps, n), float("nan"))
    check_from = redirect_until + 2 * a.stop_window
    # One mode for every step: what it derives from the frozen weights is made once; the
    # convolutions of ``folds`` (sitegen.fastops.find_folds) run with their BatchNorm folded in.
    fast = _StepMode(folds=folds) if a.fast_steps else contextlib.nullcontext()
    for step in range(a.steps):
        if not len(active):
            break
        everyone = len(active) == n
        leaf = (params if everyone else params[active.to(dev)]).detach().requires_grad_(True)
        x = (jitter(param.rgb(leaf), a.jitter, g) - mean) / std
        if a.fast_steps and a.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (_RedirectMode() if step < redirect_until else contextlib.nullcontext()), \
                fast, \
                torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            value = objective(x, None if everyone else active).float()
            (grad,) = torch.autograd.grad(value.sum(), leaf)
        values[step, active] = value.detach().cpu()
        rms = grad.flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (grad.dim() - 1))
        with torch.no_grad():
            moved = leaf + step_size(a, step) * grad / (rms + 1e-12)
            if everyone:
                params = moved
            else:
                params[active.to(dev)] = moved
        if a.stop_window and step + 1 >= check_from and step + 1 < a.steps:
            done = converged(values[step + 1 - 2 * a.stop_window:step + 1, active], a.stop_window, a.stop_gain)
            if bool(done.any()):
                taken[active[done].numpy()] = step + 1
                active = active[~done]
    images = _quantise(param.rgb(params).detach())
    final = _measure(objective, images, mean, std)
    return AscentResult(
        images=as_rgb(images.permute(0, 2, 3, 1).cpu().numpy()),  # a grey image is stored in grey RGB
        objective=final, start=start, steps=taken,
        history=values.numpy() if record else None,
    )


def _quantise(rgb: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> uint8, as stored and shown."""
    return (rgb * 255.0).round().clamp(0, 255).to(torch.uint8)


def _measure(objective: Objective, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        x = (images.float() / 255.0 - mean) / std
        return objective(x).float().cpu().numpy()


def visualise_channels(model: nn.Module, layer: str, channels: list[int], a: Ascent,
                       record: bool = False, device: torch.device | None = None) -> AscentResult:
    """Optimised images for ``channels`` of ``layer``, in one batch.  The model is left as found."""
    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    key = f"layer\0{layer}"
    init = starting_params(channels, a, key, dev)
    with model_guard(model):
        folds = _folds(model, a, dev, [layer])
        with channel_objective(model, layer, torch.tensor(channels)) as objective:
            return ascend(objective, init, a, key, record, folds)


def visualise_classes(model: nn.Module, classes: list[int], a: Ascent,
                      record: bool = False, device: torch.device | None = None) -> AscentResult:
    """Optimised images maximising the logits of ``classes``, in one batch."""
    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    init = starting_params(classes, a, "classes", dev)
    with model_guard(model):
        folds = _folds(model, a, dev, [])
        with class_objective(model, torch.tensor(classes)) as objective:
            return ascend(objective, init, a, "classes", record, folds)


def _folds(model: nn.Module, a: Ascent, dev: torch.device, read: list[str]) -> dict:
    """With fast steps, the convolutions whose BatchNorm the steps fold in (none otherwise)."""
    if not a.fast_steps:
        return {}
    return find_folds(model, torch.zeros((1, a.channels, *a.size), device=dev), read, stop=bool(read))


# --- the pass --------------------------------------------------------------------------------------


class FeatureVisPass(AnalysisPass):
    name = "featurevis"
    version = 4  # the redirected ReLU reads its output (an input of exactly 0 is blocked like a negative one)
    distributed = True
    config: FeatureVisConfig

    def ascent(self, ctx: BuildContext, colour: np.ndarray | None = None) -> Ascent:
        """The pass's ascent; ``colour`` (default: the data's colour matrix, which decodes images
        for its statistics) replaces the colour matrix, as the plan's probe does."""
        cfg = self.config
        h, w = (cfg.image_size, cfg.image_size) if cfg.image_size else ctx.input_size
        jit = cfg.jitter if cfg.jitter >= 0 else max(1, round(min(h, w) / 16))
        c = ctx.channels
        if colour is None:
            colour = colour_sqrt(_sample_pixels(ctx)) if cfg.decorrelate else default_colour(c)
        mean0, std0 = default_stats(c)  # a resolved config has them; a hand-made context may not
        return Ascent(steps=cfg.steps, lr=cfg.lr, lr_end=cfg.lr_end, jitter=jit, size=(h, w),
                      mean=per_channel(ctx.config.data.mean or mean0, c), std=per_channel(ctx.config.data.std or std0, c),
                      decorrelate=cfg.decorrelate, colour=tuple(map(tuple, colour.tolist())), seed=cfg.seed,
                      precision=precision(cfg.precision, ctx.device),
                      fast_steps=True, channels_last=fast_layout(ctx, (h, w)),
                      stop_window=cfg.stop_window if cfg.stop_gain > 0 else 0, stop_gain=cfg.stop_gain)

    def batch_size(self, ctx: BuildContext) -> int:
        """``featurevis.batch_size``, or what the free memory holds (``ctx.batch_size``: at most 256 on
        a GPU, 64 on the CPU): a ResNet-50 at 224 px on a 16 GB GPU gets fewer than 256."""
        return self.config.batch_size or ctx.batch_size(0)

    def plan(self, ctx: BuildContext, probe: Probe) -> PassPlan:
        """Per layer, ``channels / batch`` ascents of ``steps`` steps (a forward to the layer and a
        backward each); per class batch, ascents through the whole model.  An ascent of PROBE_STEPS
        steps is timed as the pass runs it on 1 and on a few channels at up to three layers (the
        layers between interpolated by depth) and scaled to the configured steps."""
        cfg = self.config
        h, w = (cfg.image_size, cfg.image_size) if cfg.image_size else ctx.input_size
        # The run's ascent with the default colour matrix: timing does not depend on its values, its
        # shape does (1×1 for a grey model), and the data's would decode images here.
        a = self.ascent(ctx, colour=default_colour(ctx.channels))
        quick = dataclasses.replace(a, steps=PROBE_STEPS)
        factor = (cfg.steps + MEASURE_STEPS) / (PROBE_STEPS + MEASURE_STEPS)
        bs = self.batch_size(ctx)
        workers = ctx.pass_workers(bs)
        names = [l.name for l in ctx.layers]

        def measure(name: str):
            channels = ctx.layer(name).channels
            return probe.fit(f"featurevis@{name}:{h}x{w}:{cfg.decorrelate}", lambda m: visualise_channels(
                ctx.net, name, [c % channels for c in range(m)], quick, device=ctx.device), cap=bs, workers=workers)

        fits = probe.per_layer(f"featurevis:{h}x{w}:{cfg.decorrelate}", names, measure)
        seconds = sum(fits[n].scaled(factor).batched(ctx.layer(n).channels, bs) for n in names)
        images = sum(ctx.layer(n).channels for n in names)
        n_classes = logit_count(ctx.net, a, ctx.device)[0] if cfg.classes else 0
        if n_classes:
            fit = probe.fit(f"featurevis:classes:{h}x{w}:{cfg.decorrelate}", lambda m: visualise_classes(
                ctx.net, [c % n_classes for c in range(m)], quick, device=ctx.device), cap=bs, workers=workers)
            seconds += fit.scaled(factor).batched(n_classes, bs)
        seconds /= max(1, ctx.dist.world)
        seconds += min(256, len(ctx.images)) * probe.decode_seconds()  # the colour statistics
        return PassPlan(self.name, seconds, {"images": images + n_classes, "classes": n_classes,
                                             "steps": cfg.steps, "batch": bs},
                        f"{count(images + n_classes)} images × {cfg.steps} steps at {w}×{h} px")

    def run(self, ctx: BuildContext) -> Result:
        a = self.ascent(ctx)
        bs = self.batch_size(ctx)
        if ctx.dist.active:  # the default follows each rank's free memory; the items must be the same on all
            bs = int(all_reduce(torch.tensor([bs]), op=torch.distributed.ReduceOp.MIN).item())
        arrays: dict[str, np.ndarray] = {"colour": np.asarray(a.colour, dtype=np.float32)}
        meta: dict[str, Any] = {"layers": [l.name for l in ctx.layers], "steps": a.steps, "lr": a.lr,
                                "lr_end": a.lr_end, "precision": a.precision,
                                "jitter": a.jitter, "size": list(a.size), "decorrelate": a.decorrelate,
                                "seed": a.seed, "redirect_steps": int(round(a.steps * REDIRECT_FRACTION)),
                                "stop_window": a.stop_window, "stop_gain": a.stop_gain}
        if a.precision == "bf16":  # the page says so too (templates/featurevis.html)
            progress.info(f"feature visualisation: steps in bfloat16 on {ctx.device.type} (featurevis.precision = "
                          f"{self.config.precision!r}; each image's objective is measured in float32)")
        n_classes, reason = logit_count(ctx.net, a, ctx.device) if self.config.classes else (0, "featurevis.classes is false")
        meta["classes_reason"] = reason
        # Work items: each batch of channels of each layer (its index li), then each batch of classes
        # (li = -1).  Under torchrun each rank optimises its share and rank 0 gathers the images (the
        # batches, and so every image's seeds and jitter, are the same as in one process).
        items = [(li, list(range(lo, min(lo + bs, info.channels))))
                 for li, info in enumerate(ctx.layers) for lo in range(0, info.channels, bs)]
        items += [(-1, list(range(lo, min(lo + bs, n_classes)))) for lo in range(0, n_classes or 0, bs)]
        mine = ctx.dist.items(len(items))
        store = ItemStore(ctx.scratch)  # finished items survive a kill; the next run reads them back
        done: dict[int, AscentResult] = {}
        span = lambda i: (items[i][0], items[i][1][0], items[i][1][-1])  # noqa: E731

        def work(i: int) -> AscentResult:
            li, units = items[i]
            return (visualise_classes(ctx.net, units, a, device=ctx.device) if li < 0 else
                    visualise_channels(ctx.net, ctx.layers[li].name, units, a, device=ctx.device))

        with progress.bar("feature visualisation", sum(len(items[i][1]) for i in mine), "images") as advance:
            todo = []
            for i in mine:
                loaded = _load_item(store, i, len(items[i][1]), a, span(i))
                if loaded is None:
                    todo.append(i)
                else:
                    done[i] = loaded
                    advance(len(items[i][1]))
            # A pool takes the deepest ascents first (the classes' run through the whole model); an
            # item's images do not depend on the order nor on the worker.
            depth = lambda i: (items[i][0] if items[i][0] >= 0 else len(ctx.layers), len(items[i][1]))  # noqa: E731
            for i, result in map_items(work, todo, ctx.pass_workers(bs), cost=depth):
                done[i] = result
                store.save(i, {k: getattr(result, k) for k in _ITEM_FIELDS}, span(i))
                advance(len(items[i][1]))
        if ctx.dist.active:
            gathered = gather_to_main(done)
            done = {i: r for part in (gathered or [done]) for i, r in part.items()}
        parts: dict[int, list[AscentResult]] = {li: [] for li in range(-1, len(ctx.layers))}
        for i in sorted(done):  # item order is layer order, then channel order
            parts[items[i][0]].append(done[i])
        for li in range(len(ctx.layers)):
            _store(arrays, f"L{li}", parts[li], a)
        meta["classes"] = 0
        if n_classes:
            _store(arrays, "classes", parts[-1], a)
            meta["classes"] = n_classes
        store.clear()
        return Result(meta=meta, arrays=arrays)


_ITEM_FIELDS = ("images", "objective", "start", "steps")
"""The :class:`AscentResult` arrays the pass keeps, saved per work item."""


def _load_item(store: ItemStore, i: int, n: int, a: Ascent, span: tuple[int, ...]) -> AscentResult | None:
    """Work item ``i`` (``n`` images covering ``span``) as saved by an earlier, interrupted run, or None."""
    arrays = store.load(i, list(_ITEM_FIELDS), span)
    if arrays is None:
        return None
    want = {"images": ((n, *a.size, 3), np.uint8), "objective": ((n,), np.float32), "start": ((n,), np.float32),
            "steps": ((n,), np.int16)}
    if any(arrays[k].shape != shape or arrays[k].dtype != dtype for k, (shape, dtype) in want.items()):
        return None
    return AscentResult(**arrays)


def precision(requested: str, device: torch.device) -> str:
    """``featurevis.precision`` resolved on ``device``: ``auto`` is bf16 where the device computes it
    natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX, where oneDNN's bf16 convolutions
    ran a ResNet-56 step 1.9x faster than fp32), else fp32 (emulated bf16 would be slower)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        try:
            caps = torch.cpu.get_capabilities()
        except (AttributeError, RuntimeError):  # an older torch without the query: stay exact
            return "fp32"
        return "bf16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "fp32"
    return "fp32"


def fast_layout(ctx: BuildContext, size: tuple[int, int]) -> bool:
    """Whether the ascent's images go to the model channels-last (see
    :meth:`BuildContext.backward_channels_last`: a ResNet-56 step runs 10–25 % faster on NHWC)."""
    return ctx.backward_channels_last(size)


def logit_count(model: nn.Module, a: Ascent, device: torch.device) -> tuple[int, str]:
    """How many logits the model outputs for an image of the ascent's size (0 and why, if none)."""
    try:
        with model_guard(model), torch.no_grad():
            out = model(torch.zeros((1, a.channels, *a.size), device=device))
    except Exception as e:  # e.g. a fixed-size classifier head and a different image_size
        return 0, f"the model cannot run on a {a.size[1]}×{a.size[0]} image ({type(e).__name__})"
    try:
        return int(logits(out).shape[1]), ""
    except ModelLoadError as e:
        return 0, e.message


def _store(arrays: dict[str, np.ndarray], prefix: str, parts: list[AscentResult], a: Ascent) -> None:
    h, w = a.size
    arrays[f"{prefix}.images"] = np.concatenate([p.images for p in parts]) if parts else \
        np.zeros((0, h, w, 3), np.uint8)
    arrays[f"{prefix}.objective"] = np.concatenate([p.objective for p in parts]).astype(np.float32) if parts else \
        np.zeros(0, np.float32)
    arrays[f"{prefix}.start"] = np.concatenate([p.start for p in parts]).astype(np.float32) if parts else \
        np.zeros(0, np.float32)
    arrays[f"{prefix}.steps"] = np.concatenate([p.steps for p in parts]).astype(np.int16) if parts else \
        np.zeros(0, np.int16)


def _sample_pixels(ctx: BuildContext, n: int = 256) -> np.ndarray:
    """uint8 pixels of up to ``n`` decodable images, for the colour statistics."""
    idx = list(range(min(n, len(ctx.images))))
    chunks = [b.pixels[b.ok].numpy() for b in ctx.batches(idx)]
    return np.concatenate(chunks) if chunks else np.zeros((0, ctx.channels), np.uint8)


def never_excited(result: Result, li: int) -> np.ndarray:
    """Channels of selected layer ``li`` whose best image leaves the mean activation ≤ 0."""
    return np.nonzero(result.arrays[f"L{li}.objective"] <= 0)[0]
