"""Numbered pool migrations: a new pool, a pool made before migrations were numbered (its DDL
is kept below as data, as that release created it), replicas opening one file together, and a
pool from a newer release."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from aggregator.errors import PoolError
from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool import queries
from aggregator.pool.migrate import FOLDER, migrate_sqlite, numbered
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool, connect
from contract import Outcome, Topics, default_catalogue
from tests.pgsupport import PgServer

from .conftest import GRIDS, grid_in_community, interior, make_alert, offset

TOPICS = Topics("cwg")

# The pool's DDL as the release of 2026-12-01 created it (before dead letters had a key and a
# full size and hash): ``meta.schema_version`` 1, no ``schema_migrations``.
OLD_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

-- One row per committed micro-batch; stamped just before COMMIT.
CREATE TABLE IF NOT EXISTS batches (
    id           INTEGER PRIMARY KEY,
    started_at   REAL NOT NULL,
    committed_at REAL,
    size         INTEGER
);

CREATE TABLE IF NOT EXISTS events (
    id                INTEGER PRIMARY KEY,
    source            TEXT NOT NULL DEFAULT 'smart_community_warning',
    type              TEXT NOT NULL,
    severity          TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN
                        ('registered','verified','dispatched','handling','closed')),
    department        TEXT NOT NULL,
    grid_code         TEXT NOT NULL,
    lat               REAL NOT NULL,   -- 事发位置: where the first alert placed it
    lon               REAL NOT NULL,
    grid_path         TEXT NOT NULL,   -- JSON [{level, code, name}], county › … › grid
    address           TEXT NOT NULL,   -- the grid path's names, county › … › grid
    description       TEXT NOT NULL,   -- 问题描述
    snapshot_sha256   TEXT,            -- 实时照片: the best snapshot so far
    snapshot_score    REAL,
    first_observed_at REAL NOT NULL,
    last_observed_at  REAL NOT NULL,
    registered_at     REAL NOT NULL,
    updated_at        REAL NOT NULL,
    deadline_at       REAL NOT NULL,
    closed_at         REAL,
    alert_count       INTEGER NOT NULL,
    device_count      INTEGER NOT NULL,
    recurrence_of     INTEGER REFERENCES events(id),
    version           INTEGER NOT NULL DEFAULT 1,
    -- the pool-wide change number (meta 'change_seq') of the commit that last changed the row:
    -- every writer reads the rows others changed since its own last commit
    change_seq        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_change ON events(change_seq);
CREATE INDEX IF NOT EXISTS events_open ON events(type, last_observed_at) WHERE status != 'closed';
CREATE INDEX IF NOT EXISTS events_closed ON events(type, closed_at) WHERE status = 'closed';
CREATE INDEX IF NOT EXISTS events_grid ON events(grid_code);
CREATE INDEX IF NOT EXISTS events_registered ON events(registered_at);

CREATE TABLE IF NOT EXISTS alerts (
    -- rowid order is arrival order: appends stay cheap; the idempotency key is the unique
    -- index on alert_id
    id              INTEGER PRIMARY KEY,
    alert_id        TEXT NOT NULL UNIQUE,
    event_id        INTEGER NOT NULL REFERENCES events(id),
    device_id       TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    type            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    confidence      REAL NOT NULL,
    observed_at     REAL NOT NULL,
    received_at     REAL NOT NULL,
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    lat             REAL NOT NULL,
    lon             REAL NOT NULL,
    grid_code       TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    snapshot_sha256 TEXT,
    payload         BLOB NOT NULL      -- the message as received, its snapshot replaced by the hash
);
CREATE INDEX IF NOT EXISTS alerts_event ON alerts(event_id);
-- no index on (device_id, seq): nothing reads alerts by device, and at ~10k inserts a second
-- it cost a fifth of the alert insert's work in SQLite; pools made before lose it here
DROP INDEX IF EXISTS alerts_device;
CREATE INDEX IF NOT EXISTS alerts_snapshot ON alerts(snapshot_sha256)
    WHERE snapshot_sha256 IS NOT NULL;

CREATE TABLE IF NOT EXISTS event_devices (
    event_id       INTEGER NOT NULL REFERENCES events(id),
    device_id      TEXT NOT NULL,
    first_alert_at REAL NOT NULL,
    alert_count    INTEGER NOT NULL,
    PRIMARY KEY (event_id, device_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS event_log (
    id       INTEGER PRIMARY KEY,
    event_id INTEGER NOT NULL REFERENCES events(id),
    at       REAL NOT NULL,
    action   TEXT NOT NULL,
    actor    TEXT NOT NULL,
    detail   TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS event_log_event ON event_log(event_id, at);

CREATE TABLE IF NOT EXISTS out_of_area (
    alert_id    TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    type        TEXT NOT NULL,
    observed_at REAL NOT NULL,
    received_at REAL NOT NULL,
    lat         REAL NOT NULL,
    lon         REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS devices (
    device_id        TEXT PRIMARY KEY,
    kind             TEXT,
    state            TEXT NOT NULL DEFAULT 'unknown',
    state_reason     TEXT,
    state_at         REAL,
    last_seen        REAL NOT NULL,
    health           TEXT,
    lat              REAL,
    lon              REAL,
    last_seq         INTEGER,
    alerts_total     INTEGER NOT NULL DEFAULT 0,
    rejected_total   INTEGER NOT NULL DEFAULT 0,
    out_of_area_total INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    topic       TEXT NOT NULL,
    device_id   TEXT,
    alert_id    TEXT,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    payload     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters(reason, received_at);
CREATE INDEX IF NOT EXISTS dead_letters_device ON dead_letters(device_id, received_at);
"""


