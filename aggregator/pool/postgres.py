"""The community event pool on PostgreSQL (``CWG_POOL_URL=postgresql://…``), for replicas on
several machines.

The write interface and its results are ``EventPool``'s (aggregator/pool/sqlite.py):
``commit_batch``, ``set_status``, ``prune``, ``close``. What differs is how a batch is made safe
against other writers, which here may be aggregator replicas on other machines:

- Exact dedup: a batch first claims its alert ids in ``alert_ids`` (``INSERT … ON CONFLICT DO
  NOTHING RETURNING``): the ids returned are exactly the ones this batch pools. A replica
  claiming the same id at the same moment waits on the unique index until this batch commits
  or rolls back.
- Semantic dedup is decided inside the batch's transaction. The batch takes a transaction-level
  advisory lock for every (type, coarse cell) within the merge radius of its alerts, in sorted
  order (no deadlock between replicas), then reads the open and recently closed candidate
  events near each alert from the table. Two alerts of one incident are within the merge
  radius of each other, so their lock sets share a cell: replicas pooling them queue, and the
  second reads the first's event. A writer's memory of events is used only where the row's
  version (bumped by every write) says it is still current. An operator's
  lifecycle step takes the lock of its event's cell, so it waits for a batch that may merge
  into the event, or the batch sees the step (no row locks on the candidates: locking a
  thousand rows a batch dirtied as many heap pages). Every writer of one pool must use the
  same lock mode.
- Writes go in a few round trips: ``COPY`` for the alerts, and one statement per table for the
  rest (rows as one JSON recordset parameter); event ids come from the ``events`` sequence.
- The change feed: every commit sends ``NOTIFY cwg_pool`` (payload: batch, change number,
  created and updated event ids) inside its transaction, so listeners hear only of committed
  changes, in commit order.

Connection and server faults (``psycopg.OperationalError``: the server down or restarting, a
broken connection, a deadlock or serialization failure, a full disk) raise ``PoolUnavailableError``:
the batch is to be retried unacknowledged, not blamed on its messages.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal

import orjson
import psycopg
import psycopg_pool
from psycopg import sql

from aggregator.errors import PoolError
from aggregator.pool.dedup import EARTH_RADIUS_M, DedupIndex, EventState
from aggregator.pool.migrate import Migration, numbered, pending
from aggregator.pool.model import (
    EVENT_STATE_COLUMNS,
    AlertIn,
    Batch,
    BatchResult,
    BatchWork,
    DeadLetterIn,
    DeadLetterResult,
    EventRef,
    OutOfAreaIn,
    dead_letter_key,
    device_tallies,
    event_state,
    merged_event_record,
    new_event_record,
    summary_dict,
)
from aggregator.pool.reader import PgReader
from contract import Catalogue, EventStatus

log = logging.getLogger(__name__)

MIGRATIONS: Final = Path(__file__).parent / "migrations" / "postgres"
CHANNEL: Final = "cwg_pool"
# pg_advisory_xact_lock keys of this schema. Cell keys are 64-bit hashes; a collision with these
# (or between cells) only makes two batches queue that needed not.
_MIGRATION_LOCK: Final = 0x6377_6700_0000_0001
_PARTITION_LOCK: Final = 0x6377_6700_0000_0002
_BATCH_LOCK: Final = 0x6377_6700_0000_0003
# The lock grid: cells of this many degrees of latitude and longitude (about 2 × 2 km in
# Shenzhen). Much larger than any merge radius, so most alerts lock one cell and only those
# within a radius of a cell's edge lock two or four; small enough that replicas pooling
# different neighbourhoods do not queue behind each other.
LOCK_CELL_DEG: Final = 0.02
# NOTIFY payloads are limited to 8,000 bytes: a larger change names only its batch.
_NOTIFY_MAX: Final = 7_000

LockMode = Literal["cell", "batch"]


class PoolUnavailableError(PoolError):
    """The PostgreSQL pool cannot be reached or refused the transaction for its own reasons
    (restart, broken connection, deadlock, disk full): retry the batch, do not blame it."""


def is_pg_pool_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the PostgreSQL pool rather than of the messages."""
    return isinstance(
        exc,
        PoolUnavailableError
        | psycopg.OperationalError
        | psycopg.InterfaceError
        | psycopg_pool.PoolTimeout
        | psycopg_pool.PoolClosed,
    )


@contextmanager
def _faults() -> Iterator[None]:
    try:
        yield
    except (
        psycopg.OperationalError,
        psycopg.InterfaceError,
        psycopg_pool.PoolTimeout,
        psycopg_pool.PoolClosed,
    ) as exc:
        raise PoolUnavailableError(f"PostgreSQL pool: {type(exc).__name__}: {exc}") from exc


_RECONNECT_S: Final = 5.0


