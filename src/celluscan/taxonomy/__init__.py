"""The 14-class blood-cell taxonomy, lineage groups and label maps.

Everything here is read from ``classes.yaml`` beside this file: the taxonomy is data,
not code paths. The canonical index order (alphabetical by id) is used everywhere.

>>> from celluscan.taxonomy import CLASSES, group_of
>>> CLASSES[0], group_of("myelocyte")
('band_neutrophil', 'granulocytic_precursor')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import yaml

__all__ = [
    "CellClass",
    "Group",
    "Taxonomy",
    "UnknownLabelError",
    "LabelMapper",
    "load_taxonomy",
    "CLASSES",
    "NUM_CLASSES",
    "CLASS_TO_INDEX",
    "GROUPS",
    "group_of",
    "normalise_name",
]


@dataclass(frozen=True)
class CellClass:
    id: str
    name: str
    code: str
    group: str
    index: int


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    lineage: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[CellClass, ...]
    groups: Mapping[str, Group]
    adjacent_pairs: frozenset[frozenset[str]]
    coarse_labels: Mapping[str, tuple[str, ...]]
    alarm_classes: tuple[str, ...]
    label_maps: Mapping[str, Mapping[str, str]]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.classes)

    def cls(self, class_id: str) -> CellClass:
        for c in self.classes:
            if c.id == class_id:
                return c
        raise KeyError(f"unknown class id {class_id!r}; known: {', '.join(self.ids)}")

    def index(self, class_id: str) -> int:
        return self.cls(class_id).index

    def group_of(self, class_id: str) -> str:
        return self.cls(class_id).group

    def group_names(self) -> tuple[str, ...]:
        return tuple(self.groups)

    def group_index_map(self) -> list[int]:
        """For each class index, the index of its group in ``group_names()``."""
        names = self.group_names()
        return [names.index(c.group) for c in self.classes]

    def are_adjacent(self, a: str, b: str) -> bool:
        """True when two classes are biologically adjacent or share a lineage group."""
        if a == b:
            return True
        if frozenset((a, b)) in self.adjacent_pairs:
            return True
        return self.group_of(a) == self.group_of(b)

    def coarse_match(self, coarse_label: str, predicted_class: str) -> bool:
        """Does a fine prediction count as a hit for a coarse label (e.g. 'neutrophil')?"""
        members = self.coarse_labels.get(coarse_label, (coarse_label,))
        return predicted_class in members

    def to_coarse(self, class_id: str) -> str:
        """Map a fine class to its coarse label where one exists, else itself."""
        for coarse, members in self.coarse_labels.items():
            if class_id in members:
                return coarse
        return class_id


def normalise_name(raw: str) -> str:
    """'Band Neutrophils' -> 'band_neutrophil'; 'seg-neutrophil' -> 'seg_neutrophil';
    'Eosinophiles' -> 'eosinophil'."""
    s = re.sub(r"[^0-9a-z]+", "_", raw.strip().lower()).strip("_")
    tokens = []
    for tok in s.split("_"):
        if len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
            tok = tok[:-1]  # plural: 'lymphocytes' -> 'lymphocyte'
        if len(tok) > 5 and tok.endswith("phile"):
            tok = tok[:-1]  # 'eosinophile(s)', 'neutrophile' -> 'eosinophil', 'neutrophil'
        tokens.append(tok)
    return "_".join(t for t in tokens if t)


@lru_cache(maxsize=None)
def _load(path: str | None) -> Taxonomy:
    if path is None:
        text = resources.files(__package__).joinpath("classes.yaml").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    classes = tuple(
        CellClass(id=c["id"], name=c["name"], code=c["code"], group=c["group"], index=i)
        for i, c in enumerate(raw["classes"])
    )
    ids = [c.id for c in classes]
    if ids != sorted(ids):
        raise ValueError("taxonomy classes must be listed in canonical (alphabetical) order")
    groups = {
        gid: Group(
            id=gid,
            name=g["name"],
            lineage=g["lineage"],
            members=tuple(c.id for c in classes if c.group == gid),
        )
        for gid, g in raw["groups"].items()
    }
    for c in classes:
        if c.group not in groups:
            raise ValueError(f"class {c.id} names unknown group {c.group}")
    return Taxonomy(
        classes=classes,
        groups=groups,
        adjacent_pairs=frozenset(frozenset(p) for p in raw.get("adjacent_pairs", [])),
        coarse_labels={k: tuple(v) for k, v in raw.get("coarse_labels", {}).items()},
        alarm_classes=tuple(raw.get("alarm_classes", [])),
        label_maps={k: dict(v) for k, v in raw.get("label_maps", {}).items()},
    )


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    return _load(None if path is None else str(path))


TAXONOMY = load_taxonomy()
CLASSES: tuple[str, ...] = TAXONOMY.ids
NUM_CLASSES = len(CLASSES)
CLASS_TO_INDEX = {c: i for i, c in enumerate(CLASSES)}
GROUPS: tuple[str, ...] = TAXONOMY.group_names()


def group_of(class_id: str) -> str:
    return TAXONOMY.group_of(class_id)


class UnknownLabelError(ValueError):
    """Raised when labels cannot be mapped; lists every unknown label and how to fix it."""

    def __init__(self, unknown: Mapping[str, Iterable[str]]):
        self.unknown = {k: sorted(set(v))[:3] for k, v in unknown.items()}
        lines = [f"{len(self.unknown)} label(s) could not be mapped to a CelluScan class:"]
        for label, examples in sorted(self.unknown.items()):
            lines.append(f"  {label!r}  (e.g. {', '.join(examples)})")
        lines.append(
            "Map them with a YAML file passed as --label-map, e.g.\n"
            "  my_folder_name: segmented_neutrophil\n"
            "  SMUDGE: skip   # 'skip' drops images with that label\n"
            f"Canonical classes: {', '.join(CLASSES)}.\n"
            "Or pass --skip-unknown to skip (and report) them."
        )
        super().__init__("\n".join(lines))


SKIP = "skip"


class LabelMapper:
    """Maps raw labels (folder names, file-name codes) to canonical class ids.

    Resolution order for a file: a user mapping for the folder name or file code, then a
    known file-name code (PBC prefixes, Munich AML codes; the first token of the file name,
    or the second when the first is a source tag such as ``pbc_``), then the folder name
    through the forgiving name map. Returns ``None`` for unknown labels and ``SKIP`` for
    labels the user (or the taxonomy's unmapped list) asked to skip.
    """

    def __init__(self, user_map: Mapping[str, str] | None = None, taxonomy: Taxonomy = TAXONOMY):
        self.taxonomy = taxonomy
        self.user_map = {}
        for k, v in (user_map or {}).items():
            v = str(v)
            if v != SKIP and v not in taxonomy.ids:
                raise ValueError(
                    f"label map sends {k!r} to {v!r}, which is not a class id "
                    f"(known: {', '.join(taxonomy.ids)}, or 'skip')"
                )
            self.user_map[str(k)] = v
            self.user_map[normalise_name(str(k))] = v
        maps = taxonomy.label_maps
        self.codes: dict[str, str] = {**maps.get("pbc", {}), **maps.get("aml", {})}
        self.unmapped_codes: dict[str, str] = dict(maps.get("aml_unmapped", {}))
        self.names: dict[str, str] = dict(maps.get("names", {}))
        for c in taxonomy.classes:
            self.names.setdefault(c.id, c.id)

    @classmethod
    def from_file(cls, path: str | Path | None) -> "LabelMapper":
        if path is None:
            return cls()
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{p}: cannot read label map: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a label map must be a YAML mapping of raw label -> class id")
        return cls(data)

    def map_name(self, raw: str) -> str | None:
        """A folder or label name -> class id, ``SKIP`` or None."""
        if raw in self.user_map:
            return self.user_map[raw]
        norm = normalise_name(raw)
        if norm in self.user_map:
            return self.user_map[norm]
        if raw in self.codes:
            return self.codes[raw]
        return self.names.get(norm)

    def file_code(self, filename: str) -> str | None:
        """The dataset code in a file name ('BA_123.jpg', 'pbc_BA_123.jpg', 'MYO_0001.tif')."""
        stem = Path(filename).stem
        tokens = re.split(r"[_\-\s]+", stem)
        candidates = tokens[:2] if len(tokens) > 1 else tokens
        for tok in candidates:
            if tok in self.user_map or tok in self.codes or tok in self.unmapped_codes:
                return tok
        return None

    def map_file(self, filename: str, folder: str | None) -> tuple[str | None, str]:
        """Return ``(class id | SKIP | None, the raw label used)`` for one file."""
        code = self.file_code(filename)
        if code is not None:
            if code in self.user_map:
                return self.user_map[code], code
            if code in self.codes:
                return self.codes[code], code
            if code in self.unmapped_codes:
                return None, code
        if folder is not None:
            return self.map_name(folder), folder
        return None, Path(filename).stem
