"""`celluscan serve`: arguments, limits, clear failures, and a real (API-only) server start."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from celluscan.cli import main
from celluscan.serving import cli as serve_cli
from celluscan.serving.limits import MB, ServingLimits
from test_serving_helpers import make_model_dir, png_bytes


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_bind_loopback_with_default_limits():
    args = parse()
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)
    assert serve_cli.limits_from_args(args) == ServingLimits()


def test_limit_flags_reach_the_limits():
    args = parse("--max-file-mb", "2", "--max-files", "7", "--max-request-mb", "20",
                 "--max-pixels", "1000000", "--timeout", "9", "--max-waiting", "3", "--batch-size", "4")
    limits = serve_cli.limits_from_args(args)
    assert limits.max_file_bytes == 2 * MB and limits.max_files == 7
    assert limits.max_request_bytes == 20 * MB and limits.max_pixels == 1_000_000
    assert (limits.inference_timeout_s, limits.max_waiting_requests, limits.batch_size) == (9, 3, 4)


def test_invalid_limits_and_missing_model_fail_clearly(tmp_path, capsys):
    assert serve_cli.run(parse("--max-files", "0")) == 2
    assert "max_files" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert serve_cli.run(parse("--model", str(missing))) == 1
    err = capsys.readouterr().err
    assert "cannot load" in err and str(missing) in err


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False)])
def test_loopback_detection(host, loopback):
    assert serve_cli._is_loopback(host) is loopback


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--model", "--max-file-mb", "--max-files", "--timeout"):
        assert flag in out


def test_serve_starts_an_api_server_on_loopback(tmp_path):
    model = make_model_dir(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "celluscan", "serve", "--model", str(model), "--port", str(port), "--no-ui"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                health = httpx.get(f"{base}/api/v1/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.3)
        assert health.json()["image_size"] == 32
        r = httpx.post(f"{base}/api/v1/predict", files=[("files", ("a.png", png_bytes(1)))], timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["class"]
        assert httpx.get(f"{base}/", timeout=5).status_code == 404  # --no-ui: no web app
    finally:
        proc.terminate()
        proc.wait(15)
    assert f"http://127.0.0.1:{port}/" in proc.stdout.read().decode()
