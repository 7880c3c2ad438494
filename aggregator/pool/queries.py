"""The read model of the pool: every reader (the API's routes, the CLI, the demo, the scenario
runner and the load generator) asks its questions here, on a reader connection of its own
(``reader.Reader``: an SQLite connection or a ``PgReader``), and gets typed answers. Only this
package holds SQL. The questions are written once, in the SQL both dialects share (the
PostgreSQL schema mirrors the SQLite one column for column, and its numbers come back as the
same Python types); the few that differ (string aggregation, rounding to the hour, a prefix of
the alert ids, a consistent read) choose their dialect here with ``is_pg``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from aggregator.pool.handling import GroupBy, Handling, handling_stats
from aggregator.pool.model import summary_dict_from_row, summary_from_row
from aggregator.pool.reader import Reader, Row, is_pg, read_errors
from aggregator.pool.reader import open_reader as open_reader  # its public name here too
from contract import Catalogue, EventSummary


def event_summaries(db: Reader, ids: Iterable[int], catalogue: Catalogue) -> list[EventSummary]:
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


def event_summary_dicts(
    db: Reader, ids: Iterable[int], catalogue: Catalogue
) -> list[dict[str, Any]]:
    """``event_summaries`` as JSON-ready dicts (``summary_dict_from_row``), in id order: for
    the live stream, which only serializes them."""
    wanted = sorted(set(ids))
    out: list[dict[str, Any]] = []
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        devices = devices_of(db, chunk)
        marks = ",".join("?" * len(chunk))
        for row in db.execute(f"SELECT * FROM events WHERE id IN ({marks}) ORDER BY id", chunk):
            out.append(summary_dict_from_row(row, devices.get(row["id"], []), catalogue))
    return out


# ---------------------------------------------------------------------------- events

# A caller's scope as a SQL condition on the events alias ``e`` and its parameters
# (``Operator.event_filter``): the access package decides what an operator sees.
Scope = tuple[str, list[str]]

_SEVERITY_RANK_SQL = (
    "(CASE e.severity WHEN 'low' THEN 0 WHEN 'medium' THEN 1 WHEN 'high' THEN 2 ELSE 3 END)"
)
_SORT_SQL = {
    "registered_at": "e.registered_at",
    "last_observed_at": "e.last_observed_at",
    "severity": _SEVERITY_RANK_SQL,
    "deadline_at": "e.deadline_at",
}
SORT_KEYS = frozenset(_SORT_SQL)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a list shows, in which order, from where (a page's keyset cursor)."""

    statuses: Sequence[str] = ()
    open_only: bool = False
    types: Sequence[str] = ()
    severities: Sequence[str] = ()
    grid_prefix: str | None = None
    department: str | None = None
    device_id: str | None = None
    since: float | None = None  # observed at or after
    until: float | None = None  # observed before
    sort: str = "registered_at"  # one of SORT_KEYS
    descending: bool = True
    after: tuple[float, int] | None = None  # (sort value, event id) of the last row shown
    limit: int = 50


def list_events(conn: Reader, scope: Scope, f: EventFilter) -> list[Row]:
    """Event rows in the scope that pass the filter, each with its ``sort_value``; at most
    ``f.limit`` of them."""
    where: list[str] = [scope[0]]
    args: list[Any] = list(scope[1])
    if f.statuses:
        where.append(f"e.status IN ({','.join('?' * len(f.statuses))})")
        args += f.statuses
    if f.open_only:
        where.append("e.status != 'closed'")
    if f.types:
        where.append(f"e.type IN ({','.join('?' * len(f.types))})")
        args += f.types
    if f.severities:
        where.append(f"e.severity IN ({','.join('?' * len(f.severities))})")
        args += f.severities
    if f.grid_prefix:
        where.append(f"substr(e.grid_code, 1, {len(f.grid_prefix)}) = ?")
        args.append(f.grid_prefix)
    if f.department:
        where.append("e.department = ?")
        args.append(f.department)
    if f.device_id:
        where.append(
            "EXISTS (SELECT 1 FROM event_devices d WHERE d.event_id = e.id AND d.device_id = ?)"
        )
        args.append(f.device_id)
    if f.since is not None:
        where.append("e.last_observed_at >= ?")
        args.append(f.since)
    if f.until is not None:
        where.append("e.first_observed_at < ?")
        args.append(f.until)
    expr = _SORT_SQL[f.sort]
    if f.after is not None:
        where.append(f"({expr}, e.id) {'<' if f.descending else '>'} (?, ?)")
        args += f.after
    order = "DESC" if f.descending else "ASC"
    return conn.execute(
        f"SELECT e.*, {expr} AS sort_value FROM events e WHERE {' AND '.join(where)}"
        f" ORDER BY sort_value {order}, e.id {order} LIMIT ?",
        [*args, f.limit],
    ).fetchall()


