"""The bundled sample images (3 per class) and their attribution."""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

import pytest

from celluscan.data.datasets import read_manifest
from celluscan.data.imageio import load_image
from celluscan.taxonomy import CLASSES, LabelMapper

SAMPLES = Path(str(resources.files("celluscan") / "assets" / "samples"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def sample_files() -> list[Path]:
    return sorted(p for p in SAMPLES.rglob("*.jpg"))


def test_three_decodable_samples_per_class_with_matching_labels():
    files = sample_files()
    assert {p.parent.name for p in files} == set(CLASSES)
    mapper = LabelMapper()
    for c in CLASSES:
        mine = [p for p in files if p.parent.name == c]
        assert len(mine) == 3, c
        for p in mine:
            img = load_image(p)
            assert img.mode == "RGB" and min(img.size) >= 300
            assert p.stat().st_size < 60_000
            assert mapper.map_file(p.name, None)[0] == c  # the file-name code agrees


def test_attribution_lists_every_file_with_its_sha256():
    text = (SAMPLES / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for needle in ("doi:10.1016/j.dib.2020.105474", "doi:10.7937/tcia.2019.36f5o9ld", "CC BY 4.0"):
        assert needle in text
    listed = dict(re.findall(r"\| `([a-z_]+/[^`]+\.jpg)` \| `[^`]+` \| [^|]+ \| `([0-9a-f]{64})` \|", text))
    files = sample_files()
    assert len(listed) == len(files) == 42
    for p in files:
        assert listed[f"{p.parent.name}/{p.name}"] == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.needs_shared
@pytest.mark.skipif(not (SHARED / "blood-cells").is_dir(), reason="../shared/data is not available")
def test_samples_come_from_blood_cells_and_not_external_dev():
    train_shas = {r.sha256: r.label for r in read_manifest(SHARED / "blood-cells" / "manifest.csv")}
    external = {r.sha256 for r in read_manifest(SHARED / "external-dev" / "manifest.csv")}
    for p in sample_files():
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        assert train_shas.get(sha) == p.parent.name, p
        assert sha not in external
