"""Turn what people actually save into a model, safely.

Accepted: a plain state dict; a checkpoint dict holding one under ``state_dict``, ``model``,
``model_state_dict`` or ``net``; keys with a ``module.`` (DataParallel) or ``_orig_mod.``
(torch.compile) prefix.  The architecture comes from ``--arch``.  Unpickling a whole ``nn.Module``
runs code from the file, so it needs ``trust_pickle``; everything else loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pickle
import sys
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import ModelLoadError

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedModel:
    model: nn.Module
    weights_hash: str
    """sha256 of the checkpoint file: part of every cache key."""
    arch: str
    path: Path
    num_classes: int | None


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def read_checkpoint(path: Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` with weights_only unless trusted; every failure becomes one clear message."""
    name = path.name
    if not path.exists():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist", "check the path")
    if path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a folder, not a checkpoint file",
                             "pass the checkpoint file itself (e.g. the .pt or .pth file inside it)")
    if not path.is_file():  # a FIFO or device: reading it could block or never end
        raise ModelLoadError(f"{str(path)!r} is not a regular file", "pass the checkpoint file itself")
    if _is_torchscript(path):
        raise ModelLoadError(
            f"{name} is a TorchScript model; sitegen needs the eager PyTorch model to hook its layers",
            "save `model.state_dict()` with torch.save and pass the architecture with --arch",
        )
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ModelLoadError(f"cannot read {name}: {e.strerror}", "check the file's permissions") from None
    if magic == b"\x93NUMPY":
        raise ModelLoadError(f"{name} is a NumPy .npy array, not a PyTorch checkpoint",
                             "save the weights with torch.save(model.state_dict(), path)")
    head = _head(path)
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        raise ModelLoadError(f"{name} is a Git LFS pointer (a small text file standing in for the checkpoint), "
                             "not the checkpoint itself",
                             "run `git lfs pull` in its repository to download the real file")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it was not written with; the error below says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e) and _text_start(head) is not None:
            raise _unreadable(name, head, e) from None
        if "Unsupported operand" in str(e):  # not a torch.save file: a raw pickle, or another format
            raise ModelLoadError(
                f"{name} is not a checkpoint torch.load can read without running code from it (a raw pickle "
                "or another file format)",
                "save `model.state_dict()` with torch.save; or, only for a file you trust, add --trust-pickle",
            ) from None
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise ModelLoadError(
                f"{name} holds pickled Python objects (e.g. a whole nn.Module); unpickling them runs code "
                "from the file, so sitegen refuses by default",
                "save `model.state_dict()` and pass --arch; or, only for a file you trust, add --trust-pickle",
            ) from None
        raise _unreadable(name, head, e) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors... for damaged files
        raise _unreadable(name, head, e) from None


