"""Safe output folders: sitegen never deletes or overwrites a file it did not write, and an
interrupted or failed build never leaves a half-written site that looks complete.

Unit tests drive check_target/publish with small staged trees; CLI tests run real builds.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from sitegen import output
from sitegen.errors import ImageError
from sitegen.output import MARKER, OutputError, check_target, discard, publish, staging_dir




import hardening_corpus as corpus  # noqa: E402  (tests/ is on the import path: pyproject's pythonpath)

OLD = {"index.html": "old index", "layers/a/index.html": "old a", "layers/gone/index.html": "old gone",
       "img/a/0.png": "old png", "assets/style.css": "old css"}
NEW = {"index.html": "new index", "layers/a/index.html": "new a", "layers/b/index.html": "new b",
       "img/a/0.png": "new png", "assets/style.css": "new css", "data/atlas.json": "{}"}


def _stage(out: Path, files: dict[str, str]) -> Path:
    staged = staging_dir(out)
    for rel, text in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_text(text)
    return staged


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (links not followed) with its text."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            found[p.relative_to(root).as_posix()] = p.read_text(errors="replace") if not p.is_symlink() else "->link"
    return found


def _listed(out: Path) -> list[str]:
    return json.loads((out / MARKER).read_text())["files"]


def _no_staging_left(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if ".building-" in p.name] == []


def _atlas(out: Path, files: dict[str, str]) -> None:
    check_target(out, force=False)
    publish(_stage(out, files), out)


# ----------------------------------------------------------------------------- unit: publish

def test_new_folder_gets_the_site_and_a_marker(tmp_path):
    out = tmp_path / "site"
    _atlas(out, NEW)
    assert _tree(out) == {**NEW, MARKER: (out / MARKER).read_text()}
    assert sorted(_listed(out)) == sorted(NEW)
    _no_staging_left(tmp_path)


def test_marker_survives_names_that_are_not_utf8(tmp_path):
    """The marker is JSON; a file name that is not UTF-8 (surrogate escapes) round-trips through it."""
    out = tmp_path / "site"
    odd = "img/" + corpus.NON_UTF8 + ".png"
    _atlas(out, {"index.html": "one", odd: "odd"})
    assert odd in _listed(out)
    (out / MARKER).read_bytes().decode("ascii")  # escaped, so valid in any encoding
    _atlas(out, {"index.html": "two"})  # a rebuild finds and removes it
    assert not (out / odd).exists() and not (out / "img").exists()


def test_non_empty_folder_that_is_not_an_atlas_is_refused(tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError) as e:
        check_target(out, force=False)
    assert "not a sitegen atlas" in str(e.value) and "--force" in str(e.value)
    assert _tree(out) == {"thesis.tex": "years of work"}


def test_force_adds_beside_user_files_and_rebuilds_touch_only_listed_files(tmp_path):
    out = tmp_path / "site"
    (out / "layers").mkdir(parents=True)
    user = {"notes.txt": "mine", "layers/README": "mine too"}
    for rel, text in user.items():
        (out / rel).write_text(text)
    check_target(out, force=True)
    publish(_stage(out, OLD), out)
    assert {k: v for k, v in _tree(out).items() if k != MARKER} == {**user, **OLD}
    assert sorted(_listed(out)) == sorted(OLD)  # the user's files are not claimed

    check_target(out, force=False)  # now an atlas: no --force needed
    publish(_stage(out, NEW), out)
    assert {k: v for k, v in _tree(out).items() if k != MARKER} == {**user, **NEW}
    assert not (out / "layers" / "gone").exists()  # an emptied folder of the old atlas goes too
    _no_staging_left(tmp_path)


def test_force_never_overwrites_a_user_file(tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("the user's own home page")
    check_target(out, force=True)
    staged = _stage(out, NEW)
    with pytest.raises(OutputError) as e:
        publish(staged, out)
    discard(staged)
    assert "index.html" in str(e.value) and "1 file in" in str(e.value) and "was not written by sitegen" in str(e.value)
    assert _tree(out) == {"index.html": "the user's own home page"}  # not even a marker


def test_a_clash_stops_a_rebuild_before_the_old_atlas_is_touched(tmp_path):
    out = tmp_path / "site"
    _atlas(out, OLD)
    (out / "data").mkdir()
    (out / "data" / "atlas.json").write_text("a user's file where the new atlas writes")
    before = _tree(out)
    staged = _stage(out, NEW)
    with pytest.raises(OutputError, match="data/atlas.json"):
        publish(staged, out)
    discard(staged)
    assert _tree(out) == before


def test_a_user_file_where_a_folder_goes_is_a_clash(tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "layers").write_text("a file, not a folder")
    staged = _stage(out, NEW)
    with pytest.raises(OutputError, match="layers/"):
        publish(staged, out)
    discard(staged)
    assert _tree(out) == {"layers": "a file, not a folder"}


@pytest.mark.parametrize("listed", [
    ["../victim.txt"], ["sub/../../victim.txt"], ["VICTIM_ABS"], ["..\\victim.txt"], ["C:/victim.txt"],
    "not a list", [3], None,
])
def test_crafted_or_damaged_marker_is_not_an_atlas(tmp_path, listed):
    """A downloaded folder's marker could list any path: it must not steer deletions outside."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "downloaded"
    out.mkdir()
    if listed is None:
        (out / MARKER).write_text("{ not json")
    else:
        files = [str(victim) if f == "VICTIM_ABS" else f for f in listed] if isinstance(listed, list) else listed
        (out / MARKER).write_text(json.dumps({"files": files + ["index.html"] if isinstance(files, list) else files}))
    (out / "index.html").write_text("theirs")
    with pytest.raises(OutputError, match="not a sitegen atlas"):
        check_target(out, force=False)
    check_target(out, force=True)
    staged = _stage(out, {"layers/x.html": "new"})
    publish(staged, out)
    assert victim.read_text() == "precious"
    assert (out / "index.html").read_text() == "theirs"  # not listed by a marker sitegen can trust


