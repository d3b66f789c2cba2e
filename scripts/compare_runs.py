"""Compare two training runs epoch by epoch: does a rerun reproduce a run?

    python scripts/compare_runs.py RUN_A RUN_B [--plot compare.png]

Reads each run's ``history.json`` (written by ``celluscan train``) and, for the epochs both
have, prints validation accuracy, macro-F1 and training loss side by side with their
differences; then the largest and mean absolute difference over the common epochs and, when both
runs finished, their test metrics (``metrics.json``). With ``--plot`` it draws the validation
macro-F1 and training-loss curves of both runs in one PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = (("val_accuracy", "val acc"), ("val_macro_f1", "val macro-F1"), ("train_loss", "train loss"))


def read_history(run: Path) -> dict[int, dict]:
    path = run / "history.json"
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the run history: {e}")
    return {int(r["epoch"]): r for r in rows}


def read_test(run: Path) -> dict | None:
    try:
        return json.loads((run / "metrics.json").read_text()).get("test")
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    a, b = read_history(args.run_a), read_history(args.run_b)
    common = sorted(set(a) & set(b))
    if not common:
        print(f"no common epochs ({args.run_a}: {len(a)}, {args.run_b}: {len(b)})", file=sys.stderr)
        return 1
    header = "epoch | " + " | ".join(f"{label} A | {label} B | diff" for _, label in KEYS)
    print(header)
    diffs: dict[str, list[float]] = {k: [] for k, _ in KEYS}
    for e in common:
        cells = []
        for key, _ in KEYS:
            va, vb = float(a[e][key]), float(b[e][key])
            diffs[key].append(abs(va - vb))
            cells.append(f"{va:.4f} | {vb:.4f} | {vb - va:+.4f}")
        print(f"{e:5d} | " + " | ".join(cells))
    for key, label in KEYS:
        print(f"{label}: max |diff| {max(diffs[key]):.4f}, mean |diff| {sum(diffs[key]) / len(common):.4f} "
              f"over {len(common)} common epoch(s)")
    ta, tb = read_test(args.run_a), read_test(args.run_b)
    if ta and tb:
        for key in ("accuracy", "macro_f1", "ece"):
            if key in ta and key in tb:
                print(f"test {key}: A {ta[key]:.4f}, B {tb[key]:.4f}, diff {tb[key] - ta[key]:+.4f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for run, hist in ((args.run_a, a), (args.run_b, b)):
            epochs = sorted(hist)
            axes[0].plot(epochs, [hist[e]["val_macro_f1"] for e in epochs], label=str(run))
            axes[1].plot(epochs, [hist[e]["train_loss"] for e in epochs], label=str(run))
        axes[0].set(title="validation macro-F1", xlabel="epoch")
        axes[1].set(title="training loss", xlabel="epoch")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
