"""Supervision (督办) in the pool, on either backend: each reminder, overdue item and escalation
raised once, however many replicas run the timer; and the reads the cases API needs (a case's
supervision items, the cases a metrics request covers).

:meth:`Supervisor.run_once` claims the cases with something due, in one short write
transaction per batch:

* PostgreSQL: ``SELECT … FROM cases … FOR UPDATE OF c SKIP LOCKED``: a case another replica's
  timer (or an operator's step) holds is skipped, not waited for, so timers on several replicas
  share the work without any election; the one that holds the row raises its items.
* SQLite: ``BEGIN IMMEDIATE``: one writer on one machine.

For each claimed case :func:`aggregator.cases.supervise.due_items` decides; each item is
``INSERT … ON CONFLICT DO NOTHING`` into ``case_supervision`` (primary key: case and item), and
only an insert that added the row appends the audit row (actor ``system``; the case's version
is not changed, so an item never "moves" the case and never stops its own escalation chain)
and enqueues the webhook deliveries (``case.supervision``), all in the same transaction. The
primary key is what makes an item exactly once even when two timers claimed one case from
snapshots taken either side of a commit. After commit the caller publishes each item's notice
on the events topic (:class:`SupervisionTimer`).

A case that got an item moves its *event's* version and change number, as every other write
to an event does (a case step, an ingest batch; PostgreSQL also announces it on ``cwg_pool``):
the live stream and the event list follow change numbers, so they refresh when a reminder,
overdue item or escalation is raised. The event row is claimed with the case row: on
PostgreSQL ``FOR UPDATE OF e, c SKIP LOCKED`` — a step locks the event before the case, so a
timer that waited for the event while holding the case could deadlock with it; skipping never
waits.

``case_supervision_next`` remembers, per case, the version looked at and when the next item
falls due at it, so a tick reads only the cases with work in them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from aggregator.cases.audit import AuditEntry, AuditRow, chain
from aggregator.cases.rules import Actor, Case, Lifecycle
from aggregator.cases.supervise import (
    ZH,
    Item,
    Kind,
    SupervisionItemOut,
    SupervisionNoticeV1,
    SupervisionPolicy,
    due_items,
    utc,
)
from aggregator.pool.cases import (
    _CASE_SELECT,
    Tx,
    _case_row,
    _scope,
    append_audit,
    chain_link,
)
from aggregator.pool.outbox import WebhookMessage, enqueue
from aggregator.pool.reader import Reader, is_pool_url
from contract import Catalogue

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "SYSTEM",
    "Raised",
    "SupervisionTimer",
    "Supervisor",
    "metric_cases",
    "supervision_of",
]

log = logging.getLogger(__name__)

# The audit actor and role of what the timer raises.
SYSTEM: Final = "system"

# Cases a metrics request reads at most (the figures are computed in Python).
METRIC_CASES_MAX: Final = 200_000


@dataclass(frozen=True, slots=True)
class Raised:
    """One item raised and committed."""

    event_id: int
    case: Case
    item: Item
    audit: AuditRow
    notice: SupervisionNoticeV1
    change_seq: int = 0  # the event's change number after the tick that raised it


# The cases with something due: a running deadline within the reminder horizon, and either a
# version the timer has not looked at or an item due at it.
_DUE: Final = (
    "SELECT c.event_id, c.body FROM cases c JOIN events e ON e.id = c.event_id"
    " LEFT JOIN case_supervision_next n ON n.event_id = c.event_id"
    " WHERE c.next_due_at IS NOT NULL AND c.next_due_at <= ?"
    " AND (n.event_id IS NULL OR n.version <> c.version OR n.next_at <= ?)"
    " ORDER BY c.next_due_at LIMIT ?"
)


class Supervisor:
    """Raises the supervision items of one pool (a SQLite file or a PostgreSQL URL)."""

    def __init__(
        self,
        target: Path | str,
        *,
        policy: SupervisionPolicy | None = None,
        lifecycle: Lifecycle | None = None,
        name: str = "timer",
        batch: int = 100,
    ) -> None:
        self.target = target
        self.policy = policy or SupervisionPolicy()
        self.lifecycle = lifecycle
        self.name = name
        self.batch = batch
        self.is_pg = is_pool_url(target)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._pg is not None:
                self._pg.close()
                self._pg = None

    @contextmanager
    def _transaction(self) -> Iterator[Tx]:
        with self._lock:
            if self.is_pg:
                import psycopg

                if self._pg is None or self._pg.closed:
                    self._pg = psycopg.connect(
                        str(self.target),
                        autocommit=True,
                        connect_timeout=10,
                        application_name="cwg-supervision",
                    )
                conn = self._pg
                try:
                    with conn.transaction():
                        yield Tx(conn, is_pg=True)
                except psycopg.OperationalError:
                    # a lost session: a new one next time
                    with suppress(Exception):
                        conn.close()
                    self._pg = None
                    raise
                return
            from aggregator.pool.sqlite import connect, write_transaction

            if self._db is None:
                self._db = connect(self.target)
            with write_transaction(self._db) as db:
                yield Tx(db, is_pg=False)

    def run_once(self, now: datetime, max_batches: int = 100) -> list[Raised]:
        """Raise everything due at ``now``; returns what this call raised (committed)."""
        if now.tzinfo is None:
            raise ValueError("supervision needs an aware datetime")
        out: list[Raised] = []
        for _ in range(max_batches):
            raised, claimed = self._batch(now)
            out.extend(raised)
            if claimed < self.batch:
                break
        return out

    def _batch(self, now: datetime) -> tuple[list[Raised], int]:
        ts = now.timestamp()
        # A reminder falls due at most reminder_lead before the earliest running deadline.
        params = [ts + self.policy.reminder_lead.total_seconds(), ts, self.batch]
        if not self.is_pg and not self._anything_due(params):
            return [], 0
        raised: list[Raised] = []
        with self._transaction() as tx:
            rows = tx.execute(
                _DUE + (" FOR UPDATE OF e, c SKIP LOCKED" if tx.is_pg else ""), params
            ).fetchall()
            for row in rows:
                case = Case.model_validate_json(row[1])
                raised.extend(self._case(tx, int(row[0]), case, now))
        return raised, len(rows)

    def _anything_due(self, params: list[float | int]) -> bool:
        """SQLite: an idle tick looks without the write lock (WAL readers never wait), so a
        timer with nothing to do never holds up ingest's writer."""
        with self._lock:
            from aggregator.pool.sqlite import connect

            if self._db is None:
                self._db = connect(self.target)
            return self._db.execute(_DUE, params).fetchone() is not None

    def _case(self, tx: Tx, event_id: int, case: Case, now: datetime) -> list[Raised]:
        before = {
            str(r[0]): int(r[1])
            for r in tx.execute(
                "SELECT item, case_version FROM case_supervision WHERE event_id = ?", [event_id]
            ).fetchall()
        }
        items, next_at = due_items(case, before, now, self.policy, self.lifecycle)
        out: list[Raised] = []
        for item in items:
            raised = self._raise(tx, event_id, case, item, now)
            if raised is not None:
                out.append(raised)
        if out:
            change = _touch_event(tx, event_id)
            out = [replace(r, change_seq=change) for r in out]
        tx.execute(
            "INSERT INTO case_supervision_next(event_id, version, next_at) VALUES (?,?,?)"
            " ON CONFLICT (event_id) DO UPDATE SET version = excluded.version,"
            " next_at = excluded.next_at",
            [event_id, case.version, None if next_at is None else next_at.timestamp()],
        )
        return out

    def _raise(self, tx: Tx, event_id: int, case: Case, item: Item, now: datetime) -> Raised | None:
        # The chain head first (the lock every audit append takes, in the same order as a
        # step: case row, then head), so the seq the item row records is the row appended.
        previous = chain_link(tx)
        due_text = item.due_at.astimezone(UTC).isoformat()
        entry = AuditEntry(
            case_id=case.case_id,
            case_version=case.version,
            actor=SYSTEM,
            role=SYSTEM,
            action=item.kind.value,
            before=case.state.value,
            after=case.state.value,
            note=f"{ZH[item.kind]}: {item.clock.value} due {due_text}",
            detail={
                "item": item.key,
                "clock": item.clock.value,
                "level": item.level,
                "due_at": due_text,
                "timer": self.name,
            },
            at=now,
        )
        row = chain(entry, previous)
        cur = tx.execute(
            "INSERT INTO case_supervision(event_id, item, kind, clock, run, level, case_version,"
            " due_at, raise_at, raised_at, raised_by, audit_seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (event_id, item) DO NOTHING",
            [
                event_id,
                item.key,
                item.kind.value,
                item.clock.value,
                item.run,
                item.level,
                case.version,
                item.due_at.timestamp(),
                item.raise_at.timestamp(),
                now.timestamp(),
                self.name,
                row.seq,
            ],
        )
        if int(getattr(cur, "rowcount", -1)) != 1:
            return None  # another timer raised it: the key is the last word
        append_audit(tx, event_id, row)
        out = _item_out(item, case.version, now, row.seq)
        departments = (case.lead_department, *case.co_departments) if case.lead_department else ()
        enqueue(
            tx,
            WebhookMessage(
                key=f"case:{event_id}:supervision:{item.key}",
                type="case.supervision",
                case_id=str(event_id),
                event_type=case.type_code,
                grid_code=case.grid_code,
                action=item.kind.value,
                departments=departments,
                at=now,
                data={
                    "version": case.version,
                    "state": case.state.value,
                    "supervision": out.model_dump(mode="json"),
                    "audit_seq": row.seq,
                    "audit_hash": row.hash,
                },
            ),
        )
        notice = SupervisionNoticeV1(
            event_id=event_id,
            state=case.state.value,
            version=case.version,
            grid_code=case.grid_code,
            type=case.type_code,
            departments=list(departments),
            supervision=out,
            at=now,
        )
        log.info(
            "case %s %s: %s due %s (to %s)", event_id, item.kind, item.clock, due_text, item.level
        )
        return Raised(event_id, case, item, row, notice)


