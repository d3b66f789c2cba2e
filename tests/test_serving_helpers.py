"""Helpers shared by the serving tests (tiny model directories, images, zips), and their checks.

Imported by the other ``test_serving*`` / ``test_api*`` / ``test_browser*`` modules::

    from test_serving_helpers import make_model_dir, png_bytes, zip_bytes
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from corpus import pattern_image
from celluscan.models import create_model, save_model_dir
from celluscan.taxonomy import CLASS_TO_INDEX, CLASSES

PREPROCESSING = {"image_size": 32, "pad_fill": "edge", "mean": [0.5] * 3, "std": [0.25] * 3,
                 "temperature": 1.0}


def make_model_dir(path: Path, force_class: str | None = None, seed: int = 0) -> Path:
    """A tiny random ``vit_test`` model directory. With ``force_class`` the head is rewired so
    every image is classified as that class with probability ~0.99 (deterministic tests)."""
    torch.manual_seed(seed)
    model = create_model("vit_test")
    if force_class is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.bias[CLASS_TO_INDEX[force_class]] = 10.0
    return save_model_dir(model, path, class_names=list(CLASSES), preprocessing=PREPROCESSING,
                          metadata={"name": f"tiny-{force_class or 'random'}"})


def png_bytes(seed: int = 0, width: int = 40, height: int = 36, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    pattern_image(seed, width, height).save(buf, fmt)
    return buf.getvalue()


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ---- checks of the helpers themselves ---------------------------------------------------------


def test_forced_model_predicts_its_class(tmp_path):
    from PIL import Image

    from celluscan.inference.predictor import Predictor

    predictor = Predictor.from_model_dir(make_model_dir(tmp_path / "m", force_class="myeloblast"))
    preds = predictor.predict_images([Image.open(io.BytesIO(png_bytes(s))) for s in range(3)])
    assert [p.label for p in preds] == ["myeloblast"] * 3
    assert all(p.confidence > 0.95 and not p.uncertain for p in preds)


def test_zip_bytes_roundtrip():
    data = zip_bytes({"a/b.png": b"123", "c.txt": b"x"})
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["a/b.png", "c.txt"]
        assert zf.read("a/b.png") == b"123"
