"""Both storage adapters offer the storage port the rest of the aggregator is written against."""

from __future__ import annotations

from pathlib import Path

from aggregator.pool.port import LifecycleSteps, PoolWriter, SnapshotStorage
from aggregator.pool.postgres import PgEventPool, PgSnapshotStore
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool, LifecycleWriter
from contract import default_catalogue


def test_the_sqlite_adapter_offers_the_port(tmp_path: Path) -> None:
    pool = EventPool(tmp_path / "pool.db", default_catalogue())
    steps = LifecycleWriter(tmp_path / "pool.db")
    try:
        assert isinstance(pool, PoolWriter)
        assert isinstance(steps, LifecycleSteps)
        assert not isinstance(steps, PoolWriter)  # it cannot commit batches
        assert isinstance(SnapshotStore(tmp_path / "snapshots"), SnapshotStorage)
    finally:
        steps.close()
        pool.close()


def test_the_postgres_adapter_offers_the_port(pg_url: str) -> None:
    pool = PgEventPool(pg_url, default_catalogue())
    try:
        assert isinstance(pool, PoolWriter)
        store = PgSnapshotStore(pool)
        assert isinstance(store, SnapshotStorage)
        sha = store.put(b"\xff\xd8 not really a JPEG")
        assert store.get(sha) == b"\xff\xd8 not really a JPEG"
    finally:
        pool.close()
