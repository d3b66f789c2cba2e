"""torch Datasets over manifest rows (see :mod:`celluscan.data.manifest` for the CSV).

``read_manifest``, ``write_manifest`` and ``ManifestRow`` are re-exported here, so
``celluscan.data.datasets.read_manifest`` works as docs/design.md says.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset

from celluscan.data.imageio import DEFAULT_LIMITS, ImageLimits, load_image
from celluscan.data.manifest import (
    MANIFEST_COLUMNS,
    SPLITS,
    ManifestRow,
    read_manifest,
    write_manifest,
)
from celluscan.taxonomy import CLASS_TO_INDEX

__all__ = [
    "ManifestRow",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "read_manifest",
    "write_manifest",
    "ManifestDataset",
]


class ManifestDataset(Dataset):
    """A torch ``Dataset`` of ``(transform(image), label_index)`` over manifest rows.

    Images load through :func:`celluscan.data.imageio.load_image` (RGB PIL). With ``root``
    (the dataset folder) the preprocessed copy ``root / cached_path`` is used when the row
    has one; otherwise the original ``path``. With ``transform=None`` the PIL image itself
    is returned.
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        transform: Callable | None = None,
        root: str | os.PathLike | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
    ):
        self.rows = list(rows)
        self.transform = transform
        self.root = None if root is None else Path(root)
        self.limits = limits
        self.labels = [CLASS_TO_INDEX[r.label] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def image_path(self, index: int) -> str:
        row = self.rows[index]
        if self.root is not None and row.cached_path:
            return str(self.root / row.cached_path)
        return row.path

    def load(self, index: int):
        """The RGB PIL image of row ``index`` (no transform)."""
        return load_image(self.image_path(index), self.limits)

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]
