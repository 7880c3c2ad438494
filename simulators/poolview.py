"""Read-only questions about the community event pool, for expectations and reports.

Opens its own read-only SQLite connection per query (WAL lets it read while the aggregator
writes) so that a view never holds a snapshot of the pool open between polls.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aggregator.pool.queries import event_summaries
from aggregator.pool.sqlite import connect
from contract import Catalogue, EventSummary, default_catalogue

__all__ = ["DeadLetter", "OutOfArea", "PoolView"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    device_id: str | None
    alert_id: str | None
    reason: str
    detail: str
    topic: str


@dataclass(frozen=True, slots=True)
class OutOfArea:
    alert_id: str
    device_id: str
    type: str
    lat: float
    lon: float


class PoolView:
    def __init__(self, path: Path | str, catalogue: Catalogue | None = None) -> None:
        self.path = Path(path)
        self.catalogue = catalogue or default_catalogue()

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.path, readonly=True)
        try:
            yield conn
        finally:
            conn.close()

    def events(
        self,
        *,
        type: str | None = None,
        grid_prefix: str | None = None,
        device_id: str | None = None,
    ) -> list[EventSummary]:
        """Events, oldest first, filtered by type, grid code prefix and contributing device."""
        where, args = ["1=1"], []
        if type is not None:
            where.append("type = ?")
            args.append(type)
        if grid_prefix is not None:
            where.append("substr(grid_code, 1, ?) = ?")
            args += [len(grid_prefix), grid_prefix]  # type: ignore[list-item]
        if device_id is not None:
            where.append("id IN (SELECT event_id FROM event_devices WHERE device_id = ?)")
            args.append(device_id)
        with self._db() as db:
            ids = [
                r[0] for r in db.execute(f"SELECT id FROM events WHERE {' AND '.join(where)}", args)
            ]
            return event_summaries(db, ids, self.catalogue)

    def alert_count(self, *, like: str | None = None) -> int:
        """Pooled alerts (in an event), optionally only those whose alert_id matches ``like``."""
        with self._db() as db:
            if like is None:
                return int(db.execute("SELECT count(*) FROM alerts").fetchone()[0])
            prefix = like[:-1]
            if like.endswith("%") and prefix and not any(c in prefix for c in "%_"):
                # a prefix: a range of the alert_id index, not a scan (load runs poll this)
                upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
                sql = "SELECT count(*) FROM alerts WHERE alert_id >= ? AND alert_id < ?"
                return int(db.execute(sql, (prefix, upper)).fetchone()[0])
            sql = "SELECT count(*) FROM alerts WHERE alert_id LIKE ?"
            return int(db.execute(sql, (like,)).fetchone()[0])

    def dead_letters(
        self, *, reason: str | None = None, device_id: str | None = None
    ) -> list[DeadLetter]:
        where, args = ["1=1"], []
        if reason is not None:
            where.append("reason = ?")
            args.append(reason)
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        with self._db() as db:
            rows = db.execute(
                "SELECT id, device_id, alert_id, reason, detail, topic FROM dead_letters "
                f"WHERE {' AND '.join(where)} ORDER BY id",
                args,
            ).fetchall()
        return [DeadLetter(*tuple(r)) for r in rows]

    def out_of_area(self, *, device_id: str | None = None) -> list[OutOfArea]:
        sql = "SELECT alert_id, device_id, type, lat, lon FROM out_of_area"
        args: tuple[str, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            args = (device_id,)
        with self._db() as db:
            return [OutOfArea(*tuple(r)) for r in db.execute(sql + " ORDER BY received_at", args)]

    def device_state(self, device_id: str) -> str | None:
        with self._db() as db:
            row = db.execute(
                "SELECT state FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def latencies(self, *, like: str | None = None) -> list[float]:
        """Seconds from each alert's ``observed_at`` to the commit of its batch."""
        sql = (
            "SELECT b.committed_at - a.observed_at FROM alerts a"
            " JOIN batches b ON a.batch_id = b.id WHERE b.committed_at IS NOT NULL"
        )
        args: tuple[str, ...] = ()
        if like is not None:
            sql += " AND a.alert_id LIKE ?"
            args = (like,)
        with self._db() as db:
            return [float(r[0]) for r in db.execute(sql, args)]

    def commit_span(self, *, like: str | None = None) -> tuple[float, float] | None:
        """First and last commit time of batches holding matching alerts."""
        sql = (
            "SELECT min(b.committed_at), max(b.committed_at) FROM alerts a "
            "JOIN batches b ON a.batch_id = b.id"
        )
        args: tuple[str, ...] = ()
        if like is not None:
            sql += " WHERE a.alert_id LIKE ?"
            args = (like,)
        with self._db() as db:
            row = db.execute(sql, args).fetchone()
        if row is None or row[0] is None:
            return None
        return float(row[0]), float(row[1])
