"""inference.batching.phased_map: decode in phases that never overlap the consumer's work."""

from __future__ import annotations

import threading

import pytest

from celluscan.inference.batching import batched_results, phased_map


def test_phased_map_keeps_order_and_reports_errors_in_place():
    def fn(x: int) -> int:
        if x == 3:
            raise ValueError("bad item 3")
        return x * 10

    out = list(phased_map(fn, range(7), workers=2, chunk=3, errors=(ValueError,), first_chunk=2))
    assert [item for item, _ in out] == list(range(7))
    assert [r for _, r in out if not isinstance(r, Exception)] == [0, 10, 20, 40, 50, 60]
    assert isinstance(out[3][1], ValueError) and "bad item 3" in str(out[3][1])
    with pytest.raises(KeyError):  # anything not listed in ``errors`` propagates
        list(phased_map(lambda x: {}[x], [1], workers=1, chunk=1, errors=(ValueError,)))


def test_phased_map_runs_a_chunk_in_parallel_and_nothing_while_the_consumer_works():
    barrier = threading.Barrier(2, timeout=10)  # both items of a chunk must run at once
    started: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            started.append(x)
        barrier.wait()
        return x

    seen_at_batch: list[list[int]] = []

    def run_batch(xs: list[int]) -> list[int]:
        seen_at_batch.append(sorted(started))  # what had started when the "model" ran
        return xs

    out = list(batched_results(phased_map(fn, range(6), workers=2, chunk=2), 2, run_batch))
    assert [r for _, r in out] == list(range(6))
    # with phases lined up with batches, the next chunk starts only after the batch ran
    assert seen_at_batch == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
