"""Write an evaluation report: metrics.json, per_class.md and the PNG plots.

Used by ``celluscan evaluate`` and by the end of ``celluscan train`` (test split), so both
produce the same files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

from celluscan.data.atomic import atomic_write_text
from celluscan.evaluation.plots import display_name, plot_confusion, plot_reliability

__all__ = ["write_json", "per_class_markdown", "write_report"]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path: str | os.PathLike, data) -> Path:
    """Strict JSON (NaN/inf become null), atomically."""
    return atomic_write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def _table(metrics: Mapping, title: str, kind: str = "class") -> list[str]:
    lines = [f"## {title}", "",
             f"{metrics['n']} images; accuracy {metrics['accuracy']:.4f}, macro accuracy "
             f"{metrics['macro_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
             f"ECE {metrics['ece']:.4f} (macro averages over the {len(metrics['classes_present'])} "
             f"labels present)", "",
             f"| {kind} | support | predicted | precision | recall | F1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in metrics["per_class"].items():
        if m["support"] == 0 and m["predicted"] == 0:
            continue
        lines.append(f"| {display_name(name, kind)} (`{name}`) | {m['support']} | {m['predicted']} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |")
    return lines + [""]


def per_class_markdown(metrics: Mapping, title: str = "Evaluation") -> str:
    """Markdown tables: per class, then per lineage group when present, then coarse labels."""
    lines = [f"# {title}", ""]
    if "per_class" in metrics:
        lines += _table(metrics, "Classes")
    if "group" in metrics:
        lines += _table(metrics["group"], "Lineage groups", kind="group")
    unfamiliar = metrics.get("unfamiliar")
    if unfamiliar:
        def pct(v):
            return "n/a" if v is None else f"{v:.3f}"
        lines += ["## Unfamiliar-image flag", "",
                  f"{unfamiliar['flagged']} of {unfamiliar['images']} images flagged unfamiliar "
                  f"({unfamiliar['flagged_rate']:.1%}). Hit rate on the images not flagged: "
                  f"{pct(unfamiliar['accuracy_not_flagged'])}; on the flagged ones: "
                  f"{pct(unfamiliar['accuracy_flagged'])}.", ""]
        if unfamiliar.get("note"):
            lines += [f"Note: {unfamiliar['note']}", ""]
    coarse = metrics.get("coarse")
    if coarse:
        lines += ["## Coarse labels", "",
                  f"coarse balanced recall {coarse['balanced_recall']:.4f}, coarse accuracy "
                  f"{coarse['accuracy']:.4f}, strict accuracy {coarse['strict_accuracy']:.4f}", "",
                  "| coarse label | images | coarse recall | strict recall | most predicted |",
                  "|---|---:|---:|---:|---|"]
        for label, m in coarse["per_label"].items():
            top = ", ".join(f"{display_name(k)} {v}" for k, v in list(m["predicted"].items())[:3])
            strict = "n/a" if m["strict_recall"] is None else f"{m['strict_recall']:.3f}"
            lines.append(f"| {label} | {m['n']} | {m['recall']:.3f} | {strict} | {top} |")
        lines.append("")
    errors = metrics.get("errors") or []
    if errors:
        lines += [f"## Unreadable files ({len(errors)})", ""]
        lines += [f"- `{e['path']}`: {e['reason']}" for e in errors]
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, metrics: Mapping, reliability: Mapping | None = None,
                 title: str = "Evaluation", plots_dir: str | os.PathLike | None = None,
                 coarse_matrix: tuple | None = None) -> list[Path]:
    """metrics.json + per_class.md in ``out_dir``; confusion (counts, row-normalised) and
    reliability PNGs in ``plots_dir`` (default ``out_dir``). ``coarse_matrix`` =
    ``(matrix, row_labels, col_labels)`` replaces the square confusion matrix."""
    out = Path(out_dir)
    plots = Path(plots_dir) if plots_dir is not None else out
    written = [write_json(out / "metrics.json", metrics),
               atomic_write_text(out / "per_class.md", per_class_markdown(metrics, title))]
    if coarse_matrix is not None:
        cm, rows, cols = coarse_matrix
    else:
        names = metrics["class_names"]
        keep = [i for i, n in enumerate(names) if n in metrics["classes_present"]]
        cm = [metrics["confusion_matrix"][i] for i in keep]
        rows, cols = [names[i] for i in keep], names
    for normalise, name in ((False, "confusion_counts.png"), (True, "confusion_normalised.png")):
        written.append(plot_confusion(cm, rows, plots / name, col_labels=cols, normalise=normalise))
    if reliability is not None:
        written.append(plot_reliability(reliability, plots / "reliability.png", ece=metrics.get("ece")))
    return written
