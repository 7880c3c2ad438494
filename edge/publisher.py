"""MQTT publisher: drains the outbox to the broker, keeps the device's status, reads feedback.

One thread owns the paho-mqtt client; other threads hand it work through thread-safe
structures (the outbox file, a latest-status slot, a bounded telemetry queue) and a wake event.

Each connection uses a fresh paho client. paho re-sends its in-memory unacknowledged messages
on reconnect; the outbox already replays every undelivered alert in seq order, so keeping
paho's copies would publish them twice. A fresh client makes the outbox the only source.

The connection loop is our own rather than paho's ``loop_start`` reconnects: paho's
``reconnect_delay_set`` doubles its delay without jitter, and a fleet that lost the same broker
would then come back in step. Here the n-th delay is random in [d/2, d], d = min·2ⁿ, capped.

Delivery is end to end. A PUBACK with a success reason code (MQTT 5 reason codes below 0x80;
0x10 "no matching subscribers" is a success) only moves an alert to "awaiting feedback": the
broker holds it, and a broker SIGKILLed before its autosave, or one that never hands it to an
aggregator, loses it. The alert is delivered when the aggregator's feedback for its
``alert_id`` arrives on the device's own feedback topic (``feedback/v1`` or
``feedback-batch/v1``, any outcome), to which every connection subscribes at QoS 1 in a
persistent session, so answers sent while the device was away still arrive. An alert with no
answer in time (``outbox.feedback_timeout_s``) is published again under the same ``alert_id``;
the aggregator's exact dedup answers ``duplicate``, which clears it too. A refused alert stays
unsent and is tried again on the next connection.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from contract import (
    AlertV1,
    DeviceState,
    FeedbackV1,
    Outcome,
    StatusV1,
    TelemetryV1,
    Topics,
    parse_feedback,
    utcnow,
)
from contract.topics import QOS, DeviceChannel
from edge.config import Broker
from edge.outbox import Outbox, PendingAlert

logger = logging.getLogger(__name__)

# The device's own session outlives short outages, so feedback sent meanwhile still arrives.
SESSION_EXPIRY_S = 3600
_DRAIN_BATCH = 200
_TELEMETRY_QUEUE = 100
# How often the outbox is asked for alerts whose feedback is overdue.
_DUE_CHECK_S = 0.25


class PublisherError(Exception):
    """The publisher cannot be set up (bad TLS files, bad settings)."""


class Backoff:
    """Growing, randomized reconnect delay: the n-th wait is uniform in [d/2, d], d = min·2ⁿ."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


@dataclass
class PublisherStats:
    connects: int = 0
    connect_failures: int = 0
    alerts_published: int = 0
    alerts_acked: int = 0
    alerts_refused: int = 0
    alerts_confirmed: int = 0  # cleared by the aggregator's feedback
    alerts_resent: int = 0  # published again after no feedback came in time
    subscribe_refused: int = 0
    feedback: Counter[str] = field(default_factory=Counter)
    feedback_invalid: int = 0
    telemetry_dropped: int = 0
    snapshots_stripped: int = 0