def _schema(path: Path) -> dict[str, object]:
    """Tables with their columns, and index names: what two pools must agree on."""
    with closing(connect(path, readonly=True)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            "tables": {t: [c[1:] for c in db.execute(f"PRAGMA table_info({t})")] for t in tables},
            "indexes": sorted(
                r[0]
                for r in db.execute(
                    "SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
                )
            ),
        }


def _old_pool(path: Path) -> tuple[int, float, float]:
    """An old pool holding one open smoke_fire event (its alert, its device) and one dead
    letter; returns the event id and where it is."""
    grid = grid_in_community(3)
    lat, lon = interior(grid)
    now = time.time()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.executescript(OLD_DDL)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('change_seq', '1')")
        db.execute("INSERT INTO batches VALUES (1, ?, ?, 2)", (now - 60, now - 60))
        path_json = json.dumps([g.model_dump(mode="json") for g in grid.path])
        address = " › ".join(g.name for g in grid.path)
        db.execute(
            "INSERT INTO events (id, type, severity, status, department, grid_code, lat, lon,"
            " grid_path, address, description, first_observed_at, last_observed_at,"
            " registered_at, updated_at, deadline_at, alert_count, device_count, change_seq)"
            " VALUES (1, 'smoke_fire', 'high', 'registered', 'fire', ?, ?, ?, ?, ?, 'old',"
            " ?, ?, ?, ?, ?, 1, 1, 1)",
            (grid.code, lat, lon, path_json, address, now - 60, now - 60, now - 60, now - 60,
             now + 3600),
        )  # fmt: skip
        db.execute(
            "INSERT INTO alerts (alert_id, event_id, device_id, seq, type, severity, confidence,"
            " observed_at, received_at, batch_id, lat, lon, grid_code, outcome, payload)"
            " VALUES ('old-cam-1', 1, 'cam-old', 1, 'smoke_fire', 'high', 0.8, ?, ?, 1, ?, ?, ?,"
            " 'accepted', x'7b7d')",
            (now - 60, now - 60, lat, lon, grid.code),
        )
        db.execute("INSERT INTO event_devices VALUES (1, 'cam-old', ?, 1)", (now - 60,))
        db.execute(
            "INSERT INTO dead_letters (received_at, topic, device_id, alert_id, reason, detail,"
            " payload) VALUES (?, 'cwg/v1/devices/cam-old/alert', 'cam-old', NULL,"
            " 'malformed_json', 'not JSON', x'00')",
            (now - 30,),
        )
    finally:
        db.close()
    return 1, lat, lon


def _send(pool: EventPool, path: Path, *alerts: object) -> list[Outcome]:
    pipeline = Pipeline(TOPICS, pool.catalogue, GRIDS, SnapshotStore(path / "snapshots"),
                        DecodeLimits())  # fmt: skip
    msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), time.time()) for a in alerts]  # type: ignore[attr-defined]
    result = pool.commit_batch(pipeline.assemble(msgs).batch)
    return [r.outcome for r in result.alerts]


def test_a_new_pool_records_every_numbered_migration(tmp_path: Path) -> None:
    pool = EventPool(tmp_path / "pool.db", default_catalogue())
    pool.close()
    with closing(connect(tmp_path / "pool.db", readonly=True)) as db:
        versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in numbered(FOLDER / "sqlite")]
    assert versions[0] == 1
    # opened again, there is nothing left to apply
    with closing(connect(tmp_path / "pool.db")) as db:
        assert migrate_sqlite(db) == []


