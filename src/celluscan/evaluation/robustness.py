"""How well does a model travel? Other labs' images, synthetic shifts, and the unfamiliar flag.

Three measurements (issue 10), all of a trained model directory:

* **external labs**: a coarse-labelled set of images from other scanners and stains (e.g.
  ``../shared/data/external-dev``: BCCD and Tecom, labels neutrophil / eosinophil / lymphocyte /
  monocyte). Reported per source and overall: balanced (per-class mean) coarse recall, the
  false-alarm rate (share of these mature cells called a blast or granulocytic precursor), the
  share predicted as each class (one class swallowing everything is the signature of a
  shortcut), and the share flagged as unfamiliar.
* **synthetic shifts** of our own test split: stain (HED), brightness, contrast, gamma, blur,
  JPEG quality, down-/up-sampling, a tinted background, a tight crop: accuracy under each.
* **unfamiliar detector**: AUROC of the unfamiliar score separating the external images from our
  own test images, and the share of each flagged at the model's threshold.

Nothing here fits anything: external images are only ever predicted, never learned from.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from celluscan.data.imageio import ImageLoadError, load_image
from celluscan.evaluation.ood import auroc
from celluscan.taxonomy import TAXONOMY, LabelMapper

__all__ = [
    "SHIFTS",
    "ExternalImage",
    "scan_coarse_folder",
    "external_report",
    "shift_report",
    "unfamiliar_report",
]


# ---------------------------------------------------------------------------------------------
# Synthetic shifts: deterministic image -> image functions
# ---------------------------------------------------------------------------------------------

_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def _hed_shift(img: Image.Image, scale=(1.25, 0.8, 1.0), bias=(0.03, -0.02, 0.0)) -> Image.Image:
    rgb = np.asarray(img, dtype=np.float64) / 255.0
    od = -np.log(np.clip(rgb, 1e-4, 1.0))
    hed = od @ _HED_FROM_RGB
    hed = hed * np.array(scale) + np.array(bias)
    out = np.exp(-(hed @ _RGB_FROM_HED))
    return Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))


def _point(img: Image.Image, fn: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    x = np.asarray(img, dtype=np.float64) / 255.0
    return Image.fromarray((np.clip(fn(x), 0, 1) * 255 + 0.5).astype(np.uint8))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _resample(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    small = img.resize((max(8, int(w * factor)), max(8, int(h * factor))), Image.BICUBIC)
    return small.resize((w, h), Image.BICUBIC)


def _background_tint(img: Image.Image, tint=(1.0, 0.93, 0.72)) -> Image.Image:
    def fn(x):
        weight = np.clip((x.mean(axis=2, keepdims=True) - 0.6) / 0.4, 0, 1)
        return x * (1 - weight) + x * np.array(tint) * weight

    return _point(img, fn)


def _centre_crop(img: Image.Image, keep: float) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * keep), int(h * keep)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda im: im,
    "stain_hed": _hed_shift,
    "stain_hed_pale": lambda im: _hed_shift(im, scale=(0.75, 1.2, 1.0), bias=(-0.02, 0.02, 0.0)),
    "brightness_+30%": lambda im: _point(im, lambda x: x * 1.3),
    "contrast_-30%": lambda im: _point(im, lambda x: (x - x.mean()) * 0.7 + x.mean()),
    "gamma_1.5": lambda im: _point(im, lambda x: x**1.5),
    "blur_r2": lambda im: im.filter(ImageFilter.GaussianBlur(radius=2)),
    "jpeg_q20": lambda im: _jpeg(im, 20),
    "downsample_x0.33": lambda im: _resample(im, 0.33),
    "background_yellow": _background_tint,
    "tight_crop_50%": lambda im: _centre_crop(im, 0.5),
}


# ---------------------------------------------------------------------------------------------
# External, coarse-labelled images
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalImage:
    path: Path
    coarse_label: str
    source: str


def scan_coarse_folder(root: str | Path) -> list[ExternalImage]:
    """Folder-per-label tree (e.g. external-dev); source = file-name prefix before '_'."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of coarse-labelled images")
    mapper = LabelMapper()
    known = set(TAXONOMY.coarse_labels) | set(TAXONOMY.ids)
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = folder.name if folder.name in known else mapper.map_name(folder.name)
        if label is None or label == "skip":
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}:
                source = f.name.split("_", 1)[0] if "_" in f.name else root.name
                out.append(ExternalImage(f, TAXONOMY.to_coarse(label), source))
    return out


