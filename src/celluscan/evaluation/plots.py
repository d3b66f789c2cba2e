"""PNG plots of training curves, confusion matrices and reliability diagrams (matplotlib, Agg).

Every function writes its PNG atomically and returns the path.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from celluscan.data.atomic import atomic_write_bytes  # noqa: E402
from celluscan.taxonomy import TAXONOMY  # noqa: E402

__all__ = ["display_name", "plot_history", "plot_confusion", "plot_reliability"]


def display_name(label: str, kind: str = "class") -> str:
    """'band_neutrophil' -> 'Band neutrophil': the taxonomy's name for a class id (or, with
    ``kind="group"``, a lineage-group id); anything else is prettified."""
    if kind == "group" and label in TAXONOMY.groups:
        return TAXONOMY.groups[label].name
    try:
        return TAXONOMY.cls(label).name
    except KeyError:
        group = TAXONOMY.groups.get(label)
        return group.name if group is not None else label.replace("_", " ").capitalize()


def _save(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_history(history: Sequence[Mapping], out_dir: str | os.PathLike) -> list[Path]:
    """``loss.png`` (train/val loss) and ``accuracy.png`` (train/val accuracy, val macro-F1)
    from per-epoch history records."""
    out_dir = Path(out_dir)
    if not history:
        return []
    epochs = [h["epoch"] for h in history]

    def series(key):
        return [h.get(key) if h.get(key) is not None else math.nan for h in history]

    paths = []
    for name, keys, ylabel in (
        ("loss.png", [("train_loss", "train"), ("val_loss", "validation")], "cross-entropy loss"),
        ("accuracy.png", [("train_accuracy", "train accuracy"), ("val_accuracy", "validation accuracy"),
                          ("val_macro_accuracy", "validation macro accuracy"),
                          ("val_macro_f1", "validation macro-F1")], "score"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for key, label in keys:
            values = series(key)
            if not all(math.isnan(v) for v in values):
                ax.plot(epochs, values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(name[:-4].capitalize() + " per epoch")
        paths.append(_save(fig, out_dir / name))
    return paths


def plot_confusion(matrix, row_labels: Sequence[str], path: str | os.PathLike, *,
                   col_labels: Sequence[str] | None = None, normalise: bool = False,
                   title: str | None = None) -> Path:
    """Confusion matrix heat map; rows = true labels, columns = predictions.

    ``normalise`` divides each row by its total (recall on the diagonal). Rows and columns may
    differ (e.g. coarse truth labels against fine predictions).
    """
    cm = np.asarray(matrix, dtype=np.float64)
    cols = list(col_labels) if col_labels is not None else list(row_labels)
    if cm.shape != (len(row_labels), len(cols)):
        raise ValueError(f"matrix shape {cm.shape} does not match {len(row_labels)}x{len(cols)} labels")
    values = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalise else cm
    nr, nc = cm.shape
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * nc + 3), max(4, 0.5 * nr + 2.5)))
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalise else max(values.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(nc), [display_name(c) for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(nr), [display_name(r) for r in row_labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = (1 if normalise else max(values.max(), 1)) / 2
    for i in range(nr):
        for j in range(nc):
            if cm[i, j] == 0:
                continue
            text = f"{values[i, j]:.2f}" if normalise else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] > threshold else "black")
    ax.set_title(title or ("Confusion matrix (row-normalised)" if normalise else "Confusion matrix (counts)"))
    return _save(fig, path)


def plot_reliability(bins: Mapping, path: str | os.PathLike, *, ece: float | None = None,
                     after: Mapping | None = None, ece_after: float | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin (see metrics.reliability_bins),
    with the bin counts below; ``after`` overlays the same after temperature scaling."""
    edges = np.asarray(bins["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")

    def bars(data, label, colour, alpha):
        acc = np.array([a if a is not None else np.nan for a in data["accuracy"]], dtype=float)
        ax.bar(centres, np.nan_to_num(acc), width=width * 0.9, alpha=alpha, color=colour,
               edgecolor="black", lw=0.5, label=label)

    label = "before" if after is not None else "model"
    bars(bins, f"{label}" + (f" (ECE {ece:.3f})" if ece is not None else ""), "tab:blue", 0.7)
    if after is not None:
        bars(after, "after temperature" + (f" (ECE {ece_after:.3f})" if ece_after is not None else ""),
             "tab:orange", 0.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (15 bins)")
    ax.legend(loc="upper left")
    axc.bar(centres, bins["count"], width=width * 0.9, color="grey")
    axc.set_xlabel("confidence (top class)")
    axc.set_ylabel("images")
    return _save(fig, path)
