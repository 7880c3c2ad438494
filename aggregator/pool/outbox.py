"""Outbound webhooks' subscriptions and their durable outbox, on either pool backend.

A case step that other systems should hear of becomes a ``WebhookMessage``; ``enqueue(tx,
message)`` runs inside the step's own transaction (the case store's step hook), matches the
enabled subscriptions and inserts one delivery row per match. The deliveries therefore commit
with the step or not at all: a committed step is delivered at least once, a refused or rolled
back one never.

Messages other than steps (the supervision timer's reminders and escalations) go the same way:
a ``WebhookMessage`` with a type and key of their own, enqueued in the transaction that
records them.

Each delivery has a ``webhook_id`` (``msg_`` + a hash of subscription id and message key):
the same message enqueued twice for one subscription is one row, and the receiver sees that id
on every retry, its idempotency key (Standard Webhooks ``webhook-id``).

The delivery worker (aggregator/fanout/webhooks.py) ``claim``s due rows in a short write
transaction that leases them to itself (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``FOR UPDATE
SKIP LOCKED``, so replicas' workers never take the same row), posts them without holding any
lock, then marks each delivered, for retry, or dead. A worker that dies holding a lease loses
it when the lease ends, and another worker tries again. Only the first pending delivery of a
(subscription, case) pair is ever claimed: a case's next message to a subscriber is not
attempted before the previous one was delivered or given up, so each receiver sees a case's
steps in order.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeAlias

import orjson

from aggregator.pool.reader import is_pool_url, pg_sql
from aggregator.pool.sqlite import write_transaction
from aggregator.pool.steps import StepRecord

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = [
    "Claim",
    "Delivery",
    "DeliveryStatus",
    "Outbox",
    "QmarkTx",
    "Subscription",
    "SubscriptionIn",
    "Tx",
    "WebhookMessage",
    "enqueue",
    "new_secret",
    "step_hook",
    "step_message",
    "webhook_id",
]

DeliveryStatus = Literal["pending", "delivered", "dead"]
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (the secrets' prefix, not a secret)
# longest error text kept per delivery (an exception's message can quote a whole response)
_ERROR_MAX: Final = 500


class QmarkTx(Protocol):
    """An open transaction that takes ``?`` placeholders on either backend (the case store's
    ``aggregator.pool.steps.Tx``, or a ``sqlite3.Connection``)."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any: ...


# A transaction the caller holds open: one that takes ``?`` placeholders (a SQLite connection
# inside BEGIN IMMEDIATE, the case store's Tx), or a psycopg connection inside
# ``conn.transaction()``.
Tx: TypeAlias = "QmarkTx | psycopg.Connection[Any]"


def _is_psycopg(tx: object) -> bool:
    return type(tx).__module__.split(".", 1)[0] == "psycopg"


def _run(tx: Tx, sql: str, params: Sequence[Any] = ()) -> Any:
    """One statement with ``?`` placeholders on any of the transactions ``Tx`` names."""
    if _is_psycopg(tx):
        return tx.execute(pg_sql(sql), list(params))
    return tx.execute(sql, tuple(params))


# ---------------------------------------------------------------------------- the message


@dataclass(frozen=True, slots=True)
class WebhookMessage:
    """What happened to a case, as subscribers receive it.

    ``key`` names the message uniquely and stably (``case:<id>:v<version>`` for a step): the
    same key enqueued again is the same delivery. The body sent is the Standard Webhooks
    envelope ``{"type", "timestamp", "data"}``."""

    key: str
    type: str  # 'case.step', 'case.reminder', …
    case_id: str
    event_type: str  # the warning type code of the case's event
    grid_code: str
    action: str
    departments: tuple[str, ...] = ()  # the lead and co-departments, if any
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    data: Mapping[str, Any] = field(default_factory=dict)

    def body(self) -> str:
        """The JSON body, fixed at enqueue time so that every retry signs the same bytes."""
        return orjson.dumps(
            {
                "type": self.type,
                "timestamp": self.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "data": {
                    "case_id": self.case_id,
                    "event_type": self.event_type,
                    "grid_code": self.grid_code,
                    "action": self.action,
                    "departments": list(self.departments),
                    **self.data,
                },
            }
        ).decode()


