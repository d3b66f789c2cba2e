"""Safe image loading: every failure becomes an :class:`ImageLoadError` naming the file.

This is the one function every entry point (ingest, predict, evaluate, the REST API and
the web UI) uses to turn bytes into an RGB image. It fully decodes the image, applies the
EXIF orientation, converts greyscale / palette / alpha / 16-bit / CMYK to 8-bit RGB, and
enforces configurable limits on file size and pixel count (decompression bombs).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageLimits", "ImageLoadError", "ensure_rgb", "load_image", "load_image_bytes", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".jfif"}
)


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every image before and while decoding it.

    max_bytes: largest file accepted (default 50 MB).
    max_pixels: largest width x height accepted (default 40 megapixels); checked from the
        header, before decoding, so decompression bombs are refused cheaply.
    min_side: smallest width or height accepted (default 8 px: a 1x1 image is no cell).
    """

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 8


DEFAULT_LIMITS = ImageLimits()


class ImageLoadError(Exception):
    """An image could not be used. ``source`` names the file, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def ensure_rgb(img: Image.Image) -> Image.Image:
    """``img`` itself when it is already RGB (no copy), else ``img.convert("RGB")``."""
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "CMYK":
        return img.convert("RGB")
    if img.mode in ("RGB;16", "RGBX", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    return img.convert("RGB")


def _decode(fp, source: str, limits: ImageLimits) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageLoadError(source, "not an image file (format not recognised)") from None
        except Image.DecompressionBombError as e:
            raise ImageLoadError(source, f"image too large (decompression bomb guard): {e}") from None
        except Image.DecompressionBombWarning as e:
            raise ImageLoadError(source, f"image too large (decompression bomb guard): {e}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageLoadError(source, f"cannot open image: {e}") from None
        try:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageLoadError(
                    source,
                    f"image has {w}x{h} = {w * h:,} pixels, over the limit of {limits.max_pixels:,}",
                )
            if min(w, h) < limits.min_side:
                raise ImageLoadError(
                    source, f"image is {w}x{h}, smaller than the minimum side of {limits.min_side} px"
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF / multi-page TIFF: use the first frame
            img.load()
            # A copy even without an orientation tag: callers get a plain Image, detached from
            # the file object it was decoded from (in_place=True would keep the file's bytes).
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
        except ImageLoadError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageLoadError(source, f"image too large (decompression bomb guard): {e}") from None
        except Image.DecompressionBombWarning as e:
            raise ImageLoadError(source, f"image too large (decompression bomb guard): {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
                struct.error, ZeroDivisionError, MemoryError, RuntimeError) as e:
            raise ImageLoadError(source, f"corrupt or truncated image: {type(e).__name__}: {e}") from None


def load_image(path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Read and fully decode an image file into an 8-bit RGB PIL image.

    Raises :class:`ImageLoadError` (never anything else for a bad file) naming the file
    and the reason: missing, unreadable, empty, too big, not an image, corrupt, too small.
    """
    source = str(path)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageLoadError(source, "file not found") from None
    except OSError as e:
        raise ImageLoadError(source, f"cannot access file: {e.strerror or e}") from None
    if not p.is_file():
        raise ImageLoadError(source, "not a regular file")
    if st.st_size == 0:
        raise ImageLoadError(source, "empty file (0 bytes)")
    if st.st_size > limits.max_bytes:
        raise ImageLoadError(
            source, f"file is {st.st_size:,} bytes, over the limit of {limits.max_bytes:,}"
        )
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageLoadError(source, f"cannot read file: {e.strerror or e}") from None
    return load_image_bytes(data, source, limits)


def load_image_bytes(
    data: bytes, source: str = "<upload>", limits: ImageLimits = DEFAULT_LIMITS
) -> Image.Image:
    """Decode image bytes (an upload) with the same checks as :func:`load_image`."""
    if len(data) == 0:
        raise ImageLoadError(source, "empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageLoadError(
            source, f"file is {len(data):,} bytes, over the limit of {limits.max_bytes:,}"
        )
    return _decode(io.BytesIO(data), source, limits)
