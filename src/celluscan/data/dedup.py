"""Exact and near-duplicate detection.

* Exact duplicates: the sha256 of the file bytes (:func:`sha256_file`).
* Near duplicates: a 64-bit perceptual hash (:func:`perceptual_hash`, a DCT "pHash"
  implemented here with numpy) compared by Hamming distance. Two images are near-duplicates
  when their hashes differ in at most ``threshold`` bits (default
  :data:`DEFAULT_NEAR_DUP_THRESHOLD` = 4 of 64: re-encodes, slight crops and re-scans of
  the same cell stay within it, different cells almost never do).
* Near-duplicate *groups* are the connected components of the "near-duplicate" graph
  (:func:`near_duplicate_groups`), so the split can keep each group on one side.

The pair search (:func:`find_near_duplicate_pairs`) never loops over pairs in Python. It
uses multi-index hashing: the 64 bits are cut into ``threshold + 1`` bands; by the
pigeonhole principle two hashes within ``threshold`` bits agree exactly on at least one
band, so only hashes sharing a band value are compared (vectorised XOR + popcount). When
the band buckets are too crowded to help (hashes of very similar images), it falls back to
an exact blocked all-pairs comparison, also vectorised. Both give exactly the brute-force
answer.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_NEAR_DUP_THRESHOLD",
    "HASH_SIZE",
    "sha256_file",
    "perceptual_hash",
    "hash_to_hex",
    "hex_to_hash",
    "hamming_distance",
    "find_near_duplicate_pairs",
    "brute_force_pairs",
    "connected_components",
    "near_duplicate_groups",
]

DEFAULT_NEAR_DUP_THRESHOLD = 4
HASH_SIZE = 8  # an 8x8 block of low DCT frequencies -> 64 bits
_DCT_INPUT = 32  # the image is reduced to 32x32 grey before the DCT


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``C @ x`` is the DCT of a length-n signal x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


def perceptual_hash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash) of a PIL image, as a Python int.

    The image is converted to grey, reduced to 32x32 (box filter: an area average), and
    transformed with a 2-D DCT-II. Each of the 8x8 lowest-frequency coefficients gives one
    bit: 1 when it is above the median of those 64 coefficients (the DC term excluded from
    the median, as it only measures brightness). Bits are read row-major, first bit = most
    significant.
    """
    grey = img.convert("L").resize((_DCT_INPUT, _DCT_INPUT), Image.Resampling.BOX)
    x = np.asarray(grey, dtype=np.float64)
    c = _dct_matrix(_DCT_INPUT)
    low = (c @ x @ c.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_to_hex(h: int) -> str:
    return f"{int(h):016x}"


def hex_to_hash(s: str) -> int:
    return int(s, 16)


def hamming_distance(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def _as_uint64(hashes) -> np.ndarray:
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64:
        return hashes.ravel()
    return np.array([int(h) for h in np.ravel(np.asarray(hashes, dtype=object))], dtype=np.uint64)


def _empty_pairs() -> np.ndarray:
    return np.empty((0, 2), dtype=np.int64)


def _sorted_unique_pairs(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    lo = np.minimum(i, j).astype(np.int64)
    hi = np.maximum(i, j).astype(np.int64)
    keys = np.unique(lo * n + hi)
    return np.stack([keys // n, keys % n], axis=1) if keys.size else _empty_pairs()


def brute_force_pairs(hashes, threshold: int, block_elements: int = 1 << 22) -> np.ndarray:
    """All pairs ``(i, j)``, ``i < j``, with Hamming distance <= threshold: exact, O(n^2).

    Vectorised in blocks of rows (XOR + popcount) holding about ``block_elements``
    distances at a time. Returns an ``(P, 2)`` int64 array sorted by (i, j).
    """
    h = _as_uint64(hashes)
    n = h.size
    block = max(1, block_elements // max(n, 1))
    out_i, out_j = [], []
    for start in range(0, n, block):
        rows = h[start : start + block]
        # Compare each row only with later hashes (j > i).
        d = np.bitwise_count(rows[:, None] ^ h[None, start:])
        ii, jj = np.nonzero(d <= threshold)
        keep = jj > ii  # jj is relative to `start`, ii too
        out_i.append(ii[keep] + start)
        out_j.append(jj[keep] + start)
    if not out_i:
        return _empty_pairs()
    return _sorted_unique_pairs(np.concatenate(out_i), np.concatenate(out_j), max(n, 1))


def _bands(threshold: int) -> list[tuple[int, int]]:
    """Cut 64 bits into threshold+1 contiguous bands as equal as possible: (shift, width)."""
    n_bands = threshold + 1
    widths = [64 // n_bands + (1 if b < 64 % n_bands else 0) for b in range(n_bands)]
    bands, shift = [], 64
    for w in widths:
        shift -= w
        bands.append((shift, w))
    return bands


def _pairs_within_buckets(order: np.ndarray, keys_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs whose keys are equal, given indices sorted by key (vectorised)."""
    n = keys_sorted.size
    starts = np.flatnonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    # Position of every element inside its bucket, and how many later bucket-mates it has.
    bucket_of = np.repeat(np.arange(starts.size), sizes)
    rank = np.arange(n) - starts[bucket_of]
    later = sizes[bucket_of] - rank - 1
    total = int(later.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = np.repeat(np.arange(n), later)
    # Offsets 1..later for each element: a running count reset at each element.
    offset = np.arange(total) - np.repeat(np.cumsum(later) - later, later) + 1
    return order[first], order[first + offset]


def find_near_duplicate_pairs(
    hashes, threshold: int = DEFAULT_NEAR_DUP_THRESHOLD, max_candidates: int = 20_000_000
) -> np.ndarray:
    """All pairs ``(i, j)``, ``i < j``, whose 64-bit hashes differ in <= ``threshold`` bits.

    Exact (the same answer as :func:`brute_force_pairs`) but usually far faster, via
    multi-index hashing (see the module docstring). ``max_candidates`` bounds the candidate
    pairs of one band before falling back to the blocked exact search.
    Returns an ``(P, 2)`` int64 array sorted by (i, j).
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    h = _as_uint64(hashes)
    n = h.size
    if n < 2:
        return _empty_pairs()
    if threshold >= 63:
        return brute_force_pairs(h, threshold)
    found_i, found_j = [], []
    for shift, width in _bands(threshold):
        keys = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        ks = keys[order]
        _, counts = np.unique(ks, return_counts=True)
        if int((counts * (counts - 1) // 2).sum()) > max_candidates:
            return brute_force_pairs(h, threshold)
        i, j = _pairs_within_buckets(order, ks)
        if i.size:
            close = np.bitwise_count(h[i] ^ h[j]) <= threshold
            found_i.append(i[close])
            found_j.append(j[close])
    if not found_i:
        return _empty_pairs()
    return _sorted_unique_pairs(np.concatenate(found_i), np.concatenate(found_j), n)


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component id for each of ``n`` nodes joined by ``pairs``.

    Ids are 0.. in order of each component's lowest node index, so the result depends only
    on the node order and the edges.
    """
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in np.asarray(pairs, dtype=np.int64).reshape(-1, 2):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    _, first_index, inverse = np.unique(roots, return_index=True, return_inverse=True)
    # np.unique orders by root value; the root is the component's lowest index already.
    del first_index
    return inverse.astype(np.int64)


def near_duplicate_groups(hashes, threshold: int = DEFAULT_NEAR_DUP_THRESHOLD) -> np.ndarray:
    """Group id per hash: connected components of pairs within ``threshold`` bits."""
    h = _as_uint64(hashes)
    return connected_components(h.size, find_near_duplicate_pairs(h, threshold))
