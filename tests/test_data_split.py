"""Stratified, grouped, seeded splits and nested training subsets."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from celluscan.data.split import assign_splits, parse_fractions, training_subset


def make_items(seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = {"a": 400, "b": 120, "c": 50, "d": 7, "e": 1}
    labels = [k for k, n in counts.items() for _ in range(n)]
    # near-duplicate groups: mostly singletons, some pairs/triples, one mixed-label group
    groups, g = [], 0
    i = 0
    while i < len(labels):
        size = int(rng.choice([1, 1, 1, 1, 2, 3]))
        size = min(size, len(labels) - i)
        # keep groups within one label except for one deliberately mixed group
        while size > 1 and labels[i + size - 1] != labels[i]:
            size -= 1
        groups += [g] * size
        g += 1
        i += size
    groups[0] = groups[-1] = groups[-2]  # a group spanning labels a and e/d
    return labels, groups


def test_groups_never_span_splits_and_classes_are_stratified():
    labels, groups = make_items()
    splits = assign_splits(labels, groups, (0.7, 0.15, 0.15), seed=0)
    by_group = {}
    for g, s in zip(groups, splits):
        assert by_group.setdefault(g, s) == s
    for label, n in Counter(labels).items():
        c = Counter(s for l, s in zip(labels, splits) if l == label)
        if n >= 50:
            assert abs(c["train"] / n - 0.7) < 0.03
            assert abs(c["val"] / n - 0.15) < 0.03
            assert abs(c["test"] / n - 0.15) < 0.03
    assert set(splits) == {"train", "val", "test"}


def test_deterministic_and_seed_dependent():
    labels, groups = make_items()
    a = assign_splits(labels, groups, seed=1)
    assert a == assign_splits(labels, groups, seed=1)
    assert a != assign_splits(labels, groups, seed=2)


def test_zero_fraction_split_gets_nothing():
    labels, groups = make_items()
    splits = assign_splits(labels, groups, (0.8, 0.2, 0.0), seed=0)
    assert "test" not in splits


def test_small_classes_prefer_train():
    splits = assign_splits(["x"], [0], seed=0)
    assert splits == ["train"]


def test_parse_fractions():
    assert parse_fractions("0.7,0.15,0.15") == (0.7, 0.15, 0.15)
    for bad in ("0.5,0.5", "0.7,0.2,0.2", "a,b,c", "0,0.5,0.5", "-0.1,0.6,0.5"):
        with pytest.raises(ValueError):
            parse_fractions(bad)


@dataclass(frozen=True)
class Row:
    path: str
    label: str
    split: str


def test_training_subsets_are_nested_stratified_and_train_only():
    rows = [Row(f"/d/{l}/{i}.jpg", l, "train") for l, n in (("a", 300), ("b", 40), ("c", 3)) for i in range(n)]
    rows += [Row(f"/d/a/val{i}.jpg", "a", "val") for i in range(20)]
    s5, s20, s100 = (set(training_subset(rows, f, seed=3)) for f in (0.05, 0.2, 1.0))
    assert s5 <= s20 <= s100
    assert all(r.split == "train" for r in s100) and len(s100) == 343
    c5 = Counter(r.label for r in s5)
    assert c5 == {"a": 15, "b": 2, "c": 1}  # ceil(fraction x n): every class kept
    assert Counter(r.label for r in s20) == {"a": 60, "b": 8, "c": 1}
    # deterministic, independent of input order, different for another seed
    assert set(training_subset(list(reversed(rows)), 0.05, seed=3)) == s5
    assert set(training_subset(rows, 0.05, seed=4)) != s5
    with pytest.raises(ValueError):
        training_subset(rows, 0.0)
