"""Read-only questions about the community event pool, for expectations and reports.

Opens its own read-only connection per query (an SQLite pool file, WAL letting it read while the
aggregator writes, or a PostgreSQL pool's URL) so that a view never holds a snapshot of the pool
open between polls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aggregator.pool import queries
from aggregator.pool.reader import Reader, is_pool_url
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
        self.path: Path | str = path if is_pool_url(path) else Path(path)
        self.catalogue = catalogue or default_catalogue()

    @contextmanager
    def _db(self) -> Iterator[Reader]:
        conn = queries.open_reader(self.path)
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
        with self._db() as db:
            ids = queries.event_ids(db, type_=type, grid_prefix=grid_prefix, device_id=device_id)
            return queries.event_summaries(db, ids, self.catalogue)

    def alert_count(self, *, like: str | None = None) -> int:
        """Pooled alerts (in an event), optionally only those whose alert_id matches ``like``."""
        with self._db() as db:
            return queries.alert_count(db, like)

    def dead_letters(
        self, *, reason: str | None = None, device_id: str | None = None
    ) -> list[DeadLetter]:
        with self._db() as db:
            rows = queries.dead_letters(
                db, reason=reason, device_id=device_id, limit=-1, oldest_first=True
            )
        return [
            DeadLetter(r["id"], r["device_id"], r["alert_id"], r["reason"], r["detail"], r["topic"])
            for r in rows
        ]

    def out_of_area(self, *, device_id: str | None = None) -> list[OutOfArea]:
        with self._db() as db:
            return [OutOfArea(*tuple(r)) for r in queries.out_of_area(db, device_id)]

    def device_state(self, device_id: str) -> str | None:
        with self._db() as db:
            return queries.device_state(db, device_id)

    def latencies(self, *, like: str | None = None) -> list[float]:
        """Seconds from each alert's ``observed_at`` to the commit of its batch."""
        with self._db() as db:
            return queries.latencies(db, like)

    def commit_span(self, *, like: str | None = None) -> tuple[float, float] | None:
        """First and last commit time of batches holding matching alerts."""
        with self._db() as db:
            return queries.commit_span(db, like)
