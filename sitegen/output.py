"""Safe output folders: never delete or overwrite a file sitegen did not write.

The site is built in a temporary sibling folder and moved into place at the end.  An atlas folder
holds a marker (``.sitegen-atlas.json``) listing every file sitegen wrote there; a rebuild removes
only those.  ``index.html`` is moved last and removed first, so an interrupted swap never leaves a
folder that looks like a complete atlas.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from .errors import SitegenError

MARKER = ".sitegen-atlas.json"


class OutputError(SitegenError):
    pass


def _safe_rel(rel: str) -> bool:
    """A plain relative path inside the folder: the marker may come with a downloaded folder, and a
    listed ``../x`` or ``/home/...`` must never make a rebuild delete a file outside it."""
    parts = PurePosixPath(rel).parts
    return bool(parts) and not PurePosixPath(rel).is_absolute() and ".." not in parts \
        and "\\" not in rel and ":" not in parts[0] and "\0" not in rel and rel != MARKER


def _inside(out: Path, rel: str) -> bool:
    """True when ``out/rel``'s folder is really inside ``out``: no symlinked folder on the way."""
    parent = (out / rel).parent
    return parent.resolve() == out.resolve().joinpath(*PurePosixPath(rel).parts[:-1])


def _blocked(out: Path, rel: str, ours: set[str]) -> bool:
    """True when writing ``out/rel`` would replace, or write through, something sitegen did not write:
    a file there that is not ours, or a file or symlink where one of its folders should be."""
    target = out / rel
    if rel not in ours and (target.exists() or target.is_symlink()):
        return True
    folder = out
    for part in PurePosixPath(rel).parts[:-1]:
        folder = folder / part
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            return True
    return False


def _listed(folder: Path) -> list[str] | None:
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        files = data["files"]
        if not (isinstance(files, list) and all(isinstance(f, str) and _safe_rel(f) for f in files)):
            return None  # damaged or crafted: treat the folder as not an atlas (refused without --force)
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_target(out: Path, force: bool) -> None:
    """Refuse, before any work, a folder that holds files sitegen did not write."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {str(out)!r} is a file, not a folder", "choose another --out")
    if out.is_symlink() and not out.exists():
        raise OutputError(f"output path {str(out)!r} is a symlink to nothing", "remove the link or choose another --out")
    try:
        empty = not out.exists() or not any(out.iterdir())
    except OSError as e:
        raise OutputError(f"cannot read the output folder {str(out)!r}: {e.strerror}", "choose another --out") from None
    if empty:
        return
    if _listed(out) is not None:
        return
    if not force:
        raise OutputError(
            f"output folder {str(out)!r} is not empty and is not a sitegen atlas",
            "choose an empty or new --out folder (or --force to add the atlas beside the files there; "
            "sitegen never deletes files it did not write)",
        )


def staging_dir(out: Path) -> Path:
    out = out.absolute()  # "-o ." has no name and its parent is itself: stage beside the real folder
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create a build folder beside {str(out)!r}: {e.strerror}",
                          "sitegen builds next to --out and moves the site into place; choose a writable --out") from None


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def publish(staged: Path, out: Path) -> None:
    """Move a finished build from ``staged`` into ``out``."""
    new_files = [f for f in _files(staged) if f != MARKER]
    out = out.absolute()
    # A new folder: the whole site appears in one rename.  An existing (empty or atlas) folder is kept,
    # never removed and renamed over: it may be the working directory (-o .) or a symlink.
    if not out.exists() and not out.is_symlink():
        (staged / MARKER).write_text(json.dumps({"files": new_files}, indent=0), encoding="utf-8")
        os.replace(staged, out)
        return
    old = [f for f in (_listed(out) or []) if _inside(out, f)]
    # Before anything is removed: a file sitegen did not write where a new one goes stops the publish
    # with the old atlas still whole.
    ours = set(old)
    clash = [f for f in new_files if _blocked(out, f, ours)]
    if clash:
        raise OutputError(f"{len(clash)} files in {str(out)!r} would be overwritten but were not written "
                          f"by sitegen (e.g. {clash[0]})", "move them away or choose another --out")
    # Take the old atlas down front-page first; remove only files it listed, then their empty folders.
    for rel in sorted(old, key=lambda f: f != "index.html"):
        p = out / rel
        if p.is_file() or p.is_symlink():
            p.unlink()
    _remove_empty_dirs(out, old)
    (out / MARKER).write_text(json.dumps({"files": new_files}, indent=0), encoding="utf-8")
    for rel in sorted(new_files, key=lambda f: f == "index.html"):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, dest)
    shutil.rmtree(staged, ignore_errors=True)


def _remove_empty_dirs(out: Path, files: list[str]) -> None:
    dirs = {(out / f).parent for f in files}
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        while d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)
