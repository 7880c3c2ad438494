"""The live stream: new and updated events and raw alert outcomes, pushed to operators.

``StreamHub`` is a ``BatchSink``. The ingest worker calls ``on_batch`` after each commit; the
hub only hands the batch to the web server's event loop (``call_soon_threadsafe``) and returns,
so a slow browser can never hold up ingest. On the loop each message is serialised once and
offered to every client whose scope and filters match.

Each client has a bounded queue. A client that falls so far behind that its queue is full is
dropped: its queue is emptied, it receives one final ``{"kind": "dropped", "reason": "slow
consumer"}`` and its socket is closed with code 1013 (try again later). Memory per client stays
bounded whatever the ingest rate.

Messages (JSON text frames)::

    {"kind": "event", "change": "created|updated|closed", "event": {EventSummary}, "at": ...}
    {"kind": "alert", "alert_id", "device_id", "outcome", "event_id", "type", "severity",
     "grid_code", "department", "at"}
    {"kind": "dropped", "reason": "slow consumer"}
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from aggregator.auth import Operator
from aggregator.pipeline import Assembled
from aggregator.pool import BatchResult, Notice, iso
from contract import Catalogue, EventNoticeV1, Outcome, Severity, TelemetryV1

__all__ = ["DROPPED_CLOSE_CODE", "StreamClient", "StreamFilter", "StreamHub"]

log = logging.getLogger(__name__)

# RFC 6455 / IANA: 1013 "Try Again Later" — the server is overloaded for this client.
DROPPED_CLOSE_CODE = 1013
DROPPED_MESSAGE = orjson.dumps({"kind": "dropped", "reason": "slow consumer"}).decode()


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Server-side filters a client asks for, inside its operator's scope."""

    grid: str = ""
    types: frozenset[str] = frozenset()
    severities: frozenset[Severity] = frozenset()
    kinds: frozenset[str] = frozenset({"event", "alert"})


@dataclass(frozen=True, slots=True)
class _Item:
    """One message ready to send, with what filtering needs to know about it."""

    kind: str
    grid_code: str | None  # None: outside every grid (admins only)
    department: str | None
    type: str
    severity: Severity | None
    text: str


@dataclass(eq=False)
class StreamClient:
    operator: Operator
    filter: StreamFilter
    queue: asyncio.Queue[str]
    id: int = 0
    dropped: bool = False
    sent: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, item: _Item) -> bool:
        if item.kind not in self.filter.kinds:
            return False
        if item.grid_code is None:
            if not self.operator.is_admin or self.filter.grid:
                return False
        else:
            if not self.operator.sees_event(item.grid_code, item.department or ""):
                return False
            if not item.grid_code.startswith(self.filter.grid):
                return False
        if self.filter.types and item.type not in self.filter.types:
            return False
        return not (
            self.filter.severities
            and (item.severity is None or item.severity not in self.filter.severities)
        )


class StreamHub:
    """Fans committed batches out to WebSocket / SSE clients. Implements ``BatchSink``."""

    def __init__(self, catalogue: Catalogue, *, queue_size: int = 256) -> None:
        self.catalogue = catalogue
        self.queue_size = queue_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: set[StreamClient] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.dropped_clients = 0
        self.lost_batches = 0  # batches committed while no loop was bound

    # -- binding to the server's loop ------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the web server's event loop (called from its startup)."""
        with self._lock:
            self._loop = loop

    def unbind(self) -> None:
        with self._lock:
            self._loop = None
        for client in list(self._clients):
            client.closed.set()
        self._clients.clear()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- BatchSink (ingest thread) -----------------------------------------------------------

    def on_batch(
        self,
        result: BatchResult,
        notices: Sequence[Notice],
        telemetry: Sequence[TelemetryV1],
        assembled: Assembled,
    ) -> None:
        """Hand the batch to the loop and return at once; never blocks the ingest worker."""
        if not notices and not result.alerts and not result.out_of_area:
            return
        self._post(self._fan_out_batch, result, list(notices), assembled)

    def publish_notice(self, notice: EventNoticeV1) -> None:
        """An event changed outside ingest (an operator's lifecycle step). Any thread."""
        self._post(self._fan_out, [self._event_item(Notice.of(notice))])

    def _post(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self.lost_batches += 1
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            # The loop closed between the check and the call (shutdown): nobody is listening.
            self.lost_batches += 1

    # -- on the loop ------------------------------------------------------------------------

    def _fan_out_batch(
        self, result: BatchResult, notices: list[Notice], assembled: Assembled
    ) -> None:
        if not self._clients:
            return
        items = [self._event_item(n) for n in notices]
        items.extend(self._alert_items(result, assembled))
        self._fan_out(items)

    @staticmethod
    def _event_item(notice: Notice) -> _Item:
        # the published notice, with "kind" appended as the stream's last member
        text = notice.payload[:-1] + b',"kind":"event"}'
        return _Item(
            "event",
            notice.grid_code,
            notice.department,
            notice.type,
            notice.severity,
            text.decode(),
        )

    def _alert_items(self, result: BatchResult, assembled: Assembled) -> Iterable[_Item]:
        pooled = {a.alert_id: a for a in assembled.batch.alerts}
        at = iso(result.committed_at)
        for r in result.alerts:
            a = pooled.get(r.alert_id)
            if a is None:
                continue
            wt = self.catalogue.types.get(a.type)
            department = wt.department if wt else None
            body = {
                "kind": "alert",
                "alert_id": r.alert_id,
                "device_id": r.device_id,
                "seq": r.seq,
                "outcome": r.outcome.value,
                "event_id": r.event_id,
                "type": a.type,
                "severity": a.severity.value,
                "grid_code": a.grid_code,
                "department": department,
                "lat": a.lat,
                "lon": a.lon,
                "at": at,
            }
            yield _Item(
                "alert", a.grid_code, department, a.type, a.severity, orjson.dumps(body).decode()
            )
        for o in result.out_of_area:
            body = {
                "kind": "alert",
                "alert_id": o.alert_id,
                "device_id": o.device_id,
                "outcome": Outcome.OUT_OF_AREA.value,
                "event_id": None,
                "type": o.type,
                "lat": o.lat,
                "lon": o.lon,
                "at": at,
            }
            yield _Item("alert", None, None, o.type, None, orjson.dumps(body).decode())

    def _fan_out(self, items: Sequence[_Item]) -> None:
        for client in list(self._clients):
            if client.dropped:
                continue
            for item in items:
                if not client.wants(item):
                    continue
                try:
                    client.queue.put_nowait(item.text)
                except asyncio.QueueFull:
                    self._drop(client)
                    break

    def _drop(self, client: StreamClient) -> None:
        client.dropped = True
        self.dropped_clients += 1
        # Emptying the queue makes room for the one message that explains the close.
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(DROPPED_MESSAGE)
        log.warning(
            "stream client %s (%s) dropped: more than %s messages behind",
            client.id,
            client.operator.username,
            self.queue_size,
        )

    # -- clients (on the loop) -------------------------------------------------------------

    def connect(self, operator: Operator, stream_filter: StreamFilter) -> StreamClient:
        client = StreamClient(
            operator, stream_filter, asyncio.Queue(maxsize=self.queue_size), next(self._ids)
        )
        self._clients.add(client)
        log.info(
            "stream client %s connected operator=%s grid=%s",
            client.id,
            operator.username,
            stream_filter.grid or "*",
        )
        return client

    def disconnect(self, client: StreamClient) -> None:
        self._clients.discard(client)
        client.closed.set()
        log.info("stream client %s disconnected after %s messages", client.id, client.sent)