def webhook_id(subscription_id: str, message_key: str) -> str:
    """The delivery's stable id: one per (subscription, message), whatever the retries."""
    digest = hashlib.sha256(f"{subscription_id}\x00{message_key}".encode()).digest()
    return "msg_" + base64.b32encode(digest[:20]).decode().lower()


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


# ---------------------------------------------------------------------------- subscriptions


@dataclass(frozen=True, slots=True)
class SubscriptionIn:
    """A new subscription. Empty filters match everything."""

    url: str
    event_types: tuple[str, ...] = ()
    grid_prefix: str = ""
    department: str | None = None
    actions: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscription as listed: never with its secret."""

    id: str
    url: str
    event_types: tuple[str, ...]
    grid_prefix: str
    department: str | None
    actions: tuple[str, ...]
    description: str
    enabled: bool
    created_by: str
    created_at: float
    disabled_reason: str | None = None  # why it is disabled ('receiver answered 410 Gone', …)
    disabled_at: float | None = None
    secret_rotated_at: float | None = None
    # until then deliveries are signed with the previous secret too (never the secret itself)
    previous_secret_until: float | None = None

    def matches(self, message: WebhookMessage) -> bool:
        return (
            self.enabled
            and (not self.event_types or message.event_type in self.event_types)
            and message.grid_code.startswith(self.grid_prefix)
            and (self.department is None or self.department in message.departments)
            and (not self.actions or message.action in self.actions)
        )


_SUB_COLUMNS: Final = (
    "id, url, event_types, grid_prefix, department, actions, description, enabled,"
    " created_by, created_at, disabled_reason, disabled_at, secret_rotated_at,"
    " previous_secret_until"
)

# What PATCH may change: the filters, the URL, the description and the switch.
EDITABLE: Final = frozenset(
    {"url", "event_types", "grid_prefix", "department", "actions", "description", "enabled"}
)
GONE_REASON: Final = "receiver answered 410 Gone"


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _subscription(row: Sequence[Any]) -> Subscription:
    return Subscription(
        id=row[0],
        url=row[1],
        event_types=tuple(orjson.loads(row[2])),
        grid_prefix=row[3],
        department=row[4],
        actions=tuple(orjson.loads(row[5])),
        description=row[6],
        enabled=bool(row[7]),  # SQLite keeps 0/1, PostgreSQL a boolean
        created_by=row[8],
        created_at=float(row[9]),
        disabled_reason=row[10],
        disabled_at=_opt_float(row[11]),
        secret_rotated_at=_opt_float(row[12]),
        previous_secret_until=_opt_float(row[13]),
    )


def enqueue(tx: Tx, message: WebhookMessage, now: float | None = None) -> int:
    """Insert one delivery per enabled subscription that matches ``message``, in the caller's
    transaction ``tx`` (see ``Tx``). A message already enqueued for a subscription (same key)
    is left as it is. Returns how many deliveries were added."""
    now = time.time() if now is None else now
    subs = [
        _subscription(r)
        for r in _run(
            tx, f"SELECT {_SUB_COLUMNS} FROM webhook_subscriptions WHERE enabled ORDER BY id"
        ).fetchall()
    ]
    body = message.body()
    added = 0
    for sub in subs:
        if not sub.matches(message):
            continue
        cur = _run(
            tx,
            "INSERT INTO webhook_deliveries(webhook_id, subscription_id, case_id, message_type,"
            " payload, created_at, next_attempt_at) VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (webhook_id) DO NOTHING",
            (
                webhook_id(sub.id, message.key),
                sub.id,
                message.case_id,
                message.type,
                body,
                now,
                now,
            ),
        )
        added += max(cur.rowcount, 0)
    return added


def step_message(record: StepRecord) -> WebhookMessage:
    """A case step as subscribers receive it (``type`` ``case.step``). Keyed by the case and
    its version after the step: one message per step, whoever enqueues it."""
    case = record.case
    audit = record.audit
    return WebhookMessage(
        key=f"case:{record.event_id}:v{case.version}",
        type="case.step",
        case_id=str(record.event_id),
        event_type=record.type_code,
        grid_code=record.grid_code,
        action=record.action,
        departments=record.departments,
        at=record.at,
        data={
            "version": case.version,
            "before": record.before.value,
            "after": record.after.value,
            "actor": record.actor,
            "role": record.role,
            "reason": audit.reason,
            "note": audit.note,
            "evidence": list(audit.evidence),
            "assignee": case.assignee,
            "deadlines": [
                {"clock": d.clock.value, "due_at": d.due_at.astimezone(UTC).isoformat()}
                for d in case.running()
            ],
            "audit_seq": audit.seq,
            "audit_hash": audit.hash,
        },
    )


def step_hook(tx: Tx, record: StepRecord) -> None:
    """The case store's ``StepHook``: the step's deliveries, in the step's transaction."""
    enqueue(tx, step_message(record))  # due now, whatever time the step was given


