"""The aggregator's MQTT session (``aggregator/ingest/mqtt.py``, ``transport.py``) on a real
broker: lean and stock paho paths, acknowledgement, redelivery, paced publishing beyond
the broker's Receive Maximum, and reconnection after a broker restart."""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.config import BatchSettings, MqttSettings
from aggregator.ingest.assemble import Inbound
from aggregator.ingest.mqtt import FrameChannel, IoLoop, LeanClient, publish_packet
from aggregator.ingest.transport import ProcessTransport, ThreadTransport, Transport
from contract import DeviceChannel

from .conftest import wait_until

BATCH = BatchSettings(max_messages=500, linger_ms=5)


def settings(broker: Any, client_id: str | None = None) -> MqttSettings:
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        password=broker.password("aggregator"),
        client_id=client_id or f"agg-{uuid.uuid4().hex[:8]}",
        topic_prefix=broker.prefix,
        keepalive_s=5,
    )


@pytest.fixture(params=[ThreadTransport, ProcessTransport], ids=["thread", "process"])
def transport_cls(request: Any) -> type[Any]:
    return request.param  # type: ignore[no-any-return]


class Worker:
    """The ingest worker's side of a transport, keeping whatever ``take`` returns."""

    def __init__(
        self, cls: type[Any], mqtt_settings: MqttSettings, batching: BatchSettings = BATCH
    ) -> None:
        self.transport: Transport = cls(mqtt_settings, batching)
        self.transport.start()
        self.held: list[Inbound] = []
        self.until_connected(True)

    def until_connected(self, state: bool, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.transport.connected() != state:
            assert time.monotonic() < deadline, f"connected() never became {state}"
            self.held += self.transport.take(0.05)

    def take(self, n: int, timeout: float = 10.0) -> list[Inbound]:
        deadline = time.monotonic() + timeout
        while len(self.held) < n and time.monotonic() < deadline:
            self.held += self.transport.take(0.1)
        got, self.held = self.held, []
        assert len(got) == n, f"took {len(got)} messages, expected {n}"
        return got

    def stop(self) -> None:
        self.transport.stop()


def with_properties() -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/json"
    props.UserProperty = [("trace", "abc")]
    return props


def test_plain_and_property_laden_messages_arrive_whole(broker: Any, transport_cls: Any) -> None:
    worker = Worker(transport_cls, settings(broker))
    try:
        cam = broker.client("cam-001")
        alert_topic = broker.topics.alert("cam-001")
        assert not cam.publish(alert_topic, b'{"plain":1}').is_failure
        assert not cam.publish(alert_topic, b'{"props":1}', properties=with_properties()).is_failure
        cam.paho.publish(broker.topics.telemetry("cam-001"), b'{"qos0":1}', qos=0)
        got = sorted(worker.take(3), key=lambda m: m.payload)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            (alert_topic, b'{"plain":1}', 1),
            (alert_topic, b'{"props":1}', 1),
            (broker.topics.telemetry("cam-001"), b'{"qos0":1}', 0),
        ]
        assert all(m.mid > 0 for m in got if m.qos == 1)
        assert all(abs(m.received_at - time.time()) < 30 for m in got)
    finally:
        worker.stop()


@pytest.mark.parametrize(("min_messages", "lingers"), [(50, False), (1000, True)])
def test_a_backlog_of_min_messages_is_taken_at_once_a_trickle_lingers(
    broker: Any, transport_cls: Any, min_messages: int, lingers: bool
) -> None:
    """Under load the worker finds a backlog when it comes back from a commit: with
    ``min_messages`` of it there, ``take`` returns what has arrived instead of lingering. A
    lone message still waits out the linger for company."""
    linger_s = 1.5
    batching = BatchSettings(
        max_messages=1000, linger_ms=linger_s * 1000, min_messages=min_messages
    )
    worker = Worker(transport_cls, settings(broker), batching)
    try:
        cam = broker.client("cam-001")
        topic = broker.topics.alert("cam-001")
        cam.publish_many(topic, [b"%d" % i for i in range(300)])
        time.sleep(1.0)  # all of them through the I/O loop and on the channel
        started = time.monotonic()
        got = worker.transport.take(1.0)
        took = time.monotonic() - started
        assert len(got) == 300
        assert (took >= linger_s * 0.9) is lingers, took
        worker.transport.ack(got)
        cam.publish(topic, b"lone")
        started = time.monotonic()
        got = worker.transport.take(5.0)
        assert [m.payload for m in got] == [b"lone"]
        assert time.monotonic() - started >= linger_s * 0.9  # below min_messages: lingers
    finally:
        worker.stop()


