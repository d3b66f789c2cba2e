"""Run several training configs side by side within a wall-clock budget, and tabulate them.

    python scripts/ablation.py configs/ablation/*.yaml --dataset datasets/blood-cells \
        --out runs/ablation --budget-min 30 [--parallel 3] [--probe]

Each config runs as its own ``celluscan train`` process (``--parallel`` at a time). With
``--probe``, every config first trains one epoch (all in parallel, as they will run), the
measured epoch time sets how many epochs fit in the budget (capped by the config's own
``train.epochs``), and the cosine schedule is laid out for that count. A run still going at the
deadline is stopped; its best model so far stays in RUN/model. The table (RUN_ROOT/results.md,
results.json) has: config, epochs, wall time, val/test micro accuracy, macro-F1, ECE.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def _train_cmd(config: Path, run_dir: Path, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "celluscan", "train", "--config", str(config), "--out", str(run_dir),
            "--set", *sets] if sets else [sys.executable, "-m", "celluscan", "train", "--config", str(config),
                                          "--out", str(run_dir)]


def _launch(jobs: list[tuple[str, list[str], Path]], parallel: int, deadline: float) -> dict[str, float]:
    """Run (name, cmd, log) jobs, ``parallel`` at a time; kill what is left at ``deadline``."""
    pending, running, walls = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = open(log, "w")
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            running[name] = (proc, time.monotonic(), fh)
            print(f"[ablation] started {name}: {' '.join(cmd)}", flush=True)
        for name, (proc, start, fh) in list(running.items()):
            if proc.poll() is not None:
                walls[name] = time.monotonic() - start
                fh.close()
                print(f"[ablation] {name} finished rc={proc.returncode} in {walls[name]:.0f}s", flush=True)
                del running[name]
            elif time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                time.sleep(5)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                walls[name] = time.monotonic() - start
                fh.close()
                print(f"[ablation] {name} stopped at the deadline after {walls[name]:.0f}s", flush=True)
                del running[name]
        time.sleep(2)
    return walls


def _summarise(name: str, cfg_path: Path, run_dir: Path, wall: float | None) -> dict:
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    history = json.loads((run_dir / "history.json").read_text()) if (run_dir / "history.json").exists() else []
    test, val = metrics.get("test", {}), metrics.get("val", {})
    model = cfg.get("model", {})
    return {
        "run": name,
        "model": model.get("name"),
        "image_size": model.get("image_size"),
        "conv_stem": model.get("conv_stem", False),
        "epochs": len(history) if isinstance(history, list) else None,
        "wall_s": round(wall or 0),
        "best_epoch": metrics.get("best", {}).get("epoch"),
        "val_accuracy": val.get("accuracy"),
        "val_macro_f1": val.get("macro_f1"),
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro_f1"),
        "test_group_accuracy": test.get("group", {}).get("accuracy") if isinstance(test.get("group"), dict) else None,
        "test_ece": test.get("ece"),
        "finished": (run_dir / "DONE").exists(),
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--dataset", help="override data.dataset in every config")
    ap.add_argument("--budget-min", type=float, default=60.0, help="wall-clock budget for the whole ablation")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help="time one epoch first and fit the epochs to the budget")
    ap.add_argument("--finish-reserve-s", type=float, default=60.0, help="time kept for calibration and test")
    ap.add_argument("--set", dest="sets", nargs="*", default=[], help="overrides for every run")
    args = ap.parse_args(argv)

    start = time.monotonic()
    deadline = start + args.budget_min * 60
    base_sets = list(args.sets) + ([f"data.dataset={args.dataset}"] if args.dataset else [])
    names = [c.stem for c in args.configs]
    epochs: dict[str, int] = {}
    for name, cfg_path in zip(names, args.configs):
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        epochs[name] = int(cfg.get("train", {}).get("epochs", 7))
    asked = [s.split("=", 1)[1] for s in base_sets if s.startswith("train.epochs=")]
    if asked:  # --set train.epochs=N wins over every config's own count
        epochs = {n: int(asked[-1]) for n in names}

    if args.probe:
        probe_jobs = [(n, _train_cmd(c, args.out / "probe" / n, base_sets + [
            "train.epochs=1", "checkpoint.every_steps=0", "eval.test_at_end=false", "eval.fit_temperature=false"]),
            args.out / "probe" / f"{n}.log") for n, c in zip(names, args.configs)]
        probe_walls = _launch(probe_jobs, args.parallel, deadline)
        elapsed = time.monotonic() - start
        for n in names:
            hist_path = args.out / "probe" / n / "history.json"
            epoch_s = None
            if hist_path.exists():
                hist = json.loads(hist_path.read_text())
                if hist and "epoch_seconds" in hist[-1]:
                    epoch_s = float(hist[-1]["epoch_seconds"])
            epoch_s = epoch_s or probe_walls.get(n, 60.0)
            waves = -(-len(names) // args.parallel)
            available = (args.budget_min * 60 - elapsed) / waves - args.finish_reserve_s - 30
            fit = max(1, int(available / (epoch_s * 1.35)))
            print(f"[ablation] {n}: {epoch_s:.1f}s per epoch -> {min(fit, epochs[n])} epochs "
                  f"(config asks {epochs[n]})", flush=True)
            epochs[n] = min(fit, epochs[n])

    jobs = [(n, _train_cmd(c, args.out / n, base_sets + [f"train.epochs={epochs[n]}"]), args.out / f"{n}.log")
            for n, c in zip(names, args.configs)]
    walls = _launch(jobs, args.parallel, deadline - args.finish_reserve_s)
    # A run stopped at the deadline is finalised from its last epoch checkpoint: resuming with
    # train.epochs = the epochs it completed skips training and runs calibration + test.
    finals = []
    for n in names:
        run = args.out / n
        hist = run / "history.json"
        if not (run / "DONE").exists() and hist.exists():
            done = len(json.loads(hist.read_text()))
            if done:
                cmd = [sys.executable, "-m", "celluscan", "train", "--resume", str(run), "--set", f"train.epochs={done}"]
                finals.append((n, cmd, args.out / f"{n}.finalise.log"))
    if finals:
        _launch(finals, len(finals), deadline + 120)
    rows = [_summarise(n, c, args.out / n, walls.get(n)) for n, c in zip(names, args.configs)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    cols = list(rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
