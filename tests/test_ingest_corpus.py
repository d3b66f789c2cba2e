"""`celluscan ingest` on the generated corpus of broken and odd files: never a crash."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from corpus import expected_outcomes, make_corpus

from celluscan.cli import main as celluscan_main
from celluscan.data.datasets import read_manifest
from celluscan.data.imageio import load_image
from celluscan.data.ingest import IngestConfig, ingest


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = make_corpus(root)
    out = tmp_path_factory.mktemp("corpus_out")
    result = ingest(IngestConfig(sources=(str(root),), out=str(out), image_size=32, workers=1), log=_quiet)
    return root, files, out, result


def test_every_case_is_ingested_or_reported(corpus_run):
    root, files, out, result = corpus_run
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = {r.path: r for r in read_manifest(out / "manifest.csv")}
    rejected = {r["path"]: r["reason"] for r in report["rejected"]}
    expected = expected_outcomes()
    n_ingested = 0
    for name, path in files.items():
        exp, p = expected[name], str(path)
        if exp.outcome == "ingested":
            n_ingested += 1
            assert p in rows, f"{name} was not ingested: {rejected.get(p)}"
            assert (rows[p].width, rows[p].height) == exp.size, name
            cached = load_image(out / rows[p].cached_path)
            assert cached.size == (32, 32)
        elif exp.outcome == "rejected":
            assert p in rejected, f"{name} was neither ingested nor rejected"
            assert any(s in rejected[p].lower() for s in exp.reasons), (name, rejected[p])
        elif exp.outcome == "ignored":
            assert p in report["ignored_files"], name
        elif exp.outcome == "not_followed":
            assert p in report["symlinked_dirs_not_followed"], name
        else:  # pragma: no cover
            raise AssertionError(exp.outcome)
    assert len(rows) == n_ingested == report["totals"]["kept"]
    assert len(rejected) == report["totals"]["rejected"]
    assert not any(f"{os.sep}loop{os.sep}" in p for p in list(rows) + list(rejected))
    assert (out / "report.md").read_text(encoding="utf-8").count("truncated.jpg") == 1
    assert (out / "class_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exif_orientation_was_applied(corpus_run):
    _, files, out, _ = corpus_run
    row = next(r for r in read_manifest(out / "manifest.csv") if r.path == str(files["exif_rotated"]))
    assert (row.width, row.height) == (40, 80)
    arr = np.asarray(load_image(out / row.cached_path)).astype(int)  # 32x32, padded sideways
    top, bottom = arr[6, 16], arr[26, 16]
    assert top[0] > 150 and top[2] < 100, top  # red on top
    assert bottom[2] > 150 and bottom[0] < 100, bottom  # blue below


def test_unreadable_file_reported_when_not_root(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop reads")
    files = make_corpus(tmp_path / "c")
    result = ingest(IngestConfig(sources=(str(tmp_path / "c"),), out=str(tmp_path / "o"), image_size=16, workers=1), log=_quiet)
    reasons = {r["path"]: r["reason"] for r in result.report["rejected"]}
    assert "ermission" in reasons[str(files["unreadable"])]


def test_cli_with_two_workers_matches_in_process_run(corpus_run, tmp_path, capsys):
    root, _, out1, _ = corpus_run
    out2 = tmp_path / "out2"
    code = celluscan_main(["ingest", str(root), "--out", str(out2), "--image-size", "32", "--workers", "2"])
    assert code == 0
    assert (out2 / "manifest.csv").read_bytes() == (out1 / "manifest.csv").read_bytes()
    assert (out2 / "stats.json").read_bytes() == (out1 / "stats.json").read_bytes()
    assert "kept" in capsys.readouterr().err
