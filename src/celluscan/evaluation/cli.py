"""``celluscan evaluate DATA [--model MODEL_DIR] --output-dir OUT``: score a model (default: the
shipped one) on labelled images.

DATA is a folder-per-class tree (folder names and file-name codes mapped to classes by
``taxonomy.LabelMapper``; ``--label-map`` adds your own names), a ``manifest.csv``, or a folder
holding one (a dataset from ``celluscan ingest``: ``--split test`` picks a split). The set may
hold only some classes. With ``--coarse`` labels are coarse (e.g. an external set's
``neutrophil`` folder): a prediction of band, segmented or neutrophil counts as a hit
(``taxonomy.coarse_match``); coarse balanced recall and strict accuracy are reported.

Writes to OUT: metrics.json, per_class.md, predictions.csv (one row per file, errors included),
confusion_counts.png, confusion_normalised.png, reliability.png. Unreadable files are listed as
errors; they never stop the run. Every prediction carries the model's unfamiliar-image flag, and
the summary says how many images were flagged and how often the model was right on the images it
did not flag and on those it did (``unfamiliar`` in metrics.json).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

HELP = "evaluate a model on a folder-per-class tree or a manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="folder-per-class tree, manifest.csv, or a dataset folder")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (config.json + model.safetensors); default: the shipped model")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the report is written")
    parser.add_argument("--split", choices=("train", "val", "test"), help="only this split of a manifest")
    parser.add_argument("--coarse", action="store_true",
                        help="labels are coarse (neutrophil = band/segmented/neutrophil); report coarse recall")
    parser.add_argument("--label-map", type=Path, help="YAML: raw folder name or code -> class id (or skip)")
    parser.add_argument("--skip-unknown", action="store_true", help="skip (and report) unmappable labels")
    parser.add_argument("--backend", default="auto", help="predictor backend (auto, torch, onnx)")
    parser.add_argument("--tta", choices=("none", "flip", "d8"), default="none",
                        help="test-time augmentation (see `celluscan predict --tta`)")
    parser.add_argument("--progress-every", type=float, default=30.0, metavar="S",
                        help="seconds between progress lines when not on a terminal")


@dataclass(frozen=True)
class LabelledFile:
    path: str
    label: str  # class id, or a coarse label with --coarse
    raw_label: str


def _coarse_of(raw: str, class_id: str | None) -> str | None:
    from celluscan.taxonomy import TAXONOMY, normalise_name

    norm = normalise_name(raw)
    if norm in TAXONOMY.coarse_labels:
        return norm
    return TAXONOMY.to_coarse(class_id) if class_id else None


def collect_files(data: Path, *, split: str | None = None, coarse: bool = False, label_map: Path | None = None,
                  skip_unknown: bool = False) -> tuple[list[LabelledFile], dict]:
    """The labelled files of DATA and notes on what was skipped (raises on unknown labels)."""
    from celluscan.data.imageio import IMAGE_SUFFIXES
    from celluscan.data.manifest import read_manifest
    from celluscan.taxonomy import SKIP, LabelMapper, UnknownLabelError

    notes: dict = {"skipped_labels": {}, "unknown_labels": {}}
    manifest = data if data.is_file() else data / "manifest.csv"
    if data.is_file() or manifest.is_file():
        rows = read_manifest(manifest)
        if split:
            if not any(r.split for r in rows):
                raise ValueError(f"{manifest}: has no split column, so --split {split} cannot be applied")
            rows = [r for r in rows if r.split == split]
        elif any(r.split for r in rows):
            print(f"note: {manifest} has splits; evaluating all of them (use --split test)", file=sys.stderr)
        out = []
        for r in rows:
            label = _coarse_of(r.label, r.label) if coarse else r.label
            out.append(LabelledFile(r.path, label, r.label))
        notes["source"] = str(manifest)
        return out, notes
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: no such folder or manifest")
    if split:
        raise ValueError(f"{data}: --split needs a manifest (this is a plain folder tree)")
    mapper = LabelMapper.from_file(label_map)
    unknown: dict[str, list[str]] = defaultdict(list)
    skipped: Counter = Counter()
    out = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        for f in sorted(folder.rglob("*")):
            # Symlinks are kept even when broken or looping: they get an error row, not silence.
            if not (f.is_file() or f.is_symlink()) or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            class_id, raw = mapper.map_file(f.name, folder.name)
            if class_id == SKIP:
                skipped[raw] += 1
                continue
            label = _coarse_of(raw, class_id) if coarse else class_id
            if label is None:
                unknown[raw].append(str(f))
                continue
            out.append(LabelledFile(str(f), label, raw))
    if unknown and not skip_unknown:
        raise UnknownLabelError(unknown)
    notes["skipped_labels"] = dict(skipped)
    notes["unknown_labels"] = {k: len(v) for k, v in unknown.items()}
    notes["source"] = str(data)
    return out, notes


def coarse_metrics(labels: list[str], predicted: list[str]) -> dict:
    """Coarse hit rates per coarse label, their mean (balanced recall), and strict accuracy."""
    from celluscan.taxonomy import CLASSES, TAXONOMY

    per_label = {}
    for label in sorted(set(labels)):
        preds = [p for l, p in zip(labels, predicted) if l == label]
        hits = sum(TAXONOMY.coarse_match(label, p) for p in preds)
        strict = sum(p == label for p in preds) / len(preds) if label in CLASSES else None
        per_label[label] = {"n": len(preds), "recall": hits / len(preds), "strict_recall": strict,
                            "predicted": dict(Counter(preds).most_common())}
    n = len(labels)
    return {
        "n": n,
        "accuracy": sum(TAXONOMY.coarse_match(l, p) for l, p in zip(labels, predicted)) / n,
        "balanced_recall": sum(m["recall"] for m in per_label.values()) / len(per_label),
        "strict_accuracy": sum(l == p for l, p in zip(labels, predicted)) / n,
        "per_label": per_label,
    }


def _predictions_csv(rows: list[dict], class_names: list[str]) -> str:
    buf = io.StringIO()
    cols = ["path", "label", "predicted", "confidence", "correct", "coarse_hit", "unfamiliar",
            "unfamiliar_score", "error"] + [
        f"p_{c}" for c in class_names]
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    return buf.getvalue()


def unfamiliar_summary(flags: list[bool], hits: list[bool | None], note: str = "") -> dict:
    """How many images were flagged unfamiliar, and the hit rate (fine: correct class; coarse:
    coarse hit) on the images not flagged and on those flagged (None where no image is in the
    group or none of them has a label the hit rate can count)."""
    def rate(group: bool) -> float | None:
        scored = [h for f, h in zip(flags, hits) if f == group and h is not None]
        return sum(scored) / len(scored) if scored else None

    n_flagged = sum(flags)
    out = {"images": len(flags), "flagged": n_flagged,
           "flagged_rate": n_flagged / len(flags) if flags else 0.0,
           "accuracy_not_flagged": rate(False), "accuracy_flagged": rate(True)}
    if note:
        out["note"] = note
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from celluscan.data.atomic import atomic_write_text
    from celluscan.data.imageio import ImageLoadError
    from celluscan.evaluation.metrics import compute_metrics, reliability_bins
    from celluscan.evaluation.progress import ProgressMeter
    from celluscan.evaluation.report import write_json, write_report
    from celluscan.taxonomy import TAXONOMY, UnknownLabelError

    try:
        files, notes = collect_files(args.data, split=args.split, coarse=args.coarse, label_map=args.label_map,
                                     skip_unknown=args.skip_unknown)
    except (UnknownLabelError, ValueError, FileNotFoundError) as e:
        print(f"celluscan evaluate: error: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"celluscan evaluate: error: no labelled images found in {args.data}", file=sys.stderr)
        return 2

    from celluscan.inference.predictor import Predictor

    try:
        predictor = Predictor.from_model_dir(args.model, backend=args.backend, tta=args.tta)
    except (OSError, ValueError) as e:
        print(f"celluscan evaluate: error: cannot load model {args.model}: {e}", file=sys.stderr)
        return 2
    by_path = {f.path: f for f in files}
    rows, errors, y_true, probs, predicted, truth = [], [], [], [], [], []
    flags, hits, ood_note = [], [], ""
    class_names: list[str] | None = None
    with ProgressMeter(len(files), "evaluate", every_s=args.progress_every) as meter:
        for path, result in predictor.predict_paths([f.path for f in files]):
            item = by_path[str(path)]
            meter.update(1)
            if isinstance(result, ImageLoadError) or isinstance(result, Exception):
                reason = getattr(result, "reason", str(result))
                errors.append({"path": str(path), "reason": reason})
                rows.append({"path": str(path), "label": item.label, "error": reason})
                continue
            if class_names is None:
                class_names = list(result.probs)
            p = [float(result.probs[c]) for c in class_names]
            row = {"path": str(path), "label": item.label, "predicted": result.label,
                   "confidence": f"{result.confidence:.6f}", "error": "",
                   "unfamiliar": "true" if result.unfamiliar else "false",
                   "unfamiliar_score": f"{result.unfamiliar_score:.4f}",
                   **{f"p_{c}": f"{v:.6f}" for c, v in zip(class_names, p)}}
            flags.append(bool(result.unfamiliar))
            ood_note = ood_note or result.unfamiliar_note
            hit = None
            if args.coarse:
                hit = TAXONOMY.coarse_match(item.label, result.label)
                row["coarse_hit"] = int(hit)
            if item.label in class_names:
                correct = result.label == item.label
                row["correct"] = int(correct)
                if not args.coarse:
                    hit = correct
                y_true.append(class_names.index(item.label))
                probs.append(p)
            hits.append(hit)
            predicted.append(result.label)
            truth.append(item.label)
            rows.append(row)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.csv", _predictions_csv(rows, class_names or []))
    model_name = str(args.model) if args.model else "shipped default"
    summary: dict = {"data": notes.get("source"), "model": model_name, "split": args.split,
                     "execution_path": predictor.path_name,
                     "images": len(files), "evaluated": len(predicted), "errors": errors,
                     "skipped_labels": notes.get("skipped_labels"), "unknown_labels": notes.get("unknown_labels")}
    if not predicted:
        summary["error"] = "no image could be read"
        write_json(out / "metrics.json", summary)
        print(f"celluscan evaluate: error: none of the {len(files)} images could be read", file=sys.stderr)
        return 1
    coarse_matrix = None
    reliability = None
    if y_true:
        metrics = compute_metrics(np.array(y_true), np.array(probs), class_names)
        reliability = reliability_bins(np.array(y_true), np.array(probs))
        summary.update(metrics)
    if args.coarse:
        summary["coarse"] = coarse_metrics(truth, predicted)
        labels = sorted(set(truth))
        matrix = [[sum(1 for t, p in zip(truth, predicted) if t == lab and p == c) for c in class_names]
                  for lab in labels]
        coarse_matrix = (matrix, labels, class_names)
        summary.setdefault("n", len(predicted))
    summary["unfamiliar"] = unfamiliar_summary(flags, hits, ood_note)
    if not y_true and not args.coarse:
        summary["error"] = "no label is one of the model's classes"
        write_json(out / "metrics.json", summary)
        print("celluscan evaluate: error: no label matches the model's classes", file=sys.stderr)
        return 2
    title = f"Evaluation of {model_name} on {args.data}" + (f" ({args.split})" if args.split else "")
    write_report(out, summary, reliability, title=title, coarse_matrix=coarse_matrix)
    line = f"{len(predicted)} images evaluated, {len(errors)} unreadable"
    if y_true:
        line += f"; accuracy {summary['accuracy']:.4f}, macro-F1 {summary['macro_f1']:.4f}, ECE {summary['ece']:.4f}"
    if args.coarse:
        c = summary["coarse"]
        line += f"; coarse balanced recall {c['balanced_recall']:.4f}, strict accuracy {c['strict_accuracy']:.4f}"
    u = summary["unfamiliar"]
    line += f"; flagged unfamiliar {u['flagged']} ({u['flagged_rate']:.1%})"
    print(line + f"\nreport: {out}")
    return 0
