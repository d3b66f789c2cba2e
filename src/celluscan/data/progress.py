"""Progress reporting for long loops: a tqdm bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(
    items: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    every_s: float = 10.0,
    stream=None,
) -> Iterator[T]:
    """Yield ``items`` while showing progress on ``stream`` (default stderr).

    On a TTY this is a tqdm bar (rate and ETA). Otherwise (logs, CI, pipes) a plain line
    ``desc: done/total (rate unit/s, ETA ...)`` is printed at most every ``every_s`` seconds
    and once at the end.
    """
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            print(_line(desc, done, total, now - start, unit), file=stream, flush=True)
    if done:
        print(_line(desc, done, total, time.monotonic() - start, unit), file=stream, flush=True)


def _line(desc: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    rate = done / elapsed if elapsed > 0 else float("inf")
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        return f"{desc}: {done}/{total} ({rate:.1f} {unit}/s, ETA {eta:.0f} s)"
    return f"{desc}: {done} ({rate:.1f} {unit}/s)"
