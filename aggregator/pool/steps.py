"""What a case step hands its hooks: the open transaction (:class:`Tx`) and what the step did
(:class:`StepRecord`).

A module of its own so that the step's writer (``pool/cases.py``) and the hooks that write in
its transaction (``pool/outbox.py``'s webhook outbox) both import it and neither imports the
other's types: the case store depends on the outbox, never the other way round.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aggregator.cases.audit import AuditRow
from aggregator.cases.rules import Case, State
from aggregator.pool.reader import Cursor, pg_row_factory, pg_sql

if TYPE_CHECKING:
    import psycopg

__all__ = ["StepHook", "StepRecord", "Tx"]


class Tx:
    """The step's open transaction, as a hook sees it: ``execute`` takes SQL with ``?``
    placeholders on either backend and returns rows like ``sqlite3.Row``. A hook must not
    commit, roll back or open transactions of its own; raising rolls the whole step back."""

    __slots__ = ("_conn", "is_pg")

    def __init__(self, conn: sqlite3.Connection | psycopg.Connection[Any], *, is_pg: bool) -> None:
        self._conn = conn
        self.is_pg = is_pg

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        if self.is_pg:
            conn: psycopg.Connection[Any] = self._conn  # type: ignore[assignment]
            cur = conn.cursor(row_factory=pg_row_factory)
            return cur.execute(pg_sql(sql), list(parameters))
        lite: sqlite3.Connection = self._conn  # type: ignore[assignment]
        return lite.execute(sql, tuple(parameters))


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one committed-to-be step did, for hooks (webhooks' outbox, supervision)."""

    event_id: int
    action: str  # a lifecycle action, or the case store's ASSIGN
    actor: str
    role: str
    before: State
    after: State
    case: Case  # the case after the step
    audit: AuditRow  # the row appended to the trail
    change_seq: int  # the event's new change number
    at: datetime
    type_code: str
    grid_code: str
    department: str | None  # the lead department, if whistled
    departments: tuple[str, ...] = ()  # the lead and co-departments


# Called inside the step's transaction, after the case, the audit row and the event are
# written and before COMMIT. Hooks run in list order; one that raises aborts the step (the
# caller gets the exception, nothing is written). Keep them to a few statements: every other
# step, and on SQLite every ingest batch, waits for this transaction.
StepHook = Callable[[Tx, StepRecord], None]
