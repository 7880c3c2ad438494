"""The community event pool (社区事件池) on SQLite (WAL).

One writer commits a whole micro-batch in one ``BEGIN IMMEDIATE`` transaction: exact dedup by the
``alerts.alert_id`` primary key, semantic dedup by type, radius and time window, the devices'
last-seen state and the dead letters all land together or not at all. Readers (the API, the
scenario runner, the CLI) open their own connections; WAL lets them read while the writer writes.

Times are stored as UNIX seconds (REAL) so that window arithmetic stays in SQL; the API and the
wire carry RFC 3339.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from aggregator.errors import PoolError
from aggregator.fileperms import FILE_MODE, private_dir, private_file, tighten
from aggregator.pool.dedup import DedupIndex, EventState
from aggregator.pool.migrate import migrate_sqlite
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
)
from contract import (
    Catalogue,
    EventStatus,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the pool


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pool's pragmas. Autocommit mode: transactions are explicit."""
    path = Path(path)
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        # SQLite gives the WAL and shared-memory files the database file's mode: a 0600 pool
        # made here has a 0600 WAL. Files of an older or copied pool are tightened too.
        private_dir(path.parent)
        private_file(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # first: switching a new file to WAL takes a lock that replicas opening it too queue on
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            tighten(extra, FILE_MODE)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: index pages stay hot under load
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


class EventPool:
    """The writer side of the pool. One instance per aggregator process: it is the only one
    that creates or merges events, and it keeps the open ones in a ``DedupIndex``."""

    # How long past its merge window an event stays in memory; older alerts ask SQL.
    KEEP_S = 3600.0
    EVICT_EVERY_S = 60.0

    def __init__(
        self,
        path: Path | str,
        catalogue: Catalogue,
        ref_lat: float = 0.0,
        *,
        dead_letter_keep_bytes: int = 64 * 1024,
    ) -> None:
        self.path = Path(path)
        self.catalogue = catalogue
        # a rejected payload keeps this many leading bytes (its size and hash are kept whole)
        self.dead_letter_keep_bytes = dead_letter_keep_bytes
        self._db = connect(self.path)
        migrate_sqlite(self._db)  # numbered migrations; a pool made before them too
        # Checkpoints copy the WAL back into the database file; done on the committing thread
        # they would stall ingest every thousand pages. A background connection does them (the
        # sqlite3 module releases the GIL while SQLite works); the high autocheckpoint is only
        # a safety net should that thread ever fall behind.
        self._db.execute("PRAGMA wal_autocheckpoint=20000")
        self._checkpointer = _Checkpointer(self.path)
        self._index = DedupIndex(
            ref_lat,
            {c: t.merge_radius_m for c, t in catalogue.types.items()},
            {c: t.merge_window_s for c, t in catalogue.types.items()},
        )
        self._seen_seq = 0
        self._last_evict = time.time()
        self._load_index()

    def _load_index(self) -> None:
        now = time.time()
        since = now - self.KEEP_S
        longest = max(self._index.window_s.values(), default=0.0)
        with self._transaction() as db:
            self._seen_seq = _current_change(db)
            rows = db.execute(
                f"SELECT {EVENT_STATE_COLUMNS} FROM events"
                " WHERE (status != 'closed' AND last_observed_at >= ?)"
                " OR (status = 'closed' AND closed_at >= ?)",
                (since - longest, since - longest),
            ).fetchall()
            states = self._states(db, rows)
        self._index.load(states, since)
        log.info("dedup index loaded events=%s", len(states))

    def close(self) -> None:
        self._checkpointer.stop()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:  # a reader still holds a snapshot: fine
            log.info("final checkpoint deferred: %s", exc)
        self._db.close()

    @property
    def reader(self) -> sqlite3.Connection:
        """The writer's own connection, for reads on the writer's thread between batches."""
        return self._db

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db)

    # -- the one write path --------------------------------------------------

    def commit_batch(self, batch: Batch) -> BatchResult:
        """Pool a micro-batch in one transaction; returns what became of each message."""
        result = BatchResult()
        now = time.time()
        work = BatchWork(self._index)
        with self._transaction() as db:
            self._sync_changes(db, work)
            work.change_seq = _next_change(db)
            batch_id = db.execute("INSERT INTO batches(started_at) VALUES (?)", (now,)).lastrowid
            assert batch_id is not None
            known: dict[str, EventRef] = dict(
                self._known_alerts(db, [a.alert_id for a in batch.alerts])
            )
            next_id = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM events").fetchone()[0]

            def look_up(a: AlertIn, closed: bool) -> None:
                # an alert older than the index's horizon: its candidates come from SQL
                if not self._index.covers(a.type, a.observed_at):
                    self._fetch_into(db, work, a, closed=closed)

            walk = work.walk(
                batch.alerts,
                self.catalogue,
                known,
                now=now,
                ids=itertools.count(next_id),
                look_up=look_up,
            )
            walk.fill(result)
            self._write_events(db, work, now)
            db.executemany(_INSERT_ALERT, walk.alert_rows(batch_id))
            db.executemany(
                "INSERT INTO event_log(event_id, at, action, actor, detail) VALUES (?,?,?,?,?)",
                [
                    (state.id, now, "registered", "aggregator", _json(detail))
                    for state, detail in walk.registered
                ],
            )
            self._record_out_of_area(db, batch.out_of_area)
            result.out_of_area = batch.out_of_area
            self._record_dead_letters(db, batch.dead_letters, result, self.dead_letter_keep_bytes)
            self._update_devices(db, batch, result)
            result.updated -= result.created
            # The batch row is stamped last, just before COMMIT: observed_at → committed latency
            # of every alert is batches.committed_at - alerts.observed_at.
            result.committed_at = time.time()
            db.execute(
                "UPDATE batches SET committed_at=?, size=? WHERE id=?",
                (result.committed_at, len(batch), batch_id),
            )
        # Committed: only now may the index learn what this batch did.
        work.apply()
        self._seen_seq = work.change_seq
        result.summary = partial(work.summary, catalogue=self.catalogue)
        if now - self._last_evict > self.EVICT_EVERY_S:
            self._index.evict(now, self.KEEP_S)
            self._last_evict = now
        return result

    def _sync_changes(self, db: sqlite3.Connection, work: BatchWork) -> None:
        """Events other connections changed since our last commit: operators' lifecycle steps,
        and the alerts another aggregator replica pooled into this file. We hold the write lock,
        so nothing else changes until we commit; a rolled-back batch reads them again."""
        rows = db.execute(
            f"SELECT {EVENT_STATE_COLUMNS} FROM events WHERE change_seq > ?", (self._seen_seq,)
        ).fetchall()
        for state in self._states(db, rows):
            work.refresh(state)

    @staticmethod
    def _known_alerts(db: sqlite3.Connection, ids: Sequence[str]) -> dict[str, int]:
        """Alert ids already pooled. Read under the write lock, so no one can race us; the
        primary key still refuses a second row if this ever went wrong."""
        known: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in db.execute(
                f"SELECT alert_id, event_id FROM alerts WHERE alert_id IN ({marks})", chunk
            ):
                known[row[0]] = row[1]
        return known

    def _fetch_into(
        self, db: sqlite3.Connection, work: BatchWork, a: AlertIn, closed: bool
    ) -> None:
        """An alert older than the index's horizon: bring its candidates in from SQL."""
        wt = self.catalogue.types[a.type]
        dlat = wt.merge_radius_m / 111_320.0
        dlon = wt.merge_radius_m / (111_320.0 * max(0.01, math.cos(math.radians(a.lat))))
        status = "status = 'closed'" if closed else "status != 'closed'"
        rows = db.execute(
            f"SELECT {EVENT_STATE_COLUMNS} FROM events"
            f" WHERE type=? AND {status} AND last_observed_at >= ?"
            " AND lat BETWEEN ? AND ? AND lon BETWEEN ? AND ?",
            (
                a.type,
                a.observed_at - wt.merge_window_s if not closed else 0.0,
                a.lat - dlat,
                a.lat + dlat,
                a.lon - dlon,
                a.lon + dlon,
            ),
        ).fetchall()
        for state in self._states(db, rows):
            work.refresh(state)

    @staticmethod
    def _write_events(db: sqlite3.Connection, work: BatchWork, now: float) -> None:
        new_ids = set(work.new_ids)
        db.executemany(
            "INSERT INTO events(id, source, type, severity, status, department, grid_code,"
            " grid_path, lat, lon, address, description, snapshot_sha256, snapshot_score,"
            " first_observed_at, last_observed_at, registered_at, updated_at, deadline_at,"
            " alert_count, device_count, recurrence_of, change_seq)"
            " VALUES (:id, :source, :type, :severity, :status, :department, :grid_code,"
            " :grid_path, :lat, :lon, :address, :description, :snapshot_sha256, :snapshot_score,"
            " :first_observed_at, :last_observed_at, :registered_at, :updated_at, :deadline_at,"
            " :alert_count, :device_count, :recurrence_of, :change_seq)",
            [new_event_record(work.get(i), now, work.change_seq) for i in work.new_ids],
        )
        db.executemany(
            "UPDATE events SET severity=:severity, snapshot_sha256=:snapshot_sha256,"
            " snapshot_score=:snapshot_score, first_observed_at=:first_observed_at,"
            " last_observed_at=:last_observed_at, updated_at=:updated_at,"
            " alert_count=:alert_count, device_count=:device_count, change_seq=:change_seq,"
            " version=version+1 WHERE id=:id",
            [
                merged_event_record(work.get(i), now, work.change_seq)
                for i in work.edited_ids
                if i not in new_ids
            ],
        )
        db.executemany(
            "INSERT INTO event_devices(event_id, device_id, first_alert_at, alert_count)"
            " VALUES (?,?,?,?) ON CONFLICT(event_id, device_id)"
            " DO UPDATE SET alert_count = alert_count + excluded.alert_count",
            [
                (event_id, device_id, first_at, n)
                for (event_id, device_id), (first_at, n) in work.device_alerts.items()
            ],
        )

    def _states(self, db: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[EventState]:
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        devices: dict[int, dict[str, int]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for d in db.execute(
                "SELECT event_id, device_id, alert_count FROM event_devices"
                f" WHERE event_id IN ({marks}) ORDER BY event_id, first_alert_at, device_id",
                chunk,
            ):
                devices.setdefault(d[0], {})[d[1]] = d[2]
        return [
            event_state(r, devices.get(r["id"], {}))
            for r in rows
            if r["type"] in self.catalogue.types
        ]

    @staticmethod
    def _record_out_of_area(db: sqlite3.Connection, items: Iterable[OutOfAreaIn]) -> None:
        db.executemany(
            "INSERT INTO out_of_area(alert_id, device_id, type, observed_at, received_at, lat, lon)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT(alert_id) DO NOTHING",
            [
                (o.alert_id, o.device_id, o.type, o.observed_at, o.received_at, o.lat, o.lon)
                for o in items
            ],
        )

    @staticmethod
    def _record_dead_letters(
        db: sqlite3.Connection,
        items: Sequence[DeadLetterIn],
        result: BatchResult,
        keep_bytes: int,
    ) -> None:
        """Each rejected message once: the same bytes on the same topic again (a redelivery
        after a reconnect) add no row, and their result names the row kept. Of a payload
        longer than ``keep_bytes`` only its head is kept, with its full size and sha256: a
        faulty device cannot fill the pool with megabytes per message."""
        kept: dict[str, int] = {}
        for dl in items:
            key = dead_letter_key(dl)
            known = kept.get(key)
            if known is None:
                row = db.execute(
                    "SELECT id FROM dead_letters WHERE message_sha256 = ?", (key,)
                ).fetchone()
                known = None if row is None else int(row[0])
            if known is not None:
                result.dead_letters.append(
                    DeadLetterResult(
                        known,
                        dl.device_id,
                        dl.alert_id,
                        dl.reason,
                        dl.detail,
                        duplicate=True,
                        seq=dl.seq,
                    )
                )
                continue
            cur = db.execute(
                "INSERT INTO dead_letters(received_at, topic, device_id, alert_id, reason,"
                " detail, payload, message_sha256, payload_size, payload_sha256)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    dl.received_at,
                    dl.topic,
                    dl.device_id,
                    dl.alert_id,
                    dl.reason.value,
                    dl.detail,
                    dl.payload[:keep_bytes],
                    key,
                    len(dl.payload),
                    hashlib.sha256(dl.payload).hexdigest(),
                ),
            )
            assert cur.lastrowid is not None
            kept[key] = cur.lastrowid
            result.dead_letters.append(
                DeadLetterResult(
                    cur.lastrowid, dl.device_id, dl.alert_id, dl.reason, dl.detail, seq=dl.seq
                )
            )

    def prune(self, before: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` dead letters and out-of-area rows received before ``before``
        (epoch seconds), oldest first; returns how many went. Bounded, so that the writer's
        transaction stays short: the caller repeats it while it returns ``limit``."""
        removed = 0
        with self._transaction() as db:
            # out_of_area is WITHOUT ROWID: each table by its own key
            for table, key in (("dead_letters", "id"), ("out_of_area", "alert_id")):
                cur = db.execute(
                    f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table}"
                    " WHERE received_at < ? ORDER BY received_at LIMIT ?)",
                    (before, limit),
                )
                removed += max(cur.rowcount, 0)
        return removed

    @staticmethod
    def _update_devices(db: sqlite3.Connection, batch: Batch, result: BatchResult) -> None:
        rows = [
            (
                t.device_id,
                t.last_seen,
                t.last_seq,
                t.alerts,
                t.rejected,
                t.out_of_area,
                t.lat,
                t.lon,
            )
            for t in device_tallies(batch, result)
        ]
        db.executemany(
            "INSERT INTO devices(device_id, last_seen, last_seq, alerts_total, rejected_total,"
            " out_of_area_total, lat, lon) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT(device_id) DO UPDATE SET"
            " last_seen = MAX(last_seen, excluded.last_seen),"
            " lat = COALESCE(excluded.lat, lat), lon = COALESCE(excluded.lon, lon),"
            " last_seq = COALESCE(MAX(last_seq, excluded.last_seq), last_seq, excluded.last_seq),"
            " alerts_total = alerts_total + excluded.alerts_total,"
            " rejected_total = rejected_total + excluded.rejected_total,"
            " out_of_area_total = out_of_area_total + excluded.out_of_area_total",
            rows,
        )
        # A status is applied only if it is not older than the one we hold: a retained "online"
        # replayed on resubscribe must not undo a later Last Will.
        db.executemany(
            "UPDATE devices SET state=?, state_reason=?, state_at=?, kind=COALESCE(?, kind),"
            " health=COALESCE(?, health) WHERE device_id=? AND (state_at IS NULL OR state_at <= ?)",
            [
                (s.state, s.reason, s.at, s.kind, s.health, s.device_id, s.at)
                for s in batch.statuses
            ],
        )

    # -- lifecycle (operators) ----------------------------------------------

    def set_status(
        self, event_id: int, status: EventStatus, actor: str, note: str = ""
    ) -> dict[str, Any]:
        return set_event_status(self._db, event_id, status, actor, note)


class LifecycleWriter:
    """Operators' lifecycle steps on a connection of its own: no dedup index, no checkpoints.
    The ingest writer reads the steps at its next batch (the change number)."""

    def __init__(self, path: Path | str) -> None:
        self._db = connect(path)

    def set_status(
        self, event_id: int, status: EventStatus, actor: str, note: str = ""
    ) -> dict[str, Any]:
        return set_event_status(self._db, event_id, status, actor, note)

    def close(self) -> None:
        self._db.close()


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on the pool file: ``BEGIN IMMEDIATE`` takes the database's one
    write lock at once (reads inside see what no other writer can change before the commit),
    then COMMIT, or ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR): a ROLLBACK then
        # fails, and its error must not hide the one that says what went wrong.
        if db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def set_event_status(
    db: sqlite3.Connection, event_id: int, status: EventStatus, actor: str, note: str = ""
) -> dict[str, Any]:
    """Move an event along its lifecycle from any connection; a closed event stays closed.
    The writer learns of it from ``event_log`` at its next batch."""
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT status FROM events WHERE id=?", (event_id,)).fetchone()
        if row is None:
            raise PoolError(f"no event {event_id}")
        if row[0] == EventStatus.CLOSED.value:
            raise PoolError(f"event {event_id} is closed; a recurrence opens a new event")
        db.execute(
            "UPDATE events SET status=?, updated_at=?, closed_at=?, version=version+1,"
            " change_seq=? WHERE id=?",
            (
                status.value,
                now,
                now if status is EventStatus.CLOSED else None,
                _next_change(db),
                event_id,
            ),
        )
        db.execute(
            "INSERT INTO event_log(event_id, at, action, actor, detail) VALUES (?,?,?,?,?)",
            (event_id, now, f"status:{status.value}", actor, _json({"from": row[0], "note": note})),
        )
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return {"event_id": event_id, "from": row[0], "to": status.value, "at": now}


class _Checkpointer:
    """Passive WAL checkpoints on a connection and thread of their own."""

    def __init__(self, path: Path, every_s: float = 0.5) -> None:
        self._path = path
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cwg-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = connect(self._path)
        try:
            while not self._stop.wait(self._every_s):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # busy or I/O: the next round retries
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _current_change(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key='change_seq'").fetchone()
    return int(row[0]) if row else 0


def _next_change(db: sqlite3.Connection) -> int:
    """The next pool-wide change number; call inside the write transaction."""
    db.execute(
        "INSERT INTO meta(key, value) VALUES ('change_seq', '1') ON CONFLICT(key)"
        " DO UPDATE SET value = CAST(value AS INTEGER) + 1"
    )
    return _current_change(db)


_INSERT_ALERT = (
    "INSERT INTO alerts(alert_id, event_id, device_id, seq, type, severity, confidence,"
    " observed_at, received_at, batch_id, lat, lon, grid_code, outcome, snapshot_sha256, payload)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


# ---------------------------------------------------------------------------- reading
