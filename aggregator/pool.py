"""The community event pool (社区事件池) on SQLite (WAL).

One writer commits a whole micro-batch in one ``BEGIN IMMEDIATE`` transaction: exact dedup by the
``alerts.alert_id`` primary key, semantic dedup by type, radius and time window, the devices'
last-seen state and the dead letters all land together or not at all. Readers (the API, the
scenario runner, the CLI) open their own connections; WAL lets them read while the writer writes.

Times are stored as UNIX seconds (REAL) so that window arithmetic stays in SQL; the API and the
wire carry RFC 3339.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from aggregator.errors import PoolError
from contract import (
    Catalogue,
    EventStatus,
    EventSummary,
    GridLevel,
    Location,
    Outcome,
    RejectReason,
    Severity,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EARTH_RADIUS_M = 6_371_008.8
SOURCE = "smart_community_warning"  # Longgang 5.4

_SCHEMA = """
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
    version           INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS events_open ON events(type, last_observed_at) WHERE status != 'closed';
CREATE INDEX IF NOT EXISTS events_closed ON events(type, closed_at) WHERE status = 'closed';
CREATE INDEX IF NOT EXISTS events_grid ON events(grid_code);
CREATE INDEX IF NOT EXISTS events_registered ON events(registered_at);

CREATE TABLE IF NOT EXISTS alerts (
    alert_id        TEXT PRIMARY KEY,
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
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alerts_event ON alerts(event_id);
CREATE INDEX IF NOT EXISTS alerts_device ON alerts(device_id, seq);

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


def ts(value: datetime) -> float:
    return value.timestamp()


def iso(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


# ---------------------------------------------------------------------------- batch input


@dataclass(frozen=True, slots=True)
class AlertIn:
    """A valid, geo-tagged alert ready to be pooled."""

    alert_id: str
    device_id: str
    seq: int
    type: str
    severity: Severity
    confidence: float
    observed_at: float
    received_at: float
    lat: float
    lon: float
    grid_code: str
    grid_path: str  # JSON of contract GridLevel list
    address: str
    description: str
    snapshot_sha256: str | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class OutOfAreaIn:
    alert_id: str
    device_id: str
    type: str
    observed_at: float
    received_at: float
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class DeadLetterIn:
    received_at: float
    topic: str
    device_id: str | None
    alert_id: str | None
    reason: RejectReason
    detail: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StatusIn:
    device_id: str
    state: str
    reason: str | None
    at: float
    kind: str | None
    health: str | None  # JSON


@dataclass(slots=True)
class Batch:
    alerts: list[AlertIn] = field(default_factory=list)
    out_of_area: list[OutOfAreaIn] = field(default_factory=list)
    dead_letters: list[DeadLetterIn] = field(default_factory=list)
    statuses: list[StatusIn] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # device_id -> last message time

    def __len__(self) -> int:
        return (
            len(self.alerts) + len(self.out_of_area) + len(self.dead_letters) + len(self.statuses)
        )


@dataclass(frozen=True, slots=True)
class AlertResult:
    alert_id: str
    device_id: str
    seq: int
    outcome: Outcome
    event_id: int | None


@dataclass(frozen=True, slots=True)
class DeadLetterResult:
    id: int
    device_id: str | None
    alert_id: str | None
    reason: RejectReason
    detail: str


@dataclass(slots=True)
class BatchResult:
    alerts: list[AlertResult] = field(default_factory=list)
    out_of_area: list[OutOfAreaIn] = field(default_factory=list)
    dead_letters: list[DeadLetterResult] = field(default_factory=list)
    created: set[int] = field(default_factory=set)
    updated: set[int] = field(default_factory=set)
    committed_at: float = 0.0


# ---------------------------------------------------------------------------- the pool


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pool's pragmas. Autocommit mode: transactions are explicit."""
    path = Path(path)
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


class EventPool:
    """The writer side of the pool. One instance per aggregator process."""

    def __init__(self, path: Path | str, catalogue: Catalogue) -> None:
        self.path = Path(path)
        self.catalogue = catalogue
        self._db = connect(self.path)
        self._db.executescript(_SCHEMA)
        self._check_version()

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) != SCHEMA_VERSION:
            raise PoolError(
                f"{self.path}: pool schema version {row[0]}, this aggregator needs "
                f"{SCHEMA_VERSION}; migrate the pool or point the aggregator at a new file"
            )

    def close(self) -> None:
        self._db.close()

    @property
    def reader(self) -> sqlite3.Connection:
        """The writer's own connection, for reads on the writer's thread between batches."""
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the one write path --------------------------------------------------

    def commit_batch(self, batch: Batch) -> BatchResult:
        """Pool a micro-batch in one transaction; returns what became of each message."""
        result = BatchResult()
        now = time.time()
        with self._transaction() as db:
            cur = db.execute("INSERT INTO batches(started_at) VALUES (?)", (now,))
            batch_id = cur.lastrowid
            assert batch_id is not None
            known = self._known_alerts(db, [a.alert_id for a in batch.alerts])
            for alert in batch.alerts:
                if alert.alert_id in known:
                    result.alerts.append(
                        AlertResult(
                            alert.alert_id,
                            alert.device_id,
                            alert.seq,
                            Outcome.DUPLICATE,
                            known[alert.alert_id],
                        )
                    )
                    continue
                event_id, created = self._pool_alert(db, alert, now, batch_id)
                known[alert.alert_id] = event_id
                (result.created if created else result.updated).add(event_id)
                result.alerts.append(
                    AlertResult(
                        alert.alert_id,
                        alert.device_id,
                        alert.seq,
                        Outcome.ACCEPTED if created else Outcome.MERGED,
                        event_id,
                    )
                )
            self._record_out_of_area(db, batch.out_of_area)
            result.out_of_area = batch.out_of_area
            for dl in batch.dead_letters:
                cur = db.execute(
                    "INSERT INTO dead_letters(received_at, topic, device_id, alert_id, reason,"
                    " detail, payload) VALUES (?,?,?,?,?,?,?)",
                    (
                        dl.received_at,
                        dl.topic,
                        dl.device_id,
                        dl.alert_id,
                        dl.reason.value,
                        dl.detail,
                        dl.payload,
                    ),
                )
                assert cur.lastrowid is not None
                result.dead_letters.append(
                    DeadLetterResult(cur.lastrowid, dl.device_id, dl.alert_id, dl.reason, dl.detail)
                )
            self._update_devices(db, batch, result)
            result.updated -= result.created
            # The batch row is stamped last, just before COMMIT: observed_at → committed latency
            # of every alert is batches.committed_at - alerts.observed_at.
            result.committed_at = time.time()
            db.execute(
                "UPDATE batches SET committed_at=?, size=? WHERE id=?",
                (result.committed_at, len(batch), batch_id),
            )
        return result

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

    def _pool_alert(
        self, db: sqlite3.Connection, a: AlertIn, now: float, batch_id: int
    ) -> tuple[int, bool]:
        wt = self.catalogue.types[a.type]
        window, radius = wt.merge_window_s, wt.merge_radius_m
        dlat = radius / 111_320.0
        dlon = radius / (111_320.0 * max(0.01, math.cos(math.radians(a.lat))))
        # An alert joins an open event whose observed span, widened by the window, holds it.
        rows = db.execute(
            "SELECT id, lat, lon, status FROM events"
            " WHERE type=? AND status != 'closed'"
            " AND last_observed_at >= ? AND first_observed_at <= ?"
            " AND lat BETWEEN ? AND ? AND lon BETWEEN ? AND ?",
            (
                a.type,
                a.observed_at - window,
                a.observed_at + window,
                a.lat - dlat,
                a.lat + dlat,
                a.lon - dlon,
                a.lon + dlon,
            ),
        ).fetchall()
        best = _nearest(rows, a, radius)
        if best is not None:
            self._merge(db, best, a, now, batch_id)
            return best, False
        recurrence = self._recurrence_of(db, a, window, dlat, dlon, radius)
        return self._create(db, a, now, batch_id, recurrence), True

    @staticmethod
    def _recurrence_of(
        db: sqlite3.Connection, a: AlertIn, window: float, dlat: float, dlon: float, radius: float
    ) -> int | None:
        """A closed event absorbs nothing; a recurrence near it opens a new event linked to it."""
        rows = db.execute(
            "SELECT id, lat, lon, status FROM events"
            " WHERE type=? AND status = 'closed' AND closed_at >= ?"
            " AND lat BETWEEN ? AND ? AND lon BETWEEN ? AND ?",
            (
                a.type,
                a.observed_at - window,
                a.lat - dlat,
                a.lat + dlat,
                a.lon - dlon,
                a.lon + dlon,
            ),
        ).fetchall()
        return _nearest(rows, a, radius)

    def _create(
        self, db: sqlite3.Connection, a: AlertIn, now: float, batch_id: int, recurrence: int | None
    ) -> int:
        wt = self.catalogue.types[a.type]
        cur = db.execute(
            "INSERT INTO events(source, type, severity, status, department, grid_code, grid_path,"
            " lat, lon, address, description, snapshot_sha256, snapshot_score, first_observed_at,"
            " last_observed_at, registered_at, updated_at, deadline_at, alert_count, device_count,"
            " recurrence_of) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1,1,?)",
            (
                SOURCE,
                a.type,
                a.severity.value,
                EventStatus.REGISTERED.value,
                wt.department,
                a.grid_code,
                a.grid_path,
                a.lat,
                a.lon,
                a.address,
                a.description or f"{wt.zh} / {wt.en}",
                a.snapshot_sha256,
                a.confidence if a.snapshot_sha256 else None,
                a.observed_at,
                a.observed_at,
                now,
                now,
                now + wt.handling_deadline.total_seconds(),
                recurrence,
            ),
        )
        event_id = cur.lastrowid
        assert event_id is not None
        self._insert_alert(db, a, event_id, Outcome.ACCEPTED, batch_id)
        db.execute(
            "INSERT INTO event_devices(event_id, device_id, first_alert_at, alert_count)"
            " VALUES (?,?,?,1)",
            (event_id, a.device_id, a.observed_at),
        )
        detail = {"alert_id": a.alert_id, "device_id": a.device_id}
        if recurrence is not None:
            detail["recurrence_of"] = str(recurrence)
        db.execute(
            "INSERT INTO event_log(event_id, at, action, actor, detail) VALUES (?,?,?,?,?)",
            (event_id, now, "registered", "aggregator", orjson.dumps(detail).decode()),
        )
        return event_id

    def _merge(
        self, db: sqlite3.Connection, event_id: int, a: AlertIn, now: float, batch_id: int
    ) -> None:
        self._insert_alert(db, a, event_id, Outcome.MERGED, batch_id)
        new_device = (
            db.execute(
                "INSERT INTO event_devices(event_id, device_id, first_alert_at, alert_count)"
                " VALUES (?,?,?,1) ON CONFLICT(event_id, device_id)"
                " DO UPDATE SET alert_count = alert_count + 1 RETURNING alert_count",
                (event_id, a.device_id, a.observed_at),
            ).fetchone()[0]
            == 1
        )
        # Severity only rises; the snapshot kept is the one of the most confident alert.
        db.execute(
            "UPDATE events SET alert_count = alert_count + 1,"
            " device_count = device_count + ?,"
            " first_observed_at = MIN(first_observed_at, ?),"
            " last_observed_at = MAX(last_observed_at, ?),"
            " severity = CASE WHEN ? > (CASE severity WHEN 'low' THEN 0 WHEN 'medium' THEN 1"
            "   WHEN 'high' THEN 2 ELSE 3 END) THEN ? ELSE severity END,"
            " snapshot_sha256 = CASE WHEN ? IS NOT NULL AND (snapshot_score IS NULL"
            "   OR ? > snapshot_score) THEN ? ELSE snapshot_sha256 END,"
            " snapshot_score = CASE WHEN ? IS NOT NULL AND (snapshot_score IS NULL"
            "   OR ? > snapshot_score) THEN ? ELSE snapshot_score END,"
            " updated_at = ?, version = version + 1"
            " WHERE id = ?",
            (
                1 if new_device else 0,
                a.observed_at,
                a.observed_at,
                a.severity.rank,
                a.severity.value,
                a.snapshot_sha256,
                a.confidence,
                a.snapshot_sha256,
                a.snapshot_sha256,
                a.confidence,
                a.confidence,
                now,
                event_id,
            ),
        )

    @staticmethod
    def _insert_alert(
        db: sqlite3.Connection, a: AlertIn, event_id: int, outcome: Outcome, batch_id: int
    ) -> None:
        db.execute(
            "INSERT INTO alerts(alert_id, event_id, device_id, seq, type, severity, confidence,"
            " observed_at, received_at, batch_id, lat, lon, grid_code, outcome,"
            " snapshot_sha256, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                a.alert_id,
                event_id,
                a.device_id,
                a.seq,
                a.type,
                a.severity.value,
                a.confidence,
                a.observed_at,
                a.received_at,
                batch_id,
                a.lat,
                a.lon,
                a.grid_code,
                outcome.value,
                a.snapshot_sha256,
                a.payload,
            ),
        )

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
    def _update_devices(db: sqlite3.Connection, batch: Batch, result: BatchResult) -> None:
        counts: dict[str, list[int]] = {}
        last_seq: dict[str, int] = {}
        for r in result.alerts:
            if r.outcome is not Outcome.DUPLICATE:
                counts.setdefault(r.device_id, [0, 0, 0])[0] += 1
                last_seq[r.device_id] = max(last_seq.get(r.device_id, -1), r.seq)
        for d in result.dead_letters:
            if d.device_id:
                counts.setdefault(d.device_id, [0, 0, 0])[1] += 1
        for o in batch.out_of_area:
            counts.setdefault(o.device_id, [0, 0, 0])[2] += 1
        rows = []
        for device_id, seen in batch.seen.items():
            c = counts.get(device_id, [0, 0, 0])
            rows.append((device_id, seen, last_seq.get(device_id), c[0], c[1], c[2]))
        db.executemany(
            "INSERT INTO devices(device_id, last_seen, last_seq, alerts_total, rejected_total,"
            " out_of_area_total) VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
            " last_seen = MAX(last_seen, excluded.last_seen),"
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
        """Move an event along its lifecycle; a closed event stays closed."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT status FROM events WHERE id=?", (event_id,)).fetchone()
            if row is None:
                raise PoolError(f"no event {event_id}")
            if row[0] == EventStatus.CLOSED.value:
                raise PoolError(f"event {event_id} is closed; a recurrence opens a new event")
            db.execute(
                "UPDATE events SET status=?, updated_at=?, closed_at=?, version=version+1"
                " WHERE id=?",
                (status.value, now, now if status is EventStatus.CLOSED else None, event_id),
            )
            db.execute(
                "INSERT INTO event_log(event_id, at, action, actor, detail) VALUES (?,?,?,?,?)",
                (
                    event_id,
                    now,
                    f"status:{status.value}",
                    actor,
                    orjson.dumps({"from": row[0], "note": note}).decode(),
                ),
            )
        return {"event_id": event_id, "from": row[0], "to": status.value, "at": now}


def _nearest(rows: Sequence[sqlite3.Row], a: AlertIn, radius: float) -> int | None:
    best: tuple[float, int] | None = None
    for row in rows:
        d = haversine_m(a.lat, a.lon, row[1], row[2])
        if d <= radius and (best is None or (d, row[0]) < best):
            best = (d, row[0])
    return None if best is None else best[1]


# ---------------------------------------------------------------------------- reading


def event_summaries(
    db: sqlite3.Connection, ids: Iterable[int], catalogue: Catalogue
) -> list[EventSummary]:
    """The wire summary of each event, in id order (for notices, the CLI and the API)."""
    wanted = sorted(set(ids))
    out: list[EventSummary] = []
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        devices: dict[int, list[str]] = {}
        for row in db.execute(
            f"SELECT event_id, device_id FROM event_devices WHERE event_id IN ({marks})"
            " ORDER BY event_id, first_alert_at, device_id",
            chunk,
        ):
            devices.setdefault(row[0], []).append(row[1])
        for row in db.execute(f"SELECT * FROM events WHERE id IN ({marks}) ORDER BY id", chunk):
            out.append(summary_from_row(row, devices.get(row["id"], []), catalogue))
    return out


def summary_from_row(row: sqlite3.Row, device_ids: list[str], catalogue: Catalogue) -> EventSummary:
    wt = catalogue.types.get(row["type"])
    return EventSummary(
        event_id=row["id"],
        type=row["type"],
        type_zh=wt.zh if wt else row["type"],
        type_en=wt.en if wt else row["type"],
        severity=Severity(row["severity"]),
        status=EventStatus(row["status"]),
        department=row["department"],
        grid_code=row["grid_code"],
        grid_path=[GridLevel.model_validate(g) for g in orjson.loads(row["grid_path"])],
        location=Location(lat=row["lat"], lon=row["lon"]),
        description=row["description"],
        first_observed_at=_dt(row["first_observed_at"]),
        last_observed_at=_dt(row["last_observed_at"]),
        registered_at=_dt(row["registered_at"]),
        deadline_at=_dt(row["deadline_at"]),
        alert_count=row["alert_count"],
        device_ids=device_ids,
        snapshot_sha256=row["snapshot_sha256"],
        recurrence_of=row["recurrence_of"],
    )


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)
