"""Shared fixtures: a real Mosquitto per test, and MQTT 5 clients for its accounts.

``broker`` is a started broker (free loopback port, state and registry under ``tmp_path``) with
the devices in ``DEFAULT_DEVICES`` plus an ``aggregator`` and an ``integrator`` account.
``broker_factory(...)`` makes more, with other devices or settings. Through the handle a test
can provision devices on the running broker, stop/kill/restart it, and open clients::

    def test_example(broker):
        agg = broker.client("aggregator")
        agg.subscribe(broker.topics.device_filter(DeviceChannel.ALERT))
        cam = broker.client("cam-001")
        assert not cam.publish(broker.topics.alert("cam-001"), b"{}").is_failure
        assert agg.expect(1)[0].payload == b"{}"
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.broker.launcher import (
    BrokerSettings,
    DeviceCredentials,
    MosquittoBroker,
    provision_device,
)
from aggregator.broker.registry import AccountRole, DeviceKind, DeviceRegistry
from contract import FeedbackV1, parse_feedback
from contract.topics import Topics
from tests.pgsupport import pg_server, pg_url  # noqa: F401  (fixtures: a real PostgreSQL)

# Opt-in (CWG_TEST_FD_REPORT=1): which tests leave descriptors or threads behind.
pytest_plugins = ("tests.fdreport",)

DEFAULT_DEVICES: tuple[tuple[str, DeviceKind], ...] = (
    ("cam-001", DeviceKind.CAMERA),
    ("cam-002", DeviceKind.CAMERA),
    ("sensor-001", DeviceKind.SENSOR),
    ("hub-001", DeviceKind.HUB),
)
WAIT_S = 5.0
SERVICE_ACCOUNTS = frozenset({"aggregator", "integrator"})
_T = TypeVar("_T")


class MqttConnectError(AssertionError):
    """The broker refused a connection; ``reason`` is its CONNACK reason code."""

    def __init__(self, username: str | None, reason: ReasonCode | None) -> None:
        super().__init__(f"connect as {username!r} refused: {reason}")
        self.reason = reason


class MqttTestClient:
    """A paho-mqtt 2.x MQTT 5 client with its network loop running, recording what it receives.

    ``publish`` and ``subscribe`` wait for the broker's answer and return its reason codes.
    ``paho`` is the underlying client for anything else (``ack`` with ``manual_ack``, …).
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry_s: int | None = None,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        ca_file: Path | None = None,
    ) -> None:
        self.username = username
        self.client_id = client_id or f"{username or 'anon'}-{uuid.uuid4().hex[:8]}"
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connect_reason: ReasonCode | None = None
        self.session_present = False
        self._host, self._port = host, port
        self._clean_start = clean_start
        self._connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: ReasonCode | None = None
        self._acks = threading.Condition()
        self._published: dict[int, ReasonCode] = {}
        self._subscribed: dict[int, list[ReasonCode]] = {}
        self._connect_props = Properties(PacketTypes.CONNECT)
        if session_expiry_s is not None:
            self._connect_props.SessionExpiryInterval = session_expiry_s
        if receive_maximum is not None:
            self._connect_props.ReceiveMaximum = receive_maximum
        self.paho = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=self.client_id,
            manual_ack=manual_ack,
        )
        if username is not None:
            self.paho.username_pw_set(username, password)
        if ca_file is not None:  # verified TLS: the CA, and the host name against the SANs
            self.paho.tls_set(ca_certs=str(ca_file))
        self.paho.on_connect = self._on_connect
        self.paho.on_message = self._on_message
        self.paho.on_publish = self._on_publish
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_disconnect = self._on_disconnect

    # -- paho callbacks (network thread)
    def _on_connect(
        self, _c: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self.connect_reason = reason
        self.session_present = bool(flags.session_present)
        self._connected.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._acks:
            self._published[mid] = reason
            self._acks.notify_all()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        with self._acks:
            self._subscribed[mid] = reasons
            self._acks.notify_all()

    # -- API
    def connect(self, timeout: float = WAIT_S) -> ReasonCode:
        """Connect and wait for CONNACK; returns its reason code (the loop stops on refusal)."""
        self._connected.clear()
        self.disconnected.clear()
        self.paho.connect(
            self._host,
            self._port,
            keepalive=30,
            clean_start=self._clean_start,
            properties=self._connect_props,
        )
        self.paho.loop_start()
        if not self._connected.wait(timeout):
            self.paho.loop_stop()
            raise TimeoutError(f"no CONNACK for {self.client_id} within {timeout} s")
        assert self.connect_reason is not None
        if self.connect_reason.is_failure:
            # Otherwise paho would keep retrying in the background.
            self.paho.disconnect()
            self.paho.loop_stop()
        return self.connect_reason

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> ReasonCode:
        """Publish and wait for the broker's PUBACK (QoS 1) or the send (QoS 0)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        return self._wait(self._published, info.mid, f"PUBACK for {topic}")

    def publish_many(self, topic: str, payloads: Sequence[bytes], qos: int = 1) -> list[ReasonCode]:
        """Publish all, then wait for every acknowledgement; reason codes in order."""
        mids = [self.paho.publish(topic, p, qos=qos).mid for p in payloads]
        deadline = time.monotonic() + WAIT_S + len(payloads) / 500
        return [self._wait(self._published, mid, "PUBACK", deadline=deadline) for mid in mids]

    def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        _, mid = self.paho.subscribe(topic, qos=qos)
        assert mid is not None
        return self._wait(self._subscribed, mid, f"SUBACK for {topic}")

    def expect(self, count: int = 1, timeout: float = WAIT_S) -> list[mqtt.MQTTMessage]:
        """Wait for ``count`` messages; fail naming how many came."""
        got: list[mqtt.MQTTMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.client_id}: expected {count} messages, got {len(got)}")
            try:
                got.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                continue
        return got

    def expect_feedback(self, count: int = 1, timeout: float = WAIT_S) -> list[FeedbackV1]:
        """Wait for ``count`` alert outcomes on feedback topics, whether they come one per
        feedback/v1 message or several per feedback-batch/v1; fail if more came."""
        got: list[FeedbackV1] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            [message] = self.expect(1, max(deadline - time.monotonic(), 0.01))
            got += parse_feedback(message.payload)
        assert len(got) == count, f"{self.client_id}: expected {count} outcomes, got {len(got)}"
        return got

    def expect_nothing(self, within: float = 0.5) -> None:
        try:
            message = self.messages.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: unexpected message on {message.topic}")

    def disconnect(self) -> None:
        """Clean DISCONNECT: a persistent session stays on the broker."""
        if self.paho.is_connected():
            self.paho.disconnect()
        self.paho.loop_stop()
        # paho closes its loop's wake-up socket pair only when the client is collected (this
        # object and its callbacks form a cycle); connect() makes a new pair
        self.paho._reset_sockets(sockpair_only=True)

    def _wait(
        self, table: dict[int, _T], mid: int, what: str, *, deadline: float | None = None
    ) -> _T:
        deadline = deadline or time.monotonic() + WAIT_S
        with self._acks:
            while mid not in table:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.client_id}: no {what} (mid {mid})")
                self._acks.wait(remaining)
            return table.pop(mid)


@dataclass(frozen=True)
class Account:
    username: str
    password: str


class BrokerHandle:
    """A running test broker, its accounts' passwords, and the clients opened on it."""

    def __init__(
        self,
        broker: MosquittoBroker,
        registry_path: Path,
        creds_dir: Path,
        accounts: dict[str, Account],
    ) -> None:
        self.broker = broker
        self.registry_path = registry_path
        self.creds_dir = creds_dir
        self.accounts = accounts
        self._clients: list[MqttTestClient] = []

    @property
    def settings(self) -> BrokerSettings:
        return self.broker.settings

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (start the broker with ``tls_port=0`` to have one)."""
        port = self.broker.tls_port
        assert port is not None, "this broker has no TLS listener"
        return port

    @property
    def ca_file(self) -> Path:
        return self.broker.ca_file

    @property
    def prefix(self) -> str:
        return self.settings.topic_prefix

    @property
    def topics(self) -> Topics:
        return self.broker.topics

    def password(self, username: str) -> str:
        return self.accounts[username].password

    def add_device(
        self, device_id: str, kind: DeviceKind | str = DeviceKind.CAMERA
    ) -> DeviceCredentials:
        """Provision a device on the running broker (it reloads); its account is usable at once."""
        creds = provision_device(
            self.registry_path,
            device_id,
            kind,
            settings=self.broker.settings,
            out_dir=self.creds_dir,
        )
        self.accounts[device_id] = Account(device_id, creds.password.get_secret_value())
        return creds

    def remove_device(self, device_id: str) -> None:
        registry = DeviceRegistry.load(self.registry_path)
        registry.remove_device(device_id)
        registry.save()
        self.broker.reload()

    def new_client(
        self,
        username: str | None,
        password: str | None = None,
        *,
        tls: bool = False,
        **options: Any,
    ) -> MqttTestClient:
        """A client not yet connected (``password`` defaults to the account's).

        A device's client id defaults to its device id, the only one the broker lets it use;
        ``tls`` connects to the TLS listener, verifying it with the broker's CA."""
        if password is None and username in self.accounts:
            password = self.accounts[username].password
        if username in self.accounts and username not in SERVICE_ACCOUNTS:
            options.setdefault("client_id", username)
        port = self.port
        if tls:
            port = self.tls_port
            options.setdefault("ca_file", self.ca_file)
        client = MqttTestClient(self.host, port, username, password, **options)
        self._clients.append(client)
        return client

    def client(self, username: str, **options: Any) -> MqttTestClient:
        """A connected client for an account; raises MqttConnectError if refused."""
        client = self.new_client(username, **options)
        reason = client.connect()
        if reason.is_failure:
            raise MqttConnectError(username, reason)
        return client

    def connect_reason(self, username: str | None, password: str | None) -> ReasonCode:
        """The CONNACK reason code for these credentials (the client is closed afterwards)."""
        client = self.new_client(username, password)
        reason = client.connect()
        client.disconnect()
        return reason

    # -- broker life cycle, for tests of restarts and crashes
    def stop(self) -> None:
        self.broker.stop()

    def kill(self) -> None:
        self.broker.kill()

    def start(self) -> None:
        self.broker.start()

    def restart(self) -> None:
        self.broker.restart()

    def close(self) -> None:
        try:
            for client in self._clients:
                with contextlib.suppress(Exception):  # a refused client must not keep the broker
                    client.disconnect()
        finally:
            self.broker.stop()


BrokerFactory = Callable[..., BrokerHandle]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Makes started brokers: ``broker_factory(devices=[(id, kind), ...], **BrokerSettings)``."""
    handles: list[BrokerHandle] = []

    def make(
        devices: Sequence[tuple[str, DeviceKind | str]] = DEFAULT_DEVICES, **settings: Any
    ) -> BrokerHandle:
        root = tmp_path / f"broker-{len(handles)}"
        registry = DeviceRegistry(root / "registry.yaml")
        accounts: dict[str, Account] = {}
        for username, role in (
            ("aggregator", AccountRole.AGGREGATOR),
            ("integrator", AccountRole.INTEGRATOR),
        ):
            _, password = registry.add_account(username, role)
            accounts[username] = Account(username, password)
        for device_id, kind in devices:
            _, password = registry.add_device(device_id, kind, f"test {kind} {device_id}")
            accounts[device_id] = Account(device_id, password)
        registry.save()
        broker = MosquittoBroker(BrokerSettings(state_dir=root / "state", **settings), registry)
        broker.start()
        handle = BrokerHandle(broker, registry.path, root / "credentials", accounts)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.close()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> BrokerHandle:
    """A started Mosquitto with DEFAULT_DEVICES, ``aggregator`` and ``integrator``."""
    return broker_factory()
