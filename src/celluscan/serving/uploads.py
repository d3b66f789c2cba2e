"""Turn uploaded files (and the members of uploaded zips) into named byte strings, safely.

Shared by the REST API and the web UI. Rules:

* an uploaded file name is only ever *echoed back*: it is sanitised for display and never
  used as a path; nothing is written to disk here;
* a zip is read in memory; its member names are display labels only. The number of
  members, each member's size and the total extracted size are limited, and a member whose
  real size exceeds its declared size is cut off at the limit (zip bombs);
* one bad file (too large, corrupt, encrypted zip member, nested archive) becomes an error
  row; it never stops the rest of the batch. Only "too many files" refuses the whole request.
"""

from __future__ import annotations

import io
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Iterable, Iterator

from celluscan.serving.limits import MB, ServingLimits

__all__ = [
    "Upload",
    "UploadError",
    "TooManyFilesError",
    "sanitise_filename",
    "collect_uploads",
    "is_zip",
]

MAX_NAME_CHARS = 200
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_EOCD = b"PK\x05\x06"
_JUNK_PARTS = ("__MACOSX",)
_JUNK_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")


@dataclass(frozen=True)
class UploadError:
    """Why one uploaded file could not be used. ``code`` is stable, ``message`` is for people."""

    code: str
    message: str


@dataclass(frozen=True)
class Upload:
    """One image to classify: a display name and its bytes, or the error that replaced them."""

    name: str
    data: bytes | None = None
    error: UploadError | None = None


class TooManyFilesError(ValueError):
    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(
            f"too many files: the limit is {limit} images per request (zip members included); "
            "split the upload into smaller batches"
        )


def _clean_component(text: str) -> str:
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if not unicodedata.category(ch).startswith("C") or ch.isspace()
    )
    kept = " ".join(kept.split())
    return "" if kept in (".", "..") else kept


def _shorten(name: str) -> str:
    if len(name) <= MAX_NAME_CHARS:
        return name
    suffix = PurePosixPath(name).suffix[:16]
    return name[: MAX_NAME_CHARS - len(suffix) - 1] + "…" + suffix


def sanitise_filename(raw: str | None, fallback: str = "upload") -> str:
    """A display-only name: the last path component, control characters removed, length capped.

    >>> sanitise_filename("../../etc/passwd")
    'passwd'
    >>> sanitise_filename("C:\\\\Users\\\\x\\\\cell\\x00.png")
    'cell.png'
    """
    base = (raw or "").replace("\\", "/").split("/")[-1]
    cleaned = _clean_component(base)
    return _shorten(cleaned) if cleaned else fallback


def _member_label(archive: str, member: str) -> str:
    parts = [_clean_component(p) for p in member.replace("\\", "/").split("/")]
    inner = "/".join(p for p in parts if p)
    return _shorten(f"{archive}/{inner or 'member'}")


def is_zip(head: bytes) -> bool:
    """True when the first bytes are a zip signature (the file name is not trusted)."""
    return head[:4] in _ZIP_MAGIC


def _zip_entry_count(data: bytes) -> int | None:
    """Entries declared in the end-of-central-directory record, read before zipfile parses
    the (possibly enormous) central directory. None when the record is not found."""
    start = max(0, len(data) - (22 + 65535))
    pos = data.rfind(_EOCD, start)
    if pos < 0 or pos + 22 > len(data):
        return None
    (total_entries,) = struct.unpack_from("<H", data, pos + 10)
    return total_entries


def _is_junk(member: str) -> bool:
    parts = PurePosixPath(member.replace("\\", "/")).parts
    if any(p in _JUNK_PARTS for p in parts):
        return True
    name = parts[-1] if parts else ""
    return name in _JUNK_NAMES or name.startswith("._")


class _Counter:
    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def add(self) -> None:
        self.count += 1
        if self.count > self.limit:
            raise TooManyFilesError(self.limit)


def _too_large(size: int, limit: int, what: str = "file") -> UploadError:
    return UploadError(
        "too_large", f"{what} is {size:,} bytes, over the limit of {limit:,} ({limit / MB:g} MB)"
    )


def _expand_zip(archive: str, data: bytes, limits: ServingLimits, counter: _Counter,
                budget: list[int]) -> Iterator[Upload]:
    declared = _zip_entry_count(data)
    if declared is not None and declared > 2 * limits.max_files + 100:
        # Far more entries than could ever be accepted: refuse before parsing them all.
        raise TooManyFilesError(limits.max_files)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, struct.error) as e:
        counter.add()
        yield Upload(archive, error=UploadError("bad_archive", f"not a readable zip archive: {e}"))
        return
    with zf:
        for info in zf.infolist():
            if info.is_dir() or _is_junk(info.filename):
                continue
            counter.add()
            label = _member_label(archive, info.filename)
            if info.flag_bits & 0x1:
                yield Upload(label, error=UploadError("bad_archive", "encrypted zip member; not supported"))
                continue
            if info.filename.lower().endswith(".zip"):
                yield Upload(label, error=UploadError("unsupported", "nested archives are not supported"))
                continue
            if info.file_size > limits.max_file_bytes:
                yield Upload(label, error=_too_large(info.file_size, limits.max_file_bytes))
                continue
            if info.file_size > budget[0]:
                yield Upload(label, error=UploadError(
                    "too_large",
                    f"the zip archives in this request expand to more than "
                    f"{limits.max_zip_uncompressed_bytes:,} bytes; member skipped"))
                continue
            try:
                with zf.open(info) as member:
                    content = member.read(limits.max_file_bytes + 1)
            except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError,
                    RuntimeError, ValueError, struct.error) as e:
                yield Upload(label, error=UploadError("bad_archive", f"cannot extract zip member: {e}"))
                continue
            if len(content) > limits.max_file_bytes:
                yield Upload(label, error=UploadError(
                    "too_large", f"member expands past the limit of {limits.max_file_bytes:,} bytes"))
                continue
            budget[0] -= len(content)
            yield Upload(label, data=content)


def _file_size(fh: BinaryIO) -> int:
    fh.seek(0, io.SEEK_END)
    size = fh.tell()
    fh.seek(0)
    return size


def collect_uploads(files: Iterable[tuple[str | None, BinaryIO]], limits: ServingLimits) -> list[Upload]:
    """Read uploaded files (name as sent by the client, open binary file) into :class:`Upload`s.

    Zips (recognised by their signature) are expanded in memory. Raises
    :class:`TooManyFilesError` when the images (zip members included) exceed
    ``limits.max_files``; every other problem becomes an error row for that file.
    """
    counter = _Counter(limits.max_files)
    budget = [limits.max_zip_uncompressed_bytes]
    out: list[Upload] = []
    for raw_name, fh in files:
        name = sanitise_filename(raw_name)
        size = _file_size(fh)
        head = fh.read(4)
        fh.seek(0)
        if is_zip(head):
            if size > limits.max_request_bytes:
                counter.add()
                out.append(Upload(name, error=_too_large(size, limits.max_request_bytes, "archive")))
                continue
            out.extend(_expand_zip(name, fh.read(), limits, counter, budget))
            continue
        counter.add()
        if size > limits.max_file_bytes:
            out.append(Upload(name, error=_too_large(size, limits.max_file_bytes)))
            continue
        out.append(Upload(name, data=fh.read()))
    return out
