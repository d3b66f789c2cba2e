"""Decode and preprocess images on worker threads while the model runs, in input order.

Pillow releases the GIL while decoding and resizing and PyTorch releases it inside its
kernels, so threads overlap image work with model compute without pickling images between
processes. A bounded window of submitted jobs (``prefetch`` batches ahead) keeps memory flat
on huge folders while making sure the next batch is ready before the model asks for it.
:func:`phased_map` is the other schedule: decode a whole batch on every thread, then let the
model have the cores (``inference.core_split`` says when each pays).
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["ordered_map", "phased_map", "batched_results"]

T = TypeVar("T")
R = TypeVar("R")


def _result_or_error(future: Future, errors: tuple[type[BaseException], ...]):
    """``future``'s result, or the exception it raised when it is one of ``errors``."""
    try:
        return future.result()
    except errors as e:
        return e


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    window: int,
    errors: tuple[type[BaseException], ...] = (Exception,),
) -> Iterator[tuple[T, R | BaseException]]:
    """Yield ``(item, fn(item))`` in input order, computing up to ``window`` items ahead on
    ``workers`` threads (``workers <= 0``: inline, no threads). Exceptions of the types in
    ``errors`` are yielded in place of the result; anything else propagates."""
    if workers <= 0:
        for item in items:
            try:
                yield item, fn(item)
            except errors as e:
                yield item, e
        return
    window = max(1, window)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="celluscan-load")
    pending: deque[tuple[T, Future]] = deque()
    iterator = iter(items)
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    item = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((item, pool.submit(fn, item)))
            if not pending:
                return
            item, future = pending.popleft()
            yield item, _result_or_error(future, errors)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def phased_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    chunk: int,
    errors: tuple[type[BaseException], ...] = (Exception,),
    first_chunk: int | None = None,
) -> Iterator[tuple[T, R | BaseException]]:
    """:func:`ordered_map` in phases: ``chunk`` items at a time are computed on ``workers``
    threads together, then yielded; nothing is computed while the consumer works on them.

    For a consumer that runs a model on every ``chunk`` items with all cores: decoding never
    competes with the model (PyTorch's OpenMP threads busy-wait, so threads decoding beside it
    slow it down), and both phases still use every core. ``first_chunk`` (default ``chunk``)
    sizes the first phase, to line the phases up with batches already partly filled."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="celluscan-load")
    iterator = iter(items)
    size = max(1, first_chunk if first_chunk is not None else chunk)
    try:
        while True:
            part = list(itertools.islice(iterator, size))
            if not part:
                return
            size = max(1, chunk)
            futures = [pool.submit(fn, item) for item in part]
            done = [(item, _result_or_error(future, errors)) for item, future in zip(part, futures)]
            yield from done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched_results(
    loaded: Iterable[tuple[T, R | BaseException]],
    batch_size: int,
    run_batch: Callable[[list[R]], list],
) -> Iterator[tuple[T, object]]:
    """Group successfully loaded items into batches of ``batch_size``, run ``run_batch`` on
    each, and yield ``(item, output | exception)`` in the original order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    held: list[tuple[T, R | BaseException]] = []
    ready = 0

    def flush() -> Iterator[tuple[T, object]]:
        nonlocal held, ready
        inputs = [r for _, r in held if not isinstance(r, BaseException)]
        outputs = iter(run_batch(inputs) if inputs else [])
        for item, r in held:
            yield item, (r if isinstance(r, BaseException) else next(outputs))
        held, ready = [], 0

    for item, result in loaded:
        if isinstance(result, BaseException) and not held:
            yield item, result  # nothing waiting ahead of it: report at once
            continue
        held.append((item, result))
        if not isinstance(result, BaseException):
            ready += 1
        if ready >= batch_size:
            yield from flush()
    if held:
        yield from flush()
