"""The live stream: new and updated events, and raw alert outcomes on request, pushed to operators.

``StreamHub`` runs in the operator API's process (``aggregator/api/server.py``), never on the
pool writer's path. It reads the pool (WAL: readers never wait for the writer) a few times a
second: every event whose pool-wide change number moved since the last look, whoever changed it
— this aggregator, another replica on the same pool file, or an operator — and, only while some
client asked for them (``alerts=1``), the alerts and out-of-area rows committed since. An
operator's own lifecycle step is also offered at once (``publish_notice``); the poll does not
repeat it.

Pacing. An event's ``created`` goes out at once; any later change at most once per
``update_interval`` (1 s, as the events topic), carrying the latest state. An event that changed
before its turn is read from the pool only when its turn comes: the summaries are most of a
look's cost, and most changes of a busy event would be replaced unread. So a ``closed`` made
through another process (a replica's API) can wait out the rest of its event's interval; one
made through this process goes at once (``publish_notice``). Each client has
a queue of *distinct* pending items: a queued update of an event that changes again is replaced
in place, not appended, so a client that keeps reading never falls behind however fast ingest
runs. A client is dropped only when it stops reading — items wait and it has taken none for
``stall_s`` seconds — or when more than ``queue_size`` distinct items wait (far more than a
reading client ever holds; raw alert outcomes are distinct, so a slow reader of those hits it).
A dropped client gets one final ``{"kind": "dropped", "reason": "slow consumer"}`` and its
socket is closed with code 1013 (try again later); a client stuck in a send is cancelled.

Frames. Whatever is due for a client when its sender comes for it — everything one look at the
pool offered it, as a rule — goes out as ONE frame (one WebSocket text message, one SSE event):
with a hundred operators each shown tens of event changes a second, a frame per change was most
of the API process's CPU. A lone item goes as itself; two or more go as a batch, in the order
they were queued::

    {"kind": "batch", "items": [ITEM, ITEM, ...]}

A frame holds at most ``FRAME_CHARS`` characters of items (far below the 1 MiB message limit
common WebSocket clients default to); the rest follows in the next frame. An ITEM is::

    {"schema": "event/v1", "change": "created|updated|closed", "event": {EventSummary}, "at":
     ..., "kind": "event"}
    {"kind": "alert", "alert_id", "device_id", "seq", "outcome", "event_id", "type",
     "severity", "grid_code", "department", "lat", "lon", "at"}

and the final ``{"kind": "dropped", "reason": "slow consumer"}`` always goes alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from aggregator.access.auth import Operator
from aggregator.errors import PoolError
from aggregator.pool import queries
from aggregator.pool.model import Notice, iso
from aggregator.pool.reader import Reader, is_pool_url, read_errors
from contract import (
    Catalogue,
    EventNoticeV1,
    EventStatus,
    EventSummary,
    Outcome,
    Severity,
    utcnow,
)

__all__ = [
    "DROPPED_CLOSE_CODE",
    "DROPPED_MESSAGE",
    "FRAME_CHARS",
    "ClientQueue",
    "StreamClient",
    "StreamFilter",
    "StreamHub",
    "frame",
]

if TYPE_CHECKING:
    from aggregator.pool.postgres import ChangeListener, PoolChange

log = logging.getLogger(__name__)

# RFC 6455 / IANA: 1013 "Try Again Later" — the server is overloaded for this client.
DROPPED_CLOSE_CODE = 1013
DROPPED_MESSAGE = orjson.dumps({"kind": "dropped", "reason": "slow consumer"}).decode()

# Characters of items per frame: even all in 4-byte UTF-8 that stays under 512 KiB, half the
# 1 MiB a client library such as Python's websockets accepts by default. A tick's event changes
# for one operator are a few tens of kilobytes; only a raw-alerts backlog is split.
FRAME_CHARS = 128 * 1024
_BATCH_HEAD = '{"kind":"batch","items":['


def frame(texts: Sequence[str]) -> str:
    """One frame for items taken together: a lone item as itself, more as a batch. The items
    are JSON texts already: the batch is joined, not parsed and encoded again."""
    if len(texts) == 1:
        return texts[0]
    return _BATCH_HEAD + ",".join(texts) + "]}"


# Rows read per look at the pool: a look is bounded whatever the backlog; the rest waits for the
# next one (a fraction of a second later).
_POLL_EVENTS = 5000
_POLL_ALERTS = 20000
# PostgreSQL numbers (change numbers, alert ids) are taken before commit, so replicas may
# commit them out of order: a look that reads the table re-reads this many numbers below its
# mark rather than miss a late commit (what it has seen already is not offered again).
_PG_CHANGE_MARGIN = 32
_PG_ALERT_MARGIN = 1000
# After the change listener failed, the table poll alone serves for this long before it is
# tried again (each try may wait out a connect timeout).
_LISTEN_RETRY_S = 5.0
# How long an operator's step offered at once waits for the poll to read its commit (a few
# looks, on a busy box): later it is taken as read already (Hub._step).
OFFER_HORIZON_S = 2.0
# what a listener raises when it cannot hear the pool (the server away, the link broken)
_LISTEN_ERRORS: tuple[type[Exception], ...] = (PoolError, *read_errors())


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Server-side filters a client asks for, inside its operator's scope."""

    grid: str = ""
    types: frozenset[str] = frozenset()
    severities: frozenset[Severity] = frozenset()
    kinds: frozenset[str] = frozenset({"event"})


