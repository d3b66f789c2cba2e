"""REST API (FastAPI TestClient, tiny model): results, per-file errors, limits, flags, headers."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from celluscan.serving.app import create_app
from celluscan.serving.limits import ServingLimits
from celluscan.serving.service import ModelService
from celluscan.taxonomy import CLASSES, TAXONOMY
from corpus import expected_outcomes, make_corpus
from test_serving_helpers import make_model_dir, png_bytes, zip_bytes

API = "/api/v1"
SMALL = ServingLimits(max_file_bytes=200_000, max_files=40, max_request_bytes=2_000_000,
                      inference_timeout_s=30)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"random": make_model_dir(root / "random"),
            "blast": make_model_dir(root / "blast", force_class="myeloblast")}


def _client(model_dir, limits=SMALL) -> TestClient:
    service = ModelService.from_model_dir(model_dir, limits)
    return TestClient(create_app(service, with_ui=False), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(model_dirs):
    return _client(model_dirs["random"])


@pytest.fixture(scope="module")
def blast_client(model_dirs):
    return _client(model_dirs["blast"])


def files(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def assert_security_headers(resp) -> None:
    h = resp.headers
    assert h["x-content-type-options"] == "nosniff"
    assert h["x-frame-options"] in ("DENY", "SAMEORIGIN")
    assert h["referrer-policy"] == "no-referrer"
    csp = h["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors" in csp and "http" not in csp


# ---- metadata endpoints -------------------------------------------------------------------------


def test_classes_in_canonical_order(client):
    r = client.get(f"{API}/classes")
    assert r.status_code == 200
    body = r.json()
    assert [c["id"] for c in body] == list(CLASSES)
    assert body[8] == {"id": "myeloblast", "index": 8, "name": "Myeloblast", "code": "MYB",
                       "group": "blast", "group_name": "Blast"}


def test_health(client):
    r = client.get(f"{API}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "tiny-random"
    assert body["classes"] == list(CLASSES) and body["image_size"] == 32
    assert body["version"] and body["model_version"].startswith("sha256:")
    assert_security_headers(r)
    assert r.headers["cache-control"] == "no-store"


# ---- /predict -----------------------------------------------------------------------------------


def test_predict_one_image(client):
    r = client.post(f"{API}/predict", files=files(("cell.png", png_bytes(1))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_files"] == 1 and body["n_errors"] == 0 and body["model"]["name"] == "tiny-random"
    (res,) = body["results"]
    assert res["filename"] == "cell.png"
    assert list(res["probabilities"]) == list(CLASSES)
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert res["class"] == max(res["probabilities"], key=res["probabilities"].get)
    assert res["confidence"] == pytest.approx(res["probabilities"][res["class"]])
    assert res["group"] == TAXONOMY.group_of(res["class"])
    assert [t["class"] for t in res["top_k"]][0] == res["class"] and len(res["top_k"]) == 3
    # A random 14-class model is never confident: it must say so.
    assert res["uncertain"] is True and "low confidence" in res["uncertain_reason"]
    assert isinstance(res["unfamiliar"], bool)
    assert_security_headers(r)


def test_predict_is_deterministic_and_keeps_upload_order(client):
    batch = files(*[(f"c{i}.png", png_bytes(i)) for i in range(5)])
    a = client.post(f"{API}/predict", files=batch).json()["results"]
    b = client.post(f"{API}/predict", files=list(reversed(batch))).json()["results"]
    assert [x["filename"] for x in a] == [f"c{i}.png" for i in range(5)]
    assert [x["probabilities"] for x in a] == [x["probabilities"] for x in reversed(b)]


def test_corpus_of_broken_and_odd_files_gives_per_file_results(client, tmp_path):
    paths = make_corpus(tmp_path / "corpus")
    expected = expected_outcomes()
    usable = {k: p for k, p in paths.items() if p.is_file() and not p.is_symlink()}
    r = client.post(f"{API}/predict", files=files(*[(p.name, p.read_bytes()) for p in usable.values()]))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(usable)
    for (case, path), res in zip(usable.items(), results):
        assert res["filename"] == path.name
        exp = expected[case]
        if exp.outcome == "ingested":
            assert "class" in res and "error" not in res, (case, res)
        elif exp.outcome == "rejected":
            msg = res["error"]["message"].lower()
            assert any(reason in msg for reason in exp.reasons), (case, msg)
        else:  # hidden / text files: uploaded directly they are simply not images
            assert res["error"]["code"] == "invalid_image", (case, res)


def test_uploaded_names_are_sanitised_and_only_echoed(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = client.post(f"{API}/predict", files=files(("../../../tmp/evil.png", png_bytes(2)),
                                                   ("/etc/passwd", b"root:x:0:0")))
    names = [x["filename"] for x in r.json()["results"]]
    assert names == ["evil.png", "passwd"]
    assert list(tmp_path.iterdir()) == []  # nothing written where the server runs


def test_zip_upload_is_expanded(client):
    z = zip_bytes({"smear/a.png": png_bytes(1), "smear/b.jpg": png_bytes(2, fmt="JPEG"),
                   "smear/readme.txt": b"not an image"})
    r = client.post(f"{API}/predict", files=files(("smear.zip", z), ("c.png", png_bytes(3))))
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["smear.zip/smear/a.png", "smear.zip/smear/b.jpg",
                                             "smear.zip/smear/readme.txt", "c.png"]
    assert "class" in res[0] and "class" in res[1] and "class" in res[3]
    assert res[2]["error"]["code"] == "invalid_image"


# ---- limits -------------------------------------------------------------------------------------


def test_one_oversized_file_in_a_batch_is_a_per_file_error(client):
    r = client.post(f"{API}/predict", files=files(("big.png", b"\0" * 300_000), ("ok.png", png_bytes(1))))
    assert r.status_code == 200
    big, ok = r.json()["results"]
    assert big["error"]["code"] == "too_large" and "over the limit" in big["error"]["message"]
    assert "class" in ok


def test_request_of_only_oversized_files_is_413(client):
    r = client.post(f"{API}/predict", files=files(("big.png", b"\0" * 300_000)))
    assert r.status_code == 413
    assert r.json()["results"][0]["error"]["code"] == "too_large"


def test_image_over_the_pixel_limit_is_refused_before_decoding(model_dirs):
    c = _client(model_dirs["random"], ServingLimits(max_pixels=10_000))
    r = c.post(f"{API}/predict", files=files(("wide.png", png_bytes(1, 200, 100))))
    assert r.status_code == 413
    assert "pixels" in r.json()["results"][0]["error"]["message"]


def test_request_body_over_the_limit_is_413_before_reading(client):
    r = client.post(f"{API}/predict", files=files(*[(f"{i}.png", b"\0" * 190_000) for i in range(12)]))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert_security_headers(r)


def test_streamed_body_without_length_is_cut_off_at_the_limit(client):
    def body():
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 100_000
        yield b"\r\n--xyz--\r\n"

    r = client.post(f"{API}/predict", content=body(),
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_too_many_files_is_422(client):
    r = client.post(f"{API}/predict", files=files(*[(f"{i}.png", b"1") for i in range(41)]))
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_files"
    z = zip_bytes({f"{i}.png": b"1" for i in range(45)})
    r = client.post(f"{API}/predict", files=files(("many.zip", z)))
    assert r.status_code == 422 and "limit is 40" in r.json()["error"]["message"]


def test_no_files_wrong_field_wrong_type_and_garbage(client):
    r = client.post(f"{API}/predict", data={"x": "1"}, files=[("x2", ("a", b"", "text/plain"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_files"
    r = client.post(f"{API}/predict", files=[("file", ("a.png", png_bytes(1), "image/png"))])
    assert r.status_code == 422 and "'file'" in r.json()["error"]["message"]
    r = client.post(f"{API}/predict", content=png_bytes(1), headers={"content-type": "image/png"})
    assert r.status_code == 415
    r = client.post(f"{API}/predict", content=b"--a\r\ngarbage\r\n\r\n--",
                    headers={"content-type": "multipart/form-data; boundary=a"})
    assert 400 <= r.status_code < 500
    r = client.post(f"{API}/predict", content=b"\xff" * 100,
                    headers={"content-type": "multipart/form-data"})  # no boundary
    assert 400 <= r.status_code < 500


def test_unknown_routes_and_methods_are_json_4xx_with_headers(client):
    r = client.get(f"{API}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert_security_headers(r)
    r = client.get(f"{API}/predict")
    assert r.status_code == 405


def test_busy_and_timeout_are_503(model_dirs):
    service = ModelService.from_model_dir(model_dirs["random"],
                                          ServingLimits(max_waiting_requests=0, inference_timeout_s=1.0))
    c = TestClient(create_app(service, with_ui=False), raise_server_exceptions=False)
    service._admit()  # one request already in progress; none may wait
    try:
        r = c.post(f"{API}/predict", files=files(("a.png", png_bytes(1))))
        assert r.status_code == 503 and r.json()["error"]["code"] == "busy"
        assert r.headers["retry-after"]
    finally:
        service._release()
    service._model_lock.acquire()  # the model is stuck on someone else's work
    try:
        r = c.post(f"{API}/predict", files=files(("a.png", png_bytes(1))))
        assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
    finally:
        service._model_lock.release()
    r = c.post(f"{API}/predict", files=files(("a.png", png_bytes(1))))
    assert r.status_code == 200 and service.in_flight == 0


def test_event_loop_stays_responsive_while_the_model_works(model_dirs):
    service = ModelService.from_model_dir(model_dirs["random"], SMALL)
    c = TestClient(create_app(service, with_ui=False))
    service._model_lock.acquire()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "r", c.post(f"{API}/predict", files=files(("a.png", png_bytes(1))))))
    t.start()
    try:
        assert c.get(f"{API}/health").status_code == 200  # answered while /predict waits
    finally:
        service._model_lock.release()
    t.join(30)
    assert out["r"].status_code == 200


# ---- /differential ------------------------------------------------------------------------------


def test_differential_counts_and_urgent_blast_flag(blast_client):
    batch = files(*[(f"c{i}.png", png_bytes(i)) for i in range(4)], ("bad.png", b"nope"))
    r = blast_client.post(f"{API}/differential", files=batch)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 4 and body["n_files"] == 5 and body["n_errors"] == 1
    assert body["counts"]["myeloblast"] == 4 and body["percentages"]["myeloblast"] == 100.0
    assert body["group_counts"]["blast"] == 4 and body["group_percentages"]["blast"] == 100.0
    (flag,) = body["flags"]
    assert flag["class_id"] == "myeloblast" and flag["severity"] == "urgent" and flag["reliable"]
    assert flag["text"] == "Blasts present: urgent review"
    assert "not a diagnosis" in body["notice"]
    assert body["results"][4]["error"]["code"] == "invalid_image"


def test_differential_without_flags(client):
    r = client.post(f"{API}/differential", files=files(("a.png", png_bytes(1))))
    body = r.json()
    assert r.status_code == 200 and body["total"] == 1 and sum(body["counts"].values()) == 1


# ---- docs ---------------------------------------------------------------------------------------


def test_docs_page_is_offline_and_schema_is_served(client):
    r = client.get(f"{API}/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "<script" not in r.text and "cdn" not in r.text.lower()
    assert "/api/v1/predict" in r.text and "/api/v1/differential" in r.text
    schema = client.get(f"{API}/openapi.json").json()
    assert {f"{API}/predict", f"{API}/differential", f"{API}/classes", f"{API}/health"} <= set(schema["paths"])
    body = schema["paths"][f"{API}/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "files" in body["schema"]["properties"]
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
