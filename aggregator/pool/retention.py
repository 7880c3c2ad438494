"""Retention of raw alerts (``gateway retention``): the ``alerts`` rows received before a cut,
and the dead letters and out-of-area rows received before it, leave the pool; nothing else does.

What stays, and why it stays whole: events (with the alert and device counts they store, their
devices and their log), cases, audit chains, supervision items, webhook deliveries (they have
their own retention), batches, devices, and every snapshot and evidence photo. Snapshots are
content-addressed and shared: an event's 实时照片 is one of its alerts' snapshots, and case
evidence lives in the same store, so a snapshot is not an alert's to delete. An event whose
alerts are gone still lists and shows (its alert list is then empty, its counts as stored).

How rows go without stalling ingest:

- The alerts are walked in the order they were pooled (``alerts.id``: SQLite's rowid, the
  PostgreSQL sequence), a chunk of at most ``batch_rows`` rows per transaction: each step
  deletes the chunk's rows received before the cut (a range of the primary key, never a scan),
  commits, and pauses at least as long as it took and never less than ``pause_s``, so a running
  pool writer, whose SQLite busy handler retries every 100 ms, finds the write lock free within
  a pause.
  The walk stops at the first chunk that holds no alert older than the cut. An alert pooled far
  out of arrival order (a batch retried through a long pool outage) goes at a later run, once
  every alert pooled before it is old enough.
- On PostgreSQL the months wholly before the cut go first: each monthly partition of
  ``alerts`` is dropped whole (``DROP TABLE``, which takes a moment's exclusive lock on the
  parent table: it waits at most 2 s for it, three times, rather than queue ingest behind a
  long reader), then the ids of the alerts no partition holds any more leave ``alert_ids`` in
  bounded steps. The walk then deletes the rest of the partly old month, each step with its
  alerts' ids. One job at a time per pool (a session advisory lock): replicas or a cron job
  starting it together do not both walk.

A deleted alert's id is forgotten: the same alert sent again later would be pooled again, as a
new alert (semantic dedup still merges it into its event while that is open). Keep alerts for
longer than any device may hold an unconfirmed alert in its outbox.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from aggregator.errors import PoolError
from aggregator.pool.reader import is_pool_url

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

BATCH_ROWS: Final = 5_000
# longer than SQLite's longest busy-handler sleep (100 ms): a writer waiting for the lock retries
# within every pause
PAUSE_S: Final = 0.15
# a partition's rows are counted up to this many (a month of a city's alerts is far more, and
# counting them would read the whole partition)
COUNT_CAP: Final = 1_000_000
# tries at dropping a partition (each waits up to 2 s for its lock)
DROP_ATTEMPTS = 3
# session advisory lock of the retention job on PostgreSQL (the schema's other keys end 1, 2, 3)
_JOB_LOCK: Final = 0x6377_6700_0000_0004

TABLES_KEPT: Final = (
    "events (their alert and device counts as stored, devices, log), cases, audit chains, "
    "supervision items, webhook deliveries, batches, devices, snapshots and evidence photos"
)


class RetentionBusyError(PoolError):
    """Another retention job holds this pool (PostgreSQL): try again when it has finished."""


@dataclass(frozen=True, slots=True)
class Partition:
    """A monthly partition of ``alerts`` wholly before the cut (PostgreSQL)."""

    name: str
    start: float
    end: float
    rows: int  # counted up to COUNT_CAP
    more: bool  # it holds more than COUNT_CAP rows


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a walk is: its steps, the alerts it removed (or, dry, would remove) so far, and
    the receive time of the last alert it looked at."""

    steps: int
    alerts: int
    reached: float


@dataclass(slots=True)
class RetentionReport:
    """What a retention run removed, or would remove (``dry_run``)."""

    cut: float
    dry_run: bool
    partitions: list[Partition] = field(default_factory=list)
    alerts: int = 0  # deleted row by row in the walk (partitions' rows not counted here)
    steps: int = 0
    dead_letters: int = 0
    out_of_area: int = 0
    seconds: float = 0.0

    @property
    def partition_rows(self) -> int:
        return sum(p.rows for p in self.partitions)


class _Backend(Protocol):
    def chunk(self, lo: int, floor: float, n: int) -> list[tuple[int, float]]: ...

    def delete(self, lo: int, hi: int, floor: float, cut: float) -> int: ...

    def count_rejects(self, cut: float) -> tuple[int, int]: ...

    def prune_rejects(self, cut: float, n: int) -> tuple[int, int]: ...


