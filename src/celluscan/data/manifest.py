"""The dataset manifest (``DATASET/manifest.csv``): rows, reading and writing (no torch).

Columns (docs/design.md): ``path,label,source,sha256,phash,group,width,height,split`` plus
``cached_path`` (the preprocessed copy, relative to the dataset folder; may be empty).
:func:`read_manifest` also reads the simpler manifests that ship with ``../shared/data``
(``path,label,source,sha256``, paths relative to the manifest's folder).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

from celluscan.data.atomic import atomic_write_text
from celluscan.taxonomy import CLASS_TO_INDEX, CLASSES

__all__ = [
    "ManifestRow",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "read_manifest",
    "write_manifest",
]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestRow:
    path: str  # absolute path of the original file
    label: str  # canonical class id
    source: str = ""  # e.g. "pbc", "aml", or the source folder's name
    sha256: str = ""
    phash: str = ""  # 64-bit perceptual hash, 16 hex digits
    group: int = -1  # near-duplicate group id (-1: unknown)
    width: int = 0  # decoded (EXIF-oriented) size of the original
    height: int = 0
    split: str = ""  # train / val / test ("" when not split)
    cached_path: str = ""  # preprocessed copy, relative to the dataset folder

    @property
    def label_index(self) -> int:
        return CLASS_TO_INDEX[self.label]


MANIFEST_COLUMNS = tuple(f.name for f in fields(ManifestRow))
_INT_COLUMNS = {"group", "width", "height"}


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest CSV into rows. Raises ``ValueError`` naming the file and line.

    Required columns: ``path`` and ``label`` (a canonical class id); the others are optional.
    Relative ``path`` values are resolved against the manifest's folder.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{p}: cannot read manifest: {e.strerror or e}") from e
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = {"path", "label"} - set(header)
    if missing:
        raise ValueError(f"{p}: manifest lacks column(s) {', '.join(sorted(missing))} (has {header})")
    base = p.resolve().parent
    rows = []
    for lineno, rec in enumerate(reader, start=2):
        values = {}
        for name in MANIFEST_COLUMNS:
            raw = rec.get(name)
            if raw is None or raw == "":
                continue
            if name in _INT_COLUMNS:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{p}:{lineno}: column {name!r} must be an integer, got {raw!r}") from None
            else:
                values[name] = raw
        if "path" not in values:
            raise ValueError(f"{p}:{lineno}: empty path")
        label = values.get("label", "")
        if label not in CLASS_TO_INDEX:
            raise ValueError(
                f"{p}:{lineno}: label {label!r} is not a class id (known: {', '.join(CLASSES)})"
            )
        split = values.get("split", "")
        if split and split not in SPLITS:
            raise ValueError(f"{p}:{lineno}: split {split!r} is not one of {', '.join(SPLITS)}")
        if not os.path.isabs(values["path"]):
            values["path"] = str(base / values["path"])
        rows.append(ManifestRow(**values))
    return rows


def write_manifest(rows: Sequence[ManifestRow], path: str | os.PathLike) -> None:
    """Write rows as CSV (columns :data:`MANIFEST_COLUMNS`) atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    atomic_write_text(path, buf.getvalue())
