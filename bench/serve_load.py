"""Load test for `celluscan serve`: concurrent clients against a real server on loopback.

Starts the server in a subprocess (127.0.0.1, a free port), measures a sequential baseline
(one client) and then N concurrent clients x M requests each, with a fixed mix of single
images, small batches, batches with broken files mixed in, broken single files and
/differential calls. Reports p50/p95 latency, throughput, counts by HTTP status and the
server's RSS at start and end; fails (exit 1) on any 5xx or transport error.

    python bench/serve_load.py --tiny                 # tiny random model (fast smoke run)
    python bench/serve_load.py --model runs/x/model   # a real model
    python bench/serve_load.py --tiny --clients 8 --requests 5 --out-dir out/serve_load

Only ever talks to 127.0.0.1. Bounded by --max-seconds (stops issuing requests after it).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


# ---- server ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        pass
    except Exception:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def make_tiny_model(path: Path) -> Path:
    import torch

    from celluscan.models import create_model, save_model_dir
    from celluscan.taxonomy import CLASSES

    torch.manual_seed(0)
    return save_model_dir(create_model("vit_test"), path, class_names=list(CLASSES),
                          preprocessing={"image_size": 32, "pad_fill": "edge", "mean": [0.5] * 3,
                                         "std": [0.25] * 3, "temperature": 1.0},
                          metadata={"name": "vit_test-random"})


class Server:
    def __init__(self, model: Path | None, port: int, log_path: Path, extra: list[str]):
        cmd = [sys.executable, "-m", "celluscan", "serve", "--host", HOST, "--port", str(port), *extra]
        if model is not None:
            cmd += ["--model", str(model)]
        self.base = f"http://{HOST}:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()}")
            try:
                r = httpx.get(f"{self.base}/api/v1/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


# ---- request mix -------------------------------------------------------------------------------


def load_images(n: int = 16) -> list[tuple[str, bytes]]:
    """Bundled sample images when present (real sizes), else generated ones."""
    samples = REPO / "src" / "celluscan" / "assets" / "samples"
    files = sorted(p for p in samples.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if files:
        return [(p.name, p.read_bytes()) for p in files[:n]]
    import numpy as np
    from PIL import Image

    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(arr).resize((360, 360), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((f"gen{i}.jpg", buf.getvalue()))
    return out


BROKEN = [
    ("empty.png", b""),
    ("random.jpg", bytes(random.Random(1).randrange(256) for _ in range(2048))),
    ("notes.png", b"just text, not an image\n" * 10),
    ("truncated.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 100),
]


@dataclass
class Result:
    kind: str
    status: int | str  # HTTP status, or the transport error's name
    latency_s: float
    n_files: int


def build_request(rng: random.Random, images: list[tuple[str, bytes]]) -> tuple[str, str, list]:
    """(kind, path, multipart files) drawn from a fixed mix."""
    roll = rng.random()
    if roll < 0.50:
        kind, chosen = "single", [rng.choice(images)]
    elif roll < 0.75:
        kind, chosen = "batch", rng.sample(images, rng.randint(2, 8))
    elif roll < 0.85:
        kind, chosen = "batch+broken", rng.sample(images, rng.randint(1, 4)) + rng.sample(BROKEN, 2)
    elif roll < 0.90:
        kind, chosen = "broken", [rng.choice(BROKEN)]
    else:
        kind, chosen = "differential", rng.sample(images, rng.randint(4, 8))
    path = "/api/v1/differential" if kind == "differential" else "/api/v1/predict"
    return kind, path, [("files", (name, data, "application/octet-stream")) for name, data in chosen]


async def client_loop(base: str, seed: int, n_requests: int, images, deadline: float,
                      timeout_s: float) -> list[Result]:
    rng = random.Random(seed)
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as client:
        for _ in range(n_requests):
            if time.monotonic() > deadline:
                break
            kind, path, files = build_request(rng, images)
            start = time.perf_counter()
            try:
                r = await client.post(path, files=files)
                status: int | str = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    if body["n_files"] != len(files):
                        status = "wrong_result_count"
            except httpx.HTTPError as e:
                status = type(e).__name__
            out.append(Result(kind, status, time.perf_counter() - start, len(files)))
    return out


async def run_phase(base: str, clients: int, requests: int, images, max_seconds: float,
                    timeout_s: float, seed: int) -> tuple[list[Result], float]:
    deadline = time.monotonic() + max_seconds
    start = time.perf_counter()
    parts = await asyncio.gather(*(client_loop(base, seed + i, requests, images, deadline, timeout_s)
                                   for i in range(clients)))
    return [r for p in parts for r in p], time.perf_counter() - start


@dataclass
class PhaseSummary:
    clients: int
    requests: int
    wall_s: float
    p50_ms: float
    p95_ms: float
    max_ms: float
    requests_per_s: float
    images_per_s: float
    by_status: dict = field(default_factory=dict)
    by_kind_p50_ms: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def summarise(results: list[Result], clients: int, wall: float) -> PhaseSummary:
    lat = [r.latency_s for r in results]
    kinds = sorted({r.kind for r in results})
    return PhaseSummary(
        clients=clients,
        requests=len(results),
        wall_s=round(wall, 2),
        p50_ms=round(1000 * percentile(lat, 0.50), 1),
        p95_ms=round(1000 * percentile(lat, 0.95), 1),
        max_ms=round(1000 * max(lat, default=float("nan")), 1),
        requests_per_s=round(len(results) / wall, 2) if wall > 0 else 0.0,
        images_per_s=round(sum(r.n_files for r in results) / wall, 2) if wall > 0 else 0.0,
        by_status={str(k): v for k, v in sorted(Counter(str(r.status) for r in results).items())},
        by_kind_p50_ms={k: round(1000 * percentile([r.latency_s for r in results if r.kind == k], 0.5), 1)
                        for k in kinds},
    )


def plot(load: list[Result], baseline: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from celluscan.data.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        data = [[1000 * r.latency_s for r in baseline], [1000 * r.latency_s for r in load]]
        ax.hist(data, bins=40, label=["sequential baseline", "concurrent load"], alpha=0.8)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title("celluscan serve: request latency")
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(path, buf.getvalue())
    finally:
        plt.close(fig)


def print_phase(name: str, s: PhaseSummary) -> None:
    print(f"{name:<11} clients={s.clients:<3} requests={s.requests:<5} wall={s.wall_s:>7.2f}s "
          f"p50={s.p50_ms:>8.1f}ms p95={s.p95_ms:>8.1f}ms max={s.max_ms:>8.1f}ms "
          f"{s.requests_per_s:>7.2f} req/s {s.images_per_s:>7.2f} img/s  status={s.by_status}")
    print(f"{'':<11} p50 by kind (ms): {s.by_kind_p50_ms}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    src.add_argument("--tiny", action="store_true", help="use a tiny random vit_test model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--baseline-requests", type=int, default=20, help="sequential baseline requests")
    ap.add_argument("--max-seconds", type=float, default=300, help="stop issuing requests after this")
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--no-ui", action="store_true", help="serve the API only")
    ap.add_argument("--out-dir", type=Path, help="write results.json and latency.png here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        ap.error("--clients and --requests must be >= 1")

    with tempfile.TemporaryDirectory(prefix="celluscan-bench-") as tmp:
        model = make_tiny_model(Path(tmp) / "model") if args.tiny else args.model
        images = load_images()
        server = Server(model, free_port(), Path(tmp) / "server.log", ["--no-ui"] if args.no_ui else [])
        try:
            health = server.wait_ready()
            rss_start = rss_mb(server.proc.pid)
            print(f"server {server.base} model={health['model']} image_size={health['image_size']} "
                  f"rss_start={rss_start and round(rss_start)} MB; {len(images)} distinct images")
            # Warm-up (first-call costs), then the sequential baseline, then the load.
            asyncio.run(run_phase(server.base, 1, 3, images, 60, args.request_timeout, args.seed + 999))
            base_res, base_wall = asyncio.run(run_phase(
                server.base, 1, args.baseline_requests, images, args.max_seconds, args.request_timeout,
                args.seed + 10_000))
            load_res, load_wall = asyncio.run(run_phase(
                server.base, args.clients, args.requests, images, args.max_seconds, args.request_timeout,
                args.seed))
            rss_end = rss_mb(server.proc.pid)
            alive = server.proc.poll() is None
        finally:
            server.stop()

    baseline = summarise(base_res, 1, base_wall)
    load = summarise(load_res, args.clients, load_wall)
    print_phase("baseline", baseline)
    print_phase("load", load)
    ratio_p50 = load.p50_ms / baseline.p50_ms if baseline.p50_ms else float("nan")
    ratio_tput = load.requests_per_s / baseline.requests_per_s if baseline.requests_per_s else float("nan")
    print(f"ratios vs sequential baseline: p50 latency x{ratio_p50:.2f}, throughput x{ratio_tput:.2f}")
    print(f"server RSS: start {rss_start and round(rss_start)} MB, end {rss_end and round(rss_end)} MB")

    bad = {k: v for k, v in load.by_status.items() if not (k.isdigit() and int(k) < 500)}
    bad.update({k: v for k, v in baseline.by_status.items() if not (k.isdigit() and int(k) < 500)})
    planned = args.clients * args.requests
    if args.out_dir is not None:
        from celluscan.data.atomic import atomic_write_text

        report = {"health": health, "baseline": asdict(baseline), "load": asdict(load),
                  "ratio_p50_latency": round(ratio_p50, 3), "ratio_throughput": round(ratio_tput, 3),
                  "rss_mb_start": rss_start, "rss_mb_end": rss_end, "planned_requests": planned}
        atomic_write_text(args.out_dir / "results.json", json.dumps(report, indent=2) + "\n")
        plot(load_res, base_res, args.out_dir / "latency.png")
        print(f"wrote {args.out_dir / 'results.json'} and {args.out_dir / 'latency.png'}")
    if load.requests < planned:
        print(f"note: {planned - load.requests} requests not sent (--max-seconds reached)")
    if not alive:
        print("FAIL: the server died during the run", file=sys.stderr)
        return 1
    if bad:
        print(f"FAIL: 5xx or transport errors: {bad}", file=sys.stderr)
        return 1
    print("OK: zero 5xx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
