"""Perceptual hashing and the vectorised near-duplicate search."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from corpus import pattern_image

from celluscan.data.dedup import (
    brute_force_pairs,
    connected_components,
    find_near_duplicate_pairs,
    hamming_distance,
    hash_to_hex,
    hex_to_hash,
    near_duplicate_groups,
    perceptual_hash,
    sha256_file,
)

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def reference_pairs(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """Independent brute force: byte-wise popcount table, every (i, j) with i < j."""
    as_bytes = hashes.astype(">u8").view(np.uint8).reshape(-1, 8)
    out = set()
    for i in range(len(hashes) - 1):
        d = _POPCOUNT8[as_bytes[i] ^ as_bytes[i + 1 :]].sum(axis=1)
        out.update((i, i + 1 + int(j)) for j in np.flatnonzero(d <= threshold))
    return out


def planted_hashes(n_random: int, n_planted: int, max_flips: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, n_random, dtype=np.uint64, endpoint=False)
    planted = []
    for _ in range(n_planted):
        h = int(base[rng.integers(n_random)])
        for bit in rng.choice(64, rng.integers(0, max_flips + 1), replace=False):
            h ^= 1 << int(bit)
        planted.append(h)
    hashes = np.concatenate([base, np.array(planted, dtype=np.uint64)])
    return hashes[rng.permutation(hashes.size)]


@pytest.mark.parametrize("threshold", [0, 2, 4, 6, 7, 10])
def test_finds_exactly_the_brute_force_pairs(threshold):
    hashes = planted_hashes(1500, 300, max_flips=threshold + 3, seed=threshold)
    expected = reference_pairs(hashes, threshold)
    assert len(expected) > 50  # the planted pairs are there to be found
    got = find_near_duplicate_pairs(hashes, threshold)
    assert got.dtype == np.int64 and got.shape[1] == 2
    assert {tuple(map(int, p)) for p in got} == expected
    assert np.all(got[:, 0] < got[:, 1])
    assert got.tolist() == sorted(got.tolist())


@pytest.mark.parametrize("threshold, n_bands", [(6, 4), (6, 2), (5, 3), (2, 1), (8, 3)])
def test_band_radius_search_is_exact(threshold, n_bands):
    # fewer bands than threshold + 1: each band is probed with a Hamming ball (radius > 0)
    hashes = planted_hashes(600, 150, max_flips=threshold + 2, seed=threshold * 10 + n_bands)
    expected = reference_pairs(hashes, threshold)
    got = find_near_duplicate_pairs(hashes, threshold, n_bands=n_bands)
    assert {tuple(map(int, p)) for p in got} == expected


def test_blocked_fallback_gives_the_same_pairs():
    hashes = planted_hashes(800, 200, max_flips=6, seed=7)
    expected = reference_pairs(hashes, 4)
    assert {tuple(map(int, p)) for p in brute_force_pairs(hashes, 4, block_elements=1000)} == expected
    # max_candidates=0 forces the fallback inside find_near_duplicate_pairs
    forced = find_near_duplicate_pairs(hashes, 4, max_candidates=0)
    assert {tuple(map(int, p)) for p in forced} == expected


def test_crowded_buckets_still_exact():
    # Hashes that share most bits (very similar images) crowd every band bucket.
    rng = np.random.default_rng(3)
    hashes = np.array([(0xFFFF0000FFFF0000 ^ (1 << int(b1)) ^ (1 << int(b2)))
                       for b1, b2 in rng.integers(0, 64, (400, 2))], dtype=np.uint64)
    expected = reference_pairs(hashes, 3)
    assert {tuple(map(int, p)) for p in find_near_duplicate_pairs(hashes, 3)} == expected


def test_edge_cases():
    assert find_near_duplicate_pairs(np.array([], dtype=np.uint64), 4).shape == (0, 2)
    assert find_near_duplicate_pairs(np.array([5], dtype=np.uint64), 4).shape == (0, 2)
    same = np.array([7, 7, 7], dtype=np.uint64)
    assert find_near_duplicate_pairs(same, 0).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert find_near_duplicate_pairs([0, 2**64 - 1], 4).shape == (0, 2)  # python ints accepted
    assert find_near_duplicate_pairs([1, 2**63], 4).tolist() == [[0, 1]]  # 2 bits apart
    with pytest.raises(ValueError):
        find_near_duplicate_pairs(same, -1)


def test_connected_components_and_groups():
    pairs = np.array([[3, 5], [0, 4], [5, 6]])
    assert connected_components(7, pairs).tolist() == [0, 1, 2, 3, 0, 3, 3]
    assert connected_components(3, np.empty((0, 2))).tolist() == [0, 1, 2]
    # a chain is one group even when its ends are far apart
    hashes = np.array([0b0, 0b111, 0b111111, 2**40 - 1], dtype=np.uint64)
    assert near_duplicate_groups(hashes, 3).tolist() == [0, 0, 0, 1]


def _jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_perceptual_hash_robust_to_reencoding_and_resizing_but_discriminative():
    imgs = [pattern_image(s, 200, 180) for s in range(12)]
    for img in imgs:
        h = perceptual_hash(img)
        assert hamming_distance(h, perceptual_hash(_jpeg_roundtrip(img, 70))) <= 4
        assert hamming_distance(h, perceptual_hash(img.resize((120, 108), Image.Resampling.BICUBIC))) <= 4
    hashes = [perceptual_hash(i) for i in imgs]
    distinct = [hamming_distance(a, b) for k, a in enumerate(hashes) for b in hashes[k + 1 :]]
    assert min(distinct) > 8
    assert all(0 <= h < 2**64 for h in hashes)


def test_hash_hex_roundtrip_and_sha(tmp_path):
    h = perceptual_hash(pattern_image(1, 64, 64))
    assert len(hash_to_hex(h)) == 16 and hex_to_hash(hash_to_hex(h)) == h
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