def devices_of(conn: Reader, ids: list[int]) -> dict[int, list[str]]:
    """Each event's device ids, in the order they first reported it."""
    out: dict[int, list[str]] = {}
    if not ids:
        return out
    marks = ",".join("?" * len(ids))
    for row in conn.execute(
        f"SELECT event_id, device_id FROM event_devices WHERE event_id IN ({marks})"
        " ORDER BY event_id, first_alert_at, device_id",
        ids,
    ):
        out.setdefault(row[0], []).append(row[1])
    return out


def scoped_event(conn: Reader, scope: Scope, event_id: int) -> Row | None:
    row: Row | None = conn.execute(
        f"SELECT e.* FROM events e WHERE e.id = ? AND {scope[0]}", [event_id, *scope[1]]
    ).fetchone()
    return row


def event_alerts(conn: Reader, event_id: int, limit: int) -> list[Row]:
    return conn.execute(
        "SELECT * FROM alerts WHERE event_id = ? ORDER BY observed_at, alert_id LIMIT ?",
        (event_id, limit),
    ).fetchall()


def event_devices(conn: Reader, event_id: int) -> list[Row]:
    """The event's devices with their last known state (``kind``, ``state``, ``last_seen``)."""
    return conn.execute(
        "SELECT ed.device_id, ed.first_alert_at, ed.alert_count, d.kind, d.state, d.last_seen"
        " FROM event_devices ed LEFT JOIN devices d ON d.device_id = ed.device_id"
        " WHERE ed.event_id = ? ORDER BY ed.first_alert_at, ed.device_id",
        (event_id,),
    ).fetchall()


def event_snapshots(conn: Reader, event_id: int) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT snapshot_sha256 FROM alerts"
            " WHERE event_id = ? AND snapshot_sha256 IS NOT NULL",
            (event_id,),
        )
    ]


def event_log(conn: Reader, event_id: int) -> list[Row]:
    return conn.execute(
        "SELECT at, action, actor, detail FROM event_log WHERE event_id = ? ORDER BY at, id",
        (event_id,),
    ).fetchall()


def scoped_device_ids(conn: Reader, scope: Scope) -> set[str]:
    """The devices that raised an event in the scope."""
    return {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT d.device_id FROM event_devices d"
            f" JOIN events e ON e.id = d.event_id WHERE {scope[0]}",
            scope[1],
        )
    }


def scoped_snapshot(conn: Reader, scope: Scope, sha256: str) -> bool:
    """Whether an event in the scope, or one of its alerts, carries this snapshot."""
    hit = conn.execute(
        f"SELECT 1 FROM events e WHERE e.snapshot_sha256 = ? AND {scope[0]}"
        " UNION ALL SELECT 1 FROM alerts a JOIN events e ON e.id = a.event_id"
        f" WHERE a.snapshot_sha256 = ? AND {scope[0]} LIMIT 1",
        [sha256, *scope[1], sha256, *scope[1]],
    ).fetchone()
    return hit is not None


# ---------------------------------------------------------------------------- devices


def devices(conn: Reader) -> list[Row]:
    """Every device's row (state, last contact, position, health), by id."""
    return conn.execute("SELECT * FROM devices ORDER BY device_id").fetchall()


