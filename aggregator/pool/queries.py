"""The read model of the pool: every reader (the API's routes, the CLI, the demo, the scenario
runner and the load generator) asks its questions here, on a reader connection of its own, and
gets typed answers. Only this package holds SQL; the questions are written once for SQLite, whose
schema the PostgreSQL pool mirrors column for column."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from aggregator.pool.model import summary_from_row
from aggregator.pool.sqlite import connect
from contract import Catalogue, EventSummary

__all__ = ["connect", "event_summaries"]


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
