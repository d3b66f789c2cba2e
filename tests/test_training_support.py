"""Shared helpers for the training/evaluation tests: a tiny generated dataset and config.

No tests here. Images are 32 px PNGs: a pale background with a centred disc whose colour and
size depend on the class, plus noise, so a tiny ViT learns them in a few steps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from celluscan.taxonomy import CLASSES

TINY_CLASSES = ("basophil", "eosinophil", "lymphocyte", "neutrophil")
_COLOURS = {"basophil": (80, 40, 150), "eosinophil": (220, 90, 60), "lymphocyte": (60, 60, 200),
            "neutrophil": (170, 120, 190)}
_RADII = {"basophil": 9, "eosinophil": 12, "lymphocyte": 7, "neutrophil": 13}


def cell_image(label: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.normal(0, 1, 2)
    r = _RADII[label] * size / 32 * rng.uniform(0.9, 1.1)
    disc = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2) < r ** 2
    img = np.empty((size, size, 3), np.float64)
    img[:] = (235, 225, 230)
    img[disc] = _COLOURS[label]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_dataset(root: Path, per_split=(8, 3, 2), classes=TINY_CLASSES, seed: int = 0) -> Path:
    """A dataset folder as `celluscan ingest` writes it: images/, manifest.csv, stats.json."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,source,sha256,split"]
    for label in classes:
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        for split, n in zip(("train", "val", "test"), per_split):
            for i in range(n):
                p = root / "images" / label / f"{split}_{i}.png"
                cell_image(label, rng).save(p)
                lines.append(f"{p},{label},synthetic,{hashlib.sha256(p.read_bytes()).hexdigest()},{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "stats.json").write_text(json.dumps({"mean": [0.7, 0.6, 0.7], "std": [0.25, 0.25, 0.25],
                                                 "image_size": 32, "computed_on": "train", "pad_fill": "edge"}))
    return root


def tiny_config(dataset: Path, **overrides) -> dict:
    cfg = {
        "seed": 3,
        "device": "cpu",
        "data": {"dataset": str(dataset), "workers": 1,
                 "augment": {"zoom_range": [0.95, 1.05], "brightness": 0.05, "contrast": 0.05,
                             "saturation": 0.05}},
        "model": {"name": "vit_test", "image_size": 32},
        "optim": {"lr": 2e-3},
        "train": {"epochs": 3, "batch_size": 8, "threads": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "eval": {"batch_size": 64},
        "log": {"progress_every_s": 1000},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def canonical_labels() -> tuple[str, ...]:
    return CLASSES


# ---- running `celluscan ...` in child processes without paying the torch import each time ----
# A forkserver imports the heavy modules once; every child is forked from it, so a child costs
# only its own work. Children are real processes: they can be SIGKILLed like any subprocess.

import multiprocessing as _mp
import os as _os
import sys as _sys
import time as _time

_PRELOAD = ["celluscan.cli", "celluscan.training.cli", "celluscan.training.engine",
            "celluscan.training.data_source", "celluscan.evaluation.cli", "test_training_support"]


def forkserver():
    ctx = _mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _child_main(argv: list[str], env: dict, log_path: str) -> None:
    _os.environ.update(env)
    log = open(log_path, "w", buffering=1)
    _os.dup2(log.fileno(), 1)
    _os.dup2(log.fileno(), 2)
    _sys.stdout = _sys.stderr = log
    import torch

    torch.set_num_threads(1)
    from celluscan.cli import main

    code = main(argv)
    log.flush()
    _os._exit(code)


def start_cli(argv: list[str], log_path: Path, env: dict | None = None):
    """Start `celluscan <argv>` in a forked child writing stdout+stderr to ``log_path``."""
    proc = forkserver().Process(target=_child_main, args=([str(a) for a in argv], dict(env or {}), str(log_path)))
    proc.start()
    return proc


def wait_for_text(log_path: Path, text: str, proc, timeout: float = 120.0) -> str:
    """Poll ``log_path`` until a line containing ``text`` appears (fail if the child exits first)."""
    deadline = _time.monotonic() + timeout
    while _time.monotonic() < deadline:
        content = log_path.read_text() if log_path.exists() else ""
        for line in content.splitlines():
            if text in line:
                return line
        if not proc.is_alive():
            raise AssertionError(f"child exited ({proc.exitcode}) before printing {text!r}:\n{content}")
        _time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {text!r}:\n{log_path.read_text()}")


def run_cli(argv: list[str], log_path: Path, env: dict | None = None, timeout: float = 300.0) -> str:
    """Run `celluscan <argv>` in a forked child to completion; return its output (assert rc 0)."""
    proc = start_cli(argv, log_path, env)
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        raise AssertionError(f"timed out: {argv}\n{log_path.read_text()}")
    out = log_path.read_text()
    assert proc.exitcode == 0, f"exit {proc.exitcode}: {argv}\n{out}"
    return out