# ---------------------------------------------------------------------------- deliveries


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery leased to one worker: what it needs to post it. Holds the secret: never log
    it, never hand it to the API."""

    id: int
    webhook_id: str
    subscription_id: str
    case_id: str
    url: str
    secret: str = field(repr=False)
    payload: str = field(repr=False)
    attempts: int  # attempts made before this one
    token: str = field(repr=False)
    # the secret before a rotation, while its grace period lasts: the delivery carries a
    # signature with each key, so a receiver still on the old one verifies it too
    previous_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery as the API lists it (no payload secret; the payload is the body sent)."""

    id: int
    webhook_id: str
    subscription_id: str
    case_id: str
    message_type: str
    status: DeliveryStatus
    attempts: int
    created_at: float
    next_attempt_at: float
    last_error: str | None
    last_status: int | None
    finished_at: float | None
    payload: str


_DELIVERY_COLUMNS: Final = (
    "id, webhook_id, subscription_id, case_id, message_type, status, attempts, created_at,"
    " next_attempt_at, last_error, last_status, finished_at, payload"
)


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=int(row[0]),
        webhook_id=row[1],
        subscription_id=row[2],
        case_id=row[3],
        message_type=row[4],
        status=row[5],
        attempts=int(row[6]),
        created_at=float(row[7]),
        next_attempt_at=float(row[8]),
        last_error=row[9],
        last_status=None if row[10] is None else int(row[10]),
        finished_at=None if row[11] is None else float(row[11]),
        payload=row[12],
    )


# The head of each (subscription, case) queue that is due and not leased, of an enabled
# subscription (a disabled one's deliveries wait, pending, until it is enabled again). The NOT
# EXISTS makes the order per case: a later delivery waits while an earlier one is pending,
# leased or not.
_DUE: Final = (
    "SELECT d.id FROM webhook_deliveries d"
    " JOIN webhook_subscriptions s ON s.id = d.subscription_id AND s.enabled"
    " WHERE d.status = 'pending' AND d.next_attempt_at <= ?"
    " AND (d.lease_until IS NULL OR d.lease_until < ?)"
    " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.status = 'pending'"
    " AND e.subscription_id = d.subscription_id AND e.case_id = d.case_id AND e.id < d.id)"
    " ORDER BY d.next_attempt_at, d.id LIMIT ?"
)


