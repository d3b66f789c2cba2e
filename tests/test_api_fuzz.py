"""Property tests: no upload, however malformed, makes the API answer 5xx."""

from __future__ import annotations

import unicodedata

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celluscan.serving.app import create_app
from celluscan.serving.limits import ServingLimits
from celluscan.serving.service import ModelService
from test_serving_helpers import make_model_dir, png_bytes, zip_bytes

API = "/api/v1"
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("m") / "model")
    limits = ServingLimits(max_file_bytes=100_000, max_files=10, max_request_bytes=1_000_000)
    return TestClient(create_app(ModelService.from_model_dir(model, limits), with_ui=False),
                      raise_server_exceptions=False)


def _mutate(data: bytes, cuts: list[int], flips: list[int]) -> bytes:
    buf = bytearray(data)
    for pos in flips:
        if buf:
            buf[pos % len(buf)] ^= 0xFF
    for cut in cuts:
        if buf:
            del buf[cut % len(buf):]
    return bytes(buf)


file_bytes = st.one_of(
    st.binary(max_size=3000),
    st.builds(_mutate, st.sampled_from([png_bytes(1), png_bytes(2, fmt="JPEG"), png_bytes(3, fmt="GIF"),
                                        zip_bytes({"a.png": png_bytes(4), "b.png": b"x"})]),
              st.lists(st.integers(0, 10_000), max_size=1), st.lists(st.integers(0, 10_000), max_size=4)),
)
names = st.text(max_size=80)


@FUZZ
@given(st.lists(st.tuples(names, file_bytes), min_size=1, max_size=6))
def test_any_files_get_per_file_answers(client, uploads):
    r = client.post(f"{API}/predict",
                    files=[("files", (n or "x", d, "application/octet-stream")) for n, d in uploads])
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        results = r.json()["results"]
        assert all(("class" in x) != ("error" in x) for x in results)
        for x in results:  # echoed names are display labels: no traversal, no control characters
            name = x["filename"]
            assert name and not name.startswith("/") and "\\" not in name
            assert ".." not in name.split("/")
            assert not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in name)


@FUZZ
@given(st.binary(max_size=4000), st.sampled_from([
    "multipart/form-data; boundary=b", "multipart/form-data", "multipart/form-data; boundary=",
    "multipart/form-data; boundary=\"weird\"", "application/json", "text/plain", "",
]))
def test_any_raw_body_is_never_a_server_error(client, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/predict", "/differential"):
        r = client.post(f"{API}{path}", content=body, headers=headers)
        assert r.status_code < 500, (path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
