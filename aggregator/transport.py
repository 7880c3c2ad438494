"""How the ingest worker talks MQTT: a paho client in this process, or in a child process.

Both give the worker the same four operations: ``take`` a micro-batch of received messages,
``ack`` messages once their batch is committed, ``publish`` feedback and notices, and the
connection state. ``ThreadTransport`` runs paho's network loop on a thread of this process.
``ProcessTransport`` runs a ``ThreadTransport`` in a child process and relays over a pipe, so
MQTT I/O (PUBLISH decoding, PUBACKs, feedback) and the pool writer each have a core of their own
instead of sharing one interpreter lock.

Crash semantics are the same either way: a message is acknowledged only when the worker says
its batch is committed. If the parent dies, the child sees the pipe close and exits at once
without acknowledging anything; if the child dies, the parent's unacknowledged messages are
redelivered to the next session (same client id), and the pool's alert_id key absorbs them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.config import BatchSettings, MqttSettings
from aggregator.pipeline import Inbound
from contract import DeviceChannel, Topics

log = logging.getLogger(__name__)

# (topic, payload, qos) of one outgoing message
Outgoing = tuple[str, bytes, int]


class Transport(Protocol):
    def start(self) -> None: ...
    def take(self, timeout: float) -> list[Inbound]: ...
    def ack(self, messages: Sequence[Inbound]) -> None: ...
    def publish(self, messages: Sequence[Outgoing]) -> None: ...
    def connected(self) -> bool: ...
    def wait_connected(self, timeout: float) -> bool: ...
    def depth(self) -> int: ...
    def stop(self) -> None: ...


class ThreadTransport:
    """paho on a network thread of this process; received messages wait in a bounded queue."""

    def __init__(self, settings: MqttSettings, batching: BatchSettings) -> None:
        self.settings = settings
        self.batching = batching
        self.topics = Topics(settings.topic_prefix)
        # Receive Maximum bounds what the broker sends; the extra room is for status/telemetry
        # (QoS 0 telemetry is not counted by Receive Maximum).
        self._queue: queue.Queue[Inbound] = queue.Queue(maxsize=settings.receive_maximum * 2)
        self._connected = threading.Event()
        self._stopping = False
        self._generation = 0
        self._client = self._make_client()

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

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def depth(self) -> int:
        return self._queue.qsize()

    # -- paho callbacks (network thread)

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
        client.subscribe(
            [
                (self.topics.device_filter(DeviceChannel.ALERT, group), 1),
                (self.topics.device_filter(DeviceChannel.STATUS, group), 1),
                (self.topics.device_filter(DeviceChannel.TELEMETRY, group), 1),
            ]
        )
        self._connected.set()
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
        if not self._stopping:
            log.warning("disconnected from broker reason=%s; paho reconnects", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Blocks when the worker falls behind: that is the backpressure we want (TCP flow
        # control and Receive Maximum stop the broker), never an unbounded buffer.
        self._queue.put(
            Inbound(msg.topic, bytes(msg.payload), time.time(), msg.mid, msg.qos, self._generation)
        )

    # -- the worker's side

    def take(self, timeout: float) -> list[Inbound]:
        """Up to ``max_messages``: the first within ``timeout``, the rest within the linger."""
        try:
            first = self._queue.get(timeout=timeout)
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

    def ack(self, messages: Sequence[Inbound]) -> None:
        # A message received on an earlier connection is not ours to acknowledge any more: the
        # broker redelivers it on this one, and the pool's key makes that a no-op.
        generation = self._generation
        for msg in messages:
            if msg.qos > 0 and msg.generation == generation:
                self._client.ack(msg.mid, msg.qos)

    def publish(self, messages: Sequence[Outgoing]) -> None:
        publish = self._client.publish
        for topic, payload, qos in messages:
            publish(topic, payload, qos=qos)


class ProcessTransport:
    """A ``ThreadTransport`` in a child process, relayed over a pipe."""

    # A message's generation is (child incarnation << 32) | connection generation in the
    # child, so that an acknowledgement never reaches a child that did not receive the message.
    _SHIFT = 32

    def __init__(self, settings: MqttSettings, batching: BatchSettings) -> None:
        self.settings = settings
        self.batching = batching
        self._ctx = multiprocessing.get_context("spawn")
        self._send_lock = threading.Lock()
        self._connected = threading.Event()
        self._depth = 0
        self._incarnation = 0
        self._stopping = False
        self._conn: Connection | None = None
        self._process: Any = None

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_child_main,
            args=(child_conn,),
            name=f"cwg-mqtt-{self.settings.client_id}",
            daemon=True,
        )
        process.start()
        child_conn.close()  # the child's end lives in the child now
        with self._send_lock:
            self._conn, self._process = conn, process
            self._incarnation += 1
            self._connected.clear()
        # The secret is handed over in the pipe's first message, never in the child's command
        # line or environment.
        config = self.settings.model_dump(mode="json", exclude={"password", "password_file"})
        level = logging.getLogger().getEffectiveLevel()
        self._send(("start", config, self.settings.secret(), self.batching.model_dump(), level))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            assert self._conn is not None
            try:
                self._conn.send(message)
            except OSError as exc:
                # The child is gone: its messages were never acknowledged and the broker sends
                # them to the next one, which take() starts (unless we are stopping).
                if not self._stopping:
                    log.warning("MQTT I/O process unreachable (%s); it is restarted", exc)

    def take(self, timeout: float) -> list[Inbound]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert self._conn is not None
            try:
                if remaining <= 0 or not self._conn.poll(remaining):
                    return []
                kind, *body = self._conn.recv()
            except (EOFError, OSError):
                self._respawn()
                return []
            if kind == "batch":
                rows, self._depth = body
                tag = self._incarnation << self._SHIFT
                return [Inbound(t, p, r, mid, qos, tag | gen) for t, p, r, mid, qos, gen in rows]
            if kind == "state":
                (self._connected.set if body[0] else self._connected.clear)()

    def _respawn(self) -> None:
        if self._stopping:
            return
        code = self._process.exitcode if self._process is not None else None
        log.error(
            "the MQTT I/O process exited (code %s); starting a new one: unacknowledged messages "
            "are redelivered to it and the pool absorbs any it already holds",
            code,
        )
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        time.sleep(0.5)  # no tight loop if the child keeps failing at start
        self._spawn()

    def ack(self, messages: Sequence[Inbound]) -> None:
        mine = self._incarnation
        mask = (1 << self._SHIFT) - 1
        self._send(
            (
                "ack",
                [
                    (m.mid, m.qos, m.generation & mask)
                    for m in messages
                    if m.qos > 0 and m.generation >> self._SHIFT == mine
                ],
            )
        )

    def publish(self, messages: Sequence[Outgoing]) -> None:
        if messages:
            self._send(("publish", list(messages)))

    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        # The state arrives on the pipe, which the ingest worker reads in take().
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.02, remaining))
        return True

    def depth(self) -> int:
        return self._depth

    def stop(self) -> None:
        self._stopping = True
        if self._process is None or self._conn is None:
            return
        self._send(("stop",))
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()


def _child_main(conn: Connection) -> None:
    """The MQTT I/O process: a ThreadTransport, batches out, acks and publishes in."""
    kind, config, secret, batching, level = conn.recv()
    assert kind == "start"
    settings = MqttSettings.model_validate({**config, "password": secret})
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[io] %(message)s")
    transport = ThreadTransport(settings, BatchSettings.model_validate(batching))
    transport.start()
    send_lock = threading.Lock()
    stop = threading.Event()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    def forward() -> None:
        state = None
        try:
            while not stop.is_set():
                if transport.connected() != state:
                    state = transport.connected()
                    send(("state", state))
                batch = transport.take(0.1)
                if batch:
                    send(("batch", [_row(m) for m in batch], transport.depth()))
        except (OSError, EOFError):
            os._exit(0)  # the parent is gone: leave every message unacknowledged

    threading.Thread(target=forward, name="cwg-io-forward", daemon=True).start()
    while True:
        try:
            kind, *body = conn.recv()
        except (EOFError, OSError):
            # The parent died (or was SIGKILLed): exit at once. Nothing more is acknowledged,
            # so the broker keeps the session's unacknowledged messages for the next aggregator.
            os._exit(0)
        if kind == "ack":
            transport.ack(
                [Inbound("", b"", 0.0, mid, qos, generation) for mid, qos, generation in body[0]]
            )
        elif kind == "publish":
            transport.publish(body[0])
        elif kind == "stop":
            stop.set()
            transport.stop()
            return


def _row(m: Inbound) -> tuple[str, bytes, float, int, int, int]:
    return (m.topic, m.payload, m.received_at, m.mid, m.qos, m.generation)


def make_transport(settings: MqttSettings, batching: BatchSettings) -> Transport:
    if settings.io_process:
        return ProcessTransport(settings, batching)
    return ThreadTransport(settings, batching)
