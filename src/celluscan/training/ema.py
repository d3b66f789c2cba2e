"""Exponential moving average of model weights (Polyak averaging), kept in fp32.

``ema = d * ema + (1 - d) * weights`` after every optimiser step, with the decay warmed up as
``min(decay, (1 + step) / (10 + step))`` so early, random weights are forgotten quickly. The
warm-up depends only on the global step, so a resumed run updates exactly like an
uninterrupted one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """A frozen copy of ``model`` whose parameters and float buffers track an EMA."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s current weights in (call after optimiser step ``step``, 0-based)."""
        d = self.decay_at(step)
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.dtype), 1.0 - d)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
