"""Ingest rules: duplicates, near-duplicates, labels, sources, determinism, CLI errors."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from corpus import pattern_image

from celluscan.cli import main as celluscan_main
from celluscan.data.datasets import read_manifest
from celluscan.data.ingest import IngestConfig, IngestError, ingest
from celluscan.data.stats import read_stats
from celluscan.taxonomy import UnknownLabelError


def _quiet(_msg: str) -> None:
    pass


def run(src, out, **kw):
    kw.setdefault("image_size", 24)
    kw.setdefault("workers", 1)
    return ingest(IngestConfig(sources=tuple(map(str, src)), out=str(out), **kw), log=_quiet)


def save(path, img, fmt="PNG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def build_tree(root):
    """Four classes, a few images each, with planted duplicates and near-duplicates."""
    seed = 100
    for label in ("basophil", "Monocytes", "Platelets", "lymphocyte"):
        for i in range(8):
            seed += 1
            save(root / label / f"img_{i}.png", pattern_image(seed, 48, 40))
    # exact duplicate, same label: one copy kept
    shutil.copy(root / "basophil" / "img_0.png", root / "basophil" / "img_0_copy.png")
    # exact duplicate, conflicting labels: every copy dropped
    shutil.copy(root / "Monocytes" / "img_1.png", root / "lymphocyte" / "same_as_monocyte.png")
    # near duplicate: a JPEG re-encode of a platelet image
    buf = io.BytesIO()
    Image.open(root / "Platelets" / "img_2.png").convert("RGB").save(buf, "JPEG", quality=85)
    (root / "Platelets" / "img_2_reencoded.jpg").write_bytes(buf.getvalue())
    # a code-named file with a source tag, in a folder whose name means nothing
    save(root / "misc" / "pbc_BA_77.png", pattern_image(999, 40, 40))
    return root


@pytest.fixture(scope="module")
def tree_run(tmp_path_factory):
    root = build_tree(tmp_path_factory.mktemp("tree") / "src")
    out = tmp_path_factory.mktemp("tree_out")
    return root, out, run([root], out)


def test_exact_duplicates(tree_run):
    root, out, result = tree_run
    paths = {r.path for r in result.rows}
    assert str(root / "basophil" / "img_0.png") in paths
    assert str(root / "basophil" / "img_0_copy.png") not in paths
    assert str(root / "Monocytes" / "img_1.png") not in paths
    assert str(root / "lymphocyte" / "same_as_monocyte.png") not in paths
    dups = {tuple(d["labels"]): d for d in result.report["exact_duplicates"]}
    assert dups[("lymphocyte", "monocyte")]["conflicting_labels"] and dups[("lymphocyte", "monocyte")]["kept"] is None
    assert dups[("basophil",)]["kept"] == str(root / "basophil" / "img_0.png")
    assert result.report["totals"]["exact_duplicates_dropped"] == 3
    assert len({r.sha256 for r in result.rows}) == len(result.rows)


def test_near_duplicates_share_group_and_split(tree_run):
    root, out, result = tree_run
    by_path = {r.path: r for r in result.rows}
    a = by_path[str(root / "Platelets" / "img_2.png")]
    b = by_path[str(root / "Platelets" / "img_2_reencoded.jpg")]
    assert a.group == b.group and a.split == b.split
    groups = result.report["near_duplicate_groups"]
    assert len(groups) == 1 and set(groups[0]["files"]) == {a.path, b.path}
    assert len({r.group for r in result.rows}) == len(result.rows) - 1  # others: singletons


def test_labels_sources_counts_and_stats(tree_run):
    root, out, result = tree_run
    labels = {r.path: r.label for r in result.rows}
    assert labels[str(root / "Monocytes" / "img_0.png")] == "monocyte"
    assert labels[str(root / "Platelets" / "img_0.png")] == "platelet"
    assert labels[str(root / "misc" / "pbc_BA_77.png")] == "basophil"
    sources = {r.path: r.source for r in result.rows}
    assert sources[str(root / "misc" / "pbc_BA_77.png")] == "pbc"
    assert sources[str(root / "basophil" / "img_1.png")] == "src"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    after = report["counts"]["after"]
    assert len(after) == 14
    assert after["basophil"] == 9 and after["monocyte"] == 7 and after["platelet"] == 9
    assert sum(after.values()) == len(read_manifest(out / "manifest.csv"))
    assert report["counts"]["before"]["lymphocyte"] == 9
    # stats.json: mean/std of the stored TRAIN images only
    rows = read_manifest(out / "manifest.csv")
    train = np.concatenate([np.asarray(Image.open(out / r.cached_path).convert("RGB")).reshape(-1, 3) / 255.0
                            for r in rows if r.split == "train"])
    stats = read_stats(out)
    assert np.allclose(stats["mean"], train.mean(axis=0), atol=1e-9)
    assert np.allclose(stats["std"], train.std(axis=0), atol=1e-9)
    assert stats["image_size"] == 24 and stats["computed_on"] == "train"
    allpix = np.concatenate([np.asarray(Image.open(out / r.cached_path).convert("RGB")).reshape(-1, 3) / 255.0 for r in rows])
    assert not np.allclose(stats["mean"], allpix.mean(axis=0), atol=1e-9)


def test_rerun_after_interruption_gives_the_same_manifest(tree_run, tmp_path):
    root, _, _ = tree_run
    out = tmp_path / "out"
    run([root], out)
    manifest = (out / "manifest.csv").read_bytes()
    stats = (out / "stats.json").read_bytes()
    rows = read_manifest(out / "manifest.csv")
    # simulate an interruption: outputs missing, half the cache gone, a stale temp file
    (out / "manifest.csv").unlink()
    (out / "stats.json").unlink()
    for r in rows[::2]:
        (out / r.cached_path).unlink()
    stale = out / "images" / "basophil" / ".0123456789abcdef.jpg.x.tmp"
    stale.write_bytes(b"partial")
    orphan = out / "images" / "basophil" / "0123456789abcdef.jpg"
    orphan.write_bytes(b"old")
    mine = out / "images" / "notes.txt"
    mine.write_text("not ours to delete")
    run([root], out)
    assert (out / "manifest.csv").read_bytes() == manifest
    assert (out / "stats.json").read_bytes() == stats
    assert not stale.exists() and not orphan.exists() and mine.exists()
    assert all((out / r.cached_path).is_file() for r in rows)
    # another image size: the cache is rebuilt, not reused
    run([root], out, image_size=20)
    assert Image.open(out / read_manifest(out / "manifest.csv")[0].cached_path).size == (20, 20)


def test_seed_changes_split_only(tree_run, tmp_path):
    root, _, result = tree_run
    other = run([root], tmp_path / "o", seed=5)
    assert [r.path for r in other.rows] == [r.path for r in result.rows]
    assert [r.split for r in other.rows] != [r.split for r in result.rows]


def test_unknown_labels_stop_the_run_unless_skipped(tmp_path):
    src = tmp_path / "src"
    save(src / "basophil" / "a.png", pattern_image(1, 30, 30))
    save(src / "Mystery Cells" / "b.png", pattern_image(2, 30, 30))
    save(src / "myeloblast" / "KSC_0001.png", pattern_image(3, 30, 30))
    with pytest.raises(UnknownLabelError) as err:
        run([src], tmp_path / "out")
    assert set(err.value.unknown) == {"Mystery Cells", "KSC"}
    assert not (tmp_path / "out").exists()  # nothing written
    result = run([src], tmp_path / "out", skip_unknown=True)
    assert [r.label for r in result.rows] == ["basophil"]
    assert set(result.report["unknown_labels"]) == {"Mystery Cells", "KSC"}
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "Mystery Cells" in md and "KSC" in md


def test_label_map_file(tmp_path):
    src = tmp_path / "src"
    save(src / "Mystery Cells" / "b.png", pattern_image(2, 30, 30))
    save(src / "myeloblast" / "KSC_0001.png", pattern_image(3, 30, 30))
    save(src / "myeloblast" / "MYO_0001.png", pattern_image(4, 30, 30))
    m = tmp_path / "map.yaml"
    m.write_text("Mystery Cells: platelet\nKSC: skip\n", encoding="utf-8")
    result = run([src], tmp_path / "out", label_map=str(m))
    assert sorted(r.label for r in result.rows) == ["myeloblast", "platelet"]
    assert [s["raw_label"] for s in result.report["skipped_by_label_map"]] == ["KSC"]


def test_output_inside_a_source_is_not_rescanned(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        save(src / "eosinophil" / f"{i}.png", pattern_image(i, 30, 30))
    first = run([src], src / "dataset")
    second = run([src], src / "dataset")
    assert len(first.rows) == len(second.rows) == 3


def test_cli_errors(tmp_path, capsys):
    src = tmp_path / "src"
    save(src / "Mystery" / "b.png", pattern_image(2, 30, 30))
    assert celluscan_main(["ingest", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'Mystery'" in err and "--label-map" in err
    assert celluscan_main(["ingest", str(src), "--out", str(tmp_path / "o"), "--fractions", "0.5,0.5"]) == 2
    assert "three fractions" in capsys.readouterr().err
    assert celluscan_main(["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(IngestError, match="no labelled image files"):
        run([empty], tmp_path / "o2")
    save(src / "basophil" / "bad.png", Image.new("RGB", (2, 2)))
    with pytest.raises(IngestError, match="no usable images"):
        run([src / "basophil"], tmp_path / "o3")
