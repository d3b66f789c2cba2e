"""Single-image latency of the REST API the app serves: p50/p95 of one upload.

    python bench/app_latency.py [--model DIR] [--requests 50] [--json OUT.json]

Builds the same FastAPI app `celluscan serve` runs (API only, in-process through Starlette's
TestClient, so no network stack is timed) around the shipped model (or ``--model``) and posts
one bundled sample JPEG per request to ``/api/v1/predict``, cycling through the samples. Each
request decodes, preprocesses (nucleus framing included), classifies and scores the image.
Reports the median and 95th percentile after warm-up, and the predictor's own time for the
same image as the floor, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "src" / "celluscan" / "assets" / "samples"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from fastapi.testclient import TestClient
    from serve_load import percentile  # bench/ is on sys.path when this script runs


    from celluscan.data.imageio import load_image
    from celluscan.serving.app import create_app
    from celluscan.serving.service import ModelService

    files = sorted(SAMPLES.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no sample images under {SAMPLES}")
    service = ModelService.from_model_dir(args.model)
    client = TestClient(create_app(service, with_ui=False))
    payloads = [(f.name, f.read_bytes()) for f in files]

    def post(i: int) -> float:
        name, data = payloads[i % len(payloads)]
        start = time.perf_counter()
        r = client.post("/api/v1/predict", files={"files": (name, data, "image/jpeg")})
        elapsed = time.perf_counter() - start
        if r.status_code != 200 or r.json()["results"][0].get("error"):
            raise SystemExit(f"request {i} failed: {r.status_code} {r.text[:200]}")
        return elapsed

    for i in range(args.warmup):
        post(i)
    api = [post(i) for i in range(args.requests)]
    images = [load_image(f) for f in files]
    predictor = service.predictor
    floor = []
    for i in range(args.requests):
        start = time.perf_counter()
        predictor.predict_images([images[i % len(images)]])
        floor.append(time.perf_counter() - start)
    result = {
        "model": str(args.model or "shipped"), "requests": args.requests,
        "api_ms": {"p50": 1e3 * statistics.median(api), "p95": 1e3 * percentile(api, 0.95),
                   "max": 1e3 * max(api)},
        "predictor_ms": {"p50": 1e3 * statistics.median(floor), "p95": 1e3 * percentile(floor, 0.95)},
        "loadavg": os.getloadavg(),
    }
    print(f"one upload via /api/v1/predict: p50 {result['api_ms']['p50']:.1f} ms, "
          f"p95 {result['api_ms']['p95']:.1f} ms, max {result['api_ms']['max']:.1f} ms "
          f"({args.requests} requests)")
    print(f"predictor alone, same images: p50 {result['predictor_ms']['p50']:.1f} ms, "
          f"p95 {result['predictor_ms']['p95']:.1f} ms; load average {result['loadavg'][0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
