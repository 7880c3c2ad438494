"""MQTT ingest: at-least-once in, exactly-once out.

The transport (``aggregator/transport.py``: paho in a child process by default) only receives
and queues messages. One worker thread takes them in micro-batches, assembles and commits each
batch in one pool transaction, and only then acknowledges every message of it
(``manual_ack``). A crash before the commit leaves the messages unacknowledged in our
persistent session, so the broker sends them again; the pool's alert_id key makes the
redelivery a no-op. What waits is bounded by the Receive Maximum: the I/O loop stops reading
the broker while that many messages are unacknowledged (Mosquitto 2.0.11 would send past it).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aggregator.config import BatchSettings, MqttSettings, NoticeSettings
from aggregator.metrics import Metrics
from aggregator.pipeline import Assembled, Inbound, Pipeline, Prevalidator
from aggregator.pool import AlertResult, BatchResult, EventPool, Notice, event_summaries
from aggregator.transport import Outgoing, Transport, make_transport
from contract import (
    EventNoticeV1,
    EventStatus,
    Outcome,
    TelemetryV1,
    Topics,
    feedback_batch_json,
    feedback_item_json,
    feedback_json,
    utcnow,
)
from contract.messages import FEEDBACK_BATCH_MAX_ITEMS

log = logging.getLogger(__name__)


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
        pool: EventPool,
        metrics: Metrics,
        sinks: Sequence[BatchSink] = (),
        *,
        notices: NoticeSettings | None = None,
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
        self._stop = threading.Event()
        self._batches = 0
        self._messages = 0
        self._worker: threading.Thread | None = None
        self._feedback_topics: dict[str, str] = {}
        # Coalescing of `updated` notices (worker thread only): when each event's last notice
        # went out (monotonic), and the events whose update waits for its turn, in order.
        self._notice_interval = (notices or NoticeSettings()).update_interval_ms / 1000
        self._notice_sent: dict[int, float] = {}
        self._notice_held: dict[int, None] = {}
        self._notice_pruned = time.monotonic()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._transport.start()
        self._worker = threading.Thread(target=self._run, name="cwg-ingest", daemon=True)
        self._worker.start()

    def wait_connected(self, timeout: float) -> bool:
        ok = self._transport.wait_connected(timeout)
        self.metrics.connected.set(1 if ok else 0)
        return ok

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, commit and acknowledge it, then disconnect."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
        self._transport.stop()

    def publish_notice(self, notice: EventNoticeV1) -> None:
        """Tell integrators of an event change made elsewhere (an operator's lifecycle step)."""
        self._transport.publish([(self.topics.events, notice.to_json(), 1)])

    def stats(self) -> IngestStats:
        connected = self._transport.connected()
        self.metrics.connected.set(1 if connected else 0)
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

    def _process_with_retry(self, batch: list[Inbound]) -> None:
        delay = 0.1
        while True:
            try:
                self._process(batch)
                return
            except Exception:
                # The pool could not commit (disk full, locked beyond busy_timeout…). Nothing
                # was acknowledged, so nothing is lost: retry with a growing, jittered delay.
                log.exception("batch of %s failed; retrying in %.1f s", len(batch), delay)
                if self._stop.wait(delay):
                    return  # unacknowledged: the broker redelivers after our restart
                delay = min(delay * 2, 10.0) * random.uniform(0.8, 1.2)

    def _process(self, batch: list[Inbound]) -> None:
        started = time.perf_counter()
        assembled = self.pipeline.assemble(batch)
        result = self.pool.commit_batch(assembled.batch)
        # Committed: now, and only now, the broker may forget these messages.
        self._transport.ack(batch)
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
        except Exception:
            # The pool could not be read (I/O error…): they stay held, tried again in an interval.
            log.exception(
                "held event notices could not be read; retrying in %.1f s", self._notice_interval
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
        # path. Outcomes are gathered per device: pooled alerts in the order they were
        # handled, then those out of area, then rejections.
        pooled: dict[str, list[AlertResult]] = {}
        for r in result.alerts:
            pooled.setdefault(r.device_id, []).append(r)
        others: dict[str, list[dict[str, Any]]] = {}
        for o in result.out_of_area:
            alert = assembled.alerts.get(o.alert_id)
            others.setdefault(o.device_id, []).append(
                {
                    "alert_id": o.alert_id,
                    "seq": alert.seq if alert else None,
                    "outcome": Outcome.OUT_OF_AREA,
                    "detail": f"({o.lat:.6f}, {o.lon:.6f}) lies outside every grid of this "
                    "community pool; no event was registered (Longgang 7.1): check the "
                    "device's configured position",
                }
            )
        for d in result.dead_letters:
            if d.device_id is not None:
                others.setdefault(d.device_id, []).append(
                    {
                        "alert_id": d.alert_id,
                        "outcome": Outcome.REJECTED,
                        "reason": d.reason,
                        "detail": d.detail,
                        "dead_letter_id": d.id,
                    }
                )
        now = utcnow()
        qos = self.settings.feedback_qos
        out: list[Outgoing] = []
        for device_id in dict.fromkeys([*pooled, *others]):
            topic = self._feedback_topic(device_id)
            alerts = pooled.get(device_id, [])
            rest = others.get(device_id, [])
            if len(alerts) + len(rest) > 1 and self.settings.feedback_batching:
                items = [
                    feedback_item_json(
                        alert_id=r.alert_id, seq=r.seq, outcome=r.outcome, event_id=r.event_id
                    )
                    for r in alerts
                ]
                items += [feedback_item_json(**item) for item in rest]
                for chunk in _chunks(items):
                    out.append((topic, feedback_batch_json(device_id, chunk, now), qos))
                continue
            for r in alerts:
                payload = feedback_json(
                    device_id=device_id,
                    alert_id=r.alert_id,
                    seq=r.seq,
                    outcome=r.outcome,
                    event_id=r.event_id,
                    at=now,
                )
                out.append((topic, payload, qos))
            out += [
                (topic, feedback_json(device_id=device_id, at=now, **item), qos) for item in rest
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
