"""A gateway that restarts its components keeps its descriptors, threads and memory: a real
Service (ingest's MQTT I/O process, the API process, webhook, supervision and retention
threads, the pool) started and stopped again and again in one process leaves nothing behind,
and what stop() opened is closed by stop() itself, not whenever the collector runs."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aggregator.access.auth import Level
from aggregator.config import RetentionSettings
from aggregator.service import Service, build_aggregator
from tests.fdreport import kind_of, open_fds

from .conftest import GRIDS, PoolBackend, aggregator_settings
from .operator_support import FAST_HASHER, running_service

CYCLES = 4


def _cycle(broker: Any, root: Path, backend: PoolBackend | None, n: int) -> None:
    with running_service(
        broker,
        root / f"run-{n}",
        backend=backend,
        # a new account each run: on PostgreSQL the runs share one database
        operators={f"op{n}": (Level.ADMIN, "", None)},
        retention=RetentionSettings(alert_days=30),
    ) as service:
        assert service.webhooks is not None
        assert service.supervision is not None
        assert service.retention is not None


@contextmanager
def _collector_off() -> Iterator[None]:
    """Nothing is released by the garbage collector meanwhile: only by what stop() closes."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_service_started_and_stopped_again_and_again_leaves_nothing_behind(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> None:
    # The first run makes what a process keeps once (multiprocessing's resource tracker and
    # shared-memory arena, imported modules' state).
    _cycle(broker, tmp_path, pool_backend, 0)
    gc.collect()
    # by ident: threads other tests left may share a name, and may end meanwhile
    fds, threads = open_fds(), {t.ident for t in threading.enumerate()}
    with _collector_off():
        for n in range(1, CYCLES + 1):
            _cycle(broker, tmp_path, pool_backend, n)
        left = [t for fd, t in open_fds().items() if fds.get(fd) != t]
    # The last run's child processes' pipe ends, were they left to the collector, would be
    # 4 here (2 × CYCLES with the service kept alive).
    assert len(left) <= 1, f"{len(left)} descriptors left: {sorted(map(kind_of, left))}"
    new = [t.name for t in threading.enumerate() if t.ident not in threads]
    assert new == [], f"threads left: {new}"
    gc.collect()
    assert len(open_fds()) <= len(fds) + 1


def test_a_stopped_service_is_freed(broker: Any, tmp_path: Path) -> None:
    """Nothing in the process keeps a stopped service (its pool, its MQTT I/O process object,
    its metrics registry) alive: a gateway restarting its components does not grow."""
    service = Service(
        aggregator_settings(broker, tmp_path / "agg"),
        port=0,
        log_level="warning",
        password_hasher=FAST_HASHER,
    )
    service.start()
    assert service.aggregator.ingest.wait_connected(5)
    service.stop()
    gone = weakref.ref(service)
    ingest = weakref.ref(service.aggregator.ingest)
    del service
    gc.collect()
    assert gone() is None
    assert ingest() is None


def test_the_collector_sees_everything_again_once_the_last_aggregator_stops(
    broker: Any, tmp_path: Path
) -> None:
    """An aggregator freezes what exists at its start out of the collector's view; frozen
    objects that die in a cycle are never collected, so the freeze is made once for all
    running aggregators and undone, with the collector's thresholds, when the last stops."""
    threshold = gc.get_threshold()
    first = build_aggregator(aggregator_settings(broker, tmp_path / "a"), grids=GRIDS)
    second = build_aggregator(aggregator_settings(broker, tmp_path / "b"), grids=GRIDS)
    first.start()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() != threshold
        second.start()
        second.stop()
        assert gc.get_freeze_count() > 0  # still in force for the first
    finally:
        first.stop()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == threshold
