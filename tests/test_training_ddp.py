"""Two CPU processes (gloo) train one tiny model with DistributedDataParallel.

The processes get the environment torchrun would give them (RANK, WORLD_SIZE, ...), so this is
the same code path as ``torchrun --nproc_per_node 2 -m celluscan train``. Both ranks must end
with identical weights (each prints a SHA-256 of its weights), and only rank 0 reports/writes.
"""

from __future__ import annotations

import json
import socket

from test_training_support import make_dataset, start_cli, tiny_config, write_config

from celluscan.training.data_source import load_train_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    load_train_data(ds, 32, workers=1)
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(ds, **{"train.epochs": 2}))
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        logs.append(tmp_path / f"rank{rank}.log")
        procs.append(start_cli(["train", "--config", cfg, "--out", tmp_path / "run"], logs[-1], env))
    for p in procs:
        p.join(300)
    outputs = [log.read_text() for log in logs]
    for p, out in zip(procs, outputs):
        assert p.exitcode == 0, out
    digests = {}
    for rank, out in enumerate(outputs):
        line = next(l for l in out.splitlines() if l.startswith(f"[rank {rank}] final weights sha256"))
        digests[rank] = line.split()[-1]
    assert digests[0] == digests[1]
    assert "2 process(es)" in outputs[0] and "epoch 2/2: train loss" in outputs[0]
    assert "epoch 1/2: train loss" not in outputs[1]  # only rank 0 reports
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    # Each rank trains on half of every epoch: 32 images / 2 ranks / 4 per rank = 4 steps.
    assert [h["train_images"] for h in history] == [32, 32]
    assert [h["global_step"] for h in history] == [4, 8]
    assert (tmp_path / "run" / "model" / "config.json").exists()
