"""Measure the colour references that ``data.canonical`` maps every image to.

    python scripts/colour_reference.py datasets/blood-cells [--images 800] [--size 128] [--region cell]

Random training-split images (fixed seed) are framed on their nucleus (scale 3) and resized to
``--size`` px, as the shipped models see them, then:

* ``REINHARD_REFERENCE``: the mean over images of each image's CIELAB mean and standard
  deviation per channel (with ``--region cell``: ``REINHARD_CELL_REFERENCE``, the same measured
  inside the cell disc only, ``data.canonical.cell_disc``);
* ``STAIN_ANCHOR_REFERENCE``: the median over images of the background colour and of the
  nucleus optical density per channel (images without a detectable nucleus left out).

Print them as Python literals to paste into ``src/celluscan/data/canonical.py``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path, help="dataset folder written by `celluscan ingest`")
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--region", choices=("image", "cell"), default="image",
                    help="measure the Reinhard statistics over the whole frame or the cell disc")
    ap.add_argument("--cell-radius", type=float, default=0.36)
    args = ap.parse_args(argv)

    from celluscan.data.canonical import CanonicalConfig, cell_disc, lab_statistics, rgb_to_lab, stain_anchors
    from celluscan.data.datasets import read_manifest
    from celluscan.data.imageio import load_image
    from celluscan.data.transforms import preprocess

    rows = [r for r in read_manifest(args.dataset / "manifest.csv") if r.split == "train"]
    rows = random.Random(args.seed).sample(rows, min(args.images, len(rows)))
    framing = CanonicalConfig(framing="nucleus", framing_scale=3.0)
    lab_means, lab_stds, backgrounds, nuclei = [], [], [], []
    for i, row in enumerate(rows, 1):
        img = preprocess(load_image(row.path), args.size, canonical=framing)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        disc = cell_disc(*arr.shape[:2], args.cell_radius) if args.region == "cell" else None
        mean, std = lab_statistics(rgb_to_lab(arr), disc)
        lab_means.append(mean)
        lab_stds.append(std)
        bg, nucleus = stain_anchors(arr)
        backgrounds.append(bg)
        if nucleus is not None:
            nuclei.append(nucleus)
        if i % 200 == 0 or i == len(rows):
            print(f"{i}/{len(rows)} images", flush=True)

    def fmt(v):
        return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

    name = "REINHARD_CELL_REFERENCE" if args.region == "cell" else "REINHARD_REFERENCE"
    print(f"{name} = ({fmt(np.mean(lab_means, 0))}, {fmt(np.mean(lab_stds, 0))})")
    print(f"STAIN_ANCHOR_REFERENCE = ({fmt(np.median(backgrounds, 0))}, {fmt(np.median(nuclei, 0))})"
          f"  # {len(nuclei)} of {len(rows)} images with a nucleus")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
