"""Cases in the pool, on either backend: a step applied in one write transaction, the inbox and
the audit trail read through the read model's ``Reader``.

:meth:`CaseStore.apply_step` is the one write path (issue 15, items 1, 4 and 6). Inside ONE
transaction it

1. reads the event and its case (an event without a ``cases`` row is a case in state
   ``registered`` at version 1: rows are made lazily by the first step, so ingest's hot path
   never touches them);
2. applies :func:`aggregator.cases.rules.apply` (pure: 403 / 409 / 422 errors come from there);
3. compare-and-sets the case row on its version (``UPDATE … WHERE version = ?``; zero rows, or
   a first-step ``INSERT`` that meets a row, is :class:`StaleVersionError`: another operator
   won);
4. appends the audit row chained to the head (``case_audit_head``), and moves the head;
5. keeps ``events.status`` consistent with the case state (:data:`EVENT_STATUS`: ``closed`` ⇒
   ``closed``, so "a closed event absorbs nothing" holds for dedup), bumps the event's version
   and change number (the ingest writers re-read it, the live stream and the events topic see
   it) and logs the step in ``event_log``;
6. calls every :data:`StepHook` with the transaction and the :class:`StepRecord`, so that what
   a hook writes (a webhook outbox row) commits or rolls back with the step.

Locks. SQLite: ``BEGIN IMMEDIATE`` takes the database's one write lock, so steps, appends and
ingest batches are serial. PostgreSQL, always in this order so that two steps never deadlock:
the advisory lock of the event's dedup cell (the one ``PgEventPool.set_status`` takes: a batch
that may merge into the event waits for the step, or the step for the batch), then the case row
``FOR UPDATE``, then the chain head's row ``FOR UPDATE`` (one chain over all cases: two replicas
never chain onto the same previous row).

An assignment (:meth:`CaseStore.assign`) is a step too: it changes no state but bumps the
version and appends an ``assign`` row to the trail.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from aggregator.cases.audit import GENESIS, AuditEntry, AuditRow, chain
from aggregator.cases.deadlines import WorkCalendar
from aggregator.cases.rules import (
    Action,
    Actor,
    Case,
    CaseError,
    CommunityPolicy,
    ForbiddenError,
    Lifecycle,
    Payload,
    Role,
    StaleVersionError,
    State,
    Step,
    WrongStateError,
    apply,
)
from aggregator.clock import Clock, SystemClock
from aggregator.errors import AggregatorError
from aggregator.grids import COMMUNITY_LENGTH
from aggregator.pool.outbox import step_hook
from aggregator.pool.reader import Cursor, Reader, Row, is_pool_url
from aggregator.pool.sqlite import write_transaction
from aggregator.pool.steps import StepHook, StepRecord, Tx
from contract import Catalogue, EventStatus

if TYPE_CHECKING:
    from aggregator.pool.postgres import PgEventPool

log = logging.getLogger(__name__)

__all__ = [
    "ASSIGN",
    "EVENT_STATUS",
    "Box",
    "CaseNotFoundError",
    "CaseRow",
    "CaseStore",
    "StepHook",
    "StepRecord",
    "Tx",
    "audit_head",
    "audit_rows",
    "case_of",
    "evidence_in_scope",
    "has_case",
    "list_cases",
    "registered_case",
]

# The audit action of an assignment (not a lifecycle action: the state does not change).
ASSIGN: Final = "assign"

# The case state as the event's coarse status (events.status, its CHECK list, dedup and the
# events API): closed is closed; the others map onto the four open statuses.
EVENT_STATUS: Final[Mapping[State, EventStatus]] = {
    State.REGISTERED: EventStatus.REGISTERED,
    State.ASSESSING: EventStatus.VERIFIED,
    State.COMMUNITY_HANDLING: EventStatus.HANDLING,
    State.WHISTLED: EventStatus.DISPATCHED,
    State.DEPT_HANDLING: EventStatus.HANDLING,
    State.EN_ROUTE: EventStatus.HANDLING,
    State.ON_SITE: EventStatus.HANDLING,
    State.REVIEWING: EventStatus.HANDLING,
    State.REHANDLING: EventStatus.HANDLING,
    State.CLOSED: EventStatus.CLOSED,
}


class CaseNotFoundError(AggregatorError):
    """No event with this id (HTTP 404)."""


# ---------------------------------------------------------------------------- the hook seam
# Tx, StepRecord and StepHook live in pool/steps.py (the outbox's hook takes them too) and are
# re-exported here: the case store is where callers meet them.


# ---------------------------------------------------------------------------- reading


class Box:
    """Inbox filters: which states each kind of account has work in (the rules decide the
    actions; these only pick the rows worth asking about)."""

    TO_ACCEPT: Final = "to_accept"
    TO_HANDLE: Final = "to_handle"
    TO_REVIEW: Final = "to_review"
    OVERDUE: Final = "overdue"
    ALL: Final = (TO_ACCEPT, TO_HANDLE, TO_REVIEW, OVERDUE)


_DEPT_WORK: Final = (State.DEPT_HANDLING, State.EN_ROUTE, State.ON_SITE, State.REHANDLING)
_BOX_STATES: Final[dict[tuple[str, str], tuple[State, ...]]] = {
    # (box, account level) → states. Street and county accounts do not verify or review
    # feedback; they may whistle while the community assesses or handles (Longgang 7.3), and a
    # county account reviews extension requests (list_cases: the pending ones).
    (Box.TO_ACCEPT, "community"): (State.REGISTERED,),
    (Box.TO_ACCEPT, "street"): (),
    (Box.TO_ACCEPT, "county"): (),
    (Box.TO_ACCEPT, "department"): (State.WHISTLED,),
    (Box.TO_HANDLE, "community"): (State.ASSESSING, State.COMMUNITY_HANDLING),
    (Box.TO_HANDLE, "street"): (State.ASSESSING, State.COMMUNITY_HANDLING),
    (Box.TO_HANDLE, "county"): (State.ASSESSING, State.COMMUNITY_HANDLING),
    (Box.TO_HANDLE, "department"): _DEPT_WORK,
    (Box.TO_REVIEW, "community"): (State.REVIEWING,),
    (Box.TO_REVIEW, "street"): (),
    (Box.TO_REVIEW, "department"): (),
}


@dataclass(frozen=True, slots=True)
class CaseRow:
    """A case with the event fields a list shows."""

    event_id: int
    case: Case
    assignee: str | None
    type_code: str
    severity: str
    department: str  # the catalogue's department of the event's type
    address: str
    event_status: str
    updated_at: float
    next_due_at: float | None
    stored: bool  # False: no row yet, the case is as registered
    departments: tuple[str, ...] = field(default=())


_CASE_SELECT: Final = (
    "SELECT e.id, e.grid_code, e.type, e.severity, e.department, e.address, e.status,"
    " e.registered_at, e.updated_at, c.body, c.assignee, c.updated_at AS case_updated_at,"
    " c.next_due_at, c.departments FROM events e LEFT JOIN cases c ON c.event_id = e.id"
)


def registered_case(
    event_id: int, grid_code: str, type_code: str, registered_at: float, catalogue: Catalogue
) -> Case:
    """The case of an event no step has touched yet."""
    wt = catalogue.types.get(type_code)
    return Case(
        case_id=str(event_id),
        version=1,
        grid_code=grid_code,
        type_code=type_code,
        appendix_item=wt.appendix_item if wt else None,
        community_deadline=wt.handling_deadline if wt else timedelta(hours=2),
        registered_at=datetime.fromtimestamp(registered_at, UTC),
    )


def _case_row(row: Row, catalogue: Catalogue) -> CaseRow:
    body = row["body"]
    if body is not None:
        case = Case.model_validate_json(body)
    else:
        case = registered_case(
            int(row["id"]), row["grid_code"], row["type"], float(row["registered_at"]), catalogue
        )
    departments = tuple(d for d in (row["departments"] or "").split(",") if d)
    return CaseRow(
        event_id=int(row["id"]),
        case=case,
        assignee=row["assignee"],
        type_code=row["type"],
        severity=row["severity"],
        department=row["department"],
        address=row["address"],
        event_status=row["status"],
        updated_at=float(row["case_updated_at"] or row["updated_at"]),
        next_due_at=None if row["next_due_at"] is None else float(row["next_due_at"]),
        stored=body is not None,
        departments=departments,
    )


def _scope(actor: Actor) -> tuple[list[str], list[Any]]:
    """The cases this account sees: its grid prefix; a department account, the cases whistled
    to it (lead or co-department)."""
    where: list[str] = []
    params: list[Any] = []
    if actor.scope_code:
        where.append(f"substr(e.grid_code, 1, {len(actor.scope_code)}) = ?")
        params.append(actor.scope_code)
    if str(actor.level) == Role.DEPARTMENT.value:
        # '_' in a department code is a LIKE wildcard: escaped, so road_works is not roadxworks
        where.append("c.departments LIKE ? ESCAPE '\\'")
        code = (actor.department or "-").replace("\\", "").replace("_", "\\_")
        params.append(f"%,{code},%")
    return where, params


def case_of(conn: Reader, catalogue: Catalogue, event_id: int, actor: Actor) -> CaseRow | None:
    """One case in the account's scope, or None (no such event, or not the account's)."""
    where, params = _scope(actor)
    cond = " AND ".join(["e.id = ?", *where])
    row = conn.execute(f"{_CASE_SELECT} WHERE {cond}", [event_id, *params]).fetchone()
    return None if row is None else _case_row(row, catalogue)


def list_cases(
    conn: Reader,
    catalogue: Catalogue,
    actor: Actor,
    *,
    box: str | None = None,
    now: float | None = None,
    limit: int = 100,
) -> list[CaseRow]:
    """The account's inbox: cases in its scope, most recently changed first. ``box`` narrows
    it to the states the account has work in, or to cases past a running deadline."""
    where, params = _scope(actor)
    if box == Box.OVERDUE:
        where.append("c.next_due_at IS NOT NULL AND c.next_due_at < ?")
        params.append(time.time() if now is None else now)
    elif box == Box.TO_REVIEW and str(actor.level) == Role.COUNTY.value:
        # a city-level account reviews extension requests; the body holds the pending one
        where.append("c.body LIKE ?")
        params.append('%"extension":{%')
    elif box is not None:
        if box not in Box.ALL:
            raise ValueError(f"unknown box {box!r}")
        # an administrator takes no case actions: no work in any box
        states = _BOX_STATES.get((box, str(actor.level)), ())
        if not states:
            return []
        marks = ",".join("?" * len(states))
        if State.REGISTERED in states:
            # no row yet: registered, unless the event was closed another way
            where.append(f"(c.state IN ({marks}) OR (c.state IS NULL AND e.status != 'closed'))")
        else:
            where.append(f"c.state IN ({marks})")
        params.extend(s.value for s in states)
    cond = " AND ".join(where) or "1=1"
    rows = conn.execute(
        f"{_CASE_SELECT} WHERE {cond}"
        " ORDER BY COALESCE(c.updated_at, e.updated_at) DESC, e.id DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [_case_row(r, catalogue) for r in rows]


def has_case(conn: Reader, event_id: int) -> bool:
    """Whether a case step has been taken on the event (its lifecycle is the case's now)."""
    row = conn.execute("SELECT 1 FROM cases WHERE event_id = ?", [event_id]).fetchone()
    return row is not None


def evidence_in_scope(conn: Reader, actor: Actor, sha256: str) -> bool:
    """Whether a photo is attached (in the audit trail) to a case this account sees."""
    where, params = _scope(actor)
    cond = " AND ".join(["a.evidence LIKE ?", *where])
    row = conn.execute(
        "SELECT 1 FROM case_audit a JOIN events e ON e.id = a.event_id"
        f" LEFT JOIN cases c ON c.event_id = e.id WHERE {cond} LIMIT 1",
        [f'%"{sha256}"%', *params],
    ).fetchone()
    return row is not None


_AUDIT_COLUMNS: Final = (
    "seq, event_id, case_version, actor, role, action, before, after, reason, note, evidence,"
    " detail, at, prev_hash, hash"
)


def _audit_row(row: Row) -> AuditRow:
    return AuditRow(
        seq=int(row["seq"]),
        case_id=str(row["event_id"]),
        case_version=int(row["case_version"]),
        actor=row["actor"],
        role=row["role"],
        action=row["action"],
        before=row["before"],
        after=row["after"],
        reason=row["reason"],
        note=row["note"],
        evidence=tuple(orjson.loads(row["evidence"])),
        detail=orjson.loads(row["detail"]),
        at=datetime.strptime(row["at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def audit_rows(
    conn: Reader, *, event_id: int | None = None, after_seq: int = 0, limit: int | None = None
) -> list[AuditRow]:
    """Audit rows in seq order: the whole trail, or one case's."""
    where = ["seq > ?"]
    params: list[Any] = [after_seq]
    if event_id is not None:
        where.append("event_id = ?")
        params.append(event_id)
    sql = f"SELECT {_AUDIT_COLUMNS} FROM case_audit WHERE {' AND '.join(where)} ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_audit_row(r) for r in conn.execute(sql, params).fetchall()]


def iter_audit(conn: Reader, page: int = 5000) -> Iterator[AuditRow]:
    """The whole trail in seq order, a page at a time (bounded memory per query)."""
    after = 0
    while True:
        rows = audit_rows(conn, after_seq=after, limit=page)
        yield from rows
        if len(rows) < page:
            return
        after = rows[-1].seq


def audit_head(conn: Reader) -> tuple[int, str]:
    """The recorded chain head: the newest row's seq and hash (0 and GENESIS when empty)."""
    row = conn.execute("SELECT seq, hash FROM case_audit_head WHERE id = 1").fetchone()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


# ---------------------------------------------------------------------------- writing


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain_link(tx: Tx) -> AuditRow | None:
    """The newest audit row's link (seq and hash), locked until the transaction ends on
    PostgreSQL (SQLite's write lock already serializes appends); None for an empty chain."""
    head = tx.execute(
        "SELECT seq, hash FROM case_audit_head WHERE id = 1" + (" FOR UPDATE" if tx.is_pg else "")
    ).fetchone()
    if head is None or int(head[0]) <= 0:
        return None
    # chain() reads only the previous row's seq and hash: the head holds both
    link: dict[str, Any] = {"seq": int(head[0]), "hash": str(head[1])}
    return AuditRow.model_construct(**link)


def append_audit(tx: Tx, event_id: int, row: AuditRow) -> None:
    """Append one chained row (from ``chain(entry, chain_link(tx))``) and move the head."""
    tx.execute(
        f"INSERT INTO case_audit({_AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            row.seq,
            event_id,
            row.case_version,
            row.actor,
            row.role,
            row.action,
            row.before,
            row.after,
            row.reason,
            row.note,
            _json(list(row.evidence)),
            _json(row.detail),
            _utc_text(row.at),
            row.prev_hash,
            row.hash,
        ],
    )
    tx.execute("UPDATE case_audit_head SET seq = ?, hash = ? WHERE id = 1", [row.seq, row.hash])


def _next_due(case: Case) -> float | None:
    running = [d.due_at.timestamp() for d in case.running()]
    return min(running) if running else None


class CaseStore:
    """Applies case steps to one pool (a SQLite file or a PostgreSQL URL). Thread-safe: the
    API's worker threads share one store.

    SQLite: a write connection of the store's own, one step at a time (SQLite has one writer
    anyway). PostgreSQL: connections from ``pg`` (the API's ``PgEventPool``, whose lock mode
    the step follows) or, without one, a small pool of the store's own.
    """

    def __init__(
        self,
        target: Path | str,
        catalogue: Catalogue,
        *,
        pg: PgEventPool | None = None,
        lifecycle: Lifecycle | None = None,
        calendar: WorkCalendar | None = None,
        policy_for: Callable[[str], CommunityPolicy] | None = None,
        hooks: Sequence[StepHook] = (),
        clock: Clock | None = None,
    ) -> None:
        self.catalogue = catalogue
        # when a step happens when the caller names no time (Settings.test_clock_file moves it)
        self.clock: Clock = clock or SystemClock()
        self.lifecycle = lifecycle
        self.calendar = calendar
        self.policy_for = policy_for
        # Hooks called inside each step's transaction (StepHook); append to add one. The
        # webhook outbox is always first: a committed step is delivered to its subscribers.
        self.hooks: list[StepHook] = [step_hook, *hooks]
        self.is_pg = is_pool_url(target)
        self._lock = threading.Lock()
        self._own_pg: PgEventPool | None = None
        self._db: sqlite3.Connection | None = None
        if self.is_pg:
            if pg is None:
                from aggregator.pool.postgres import PgEventPool

                pg = self._own_pg = PgEventPool(
                    str(target), catalogue, min_size=1, max_size=2, migrate_on_open=True
                )
            self._pg: PgEventPool | None = pg
        else:
            from aggregator.pool.sqlite import connect

            self._pg = None
            self._db = connect(target)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        if self._own_pg is not None:
            self._own_pg.close()

    def policy(self, community: str) -> CommunityPolicy:
        return self.policy_for(community) if self.policy_for else CommunityPolicy()

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Tx]:
        if self._db is not None:
            with self._lock, write_transaction(self._db) as db:
                yield Tx(db, is_pg=False)
            return
        assert self._pg is not None
        with self._pg.connection() as conn, conn.transaction():
            yield Tx(conn, is_pg=True)

    def _lock_event(self, tx: Tx, event_id: int) -> Row:
        """The event row, locked against batches that might merge into it (PostgreSQL: the
        cell's advisory lock, then the row; SQLite's write lock already holds everything)."""
        if tx.is_pg:
            from aggregator.pool.postgres import _BATCH_LOCK, LOCK_CELL_DEG, _lock_key

            place = tx.execute("SELECT type, lat, lon FROM events WHERE id = ?", [event_id])
            found = place.fetchone()
            if found is None:
                raise CaseNotFoundError(f"no event {event_id}")
            assert self._pg is not None
            key = (
                _BATCH_LOCK
                if self._pg.lock == "batch"
                else _lock_key(
                    found[0],
                    math.floor(found[1] / LOCK_CELL_DEG),
                    math.floor(found[2] / LOCK_CELL_DEG),
                )
            )
            tx.execute("SELECT pg_advisory_xact_lock(?)", [key]).fetchone()
        row = tx.execute(
            "SELECT id, grid_code, type, status, registered_at FROM events WHERE id = ?"
            + (" FOR UPDATE" if tx.is_pg else ""),
            [event_id],
        ).fetchone()
        if row is None:
            raise CaseNotFoundError(f"no event {event_id}")
        found_row: Row = row
        return found_row

    def _read_case(self, tx: Tx, event: Row) -> tuple[Case, bool, str | None]:
        found = tx.execute(
            "SELECT body, assignee FROM cases WHERE event_id = ?"
            + (" FOR UPDATE" if tx.is_pg else ""),
            [event["id"]],
        ).fetchone()
        if found is not None:
            return Case.model_validate_json(found["body"]), True, found["assignee"]
        if event["status"] == EventStatus.CLOSED.value:
            raise WrongStateError(f"event {event['id']} was closed before it became a case")
        case = registered_case(
            int(event["id"]),
            event["grid_code"],
            event["type"],
            float(event["registered_at"]),
            self.catalogue,
        )
        return case, False, None

    def _write(
        self,
        tx: Tx,
        event: Row,
        before: Case,
        after: Case,
        stored: bool,
        assignee: str | None,
        entry: AuditEntry,
        now: float,
    ) -> tuple[AuditRow, int]:
        event_id = int(event["id"])
        departments = (
            f",{','.join((after.lead_department, *after.co_departments))},"
            if after.lead_department
            else ""
        )
        values = [
            after.state.value,
            after.version,
            after.model_dump_json(),
            assignee,
            after.community_code,
            after.lead_department,
            departments,
            now,
            _next_due(after),
        ]
        if stored:
            cur = tx.execute(
                "UPDATE cases SET state = ?, version = ?, body = ?, assignee = ?, community = ?,"
                " lead_department = ?, departments = ?, updated_at = ?, next_due_at = ?"
                " WHERE event_id = ? AND version = ?",
                [*values, event_id, before.version],
            )
        else:
            cur = tx.execute(
                "INSERT INTO cases(state, version, body, assignee, community, lead_department,"
                " departments, updated_at, next_due_at, event_id) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (event_id) DO NOTHING",
                [*values, event_id],
            )
        if _rowcount(cur) != 1:
            raise StaleVersionError(f"case {event_id} changed meanwhile; reload it")
        row = chain(entry, chain_link(tx))
        append_audit(tx, event_id, row)
        change = self._touch_event(tx, event, before, after, row, now)
        return row, change

    def _touch_event(
        self, tx: Tx, event: Row, before: Case, after: Case, row: AuditRow, now: float
    ) -> int:
        """events.status follows the case; the version and change number tell the writers
        and the live stream; event_log keeps the step beside the ingest's own entries."""
        event_id = int(event["id"])
        status = EVENT_STATUS[after.state]
        closed_at = now if after.state is State.CLOSED else None
        if tx.is_pg:
            found = tx.execute(
                "UPDATE events SET status = ?, updated_at = ?, closed_at = ?,"
                " version = version + 1, change_seq = nextval('pool_change_seq')"
                " WHERE id = ? RETURNING change_seq",
                [status.value, now, closed_at, event_id],
            ).fetchone()
            assert found is not None
            change = int(found[0])
        else:
            from aggregator.pool.sqlite import _next_change

            lite: sqlite3.Connection = tx._conn  # type: ignore[assignment]
            change = _next_change(lite)
            tx.execute(
                "UPDATE events SET status = ?, updated_at = ?, closed_at = ?,"
                " version = version + 1, change_seq = ? WHERE id = ?",
                [status.value, now, closed_at, change, event_id],
            )
        tx.execute(
            "INSERT INTO event_log(event_id, at, action, actor, detail) VALUES (?,?,?,?,?)",
            [
                event_id,
                now,
                f"case:{row.action}",
                row.actor,
                _json(
                    {
                        "from": before.state.value,
                        "to": after.state.value,
                        "version": after.version,
                        "audit_seq": row.seq,
                    }
                ),
            ],
        )
        if tx.is_pg:
            from aggregator.pool.postgres import CHANNEL

            tx.execute(
                "SELECT pg_notify(?, ?)",
                [CHANNEL, _json({"change": change, "updated": [event_id]})],
            ).fetchone()
        return change

    def _run_hooks(self, tx: Tx, record: StepRecord) -> None:
        for hook in self.hooks:
            hook(tx, record)

    # -- the operations -------------------------------------------------------------------

    def apply_step(
        self,
        event_id: int,
        action: Action | str,
        actor: Actor,
        payload: Payload | Mapping[str, Any] | None,
        expected_version: int | None,
        now: datetime | None = None,
    ) -> StepRecord:
        """Take one lifecycle action on one case, in one transaction (module docstring).
        Raises CaseNotFoundError, or a CaseError subclass (Forbidden 403, WrongState and
        StaleVersion 409, Payload 422)."""
        when = now or self.clock.now()
        with self._transaction() as tx:
            event = self._lock_event(tx, event_id)
            case, stored, assignee = self._read_case(tx, event)
            step: Step = apply(
                case,
                action,
                actor,
                payload,
                when,
                expected_version=expected_version,
                policy=self.policy(case.community_code),
                lifecycle=self.lifecycle,
                calendar=self.calendar,
            )
            row, change = self._write(
                tx, event, case, step.case, stored, assignee, step.audit, when.timestamp()
            )
            record = self._record(event_id, step.case, case.state, row, change, when)
            self._run_hooks(tx, record)
        log.info(
            "case %s %s: %s -> %s by %s (v%s)",
            event_id,
            row.action,
            case.state.value,
            step.case.state.value,
            row.actor,
            step.case.version,
        )
        return record

    def assign(
        self,
        event_id: int,
        assignee: str | None,
        actor: Actor,
        expected_version: int | None,
        *,
        assignee_scope: tuple[str, str | None] | None = None,
        note: str | None = None,
        now: datetime | None = None,
    ) -> StepRecord:
        """Assign the case to a person (``None``: unassign) and record it in the trail.

        Who may: an account of the case's community or above (its grid scope covers the case),
        or the lead department. ``assignee_scope`` is the assignee's (scope code, department):
        the caller (the API) looks the account up; a person in the case's community (scope
        covers the case's community or narrower, inside it) or of a department the case was
        whistled to."""
        when = now or self.clock.now()
        role = _actor_role(actor)
        with self._transaction() as tx:
            event = self._lock_event(tx, event_id)
            case, stored, _old = self._read_case(tx, event)
            refusal = assign_refusal(case, actor)
            if refusal is not None:
                raise refusal
            departments = (case.lead_department, *case.co_departments)
            if expected_version is not None and expected_version != case.version:
                raise StaleVersionError(
                    f"case {case.case_id} is at version {case.version}, not {expected_version}"
                )
            if assignee is not None:
                if assignee_scope is None:
                    raise CaseError(f"no account {assignee!r}")
                scope, department = assignee_scope
                in_community = (
                    department is None
                    and scope.startswith(case.community_code)
                    and case.grid_code.startswith(scope)
                )
                in_department = department is not None and department in departments
                if not (in_community or in_department):
                    raise ForbiddenError(
                        f"{assignee} is neither of the case's community nor of a department"
                        " it was whistled to"
                    )
            after = case.model_copy(update={"version": case.version + 1, "assignee": assignee})
            entry = AuditEntry(
                case_id=case.case_id,
                case_version=after.version,
                actor=actor.username,
                role=role.value,
                action=ASSIGN,
                before=case.state.value,
                after=after.state.value,
                note=note,
                detail={"assignee": assignee or ""},
                at=when,
            )
            row, change = self._write(
                tx, event, case, after, stored, assignee, entry, when.timestamp()
            )
            record = self._record(event_id, after, case.state, row, change, when)
            self._run_hooks(tx, record)
        return record

    def _record(
        self, event_id: int, case: Case, before: State, row: AuditRow, change: int, at: datetime
    ) -> StepRecord:
        return StepRecord(
            event_id=event_id,
            action=row.action,
            actor=row.actor,
            role=row.role,
            before=before,
            after=case.state,
            case=case,
            audit=row,
            change_seq=change,
            at=at,
            type_code=case.type_code,
            grid_code=case.grid_code,
            department=case.lead_department,
            departments=(
                (case.lead_department, *case.co_departments) if case.lead_department else ()
            ),
        )


def assign_refusal(case: Case, actor: Actor) -> CaseError | None:
    """Why this account may not assign this case now (None: it may): an account of the case's
    community or above, or its lead department, while the case is open. The one statement of
    the rule: :meth:`CaseStore.assign` raises it, the API tells the caller (``may_assign``)."""
    try:
        role = _actor_role(actor)
    except ForbiddenError as exc:
        return exc
    if not case.grid_code.startswith(actor.scope_code):
        return ForbiddenError("the case lies outside this account's area")
    if role is Role.DEPARTMENT and actor.department != case.lead_department:
        return ForbiddenError("only the case's lead department assigns it")
    if case.state is State.CLOSED:
        return WrongStateError("a closed case is not assigned")
    return None


def _actor_role(actor: Actor) -> Role:
    try:
        return Role(str(actor.level))
    except ValueError:
        raise ForbiddenError(f"a {actor.level} account takes no case actions") from None


def _rowcount(cur: Cursor) -> int:
    count = getattr(cur, "rowcount", -1)
    return int(count)


def community_of(grid_code: str) -> str:
    return grid_code[:COMMUNITY_LENGTH]
