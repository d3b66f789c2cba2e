"""Serving limits: how much one request may upload and how long it may take.

One frozen dataclass, filled from CLI flags by ``celluscan serve`` and used by the REST API,
the web UI and the upload/zip expansion alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from celluscan.data.imageio import ImageLimits

__all__ = ["ServingLimits", "MB"]

MB = 1024 * 1024


@dataclass(frozen=True)
class ServingLimits:
    """Limits applied to every upload (REST API and web UI).

    max_file_bytes: largest single image (also each image inside a zip).
    max_pixels: largest width x height of an image, checked from the header before decoding.
    max_files: most images in one request, counting the members of uploaded zips.
    max_request_bytes: largest request body (the sum of all uploads, zips as uploaded).
    max_zip_uncompressed_bytes: most bytes extracted (in memory) from the zips of one request.
    inference_timeout_s: a request whose classification takes longer is answered 503.
    max_waiting_requests: requests queued behind the running one; more are answered 503.
    batch_size: images classified together in one forward pass.
    """

    max_file_bytes: int = 10 * MB
    max_pixels: int = 25_000_000
    max_files: int = 500
    max_request_bytes: int = 200 * MB
    max_zip_uncompressed_bytes: int = 500 * MB
    inference_timeout_s: float = 120.0
    max_waiting_requests: int = 32
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_pixels", "max_files", "max_request_bytes",
                     "max_zip_uncompressed_bytes", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"serving limit {name} must be a positive integer, got {value!r}")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if not self.inference_timeout_s > 0:
            raise ValueError(f"inference_timeout_s must be positive, got {self.inference_timeout_s}")

    def image_limits(self) -> ImageLimits:
        """The limits handed to :func:`celluscan.data.imageio.load_image_bytes`."""
        return ImageLimits(max_bytes=self.max_file_bytes, max_pixels=self.max_pixels)

    def describe(self) -> dict[str, float | int]:
        return {
            "max_file_mb": round(self.max_file_bytes / MB, 2),
            "max_pixels": self.max_pixels,
            "max_files": self.max_files,
            "max_request_mb": round(self.max_request_bytes / MB, 2),
            "inference_timeout_s": self.inference_timeout_s,
        }
