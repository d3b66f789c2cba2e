"""Cell knowledge cards: textbook facts and flag rules for each class, read from ``knowledge.yaml``.

The YAML file is data; this module loads it into frozen dataclasses, validates it against the
taxonomy (one card per class, canonical order, known severities, known look-alike ids) and
renders a card as Markdown for the web UI and the generated docs.

>>> from celluscan.serving.knowledge import load_knowledge
>>> kb = load_knowledge()
>>> kb.card("myeloblast").flag_if_present.severity
'urgent'
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from celluscan.taxonomy import TAXONOMY, Taxonomy

__all__ = [
    "Severity",
    "Morphology",
    "LookAlike",
    "ReferenceRange",
    "PresenceRule",
    "PercentRule",
    "CellCard",
    "Knowledge",
    "KnowledgeError",
    "load_knowledge",
    "render_card_markdown",
    "MORPHOLOGY_FIELDS",
]

MORPHOLOGY_FIELDS = ("size", "nucleus", "chromatin", "cytoplasm", "granules")


class KnowledgeError(ValueError):
    """The knowledge file is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Severity:
    id: str
    rank: int
    label: str
    description: str


@dataclass(frozen=True)
class Morphology:
    size: str
    nucleus: str
    chromatin: str
    cytoplasm: str
    granules: str


@dataclass(frozen=True)
class LookAlike:
    """A cell this class is confused with. ``class_id`` is set when it is a CelluScan class."""

    name: str
    how_to_tell: str
    class_id: str | None = None


@dataclass(frozen=True)
class ReferenceRange:
    """Adult peripheral-blood reference range. ``percent`` is of leukocytes."""

    percent: tuple[float, float] | None
    absolute: tuple[float, float] | None
    absolute_unit: str
    normally_absent: bool
    note: str

    def describe(self) -> str:
        """One plain line, e.g. '40-75% of leukocytes; 2.0-7.5 x10^9/L'."""
        parts = []
        if self.normally_absent:
            parts.append("normally absent from adult peripheral blood")
        if self.percent is not None:
            lo, hi = self.percent
            parts.append(f"{_num(lo)}-{_num(hi)}% of leukocytes")
        if self.absolute is not None:
            lo, hi = self.absolute
            parts.append(f"{_num(lo)}-{_num(hi)} {self.absolute_unit}".strip())
        return "; ".join(parts) if parts else "no reference range"


@dataclass(frozen=True)
class PresenceRule:
    """Flag a batch in which any image is predicted as this class."""

    severity: str
    text: str


@dataclass(frozen=True)
class PercentRule:
    """Flag a batch in which this class is more than ``percent`` % of the classified images."""

    percent: float
    severity: str
    text: str


@dataclass(frozen=True)
class CellCard:
    id: str
    name: str
    group: str
    group_name: str
    summary: str
    morphology: Morphology
    look_alikes: tuple[LookAlike, ...]
    reference_range: ReferenceRange
    raised: tuple[str, ...]
    lowered: tuple[str, ...]
    present_in: tuple[str, ...]
    flag_if_present: PresenceRule | None
    flag_if_above_percent: PercentRule | None


@dataclass(frozen=True)
class Knowledge:
    notice: str
    differential_note: str
    severities: Mapping[str, Severity]
    cards: Mapping[str, CellCard]  # canonical class order

    def card(self, class_id: str) -> CellCard:
        try:
            return self.cards[class_id]
        except KeyError:
            raise KeyError(
                f"no knowledge card for {class_id!r}; known: {', '.join(self.cards)}"
            ) from None

    def severity_rank(self, severity: str) -> int:
        return self.severities[severity].rank


def _num(x: float) -> str:
    return f"{x:g}"


def _text(raw: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False) -> str:
    value = raw.get(key)
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise KnowledgeError(f"{where}: '{key}' must be a non-empty string")
    return " ".join(value.split())


def _text_list(raw: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise KnowledgeError(f"{where}: '{key}' must be a list of strings")
    return tuple(" ".join(v.split()) for v in value)


def _range(raw: Any, where: str) -> tuple[float, float] | None:
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(v, (int, float)) for v in raw)
        or raw[0] > raw[1]
    ):
        raise KnowledgeError(f"{where}: a range must be [low, high] numbers with low <= high")
    return float(raw[0]), float(raw[1])


