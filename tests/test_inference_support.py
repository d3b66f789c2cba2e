"""Shared helpers for the inference, predict-CLI and export tests (no tests here).

A tiny random ViT (``vit_test``, 32 px) saved as a model directory, and a few generated
cell-like images of assorted sizes and formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from celluscan.models import create_model, save_model_dir
from celluscan.taxonomy import CLASSES

PREPROCESSING = {"mean": [0.6, 0.5, 0.7], "std": [0.2, 0.25, 0.2], "temperature": 1.5}


def make_model_dir(path: Path, seed: int = 0, **extra_config) -> Path:
    """Save a seeded random ``vit_test`` model directory at ``path``. Its head is scaled up
    so the logits are far from ties (top-1 is then meaningful for agreement checks)."""
    torch.manual_seed(seed)
    model = create_model("vit_test")
    with torch.no_grad():
        model.head.weight.mul_(40.0)
    save_model_dir(model, path, CLASSES, PREPROCESSING, {"test": True})
    return path


def cell_image(rng: np.random.Generator, width: int = 48, height: int = 40) -> Image.Image:
    """A pale background with a coloured disc and noise."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = height / 2 + rng.normal(0, 2), width / 2 + rng.normal(0, 2)
    r = min(width, height) * rng.uniform(0.2, 0.4)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    img = np.empty((height, width, 3))
    img[:] = rng.uniform(200, 240, 3)
    img[disc] = rng.uniform(40, 200, 3)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def random_cells(seed: int, n: int = 10) -> list[Image.Image]:
    """``n`` :func:`cell_image` s of random sizes (30-79 px a side)."""
    rng = np.random.default_rng(seed)
    return [cell_image(rng, int(rng.integers(30, 80)), int(rng.integers(30, 80))) for _ in range(n)]


def write_images(folder: Path, n: int, seed: int = 0, suffixes=(".png", ".jpg")) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"cell_{i:03d}{suffixes[i % len(suffixes)]}"
        cell_image(rng, int(rng.integers(36, 70)), int(rng.integers(36, 70))).save(p)
        paths.append(p)
    return paths
