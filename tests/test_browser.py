"""End to end in a real browser: `celluscan serve` in a subprocess, driven by Chromium.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``) and the
``playwright`` package; skips cleanly without them. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from celluscan.serving.ui import UNFAMILIAR_MESSAGE, resolve_samples_dir, sample_images
from test_serving_helpers import make_model_dir, png_bytes, zip_bytes

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("m") / "model", force_class="eosinophil")
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celluscan", "serve", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not start in 90 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture()
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 1100})
            pg.offsite_requests = []
            pg.console_errors = []
            pg.on("request", lambda r: pg.offsite_requests.append(r.url)
                  if not r.url.startswith((server, "data:", "blob:")) else None)
            pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
            pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
            yield pg
        finally:
            browser.close()


def _sample_image(tmp_path: Path) -> Path:
    samples = sample_images(resolve_samples_dir())
    if samples:
        return dict(samples).get("eosinophil", samples[0][1])
    p = tmp_path / "cell.png"
    p.write_bytes(png_bytes(1, 90, 80))
    return p


def test_single_cell_view(server, page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(server + "/", wait_until="networkidle")
    page.locator("#cs-cell-input input[type=file]").set_input_files(str(_sample_image(tmp_path)))
    page.locator("#cs-cell-input img").first.wait_for(timeout=20_000)  # upload preview shown
    page.click("#cs-classify")
    page.wait_for_selector("#cs-result .cs-headline", timeout=60_000)
    page.wait_for_selector("#cs-heatmap img", timeout=30_000)
    page.wait_for_selector("#cs-card h3", timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "browser_single_cell.png"), full_page=True)

    assert page.inner_text("#cs-result .cs-headline").strip() == "Eosinophil"
    rows = page.locator("#cs-result .cs-top3-row")
    assert rows.count() == 3
    pcts = [rows.nth(i).locator(".cs-pct").inner_text() for i in range(3)]
    assert all(p.endswith("%") for p in pcts) and float(pcts[0][:-1]) > 90
    assert UNFAMILIAR_MESSAGE not in page.inner_text("#cs-result")
    heat = page.locator("#cs-heatmap img").first
    assert heat.get_attribute("src") and heat.evaluate("el => el.naturalWidth") > 0
    assert page.inner_text("#cs-card h3").strip() == "Eosinophil"
    assert page.offsite_requests == []
    assert not [e for e in page.console_errors if "Content Security Policy" in e]


def test_smear_view(server, page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    files = []
    for i in range(3):
        p = tmp_path / f"cell{i}.png"
        p.write_bytes(png_bytes(i, 60, 60))
        files.append(str(p))
    z = tmp_path / "batch.zip"
    z.write_bytes(zip_bytes({f"z{i}.png": png_bytes(10 + i) for i in range(3)} | {"notes.txt": b"x"}))
    files.append(str(z))
    page.goto(server + "/", wait_until="networkidle")
    page.get_by_role("tab", name="Smear (batch)").click()
    page.locator("#cs-smear-input input[type=file]").set_input_files(files)
    page.wait_for_timeout(1500)
    page.click("#cs-count")
    page.wait_for_selector("#cs-flags .cs-flag", timeout=60_000)
    page.wait_for_selector("#cs-chart img", timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "browser_smear.png"), full_page=True)
    assert "Eosinophils above 6%" in page.inner_text("#cs-flags")
    assert "6 of 7 file(s) classified" in page.inner_text("#cs-smear-summary")
    assert "batch.zip/notes.txt" in page.inner_text("#cs-predictions")
    assert page.locator("#cs-csv a").count() >= 2 or "csv" in page.inner_text("#cs-csv").lower()
    assert page.offsite_requests == []
