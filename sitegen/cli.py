"""The command line: ``sitegen build``, ``sitegen plan``, ``sitegen layers``, ``sitegen demo``.

Every :class:`SitegenError` becomes one readable message and exit code 2; a traceback is shown
only with ``--debug``.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from . import progress
from .errors import SitegenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build a static HTML atlas of every layer and every channel of a PyTorch CNN.")


class _Command(typer.core.TyperCommand):
    """Usage lines in the usual form (``sitegen build [OPTIONS] MODEL``): typer writes a required
    argument as ``{model}``."""

    def collect_usage_pieces(self, ctx):
        return [p[1:-1].upper() if p.startswith("{") and p.endswith("}") else p
                for p in super().collect_usage_pieces(ctx)]

    def invoke(self, ctx):
        # typer turns Ctrl-C into a bare exit code 130; carry the interruption itself to main(),
        # which says what it left behind (a swap cut short is not "nothing published").
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted(e) from None


class _Interrupted(Exception):
    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__(str(interrupt))
        self.interrupt = interrupt


FLAGS = {"data.resize": "--resize", "data.crop": "--crop", "data.mean": "--mean", "data.std": "--std",
         "data.max_images": "--max-images", "topk.k": "--k", "topk.batch_size": "--batch-size",
         "site.max_bytes": "--max-bytes",
         "site.render_workers": "--render-workers"}
"""The config key each build flag sets: a bad flag value is reported by its flag."""


def _path(p: Optional[Path]) -> Optional[Path]:
    """A path argument with ``~`` expanded (a quoted '~/atlas' reaches sitegen unexpanded)."""
    return None if p is None else p.expanduser()



def _floats(text: Optional[str], flag: str) -> Optional[tuple[float, ...]]:
    """``--mean``/``--std``: one number (every channel; a grey model's one) or three (R, G, B)."""
    example = f"e.g. {flag} 0.485,0.456,0.406 for an RGB model, {flag} 0.5 for one number for every channel"
    if text is None:
        return None
    try:
        parts = tuple(float(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        raise SitegenError(f"{flag} {text!r} is not one number or three comma-separated numbers", example) from None
    if len(parts) not in (1, 3):
        raise SitegenError(f"{flag} needs one number or three comma-separated numbers, got {len(parts)}", example)
    return parts


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output.")) -> None:
    # --debug is declared here for --help and read by main(), which handles the errors a command raises.
    progress.set_quiet(quiet)


@app.command(cls=_Command)
def build(
    command: typer.Context,
    model: Path = typer.Argument(..., metavar="MODEL", help="Checkpoint: a state dict, a checkpoint dict, or (with --trust-pickle) a pickled model."),
    images: Path = typer.Option(..., "--images", "-i", help="Folder of images (searched recursively; class sub-folders give labels)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture: torchvision:resnet50, path/net.py:factory or pkg.mod:factory."),
    out: Path = typer.Option(Path("atlas"), "--out", "-o", help="Output folder for the site."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="site_config.toml with defaults for every key."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Shorter side in pixels (0 keeps the size; default: a torchvision architecture's own, else 0)."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Centre crop in pixels (0 = none; default: a torchvision architecture's own, else none)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Three comma-separated numbers (RGB), or one (grey models, or every channel)."),
    std: Optional[str] = typer.Option(None, "--std", help="Three comma-separated numbers (RGB), or one (grey models, or every channel)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N images."),
    layers: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="Layer name or glob (repeatable)."),
    k: Optional[int] = typer.Option(None, "--k", help="Top images per channel."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass (0 = auto)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a whole model (runs code from the file)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder that is not an atlas (never deletes its files)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where pass results are cached (default ~/.cache/sitegen)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute everything and store nothing."),
    render_workers: Optional[int] = typer.Option(None, "--render-workers", help="Processes drawing pictures and writing pages (0 = every core)."),
    workers: int = typer.Option(1, "--workers", help="Processes on this machine (N ranks of one torch.distributed job; they stop with sitegen)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="An earlier checkpoint of the same architecture: the atlas shows what changed (changes.html)."),
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help="Size budget of the site in bytes "
                                            "(default 1000000000, GitHub Pages' limit; 0 lifts it)."),
) -> None:
    """Build the atlas of MODEL over the images in --images."""
    from . import distributed
    from .build import build as run_build
    from .build import default_cache_dir, load_config

    if workers < 1:
        raise SitegenError(f"--workers {workers} must be at least 1", "e.g. --workers 4 (one rank per GPU or per few cores)")
    plan_only = command.info_name == "plan"  # `sitegen plan` is this command that stops after the plan
    if plan_only:
        workers = 1  # the plan is made by one process (rank 0 makes it in a build too)
    if workers > 1 and "WORLD_SIZE" not in os.environ:
        from .launcher import run_local

        sys.exit(run_local(workers, _without_workers(_argv if _argv is not None else sys.argv[1:])))
    dist = distributed.init_from_env()
    if not dist.is_main:
        progress.set_quiet(True)

    model_section = {"arch": arch, "trust_pickle": True if trust_pickle else None}
    given = {"data.resize": resize, "data.crop": crop, "data.mean": mean, "data.std": std,
             "data.max_images": max_images, "topk.k": k, "topk.batch_size": batch_size, "site.max_bytes": max_bytes,
             "site.render_workers": render_workers}
    cfg = load_config(
        _path(config),
        model=model_section,
        data={"resize": resize, "crop": crop, "mean": _floats(mean, "--mean"), "std": _floats(std, "--std"),
              "max_images": max_images},
        topk={"k": k, "batch_size": batch_size},
        site={"max_bytes": max_bytes, "render_workers": render_workers},
        compare={"checkpoint": str(_path(compare)) if compare is not None else None},
        layers=layers or [],
        flags={key: (FLAGS[key], str(v)) for key, v in given.items() if v is not None},
    )
    cache = None if no_cache else (_path(cache_dir) or default_cache_dir())
    try:
        report = run_build(_path(model), _path(images), _path(out), cfg, force=force, cache_dir=cache,
                           plan_only=plan_only)
        dist.barrier()
    finally:
        distributed.shutdown()
    if plan_only:
        for line in report.plan.lines():
            typer.echo(line)
        return
    if dist.is_main:
        used = report.images - report.unusable
        skipped = f" ({report.skipped} skipped)" if report.skipped else ""
        progress.info(f"built {report.channels} channels of {report.layers} layers from {used} images{skipped} "
                      f"in {report.timings['total']:.1f} s: {report.site_files} files, "
                      f"{report.site_bytes / 2**20:.1f} MiB")
        typer.echo(str(report.index.resolve()))


app.command("plan", cls=_Command,
            help="Print what `build` with the same flags would do and stop: the layers and views it would "
                 "show to fit --max-bytes, each pass's work and estimated time on this device, and the "
                 "site's estimated size and file count. Writes nothing.")(build)


def _without_workers(argv: list[str]) -> list[str]:
    """The command line minus --workers N (each rank runs the rest)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        args.append(a)
    return args


@app.command(cls=_Command)
def layers(
    model: Path = typer.Argument(..., metavar="MODEL", help="Checkpoint file."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture, as for build."),
    images: Optional[Path] = typer.Option(None, "--images", "-i", help="Take the input size from these images."),
    size: Optional[int] = typer.Option(None, "--size", help="Input size in pixels (square), if no --images."),
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """List the layers sitegen can show, with output shapes and receptive fields."""
    from rich.console import Console
    from rich.table import Table

    from .build import load_config
    from .images import discover as discover_images
    from .inputs import plan_inputs, plan_without_images
    from .layers import discover
    from .model_loading import load_model

    from .config import MAX_SIDE

    if size is not None and not 1 <= size <= MAX_SIDE:
        raise SitegenError(f"--size {size} must be between 1 and {MAX_SIDE} pixels",
                           "e.g. --size 224, or --images DIR to take the size from the images")
    if size is not None and images is not None:
        raise SitegenError("--size and --images both set the input size; give one of them",
                           "--images DIR takes the size from the images (after data.resize and data.crop)")
    cfg = load_config(_path(config), model={"arch": arch, "trust_pickle": True if trust_pickle else None})
    loaded = load_model(_path(model), cfg.model.arch, cfg.model.trust_pickle)
    if images is not None:  # the input size a build over these images would use
        plan = plan_inputs(loaded.model, loaded.arch, discover_images(_path(images), cfg.data.max_images), cfg.data,
                           say=progress.info)
    else:
        plan = plan_without_images(loaded.model, loaded.arch, cfg.data, size or 0, say=progress.info)
    h, w = plan.size
    found = discover(loaded.model, plan.shape)
    columns = ("layer", "kind", "channels", "output", "receptive field", "stride", "caffe")
    rows = [(l.name, l.kind, str(l.channels), "×".join(map(str, l.shape)), l.rf.size_text(), l.rf.stride_text(),
             l.caffe) for l in found]
    if not sys.stdout.isatty():
        # Piped or redirected: whole names (they go into `layers = [...]`), one tab-separated row each.
        typer.echo(f"# {model.name}: {len(found)} layers for {w}×{h} input")
        for row in (columns, *rows):
            typer.echo("\t".join(row))
        _print_activations(loaded.model, (h, w), table=False)
        return
    table = Table(title=f"{model.name}: {len(found)} layers for {w}×{h} input", title_justify="left")
    for col in columns:
        # The names are what users copy into the config: never shorten them with an ellipsis.
        table.add_column(col, no_wrap=col == "layer", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)
    _print_activations(loaded.model, (h, w), table=True)


def _print_activations(model, size: tuple[int, int], table: bool) -> None:
    """Below the layers: the activation kinds of one forward and the rule of each attribution
    method there (comment lines when piped, so the layer rows stay the only rows)."""
    from rich.console import Console
    from rich.table import Table

    from .activation_rules import describe_unruled, find_activations

    report = find_activations(model, size)
    columns = ("activation", "how called", "calls", "guided backprop", "deconvnet")
    rows = [(k.kind, ", ".join(k.calls), str(k.count), k.guided, k.deconvnet) for k in report.kinds]
    title = "activations and the rules at each (g: the gradient from above, g⁺ = max(g, 0), x: the input)"
    if not table:
        typer.echo(f"# {title}")
        for row in (columns, *rows):
            typer.echo("# " + "\t".join(row))
    elif rows:
        t = Table(title=title, title_justify="left")
        for col in columns:
            t.add_column(col, overflow="fold")
        for k, row in zip(report.kinds, rows):
            t.add_row(*row, style=None if k.ruled else "red")
        Console(soft_wrap=True).print(t)
    else:
        typer.echo("no activations on the way from the input: the three attribution methods differ only at max-pooling")
    line = describe_unruled(report)
    if line:
        progress.info(f"warning: {line}")


@app.command(cls=_Command)
def demo(
    out: Path = typer.Option(Path("demo-atlas"), "--out", "-o", help="Output folder for the demo site."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the demo model and images are kept."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Train a small ResNet on scikit-learn's digits and build its atlas (no files of yours needed)."""
    from .build import build as run_build
    from .build import check_cache_dir, default_cache_dir
    from .config import from_dict
    from .demo import ensure_demo_assets

    cache = _path(cache_dir) or default_cache_dir()
    check_cache_dir(cache)
    out = _path(out)
    assets = ensure_demo_assets(cache / "demo", progress=progress.info)
    cfg = from_dict({"model": {"arch": assets.arch},
                     "data": {"mean": list(assets.mean), "std": list(assets.std)},
                     "site": {"title": "sitegen demo: a ResNet on handwritten digits"}})
    report = run_build(assets.checkpoint, assets.images, out, cfg, force=force, cache_dir=cache)
    progress.info(f"demo atlas built in {report.timings['total']:.1f} s; open this file in a browser:")
    typer.echo(str(report.index.resolve()))


def wants_debug(args: list[str]) -> bool:
    """Whether the root option --debug is given: it stands before the command's name."""
    for a in args:
        if a == "--debug":
            return True
        if not a.startswith("-"):
            return False
    return False


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP): stop as Ctrl-C does, removing the staging folder, rather than die mid-write."""


def _on_signal(signum, _frame) -> None:
    raise Terminated(signum)


def _interrupted(e: KeyboardInterrupt) -> int:
    """Say what an interruption left behind; the exit code (130 for Ctrl-C, 128+N for signal N)."""
    from .output import SwapInterrupted

    if isinstance(e, SwapInterrupted):
        print(progress.for_terminal(str(e)), file=sys.stderr)
    else:
        print("interrupted; nothing was published (the previous atlas, if any, is unchanged)", file=sys.stderr)
    return 128 + e.args[0] if isinstance(e, Terminated) and e.args else 130


OS_ERRORS = {errno.ENOSPC: "free some space, or write the atlas and the cache elsewhere (--out, --cache-dir)",
             errno.EDQUOT: "free some space, or write the atlas and the cache elsewhere (--out, --cache-dir)",
             errno.EROFS: "write the atlas and the cache to a writable place (--out, --cache-dir)",
             errno.EACCES: "check the permissions, or choose other folders (--out, --cache-dir)",
             errno.EPERM: "check the permissions, or choose other folders (--out, --cache-dir)",
             errno.EIO: "the disk reported an error; check it and run the build again"}
"""Errors of the machine, not of sitegen: shown as input mistakes, with what to do."""


_argv: Optional[list[str]] = None
"""The command line main() runs (each rank of --workers N runs it again)."""


def main(argv: Optional[list[str]] = None) -> None:
    global _argv
    args = sys.argv[1:] if argv is None else list(argv)
    _argv = args
    debug = wants_debug(args)
    from .launcher import watch_parent

    watch_parent()  # a rank of `--workers N` ends when its sitegen process does
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _on_signal)
    else:
        old_term = None
    try:
        # Without standalone mode typer turns Ctrl-C (and typer.Exit) into a returned exit code, not
        # an exception: exit with it, or an interrupted build would report success.
        code = app(args=args, prog_name="sitegen", standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            if code == 130:
                sys.exit(_interrupted(KeyboardInterrupt()))
            sys.exit(code)
    except _Interrupted as e:
        sys.exit(_interrupted(e.interrupt))
    except SitegenError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {progress.terminal_lines(str(e))}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        sys.exit(_interrupted(e))
    except SystemExit:
        raise
    except OSError as e:
        if debug or e.errno not in OS_ERRORS:
            _unexpected(e, debug)
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write or read{progress.for_terminal(where)}: {e.strerror}", file=sys.stderr)
        print(f"  hint: {OS_ERRORS[e.errno]}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # click's own usage errors arrive here in standalone_mode=False
        _unexpected(e, debug)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _unexpected(e: Exception, debug: bool) -> None:
    import click

    # Recent typer (0.29 here) vendors its own click (typer._click), whose exceptions derive from TyperException.
    typer_error = getattr(getattr(typer, "exceptions", None), "TyperException", click.exceptions.ClickException)
    if isinstance(e, (click.exceptions.ClickException, typer_error)) and hasattr(e, "show"):
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    if isinstance(e, (click.exceptions.Abort, typer.Abort)):
        sys.exit(1)
    if debug:
        raise e
    if isinstance(e, MemoryError):
        print("error: out of memory", file=sys.stderr)
        print("  hint: lower --batch-size, or data.max_pixels / data.resize for very large images", file=sys.stderr)
        sys.exit(2)
    # Not a problem with the inputs (those raise SitegenError) but a bug: one line, and how to see more.
    print(f"error: internal error ({type(e).__name__}: {progress.for_terminal(str(e).strip()[:200])})", file=sys.stderr)
    print("  hint: this is a bug in sitegen; rerun with --debug for the traceback and report it", file=sys.stderr)
    sys.exit(1)
