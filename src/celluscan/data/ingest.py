"""`celluscan ingest`: turn image folders into a verified, de-duplicated, split dataset.

Pipeline (see docs/design.md for the output contract):

1. scan the sources and map labels (:mod:`celluscan.data.scan`); unknown labels stop the
   run with :class:`~celluscan.taxonomy.UnknownLabelError` unless ``skip_unknown``;
2. in worker processes, for each file in sorted order: fully decode it with
   :func:`~celluscan.data.imageio.load_image` (bad files are rejected with a reason, never
   crash the run), hash the bytes (sha256) and the picture (64-bit pHash), and write the
   preprocessed copy (pad to square + resize, JPEG q95 4:4:4) to
   ``images/<label>/<sha256[:16]>.jpg``, keeping its pixel sums for the statistics;
3. drop exact duplicates: same sha256 and same label keeps the first copy; same sha256 with
   conflicting labels drops every copy (the label is not trustworthy);
4. group near-duplicates (pHash Hamming distance <= threshold, connected components);
5. split stratified by class and grouped by near-duplicate group (seeded);
6. write ``manifest.csv``, ``stats.json`` (train split only), ``report.json``,
   ``report.md`` and ``class_counts.png``, each atomically.

Re-running (after an interruption, say) gives the same manifest: inputs are sorted, all
randomness is seeded, and preprocessed images already on disk with the same parameters are
reused. Preprocessed images no longer referenced by the manifest are removed.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from celluscan.data.atomic import atomic_write_bytes, atomic_write_text
from celluscan.data.dedup import (
    DEFAULT_NEAR_DUP_THRESHOLD,
    find_near_duplicate_pairs,
    connected_components,
    hash_to_hex,
    perceptual_hash,
    sha256_file,
)
from celluscan.data.imageio import DEFAULT_LIMITS, ImageLimits, ImageLoadError, load_image
from celluscan.data.manifest import ManifestRow, write_manifest
from celluscan.data.progress import progress
from celluscan.data.report import build_report, write_report
from celluscan.data.scan import Candidate, scan_sources
from celluscan.data.split import DEFAULT_FRACTIONS, assign_splits, parse_fractions
from celluscan.data.stats import PixelSums, combine, pixel_sums, write_stats
from celluscan.data.transforms import Fill, preprocess, resolve_fill
from celluscan.taxonomy import LabelMapper, UnknownLabelError

__all__ = ["IngestConfig", "IngestResult", "IngestError", "ingest"]

CACHE_DIR = "images"
CACHE_QUALITY = 95
_CACHE_PARAMS_FILE = "params.json"
_CACHE_NAME = re.compile(r"^[0-9a-f]{16}\.jpg$")


class IngestError(RuntimeError):
    """The ingest cannot produce a dataset (e.g. no usable images)."""


@dataclass(frozen=True)
class IngestConfig:
    sources: tuple[str, ...]
    out: str
    label_map: str | None = None
    skip_unknown: bool = False
    image_size: int = 224
    seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    near_dup_threshold: int = DEFAULT_NEAR_DUP_THRESHOLD
    workers: int = 2
    fill: Fill = "edge"
    limits: ImageLimits = DEFAULT_LIMITS

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("give at least one source folder")
        if self.image_size < 8:
            raise ValueError(f"--image-size must be >= 8, got {self.image_size}")
        if not 0 <= self.near_dup_threshold < 64:
            raise ValueError(f"--near-dup-threshold must be in 0..63, got {self.near_dup_threshold}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        parse_fractions(self.fractions)
        resolve_fill(Image.new("RGB", (1, 1)), self.fill)


@dataclass
class IngestResult:
    rows: list[ManifestRow]
    report: dict
    out: Path
    elapsed_s: float = 0.0
    files_processed: int = 0


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _WorkerParams:
    out_dir: str
    image_size: int
    fill: Fill
    limits: ImageLimits
    reuse_cache: bool


@dataclass(frozen=True)
class _Processed:
    index: int
    error: str | None = None
    sha256: str = ""
    phash: int = 0
    width: int = 0
    height: int = 0
    cached_path: str = ""
    sums: PixelSums | None = None


_PARAMS: _WorkerParams | None = None


def _init_worker(params: _WorkerParams) -> None:
    global _PARAMS
    _PARAMS = params


def _cached_image(params: _WorkerParams, img: Image.Image, cache_file: Path) -> Image.Image:
    """The preprocessed image as stored on disk, reusing a valid existing file."""
    size = params.image_size
    if params.reuse_cache and cache_file.is_file():
        try:
            cached = load_image(cache_file, params.limits)
            if cached.size == (size, size):
                return cached
        except ImageLoadError:
            pass  # rewritten below
    buf = io.BytesIO()
    preprocess(img, size, params.fill).save(buf, "JPEG", quality=CACHE_QUALITY, subsampling=0)
    data = buf.getvalue()
    try:
        atomic_write_bytes(cache_file, data)
    except OSError as e:  # an output problem (disk full, permissions) stops the run
        raise IngestError(f"{cache_file}: cannot write preprocessed image: {e.strerror or e}") from None
    # Statistics come from the stored pixels, so a re-run that reuses the file agrees.
    return Image.open(io.BytesIO(data)).convert("RGB")


def _process(task: tuple[int, str, str]) -> _Processed:
    """Decode, hash and preprocess one file. Never raises: failures become ``error``."""
    index, path, label = task
    params = _PARAMS
    assert params is not None, "worker not initialised"
    try:
        img = load_image(path, params.limits)
        sha = sha256_file(path)
        ph = perceptual_hash(img)
        rel = f"{CACHE_DIR}/{label}/{sha[:16]}.jpg"
        stored = _cached_image(params, img, Path(params.out_dir) / rel)
        return _Processed(index, None, sha, ph, img.width, img.height, rel, pixel_sums(stored))
    except IngestError:
        raise
    except ImageLoadError as e:
        return _Processed(index, e.reason)
    except OSError as e:
        return _Processed(index, f"cannot read file: {e.strerror or e}")
    except Exception as e:  # a bad file must never stop the batch
        return _Processed(index, f"unexpected error: {type(e).__name__}: {e}")


def _run_workers(tasks: list[tuple[int, str, str]], params: _WorkerParams, workers: int):
    """Yield results in task order, using ``workers`` processes (<= 1: in this process)."""
    if workers <= 1 or len(tasks) < 2:
        _init_worker(params)
        yield from map(_process, tasks)
        return
    # Spawned workers (not forked: safe even when torch is loaded in the parent), each
    # single-threaded: the parallelism is across files.
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: "1" for k in saved})
    try:
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(64, len(tasks) // (workers * 8)))
        with ctx.Pool(workers, initializer=_init_worker, initargs=(params,)) as pool:
            yield from pool.imap(_process, tasks, chunksize=chunk)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- pipeline


def _cache_params(config: IngestConfig) -> dict:
    fill = config.fill if isinstance(config.fill, str) else list(config.fill)
    return {"image_size": config.image_size, "fill": fill, "format": "jpeg", "quality": CACHE_QUALITY}


def _cache_reusable(out: Path, params: dict) -> bool:
    stamp = out / CACHE_DIR / _CACHE_PARAMS_FILE
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def _remove_orphans(out: Path, keep: set[str]) -> int:
    """Delete preprocessed images (our own naming pattern only) not in ``keep``."""
    removed = 0
    cache = out / CACHE_DIR
    if not cache.is_dir():
        return 0
    for label_dir in cache.iterdir():
        if not label_dir.is_dir() or label_dir.is_symlink():
            continue
        for f in label_dir.iterdir():
            rel = f"{CACHE_DIR}/{label_dir.name}/{f.name}"
            stale_tmp = f.name.startswith(".") and f.name.endswith(".tmp")
            if (stale_tmp or (_CACHE_NAME.match(f.name) and rel not in keep)) and f.is_file():
                f.unlink()
                removed += 1
    return removed


def _drop_exact_duplicates(
    cands: Sequence[Candidate], done: Sequence[_Processed]
) -> tuple[list[int], list[dict]]:
    """Indices to keep (first copy of each sha256 unless labels conflict) and the report."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for r in done:
        by_sha[r.sha256].append(r.index)
    keep, report = [], []
    for r in done:
        copies = by_sha[r.sha256]
        if len(copies) == 1:
            keep.append(r.index)
            continue
        if r.index != copies[0]:
            continue  # handled with the first copy
        labels = sorted({cands[i].label for i in copies})
        conflict = len(labels) > 1
        if not conflict:
            keep.append(copies[0])
        report.append(
            {
                "sha256": r.sha256,
                "files": [cands[i].path for i in copies],
                "labels": labels,
                "conflicting_labels": conflict,
                "kept": None if conflict else cands[copies[0]].path,
                "action": "all copies dropped (conflicting labels)" if conflict else "kept the first copy",
            }
        )
    return keep, report


