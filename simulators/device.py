"""One simulated device on the wire: its own broker login, a Last Will, a retained status, and
an inbox for the feedback the aggregator sends back to it."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from aggregator.broker.launcher import DeviceCredentials
from contract import (
    DeviceState,
    FeedbackV1,
    Health,
    Outcome,
    StatusV1,
    Topics,
    parse_feedback,
    utcnow,
)
from simulators.errors import DeviceError

__all__ = ["FeedbackHook", "SimDevice"]

log = logging.getLogger(__name__)

FeedbackHook = Callable[[str, FeedbackV1], None]
# MQTT 5 DISCONNECT reason 0x04: the broker publishes the Will as if the link had dropped.
_WITH_WILL = 4


class SimDevice:
    """A device's MQTT session. Thread-safe for publishing; feedback lands on paho's thread."""

    def __init__(
        self,
        creds: DeviceCredentials,
        *,
        on_feedback: FeedbackHook | None = None,
        max_inflight: int = 1000,
        client_id: str | None = None,
    ) -> None:
        self.creds = creds
        self.device_id = creds.device_id
        self.topics = Topics(creds.topic_prefix)
        self.on_feedback = on_feedback
        self.feedback: list[FeedbackV1] = []
        self.outcomes: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._started = time.monotonic()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or creds.device_id,  # the broker binds a device to its id
            protocol=mqtt.MQTTv5,
        )
        self._client.username_pw_set(creds.username, creds.password.get_secret_value())
        if creds.broker.ca_file is not None:
            # Verified TLS: the broker's certificate must chain to the provisioned CA and name
            # the host the device connects to.
            self._client.tls_set(ca_certs=str(creds.broker.ca_file))
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        will = StatusV1(
            device_id=self.device_id, state=DeviceState.OFFLINE, reason="last_will", kind=self.kind
        )
        self._client.will_set(
            self.topics.status(self.device_id), will.to_json(), qos=1, retain=True
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._refused: ReasonCode | None = None

    @property
    def kind(self) -> Literal["camera", "sensor", "hub"]:
        kind = self.creds.kind.value
        return "camera" if kind == "camera" else "sensor" if kind == "sensor" else "hub"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- session ---------------------------------------------------------------------------
    def connect(self, timeout_s: float = 10.0, *, announce: bool = True) -> None:
        """Connect, subscribe to our feedback and (``announce``) publish a retained online."""
        self._connected.clear()
        self._subscribed.clear()
        self._refused = None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        self._client.connect_async(
            self.creds.broker.host, self.creds.broker.port, keepalive=30, properties=props
        )
        self._client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self._subscribed.wait(0.05):
            if self._refused is not None:
                self._stop_loop()
                raise DeviceError(
                    f"{self.device_id}: broker refused the connection ({self._refused}); "
                    "are its credentials provisioned?"
                )
            if time.monotonic() > deadline:
                self._stop_loop()
                raise DeviceError(
                    f"{self.device_id}: not connected to {self.creds.broker.host}:"
                    f"{self.creds.broker.port} within {timeout_s:.0f} s"
                )
        if announce:
            self.publish_status(DeviceState.ONLINE)

    def publish_status(self, state: DeviceState, *, wait: bool = True) -> None:
        status = StatusV1(
            device_id=self.device_id,
            state=state,
            at=utcnow(),
            kind=self.kind,
            health=Health(uptime_s=round(time.monotonic() - self._started, 1), version="sim-1"),
        )
        self.publish(self.topics.status(self.device_id), status.to_json(), retain=True, wait=wait)

    def _stop_loop(self) -> None:
        self._client.loop_stop()
        # paho closes its loop's wake-up socket pair only when the client is collected (its
        # callbacks and this device form a cycle); the next loop_start() makes a new pair
        self._client._reset_sockets(sockpair_only=True)

    def close(self, *, graceful: bool = True) -> None:
        """``graceful``: publish a retained offline and disconnect. Otherwise drop the link the
        way a power cut would, so the broker publishes our Last Will."""
        if not self._connected.is_set():
            self._stop_loop()
            return
        if graceful:
            self.publish_status(DeviceState.OFFLINE)
            self._client.disconnect()
        else:
            self._client.disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=_WITH_WILL)
            )
        self._stop_loop()
        self._connected.clear()

    # -- publishing ------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
        timeout_s: float = 10.0,
    ) -> mqtt.MQTTMessageInfo:
        if not self._connected.is_set():
            raise DeviceError(f"{self.device_id}: publish while not connected")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise DeviceError(
                f"{self.device_id}: publish to {topic} failed: {mqtt.error_string(info.rc)}"
            )
        if wait and qos > 0:
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise DeviceError(
                    f"{self.device_id}: no PUBACK for {topic} within {timeout_s:.0f} s"
                )
        return info

    def alert(self, payload: bytes, *, wait: bool = True) -> mqtt.MQTTMessageInfo:
        return self.publish(self.topics.alert(self.device_id), payload, wait=wait)

    # -- feedback --------------------------------------------------------------------------
    def wait_feedback(
        self,
        predicate: Callable[[FeedbackV1], bool],
        timeout_s: float = 10.0,
    ) -> FeedbackV1 | None:
        """The first feedback (already received or arriving in time) matching ``predicate``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for fb in self.feedback:
                    if predicate(fb):
                        return fb
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def feedback_for(self, alert_id: str) -> FeedbackV1 | None:
        with self._cond:
            return next((f for f in self.feedback if f.alert_id == alert_id), None)

    def outcome_count(self, outcome: Outcome) -> int:
        with self._cond:
            return self.outcomes[outcome.value]

    # -- paho callbacks --------------------------------------------------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = reason_code
            return
        self._connected.set()
        client.subscribe(self.topics.feedback(self.device_id), qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if reason_code.is_failure and reason_code.value != _WITH_WILL:
            log.info("%s disconnected: %s", self.device_id, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            feedback = parse_feedback(msg.payload)
        except ValidationError:
            log.warning("%s: unreadable feedback on %s", self.device_id, msg.topic)
            return
        with self._cond:
            self.feedback += feedback
            self.outcomes.update(fb.outcome.value for fb in feedback)
            self._cond.notify_all()
        if self.on_feedback is not None:
            for fb in feedback:
                try:
                    self.on_feedback(self.device_id, fb)
                except Exception:
                    log.exception("feedback hook failed for %s", self.device_id)
