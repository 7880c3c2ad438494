"""MQTT ingest: at-least-once in, exactly-once out.

paho's network thread only queues messages. One worker thread takes them in micro-batches,
assembles and commits each batch in one pool transaction, and only then acknowledges every
message of it (``manual_ack``). A crash before the commit leaves the messages unacknowledged in
our persistent session, so the broker sends them again; the pool's alert_id key makes the
redelivery a no-op. The queue is bounded by Receive Maximum: the broker never sends more
unacknowledged alerts than we announced.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.config import BatchSettings, MqttSettings
from aggregator.metrics import Metrics
from aggregator.pipeline import Assembled, Inbound, Pipeline
from aggregator.pool import BatchResult, EventPool
from contract import (
    DeviceChannel,
    EventNoticeV1,
    FeedbackV1,
    Outcome,
    TelemetryV1,
    Topics,
    utcnow,
)

log = logging.getLogger(__name__)


class BatchSink(Protocol):
    """Something that wants to see every committed batch (live stream, time series, webhooks).
    Called on the ingest worker: it must not block; queue and return."""

    def on_batch(
        self,
        result: BatchResult,
        notices: Sequence[EventNoticeV1],
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
    ) -> None:
        self.settings = mqtt_settings
        self.batching = batch_settings
        self.pipeline = pipeline
        self.pool = pool
        self.metrics = metrics
        self.sinks = list(sinks)
        self.topics = Topics(mqtt_settings.topic_prefix)
        # Receive Maximum bounds what the broker sends; the extra room is for status/telemetry
        # (QoS 0 telemetry is not counted by Receive Maximum).
        self._queue: queue.Queue[Inbound] = queue.Queue(maxsize=mqtt_settings.receive_maximum * 2)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._generation = 0
        self._batches = 0
        self._messages = 0
        self._worker: threading.Thread | None = None
        self._client = self._make_client()

    # -- lifecycle -----------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.username_pw_set(s.username, s.secret())
        if s.tls_ca is not None:
            client.tls_set(ca_certs=str(s.tls_ca))
        # Outgoing feedback and notices: paho's default of 20 in flight would throttle them.
        client.max_inflight_messages_set(1000)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry_s
        props.ReceiveMaximum = s.receive_maximum
        self._worker = threading.Thread(target=self._run, name="cwg-ingest", daemon=True)
        self._worker.start()
        log.info(
            "connecting broker=%s:%s client_id=%s receive_maximum=%s",
            s.host,
            s.port,
            s.client_id,
            s.receive_maximum,
        )
        self._client.connect_async(
            s.host, s.port, keepalive=s.keepalive_s, clean_start=False, properties=props
        )
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, commit and acknowledge it, then disconnect."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    def publish_notice(self, notice: EventNoticeV1) -> None:
        """Tell integrators of an event change made elsewhere (an operator's lifecycle step)."""
        self._client.publish(self.topics.events, notice.to_json(), qos=1)

    def stats(self) -> IngestStats:
        return IngestStats(
            self._batches, self._messages, self._connected.is_set(), self._queue.qsize()
        )

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error(
                "broker refused connection reason=%s: check the aggregator's username/password "
                "and the broker's ACL",
                reason_code,
            )
            return
        self._generation += 1
        group = self.settings.share_group
        subs = [
            (self.topics.device_filter(DeviceChannel.ALERT, group), 1),
            (self.topics.device_filter(DeviceChannel.STATUS, group), 1),
            (self.topics.device_filter(DeviceChannel.TELEMETRY, group), 1),
        ]
        client.subscribe(subs)
        self._connected.set()
        self.metrics.connected.set(1)
        log.info(
            "connected session_present=%s generation=%s", flags.session_present, self._generation
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)
        if not self._stop.is_set():
            log.warning("disconnected from broker reason=%s; paho reconnects", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Blocks when the worker falls behind: that is the backpressure we want (TCP flow
        # control and Receive Maximum stop the broker), never an unbounded buffer.
        self._queue.put(
            Inbound(msg.topic, bytes(msg.payload), time.time(), msg.mid, msg.qos, self._generation)
        )

    # -- the worker ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch:
                self._process_with_retry(batch)
            elif self._stop.is_set():
                return

    def _take_batch(self) -> list[Inbound]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batching.linger_ms / 1000
        limit = self.batching.max_messages
        while len(batch) < limit:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

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
        generation = self._generation
        for msg in batch:
            if msg.qos > 0 and msg.generation == generation:
                self._client.ack(msg.mid, msg.qos)
        elapsed = time.perf_counter() - started
        self._batches += 1
        self._messages += len(batch)
        self._count(batch, result)
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.queue_depth.set(self._queue.qsize())
        notices = self._notices(result)
        self._feedback(result, assembled)
        for notice in notices:
            self._client.publish(self.topics.events, notice.to_json(), qos=1)
        for sink in self.sinks:
            try:
                sink.on_batch(result, notices, assembled.telemetry, assembled)
            except Exception:
                log.exception("sink %s failed on a batch; ingest goes on", type(sink).__name__)
        log.debug("batch size=%s elapsed_ms=%.1f", len(batch), elapsed * 1000)

    def _count(self, batch: list[Inbound], result: BatchResult) -> None:
        m = self.metrics
        for msg in batch:
            channel = msg.topic.rsplit("/", 1)[-1]
            m.messages.labels(channel).inc()
        for r in result.alerts:
            m.alerts.labels(r.outcome.value).inc()
        if result.out_of_area:
            m.alerts.labels("out_of_area").inc(len(result.out_of_area))
        for d in result.dead_letters:
            m.rejections.labels(d.reason.value).inc()
        m.events_created.inc(len(result.created))

    @staticmethod
    def _notices(result: BatchResult) -> list[EventNoticeV1]:
        now = utcnow()
        return [
            EventNoticeV1.model_construct(
                change="created" if event_id in result.created else "updated", event=summary, at=now
            )
            for event_id, summary in sorted(result.summaries.items())
        ]

    def _feedback(self, result: BatchResult, assembled: Assembled) -> None:
        # Built with model_construct: every value comes from a validated message or from the
        # pool, and this runs once per alert on the hot path (tests decode every kind strictly).
        now = utcnow()
        qos = self.settings.feedback_qos
        publish: Callable[..., Any] = self._client.publish
        topic = self.topics.feedback
        make = FeedbackV1.model_construct
        for r in result.alerts:
            fb = make(
                device_id=r.device_id,
                alert_id=r.alert_id,
                seq=r.seq,
                outcome=r.outcome,
                event_id=r.event_id,
                reason=None,
                detail=None,
                dead_letter_id=None,
                at=now,
            )
            publish(topic(r.device_id), fb.to_json(), qos=qos)
        for o in result.out_of_area:
            alert = assembled.alerts.get(o.alert_id)
            fb = make(
                device_id=o.device_id,
                alert_id=o.alert_id,
                seq=alert.seq if alert else None,
                outcome=Outcome.OUT_OF_AREA,
                event_id=None,
                reason=None,
                detail=f"({o.lat:.6f}, {o.lon:.6f}) lies outside every grid of this community "
                "pool; no event was registered (Longgang 7.1): check the device's configured "
                "position",
                dead_letter_id=None,
                at=now,
            )
            publish(topic(o.device_id), fb.to_json(), qos=qos)
        for d in result.dead_letters:
            if d.device_id is None:
                continue
            fb = make(
                device_id=d.device_id,
                alert_id=d.alert_id,
                seq=None,
                outcome=Outcome.REJECTED,
                event_id=None,
                reason=d.reason,
                detail=d.detail,
                dead_letter_id=d.id,
                at=now,
            )
            publish(topic(d.device_id), fb.to_json(), qos=qos)
