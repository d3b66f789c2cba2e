"""`celluscan predict`: classify image files and folders.

    celluscan predict cells/ extra.png [--model DIR] [--output preds.csv]
                      [--backend auto|torch|onnx] [--precision auto|fp32|bf16]
                      [--batch-size 32] [--workers N] [--no-recursive] [--threshold 0.6]
                      [--jit auto|on|off]

Folders are walked (recursively by default) for files with an image suffix; files named
explicitly are always tried. Unreadable files get a row with the error; the rest still run.
Exit status: 0 every input classified, 2 some inputs failed, 1 fatal error (no model, no inputs).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Iterable

from celluscan.data.imageio import IMAGE_SUFFIXES

HELP = "classify image files and folders (the main job)"

EXIT_OK, EXIT_FATAL, EXIT_SOME_FAILED = 0, 1, 2
PROGRESS_MIN_IMAGES = 64
# --jit auto turns tracing + fusion on from this many inputs: its ~15-30 s warm-up is repaid
# by ~20-35% faster batches only on long runs (BENCHMARKS.md "Inference").
JIT_MIN_IMAGES = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="model directory (config.json + model.safetensors, optionally model.onnx) "
                             "or an .onnx file (default: the shipped model)")
    parser.add_argument("--output", "-o", metavar="CSV", default=None,
                        help="write a CSV (written atomically; '-' for stdout) instead of the table")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                        help="auto: PyTorch for a model directory, ONNX Runtime for an .onnx file")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="PyTorch precision; auto: bf16 where the CPU runs it natively and it "
                             "agrees with fp32 on a probe batch, else fp32")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads decoding images while the model runs (0 = none); default: "
                             "planned from the first images' timings, giving a small model and the "
                             "decoder their own cores")
    parser.add_argument("--recursive", dest="recursive", action="store_true", default=True,
                        help="walk folders recursively (the default)")
    parser.add_argument("--no-recursive", dest="recursive", action="store_false",
                        help="only the images directly inside each folder")
    parser.add_argument("--jit", choices=("auto", "on", "off"), default="auto",
                        help="PyTorch: trace + oneDNN Graph fusion (~15-30 s warm-up, then ~20-35%% "
                             f"faster); auto: on from {JIT_MIN_IMAGES} inputs")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="flag predictions whose top probability is below this as uncertain (default 0.6)")
    parser.add_argument("--tta", choices=("none", "flip", "d8"), default="none",
                        help="test-time augmentation: average over the mirror image (flip, 2x the "
                             "model time) or all 8 rotations/mirrors (d8, 8x); about +1 point of "
                             "accuracy on images like the training data (MODEL_CARD.md)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or summary on stderr")


def collect_inputs(paths: Iterable[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Expand folders into their image files (sorted; hidden files and folders skipped);
    keep explicitly named paths as given, even missing ones (they become error rows)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            out.append(p)
            continue
        found: list[Path] = []
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
            found += [Path(root) / f for f in files
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        out += sorted(found)
    return out


def _fatal(message: str) -> int:
    print(f"celluscan predict: error: {message}", file=sys.stderr)
    return EXIT_FATAL


def run(args: argparse.Namespace) -> int:
    from celluscan.data.atomic import atomic_write_text
    from celluscan.data.progress import progress
    from celluscan.inference.output import CSV_COLUMNS, TableWriter, csv_row
    from celluscan.inference.predictor import Predictor

    if args.batch_size < 1:
        return _fatal(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        return _fatal(f"--workers must be 0 or more, got {args.workers}")
    if not 0.0 <= args.threshold <= 1.0:
        return _fatal(f"--threshold must be between 0 and 1, got {args.threshold}")
    inputs = collect_inputs(args.paths, args.recursive)
    if not inputs:
        return _fatal("no images found in " + ", ".join(map(str, args.paths))
                      + f" (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    to_file = args.output not in (None, "-")
    if to_file and Path(args.output).is_dir():
        return _fatal(f"--output {args.output} is a directory; give a file name such as preds.csv")
    if to_file:
        parent = Path(args.output).resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return _fatal(f"cannot create the folder for --output {args.output}: {e}")
        if not os.access(parent, os.W_OK):
            return _fatal(f"cannot write --output {args.output}: folder {parent} is not writable")
    try:
        predictor = Predictor.from_model_dir(args.model, backend=args.backend, precision=args.precision,
                                             batch_size=args.batch_size, workers=args.workers,
                                             threshold=args.threshold, tta=args.tta,
                                             jit=args.jit == "on" or (args.jit == "auto" and
                                                                      len(inputs) >= JIT_MIN_IMAGES))
    except (OSError, ValueError, RuntimeError) as e:
        return _fatal(str(e))
    if not args.quiet:
        note = f" ({predictor.note})" if predictor.note else ""
        print(f"model {predictor.spec.source} on {predictor.path_name}{note}; "
              f"{len(inputs)} input(s)", file=sys.stderr)

    names = [str(p) for p in inputs]
    results = predictor.predict_paths(inputs)
    csv_buffer = io.StringIO() if args.output is not None else None
    show_progress = (not args.quiet and len(inputs) >= PROGRESS_MIN_IMAGES
                     and (csv_buffer is not None and to_file or not sys.stdout.isatty()))
    if show_progress:
        results = progress(results, total=len(inputs), desc="predict", unit="img")
    writer = csv.writer(csv_buffer, lineterminator="\n") if csv_buffer is not None else None
    table = None if writer is not None else TableWriter(names, sys.stdout)
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    else:
        table.header()
    failed = 0
    start = time.perf_counter()
    for name, (_path, result) in zip(names, results):
        failed += isinstance(result, BaseException)
        if writer is not None:
            writer.writerow(csv_row(name, result))
        else:
            table.row(name, result)
    elapsed = time.perf_counter() - start
    if csv_buffer is not None:
        if to_file:
            try:
                atomic_write_text(args.output, csv_buffer.getvalue())
            except OSError as e:
                return _fatal(f"cannot write {args.output}: {e}")
        else:
            sys.stdout.write(csv_buffer.getvalue())
            sys.stdout.flush()
    if not args.quiet:
        done = len(inputs) - failed
        where = f"; wrote {args.output}" if to_file else ""
        split = predictor.last_core_split
        print(f"classified {done} of {len(inputs)} image(s) in {elapsed:.1f} s "
              f"({len(inputs) / max(elapsed, 1e-9):.1f} img/s){where}"
              + (f"; cores {split.describe()}" if split is not None else "")
              + (f"; {failed} failed (see the error column)" if failed and writer else
                 f"; {failed} failed" if failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK
