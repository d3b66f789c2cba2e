"""Knowledge distillation from trained models (teachers) into the model being trained.

Averaging the predictions of several of our models beat every single model on our test split
and on other labs at once (MODEL_CARD.md, session 9), but costs one forward pass per model at
inference. Distillation hands that knowledge to one model of the shipped size: each training
image's target becomes a blend of its (smoothed) label and the teachers' averaged,
temperature-scaled probabilities.

The teachers' probabilities are computed once, before training, on the clean cached training
images (each teacher at its own input size and normalisation), so a step costs what it did
before. Augmented views and balancing copies of an image share its clean image's teacher
answer, a common simplification of online distillation. Teachers must have the student's
class names and the canonical (framing and colour) step the training cache was built with:
they see the cached pixels as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["teacher_probabilities", "blend_targets"]


def _check_teacher(info, class_names: Sequence[str], canonical: Mapping[str, Any] | None) -> None:
    if tuple(info.class_names) != tuple(class_names):
        raise ValueError(f"{info.path}: teacher classes {list(info.class_names)} differ from the data's "
                         f"{list(class_names)}")
    from celluscan.data.canonical import CanonicalConfig

    theirs = info.preprocessing.get("canonical") or None
    if CanonicalConfig.coerce(theirs) != CanonicalConfig.coerce(canonical):
        raise ValueError(f"{info.path}: teacher was trained with canonical preprocessing {theirs!r}, the "
                         f"training cache is built with {canonical!r}; a teacher must see what it was trained on")


def teacher_probabilities(teacher_dirs: Sequence[str | Path], images: torch.Tensor, class_names: Sequence[str],
                          canonical: Mapping[str, Any] | None, batch_size: int = 256,
                          device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                          log: Callable[[str], None] = lambda _m: None) -> torch.Tensor:
    """(N, C) float32: the teachers' mean probability for each of ``images`` (uint8 (N, 3, S, S),
    the training cache), each teacher's logits divided by its calibration temperature."""
    from celluscan.data.batch_augment import EvalPreprocess
    from celluscan.models import load_model_dir
    from celluscan.training.data_source import run_on_cache

    if not teacher_dirs:
        raise ValueError("no teacher model directories given")
    total = torch.zeros(images.shape[0], len(class_names), dtype=torch.float32)
    for path in teacher_dirs:
        model, info = load_model_dir(path, map_location=device)
        _check_teacher(info, class_names, canonical)
        prep = info.preprocessing
        normalise = EvalPreprocess(int(prep["image_size"]), prep["mean"], prep["std"]).to(device)
        model.set_attention_path_for(amp_dtype or torch.float32, torch.device(device))
        temperature = float(prep.get("temperature", 1.0))
        logits = run_on_cache(model, normalise, images, batch_size, device, amp_dtype)
        total += torch.softmax(logits / temperature, dim=1)
        log(f"distillation: teacher {path} (temperature {temperature:.3f}) scored {images.shape[0]} training images")
    return total / len(teacher_dirs)


def blend_targets(label_targets: torch.Tensor, teacher: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * label_targets + weight * teacher`` (both (B, C) distributions)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
    return label_targets * (1.0 - weight) + teacher.to(label_targets.dtype) * weight