def test_acknowledged_messages_are_not_redelivered_unacknowledged_ones_are(
    broker: Any, transport_cls: Any
) -> None:
    mqtt_settings = settings(broker)
    cam = broker.client("cam-001")
    topic = broker.topics.alert("cam-001")
    worker = Worker(transport_cls, mqtt_settings)
    try:
        cam.publish_many(topic, [f"a{i}".encode() for i in range(10)])
        first = worker.take(10)
        worker.transport.ack(
            [m for m in first if m.payload in {f"a{i}".encode() for i in range(6)}]
        )
        time.sleep(0.5)  # the acks reach the broker before we leave
    finally:
        worker.stop()
    # same client id: the persistent session sends what was never acknowledged, and only that
    again = Worker(transport_cls, mqtt_settings)
    try:
        redelivered = again.take(4)
        assert sorted(m.payload for m in redelivered) == [b"a6", b"a7", b"a8", b"a9"]
        again.transport.ack(redelivered)
        assert again.transport.take(1.0) == []
    finally:
        again.stop()


def test_publishes_beyond_the_brokers_receive_maximum_all_arrive_in_order(
    broker: Any, transport_cls: Any
) -> None:
    # the test broker lets an MQTT 5 client have max_inflight_messages unacknowledged publishes
    n = broker.settings.max_inflight_messages * 3 + 17
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    worker = Worker(transport_cls, settings(broker))
    try:
        worker.transport.publish([(broker.topics.events, str(i).encode(), 1) for i in range(n)])
        got = integrator.expect(n, timeout=30)
        assert [int(m.payload) for m in got] == list(range(n))
    finally:
        worker.stop()


def test_unacknowledged_messages_stay_within_the_receive_maximum(
    broker: Any, transport_cls: Any
) -> None:
    """Mosquitto 2.0.11 honours a subscriber's Receive Maximum only until acknowledgements
    start to flow, then sends past it: the I/O loop holds the line itself by not reading the
    broker while that many messages wait for the worker's acknowledgement. A worker that
    acknowledges slowly must never hold more than the Receive Maximum plus what one socket
    read can bring in."""
    receive_maximum, size, n = 200, 2048, 3000
    mqtt_settings = settings(broker).model_copy(update={"receive_maximum": receive_maximum})
    transport = transport_cls(mqtt_settings, BatchSettings(max_messages=100, linger_ms=5))
    transport.start()
    cam = broker.client("cam-001")
    topic = broker.topics.alert("cam-001")
    sender = threading.Thread(
        target=cam.publish_many, args=(topic, [b"%05d" % i + b"x" * size for i in range(n)])
    )
    try:
        until = time.monotonic() + 20
        while not transport.connected():
            assert time.monotonic() < until, "never connected"
            assert transport.take(0.05) == []
        sender.start()
        held: list[Inbound] = []
        taken = most = 0
        deadline = time.monotonic() + 120
        while taken < n:
            assert time.monotonic() < deadline, f"only {taken} of {n} messages arrived"
            got = transport.take(0.02)
            taken += len(got)
            held += got
            most = max(most, len(held))
            transport.ack(held[:25])  # a slow worker: 25 per round of about 20 ms
            del held[:25]
        one_read = (1 << 18) // size + 1
        assert most <= receive_maximum + one_read, most
        assert most >= receive_maximum // 2  # the window was used, not starved
    finally:
        sender.join(30)
        transport.stop()


