"""Canonical views of a cell image: the same framing and colour whatever the lab.

Other labs crop tightly (the white cell fills the frame) and stain and light differently
(yellow or lavender backgrounds, brown or blue nuclei); our training sources each have their own
look, and a from-scratch model learns those looks as class cues (issue 10). Two steps, applied
identically at training (before the tensor cache) and at inference (inside ``preprocess``):

* **framing** ``"nucleus"``: find the white cell's nucleus (the stained region nearest the
  centre, see :func:`find_nucleus`) and crop a square canvas of ``framing_scale`` x the
  nucleus size around it, padded with the background colour where it runs off the image.
  A tight crop from another lab and a loose PBC crop then show the cell at the same scale.
  This normalises the cell's *apparent* size away; the red cells around it (7-8 um in every
  lab) still show the true scale wherever they are visible. When no nucleus is found (pale,
  blank or nucleus-free images, e.g. some platelet crops) the image is kept as it is, padded
  to a square: the documented fallback. The canvas is clamped to ``[min_canvas, max_canvas]``
  x the image side, so one mis-detection cannot zoom absurdly.
* **colour** ``"white_balance"``: divide each channel by the background colour (the median of
  the brightest quarter of pixels), so every lab's background becomes white (von Kries
  adaptation). ``"grey"``: white balance, then luminance stretched between the darkest
  percentile and white, copied to three channels: no stain hue left to learn at all.
  ``"reinhard"``: match the image's CIELAB mean and standard deviation, channel by channel, to
  a reference (:data:`REINHARD_REFERENCE`, our training split after nucleus framing; Reinhard
  et al. 2001, "Color transfer between images"): brightness, contrast, stain hue and saturation
  of every lab moved onto ours. Applied after the resize, so it costs little.
  ``"stain_anchor"``: two fixed points instead of whole-image statistics. Each channel's
  optical density against the image's own background (Beer-Lambert: -log(pixel / background))
  is scaled so that the nucleus (the pixels the nucleus threshold keeps) gets a reference
  density, and the background is then painted with a reference colour
  (:data:`STAIN_ANCHOR_REFERENCE`). Unlike Reinhard it does not depend on how much of the frame
  is background, red cells or cell, which a tight crop from another lab changes.

Everything here is numpy + Pillow (the colour arithmetic also runs on torch tensors, for the
batched training path), deterministic, and works at any input resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal, Mapping

import numpy as np
from PIL import Image

from celluscan.data.imageio import ensure_rgb

__all__ = [
    "CanonicalConfig",
    "background_colour",
    "white_balance",
    "to_grey",
    "find_nucleus",
    "Nucleus",
    "reframe",
    "reframe_box",
    "apply_colour",
    "rgb_to_lab",
    "lab_to_rgb",
    "reinhard",
    "reinhard_uint8",
    "lab_statistics",
    "REINHARD_REFERENCE",
    "stain_anchor",
    "STAIN_ANCHOR_REFERENCE",
    "REINHARD_CELL_REFERENCE",
    "BACKGROUND_REFERENCE",
    "cell_disc",
    "mask_outside_cell",
]

WORK_SIZE = 128
"""Side (px) of the downscaled copy the nucleus is searched on."""


COLOUR_MODES = ("none", "white_balance", "grey", "reinhard", "stain_anchor")

REINHARD_REFERENCE = ((76.75, 13.03, 1.14), (19.06, 12.53, 18.68))
"""CIELAB (mean, standard deviation) per channel (L*, a*, b*) that ``"reinhard"`` maps every
image to: the averages over 800 random training-split images of ``datasets/blood-cells``
after nucleus framing (scale 3) at 128 px, as the shipped model sees them
(``scripts/colour_reference.py`` reproduces it)."""

STAIN_ANCHOR_REFERENCE = ((0.9961, 0.898, 0.7922), (1.045, 1.846, 0.3738))
"""(background RGB in 0-1, nucleus optical density per channel) that ``"stain_anchor"`` maps
every image to: medians over random training images of ``datasets/blood-cells`` after nucleus
framing (scale 3) at 128 px (``scripts/colour_reference.py``)."""

REINHARD_CELL_REFERENCE = ((66.54, 20.0, -9.794), (23.69, 15.85, 24.17))
"""The same statistics measured inside the cell disc only (``colour_region: cell``;
``scripts/colour_reference.py --region cell``, 800 images, radius 0.36)."""

BACKGROUND_REFERENCE = STAIN_ANCHOR_REFERENCE[0]
"""Our training images' background colour (RGB 0-1): what ``mask_outside_cell`` paints."""

