"""`celluscan predict`: CSV columns, exit codes, bad files, folder walking, the table."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from celluscan.cli import main
from celluscan.inference import predictor as predictor_module
from celluscan.inference.cli import collect_inputs
from celluscan.taxonomy import CLASSES
from test_inference_support import make_model_dir, write_images

EXPECTED_COLUMNS = ["path", "prediction", "confidence", *CLASSES, "group", "uncertain", "uncertain_reason",
                    "unfamiliar", "unfamiliar_score", "error"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture()
def tree(tmp_path):
    """root/ with 3 images, root/sub/deeper/ with 2 more, a text file and a hidden file."""
    root = tmp_path / "cells"
    write_images(root, 3, seed=1)
    write_images(root / "sub" / "deeper", 2, seed=2, suffixes=(".JPG",))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_csv_has_exactly_the_specified_columns_and_valid_rows(model_dir, tree, tmp_path):
    out = tmp_path / "out" / "preds.csv"
    code = main(["predict", str(tree), "--model", str(model_dir), "--output", str(out), "--batch-size", "2"])
    assert code == 0
    columns, rows = read_csv(out)
    assert columns == EXPECTED_COLUMNS
    assert len(rows) == 5  # 3 + 2 nested; notes.txt and the hidden file are not walked
    assert [Path(r["path"]).relative_to(tree).as_posix() for r in rows] == [
        "cell_000.png", "cell_001.jpg", "cell_002.png", "sub/deeper/cell_000.JPG", "sub/deeper/cell_001.JPG"]
    for row in rows:
        probs = [float(row[c]) for c in CLASSES]
        assert abs(sum(probs) - 1) < 1e-4
        assert row["prediction"] == CLASSES[probs.index(max(probs))]
        assert float(row["confidence"]) == pytest.approx(max(probs), abs=1e-6)
        assert row["uncertain"] in ("true", "false") and row["unfamiliar"] in ("true", "false")
        assert (row["uncertain"] == "true") == bool(row["uncertain_reason"])
        assert row["error"] == "" and row["group"]
        float(row["unfamiliar_score"])
    assert [p.name for p in out.parent.iterdir()] == ["preds.csv"]  # no temp files left behind


def test_corrupt_file_gets_an_error_row_and_exit_2(model_dir, tree, tmp_path):
    corrupt = tree / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    named_text = tree / "notes.txt"  # explicitly named: tried, and fails
    out = tmp_path / "preds.csv"
    code = main(["predict", str(tree), str(named_text), "--model", str(model_dir), "-o", str(out)])
    assert code == 2
    _, rows = read_csv(out)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 7
    for bad in ("broken.png", "notes.txt"):
        assert by_name[bad]["prediction"] == "" and by_name[bad]["confidence"] == ""
        assert by_name[bad]["error"]
    assert sum(1 for r in rows if r["prediction"]) == 5


def test_no_recursive_only_takes_the_top_folder(tree):
    assert len(collect_inputs([tree], recursive=False)) == 3
    assert len(collect_inputs([tree], recursive=True)) == 5


def test_fatal_errors_exit_1(model_dir, tree, tmp_path, capsys, monkeypatch):
    assert main(["predict", str(tree), "--model", str(tmp_path / "no-such-model")]) == 1
    assert "model not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--model", str(model_dir)]) == 1
    assert "no images found" in capsys.readouterr().err
    monkeypatch.setattr(predictor_module, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    assert main(["predict", str(tree)]) == 1
    assert "--model" in capsys.readouterr().err


def test_table_output_without_csv(model_dir, tree, capsys):
    (tree / "bad.jpg").write_bytes(b"nope")
    code = main(["predict", str(tree), "--model", str(model_dir), "--quiet"])
    assert code == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["path", "prediction", "confidence", "flags"]
    body = lines[2:]
    assert len(body) == 6
    bad = [line for line in body if "bad.jpg" in line]
    assert len(bad) == 1 and "ERROR:" in bad[0]
    good = [line for line in body if "ERROR" not in line]
    assert all(line.split()[1] in CLASSES for line in good)
    starts = {line.index(line.split()[1], len(line.split()[0])) for line in good}
    assert len(starts) == 1  # the prediction column is aligned


def test_csv_to_stdout_and_the_console_entry_point(model_dir, tree, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "celluscan", "predict", str(tree), "--model", str(model_dir),
                           "--output", "-", "--quiet", "--precision", "fp32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split(",") == EXPECTED_COLUMNS and len(lines) == 6
