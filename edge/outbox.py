"""The alert outbox: a SQLite (WAL) file where every alert is committed before it is published.

Why: paho-mqtt keeps unacknowledged messages only in memory, so a restart or a long broker
outage would lose them. Here an alert is a row from the moment it exists until the aggregator
has answered for it (feedback for its ``alert_id``, whatever the outcome), and the publisher
replays unsent rows in ``seq`` order.

A row goes through three states:

* **unsent** (``acked_at`` NULL): not yet acknowledged by the broker; every new connection
  publishes these again, in ``seq`` order;
* **awaiting feedback** (``acked_at`` set): the broker's PUBACK came. That only means the broker
  holds it, and a broker can die before it saves or hands it on. If no feedback arrives by
  ``resend_at`` (``feedback_timeout_s`` after the PUBACK, doubling with each resend up to
  ``_MAX_BACKOFF`` times), the row is published again under the same ``alert_id``; the
  aggregator's exact dedup answers ``duplicate`` and that clears it too. The doubling keeps a
  long aggregator outage from filling the broker with copies of the same backlog;
* **delivered** (``delivered_at`` set): feedback came (accepted, merged, duplicate, rejected or
  out_of_area).

The per-device ``seq`` lives in the same file (table ``meta``) and is allocated in the same
transaction as the row, so it stays monotonic across restarts and after rows are pruned.

Overflow policy (bounded by ``max_rows`` and ``max_bytes`` of *undelivered* alerts):

1. When a new alert would exceed a limit, the victims are chosen among undelivered,
   non-critical alerts: lowest severity first, oldest (lowest seq) first within a severity.
2. If the cheapest victim is *more* severe than the new alert, the new alert itself is dropped
   instead (it is then the lowest-severity, newest alert).
3. Critical alerts are never dropped. When only critical alerts remain, the outbox grows past
   its limits rather than lose one; this is logged at WARNING and counted (``overflow_grown``).
   Blocking the producer instead would stall the camera and sensor loops, which must go on
   watching for the next critical warning.

Every drop is counted per (type, severity) in the table ``dropped``, which survives restarts;
so is every resend (``meta`` key ``resent``). Delivered rows are kept only up to
``keep_delivered`` for inspection, then pruned.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from contract import AlertV1, Severity

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    seq          INTEGER PRIMARY KEY,
    alert_id     TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    severity     TEXT NOT NULL,
    sev_rank     INTEGER NOT NULL,
    payload      BLOB NOT NULL,
    size         INTEGER NOT NULL,
    created_at   REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    delivered_at REAL,
    acked_at     REAL,
    resend_at    REAL,
    resends      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (delivered_at, seq);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    type     TEXT NOT NULL,
    severity TEXT NOT NULL,
    count    INTEGER NOT NULL,
    PRIMARY KEY (type, severity)
);
"""
# Columns added after the first release: an outbox file made before gains them on open.
_ADDED_COLUMNS = {"acked_at": "REAL", "resend_at": "REAL", "resends": "INTEGER NOT NULL DEFAULT 0"}
_CRITICAL_RANK = Severity.CRITICAL.rank
# The wait for feedback doubles with each resend of an alert, up to this many times the first.
_MAX_BACKOFF = 8


class AlertBuilder(Protocol):
    def __call__(self, seq: int) -> AlertV1: ...


