"""Test-time augmentation: classify a cell in several orientations and average the logits.

A blood cell on a slide has no "up": a rotated or mirrored cell is the same cell. A model
trained from scratch on a few thousand images is not perfectly invariant to that, so averaging
its logits over the symmetric views of each image removes part of its orientation noise.

Modes (:data:`TTA_MODES`):

* ``none``  the image as it is (the default);
* ``flip``  the image and its mirror image: 2 model passes per image;
* ``d8``    the 8 symmetries of the square (4 rotations x mirror): 8 passes per image.

Measured on the shipped model (own leak-free test split, 1,526 images; MODEL_CARD.md):
test accuracy 0.817 -> 0.830 (flip) -> 0.834 (d8), ECE with the shipped temperature
0.019 -> 0.024 -> 0.026 (`celluscan evaluate --tta`); no gain on other labs' images (external-dev balanced recall 0.231 ->
0.209 / 0.193), so TTA is an accuracy option for images like the training data, not a
robustness fix.

The [CLS] features returned with the averaged logits are those of the image as it is, so
the unfamiliar-image score (fitted on single views) keeps its calibrated threshold.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["TTA_MODES", "TestTimeAugmentation", "views", "with_tta"]

View = Callable[[torch.Tensor], torch.Tensor]


def _rotate(k: int, mirror: bool) -> View:
    def view(x: torch.Tensor) -> torch.Tensor:
        out = torch.rot90(x, k, dims=(-2, -1)) if k else x
        return out.flip(-1) if mirror else out
    view.__name__ = f"rot{90 * k}{'_mirror' if mirror else ''}"
    return view


TTA_MODES: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True)),
    "d8": tuple((k, m) for m in (False, True) for k in range(4)),
}
"""(quarter turns, mirrored) per view; the first view is always the image as it is."""


def views(mode: str) -> list[View]:
    """The view functions of a TTA mode (on (B, C, H, W) batches)."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r}; choose from {', '.join(TTA_MODES)}")
    return [_rotate(k, m) for k, m in TTA_MODES[mode]]


class TestTimeAugmentation:
    """Wraps a runner (``x -> (logits, features)``): the mean logits over the views, and
    the features of the first view (the image as it is). Views run one after another, so
    memory stays that of one batch."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, runner, mode: str):
        self.runner = runner
        self.mode = mode
        self.views = views(mode)

    @property
    def path(self):
        return self.runner.path

    @property
    def note(self) -> str:
        return getattr(self.runner, "note", "")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, features = self.runner(x)
        total = logits.float().clone()
        for view in self.views[1:]:
            total += self.runner(view(x))[0].float()
        return total / len(self.views), features


def with_tta(runner, mode: str):
    """``runner`` itself for ``none``, else wrapped in :class:`TestTimeAugmentation`."""
    views(mode)  # validates the name
    return runner if mode == "none" else TestTimeAugmentation(runner, mode)