def _severity(raw: Mapping[str, Any], where: str, severities: Mapping[str, Severity]) -> str:
    sev = raw.get("severity")
    if sev not in severities or sev == "unreliable":
        allowed = ", ".join(s for s in severities if s != "unreliable")
        raise KnowledgeError(f"{where}: severity {sev!r} is not one of {allowed}")
    return sev


def _parse_card(cid: str, raw: Any, where: str, taxonomy: Taxonomy,
                severities: Mapping[str, Severity]) -> CellCard:
    if not isinstance(raw, dict):
        raise KnowledgeError(f"{where}: a card must be a mapping")
    cls = taxonomy.cls(cid)
    morph_raw = raw.get("morphology")
    if not isinstance(morph_raw, dict):
        raise KnowledgeError(f"{where}: 'morphology' must be a mapping of {', '.join(MORPHOLOGY_FIELDS)}")
    morphology = Morphology(**{f: _text(morph_raw, f, f"{where}.morphology") for f in MORPHOLOGY_FIELDS})

    look_alikes = []
    for i, la in enumerate(raw.get("look_alikes") or []):
        lw = f"{where}.look_alikes[{i}]"
        if not isinstance(la, dict) or ("class" in la) == ("name" in la):
            raise KnowledgeError(f"{lw}: give exactly one of 'class' (a class id) or 'name'")
        if "class" in la:
            other = la["class"]
            if other not in taxonomy.ids:
                raise KnowledgeError(f"{lw}: {other!r} is not a class id")
            if other == cid:
                raise KnowledgeError(f"{lw}: a class cannot be its own look-alike")
            look_alikes.append(LookAlike(taxonomy.cls(other).name, _text(la, "how_to_tell", lw), other))
        else:
            look_alikes.append(LookAlike(_text(la, "name", lw), _text(la, "how_to_tell", lw)))

    rr = raw.get("reference_range")
    if not isinstance(rr, dict):
        raise KnowledgeError(f"{where}: 'reference_range' must be a mapping")
    rw = f"{where}.reference_range"
    reference = ReferenceRange(
        percent=_range(rr.get("percent"), f"{rw}.percent"),
        absolute=_range(rr.get("absolute"), f"{rw}.absolute"),
        absolute_unit=_text(rr, "absolute_unit", rw, allow_empty=True),
        normally_absent=bool(rr.get("normally_absent", False)),
        note=_text(rr, "note", rw, allow_empty=True),
    )
    if reference.absolute is not None and not reference.absolute_unit:
        raise KnowledgeError(f"{rw}: an absolute range needs an 'absolute_unit'")

    flags = raw.get("flags") or {}
    if not isinstance(flags, dict):
        raise KnowledgeError(f"{where}: 'flags' must be a mapping")
    unknown = set(flags) - {"flag_if_present", "flag_if_above_percent"}
    if unknown:
        raise KnowledgeError(f"{where}.flags: unknown rule(s) {sorted(unknown)}")
    presence = None
    if "flag_if_present" in flags:
        fw = f"{where}.flags.flag_if_present"
        fr = flags["flag_if_present"]
        if not isinstance(fr, dict):
            raise KnowledgeError(f"{fw}: must be a mapping with severity and text")
        presence = PresenceRule(_severity(fr, fw, severities), _text(fr, "text", fw))
    above = None
    if "flag_if_above_percent" in flags:
        fw = f"{where}.flags.flag_if_above_percent"
        fr = flags["flag_if_above_percent"]
        if not isinstance(fr, dict) or not isinstance(fr.get("percent"), (int, float)):
            raise KnowledgeError(f"{fw}: must be a mapping with percent, severity and text")
        if not 0 <= fr["percent"] < 100:
            raise KnowledgeError(f"{fw}: percent must be in [0, 100)")
        above = PercentRule(float(fr["percent"]), _severity(fr, fw, severities), _text(fr, "text", fw))

    group = taxonomy.groups[cls.group]
    return CellCard(
        id=cid,
        name=cls.name,
        group=cls.group,
        group_name=group.name,
        summary=_text(raw, "summary", where),
        morphology=morphology,
        look_alikes=tuple(look_alikes),
        reference_range=reference,
        raised=_text_list(raw, "raised", where),
        lowered=_text_list(raw, "lowered", where),
        present_in=_text_list(raw, "present_in", where),
        flag_if_present=presence,
        flag_if_above_percent=above,
    )


