"""Smear (batch) differential: counts and percentages per class and per lineage group, and flags.

Flags come from the knowledge file's machine-readable rules (``flag_if_present``,
``flag_if_above_percent``). A flag raised mostly (more than half) by images the model marked
*unfamiliar* is downgraded to severity ``unreliable``: the images behind it look unlike the
training data, so the alarm cannot be trusted either way.

Percentages are shares of the successfully classified images (files that failed to load do
not count).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

from celluscan.serving.knowledge import Knowledge, load_knowledge
from celluscan.taxonomy import TAXONOMY, Taxonomy

__all__ = ["Flag", "Differential", "compute_differential", "plot_differential_png"]

UNRELIABLE = "unreliable"


class ClassifiedCell(Protocol):
    """What the differential needs from a prediction (``inference.Prediction`` fits)."""

    label: str
    uncertain: bool
    unfamiliar: bool


@dataclass(frozen=True)
class Flag:
    """One raised rule. ``severity`` is what to show; ``rule_severity`` is what the rule says."""

    class_id: str
    class_name: str
    rule: str  # "present" | "above_percent"
    threshold: float | None  # percent, for above_percent rules
    severity: str
    rule_severity: str
    text: str
    count: int
    percent: float
    unfamiliar_count: int
    uncertain_count: int

    @property
    def reliable(self) -> bool:
        return self.severity != UNRELIABLE

    def display_text(self) -> str:
        """The rule's text, plus why it is unreliable when it is."""
        detail = f"{self.count} image(s), {self.percent:.1f}%"
        if self.uncertain_count:
            detail += f"; {self.uncertain_count} of them uncertain"
        if not self.reliable:
            return (
                f"Unreliable: {self.text} ({detail}). {self.unfamiliar_count} of the "
                f"{self.count} image(s) behind this flag look unlike the training images."
            )
        return f"{self.text} ({detail})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percent"] = round(self.percent, 2)
        d["reliable"] = self.reliable
        d["message"] = self.display_text()
        return d


@dataclass(frozen=True)
class Differential:
    total: int
    counts: dict[str, int]  # every class, canonical order
    percentages: dict[str, float]
    group_counts: dict[str, int]  # every group, taxonomy order
    group_percentages: dict[str, float]
    uncertain_count: int
    unfamiliar_count: int
    flags: tuple[Flag, ...]  # most severe first

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "counts": dict(self.counts),
            "percentages": {k: round(v, 2) for k, v in self.percentages.items()},
            "group_counts": dict(self.group_counts),
            "group_percentages": {k: round(v, 2) for k, v in self.group_percentages.items()},
            "uncertain": self.uncertain_count,
            "unfamiliar": self.unfamiliar_count,
            "flags": [f.to_dict() for f in self.flags],
        }


def _pct(n: int, total: int) -> float:
    return 100.0 * n / total if total else 0.0


def compute_differential(
    cells: Sequence[ClassifiedCell],
    knowledge: Knowledge | None = None,
    taxonomy: Taxonomy = TAXONOMY,
) -> Differential:
    """Count ``cells`` (classified images) per class and group and apply the flag rules."""
    kb = knowledge if knowledge is not None else load_knowledge()
    ids = taxonomy.ids
    counts = {c: 0 for c in ids}
    unfamiliar = {c: 0 for c in ids}
    uncertain = {c: 0 for c in ids}
    for cell in cells:
        if cell.label not in counts:
            raise ValueError(f"prediction label {cell.label!r} is not a class id")
        counts[cell.label] += 1
        unfamiliar[cell.label] += bool(cell.unfamiliar)
        uncertain[cell.label] += bool(cell.uncertain)
    total = sum(counts.values())
    percentages = {c: _pct(n, total) for c, n in counts.items()}
    group_counts = {g: 0 for g in taxonomy.group_names()}
    for c, n in counts.items():
        group_counts[taxonomy.group_of(c)] += n
    group_percentages = {g: _pct(n, total) for g, n in group_counts.items()}

    flags: list[Flag] = []
    for c in ids:
        n = counts[c]
        if n == 0:
            continue
        card = kb.card(c)
        raised: list[tuple[str, float | None, str, str]] = []
        if card.flag_if_present is not None:
            raised.append(("present", None, card.flag_if_present.severity, card.flag_if_present.text))
        rule = card.flag_if_above_percent
        if rule is not None and percentages[c] > rule.percent:
            raised.append(("above_percent", rule.percent, rule.severity, rule.text))
        for kind, threshold, rule_severity, text in raised:
            mostly_unfamiliar = 2 * unfamiliar[c] > n
            flags.append(Flag(
                class_id=c,
                class_name=card.name,
                rule=kind,
                threshold=threshold,
                severity=UNRELIABLE if mostly_unfamiliar else rule_severity,
                rule_severity=rule_severity,
                text=text,
                count=n,
                percent=percentages[c],
                unfamiliar_count=unfamiliar[c],
                uncertain_count=uncertain[c],
            ))
    flags.sort(key=lambda f: (-kb.severity_rank(f.severity), -kb.severity_rank(f.rule_severity),
                              ids.index(f.class_id)))
    return Differential(
        total=total,
        counts=counts,
        percentages=percentages,
        group_counts=group_counts,
        group_percentages=group_percentages,
        uncertain_count=sum(uncertain.values()),
        unfamiliar_count=sum(unfamiliar.values()),
        flags=tuple(flags),
    )


def plot_differential_png(diff: Differential, taxonomy: Taxonomy = TAXONOMY) -> bytes:
    """A horizontal bar chart of the differential (classes grouped by lineage), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(taxonomy.group_names())
    order = sorted(taxonomy.classes, key=lambda c: (groups.index(c.group), c.index))
    palette = plt.get_cmap("tab10")
    colours = [palette(groups.index(c.group) % 10) for c in order]
    values = [diff.percentages[c.id] for c in order]
    labels = [c.name for c in order]

    fig, ax = plt.subplots(figsize=(9.5, 5.2), dpi=110)
    try:
        y = list(range(len(order)))[::-1]
        ax.barh(y, values, color=colours)
        ax.set_yticks(y, labels)
        top = max(values + [1.0])
        for yi, c, v in zip(y, order, values):
            if diff.counts[c.id]:
                ax.text(v + top * 0.01, yi, f"{diff.counts[c.id]} ({v:.1f}%)", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.22)
        ax.set_xlabel("% of classified images")
        ax.set_title(f"Differential of {diff.total} classified image(s)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=palette(i % 10)) for i, _ in enumerate(groups)]
        names = [f"{taxonomy.groups[g].name} {diff.group_percentages[g]:.1f}%" for g in groups]
        ax.legend(handles, names, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False, title="Lineage group", title_fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
