"""The publisher against a real Mosquitto: drain in order, PUBACK then feedback, resends,
status."""

from __future__ import annotations

import getpass
import json
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from contract import (
    AlertV1,
    DeviceState,
    FeedbackBatchV1,
    FeedbackItem,
    FeedbackV1,
    Location,
    Outcome,
    RejectReason,
    Severity,
    StatusV1,
    new_alert_id,
    utcnow,
)
from contract.topics import DeviceChannel
from edge.config import Broker, Tls
from edge.health import AgentMetrics, Heartbeat
from edge.outbox import Outbox
from edge.publisher import Backoff, Publisher

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle

DEVICE = "cam-001"


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def enqueue(box: Outbox, n: int) -> list[AlertV1]:
    out = []
    for _ in range(n):
        alert, _ = box.enqueue(
            lambda seq: AlertV1(
                alert_id=new_alert_id(DEVICE),
                device_id=DEVICE,
                seq=seq,
                type="zone_intrusion",
                severity=Severity.HIGH,
                confidence=0.8,
                observed_at=utcnow(),
                location=Location(lat=27.5612, lon=120.5335),
            )
        )
        out.append(alert)
    return out


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


def make_publisher(broker: BrokerHandle, outbox: Outbox, password: str | None = None) -> Publisher:
    return Publisher(
        device_id=DEVICE,
        kind="camera",
        broker=Broker(
            host=broker.host,
            port=broker.port,
            topic_prefix=broker.prefix,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
        ),
        username=DEVICE,
        password=password if password is not None else broker.password(DEVICE),
        outbox=outbox,
    )


def test_backoff_grows_randomized_and_capped() -> None:
    b = Backoff(0.5, 8.0)
    delays = [b.next() for _ in range(8)]
    for n, d in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**n)
        assert ceiling / 2 <= d <= ceiling
    assert len({round(d, 6) for d in delays}) > 4  # randomized
    b.reset()
    assert b.next() <= 0.5


def test_drains_outbox_in_order_and_marks_on_puback(broker: BrokerHandle, outbox: Outbox) -> None:
    sub = broker.client("aggregator")
    sub.subscribe(broker.topics.alert(DEVICE))
    sub.subscribe(broker.topics.status(DEVICE))
    queued = enqueue(outbox, 30)
    pub = make_publisher(broker, outbox)
    pub.start()
    try:
        msgs = sub.expect(31)
        status = [m for m in msgs if m.topic.endswith("/status")]
        alerts = [
            AlertV1.model_validate_json(m.payload) for m in msgs if m.topic.endswith("/alert")
        ]
        assert [a.seq for a in alerts] == list(range(30))
        assert [a.alert_id for a in alerts] == [a.alert_id for a in queued]
        online = StatusV1.model_validate_json(status[0].payload)
        assert online.state is DeviceState.ONLINE
        assert online.kind == "camera"
        wait_for(lambda: outbox.unsent() == 0, what="every alert acknowledged by the broker")
        # No aggregator answers here: acknowledged by the broker, they wait for feedback.
        assert outbox.depth() == outbox.stats().awaiting_feedback == 30
        # New alerts are sent as they arrive.
        enqueue(outbox, 2)
        pub.wake()
        assert [AlertV1.model_validate_json(m.payload).seq for m in sub.expect(2)] == [30, 31]
        wait_for(lambda: outbox.unsent() == 0, what="new alerts acknowledged")
        assert pub.stats.alerts_acked == 32
        assert pub.stats.alerts_refused == 0
    finally:
        pub.stop()


def test_retained_status_and_clean_shutdown(broker: BrokerHandle, outbox: Outbox) -> None:
    pub = make_publisher(broker, outbox)
    pub.start()
    wait_for(pub.connected.is_set, what="connect")
    pub.submit_status(StatusV1(device_id=DEVICE, state=DeviceState.ONLINE, at=utcnow()))
    late = broker.client("integrator")
    late.subscribe(broker.topics.status(DEVICE))
    first = late.expect(1)[0]
    assert first.retain  # a subscriber arriving later still learns the state
    assert StatusV1.model_validate_json(first.payload).state is DeviceState.ONLINE
    pub.stop()
    # The submitted status may still be on its way; the last word is the offline one.
    seen = [StatusV1.model_validate_json(m.payload) for m in late.expect(1)]
    while seen[-1].state is DeviceState.ONLINE:
        seen += [StatusV1.model_validate_json(m.payload) for m in late.expect(1)]
    assert seen[-1].state is DeviceState.OFFLINE
    assert seen[-1].reason == "shutdown"
    assert seen[-1].kind == "camera"


