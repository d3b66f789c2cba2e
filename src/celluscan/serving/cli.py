"""`celluscan serve`: the web app and REST API in one local server (loopback by default)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from celluscan.serving.limits import MB, ServingLimits

HELP = "start the web app (/) and REST API (/api/v1) on one local server (loopback by default)"

_DEFAULTS = ServingLimits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only). Binding "
                             "to another address exposes the server to the network.")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="model directory (default: the shipped model)")
    parser.add_argument("--no-ui", action="store_true", help="serve the REST API only")
    parser.add_argument("--tta", choices=("none", "flip", "d8"), default="none",
                        help="test-time augmentation for every upload (see `celluscan predict --tta`)")
    g = parser.add_argument_group("limits")
    g.add_argument("--max-file-mb", type=float, default=_DEFAULTS.max_file_bytes / MB,
                   help="largest image file (default %(default)g MB)")
    g.add_argument("--max-pixels", type=int, default=_DEFAULTS.max_pixels,
                   help="largest image width x height (default %(default)d)")
    g.add_argument("--max-files", type=int, default=_DEFAULTS.max_files,
                   help="most images per request, zip members included (default %(default)d)")
    g.add_argument("--max-request-mb", type=float, default=_DEFAULTS.max_request_bytes / MB,
                   help="largest request body (default %(default)g MB)")
    g.add_argument("--timeout", type=float, default=_DEFAULTS.inference_timeout_s,
                   help="seconds a REST request may spend classifying before a 503 (default %(default)g)")
    g.add_argument("--max-waiting", type=int, default=_DEFAULTS.max_waiting_requests,
                   help="requests that may wait for the model before new ones get 503 (default %(default)d)")
    g.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                   help="images per forward pass (default %(default)d)")


def limits_from_args(args: argparse.Namespace) -> ServingLimits:
    return ServingLimits(
        max_file_bytes=int(args.max_file_mb * MB),
        max_pixels=args.max_pixels,
        max_files=args.max_files,
        max_request_bytes=int(args.max_request_mb * MB),
        inference_timeout_s=args.timeout,
        max_waiting_requests=args.max_waiting,
        batch_size=args.batch_size,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from celluscan.serving.offline import disable_gradio_telemetry

    disable_gradio_telemetry()
    try:
        limits = limits_from_args(args)
    except ValueError as e:
        print(f"celluscan serve: {e}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"celluscan serve: --port must be 1-65535, got {args.port}", file=sys.stderr)
        return 2

    import uvicorn

    from celluscan.serving.app import create_app
    from celluscan.serving.service import ModelService

    try:
        service = ModelService.from_model_dir(args.model, limits, tta=args.tta)
    except (OSError, ValueError) as e:  # ModelDirError is a ValueError
        where = args.model or "the shipped default model"
        print(f"celluscan serve: cannot load {where}: {e}", file=sys.stderr)
        return 1
    app = create_app(service, with_ui=not args.no_ui)
    if not _is_loopback(args.host):
        print(f"WARNING: binding to {args.host} makes CelluScan reachable from the network. "
              "It has no authentication; use it only on a trusted network.", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"CelluScan: model {service.info.name}; web app http://{shown}:{args.port}/ , "
          f"REST API http://{shown}:{args.port}/api/v1/docs", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5, server_header=False)
    return 0
