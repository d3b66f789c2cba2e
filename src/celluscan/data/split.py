"""Train/val/test splits: stratified by class, grouped by near-duplicate group, seeded.

A near-duplicate group (see :mod:`celluscan.data.dedup`) is never cut across splits, so a
re-encoded or re-scanned copy of a test image can never sit in train. Within that rule,
each class is divided as close to the requested fractions as possible.

Also :func:`training_subset`: nested, stratified fractions of the training split
(5% subset ⊂ 20% subset ⊂ all of train, for the same seed) for data-efficiency curves.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter, defaultdict
from typing import Hashable, Sequence, TypeVar

import numpy as np

from celluscan.data.manifest import SPLITS

__all__ = ["DEFAULT_FRACTIONS", "parse_fractions", "assign_splits", "training_subset"]

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)

R = TypeVar("R")


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> ``(0.7, 0.15, 0.15)``; checks three values >= 0 summing to 1."""
    if isinstance(text, str):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"fractions {text!r} must be three numbers like 0.7,0.15,0.15") from None
    else:
        values = tuple(float(v) for v in text)
    if len(values) != 3:
        raise ValueError(f"need three fractions (train,val,test), got {len(values)}")
    if any(v < 0 or not math.isfinite(v) for v in values) or values[0] <= 0:
        raise ValueError(f"fractions must be >= 0 with train > 0, got {values}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {values} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def assign_splits(
    labels: Sequence[Hashable],
    groups: Sequence[int],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[str]:
    """Split name ("train"/"val"/"test") for each item.

    Every member of a group gets the same split. Groups are placed largest first (ties in a
    seeded random order); each goes to the split whose per-class counts are furthest below
    their targets (``fraction x class total``) for the classes in the group. Splits with a
    zero fraction get nothing. The result depends only on the inputs and ``seed``.
    """
    fractions = parse_fractions(fractions)
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    totals = Counter(labels)
    current = [Counter() for _ in SPLITS]
    rng = np.random.default_rng(seed)
    group_ids = sorted(members)
    shuffled = [group_ids[k] for k in rng.permutation(len(group_ids))]
    ordered = sorted(shuffled, key=lambda g: -len(members[g]))  # stable: ties stay shuffled
    eligible = [s for s, f in enumerate(fractions) if f > 0]
    out = [""] * len(labels)
    for g in ordered:
        counts = Counter(labels[i] for i in members[g])

        def need(s: int) -> float:
            return sum(n * (fractions[s] * totals[c] - current[s][c]) for c, n in counts.items())

        best = max(eligible, key=lambda s: (need(s), -s))  # ties: the earlier split
        current[best].update(counts)
        for i in members[g]:
            out[i] = SPLITS[best]
    return out


def training_subset(rows: Sequence[R], fraction: float, seed: int = 0) -> list[R]:
    """A stratified, nested subset of the training rows.

    Only rows with ``split == "train"`` are considered (rows without a ``split`` attribute
    are all taken as training rows). Per class, the rows are ordered by path, shuffled with
    a generator seeded by ``(seed, class)`` and the first ``ceil(fraction x n)`` kept, so
    for one seed a smaller fraction is always a subset of a larger one (5% ⊂ 20% ⊂ 100%).
    Rows are returned in their input order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if getattr(r, "split", "train") == "train":
            by_class[str(r.label)].append(i)
    keep: set[int] = set()
    for label, idx in by_class.items():
        idx = sorted(idx, key=lambda i: str(getattr(rows[i], "path", i)))
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        order = rng.permutation(len(idx))
        k = math.ceil(fraction * len(idx) - 1e-9)
        keep.update(idx[j] for j in order[:k])
    return [r for i, r in enumerate(rows) if i in keep]
