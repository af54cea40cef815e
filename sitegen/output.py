"""Safe output folders: never delete or overwrite a file sitegen did not write.

The site is built in a temporary sibling folder and moved into place at the end.  An atlas folder
holds a marker (``.sitegen-atlas.json``) listing every file sitegen wrote there; a rebuild removes
only those.  ``index.html`` is moved last and removed first, so an interrupted swap never leaves a
folder that looks like a complete atlas.  One build at a time writes an atlas: a lock file beside
the folder (``.NAME.lock``, an flock the kernel releases when its process dies) keeps a second one
out, and lets a build remove the staging folders that killed builds left behind.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from .errors import SitegenError

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked against each other there
    fcntl = None  # type: ignore[assignment]

MARKER = ".sitegen-atlas.json"

SITE_FILES = ("index.html", ".nojekyll", "data/atlas.json", "data/search-index.js")
"""Files every atlas writes, whatever its views: a folder that already holds one of them (not
written by sitegen) is refused before any work rather than after the passes and the render."""


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


def _resolved(p: Path) -> Path:
    return Path(os.path.realpath(p.expanduser()))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def atlas_files(folder: Path) -> list[str] | None:
    """The files the atlas in ``folder`` lists (inside it), or None when it is not an atlas."""
    listed = _listed(folder)
    return None if listed is None else [f for f in listed if _inside(folder, f)]


def check_target(out: Path, force: bool, *, images: Path | None = None, site_files: Iterable[str] = ()) -> None:
    """Refuse, before any work, a folder that holds files sitegen did not write, one that is (or
    holds, or lies inside) the images folder, and --force for the root and home folders.

    ``site_files`` are paths every build of this atlas writes (its fixed files and its assets):
    with --force, a file of the user's at one of them is refused now rather than after the passes."""
    if images is not None:
        where, data = _resolved(out), _resolved(images)
        if _within(where, data) or _within(data, where):
            how = ("is the images folder" if where == data else
                   "is inside the images folder" if _within(where, data) else "holds the images folder")
            raise OutputError(
                f"output folder {str(out)!r} {how} {str(images)!r}",
                "write the atlas outside the images folder (e.g. -o atlas beside it): its pages and pictures "
                "would be read as images by the next build, and the images must not be mixed with the site")
    if force:
        where = _resolved(out)
        home = _resolved(Path.home())
        if where == Path(where.anchor) or _within(home, where):
            raise OutputError(f"--force refuses {str(out)!r}: it is the root or home folder (or holds it)",
                              "give the atlas a folder of its own, e.g. -o ~/atlas")
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
    listed = _listed(out)
    if listed is None and not force:
        raise OutputError(
            f"output folder {str(out)!r} is not empty and is not a sitegen atlas",
            "choose an empty or new --out folder (or --force to add the atlas beside the files there; "
            "sitegen never deletes files it did not write)",
        )
    ours = {f for f in listed or [] if _inside(out, f)}
    clash = [f for f in site_files if _blocked(out, f, ours)]
    if clash:
        raise OutputError(f"{len(clash)} {_plural(len(clash), 'file')} in {str(out)!r} would be overwritten but "
                          f"{'were' if len(clash) > 1 else 'was'} not written by sitegen (e.g. {clash[0]})",
                          "move them away or choose another --out")


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: no other way in Python)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


STAGING = re.compile(r"\.(?P<name>.+)\.building-(?P<pid>\d+)-[0-9a-f]+")
"""A staging folder: ``.NAME.building-PID-RANDOM`` beside the atlas folder NAME."""


def _real_name(out: Path) -> Path:
    """``out`` as an absolute path with a name: "-o ." has none and its parent is itself, so stage
    beside the real folder (a symlink as the last part is kept: it is the name the user chose)."""
    return Path(os.path.abspath(out.expanduser()))


def staging_dir(out: Path) -> Path:
    """A new, empty folder beside ``out`` named after it and this process (so a later build can tell
    a dead build's leftovers from a running one's).  Its mode is what the umask gives any new folder
    (0755 under umask 022): it becomes the atlas folder itself when ``out`` does not exist yet, and a
    web server running as another user must be able to read it."""
    out = _real_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            path = out.parent / f".{out.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                path.mkdir(mode=0o777)  # the umask applies, as to any folder the user creates
                return path
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free name", str(out.parent))
    except OSError as e:
        raise OutputError(f"cannot create a build folder beside {str(out)!r}: {e.strerror}",
                          "sitegen builds next to --out and moves the site into place; choose a writable --out") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders of ``out`` left by builds that were killed (their process is gone).
    Call it holding :func:`build_lock`: then no other build of ``out`` is running."""
    out = _real_name(out)
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = STAGING.fullmatch(p.name)
        if not m or m["name"] != out.name or p.is_symlink() or not p.is_dir():
            continue
        if int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold the lock of the atlas folder ``out`` (``.NAME.lock`` beside it) for the ``with`` body,
    or raise OutputError naming the build that holds it.  The kernel drops the lock when its
    process dies, however it dies; the file is removed when the build ends.  The lock is taken on
    the real folder, so two builds reaching it through different symlinks still exclude each other."""
    out = _resolved(out)
    path = out.parent / f".{out.name}.lock"
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # removed again if left empty
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder of {str(out)!r}: {e.strerror}", "choose a writable --out") from None
    try:
        with _locked(out, path):
            yield
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def _locked(out: Path, path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {str(path)!r}: {e.strerror}",
                              "sitegen locks the output folder while it writes; choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"another build is writing {str(out)!r}{f' (pid {holder})' if holder else ''}",
                    "wait for it to finish, or choose another --out") from None
            raise OutputError(f"cannot lock {str(path)!r}: {e.strerror}", "choose another --out") from None
        # The previous holder may have removed the file between our open and our lock: lock the
        # file that is there now, not an unlinked one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before the unlock: a build waiting on this file retries on the new one
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


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
        raise OutputError(f"{len(clash)} {_plural(len(clash), 'file')} in {str(out)!r} would be overwritten but "
                          f"{'were' if len(clash) > 1 else 'was'} not written by sitegen (e.g. {clash[0]})",
                          "move them away or choose another --out")
    # Take the old atlas down front-page first; remove only files it listed, then their empty folders.
    # From the first removal on, an interruption leaves the folder between two atlases: say so.
    touched = False
    try:
        for rel in sorted(old, key=lambda f: f != "index.html"):
            p = out / rel
            if p.is_file() or p.is_symlink():
                p.unlink()
                touched = True
        _remove_empty_dirs(out, old)
        touched = True
        (out / MARKER).write_text(json.dumps({"files": new_files}, indent=0), encoding="utf-8")
        for rel in sorted(new_files, key=lambda f: f == "index.html"):
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / rel, dest)
    except KeyboardInterrupt:
        if touched and not (out / "index.html").exists():
            raise SwapInterrupted(out) from None
        raise
    shutil.rmtree(staged, ignore_errors=True)


class SwapInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) while the old atlas was being replaced by the new one."""

    def __init__(self, out: Path):
        super().__init__(f"interrupted while replacing the atlas in {str(out)!r}: it has no front page now "
                         "(part of the old atlas is removed and the new one is not complete); "
                         "run the build again to finish it")


def _remove_empty_dirs(out: Path, files: list[str]) -> None:
    dirs = {(out / f).parent for f in files}
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        while d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)
