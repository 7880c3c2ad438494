"""Hostile devices against a real broker and a real aggregator while alerts flow at 1,000/s.

Each attack must be refused when it is made (CONNACK or SUBACK 0x87), not merely filtered when
messages are delivered, and the flow must come through whole: every alert the broker
acknowledged is in the pool exactly once, and the aggregator received no copy twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.config import MqttSettings
from aggregator.service import Aggregator, build_aggregator

from .conftest import (
    GRIDS,
    aggregator_settings,
    count,
    grid_in_community,
    interior,
    make_alert,
    wait_until,
)
from .conftest import offset as move

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle, MqttTestClient

NOT_AUTHORIZED = 0x87
RATE = 1000  # alerts per second, all publishers together
DURATION_S = 6.0
SHARE_GROUP = "cwg-replicas"
PUBLISHERS = ("cam-001", "cam-002")


class PacedPublisher:
    """Publishes QoS 1 alerts for one device at a fixed rate in a thread; records what the
    broker answered to each (packet ids stay below 65,536 per run, so none is reused)."""

    def __init__(
        self, client: MqttTestClient, topic: str, payloads: list[tuple[str, bytes]]
    ) -> None:
        assert len(payloads) < 65_000
        self.client = client
        self.topic = topic
        self.payloads = payloads
        self.sent: list[tuple[int, str]] = []  # (packet id, alert_id)
        # Filled by paho's network thread; no lock of ours is held around paho calls (paho
        # calls back under its own lock, and the two would deadlock).
        self.answers: dict[int, ReasonCode] = {}
        client.paho.on_publish = self._on_publish
        self.thread = threading.Thread(target=self._run, name=f"pub-{topic}", daemon=True)

    def _on_publish(self, _c: object, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        self.answers[mid] = reason

    def _run(self) -> None:
        interval = len(PUBLISHERS) / RATE
        start = time.monotonic()
        for i, (alert_id, payload) in enumerate(self.payloads):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            info = self.client.paho.publish(self.topic, payload, qos=1)
            self.sent.append((info.mid, alert_id))

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.topic}: publishing did not finish"

    def answered(self) -> bool:
        return len(self.answers) >= len(self.payloads)

    def acked(self) -> set[str]:
        return {a for mid, a in self.sent if not self.answers[mid].is_failure}

    def failed(self) -> list[str]:
        return [f"{a}: {self.answers[mid]}" for mid, a in self.sent if self.answers[mid].is_failure]


@pytest.fixture
def replica(broker: BrokerHandle, tmp_path: Path) -> Aggregator:
    settings = aggregator_settings(broker, tmp_path / "agg")
    mqtt = settings.mqtt.model_dump()
    mqtt.update(client_id=f"cwg-aggregator-{uuid.uuid4().hex[:6]}", share_group=SHARE_GROUP)
    settings = settings.model_copy(update={"mqtt": MqttSettings.model_validate(mqtt)})
    agg = build_aggregator(settings, grids=GRIDS)
    agg.start()
    assert agg.ingest.wait_connected(5)
    time.sleep(0.2)  # the subscription is sent after CONNACK
    yield agg
    agg.stop()


def test_attacks_are_refused_while_alerts_flow_and_nothing_is_lost_or_doubled(
    broker: BrokerHandle, replica: Aggregator
) -> None:
    lat, lon = interior(grid_in_community(0))
    per_device = int(RATE * DURATION_S / len(PUBLISHERS))
    publishers = []
    for n, device in enumerate(PUBLISHERS):
        payloads = []
        for seq in range(per_device):
            # Spread over a few hundred metres so the alerts are pooled as ordinary events.
            alert = make_alert(device, *move(lat, lon, 3.0 * (seq % 50), 40.0 * n), seq=seq + 1)
            payloads.append((alert.alert_id, alert.to_json()))
        client = broker.client(device)
        publishers.append(PacedPublisher(client, broker.topics.alert(device), payloads))
    attacker = broker.client("sensor-001")
    agg_client_id = replica.settings.mqtt.client_id

    refusals: dict[str, int] = {}

    def connect_as(client_id: str) -> int:
        client = broker.new_client("sensor-001", client_id=client_id)
        reason = client.connect()
        client.disconnect()
        return int(reason.value)

    attacks: list[tuple[str, Callable[[], int]]] = [
        ("takeover of the aggregator's client id", lambda: connect_as(agg_client_id)),
        ("takeover of another device's client id", lambda: connect_as("cam-001")),
        (
            "subscribe to the replicas' share group",
            lambda: attacker.subscribe(f"$share/{SHARE_GROUP}/cwg/v1/devices/+/alert")[0].value,
        ),
        (
            "subscribe to a share group of its own",
            lambda: attacker.subscribe("$share/g/cwg/v1/devices/+/alert")[0].value,
        ),
        ("subscribe to #", lambda: attacker.subscribe("#")[0].value),
        ("subscribe to $SYS/#", lambda: attacker.subscribe("$SYS/#")[0].value),
        (
            "subscribe to every device's feedback",
            lambda: attacker.subscribe("cwg/v1/devices/+/feedback")[0].value,
        ),
    ]

    for p in publishers:
        p.start()
    time.sleep(0.5)  # the flow is under way before the first attack
    for what, attack in attacks:
        refusals[what] = attack()
        time.sleep(0.4)
    for p in publishers:
        p.join(DURATION_S + 30)

    assert refusals == {what: NOT_AUTHORIZED for what, _ in attacks}
    # Nobody was knocked off: the devices and the aggregator kept their connections.
    for p in publishers:
        assert not p.client.disconnected.is_set(), f"{p.topic}: the publisher was disconnected"
    wait_until(lambda: all(p.answered() for p in publishers), timeout=15, what="every PUBACK")
    assert [f for p in publishers for f in p.failed()] == []
    sent = set().union(*(p.acked() for p in publishers))
    assert len(sent) == RATE * DURATION_S

    wait_until(
        lambda: count(replica, "SELECT count(*) FROM alerts") >= len(sent),
        timeout=30,
        what=f"{len(sent)} alerts pooled",
    )
    time.sleep(0.5)  # a late copy would arrive now
    pooled = count(replica, "SELECT count(*) FROM alerts")
    distinct = count(replica, "SELECT count(DISTINCT alert_id) FROM alerts")
    assert (pooled, distinct) == (len(sent), len(sent)), "lost or doubled alerts"
    missing = [
        a
        for a in sorted(sent)[:: max(1, len(sent) // 200)]
        if count(replica, "SELECT count(*) FROM alerts WHERE alert_id = ?", a) != 1
    ]
    assert missing == []
    # No message reached the aggregator twice (a takeover or a stolen share would redeliver).
    assert replica.ingest.stats().messages == len(sent)
    assert replica.ingest.stats().connected
    # The attacker got nothing: its refused subscriptions deliver no traffic.
    attacker.expect_nothing(0.3)