class OutboxError(Exception):
    """The outbox file cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class PendingAlert:
    seq: int
    alert_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    seq: int
    stored: bool  # False: the new alert itself was dropped by the overflow policy
    dropped: tuple[tuple[int, str, str], ...]  # (seq, type, severity) evicted to make room


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    depth_bytes: int
    delivered: int
    next_seq: int
    dropped_total: int
    dropped: dict[tuple[str, str], int]
    overflow_grown: int
    awaiting_feedback: int = 0  # acknowledged by the broker, no feedback yet (part of depth)
    resent: int = 0  # publishes again after no feedback came in time, since the file was made


class Outbox:
    """Thread-safe: the agent's producers enqueue while the publisher thread drains."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_rows: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
        keep_delivered: int = 1000,
        feedback_timeout_s: float = 30.0,
    ) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("outbox limits must be positive")
        if feedback_timeout_s <= 0:
            raise ValueError("feedback_timeout_s must be positive")
        self.feedback_timeout_s = feedback_timeout_s
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.keep_delivered = keep_delivered
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed alert survives power loss too, not only a killed process.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            have = {str(r[1]) for r in self._db.execute("PRAGMA table_info(alerts)")}
            for name, decl in _ADDED_COLUMNS.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE alerts ADD COLUMN {name} {decl}")
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _meta(self, db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, db: sqlite3.Connection, key: str, by: int = 1) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (key, by),
        )

    def _count_drop(self, db: sqlite3.Connection, type_code: str, severity: str) -> None:
        db.execute(
            "INSERT INTO dropped (type, severity, count) VALUES (?, ?, 1) "
            "ON CONFLICT (type, severity) DO UPDATE SET count = count + 1",
            (type_code, severity),
        )

    def next_seq(self) -> int:
        with self._lock:
            return self._meta(self._db, "next_seq")

    def enqueue(self, build: AlertBuilder) -> tuple[AlertV1, EnqueueResult]:
        """Allocate the next seq, build the alert with it and commit it in one transaction.

        ``build(seq)`` must return the finished alert; it runs inside the transaction so that
        a seq is never used twice and never skipped by a crash between allocation and insert.
        """
        with self._tx() as db:
            seq = self._meta(db, "next_seq")
            alert = build(seq)
            if alert.seq != seq:
                raise OutboxError(f"alert built with seq {alert.seq}, allocated {seq}")
            self._bump(db, "next_seq")
            payload = alert.to_json()
            severity = alert.severity or Severity.MEDIUM
            result = self._make_room(db, seq, alert.type, severity, len(payload))
            if result.stored:
                db.execute(
                    "INSERT INTO alerts (seq, alert_id, type, severity, sev_rank, payload, size,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        seq,
                        alert.alert_id,
                        alert.type,
                        severity.value,
                        severity.rank,
                        payload,
                        len(payload),
                        time.time(),
                    ),
                )
        for dseq, dtype, dsev in result.dropped:
            logger.warning(
                "outbox full: dropped alert seq=%s type=%s severity=%s", dseq, dtype, dsev
            )
        if not result.stored:
            logger.warning(
                "outbox full of more severe alerts: dropped new alert seq=%s type=%s severity=%s",
                seq,
                alert.type,
                severity.value,
            )
        return alert, result

    def _make_room(
        self, db: sqlite3.Connection, seq: int, type_code: str, severity: Severity, size: int
    ) -> EnqueueResult:
        rows, total = db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM alerts WHERE delivered_at IS NULL"
        ).fetchone()
        dropped: list[tuple[int, str, str]] = []
        while rows + 1 > self.max_rows or total + size > self.max_bytes:
            victim = db.execute(
                "SELECT seq, type, severity, sev_rank, size FROM alerts"
                " WHERE delivered_at IS NULL AND sev_rank < ?"
                " ORDER BY sev_rank, seq LIMIT 1",
                (_CRITICAL_RANK,),
            ).fetchone()
            if victim is not None and victim[3] <= severity.rank:
                db.execute("DELETE FROM alerts WHERE seq = ?", (victim[0],))
                self._count_drop(db, victim[1], victim[2])
                dropped.append((victim[0], victim[1], victim[2]))
                rows -= 1
                total -= victim[4]
                continue
            if severity.rank < _CRITICAL_RANK:
                self._count_drop(db, type_code, severity.value)
                return EnqueueResult(seq, stored=False, dropped=tuple(dropped))
            # Only critical alerts left and the new one is critical too: grow, never drop.
            self._bump(db, "overflow_grown")
            logger.warning(
                "outbox over its limits (%s rows, %s bytes) with critical alerts only: growing",
                rows + 1,
                total + size,
            )
            break
        return EnqueueResult(seq, stored=True, dropped=tuple(dropped))

    def pending(self, after_seq: int = -1, limit: int = 100) -> list[PendingAlert]:
        """Unsent alerts (no PUBACK yet) with seq > ``after_seq``, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, alert_id, payload FROM alerts"
                " WHERE delivered_at IS NULL AND acked_at IS NULL AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [PendingAlert(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def due(self, now: float | None = None, limit: int = 100) -> list[PendingAlert]:
        """Alerts the broker acknowledged whose feedback is overdue, in seq order."""
        at = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, alert_id, payload FROM alerts"
                " WHERE delivered_at IS NULL AND acked_at IS NOT NULL AND resend_at <= ?"
                " ORDER BY seq LIMIT ?",
                (at, limit),
            ).fetchall()
        return [PendingAlert(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def mark_sent(self, seq: int) -> None:
        with self._lock:
            self._db.execute("UPDATE alerts SET attempts = attempts + 1 WHERE seq = ?", (seq,))

    def mark_acked(self, seqs: list[int]) -> None:
        """The broker acknowledged these (PUBACK): now they wait for the aggregator's feedback."""
        if not seqs:
            return
        now = time.time()
        timeout = self.feedback_timeout_s
        with self._tx() as db:
            db.executemany(
                "UPDATE alerts SET acked_at = ?,"
                " resend_at = ? + ? * (1 << min(resends, ?))"
                " WHERE seq = ? AND delivered_at IS NULL",
                [(now, now, timeout, _MAX_BACKOFF.bit_length() - 1, s) for s in seqs],
            )

    def mark_resending(self, seqs: list[int]) -> None:
        """These overdue alerts are being published again: unsent until their next PUBACK."""
        if not seqs:
            return
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE alerts SET acked_at = NULL, resend_at = NULL, resends = resends + 1"
                " WHERE seq = ? AND delivered_at IS NULL",
                [(s,) for s in seqs],
            )
            self._bump(db, "resent", db.total_changes - before)

    def mark_confirmed(self, alert_ids: list[str]) -> int:
        """Feedback came for these alert ids: delivered. Returns how many rows that cleared."""
        if not alert_ids:
            return 0
        now = time.time()
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE alerts SET delivered_at = ? WHERE alert_id = ? AND delivered_at IS NULL",
                [(now, a) for a in alert_ids],
            )
            cleared = db.total_changes - before
            self._prune(db)
        return cleared

    def mark_delivered(self, seqs: list[int]) -> None:
        """Feedback came for these seqs (an answer that could not name the alert_id)."""
        if not seqs:
            return
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "UPDATE alerts SET delivered_at = ? WHERE seq = ? AND delivered_at IS NULL",
                [(now, s) for s in seqs],
            )
            self._prune(db)

    def _prune(self, db: sqlite3.Connection) -> None:
        # Keep only the newest delivered rows, for inspection.
        db.execute(
            "DELETE FROM alerts WHERE delivered_at IS NOT NULL AND seq NOT IN"
            " (SELECT seq FROM alerts WHERE delivered_at IS NOT NULL"
            "  ORDER BY seq DESC LIMIT ?)",
            (self.keep_delivered,),
        )

    def depth(self) -> int:
        """Alerts the aggregator has not answered for yet (unsent or awaiting feedback)."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM alerts WHERE delivered_at IS NULL"
            ).fetchone()
        return int(row[0])

    def unsent(self) -> int:
        """Alerts the broker has not acknowledged yet."""
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM alerts WHERE delivered_at IS NULL AND acked_at IS NULL"
            ).fetchone()
        return int(row[0])

    def resent_total(self) -> int:
        with self._lock:
            return self._meta(self._db, "resent")

    def dropped_total(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT coalesce(sum(count), 0) FROM dropped").fetchone()
        return int(row[0])

    def stats(self) -> OutboxStats:
        with self._lock:
            depth, depth_bytes = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM alerts WHERE delivered_at IS NULL"
            ).fetchone()
            delivered = self._db.execute(
                "SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL"
            ).fetchone()[0]
            awaiting = self._db.execute(
                "SELECT count(*) FROM alerts WHERE delivered_at IS NULL AND acked_at IS NOT NULL"
            ).fetchone()[0]
            dropped = {
                (str(t), str(s)): int(c)
                for t, s, c in self._db.execute(
                    "SELECT type, severity, count FROM dropped ORDER BY type, severity"
                )
            }
            next_seq = self._meta(self._db, "next_seq")
            grown = self._meta(self._db, "overflow_grown")
            resent = self._meta(self._db, "resent")
        return OutboxStats(
            depth=int(depth),
            depth_bytes=int(depth_bytes),
            delivered=int(delivered),
            next_seq=next_seq,
            dropped_total=sum(dropped.values()),
            dropped=dropped,
            overflow_grown=grown,
            awaiting_feedback=int(awaiting),
            resent=resent,
        )
