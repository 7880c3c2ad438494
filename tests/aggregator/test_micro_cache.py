"""The event-list micro-cache: fresh for its TTL only, one computation per key however many
callers arrive together, failures and answers computed across a clear() never kept."""

from __future__ import annotations

import threading
import time

import pytest

from aggregator.api.cache import MicroCache


def test_answer_is_shared_within_ttl_and_recomputed_after() -> None:
    cache: MicroCache[int] = MicroCache(ttl_s=0.2)
    calls = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    assert cache.get("k", compute) == 1
    assert cache.get("k", compute) == 1
    assert cache.get("other", compute) == 2  # keys never share
    time.sleep(0.25)
    assert cache.get("k", compute) == 3
    assert (cache.hits, cache.misses) == (1, 3)


def test_concurrent_misses_compute_once() -> None:
    cache: MicroCache[str] = MicroCache(ttl_s=5.0)
    calls = []
    started = threading.Event()

    def slow() -> str:
        calls.append(1)
        started.set()
        time.sleep(0.2)
        return "answer"

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("k", slow))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert results == ["answer"] * 8
    assert len(calls) == 1


def test_failure_is_not_kept() -> None:
    cache: MicroCache[int] = MicroCache(ttl_s=5.0)

    def boom() -> int:
        raise RuntimeError("pool unreadable")

    with pytest.raises(RuntimeError):
        cache.get("k", boom)
    assert cache.get("k", lambda: 7) == 7


def test_clear_forgets_and_drops_an_answer_computed_across_it() -> None:
    cache: MicroCache[int] = MicroCache(ttl_s=5.0)
    assert cache.get("k", lambda: 1) == 1
    cache.clear()
    assert cache.get("k", lambda: 2) == 2

    def clears_meanwhile() -> int:
        cache.clear()  # a step committed while this answer was being read
        return 3

    assert cache.get("j", clears_meanwhile) == 3
    assert cache.get("j", lambda: 4) == 4


def test_bounded_and_disabled() -> None:
    cache: MicroCache[int] = MicroCache(ttl_s=5.0, max_entries=3)
    for i in range(10):
        cache.get(i, lambda i=i: i)
    assert len(cache) == 3
    off: MicroCache[int] = MicroCache(ttl_s=0)
    values = iter(range(5))
    assert off.get("k", lambda: next(values)) == 0
    assert off.get("k", lambda: next(values)) == 1
