"""Upload handling: file-name sanitising, in-memory zip expansion and its limits."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from celluscan.serving.limits import ServingLimits
from celluscan.serving.uploads import TooManyFilesError, collect_uploads, sanitise_filename
from test_serving_helpers import png_bytes, zip_bytes


def collect(files: dict[str, bytes] | list[tuple[str, bytes]], limits=ServingLimits()):
    items = files.items() if isinstance(files, dict) else files
    return collect_uploads([(n, io.BytesIO(d)) for n, d in items], limits)


@pytest.mark.parametrize("raw, expected", [
    ("cell.png", "cell.png"),
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\cell.jpg", "cell.jpg"),
    ("bad\x00name\x1b[31m.png", "badname[31m.png"),
    ("  spaced   out .png ", "spaced out .png"),
    ("..", "upload"),
    ("", "upload"),
    (None, "upload"),
    ("/", "upload"),
    ("zelle_ü_血球.png", "zelle_ü_血球.png"),
])
def test_sanitise_filename(raw, expected):
    assert sanitise_filename(raw) == expected


def test_long_names_are_capped_keeping_the_suffix():
    name = sanitise_filename("a" * 5000 + ".png")
    assert len(name) <= 200 and name.endswith(".png")


def test_plain_files_pass_through_in_order():
    ups = collect([("b.png", png_bytes(1)), ("a.png", png_bytes(2))])
    assert [u.name for u in ups] == ["b.png", "a.png"]
    assert ups[0].data == png_bytes(1) and ups[0].error is None


def test_oversized_file_is_an_error_row_and_not_read():
    limits = ServingLimits(max_file_bytes=1000)
    ups = collect([("big.png", b"x" * 1001), ("ok.png", b"y" * 10)], limits)
    assert ups[0].data is None and ups[0].error.code == "too_large" and "1,001 bytes" in ups[0].error.message
    assert ups[1].data == b"y" * 10


def test_zip_members_become_uploads_with_display_only_names():
    z = zip_bytes({
        "cells/one.png": png_bytes(1),
        "../../escape.png": png_bytes(2),
        "/abs/root.png": png_bytes(3),
        "notes.txt": b"hello",
        "__MACOSX/cells/._one.png": b"junk",
        "cells/.DS_Store": b"junk",
        "empty_dir/": b"",
    })
    ups = collect({"smear.zip": z})
    names = [u.name for u in ups]
    assert names == ["smear.zip/cells/one.png", "smear.zip/escape.png", "smear.zip/abs/root.png",
                     "smear.zip/notes.txt"]
    assert ups[0].data == png_bytes(1)
    assert ups[3].data == b"hello"  # a non-image member is passed on; decoding reports it


def test_zip_detected_by_content_not_name():
    ups = collect({"images.bin": zip_bytes({"x.png": png_bytes(5)})})
    assert [u.name for u in ups] == ["images.bin/x.png"]
    ups = collect({"fake.zip": b"not a zip at all"})
    assert ups[0].data == b"not a zip at all"  # not a zip: treated as a (bad) image


def test_nested_zip_and_corrupt_zip_are_error_rows():
    nested = zip_bytes({"inner.zip": zip_bytes({"x.png": png_bytes(1)}), "ok.png": png_bytes(2)})
    ups = collect({"outer.zip": nested})
    assert ups[0].error.code == "unsupported" and ups[1].data == png_bytes(2)
    corrupt = zip_bytes({"x.png": png_bytes(1)})[:40]
    ups = collect({"broken.zip": corrupt})
    assert len(ups) == 1 and ups[0].error.code == "bad_archive"


def test_zip_member_over_the_size_limit():
    limits = ServingLimits(max_file_bytes=5000)
    z = zip_bytes({"big.png": b"\0" * 50_000, "ok.png": b"1" * 100})  # compresses well
    ups = collect({"s.zip": z}, limits)
    assert ups[0].error.code == "too_large" and ups[1].data == b"1" * 100


def _lie_about_size(data: bytes, member: str, fake_size: int) -> bytes:
    """Rewrite a zip so that ``member`` declares ``fake_size`` as its uncompressed size."""
    buf = bytearray(data)
    name = member.encode()
    for sig, size_off, name_off in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        pos = buf.find(sig)
        while pos >= 0:
            if bytes(buf[pos + name_off:pos + name_off + len(name)]) == name:
                struct.pack_into("<I", buf, pos + size_off, fake_size)
            pos = buf.find(sig, pos + 4)
    return bytes(buf)


def test_zip_bomb_member_lying_about_its_size_is_cut_off():
    limits = ServingLimits(max_file_bytes=10_000)
    z = _lie_about_size(zip_bytes({"bomb.png": b"\0" * 1_000_000}), "bomb.png", 100)
    ups = collect({"bomb.zip": z}, limits)
    assert len(ups) == 1 and ups[0].data is None
    assert ups[0].error.code in ("too_large", "bad_archive")


def test_total_extracted_budget():
    limits = ServingLimits(max_file_bytes=4000, max_zip_uncompressed_bytes=10_000)
    z = zip_bytes({f"m{i}.png": bytes([i]) * 3000 for i in range(5)})
    ups = collect({"s.zip": z}, limits)
    assert [u.error is None for u in ups] == [True, True, True, False, False]
    assert "expand to more than" in ups[3].error.message


def test_encrypted_member_is_an_error_row():
    z = bytearray(zip_bytes({"secret.png": png_bytes(1)}, compression=zipfile.ZIP_STORED))
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the 'encrypted' flag bit
        pos = z.find(sig)
        struct.pack_into("<H", z, pos + off, struct.unpack_from("<H", z, pos + off)[0] | 1)
    ups = collect({"locked.zip": bytes(z)})
    assert ups[0].error.code == "bad_archive" and "encrypted" in ups[0].error.message


def test_too_many_files_counts_zip_members():
    limits = ServingLimits(max_files=3)
    collect([("a.png", b"1"), ("b.png", b"2"), ("c.png", b"3")], limits)  # exactly at the limit
    with pytest.raises(TooManyFilesError, match="limit is 3"):
        collect([("a.png", b"1"), ("z.zip", zip_bytes({"x.png": b"1", "y.png": b"2", "w.png": b"3"}))], limits)


def test_huge_central_directory_is_refused_before_parsing():
    limits = ServingLimits(max_files=5)
    z = zip_bytes({f"{i}.png": b"" for i in range(200)}, compression=zipfile.ZIP_STORED)
    with pytest.raises(TooManyFilesError):
        collect({"many.zip": z}, limits)