class Publisher:
    """Owns the MQTT connection of one device."""

    def __init__(
        self,
        *,
        device_id: str,
        kind: Literal["camera", "sensor", "hub"],
        broker: Broker,
        username: str | None,
        password: str | None,
        outbox: Outbox,
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = device_id
        self.kind: Literal["camera", "sensor", "hub"] = kind
        self.broker = broker
        self.topics = Topics(broker.topic_prefix)
        self._username = username
        self._password = password
        self.outbox = outbox
        self.stats = PublisherStats()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._status: StatusV1 | None = None
        self._status_dirty = False
        self._telemetry: deque[TelemetryV1] = deque()
        self._backoff = Backoff(broker.reconnect_min_s, broker.reconnect_max_s, rng)
        self._thread: threading.Thread | None = None
        self._tls: ssl.SSLContext | None = self._tls_context() if broker.tls else None
        # Per-connection state, touched only by the publisher thread.
        self._client: mqtt.Client | None = None
        self._inflight: dict[int, int] = {}
        self._sent_upto = -1
        self._acked: list[int] = []
        self._confirmed_ids: list[str] = []
        self._confirmed_seqs: list[int] = []
        self._next_due_check = 0.0
        self._session_up = False
        self._connack_refused = False
        self._backlog = False

    # ---- API for other threads -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say offline (retained), disconnect cleanly, and wait for the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """New rows in the outbox: drain them now rather than at the next tick."""
        self._wake.set()

    def submit_status(self, status: StatusV1) -> None:
        """Latest retained status; older unsent ones are superseded."""
        with self._lock:
            self._status = status
            self._status_dirty = True
        self._wake.set()

    def submit_telemetry(self, batch: TelemetryV1) -> None:
        """Queue a telemetry batch; the oldest is dropped when the queue is full."""
        with self._lock:
            if len(self._telemetry) >= _TELEMETRY_QUEUE:
                self._telemetry.popleft()
                self.stats.telemetry_dropped += 1
            self._telemetry.append(batch)
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # ---- the publisher thread ----------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.broker.tls
        assert tls is not None
        try:
            ctx = ssl.create_default_context(cafile=tls.ca_file)
            if tls.cert_file:
                ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise PublisherError(f"TLS setup failed: {exc}") from exc
        return ctx

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=mqtt.MQTTv5,
        )
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        will = StatusV1(
            device_id=self.device_id,
            state=DeviceState.OFFLINE,
            reason="last_will",
            kind=self.kind,
        )
        client.will_set(self.topics.status(self.device_id), will.to_json(), qos=1, retain=True)
        # paho queues QoS 1 messages beyond this internally and sends them as acks arrive.
        client.max_inflight_messages_set(self.broker.max_inflight + 16)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except Exception:
                # An unexpected error (say, the outbox disk is full) must not end publishing for
                # good: log it, back off, and start a fresh connection.
                logger.exception("mqtt: publisher session failed")
            if self._stop.is_set():
                break
            delay = self._backoff.next()
            logger.info("mqtt: reconnecting in %.2f s", delay)
            self._stop.wait(delay)

    def _session(self) -> None:
        client = self._new_client()
        self._client = client
        self._inflight = {}
        self._sent_upto = -1
        self._acked = []
        self._next_due_check = 0.0
        self._session_up = False
        self._connack_refused = False
        self._backlog = True  # a new connection replays whatever the outbox holds unsent
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            client.connect(
                self.broker.host,
                self.broker.port,
                keepalive=self.broker.keepalive_s,
                clean_start=False,
                properties=props,
            )
        except (OSError, ssl.SSLError) as exc:
            self.stats.connect_failures += 1
            logger.warning(
                "mqtt: cannot connect to %s:%s: %s", self.broker.host, self.broker.port, exc
            )
            return
        try:
            while True:
                rc = client.loop(timeout=0.05)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._connack_refused:
                    break
                if self._session_up:
                    self._flush_acks()
                    # Read the outbox only when told of new work, while a backlog remains, or
                    # when it is time to look for alerts whose feedback is overdue.
                    if (
                        self._wake.is_set()
                        or self._backlog
                        or time.monotonic() >= self._next_due_check
                    ):
                        self._wake.clear()
                        self._send_pending(client)
                if self._stop.is_set():
                    self._goodbye(client)
                    break
        finally:
            self._flush_acks()
            self.connected.clear()
            self._session_up = False
            if client.socket() is not None:
                # Leaving without the goodbye (refused CONNACK): close the socket ourselves.
                client.disconnect()
                client.loop(timeout=0.05)
            self._client = None

    def _goodbye(self, client: mqtt.Client) -> None:
        """Clean stop: give in-flight alerts a moment for their PUBACK, then say offline."""
        if not self._session_up:
            return
        deadline = time.monotonic() + 2.0
        while self._inflight and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            self._flush_acks()
        offline = StatusV1(
            device_id=self.device_id,
            state=DeviceState.OFFLINE,
            reason="shutdown",
            kind=self.kind,
            at=utcnow(),
        )
        info = client.publish(
            self.topics.status(self.device_id), offline.to_json(), qos=1, retain=True
        )
        deadline = time.monotonic() + 1.0
        while not info.is_published() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        client.disconnect()
        client.loop(timeout=0.05)

    def _send_pending(self, client: mqtt.Client) -> None:
        with self._lock:
            status = self._status if self._status_dirty else None
            self._status_dirty = False
            batches = list(self._telemetry)
            self._telemetry.clear()
        if status is not None:
            client.publish(self.topics.status(self.device_id), status.to_json(), qos=1, retain=True)
        for batch in batches:
            client.publish(
                self.topics.telemetry(self.device_id),
                batch.to_json(),
                qos=QOS[DeviceChannel.TELEMETRY],
            )
        room = self.broker.max_inflight - len(self._inflight)
        if room <= 0:
            self._backlog = True  # resume when PUBACKs make room
            return
        limit = min(room, _DRAIN_BATCH)
        rows = self.outbox.pending(after_seq=self._sent_upto, limit=limit)
        self._backlog = len(rows) == limit
        if not self._publish_rows(client, rows):
            return
        room -= len(rows)
        now = time.monotonic()
        if room > 0 and now >= self._next_due_check:
            self._next_due_check = now + _DUE_CHECK_S
            due = self.outbox.due(limit=min(room, _DRAIN_BATCH))
            if due:
                logger.info(
                    "no feedback in time for %s alerts (seq %s..%s): sending them again",
                    len(due),
                    due[0].seq,
                    due[-1].seq,
                )
                # Unsent again before the publish: a connection lost before the PUBACK then
                # replays them like any other unsent alert.
                self.outbox.mark_resending([r.seq for r in due])
                self.stats.alerts_resent += len(due)
                self._publish_rows(client, due, advance=False)

    def _publish_rows(
        self, client: mqtt.Client, rows: list[PendingAlert], *, advance: bool = True
    ) -> bool:
        """Publish alerts in the given order; False when the connection is gone."""
        topic = self.topics.alert(self.device_id)
        for row in rows:
            payload = self._fit(row)
            info = client.publish(topic, payload, qos=QOS[DeviceChannel.ALERT])
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # Connection lost mid-drain: the next connection replays from the outbox.
                logger.info("mqtt: publish of seq %s not sent: %s", row.seq, info.rc)
                return False
            self._inflight[info.mid] = row.seq
            if advance:
                self._sent_upto = row.seq
            self.stats.alerts_published += 1
        return True

    def _fit(self, row: PendingAlert) -> bytes:
        """The payload to send: an alert over the size limit goes without its snapshot.

        An oversized message would never be accepted and, resent after every reconnect, would
        block the rest of the outbox; the alert itself still matters without its picture.
        """
        if len(row.payload) <= self.broker.max_payload_bytes:
            return row.payload
        alert = AlertV1.model_validate_json(row.payload)
        slim = alert.model_copy(update={"snapshot": None}).to_json()
        logger.warning(
            "alert seq %s is %s bytes, over the %s byte limit: sent without its snapshot",
            row.seq,
            len(row.payload),
            self.broker.max_payload_bytes,
        )
        self.stats.snapshots_stripped += 1
        return slim

    def _flush_acks(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self.outbox.mark_acked(acked)
        if self._confirmed_ids:
            ids, self._confirmed_ids = self._confirmed_ids, []
            self.stats.alerts_confirmed += self.outbox.mark_confirmed(ids)
        if self._confirmed_seqs:
            seqs, self._confirmed_seqs = self._confirmed_seqs, []
            self.outbox.mark_delivered(seqs)

    # ---- paho callbacks (run in the publisher thread, inside client.loop) ---------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._connack_refused = True
            self.stats.connect_failures += 1
            logger.error("mqtt: broker refused the connection: %s", reason_code)
            return
        self.stats.connects += 1
        self._backoff.reset()
        self._session_up = True
        self.connected.set()
        logger.info(
            "mqtt: connected to %s:%s (session present: %s)",
            self.broker.host,
            self.broker.port,
            flags.session_present,
        )
        client.subscribe(self.topics.feedback(self.device_id), qos=QOS[DeviceChannel.FEEDBACK])
        with self._lock:
            status = self._status
            self._status_dirty = False
        if status is None:
            status = StatusV1(
                device_id=self.device_id, state=DeviceState.ONLINE, kind=self.kind, at=utcnow()
            )
        else:
            status = status.model_copy(update={"at": utcnow(), "state": DeviceState.ONLINE})
        client.publish(self.topics.status(self.device_id), status.to_json(), qos=1, retain=True)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self._session_up = False
        if not self._stop.is_set():
            logger.warning("mqtt: disconnected: %s", reason_code)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return  # status or telemetry
        if reason_code.is_failure:
            self.stats.alerts_refused += 1
            logger.warning("mqtt: broker refused alert seq %s: %s", seq, reason_code)
            return
        self.stats.alerts_acked += 1
        self._acked.append(seq)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            # Without its feedback the device resends every alert after each timeout.
            self.stats.subscribe_refused += 1
            logger.error(
                "mqtt: broker refused the feedback subscription %s: %s; alerts are resent "
                "until the aggregator's answers can be read (check the broker's ACL)",
                self.topics.feedback(self.device_id),
                refused[0],
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            feedback = parse_feedback(msg.payload)
        except ValidationError as exc:
            self.stats.feedback_invalid += 1
            logger.warning("mqtt: unreadable feedback on %s: %s", msg.topic, exc)
            return
        for fb in feedback:
            self._feedback(fb)

    def _feedback(self, fb: FeedbackV1) -> None:
        self.stats.feedback[fb.outcome.value] += 1
        # Any outcome ends the alert's stay in the outbox: the aggregator has decided about it.
        if fb.alert_id is not None:
            self._confirmed_ids.append(fb.alert_id)
        elif fb.seq is not None:
            self._confirmed_seqs.append(fb.seq)
        if fb.outcome is Outcome.REJECTED:
            logger.warning(
                "feedback: alert %s (seq %s) rejected: %s %s; dead letter %s",
                fb.alert_id,
                fb.seq,
                fb.reason,
                fb.detail or "",
                fb.dead_letter_id,
            )
        elif fb.outcome is Outcome.OUT_OF_AREA:
            logger.warning(
                "feedback: alert %s (seq %s) is outside every grid: %s",
                fb.alert_id,
                fb.seq,
                fb.detail or "check geo.lat/geo.lon",
            )
        else:
            logger.info(
                "feedback: alert %s (seq %s) %s, event %s",
                fb.alert_id,
                fb.seq,
                fb.outcome.value,
                fb.event_id,
            )