@dataclass(frozen=True, slots=True)
class _Item:
    """One message ready to send, with what filtering and coalescing need to know about it."""

    kind: str
    grid_code: str | None  # None: outside every grid (admins only)
    department: str | None
    type: str
    severity: Severity | None
    text: str
    key: Hashable  # items with one key replace each other in a client's queue


class ClientQueue:
    """Distinct pending messages in arrival order; an item whose key already waits replaces its
    text in place. The sender (the only consumer) awaits ``wait`` and then ``take``s all that
    waits, a frame's worth."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, str] = OrderedDict()
        self._ready = asyncio.Event()
        self._unique = itertools.count()
        self.last_taken = time.monotonic()  # when the sender last came for a message

    def offer(self, key: Hashable, text: str) -> bool:
        """Queue or replace; False when this would make more than ``maxsize`` distinct items."""
        if key in self._items:
            self._items[key] = text
            return True
        if len(self._items) >= self.maxsize:
            return False
        self._items[key] = text
        self._ready.set()
        return True

    def put_nowait(self, text: str) -> None:
        """Append a message that replaces nothing (the final ``dropped`` notice)."""
        self._items[("once", next(self._unique))] = text
        self._ready.set()

    async def wait(self) -> None:
        """Until something waits to be taken."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()

    def take(self, max_chars: int = FRAME_CHARS) -> list[str]:
        """The oldest waiting texts, in order, up to ``max_chars`` in all (at least one)."""
        self.last_taken = time.monotonic()
        items = self._items
        out: list[str] = []
        size = 0
        while items:
            key = next(iter(items))
            text = items[key]
            if out and size + len(text) > max_chars:
                break
            del items[key]
            out.append(text)
            size += len(text) + 1
        return out

    def clear(self) -> None:
        self._items.clear()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class StreamClient:
    operator: Operator
    filter: StreamFilter
    queue: ClientQueue
    id: int = 0
    dropped: bool = False
    sent: int = 0  # items
    frames: int = 0  # frames they went in
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[Any] | None = None  # the request's task, cancelled if stuck in a send
    seen_taken: float = 0.0  # the queue's last_taken at the previous tick
    stalled_s: float = 0.0  # how long messages have waited with none taken

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


