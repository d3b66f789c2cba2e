"""`celluscan ingest SRC... --out DATASET`: build a verified, de-duplicated, split dataset."""

from __future__ import annotations

import argparse
import sys

from celluscan.data.dedup import DEFAULT_NEAR_DUP_THRESHOLD

HELP = (
    "Scan image folders (folder-per-class or code-named files), map labels, fully decode and "
    "verify every image, drop exact duplicates, group near-duplicates, split train/val/test "
    "(stratified, grouped), and write DATASET/manifest.csv, report.json/.md, stats.json and "
    "preprocessed copies in DATASET/images/."
)


def _fill(text: str):
    t = text.strip().lower()
    if t in ("edge", "white", "black"):
        return t
    try:
        values = tuple(int(v) for v in t.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use edge, white, black or R,G,B") from None
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: R,G,B must be three ints in 0..255")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SRC", help="source folder(s), scanned recursively")
    parser.add_argument("--out", required=True, metavar="DATASET", help="output dataset folder")
    parser.add_argument(
        "--label-map", metavar="MAP.yaml",
        help="YAML mapping of raw labels (folder names, file codes) to class ids or 'skip'",
    )
    parser.add_argument(
        "--skip-unknown", action="store_true",
        help="skip (and report) images whose label cannot be mapped, instead of stopping",
    )
    parser.add_argument("--image-size", type=int, default=224, help="side of the preprocessed copies (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split (default 0)")
    parser.add_argument(
        "--fractions", default="0.7,0.15,0.15", metavar="TRAIN,VAL,TEST",
        help="split fractions (default 0.7,0.15,0.15)",
    )
    parser.add_argument(
        "--near-dup-threshold", type=int, default=DEFAULT_NEAR_DUP_THRESHOLD, metavar="N",
        help="max Hamming distance (of 64 pHash bits) for near-duplicates "
        f"(default {DEFAULT_NEAR_DUP_THRESHOLD})",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2; 1 = no pool)")
    parser.add_argument(
        "--pad-fill", type=_fill, default="edge", metavar="FILL",
        help="padding colour when squaring: edge (median border colour, default), white, black or R,G,B",
    )


def run(args: argparse.Namespace) -> int:
    from celluscan.data.ingest import IngestConfig, IngestError, ingest
    from celluscan.data.split import parse_fractions
    from celluscan.taxonomy import UnknownLabelError

    try:
        config = IngestConfig(
            sources=tuple(args.sources),
            out=args.out,
            label_map=args.label_map,
            skip_unknown=args.skip_unknown,
            image_size=args.image_size,
            seed=args.seed,
            fractions=parse_fractions(args.fractions),
            near_dup_threshold=args.near_dup_threshold,
            workers=args.workers,
            fill=args.pad_fill,
        )
        ingest(config)
    except UnknownLabelError as e:
        print(f"celluscan ingest: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, IngestError) as e:
        print(f"celluscan ingest: error: {e}", file=sys.stderr)
        return 2
    return 0
