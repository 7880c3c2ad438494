"""The event pool on a real PostgreSQL 15: migrations, exact and semantic dedup, replicas
committing one incident at once, the same outcomes as the SQLite pool, a server restart,
the change feed and retention."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aggregator.decode import DecodeLimits
from aggregator.pgpool import (
    CHANNEL,
    LOCK_CELL_DEG,
    LockMode,
    PgEventPool,
    PgSnapshotStore,
    PoolUnavailableError,
    is_pg_pool_fault,
    migrate,
    migrations,
)
from aggregator.pipeline import Inbound, Pipeline
from aggregator.pool import AlertIn, Batch, BatchResult, EventPool, StatusIn
from aggregator.snapshots import SnapshotStore
from contract import AlertV1, EventStatus, Outcome, Severity, Topics, default_catalogue
from tests.pgsupport import PgServer

from .conftest import GRIDS, OUTSIDE, grid_in_community, interior, jpeg, make_alert, offset, past

TOPICS = Topics("cwg")
CATALOGUE = default_catalogue()


class PgHarness:
    def __init__(self, url: str, root: Path, lock: LockMode = "cell") -> None:
        self.url = url
        self.pool = PgEventPool(url, CATALOGUE, lock=lock)
        self.snapshots = SnapshotStore(root / "snapshots")
        self.pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, self.snapshots, DecodeLimits())

    def batch(self, *alerts: AlertV1, raw: tuple[tuple[str, bytes], ...] = ()) -> Batch:
        msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), time.time()) for a in alerts]
        msgs += [Inbound(topic, payload, time.time()) for topic, payload in raw]
        return self.pipeline.assemble(msgs).batch

    def send(self, *alerts: AlertV1) -> list[Outcome]:
        result = self.pool.commit_batch(self.batch(*alerts))
        return [r.outcome for r in result.alerts] + [Outcome.OUT_OF_AREA] * len(
            result.out_of_area
        )

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return [tuple(r) for r in conn.execute(query.encode(), params).fetchall()]


@pytest.fixture
def h(pg_url: str, tmp_path: Path) -> Iterator[PgHarness]:
    harness = PgHarness(pg_url, tmp_path)
    yield harness
    harness.pool.close()


def test_migrations_are_numbered_and_apply_once_under_a_lock(pg_server: PgServer) -> None:
    files = migrations()
    assert [v for v, _, _ in files] == sorted({v for v, _, _ in files})
    url = pg_server.create_database(f"m_{uuid.uuid4().hex[:12]}")  # empty, not the template
    done: list[list[int]] = []
    threads = [threading.Thread(target=lambda: done.append(migrate(url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # three "replicas" starting together: one applies everything, the others find it done
    assert sorted(done, key=len) == [[], [], [v for v, _, _ in files]]
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [v for v, _, _ in files]
    assert migrate(url) == []


def test_same_alert_id_twice_is_one_row(h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(0))
    alert = make_alert("cam-1", lat, lon)
    assert h.send(alert, alert) == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    assert h.send(alert) == [Outcome.DUPLICATE]
    assert h.rows(
        "SELECT count(*), sum(alert_count) FROM alerts JOIN events ON events.id = alerts.event_id"
    ) == [(1, 1)]
    assert h.rows("SELECT count(*) FROM alert_ids") == [(1,)]
