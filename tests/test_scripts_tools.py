"""The helper scripts that ship with the repo: scripts/fit_ood.py and bench/app_latency.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_training_support import make_dataset, tiny_config

from celluscan.evaluation.ood import OOD_VAL_FLAG_RATE
from celluscan.models import load_model_dir
from celluscan.training.config import config_from_dict
from celluscan.training.data_source import load_train_data
from celluscan.training.engine import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_fit_ood_refits_a_canonical_model_through_the_predictor(tmp_path):
    dataset = make_dataset(tmp_path / "ds")
    canonical = {"framing": "nucleus", "colour": "none", "framing_scale": 3.0}
    data = load_train_data(dataset, 32, workers=1, canonical=canonical)
    cfg = config_from_dict(tiny_config(dataset, **{"train.epochs": 1, "data.canonical": canonical,
                                                   "eval.fit_ood": False})).validate()
    Trainer(cfg, tmp_path / "run", data, log=lambda _m: None).fit()
    model_dir = tmp_path / "run" / "model"
    assert not (model_dir / "ood.safetensors").exists()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fit_ood.py"), str(model_dir), "--dataset",
                           str(dataset), "--cache-size", "32", "--predictor-threshold"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unfamiliar threshold" in proc.stdout
    _, info = load_model_dir(model_dir)
    ood = info.metadata["ood"]
    assert ood["threshold_from"] == "val (predictor path)" and ood["max_flag_rate"] == pytest.approx(OOD_VAL_FLAG_RATE)
    assert (model_dir / "ood.safetensors").is_file()


def test_app_latency_bench_runs_and_reports(tmp_path):
    pytest.importorskip("fastapi")
    out = tmp_path / "latency.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "app_latency.py"), "--requests", "3", "--warmup",
                           "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 3
    assert 0 < result["predictor_ms"]["p50"] and 0 < result["api_ms"]["p50"]
    assert "p50" in proc.stdout


def test_compare_runs_lines_up_common_epochs(tmp_path):
    for name, shift in (("a", 0.0), ("b", 0.02)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"epoch": e, "val_accuracy": 0.5 + 0.1 * e + shift, "val_macro_f1": 0.4 + 0.1 * e,
                 "train_loss": 2.0 - 0.1 * e} for e in range(1, 4 if name == "a" else 3)]
        (run / "history.json").write_text(json.dumps(rows))
    plot = tmp_path / "cmp.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_runs.py"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--plot", str(plot)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "val acc: max |diff| 0.0200, mean |diff| 0.0200 over 2 common epoch(s)" in proc.stdout
    assert "val macro-F1: max |diff| 0.0000" in proc.stdout
    assert plot.stat().st_size > 1000
    (tmp_path / "b" / "history.json").write_text("[]")
    empty = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_runs.py"), str(tmp_path / "a"),
                            str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and "no common epochs" in empty.stderr


def _ablation_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_script", REPO / "scripts" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sets, expected", [([], [100, 30]), (["train.epochs=12"], [12, 12])])
def test_ablation_lays_out_each_config_for_its_epochs_unless_told_otherwise(tmp_path, monkeypatch, sets, expected):
    ablation = _ablation_module()
    configs = []
    for name, epochs in (("a", 100), ("b", 30)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"train:\n  epochs: {epochs}\n")
        configs.append(path)
    launched = []
    monkeypatch.setattr(ablation, "_launch", lambda jobs, parallel, deadline: launched.extend(jobs) or {})
    argv = [*map(str, configs), "--out", str(tmp_path / "runs"), "--budget-min", "1"]
    assert ablation.main(argv + (["--set", *sets] if sets else [])) == 0
    for (name, cmd, _log), want in zip(launched, expected):
        given = [a for a in cmd if a.startswith("train.epochs=")]
        assert given[-1] == f"train.epochs={want}", (name, cmd)  # the last --set wins in `celluscan train`
    assert json.loads((tmp_path / "runs" / "results.json").read_text())[0]["run"] == "a"


def _bench_inference_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_inference", REPO / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_inference_repeats_short_calls_inside_a_sample(monkeypatch):
    bench = _bench_inference_module()
    clock = {"t": 0.0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    calls = []

    def fake_call():  # each call "takes" 10 ms on the fake clock
        calls.append(1)
        clock["t"] += 0.010

    n = bench.calls_per_sample(fake_call, min_sample_s=0.25)
    assert n == 25 and len(calls) == 1
    calls.clear()
    times = bench._time_calls(fake_call, warmup=2, repeats=3, calls=n)
    assert len(calls) == 2 + 3 * 25
    assert times == pytest.approx([0.010] * 3)  # seconds per call, not per sample
    slow = bench.calls_per_sample(lambda: clock.__setitem__("t", clock["t"] + 1.0))
    assert slow == 1


def _tiny_model_dir(path: Path, seed: int, mean=(0.5, 0.5, 0.5)) -> Path:
    from celluscan.models.model_dir import save_model_dir
    from celluscan.models.registry import create_model
    from celluscan.taxonomy import CLASSES

    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    model = create_model("vit_test", num_classes=len(CLASSES))
    return save_model_dir(model, path, CLASSES, {"mean": list(mean), "std": [0.25, 0.25, 0.25]})


def test_average_weights_writes_the_mean_model_and_refits_the_temperature(tmp_path):
    import torch

    dataset = make_dataset(tmp_path / "ds")
    a, b = _tiny_model_dir(tmp_path / "a", 0), _tiny_model_dir(tmp_path / "b", 1)
    out = tmp_path / "avg"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "average_weights.py"), str(out), str(a), str(b),
                           "--dataset", str(dataset), "--cache-size", "32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "average of 2 models" in proc.stdout and "fit_ood.py" in proc.stdout
    (ma, _), (mb, _), (mo, info) = (load_model_dir(p) for p in (a, b, out))
    sa, sb, so = (m.canonical_state_dict() for m in (ma, mb, mo))
    for key in so:
        assert torch.allclose(so[key], (sa[key] + sb[key]) / 2, atol=1e-6), key
    assert info.metadata["weight_average_of"] == [str(a), str(b)]
    assert info.metadata["calibration"]["fitted_on"] == "val"
    assert info.preprocessing["temperature"] == pytest.approx(info.metadata["calibration"]["temperature"])


def test_average_weights_refuses_models_with_different_preprocessing(tmp_path):
    dataset = make_dataset(tmp_path / "ds")
    a = _tiny_model_dir(tmp_path / "a", 0)
    b = _tiny_model_dir(tmp_path / "b", 1, mean=(0.4, 0.5, 0.5))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "average_weights.py"), str(tmp_path / "avg"),
                           str(a), str(b), "--dataset", str(dataset), "--cache-size", "32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "preprocessing 'mean' differs" in proc.stderr and str(b) in proc.stderr
    assert not (tmp_path / "avg").exists()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _probs(top: str, p: float) -> list[float]:
    from celluscan.taxonomy import CLASSES

    rest = (1.0 - p) / (len(CLASSES) - 1)
    return [p if c == top else rest for c in CLASSES]


def test_average_predictions_scores_the_mean_of_saved_predictions(tmp_path):
    from celluscan.taxonomy import CLASSES

    test_header = ["path", "label"] + [f"p_{c}" for c in CLASSES]
    # image x: model A says basophil (right) at 0.9, model B monocyte at 0.6 -> average keeps basophil;
    # image y: A says lymphocyte (wrong) at 0.5, B monocyte (right) at 0.9 -> average monocyte
    a = _write_csv(tmp_path / "a.csv", test_header, [["x", "basophil", *_probs("basophil", 0.9)],
                                                     ["y", "monocyte", *_probs("lymphocyte", 0.5)]])
    b = _write_csv(tmp_path / "b.csv", test_header, [["y", "monocyte", *_probs("monocyte", 0.9)],
                                                     ["x", "basophil", *_probs("monocyte", 0.6)]])
    root = tmp_path / "ext"
    for label, name in (("neutrophil", "labA_1.jpg"), ("lymphocyte", "labA_2.jpg")):
        (root / label).mkdir(parents=True)
        (root / label / name).write_bytes(b"x")
    ext_header = ["path"] + list(CLASSES) + ["unfamiliar"]
    n, l = str(root / "neutrophil" / "labA_1.jpg"), str(root / "lymphocyte" / "labA_2.jpg")
    ea = _write_csv(tmp_path / "ea.csv", ext_header, [[n, *_probs("myeloblast", 0.6), "false"],
                                                      [l, *_probs("lymphocyte", 0.8), "false"]])
    eb = _write_csv(tmp_path / "eb.csv", ext_header, [[n, *_probs("segmented_neutrophil", 0.9), "true"],
                                                      [l, *_probs("lymphocyte", 0.7), "false"]])
    script = str(REPO / "scripts" / "average_predictions.py")
    proc = subprocess.run([sys.executable, script, "--test", str(a), str(b), "--external", str(ea), str(eb),
                           "--external-root", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "test (2 images, 2 model(s)): accuracy 1.0000" in proc.stdout
    assert "external all (2 images): balanced coarse recall 1.000, false alarms 0.000, " \
           "flagged unfamiliar by any model 0.500" in proc.stdout
    alone = subprocess.run([sys.executable, script, "--test", str(a), "--external", str(ea), "--external-root",
                            str(root)], capture_output=True, text=True, timeout=120)
    assert "accuracy 0.5000" in alone.stdout
    assert "balanced coarse recall 0.500, false alarms 0.500" in alone.stdout
    other = _write_csv(tmp_path / "c.csv", test_header, [["z", "basophil", *_probs("basophil", 0.9)]])
    bad = subprocess.run([sys.executable, script, "--test", str(a), str(other)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "holds other images" in bad.stderr
