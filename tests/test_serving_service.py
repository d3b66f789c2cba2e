"""ModelService internals: the fair model lock, batching with per-file fallbacks, time limits."""

from __future__ import annotations

import threading
import time

import pytest

from celluscan.serving.limits import ServingLimits
from celluscan.serving.service import FairLock, ModelService, ServiceTimeout
from celluscan.serving.uploads import Upload, UploadError
from test_serving_helpers import make_model_dir, png_bytes


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_fair_lock_grants_in_arrival_order():
    lock = FairLock()
    lock.acquire()
    order: list[int] = []

    def worker(i: int) -> None:
        with lock:
            order.append(i)

    threads = []
    for i in range(6):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        _wait_for(lambda: len(lock._waiters) == i + 1)  # queued before the next one arrives
    lock.release()
    for t in threads:
        t.join(5)
    assert order == list(range(6))


def test_fair_lock_timeout_leaves_it_usable():
    lock = FairLock()
    lock.acquire()
    t0 = time.monotonic()
    assert lock.acquire(timeout=0.05) is False
    assert time.monotonic() - t0 >= 0.04
    assert not lock._waiters
    lock.release()
    assert lock.acquire(timeout=0.05) is True
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("m") / "model")
    return ModelService.from_model_dir(model, ServingLimits(batch_size=2))


def test_classify_keeps_order_across_batches_and_errors(service):
    uploads = [Upload("a.png", png_bytes(1)), Upload("bad.png", b"junk"), Upload("b.png", png_bytes(2)),
               Upload("big.png", error=UploadError("too_large", "too big")), Upload("c.png", png_bytes(3)),
               Upload("d.png", png_bytes(4))]
    progress = []
    results = service.classify(uploads, progress=lambda d, t: progress.append((d, t)))
    assert [r.filename for r in results] == [u.name for u in uploads]
    assert [r.ok for r in results] == [True, False, True, False, True, True]
    assert results[1].error.code == "invalid_image" and results[3].error.code == "too_large"
    assert progress[-1] == (6, 6) and len(progress) >= 3  # one update per batch of 2
    alone = service.classify([Upload("c.png", png_bytes(3))])[0]
    assert alone.prediction.probs == pytest.approx(results[4].prediction.probs)


def test_one_failing_image_does_not_sink_its_batch(service, monkeypatch):
    real = service.predictor.predict_images

    def flaky(images):
        if any(im.size == (41, 41) for im in images):
            raise RuntimeError("boom")
        return real(images)

    monkeypatch.setattr(service.predictor, "predict_images", flaky)
    results = service.classify([Upload("ok.png", png_bytes(1)), Upload("odd.png", png_bytes(2, 41, 41))])
    assert results[0].ok
    assert results[1].error.code == "classification_failed"


def test_classify_respects_the_time_limit(service):
    service._model_lock.acquire()
    try:
        with pytest.raises(ServiceTimeout):
            service.classify([Upload("a.png", png_bytes(1))], timeout_s=0.1)
    finally:
        service._model_lock.release()
