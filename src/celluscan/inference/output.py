"""Prediction results as CSV rows and as a readable aligned table.

CSV columns (one row per input, in input order)::

    path, prediction, confidence, <one probability column per class, canonical order>,
    group, uncertain, uncertain_reason, unfamiliar, unfamiliar_score, error

A file that could not be used has an empty prediction and its reason in ``error``.
"""

from __future__ import annotations

from typing import Sequence

from celluscan.data.imageio import ImageLoadError
from celluscan.inference.predictor import Prediction
from celluscan.taxonomy import CLASSES

__all__ = ["CSV_COLUMNS", "csv_row", "TableWriter", "flags_text"]

CSV_COLUMNS: tuple[str, ...] = (
    "path", "prediction", "confidence", *CLASSES,
    "group", "uncertain", "uncertain_reason", "unfamiliar", "unfamiliar_score", "error",
)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def csv_row(path: str, result: Prediction | BaseException) -> list[str]:
    """One CSV row (strings, in :data:`CSV_COLUMNS` order)."""
    if isinstance(result, BaseException):
        reason = result.reason if isinstance(result, ImageLoadError) else f"{type(result).__name__}: {result}"
        return [path, "", "", *([""] * len(CLASSES)), "", "", "", "", "", reason]
    probs = [f"{result.probs[c]:.6f}" if c in result.probs else "" for c in CLASSES]
    return [
        path, result.label, f"{result.confidence:.6f}", *probs,
        result.group, _bool(result.uncertain), result.uncertain_reason,
        _bool(result.unfamiliar), f"{result.unfamiliar_score:.4f}", "",
    ]


def flags_text(result: Prediction | BaseException) -> str:
    if isinstance(result, BaseException):
        reason = result.reason if isinstance(result, ImageLoadError) else str(result)
        return f"ERROR: {reason}"
    flags = []
    if result.uncertain:
        flags.append(f"uncertain: {result.uncertain_reason}")
        if result.group_answer:
            flags.append(result.group_answer)
    if result.unfamiliar:
        flags.append(f"unfamiliar image (score {result.unfamiliar_score:.1f})")
    return " | ".join(flags)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


class TableWriter:
    """Streams aligned rows ``path  prediction  confidence  flags``; the path column width
    is fixed up front from all inputs (capped), so rows print as soon as they are ready."""

    HEADER = ("path", "prediction", "confidence", "flags")

    def __init__(self, paths: Sequence[str], stream, max_path_width: int = 60):
        self.stream = stream
        self.path_width = min(max_path_width, max([len(self.HEADER[0]), *(len(p) for p in paths)]))
        self.label_width = max(len(self.HEADER[1]), *(len(c) for c in CLASSES))

    def _line(self, path: str, label: str, confidence: str, flags: str) -> str:
        return (f"{_fit(path, self.path_width).ljust(self.path_width)}  {label.ljust(self.label_width)}  "
                f"{confidence.rjust(10)}  {flags}").rstrip()

    def header(self) -> None:
        print(self._line(*self.HEADER), file=self.stream)
        print("-" * (self.path_width + self.label_width + 26), file=self.stream)

    def row(self, path: str, result: Prediction | BaseException) -> None:
        if isinstance(result, BaseException):
            line = self._line(path, "-", "-", flags_text(result))
        else:
            line = self._line(path, result.label, f"{result.confidence:.3f}", flags_text(result))
        print(line, file=self.stream, flush=True)