STAIN_ANCHOR_GAIN = (1 / 3, 3.0)
"""Range of the per-channel density gain, so a mis-found nucleus cannot blow an image up."""


@dataclass(frozen=True)
class CanonicalConfig:
    """How images are canonicalised before resizing (stored in a model's preprocessing)."""

    framing: Literal["none", "nucleus"] = "none"
    colour: Literal["none", "white_balance", "grey", "reinhard", "stain_anchor"] = "none"
    framing_scale: float = 4.0
    """Canvas side / nucleus size (sqrt of its area). Default: the median for our training
    images, so a typical PBC crop keeps roughly its own framing (docs/data.md)."""
    min_canvas: float = 0.5
    max_canvas: float = 3.0
    colour_region: Literal["image", "cell"] = "image"
    """Where ``"reinhard"`` measures an image's statistics: the whole frame, or only the cell
    disc (:attr:`cell_radius`), so background and red cells (how much of them a lab's crop
    shows, how yellow its background is) do not move the cell's colours."""
    mask_outside_cell: bool = False
    """Paint everything outside the cell disc with our training background colour
    (:data:`BACKGROUND_REFERENCE`), after the colour step: red cells, background and
    neighbouring cells cannot be learned as class cues."""
    cell_radius: float = 0.36
    """Radius of the cell disc, as a fraction of the (square) frame's side, centred on the
    frame. After nucleus framing at scale 3 the nucleus size is a third of the side, so 0.36
    is about 1.1 x the nucleus size: a neutrophil's or monocyte's cytoplasm fits, neighbours
    mostly do not."""

    def __post_init__(self) -> None:
        if self.framing not in ("none", "nucleus"):
            raise ValueError(f"canonical framing must be 'none' or 'nucleus', got {self.framing!r}")
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"canonical colour must be one of {', '.join(map(repr, COLOUR_MODES))}, "
                             f"got {self.colour!r}")
        if not (self.framing_scale > 0 and 0 < self.min_canvas <= self.max_canvas):
            raise ValueError("canonical framing_scale must be > 0 and 0 < min_canvas <= max_canvas")
        if self.colour_region not in ("image", "cell"):
            raise ValueError(f"canonical colour_region must be 'image' or 'cell', got {self.colour_region!r}")
        if self.colour_region == "cell" and self.colour != "reinhard":
            raise ValueError("canonical colour_region 'cell' needs colour 'reinhard'")
        if not 0.05 <= self.cell_radius <= 0.71:
            raise ValueError(f"canonical cell_radius must be in [0.05, 0.71], got {self.cell_radius}")

    @property
    def active(self) -> bool:
        return self.framing != "none" or self.colour != "none" or self.mask_outside_cell

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, value: "CanonicalConfig | Mapping[str, Any] | None") -> "CanonicalConfig":
        """``value`` itself if it is a config, else :meth:`from_dict` of it."""
        return value if isinstance(value, cls) else cls.from_dict(value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "CanonicalConfig":
        if not d:
            return cls()
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown canonical setting(s) {sorted(unknown)}")
        return cls(**dict(d))

    def key(self) -> str:
        """A short stable string for cache digests ('' when inactive)."""
        if not self.active:
            return ""
        key = (f"{self.framing}:{self.colour}:{self.framing_scale:g}:"
               f"{self.min_canvas:g}:{self.max_canvas:g}")
        if self.colour_region != "image" or self.mask_outside_cell:
            key += f":{self.colour_region}:{int(self.mask_outside_cell)}:{self.cell_radius:g}"
        return key


def _float_rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(ensure_rgb(img), dtype=np.float32) / 255.0


def background_colour(arr: np.ndarray) -> np.ndarray:
    """Per-channel median of the brightest quarter of pixels (H, W, 3 floats in 0-1)."""
    flat = arr.reshape(-1, 3)
    lum = flat @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    cut = np.quantile(lum, 0.75)
    bright = flat[lum >= cut]
    return np.median(bright, axis=0)


def white_balance(arr: np.ndarray, bg: np.ndarray | None = None) -> np.ndarray:
    """Divide each channel by the background colour (clamped so dark images are not blown up)."""
    bg = background_colour(arr) if bg is None else bg
    return np.clip(arr / np.maximum(bg, 0.25), 0.0, 1.0)


def to_grey(arr: np.ndarray) -> np.ndarray:
    """White-balanced luminance stretched from its 1st percentile to white, as (H, W, 3)."""
    lum = white_balance(arr) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lo = float(np.quantile(lum, 0.01))
    lum = np.clip((lum - lo) / max(1.0 - lo, 0.05), 0.0, 1.0)
    return np.repeat(lum[..., None], 3, axis=2)


_XYZ_FROM_RGB = np.array([[0.4124, 0.3576, 0.1805],
                          [0.2126, 0.7152, 0.0722],
                          [0.0193, 0.1192, 0.9505]], dtype=np.float64)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65 = np.array([0.95047, 1.0, 1.08883])
_LAB_EPS, _LAB_KAPPA = 216 / 24389, 24389 / 27

# One implementation of the CIELAB conversions and the Reinhard transfer serves numpy arrays
# (one image, at inference and when caching: plain numpy, no torch thread pool in the decode
# threads) and torch tensors (the batched training path, data.batch_augment), so the two cannot
# drift apart. Only operations numpy and torch spell alike are used; ``_xp`` picks the module.


def _xp(arr):
    """``(module, array)``: torch for a tensor (floating), else numpy, float32 kept as float32
    (what images arrive as: 1.2x faster, and at most 1/255 from float64 in 0.2% of output
    values), anything else as float64."""
    if type(arr).__module__.startswith("torch"):
        import torch

        return torch, (arr if arr.is_floating_point() else arr.float())
    arr = np.asarray(arr)
    return np, (arr if arr.dtype == np.float32 else arr.astype(np.float64))


def _const(values, like):
    """``values`` as an array of ``like``'s kind, dtype and device."""
    if isinstance(like, np.ndarray):
        return np.asarray(values, dtype=like.dtype)
    import torch

    return torch.as_tensor(np.asarray(values), dtype=like.dtype, device=like.device)


def srgb_to_linear(arr):
    """sRGB (0-1) -> linear light; numpy or torch."""
    xp, a = _xp(arr)
    return xp.where(a > 0.04045, ((a + 0.055) / 1.055) ** 2.4, a / 12.92)


def linear_to_srgb(arr):
    """Linear light -> sRGB, both clipped to 0-1 (inverse of :func:`srgb_to_linear`)."""
    xp, linear = _xp(arr)
    linear = xp.clip(linear, 0.0, 1.0)
    return xp.where(linear > 0.0031308, 1.055 * xp.clip(linear, 0.0031308, None) ** (1 / 2.4) - 0.055,
                    12.92 * linear)


def _channels(t, axis: int):
    """The three colour planes of ``t``, channels on ``axis`` (-1: (..., 3); 0: (3, ...))."""
    return (t[..., 0], t[..., 1], t[..., 2]) if axis == -1 else (t[0], t[1], t[2])


def _mix(matrix: np.ndarray, t, axis: int):
    """``matrix`` (3 x 3) applied to every colour vector of ``t`` (channels on ``axis``)."""
    if axis == -1:
        return t @ _const(matrix.T, t)
    return (_const(matrix, t) @ t.reshape(3, -1)).reshape(t.shape)


def _per_channel(values, t, axis: int):
    """``values`` (3,) shaped to broadcast along ``t``'s channel ``axis``."""
    v = _const(values, t)
    return v if axis == -1 else v.reshape(3, *([1] * (t.ndim - 1)))


def linear_to_lab(linear, axis: int = -1):
    """Linear-light RGB -> CIELAB (D65), channels on ``axis`` (-1 or 0, the planar layout the
    single-image numpy path uses: row-wise arithmetic is several times faster there)."""
    xp, a = _xp(linear)
    xyz = _mix(_XYZ_FROM_RGB, a, axis) / _per_channel(_D65, a, axis)
    cube_root = np.cbrt if xp is np else (lambda v: v ** (1 / 3))
    f = xp.where(xyz > _LAB_EPS, cube_root(xp.clip(xyz, _LAB_EPS, None)), (_LAB_KAPPA * xyz + 16) / 116)
    fx, fy, fz = _channels(f, axis)
    return xp.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis)


