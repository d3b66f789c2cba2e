"""Score the average of several models' predictions from the CSVs they already wrote.

    python scripts/average_predictions.py \
        --test runs/eval_A/predictions.csv runs/eval_B/predictions.csv \
        --external runs/ext_A.csv runs/ext_B.csv --external-root ../shared/data/external-dev

``--test``: the ``predictions.csv`` files of ``celluscan evaluate`` (one per model, same images):
the averaged temperature-scaled probabilities are scored like ``celluscan evaluate`` scores one
model (accuracy, macro-F1, lineage-group accuracy, ECE). ``--external``: ``celluscan predict``
CSVs over a coarse-labelled folder (``--external-root``, e.g. external-dev), scored like
``celluscan robustness`` (balanced coarse recall, false-alarm rate; an image counts as flagged
unfamiliar when any model flagged it). Images are matched by path; every CSV must hold the same
images. This is how the model card's "averaging predictions" numbers were measured (session 9).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def read_probabilities(path: Path, prefix: str) -> dict[str, dict]:
    """path -> {"probs": (C,) array in canonical class order, "label": ..., "unfamiliar": bool}
    from one CSV; rows with an error are left out."""
    from celluscan.taxonomy import CLASSES

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    missing = [c for c in CLASSES if f"{prefix}{c}" not in rows[0]]
    if missing:
        raise SystemExit(f"{path}: no probability column for {missing[0]!r} (expected '{prefix}{missing[0]}')")
    out = {}
    for r in rows:
        if r.get("error"):
            continue
        out[r["path"]] = {"probs": np.array([float(r[f"{prefix}{c}"]) for c in CLASSES]),
                          "label": r.get("label"), "unfamiliar": r.get("unfamiliar", "").lower() == "true"}
    return out


def average(tables: list[dict[str, dict]], sources: list[Path]) -> dict[str, dict]:
    keys = set(tables[0])
    for table, source in zip(tables[1:], sources[1:]):
        if set(table) != keys:
            raise SystemExit(f"{source}: holds other images than {sources[0]} "
                             f"({len(set(table) ^ keys)} differ); average CSVs of the same images")
    return {k: {"probs": np.mean([t[k]["probs"] for t in tables], axis=0), "label": tables[0][k]["label"],
                "unfamiliar": any(t[k]["unfamiliar"] for t in tables)} for k in sorted(keys)}


def score_test(paths: list[Path]) -> dict:
    from celluscan.evaluation.metrics import compute_metrics
    from celluscan.taxonomy import CLASS_TO_INDEX, CLASSES

    rows = average([read_probabilities(p, "p_") for p in paths], paths)
    y = np.array([CLASS_TO_INDEX[r["label"]] for r in rows.values()])
    probs = np.stack([r["probs"] for r in rows.values()])
    m = compute_metrics(y, probs, CLASSES)
    return {"images": len(y), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "group_accuracy": m["group"]["accuracy"], "ece": m["ece"]}


def score_external(paths: list[Path], root: Path) -> dict:
    from celluscan.evaluation.robustness import external_report, scan_coarse_folder
    from celluscan.taxonomy import CLASSES

    rows = average([read_probabilities(p, "") for p in paths], paths)
    images = {str(img.path): img for img in scan_coarse_folder(root)}
    unknown = [k for k in rows if k not in images]
    if unknown:
        raise SystemExit(f"{unknown[0]}: not an image under {root}")
    pairs = [(images[k], SimpleNamespace(label=CLASSES[int(np.argmax(r["probs"]))], unfamiliar=r["unfamiliar"]))
             for k, r in rows.items()]
    return external_report(pairs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", type=Path, nargs="*", default=[], help="celluscan evaluate predictions.csv files")
    ap.add_argument("--external", type=Path, nargs="*", default=[], help="celluscan predict CSVs of a coarse folder")
    ap.add_argument("--external-root", type=Path, help="the coarse-labelled folder the --external CSVs classified")
    args = ap.parse_args(argv)
    if not args.test and not args.external:
        ap.error("give --test and/or --external CSVs")
    if args.external and args.external_root is None:
        ap.error("--external needs --external-root")
    if args.test:
        t = score_test(args.test)
        print(f"test ({t['images']} images, {len(args.test)} model(s)): accuracy {t['accuracy']:.4f}, macro-F1 "
              f"{t['macro_f1']:.4f}, group accuracy {t['group_accuracy']:.4f}, ECE {t['ece']:.4f}")
    if args.external:
        report = score_external(args.external, args.external_root)
        for source, r in report.items():
            print(f"external {source} ({r['images']} images): balanced coarse recall {r['balanced_coarse_recall']:.3f}, "
                  f"false alarms {r['false_alarm_rate']:.3f}, flagged unfamiliar by any model {r['unfamiliar_rate']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
