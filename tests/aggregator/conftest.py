"""Fixtures for aggregator tests: a running aggregator on the test broker, alert builders."""

from __future__ import annotations

import base64
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import SecretStr

from aggregator.config import BatchSettings, MqttSettings, Settings
from aggregator.grids import Grid, GridIndex, default_grid_file
from aggregator.pool.port import LifecycleSteps, PoolWriter, SnapshotStorage
from aggregator.pool.reader import Reader, open_reader
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool, LifecycleWriter, connect
from aggregator.service import Aggregator, build_aggregator
from contract import AlertV1, Catalogue, Location, default_catalogue, dump

GRIDS = GridIndex.from_geojson(default_grid_file())
OUTSIDE = (30.0, 118.0)  # far from the Longgang sample area


def grid_in_community(n: int, k: int = 5) -> Grid:
    """The k-th grid of the n-th community of the sample area."""
    community = GRIDS.communities()[n]
    return GRIDS.by_prefix(community.code)[k]


def interior(grid: Grid) -> tuple[float, float]:
    p = grid.polygon.representative_point()
    return p.y, p.x


def offset(
    lat: float, lon: float, north_m: float = 0.0, east_m: float = 0.0
) -> tuple[float, float]:
    return lat + north_m / 111_320.0, lon + east_m / (111_320.0 * np.cos(np.radians(lat)))


def jpeg(seed: int = 0, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def make_alert(
    device_id: str,
    lat: float,
    lon: float,
    *,
    type: str = "smoke_fire",
    seq: int = 1,
    alert_id: str | None = None,
    observed_at: datetime | None = None,
    confidence: float = 0.8,
    snapshot: bytes | None = None,
    **extra: Any,
) -> AlertV1:
    return AlertV1(
        alert_id=alert_id or f"{device_id}-{uuid.uuid4().hex}",
        device_id=device_id,
        seq=seq,
        type=type,
        confidence=confidence,
        observed_at=observed_at or datetime.now(UTC),
        location=Location(lat=lat, lon=lon),
        description="test alert",
        snapshot=base64.b64encode(snapshot).decode() if snapshot else None,
        **extra,
    )


def alert_dict(device_id: str, **kw: Any) -> dict[str, Any]:
    lat, lon = interior(grid_in_community(0))
    return dump(make_alert(device_id, lat, lon, **kw))


def aggregator_settings(broker: Any, data_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        mqtt=MqttSettings(
            host=broker.host,
            port=broker.port,
            password=broker.password("aggregator"),
            client_id=f"agg-{uuid.uuid4().hex[:8]}",
            topic_prefix=broker.prefix,
        ),
        batch=BatchSettings(max_messages=200, linger_ms=10),
        **overrides,
    )


@pytest.fixture
def aggregator(broker: Any, tmp_path: Path) -> Iterator[Aggregator]:
    agg = build_aggregator(aggregator_settings(broker, tmp_path / "agg"), grids=GRIDS)
    agg.start()
    assert agg.ingest.wait_connected(5), "aggregator did not connect to the test broker"
    yield agg
    agg.stop()


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def pool(agg: Aggregator) -> Iterator[Reader]:
    """A read-only look at the aggregator's pool, SQLite file or PostgreSQL database (rows answer
    ``row[0]`` and ``row["col"]`` on both; SQL with ``?`` placeholders)."""
    with closing(open_reader(agg.settings.pool_target)) as db:
        yield db


def count(agg: Aggregator, sql: str, *params: Any) -> int:
    with pool(agg) as db:
        return int(db.execute(sql, params).fetchone()[0])


def past(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


# ---------------------------------------------------------------------------- both backends

POOL_BACKENDS = ("sqlite", "postgres")


@dataclass
class PoolBackend:
    """One event-pool backend for a test: ``name`` is ``sqlite`` or ``postgres``; ``target``
    the SQLite file under tmp_path or the URL of a fresh database of the session's PostgreSQL
    (a copy of the migrated template). Writers made here are closed after the test."""

    name: str
    target: str
    root: Path
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def is_postgres(self) -> bool:
        return self.name == "postgres"

    def writer(self, catalogue: Catalogue | None = None, **kwargs: Any) -> PoolWriter:
        """The backend's pool adapter (``sqlite.EventPool`` / ``postgres.PgEventPool``) with
        the arguments both share (``ref_lat``, ``dead_letter_keep_bytes``, …)."""
        catalogue = catalogue or default_catalogue()
        pool: PoolWriter
        if self.is_postgres:
            from aggregator.pool.postgres import PgEventPool

            pool = PgEventPool(self.target, catalogue, **kwargs)
        else:
            pool = EventPool(self.target, catalogue, **kwargs)
        self._closers.append(pool.close)
        return pool

    def lifecycle(self) -> LifecycleSteps:
        """Lifecycle steps from a connection of their own, as the operator API takes them."""
        steps: LifecycleSteps
        if self.is_postgres:
            from aggregator.pool.postgres import PgEventPool

            steps = PgEventPool(self.target, default_catalogue())
        else:
            steps = LifecycleWriter(self.target)
        self._closers.append(steps.close)
        return steps

    def snapshots(self, pool: PoolWriter) -> SnapshotStorage:
        """Where this backend keeps snapshots: files beside the SQLite pool, a table of the
        PostgreSQL pool that every replica reads."""
        if self.is_postgres:
            from aggregator.pool.postgres import PgEventPool, PgSnapshotStore

            assert isinstance(pool, PgEventPool)
            return PgSnapshotStore(pool)
        return SnapshotStore(self.root / "snapshots")

    def reader(self) -> Reader:
        """A read-only connection for the read model (``aggregator.pool.queries``)."""
        reader = open_reader(self.target)
        self._closers.append(reader.close)
        return reader

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """A test's own look at the tables, written once with ``?`` placeholders (the two
        schemas have the same tables and columns)."""
        if self.is_postgres:
            import psycopg

            query = sql.replace("%", "%%").replace("?", "%s")
            with psycopg.connect(self.target) as conn:
                return [tuple(r) for r in conn.execute(query.encode(), params).fetchall()]
        with closing(connect(self.target, readonly=True)) as db:
            return [tuple(r) for r in db.execute(sql, params).fetchall()]

    def settings_overrides(self) -> dict[str, Any]:
        """What a ``Settings`` needs to use this backend (``aggregator_settings(…, **it)``)."""
        if self.is_postgres:
            return {"pool_url": SecretStr(self.target)}
        return {"pool_path": Path(self.target)}

    def close(self) -> None:
        for close in reversed(self._closers):
            # a test that restarts a writer has closed it already (SQLite's close says so)
            with suppress(sqlite3.ProgrammingError):
                close()


@pytest.fixture(params=POOL_BACKENDS)
def pool_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PoolBackend]:
    """Each test that takes it runs twice: on an SQLite file, and on PostgreSQL."""
    if request.param == "postgres":
        # only the postgres half starts (once per session) and asks for the server
        target = str(request.getfixturevalue("pg_url"))
    else:
        target = str(tmp_path / "pool.db")
    backend = PoolBackend(request.param, target, tmp_path)
    yield backend
    backend.close()
    if backend.is_postgres:
        # Dropped at once: the session's cluster would otherwise keep every test's copy of the
        # template on disk and write them all out at its shutdown checkpoint.
        import psycopg

        server = request.getfixturevalue("pg_server")
        name = target.rsplit("/", 1)[1]
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