def test_qos0_feedback_does_not_open_the_qos1_window(broker: Any) -> None:
    """paho reports QoS 0 publishes as published too; counting those as acknowledged QoS 1
    messages would let more QoS 1 messages fly than the broker's Receive Maximum. Drives one
    IoLoop by hand and checks paho's unacknowledged messages after every round."""
    ours, theirs = socket.socketpair()
    loop = IoLoop(settings(broker), BATCH, FrameChannel(theirs, blocking=False))
    try:
        loop._connect()
        deadline = time.monotonic() + 10
        while not loop._connected:
            assert time.monotonic() < deadline, "no CONNACK"
            loop.client.loop_read()
            loop.client.loop_write()
        loop._window = 50  # a small Receive Maximum, as a broker may announce
        mixed: list[tuple[str, bytes, int]] = []
        for i in range(400):
            mixed.append((broker.topics.feedback("cam-001"), b"fb%d" % i, 0))
            mixed.append((broker.topics.events, str(i).encode(), 1))
        loop._command(("publish", mixed))
        most = 0
        while loop._out or loop._inflight:
            assert time.monotonic() < deadline, "publishes not acknowledged in time"
            loop._pump_out()
            most = max(most, len(loop.client._out_messages))
            loop.client.loop_write()
            select.select([loop.client.socket()], [], [], 0.05)
            loop.client.loop_read()
        assert most == 50
    finally:
        loop.client.disconnect()
        loop.client.loop_write()
        ours.close()
        theirs.close()


def test_a_burst_larger_than_the_socket_buffer_arrives_whole_and_in_order(
    broker: Any, transport_cls: Any
) -> None:
    """Coalesced writes stop part-way when the socket is full and resume where they stopped."""
    n, size = 300, 64 * 1024  # ~19 MB, several times what a loopback socket buffers
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    worker = Worker(transport_cls, settings(broker))
    try:
        payloads = [i.to_bytes(4, "big") + bytes([i % 251]) * size for i in range(n)]
        worker.transport.publish([(broker.topics.events, p, 1) for p in payloads])
        got = integrator.expect(n, timeout=60)
        assert [m.payload for m in got] == payloads
    finally:
        worker.stop()


def test_session_resumes_after_a_broker_restart(broker: Any) -> None:
    worker = Worker(ThreadTransport, settings(broker))
    try:
        broker.stop()
        worker.until_connected(False)
        broker.start()
        worker.until_connected(True)
        cam = broker.client("cam-001")
        assert not cam.publish(broker.topics.alert("cam-001"), b"after").is_failure
        (msg,) = worker.take(1)
        assert msg.payload == b"after"
    finally:
        worker.stop()


@pytest.fixture
def lean(broker: Any) -> Iterator[tuple[LeanClient, list[Any], list[Any]]]:
    rows: list[Any] = []
    messages: list[Any] = []
    client = LeanClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"lean-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.username_pw_set("aggregator", broker.password("aggregator"))
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe(
        broker.topics.device_filter(DeviceChannel.ALERT), 1
    )
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_row = lambda topic, payload, mid, qos: rows.append((topic, payload, qos))
    client.on_message = lambda _c, _u, m: messages.append((m.topic, m.payload, m.qos))
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 60  # a session that outlives the connection
    client.connect(broker.host, broker.port, clean_start=False, properties=props)
    client.loop_start()
    assert subscribed.wait(5)
    yield client, rows, messages
    client.disconnect()
    client.loop_stop()


def test_lean_client_takes_plain_publishes_itself_and_leaves_the_rest_to_paho(
    broker: Any, lean: tuple[LeanClient, list[Any], list[Any]]
) -> None:
    """Guards the private paho methods LeanClient overrides: if a paho release renamed them,
    the plain message would arrive through on_message and this test would fail."""
    _client, rows, messages = lean
    cam = broker.client("cam-001")
    topic = broker.topics.alert("cam-001")
    body = b"x" * 70_000  # several reads, and a three-byte remaining length
    assert not cam.publish(topic, body).is_failure
    assert not cam.publish(topic, b"with props", properties=with_properties()).is_failure
    cam.paho.publish(topic, b"qos0", qos=0)
    wait_until(lambda: len(rows) + len(messages) == 3, 5, "three messages")
    assert sorted(rows) == sorted([(topic.encode(), body, 1), (topic.encode(), b"qos0", 0)])
    assert messages == [(topic, b"with props", 1)]


