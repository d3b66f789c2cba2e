"""REST API routes under ``/api/v1``: predict, differential, classes, health, offline docs.

Uploads arrive as ``multipart/form-data`` with one or more files under the field ``files``
(a zip counts as many). A batch answers HTTP 200 with a per-file ``error`` for files that
could not be used; only request-level problems are 4xx:

* 413 the request body, or every uploaded file, is over the size limit;
* 415 the body is not multipart/form-data;
* 422 no files, or more files than allowed;
* 400 a malformed multipart body;
* 503 the model is busy or the request ran past its time limit (retry later).

Uploaded file names are sanitised and echoed back; they are never used as paths.
"""

from __future__ import annotations

import html
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from celluscan.serving.differential import compute_differential
from celluscan.serving.knowledge import Knowledge
from celluscan.serving.middleware import RequestBodyTooLarge, error_body, too_large_body
from celluscan.serving.service import FileResult, ModelService, ServiceBusy, ServiceTimeout
from celluscan.serving.uploads import TooManyFilesError, Upload, collect_uploads
from celluscan.taxonomy import TAXONOMY

__all__ = ["create_api_router", "API_PREFIX", "render_docs_html"]

API_PREFIX = "/api/v1"
FIELD = "files"


class ApiError(Exception):
    """A request-level error with its HTTP status and JSON body."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        self.status = status
        self.body = error_body(code, message, **extra)
        super().__init__(message)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more images (PNG, JPEG, TIFF, BMP, WebP, GIF) "
                                           "or zip archives of images.",
                        }
                    },
                }
            }
        },
    }
}


async def _read_uploads(request: Request, service: ModelService) -> list[Upload]:
    limits = service.limits
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"send the images as multipart/form-data under the field '{FIELD}'")
    try:
        form = await request.form(max_files=limits.max_files, max_fields=limits.max_files + 32)
    except RequestBodyTooLarge as e:
        raise ApiError(413, **too_large_body(e.limit)["error"]) from None
    except StarletteHTTPException as e:
        detail = str(e.detail)
        if "Too many files" in detail:
            raise ApiError(422, "too_many_files",
                           f"too many files: the limit is {limits.max_files} per request",
                           limit=limits.max_files) from None
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {detail}") from None
    except Exception as e:  # python-multipart parse errors and the like: a client problem
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {type(e).__name__}: {e}") from None
    try:
        files = [v for v in form.getlist(FIELD) if isinstance(v, UploadFile)]
        if not files:
            others = sorted({k for k, v in form.multi_items() if isinstance(v, UploadFile)})
            hint = f" (files were sent under {', '.join(repr(o) for o in others)})" if others else ""
            raise ApiError(422, "no_files", f"no files: send one or more images under the "
                                            f"multipart field '{FIELD}'{hint}")
        pairs = [(f.filename, f.file) for f in files]
        try:
            return await service.run(collect_uploads, pairs, limits)
        except TooManyFilesError as e:
            raise ApiError(422, "too_many_files", str(e), limit=e.limit) from None
    finally:
        await form.close()


async def _classify(request: Request, service: ModelService) -> list[FileResult]:
    uploads = await _read_uploads(request, service)
    return await service.run(service.classify, uploads)


def _all_too_large(results: list[FileResult]) -> bool:
    return bool(results) and all(r.error is not None and r.error.code == "too_large" for r in results)


def _summary(results: list[FileResult]) -> dict[str, Any]:
    return {"n_files": len(results), "n_errors": sum(1 for r in results if not r.ok)}


def create_api_router(service: ModelService, knowledge: Knowledge) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)

    async def guarded(request: Request, handler) -> JSONResponse:
        try:
            return await handler()
        except ApiError as e:
            return e.response()
        except ServiceBusy as e:
            return JSONResponse(error_body("busy", str(e)), status_code=503, headers={"Retry-After": "5"})
        except ServiceTimeout as e:
            return JSONResponse(error_body("timeout", f"{e}; send fewer images per request or retry later"),
                                status_code=503, headers={"Retry-After": "10"})

    @router.post(
        "/predict",
        summary="Classify one or more cell images",
        description="Multipart upload, field `files` (repeat it for several files; zips are "
                    "expanded). Returns one result per image, in upload order: the class, its "
                    "calibrated probability, all class probabilities, the lineage group, whether "
                    "the model is uncertain (and the group-level answer), and whether the image "
                    "looks unlike the training data. Files that cannot be used get an `error` "
                    "instead; the request still succeeds.",
        openapi_extra=_MULTIPART_BODY,
        responses={413: {"description": "Request or every file too large"},
                   415: {"description": "Not multipart/form-data"},
                   422: {"description": "No files or too many files"},
                   503: {"description": "Busy or timed out; retry later"}},
    )
    async def predict(request: Request):
        async def handler() -> JSONResponse:
            results = await _classify(request, service)
            body = {"model": service.info.to_json(), **_summary(results),
                    "results": [r.to_json() for r in results]}
            return JSONResponse(body, status_code=413 if _all_too_large(results) else 200)

        return await guarded(request, handler)

    @router.post(
        "/differential",
        summary="Differential count and flags for a batch (smear) of cell images",
        description="Same upload as `/predict`. Returns counts and percentages per class and "
                    "per lineage group over the successfully classified images, the flags raised "
                    "by the knowledge-card rules (flags driven mostly by unfamiliar images are "
                    "marked `unreliable`), and the per-file results.",
        openapi_extra=_MULTIPART_BODY,
        responses={413: {"description": "Request or every file too large"},
                   422: {"description": "No files or too many files"},
                   503: {"description": "Busy or timed out; retry later"}},
    )
    async def differential(request: Request):
        async def handler() -> JSONResponse:
            results = await _classify(request, service)
            diff = compute_differential([r.prediction for r in results if r.ok], knowledge)
            body = {"model": service.info.to_json(), **_summary(results), **diff.to_dict(),
                    "notice": knowledge.notice, "note": knowledge.differential_note,
                    "results": [r.to_json() for r in results]}
            return JSONResponse(body, status_code=413 if _all_too_large(results) else 200)

        return await guarded(request, handler)

    @router.get("/classes", summary="The classes, in canonical (model output) order")
    async def classes() -> list[dict[str, Any]]:
        return [
            {"id": c.id, "index": c.index, "name": c.name, "code": c.code, "group": c.group,
             "group_name": TAXONOMY.groups[c.group].name}
            for c in TAXONOMY.classes
        ]

    @router.get("/health", summary="Server and model status")
    async def health() -> dict[str, Any]:
        info = service.info
        return {
            "status": "ok",
            "version": service.app_version,
            "model": info.name,
            "model_version": info.version,
            "classes": list(info.classes),
            "image_size": info.image_size,
            "execution_path": info.execution_path,
            "in_flight": service.in_flight,
            "limits": service.limits.describe(),
        }

    return router


def _schema_summary(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    return schema.get("type", "object")


def render_docs_html(openapi: dict[str, Any]) -> str:
    """A self-contained HTML page describing the API (no scripts, nothing from a CDN)."""
    e = html.escape
    info = openapi.get("info", {})
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(info.get('title', 'API'))} docs</title>",
        "<style>body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:60rem;"
        "margin:2rem auto;padding:0 1rem;line-height:1.45;color:#1f2937}"
        "code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;background:#f3f4f6;"
        "padding:.1rem .3rem;border-radius:4px}pre{padding:.8rem;overflow:auto}"
        ".ep{border:1px solid #d1d5db;border-radius:8px;padding:.8rem 1rem;margin:1rem 0}"
        ".m{font-weight:700;padding:.1rem .5rem;border-radius:4px;color:#fff;background:#2563eb}"
        ".m.post{background:#059669}</style></head><body>",
        f"<h1>{e(info.get('title', 'API'))} <small>{e(str(info.get('version', '')))}</small></h1>",
        f"<p>{e(info.get('description', ''))}</p>",
        f"<p>Machine-readable schema: <a href='{API_PREFIX}/openapi.json'>openapi.json</a>.</p>",
    ]
    for path, methods in openapi.get("paths", {}).items():
        for method, op in methods.items():
            parts.append("<div class='ep'>")
            parts.append(f"<p><span class='m {e(method)}'>{e(method.upper())}</span> "
                         f"<code>{e(path)}</code> — {e(op.get('summary', ''))}</p>")
            if op.get("description"):
                parts.append(f"<p>{e(op['description'])}</p>")
            body = op.get("requestBody", {}).get("content", {})
            for ctype, spec in body.items():
                props = spec.get("schema", {}).get("properties", {})
                fields = ", ".join(f"<code>{e(k)}</code> ({e(_schema_summary(v))})" for k, v in props.items())
                parts.append(f"<p>Body: <code>{e(ctype)}</code>{': ' + fields if fields else ''}</p>")
            responses = op.get("responses", {})
            if responses:
                items = "".join(f"<li><code>{e(str(code))}</code> {e(r.get('description', ''))}</li>"
                                for code, r in responses.items())
                parts.append(f"<ul>{items}</ul>")
            parts.append("</div>")
    example = json.dumps({"filename": "cell.png", "class": "myelocyte", "confidence": 0.41,
                          "uncertain": True, "group_answer": "Granulocytic precursor: myelocyte "
                          "or metamyelocyte — review recommended", "unfamiliar": False}, indent=2)
    parts += [
        "<h2>Example</h2>",
        f"<pre>curl -F files=@cell.png -F files=@smear.zip http://127.0.0.1:7860{API_PREFIX}/predict</pre>",
        f"<p>One result (abridged):</p><pre>{e(example)}</pre>",
        "</body></html>",
    ]
    return "".join(parts)