def connection_pool(
    url: str,
    *,
    name: str,
    min_size: int = 1,
    max_size: int = 4,
    connect_timeout_s: float = 10.0,
    checkout_timeout_s: float | None = None,
    wait: bool = True,
) -> psycopg_pool.ConnectionPool[Any]:
    """A psycopg pool of autocommit connections on the PostgreSQL event pool, opened the one
    way every adapter opens it (event pool, accounts, webhook outbox).

    A connection a server restart broke is found out and replaced on checkout, so the next
    transaction after a restart commits instead of failing once more. ``connect_timeout_s``
    bounds the first connections (``wait``: the caller needs the pool now, e.g. a service
    starting); ``checkout_timeout_s`` (default: the same) bounds how long a transaction waits
    for a connection while the server is away before ``PoolTimeout``. A request path gives a
    short one, so an operator hears 503 in seconds rather than after an HTTP client gave up;
    the ingest worker keeps the long one, as it retries the batch either way.

    ``reconnect_timeout`` is short on purpose. psycopg_pool replaces a lost connection with
    attempts 1, 2, 4, 8 … s apart until it gives up (300 s by default), so after an outage of
    a minute the next attempt could be half a minute away and every checkout until then would
    time out although the server is back. Giving up after a few seconds bounds the wait after
    recovery to about two seconds: a checkout that then finds no connection starts a new
    attempt at once.
    """
    pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
        url,
        min_size=min_size,
        max_size=max(min_size, max_size),
        kwargs={"autocommit": True},
        check=psycopg_pool.ConnectionPool.check_connection,
        timeout=connect_timeout_s if checkout_timeout_s is None else checkout_timeout_s,
        reconnect_timeout=_RECONNECT_S,
        open=False,
        name=name,
    )
    if wait:
        pool.open(wait=True, timeout=connect_timeout_s)
    else:
        # not waiting: a server unreachable now is the first checkout's PoolTimeout
        pool.open(wait=False)
    return pool


# ---------------------------------------------------------------------------- migrations


def migrations(folder: Path = MIGRATIONS) -> list[Migration]:
    """The numbered SQL files (``NNNN_name.sql``) as (version, name, text), in order."""
    return numbered(folder)


