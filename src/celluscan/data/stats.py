"""Channel statistics (mean/std, 0-1 scale) of preprocessed images.

Ingest accumulates per-image sums as it writes each preprocessed image, then combines the
sums of the TRAIN split only (:func:`combine`), so val/test never influence normalisation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from celluscan.data.atomic import atomic_write_text

__all__ = ["PixelSums", "pixel_sums", "combine", "write_stats", "read_stats"]


@dataclass(frozen=True)
class PixelSums:
    """Sums over one or more images: per-channel sum and sum of squares (0-1 scale)."""

    total: tuple[float, float, float]
    total_sq: tuple[float, float, float]
    pixels: int

    def __add__(self, other: "PixelSums") -> "PixelSums":
        return PixelSums(
            tuple(a + b for a, b in zip(self.total, other.total)),  # type: ignore[arg-type]
            tuple(a + b for a, b in zip(self.total_sq, other.total_sq)),  # type: ignore[arg-type]
            self.pixels + other.pixels,
        )


ZERO = PixelSums((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0)


def pixel_sums(img: Image.Image) -> PixelSums:
    """Per-channel sums of an RGB image's pixel values scaled to 0-1."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    return PixelSums(
        tuple(arr.sum(axis=0).tolist()),  # type: ignore[arg-type]
        tuple((arr * arr).sum(axis=0).tolist()),  # type: ignore[arg-type]
        int(arr.shape[0]),
    )


def combine(sums) -> tuple[list[float], list[float]]:
    """Mean and std per channel (0-1 scale) over all pixels of the given :class:`PixelSums`."""
    acc = ZERO
    for s in sums:
        acc = acc + s
    if acc.pixels == 0:
        raise ValueError("cannot compute channel statistics of zero images")
    mean = np.array(acc.total) / acc.pixels
    var = np.array(acc.total_sq) / acc.pixels - mean * mean
    std = np.sqrt(np.clip(var, 0.0, None))
    return mean.tolist(), std.tolist()


def write_stats(
    path: str | os.PathLike, mean, std, image_size: int, num_images: int, pad_fill
) -> None:
    """Write ``stats.json`` (see docs/design.md) atomically."""
    payload = {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "image_size": int(image_size),
        "computed_on": "train",
        "num_images": int(num_images),
        "pad_fill": pad_fill if isinstance(pad_fill, str) else list(pad_fill),
    }
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def read_stats(path: str | os.PathLike) -> dict:
    """Read ``stats.json`` (a dataset folder or the file itself) and check its fields."""
    p = Path(path)
    if p.is_dir():
        p = p / "stats.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: cannot read channel statistics: {e}") from e
    for key in ("mean", "std", "image_size"):
        if key not in data:
            raise ValueError(f"{p}: missing {key!r}")
    if len(data["mean"]) != 3 or len(data["std"]) != 3:
        raise ValueError(f"{p}: mean and std must have 3 values")
    return data
