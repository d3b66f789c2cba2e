"""When to flag a prediction as uncertain, and the coarser answer to give instead.

Two reasons make a prediction uncertain:

* **low confidence**: the top probability is below ``threshold`` (default 0.6);
* **biologically adjacent top classes**: the two most likely classes are adjacent in the
  taxonomy (e.g. myelocyte vs metamyelocyte, a real morphological continuum) and the
  runner-up holds at least ``adjacent_min`` (default 0.2) of the probability.

When the model is torn between adjacent classes the useful answer is the lineage group
("Granulocytic precursor: myelocyte or metamyelocyte — review recommended").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from celluscan.taxonomy import TAXONOMY, Taxonomy

__all__ = ["UncertaintyPolicy", "UncertaintyAssessment", "assess_uncertainty"]

LOW_CONFIDENCE = "low confidence"


@dataclass(frozen=True)
class UncertaintyPolicy:
    """threshold: top probability below this is 'low confidence'.
    adjacent_min: runner-up probability from which adjacent top classes count as uncertain."""

    threshold: float = 0.6
    adjacent_min: float = 0.2

    def __post_init__(self) -> None:
        for name in ("threshold", "adjacent_min"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"uncertainty {name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class UncertaintyAssessment:
    uncertain: bool
    reason: str  # "" when certain; reasons joined by "; " when several apply
    group_answer: str  # "" when there is no useful coarser answer


def _display(taxonomy: Taxonomy, class_id: str) -> str:
    return taxonomy.cls(class_id).name.lower()


def _group_title(taxonomy: Taxonomy, class_ids: Sequence[str]) -> str:
    names: list[str] = []
    for c in class_ids:
        name = taxonomy.groups[taxonomy.group_of(c)].name
        if name not in names:
            names.append(name)
    return " / ".join(names)


def assess_uncertainty(
    probs: Sequence[float],
    class_names: Sequence[str],
    policy: UncertaintyPolicy = UncertaintyPolicy(),
    taxonomy: Taxonomy = TAXONOMY,
) -> UncertaintyAssessment:
    """Judge one probability vector (``probs[i]`` belongs to ``class_names[i]``)."""
    if len(probs) != len(class_names):
        raise ValueError(f"{len(probs)} probabilities for {len(class_names)} classes")
    if len(probs) == 0:
        raise ValueError("empty probability vector")
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    top, top_p = class_names[order[0]], float(probs[order[0]])
    reasons: list[str] = []
    group_answer = ""
    if top_p < policy.threshold:
        reasons.append(LOW_CONFIDENCE)
    if len(order) > 1:
        second, second_p = class_names[order[1]], float(probs[order[1]])
        if second_p >= policy.adjacent_min and taxonomy.are_adjacent(top, second):
            a, b = _display(taxonomy, top), _display(taxonomy, second)
            reasons.append(f"top classes are biologically adjacent ({a} vs {b})")
            group_answer = (
                f"{_group_title(taxonomy, (top, second))}: {a} or {b} — review recommended"
            )
    if reasons and not group_answer:
        # Low confidence without an adjacent runner-up: offer the lineage group when the
        # group as a whole is confidently predicted (its members' probabilities summed).
        group = taxonomy.group_of(top)
        members = [i for i, c in enumerate(class_names) if taxonomy.group_of(c) == group]
        group_p = sum(float(probs[i]) for i in members)
        if len(members) > 1 and group_p >= policy.threshold:
            group_answer = (
                f"{taxonomy.groups[group].name} (group probability {group_p:.2f}), "
                f"most likely {_display(taxonomy, top)} — review recommended"
            )
    return UncertaintyAssessment(bool(reasons), "; ".join(reasons), group_answer)
