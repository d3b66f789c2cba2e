"""Manifest CSV round trip, validation and the ManifestDataset."""

from __future__ import annotations

import pytest
import torch

from corpus import pattern_image

from celluscan.data.datasets import ManifestDataset, ManifestRow, read_manifest, write_manifest
from celluscan.data.imageio import ImageLoadError
from celluscan.data.transforms import eval_transform


def test_round_trip(tmp_path):
    rows = [
        ManifestRow("/a/b c/ü.jpg", "basophil", "pbc", "ab" * 32, "00ff00ff00ff00ff", 3, 360, 363, "train", "images/basophil/x.jpg"),
        ManifestRow("/a/2.jpg", "platelet", "aml", "cd" * 32, "0000000000000001", 4, 400, 400, "test", ""),
    ]
    p = tmp_path / "manifest.csv"
    write_manifest(rows, p)
    assert p.read_text(encoding="utf-8").splitlines()[0] == "path,label,source,sha256,phash,group,width,height,split,cached_path"
    assert read_manifest(p) == rows
    assert rows[0].label_index == 1


def test_reads_simple_manifest_with_relative_paths(tmp_path):
    p = tmp_path / "manifest.csv"
    p.write_text("path,label,source,sha256\nbasophil/x.jpg,basophil,pbc,abc\n", encoding="utf-8")
    (row,) = read_manifest(p)
    assert row.path == str(tmp_path.resolve() / "basophil" / "x.jpg") and row.group == -1


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,source\n/x.jpg,pbc\n", "lacks column"),
        ("path,label\n/x.jpg,dragon\n", r"manifest.csv:2: label 'dragon'"),
        ("path,label,group\n/x.jpg,basophil,three\n", "integer"),
        ("path,label,split\n/x.jpg,basophil,holdout\n", "split"),
    ],
)
def test_bad_manifest_names_file_and_line(tmp_path, text, match):
    p = tmp_path / "manifest.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_manifest(p)
    with pytest.raises(ValueError, match="cannot read"):
        read_manifest(tmp_path / "missing.csv")


def test_manifest_dataset_prefers_cached_copy(tmp_path):
    orig = tmp_path / "orig.png"
    pattern_image(1, 50, 30).save(orig)
    (tmp_path / "ds" / "images").mkdir(parents=True)
    pattern_image(2, 24, 24).save(tmp_path / "ds" / "images" / "c.png")
    row = ManifestRow(str(orig), "monocyte", cached_path="images/c.png")
    img, y = ManifestDataset([row])[0]
    assert img.size == (50, 30) and y == 7
    img, _ = ManifestDataset([row], root=tmp_path / "ds")[0]
    assert img.size == (24, 24)
    x, _ = ManifestDataset([row], eval_transform(16, (0.5,) * 3, (0.2,) * 3), tmp_path / "ds")[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16)
    with pytest.raises(ImageLoadError, match="nope.png"):
        ManifestDataset([ManifestRow(str(tmp_path / "nope.png"), "monocyte")])[0]