def migrate(conninfo: str, folder: Path = MIGRATIONS) -> list[int]:
    """Apply the migrations not yet applied, in order, in one transaction; returns their
    versions. Replicas starting together queue on an advisory lock: the first applies, the
    others find nothing left to do."""
    wanted = migrations(folder)
    with psycopg.connect(conninfo, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        done = []
        for version, name, text in pending(applied, wanted):
            log.info("pool migration %04d_%s", version, name)
            conn.execute(text.encode())  # no parameters: several statements in one go
            conn.execute(
                "INSERT INTO schema_migrations(version, name) VALUES (%s, %s)", (version, name)
            )
            done.append(version)
    return done


# ---------------------------------------------------------------------------- the adapter

_EVENT_COLUMNS: Final = "version, " + EVENT_STATE_COLUMNS

# The open events near each point whose span can reach the alert's window, and the closed ones
# that closed within it (recurrence links). One row per (type, box) in one JSON parameter: a
# batch's alerts in a few hundred distinct places cost one statement. It returns ids and
# versions; whole rows are read only for the events the writer does not hold at that version.
# Each box is its own range scan of the (type, lat) partial index: the subqueries are LATERAL
# and OFFSET 0 keeps the planner from flattening them into one hash join of every box with
# every event of the type (EXPLAIN: 20 ms for a city batch over 2,000 events, and growing
# with the table).
_CANDIDATES: Final = """
WITH q AS MATERIALIZED (
    SELECT * FROM json_to_recordset(%s::json)
        AS q(type text, la0 float8, la1 float8, lo0 float8, lo1 float8, since float8)
)
SELECT e.id, e.version FROM q CROSS JOIN LATERAL (
    SELECT id, version FROM events
    WHERE type = q.type AND status <> 'closed' AND lat BETWEEN q.la0 AND q.la1
        AND lon BETWEEN q.lo0 AND q.lo1 AND last_observed_at >= q.since
    OFFSET 0
) AS e
UNION
SELECT e.id, e.version FROM q CROSS JOIN LATERAL (
    SELECT id, version FROM events
    WHERE type = q.type AND status = 'closed' AND lat BETWEEN q.la0 AND q.la1
        AND lon BETWEEN q.lo0 AND q.lo1 AND closed_at >= q.since
    OFFSET 0
) AS e
ORDER BY 1
"""

# Many rows in one statement: the rows travel as one JSON parameter (orjson writes it in
# microseconds, PostgreSQL reads it in one pass), where executemany would cost the server a
# statement per row. Floats are written in their shortest round-trip form, so they arrive exact.
_INSERT_EVENTS: Final = """
INSERT INTO events(id, source, type, severity, status, department, grid_code, grid_path, lat,
    lon, address, description, snapshot_sha256, snapshot_score, first_observed_at,
    last_observed_at, registered_at, updated_at, deadline_at, alert_count, device_count,
    recurrence_of, change_seq)
SELECT * FROM json_to_recordset(%s::json) AS x(id bigint, source text, type text,
    severity text, status text, department text, grid_code text, grid_path text, lat float8,
    lon float8, address text, description text, snapshot_sha256 text, snapshot_score float8,
    first_observed_at float8, last_observed_at float8, registered_at float8, updated_at float8,
    deadline_at float8, alert_count int, device_count int, recurrence_of bigint,
    change_seq bigint)
"""
_UPDATE_EVENTS: Final = """
UPDATE events e SET severity = x.severity, snapshot_sha256 = x.snapshot_sha256,
    snapshot_score = x.snapshot_score, first_observed_at = x.first_observed_at,
    last_observed_at = x.last_observed_at, updated_at = x.updated_at,
    alert_count = x.alert_count, device_count = x.device_count, change_seq = x.change_seq,
    version = e.version + 1
FROM json_to_recordset(%s::json) AS x(id bigint, severity text, snapshot_sha256 text,
    snapshot_score float8, first_observed_at float8, last_observed_at float8,
    updated_at float8, alert_count int, device_count int, change_seq bigint)
WHERE e.id = x.id
"""
_UPSERT_EVENT_DEVICES: Final = """
INSERT INTO event_devices(event_id, device_id, first_alert_at, alert_count)
SELECT * FROM json_to_recordset(%s::json)
    AS x(event_id bigint, device_id text, first_alert_at float8, alert_count int)
ORDER BY event_id, device_id
ON CONFLICT (event_id, device_id)
    DO UPDATE SET alert_count = event_devices.alert_count + excluded.alert_count
"""
_INSERT_LOG: Final = """
INSERT INTO event_log(event_id, at, action, actor, detail)
SELECT event_id, at, 'registered', 'aggregator', detail
FROM json_to_recordset(%s::json) AS x(event_id bigint, at float8, detail text)
"""
_INSERT_OUT_OF_AREA: Final = """
INSERT INTO out_of_area(alert_id, device_id, type, observed_at, received_at, lat, lon)
SELECT * FROM json_to_recordset(%s::json) AS x(alert_id text, device_id text, type text,
    observed_at float8, received_at float8, lat float8, lon float8)
ORDER BY alert_id
ON CONFLICT (alert_id) DO NOTHING
"""
# sorted by device: replicas upserting the same devices lock their rows in one order
_UPSERT_DEVICES: Final = """
INSERT INTO devices(device_id, last_seen, last_seq, alerts_total, rejected_total,
    out_of_area_total, lat, lon)
SELECT * FROM json_to_recordset(%s::json) AS x(device_id text, last_seen float8,
    last_seq bigint, alerts_total bigint, rejected_total bigint, out_of_area_total bigint,
    lat float8, lon float8)
ORDER BY device_id
ON CONFLICT (device_id) DO UPDATE SET
    last_seen = GREATEST(devices.last_seen, excluded.last_seen),
    lat = COALESCE(excluded.lat, devices.lat),
    lon = COALESCE(excluded.lon, devices.lon),
    last_seq = GREATEST(devices.last_seq, excluded.last_seq),
    alerts_total = devices.alerts_total + excluded.alerts_total,
    rejected_total = devices.rejected_total + excluded.rejected_total,
    out_of_area_total = devices.out_of_area_total + excluded.out_of_area_total
"""

# Binary: the text format spelled every payload out as escaped hex and every float as
# digits, the writer's largest cost per alert after the dedup walk.
_COPY_ALERTS: Final = (
    "COPY alerts (alert_id, event_id, device_id, seq, type, severity, confidence, observed_at,"
    " received_at, batch_id, lat, lon, grid_code, outcome, snapshot_sha256, payload)"
    " FROM STDIN (FORMAT BINARY)"
)
_ALERT_TYPES: Final = (
    "text", "int8", "text", "int8", "text", "text", "float8", "float8",
    "float8", "int8", "float8", "float8", "text", "text", "text", "bytea",
)  # fmt: skip


def _month(t: float) -> int:
    d = datetime.fromtimestamp(t, UTC)
    return d.year * 12 + d.month - 1


def _month_start(m: int) -> float:
    return datetime(m // 12, m % 12 + 1, 1, tzinfo=UTC).timestamp()


def _lock_key(type_: str, cy: int, cx: int) -> int:
    digest = hashlib.blake2b(f"{type_}/{cy}/{cx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# A device sits still, so a batch's points are mostly those of the batches before: their
# boxes and lock keys are remembered (pure functions of the point; bounded caches).
@lru_cache(maxsize=1 << 16)
def _box(lat: float, lon: float, radius_m: float) -> tuple[float, float, float, float]:
    """A lat/lon box holding every point within ``radius_m`` of (lat, lon), with a margin.
    North-south, a great circle is at least as long as its latitude difference; east-west the
    cap's widest longitude is asin(sin r / cos φ), never less than r / cos φ."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M) * 1.01
    cos = math.cos(math.radians(min(89.0, abs(lat) + dlat)))
    dlon = min(180.0, math.degrees(radius_m / EARTH_RADIUS_M) / max(cos, 1e-6) * 1.01)
    return lat - dlat, lat + dlat, lon - dlon, lon + dlon


@lru_cache(maxsize=1 << 16)
def _point_lock_keys(type_: str, lat: float, lon: float, radius_m: float) -> tuple[int, ...]:
    """The lock keys of the coarse cells a point's merge circle reaches (usually one)."""
    la0, la1, lo0, lo1 = _box(lat, lon, radius_m)
    return tuple(
        _lock_key(type_, cy, cx)
        for cy in range(math.floor(la0 / LOCK_CELL_DEG), math.floor(la1 / LOCK_CELL_DEG) + 1)
        for cx in range(math.floor(lo0 / LOCK_CELL_DEG), math.floor(lo1 / LOCK_CELL_DEG) + 1)
    )


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _text(value: str) -> str:
    """Free text as PostgreSQL can hold it: its text type refuses NUL characters, which SQLite
    keeps and a device may send (a description, a rejected message's lenient ids). Without
    this, one such alert would fail every batch it is in."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


class PgEventPool:
    """The writer side of the pool on PostgreSQL. Any number of instances, in one process or on
    many machines, may write to one database at once."""

    # held events beyond this many are forgotten at once (the next batches read them again)
    HOLD_MAX = 200_000

    def __init__(
        self,
        url: str,
        catalogue: Catalogue,
        ref_lat: float = 0.0,
        *,
        dead_letter_keep_bytes: int = 64 * 1024,
        lock: LockMode = "cell",
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: float = 10.0,
        checkout_timeout_s: float | None = None,
        migrate_on_open: bool = True,
    ) -> None:
        self.catalogue = catalogue
        self.ref_lat = ref_lat
        self.dead_letter_keep_bytes = dead_letter_keep_bytes
        self.lock = lock
        self._radius = {c: t.merge_radius_m for c, t in catalogue.types.items()}
        self._window = {c: t.merge_window_s for c, t in catalogue.types.items()}
        self._months: set[int] = set()
        # Events as this writer last read or wrote them, by id: (version, state). Only a cache:
        # a batch uses a held state only when the row still has that version (every write
        # bumps it), so other replicas' and operators' changes are always read.
        self._held: dict[int, tuple[int, EventState]] = {}
        self._url = url
        self._timeout_s = connect_timeout_s
        self._reader: PgReader | None = None
        if migrate_on_open:
            with _faults():
                migrate(url)
        with _faults():
            self._pool = connection_pool(
                url,
                name="cwg-pool",
                min_size=min_size,
                max_size=max_size,
                connect_timeout_s=connect_timeout_s,
                checkout_timeout_s=checkout_timeout_s,
            )
            now = time.time()
            self._ensure_partitions([now - 31 * 86400, now + 31 * 86400])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._pool.close()

    @property
    def reader(self) -> PgReader:
        """A read-only connection of this writer's own for the read model (``queries``), as
        ``EventPool.reader``: the ingest worker reads the summaries of the events it pooled."""
        if self._reader is None:
            with _faults():
                self._reader = PgReader(self._url, connect_timeout_s=self._timeout_s)
        return self._reader

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool (autocommit); faults raise ``PoolUnavailableError``."""
        with _faults(), self._pool.connection() as conn:
            yield conn

    # -- partitions ----------------------------------------------------------

    def _ensure_partitions(self, times: Iterable[float]) -> None:
        """Monthly partitions of ``alerts`` for every month the times fall in (and the next),
        made in a transaction of their own: DDL on the parent must not sit in a batch's."""
        ts = list(times)
        if not ts:
            return
        lo, hi = _month(min(ts)), _month(max(ts)) + 1
        missing = [m for m in range(lo, hi + 1) if m not in self._months]
        if not missing:
            return
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
            for m in missing:
                name = f"alerts_p{m // 12:04d}{m % 12 + 1:02d}"
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} PARTITION OF alerts"
                        " FOR VALUES FROM ({}) TO ({})"
                    ).format(
                        sql.Identifier(name),
                        sql.Literal(_month_start(m)),
                        sql.Literal(_month_start(m + 1)),
                    )
                )
        self._months.update(missing)

    # -- the one write path --------------------------------------------------

    def commit_batch(self, batch: Batch) -> BatchResult:
        """Pool a micro-batch in one transaction; returns what became of each message, as
        ``EventPool.commit_batch`` does."""
        received = [a.received_at for a in batch.alerts]
        if received:
            self._ensure_partitions((min(received), max(received)))
        with self.connection() as conn, conn.transaction():
            result, held = self._commit(conn, batch)
        # Committed: only now may the writer's memory learn what this batch did.
        if len(self._held) + len(held) > self.HOLD_MAX:
            self._held = {}
        self._held.update(held)
        return result

    def _lock_keys(self, alerts: Sequence[AlertIn]) -> list[int]:
        if self.lock == "batch":
            return [_BATCH_LOCK]
        keys: set[int] = set()
        radius = self._radius
        for type_, lat, lon in {(a.type, a.lat, a.lon) for a in alerts}:
            keys.update(_point_lock_keys(type_, lat, lon, radius[type_]))
        return sorted(keys)

    def _commit(
        self, conn: psycopg.Connection[Any], batch: Batch
    ) -> tuple[BatchResult, dict[int, tuple[int, EventState]]]:
        result = BatchResult()
        now = time.time()
        cur = conn.cursor()
        keys = self._lock_keys(batch.alerts)
        if keys:
            # sorted, one at a time: two replicas wanting overlapping cells queue, never deadlock
            cur.execute(
                "SELECT count(pg_advisory_xact_lock(k))"
                " FROM (SELECT unnest(%s::bigint[]) AS k ORDER BY 1) AS s",
                (keys,),
            )
        row = cur.execute(
            "INSERT INTO batches(started_at) VALUES (%s) RETURNING id, nextval('pool_change_seq')",
            (now,),
        ).fetchone()
        assert row is not None
        batch_id, change = int(row[0]), int(row[1])

        # Exact dedup: claim the ids. Sorted, so two replicas claiming overlapping sets queue.
        first_received: dict[str, float] = {}
        for a in batch.alerts:
            first_received.setdefault(a.alert_id, a.received_at)
        claimed: set[str] = set()
        if first_received:
            ids = sorted(first_received)
            # one JSON parameter: dumping two Python lists as PostgreSQL arrays cost the
            # writer more than the statement (a quoting check per element)
            cur.execute(
                "INSERT INTO alert_ids(alert_id, received_at)"
                " SELECT i, r FROM json_to_recordset(%s::json) AS u(i text, r float8) ORDER BY i"
                " ON CONFLICT DO NOTHING RETURNING alert_id",
                (_json([{"i": i, "r": first_received[i]} for i in ids]),),
            )
            claimed = {r[0] for r in cur.fetchall()}
        known: dict[str, EventRef] = {}
        pooled_before = [i for i in first_received if i not in claimed]
        if pooled_before:
            for r in cur.execute(
                "SELECT alert_id, event_id FROM alerts WHERE alert_id = ANY(%s)", (pooled_before,)
            ):
                known[r[0]] = int(r[1])
            for i in pooled_before:
                known.setdefault(i, None)  # its month was dropped by retention

        fresh = [a for a in batch.alerts if a.alert_id in claimed]
        held = self._read_candidates(cur, fresh)
        index = DedupIndex(self.ref_lat, self._radius, self._window)
        for _, base in held.values():
            index.put(base)  # read only: the batch edits copies (BatchWork.edit)
        work = BatchWork(index)

        # New events get provisional ids (-1, -2, …): real ones come from the sequence once
        # the batch knows how many it needs. Free text loses its NULs (_text).
        walk = work.walk(
            batch.alerts, self.catalogue, known, now=now, ids=itertools.count(-1, -1), text=_text
        )

        new_states = [work.get(i) for i in work.new_ids]
        new_set = set(work.new_ids)
        changed = sorted(
            (work.get(i) for i in work.edited_ids if i not in new_set), key=lambda s: s.id
        )
        device_alerts = [(work.get(eid), dev, v) for (eid, dev), v in work.device_alerts.items()]
        if new_states:
            cur.execute(
                "SELECT nextval('events_id_seq') FROM generate_series(1, %s)", (len(new_states),)
            )
            for state, r in zip(new_states, cur.fetchall(), strict=True):
                state.id = int(r[0])

        walk.fill(result)
        self._write_events(cur, new_states, changed, device_alerts, now, change)
        with cur.copy(_COPY_ALERTS) as copy:
            copy.set_types(_ALERT_TYPES)
            for row in walk.alert_rows(batch_id):
                copy.write_row(row)
        if walk.registered:
            records = [
                {"event_id": s.id, "at": now, "detail": _json(d)} for s, d in walk.registered
            ]
            cur.execute(_INSERT_LOG, (_json(records),))
        self._record_out_of_area(cur, batch.out_of_area)
        result.out_of_area = batch.out_of_area
        self._record_dead_letters(cur, batch.dead_letters, result)
        self._update_devices(cur, batch, result)
        result.updated -= result.created
        result.committed_at = time.time()
        cur.execute(
            "UPDATE batches SET committed_at=%s, size=%s WHERE id=%s",
            (result.committed_at, len(batch), batch_id),
        )
        self._notify(cur, batch_id, change, result.created, result.updated)

        final = {s.id: s for s in work.states.values()}
        catalogue = self.catalogue

        def summary(event_id: int) -> dict[str, Any]:
            return summary_dict(final[event_id], catalogue)

        result.summary = summary
        for state in changed:
            held[state.id] = (held[state.id][0] + 1, state)
        for state in new_states:
            held[state.id] = (1, state)
        return result, held

    @staticmethod
    def _notify(
        cur: psycopg.Cursor[Any], batch_id: int, change: int, created: set[int], updated: set[int]
    ) -> None:
        """The change feed: delivered to listeners at COMMIT, never for a rolled-back batch."""
        payload = _json(
            {
                "batch": batch_id,
                "change": change,
                "created": sorted(created),
                "updated": sorted(updated),
            }
        )
        if len(payload) > _NOTIFY_MAX:  # listeners read the batch's events from the table
            payload = _json({"batch": batch_id, "change": change, "truncated": True})
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def _read_candidates(
        self, cur: psycopg.Cursor[Any], alerts: Sequence[AlertIn]
    ) -> dict[int, tuple[int, EventState]]:
        """Every event any of these alerts could join or link to, as it is now (read under the
        batch's locks), by id: (version, state). Rows the writer holds at the same version are
        not read again."""
        boxes: dict[tuple[str, float, float], list[float]] = {}
        for a in alerts:
            key = (a.type, a.lat, a.lon)
            since = a.observed_at - self._window[a.type]
            box = boxes.get(key)
            if box is None:
                boxes[key] = [*_box(a.lat, a.lon, self._radius[a.type]), since]
            elif since < box[4]:
                box[4] = since
        out: dict[int, tuple[int, EventState]] = {}
        if not boxes:
            return out
        records = [
            {"type": t, "la0": la0, "la1": la1, "lo0": lo0, "lo1": lo1, "since": since}
            for (t, _, _), (la0, la1, lo0, lo1, since) in boxes.items()
        ]
        missing = []
        for event_id, version in cur.execute(_CANDIDATES, (_json(records),)):
            hit = self._held.get(event_id)
            if hit is not None and hit[0] == version:
                out[event_id] = hit
            else:
                missing.append(event_id)
        if not missing:
            return out
        devices: dict[int, dict[str, int]] = {}
        for d in cur.execute(
            "SELECT event_id, device_id, alert_count FROM event_devices WHERE event_id = ANY(%s)"
            " ORDER BY event_id, first_alert_at, device_id",
            (missing,),
        ):
            devices.setdefault(d[0], {})[d[1]] = d[2]
        rows = cur.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE id = ANY(%s)", (missing,)
        ).fetchall()
        for r in rows:
            if r[2] not in self.catalogue.types:
                continue
            out[r[1]] = (r[0], event_state(r[1:], devices.get(r[1], {})))
        return out

    @staticmethod
    def _write_events(
        cur: psycopg.Cursor[Any],
        new: Sequence[EventState],
        changed: Sequence[EventState],
        device_alerts: Sequence[tuple[EventState, str, list[Any]]],
        now: float,
        change: int,
    ) -> None:
        if new:
            records = [new_event_record(s, now, change) for s in new]
            cur.execute(_INSERT_EVENTS, (_json(records),))
        if changed:
            records = [merged_event_record(s, now, change) for s in changed]
            cur.execute(_UPDATE_EVENTS, (_json(records),))
        if device_alerts:
            records = [
                {"event_id": s.id, "device_id": d, "first_alert_at": first_at, "alert_count": n}
                for s, d, (first_at, n) in device_alerts
            ]
            cur.execute(_UPSERT_EVENT_DEVICES, (_json(records),))

    @staticmethod
    def _record_out_of_area(cur: psycopg.Cursor[Any], items: Sequence[OutOfAreaIn]) -> None:
        if not items:
            return
        records = [
            {
                "alert_id": o.alert_id,
                "device_id": o.device_id,
                "type": o.type,
                "observed_at": o.observed_at,
                "received_at": o.received_at,
                "lat": o.lat,
                "lon": o.lon,
            }
            for o in items
        ]
        cur.execute(_INSERT_OUT_OF_AREA, (_json(records),))

    def _record_dead_letters(
        self, cur: psycopg.Cursor[Any], items: Sequence[DeadLetterIn], result: BatchResult
    ) -> None:
        """Each rejected message once, keyed by the sha256 of topic, NUL, payload (as
        ``EventPool``); only the head of a long payload is kept, with its full size and hash."""
        keep = self.dead_letter_keep_bytes
        for dl in items:
            key = dead_letter_key(dl)
            row = cur.execute(
                "INSERT INTO dead_letters(received_at, topic, device_id, alert_id, reason,"
                " detail, payload, message_sha256, payload_size, payload_sha256)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT(message_sha256) DO NOTHING RETURNING id",
                (
                    dl.received_at,
                    _text(dl.topic),
                    _opt_text(dl.device_id),
                    _opt_text(dl.alert_id),
                    dl.reason.value,
                    _text(dl.detail),
                    dl.payload[:keep],
                    key,
                    len(dl.payload),
                    hashlib.sha256(dl.payload).hexdigest(),
                ),
            ).fetchone()
            duplicate = row is None
            if row is None:
                row = cur.execute(
                    "SELECT id FROM dead_letters WHERE message_sha256 = %s", (key,)
                ).fetchone()
                assert row is not None
            result.dead_letters.append(
                DeadLetterResult(
                    int(row[0]),
                    dl.device_id,
                    dl.alert_id,
                    dl.reason,
                    dl.detail,
                    duplicate=duplicate,
                    seq=dl.seq,
                )
            )

    @staticmethod
    def _update_devices(cur: psycopg.Cursor[Any], batch: Batch, result: BatchResult) -> None:
        records = [
            {
                "device_id": _text(t.device_id),
                "last_seen": t.last_seen,
                "last_seq": t.last_seq,
                "alerts_total": t.alerts,
                "rejected_total": t.rejected,
                "out_of_area_total": t.out_of_area,
                "lat": t.lat,
                "lon": t.lon,
            }
            for t in device_tallies(batch, result)
        ]
        if records:
            cur.execute(_UPSERT_DEVICES, (_json(records),))
        if batch.statuses:
            # A status is applied only if it is not older than the one held: a retained
            # "online" replayed on resubscribe must not undo a later Last Will.
            cur.executemany(
                "UPDATE devices SET state=%s, state_reason=%s, state_at=%s,"
                " kind=COALESCE(%s, kind), health=COALESCE(%s, health)"
                " WHERE device_id=%s AND (state_at IS NULL OR state_at <= %s)",
                [
                    (
                        _text(s.state),
                        _opt_text(s.reason),
                        s.at,
                        _opt_text(s.kind),
                        _opt_text(s.health),
                        _text(s.device_id),
                        s.at,
                    )
                    for s in sorted(batch.statuses, key=lambda s: s.device_id)
                ],
            )

    # -- lifecycle (operators) ----------------------------------------------

    def set_status(
        self, event_id: int, status: EventStatus, actor: str, note: str = ""
    ) -> dict[str, Any]:
        """Move an event along its lifecycle; a closed event stays closed. The lock of the
        event's cell makes a batch that may merge into the event wait for the step, or the
        step for the batch."""
        with self.connection() as conn, conn.transaction():
            place = conn.execute(
                "SELECT type, lat, lon FROM events WHERE id=%s", (event_id,)
            ).fetchone()
            if place is None:
                raise PoolError(f"no event {event_id}")
            type_, lat, lon = place
            key = (
                _BATCH_LOCK
                if self.lock == "batch"
                else _lock_key(
                    type_, math.floor(lat / LOCK_CELL_DEG), math.floor(lon / LOCK_CELL_DEG)
                )
            )
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            row = conn.execute(
                "SELECT status FROM events WHERE id=%s FOR UPDATE", (event_id,)
            ).fetchone()
            assert row is not None  # events are never deleted
            now = time.time()  # under the lock: after every batch that merged into the event
            if row[0] == EventStatus.CLOSED.value:
                raise PoolError(f"event {event_id} is closed; a recurrence opens a new event")
            change_row = conn.execute(
                "UPDATE events SET status=%s, updated_at=%s, closed_at=%s, version=version+1,"
                " change_seq=nextval('pool_change_seq') WHERE id=%s RETURNING change_seq",
                (status.value, now, now if status is EventStatus.CLOSED else None, event_id),
            ).fetchone()
            assert change_row is not None
            conn.execute(
                "INSERT INTO event_log(event_id, at, action, actor, detail)"
                " VALUES (%s,%s,%s,%s,%s)",
                (
                    event_id,
                    now,
                    f"status:{status.value}",
                    actor,
                    _json({"from": row[0], "note": note}),
                ),
            )
            conn.execute(
                "SELECT pg_notify(%s, %s)",
                (CHANNEL, _json({"change": int(change_row[0]), "updated": [event_id]})),
            )
        return {"event_id": event_id, "from": row[0], "to": status.value, "at": now}

    # -- retention -------------------------------------------------------------

    def prune(self, before: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` dead letters and out-of-area rows received before ``before``
        (epoch seconds), oldest first; returns how many went (as ``EventPool.prune``)."""
        removed = 0
        with self.connection() as conn, conn.transaction():
            for table, key in (("dead_letters", "id"), ("out_of_area", "alert_id")):
                cur = conn.execute(
                    sql.SQL(
                        "DELETE FROM {t} WHERE {k} IN (SELECT {k} FROM {t}"
                        " WHERE received_at < %s ORDER BY received_at LIMIT %s)"
                    ).format(t=sql.Identifier(table), k=sql.Identifier(key)),
                    (before, limit),
                )
                removed += max(cur.rowcount, 0)
        return removed

    def drop_alerts_before(self, before: float) -> list[str]:
        """The retention job for months of alerts: drop every monthly partition that ends at
        or before ``before``, with its alert ids (a redelivery of one later would be pooled
        again, as a new alert: keep months for longer than any device's outbox). Events and
        their logs stay. Returns the partitions dropped."""
        dropped = []
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
            parts = conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'alerts'::regclass ORDER BY c.relname"
            ).fetchall()
            for (name,) in parts:
                if not (name.startswith("alerts_p") and name[8:].isdigit()):
                    continue
                m = int(name[8:12]) * 12 + int(name[12:14]) - 1
                if _month_start(m + 1) > before:
                    continue
                conn.execute(
                    "DELETE FROM alert_ids WHERE received_at >= %s AND received_at < %s",
                    (_month_start(m), _month_start(m + 1)),
                )
                conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                self._months.discard(m)
                dropped.append(name)
        return dropped


@dataclass(frozen=True, slots=True)
class PoolChange:
    """One committed change of the pool, as the change feed announces it."""

    change: int  # the change number (events.change_seq of the rows it touched)
    batch: int | None  # the batch that made it; None for an operator's lifecycle step
    created: tuple[int, ...]
    updated: tuple[int, ...]
    truncated: bool = False  # too many ids for a notification: read the batch's rows

    @classmethod
    def parse(cls, payload: str) -> PoolChange:
        d = orjson.loads(payload)
        return cls(
            int(d["change"]),
            d.get("batch"),
            tuple(d.get("created", ())),
            tuple(d.get("updated", ())),
            bool(d.get("truncated", False)),
        )


class ChangeListener:
    """Every change committed to the pool by any writer on any machine (``LISTEN cwg_pool``):
    how a replica's operators see, live, the events other replicas pool.

    Notifications sent while the listener was disconnected are not replayed: after a
    reconnect ``reconnected`` is set, and the reader catches up from the table (events with a
    change number above the last it saw, less a margin: numbers are taken before commit)."""

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self._url = url
        self._timeout = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self.reconnected = False
        self.last_change = 0
        self._open()
        self.reconnected = False

    def _open(self) -> None:
        with _faults():
            conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=max(1, round(self._timeout))
            )
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        self._conn = conn
        self.reconnected = True

    def poll(self, timeout: float) -> list[PoolChange]:
        """The changes committed since the last poll, waiting up to ``timeout`` s for the
        first. Raises ``PoolUnavailableError`` while the server cannot be reached."""
        if self._conn is None or self._conn.closed:
            self._open()
        assert self._conn is not None
        try:
            with _faults():
                got = list(self._conn.notifies(timeout=timeout, stop_after=1))
                if got:
                    got += self._conn.notifies(timeout=0)
        except PoolUnavailableError:
            self._conn.close()
            raise
        changes = [PoolChange.parse(n.payload) for n in got if n.channel == CHANNEL]
        for c in changes:
            self.last_change = max(self.last_change, c.change)
        return changes

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PgSnapshotStore:
    """Snapshots where every replica reads them: content-addressed JPEG bytes in the pool's
    ``snapshots`` table. Written (autocommit) before the batch that names them commits, as
    ``SnapshotStore`` writes its files."""

    def __init__(self, pool: PgEventPool) -> None:
        self._pool = pool

    def put(self, jpeg: bytes) -> str:
        sha = hashlib.sha256(jpeg).hexdigest()
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO snapshots(sha256, jpeg, stored_at) VALUES (%s, %s, %s)"
                " ON CONFLICT(sha256) DO NOTHING",
                (sha, jpeg, time.time()),
            )
        return sha

    def get(self, sha256: str) -> bytes | None:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT jpeg FROM snapshots WHERE sha256=%s", (sha256,)).fetchone()
        return None if row is None else bytes(row[0])
