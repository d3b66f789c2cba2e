"""The FastAPI application: REST API under ``/api/v1`` and the Gradio web UI at ``/``.

Offline by construction: Gradio analytics are switched off before Gradio is imported, the
UI theme uses system fonts only, FastAPI's CDN-backed Swagger/ReDoc pages are replaced by a
self-contained docs page, and the Content-Security-Policy allows no third-party origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from celluscan import __version__
from celluscan.serving.api import API_PREFIX, create_api_router, render_docs_html
from celluscan.serving.knowledge import Knowledge, load_knowledge
from celluscan.serving.middleware import BodySizeLimitMiddleware, SecurityHeadersMiddleware, error_body
from celluscan.serving.offline import disable_gradio_telemetry
from celluscan.serving.service import ModelService

__all__ = ["create_app"]

DESCRIPTION = (
    "Classify single blood-cell microscope images into 14 classes and count a smear. "
    "Research and education only; not a diagnosis."
)


def create_app(service: ModelService, knowledge: Knowledge | None = None, *, with_ui: bool = True,
               samples_dir: str | Path | None = None) -> FastAPI:
    """Build the app around a :class:`ModelService`. ``with_ui=False`` serves the API only."""
    kb = knowledge if knowledge is not None else load_knowledge()
    app = FastAPI(
        title="CelluScan API",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url=f"{API_PREFIX}/openapi.json",
    )
    app.state.service = service
    app.state.knowledge = kb

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", "the request is not valid",
                                       details=jsonable_errors(exc.errors())), status_code=422)

    app.include_router(create_api_router(service, kb))

    @app.get(f"{API_PREFIX}/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_docs_html(app.openapi()))

    if with_ui:
        _mount_ui(app, service, kb, samples_dir)

    # add_middleware wraps the app: the last added runs first. Security headers go outermost so
    # that even the body-limit middleware's own 413 answers carry them.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=service.limits.max_request_bytes)
    app.add_middleware(SecurityHeadersMiddleware, api_prefix=f"{API_PREFIX}/")
    return app


def jsonable_errors(errors: Any) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        out.append({"loc": [str(x) for x in err.get("loc", ())], "msg": str(err.get("msg", ""))})
    return out


def _mount_ui(app: FastAPI, service: ModelService, kb: Knowledge, samples_dir: str | Path | None) -> None:
    disable_gradio_telemetry()
    import gradio as gr

    from celluscan.serving.ui import UI_CSS, build_ui, offline_theme, resolve_samples_dir

    samples = resolve_samples_dir(samples_dir)
    blocks = build_ui(service, kb, samples)
    allowed = [str(samples)] if samples is not None else []
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        server_name="127.0.0.1",
        footer_links=[],
        allowed_paths=allowed,
        max_file_size=service.limits.max_request_bytes,
        ssr_mode=False,
        mcp_server=False,
        theme=offline_theme(),
        css=UI_CSS,
        run_history=False,
    )
