"""Classification metrics from true labels and predicted probabilities (torchmetrics inside).

``compute_metrics(y_true, probs, class_names)`` returns a JSON-ready dict:

* ``accuracy``: micro accuracy (fraction of images right; the number the original reported),
* ``macro_accuracy``: mean per-class recall (balanced accuracy), ``macro_f1``,
  ``macro_precision``,
* ``per_class``: precision / recall / F1 / support per class,
* ``confusion_matrix``: counts, rows = true class, columns = predicted class,
* ``ece``: expected calibration error of the top-class confidence, 15 equal-width bins,
  ``nll``: mean negative log-likelihood,
* ``group``: the same at lineage-group level (probabilities summed per group with
  ``taxonomy.TAXONOMY.group_index_map()``), when the classes are the canonical 14.

Macro averages run over the classes that occur in ``y_true`` (listed in ``classes_present``):
an evaluation set holding only some classes is not penalised for the classes it lacks, while a
prediction of an absent class still counts as an error for the true class.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from celluscan.taxonomy import CLASSES, TAXONOMY

__all__ = ["ECE_BINS", "compute_metrics", "reliability_bins", "expected_calibration_error", "group_probs"]

ECE_BINS = 15


def _as_tensors(y_true, probs) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.as_tensor(np.asarray(y_true), dtype=torch.long).flatten()
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64)).to(torch.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(p.shape)}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {p.shape[0]} probability rows")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= p.shape[1]):
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")
    return y, p


def expected_calibration_error(y_true, probs, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE (L1), ``n_bins`` equal-width confidence bins (torchmetrics)."""
    y, p = _as_tensors(y_true, probs)
    if y.numel() == 0:
        return float("nan")
    return float(multiclass_calibration_error(p.float(), y, num_classes=p.shape[1], n_bins=n_bins, norm="l1"))


def reliability_bins(y_true, probs, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin: mean confidence, accuracy (None for empty bins) and count."""
    y, p = _as_tensors(y_true, probs)
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=True)  # bin i holds (edge_i, edge_i+1]
    out = {"edges": edges.tolist(), "confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out["count"].append(n)
        out["confidence"].append(float(conf[m].mean()) if n else None)
        out["accuracy"].append(float(correct[m].mean()) if n else None)
    return out


def group_probs(probs, group_index: Sequence[int], num_groups: int) -> np.ndarray:
    """Sum class probabilities within each group: (N, C) -> (N, G)."""
    p = np.asarray(probs, dtype=np.float64)
    out = np.zeros((p.shape[0], num_groups), dtype=np.float64)
    np.add.at(out.T, np.asarray(group_index), p.T)
    return out


def compute_metrics(y_true, probs, class_names: Sequence[str], *, with_groups: bool | None = None) -> dict:
    """All metrics for integer labels ``y_true`` (N,) and probabilities ``probs`` (N, C)."""
    names = list(class_names)
    y, p = _as_tensors(y_true, probs)
    c = p.shape[1]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} probability columns")
    n = int(y.numel())
    if n == 0:
        raise ValueError("no samples to evaluate")
    pf = p.float()
    kw = dict(num_classes=c)
    prec = multiclass_precision(pf, y, average="none", **kw)
    rec = multiclass_recall(pf, y, average="none", **kw)
    f1 = multiclass_f1_score(pf, y, average="none", **kw)
    cm = multiclass_confusion_matrix(pf, y, **kw)
    support = cm.sum(dim=1)
    present = support > 0
    nll = float(-torch.log(p[torch.arange(n), y].clamp_min(1e-12)).mean())
    result = {
        "n": n,
        "class_names": names,
        "classes_present": [names[i] for i in range(c) if present[i]],
        "accuracy": float(multiclass_accuracy(pf, y, average="micro", **kw)),
        "macro_accuracy": float(rec[present].mean()),
        "macro_precision": float(prec[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "ece": expected_calibration_error(y, p),
        "nll": nll,
        "per_class": {
            names[i]: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "predicted": int(cm[:, i].sum()),
            }
            for i in range(c)
        },
        "confusion_matrix": cm.tolist(),
    }
    if with_groups is None:
        with_groups = tuple(names) == CLASSES
    if with_groups:
        gmap = TAXONOMY.group_index_map()
        gnames = list(TAXONOMY.group_names())
        gp = group_probs(p.numpy(), gmap, len(gnames))
        gy = np.asarray(gmap)[y.numpy()]
        result["group"] = compute_metrics(gy, gp, gnames, with_groups=False)
    return result