def ingest(config: IngestConfig, log: Callable[[str], None] | None = None) -> IngestResult:
    """Run the whole ingest (see the module docstring) and return the rows and report.

    Raises :class:`UnknownLabelError` (unknown labels without ``skip_unknown``),
    ``ValueError`` (bad arguments or label map) or :class:`IngestError` (nothing usable).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    config.validate()
    start = time.monotonic()
    out = Path(config.out).absolute()
    mapper = LabelMapper.from_file(config.label_map)

    scan = scan_sources(config.sources, mapper, exclude=[out])
    if scan.unknown and not config.skip_unknown:
        raise UnknownLabelError(scan.unknown)
    cands = scan.candidates
    if not cands:
        raise IngestError(
            f"no labelled image files found in {', '.join(map(str, config.sources))} "
            f"({len(scan.ignored)} other files ignored)"
        )
    say(f"ingest: {len(cands)} image files found in {len(config.sources)} source folder(s)")

    out.mkdir(parents=True, exist_ok=True)
    cache_params = _cache_params(config)
    reuse = _cache_reusable(out, cache_params)
    if not reuse:
        (out / CACHE_DIR / _CACHE_PARAMS_FILE).unlink(missing_ok=True)
    params = _WorkerParams(str(out), config.image_size, config.fill, config.limits, reuse)
    tasks = [(i, c.path, c.label) for i, c in enumerate(cands)]
    results = list(
        progress(_run_workers(tasks, params, config.workers), total=len(tasks), desc="decode+hash+preprocess", unit="img")
    )
    atomic_write_text(out / CACHE_DIR / _CACHE_PARAMS_FILE, json.dumps(cache_params) + "\n")

    rejected = [r for r in results if r.error is not None]
    done = [r for r in results if r.error is None]
    keep, exact_dups = _drop_exact_duplicates(cands, done)
    by_index = {r.index: r for r in done}
    kept = [by_index[i] for i in keep]
    if not kept:
        raise IngestError("no usable images: every file was rejected or a conflicting duplicate")

    t0 = time.monotonic()
    hashes = np.array([r.phash for r in kept], dtype=np.uint64)
    pairs = find_near_duplicate_pairs(hashes, config.near_dup_threshold)
    groups = connected_components(len(kept), pairs)
    say(f"ingest: near-duplicate search on {len(kept)} images: {len(pairs)} pair(s) "
        f"in {time.monotonic() - t0:.2f} s")
    labels = [cands[r.index].label for r in kept]
    splits = assign_splits(labels, groups.tolist(), config.fractions, config.seed)

    rows = [
        ManifestRow(
            path=cands[r.index].path,
            label=cands[r.index].label,
            source=cands[r.index].source,
            sha256=r.sha256,
            phash=hash_to_hex(r.phash),
            group=int(g),
            width=r.width,
            height=r.height,
            split=s,
            cached_path=r.cached_path,
        )
        for r, g, s in zip(kept, groups, splits)
    ]
    train_sums = [r.sums for r, s in zip(kept, splits) if s == "train" and r.sums is not None]
    mean, std = combine(train_sums)
    stats = {"mean": mean, "std": std, "image_size": config.image_size, "num_images": len(train_sums)}

    write_manifest(rows, out / "manifest.csv")
    write_stats(out / "stats.json", mean, std, config.image_size, len(train_sums), config.fill)
    report = build_report(
        config=config,
        scan=scan,
        rejected=[(cands[r.index], r.error) for r in rejected],
        exact_duplicates=exact_dups,
        rows=rows,
        pairs=pairs,
        stats=stats,
    )
    write_report(out, report)
    removed = _remove_orphans(out, {r.cached_path for r in rows})
    elapsed = time.monotonic() - start
    say(
        f"ingest: kept {len(rows)} of {len(cands)} images ({len(rejected)} rejected, "
        f"{report['totals']['exact_duplicates_dropped']} exact duplicates dropped, "
        f"{report['totals']['near_duplicate_groups']} near-duplicate groups); "
        f"{len(cands) / max(elapsed, 1e-9):.1f} img/s; wrote {out}"
        + (f"; removed {removed} stale preprocessed files" if removed else "")
    )
    return IngestResult(rows, report, out, elapsed, len(cands))
