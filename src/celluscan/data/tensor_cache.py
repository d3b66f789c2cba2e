"""Decode a dataset once into a uint8 tensor, so training never waits on JPEG decoding.

A 10k-image dataset at 160 px is 770 MB of uint8: it fits in memory (and on any GPU), and every
epoch after the first costs no decoding at all. Augmentation then runs batched on the training
device (:mod:`celluscan.data.batch_augment`). Decoding is done once with both cores and saved
beside the manifest as ``cache/tensors_<size>.npy`` + ``.json`` (plain arrays and JSON: nothing
is unpickled when it is read back).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from celluscan.data.imageio import ImageLoadError, load_image

__all__ = ["TensorCache"]


def _decode_one(args: tuple[str, int, str, dict | None]) -> np.ndarray | str:
    path, size, fill, canonical = args
    from celluscan.data.transforms import preprocess

    try:
        img = preprocess(load_image(path), size, fill=fill, canonical=canonical)
    except ImageLoadError as e:
        return str(e)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _resolve_path(row, dataset_dir: Path | None, size: int, ingest_size: int | None) -> str:
    cached = getattr(row, "cached_path", None)
    if cached and dataset_dir is not None and ingest_size is not None and size <= ingest_size:
        p = dataset_dir / cached
        if p.exists():
            return str(p)
    return str(row.path)


def _manifest_digest(keys: list[str], labels: list[int], splits: list[str], size: int, fill: str,
                     canonical_key: str = "") -> str:
    h = hashlib.sha256()
    h.update(f"{size}|{fill}|".encode())
    if canonical_key:  # absent for plain preprocessing, so caches built before it stay valid
        h.update(f"canonical={canonical_key}|".encode())
    for k, l, s in zip(keys, labels, splits):
        h.update(f"{k},{l},{s};".encode())
    return h.hexdigest()


@dataclass
class TensorCache:
    """All images of a manifest as ``images`` uint8 (N,3,S,S), with labels, splits and keys."""

    images: torch.Tensor
    labels: torch.Tensor
    splits: list[str]
    keys: list[str]
    sources: list[str]
    size: int
    tag: str = ""
    """File-name tag of a canonicalised build (data.canonical), so variants do not overwrite
    each other: ``tensors_<size><tag>.npy``."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def indices(self, split: str) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(self.splits) if s == split], dtype=torch.long)

    @classmethod
    def build(
        cls,
        rows,
        size: int,
        *,
        dataset_dir: str | os.PathLike | None = None,
        ingest_size: int | None = None,
        fill: str = "edge",
        canonical=None,
        workers: int = 2,
        progress: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> "TensorCache":
        """Decode ``rows`` (manifest rows with .path .label .split .sha256) at ``size`` px.

        With ``cache_dir``, a previous build of the same rows/size/fill is loaded instead, and a
        new build is saved there (atomically). Rows whose image can no longer be read are
        reported on stderr and dropped.
        """
        from celluscan.taxonomy import CLASS_TO_INDEX

        rows = list(rows)
        keys = [r.sha256 for r in rows]
        labels = [CLASS_TO_INDEX[r.label] for r in rows]
        splits = [r.split for r in rows]
        sources = [getattr(r, "source", "") for r in rows]
        from celluscan.data.canonical import CanonicalConfig

        canon = CanonicalConfig.coerce(canonical)
        digest = _manifest_digest(keys, labels, splits, size, fill, canon.key())
        tag = "_c" + hashlib.sha256(canon.key().encode()).hexdigest()[:8] if canon.active else ""
        if cache_dir is not None:
            loaded = cls.load(cache_dir, size, expect_digest=digest, tag=tag)
            if loaded is not None:
                return loaded
        ddir = Path(dataset_dir) if dataset_dir is not None else None
        canon_dict = canon.to_dict() if canon.active else None
        jobs = [(_resolve_path(r, ddir, size, ingest_size), size, fill, canon_dict) for r in rows]
        images = np.zeros((len(rows), 3, size, size), dtype=np.uint8)
        keep = np.ones(len(rows), dtype=bool)
        start = last = time.monotonic()
        chunk = max(1, min(64, len(jobs) // (workers * 8) or 1))
        results = (
            ProcessPoolExecutor(max_workers=workers).map(_decode_one, jobs, chunksize=chunk)
            if workers > 1 and len(jobs) > 32
            else map(_decode_one, jobs)
        )
        for i, res in enumerate(results):
            if isinstance(res, str):
                print(f"tensor cache: skipped {res}", file=sys.stderr)
                keep[i] = False
            else:
                images[i] = res
            now = time.monotonic()
            if progress and (now - last > 10 or i + 1 == len(jobs)):
                rate = (i + 1) / max(now - start, 1e-9)
                eta = (len(jobs) - i - 1) / max(rate, 1e-9)
                print(
                    f"tensor cache {size}px: {i + 1}/{len(jobs)} images, {rate:.0f} img/s, ETA {eta:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
                last = now
        idx = np.flatnonzero(keep)
        cache = cls(
            images=torch.from_numpy(images[idx]),
            labels=torch.tensor([labels[i] for i in idx], dtype=torch.long),
            splits=[splits[i] for i in idx],
            keys=[keys[i] for i in idx],
            sources=[sources[i] for i in idx],
            size=size,
            tag=tag,
        )
        if cache_dir is not None:
            cache.save(cache_dir, digest)
        return cache

    # ---- persistence: .npy + .json, never pickle ----
    @staticmethod
    def _paths(cache_dir, size, tag: str = "") -> tuple[Path, Path]:
        d = Path(cache_dir)
        return d / f"tensors_{size}{tag}.npy", d / f"tensors_{size}{tag}.json"

    def save(self, cache_dir, digest: str) -> None:
        npy, meta = self._paths(cache_dir, self.size, self.tag)
        npy.parent.mkdir(parents=True, exist_ok=True)
        tmp_npy = npy.with_suffix(".npy.tmp")
        with open(tmp_npy, "wb") as f:
            np.save(f, self.images.numpy(), allow_pickle=False)
        os.replace(tmp_npy, npy)
        tmp_meta = meta.with_suffix(".json.tmp")
        tmp_meta.write_text(
            json.dumps(
                {
                    "digest": digest,
                    "size": self.size,
                    "keys": self.keys,
                    "labels": self.labels.tolist(),
                    "splits": self.splits,
                    "sources": self.sources,
                }
            )
        )
        os.replace(tmp_meta, meta)

    @classmethod
    def load(cls, cache_dir, size: int, expect_digest: str | None = None, tag: str = "") -> "TensorCache | None":
        npy, meta = cls._paths(cache_dir, size, tag)
        if not (npy.exists() and meta.exists()):
            return None
        try:
            info = json.loads(meta.read_text())
            if expect_digest is not None and info.get("digest") != expect_digest:
                # The manifest changed since the cache was written; only a subset may match.
                return None
            arr = np.load(npy, allow_pickle=False)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            print(f"tensor cache: ignoring unreadable cache {npy}: {e}", file=sys.stderr)
            return None
        if arr.shape[0] != len(info["keys"]):
            return None
        return cls(
            images=torch.from_numpy(arr),
            labels=torch.tensor(info["labels"], dtype=torch.long),
            splits=list(info["splits"]),
            keys=list(info["keys"]),
            sources=list(info.get("sources", [""] * len(info["keys"]))),
            size=int(info["size"]),
            tag=tag,
        )