def device_state(conn: Reader, device_id: str) -> str | None:
    row = conn.execute("SELECT state FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    return None if row is None else str(row[0])


# ---------------------------------------------------------------------------- statistics

# Counts of a condition as a sum of 0/1: PostgreSQL has no sum of booleans (SQLite's
# comparisons are integers already). Both give an integer, NULL over no rows.
_OPEN_COUNT = "sum(CASE WHEN e.status != 'closed' THEN 1 ELSE 0 END)"


def grid_counts(conn: Reader, scope: Scope) -> dict[str, tuple[int, int]]:
    """grid code → (events, open events) in the scope."""
    return {
        r[0]: (r[1], r[2])
        for r in conn.execute(
            f"SELECT e.grid_code, count(*), {_OPEN_COUNT} FROM events e"
            f" WHERE {scope[0]} GROUP BY e.grid_code",
            scope[1],
        )
    }


@dataclass(frozen=True, slots=True)
class Totals:
    events: int
    open_events: int
    overdue_events: int
    alerts: int


class EventStats:
    """Counts over the events in a scope, a grid prefix and a registration window."""

    def __init__(
        self,
        conn: Reader,
        scope: Scope,
        grid_prefix: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> None:
        self._conn = conn
        where: list[str] = [scope[0]]
        args: list[Any] = list(scope[1])
        if grid_prefix:
            where.append(f"substr(e.grid_code, 1, {len(grid_prefix)}) = ?")
            args.append(grid_prefix)
        if since is not None:
            where.append("e.registered_at >= ?")
            args.append(since)
        if until is not None:
            where.append("e.registered_at < ?")
            args.append(until)
        self._cond = " AND ".join(where)
        self._args = args

    def totals(self, now: float) -> Totals:
        total, open_, overdue, alerts = self._conn.execute(
            f"SELECT count(*), {_OPEN_COUNT},"
            " sum(CASE WHEN e.status != 'closed' AND e.deadline_at < ? THEN 1 ELSE 0 END),"
            f" coalesce(sum(e.alert_count), 0) FROM events e WHERE {self._cond}",
            [now, *self._args],
        ).fetchone()
        # sums over no rows are NULL on both backends
        return Totals(total, open_ or 0, overdue or 0, alerts)

    def _grouped(self, expr: str) -> list[tuple[Any, int]]:
        return [
            (r[0], r[1])
            for r in self._conn.execute(
                f"SELECT {expr} AS k, count(*) AS n FROM events e WHERE {self._cond}"
                " GROUP BY k ORDER BY n DESC, k",
                self._args,
            )
        ]

    def by_type(self) -> list[tuple[str, int]]:
        return self._grouped("e.type")

    def by_status(self) -> list[tuple[str, int]]:
        return self._grouped("e.status")

    def by_severity(self) -> list[tuple[str, int]]:
        return self._grouped("e.severity")

    def by_grid(self) -> list[tuple[str, int]]:
        return self._grouped("e.grid_code")

    def by_area(self, code_length: int) -> list[tuple[str, int]]:
        """Counts by the first ``code_length`` digits of the grid code (e.g. the community)."""
        return self._grouped(f"substr(e.grid_code, 1, {int(code_length)})")

    def handling(self, by: GroupBy, now: float) -> tuple[Handling, list[Handling]]:
        """Handling rates of the whole selection and of its groups (``handling_stats``)."""
        return handling_stats(self._conn, by, now, where=[self._cond], params=self._args)

    def by_hour(self, hours: int = 168) -> list[tuple[int, int]]:
        """(UNIX hour, events registered in it), the latest ``hours`` hours that had any,
        oldest first."""
        # the UNIX hour: SQLite's CAST truncates (times are positive), PostgreSQL's rounds
        hour = (
            "CAST(floor(e.registered_at / 3600) AS BIGINT)"
            if is_pg(self._conn)
            else "CAST(e.registered_at / 3600 AS INTEGER)"
        )
        rows = self._conn.execute(
            f"SELECT {hour} AS h, count(*) FROM events e"
            f" WHERE {self._cond} GROUP BY h ORDER BY h DESC LIMIT ?",
            [*self._args, hours],
        ).fetchall()
        return [(r[0], r[1]) for r in reversed(rows)]


# ---------------------------------------------------------------------------- dead letters


def dead_letters(
    conn: Reader,
    *,
    reason: str | None = None,
    device_id: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
    oldest_first: bool = False,
) -> list[Row]:
    """Dead letters, newest (or oldest) first, optionally of one reason or device and below an
    id; at most ``limit`` (none when it is negative)."""
    where: list[str] = ["1=1"]
    args: list[Any] = []
    if reason:
        where.append("reason = ?")
        args.append(reason)
    if device_id:
        where.append("device_id = ?")
        args.append(device_id)
    if before_id is not None:
        where.append("id < ?")
        args.append(before_id)
    return conn.execute(
        f"SELECT * FROM dead_letters WHERE {' AND '.join(where)}"
        f" ORDER BY id {'ASC' if oldest_first else 'DESC'} LIMIT ?",
        [*args, limit],
    ).fetchall()


def dead_letter(conn: Reader, dead_letter_id: int) -> Row | None:
    row: Row | None = conn.execute(
        "SELECT * FROM dead_letters WHERE id = ?", (dead_letter_id,)
    ).fetchone()
    return row


def ping(conn: Reader) -> None:
    """Read one row: raises when the pool cannot be read (readiness)."""
    conn.execute("SELECT 1 FROM events LIMIT 1").fetchall()


# ---------------------------------------------------------------------------- terminals, tests

EVERYTHING: Scope = ("1=1", [])  # no restriction: the CLI and the tools run as the pool's owner


def latest_events(
    conn: Reader,
    *,
    type_: str | None = None,
    grid_prefix: str | None = None,
    status: str | None = None,
    by_update: bool = False,
    limit: int = 20,
) -> list[Row]:
    """The newest events (by id, or the most recently updated first), each row with
    ``devices``: its device ids joined by ", "."""
    where: list[str] = ["1=1"]
    args: list[Any] = []
    if type_:
        where.append("e.type = ?")
        args.append(type_)
    if grid_prefix:
        where.append("substr(e.grid_code, 1, ?) = ?")
        args += [len(grid_prefix), grid_prefix]
    if status:
        where.append("e.status = ?")
        args.append(status)
    order = "e.updated_at DESC, e.id DESC" if by_update else "e.id DESC"
    # SQLite's group_concat reads the primary key (event_id, device_id) in order
    joined = (
        "string_agg(device_id, ', ' ORDER BY device_id)"
        if is_pg(conn)
        else "group_concat(device_id, ', ')"
    )
    return conn.execute(
        f"SELECT e.*, (SELECT {joined} FROM event_devices d"
        f" WHERE d.event_id = e.id) AS devices FROM events e WHERE {' AND '.join(where)}"
        f" ORDER BY {order} LIMIT ?",
        [*args, limit],
    ).fetchall()


@dataclass(frozen=True, slots=True)
class PoolCounts:
    events: int
    alerts: int
    merged: int
    out_of_area: int
    dead_letters: int
    devices_online: int


def pool_counts(conn: Reader) -> PoolCounts:
    def one(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    return PoolCounts(
        events=one("SELECT count(*) FROM events"),
        alerts=one("SELECT count(*) FROM alerts"),
        merged=one("SELECT count(*) FROM alerts WHERE outcome='merged'"),
        out_of_area=one("SELECT count(*) FROM out_of_area"),
        dead_letters=one("SELECT count(*) FROM dead_letters"),
        devices_online=one("SELECT count(*) FROM devices WHERE state='online'"),
    )


def event_ids(
    conn: Reader,
    *,
    type_: str | None = None,
    grid_prefix: str | None = None,
    device_id: str | None = None,
) -> list[int]:
    """Ids of the events of a type, under a grid code prefix, with a contributing device, in
    id order."""
    where: list[str] = ["1=1"]
    args: list[Any] = []
    if type_ is not None:
        where.append("type = ?")
        args.append(type_)
    if grid_prefix is not None:
        where.append("substr(grid_code, 1, ?) = ?")
        args += [len(grid_prefix), grid_prefix]
    if device_id is not None:
        where.append("id IN (SELECT event_id FROM event_devices WHERE device_id = ?)")
        args.append(device_id)
    sql = f"SELECT id FROM events WHERE {' AND '.join(where)} ORDER BY id"
    return [r[0] for r in conn.execute(sql, args)]


def alert_count(conn: Reader, like: str | None = None) -> int:
    """Pooled alerts (in an event), optionally only those whose alert_id matches ``like``."""
    if like is None:
        return int(conn.execute("SELECT count(*) FROM alerts").fetchone()[0])
    prefix = like[:-1]
    if like.endswith("%") and prefix and not any(c in prefix for c in "%_") and not is_pg(conn):
        # (not on PostgreSQL: a database's collation may order "a-b" and "ab" apart from
        # their bytes, so a range there is not a prefix; LIKE is)
        # a prefix: a range of the alert_id index, not a scan (load runs poll this)
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        sql = "SELECT count(*) FROM alerts WHERE alert_id >= ? AND alert_id < ?"
        return int(conn.execute(sql, (prefix, upper)).fetchone()[0])
    sql = "SELECT count(*) FROM alerts WHERE alert_id LIKE ?"
    return int(conn.execute(sql, (like,)).fetchone()[0])


def out_of_area(conn: Reader, device_id: str | None = None) -> list[Row]:
    """Out-of-area alerts (alert_id, device_id, type, lat, lon), oldest first."""
    sql = "SELECT alert_id, device_id, type, lat, lon FROM out_of_area"
    args: tuple[str, ...] = ()
    if device_id is not None:
        sql += " WHERE device_id = ?"
        args = (device_id,)
    return conn.execute(sql + " ORDER BY received_at, alert_id", args).fetchall()


def latencies(conn: Reader, like: str | None = None) -> list[float]:
    """Seconds from each alert's ``observed_at`` to the commit of its batch."""
    sql = (
        "SELECT b.committed_at - a.observed_at FROM alerts a"
        " JOIN batches b ON a.batch_id = b.id WHERE b.committed_at IS NOT NULL"
    )
    args: tuple[str, ...] = ()
    if like is not None:
        sql += " AND a.alert_id LIKE ?"
        args = (like,)
    return [float(r[0]) for r in conn.execute(sql, args)]


def commit_span(conn: Reader, like: str | None = None) -> tuple[float, float] | None:
    """First and last commit time of batches holding matching alerts."""
    sql = (
        "SELECT min(b.committed_at), max(b.committed_at) FROM alerts a "
        "JOIN batches b ON a.batch_id = b.id"
    )
    args: tuple[str, ...] = ()
    if like is not None:
        sql += " WHERE a.alert_id LIKE ?"
        args = (like,)
    row = conn.execute(sql, args).fetchone()
    if row is None or row[0] is None:
        return None
    return float(row[0]), float(row[1])


# ---------------------------------------------------------------------------- the live feed


@contextmanager
def snapshot(conn: Reader) -> Iterator[None]:
    """One read transaction: every question asked inside sees the same pool (SQLite's read
    transaction on a WAL snapshot; on PostgreSQL a REPEATABLE READ one, which reads one
    snapshot of the database, READ ONLY)."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if is_pg(conn) else "BEGIN")
    try:
        yield
    except BaseException:
        # the question's error says what went wrong, not a failed ROLLBACK on a broken link
        with suppress(*read_errors()):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def feed_marks(conn: Reader) -> tuple[int, int]:
    """(the newest change number, the newest event id): where a feed begins."""
    row = conn.execute(
        "SELECT COALESCE(MAX(change_seq), 0), COALESCE(MAX(id), 0) FROM events"
    ).fetchone()
    return int(row[0]), int(row[1])


def last_alert_rowid(conn: Reader) -> int:
    """The arrival number of the newest pooled alert."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM alerts").fetchone()[0])


def changed_events(conn: Reader, after_seq: int, limit: int) -> list[tuple[int, int]]:
    """(event id, change number) of the events changed after ``after_seq``, in change order."""
    return [
        (int(r[0]), int(r[1]))
        for r in conn.execute(
            "SELECT id, change_seq FROM events WHERE change_seq > ?"
            " ORDER BY change_seq, id LIMIT ?",
            (after_seq, limit),
        )
    ]


def alerts_after(conn: Reader, rowid: int, limit: int) -> list[Row]:
    """Alerts pooled after arrival number ``rowid``, in arrival order: (id, alert_id,
    device_id, seq, outcome, event_id, type, severity, grid_code, lat, lon, received_at)."""
    return conn.execute(
        "SELECT id, alert_id, device_id, seq, outcome, event_id, type, severity, grid_code,"
        " lat, lon, received_at FROM alerts WHERE id > ? ORDER BY id LIMIT ?",
        (rowid, limit),
    ).fetchall()


def out_of_area_after(conn: Reader, at: float, limit: int) -> list[Row]:
    """Out-of-area alerts received after ``at``: (alert_id, device_id, type, lat, lon,
    received_at), oldest first."""
    return conn.execute(
        "SELECT alert_id, device_id, type, lat, lon, received_at FROM out_of_area"
        " WHERE received_at > ? ORDER BY received_at, alert_id LIMIT ?",
        (at, limit),
    ).fetchall()