class _PoolFeed:
    """What changed in the pool since the last look (runs on a worker thread, one at a time).

    On SQLite it reads the events whose change number passed its mark. On PostgreSQL it also
    LISTENs (``postgres.ChangeListener``): ``wait`` returns as soon as a commit is announced,
    and the announcements name the events created and updated, in commit order, whichever
    replica made them (a created event is new even when its id is below one seen already).
    Each look still reads the table above the mark, which catches a change nobody announced;
    it reads from a margin below the mark (change numbers are taken before commit, so
    replicas may commit them out of order) when the listener (re)connected, while it cannot
    listen, and below an announcement too large to name its events. Nothing is offered twice
    for one (change number, event)."""

    def __init__(self, path: Path | str, catalogue: Catalogue) -> None:
        self.path = path
        self.catalogue = catalogue
        self._db: Reader | None = None
        self.change_seq = 0
        self.max_event_id = 0
        self.alert_rowid = 0
        self.out_of_area_at = 0.0
        self.pg = is_pool_url(path)
        self._closed = False
        self._listener: ChangeListener | None = None
        self._listen_failed_at: float | None = None
        self._heard: list[PoolChange] = []
        self._catch_up = False  # read the table at the next look (announcements were missed)
        # PostgreSQL: what table reads in the margin below a mark have offered already
        self._changes_seen: dict[tuple[int, int], None] = {}  # (change number, event id)
        self._alerts_seen: dict[int, None] = {}  # alert ids
        self.listen_errors = 0

    @property
    def listens(self) -> bool:
        """Whether ``wait`` can be woken by a commit (PostgreSQL), rather than the clock."""
        return self.pg

    @property
    def listening(self) -> bool:
        """Whether announcements are being heard now (a listener that has not failed)."""
        return self._listener is not None and self._listen_failed_at is None

    def wait(self, timeout: float) -> None:
        """Until a commit is announced or ``timeout`` s pass (PostgreSQL; blocking: run it on a
        worker thread). A listener that fails is closed and tried again after a while;
        meanwhile this sleeps and every look reads the table."""
        failed = self._listen_failed_at
        if self._closed or (failed is not None and time.monotonic() - failed < _LISTEN_RETRY_S):
            time.sleep(timeout)
            return
        try:
            if self._listener is None:
                from aggregator.pool.postgres import ChangeListener

                self._listener = ChangeListener(str(self.path))
                self._catch_up = True  # commits before the LISTEN were not announced to it
            heard = self._listener.poll(timeout)
        except _LISTEN_ERRORS:
            # the server is away (PoolUnavailableError), the link broke, or close() ran
            if not self._closed:
                self.listen_errors += 1
                log.warning("live stream: cannot listen for pool changes; polling the table")
            self._listen_failed_at = time.monotonic()
            self._drop_listener()
            return
        self._listen_failed_at = None
        self._heard += heard

    def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()
        self._heard = []
        self._catch_up = True

    def _conn(self) -> Reader:
        if self._db is None:
            self._db = queries.open_reader(self.path)
        return self._db

    def start(self) -> None:
        """Begin at the pool's present: clients see what happens from now on."""
        self._closed = False
        db = self._conn()
        if self.listening:
            assert self._listener is not None
            try:  # announced before the marks: the past (not offered to clients)
                self._listener.poll(0)
            except _LISTEN_ERRORS:
                self._listen_failed_at = time.monotonic()
                self._drop_listener()
        self._heard = []
        self._changes_seen.clear()
        self.change_seq, self.max_event_id = queries.feed_marks(db)
        self._mark_alerts(db)

    def _mark_alerts(self, db: Reader) -> None:
        # Where raw alerts begin for a client that asks for them later. Out-of-area rows have
        # no arrival order but their receipt time, and no index on it: the clock stands in.
        self.alert_rowid = queries.last_alert_rowid(db)
        self.out_of_area_at = time.time()
        self._alerts_seen.clear()

    def close(self) -> None:
        self._closed = True
        self._drop_listener()
        if self._db is not None:
            self._db.close()
            self._db = None

    def look(self, want_alerts: bool) -> tuple[list[tuple[int, bool]], list[_Item]]:
        """The events changed since the last look, as (id, new?), and any raw alerts."""
        db = self._conn()
        with queries.snapshot(db):  # one snapshot for the whole look
            events = self._changed(db)
            if want_alerts:
                alerts = self._alerts(db)
            else:
                alerts = []
                self._mark_alerts(db)
        return events, alerts

    def _changed(self, db: Reader) -> list[tuple[int, bool]]:
        if not self.pg:
            return self._read_changes(db, self.change_seq)
        return self._pg_changed(db)

    def _read_changes(self, db: Reader, after: int) -> list[tuple[int, bool]]:
        rows = queries.changed_events(db, after, _POLL_EVENTS)
        if not rows:
            return []
        self.change_seq = max(r[1] for r in rows)
        out = [(eid, eid > self.max_event_id) for eid, _ in rows]
        self.max_event_id = max(self.max_event_id, *(r[0] for r in rows))
        return out

    def _pg_changed(self, db: Reader) -> list[tuple[int, bool]]:
        """The announced changes, and the table's rows above the mark: a writer that changed
        the pool without announcing it is still seen, a tick late at most. Each (change
        number, event) is offered once, whichever of the two brought it first."""
        heard, self._heard = self._heard, []
        listener = self._listener
        if listener is not None and listener.reconnected:
            listener.reconnected = False
            self._catch_up = True
        after = self.change_seq
        if self._catch_up or not self.listening:
            after -= _PG_CHANGE_MARGIN  # numbers taken before commit may commit late
        cut = [c.change for c in heard if c.truncated]
        if cut:  # an announcement too large to name its events: read them from the table
            after = min(after, min(cut) - 1)
        self._catch_up = False
        seen = self._changes_seen
        out: dict[int, bool] = {}
        known = self.max_event_id
        for change in heard:
            for eid in change.created:  # new, even below an id seen (another replica's)
                if (change.change, eid) not in seen:
                    seen[change.change, eid] = None
                    out[eid] = True
            for eid in change.updated:
                if (change.change, eid) not in seen:
                    seen[change.change, eid] = None
                    out.setdefault(eid, False)
            self.change_seq = max(self.change_seq, change.change)
        rows = queries.changed_events(db, max(0, after), _POLL_EVENTS)
        if len(rows) == _POLL_EVENTS:
            self._catch_up = True  # a backlog: the next look reads on from the margin
        for eid, seq in rows:
            self.change_seq = max(self.change_seq, seq)
            if (seq, eid) not in seen:
                seen[seq, eid] = None
                out[eid] = out.get(eid, False) or eid > known
        low = self.change_seq - 2 * _PG_CHANGE_MARGIN  # below every later read's margin
        for key in [k for k in seen if k[0] <= low]:
            del seen[key]
        if out:
            self.max_event_id = max(self.max_event_id, *out)
        return list(out.items())

    def notices(self, due: dict[int, bool]) -> list[tuple[Notice, dict[str, Any]]]:
        """The notices of the events due now (id → new?), with their state as of now, each with
        its summary as a JSON-ready dict. Summaries are most of a look's cost: only events whose
        turn it is are read, and they are serialized without models (the same bytes)."""
        if not due:
            return []
        db = self._conn()
        at = utcnow()
        out = []
        with queries.snapshot(db):
            summaries = queries.event_summary_dicts(db, list(due), self.catalogue)
        for summary in summaries:
            if summary["status"] == EventStatus.CLOSED.value:
                change = "closed"
            elif due.get(summary["event_id"]):
                change = "created"
            else:
                change = "updated"
            out.append((Notice.of_summary(change, summary, at), summary))
        return out

    def _alerts(self, db: Reader) -> list[_Item]:
        out: list[_Item] = []
        types = self.catalogue.types
        after = self.alert_rowid
        seen = self._alerts_seen
        if self.pg:
            after = max(0, after - _PG_ALERT_MARGIN)
            for old in [i for i in seen if i <= after]:
                del seen[old]
        for r in queries.alerts_after(db, after, _POLL_ALERTS):
            rowid = int(r[0])
            if self.pg:
                if rowid in seen:
                    continue
                seen[rowid] = None
            self.alert_rowid = max(self.alert_rowid, rowid)
            wt = types.get(r[6])
            department = wt.department if wt else None
            body = {
                "kind": "alert",
                "alert_id": r[1],
                "device_id": r[2],
                "seq": r[3],
                "outcome": r[4],
                "event_id": r[5],
                "type": r[6],
                "severity": r[7],
                "grid_code": r[8],
                "department": department,
                "lat": r[9],
                "lon": r[10],
                "at": iso(r[11]),
            }
            out.append(
                _Item(
                    "alert",
                    r[8],
                    department,
                    r[6],
                    Severity(r[7]),
                    orjson.dumps(body).decode(),
                    ("alert", r[1]),
                )
            )
        for r in queries.out_of_area_after(db, self.out_of_area_at, _POLL_ALERTS):
            self.out_of_area_at = float(r[5])
            body = {
                "kind": "alert",
                "alert_id": r[0],
                "device_id": r[1],
                "outcome": Outcome.OUT_OF_AREA.value,
                "event_id": None,
                "type": r[2],
                "lat": r[3],
                "lon": r[4],
                "at": iso(r[5]),
            }
            out.append(
                _Item("alert", None, None, r[2], None, orjson.dumps(body).decode(), ("alert", r[0]))
            )
        return out


