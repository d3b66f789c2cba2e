"""A generated corpus of broken and odd image files, for testing every entry point.

``make_corpus(root)`` writes the files (no binary blobs are checked in) under
``root/lymphocyte/`` (a class folder, so ``celluscan ingest root`` maps every label) and
returns ``{case name: path}``. ``expected_outcomes()`` says what should happen to each case:

* ``ingested``: decodes to an RGB image of ``size`` (width, height after EXIF rotation);
* ``rejected``: reported with a reason containing one of ``reasons`` (lower case);
* ``ignored``: not an image file by name (hidden or other suffix): skipped silently, counted;
* ``not_followed``: a symlinked folder (here a loop): never entered, reported.

``make_corpus(root, over_limit_bytes=N)`` adds the case ``over_size_limit``: a valid PNG
padded to ``N + 1`` bytes (sparse on disk), for entry points whose file-size limit is ``N``
(pass the same flag to ``expected_outcomes``). It is opt-in because uploading it needs a
request limit above ``N``.

Usage::

    from corpus import make_corpus, expected_outcomes
    files = make_corpus(tmp_path / "corpus")
    for name, exp in expected_outcomes().items(): ...
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Expected", "make_corpus", "expected_outcomes", "pattern_image", "CLASS_FOLDER"]

CLASS_FOLDER = "lymphocyte"


@dataclass(frozen=True)
class Expected:
    outcome: str  # ingested | rejected | ignored | not_followed
    reasons: tuple[str, ...] = ()  # for rejected: any of these substrings of the reason
    size: tuple[int, int] | None = None  # for ingested: decoded (width, height)


def pattern_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth random pattern (distinct perceptual hash per seed) plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    img = coarse.resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (height, width, 3))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    row = b"\x00" + b"\x00" * 64
    idat = zlib.compress(row * 64, 9)  # far less data than declared: header is enough
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    """80x40 stored (left half red, right half blue) with EXIF orientation 6.

    Displayed correctly (rotated 90 degrees clockwise) it is 40x80, red on top, blue below.
    """
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = (220, 30, 30)
    arr[:, 40:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def expected_outcomes(over_limit: bool = False) -> dict[str, Expected]:
    """What every entry point should do with each case of :func:`make_corpus`
    (``over_limit``: the corpus was made with ``over_limit_bytes``)."""
    not_image = ("not an image", "cannot open", "not recognised")
    exp = {
        "zero_byte": Expected("rejected", ("empty",)),
        "truncated_jpeg": Expected("rejected", ("truncated", "corrupt")),
        "random_bytes_jpg": Expected("rejected", not_image),
        "random_bytes_png": Expected("rejected", not_image),
        "text_as_png": Expected("rejected", not_image),
        "html_as_png": Expected("rejected", not_image),
        "pdf_as_jpg": Expected("rejected", not_image),
        "one_pixel": Expected("rejected", ("smaller than", "minimum")),
        "bomb_png": Expected("rejected", ("too large", "over the limit", "decompression")),
        "self_symlink_loop": Expected("rejected", ("symbolic links", "cannot access", "not found")),
        "dangling_symlink": Expected("rejected", ("not found",)),
        "greyscale": Expected("ingested", size=(64, 48)),
        "rgba_png": Expected("ingested", size=(50, 60)),
        "palette_transparency": Expected("ingested", size=(48, 48)),
        "png_16bit": Expected("ingested", size=(40, 30)),
        "cmyk_jpeg": Expected("ingested", size=(56, 56)),
        "exif_rotated": Expected("ingested", size=(40, 80)),
        "animated_gif": Expected("ingested", size=(32, 32)),
        "tiff": Expected("ingested", size=(45, 45)),
        "webp": Expected("ingested", size=(52, 40)),
        "bmp": Expected("ingested", size=(33, 47)),
        "upper_case_suffix": Expected("ingested", size=(36, 36)),
        "name_with_spaces": Expected("ingested", size=(41, 39)),
        "non_ascii_name": Expected("ingested", size=(38, 42)),
        "plain_rgb_jpeg": Expected("ingested", size=(70, 64)),
        "hidden_file": Expected("ignored"),
        "text_file": Expected("ignored"),
        "symlink_dir_loop": Expected("not_followed"),
        "unreadable": (
            Expected("ingested", size=(44, 44))  # root reads it anyway: chmod can't block
            if _is_root()
            else Expected("rejected", ("permission", "cannot read"))
        ),
    }
    if over_limit:
        exp["over_size_limit"] = Expected("rejected", ("over the limit",))
    return exp


def _minimal_pdf() -> bytes:
    """A small but well-formed one-page PDF (what a scanned report looks like to a loader)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def make_corpus(root: str | os.PathLike, over_limit_bytes: int | None = None) -> dict[str, Path]:
    """Write the corpus under ``root/lymphocyte/`` and return ``{case name: path}``.

    ``over_limit_bytes``: also write ``over_size_limit`` (see the module docstring)."""
    d = Path(root) / CLASS_FOLDER
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def put(name: str, filename: str, data: bytes) -> None:
        p = d / filename
        p.write_bytes(data)
        files[name] = p

    rng = np.random.default_rng(1234)
    put("zero_byte", "empty.jpg", b"")
    jpeg = io.BytesIO()
    pattern_image(1, 96, 96).save(jpeg, "JPEG", quality=90)
    put("truncated_jpeg", "truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    put("random_bytes_jpg", "random.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("random_bytes_png", "random.png", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("text_as_png", "notes.png", b"just some notes, not an image\n" * 20)
    put("html_as_png", "page.png", b"<!DOCTYPE html><html><body><img src='x.png'></body></html>\n")
    put("pdf_as_jpg", "report.jpg", _minimal_pdf())
    files["one_pixel"] = _save(Image.new("RGB", (1, 1), (200, 100, 100)), d / "one_pixel.png", "PNG")
    put("bomb_png", "bomb.png", _bomb_png())

    files["greyscale"] = _save(pattern_image(2, 64, 48, "L"), d / "grey.png", "PNG")
    rgba = pattern_image(3, 50, 60).convert("RGBA")
    alpha = np.full((60, 50), 255, np.uint8)
    alpha[:10] = 0  # a transparent band: composited on white
    rgba.putalpha(Image.fromarray(alpha, "L"))
    files["rgba_png"] = _save(rgba, d / "rgba.png", "PNG")
    pal = pattern_image(4, 48, 48).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files["palette_transparency"] = _save(pal, d / "palette.png", "PNG", transparency=0)
    grey16 = (np.asarray(pattern_image(5, 40, 30, "L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["png_16bit"] = _save(Image.fromarray(grey16), d / "grey16.png", "PNG")
    files["cmyk_jpeg"] = _save(pattern_image(6, 56, 56).convert("CMYK"), d / "cmyk.jpg", "JPEG", quality=90)
    put("exif_rotated", "rotated.jpg", _exif_rotated_jpeg())
    frames = [pattern_image(7 + k, 32, 32).convert("P") for k in range(3)]
    files["animated_gif"] = _save(frames[0], d / "anim.gif", "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["tiff"] = _save(pattern_image(10, 45, 45), d / "cell.tiff", "TIFF")
    files["webp"] = _save(pattern_image(11, 52, 40), d / "cell.webp", "WEBP", quality=90)
    files["bmp"] = _save(pattern_image(12, 33, 47), d / "cell.bmp", "BMP")
    files["upper_case_suffix"] = _save(pattern_image(13, 36, 36), d / "CELL_UPPER.JPG", "JPEG", quality=90)
    files["name_with_spaces"] = _save(pattern_image(14, 41, 39), d / "cell with spaces.png", "PNG")
    files["non_ascii_name"] = _save(pattern_image(15, 38, 42), d / "zelle_ü_血球.png", "PNG")
    files["plain_rgb_jpeg"] = _save(pattern_image(16, 70, 64), d / "plain.jpg", "JPEG", quality=90)
    files["unreadable"] = _save(pattern_image(17, 44, 44), d / "locked.png", "PNG")
    os.chmod(files["unreadable"], 0)

    put("hidden_file", ".DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    put("text_file", "readme.txt", b"notes about these cells\n")

    loop = d / "loop"
    loop.symlink_to("..", target_is_directory=True)  # lymphocyte/loop -> the corpus root
    files["symlink_dir_loop"] = loop
    self_loop = d / "self_loop.jpg"
    self_loop.symlink_to("self_loop.jpg")
    files["self_symlink_loop"] = self_loop
    dangling = d / "dangling.png"
    dangling.symlink_to("does_not_exist.png")
    files["dangling_symlink"] = dangling
    if over_limit_bytes is not None:
        big = _save(pattern_image(18, 40, 40), d / "over_limit.png", "PNG")
        with open(big, "r+b") as fh:  # trailing zeros after IEND: decodable, but too big
            fh.truncate(over_limit_bytes + 1)
        files["over_size_limit"] = big
    expected = expected_outcomes(over_limit=over_limit_bytes is not None)
    assert set(files) == set(expected), set(files) ^ set(expected)
    return files
