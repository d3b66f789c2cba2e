"""Never lose a run: SIGKILL `celluscan train` at several points, resume, compare to a clean run.

Tiny config: 2 epochs of 4 steps, a checkpoint every 2 steps and at each epoch end. The reference
is an uninterrupted run with the same seed. One run directory is killed four times in a chain,
each time at a different point of the checkpoint writer (``CELLUSCAN_CHECKPOINT_PAUSE``), and
resumed with ``--resume`` after each kill:

1. ``published:1`` mid-epoch, right after the first step checkpoint (step 2) is complete;
2. ``files:1``     both files of the next checkpoint in its temp dir, not yet renamed;
3. ``tensors:2``   inside the 2nd write, only the tensors file in the temp dir;
4. ``renamed:2``   the new directory in place, latest.json still naming the previous one.

The final history (timing fields aside) and weights must equal the reference's.
"""

from __future__ import annotations

import json

from test_training_support import make_dataset, run_cli, start_cli, tiny_config, wait_for_text, write_config

from celluscan.training.checkpoint import PAUSE_ENV, list_complete, load_latest
from celluscan.training.data_source import load_train_data
from celluscan.training.engine import TIMING_KEYS


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


def _digest(output: str) -> str:
    lines = [l for l in output.splitlines() if "final weights sha256" in l]
    assert lines, output
    return lines[-1].split()[-1]


def _kill_at(argv, point: str, log) -> None:
    proc = start_cli(argv, log, {PAUSE_ENV: point})
    wait_for_text(log, f"CHECKPOINT-PAUSE {point.split(':')[0]}", proc)
    proc.kill()  # SIGKILL
    proc.join(30)
    assert proc.exitcode == -9


def test_kill_at_four_points_and_resume_matches_uninterrupted_run(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(ds, **{"train.epochs": 2}))
    load_train_data(ds, 32, workers=1)  # builds the tensor cache once, before runs start in parallel
    ref_proc = start_cli(["train", "--config", cfg, "--out", tmp_path / "ref"], tmp_path / "ref.log")

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    resume = ["train", "--resume", run]
    _kill_at(["train", "--config", cfg, "--out", run], "published:1", tmp_path / "k1.log")
    meta = load_latest(ckpts)[1]
    assert (meta["global_step"], meta["epoch"], meta["batch_in_epoch"]) == (2, 0, 2)  # mid-epoch

    _kill_at(resume, "files:1", tmp_path / "k2.log")
    assert any(p.name.startswith(".tmp-step-00000004") for p in ckpts.iterdir())  # torn write left behind
    assert load_latest(ckpts)[1]["global_step"] == 2  # ... and ignored

    _kill_at(resume, "tensors:2", tmp_path / "k3.log")
    assert load_latest(ckpts)[1]["global_step"] == 4

    _kill_at(resume, "renamed:2", tmp_path / "k4.log")
    assert list_complete(ckpts)[-1].name == "step-00000008"  # renamed into place, not published
    assert load_latest(ckpts)[1]["global_step"] == 6  # latest.json is what counts

    out = run_cli(resume, tmp_path / "final.log")
    assert "resumed from" in out

    ref_proc.join(300)
    assert ref_proc.exitcode == 0, (tmp_path / "ref.log").read_text()
    ref_out = (tmp_path / "ref.log").read_text()
    ref_history = json.loads((tmp_path / "ref" / "history.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert len(ref_history) == 2
    assert _strip(history) == _strip(ref_history)
    assert _digest(out) == _digest(ref_out)
    assert (run / "DONE").exists() and (run / "model" / "model.safetensors").exists()
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in ckpts.iterdir())
    assert len(list_complete(ckpts)) <= 2
