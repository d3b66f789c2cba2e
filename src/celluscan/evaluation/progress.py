"""A progress meter counted in images: tqdm bar (rate, ETA) on a TTY, plain lines otherwise.

Unlike :func:`celluscan.data.progress.progress`, which wraps an iterable one item at a time,
this meter is advanced by the caller with the number of images a batch held and can show a
running loss, so training and evaluation report images/s.
"""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressMeter", "format_seconds"]


def format_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class ProgressMeter:
    """``with ProgressMeter(total, "epoch 1/7") as p: p.update(64, loss=0.9)``.

    ``enabled=False`` silences it (e.g. on non-zero ranks under torchrun).
    """

    def __init__(self, total: int, desc: str, unit: str = "img", every_s: float = 30.0,
                 stream=None, enabled: bool = True, initial: int = 0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.done = initial
        self._start_done = initial
        self.start = self.last = time.monotonic()
        self.postfix: dict[str, float] = {}
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True,
                             file=self.stream, dynamic_ncols=True, leave=True)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        extra = "".join(f", {k}={v:.4g}" for k, v in self.postfix.items())
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {format_seconds(eta)}{extra}")

    def update(self, n: int, **postfix: float) -> None:
        self.done += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in self.postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> "ProgressMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
