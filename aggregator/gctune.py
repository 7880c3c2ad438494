"""Garbage-collector settings for the aggregator's processes (the pool writer and the MQTT
I/O process)."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that allocates and drops tens of
    thousands of small objects a second: what exists at start-up (grids, catalogue, the dedup
    index's load) moves out of the collector's view, and young collections run every 50,000
    net allocations instead of every 700. The hot path makes no reference cycles, so memory
    is freed by reference counting as before (``bench/bench_pipeline.py`` measures both)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
