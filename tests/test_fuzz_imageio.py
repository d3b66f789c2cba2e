"""Fuzzing the safe image loader (issue 8, part 2).

Property: whatever mutated bytes of a real image :func:`load_image_bytes` is handed, it either
returns a usable 8-bit RGB image within the limits or raises :class:`ImageLoadError` naming
the source, and it never hangs (a per-example deadline of 2 s; the whole test is also under a
pytest timeout, so a real hang fails instead of blocking CI).

Seeds are small (32x32) real files in every format the loader accepts (JPEG baseline /
progressive / with EXIF, PNG RGB / RGBA / palette with transparency / 16-bit grey, GIF, WebP,
TIFF, BMP). Mutations, 1 to 4 per example: bit flips, byte and integer overwrites (0, 1,
0xFF.., the classic boundary values, which is how width/height fields get hit), truncation,
deletion, random insertion, duplication of a range, splices from another seed, and inserted
well-formed chunks (PNG chunks with a correct CRC, JPEG marker segments with a correct
length, e.g. random EXIF), which get past the container checks into the decoders.

CI runs 2,000 examples (the ``celluscan-imageio-fuzz`` settings profile). Longer runs::

    CELLUSCAN_FUZZ_EXAMPLES=100000 .venv/bin/pytest tests/test_fuzz_imageio.py -q
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from corpus import pattern_image

from celluscan.data.imageio import ImageLimits, ImageLoadError, load_image_bytes

FUZZ_EXAMPLES = int(os.environ.get("CELLUSCAN_FUZZ_EXAMPLES", "2000"))
PROFILE = "celluscan-imageio-fuzz"
settings.register_profile(
    PROFILE,
    max_examples=FUZZ_EXAMPLES,
    deadline=timedelta(seconds=2),  # generous: the CI machine is shared and busy
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,  # nothing written into the repository; failures print a reproduction blob
    print_blob=True,
)
LIMITS = ImageLimits()  # the defaults every CLI entry point uses
SOURCE = "fuzzed-upload.bin"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    rgb = pattern_image(21, 32, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the loader applies it, so EXIF parsing is exercised
    exif[0x010F] = "CelluScan fuzz"
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    grey16 = Image.fromarray(np.asarray(pattern_image(22, 32, 32, "L"), dtype=np.uint16) * 257)
    frames = [pattern_image(23 + k, 32, 32).convert("P") for k in range(2)]
    return {
        "jpeg": _encode(rgb, "JPEG", quality=85),
        "jpeg_progressive": _encode(rgb, "JPEG", quality=85, progressive=True),
        "jpeg_exif": _encode(rgb, "JPEG", quality=85, exif=exif.tobytes()),
        "png_rgb": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgba, "PNG"),
        "png_palette_trns": _encode(palette, "PNG", transparency=0),
        "png_grey16": _encode(grey16, "PNG"),
        "gif_animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "webp": _encode(rgb, "WEBP", quality=80),
        "tiff": _encode(rgb, "TIFF"),
        "bmp": _encode(rgb, "BMP"),
    }


SEEDS = _seeds()
SEED_NAMES = sorted(SEEDS)
BOUNDARY_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
                 0x80000000, 0xFFFFFFFF)
PNG_CHUNKS = (b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf", b"tRNS", b"PLTE", b"sBIT", b"gAMA",
              b"cHRM", b"pHYs", b"sRGB", b"acTL", b"fcTL", b"fdAT", b"IDAT", b"IHDR", b"IEND")
JPEG_MARKERS = (0xE0, 0xE1, 0xE2, 0xED, 0xEE, 0xFE, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD, 0xDA)


# ---- mutations: (name, args) tuples, applied in order -------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _jpeg_segment(marker: int, data: bytes) -> bytes:
    if marker == 0xE1 and not data.startswith(b"Exif"):
        data = b"Exif\x00\x00" + data  # an EXIF APP1: reaches the EXIF parser
    return bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data


def _insert_chunk(buf: bytearray, kind_index: int, data: bytes, where: int) -> None:
    if buf[:8] == b"\x89PNG\r\n\x1a\n":
        # after the signature + IHDR (33 bytes) or at a later offset (maybe mid-chunk)
        pos = 33 if where % 2 == 0 else 8 + where % max(1, len(buf) - 8)
        buf[pos:pos] = _png_chunk(PNG_CHUNKS[kind_index % len(PNG_CHUNKS)], data)
    elif buf[:2] == b"\xff\xd8":
        pos = 2 if where % 2 == 0 else where % len(buf)
        buf[pos:pos] = _jpeg_segment(JPEG_MARKERS[kind_index % len(JPEG_MARKERS)], data)
    else:
        pos = where % (len(buf) + 1)
        buf[pos:pos] = data


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for name, *args in ops:
        n = len(buf)
        if name == "flip" and n:
            pos, bit = args
            buf[pos % n] ^= 1 << bit
        elif name == "set_byte" and n:
            pos, value = args
            buf[pos % n] = value
        elif name == "set_int" and n >= 4:
            pos, value, width, big_endian = args
            raw = (value & (2 ** (8 * width) - 1)).to_bytes(width, "big" if big_endian else "little")
            p = pos % (n - width + 1)
            buf[p:p + width] = raw
        elif name == "truncate":
            (pos,) = args
            del buf[pos % (n + 1):]
        elif name == "delete" and n:
            pos, length = args
            p = pos % n
            del buf[p:p + length]
        elif name == "insert":
            pos, chunk = args
            p = pos % (n + 1)
            buf[p:p] = chunk
        elif name == "duplicate" and n:
            pos, length = args
            p = pos % n
            buf[p:p] = buf[p:p + length]
        elif name == "splice":
            other, src, length, dst = args
            donor = SEEDS[other]
            s = src % len(donor)
            p = dst % (n + 1)
            buf[p:p] = donor[s:s + length]
        elif name == "chunk":
            kind_index, chunk, where = args
            _insert_chunk(buf, kind_index, chunk, where)
    return bytes(buf)


positions = st.integers(0, 1 << 16)
operations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("set_byte"), positions, st.integers(0, 255)),
    st.tuples(st.just("set_int"), positions, st.sampled_from(BOUNDARY_INTS) | st.integers(0, 2**32 - 1),
              st.sampled_from((2, 4)), st.booleans()),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("delete"), positions, st.integers(1, 256)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("duplicate"), positions, st.integers(1, 512)),
    st.tuples(st.just("splice"), st.sampled_from(SEED_NAMES), positions, st.integers(1, 512), positions),
    st.tuples(st.just("chunk"), st.integers(0, 63), st.binary(max_size=200), positions),
)


def check_load(data: bytes) -> tuple[Image.Image | None, str]:
    """The property for one input: a valid RGB image, or ImageLoadError naming the source.
    Returns (image or None, outcome label for the statistics)."""
    try:
        img = load_image_bytes(data, SOURCE, LIMITS)
    except ImageLoadError as err:
        assert err.source == SOURCE and err.reason and str(err).startswith(SOURCE)
        kind = re.sub(r"\d[\d,x=]*", "N", err.reason.split(":")[0].split("(")[0]).strip()
        return None, f"refused: {kind}"
    w, h = img.size
    assert img.mode == "RGB" and min(w, h) >= LIMITS.min_side and w * h <= LIMITS.max_pixels
    assert len(img.tobytes()) == w * h * 3  # fully decoded and usable
    return img, "decoded"


# ---- tests --------------------------------------------------------------------------------------


def test_seeds_are_real_images_and_the_mutator_breaks_them():
    for name, data in SEEDS.items():
        assert check_load(data)[0] is not None, name
        broken = mutate(data, [("truncate", len(data) // 3)])
        assert check_load(broken)[0] is None, name  # a third of a file is never an image
    png = SEEDS["png_rgb"]
    with_chunk = mutate(png, [("chunk", PNG_CHUNKS.index(b"tEXt"), b"Comment\x00hello", 0)])
    assert with_chunk[33:37] == struct.pack(">I", 13) and check_load(with_chunk)[0] is not None
    jpeg = SEEDS["jpeg"]
    with_segment = mutate(jpeg, [("chunk", JPEG_MARKERS.index(0xFE), b"a comment", 0)])
    assert with_segment[2:4] == b"\xff\xfe" and check_load(with_segment)[0] is not None


@pytest.mark.timeout(300 + FUZZ_EXAMPLES // 4)  # a hang anywhere fails the test, never blocks CI
@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's "corrupt EXIF" notes: expected here
@settings(settings.get_profile(PROFILE))
@given(seed=st.sampled_from(SEED_NAMES), ops=st.lists(operations, min_size=1, max_size=4))
def test_mutated_images_only_ever_raise_image_load_error(seed, ops):
    _, outcome = check_load(mutate(SEEDS[seed], ops))
    event(outcome)  # shown by --hypothesis-show-statistics: how often each path is reached
