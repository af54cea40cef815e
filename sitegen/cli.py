"""The command line: ``sitegen build``, ``sitegen layers``, ``sitegen demo``.

Every :class:`SitegenError` becomes one readable message and exit code 2; a traceback is shown
only with ``--debug``.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from . import progress
from .errors import SitegenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build a static HTML atlas of every layer and every channel of a PyTorch CNN.")



def _floats3(text: Optional[str], flag: str) -> Optional[tuple[float, float, float]]:
    if text is None:
        return None
    try:
        parts = tuple(float(p) for p in text.replace(" ", "").split(","))
    except ValueError:
        raise SitegenError(f"{flag} {text!r} is not three numbers", f"e.g. {flag} 0.485,0.456,0.406") from None
    if len(parts) != 3:
        raise SitegenError(f"{flag} needs three comma-separated numbers, got {len(parts)}",
                           f"e.g. {flag} 0.485,0.456,0.406")
    return parts  # type: ignore[return-value]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output.")) -> None:
    # --debug is declared here for --help and read by main(), which handles the errors a command raises.
    progress.set_quiet(quiet)


@app.command()
def build(
    model: Path = typer.Argument(..., help="Checkpoint: a state dict, a checkpoint dict, or (with --trust-pickle) a pickled model."),
    images: Path = typer.Option(..., "--images", "-i", help="Folder of images (searched recursively; class sub-folders give labels)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture: torchvision:resnet50, path/net.py:factory or pkg.mod:factory."),
    out: Path = typer.Option(Path("atlas"), "--out", "-o", help="Output folder for the site."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="site_config.toml with defaults for every key."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Shorter side in pixels (0 keeps the size)."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Centre crop in pixels (0 = none)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Three comma-separated numbers."),
    std: Optional[str] = typer.Option(None, "--std", help="Three comma-separated numbers."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use only the first N images."),
    layers: Optional[List[str]] = typer.Option(None, "--layer", "-l", help="Layer name or glob (repeatable)."),
    k: Optional[int] = typer.Option(None, "--k", help="Top images per channel."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass (0 = auto)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling a whole model (runs code from the file)."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder that is not an atlas (never deletes its files)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where pass results are cached (default ~/.cache/sitegen)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute everything and store nothing."),
    workers: int = typer.Option(1, "--workers", help="Processes on this machine (starts torchrun with N ranks)."),
    render_workers: Optional[int] = typer.Option(None, "--render-workers", help="Processes drawing pictures and writing pages (0 = every core)."),
) -> None:
    """Build the atlas of MODEL over the images in --images."""
    from . import distributed
    from .build import build as run_build
    from .build import default_cache_dir, load_config

    if workers > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_torchrun(workers))
    dist = distributed.init_from_env()
    if not dist.is_main:
        progress.set_quiet(True)

    model_section = {"arch": arch, "trust_pickle": True if trust_pickle else None}
    cfg = load_config(
        config,
        model=model_section,
        data={"resize": resize, "crop": crop, "mean": _floats3(mean, "--mean"), "std": _floats3(std, "--std"),
              "max_images": max_images},
        topk={"k": k, "batch_size": batch_size},
        site={"render_workers": render_workers},
        layers=layers or [],
    )
    cache = None if no_cache else (cache_dir or default_cache_dir())
    try:
        report = run_build(model, images, out, cfg, force=force, cache_dir=cache)
        dist.barrier()
    finally:
        distributed.shutdown()
    if dist.is_main:
        used = report.images - report.unusable
        skipped = f" ({report.skipped} skipped)" if report.skipped else ""
        progress.info(f"built {report.channels} channels of {report.layers} layers from {used} images{skipped} "
                      f"in {report.timings['total']:.1f} s: {report.site_files} files, "
                      f"{report.site_bytes / 2**20:.1f} MiB")
        typer.echo(str(report.index.resolve()))


def _torchrun(workers: int) -> int:
    """Run this same command under PyTorch's launcher with N local ranks (minus --workers)."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
           "-m", "sitegen", *args]
    return subprocess.call(cmd)


@app.command()
def layers(
    model: Path = typer.Argument(..., help="Checkpoint file."),
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
    from .images import probe_input
    from .layers import discover
    from .model_loading import load_model

    cfg = load_config(config, model={"arch": arch, "trust_pickle": True if trust_pickle else None})
    loaded = load_model(model, cfg.model.arch, cfg.model.trust_pickle)
    if images is not None:
        h, w = probe_input(discover_images(images, 50), cfg.data)
    else:
        side = size or cfg.data.crop or cfg.data.resize or 224
        h, w = side, side
    found = discover(loaded.model, (3, h, w))
    columns = ("layer", "kind", "channels", "output", "receptive field", "stride", "caffe")
    rows = [(l.name, l.kind, str(l.channels), "×".join(map(str, l.shape)), f"{l.rf.size} px", str(l.rf.stride),
             l.caffe) for l in found]
    if not sys.stdout.isatty():
        # Piped or redirected: whole names (they go into `layers = [...]`), one tab-separated row each.
        typer.echo(f"# {model.name}: {len(found)} layers for {w}×{h} input")
        for row in (columns, *rows):
            typer.echo("\t".join(row))
        return
    table = Table(title=f"{model.name}: {len(found)} layers for {w}×{h} input", title_justify="left")
    for col in columns:
        # The names are what users copy into the config: never shorten them with an ellipsis.
        table.add_column(col, no_wrap=col == "layer", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(soft_wrap=True).print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-atlas"), "--out", "-o", help="Output folder for the demo site."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the demo model and images are kept."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Train a small ResNet on scikit-learn's digits and build its atlas (no files of yours needed)."""
    from .build import build as run_build
    from .build import default_cache_dir
    from .config import from_dict
    from .demo import ensure_demo_assets

    cache = cache_dir or default_cache_dir()
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


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = wants_debug(args)
    try:
        # Without standalone mode typer turns Ctrl-C (and typer.Exit) into a returned exit code, not
        # an exception: exit with it, or an interrupted build would report success.
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            if code == 130:
                print("interrupted; nothing was published", file=sys.stderr)
            sys.exit(code)
    except SitegenError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted; nothing was published", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's own usage errors arrive here in standalone_mode=False
        import click

        # Recent typer (0.29 here) vendors its own click (typer._click), whose exceptions derive from TyperException.
        typer_error = getattr(getattr(typer, "exceptions", None), "TyperException", click.exceptions.ClickException)
        if isinstance(e, (click.exceptions.ClickException, typer_error)) and hasattr(e, "show"):
            e.show()
            sys.exit(getattr(e, "exit_code", 2))
        if isinstance(e, (click.exceptions.Abort, typer.Abort)):
            sys.exit(1)
        if debug:
            raise
        if isinstance(e, MemoryError):
            print("error: out of memory", file=sys.stderr)
            print("  hint: lower --batch-size, or data.max_pixels / data.resize for very large images", file=sys.stderr)
            sys.exit(2)
        # Not a problem with the inputs (those raise SitegenError) but a bug: one line, and how to see more.
        print(f"error: internal error ({type(e).__name__}: {str(e).strip()[:200]})", file=sys.stderr)
        print("  hint: this is a bug in sitegen; rerun with --debug for the traceback and report it", file=sys.stderr)
        sys.exit(1)
