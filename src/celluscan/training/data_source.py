"""Training data as uint8 tensors in memory: the engine's only view of the dataset.

:func:`load_train_data` reads a dataset folder written by ``celluscan ingest`` (manifest.csv
with splits, stats.json), decodes every image once into a :class:`~celluscan.data.tensor_cache.
TensorCache` (saved beside the dataset and reused), applies the training-subset fraction and
returns a :class:`TrainData`. Tests build a :class:`TrainData` straight from small tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from celluscan.taxonomy import CLASSES

__all__ = ["SplitTensors", "TrainData", "load_train_data", "channel_stats", "run_on_cache"]


@dataclass
class SplitTensors:
    """Images ``(N, 3, S, S)`` uint8 and labels ``(N,)`` int64 of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, S, S), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> "SplitTensors":
        return SplitTensors(self.images.to(device), self.labels.to(device))


@dataclass
class TrainData:
    """Train / validation (/ test) tensors plus what preprocessing needs to know."""

    train: SplitTensors
    val: SplitTensors
    mean: Sequence[float]
    std: Sequence[float]
    test: SplitTensors | None = None
    class_names: tuple[str, ...] = CLASSES
    pad_fill: str = "edge"
    info: dict = field(default_factory=dict)
    canonical: dict | None = None
    """The data.canonical settings of the model's preprocessing (None: plain)."""
    batch_colour: str = "none"
    """A colour step the cached images still need, applied per batch (``colour_stage: batch``)."""


def channel_stats(images: torch.Tensor, chunk: int = 512, colour: str = "none") -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-1 scale) of uint8 images (N, 3, S, S), through the same
    arithmetic as the ingest's statistics (data.stats.combine), after the batched colour step
    ``colour`` (data.batch_augment.colour_batch)."""
    from celluscan.data.batch_augment import colour_batch
    from celluscan.data.stats import PixelSums, combine

    sums = []
    for i in range(0, images.shape[0], chunk):
        x = colour_batch(images[i:i + chunk].to(torch.float64) / 255.0, colour)
        sums.append(PixelSums(tuple(x.sum(dim=(0, 2, 3)).tolist()), tuple((x * x).sum(dim=(0, 2, 3)).tolist()),
                              int(x.shape[0] * x.shape[2] * x.shape[3])))
    mean, std = combine(sums)
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]


@torch.no_grad()
def run_on_cache(forward, normalise, images: torch.Tensor, batch_size: int = 256,
                 device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``forward(normalise(batch))`` over cached uint8 images (N, 3, S, S) in batches of
    ``batch_size`` on ``device`` (under autocast to ``amp_dtype`` when given): float32 (N, ...) on
    the CPU. For a model directory's logits or features outside the trainer (distillation
    teachers, scripts)."""
    kind = torch.device(device).type
    outs = []
    for start in range(0, images.shape[0], batch_size):
        x = normalise(images[start:start + batch_size].to(device))
        if amp_dtype is None:
            outs.append(forward(x).float().cpu())
        else:
            with torch.autocast(kind, dtype=amp_dtype):
                outs.append(forward(x).float().cpu())
    return torch.cat(outs)


def _split(cache, mask: torch.Tensor) -> SplitTensors:
    idx = mask.nonzero().flatten()
    return SplitTensors(cache.images[idx], cache.labels[idx])


def load_train_data(dataset: str | Path, size: int, *, subset_fraction: float = 1.0, seed: int = 0,
                    cache_dir: str | Path | None = None, workers: int = 2,
                    canonical=None, colour_stage: str = "cache") -> TrainData:
    """Decode (or load the cached) dataset at ``size`` px and split it.

    With ``canonical`` (data.canonical settings) every image is canonicalised before caching,
    and mean/std are recomputed on the canonicalised training split (the ingest's stats.json
    describes the plain images). With ``colour_stage="batch"`` the cache holds the framing only
    and the colour step is left to each batch (``TrainData.batch_colour``); mean/std are then
    measured after that step."""
    from dataclasses import replace

    from celluscan.data.batch_augment import BATCH_COLOURS
    from celluscan.data.canonical import CanonicalConfig
    from celluscan.data.datasets import read_manifest
    from celluscan.data.split import training_subset
    from celluscan.data.stats import read_stats
    from celluscan.data.tensor_cache import TensorCache

    ddir = Path(dataset)
    manifest = ddir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no manifest; point data.dataset at a folder written by "
                                f"`celluscan ingest` (it holds manifest.csv and stats.json)")
    rows = read_manifest(manifest)
    unsplit = [r.path for r in rows if r.split not in ("train", "val", "test")]
    if unsplit:
        raise ValueError(f"{manifest}: {len(unsplit)} row(s) have no train/val/test split "
                         f"(e.g. {unsplit[0]}); run `celluscan ingest` to split the dataset")
    canon = CanonicalConfig.coerce(canonical)
    if colour_stage not in ("cache", "batch"):
        raise ValueError(f"colour_stage must be 'cache' or 'batch', got {colour_stage!r}")
    batch_colour = canon.colour if colour_stage == "batch" else "none"
    if batch_colour not in BATCH_COLOURS:
        raise ValueError(f"canonical colour {canon.colour!r} cannot run per batch "
                         f"(colour_stage: batch supports {', '.join(BATCH_COLOURS[1:])})")
    if batch_colour != "none" and canon.colour_region != "image":
        raise ValueError("canonical colour_region 'cell' runs at the cache stage only (colour_stage: cache)")
    cached_canon = replace(canon, colour="none") if batch_colour != "none" else canon
    stats = read_stats(ddir)
    fill = stats.get("pad_fill", "edge")
    cache = TensorCache.build(rows, size, dataset_dir=ddir, ingest_size=int(stats["image_size"]),
                              fill=fill if isinstance(fill, str) else "edge", workers=workers,
                              canonical=cached_canon,
                              cache_dir=Path(cache_dir) if cache_dir else ddir / "cache")
    splits = cache.splits
    is_train = torch.tensor([s == "train" for s in splits])
    if subset_fraction < 1.0:
        if any(not r.sha256 for r in rows):
            raise ValueError(f"{manifest}: a training subset needs the sha256 column filled for every row")
        chosen = {r.sha256 for r in training_subset(rows, subset_fraction, seed)}
        in_subset = torch.tensor([k in chosen for k in cache.keys])
        is_train &= in_subset
    is_val = torch.tensor([s == "val" for s in splits])
    is_test = torch.tensor([s == "test" for s in splits])
    train, val = _split(cache, is_train), _split(cache, is_val)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{manifest}: need training and validation images, found "
                         f"{len(train)} train and {len(val)} val (after the subset)")
    test = _split(cache, is_test) if bool(is_test.any()) else None
    mean, std = list(stats["mean"]), list(stats["std"])
    if canon.active:
        mean, std = channel_stats(train.images, colour=batch_colour)
    return TrainData(
        train=train, val=val, test=test, mean=mean, std=std,
        canonical=canon.to_dict() if canon.active else None, batch_colour=batch_colour,
        pad_fill=fill if isinstance(fill, str) else "edge",
        info={"dataset": str(ddir), "cache_size": size, "subset_fraction": subset_fraction,
              "train_images": len(train), "val_images": len(val),
              "test_images": 0 if test is None else len(test)},
    )