class StreamHub:
    """Fans pool changes out to WebSocket / SSE clients, paced and coalesced per event."""

    def __init__(
        self,
        catalogue: Catalogue,
        pool_path: Path | str,
        *,
        queue_size: int = 4096,
        update_interval: float = 1.0,
        stall_s: float = 10.0,
        poll_s: float = 0.25,
    ) -> None:
        self.catalogue = catalogue
        self.queue_size = queue_size
        self.update_interval = update_interval
        self.stall_s = stall_s
        self.poll_s = poll_s
        self._feed = _PoolFeed(pool_path if is_pool_url(pool_path) else Path(pool_path), catalogue)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._clients: set[StreamClient] = set()
        self._ids = itertools.count(1)
        # per event: when its last update went out, and the update waiting for its turn
        self._sent_at: dict[int, float] = {}
        self._held: dict[int, None] = {}  # (ordered set) changed, waiting for their turn
        # operators' steps already offered by publish_notice (the state, when): the poll does
        # not repeat them
        self._offered: dict[int, tuple[str, float]] = {}
        self.dropped_clients = 0
        self.poll_errors = 0
        self._last_tick = 0.0
        self.on_clients: Any = None  # called with the client count whenever it changes

    # -- binding to the server's loop ------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the web server's event loop and start reading the pool (its startup)."""
        self._loop = loop
        self._feed.start()
        self._task = loop.create_task(self._run(), name="cwg-stream-feed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.unbind()

    def unbind(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._loop = None
        for client in list(self._clients):
            client.closed.set()
        self._clients.clear()
        self._feed.close()
        self._counted()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def _counted(self) -> None:
        if self.on_clients is not None:
            self.on_clients(len(self._clients))

    # -- feeding ---------------------------------------------------------------------------

    async def _wait(self) -> None:
        """Until the next look: a tick on SQLite; on PostgreSQL until a commit is announced
        (at most a tick), after a fifth of a tick that keeps a busy pool from waking the
        feed for every commit."""
        if not self._feed.listens or not self._clients:
            await asyncio.sleep(self.poll_s)
            return
        gap = self.poll_s / 5
        await asyncio.sleep(gap)
        await asyncio.to_thread(self._feed.wait, self.poll_s - gap)

    async def _run(self) -> None:
        while True:
            await self._wait()
            if not self._clients:
                # Nobody listens: keep the place without reading what changed.
                try:
                    await asyncio.to_thread(self._feed.start)
                except read_errors():
                    self.poll_errors += 1
                self._sent_at.clear()
                self._held.clear()
                continue
            try:
                await self._step()
            except Exception:
                # The feed must outlive any one bad look: count it and look again.
                self.poll_errors += 1
                log.exception("live stream: a look at the pool failed")
            self._drop_stalled(time.monotonic())

    async def _step(self) -> None:
        """One look at the pool: pace the event changes, offer them and any raw alerts."""
        want_alerts = any("alert" in c.filter.kinds for c in self._clients)
        changed, alerts = await asyncio.to_thread(self._feed.look, want_alerts)
        now = time.monotonic()
        # A step's commit reaches the poll within a look or two. An offer older than that was
        # already read (the poll can see the commit before the route offers it): kept, it
        # would hide the event's next change that happens to leave the same state.
        for eid in [e for e, (_, at) in self._offered.items() if now - at > OFFER_HORIZON_S]:
            del self._offered[eid]
        # A new event goes at once, a change once its interval has passed; the others wait,
        # unread, for their turn, and then go with their latest state. An operator's step
        # offered here already is read to tell whether anything else changed.
        due: dict[int, bool] = {}
        for eid, new in changed:
            if (
                new
                or eid in self._offered
                or now - self._sent_at.get(eid, 0.0) >= self.update_interval
            ):
                due[eid] = new
            else:
                self._held[eid] = None
        for eid in [
            e for e in self._held if now - self._sent_at.get(e, 0.0) >= self.update_interval
        ]:
            due.setdefault(eid, False)
        for eid in due:
            self._held.pop(eid, None)  # read now (one that is gone from the pool is let go)
        notices = await asyncio.to_thread(self._feed.notices, due) if due else []
        # Sent as of now, after the read (which a busy process can take long over): the next
        # turn is counted from when this state actually goes out.
        now = time.monotonic()
        items: list[_Item] = []
        for notice, summary in notices:
            eid = notice.event_id
            offered = self._offered.pop(eid, None)
            if offered is not None:
                # (rare: an operator's step) compared as the model, as it was offered
                if offered[0] == EventSummary.model_validate(summary).model_dump_json():
                    continue  # an operator's step, already offered as it happened
                if (
                    notice.change == "updated"
                    and now - self._sent_at.get(eid, 0.0) < self.update_interval
                ):
                    self._held[eid] = None
                    continue
            self._sent_at[eid] = now
            items.append(self._event_item(notice))
        if len(self._sent_at) > 100_000:  # an entry older than the interval means nothing
            horizon = now - self.update_interval
            self._sent_at = {
                e: t for e, t in self._sent_at.items() if t > horizon or e in self._held
            }
        if len(self._offered) > 10_000:
            self._offered.clear()
        items.extend(alerts)
        self._fan_out(items)

    def publish_notice(self, notice: EventNoticeV1) -> None:
        """An operator's lifecycle step, offered at once. Any thread (routes run on a pool)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens
            loop.call_soon_threadsafe(self._offer_notice, notice)

    def _offer_notice(self, notice: EventNoticeV1) -> None:
        eid = notice.event.event_id
        self._offered[eid] = (notice.event.model_dump_json(), time.monotonic())
        self._sent_at[eid] = time.monotonic()
        self._held.pop(eid, None)
        self._fan_out([self._event_item(Notice.of(notice))])

    @staticmethod
    def _event_item(notice: Notice) -> _Item:
        # the published notice, with "kind" appended as the stream's last member
        text = notice.payload[:-1] + b',"kind":"event"}'
        key: Hashable = ("event", notice.event_id, notice.change)
        return _Item(
            "event",
            notice.grid_code,
            notice.department,
            notice.type,
            notice.severity,
            text.decode(),
            key,
        )

    def _fan_out(self, items: Sequence[_Item]) -> None:
        # Clients of one account with one filter want the same items: decide once for them
        # (a hundred operators of a few communities are a few such groups).
        chosen: dict[tuple[str, StreamFilter], list[_Item]] = {}
        for client in list(self._clients):
            if client.dropped:
                continue
            group = (client.operator.username, client.filter)
            wanted = chosen.get(group)
            if wanted is None:
                wanted = chosen[group] = [item for item in items if client.wants(item)]
            offer = client.queue.offer
            for item in wanted:
                if not offer(item.key, item.text):
                    self._drop(client, f"more than {self.queue_size} distinct messages waiting")
                    break

    def _drop_stalled(self, now: float) -> None:
        # A client's stall is counted in ticks of this loop, each worth at most two poll
        # intervals: when this process itself was held up (busy, or short of CPU), that time
        # is not laid at the client's door.
        tick = min(now - self._last_tick, 2 * self.poll_s) if self._last_tick else 0.0
        self._last_tick = now
        for client in list(self._clients):
            q = client.queue
            if q.last_taken != client.seen_taken or q.empty():
                client.seen_taken = q.last_taken
                client.stalled_s = 0.0
                continue
            client.stalled_s += tick
            if client.dropped:
                # told to go but stuck in a send to a client that reads nothing: end it
                if client.stalled_s > self.stall_s + 5 and client.task is not None:
                    client.task.cancel()
                continue
            if client.stalled_s > self.stall_s:
                self._drop(client, f"read nothing for {self.stall_s:g} s")

    def _drop(self, client: StreamClient, why: str) -> None:
        client.dropped = True
        self.dropped_clients += 1
        # Emptying the queue makes room for the one message that explains the close.
        client.queue.clear()
        client.queue.put_nowait(DROPPED_MESSAGE)
        log.warning("stream client %s (%s) dropped: %s", client.id, client.operator.username, why)

    # -- clients (on the loop) -------------------------------------------------------------

    def connect(self, operator: Operator, stream_filter: StreamFilter) -> StreamClient:
        client = StreamClient(
            operator, stream_filter, ClientQueue(self.queue_size), next(self._ids)
        )
        client.task = asyncio.current_task()
        self._clients.add(client)
        self._counted()
        log.info(
            "stream client %s connected operator=%s grid=%s",
            client.id,
            operator.username,
            stream_filter.grid or "*",
        )
        return client

    def disconnect(self, client: StreamClient) -> None:
        if client in self._clients:
            self._clients.discard(client)
            self._counted()
        client.closed.set()
        log.info(
            "stream client %s disconnected after %s messages in %s frames",
            client.id,
            client.sent,
            client.frames,
        )
