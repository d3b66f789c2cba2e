"""Nothing lost (issue 8, part 3): interrupted runs resume, failed writes leave the old file.

Training killed with SIGKILL at four points (one mid-epoch, three inside a checkpoint write)
is covered by ``tests/test_training_resume.py``. Here:

* ``celluscan ingest`` SIGKILLed mid-way and re-run gives the manifest of a clean run;
* checkpoints: a write that fails half-way, a damaged newest checkpoint, and a garbled or
  dangling ``latest.json`` all resume from the newest *valid* checkpoint;
* outputs are atomic: a write that fails half-way (disk full) leaves the previous CSV,
  manifest, JSON or model directory intact and no temporary files behind, for the helper
  itself and for ``predict``, ``evaluate``, ``ingest``'s manifest and ``save_model_dir``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from corpus import pattern_image
from test_serving_helpers import PREPROCESSING, make_model_dir, png_bytes

from celluscan.cli import main as celluscan_main
from celluscan.data import atomic
from celluscan.data.atomic import atomic_write_text
from celluscan.data.manifest import ManifestRow, read_manifest, write_manifest
from celluscan.models import create_model, load_model_dir, save_model_dir
from celluscan.taxonomy import CLASSES
from celluscan.training import checkpoint
from celluscan.training.checkpoint import list_complete, load_latest, save_checkpoint

INGEST_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte")


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class _HalfWritingFile:
    """Wraps a binary file: the first write stores half the data, then the disk is 'full'."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        _disk_full()

    def __getattr__(self, name):
        return getattr(self.fh, name)