def parse_knowledge(raw: Any, source: str = "knowledge.yaml", taxonomy: Taxonomy = TAXONOMY) -> Knowledge:
    """Validate parsed YAML and build :class:`Knowledge`. Raises :class:`KnowledgeError`."""
    if not isinstance(raw, dict):
        raise KnowledgeError(f"{source}: top level must be a mapping")
    sev_raw = raw.get("severities")
    if not isinstance(sev_raw, dict) or "unreliable" not in sev_raw:
        raise KnowledgeError(f"{source}: 'severities' must be a mapping that includes 'unreliable'")
    severities = {}
    for sid, s in sev_raw.items():
        if not isinstance(s, dict) or not isinstance(s.get("rank"), int):
            raise KnowledgeError(f"{source}: severities.{sid} needs an integer rank")
        severities[sid] = Severity(sid, s["rank"], _text(s, "label", f"{source}: severities.{sid}"),
                                   _text(s, "description", f"{source}: severities.{sid}"))
    cells = raw.get("cells")
    if not isinstance(cells, dict):
        raise KnowledgeError(f"{source}: 'cells' must be a mapping of class id -> card")
    ids = list(cells)
    if ids != list(taxonomy.ids):
        missing = [c for c in taxonomy.ids if c not in cells]
        extra = [c for c in ids if c not in taxonomy.ids]
        raise KnowledgeError(
            f"{source}: cards must cover every class exactly once in canonical order; "
            f"missing: {missing or 'none'}, unknown: {extra or 'none'}"
        )
    cards = {cid: _parse_card(cid, cells[cid], f"{source}: cells.{cid}", taxonomy, severities)
             for cid in ids}
    return Knowledge(
        notice=_text(raw, "notice", source),
        differential_note=_text(raw, "differential_note", source),
        severities=severities,
        cards=cards,
    )


@lru_cache(maxsize=None)
def _load(path: str | None) -> Knowledge:
    if path is None:
        source = "celluscan/serving/knowledge.yaml"
        text = resources.files(__package__).joinpath("knowledge.yaml").read_text(encoding="utf-8")
    else:
        source = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise KnowledgeError(f"{path}: cannot read knowledge file: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KnowledgeError(f"{source}: invalid YAML: {e}") from None
    return parse_knowledge(raw, source)


def load_knowledge(path: str | Path | None = None) -> Knowledge:
    """Load the knowledge cards (the packaged file by default). Cached per path."""
    return _load(None if path is None else str(path))


def render_card_markdown(card: CellCard, notice: str | None = None, heading_level: int = 3) -> str:
    """A card as Markdown: summary, morphology, look-alikes, reference range, conditions."""
    h = "#" * heading_level
    lines = [f"{h} {card.name}", "", f"*Lineage group: {card.group_name}*", "", card.summary, ""]
    lines += [f"**Morphology**", ""]
    for field in MORPHOLOGY_FIELDS:
        lines.append(f"- **{field.capitalize()}:** {getattr(card.morphology, field)}")
    lines.append("")
    if card.look_alikes:
        lines += ["**How to tell it from look-alikes**", ""]
        lines += [f"- **{la.name}:** {la.how_to_tell}" for la in card.look_alikes]
        lines.append("")
    rr = card.reference_range
    lines += [f"**Adult reference range:** {rr.describe()}." + (f" {rr.note}" if rr.note else ""), ""]
    for title, items in (("Raised in", card.raised), ("Lowered in", card.lowered),
                         ("Seen in peripheral blood in", card.present_in)):
        if items:
            lines += [f"**{title}**", ""] + [f"- {x}" for x in items] + [""]
    if notice:
        lines += [f"> {notice}", ""]
    return "\n".join(lines).rstrip() + "\n"