def _balanced_recall(pairs: Sequence[tuple[str, str]]) -> tuple[float, dict[str, float]]:
    """pairs of (coarse truth, fine prediction) -> (mean per-class recall, per-class recall)."""
    hits, totals = Counter(), Counter()
    for truth, pred in pairs:
        totals[truth] += 1
        hits[truth] += TAXONOMY.coarse_match(truth, pred)
    per_class = {c: hits[c] / totals[c] for c in sorted(totals)}
    return (float(np.mean(list(per_class.values()))) if per_class else float("nan")), per_class


def external_report(predictions: Sequence[tuple[ExternalImage, object]]) -> dict:
    """``predictions``: (image, Prediction) pairs (Prediction has .label and .unfamiliar)."""
    alarm = set(TAXONOMY.alarm_classes)
    by_source: dict[str, list] = defaultdict(list)
    for img, pred in predictions:
        by_source[img.source].append((img, pred))
    by_source["all"] = list(predictions)
    report = {}
    for source, items in sorted(by_source.items()):
        pairs = [(img.coarse_label, pred.label) for img, pred in items]
        balanced, per_class = _balanced_recall(pairs)
        shares = Counter(pred.label for _, pred in items)
        flagged = [bool(getattr(pred, "unfamiliar", False)) for _, pred in items]
        n = len(items)
        report[source] = {
            "images": n,
            "balanced_coarse_recall": balanced,
            "coarse_recall_per_class": per_class,
            "strict_accuracy": float(np.mean([t == p for t, p in pairs])) if n else float("nan"),
            "false_alarm_rate": sum(p in alarm for _, p in pairs) / n if n else float("nan"),
            # the false alarms a user would see without the unfamiliar warning beside them
            "unflagged_false_alarm_rate": sum(p in alarm and not f for (_, p), f in zip(pairs, flagged)) / n
                                          if n else float("nan"),
            "predicted_share": {c: shares[c] / n for c in TAXONOMY.ids if shares[c]},
            "unfamiliar_rate": float(np.mean(flagged)) if n else float("nan"),
        }
    return report


def shift_report(predict: Callable[[list[Image.Image]], list], images: Sequence[Image.Image],
                 labels: Sequence[str], shifts: Iterable[str] = tuple(SHIFTS)) -> dict:
    """Accuracy (and group accuracy) of ``predict`` on ``images`` under each named shift."""
    out = {}
    for name in shifts:
        shifted = [SHIFTS[name](im) for im in images]
        preds = predict(shifted)
        acc = float(np.mean([p.label == y for p, y in zip(preds, labels)]))
        group_acc = float(np.mean([TAXONOMY.group_of(p.label) == TAXONOMY.group_of(y) for p, y in zip(preds, labels)]))
        out[name] = {"accuracy": acc, "group_accuracy": group_acc,
                     "unfamiliar_rate": float(np.mean([bool(getattr(p, "unfamiliar", False)) for p in preds]))}
    return out


def unfamiliar_report(in_preds: Sequence[object], out_preds: Sequence[object]) -> dict:
    """AUROC of unfamiliar_score (external = positive) and flag rates at the model's threshold."""
    a = [float(p.unfamiliar_score) for p in in_preds]
    b = [float(p.unfamiliar_score) for p in out_preds]
    return {
        "auroc": auroc(a, b),
        "flagged_in_distribution": float(np.mean([bool(p.unfamiliar) for p in in_preds])) if a else float("nan"),
        "flagged_external": float(np.mean([bool(p.unfamiliar) for p in out_preds])) if b else float("nan"),
        "in_distribution_images": len(a),
        "external_images": len(b),
    }


def load_images(paths: Sequence[Path]) -> tuple[list[Image.Image], list[int], list[str]]:
    """Decode ``paths``; returns (images, indices kept, error messages)."""
    imgs, kept, errors = [], [], []
    for i, p in enumerate(paths):
        try:
            imgs.append(load_image(p))
            kept.append(i)
        except ImageLoadError as e:
            errors.append(str(e))
    return imgs, kept, errors
