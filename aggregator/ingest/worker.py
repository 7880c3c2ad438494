"""MQTT ingest: at-least-once in, exactly-once out.

The transport (``aggregator/ingest/transport.py``: paho in a child process by default) only receives
and queues messages. One worker thread takes them in micro-batches, assembles and commits each
batch in one pool transaction, and only then acknowledges every message of it
(``manual_ack``). A crash before the commit leaves the messages unacknowledged in our
persistent session, so the broker sends them again; the pool's alert_id key makes the
redelivery a no-op. What waits is bounded by the Receive Maximum: the I/O loop stops reading
the broker while that many messages are unacknowledged (Mosquitto 2.0.11 would send past it).

No message can stop ingest. An unexpected exception while a batch is assembled or committed is
its messages' fault until shown otherwise: the batch is split in halves, and halves again, until
the message that fails alone is found; it becomes a dead letter (``internal_error``) and its
device is told, while every other message commits. Only faults of the pool itself (disk full,
database locked, read-only or unreachable: ``is_pool_fault``) are retried, unacknowledged.
"""

from __future__ import annotations

import errno
import logging
import random
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aggregator.config import BatchSettings, DeadLetterSettings, MqttSettings, NoticeSettings
from aggregator.ingest.assemble import (
    Assembled,
    Inbound,
    Pipeline,
    Prevalidator,
    internal_rejection,
)
from aggregator.ingest.decode import best_effort_ids
from aggregator.ingest.metrics import Metrics
from aggregator.ingest.transport import Outgoing, Transport, make_transport
from aggregator.pool.model import BatchResult, DeadLetterIn, Notice
from aggregator.pool.port import IngestPool
from aggregator.pool.queries import event_summaries
from aggregator.pool.reader import read_errors
from contract import (
    EventNoticeV1,
    EventStatus,
    Outcome,
    TelemetryV1,
    TopicError,
    Topics,
    feedback_batch_json,
    feedback_item_json,
    feedback_json,
    utcnow,
)
from contract.messages import FEEDBACK_BATCH_MAX_ITEMS

log = logging.getLogger(__name__)

# SQLite's primary result codes that mean the pool, not a message, is at fault: retried.
_POOL_FAULT_CODES = frozenset(
    {
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        8,  # SQLITE_READONLY
        10,  # SQLITE_IOERR
        11,  # SQLITE_CORRUPT
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
        26,  # SQLITE_NOTADB
    }
)
# Storage errors of the snapshot store (files beside the pool): the disk, not the message.
_STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)


