"""ASGI middleware for the server: safe response headers and a request-body size limit.

Both are plain ASGI (no BaseHTTPMiddleware), so they wrap the REST API and the mounted
Gradio app alike and never buffer a response.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, MutableMapping

__all__ = [
    "SecurityHeadersMiddleware",
    "BodySizeLimitMiddleware",
    "RequestBodyTooLarge",
    "CONTENT_SECURITY_POLICY",
    "error_body",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Everything the page needs comes from this server: scripts, styles, fonts, images and
# API calls. Inline scripts/styles are needed by the Gradio front end; data:/blob: images
# by image previews. No third-party origin is allowed, so nothing is fetched from a CDN.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self' 'unsafe-inline'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "font-src 'self' data:",
    "media-src 'self' data: blob:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "frame-src 'self'",
    "frame-ancestors 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
])

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON shape of every API error: ``{"error": {"code": ..., "message": ...}}``."""
    return {"error": {"code": code, "message": message, **extra}}


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response (existing values are replaced)."""

    def __init__(self, app: ASGIApp, api_prefix: str = "/api/"):
        self.app = app
        self.api_prefix = api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_api = scope.get("path", "").startswith(self.api_prefix)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                if is_api:
                    names.add(b"cache-control")
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                headers.extend(SECURITY_HEADERS)
                if is_api:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestBodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"request body is over the limit of {limit:,} bytes")


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": payload})


def too_large_body(limit: int) -> dict[str, Any]:
    return error_body(
        "request_too_large",
        f"request body is over the limit of {limit:,} bytes ({limit / (1024 * 1024):g} MB); "
        "send fewer or smaller files per request",
        limit_bytes=limit,
    )


class BodySizeLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 JSON.

    A declared Content-Length over the limit is refused before the body is read; a body
    streamed without one is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, error_body("bad_request", "invalid Content-Length"))
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, too_large_body(self.max_bytes))
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestBodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestBodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, too_large_body(self.max_bytes))