def _head(path: Path, size: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _text_start(head: bytes) -> str | None:
    """The first line of ``head`` when the file looks like text (UTF-8, no NUL, printable), else None."""
    if not head or b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head[:-4].decode("utf-8", "ignore") if len(head) > 4 else ""  # a character cut at the end
        if not text:
            return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    if not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    return line[:40]


def _unreadable(name: str, head: bytes, e: BaseException) -> ModelLoadError:
    """Why ``torch.load`` could not read a file: what the file is when that is plain (text, a
    truncated archive), else torch's own first sentence."""
    hint = "check that the file was written by torch.save and is complete"
    start = _text_start(head)
    if start is not None:
        return ModelLoadError(f"{name} is not a readable PyTorch checkpoint: it is a text file"
                              + (f" (it starts with {start!r})" if start else ""),
                              "pass the checkpoint written by torch.save (a zip archive), not a log or notes file")
    if head.startswith(b"PK") and "central directory" in str(e):
        return ModelLoadError(f"{name} is not a readable PyTorch checkpoint (it is truncated or damaged: "
                              "its zip archive ends before its table of contents)", hint)
    return ModelLoadError(f"{name} is not a readable PyTorch checkpoint ({_short(e)})", hint)


def _short(e: BaseException, limit: int = 160) -> str:
    """``Type: first sentence`` of an exception's message, never cut inside a word."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    text = lines[0]
    if len(text) > limit:
        end = text.rfind(". ", 0, limit)
        text = text[:end + 1] if end > 0 else text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return f"{type(e).__name__}: {text}"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract(obj: Any, name: str) -> nn.Module | dict[str, torch.Tensor]:
    """The model or the state dict inside a loaded checkpoint object."""
    if isinstance(obj, nn.Module):
        return obj
    if _is_state_dict(obj):
        return strip_prefixes(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner
            if _is_state_dict(inner):
                return strip_prefixes(inner)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ModelLoadError(
            f"{name} is a dict without a state dict (keys: {keys})",
            f"sitegen looks for a dict of tensors, or one under {', '.join(STATE_DICT_KEYS)}",
        )
    kind = type(obj).__name__
    raise ModelLoadError(f"{name} holds {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}, not a model or a state dict",
                         "save `model.state_dict()` with torch.save")


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove prefixes that wrappers add to every key (DataParallel's ``module.``).

    The result keeps the state dict's ``_metadata`` (the version each module was saved with,
    which some modules read while loading: torchvision's MNASNet refuses a state dict without it),
    its keys stripped the same way."""
    meta = getattr(sd, "_metadata", None)
    out: dict[str, torch.Tensor] = OrderedDict(sd)
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if out and all(k.startswith(p) for k in out):
                out = OrderedDict((k[len(p):], v) for k, v in out.items())
                if meta is not None:
                    bare = p[:-1]  # the wrapper's own entry ("module") becomes the root ("")
                    meta = OrderedDict(("" if k == bare else k[len(p):] if k.startswith(p) else k, v)
                                       for k, v in meta.items() if k == bare or k.startswith(p) or k == "")
                changed = True
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def infer_num_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    """Output size of the classifier: the last weight in the state dict's order that is 2-D (a
    Linear) or a 1×1 convolution's (SqueezeNet's and other heads written as convolutions)."""
    last = None
    for k, v in sd.items():
        if k.endswith("weight") and (v.ndim == 2 or (v.ndim == 4 and tuple(v.shape[2:]) == (1, 1))):
            last = v
    return int(last.shape[0]) if last is not None else None


def _factory_from_spec(spec: str) -> Callable[..., nn.Module]:
    if ":" not in spec:
        raise ModelLoadError(
            f"--arch {spec!r} is not of the form SOURCE:NAME",
            "use torchvision:resnet50, path/to/net.py:resnet56 or mypkg.models:build",
        )
    source, attr = spec.rsplit(":", 1)
    if source == "torchvision":
        import torchvision.models as tvm

        if attr not in tvm.list_models():
            raise ModelLoadError(f"torchvision has no model {attr!r}",
                                 "`python -c 'import torchvision; print(torchvision.models.list_models())'` lists them")
        return lambda **kw: tvm.get_model(attr, weights=None, **kw)
    if source.endswith(".py") or "/" in source or "\\" in source:
        module = _import_file(Path(source).expanduser(), source)
    else:
        # The console script's sys.path lacks the working folder that `python -m` would have.
        _on_path(Path.cwd())
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise ModelLoadError(f"cannot import module {source!r} for --arch ({_short(e)})",
                                 "check the module name, or give a file path: path/to/net.py:NAME") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelLoadError(f"{source} has no callable {attr!r}",
                             f"callables there: {', '.join(public[:12])}")
    return factory


def _on_path(folder: Path) -> None:
    """Put ``folder`` first on the import path (once), as Python does for a script's own folder:
    the model file's imports of its neighbours then work, at import time and later (a factory or a
    forward may import lazily)."""
    entry = str(folder)
    if entry not in sys.path:
        sys.path.insert(0, entry)


def _package_root(path: Path) -> tuple[Path, str] | None:
    """(folder above the outermost package, dotted module name) when ``path`` lies in a package
    (its folder has an ``__init__.py``), so its relative imports resolve; else None."""
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.name.isidentifier() and folder.parent != folder:
        parts.insert(0, folder.name)
        folder = folder.parent
    return (folder, ".".join(parts)) if len(parts) > 1 else None


def _import_file(path: Path, source: str):
    """Import the architecture file ``path`` with its folder on the import path: ``from blocks
    import body`` beside it works, and so do relative imports inside a package (then the file is
    imported by its dotted name from the package's parent folder)."""
    if not path.is_file():
        raise ModelLoadError(f"architecture file {source!r} does not exist", "check the path in --arch")
    path = path.resolve()
    in_package = _package_root(path)
    try:
        if in_package is not None and path.stem.isidentifier():
            root, dotted = in_package
            _on_path(root)
            _on_path(path.parent)
            module = importlib.import_module(dotted)
            if Path(getattr(module, "__file__", "") or "").resolve() != path:
                raise ImportError(f"{dotted!r} is already imported from {module.__file__}")
            return module
        _on_path(path.parent)
        mod_name = f"sitegen_user_arch_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        return module
    except Exception as e:
        hint = None
        if isinstance(e, ImportError):
            hint = (f"sitegen imports {path.name} with its folder ({path.parent}) on the import path"
                    + (f", and its package from {in_package[0]}" if in_package else "")
                    + "; install the missing module, or put it beside the file")
        raise ModelLoadError(f"importing {source} failed: {_short(e)}", hint) from None


def build_architecture(spec: str, sd: Mapping[str, torch.Tensor] | None) -> nn.Module:
    factory = _factory_from_spec(spec)
    kwargs: dict[str, Any] = {}
    n = infer_num_classes(sd) if sd is not None else None
    if n is not None and _accepts(factory, "num_classes"):
        kwargs["num_classes"] = n
    model = _call(factory, spec, kwargs)
    if sd is not None:
        aux = _aux_heads(model, sd)
        if aux is not None:
            # Inception v3 and GoogLeNet train with auxiliary classifiers, unused at evaluation, and
            # checkpoints come with or without them: build the model the way the weights were saved.
            model = _call(factory, spec, {**kwargs, "aux_logits": aux})
    return model


def _call(factory: Callable[..., Any], spec: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # torchvision's GoogLeNet and Inception v3 warn that their default weight init will change;
            # the weights are loaded right after, so the init does not matter.
            warnings.filterwarnings("ignore", message=".*default weight initialization.*")
            model = factory(**kwargs)
    except Exception as e:
        raise ModelLoadError(f"calling {spec} failed: {_short(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _aux_heads(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> bool | None:
    """``aux_logits`` to rebuild ``model`` with so that its auxiliary heads match the checkpoint's,
    or None when they already do (or the model has no ``aux_logits`` switch)."""
    if not isinstance(getattr(model, "aux_logits", None), bool):
        return None
    heads = {n for n, _ in model.named_children() if n.lower().startswith("aux")}
    if not heads:
        return None
    in_model = any(k.split(".", 1)[0] in heads for k in model.state_dict())
    in_sd = any(k.split(".", 1)[0] in heads for k in sd)
    return in_sd if in_sd != in_model else None


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], name: str, spec: str) -> None:
    """Strict load, with the missing, unexpected and mis-shaped keys named on failure."""
    expected = model.state_dict()
    # Checkpoints older than PyTorch 0.4.1 lack BatchNorm's counter, which load_state_dict fills in.
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_count(missing, 'key')} ({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {_count(unexpected, 'key')} ({', '.join(unexpected[:4])}{', …' if len(unexpected) > 4 else ''})")
        if shapes:
            parts.append(f"{_count(shapes, 'shape mismatch', 'shape mismatches')} ({'; '.join(shapes[:3])})")
        raise ModelLoadError(
            f"the weights in {name} do not fit the architecture {spec}: {'; '.join(parts)}",
            "check that --arch names the architecture that saved these weights",
        )
    if getattr(sd, "_metadata", None) is None:
        sd = _with_versions(model, sd, expected)
    model.load_state_dict(sd, strict=True)


def _with_versions(model: nn.Module, sd: Mapping[str, torch.Tensor],
                   expected: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A state dict copied into a plain ``dict`` has lost the module versions it was saved with
    (``_metadata``); some modules refuse to load without one (torchvision's MNASNet).  The shapes
    match this architecture, so its own versions stand in, but only for modules whose every
    parameter and buffer the checkpoint has: a module that lacks one (a BatchNorm saved before
    PyTorch 0.4.1, without ``num_batches_tracked``) keeps "no version", which tells it to fill the
    gap in as it always did."""
    versions = getattr(expected, "_metadata", None)
    if versions is None:
        return sd
    meta = OrderedDict()
    for prefix, m in model.named_modules():
        own = [f"{prefix}.{k}" if prefix else k for k, _ in
               (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))]
        if prefix in versions and all(k in sd for k in own if k in expected):
            meta[prefix] = versions[prefix]
    out = OrderedDict(sd)
    out._metadata = meta  # type: ignore[attr-defined]
    return out


def _count(items, one: str, many: str | None = None) -> str:
    return f"{len(items)} {one if len(items) == 1 else many or one + 's'}"


def check_finite(model: nn.Module, name: str) -> None:
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelLoadError(
            f"{name} has NaN or infinite values in {_count(bad, 'tensor')} ({', '.join(bad[:4])})",
            "the checkpoint was saved from a diverged run; use an earlier checkpoint",
        )


LOGIT_KEYS = ("logits", "out", "output")
"""Keys of a dict output holding the class scores (HuggingFace's ``logits``, torchvision's ``out``)."""


def logits(output: Any) -> torch.Tensor:
    """The (batch, classes) scores in what a model's forward returned, or a ModelLoadError.

    Layer hooks do not care what the forward returns, but passes that read the output do (occlusion,
    class visualisations).  Accepted: a tensor; a tuple or list whose first item is one (Inception's
    ``(logits, aux_logits)``); a dict (or HuggingFace ModelOutput) with a ``logits``/``out``/``output``
    entry, or holding exactly one tensor.
    """
    found = output
    if isinstance(found, (tuple, list)) and found:
        found = found[0]
    elif isinstance(found, Mapping):
        keyed = [found[k] for k in LOGIT_KEYS if isinstance(found.get(k), torch.Tensor)]
        tensors = [v for v in found.values() if isinstance(v, torch.Tensor)]
        found = keyed[0] if keyed else tensors[0] if len(tensors) == 1 else None
        if found is None:
            raise ModelLoadError(
                f"the model's forward returns a dict without class scores (keys: "
                f"{', '.join(repr(k) for k in list(output)[:8])})",
                f"return the logits as a tensor, or under one of the keys {', '.join(LOGIT_KEYS)}",
            )
    if not isinstance(found, torch.Tensor):
        raise ModelLoadError(
            f"the model's forward returns {type(output).__name__}, not a tensor of class scores",
            "return the logits as a tensor (or as the first item of a tuple)",
        )
    if found.dim() != 2:
        raise ModelLoadError(
            f"the model's output has shape {tuple(found.shape)}, not (batch, classes)",
            "sitegen reads class scores from a classifier's output; wrap the model so forward returns them",
        )
    return found


def load_model(path: str | Path, arch: str = "", trust_pickle: bool = False) -> LoadedModel:
    """Load a checkpoint into an eval-ready model (the caller's analysis puts it into eval mode)."""
    p = Path(path)
    obj = read_checkpoint(p, trust_pickle)
    content = extract(obj, p.name)
    if isinstance(content, nn.Module):
        model = content
        if arch:
            sd = strip_prefixes(model.state_dict())
            model = build_architecture(arch, sd)
            load_weights(model, sd, p.name, arch)
        num_classes = infer_num_classes(model.state_dict())
        arch_name = arch or f"pickled {type(content).__name__}"
    else:
        if not arch:
            raise ModelLoadError(
                f"{p.name} holds a state dict; say which architecture built it with --arch",
                "e.g. --arch torchvision:resnet50, --arch path/to/net.py:resnet56 or --arch mypkg.models:build",
            )
        model = build_architecture(arch, content)
        load_weights(model, content, p.name, arch)
        num_classes = infer_num_classes(content)
        arch_name = arch
    check_finite(model, p.name)
    model.eval()
    return LoadedModel(model=model, weights_hash=file_hash(p), arch=arch_name, path=p, num_classes=num_classes)


def first_mismatch(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> str | None:
    """The first difference between two state dicts' layouts, in the reference's key order: a key
    the other lacks, a key whose shape differs, then a key only the other has; None when they fit."""
    for key, value in reference.items():
        if key not in other:
            if key.endswith("num_batches_tracked"):
                continue  # BatchNorm's counter: load_state_dict fills it in
            return f"{key!r} is missing (its shape in the model: {tuple(value.shape)})"
        if tuple(other[key].shape) != tuple(value.shape):
            return f"{key!r} has shape {tuple(other[key].shape)} where the model has {tuple(value.shape)}"
    for key, value in other.items():
        if key not in reference:
            return f"{key!r} (shape {tuple(value.shape)}) is not a key of the model"
    return None


def load_like(path: str | Path, reference: LoadedModel, trust_pickle: bool = False) -> LoadedModel:
    """Another checkpoint of ``reference``'s architecture (an earlier version of the same model),
    loaded into a copy of that model: the reference itself is left untouched.

    A checkpoint that does not fit is refused before anything is computed, naming the first key
    that differs and both shapes."""
    import copy

    p = Path(path)
    content = extract(read_checkpoint(p, trust_pickle), p.name)
    sd = strip_prefixes(dict(content.state_dict())) if isinstance(content, nn.Module) else content
    expected = reference.model.state_dict()
    problem = first_mismatch(expected, sd)
    if problem is not None:
        raise ModelLoadError(
            f"{p.name} does not fit the architecture of {reference.path.name} ({reference.arch}): {problem}",
            "--compare needs an earlier checkpoint of the same architecture (same layers, same widths, "
            "same number of classes)",
        )
    model = copy.deepcopy(reference.model)
    model.load_state_dict(sd, strict=False)  # the layouts match; BatchNorm counters may be absent
    check_finite(model, p.name)
    model.eval()
    return LoadedModel(model=model, weights_hash=file_hash(p), arch=reference.arch, path=p,
                       num_classes=reference.num_classes)