def is_pool_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the pool's storage (retry, unacknowledged) rather than of
    the messages being committed (bisect them). Decided by the driver's error codes; on
    PostgreSQL, a lost connection, a server shutting down or restarting, a full disk
    (``postgres.is_pg_pool_fault``)."""
    # Only a process that opened the PostgreSQL adapter can see its errors: looked up rather
    # than imported, so the SQLite default never loads psycopg.
    pg = sys.modules.get("aggregator.pool.postgres")
    if pg is not None and pg.is_pg_pool_fault(exc):
        return True
    if isinstance(exc, sqlite3.Error) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.InterfaceError | sqlite3.DataError
    ):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            # no code: a closed connection or the like, never the message's doing
            return isinstance(exc, sqlite3.OperationalError | sqlite3.ProgrammingError)
        return code & 0xFF in _POOL_FAULT_CODES
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


class BatchSink(Protocol):
    """Something that wants to see every committed batch (live stream, time series, webhooks).
    Called on the ingest worker: it must not block; queue and return. Coalesced event updates
    (``notices.update_interval_ms``) arrive later in a call of their own, with an empty result
    and only the notices."""

    def on_batch(
        self,
        result: BatchResult,
        notices: Sequence[Notice],
        telemetry: Sequence[TelemetryV1],
        assembled: Assembled,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class IngestStats:
    batches: int
    messages: int
    connected: bool
    queue_depth: int


class MqttIngest:
    def __init__(
        self,
        mqtt_settings: MqttSettings,
        batch_settings: BatchSettings,
        pipeline: Pipeline,
        pool: IngestPool,
        metrics: Metrics,
        sinks: Sequence[BatchSink] = (),
        *,
        notices: NoticeSettings | None = None,
        dead_letters: DeadLetterSettings | None = None,
    ) -> None:
        self.settings = mqtt_settings
        self.batching = batch_settings
        self.pipeline = pipeline
        self.pool = pool
        self.metrics = metrics
        self.sinks = list(sinks)
        self.topics = Topics(mqtt_settings.topic_prefix)
        self._transport: Transport = make_transport(
            mqtt_settings,
            batch_settings,
            Prevalidator(pipeline.topics, pipeline.catalogue, pipeline.limits),
        )
        # read at each scrape: the gauge follows the session however long the service runs
        self.metrics.connected.set_function(lambda: float(self._transport.connected()))
        self._stop = threading.Event()
        self._batches = 0
        self._messages = 0
        self._worker: threading.Thread | None = None
        self._feedback_topics: dict[str, str] = {}
        # messages found (by bisecting) to fail alone, with their exception: dead-lettered next
        self._suspects: dict[int, BaseException] = {}  # id(message) →
        # Coalescing of `updated` notices (worker thread only): when each event's last notice
        # went out (monotonic), and the events whose update waits for its turn, in order.
        self._notice_interval = (notices or NoticeSettings()).update_interval_ms / 1000
        self._notice_sent: dict[int, float] = {}
        self._notice_held: dict[int, None] = {}
        self._notice_pruned = time.monotonic()
        # Retention of dead letters and out-of-area rows, enforced between batches.
        self._retention = dead_letters or DeadLetterSettings()
        self._next_prune = time.monotonic()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._transport.start()
        self._worker = threading.Thread(target=self._run, name="cwg-ingest", daemon=True)
        self._worker.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._transport.wait_connected(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, commit and acknowledge it, then disconnect."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
        self._transport.stop()

    def publish_notice(self, notice: EventNoticeV1) -> None:
        """Tell integrators of an event change made elsewhere (an operator's lifecycle step)."""
        self._transport.publish([(self.topics.events, notice.to_json(), 1)])

    def publish_events_topic(self, payload: bytes) -> None:
        """Another notice on the events topic (QoS 1), already serialized: the supervision
        timer's ``case/v1`` items."""
        self._transport.publish([(self.topics.events, payload, 1)])

    def stats(self) -> IngestStats:
        connected = self._transport.connected()
        return IngestStats(self._batches, self._messages, connected, self._transport.depth())

    # -- the worker ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            # held notices are due within one interval: look in often while there are some
            batch = self._transport.take(0.05 if self._notice_held else 0.2)
            if batch:
                self._process_with_retry(batch)
            elif self._stop.is_set():
                self._release_held_notices(everything=True)
                return
            self._release_held_notices()
            self._prune()

    def _process_with_retry(self, batch: list[Inbound]) -> None:
        """Commit ``batch``, bisecting it around any message that makes assembly or the commit
        fail; retry, unacknowledged, while the pool itself is at fault."""
        parts = [batch]  # what is left to commit, in arrival order
        delay = 0.1
        while parts:
            part = parts[0]
            try:
                if len(part) == 1 and id(part[0]) in self._suspects:
                    self._dead_letter(part[0], self._suspects[id(part[0])])
                else:
                    self._process(part)
            except Exception as exc:
                if is_pool_fault(exc):
                    # Nothing of this part was acknowledged, so nothing is lost: retry it with
                    # a growing, jittered delay until the pool can commit again.
                    log.error(
                        "the pool could not commit %s messages (%s: %s); retrying in %.1f s",
                        len(part),
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    if self._stop.wait(delay):
                        return  # unacknowledged: the broker redelivers after our restart
                    delay = min(delay * 2, 10.0) * random.uniform(0.8, 1.2)
                    continue
                if len(part) == 1 and id(part[0]) in self._suspects:
                    # Not even its dead letter commits: acknowledge it, or it blocks the rest.
                    log.critical(
                        "a message on %s could not be kept as a dead letter; it is dropped",
                        part[0].topic,
                        exc_info=True,
                    )
                    self._transport.ack(part)
                elif len(part) == 1:
                    log.error(
                        "a message on %s made the batch fail; it becomes a dead letter",
                        part[0].topic,
                        exc_info=True,
                    )
                    self._suspects[id(part[0])] = exc
                    continue  # dead-lettered on the next turn (a pool fault retries that too)
                else:
                    log.warning(
                        "a batch of %s failed (%s: %s); bisecting it to find the message",
                        len(part),
                        type(exc).__name__,
                        str(exc)[:200],
                    )
                    half = len(part) // 2
                    parts[0:1] = [part[:half], part[half:]]
                    continue
            parts.pop(0)
            if len(part) == 1:
                self._suspects.pop(id(part[0]), None)
            delay = 0.1

    def _dead_letter(self, msg: Inbound, exc: BaseException) -> None:
        """Keep a message that made its batch fail as an ``internal_error`` dead letter, tell
        its device, and acknowledge it."""
        try:
            device_id: str | None = self.topics.parse(msg.topic).device_id
        except TopicError:
            device_id = None
        # the ids as the I/O loop read them, or read leniently here, for the device's feedback
        if msg.pre and msg.pre[0] == "ok":
            ids = (msg.pre[1], msg.pre[3])
        elif msg.pre and msg.pre[0] == "rejected":
            ids = (msg.pre[3], msg.pre[4])
        else:
            ids = best_effort_ids(msg.payload)
        rej = internal_rejection(exc, ids)
        assembled = Assembled()
        if device_id is not None:
            assembled.batch.seen[device_id] = msg.received_at
        assembled.batch.dead_letters.append(
            DeadLetterIn(
                msg.received_at,
                msg.topic,
                device_id,
                rej.alert_id,
                rej.reason,
                rej.detail,
                msg.payload,
                rej.seq,
            )
        )
        assembled.dead_letter_pos.append(0)
        self._process([msg], assembled)

    def _prune(self) -> None:
        """Delete expired dead letters and out-of-area rows, a bounded step at a time."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + self._retention.prune_every_s
        before = time.time() - self._retention.retention_days * 86400
        try:
            removed = self.pool.prune(before)
        except Exception as exc:
            # The pool is at fault (locked, unreachable…) or refused the delete: retention waits
            # for the next turn, ingest goes on.
            log.warning(
                "expired dead letters could not be deleted: %s: %s",
                type(exc).__name__,
                exc,
                exc_info=not (is_pool_fault(exc) or isinstance(exc, read_errors())),
            )
            return
        if removed:
            log.info("retention: deleted %s dead letters and out-of-area rows", removed)
            if removed >= 10_000:
                self._next_prune = now  # more to go: another bounded step after the next batch

    def _process(self, batch: list[Inbound], assembled: Assembled | None = None) -> None:
        started = time.perf_counter()
        if assembled is None:
            assembled = self.pipeline.assemble(batch)
        result = self.pool.commit_batch(assembled.batch)
        # Committed: now, and only now, the broker may forget these messages.
        self._transport.ack(batch)
        try:
            self._after_commit(batch, assembled, result, started)
        except Exception:
            # Committed and acknowledged: retrying would pool it twice. Logged loudly instead.
            log.exception("feedback or notices of a committed batch failed")

    def _after_commit(
        self, batch: list[Inbound], assembled: Assembled, result: BatchResult, started: float
    ) -> None:
        elapsed = time.perf_counter() - started
        self._batches += 1
        self._messages += len(batch)
        self._count(batch, result)
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.queue_depth.set(self._transport.depth())
        notices = self._notices(result)
        outgoing = self._feedback(result, assembled)
        outgoing += [(self.topics.events, notice.payload, 1) for notice in notices]
        self._transport.publish(outgoing)
        for sink in self.sinks:
            try:
                sink.on_batch(result, notices, assembled.telemetry, assembled)
            except Exception:
                log.exception("sink %s failed on a batch; ingest goes on", type(sink).__name__)
        log.debug("batch size=%s elapsed_ms=%.1f", len(batch), elapsed * 1000)

    def _count(self, batch: list[Inbound], result: BatchResult) -> None:
        m = self.metrics
        # tallied per batch: one labelled increment per channel and outcome, not per message
        for channel, n in Counter(msg.topic.rsplit("/", 1)[-1] for msg in batch).items():
            m.messages.labels(channel).inc(n)
        for outcome, n in Counter(r.outcome.value for r in result.alerts).items():
            m.alerts.labels(outcome).inc(n)
        if result.out_of_area:
            m.alerts.labels("out_of_area").inc(len(result.out_of_area))
        for d in result.dead_letters:
            m.rejections.labels(d.reason.value).inc()
        m.events_created.inc(len(result.created))

    def _notices(self, result: BatchResult) -> list[Notice]:
        """Notices for the events this batch created and those it updated whose last notice
        is at least ``notices.update_interval_ms`` old; the other updates are held and go out
        later as one notice with the event's state then (``_release_held_notices``)."""
        now = time.monotonic()
        due: list[int] = []
        for event_id in sorted(result.created | result.updated):
            last = self._notice_sent.get(event_id)
            if event_id in result.created or last is None or now - last >= self._notice_interval:
                due.append(event_id)
                self._notice_sent[event_id] = now
                self._notice_held.pop(event_id, None)
            else:
                if event_id in self._notice_held:
                    self.metrics.notices_coalesced.inc()
                self._notice_held[event_id] = None
        # Serialized without models (Notice.of_summary), from the state committed.
        at = utcnow()
        out = []
        for event_id in due:
            change = "created" if event_id in result.created else "updated"
            out.append(Notice.of_summary(change, result.summary(event_id), at))
            self.metrics.notices.labels(change).inc()
        return out

    def _release_held_notices(self, *, everything: bool = False) -> None:
        """Publish the held updates whose turn has come (all of them when stopping), each with
        the event as committed now, whoever changed it last. An event closed meanwhile gets
        none: its `closed` notice already told subscribers."""
        now = time.monotonic()
        if now - self._notice_pruned > max(self._notice_interval, 1.0):
            # an entry older than one interval means the same as no entry
            horizon = now - self._notice_interval
            self._notice_sent = {
                i: t for i, t in self._notice_sent.items() if t > horizon or i in self._notice_held
            }
            self._notice_pruned = now
        if not self._notice_held:
            return
        ready = [
            i
            for i in self._notice_held
            if everything or now - self._notice_sent[i] >= self._notice_interval
        ]
        if not ready:
            return
        for event_id in ready:
            self._notice_sent[event_id] = now
        try:
            summaries = event_summaries(self.pool.reader, ready, self.pipeline.catalogue)
        except Exception as exc:
            # The pool could not be read: they stay held, tried again in an interval. A pool
            # fault (locked, unreachable, a PostgreSQL restart) is expected: no traceback.
            if not is_pool_fault(exc):
                log.exception(
                    "held event notices could not be read; retrying in %.1f s",
                    self._notice_interval,
                )
                return
            log.warning(
                "held event notices could not be read (%s: %s); retrying in %.1f s",
                type(exc).__name__,
                exc,
                self._notice_interval,
            )
            return
        for event_id in ready:
            del self._notice_held[event_id]
        at = utcnow()
        notices = [
            Notice.of(EventNoticeV1(change="updated", event=summary, at=at))
            for summary in summaries
            if summary.status is not EventStatus.CLOSED
        ]
        if not notices:
            return
        self.metrics.notices.labels("updated").inc(len(notices))
        self._transport.publish([(self.topics.events, n.payload, 1) for n in notices])
        for sink in self.sinks:
            try:
                sink.on_batch(BatchResult(), notices, (), Assembled())
            except Exception:
                log.exception("sink %s failed on held notices; ingest goes on", type(sink).__name__)

    def _feedback(self, result: BatchResult, assembled: Assembled) -> list[Outgoing]:
        # Serialized without models (contract.feedback_json and friends): every value comes
        # from a validated message or from the pool, and this runs once per alert on the hot
        # path. Outcomes are gathered per device in the order their messages arrived.
        entries: list[tuple[int, str, dict[str, Any]]] = []  # (arrival, device, item fields)
        alert_pos = _positions(assembled.alert_pos, len(result.alerts), 0)
        for pos, r in zip(alert_pos, result.alerts, strict=True):
            entries.append(
                (
                    pos,
                    r.device_id,
                    {
                        "alert_id": r.alert_id,
                        "seq": r.seq,
                        "outcome": r.outcome,
                        "event_id": r.event_id,
                    },
                )
            )
        ooa_pos = _positions(assembled.out_of_area_pos, len(result.out_of_area), len(entries))
        for pos, o in zip(ooa_pos, result.out_of_area, strict=True):
            alert = assembled.alerts.get(o.alert_id)
            entries.append(
                (
                    pos,
                    o.device_id,
                    {
                        "alert_id": o.alert_id,
                        "seq": alert.seq if alert else None,
                        "outcome": Outcome.OUT_OF_AREA,
                        "detail": f"({o.lat:.6f}, {o.lon:.6f}) lies outside every grid of this "
                        "community pool; no event was registered (Longgang 7.1): check the "
                        "device's configured position",
                    },
                )
            )
        dl_pos = _positions(assembled.dead_letter_pos, len(result.dead_letters), len(entries))
        for pos, d in zip(dl_pos, result.dead_letters, strict=True):
            if d.device_id is not None:
                entries.append(
                    (
                        pos,
                        d.device_id,
                        {
                            "alert_id": d.alert_id,
                            "seq": d.seq,
                            "outcome": Outcome.REJECTED,
                            "reason": d.reason,
                            "detail": d.detail,
                            "dead_letter_id": d.id,
                        },
                    )
                )
        kinds = bool(result.alerts) + bool(result.out_of_area) + bool(result.dead_letters)
        if kinds > 1:  # each kind is listed in arrival order already
            entries.sort(key=lambda e: e[0])
        by_device: dict[str, list[dict[str, Any]]] = {}
        for _, device_id, item in entries:
            by_device.setdefault(device_id, []).append(item)
        now = utcnow()
        qos = self.settings.feedback_qos
        out: list[Outgoing] = []
        for device_id, items in by_device.items():
            topic = self._feedback_topic(device_id)
            if len(items) > 1 and self.settings.feedback_batching:
                payloads = [feedback_item_json(**item) for item in items]
                for chunk in _chunks(payloads):
                    out.append((topic, feedback_batch_json(device_id, chunk, now), qos))
                continue
            out += [
                (topic, feedback_json(device_id=device_id, at=now, **item), qos) for item in items
            ]
        return out

    def _feedback_topic(self, device_id: str) -> str:
        topic = self._feedback_topics.get(device_id)
        if topic is None:
            if len(self._feedback_topics) > 100_000:  # bounded: a fleet has fewer devices
                self._feedback_topics.clear()
            topic = self._feedback_topics[device_id] = self.topics.feedback(device_id)
        return topic


# A feedback-batch/v1 message stays well inside the broker's message_size_limit: at most
# FEEDBACK_BATCH_MAX_ITEMS items and about this many bytes of them.
_FEEDBACK_BATCH_BYTES = 256 * 1024


def _positions(known: list[int], n: int, start: int) -> list[int]:
    """Arrival positions of ``n`` outcomes: those the pipeline recorded, or (for a batch
    assembled elsewhere) the order they are listed in, after ``start``."""
    return known if len(known) == n else list(range(start, start + n))


def _chunks(items: list[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = [[]]
    size = 0
    for item in items:
        if out[-1] and (
            len(out[-1]) >= FEEDBACK_BATCH_MAX_ITEMS or size + len(item) > _FEEDBACK_BATCH_BYTES
        ):
            out.append([])
            size = 0
        out[-1].append(item)
        size += len(item) + 1
    return out
