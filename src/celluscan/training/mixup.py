"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a whole batch, on its device.

Each call draws one mixing coefficient for the batch from Beta(alpha, alpha) and pairs every
image with the batch reversed (``flip(0)``), as is common practice. Targets become soft label
distributions, so the loss is cross-entropy against probabilities (with label smoothing folded
in). All randomness comes from torch's global generator, which the training loop seeds per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["BatchMixer", "soft_targets", "soft_cross_entropy"]


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot (B, C) float targets with label smoothing ``smoothing`` spread uniformly."""
    off = smoothing / num_classes
    t = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    t.scatter_(1, labels[:, None], 1.0 - smoothing + off)
    return t


@dataclass
class BatchMixer:
    """Mixes a batch with mixup or cutmix; ``mixup_alpha``/``cutmix_alpha`` 0 disable each."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    label_smoothing: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def label_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The (B, C) targets of ``labels`` before mixing (label smoothing applied)."""
        return soft_targets(labels, self.num_classes, self.label_smoothing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,3,H,W) float images, (B,) labels -> mixed images and (B, C) soft targets.
        ``targets`` (B, C): distributions to mix instead of the labels' (distillation)."""
        if targets is None:
            targets = self.label_targets(labels)
        if not self.enabled or float(torch.rand(())) >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or float(torch.rand(())) < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            cut = (1.0 - lam) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images = images.clone()
            images[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
        else:
            images = images * lam + partner * (1.0 - lam)
        targets = targets * lam + targets.flip(0) * (1.0 - lam)
        return images, targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against probability ``targets``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


