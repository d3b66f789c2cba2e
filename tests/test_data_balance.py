"""Balancing the training split with flagged augmented extra draws."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from corpus import pattern_image

from celluscan.data.balance import BalancedDataset, balanced_indices
from celluscan.data.manifest import ManifestRow


def test_every_class_reaches_target_and_originals_appear_once():
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 30
    idx, aug = balanced_indices(labels, 20, rng=0)
    assert idx.shape == aug.shape
    counts = Counter(labels[i] for i in idx)
    assert counts == {"a": 20, "b": 20, "c": 30}  # majority untouched, never subsampled
    assert idx[: len(labels)].tolist() == list(range(len(labels)))
    assert not aug[: len(labels)].any() and aug[len(labels) :].all()
    # extra copies come from the class itself and are spread evenly
    extra_b = Counter(int(i) for i in idx[aug] if labels[i] == "b")
    assert set(extra_b) == {10, 11, 12} and max(extra_b.values()) - min(extra_b.values()) <= 1


def test_pure_and_seeded():
    labels = np.array([0] * 7 + [1] * 2 + [2] * 11)
    a = balanced_indices(labels, 10, np.random.default_rng(5))
    b = balanced_indices(labels, 10, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = balanced_indices(labels, 10, np.random.default_rng(6))
    assert not np.array_equal(a[0], c[0])
    idx, aug = balanced_indices(labels, 0, 0)
    assert idx.tolist() == list(range(20)) and not aug.any()
    with pytest.raises(ValueError):
        balanced_indices(labels, -1)


def _rows(tmp_path, split="train"):
    rows = []
    for k, (label, n) in enumerate((("basophil", 4), ("monocyte", 1))):
        for i in range(n):
            p = tmp_path / f"{label}_{i}.png"
            pattern_image(10 * k + i, 40, 40).save(p)
            rows.append(ManifestRow(path=str(p), label=label, split=split))
    return rows


def test_balanced_dataset_augments_only_extra_draws(tmp_path):
    rows = _rows(tmp_path)
    seen = []

    def spy_augment(img):
        seen.append(img.size)
        return img.transpose(0)

    ds = BalancedDataset(rows, target_per_class=6, augment=spy_augment, seed=0)
    assert len(ds) == 12
    assert Counter(ds.labels) == {1: 6, 7: 6}  # basophil index 1, monocyte index 7
    items = [ds[i] for i in range(len(ds))]
    assert len(seen) == int(ds.is_augmented.sum()) == 12 - 5
    assert all(isinstance(x, type(items[0][0])) for x, _ in items)
    draws = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        assert len(ds) == 12 and ds.indices[:5].tolist() == [0, 1, 2, 3, 4]
        draws.add(tuple(ds.indices[5:].tolist()))
    assert len(draws) > 1  # each epoch redraws which images get the extra copies
    ds.set_epoch(3)
    again = ds.indices.copy()
    ds.set_epoch(3)
    assert np.array_equal(again, ds.indices)


def test_balanced_dataset_default_trivial_augment_and_transform(tmp_path):
    from celluscan.data.transforms import eval_transform

    ds = BalancedDataset(_rows(tmp_path), target_per_class=3, transform=eval_transform(32, (0.5,) * 3, (0.25,) * 3))
    x, y = ds[len(ds) - 1]
    assert ds.is_augmented[len(ds) - 1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 7


def test_balanced_dataset_refuses_val_and_test_rows(tmp_path):
    rows = _rows(tmp_path) + [ManifestRow(path="/x.png", label="basophil", split="val")]
    with pytest.raises(ValueError, match="training rows only"):
        BalancedDataset(rows, 5)
