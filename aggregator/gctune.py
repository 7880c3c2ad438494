"""Garbage-collector settings for the aggregator's processes (the pool writer and the MQTT
I/O process)."""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_holders = 0
_saved_threshold: tuple[int, int, int] = gc.get_threshold()


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that allocates and drops tens of
    thousands of small objects a second: what exists at start-up (grids, catalogue, the dedup
    index's load) moves out of the collector's view, and young collections run every 50,000
    net allocations instead of every 700. The hot path makes no reference cycles, so memory
    is freed by reference counting as before (``bench/bench_pipeline.py`` measures both).

    Only the first of several running holders freezes: a frozen object that later becomes
    cyclic garbage is never collected, so freezing again at each restart of a component in
    one process would keep every earlier component (and any socket it left to the collector)
    for good. ``release_gc`` undoes it when the last holder stops."""
    global _holders, _saved_threshold
    with _lock:
        _holders += 1
        if _holders == 1:
            _saved_threshold = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)


def release_gc() -> None:
    """A holder of ``tune_gc`` stopped; after the last one the collector sees everything again
    (what was frozen and died meanwhile is collected) with its earlier thresholds."""
    global _holders
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0:
            gc.unfreeze()
            gc.set_threshold(*_saved_threshold)