def apply_retention(
    target: Path | str,
    cut: float,
    *,
    dry_run: bool = False,
    batch_rows: int = BATCH_ROWS,
    pause_s: float = PAUSE_S,
    progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
) -> RetentionReport:
    """Remove (``dry_run``: count) the raw alerts, dead letters and out-of-area rows received
    before ``cut`` (UNIX seconds) from the pool at ``target``: a SQLite file or a
    ``postgresql://`` URL. Every step commits on its own: an interrupted run keeps what it
    did, and the next one carries on; so does a run ``stop`` ends between two steps."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    started = time.monotonic()
    report = RetentionReport(cut=cut, dry_run=dry_run)
    if is_pool_url(target):
        with _PgBackend.open(str(target)) as pg:
            floor = pg.partitions(cut, report, batch_rows=batch_rows, pause_s=pause_s)
            _walk(pg, cut, floor, report, batch_rows, pause_s, progress, stop)
            _rejects(pg, cut, report, batch_rows, pause_s)
    else:
        with closing(_SqliteBackend(Path(target))) as lite:
            _walk(lite, cut, float("-inf"), report, batch_rows, pause_s, progress, stop)
            _rejects(lite, cut, report, batch_rows, pause_s)
    report.seconds = time.monotonic() - started
    log.info(
        "retention before=%s dry_run=%s partitions=%s alerts=%s dead_letters=%s out_of_area=%s",
        datetime.fromtimestamp(cut, UTC).isoformat(timespec="seconds"),
        dry_run,
        len(report.partitions),
        report.alerts,
        report.dead_letters,
        report.out_of_area,
    )
    return report


class RetentionTimer:
    """The retention job once a day in the service (``CWG_RETENTION__ALERT_DAYS``), on a thread
    and connection of its own: the same bounded steps as ``gateway retention``. The first run
    waits ``first_after_s`` (replicas restarting together do not all prune at start; on
    PostgreSQL one job runs at a time anyway). A run that fails is logged and retried at the
    next period; ``stop`` ends a run between two steps."""

    def __init__(
        self,
        target: Path | str,
        keep_days: float,
        *,
        every_s: float = 86400.0,
        first_after_s: float = 3600.0,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self._target = target
        self._keep_s = keep_days * 86400.0
        self._every_s = every_s
        self._first_after_s = first_after_s
        self._batch_rows = batch_rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cwg-retention", daemon=True)
        self.last: RetentionReport | None = None
        self.runs = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        wait = self._first_after_s
        while not self._stop.wait(wait):
            wait = self._every_s
            try:
                self.last = apply_retention(
                    self._target,
                    time.time() - self._keep_s,
                    batch_rows=self._batch_rows,
                    stop=self._stop,
                )
            except Exception as exc:  # noqa: BLE001  (the next period tries again)
                log.warning("retention run failed (next in %.0f s): %s", wait, exc)
            self.runs += 1


def _walk(
    backend: _Backend,
    cut: float,
    floor: float,
    report: RetentionReport,
    batch_rows: int,
    pause_s: float,
    progress: Callable[[Progress], None] | None,
    stop: threading.Event | None = None,
) -> None:
    """The alerts in arrival order, a chunk per step, until a chunk holds none older than
    ``cut``; only rows received at or after ``floor`` are looked at (on PostgreSQL: after the
    months a dry run would have dropped)."""
    lo = 0
    while stop is None or not stop.is_set():
        rows = backend.chunk(lo, floor, batch_rows)
        if not rows:
            return
        hi = rows[-1][0]
        old = sum(1 for _, received in rows if received < cut)
        if old == 0:
            return
        if report.dry_run:
            report.alerts += old
        else:
            began = time.monotonic()
            report.alerts += backend.delete(lo, hi, floor, cut)
            # the writer's turn: at least as long as the step held the lock
            rest = max(pause_s, time.monotonic() - began)
            if stop is not None:
                stop.wait(rest)
            else:
                time.sleep(rest)
        report.steps += 1
        if progress is not None:
            progress(Progress(report.steps, report.alerts, rows[-1][1]))
        lo = hi + 1


def _rejects(
    backend: _Backend, cut: float, report: RetentionReport, batch_rows: int, pause_s: float
) -> None:
    if report.dry_run:
        report.dead_letters, report.out_of_area = backend.count_rejects(cut)
        return
    while True:
        began = time.monotonic()
        dead, outside = backend.prune_rejects(cut, batch_rows)
        report.dead_letters += dead
        report.out_of_area += outside
        if dead < batch_rows and outside < batch_rows:
            return
        time.sleep(max(pause_s, time.monotonic() - began))  # as the walk: the writer's turn


# ---------------------------------------------------------------------------- SQLite


class _SqliteBackend:
    def __init__(self, path: Path) -> None:
        from aggregator.pool.sqlite import connect

        if not path.is_file():
            raise PoolError(f"no event pool at {path}: run the aggregator first (gateway run)")
        self._db = connect(path)
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'alerts'").fetchone() is None:
            self._db.close()
            raise PoolError(f"{path} is not an event pool (it has no alerts table)")

    def close(self) -> None:
        self._db.close()

    def chunk(self, lo: int, floor: float, n: int) -> list[tuple[int, float]]:
        # a range of the rowid: the alerts' order of arrival
        return [
            (int(r[0]), float(r[1]))
            for r in self._db.execute(
                "SELECT id, received_at FROM alerts WHERE id >= ? ORDER BY id LIMIT ?", (lo, n)
            )
        ]

    def delete(self, lo: int, hi: int, floor: float, cut: float) -> int:
        from aggregator.pool.sqlite import write_transaction

        with write_transaction(self._db) as db:
            cur = db.execute(
                "DELETE FROM alerts WHERE id BETWEEN ? AND ? AND received_at < ?", (lo, hi, cut)
            )
            return max(cur.rowcount, 0)

    def count_rejects(self, cut: float) -> tuple[int, int]:
        dead = self._db.execute(
            "SELECT count(*) FROM dead_letters WHERE received_at < ?", (cut,)
        ).fetchone()[0]
        outside = self._db.execute(
            "SELECT count(*) FROM out_of_area WHERE received_at < ?", (cut,)
        ).fetchone()[0]
        return int(dead), int(outside)

    def prune_rejects(self, cut: float, n: int) -> tuple[int, int]:
        from aggregator.pool.sqlite import write_transaction

        with write_transaction(self._db) as db:
            dead = db.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                " WHERE received_at < ? ORDER BY received_at LIMIT ?)",
                (cut, n),
            ).rowcount
            # out_of_area is WITHOUT ROWID: by its own key
            outside = db.execute(
                "DELETE FROM out_of_area WHERE alert_id IN (SELECT alert_id FROM out_of_area"
                " WHERE received_at < ? ORDER BY received_at LIMIT ?)",
                (cut, n),
            ).rowcount
        return max(dead, 0), max(outside, 0)


# ---------------------------------------------------------------------------- PostgreSQL


class _PgBackend:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @classmethod
    @contextmanager
    def open(cls, url: str) -> Iterator[_PgBackend]:
        import psycopg

        from aggregator.pool.postgres import PoolUnavailableError

        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise PoolUnavailableError(f"PostgreSQL pool: {exc}") from exc
        with conn:
            if not _one(conn.execute("SELECT pg_try_advisory_lock(%s)", (_JOB_LOCK,))):
                raise RetentionBusyError(
                    "another retention job is running on this pool: try again when it has finished"
                )
            if _one(conn.execute("SELECT to_regclass('alerts')")) is None:
                raise PoolError("this database is not an event pool (it has no alerts table)")
            try:
                yield cls(conn)
            except psycopg.OperationalError as exc:
                raise PoolUnavailableError(f"PostgreSQL pool: {exc}") from exc
            # the session's end releases the job lock

    def partitions(
        self, cut: float, report: RetentionReport, *, batch_rows: int, pause_s: float
    ) -> float:
        """Drop (dry: list) the monthly partitions that end at or before ``cut``, then the
        alert ids no partition can hold any more; returns where the rest of the alerts begin
        (the last dropped month's end, or -inf)."""
        import psycopg
        from psycopg import sql

        from aggregator.pool.postgres import _PARTITION_LOCK, _month_start

        floor = float("-inf")
        kept_from = cut  # alert ids received before this have no alert left
        names = self._conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'alerts'::regclass ORDER BY c.relname"
        ).fetchall()
        for (name,) in names:
            if not (name.startswith("alerts_p") and len(name) == 14 and name[8:].isdigit()):
                continue  # not one of ours: left alone
            month = int(name[8:12]) * 12 + int(name[12:14]) - 1
            start, end = _month_start(month), _month_start(month + 1)
            if end > cut:
                kept_from = min(kept_from, start)
                continue
            rows = int(
                _one(
                    self._conn.execute(
                        sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT %s) s").format(
                            sql.Identifier(name)
                        ),
                        (COUNT_CAP + 1,),
                    )
                )
            )
            report.partitions.append(
                Partition(name, start, end, min(rows, COUNT_CAP), rows > COUNT_CAP)
            )
            floor = max(floor, end)
            if report.dry_run:
                continue
            for attempt in range(1, DROP_ATTEMPTS + 1):
                try:
                    with self._conn.transaction():
                        # Dropping a partition takes a moment's exclusive lock on the parent
                        # table; while it waits for one, ingest's inserts queue behind it. A
                        # short wait, given up and tried again, bounds that stall.
                        self._conn.execute("SET LOCAL lock_timeout = '2s'")
                        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PARTITION_LOCK,))
                        self._conn.execute(
                            sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name))
                        )
                    break
                except psycopg.errors.LockNotAvailable:
                    if attempt == DROP_ATTEMPTS:
                        raise
                    time.sleep(1.0)
            log.info("retention dropped partition %s", name)
        if not report.dry_run:
            # The dropped months' ids (and any a stopped run left), in bounded steps: a month
            # of a city's ids is hundreds of millions of rows, too many for one transaction.
            while True:
                gone = self._conn.execute(
                    "DELETE FROM alert_ids WHERE alert_id IN (SELECT alert_id FROM alert_ids"
                    " WHERE received_at < %s LIMIT %s)",
                    (min(kept_from, cut), batch_rows),
                ).rowcount
                if gone < batch_rows:
                    break
                time.sleep(pause_s / 10)
        return floor

    def chunk(self, lo: int, floor: float, n: int) -> list[tuple[int, float]]:
        # the partitions' primary keys (id, received_at), merged in id order
        return [
            (int(r[0]), float(r[1]))
            for r in self._conn.execute(
                "SELECT id, received_at FROM alerts WHERE id >= %s AND received_at >= %s"
                " ORDER BY id LIMIT %s",
                (lo, floor, n),
            )
        ]

    def delete(self, lo: int, hi: int, floor: float, cut: float) -> int:
        with self._conn.transaction():
            ids = [
                r[0]
                for r in self._conn.execute(
                    "DELETE FROM alerts WHERE id BETWEEN %s AND %s AND received_at >= %s"
                    " AND received_at < %s RETURNING alert_id",
                    (lo, hi, floor, cut),
                )
            ]
            if ids:
                self._conn.execute("DELETE FROM alert_ids WHERE alert_id = ANY(%s)", (ids,))
        return len(ids)

    def count_rejects(self, cut: float) -> tuple[int, int]:
        dead = _one(
            self._conn.execute("SELECT count(*) FROM dead_letters WHERE received_at < %s", (cut,))
        )
        outside = _one(
            self._conn.execute("SELECT count(*) FROM out_of_area WHERE received_at < %s", (cut,))
        )
        return int(dead), int(outside)

    def prune_rejects(self, cut: float, n: int) -> tuple[int, int]:
        with self._conn.transaction():
            dead = self._conn.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                " WHERE received_at < %s ORDER BY received_at LIMIT %s)",
                (cut, n),
            ).rowcount
            outside = self._conn.execute(
                "DELETE FROM out_of_area WHERE alert_id IN (SELECT alert_id FROM out_of_area"
                " WHERE received_at < %s ORDER BY received_at LIMIT %s)",
                (cut, n),
            ).rowcount
        return max(dead, 0), max(outside, 0)


def _one(cur: psycopg.Cursor[Any]) -> Any:
    """The first column of a question's one row."""
    row = cur.fetchone()
    assert row is not None  # an aggregate or a function call: always one row
    return row[0]


def is_retention_fault(exc: BaseException) -> bool:
    """Whether ``exc`` stopped a run part-way for the pool's reasons (locked, unreachable,
    a lock timeout): what was done is kept, and running again carries on."""
    if isinstance(exc, sqlite3.OperationalError | RetentionBusyError):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    from aggregator.pool.postgres import PoolUnavailableError

    return isinstance(exc, PoolUnavailableError | psycopg.OperationalError)
