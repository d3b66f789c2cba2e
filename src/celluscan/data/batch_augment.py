"""Batched, device-side augmentation for the fast training path.

The training loop indexes a uint8 image cache (see :mod:`celluscan.data.tensor_cache`), moves
the batch to the training device, and calls :class:`BatchAugment`: every operation here works on
a whole batch at once with per-image random parameters, so a GPU (or both CPU cores) does the
work in a few large kernels instead of thousands of small PIL calls.

What it does, in order (each step switchable in :class:`AugmentConfig`):

1. TrivialAugmentWide on the rows flagged as balancing copies (minority-class extra draws;
   see :func:`celluscan.data.balance.balanced_indices`): one random op and magnitude per small
   chunk of flagged rows.
2. One affine warp per image, resampled straight to the output size: random rotation (cells have
   no up), flips, a small translation, a mild aspect change, and a zoom drawn log-uniformly from
   ``zoom_range``. Zoom > 1 crops into the centre (the white cell is centred in PBC / Munich
   frames), so tight crops from other labs, where the cell fills the frame, are inside the
   training distribution; zoom < 1 shrinks the frame into a background-coloured canvas.
   Framing then stops being a class cue (issue 10: other labs crop 2-3x tighter than PBC).
   Before the warp, optionally a *window*: everything outside a centred square (a fraction of
   the nucleus-framed canvas, so it holds the cell) is replaced by the image's background
   colour, which is what canonical nucleus framing makes of another lab's tight crop (the crop
   pasted on a flat canvas, no red cells around it); the warp then rotates and zooms it too.
3. Stain and colour: jitter in HED optical-density space (Ruifrok & Johnston stain vectors),
   brightness / contrast / saturation / gamma, a background tint (bright pixels pulled toward a
   random pale colour, like Tecom's yellow background), per-channel gains (colour casts), a hue
   rotation (the chroma plane turned about the grey axis, luma kept: a stain whose cytoplasm
   comes out orange instead of pink), random greyscale.
4. Optics: Gaussian blur and down-then-up sampling (lower-resolution cameras).
5. Optionally the canonical colour step (``colour="reinhard"``, data.canonical.reinhard) on
   the augmented batch: the model then sees what inference gives it, another lab's image after
   normalisation, residues included, rather than normalised images jittered afterwards.
6. Normalisation with the dataset mean / std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AugmentConfig", "BatchAugment", "EvalPreprocess", "border_colour", "background_fill",
           "colour_batch", "hue_rotation"]

BATCH_COLOURS = ("none", "reinhard")
"""Canonical colour steps (data.canonical) that also run on batches: see :func:`colour_batch`."""


@dataclass
class AugmentConfig:
    """Switches and ranges for :class:`BatchAugment`. Probabilities are per image."""

    enabled: bool = True
    # -- geometry --
    rotate: bool = True  # any angle: a blood cell has no natural orientation
    hflip: float = 0.5
    vflip: float = 0.5
    zoom_range: tuple[float, float] = (0.85, 1.25)  # log-uniform; >1 zooms into the centre
    wide_zoom_prob: float = 0.0  # with this probability use wide_zoom_range instead
    wide_zoom_range: tuple[float, float] = (1.0, 3.0)
    translate: float = 0.06  # max shift as a fraction of the frame
    aspect: float = 0.1  # max relative aspect-ratio change
    window_prob: float = 0.0  # keep only a centred square window, the rest background colour
    window_range: tuple[float, float] = (0.45, 0.85)  # window side, fraction of the (unwarped) frame
    # -- TrivialAugmentWide for balancing copies --
    trivial_augment: bool = True
    trivial_chunk: int = 8
    # -- stain / colour --
    hed_sigma: float = 0.0  # multiplicative jitter of H, E, D concentrations (e.g. 0.05)
    hed_bias: float = 0.0  # additive jitter (e.g. 0.05)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    channel_gain: float = 0.0  # per-channel gain in [1-g, 1+g]: colour casts (white balance)
    hue: float = 0.0  # max hue rotation in degrees (chroma plane of YIQ; luma kept): other stains
    gamma: float = 0.0  # log-uniform gamma in [exp(-g), exp(g)]
    background_tint_prob: float = 0.0
    background_tint: float = 0.15  # max strength of the tint on bright pixels
    greyscale: float = 0.0
    # -- optics --
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    downsample_prob: float = 0.0
    downsample_range: tuple[float, float] = (0.35, 0.8)  # fraction of the output size

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown augmentation field(s): {', '.join(sorted(unknown))}")
        for k, v in list(d.items()):
            if isinstance(v, list):
                d[k] = tuple(v)
        return cls(**d)

    @classmethod
    def robust(cls) -> "AugmentConfig":
        """The recipe for generalising across labs (issue 10): wide zoom, stain and optics."""
        return cls(
            zoom_range=(0.8, 1.3),
            wide_zoom_prob=0.5,
            wide_zoom_range=(1.0, 3.0),
            hed_sigma=0.05,
            hed_bias=0.03,
            brightness=0.2,
            contrast=0.2,
            saturation=0.25,
            gamma=0.25,
            background_tint_prob=0.3,
            greyscale=0.05,
            blur_prob=0.25,
            downsample_prob=0.3,
        )


# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
# NTSC YIQ (rows: Y, I, Q) from the RGB values as stored (no linearisation): Y is luma, (I, Q)
# the chroma plane.
_YIQ_FROM_RGB = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float32
)
_RGB_FROM_YIQ = torch.linalg.inv(_YIQ_FROM_RGB)


def hue_rotation(degrees: torch.Tensor) -> torch.Tensor:
    """(B,) angles -> (B,3,3) matrices ``m`` with ``rgb_row @ m`` = the colour with its chroma
    (YIQ's I, Q) turned by that angle and its luma (Y) unchanged; grey stays grey."""
    t = torch.deg2rad(degrees.float())
    c, s = torch.cos(t), torch.sin(t)
    rot = torch.zeros(t.shape[0], 3, 3, device=t.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    # column form: rgb' = inv(Y) @ R @ Y @ rgb; for rows transpose the product.
    return (_RGB_FROM_YIQ.to(t.device) @ rot @ _YIQ_FROM_RGB.to(t.device)).transpose(1, 2)


def border_colour(x: torch.Tensor) -> torch.Tensor:
    """Median colour of each image's 2-pixel border: (B,3,H,W) float -> (B,3,1,1)."""
    top, bottom = x[:, :, :2, :], x[:, :, -2:, :]
    left, right = x[:, :, :, :2], x[:, :, :, -2:]
    border = torch.cat(
        [t.flatten(2) for t in (top, bottom, left, right)], dim=2
    )  # (B,3,P)
    return border.median(dim=2).values[:, :, None, None]


def background_fill(x: torch.Tensor, work_size: int = 40) -> torch.Tensor:
    """Each image's background colour, the per-channel median of its brightest quarter of
    pixels (as data.canonical.background_colour), estimated on a ``work_size`` px average-pooled
    copy: (B,3,H,W) float -> (B,3,1,1)."""
    b = x.shape[0]
    if x.shape[-1] > work_size:
        x = F.adaptive_avg_pool2d(x, work_size)
    pix = x.flatten(2)  # (B,3,P)
    lum = (pix * torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1)).sum(1)
    cut = lum.quantile(0.75, dim=1, keepdim=True)  # (B,1)
    bright = torch.where((lum >= cut)[:, None, :], pix, torch.nan)
    return bright.nanmedian(dim=2).values.view(b, 3, 1, 1)


def _check_batch_colour(mode: str) -> None:
    if mode not in BATCH_COLOURS:
        raise ValueError(f"colour step {mode!r} has no batched form; use one of {BATCH_COLOURS}")


def colour_batch(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The canonical colour step ``mode`` on a float (B,3,H,W) batch in 0-1, image by image,
    with the same arithmetic as inference's (data.canonical)."""
    _check_batch_colour(mode)
    if mode == "none":
        return x
    from celluscan.data.canonical import reinhard

    return reinhard(x.permute(0, 2, 3, 1), batch_dims=1).permute(0, 3, 1, 2).contiguous()


def _uniform(n: int, lo: float, hi: float, device, generator=None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (hi - lo) + lo


class BatchAugment(nn.Module):
    """uint8 (B,3,H,W) batch [+ bool mask of TrivialAugmentWide rows] -> normalised float (B,3,S,S)."""

    def __init__(self, cfg: AugmentConfig, out_size: int, mean, std, colour: str = "none"):
        super().__init__()
        _check_batch_colour(colour)
        self.cfg = cfg
        self.out_size = int(out_size)
        self.colour = colour
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("rgb_from_hed", _RGB_FROM_HED.clone())
        self.register_buffer("hed_from_rgb", _HED_FROM_RGB.clone())
        self._trivial = None

    # ---- 1. TrivialAugmentWide on flagged rows ----
    def _trivial_augment(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._trivial is None:
            from torchvision.transforms import v2

            self._trivial = v2.TrivialAugmentWide()
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            return x
        x = x.clone()
        for start in range(0, rows.numel(), self.cfg.trivial_chunk):
            idx = rows[start : start + self.cfg.trivial_chunk]
            x[idx] = self._trivial(x[idx])
        return x

    # ---- 2. geometry ----
    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        cfg, b, dev = self.cfg, x.shape[0], x.device
        lo, hi = cfg.zoom_range
        log_zoom = _uniform(b, math.log(lo), math.log(hi), dev)
        if cfg.wide_zoom_prob > 0:
            wlo, whi = cfg.wide_zoom_range
            wide = torch.rand(b, device=dev) < cfg.wide_zoom_prob
            log_zoom = torch.where(wide, _uniform(b, math.log(wlo), math.log(whi), dev), log_zoom)
        zoom = log_zoom.exp()
        angle = _uniform(b, -math.pi, math.pi, dev) if cfg.rotate else torch.zeros(b, device=dev)
        aspect = _uniform(b, -cfg.aspect, cfg.aspect, dev).exp() if cfg.aspect > 0 else torch.ones(b, device=dev)
        sx = torch.where(torch.rand(b, device=dev) < cfg.hflip, -1.0, 1.0) / (zoom * aspect.sqrt())
        sy = torch.where(torch.rand(b, device=dev) < cfg.vflip, -1.0, 1.0) / (zoom / aspect.sqrt())
        cos, sin = angle.cos(), angle.sin()
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = cos * sx
        theta[:, 0, 1] = -sin * sy
        theta[:, 1, 0] = sin * sx
        theta[:, 1, 1] = cos * sy
        # Translation in normalised coordinates (frame spans [-1, 1]).
        theta[:, 0, 2] = _uniform(b, -2 * cfg.translate, 2 * cfg.translate, dev)
        theta[:, 1, 2] = _uniform(b, -2 * cfg.translate, 2 * cfg.translate, dev)
        grid = F.affine_grid(theta, (b, 3, self.out_size, self.out_size), align_corners=False)
        fill = border_colour(x)
        # Antialias big reductions: pre-shrink so one output pixel covers <= ~1.5 input pixels.
        min_zoom = float(zoom.min())
        target = int(math.ceil(self.out_size / max(min_zoom, 1e-3) * 1.5))
        if x.shape[-1] > target:
            x = F.interpolate(x, size=(target, target), mode="bilinear", antialias=True, align_corners=False)
        warped = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped + fill

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        cfg, b, dev = self.cfg, x.shape[0], x.device
        on = torch.rand(b, device=dev) < cfg.window_prob
        if not bool(on.any()):
            return x
        size = x.shape[-1]
        half = _uniform(b, *cfg.window_range, dev) / 2  # half side, fraction of the frame
        centre = 0.5 + _uniform(2 * b, -0.05, 0.05, dev).view(2, b)  # (x, y)
        pos = (torch.arange(size, device=dev, dtype=x.dtype) + 0.5) / size
        inside_x = (pos[None, :] - centre[0][:, None]).abs() <= half[:, None]  # (B, W)
        inside_y = (pos[None, :] - centre[1][:, None]).abs() <= half[:, None]  # (B, H)
        keep = inside_y[on][:, :, None] & inside_x[on][:, None, :]  # (n_on, H, W)
        x = x.clone()
        x[on] = torch.where(keep[:, None], x[on], background_fill(x[on]))
        return x

    # ---- 3. stain and colour ----
    def _stain_colour(self, x: torch.Tensor) -> torch.Tensor:
        """Stain jitter and colour jitter, each folded into one 3x3 matrix (+ bias) per image."""
        cfg, b, dev = self.cfg, x.shape[0], x.device
        h, w = x.shape[-2:]
        pix = x.permute(0, 2, 3, 1).reshape(b, h * w, 3)  # (B, HW, 3): one bmm per step
        eye = torch.eye(3, device=dev).expand(b, 3, 3)
        if cfg.hed_sigma > 0 or cfg.hed_bias > 0:
            # OD = -log(rgb); HED = OD @ hed_from_rgb; HED' = HED * alpha + beta; OD' = HED' @ rgb_from_hed
            alpha = _uniform(b * 3, 1 - cfg.hed_sigma, 1 + cfg.hed_sigma, dev).view(b, 3)
            beta = _uniform(b * 3, -cfg.hed_bias, cfg.hed_bias, dev).view(b, 1, 3)
            mat = self.hed_from_rgb @ torch.diag_embed(alpha) @ self.rgb_from_hed  # (B,3,3)
            bias = beta @ self.rgb_from_hed  # (B,1,3)
            od = -torch.log(pix.clamp(min=1e-4))
            pix = torch.exp(-torch.baddbmm(bias, od, mat)).clamp(0, 1)
        # brightness, contrast and saturation are linear in rgb: compose them into one matrix.
        mat, bias = eye.clone(), torch.zeros(b, 1, 3, device=dev)
        if cfg.brightness > 0:
            mat = mat * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, dev).view(b, 1, 1)
        if cfg.channel_gain > 0:
            gains = _uniform(b * 3, 1 - cfg.channel_gain, 1 + cfg.channel_gain, dev).view(b, 3)
            mat = mat @ torch.diag_embed(gains)
        if cfg.hue > 0:
            mat = mat @ hue_rotation(_uniform(b, -cfg.hue, cfg.hue, dev))
        if cfg.contrast > 0:
            c = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, dev).view(b, 1, 1)
            mean = (pix.mean(dim=1, keepdim=True) @ mat).mean(dim=2, keepdim=True)  # (B,1,1)
            mat, bias = mat * c, bias * c + mean * (1 - c)
        if cfg.saturation > 0:
            s = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, dev).view(b, 1, 1)
            luma = torch.tensor([0.299, 0.587, 0.114], device=dev)
            to_grey = luma.view(3, 1).expand(3, 3)  # column j of rgb @ to_grey = luma . rgb
            sat = eye * s + to_grey * (1 - s)
            mat, bias = mat @ sat, bias @ sat
        pix = torch.baddbmm(bias, pix, mat).clamp(0, 1)
        if cfg.gamma > 0:
            g = _uniform(b, -cfg.gamma, cfg.gamma, dev).exp().view(b, 1, 1)
            pix = torch.exp(torch.log(pix.clamp(min=1e-4)) * g)
        if cfg.background_tint_prob > 0:
            on = (torch.rand(b, device=dev) < cfg.background_tint_prob).float().view(b, 1, 1)
            tint = 1 - torch.rand(b, 1, 3, device=dev) * cfg.background_tint
            bright = pix.mean(dim=2, keepdim=True)
            weight = ((bright - 0.6) / 0.4).clamp(0, 1) * on  # only bright (background) pixels
            pix = pix * (1 + weight * (tint - 1))
        if cfg.greyscale > 0:
            on = (torch.rand(b, device=dev) < cfg.greyscale).view(b, 1, 1)
            grey = (pix @ torch.tensor([0.299, 0.587, 0.114], device=dev).view(3, 1)).expand_as(pix)
            pix = torch.where(on, grey, pix)
        return pix.clamp(0, 1).view(b, h, w, 3).permute(0, 3, 1, 2).contiguous()

    # ---- 4. optics ----
    def _optics(self, x: torch.Tensor) -> torch.Tensor:
        cfg, b, dev = self.cfg, x.shape[0], x.device
        if cfg.blur_prob > 0:
            on = torch.rand(b, device=dev) < cfg.blur_prob
            if bool(on.any()):
                sigma = _uniform(b, *cfg.blur_sigma, dev)
                radius = int(math.ceil(3 * cfg.blur_sigma[1]))
                t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
                k = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
                k = k / k.sum(dim=1, keepdim=True)  # (B, K) one kernel per image
                h, w = x.shape[-2:]
                # Separable blur with per-image kernels as a grouped conv over (1, B*3, H, W).
                kk = k.repeat_interleave(3, dim=0)  # (B*3, K)
                y = x.reshape(1, b * 3, h, w)
                y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
                y = F.conv2d(y, kk.view(b * 3, 1, 1, -1), groups=b * 3)
                y = F.conv2d(y, kk.view(b * 3, 1, -1, 1), groups=b * 3)
                x = torch.where(on.view(b, 1, 1, 1), y.view(b, 3, h, w), x)
        if cfg.downsample_prob > 0:
            on = torch.rand(b, device=dev) < cfg.downsample_prob
            if bool(on.any()):
                frac = float(_uniform(1, *cfg.downsample_range, dev))
                small = max(8, int(round(self.out_size * frac)))
                y = F.interpolate(x[on], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
                x = x.clone()
                x[on] = y
        return x

    def forward(self, images: torch.Tensor, trivial_mask: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects uint8 images, got {images.dtype}")
        cfg = self.cfg
        if not cfg.enabled:
            return EvalPreprocess.resize_normalise(images, self.out_size, self.mean, self.std, self.colour)
        if cfg.trivial_augment and trivial_mask is not None and bool(trivial_mask.any()):
            images = self._trivial_augment(images, trivial_mask.to(images.device))
        x = images.float() / 255.0
        if cfg.window_prob > 0:  # before the warp: the window is sized on the canonical frame
            x = self._window(x)
        x = self._affine(x)
        x = self._stain_colour(x)
        x = self._optics(x)
        x = colour_batch(x, self.colour)
        return (x - self.mean) / self.std


class EvalPreprocess(nn.Module):
    """Deterministic: uint8 (B,3,H,W) -> resized (antialiased), optionally colour-canonicalised
    (``colour``, for a training cache stored without its colour step) and normalised float
    (B,3,S,S)."""

    def __init__(self, out_size: int, mean, std, colour: str = "none"):
        super().__init__()
        _check_batch_colour(colour)
        self.out_size = int(out_size)
        self.colour = colour
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @staticmethod
    def resize_normalise(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor,
                         colour: str = "none") -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        return (colour_batch(x, colour) - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.resize_normalise(images, self.out_size, self.mean, self.std, self.colour)