class Outbox:
    """The outbox and subscriptions of one pool (a SQLite file or a PostgreSQL URL).

    ``pooled``: keep connections (the delivery worker: a SQLite connection behind a lock, or a
    small psycopg pool); otherwise each call opens and closes its own (the API's rare admin
    calls, which then need no shutdown)."""

    def __init__(
        self, target: Path | str, *, pooled: bool = True, max_connections: int = 4
    ) -> None:
        self._pg = is_pool_url(target)
        self._target = target
        self._pooled = pooled
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        if self._pg and pooled:
            from aggregator.pool.postgres import connection_pool

            # not waiting: a pool unreachable now is the worker's retry, not the service's
            # failure to start (a claim then raises PoolTimeout, and the worker waits)
            self._pool = connection_pool(
                str(target), name="cwg-outbox", max_size=max_connections, wait=False
            )

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._pool is not None:
            self._pool.close()

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction of the outbox's own (see ``Tx``)."""
        if self._pg:
            with self._pg_conn() as conn, conn.transaction():
                yield conn
            return
        with self._sqlite_conn() as db, write_transaction(db):
            yield db

    @contextmanager
    def _pg_conn(self) -> Iterator[psycopg.Connection[Any]]:
        if self._pool is not None:
            with self._pool.connection() as conn:
                yield conn
            return
        import psycopg

        with psycopg.connect(str(self._target), autocommit=True, connect_timeout=10) as conn:
            yield conn

    @contextmanager
    def _sqlite_conn(self) -> Iterator[sqlite3.Connection]:
        from aggregator.pool.sqlite import connect  # not at import: sqlite.py imports the model

        if not self._pooled:
            db = connect(self._target)
            try:
                yield db
            finally:
                db.close()
            return
        with self._lock:  # one connection, one transaction at a time
            if self._db is None:
                self._db = connect(self._target)
            yield self._db

    # -- subscriptions -----------------------------------------------------------------------

    def add_subscription(
        self, sub: SubscriptionIn, created_by: str, now: float | None = None
    ) -> tuple[Subscription, str]:
        """Store a subscription with a new secret; returns it and the secret (to show once)."""
        now = time.time() if now is None else now
        sub_id = "wh_" + secrets.token_hex(8)
        secret = new_secret()
        with self.transaction() as tx:
            _run(
                tx,
                "INSERT INTO webhook_subscriptions(id, url, secret, event_types, grid_prefix,"
                " department, actions, description, enabled, created_by, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    sub_id,
                    sub.url,
                    secret,
                    orjson.dumps(list(sub.event_types)).decode(),
                    sub.grid_prefix,
                    sub.department,
                    orjson.dumps(list(sub.actions)).decode(),
                    sub.description,
                    True,
                    created_by,
                    now,
                ),
            )
        made = Subscription(
            id=sub_id,
            url=sub.url,
            event_types=tuple(sub.event_types),
            grid_prefix=sub.grid_prefix,
            department=sub.department,
            actions=tuple(sub.actions),
            description=sub.description,
            enabled=True,
            created_by=created_by,
            created_at=now,
        )
        return made, secret

    def subscriptions(self) -> list[Subscription]:
        with self.transaction() as tx:
            rows = _run(
                tx, f"SELECT {_SUB_COLUMNS} FROM webhook_subscriptions ORDER BY created_at, id"
            ).fetchall()
        return [_subscription(r) for r in rows]

    def subscription(self, sub_id: str) -> Subscription | None:
        with self.transaction() as tx:
            row = _run(
                tx, f"SELECT {_SUB_COLUMNS} FROM webhook_subscriptions WHERE id = ?", (sub_id,)
            ).fetchone()
        return None if row is None else _subscription(row)

    def update_subscription(
        self,
        sub_id: str,
        changes: Mapping[str, Any],
        *,
        disabled_reason: str = "disabled by an administrator",
        now: float | None = None,
    ) -> Subscription | None:
        """Change a subscription's URL, filters, description or ``enabled`` (keys of
        ``EDITABLE``); None when there is none. Disabling records ``disabled_reason`` and the
        time (a subscription already disabled keeps its first reason); enabling clears them,
        and its pending deliveries are claimed again, in order, from where they stopped."""
        unknown = set(changes) - EDITABLE
        if unknown:
            raise ValueError(f"not editable: {', '.join(sorted(unknown))}")
        now = time.time() if now is None else now
        sets: list[str] = []
        params: list[Any] = []
        for name in sorted(changes):
            value = changes[name]
            if name == "enabled":
                continue
            if name in ("event_types", "actions"):
                value = orjson.dumps(list(value)).decode()
            sets.append(f"{name} = ?")
            params.append(value)
        if "enabled" in changes:
            if changes["enabled"]:
                sets.append("enabled = ?, disabled_reason = NULL, disabled_at = NULL")
                params.append(True)
            else:
                # the CASEs read the row as it was: a disabled one keeps its reason and time
                sets.append(
                    "disabled_reason = CASE WHEN enabled THEN ? ELSE disabled_reason END,"
                    " disabled_at = CASE WHEN enabled THEN ? ELSE disabled_at END, enabled = ?"
                )
                params.extend((disabled_reason, now, False))
        with self.transaction() as tx:
            if sets:
                cur = _run(
                    tx,
                    f"UPDATE webhook_subscriptions SET {', '.join(sets)} WHERE id = ?",
                    (*params, sub_id),
                )
                if not cur.rowcount:
                    return None
            row = _run(
                tx, f"SELECT {_SUB_COLUMNS} FROM webhook_subscriptions WHERE id = ?", (sub_id,)
            ).fetchone()
        return None if row is None else _subscription(row)

    def rotate_secret(self, sub_id: str, grace_s: float, now: float | None = None) -> str | None:
        """A new secret for the subscription (returned to show once); for ``grace_s`` seconds
        deliveries are signed with the secret it replaces as well. Rotating again within a
        grace period keeps only the secret just replaced. None when there is no such
        subscription."""
        now = time.time() if now is None else now
        secret = new_secret()
        with self.transaction() as tx:
            cur = _run(
                tx,
                "UPDATE webhook_subscriptions SET previous_secret = secret,"
                " previous_secret_until = ?, secret_rotated_at = ?, secret = ? WHERE id = ?",
                (now + grace_s, now, secret, sub_id),
            )
            return secret if cur.rowcount else None

    def delete_subscription(self, sub_id: str) -> bool:
        """Remove a subscription and its deliveries (a worker holding one of them finds it
        gone when it marks it); False when there was none."""
        with self.transaction() as tx:
            _run(tx, "DELETE FROM webhook_deliveries WHERE subscription_id = ?", (sub_id,))
            cur = _run(tx, "DELETE FROM webhook_subscriptions WHERE id = ?", (sub_id,))
            return bool(cur.rowcount)

    # -- the worker's side ---------------------------------------------------------------------

    def enqueue(self, message: WebhookMessage, now: float | None = None) -> int:
        """``enqueue`` in a transaction of the outbox's own (for messages no step carries)."""
        with self.transaction() as tx:
            return enqueue(tx, message, now)

    def claim(self, limit: int, lease_s: float, now: float | None = None) -> list[Claim]:
        """Lease up to ``limit`` due deliveries, each the first pending one of its
        (subscription, case), for ``lease_s`` seconds."""
        now = time.time() if now is None else now
        token = secrets.token_hex(8)
        if not self._pg and not self._anything_due(now):
            return []  # an idle worker does not take SQLite's one write lock from ingest
        with self.transaction() as tx:
            due = _DUE + (" FOR UPDATE OF d SKIP LOCKED" if self._pg else "")
            ids = [int(r[0]) for r in _run(tx, due, (now, now, limit)).fetchall()]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            _run(
                tx,
                f"UPDATE webhook_deliveries SET lease_until = ?, lease_token = ?"
                f" WHERE id IN ({marks})",
                (now + lease_s, token, *ids),
            )
            rows = _run(
                tx,
                "SELECT d.id, d.webhook_id, d.subscription_id, d.case_id, s.url, s.secret,"
                " d.payload, d.attempts,"
                " CASE WHEN s.previous_secret_until > ? THEN s.previous_secret END"
                " FROM webhook_deliveries d"
                " JOIN webhook_subscriptions s ON s.id = d.subscription_id"
                f" WHERE d.id IN ({marks}) ORDER BY d.id",
                (now, *ids),
            ).fetchall()
        return [
            Claim(
                id=int(r[0]),
                webhook_id=r[1],
                subscription_id=r[2],
                case_id=r[3],
                url=r[4],
                secret=r[5],
                payload=r[6],
                attempts=int(r[7]),
                token=token,
                previous_secret=r[8],
            )
            for r in rows
        ]

    def _anything_due(self, now: float) -> bool:
        with self._sqlite_conn() as db:  # a read outside any write transaction (WAL)
            row = db.execute(
                "SELECT 1 FROM webhook_deliveries d"
                " JOIN webhook_subscriptions s ON s.id = d.subscription_id AND s.enabled"
                " WHERE d.status = 'pending' AND d.next_attempt_at <= ?"
                " AND (d.lease_until IS NULL OR d.lease_until < ?) LIMIT 1",
                (now, now),
            ).fetchone()
        return row is not None

    def prune(self, before: float, limit: int = 10_000) -> int:
        """Delete at most ``limit`` delivered or dead deliveries that finished before
        ``before`` (UNIX seconds); returns how many went. Pending ones are never pruned."""
        with self.transaction() as tx:
            cur = _run(
                tx,
                "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries"
                " WHERE status != 'pending' AND finished_at < ? ORDER BY id LIMIT ?)",
                (before, limit),
            )
            return max(int(cur.rowcount), 0)

    def _finish(
        self, claim: Claim, sets: str, params: Sequence[Any], *, wake_at: float | None = None
    ) -> bool:
        # Only the holder of the lease marks the row: a worker whose lease ran out (and whose
        # row another worker took over) changes nothing.
        with self.transaction() as tx:
            cur = _run(
                tx,
                f"UPDATE webhook_deliveries SET {sets}, lease_until = NULL, lease_token = NULL"
                " WHERE id = ? AND lease_token = ? AND status = 'pending'",
                (*params, claim.id, claim.token),
            )
            if wake_at is not None and cur.rowcount:
                # The receiver answers again: its deliveries waiting out a retry delay are due
                # now, rather than up to the schedule's longest delay after it came back.
                # Not those it answered 429 Too Many Requests: it asked for fewer, not more.
                _run(
                    tx,
                    "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE subscription_id = ?"
                    " AND status = 'pending' AND attempts > 0 AND next_attempt_at > ?"
                    " AND (last_status IS NULL OR last_status != 429)",
                    (wake_at, claim.subscription_id, wake_at),
                )
            return bool(cur.rowcount)

    def mark_delivered(
        self, claim: Claim, http_status: int | None, now: float | None = None
    ) -> bool:
        now = time.time() if now is None else now
        return self._finish(
            claim,
            "status = 'delivered', attempts = attempts + 1, last_status = ?, last_error = NULL,"
            " finished_at = ?",
            (http_status, now),
            wake_at=now,
        )

    def mark_retry(
        self, claim: Claim, error: str, http_status: int | None, next_attempt_at: float
    ) -> bool:
        return self._finish(
            claim,
            "attempts = attempts + 1, last_error = ?, last_status = ?, next_attempt_at = ?",
            (error[:_ERROR_MAX], http_status, next_attempt_at),
        )

    def mark_gone(
        self, claim: Claim, http_status: int, error: str, now: float | None = None
    ) -> bool:
        """The receiver answered 410 Gone: the subscription is disabled (with the reason and
        time) and the attempt counted; the delivery stays pending, so it and the rest of the
        subscription's deliveries wait, in order, until an administrator enables it again."""
        now = time.time() if now is None else now
        with self.transaction() as tx:
            cur = _run(
                tx,
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_error = ?,"
                " last_status = ?, next_attempt_at = ?, lease_until = NULL, lease_token = NULL"
                " WHERE id = ? AND lease_token = ? AND status = 'pending'",
                (error[:_ERROR_MAX], http_status, now, claim.id, claim.token),
            )
            if not cur.rowcount:
                return False
            _run(
                tx,
                "UPDATE webhook_subscriptions SET disabled_reason = ?, disabled_at = ?,"
                " enabled = ? WHERE id = ? AND enabled",
                (GONE_REASON, now, False, claim.subscription_id),
            )
            return True

    def mark_dead(
        self, claim: Claim, error: str, http_status: int | None, now: float | None = None
    ) -> bool:
        now = time.time() if now is None else now
        return self._finish(
            claim,
            "status = 'dead', attempts = attempts + 1, last_error = ?, last_status = ?,"
            " finished_at = ?",
            (error[:_ERROR_MAX], http_status, now),
        )

    def redeliver(
        self, sub_id: str, delivery_id: int, now: float | None = None
    ) -> Delivery | Literal["pending"] | None:
        """Put a dead or delivered delivery back to pending, due now, with the full retry
        schedule ahead of it and the same ``webhook_id`` (the receiver's idempotency key: one
        that already has it may skip it). It then goes before the case's later pending
        deliveries, in enqueue order. None when the subscription has no such delivery,
        ``"pending"`` when it is pending already."""
        now = time.time() if now is None else now
        with self.transaction() as tx:
            row = _run(
                tx,
                "SELECT status FROM webhook_deliveries WHERE id = ? AND subscription_id = ?",
                (delivery_id, sub_id),
            ).fetchone()
            if row is None:
                return None
            if row[0] == "pending":
                return "pending"
            _run(
                tx,
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0,"
                " next_attempt_at = ?, finished_at = NULL, lease_until = NULL,"
                " lease_token = NULL WHERE id = ?",
                (now, delivery_id),
            )
            row = _run(
                tx,
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?",
                (delivery_id,),
            ).fetchone()
        return _delivery(row)

    # -- reading -------------------------------------------------------------------------------

    def delivery(self, sub_id: str, delivery_id: int) -> Delivery | None:
        with self.transaction() as tx:
            row = _run(
                tx,
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries"
                " WHERE id = ? AND subscription_id = ?",
                (delivery_id, sub_id),
            ).fetchone()
        return None if row is None else _delivery(row)

    def pending_count(self) -> int:
        """How many deliveries are pending (all subscriptions, enabled or not): the metrics'
        gauge. A count over the partial index of pending rows."""
        if self._pg:
            with self._pg_conn() as conn:
                row = conn.execute(
                    "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'"
                ).fetchone()
        else:
            with self._sqlite_conn() as db:  # a read outside any write transaction (WAL)
                row = db.execute(
                    "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'"
                ).fetchone()
        return int(row[0]) if row is not None else 0

    def deliveries(
        self,
        subscription_id: str | None = None,
        status: DeliveryStatus | None = None,
        *,
        limit: int = 100,
        after_id: int = 0,
    ) -> list[Delivery]:
        """Deliveries in enqueue order, after ``after_id`` (a cursor)."""
        where = ["id > ?"]
        params: list[Any] = [after_id]
        if subscription_id is not None:
            where.append("subscription_id = ?")
            params.append(subscription_id)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        with self.transaction() as tx:
            rows = _run(
                tx,
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE {' AND '.join(where)}"
                " ORDER BY id LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [_delivery(r) for r in rows]

    def counts(self, subscription_id: str | None = None) -> dict[str, int]:
        """Deliveries by status (of one subscription, or all), for the API and metrics."""
        where, params = (
            ("WHERE subscription_id = ?", (subscription_id,)) if subscription_id else ("", ())
        )
        with self.transaction() as tx:
            rows = _run(
                tx,
                f"SELECT status, COUNT(*) FROM webhook_deliveries {where} GROUP BY status",
                params,
            ).fetchall()
        out = {"pending": 0, "delivered": 0, "dead": 0}
        out.update({str(r[0]): int(r[1]) for r in rows})
        return out
