"""The tutorial (tutorial/tutorial.py) runs end to end and produces its plots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from celluscan.models import get_config

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "tutorial" / "tutorial.py"

EXPECTED_PNGS = {
    "samples.png", "patches.png", "explain.png", "explain_overlay.png",
    "dataset/class_counts.png",
    "run/plots/loss.png", "run/plots/accuracy.png", "run/plots/confusion_counts.png",
    "run/plots/confusion_normalised.png", "run/plots/reliability_val.png",
    "evaluation/confusion_counts.png", "evaluation/confusion_normalised.png", "evaluation/reliability.png",
}


@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tutorial") / "out"
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(TUTORIAL), "--out", str(out), "--epochs", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"tutorial failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


@pytest.mark.slow
def test_tutorial_writes_every_plot(tutorial_run):
    out, _ = tutorial_run
    for name in sorted(EXPECTED_PNGS):
        path = out / name
        assert path.is_file(), f"missing {name}"
        assert path.stat().st_size > 2000, f"{name} is suspiciously small"
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) >= 100, (name, img.format, img.size)
    summary = json.loads((out / "summary.json").read_text())
    assert EXPECTED_PNGS <= set(summary["pngs"])


@pytest.mark.slow
def test_tutorial_prints_the_vit_shapes(tutorial_run):
    _, stdout = tutorial_run
    cfg = get_config("vit_test")
    n, t, d, heads = cfg.num_patches, cfg.num_patches + 1, cfg.embed_dim, cfg.num_heads
    g = cfg.grid_size
    expected = [
        rf"patch embedding \(B, D, H/P, W/P\):\s+\(1, {d}, {g}, {g}\)",
        rf"patch tokens \(B, N, D\):\s+\(1, {n}, {d}\)",
        rf"\[CLS\] \+ patch tokens \(B, T, D\):\s+\(1, {t}, {d}\)",
        rf"Q, K, V per head \(B, heads, T, d\):\s+\(1, {heads}, {t}, {d // heads}\) each",
        rf"\(B, heads, T, T\): \(1, {heads}, {t}, {t}\); rows sum to 1\.0000",
        rf"head -> logits \(B, classes\):\s+\(1, 14\)",
        rf"model\.attention_maps\(x\): {cfg.depth} layers of \(1, {heads}, {t}, {t}\)",
        rf"rollout \[CLS\]->patch relevance \(1, {n}\) -> patch grid \(1, {g}, {g}\)",
        r"splits: \{.*'train': 14.*\}",
    ]
    for pattern in expected:
        assert re.search(pattern, stdout), f"tutorial output lacks /{pattern}/"
    # The hand-written attention and forward pass reproduce the model's own.
    diffs = [float(v) for v in re.findall(r"max \|diff\| ([0-9.e+-]+)", stdout)]
    assert len(diffs) == 3 and max(diffs) < 1e-5, diffs


@pytest.mark.slow
def test_tutorial_evaluation_report(tutorial_run):
    out, stdout = tutorial_run
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["n"] == 14 and len(metrics["confusion_matrix"]) == 14
    assert "Tutorial: test split" in (out / "evaluation" / "per_class.md").read_text()
    assert len(re.findall(r"^epoch \d: train loss", stdout, re.MULTILINE)) == 2


def test_attention_timing_script_runs_on_a_tiny_model(capsys):
    """tutorial/attention_timing.py (quoted in docs/architecture.md): one quick pass on vit_test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("attention_timing", REPO / "tutorial" / "attention_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    assert timing.main(["--model", "vit_test", "--image-size", "32", "--batch", "2", "--repeats", "1",
                        "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^\| (fp32|bf16|bf16-autocast) \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["fp32", "bf16", "bf16-autocast"]
    fp32_diff = float(rows[0].rstrip(" |").rsplit("|", 1)[1])
    assert fp32_diff < 1e-5  # both attention paths compute the same function
    gflops, share = timing.attention_flop_share("vit_test", 32)
    assert 0 < share < 1 and gflops > 0
