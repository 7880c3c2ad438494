"""A micro-cache of read answers: many operators of one scope polling one list within a second
share one query.

A hundred dashboards of a few communities each poll their community's event list every few
seconds; without this each poll is its own query and its own fifty summaries, all the same
answer. An entry lives at most ``ttl_s`` (one second by default): within that a cached answer
is what a fresh query would have given a moment ago, no older than the live stream's own pace.
Keys are built by the caller from what decides the answer (the account's level and scope, the
normalized query), never from a token, so an entry can never cross scopes and two accounts of
one scope share it.

Concurrent misses of one key wait for the first to compute (one query per key and interval,
however many pollers arrive together); an answer that raises is not kept.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["MicroCache"]

V = TypeVar("V")


class MicroCache(Generic[V]):
    """Answers by key for at most ``ttl_s`` seconds; at most ``max_entries`` kept (the oldest
    go first). Thread-safe: sync routes run on a thread pool."""

    def __init__(self, ttl_s: float = 1.0, max_entries: int = 512) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._computing: dict[Hashable, threading.Lock] = {}
        self._generation = 0  # bumped by clear(): an answer computed before it is not kept
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached answer for ``key`` if fresh, else ``compute()``'s (kept for ``ttl_s``)."""
        if self.ttl_s <= 0:
            return compute()
        while True:
            with self._lock:
                found = self._fresh(key)
                if found is not None:
                    self.hits += 1
                    return found[1]
                gate = self._computing.get(key)
                if gate is None:
                    gate = self._computing[key] = threading.Lock()
                    gate.acquire()
                    generation = self._generation
                    break
            # Another thread computes this key: wait for it, then read its answer (or, if it
            # failed or was cleared meanwhile, compute in turn).
            with gate:
                pass
        try:
            value = compute()
        except BaseException:
            with self._lock:
                self._computing.pop(key, None)
            gate.release()
            raise
        with self._lock:
            self.misses += 1
            if generation == self._generation:
                self._entries[key] = (time.monotonic(), value)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            self._computing.pop(key, None)
        gate.release()
        return value

    def _fresh(self, key: Hashable) -> tuple[float, V] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() - entry[0] >= self.ttl_s:
            del self._entries[key]
            return None
        return entry

    def clear(self) -> None:
        """Forget every answer (after a change made through this process, which its own
        operators must see at once)."""
        with self._lock:
            self._entries.clear()
            self._generation += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