def test_outage_queues_then_delivers_in_order(broker: BrokerHandle, outbox: Outbox) -> None:
    sub = broker.client(
        "aggregator", client_id="agg-outage", clean_start=False, session_expiry_s=600
    )
    sub.subscribe(broker.topics.alert(DEVICE))
    pub = make_publisher(broker, outbox)
    pub.start()
    try:
        wait_for(pub.connected.is_set, what="connect")
        enqueue(outbox, 5)
        pub.wake()
        sub.expect(5)
        time.sleep(0.3)  # let the subscriber's PUBACKs reach the broker before it stops
        broker.stop()
        wait_for(lambda: not pub.connected.is_set(), what="disconnect")
        enqueue(outbox, 20)  # written while the broker is away: they wait in the outbox
        pub.wake()
        time.sleep(0.3)
        assert outbox.unsent() == 20
        broker.start()
        got = [AlertV1.model_validate_json(m.payload).seq for m in sub.expect(20, timeout=20)]
        assert got == list(range(5, 25))
        wait_for(lambda: outbox.unsent() == 0, what="acknowledged after the outage")
        sub.expect_nothing(0.5)
        assert pub.stats.connects >= 2
    finally:
        pub.stop()


def test_feedback_is_counted_and_rejections_logged(
    broker: BrokerHandle, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    pub = make_publisher(broker, outbox)
    pub.start()
    try:
        wait_for(pub.connected.is_set, what="connect")
        time.sleep(0.2)  # SUBACK of the feedback subscription
        agg = broker.client("aggregator")
        topic = broker.topics.feedback(DEVICE)
        caplog.set_level(logging.INFO, logger="edge.publisher")
        agg.publish(
            topic,
            FeedbackV1(
                device_id=DEVICE,
                alert_id="cam-001-abc",
                seq=4,
                outcome=Outcome.REJECTED,
                reason=RejectReason.UNKNOWN_TYPE,
                detail="type 'x' is not in the catalogue",
                dead_letter_id=17,
                at=utcnow(),
            ).to_json(),
        )
        agg.publish(
            topic,
            FeedbackV1(
                device_id=DEVICE,
                alert_id="cam-001-def",
                outcome=Outcome.ACCEPTED,
                event_id=3,
                at=utcnow(),
            ).to_json(),
        )
        agg.publish(
            topic,
            FeedbackBatchV1(
                device_id=DEVICE,
                items=[
                    FeedbackItem(alert_id="cam-001-g", seq=5, outcome=Outcome.MERGED, event_id=3),
                    FeedbackItem(alert_id="cam-001-h", seq=6, outcome=Outcome.MERGED, event_id=3),
                    FeedbackItem(alert_id="cam-001-i", seq=7, outcome=Outcome.OUT_OF_AREA),
                ],
                at=utcnow(),
            ).to_json(),
        )
        agg.publish(topic, b"{not json")
        wait_for(lambda: pub.stats.feedback_invalid == 1, what="four feedback messages")
        assert pub.stats.feedback == {"rejected": 1, "accepted": 1, "merged": 2, "out_of_area": 1}
        rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert rejected
        assert rejected[0].levelno == logging.WARNING
        assert "17" in rejected[0].getMessage()
        assert "unknown_type" in rejected[0].getMessage()
    finally:
        pub.stop()


def test_refused_credentials_retry_without_crashing(broker: BrokerHandle, outbox: Outbox) -> None:
    pub = make_publisher(broker, outbox, password="wrong")
    enqueue(outbox, 1)
    pub.start()
    try:
        wait_for(lambda: pub.stats.connect_failures >= 2, what="repeated refusals")
        assert not pub.connected.is_set()
        assert outbox.depth() == 1
    finally:
        pub.stop()


def test_telemetry_goes_out(broker: BrokerHandle, outbox: Outbox) -> None:
    from contract import Reading, TelemetryV1

    sub = broker.client("aggregator")
    sub.subscribe(broker.topics.device_filter(DeviceChannel.TELEMETRY))
    pub = make_publisher(broker, outbox)
    pub.start()
    try:
        pub.submit_telemetry(
            TelemetryV1(
                device_id=DEVICE,
                sent_at=utcnow(),
                readings=[Reading(quantity="noise_db", value=55.0, unit="dB")],
            )
        )
        msg = sub.expect(1)[0]
        assert json.loads(msg.payload)["readings"][0]["value"] == 55.0
    finally:
        pub.stop()


def test_inflight_is_capped(broker: BrokerHandle, outbox: Outbox) -> None:
    sub = broker.client("aggregator")
    sub.subscribe(broker.topics.alert(DEVICE))
    enqueue(outbox, 300)
    pub = Publisher(
        device_id=DEVICE,
        kind="camera",
        broker=Broker(
            host=broker.host, port=broker.port, topic_prefix=broker.prefix, max_inflight=5
        ),
        username=DEVICE,
        password=broker.password(DEVICE),
        outbox=outbox,
    )
    pub.start()
    try:
        peak = 0
        deadline = time.monotonic() + 20
        while outbox.unsent() and time.monotonic() < deadline:
            peak = max(peak, pub.inflight)
            time.sleep(0.001)
        assert outbox.unsent() == 0
        assert 1 <= peak <= 5
        seqs = [AlertV1.model_validate_json(m.payload).seq for m in sub.expect(300)]
        assert seqs == list(range(300))
    finally:
        pub.stop()


def test_oversized_alert_goes_without_its_snapshot(
    broker_factory: Callable[..., BrokerHandle], outbox: Outbox
) -> None:
    import cv2
    import numpy as np

    from contract import encode_snapshot

    small = broker_factory(message_size_limit=4096, max_packet_size=65536)
    sub = small.client("aggregator")
    sub.subscribe(small.topics.alert(DEVICE))
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", noise)
    assert ok
    assert len(buf) > 4096
    enqueue(outbox, 1)
    big, _ = outbox.enqueue(
        lambda seq: AlertV1(
            alert_id=new_alert_id(DEVICE),
            device_id=DEVICE,
            seq=seq,
            type="zone_intrusion",
            confidence=0.8,
            observed_at=utcnow(),
            location=Location(lat=27.5612, lon=120.5335),
            snapshot=encode_snapshot(buf.tobytes()),
        )
    )
    enqueue(outbox, 1)
    pub = Publisher(
        device_id=DEVICE,
        kind="camera",
        broker=Broker(
            host=small.host, port=small.port, topic_prefix=small.prefix, max_payload_bytes=4096
        ),
        username=DEVICE,
        password=small.password(DEVICE),
        outbox=outbox,
    )
    pub.start()
    try:
        got = [AlertV1.model_validate_json(m.payload) for m in sub.expect(3)]
        assert [a.seq for a in got] == [0, 1, 2]
        assert got[1].alert_id == big.alert_id
        assert got[1].snapshot is None
        wait_for(lambda: outbox.unsent() == 0, what="all three acknowledged")
        assert pub.stats.snapshots_stripped == 1
        assert pub.stats.connects == 1
    finally:
        pub.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """A Mosquitto with only a TLS listener, its certificate signed by a throwaway CA."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: apt-get install -y openssl")
    ca, ca_key = _make_ca(tmp_path, "ca")
    other_ca, _ = _make_ca(tmp_path, "other-ca")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1", cwd=tmp_path,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
        cwd=tmp_path,
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        # Started as root, mosquitto would switch to its own user and not read the key.
        f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {ca}\ncertfile {tmp_path / 'server.pem'}\nkeyfile {tmp_path / 'server.key'}\n",
        encoding="utf-8",
    )
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=out, stderr=out)
    try:
        try:
            wait_for(lambda: _port_open(port), what="the TLS listener")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; mosquitto log:\n{log.read_text()}") from None
        yield port, ca, other_ca
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_tls(tls_broker: tuple[int, Path, Path], outbox: Outbox, tmp_path: Path) -> None:
    port, ca, other_ca = tls_broker
    enqueue(outbox, 3)

    def publisher(ca_file: Path, box: Outbox) -> Publisher:
        return Publisher(
            device_id=DEVICE,
            kind="camera",
            broker=Broker(
                host="127.0.0.1",
                port=port,
                tls=Tls(ca_file=str(ca_file)),
                reconnect_min_s=0.1,
                reconnect_max_s=0.3,
            ),
            username=None,
            password=None,
            outbox=box,
        )

    stranger_box = Outbox(tmp_path / "stranger.db")
    enqueue(stranger_box, 1)
    stranger = publisher(other_ca, stranger_box)  # does not trust the broker's certificate
    stranger.start()
    trusting = publisher(ca, outbox)
    trusting.start()
    try:
        wait_for(lambda: outbox.unsent() == 0, what="alerts acknowledged over TLS")
        assert trusting.stats.alerts_acked == 3
        wait_for(lambda: stranger.stats.connect_failures >= 2, what="refused handshakes")
        assert stranger.stats.connects == 0
        assert stranger_box.depth() == 1
    finally:
        trusting.stop()
        stranger.stop()
        stranger_box.close()


def test_silence_resends_and_any_feedback_clears(broker: BrokerHandle, tmp_path: Path) -> None:
    """No answer within the timeout: the same alert_ids again; every outcome clears an alert."""
    box = Outbox(tmp_path / "resend.db", feedback_timeout_s=1.0)
    silent = broker.client("aggregator")  # takes alerts, answers nothing (yet)
    silent.subscribe(broker.topics.alert(DEVICE))
    queued = enqueue(box, 5)
    pub = make_publisher(broker, box)
    pub.start()
    try:
        first = [AlertV1.model_validate_json(m.payload) for m in silent.expect(5)]
        assert [a.alert_id for a in first] == [a.alert_id for a in queued]
        wait_for(lambda: box.unsent() == 0, what="PUBACKs")
        assert box.depth() == 5  # the broker has them; the aggregator has not answered
        again = [AlertV1.model_validate_json(m.payload) for m in silent.expect(5, timeout=5)]
        assert [a.alert_id for a in again] == [a.alert_id for a in queued]  # same ids, in order
        assert pub.stats.alerts_resent >= 5
        assert box.resent_total() >= 5
        # The heartbeat reports them.
        health = Heartbeat(
            device_id=DEVICE,
            kind="camera",
            version="test",
            metrics=AgentMetrics(),
            outbox=box,
            sink=pub,
            interval_s=30,
        ).health()
        assert health.outbox_resent is not None
        assert health.outbox_resent >= 5
        assert health.outbox_depth == 5
        # The aggregator answers: one batch, one single message, one answer naming only the seq.
        agg = broker.client("aggregator")
        topic = broker.topics.feedback(DEVICE)
        agg.publish(
            topic,
            FeedbackBatchV1(
                device_id=DEVICE,
                items=[
                    FeedbackItem(alert_id=queued[0].alert_id, seq=0, outcome=Outcome.ACCEPTED),
                    FeedbackItem(alert_id=queued[1].alert_id, seq=1, outcome=Outcome.DUPLICATE),
                    FeedbackItem(
                        alert_id=queued[2].alert_id,
                        seq=2,
                        outcome=Outcome.REJECTED,
                        reason=RejectReason.UNKNOWN_TYPE,
                    ),
                ],
                at=utcnow(),
            ).to_json(),
        )
        agg.publish(
            topic,
            FeedbackV1(
                device_id=DEVICE, alert_id=queued[3].alert_id, seq=3, outcome=Outcome.OUT_OF_AREA,
                at=utcnow(),
            ).to_json(),
        )  # fmt: skip
        agg.publish(
            topic,
            FeedbackV1(
                device_id=DEVICE, seq=4, outcome=Outcome.REJECTED,
                reason=RejectReason.INVALID_JSON, at=utcnow(),
            ).to_json(),
        )  # fmt: skip
        wait_for(lambda: box.depth() == 0, what="every alert answered")
        assert pub.stats.alerts_confirmed == 4  # by alert_id; the fifth by its seq
        # Answered alerts are not sent again (drain what was already on its way).
        while True:
            try:
                silent.expect(1, timeout=0.5)
            except AssertionError:
                break
        silent.expect_nothing(2.5)
    finally:
        pub.stop()
        box.close()


def test_feedback_sent_while_the_device_was_away_arrives(
    broker: BrokerHandle, outbox: Outbox
) -> None:
    pub = make_publisher(broker, outbox)
    pub.start()
    queued = enqueue(outbox, 3)
    pub.wake()
    wait_for(lambda: outbox.unsent() == 0, what="PUBACKs")
    pub.stop()
    assert outbox.depth() == 3
    # The device is away; its persistent session holds the answers for it (QoS 1).
    broker.client("aggregator").publish(
        broker.topics.feedback(DEVICE),
        FeedbackBatchV1(
            device_id=DEVICE,
            items=[
                FeedbackItem(alert_id=a.alert_id, seq=a.seq, outcome=Outcome.MERGED) for a in queued
            ],
            at=utcnow(),
        ).to_json(),
    )
    again = make_publisher(broker, outbox)
    again.start()
    try:
        wait_for(lambda: outbox.depth() == 0, what="answers queued while away")
        assert again.stats.alerts_confirmed == 3
        assert again.stats.alerts_resent == 0
    finally:
        again.stop()


def test_against_a_real_aggregator_every_alert_is_answered(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    from aggregator.config import Settings
    from aggregator.service import build_aggregator

    aggregator = build_aggregator(
        Settings.model_validate(
            {
                "data_dir": tmp_path / "agg",
                "mqtt": {
                    "host": broker.host,
                    "port": broker.port,
                    "password": broker.password("aggregator"),
                    "client_id": "agg-publisher-test",
                    "topic_prefix": broker.prefix,
                },
                "batch": {"max_messages": 50, "linger_ms": 10},
            }
        )
    )
    aggregator.start()
    box = Outbox(tmp_path / "real.db", feedback_timeout_s=5.0)
    pub = make_publisher(broker, box)
    try:
        assert aggregator.ingest.wait_connected(5)
        enqueue(box, 200)
        pub.start()
        wait_for(lambda: box.depth() == 0, timeout=20, what="the aggregator's answers")
        assert pub.stats.alerts_confirmed == 200
        assert pub.stats.alerts_resent == 0
        assert sum(pub.stats.feedback.values()) == 200
    finally:
        pub.stop()
        box.close()
        aggregator.stop()
