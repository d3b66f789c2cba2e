"""Image preprocessing and per-sample augmentation.

Every model sees cells the same way: the image is padded to a square (keeping its aspect
ratio, so a cell is never stretched) and resized to ``size`` x ``size`` with an antialiased
bicubic filter. Training and inference share :func:`preprocess`, so the pipelines cannot
drift apart.

Pad fill (``fill``):

* ``"edge"`` (default): the per-channel median colour of the image's border pixels. Blood
  smear crops have a plain background at their border, so the padding looks like more
  background instead of adding a hard black or white frame the model could learn from
  (e.g. Munich AML images, 400x400, vs PBC 360x363).
* ``"white"`` / ``"black"``: constant colours.
* ``(r, g, b)``: any constant colour, 0-255 ints.

The torch-based transforms (:func:`eval_transform`, :func:`train_transform`) import
torchvision lazily so that ``celluscan ingest`` and the image workers start fast.
"""

from __future__ import annotations

import math
import random
from typing import Sequence, Union

import numpy as np
from PIL import Image

from celluscan.data.imageio import ensure_rgb

__all__ = [
    "Fill",
    "border_colour",
    "resolve_fill",
    "pad_to_square",
    "preprocess",
    "preprocess_view",
    "square_view",
    "PadToSquare",
    "Preprocess",
    "RandomRotate",
    "RandomRot90",
    "TrivialAugmentEdgeFill",
    "eval_transform",
    "train_transform",
]

Fill = Union[str, Sequence[int]]

_NAMED_FILLS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def border_colour(img: Image.Image) -> tuple[int, int, int]:
    """Per-channel median of the pixels on the image's outer border (RGB ints)."""
    arr = np.asarray(ensure_rgb(img))
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    med = np.median(border, axis=0)
    return tuple(int(round(v)) for v in med)  # type: ignore[return-value]


def resolve_fill(img: Image.Image, fill: Fill = "edge") -> tuple[int, int, int]:
    """The concrete RGB colour for ``fill`` on this image (see the module docstring)."""
    if isinstance(fill, str):
        key = fill.strip().lower()
        if key == "edge":
            return border_colour(img)
        if key in _NAMED_FILLS:
            return _NAMED_FILLS[key]
        raise ValueError(f"unknown pad fill {fill!r}: use 'edge', 'white', 'black' or (r, g, b)")
    values = tuple(fill)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise ValueError(f"pad fill {fill!r} must be three ints in 0..255 (r, g, b)")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


NEAR_SQUARE_CROP = 0.02
"""Images whose sides differ by at most this fraction are centre-cropped to a square instead
of padded. Padding a 360x363 PBC image leaves a 3-pixel stripe of fill colour that square
images (other labs' crops, and whole classes of our own data: all immature granulocytes are
360x360 and all Munich myeloblasts 400x400) never have; a model can learn the stripe as a
class cue. Cropping 1.5 px a side removes the cue and no cell content."""


def pad_to_square(img: Image.Image, fill: Fill = "edge") -> Image.Image:
    """Pad ``img`` (RGB) to a square, centred, keeping its aspect ratio.

    ``fill`` is ``"edge"`` (median border colour, the default), ``"white"``, ``"black"``
    or an ``(r, g, b)`` tuple. A square image is returned unchanged; a nearly square one
    (sides within :data:`NEAR_SQUARE_CROP`) is centre-cropped to a square instead.
    """
    img = ensure_rgb(img)
    w, h = img.size
    if w == h:
        return img
    if abs(w - h) <= NEAR_SQUARE_CROP * max(w, h):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return img.crop((left, top, left + side, top + side))
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), resolve_fill(img, fill))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def square_view(width: int, height: int) -> tuple[int, int, int]:
    """``(left, top, side)``: where :func:`pad_to_square`'s square lies in the original image's
    coordinates (negative offsets where it pads, positive where it crops a near-square image)."""
    if width == height:
        return 0, 0, width
    if abs(width - height) <= NEAR_SQUARE_CROP * max(width, height):
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side
    side = max(width, height)
    return -((side - width) // 2), -((side - height) // 2), side


def preprocess_view(img: Image.Image, canonical=None) -> tuple[int, int, int]:
    """``(left, top, side)``: the square region of ``img`` (original coordinates, possibly
    running off the image) that :func:`preprocess` turns into the model input. Explanations use
    it to lay attention maps back over the original image."""
    from celluscan.data.canonical import CanonicalConfig, reframe_box

    left, top, side = square_view(*img.size)
    canon = CanonicalConfig.coerce(canonical)
    if canon.framing == "nucleus":
        found = reframe_box(pad_to_square(img), canon)
        if found is not None:
            (l, t, s), _ = found
            return left + l, top + t, s
    return left, top, side


def preprocess(img: Image.Image, size: int, fill: Fill = "edge", canonical=None) -> Image.Image:
    """Pad to square (see :func:`pad_to_square`), then resize to ``size`` x ``size``.

    Resizing is bicubic and antialiased (Pillow filters over the full source footprint when
    shrinking). An image already ``size`` x ``size`` is returned as is. With ``canonical`` (a
    :class:`~celluscan.data.canonical.CanonicalConfig` or its dict), the square is first
    re-framed on the nucleus and the result's colour canonicalised (data.canonical).
    """
    from celluscan.data.canonical import CanonicalConfig, apply_colour, reframe

    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    canon = CanonicalConfig.coerce(canonical)
    sq = pad_to_square(img, fill)
    if canon.framing == "nucleus":
        sq = reframe(sq, canon)
    if sq.size != (size, size):
        sq = sq.resize((size, size), Image.Resampling.BICUBIC)
    return apply_colour(sq, canon)


class PadToSquare:
    """Callable form of :func:`pad_to_square` (picklable, for DataLoader workers)."""

    def __init__(self, fill: Fill = "edge"):
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        return pad_to_square(img, self.fill)

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill!r})"