def test_lean_client_acknowledges_by_itself_without_manual_ack(
    broker: Any, lean: tuple[LeanClient, list[Any], list[Any]]
) -> None:
    client, rows, _messages = lean
    cam = broker.client("cam-001")
    cam.publish_many(broker.topics.alert("cam-001"), [b"%d" % i for i in range(200)])
    wait_until(lambda: len(rows) == 200, 5, "200 rows")
    # The row is handed over before its PUBACK is queued, on the client's network thread. A
    # SUBACK is read on that same thread after the 200th PUBLISH was handled, so once it is in,
    # every PUBACK is queued ahead of the DISCONNECT below (and paho writes in queue order).
    resubscribed = threading.Event()
    client.on_subscribe = lambda *_: resubscribed.set()
    client.subscribe(broker.topics.device_filter(DeviceChannel.ALERT), 1)
    assert resubscribed.wait(5)
    # every PUBACK went out: the broker holds nothing in flight for us
    client.disconnect()
    client.loop_stop()
    again = broker.client(
        "aggregator",
        client_id=client._client_id.decode(),
        clean_start=False,
        session_expiry_s=60,
    )
    assert again.session_present
    again.expect_nothing(1.0)


def test_ack_many_queues_the_puback_bytes_paho_would() -> None:
    mids = [1, 2, 255, 256, 4097, 65535]

    def queued(client: mqtt.Client) -> bytes:
        return b"".join(bytes(p["packet"]) for p in client._out_packet)

    def make(cls: type[mqtt.Client]) -> mqtt.Client:
        client = cls(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.on_socket_register_write = lambda *_: None  # queue packets, send nothing
        return client

    stock, lean = make(mqtt.Client), make(LeanClient)
    for mid in mids:
        assert stock.ack(mid, 1) == mqtt.MQTT_ERR_SUCCESS
    assert isinstance(lean, LeanClient)
    assert lean.ack_many(mids) == mqtt.MQTT_ERR_SUCCESS
    assert queued(lean) == queued(stock)
    assert len(queued(lean)) == 4 * len(mids)


@pytest.mark.parametrize("size", [0, 1, 120, 128, 16_300, 16_384, 70_000, 2_100_000])
def test_lean_publish_packet_is_byte_for_byte_pahos(size: int) -> None:
    """The lean QoS 1 publish builds its PUBLISH itself; it must be exactly paho's packet
    (remaining lengths of one to four bytes included)."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    topic = "cwg/v1/devices/cam-001/feedback"
    stock = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    stock.on_socket_register_write = lambda *_: None  # queue packets, send nothing
    stock._sock = socket.socket()  # "connected": paho builds the packet
    try:
        assert stock._send_publish(7, topic.encode(), payload, 1) == mqtt.MQTT_ERR_SUCCESS
        expected = bytes(stock._out_packet[-1]["packet"])
    finally:
        stock._sock.close()
    assert publish_packet(topic.encode(), 7, payload) == expected


def test_lean_published_messages_are_resent_after_a_dropped_connection(broker: Any) -> None:
    """Messages paho holds unacknowledged when the connection drops are resent (DUP) on the
    next one: the lean message objects must serve paho's resend path like its own."""
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    ours, theirs = socket.socketpair()
    loop = IoLoop(settings(broker), BATCH, FrameChannel(theirs, blocking=False))
    client = loop.client

    def until(check: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not check():
            assert time.monotonic() < deadline, what
            loop._pump_out()
            client.loop_write()
            sock = client.socket()
            if sock is not None:
                select.select([sock], [], [], 0.05)
                client.loop_read()

    try:
        loop._connect()
        until(lambda: loop._connected, "no CONNACK")
        loop._command(("publish", [(broker.topics.events, b"%d" % i, 1) for i in range(100)]))
        loop._pump_out()
        client.loop_write()  # all 100 out; no PUBACK read yet
        assert len(client._out_messages) == 100
        client._sock_close()  # the connection drops with every PUBACK unread
        client.reconnect()
        until(lambda: not client._out_messages and not loop._inflight, "resends not acked")
        want = {b"%d" % i for i in range(100)}
        got: set[bytes] = set()  # some arrive twice: sent before the drop, and resent (DUP)
        while got != want:
            got.add(integrator.expect(1, timeout=10)[0].payload)
    finally:
        client.disconnect()
        client.loop_write()
        ours.close()
        theirs.close()