def test_a_pool_made_before_numbered_migrations_opens_and_migrates(tmp_path: Path) -> None:
    old = tmp_path / "old" / "pool.db"
    old.parent.mkdir()
    event_id, lat, lon = _old_pool(old)
    new = tmp_path / "new" / "pool.db"
    new.parent.mkdir()
    EventPool(new, default_catalogue()).close()

    pool = EventPool(old, default_catalogue())
    try:
        # the same tables, columns and indexes as a pool made now
        assert _schema(old) == _schema(new)
        with closing(queries.open_reader(old)) as db:
            versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations")]
            assert versions == [m.version for m in numbered(FOLDER / "sqlite")]
            [letter] = queries.dead_letters(db)
            assert (letter["device_id"], letter["payload_size"]) == ("cam-old", None)
            [summary] = queries.event_summaries(db, [event_id], pool.catalogue)
            assert summary.device_ids == ["cam-old"]
        # the old open event is in the dedup index: a camera 50 m away joins it
        alert = make_alert("cam-new", *offset(lat, lon, north_m=50))
        assert _send(pool, tmp_path, alert) == [Outcome.MERGED]
        assert _send(pool, tmp_path, alert) == [Outcome.DUPLICATE]
        with closing(queries.open_reader(old)) as db:
            [summary] = queries.event_summaries(db, [event_id], pool.catalogue)
            assert summary.alert_count == 2
            assert summary.device_ids == ["cam-old", "cam-new"]
    finally:
        pool.close()


def test_replicas_opening_one_new_file_together_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    errors: list[BaseException] = []
    pools: list[EventPool] = []
    lock = threading.Lock()

    def open_one() -> None:
        try:
            p = EventPool(path, default_catalogue())
            with lock:
                pools.append(p)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for p in pools:
        p.close()
    assert errors == []
    assert len(pools) == 4
    with closing(connect(path, readonly=True)) as db:
        row = db.execute("SELECT count(*), min(version) FROM schema_migrations").fetchone()
    assert tuple(row) == (len(numbered(FOLDER / "sqlite")), 1)


def test_a_pool_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    EventPool(path, default_catalogue()).close()
    with closing(connect(path)) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 0)")
    with pytest.raises(PoolError, match="newer than this aggregator knows"):
        EventPool(path, default_catalogue())


def _first(k: int, backend: str, into: Path) -> Path:
    """A folder holding the first ``k`` migrations of ``backend``: the pool as release k made it."""
    into.mkdir()
    for path in sorted((FOLDER / backend).glob("[0-9][0-9][0-9][0-9]_*.sql"))[:k]:
        (into / path.name).write_text(path.read_text("utf-8"), "utf-8")
    return into


@pytest.mark.parametrize("k", range(1, len(numbered(FOLDER / "sqlite"))))
def test_a_sqlite_pool_of_every_earlier_release_migrates(tmp_path: Path, k: int) -> None:
    """Each release's pool (its migrations applied, nothing newer) opens under this one: every
    later file applies on top of it, and the result is the schema a new pool has."""
    old = tmp_path / "old.db"
    with closing(connect(old)) as db:
        assert migrate_sqlite(db, _first(k, "sqlite", tmp_path / "release")) == list(
            range(1, k + 1)
        )
    EventPool(old, default_catalogue()).close()
    new = tmp_path / "new" / "pool.db"
    new.parent.mkdir()
    EventPool(new, default_catalogue()).close()
    assert _schema(old) == _schema(new)


def test_a_postgresql_pool_of_every_earlier_release_migrates(
    pg_server: PgServer, tmp_path: Path
) -> None:
    import psycopg

    from aggregator.pool.postgres import MIGRATIONS, migrate

    def schema(url: str) -> set[tuple[str, ...]]:
        with psycopg.connect(url) as conn:
            columns = conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable FROM"
                " information_schema.columns WHERE table_schema = 'public'"
            ).fetchall()
            indexes = conn.execute(
                "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public'"
            ).fetchall()
        return {tuple(r) for r in columns} | {tuple(r) for r in indexes}

    fresh = pg_server.create_database(f"fresh_{uuid.uuid4().hex[:8]}")
    wanted = [m.version for m in numbered(MIGRATIONS)]
    assert migrate(fresh) == wanted
    for k in range(1, len(wanted)):
        url = pg_server.create_database(f"release_{k}_{uuid.uuid4().hex[:8]}")
        assert migrate(url, _first(k, "postgres", tmp_path / f"release-{k}")) == wanted[:k]
        assert migrate(url) == wanted[k:]  # what this release adds, applied on open
        assert migrate(url) == []
        assert schema(url) == schema(fresh), k
