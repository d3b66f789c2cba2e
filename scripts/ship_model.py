"""Make a trained run the shipped default model (src/celluscan/assets/default_model).

    python scripts/ship_model.py RUN_DIR --stage stage3 --init-from "what RUN_DIR started from"

Steps, each with the project's own commands so the card's numbers are the ones a user reproduces:

1. RUN_DIR/model is written in bfloat16 (the shipped storage precision: half the size; the
   predictor runs bf16 anyway) into a scratch model directory, with ``metadata.init_from`` set to
   the given lineage note (a run's own note names a local path nobody else has).
2. The unfamiliar-image detector is refitted on that bf16 model (scripts/fit_ood.py with the
   predictor-path threshold), so the threshold belongs to the weights that ship.
3. config.json, model.safetensors and ood.safetensors replace the assets folder's; MODEL_CARD.md
   and the rest of card/ stay (the prose is updated by hand, from the numbers this prints).
4. ``celluscan evaluate`` on the test split and ``bench/robustness.py``, both on the shipped
   default as a user runs it, write the card's test and robustness files; the run's history,
   metrics and loss plot are kept as ``card/{history,metrics,loss}_<stage>``.

Needs ../shared/data (external-dev) and an ingested datasets/blood-cells.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "celluscan" / "assets" / "default_model"
MODEL_FILES = ("config.json", "model.safetensors", "ood.safetensors")
EVALUATE_TO_CARD = {"metrics.json": "test_metrics.json", "per_class.md": "test_per_class.md",
                    "confusion_counts.png": "confusion_counts.png",
                    "confusion_normalised.png": "confusion_normalised.png", "reliability.png": "reliability.png"}
ROBUSTNESS_TO_CARD = {"robustness.md": "robustness.md", "external_shares.png": "external_shares.png"}


def write_bf16(run_model: Path, out: Path, init_from: str) -> None:
    import torch

    from celluscan.models import load_model_dir
    from celluscan.models.model_dir import save_model_dir

    model, info = load_model_dir(run_model)
    metadata = dict(info.metadata)
    metadata["init_from"] = init_from
    save_model_dir(model, out, info.class_names, info.preprocessing, metadata, dtype=torch.bfloat16)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def copy_renamed(src_dir: Path, mapping: dict[str, str], dst_dir: Path) -> None:
    for src, dst in mapping.items():
        if not (src_dir / src).exists():
            raise FileNotFoundError(f"{src_dir / src}: expected output is missing")
        shutil.copyfile(src_dir / src, dst_dir / dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a `celluscan train` output folder (with model/)")
    ap.add_argument("--stage", required=True, help="suffix for the run's card files, e.g. stage3")
    ap.add_argument("--init-from", required=True, help="lineage note stored as metadata.init_from")
    ap.add_argument("--dataset", type=Path, default=Path("datasets/blood-cells"),
                    help="ingested dataset, relative to the repository root (default datasets/blood-cells)")
    args = ap.parse_args(argv)
    run_model = args.run_dir / "model"
    if not (run_model / "config.json").exists():
        print(f"{run_model}: not a model directory", file=sys.stderr)
        return 1
    card = ASSETS / "card"
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="celluscan-ship-") as tmp:
        staged = Path(tmp) / "model"
        write_bf16(run_model, staged, args.init_from)
        run([py, "scripts/fit_ood.py", str(staged), "--dataset", str(args.dataset), "--predictor-threshold"])
        for name in MODEL_FILES:
            shutil.copyfile(staged / name, ASSETS / name)
    # From here on the shipped default is the new model: the reports name it as users see it.
    with tempfile.TemporaryDirectory(prefix="celluscan-ship-") as tmp:
        run([py, "-m", "celluscan", "evaluate", str(args.dataset), "--split", "test",
             "--output-dir", str(Path(tmp) / "test")])
        run([py, "bench/robustness.py", "--dataset", str(args.dataset), "--out", str(Path(tmp) / "robustness")])
        card.mkdir(parents=True, exist_ok=True)
        copy_renamed(Path(tmp) / "test", EVALUATE_TO_CARD, card)
        copy_renamed(Path(tmp) / "robustness", ROBUSTNESS_TO_CARD, card)
    copy_renamed(args.run_dir, {"history.json": f"history_{args.stage}.json",
                                "metrics.json": f"metrics_{args.stage}.json"}, card)
    copy_renamed(args.run_dir / "plots", {"loss.png": f"loss_{args.stage}.png"}, card)
    metrics = json.loads((card / "test_metrics.json").read_text())
    print(f"shipped {run_model} -> {ASSETS}; test accuracy {metrics['accuracy']:.4f}, "
          f"macro-F1 {metrics['macro_f1']:.4f}, group accuracy {metrics['group']['accuracy']:.4f}, "
          f"ECE {metrics['ece']:.4f}; other labs: {ASSETS / 'card' / 'robustness.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
