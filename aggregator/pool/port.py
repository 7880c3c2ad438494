"""The storage port: what the rest of the aggregator may ask of an event pool.

Ingest writes through ``PoolWriter`` (``IngestPool``: with a reader of its own), the operator
API's lifecycle steps through
``LifecycleSteps``, and snapshots go to a ``SnapshotStorage``. Two adapters implement them:
``sqlite.EventPool`` / ``sqlite.LifecycleWriter`` / ``snapshots.SnapshotStore`` (one machine,
the embedded default) and ``postgres.PgEventPool`` / ``postgres.PgSnapshotStore`` (replicas on
several machines). What each promises is stated here once; the adapters' docstrings say how.

Reads go through ``queries``, the read model, on a reader connection of the caller's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from aggregator.pool.model import Batch, BatchResult
from contract import EventStatus

if TYPE_CHECKING:
    from aggregator.pool.reader import Reader


@runtime_checkable
class LifecycleSteps(Protocol):
    """Moves events along their lifecycle (registered → … → closed)."""

    def set_status(
        self, event_id: int, status: EventStatus, actor: str, note: str = ""
    ) -> dict[str, Any]:
        """Record one step of one event in its own transaction; returns ``{"event_id",
        "from", "to", "at"}``. A closed event stays closed (``PoolError``), and an unknown
        event is a ``PoolError`` too. A batch that might merge into the event commits wholly
        before the step or wholly after it."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class PoolWriter(LifecycleSteps, Protocol):
    """The writer side: one per aggregator process (replica)."""

    def commit_batch(self, batch: Batch) -> BatchResult:
        """Pool a whole micro-batch in one transaction, or nothing of it.

        * Exact dedup: an ``alert_id`` already pooled is ``duplicate`` and changes nothing.
        * Semantic dedup: an alert joins the nearest open event of its type within the type's
          merge radius and window (by ``observed_at``), decided so that writers committing at
          the same time never make two events of one incident; a closed event absorbs
          nothing, and a recurrence opens a new event linked to it.
        * Out-of-area alerts, dead letters (kept once per message) and devices' last-seen
          state land in the same transaction.

        Raises ``PoolError`` when the batch was not committed; ``PoolUnavailableError`` (a
        ``PoolError``) when the store could not be reached, which the caller retries without
        acknowledging the messages."""
        ...

    def prune(self, before: float, limit: int = 10_000) -> int:
        """Delete at most ``limit`` dead letters and out-of-area rows received before
        ``before`` (UNIX seconds); returns how many went. Events and alerts are kept."""
        ...


@runtime_checkable
class IngestPool(PoolWriter, Protocol):
    """What the ingest worker holds: the writer, and a read-only connection of its own for
    the read model (the summaries of the events whose notices it held back)."""

    @property
    def reader(self) -> Reader: ...


@runtime_checkable
class SnapshotStorage(Protocol):
    """Content-addressed JPEG snapshots, written before the batch that names them commits."""

    def put(self, jpeg: bytes) -> str:
        """Store the bytes (once); returns their sha256 in hex."""
        ...

    def get(self, sha256: str) -> bytes | None: ...