def test_marker_cannot_delete_through_a_symlinked_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.txt").write_text("precious")
    out = tmp_path / "site"
    out.mkdir()
    (out / "link").symlink_to(elsewhere)
    (out / "index.html").write_text("old")
    (out / MARKER).write_text(json.dumps({"files": ["index.html", "link/x.txt"]}))
    check_target(out, force=False)  # plain relative paths: an atlas
    publish(_stage(out, {"index.html": "new"}), out)
    assert (elsewhere / "x.txt").read_text() == "precious"
    assert (out / "index.html").read_text() == "new"


def test_new_files_are_not_written_through_a_symlinked_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "site"
    out.mkdir()
    (out / "layers").symlink_to(elsewhere)
    staged = _stage(out, NEW)
    with pytest.raises(OutputError):
        publish(staged, out)
    discard(staged)
    assert list(elsewhere.iterdir()) == []


def _replace_failing_at(n: int, exc=KeyboardInterrupt):
    real = os.replace
    calls = [0]

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            raise exc("interrupted")
        return real(src, dst)

    return replace


@pytest.mark.parametrize("fail_at", range(1, len(NEW) + 1))
def test_interrupted_rebuild_never_shows_index_without_the_rest(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "site"
    _atlas(out, OLD)
    staged = _stage(out, NEW)
    monkeypatch.setattr(output.os, "replace", _replace_failing_at(fail_at))
    with pytest.raises(KeyboardInterrupt):
        publish(staged, out)
    discard(staged)
    monkeypatch.undo()
    # index.html is moved last: an interrupted publish leaves no front page, so nothing looks complete
    assert not (out / "index.html").exists()
    _no_staging_left(tmp_path)
    _atlas(out, NEW)  # and the next build recovers
    assert {k: v for k, v in _tree(out).items() if k != MARKER} == NEW


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_interrupted_takedown_leaves_no_front_page(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "site"
    _atlas(out, OLD)
    staged = _stage(out, NEW)
    real_unlink = Path.unlink
    calls = [0]

    def unlink(self, missing_ok=False):
        calls[0] += 1
        if calls[0] == fail_at:
            raise KeyboardInterrupt
        return real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        publish(staged, out)
    monkeypatch.undo()
    discard(staged)
    # The front page goes first: interrupted at once, the old atlas is whole; later, it has no front page.
    if (out / "index.html").exists():
        assert fail_at == 1 and {k: v for k, v in _tree(out).items() if k != MARKER} == OLD
    _atlas(out, NEW)
    assert {k: v for k, v in _tree(out).items() if k != MARKER} == NEW


def test_interrupted_first_publish_leaves_nothing(tmp_path, monkeypatch):
    """Into a new folder the whole site is one rename: all or nothing."""
    out = tmp_path / "site"
    staged = _stage(out, NEW)
    monkeypatch.setattr(output.os, "replace", _replace_failing_at(1))
    with pytest.raises(KeyboardInterrupt):
        publish(staged, out)
    discard(staged)
    assert not out.exists()
    _no_staging_left(tmp_path)


def test_output_dot_stages_beside_the_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    staged = staging_dir(Path("."))
    assert staged.parent == tmp_path and staged.name.startswith(".work.building-")
    (staged / "index.html").write_text("x")
    publish(staged, Path("."))
    assert (work / "index.html").read_text() == "x" and (work / MARKER).is_file()
    _no_staging_left(tmp_path)


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "site").write_text("a file")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_target(tmp_path / "site", force=True)


def test_output_that_is_a_dangling_symlink(tmp_path):
    (tmp_path / "site").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symlink to nothing"):
        check_target(tmp_path / "site", force=True)


def test_output_that_is_a_symlink_to_an_empty_folder(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "site").symlink_to(target)
    _atlas(tmp_path / "site", NEW)
    assert (tmp_path / "site").is_symlink()
    assert {k: v for k, v in _tree(target).items() if k != MARKER} == NEW


def test_unwritable_parent_is_a_clear_error(tmp_path):
    if not corpus.unreadable_supported():
        pytest.skip("running as root: a read-only folder is still writable")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot create a build folder"):
            staging_dir(ro / "site")
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- through the CLI

@pytest.fixture
def inputs(tmp_path):
    from sitegen.model_loading import build_architecture

    ckpt = tmp_path / "tiny.pt"
    torch.save(build_architecture(corpus.TINY_ARCH, None).state_dict(), ckpt)
    images = tmp_path / "imgs"
    corpus.write_good_images(images, 6)
    cfg = corpus.fast_config(tmp_path / "fast.toml", topk={"k": 2})
    return ["-q", "build", str(ckpt), "--images", str(images), "--arch", corpus.TINY_ARCH,
            "--config", str(cfg), "--no-cache"]


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_refuses_a_folder_of_user_files(tmp_path, capfd, inputs):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    corpus.assert_clean_failure(code, err, "docs", "not a sitegen atlas", "--force")
    assert _tree(out) == {"thesis.tex": "years of work"}
    _no_staging_left(tmp_path)


def test_cli_force_then_rebuild_keeps_user_files(tmp_path, capfd, inputs):
    out = tmp_path / "site"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = corpus.run_cli(inputs + ["-o", str(out), "--force"], capfd)
    assert code == 0, err
    files = set(_listed(out))
    assert "notes.txt" not in files and "index.html" in files
    assert set(_tree(out)) == files | {MARKER, "notes.txt"}  # the marker lists everything sitegen wrote
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert set(_tree(out)) == set(_listed(out)) | {MARKER, "notes.txt"}
    _no_staging_left(tmp_path)


@pytest.mark.parametrize("exc, exit_code", [(ImageError, 2), (KeyboardInterrupt, 130), (RuntimeError, 1)])
def test_cli_failure_during_render_keeps_the_previous_atlas(tmp_path, capfd, inputs, monkeypatch, exc, exit_code):
    import sitegen.build

    out = tmp_path / "site"
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err
    before = _digest(out)
    real_render = sitegen.build.render

    def failing_render(ctx, results, staged, opts):
        real_render(ctx, results, staged, opts)  # a whole site written into the staging folder...
        raise exc("the disk filled up")           # ...then a failure before it is published

    monkeypatch.setattr(sitegen.build, "render", failing_render)
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == exit_code, err
    assert "Traceback" not in err
    assert _digest(out) == before
    _no_staging_left(tmp_path)


def test_cli_interrupted_publish_leaves_no_front_page(tmp_path, capfd, inputs, monkeypatch):
    out = tmp_path / "site"
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err
    monkeypatch.setattr(output.os, "replace", _replace_failing_at(3))
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (out / "index.html").exists()
    _no_staging_left(tmp_path)
    monkeypatch.undo()
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err
    assert set(_tree(out)) == set(_listed(out)) | {MARKER}


# ----------------------------------------------------------------------------- modes, locks, leftovers

def _modes(root: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of root and of everything under it."""
    found = {("dir", root.stat().st_mode & 0o777)}
    for p in root.rglob("*"):
        found.add(("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777))
    return found


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_new_atlas_folder_gets_the_umask_modes(tmp_path, capfd, inputs, umask, dirs, files):
    """A web server running as another user must be able to read a freshly published atlas."""
    old = os.umask(umask)
    try:
        code, _, err = corpus.run_cli(inputs + ["-o", str(tmp_path / "site")], capfd)
    finally:
        os.umask(old)
    assert code == 0, err
    assert _modes(tmp_path / "site") == {("dir", dirs), ("file", files)}


def test_a_second_build_into_the_same_atlas_is_refused(tmp_path, capfd, inputs):
    out = tmp_path / "site"
    with output.build_lock(out):
        code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
        corpus.assert_clean_failure(code, err, "another build is writing", "site")
        assert not out.exists()
    assert not list(tmp_path.glob(".site.lock*"))  # the lock goes with the build that held it
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err


def test_the_lock_of_a_killed_build_does_not_block_the_next(tmp_path, capfd, inputs):
    """The lock is the kernel's (flock): it dies with its process, whatever killed it."""
    import subprocess
    import time

    out = tmp_path / "site"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from sitegen import output\n"
                               f"with output.build_lock(Path({str(out)!r})):\n"
                               "    print('locked', flush=True); time.sleep(600)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
        corpus.assert_clean_failure(code, err, "another build is writing")
        assert f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err


def test_staging_folders_of_dead_builds_are_removed(tmp_path, capfd, inputs):
    import subprocess

    out = tmp_path / "site"
    dead = tmp_path / ".site.building-999999999-abc123"   # no such pid
    (dead / "layers").mkdir(parents=True)
    (dead / "index.html").write_text("a half-rendered site from a killed build")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    alive = tmp_path / f".site.building-{sleeper.pid}-def456"
    alive.mkdir()
    other = tmp_path / ".other.building-999999999-abc123"  # another atlas's: not this build's business
    other.mkdir()
    try:
        code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
        assert code == 0, err
        assert not dead.exists() and alive.is_dir() and other.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ctrl_c_during_the_swap_says_what_state_the_folder_is_in(tmp_path, capfd, inputs, monkeypatch):
    out = tmp_path / "site"
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err
    monkeypatch.setattr(output.os, "replace", _replace_failing_at(3))
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 130
    assert "nothing was published" not in err
    assert "site" in err and "no front page" in err and "run the build again" in err


def test_ctrl_c_before_the_swap_says_nothing_was_published(tmp_path, capfd, inputs, monkeypatch):
    import sitegen.build

    out = tmp_path / "site"
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 0, err
    before = _digest(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sitegen.build, "render", interrupted)
    code, _, err = corpus.run_cli(inputs + ["-o", str(out)], capfd)
    assert code == 130 and "nothing was published" in err and "previous atlas" in err
    assert _digest(out) == before


def test_summary_counts_only_the_atlas_files(tmp_path, capfd, inputs):
    out = tmp_path / "site"
    (out / "papers").mkdir(parents=True)
    for i in range(5):
        (out / "papers" / f"{i}.pdf").write_bytes(b"x" * 1000)
    code, stdout, err = corpus.run_cli([a for a in inputs if a != "-q"] + ["-o", str(out), "--force"], capfd)
    assert code == 0, err
    listed = _listed(out)
    size = sum((out / f).stat().st_size for f in listed) + (out / MARKER).stat().st_size
    assert f": {len(listed) + 1} files, {size / 2**20:.1f} MiB" in err


@pytest.mark.parametrize("where", ["root", "home", "home-parent"])
def test_force_is_refused_for_the_root_and_home_folders(tmp_path, monkeypatch, where):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    target = {"root": Path("/"), "home": home, "home-parent": home.parent}[where]
    with pytest.raises(OutputError) as e:
        check_target(target, force=True)
    assert "--force" in str(e.value)


def test_tilde_in_out_is_the_home_folder(tmp_path, capfd, inputs, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = corpus.run_cli(inputs + ["-o", "~/atlas"], capfd)
    assert code == 0, err
    assert (home / "atlas" / "index.html").is_file() and not (work / "~").exists()


def test_sigterm_stops_a_build_like_ctrl_c(tmp_path, capfd, inputs, monkeypatch):
    """SIGTERM (what `kill` and service managers send) removes the staging folder and exits 143,
    instead of dying with a half-rendered site beside the atlas."""
    import signal

    import sitegen.build

    real_render = sitegen.build.render

    def render_then_term(ctx, results, staged, opts):
        real_render(ctx, results, staged, opts)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sitegen.build, "render", render_then_term)
    code, _, err = corpus.run_cli(inputs + ["-o", str(tmp_path / "site")], capfd)
    assert code == 143 and "nothing was published" in err and "Traceback" not in err
    assert not (tmp_path / "site").exists()
    _no_staging_left(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the default back


def test_files_every_atlas_writes_are_the_ones_checked_before_the_work(tmp_path, capfd, inputs):
    """SITE_FILES and the assets are what the --force pre-check looks for: each one is in a real build."""
    from sitegen.render.site import asset_files

    code, _, err = corpus.run_cli(inputs + ["-o", str(tmp_path / "site")], capfd)
    assert code == 0, err
    listed = set(_listed(tmp_path / "site"))
    assert set(output.SITE_FILES) | set(asset_files()) <= listed
    assert asset_files() == sorted(f for f in listed if f.startswith("assets/"))


def test_the_lock_is_on_the_real_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with output.build_lock(tmp_path / "real"):
        with pytest.raises(OutputError, match=f"another build is writing .*pid {os.getpid()}"):
            with output.build_lock(tmp_path / "link"):
                pass
    with output.build_lock(tmp_path / "link"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
