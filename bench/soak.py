"""Soak test for `celluscan serve`: a bounded run of concurrent clients mixing good and bad requests.

Starts the server in a subprocess on 127.0.0.1 (a free port; the tiny random ``vit_test``
model unless ``--model`` is given) with small limits, so that every limit is hit cheaply::

    --max-file-mb 2 --max-request-mb 16 --max-files 64

Then ``--clients`` concurrent clients send requests for ``--seconds`` (default 60), drawn from a
fixed, seeded mix of good uploads and faults:

* good: single images, batches, ``/differential`` smears, ``/health``;
* bad files: every readable file of the test corpus (``tests/corpus.py``: empty, truncated,
  random bytes, text/HTML/PDF renamed, 1x1, a 30000x30000 PNG bomb, ...) alone or mixed into
  good batches; a file over the size limit; zips with broken, junk, traversing (``../../x``)
  and over-size members;
* bad requests: malformed multipart, wrong content type, no files, too many files;
* bad clients (raw sockets): a Content-Length far over the request limit, a client that
  disconnects half-way through its upload, one that sends half a header and leaves.

Every kind has the statuses it must get (e.g. a malformed body: 400; a lone over-size file:
413; a batch with broken files: 200 with a per-file error for each). The run fails (exit 1)
on any 5xx, transport error, unexpected status, wrong result count, a traceback in the
server log, or a server that died or stops answering ``/health``. It reports requests,
counts by status and kind, p50/p95/max latency, and the server's RSS at start, end and
peak (sampled every second), and writes ``soak.json`` + ``soak.png`` with ``--out-dir``.

    nice -n 19 .venv/bin/python bench/soak.py                      # 60 s, tiny model
    nice -n 19 .venv/bin/python bench/soak.py --seconds 600 --model runs/x/model --out-dir out/soak

Only ever talks to 127.0.0.1. Reuses the server/launch helpers of ``bench/serve_load.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from serve_load import HOST, REPO, Server, free_port, load_images, make_tiny_model, percentile, rss_mb

sys.path.insert(0, str(REPO / "tests"))
from corpus import expected_outcomes, make_corpus  # noqa: E402  (the shared bad-input corpus)

MB = 1024 * 1024
MAX_FILE_MB, MAX_REQUEST_MB, MAX_FILES = 2, 16, 64
SERVER_FLAGS = ["--no-ui", "--max-file-mb", str(MAX_FILE_MB), "--max-request-mb", str(MAX_REQUEST_MB),
                "--max-files", str(MAX_FILES)]


# ---- the request mix ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Payloads:
    good: list[tuple[str, bytes]]
    bad: list[tuple[str, bytes]]  # broken files: each must get a per-file error
    odd: list[tuple[str, bytes]]  # unusual but valid files (CMYK, 16-bit, EXIF, ...): classified
    oversize: tuple[str, bytes]


def build_payloads(tmp: Path) -> Payloads:
    files = make_corpus(tmp / "corpus")
    expected = expected_outcomes()
    bad, odd = [], []
    for case, path in sorted(files.items()):
        if not path.is_file() or path.is_symlink():
            continue
        outcome = expected[case].outcome
        if outcome == "ingested":
            odd.append((path.name, path.read_bytes()))
        elif outcome in ("rejected", "ignored"):
            bad.append((path.name, path.read_bytes()))
    good = load_images()
    oversize = ("over_limit.png", good[0][1] + b"\0" * (MAX_FILE_MB * MB))
    return Payloads(good=good, bad=bad, odd=odd, oversize=oversize)


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


@dataclass(frozen=True)
class Plan:
    """One request: what to send and what must come back."""

    kind: str
    path: str = "/api/v1/predict"
    files: tuple = ()  # multipart (field, (name, bytes, type)) entries
    content: bytes | None = None  # raw body instead of files
    content_type: str | None = None
    expect: tuple[int, ...] = (200,)
    n_results: int | None = None  # per-file results a 200 must carry
    n_errors: int | None = None  # ... and how many of them errors


def _multipart(entries) -> tuple:
    return tuple(("files", (name, data, "application/octet-stream")) for name, data in entries)


def make_plan(rng: random.Random, p: Payloads) -> Plan:
    roll = rng.random()
    if roll < 0.22:
        return Plan("good_single", files=_multipart([rng.choice(p.good)]), n_results=1, n_errors=0)
    if roll < 0.34:
        chosen = rng.sample(p.good, rng.randint(2, 8))
        return Plan("good_batch", files=_multipart(chosen), n_results=len(chosen), n_errors=0)
    if roll < 0.40:
        chosen = rng.sample(p.good, rng.randint(4, 8))
        return Plan("differential", path="/api/v1/differential", files=_multipart(chosen),
                    n_results=len(chosen), n_errors=0)
    if roll < 0.46:
        chosen = rng.sample(p.odd, rng.randint(1, 4))
        return Plan("odd_formats", files=_multipart(chosen), n_results=len(chosen), n_errors=0)
    if roll < 0.56:
        good, bad = rng.sample(p.good, rng.randint(1, 4)), rng.sample(p.bad, rng.randint(1, 4))
        mixed = good + bad
        rng.shuffle(mixed)
        return Plan("mixed_bad_files", files=_multipart(mixed), n_results=len(mixed), n_errors=len(bad))
    if roll < 0.64:
        return Plan("bad_file_alone", files=_multipart([rng.choice(p.bad)]), n_results=1, n_errors=1)
    if roll < 0.67:
        good = rng.choice(p.good)
        return Plan("oversize_in_batch", files=_multipart([p.oversize, good]), n_results=2, n_errors=1)
    if roll < 0.69:
        return Plan("oversize_alone", files=_multipart([p.oversize]), expect=(413,))
    if roll < 0.76:
        good = rng.sample(p.good, 2)
        bad = rng.sample([b for b in p.bad if not b[0].startswith(".")], 2)  # hidden names are zip junk
        members = [(f"smear/{n}", d) for n, d in good + bad]
        members += [("../../escape.png", good[0][1]), ("/etc/absolute.png", good[1][1]),
                    ("__MACOSX/._junk.png", b"junk"),
                    ("big.png", good[0][1] + b"\0" * (MAX_FILE_MB * MB + 1))]  # compresses to ~KB
        # junk is dropped; 4 good (2 + traversing + absolute) and 3 errors (2 bad + over-size)
        return Plan("zip_with_faults", files=_multipart([("smear.zip", _zip(members))]),
                    n_results=7, n_errors=3)
    if roll < 0.79:
        return Plan("too_many_files", files=_multipart([("x.png", b"1")] * (MAX_FILES + 1)), expect=(422,))
    if roll < 0.82:
        return Plan("no_files", content=b"", content_type="multipart/form-data; boundary=xyz", expect=(400, 422))
    if roll < 0.85:
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000)))
        return Plan("malformed_multipart", content=b"--xyz\r\n" + garbage,
                    content_type="multipart/form-data; boundary=xyz", expect=(400, 422))
    if roll < 0.88:
        return Plan("wrong_content_type", content=rng.choice(p.good)[1], content_type="image/png", expect=(415,))
    if roll < 0.91:
        return Plan("health", path="/api/v1/health")
    if roll < 0.94:
        return Plan("raw_huge_content_length", expect=(413,))
    if roll < 0.97:
        return Plan("raw_disconnect_mid_upload", expect=())
    return Plan("raw_half_header", expect=())


# ---- clients ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    status: int | str  # HTTP status, "closed" for a client that left, or a failure name
    latency_s: float
    t: float  # seconds since the start of the run
    ok: bool
    note: str = ""


async def _raw(plan: Plan, port: int, payloads: Payloads) -> tuple[int | str, str]:
    """Misbehaving clients on a bare socket. Returns (status or 'closed', note)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        head = f"POST /api/v1/predict HTTP/1.1\r\nHost: {HOST}\r\n"
        if plan.kind == "raw_huge_content_length":
            writer.write((head + "Content-Type: multipart/form-data; boundary=xyz\r\n"
                          f"Content-Length: {100 * 1024 * MB}\r\n\r\n").encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 30)
            parts = line.decode("latin-1").split()
            return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else f"bad_line:{line[:40]!r}"), ""
        if plan.kind == "raw_disconnect_mid_upload":
            name, data = payloads.good[0]
            body = (b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                    b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--xyz--\r\n")
            writer.write((head + "Content-Type: multipart/form-data; boundary=xyz\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n").encode() + body[: len(body) // 2])
            await writer.drain()
            return "closed", ""
        writer.write(head[: len(head) // 2].encode())  # raw_half_header
        await writer.drain()
        return "closed", ""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def _check(plan: Plan, status: int | str, body: dict | None) -> tuple[bool, str]:
    if status == "closed":
        return plan.expect == (), ""
    if not isinstance(status, int):
        return False, str(status)
    if status >= 500 or status not in plan.expect:
        return False, f"status {status} not in {plan.expect}"
    if status == 200 and plan.n_results is not None:
        results = (body or {}).get("results", [])
        errors = sum(1 for r in results if "error" in r)
        if len(results) != plan.n_results or (plan.n_errors is not None and errors != plan.n_errors):
            return False, f"{len(results)} results / {errors} errors, expected {plan.n_results} / {plan.n_errors}"
    return True, ""


async def client_loop(seed: int, base: str, port: int, payloads: Payloads, t0: float, deadline: float,
                      timeout_s: float) -> list[Outcome]:
    rng = random.Random(seed)
    out = []
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as client:
        while time.monotonic() < deadline:
            plan = make_plan(rng, payloads)
            start = time.monotonic()
            body = None
            try:
                if plan.kind.startswith("raw_"):
                    status, note = await _raw(plan, port, payloads)
                elif plan.kind == "health":
                    r = await client.get(plan.path)
                    status, note = r.status_code, ""
                elif plan.content is not None:
                    r = await client.post(plan.path, content=plan.content,
                                          headers={"content-type": plan.content_type})
                    status, note = r.status_code, ""
                else:
                    r = await client.post(plan.path, files=list(plan.files))
                    status, note = r.status_code, ""
                    if r.status_code == 200:
                        body = r.json()
            except (httpx.HTTPError, OSError, asyncio.TimeoutError) as e:
                status, note = type(e).__name__, str(e)[:200]
            ok, why = _check(plan, status, body)
            out.append(Outcome(plan.kind, status, time.monotonic() - start, start - t0, ok, why or note))
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append((time.monotonic() - self.t0, value))
            self.stop_event.wait(self.every_s)


# ---- report -------------------------------------------------------------------------------------


def plot(outcomes: list[Outcome], rss: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from celluscan.data.atomic import atomic_write_bytes

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True)
    try:
        for ok, colour, label in ((True, "#2563eb", "as expected"), (False, "#dc2626", "FAILED")):
            pts = [(o.t, 1000 * o.latency_s) for o in outcomes if o.ok is ok]
            if pts:
                ax1.scatter(*zip(*pts), s=6, c=colour, label=f"{label} ({len(pts)})", alpha=0.6)
        ax1.set_ylabel("latency (ms)")
        ax1.set_yscale("log")
        ax1.legend(loc="upper right")
        ax1.set_title("celluscan serve soak: every request (good and faulty) over time")
        if rss:
            ax2.plot(*zip(*rss), color="#059669")
        ax2.set_xlabel("seconds since start")
        ax2.set_ylabel("server RSS (MB)")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(path, buf.getvalue())
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: a tiny random vit_test model)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long clients keep sending (default 60)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, help="write soak.json and soak.png here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients must be >= 1 and --seconds > 0")

    with tempfile.TemporaryDirectory(prefix="celluscan-soak-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or make_tiny_model(tmp / "model")
        payloads = build_payloads(tmp)
        port = free_port()
        server = Server(model, port, tmp / "server.log", SERVER_FLAGS)
        try:
            health = server.wait_ready()
            r = httpx.get(f"{server.base}/api/v1/health", timeout=10)
            header_problems = [h for h in ("x-content-type-options", "content-security-policy",
                                           "x-frame-options", "referrer-policy") if h not in r.headers]
            if "server" in r.headers:
                header_problems.append(f"server header disclosed: {r.headers['server']}")
            sampler = RssSampler(server.proc.pid)
            sampler.start()
            rss_start = rss_mb(server.proc.pid)
            print(f"soak: server {server.base} model={health['model']} rss_start={rss_start and round(rss_start)} MB; "
                  f"{args.clients} clients for {args.seconds:g} s; {len(payloads.good)} good, "
                  f"{len(payloads.odd)} odd, {len(payloads.bad)} broken files", flush=True)
            t0 = time.monotonic()
            deadline = t0 + args.seconds

            async def run_all():
                parts = await asyncio.gather(*(client_loop(args.seed + i, server.base, port, payloads, t0, deadline,
                                                           args.request_timeout) for i in range(args.clients)))
                return [o for part in parts for o in part]

            outcomes = asyncio.run(run_all())
            wall = time.monotonic() - t0
            time.sleep(1.5)  # let the RSS sampler see the settled server
            alive = server.proc.poll() is None
            try:
                still_healthy = httpx.get(f"{server.base}/api/v1/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                still_healthy = False
            rss_end = rss_mb(server.proc.pid)
            sampler.stop_event.set()
            sampler.join(5)
        finally:
            server.stop()
        log_text = (tmp / "server.log").read_text(errors="replace")

    by_status = Counter(str(o.status) for o in outcomes)
    by_kind = Counter(o.kind for o in outcomes)
    failures = [o for o in outcomes if not o.ok]
    n_5xx = sum(1 for o in outcomes if isinstance(o.status, int) and o.status >= 500)
    tracebacks = log_text.count("Traceback")
    log_notes = [line for line in log_text.splitlines() if "WARNING" in line or "ERROR" in line]
    timed = [o.latency_s for o in outcomes if isinstance(o.status, int)]
    good_lat = [o.latency_s for o in outcomes if o.kind in ("good_single", "good_batch", "differential")]
    rss_peak = max((v for _, v in sampler.samples), default=None)
    summary = {
        "seconds": round(wall, 1), "clients": args.clients, "model": health["model"],
        "requests": len(outcomes), "requests_per_s": round(len(outcomes) / wall, 2),
        "by_status": dict(sorted(by_status.items())), "by_kind": dict(sorted(by_kind.items())),
        "p50_ms": round(1000 * percentile(timed, 0.5), 1), "p95_ms": round(1000 * percentile(timed, 0.95), 1),
        "max_ms": round(1000 * max(timed, default=float("nan")), 1),
        "good_p50_ms": round(1000 * percentile(good_lat, 0.5), 1),
        "good_p95_ms": round(1000 * percentile(good_lat, 0.95), 1),
        "rss_mb_start": rss_start and round(rss_start, 1), "rss_mb_end": rss_end and round(rss_end, 1),
        "rss_mb_peak": rss_peak and round(rss_peak, 1),
        "5xx": n_5xx, "unexpected": len(failures), "server_tracebacks": tracebacks,
        "server_log_warnings": len(log_notes), "server_log_sample": log_notes[:10],
        "server_alive": alive, "healthy_after": still_healthy, "header_problems": header_problems,
        "failures_sample": [asdict(o) for o in failures[:20]],
    }
    print(f"requests   {summary['requests']} in {summary['seconds']} s ({summary['requests_per_s']} req/s)")
    print(f"by status  {summary['by_status']}")
    print(f"by kind    {summary['by_kind']}")
    print(f"latency    all p50 {summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, max {summary['max_ms']} ms; "
          f"good uploads p50 {summary['good_p50_ms']} ms, p95 {summary['good_p95_ms']} ms")
    print(f"server RSS start {summary['rss_mb_start']} MB, end {summary['rss_mb_end']} MB, "
          f"peak {summary['rss_mb_peak']} MB; server log: {tracebacks} traceback(s), "
          f"{len(log_notes)} warning/error line(s)")
    if args.out_dir is not None:
        from celluscan.data.atomic import atomic_write_text

        atomic_write_text(args.out_dir / "soak.json", json.dumps(summary, indent=2) + "\n")
        plot(outcomes, sampler.samples, args.out_dir / "soak.png")
        print(f"wrote {args.out_dir / 'soak.json'} and {args.out_dir / 'soak.png'}")

    problems = []
    if not alive:
        problems.append("the server died")
    if not still_healthy:
        problems.append("the server stopped answering /health")
    if n_5xx:
        problems.append(f"{n_5xx} responses were 5xx")
    if failures:
        problems.append(f"{len(failures)} requests got an unexpected answer, e.g. "
                        + "; ".join(f"{o.kind}: {o.status} {o.note}" for o in failures[:5]))
    if tracebacks:
        problems.append(f"{tracebacks} traceback(s) in the server log")
    if header_problems:
        problems.append(f"response headers: {header_problems}")
    if not outcomes:
        problems.append("no request was sent")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if problems:
        return 1
    print("OK: zero 5xx, every request answered as expected, server alive and healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
