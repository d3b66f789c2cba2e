"""Learning rate as a pure function of the global step (nothing to save but the step).

``constant`` is the original recipe. ``cosine`` is linear warm-up then a half-cosine decay to
``min_lr_ratio * lr``. Warm-up applies to both.

>>> s = LRSchedule(base_lr=1.0, total_steps=10, warmup_steps=2, kind="cosine")
>>> [round(s(i), 3) for i in (0, 1, 2, 9)]
[0.5, 1.0, 1.0, 0.038]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LRSchedule"]


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "constant"
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.base_lr * self.min_lr_ratio
        return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
