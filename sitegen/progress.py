"""Progress bars for long work: Rich bars on a terminal, plain lines otherwise (CI logs, pipes)."""
from __future__ import annotations

import contextlib
import sys
import time
import unicodedata
from typing import Callable, Iterator

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


_BIDI = frozenset({"\u200e", "\u200f", "\u061c", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))})


def _escape(ch: str) -> str:
    code = ord(ch)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (
        f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def for_terminal(text: str) -> str:
    """``text`` with every control character (ESC sequences, newlines, carriage returns, C1 codes)
    and bidirectional override written as a visible escape (``\\x1b``, ``\\n``): a file name must
    not recolour, overwrite, forge or reorder what the terminal shows."""
    if text.isprintable():
        return text  # the common case, and fast
    return "".join(_escape(c) if (unicodedata.category(c) == "Cc" or c in _BIDI) else c for c in text)


HINT = "\n  hint: "
"""How an error's hint follows its message (``str(SitegenError)``)."""


def terminal_lines(message: str) -> str:
    """A message, and the hint after its last ``HINT`` separator, with control characters escaped:
    one line each, whatever the names inside them hold."""
    text, sep, hint = message.rpartition(HINT)
    if not sep:
        return for_terminal(message)
    return for_terminal(text) + HINT + for_terminal(hint)


def info(message: str) -> None:
    """A message (and its hint) on stderr, names in it escaped by :func:`terminal_lines`."""
    if not _quiet:
        print(terminal_lines(message), file=sys.stderr, flush=True)


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