def lab_to_linear(lab, axis: int = -1):
    """CIELAB -> linear-light RGB, unclipped (inverse of :func:`linear_to_lab`)."""
    xp, t = _xp(lab)
    big_l, a, b = _channels(t, axis)
    fy = (big_l + 16) / 116
    f = xp.stack([fy + a / 500, fy, fy - b / 200], axis)
    xyz = xp.where(f ** 3 > _LAB_EPS, f ** 3, (116 * f - 16) / _LAB_KAPPA) * _per_channel(_D65, t, axis)
    return _mix(_RGB_FROM_XYZ, xyz, axis)


def rgb_to_lab(arr):
    """sRGB (..., 3) floats in 0-1 -> CIELAB (D65); numpy (float32 or float64) or torch (its dtype)."""
    return linear_to_lab(srgb_to_linear(arr))


def lab_to_rgb(lab):
    """CIELAB (..., 3) -> sRGB floats clipped to 0-1 (inverse of :func:`rgb_to_lab`)."""
    return linear_to_srgb(lab_to_linear(lab))


def lab_statistics(lab: np.ndarray, weights=None, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, standard deviation) of one CIELAB image (numpy, channels on ``axis``),
    over every pixel or weighted by ``weights`` ((H, W) in 0-1, e.g. :func:`cell_disc`)."""
    planar = lab.reshape(3, -1) if axis == 0 else lab.reshape(-1, 3).T
    n = planar.shape[1]
    w = (np.full(n, 1.0 / n, dtype=planar.dtype) if weights is None
         else np.asarray(weights, dtype=planar.dtype).reshape(-1) / max(float(np.sum(weights)), 1e-6))
    mean = planar @ w  # matrix-vector products: numpy's axis reductions are slow on (N, 3)
    centred = planar - mean[:, None]  # two passes: E[x^2] - mean^2 loses digits in float32
    return mean, np.sqrt((centred * centred) @ w)


def _reinhard_lab(lab, reference, batch_dims: int = 0, weights=None, axis: int = -1):
    """The Reinhard transfer in CIELAB: see :func:`reinhard` (``axis`` 0: one planar image)."""
    xp, lab = _xp(lab)
    if batch_dims == 0 and xp is np:
        mean, std = lab_statistics(lab, weights, axis)
        stats_shape = (3,) if axis == -1 else (3, *([1] * (lab.ndim - 1)))
    elif weights is not None or axis != -1:
        raise ValueError("reinhard weights and the planar layout are for one numpy image")
    else:
        stats_shape = (*lab.shape[:batch_dims], *([1] * (lab.ndim - batch_dims - 1)), 3)
        flat = lab.reshape(*lab.shape[:batch_dims], -1, 3)
        mean = flat.mean(-2)
        std = ((flat - mean[..., None, :]) ** 2).mean(-2) ** 0.5
    ref_mean, ref_std = (_const(v, lab) for v in reference)
    gain = xp.where(std > 1e-3, ref_std / xp.clip(std, 1e-3, None), xp.ones_like(std))
    return ((lab - mean.reshape(stats_shape)) * gain.reshape(stats_shape)
            + (ref_mean if axis == -1 else ref_mean.reshape(stats_shape)))


def reinhard(arr, reference=REINHARD_REFERENCE, batch_dims: int = 0, weights=None):
    """Match each image's per-channel CIELAB mean and standard deviation to ``reference``
    ((mean L, a, b), (std L, a, b)); RGB floats in 0-1 in and out, channels last, numpy or
    torch. The first ``batch_dims`` axes index separate images (e.g. 1 for (B, H, W, 3)). A flat
    channel (std ~0, a blank image) is only shifted, not stretched. ``weights`` (numpy, one
    image, (H, W) in 0-1): measure the statistics over these pixels only (:func:`cell_disc`);
    the transfer still applies to every pixel."""
    return lab_to_rgb(_reinhard_lab(rgb_to_lab(arr), reference, batch_dims, weights))


_ENCODE_STEPS = 65535
"""Linear-light levels of the table :func:`reinhard_uint8` encodes to sRGB bytes with: fine
enough that a byte differs from exact rounding only where the exact value sits within 0.03 of a
rounding boundary (at most one level)."""


@lru_cache(maxsize=1)
def _srgb_tables() -> tuple[np.ndarray, np.ndarray]:
    """(byte -> linear float32, linear level -> sRGB byte) lookup tables."""
    decode = srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
    levels = np.arange(_ENCODE_STEPS + 1, dtype=np.float64) / _ENCODE_STEPS
    encode = np.floor(linear_to_srgb(levels) * 255.0 + 0.5).astype(np.uint8)
    decode.flags.writeable = encode.flags.writeable = False
    return decode, encode


def reinhard_uint8(arr: np.ndarray, reference=REINHARD_REFERENCE, weights=None) -> np.ndarray:
    """:func:`reinhard` for one 8-bit RGB image (H, W, 3 uint8 in and out), the form images
    arrive in at inference: the sRGB curve both ways is a table lookup instead of a power per
    value (about 3x faster), and the result equals the float path rounded to bytes to within one
    level."""
    decode, encode = _srgb_tables()
    planar = decode[np.moveaxis(arr, -1, 0)]  # (3, H, W)
    lab = _reinhard_lab(linear_to_lab(planar, axis=0), reference, 0, weights, axis=0)
    linear = np.clip(lab_to_linear(lab, axis=0), 0.0, 1.0)
    return np.ascontiguousarray(np.moveaxis(encode[(linear * _ENCODE_STEPS + 0.5).astype(np.int32)], 0, -1))


def optical_density(arr: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per-channel optical density against the background colour: -log(pixel / background),
    0 for background, larger where more stain absorbs (clamped at 1e-3 transmission).
    ``arr`` (..., C) with ``bg`` (C,): one channel alone gives that channel's density, bit for
    bit (``optical_density(arr[..., :1], bg[:1])``), at a third of the cost."""
    return -np.log(np.clip(white_balance(arr, bg), 1e-3, 1.0))


