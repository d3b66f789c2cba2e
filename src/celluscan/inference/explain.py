"""Where the model looked: attention rollout (Abnar & Zuidema 2020) and heatmap overlays.

Rollout treats each layer's head-averaged attention, plus the identity for the residual
connection and renormalised so rows sum to 1, as a mixing matrix between tokens, and
multiplies them through the layers: ``R = Â_L · … · Â_1`` with ``Â = norm(mean_h(A) + I)``.
The [CLS] row of ``R`` over the patch tokens says how much each patch fed the decision.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


__all__ = ["attention_rollout", "rollout_grid", "rollout_heatmap", "overlay_heatmap"]


def attention_rollout(attentions: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Per-layer attention maps (B, heads, T, T) -> [CLS]-to-patch relevance (B, T - prefix).

    Values are non-negative; each row sums to at most 1 (the rest stays on prefix tokens).
    """
    if not attentions:
        raise ValueError("attention rollout needs at least one layer's attention maps")
    first = attentions[0]
    if first.ndim != 4 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"attention maps must be (B, heads, T, T), got {tuple(first.shape)}")
    B, _, T, _ = first.shape
    eye = torch.eye(T, dtype=torch.float64)
    joint = eye.expand(B, T, T)
    for layer in attentions:
        a = layer.detach().to(torch.float64).mean(dim=1) + eye  # heads averaged, + residual
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    return joint[:, 0, num_prefix_tokens:].to(torch.float32)


def rollout_grid(relevance: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, N) patch relevance -> (B, gh, gw); ``grid`` defaults to a square sqrt(N)."""
    n = relevance.shape[-1]
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(gh, gw)")
        grid = (side, side)
    return relevance.reshape(relevance.shape[0], *grid)


def _normalise01(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if not math.isfinite(lo) or not math.isfinite(hi) or hi - lo < 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def rollout_heatmap(model: torch.nn.Module, x: torch.Tensor, image_size: tuple[int, int],
                    view: tuple[int, int, int] | None = None) -> np.ndarray:
    """Attention-rollout heatmap (H, W) in [0, 1] over the original image.

    ``x`` is the model input for one image (1, 3, S, S), preprocessed exactly as for prediction.
    ``view`` = ``(left, top, side)`` is the square region of the (W, H) = ``image_size`` original
    that the input shows (``data.transforms.preprocess_view``; default: the padded / cropped
    square of plain preprocessing). The patch grid is upsampled to that square and laid over the
    original; parts of the image the model did not see get 0.
    """
    from celluscan.data.transforms import square_view

    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one preprocessed image (1, 3, S, S), got {tuple(x.shape)}")
    param = next(model.parameters())
    with torch.inference_mode():
        maps = model.attention_maps(x.to(device=param.device, dtype=param.dtype))
    grid = rollout_grid(attention_rollout(maps))  # (1, gh, gw)
    w, h = image_size
    left, top, side = view if view is not None else square_view(w, h)
    square = F.interpolate(grid.unsqueeze(1).float(), size=(side, side), mode="bilinear",
                           align_corners=False)[0, 0].cpu().numpy()
    out = np.zeros((h, w), dtype=np.float32)
    x0, y0, x1, y1 = max(0, left), max(0, top), min(w, left + side), min(h, top + side)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = square[y0 - top:y1 - top, x0 - left:x1 - left]
    return _normalise01(out)


def overlay_heatmap(img: Image.Image, heatmap: np.ndarray, alpha: float = 0.45,
                    colormap: str = "inferno") -> Image.Image:
    """Blend a colour-mapped heatmap ([0, 1], any size: resized to the image) over ``img``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    from matplotlib import colormaps

    rgb = img.convert("RGB")
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {heat.shape}")
    if heat.shape != (rgb.height, rgb.width):
        heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize(rgb.size, Image.Resampling.BILINEAR)
        heat = np.asarray(heat_img, dtype=np.float32) / 255.0
    coloured = (colormaps[colormap](heat)[..., :3] * 255).astype(np.uint8)
    return Image.blend(rgb, Image.fromarray(coloured), alpha)
