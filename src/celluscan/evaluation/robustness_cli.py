"""`celluscan robustness`: how a model does on other labs' images and under synthetic shifts.

    celluscan robustness --model MODEL_DIR --external ../shared/data/external-dev \
        --dataset datasets/blood-cells --output-dir out/robustness

Writes robustness.json and robustness.md (tables for the model card) and a PNG of the share of
external images predicted as each class. External images are only predicted, never fitted.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HELP = "measure robustness: other labs' images (coarse labels), synthetic shifts, unfamiliar flag"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--external", type=Path, action="append", default=[],
                        help="folder-per-coarse-label set from another lab (repeatable)")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="dataset written by `celluscan ingest`: its test split gets the synthetic shifts")
    parser.add_argument("--split", default="test", help="split of --dataset to use (default test)")
    parser.add_argument("--shift-images", type=int, default=600,
                        help="images drawn at random (fixed seed) from the split for the shifts")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)


def _table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _plot_shares(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from celluscan.taxonomy import CLASSES

    sources = [s for s in report if s != "all"] + ["all"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(sources)
    for i, s in enumerate(sources):
        shares = [report[s]["predicted_share"].get(c, 0.0) for c in CLASSES]
        ax.bar([x + i * width for x in range(len(CLASSES))], shares, width, label=s)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(CLASSES))])
    ax.set_xticklabels(CLASSES, rotation=45, ha="right")
    ax.set_ylabel("share of external images")
    ax.set_title("What the model calls other labs' mature white cells")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from celluscan.data.datasets import read_manifest
    from celluscan.data.imageio import ImageLoadError, load_image
    from celluscan.evaluation.robustness import (
        SHIFTS,
        external_report,
        load_images,
        scan_coarse_folder,
        shift_report,
        unfamiliar_report,
    )
    from celluscan.inference.predictor import Predictor

    try:
        predictor = Predictor.from_model_dir(args.model, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"celluscan robustness: error: {e}", file=sys.stderr)
        return 1
    out: dict = {"model": str(args.model or "shipped default")}
    md: list[str] = ["# Robustness report", "", f"Model: `{out['model']}`", ""]
    in_preds = []
    if args.dataset is not None:
        rows = [r for r in read_manifest(args.dataset / "manifest.csv") if r.split == args.split]
        rng = random.Random(0)
        rng.shuffle(rows)
        rows = rows[: args.shift_images]
        images, labels = [], []
        for r in rows:
            try:
                images.append(load_image(r.path))
                labels.append(r.label)
            except ImageLoadError as e:
                print(f"skipped {e}", file=sys.stderr)
        shifts = shift_report(predictor.predict_images, images, labels)
        in_preds = predictor.predict_images(images)
        out["shifts"] = {"images": len(images), "split": args.split, "results": shifts}
        md += [f"## Synthetic shifts ({len(images)} images of the {args.split} split)", "",
               _table(["shift", "accuracy", "group accuracy", "flagged unfamiliar"],
                      [[k, v["accuracy"], v["group_accuracy"], v["unfamiliar_rate"]] for k, v in shifts.items()]), ""]
    externals = []
    for folder in args.external:
        imgs = scan_coarse_folder(folder)
        pil, kept, errors = load_images([i.path for i in imgs])
        for e in errors:
            print(f"skipped {e}", file=sys.stderr)
        preds = predictor.predict_images(pil)
        externals += list(zip([imgs[k] for k in kept], preds))
    if externals:
        rep = external_report(externals)
        out["external"] = rep
        md += ["## Other labs (coarse labels; a band/segmented/neutrophil prediction counts as neutrophil)", "",
               _table(["source", "images", "balanced coarse recall", "false-alarm rate", "strict accuracy",
                       "flagged unfamiliar", "false alarms not flagged"],
                      [[s, v["images"], v["balanced_coarse_recall"], v["false_alarm_rate"], v["strict_accuracy"],
                        v["unfamiliar_rate"], v["unflagged_false_alarm_rate"]] for s, v in rep.items()]), "",
               "False alarms not flagged: the share of these mature cells called a blast or precursor "
               "*without* the unfamiliar warning, i.e. the alarms a user would see as trustworthy.", "",
               "Coarse recall per class (all sources): " + ", ".join(
                   f"{k} {v:.2f}" for k, v in rep["all"]["coarse_recall_per_class"].items()), "",
               "Predicted as (all sources): " + ", ".join(
                   f"{k} {v:.0%}" for k, v in sorted(rep["all"]["predicted_share"].items(), key=lambda kv: -kv[1])), "",
               "![predicted shares](external_shares.png)", ""]
        args.output_dir.mkdir(parents=True, exist_ok=True)
        _plot_shares(rep, args.output_dir / "external_shares.png")
        if in_preds:
            unf = unfamiliar_report(in_preds, [p for _, p in externals])
            out["unfamiliar"] = unf
            md += ["## Unfamiliar-image flag", "",
                   _table(["AUROC (external vs own test)", "flagged: own test", "flagged: external"],
                          [[unf["auroc"], unf["flagged_in_distribution"], unf["flagged_external"]]]), ""]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "robustness.json").write_text(json.dumps(out, indent=2))
    (args.output_dir / "robustness.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0
