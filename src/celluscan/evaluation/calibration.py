"""Temperature scaling (Guo et al. 2017): one scalar T so that softmax(logits / T) is calibrated.

T is fitted on held-out logits (the validation split, never the test split) by minimising the
negative log-likelihood with L-BFGS over log T (so T stays positive). It changes confidences,
never the predicted class, so accuracy and F1 are unchanged while ECE usually drops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["fit_temperature", "apply_temperature"]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities ``softmax(logits / temperature)``."""
    return torch.softmax(logits.double() / float(temperature), dim=-1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising NLL of ``labels`` under ``softmax(logits / T)``."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need (N, C) logits and N labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, bounds[0]), bounds[1])
