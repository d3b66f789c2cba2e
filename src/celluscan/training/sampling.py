"""Each epoch's draw of training images, as a pure function of (labels, seed, epoch).

Being pure is what makes a mid-epoch resume exact: the resumed run recomputes the same
order and skips the batches already consumed. Under torchrun the order is cut into disjoint,
equally long shards, one per rank.
"""

from __future__ import annotations

import numpy as np

from celluscan.data.balance import balanced_indices

__all__ = ["SAMPLERS", "epoch_plan", "rank_batches", "step_seed"]

SAMPLERS = ("shuffle", "balanced", "class_balanced")


def epoch_plan(labels, epoch: int, seed: int, sampler: str = "shuffle",
               balance_target: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, trivial_flags)`` for one epoch.

    ``shuffle``: a permutation of all indices. ``balanced``: every class topped up to
    ``balance_target`` (0: the largest class) with extra copies flagged for TrivialAugmentWide
    (data.balance.balanced_indices), shuffled. ``class_balanced``: ``len(labels)`` draws with
    replacement, each class equally likely.
    """
    labels = np.asarray(labels)
    n = labels.size
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    if sampler == "shuffle":
        return rng.permutation(n).astype(np.int64), np.zeros(n, dtype=bool)
    if sampler == "balanced":
        counts = np.bincount(labels)
        target = balance_target or int(counts.max())
        idx, flags = balanced_indices(labels.tolist(), target, rng)
        perm = rng.permutation(idx.size)
        return idx[perm], flags[perm]
    if sampler == "class_balanced":
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        return rng.choice(n, size=n, replace=True, p=weights / weights.sum()).astype(np.int64), np.zeros(n, dtype=bool)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def rank_batches(indices: np.ndarray, flags: np.ndarray, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's batches: the order trimmed to a multiple of ``world_size``, every
    ``world_size``-th item from ``rank``, cut into batches of ``batch_size`` (last may be short)."""
    usable = (indices.size // world_size) * world_size
    mine = slice(rank, usable, world_size)
    idx, fl = indices[mine], flags[mine]
    return [(idx[i:i + batch_size], fl[i:i + batch_size]) for i in range(0, idx.size, batch_size)]


def step_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The torch seed for one training step (augmentation, mixup, dropout)."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
