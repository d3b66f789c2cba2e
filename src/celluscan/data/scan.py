"""Find image files under source folders and map each to a class label.

Layouts understood (mixable): folder-per-class (``SRC/Lymphocytes/x.jpg``, nested folders
allowed: the nearest folder whose name maps wins) and files named with a known code
(``BA_123.jpg``, ``pbc_SNE_9.jpg``, ``MYO_0001.tiff``; see
:meth:`celluscan.taxonomy.LabelMapper.map_file`). Symlinked folders are never followed (no
loops), and visited folders are tracked by inode as a second guard. Hidden files and
folders (``.DS_Store``, ``.git``) and files without an image suffix are ignored (counted).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from celluscan.data.imageio import IMAGE_SUFFIXES
from celluscan.taxonomy import SKIP, LabelMapper

__all__ = ["KNOWN_SOURCE_TAGS", "Candidate", "ScanResult", "source_of", "scan_sources"]

# File-name prefixes that name a public dataset (``pbc_BA_1.jpg``, ``tecom_137.bmp``).
KNOWN_SOURCE_TAGS = frozenset({"pbc", "aml", "bccd", "tecom"})

_TOKEN_SPLIT = re.compile(r"[_\-\s]+")


@dataclass(frozen=True)
class Candidate:
    """One image file found by the scan, with its mapped label."""

    path: str  # absolute (symlinks not resolved)
    label: str  # canonical class id
    raw_label: str  # the folder name or file code the label came from
    source: str  # file-name source tag, else the source folder's name
    source_index: int  # which SRC argument it came from


@dataclass
class ScanResult:
    candidates: list[Candidate] = field(default_factory=list)
    unknown: dict[str, list[str]] = field(default_factory=dict)  # raw label -> files
    skipped_by_map: list[tuple[str, str]] = field(default_factory=list)  # (path, raw label)
    ignored: list[str] = field(default_factory=list)  # hidden / non-image files
    symlinked_dirs: list[str] = field(default_factory=list)  # not followed
    walk_errors: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)


def source_of(filename: str, mapper: LabelMapper, fallback: str) -> str:
    """The source tag in a file name (``pbc_BA_1.jpg`` -> ``pbc``), else ``fallback``.

    A tag is a known dataset prefix (:data:`KNOWN_SOURCE_TAGS`), or a lower-case alphabetic
    first token directly followed by a known label code (``munich_MYO_1.jpg``).
    """
    tokens = _TOKEN_SPLIT.split(Path(filename).stem)
    if len(tokens) >= 2:
        first = tokens[0]
        if first.lower() in KNOWN_SOURCE_TAGS:
            return first.lower()
        if first.isalpha() and first.islower() and mapper.file_code(filename) == tokens[1]:
            return first
    return fallback


def _label_for(name: str, folders: Sequence[str], mapper: LabelMapper) -> tuple[str | None, str]:
    """Map one file: file code / nearest folder first, then farther folders."""
    label, raw = mapper.map_file(name, folders[0] if folders else None)
    if label is None and mapper.file_code(name) is None:
        for folder in folders[1:]:
            found = mapper.map_name(folder)
            if found is not None:
                return found, folder
    return label, raw


def scan_sources(
    sources: Sequence[str | os.PathLike],
    mapper: LabelMapper,
    exclude: Sequence[str | os.PathLike] = (),
) -> ScanResult:
    """Walk each source folder (sorted, deterministic) and map every image file's label.

    ``exclude``: folders never entered (e.g. the output dataset when it lies inside a
    source). Candidates are returned sorted by (source index, path).
    """
    result = ScanResult()
    excluded = {os.path.realpath(p) for p in exclude}
    visited: set[tuple[int, int]] = set()
    for src_index, src in enumerate(sources):
        root = os.path.abspath(src)
        if not os.path.isdir(root):
            raise ValueError(f"{src}: not a folder")
        src_name = os.path.basename(root.rstrip(os.sep)) or root
        found: list[Candidate] = []

        def on_error(err: OSError) -> None:
            result.walk_errors.append((str(err.filename), err.strerror or str(err)))

        for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=on_error):
            try:
                st = os.stat(dirpath)
                key = (st.st_dev, st.st_ino)
            except OSError as e:
                result.walk_errors.append((dirpath, e.strerror or str(e)))
                dirnames[:] = []
                continue
            if key in visited or os.path.realpath(dirpath) in excluded:
                dirnames[:] = []
                continue
            visited.add(key)
            keep_dirs = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    result.symlinked_dirs.append(full)
                elif d.startswith("."):
                    result.ignored.append(full + os.sep)
                else:
                    keep_dirs.append(d)
            dirnames[:] = keep_dirs
            rel_parts = Path(os.path.relpath(dirpath, root)).parts
            folders = [p for p in reversed(rel_parts) if p != "."] + [src_name]
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    result.ignored.append(full)
                    continue
                label, raw = _label_for(name, folders, mapper)
                if label == SKIP:
                    result.skipped_by_map.append((full, raw))
                elif label is None:
                    result.unknown.setdefault(raw, []).append(full)
                else:
                    source = source_of(name, mapper, src_name)
                    found.append(Candidate(full, label, raw, source, src_index))
        found.sort(key=lambda c: c.path)
        result.candidates.extend(found)
    return result
