"""`celluscan ingest` on the real data in ../shared/data (a few minutes on 2 cores).

The ``shared_dataset`` fixture is session-scoped and caches its output under pytest's
session temp folder, so other test modules can reuse it:
``from test_ingest_shared import shared_dataset`` (or move it into conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from celluscan.data.balance import BalancedDataset, balanced_indices
from celluscan.data.datasets import read_manifest
from celluscan.data.stats import read_stats
from celluscan.taxonomy import CLASSES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SOURCES = [SHARED / "blood-cells", SHARED / "blood-cells-extra"]

pytestmark = [
    pytest.mark.needs_shared,
    pytest.mark.slow,
    pytest.mark.skipif(not all(p.is_dir() for p in SOURCES), reason="../shared/data is not available"),
]


@pytest.fixture(scope="session")
def shared_dataset(tmp_path_factory) -> Path:
    """The dataset built from blood-cells + blood-cells-extra (built once per session)."""
    out = tmp_path_factory.getbasetemp() / "shared_ingest"
    if not (out / "report.json").is_file():
        cmd = [sys.executable, "-m", "celluscan", "ingest", *map(str, SOURCES), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_report_counts_match_manifest_for_all_14_classes(shared_dataset):
    rows = read_manifest(shared_dataset / "manifest.csv")
    report = json.loads((shared_dataset / "report.json").read_text(encoding="utf-8"))
    counts = Counter(r.label for r in rows)
    assert report["counts"]["after"] == {c: counts[c] for c in CLASSES}
    assert all(counts[c] > 0 for c in CLASSES)
    for split in ("train", "val", "test"):
        in_split = Counter(r.label for r in rows if r.split == split)
        assert report["counts"]["by_split"][split] == {c: in_split[c] for c in CLASSES}
        assert all(in_split[c] > 0 for c in CLASSES), split
    # every file of the two shared manifests is accounted for: kept, or reported
    shared_rows = [r for src in SOURCES for r in read_manifest(src / "manifest.csv")]
    assert report["totals"]["found"] == len(shared_rows)
    assert report["totals"]["kept"] + report["totals"]["rejected"] + report["totals"]["exact_duplicates_dropped"] == len(shared_rows)
    assert {r.sha256 for r in rows} <= {r.sha256 for r in shared_rows}
    assert {r.source for r in rows} == {"pbc", "aml"}
    md = (shared_dataset / "report.md").read_text(encoding="utf-8")
    assert all(f"| {c} |" in md for c in CLASSES)


def test_no_sha256_or_near_duplicate_group_spans_two_splits(shared_dataset):
    rows = read_manifest(shared_dataset / "manifest.csv")
    for key in ("sha256", "group"):
        split_of: dict = {}
        for r in rows:
            assert split_of.setdefault(getattr(r, key), r.split) == r.split, (key, r.path)
    assert len({r.sha256 for r in rows}) == len(rows)


def test_balanced_training_reaches_4500_per_class(shared_dataset):
    rows = read_manifest(shared_dataset / "manifest.csv")
    train = [r for r in rows if r.split == "train"]
    idx, aug = balanced_indices([r.label for r in train], 4500, np.random.default_rng(0))
    counts = Counter(train[i].label for i in idx)
    assert all(counts[c] >= 4500 for c in CLASSES), counts
    assert idx.max() < len(train)  # only training rows are ever drawn
    assert not aug[: len(train)].any()


def test_val_and_test_rows_are_original_images(shared_dataset):
    rows = read_manifest(shared_dataset / "manifest.csv")
    held_out = [r for r in rows if r.split in ("val", "test")]
    assert len(held_out) > 1000
    roots = [str(s.resolve()) for s in SOURCES]
    for r in held_out:
        assert any(str(Path(r.path).resolve()).startswith(root) for root in roots), r.path
        assert hashlib.sha256(Path(r.path).read_bytes()).hexdigest() == r.sha256
    with pytest.raises(ValueError, match="training rows only"):
        BalancedDataset(held_out[:5], 10)
    stats = read_stats(shared_dataset)
    assert stats["computed_on"] == "train" and stats["image_size"] == 224
    assert all(0.0 < m < 1.0 for m in stats["mean"]) and all(0.0 < s < 0.5 for s in stats["std"])