def _nucleus_mask(red_od: np.ndarray) -> np.ndarray:
    """Pixels dense enough in the red channel to be nucleus: Otsu's split of ``red_od``, floored
    at :data:`MIN_NUCLEUS_OD` (shared by :func:`find_nucleus` and the stain anchors)."""
    return red_od >= max(_otsu(red_od.ravel()), MIN_NUCLEUS_OD)


def _densities(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(background, optical density image, nucleus density or None)``: see :func:`stain_anchors`."""
    bg = background_colour(arr)
    od = optical_density(arr, bg)
    mask = _nucleus_mask(od[..., 0])
    nucleus = np.median(od[mask], axis=0) if np.count_nonzero(mask) >= 8 else None
    return bg, od, nucleus


def stain_anchors(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(background colour, nucleus optical density per channel)`` of an RGB float image; the
    nucleus is the pixels whose red-channel density passes the nucleus threshold (Otsu, floored
    at :data:`MIN_NUCLEUS_OD`, as in :func:`find_nucleus`), None when fewer than 8 do."""
    bg, _, nucleus = _densities(arr)
    return bg, nucleus


def stain_anchor(arr: np.ndarray, reference=STAIN_ANCHOR_REFERENCE) -> np.ndarray:
    """Scale each channel's optical density so the nucleus gets the reference density, and
    repaint the background with the reference colour (RGB floats in 0-1, channels last). An
    image without a detectable nucleus keeps its densities (gain 1) and gets the reference
    background only."""
    ref_bg, ref_nucleus = (np.asarray(v, dtype=np.float32) for v in reference)
    _, od, nucleus = _densities(arr)
    gain = (np.ones(3, dtype=np.float32) if nucleus is None
            else np.clip(ref_nucleus / np.maximum(nucleus, 1e-3), *STAIN_ANCHOR_GAIN).astype(np.float32))
    return np.clip(ref_bg * np.exp(-od * gain), 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=16)
def cell_disc(h: int, w: int, radius: float) -> np.ndarray:
    """(h, w) float32 weights: 1 inside a centred disc of ``radius`` x the image's side, 0
    outside, with a linear edge 3% of the side wide (read-only, cached)."""
    side = max(h, w)
    edge = max(0.03 * side, 1.0)
    disc = np.clip((radius * side - _centre_distance(h, w)) / edge + 0.5, 0.0, 1.0).astype(np.float32)
    disc.flags.writeable = False
    return disc


def mask_outside_cell(arr: np.ndarray, radius: float, colour=BACKGROUND_REFERENCE) -> np.ndarray:
    """``arr`` (H, W, 3 floats in 0-1) with everything outside the cell disc (:func:`cell_disc`)
    painted ``colour``."""
    disc = cell_disc(arr.shape[0], arr.shape[1], radius)[..., None]
    return arr * disc + np.asarray(colour, dtype=arr.dtype) * (1.0 - disc)


_COLOUR_STEPS = {"white_balance": white_balance, "grey": to_grey, "stain_anchor": stain_anchor}
"""The float-RGB function behind each colour mode but "none" and "reinhard" (which
:func:`apply_colour` runs on bytes, :func:`reinhard_uint8`)."""


def apply_colour(img: Image.Image, mode: "str | CanonicalConfig") -> Image.Image:
    """Colour step of :class:`CanonicalConfig` on an RGB image (``mode``: a colour mode, or a
    whole config, whose cell options then apply too)."""
    cfg = mode if isinstance(mode, CanonicalConfig) else CanonicalConfig(colour=mode)
    if cfg.colour == "none" and not cfg.mask_outside_cell:
        return img
    if cfg.colour == "reinhard":  # the common case at inference: bytes in, bytes out
        u8 = np.asarray(ensure_rgb(img))
        if cfg.colour_region == "cell":
            u8 = reinhard_uint8(u8, REINHARD_CELL_REFERENCE, cell_disc(*u8.shape[:2], cfg.cell_radius))
        else:
            u8 = reinhard_uint8(u8)
        if not cfg.mask_outside_cell:
            return Image.fromarray(u8, "RGB")
        out = u8.astype(np.float32) / 255.0
    else:
        out = _float_rgb(img)
        if cfg.colour != "none":
            out = _COLOUR_STEPS[cfg.colour](out)
    if cfg.mask_outside_cell:
        out = mask_outside_cell(out, cfg.cell_radius)
    return Image.fromarray((np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out2 = out.copy()
    out2[:, 1:] |= out[:, :-1]
    out2[:, :-1] |= out[:, 1:]
    return out2


@lru_cache(maxsize=16)
def _centre_distance(h: int, w: int) -> np.ndarray:
    """Distance of every pixel of an h x w image from its centre (read-only, cached)."""
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2)
    dist.flags.writeable = False
    return dist


@dataclass(frozen=True)
class Nucleus:
    """Where the nucleus is, in the coordinates of the (square) image it was found in."""

    cx: float
    cy: float
    size: float
    """sqrt(area) in pixels."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """The image's background colour (0-1 RGB), estimated on the downscaled search copy."""


MIN_NUCLEUS_OD = 0.35
"""Stain strength (optical density in the red channel, white-balanced) below which nothing
counts as nucleus, however the Otsu split falls: pale or blank images have none."""


def find_nucleus(img: Image.Image) -> Nucleus | None:
    """The stained region nearest the image centre, or None.

    Nuclei absorb red light strongly in every Romanowsky-type stain (purple, blue or brown),
    red cells and background do not, so after white balance the red-channel optical density
    separates them (Otsu threshold, floored at :data:`MIN_NUCLEUS_OD`). The region is grown from
    the centre through a slightly dilated mask, so the lobes of a segmented nucleus stay one
    region; its area gives the size and its centroid the centre.
    """
    w, h = img.size
    scale = max(1.0, max(w, h) / WORK_SIZE)
    small = ensure_rgb(img)
    if scale > 1:
        small = small.resize((max(1, round(w / scale)), max(1, round(h / scale))), Image.Resampling.BILINEAR)
    sw, sh = small.size
    small_arr = _float_rgb(small)
    bg = background_colour(small_arr)
    od = optical_density(small_arr[..., :1], bg[:1])[..., 0]  # red only: what the nucleus test reads
    if float(od.max()) < MIN_NUCLEUS_OD:
        return None
    mask = _nucleus_mask(od)
    dist = _centre_distance(sh, sw)
    side = max(sw, sh)
    seed = mask & (dist <= 0.12 * side)
    if not seed.any():
        near = mask & (dist <= 0.3 * side)
        if not near.any():
            return None
        seed = np.zeros_like(mask)
        seed.flat[int(np.argmin(np.where(near, dist, np.inf)))] = True
    grown_mask = _dilate(_dilate(mask))
    region, count = seed, np.count_nonzero(seed)
    for _ in range(4 * side):
        nxt = _dilate(region) & grown_mask
        grown = np.count_nonzero(nxt)
        if grown == count:
            break
        region, count = nxt, grown
    region &= mask
    area = int(region.sum())
    if area < 4:
        return None
    cy, cx = (float(v.mean()) for v in np.nonzero(region))
    return Nucleus(cx=cx * scale, cy=cy * scale, size=float(np.sqrt(area)) * scale,
                   background=tuple(float(v) for v in bg))


def reframe_box(img: Image.Image, cfg: CanonicalConfig) -> tuple[tuple[int, int, int], Nucleus] | None:
    """``((left, top, side), nucleus)``: the square canvas :func:`reframe` cuts from ``img`` (it
    may run off the image), or None when no nucleus is found."""
    nucleus = find_nucleus(img)
    if nucleus is None:
        return None
    side_in = max(img.size)
    side = cfg.framing_scale * nucleus.size
    side = int(round(min(max(side, cfg.min_canvas * side_in), cfg.max_canvas * side_in)))
    return (int(round(nucleus.cx - side / 2)), int(round(nucleus.cy - side / 2)), side), nucleus


def reframe(img: Image.Image, cfg: CanonicalConfig) -> Image.Image:
    """Square canvas of ``cfg.framing_scale`` x nucleus size centred on the nucleus (see the
    module docstring); ``img`` should already be square. Unchanged when no nucleus is found."""
    img = ensure_rgb(img)
    found = reframe_box(img, cfg)
    if found is None:
        return img
    (left, top, side), nucleus = found
    w, h = img.size
    if left >= 0 and top >= 0 and left + side <= w and top + side <= h:
        return img.crop((left, top, left + side, top + side))
    canvas = Image.new("RGB", (side, side), tuple(int(round(v * 255)) for v in nucleus.background))
    canvas.paste(img, (-left, -top))
    return canvas
