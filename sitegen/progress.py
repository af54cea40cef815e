"""Progress bars for long work: Rich bars on a terminal, plain lines otherwise (CI logs, pipes)."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def info(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def bar(description: str, total: int, unit: str = "items") -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``.  Plain mode prints at most ~10 lines per bar."""
    if _quiet or total <= 0:
        yield lambda n=1: None
        return
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=False) as prog:
            task = prog.add_task(description, total=total)
            yield lambda n=1: prog.advance(task, n)
        return
    done, next_mark, start = 0, 0.1, time.monotonic()

    def advance(n: int = 1) -> None:
        nonlocal done, next_mark
        done += n
        if done / total >= next_mark or done == total:
            print(f"{description}: {done}/{total} {unit} ({time.monotonic() - start:.1f} s)",
                  file=sys.stderr, flush=True)
            while next_mark <= done / total:
                next_mark += 0.1

    yield advance