def _touch_event(tx: Tx, event_id: int) -> int:
    """Move the event's version and change number (once per tick, however many items it
    raised) and, on PostgreSQL, announce the change as the pool's other writers do. Its status
    and ``updated_at`` stay: an item changes what the case owes, not the event."""
    if tx.is_pg:
        from aggregator.pool.postgres import CHANNEL

        found = tx.execute(
            "UPDATE events SET version = version + 1, change_seq = nextval('pool_change_seq')"
            " WHERE id = ? RETURNING change_seq",
            [event_id],
        ).fetchone()
        assert found is not None  # the claim holds the row
        change = int(found[0])
        tx.execute(
            "SELECT pg_notify(?, ?)",
            [CHANNEL, orjson.dumps({"change": change, "updated": [event_id]}).decode()],
        ).fetchone()
        return change
    from aggregator.pool.sqlite import _next_change

    lite: sqlite3.Connection = tx._conn  # type: ignore[assignment]
    change = _next_change(lite)
    tx.execute(
        "UPDATE events SET version = version + 1, change_seq = ? WHERE id = ?", [change, event_id]
    )
    return change


def _item_out(item: Item, version: int, raised_at: datetime, seq: int) -> SupervisionItemOut:
    return SupervisionItemOut(
        item=item.key,
        kind=item.kind,
        kind_zh=ZH[item.kind],
        clock=item.clock,
        level=item.level,
        due_at=item.due_at.astimezone(UTC),
        raised_at=raised_at.astimezone(UTC),
        case_version=version,
        audit_seq=seq,
    )


