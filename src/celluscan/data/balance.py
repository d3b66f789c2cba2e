"""Class balancing of the TRAINING split by on-the-fly augmentation.

Minority classes are brought up to at least ``target_per_class`` images (default 4500) by
drawing extra copies of their own training images, each shown through TrivialAugmentWide;
majority classes are left untouched (never subsampled). Validation and test data never see
augmented copies: :class:`BalancedDataset` refuses rows from other splits.

Why on the fly rather than writing augmented files once: bringing 14 classes to 4500 means
about 63,000 images, most of them extra copies. Materialising them costs disk space and
CPU time at ingest, and every epoch would then see the same fixed variants. Drawing the
extra copies per epoch (:meth:`BalancedDataset.set_epoch`) and augmenting them as they are
loaded costs nothing up front and shows the model fresh variants every epoch.

:func:`balanced_indices` is a pure function of the labels (and the random generator) so
that the fast tensor-cache training path can reuse it.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, Sequence

import numpy as np
from torch.utils.data import Dataset

from celluscan.data.datasets import ManifestDataset
from celluscan.data.imageio import DEFAULT_LIMITS, ImageLimits
from celluscan.data.manifest import ManifestRow
from celluscan.data.transforms import TrivialAugmentEdgeFill

__all__ = ["DEFAULT_TARGET_PER_CLASS", "balanced_indices", "BalancedDataset"]

DEFAULT_TARGET_PER_CLASS = 4500


def balanced_indices(
    labels: Sequence[Hashable],
    target_per_class: int = DEFAULT_TARGET_PER_CLASS,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices for one balanced epoch, and a flag per index: is it an augmented extra copy?

    Every original index appears once (flag False), in order. Then, for each class with
    fewer than ``target_per_class`` items (classes in sorted order), ``target - n`` extra
    indices of that class's own items follow (flag True): each item is repeated
    ``(target - n) // n`` times and the remainder is drawn without replacement with ``rng``
    (a ``numpy.random.Generator``, a seed, or None), so extra copies are spread evenly.
    """
    if target_per_class < 0:
        raise ValueError(f"target_per_class must be >= 0, got {target_per_class}")
    labels_arr = np.asarray(list(labels))
    n = labels_arr.size
    gen = np.random.default_rng(rng)
    parts = [np.arange(n, dtype=np.int64)]
    flags = [np.zeros(n, dtype=bool)]
    for cls in sorted(set(labels_arr.tolist()), key=lambda c: (str(type(c)), c)):
        members = np.flatnonzero(labels_arr == cls)
        deficit = target_per_class - members.size
        if deficit <= 0:
            continue
        repeats, remainder = divmod(deficit, members.size)
        extra = np.concatenate(
            [np.tile(members, repeats), np.sort(gen.choice(members, remainder, replace=False))]
        ).astype(np.int64)
        parts.append(extra)
        flags.append(np.ones(extra.size, dtype=bool))
    return np.concatenate(parts), np.concatenate(flags)


class BalancedDataset(Dataset):
    """A torch ``Dataset`` over TRAINING manifest rows with minority classes topped up.

    Item ``i`` is ``(transform(image), label_index)``. Originals appear once each; extra
    draws of minority-class images (see :func:`balanced_indices`) are passed through
    ``augment`` (default: TrivialAugmentWide with border-colour fill) before ``transform``.
    Call :meth:`set_epoch` each epoch to redraw which images get the extra copies.
    Images load as in :class:`~celluscan.data.datasets.ManifestDataset` (``root``: the
    dataset folder, to use the preprocessed copies).
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        target_per_class: int = DEFAULT_TARGET_PER_CLASS,
        transform: Callable | None = None,
        root: str | os.PathLike | None = None,
        augment: Callable | None = None,
        seed: int = 0,
        limits: ImageLimits = DEFAULT_LIMITS,
    ):
        wrong = [r for r in rows if getattr(r, "split", "train") not in ("train", "")]
        if wrong:
            raise ValueError(
                f"BalancedDataset takes training rows only; {len(wrong)} row(s) are from other "
                f"splits (e.g. {wrong[0].path} in {wrong[0].split!r}): val/test must never "
                "see augmented copies"
            )
        self.base = ManifestDataset(rows, transform=None, root=root, limits=limits)
        self.target_per_class = target_per_class
        self.transform = transform
        self.augment = augment if augment is not None else TrivialAugmentEdgeFill()
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the extra copies for ``epoch`` (deterministic for a given seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        self.indices, self.is_augmented = balanced_indices(self.base.labels, self.target_per_class, rng)

    @property
    def labels(self) -> list[int]:
        return [self.base.labels[i] for i in self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int):
        src = int(self.indices[index])
        img = self.base.load(src)
        if self.is_augmented[index]:
            img = self.augment(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.base.labels[src]
