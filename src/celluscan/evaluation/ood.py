"""Fit the "unfamiliar image" detector: class-conditional Mahalanobis distance on [CLS] features.

Following Lee et al. (2018, "A simple unified framework for detecting out-of-distribution
samples"), the final-normed [CLS] features of the *training* split are modelled as one Gaussian
per class with a shared covariance. An image's score is its smallest squared Mahalanobis
distance to any class mean: images unlike every class the model was trained on score high.
The threshold is the (1 - max_flag_rate) quantile of the scores on the *validation* split
(default 3.5%, :data:`OOD_VAL_FLAG_RATE`), so that at most 5% of in-distribution images are
flagged with room for sampling noise. Nothing here ever
sees an external (other-lab) image: those are only used to *measure* the detector.

The fitted statistics are stored in the model directory as ``ood.safetensors`` (class means and
the precision matrix) and described under ``metadata.ood`` in ``config.json``; the predictor
(:mod:`celluscan.inference.predictor`) scores every image with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "OODStats",
    "fit_mahalanobis",
    "mahalanobis_min_distance",
    "choose_threshold",
    "auroc",
    "save_ood",
    "OOD_FILE",
    "OOD_MAX_FLAG_RATE",
    "OOD_VAL_FLAG_RATE",
    "fit_detector",
]

OOD_FILE = "ood.safetensors"
OOD_MAX_FLAG_RATE = 0.05
"""Share of in-distribution images the flag may mark (the product's ceiling)."""
OOD_VAL_FLAG_RATE = 0.035
"""Share of *validation* images the threshold is set to flag: 1.5 points under the ceiling, since
a threshold set on 1,529 validation images lands within about +- 0.6% (one binomial sd) of its
rate on another sample. (Measured: the 5%-on-validation threshold flagged 5.9% of our test
split; 4% on validation flagged 5.1% of it for two different models, so one point was too thin.)"""


@dataclass
class OODStats:
    class_means: torch.Tensor  # (C, D)
    precision: torch.Tensor  # (D, D)
    threshold: float = float("inf")


def fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    shrinkage: float = 1e-3) -> OODStats:
    """Class means and the shared (tied) covariance's inverse, from (N, D) features."""
    feats = features.double()
    d = feats.shape[1]
    means = torch.zeros(num_classes, d, dtype=torch.float64)
    centred = []
    for c in range(num_classes):
        sel = feats[labels == c]
        if sel.shape[0] == 0:
            means[c] = float("nan")
            continue
        means[c] = sel.mean(0)
        centred.append(sel - means[c])
    x = torch.cat(centred)
    cov = x.T @ x / max(x.shape[0] - 1, 1)
    # Shrink toward a scaled identity so the inverse is stable with few samples per dimension.
    # (An absolute floor keeps degenerate features, e.g. a tiny or constant training set, invertible.)
    ridge = max(float(shrinkage * cov.diagonal().mean()), 1e-6)
    cov = cov + ridge * torch.eye(d, dtype=torch.float64)
    precision = torch.linalg.pinv(cov, hermitian=True)
    precision = (precision + precision.T) / 2
    return OODStats(class_means=means.float(), precision=precision.float())


def mahalanobis_min_distance(features: torch.Tensor, stats: OODStats) -> torch.Tensor:
    """Smallest squared Mahalanobis distance to any class mean: (N, D) -> (N,)."""
    f = features.float()
    means = stats.class_means
    valid = ~torch.isnan(means).any(1)
    means = means[valid]
    diff = f[:, None, :] - means[None, :, :]  # (N, C, D)
    d2 = torch.einsum("ncd,de,nce->nc", diff, stats.precision, diff)
    return d2.min(dim=1).values


def choose_threshold(in_distribution_scores: torch.Tensor | np.ndarray, max_flag_rate: float = 0.05) -> float:
    """The score above which at most ``max_flag_rate`` of in-distribution images lie."""
    s = torch.as_tensor(in_distribution_scores, dtype=torch.float64)
    return float(torch.quantile(s, 1.0 - max_flag_rate))


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve for 'out scores higher than in' (ties count half)."""
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum_out = ranks[a.size :].sum()
    return float((rank_sum_out - b.size * (b.size + 1) / 2) / (a.size * b.size))


def fit_detector(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 num_classes: int, max_flag_rate: float = OOD_VAL_FLAG_RATE) -> OODStats:
    """Fit on the training split's features; set the threshold on the validation split's."""
    stats = fit_mahalanobis(train_features, train_labels, num_classes)
    stats.threshold = choose_threshold(mahalanobis_min_distance(val_features, stats), max_flag_rate)
    return stats


def save_ood(model_dir: str | Path, stats: OODStats, extra: dict | None = None) -> None:
    """Write ``ood.safetensors`` and describe it under ``metadata.ood`` in config.json."""
    from safetensors.torch import save_file

    from celluscan.models import update_model_dir

    model_dir = Path(model_dir)
    tmp = model_dir / f".{OOD_FILE}.tmp"
    fitted = ~torch.isnan(stats.class_means).any(1)  # classes absent from training have no mean
    save_file(
        {"class_means": stats.class_means[fitted].contiguous(), "precision": stats.precision.contiguous()},
        str(tmp),
    )
    tmp.replace(model_dir / OOD_FILE)
    update_model_dir(
        model_dir,
        metadata={
            "ood": {
                "method": "mahalanobis",
                "file": OOD_FILE,
                "threshold": stats.threshold,
                "features": "final-normed [CLS]",
                **(extra or {}),
            }
        },
    )
