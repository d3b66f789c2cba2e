"""Benchmark the ingest: images/s (1 worker vs N workers) and the near-duplicate search.

Usage (from the repo root)::

    nice .venv/bin/python bench/ingest.py                 # all of ../shared/data training folders
    nice .venv/bin/python bench/ingest.py --limit 1000    # a subset (first N files, sorted)

Ratios are against baselines measured in the same run: ingest with 1 worker, and the exact
blocked all-pairs search (vectorised XOR + popcount) on the same 100k hashes. Times are
medians of ``--repeats`` runs (the slow baseline runs ``--baseline-repeats`` times).
CPU-ms per image (all processes) is also reported: unlike images/s it does not depend on
what else the machine is running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from celluscan.data.dedup import DEFAULT_NEAR_DUP_THRESHOLD, brute_force_pairs, find_near_duplicate_pairs
from celluscan.data.imageio import IMAGE_SUFFIXES
from celluscan.data.ingest import IngestConfig, ingest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = [REPO.parent / "shared" / "data" / "blood-cells", REPO.parent / "shared" / "data" / "blood-cells-extra"]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores visible"


def subset_tree(sources: list[Path], limit: int, dest: Path) -> list[Path]:
    """Symlink the first ``limit`` image files (sorted) into ``dest``, keeping class folders."""
    files = sorted(
        p for s in sources for p in s.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )[:limit]
    for p in files:
        link = dest / p.parent.parent.name / p.parent.name / p.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p)
    return sorted({dest / p.parent.parent.name for p in files})


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_ingest(sources: list[Path], workers: int, image_size: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (all processes) and the number of files for one ingest."""
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        config = IngestConfig(tuple(map(str, sources)), out=tmp, image_size=image_size, workers=workers)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result = ingest(config, log=lambda _m: None)
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return elapsed, cpu, result.files_processed


def synthetic_hashes(n: int, planted: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, n - planted, dtype=np.uint64, endpoint=False)
    src = h[rng.integers(0, h.size, planted)]
    flips = rng.integers(0, 64, (planted, 3))
    masks = np.bitwise_or.reduce(np.left_shift(np.uint64(1), flips.astype(np.uint64)), axis=1)
    keep_some = rng.random(planted) < 0.5  # half exact copies of the bits, half with 1-3 flips
    near = np.where(keep_some, src, src ^ masks)
    return np.concatenate([h, near])[rng.permutation(n)]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*", type=Path, default=DEFAULT_SOURCES)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N image files")
    ap.add_argument("--workers", type=int, default=2, help="worker processes to compare with 1")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--hashes", type=int, default=100_000)
    ap.add_argument("--threshold", type=int, default=DEFAULT_NEAR_DUP_THRESHOLD)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-repeats", type=int, default=1)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    results: dict = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(f"machine: {results['machine']}")

    if not args.skip_ingest:
        missing = [s for s in args.sources if not s.is_dir()]
        if missing:
            print(f"source folder(s) not found: {', '.join(map(str, missing))}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="bench_subset_") as tmp:
            sources = subset_tree(args.sources, args.limit, Path(tmp)) if args.limit else args.sources
            runs = {}
            for w in sorted({1, args.workers}):
                secs, cpu, n = bench_ingest(sources, w, args.image_size)
                runs[w] = {"seconds": secs, "cpu_seconds": cpu, "images": n, "images_per_s": n / secs,
                           "cpu_ms_per_image": 1000 * cpu / n, "load_avg_1min": os.getloadavg()[0]}
                print(f"ingest, {w} worker(s): {n} images in {secs:.1f} s = {n / secs:.1f} images/s "
                      f"({1000 * cpu / n:.1f} CPU-ms per image; load average {os.getloadavg()[0]:.1f})")
        results["ingest"] = runs
        if args.workers != 1:
            ratio = runs[args.workers]["images_per_s"] / runs[1]["images_per_s"]
            results["ingest_speedup"] = ratio
            print(f"ingest speed-up, {args.workers} workers vs 1: {ratio:.2f}x")

    hashes = synthetic_hashes(args.hashes, planted=args.hashes // 100)
    t_mih, pairs = timed(lambda: find_near_duplicate_pairs(hashes, args.threshold), args.repeats)
    t_brute, ref = timed(lambda: brute_force_pairs(hashes, args.threshold), args.baseline_repeats)
    assert np.array_equal(pairs, ref), "multi-index search disagrees with the brute force"
    results["near_dup"] = {
        "hashes": args.hashes,
        "threshold": args.threshold,
        "pairs": int(len(pairs)),
        "multi_index_s": t_mih,
        "blocked_all_pairs_s": t_brute,
        "speedup": t_brute / t_mih,
    }
    print(
        f"near-duplicate search, {args.hashes:,} hashes, threshold {args.threshold}: "
        f"{len(pairs)} pairs; multi-index {t_mih:.3f} s (median of {args.repeats}), "
        f"blocked all-pairs baseline {t_brute:.2f} s: {t_brute / t_mih:.0f}x faster"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