def _half_writes(monkeypatch) -> None:
    """From now on every atomic write (celluscan.data.atomic) fails half-way through its data."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: _HalfWritingFile(real_fdopen(fd, *a, **k)))


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# ---- ingest: SIGKILL, re-run, same manifest -----------------------------------------------------


def _image_tree(root: Path, per_class: int) -> Path:
    for k, label in enumerate(INGEST_CLASSES):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            pattern_image(1000 * k + i, 48, 44).save(folder / f"{label}_{i:03d}.png")
    return root


def test_ingest_killed_mid_way_then_rerun_gives_the_clean_manifest(tmp_path):
    src = _image_tree(tmp_path / "src", per_class=60)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    argv = ["ingest", str(src), "--out", "OUT", "--image-size", "32", "--workers", "1"]

    proc = subprocess.Popen([sys.executable, "-m", "celluscan", *[str(resumed) if a == "OUT" else a for a in argv]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((resumed / "images").rglob("*.jpg"))) < 40:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "ingest did not start writing images"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (resumed / "manifest.csv").exists()  # killed mid-way: no manifest yet

    assert celluscan_main([str(resumed) if a == "OUT" else a for a in argv]) == 0
    assert celluscan_main([str(clean) if a == "OUT" else a for a in argv]) == 0
    assert (resumed / "manifest.csv").read_bytes() == (clean / "manifest.csv").read_bytes()
    assert (resumed / "stats.json").read_bytes() == (clean / "stats.json").read_bytes()
    rows = read_manifest(resumed / "manifest.csv")
    assert len(rows) == 4 * 60
    cached = sorted(p.relative_to(resumed) for p in (resumed / "images").rglob("*.jpg"))
    assert cached == sorted(Path(r.cached_path) for r in rows)  # nothing stale left behind
    assert _no_temp_files(resumed)


# ---- checkpoints ----------------------------------------------------------------------------------


def _tensors(step: int) -> dict[str, torch.Tensor]:
    return {"model.w": torch.full((4, 4), float(step)), "optim.0.exp_avg": torch.arange(4.0) * step}


def _save(root: Path, step: int) -> Path:
    return save_checkpoint(root, f"step-{step:08d}", _tensors(step),
                           {"global_step": step, "history": [{"step": step}]}, keep_last=3)


def test_checkpoint_write_failing_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    real_save_file = checkpoint.save_file

    def half_then_full(tensors, filename, *a, **k):
        real_save_file(tensors, filename, *a, **k)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        _disk_full()

    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    with pytest.raises(OSError):
        _save(root, 4)
    monkeypatch.undo()
    tensors, meta, path = load_latest(root)
    assert meta["global_step"] == 2 and path.name == "step-00000002"
    assert torch.equal(tensors["model.w"], _tensors(2)["model.w"])
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # torn write cleaned up


def test_damaged_newest_checkpoint_falls_back_to_the_previous_valid_one(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(root, step)
    newest = root / "step-00000006" / "state.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # bit rot / a copy cut short
    tensors, meta, path = load_latest(root)
    assert meta["global_step"] == 4 and torch.equal(tensors["model.w"], _tensors(4)["model.w"])
    assert "step-00000006" in capsys.readouterr().err  # says which one it skipped, and why

    (root / "step-00000004" / "state.json").write_text('{"format": "celluscan-checkpoint-v1", ')
    assert load_latest(root)[1]["global_step"] == 2


@pytest.mark.parametrize("pointer", ['{"name": "step-00000099"}', "{garbled", '{"name": "../../etc"}', ""])
def test_bad_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(root, step)
    (root / "latest.json").write_text(pointer)
    _, meta, path = load_latest(root)
    assert meta["global_step"] == 4 and path == root / "step-00000004"
    assert [p.name for p in list_complete(root)] == ["step-00000002", "step-00000004"]


# ---- atomic outputs -------------------------------------------------------------------------------


def test_atomic_write_failing_half_way_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.csv"
    target.write_text("old,content\n")
    _half_writes(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new,content\n" * 1000)
    assert target.read_text() == "old,content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_predict_csv_write_failure_keeps_the_previous_csv(tmp_path, monkeypatch, capsys):
    model = make_model_dir(tmp_path / "model")
    image = tmp_path / "cells" / "a.png"
    image.parent.mkdir()
    image.write_bytes(png_bytes(1))
    out = tmp_path / "preds" / "preds.csv"
    assert celluscan_main(["predict", str(image), "--model", str(model), "-o", str(out), "-q"]) == 0
    before = out.read_bytes()
    assert b"a.png" in before
    out.write_bytes(before + b"# the previous run\n")
    previous = out.read_bytes()
    _half_writes(monkeypatch)
    assert celluscan_main(["predict", str(image), "--model", str(model), "-o", str(out), "-q"]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert out.read_bytes() == previous
    assert [p.name for p in out.parent.iterdir()] == ["preds.csv"]


def test_evaluate_write_failure_keeps_the_previous_report(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "model")
    data = tmp_path / "data" / "lymphocyte"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"c{i}.png").write_bytes(png_bytes(i))
    out = tmp_path / "report"
    argv = ["evaluate", str(tmp_path / "data"), "--model", str(model), "--output-dir", str(out)]
    assert celluscan_main(argv) == 0
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"predictions.csv", "metrics.json"} <= set(previous)
    (data / "c3.png").write_bytes(png_bytes(3))  # the new run would change every file
    _half_writes(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        celluscan_main(argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous


def test_manifest_write_failure_keeps_the_previous_manifest(tmp_path, monkeypatch):
    rows = [ManifestRow(path=str(tmp_path / f"{i}.png"), label="lymphocyte", source="s", sha256=f"{i:064x}",
                        phash=f"{i:016x}", group=i, width=10, height=10, split="train") for i in range(3)]
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    before = path.read_bytes()
    _half_writes(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_manifest(rows * 100, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and read_manifest(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


def test_model_dir_replacement_failing_half_way_keeps_the_old_model(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "run" / "model"
    torch.manual_seed(0)
    old = create_model("vit_test")
    save_model_dir(old, path, CLASSES, PREPROCESSING, {"v": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    new = create_model("vit_test")
    real_save_file = safetensors.torch.save_file

    def half_then_full(tensors, filename, *a, **k):
        real_save_file(tensors, filename, *a, **k)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
        _disk_full()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(OSError):
        save_model_dir(new, path, CLASSES, PREPROCESSING, {"v": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]  # no temp dir left
    loaded, info = load_model_dir(path)
    assert info.metadata == {"v": 1} and torch.equal(loaded.head.weight, old.head.weight)

    # the swap itself failing (new directory complete, rename refused): the old one is put back
    real_replace = os.replace

    def refuse_new_dir(src, dst, *a, **k):
        if ".tmp-" in Path(src).name:
            _disk_full()
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", refuse_new_dir)
    with pytest.raises(OSError):
        save_model_dir(new, path, CLASSES, PREPROCESSING, {"v": 3})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]