# ---------------------------------------------------------------------------- the timer


class SupervisionTimer:
    """A thread that runs :meth:`Supervisor.run_once` every ``interval_s`` with the time
    ``clock`` gives (a test clock can move it) and publishes each raised item's notice."""

    def __init__(
        self,
        supervisor: Supervisor,
        clock: Callable[[], datetime],
        *,
        interval_s: float = 15.0,
        publish: Callable[[bytes], None] | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.clock = clock
        self.interval_s = interval_s
        self.publish = publish
        self.raised = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cwg-supervision", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.supervisor.close()

    def tick(self) -> list[Raised]:
        raised = self.supervisor.run_once(self.clock())
        self.raised += len(raised)
        if self.publish is not None:
            for r in raised:
                try:
                    self.publish(r.notice.to_json())
                except Exception:
                    # committed, audited and queued for the webhooks: the topic is best effort
                    log.exception("supervision notice for case %s not published", r.event_id)
        return raised

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:
                # the pool away for a moment: the next tick tries again
                log.exception("supervision tick failed")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))


# ---------------------------------------------------------------------------- reading


def supervision_of(conn: Reader, event_id: int) -> list[SupervisionItemOut]:
    """A case's supervision items, oldest first."""
    rows = conn.execute(
        "SELECT item, kind, clock, level, due_at, raised_at, case_version, audit_seq"
        " FROM case_supervision WHERE event_id = ? ORDER BY audit_seq",
        [event_id],
    ).fetchall()
    return [
        SupervisionItemOut(
            item=r[0],
            kind=Kind(r[1]),
            kind_zh=ZH[Kind(r[1])],
            clock=r[2],
            level=r[3],
            due_at=utc(float(r[4])),
            raised_at=utc(float(r[5])),
            case_version=int(r[6]),
            audit_seq=int(r[7]),
        )
        for r in rows
    ]


def metric_cases(
    conn: Reader,
    catalogue: Catalogue,
    actor: Actor,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = METRIC_CASES_MAX,
) -> list[Case]:
    """The cases in the account's scope registered in ``[since, until)`` (events that no step
    touched count as registered cases; one closed before cases existed does not)."""
    where, params = _scope(actor)
    where.append("NOT (c.body IS NULL AND e.status = 'closed')")
    if since is not None:
        where.append("e.registered_at >= ?")
        params.append(since.timestamp())
    if until is not None:
        where.append("e.registered_at < ?")
        params.append(until.timestamp())
    rows = conn.execute(
        f"{_CASE_SELECT} WHERE {' AND '.join(where)} ORDER BY e.id LIMIT ?", [*params, limit]
    ).fetchall()
    return [_case_row(r, catalogue).case for r in rows]