class Preprocess:
    """Callable form of :func:`preprocess` (picklable, for DataLoader workers)."""

    def __init__(self, size: int, fill: Fill = "edge", canonical=None):
        self.size = size
        self.fill = fill
        self.canonical = canonical

    def __call__(self, img: Image.Image) -> Image.Image:
        return preprocess(img, self.size, self.fill, self.canonical)

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, fill={self.fill!r}, canonical={self.canonical!r})"


class RandomRotate:
    """Rotate by a uniform random angle in [-degrees, degrees], filling with the border colour.

    Cells have no natural orientation, so any rotation is a valid view; filling the corners
    with the image's own background avoids black wedges.
    """

    def __init__(self, degrees: float = 180.0):
        self.degrees = float(degrees)

    def __call__(self, img: Image.Image) -> Image.Image:
        angle = random.uniform(-self.degrees, self.degrees)
        return img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=border_colour(img))

    def __repr__(self) -> str:
        return f"RandomRotate(degrees={self.degrees})"


class RandomRot90:
    """Rotate by a random multiple of 90 degrees (lossless)."""

    _OPS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, img: Image.Image) -> Image.Image:
        op = random.choice(self._OPS)
        return img if op is None else img.transpose(op)

    def __repr__(self) -> str:
        return "RandomRot90()"


class TrivialAugmentEdgeFill:
    """torchvision's TrivialAugmentWide, with geometric ops filling in the border colour.

    TrivialAugmentWide (Mueller & Hutter 2021) applies one randomly chosen op at a random
    strength. Its shear/translate/rotate ops expose corners; they are filled with this
    image's median border colour (background) rather than black.
    """

    def __init__(self, num_magnitude_bins: int = 31):
        self.num_magnitude_bins = num_magnitude_bins

    def __call__(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import TrivialAugmentWide

        aug = TrivialAugmentWide(
            num_magnitude_bins=self.num_magnitude_bins, fill=list(border_colour(img))
        )
        return aug(img)

    def __repr__(self) -> str:
        return f"TrivialAugmentEdgeFill(num_magnitude_bins={self.num_magnitude_bins})"


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    from torchvision import transforms as T

    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need 3 values (r, g, b) on the 0-1 scale")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    return [T.ToTensor(), T.Normalize(mean=list(map(float, mean)), std=list(map(float, std)))]


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float], fill: Fill = "edge"):
    """PIL RGB image -> normalised float tensor (3, size, size): preprocess, scale to 0-1,
    subtract ``mean`` and divide by ``std`` (0-1 scale, from ``stats.json``)."""
    from torchvision import transforms as T

    return T.Compose([Preprocess(size, fill), *_to_normalised_tensor(mean, std)])


def train_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    fill: Fill = "edge",
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rotate_degrees: float = 180.0,
    flips: bool = True,
    trivial_augment: bool = False,
):
    """Per-sample training augmentation -> normalised float tensor (3, size, size).

    Pad to square, random rotation (border-colour fill; 0 disables), random-resized-crop
    to ``size`` (bicubic), random horizontal/vertical flips and 90-degree turns, then
    optionally TrivialAugmentWide (:class:`TrivialAugmentEdgeFill`).
    """
    from torchvision import transforms as T

    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    steps: list = [PadToSquare(fill)]
    if rotate_degrees and not math.isclose(rotate_degrees, 0.0):
        steps.append(RandomRotate(rotate_degrees))
    steps.append(
        T.RandomResizedCrop(
            size, scale=scale, ratio=ratio, interpolation=T.InterpolationMode.BICUBIC, antialias=True
        )
    )
    if flips:
        steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip(), RandomRot90()]
    if trivial_augment:
        steps.append(TrivialAugmentEdgeFill())
    return T.Compose([*steps, *_to_normalised_tensor(mean, std)])
