"""Out-of-distribution ("unfamiliar image") scoring. Higher scores mean less familiar.

The statistics are fitted elsewhere (``celluscan.evaluation``, on the training split's [CLS]
features) and stored as the ``ood`` entry of a model directory's ``config.json``. This
module only *scores*. Accepted ``ood`` entries::

    {"method": "mahalanobis",            # squared Mahalanobis distance of the [CLS] feature
     "mean": [D floats]                  # one Gaussian ...
       | "class_means": [[D floats] x C],   # ... or class-conditional (min over classes)
     "precision": [[D x D floats]]       # full inverse covariance, or the compact form:
       | "components": [[D floats] x k], "variances": [k floats],
         "residual_variance": float (optional; isotropic variance of what the k
                                         principal components leave out),
     "file": "ood.safetensors"           # optional: any of the arrays above stored as
                                         # same-named tensors beside config.json instead
     "threshold": float}                 # score > threshold -> unfamiliar

    {"method": "energy", "temperature": float (default 1), "threshold": float}

Without an ``ood`` entry the energy score is reported, uncalibrated, and nothing is
flagged unfamiliar (see :data:`NO_OOD_NOTE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = [
    "mahalanobis_score",
    "energy_score",
    "OODScorer",
    "NO_OOD_NOTE",
    "OODConfigError",
]

NO_OOD_NOTE = (
    "no OOD statistics in the model directory: unfamiliar_score is the uncalibrated "
    "energy score and no image is flagged unfamiliar"
)


class OODConfigError(ValueError):
    """The model directory's ``ood`` entry is malformed."""


def mahalanobis_score(
    features: torch.Tensor,
    mean: torch.Tensor,
    precision: torch.Tensor | None = None,
    *,
    components: torch.Tensor | None = None,
    variances: torch.Tensor | None = None,
    residual_variance: float | None = None,
) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of ``features`` (B, D).

    ``mean`` is (D,) or (C, D) (class-conditional: the distance to the nearest class mean).
    Give either the full ``precision`` (D, D) or the compact eigen form: ``components``
    (k, D) orthonormal rows with ``variances`` (k,) and optionally ``residual_variance``
    for the orthogonal complement (ignored when None).
    """
    x = features.detach().to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (B, D), got shape {tuple(x.shape)}")
    means = mean.to(torch.float64)
    means = means.unsqueeze(0) if means.ndim == 1 else means
    if means.shape[-1] != x.shape[1]:
        raise ValueError(f"OOD mean has dimension {means.shape[-1]}, features have {x.shape[1]}")
    z = x.unsqueeze(1) - means.unsqueeze(0)  # (B, C, D)
    if precision is not None:
        p = precision.to(torch.float64)
        if p.shape != (x.shape[1], x.shape[1]):
            raise ValueError(f"precision must be ({x.shape[1]}, {x.shape[1]}), got {tuple(p.shape)}")
        d2 = torch.einsum("bcd,de,bce->bc", z, p, z)
    elif components is not None and variances is not None:
        v = components.to(torch.float64)
        lam = variances.to(torch.float64)
        if v.ndim != 2 or v.shape[1] != x.shape[1] or lam.shape != (v.shape[0],):
            raise ValueError("components must be (k, D) and variances (k,)")
        proj = z @ v.T  # (B, C, k)
        d2 = (proj.square() / lam).sum(-1)
        if residual_variance is not None:
            residual = (z.square().sum(-1) - proj.square().sum(-1)).clamp_min(0.0)
            d2 = d2 + residual / float(residual_variance)
    else:
        raise ValueError("give either precision or components + variances")
    return d2.min(dim=1).values.to(torch.float32)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Energy E(x) = -T * logsumexp(logits / T) (Liu et al. 2020); higher = less familiar."""
    t = float(temperature)
    return -t * torch.logsumexp(logits.detach().float() / t, dim=-1)


def _tensor(entry: Mapping[str, Any], stored: Mapping[str, torch.Tensor], key: str):
    if key in entry:
        try:
            return torch.as_tensor(entry[key], dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise OODConfigError(f"ood.{key} is not a numeric array: {e}") from None
    return stored.get(key)


@dataclass
class OODScorer:
    """Scores a batch from its [CLS] features and logits; ``threshold`` None = never flag."""

    method: str = "energy"
    threshold: float | None = None
    temperature: float = 1.0
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    residual_variance: float | None = None
    note: str = NO_OOD_NOTE

    @property
    def needs_features(self) -> bool:
        return self.method == "mahalanobis"

    @classmethod
    def from_config(
        cls, entry: Mapping[str, Any] | None, model_dir: str | Path | None = None
    ) -> "OODScorer":
        if not entry:
            return cls()
        if not isinstance(entry, Mapping):
            raise OODConfigError("the 'ood' entry of config.json must be a JSON object")
        method = str(entry.get("method", "mahalanobis")).lower()
        threshold = entry.get("threshold")
        threshold = None if threshold is None else float(threshold)
        note = "" if threshold is not None else "OOD statistics have no threshold: nothing is flagged"
        if method == "energy":
            return cls("energy", threshold, float(entry.get("temperature", 1.0)), note=note)
        if method != "mahalanobis":
            raise OODConfigError(f"unknown OOD method {method!r} (use 'mahalanobis' or 'energy')")
        stored: dict[str, torch.Tensor] = {}
        if entry.get("file"):
            if model_dir is None:
                raise OODConfigError("ood.file given but the model directory is unknown")
            path = Path(model_dir) / str(entry["file"])
            try:
                from safetensors.torch import load_file

                stored = load_file(str(path))
            except Exception as e:  # missing file, corrupt header, ...
                raise OODConfigError(f"{path}: cannot read OOD statistics: {e}") from None
        arrays: dict[str, torch.Tensor] = {}
        for key in ("mean", "class_means", "precision", "components", "variances"):
            value = _tensor(entry, stored, key)
            if value is not None:
                arrays[key] = value
        mean = arrays.get("class_means", arrays.get("mean"))
        if mean is None:
            raise OODConfigError("mahalanobis OOD statistics need 'mean' or 'class_means'")
        arrays["mean"] = mean
        arrays.pop("class_means", None)
        if "precision" not in arrays and not ("components" in arrays and "variances" in arrays):
            raise OODConfigError("mahalanobis OOD statistics need 'precision' or 'components' + 'variances'")
        residual = entry.get("residual_variance")
        if residual is None and "residual_variance" in stored:
            residual = float(stored["residual_variance"].reshape(-1)[0])
        return cls(
            "mahalanobis",
            threshold,
            arrays=arrays,
            residual_variance=None if residual is None else float(residual),
            note=note,
        )

    def score(self, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        if self.method == "mahalanobis":
            if features is None:
                raise ValueError("Mahalanobis OOD scoring needs the [CLS] features")
            return mahalanobis_score(
                features,
                self.arrays["mean"],
                self.arrays.get("precision"),
                components=self.arrays.get("components"),
                variances=self.arrays.get("variances"),
                residual_variance=self.residual_variance,
            )
        return energy_score(logits, self.temperature)

    def flags(self, scores: torch.Tensor) -> list[bool]:
        if self.threshold is None:
            return [False] * int(scores.shape[0])
        return [bool(s > self.threshold) for s in scores.tolist()]
