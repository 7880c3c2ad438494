"""A small bounded load run through the real broker: zero loss and sane latency figures."""

from __future__ import annotations

import os
import random
import re
import resource
import socket
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest
from pydantic import ValidationError

from aggregator.grids import GridIndex, default_grid_file
from aggregator.ingest.mqtt import publish_packet
from contract import AlertV1, default_catalogue
from simulators.errors import LoadError
from simulators.loadgen import (
    LoadConfig,
    RawConnection,
    build_templates,
    percentiles,
    preprovision_fleet,
    render,
    run_load,
    stamp_now,
)
from simulators.stack import GatewayStack


def test_templates_render_valid_unique_alerts() -> None:
    templates = build_templates(
        "dev-1",
        8,
        random.Random(1),
        GridIndex.from_geojson(default_grid_file()),
        default_catalogue(),
        snapshot=True,
    )
    alerts = [
        AlertV1.model_validate_json(render(t, f"run-dev-1-{i}", i, stamp_now()), strict=True)
        for i, t in enumerate(templates)
    ]
    assert [a.alert_id for a in alerts] == [f"run-dev-1-{i}" for i in range(8)]
    assert [a.seq for a in alerts] == list(range(8))
    assert all(a.snapshot_bytes() for a in alerts)
    assert len({a.type for a in alerts}) > 1


def test_load_is_always_bounded() -> None:
    with pytest.raises(ValidationError, match="always bounded"):
        LoadConfig(rate=100)
    assert LoadConfig(rate=100, duration_s=3, count=1000).total == 300


def test_percentiles() -> None:
    p = percentiles([i / 1000 for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50)
    assert p["p99"] == pytest.approx(99)
    assert p["max"] == pytest.approx(100)


@pytest.mark.parametrize(
    ("mode", "publishers"),
    [("mosquitto_pub", None), ("paho", None), ("paho", 5), ("raw", None), ("raw", 5)],
)
def test_small_run_has_zero_loss(
    gateway_stack: GatewayStack, mode: str, publishers: int | None
) -> None:
    # 5 paho publishers: one worker process serves 3 clients on its loop, the other 2
    report = run_load(
        LoadConfig(rate=1000, count=2000, mode=mode, publishers=publishers),
        gateway_stack,
        gateway_stack.pool_path,
    )
    assert report.publishers == (publishers or 2)
    assert report.errors == []
    assert report.sent == report.pooled == 2000
    assert report.zero_loss
    lat = report.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 10_000
    assert 500 < report.send_rate < 1500
    assert report.ingest_rate > 300
    summary = report.summary()
    assert "ZERO LOSS" in summary
    assert "p99" in summary


@pytest.mark.parametrize(
    ("mode", "alert_ids"), [("raw", "uuid7"), ("mosquitto_pub", "uuid7"), ("raw", "uuid4")]
)
def test_alert_ids_are_the_edge_agents_in_time_order_per_device_or_random(
    gateway_stack: GatewayStack, mode: str, alert_ids: str
) -> None:
    report = run_load(
        LoadConfig(rate=2000, count=2000, mode=mode, alert_ids=alert_ids),
        gateway_stack,
        gateway_stack.pool_path,
    )
    assert report.zero_loss
    # closing(): the connection's own context manager commits, it does not close
    with closing(sqlite3.connect(f"file:{gateway_stack.pool_path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT device_id, alert_id FROM alerts WHERE alert_id LIKE ? ORDER BY id",
            (f"{report.run_tag}-%",),
        ).fetchall()
    by_device: dict[str, list[str]] = {}
    for device_id, alert_id in rows:
        assert alert_id.startswith(f"{device_id}-")
        tail = alert_id.removeprefix(f"{device_id}-")
        assert len(tail) == 32
        u = uuid.UUID(hex=tail)
        if alert_ids == "uuid7":
            assert (u.version, u.variant) == (7, uuid.RFC_4122)
        by_device.setdefault(device_id, []).append(alert_id)
    assert len(by_device) == report.publishers
    # each device's alerts arrive in the order it sent them; uuid7 ids sort in that order
    in_order = [ids == sorted(ids) for ids in by_device.values()]
    assert all(in_order) if alert_ids == "uuid7" else not any(in_order)


def _raw(room: int) -> tuple[RawConnection, socket.socket, list[str]]:
    ours, broker_end = socket.socketpair()
    ours.setblocking(False)
    errors: list[str] = []
    return RawConnection("dev-1", ours, "cwg/devices/dev-1/alert", room, errors), broker_end, errors


def _received(sock: socket.socket) -> bytes:
    sock.settimeout(1)
    return sock.recv(1 << 20)


def test_raw_connection_keeps_to_its_room_and_never_reuses_a_packet_id_in_flight() -> None:
    conn, broker, _ = _raw(room=3)
    topic = b"cwg/devices/dev-1/alert"
    conn.pending.extend([b"a", b"b", b"c", b"d", b"e"])
    conn.pump()
    assert _received(broker) == b"".join(
        publish_packet(topic, m, p) for m, p in [(1, b"a"), (2, b"b"), (3, b"c")]
    )
    assert conn.unacked == {1, 2, 3}
    assert len(conn.pending) == 2
    broker.sendall(b"\x40\x02\x00\x02")  # PUBACK for 2 (MQTT 5, success, short form)
    conn.pump()  # reads it; the next pump frames one more
    conn.pump()
    assert _received(broker) == publish_packet(topic, 4, b"d")
    assert conn.unacked == {1, 3, 4}
    # wrapping around 65,535 skips 0 and every identifier still unacknowledged
    conn._mid = 65534
    conn.unacked.discard(4)
    conn.pending.append(b"f")
    broker.sendall(b"\x40\x02\x00\x03")
    conn.pump()
    conn.pump()
    assert _received(broker) == publish_packet(topic, 65535, b"e") + publish_packet(topic, 2, b"f")
    assert conn.unacked == {1, 65535, 2}
    conn.close()
    assert _received(broker) == b"\xe0\x00"  # DISCONNECT, normal
    broker.close()


def test_raw_connection_parses_pubacks_cut_anywhere_and_reports_failures() -> None:
    conn, broker, errors = _raw(room=10)
    conn.pending.extend([b"x"] * 4)
    conn.pump()
    _received(broker)
    # PUBACK 1 short form, PUBACK 2 with reason 0x87 (not authorized), PUBACK 3 with reason 0
    # and an empty property length, a PINGRESP, PUBACK 4: one byte at a time
    stream = b"\x40\x02\x00\x01" + b"\x40\x03\x00\x02\x87" + b"\x40\x04\x00\x03\x00\x00"
    stream += b"\xd0\x00" + b"\x40\x02\x00\x04"
    for i in range(len(stream)):
        broker.sendall(stream[i : i + 1])
        time.sleep(0.001)
        conn.pump()
    assert conn.unacked == set()
    assert not conn.busy()
    assert errors == ["dev-1: PUBACK reason code 0x87"]
    conn.close()
    broker.close()


def test_raw_connection_stops_on_a_disconnect_from_the_broker() -> None:
    conn, broker, _ = _raw(room=10)
    broker.sendall(b"\xe0\x01\x8d")  # DISCONNECT, keep alive timeout
    time.sleep(0.01)
    with pytest.raises(LoadError, match="reason code 0x8d"):
        conn.pump()
    broker.close()
    with pytest.raises(LoadError, match="closed the connection"):
        conn.pump()
    conn.close()


@pytest.mark.parametrize("n", [300, 1100])
def test_a_fleet_with_a_connection_and_an_account_per_device(tmp_path: Path, n: int) -> None:
    """``n`` devices, each its own account and connection (client id = device id), over the
    broker's TLS listener, in one generator process that must raise its open-file limit past
    the one it is given (and, at 1,100, serve descriptors past 1,024, where select() stops);
    every alert pooled, every device heard, telemetry besides."""
    tag = f"fl{n}"
    stack = GatewayStack(tmp_path / "stack")
    provisioner = preprovision_fleet(stack, tag, n)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        stack.start()
        # Below what one process holding n connections needs: the run must raise it. This
        # process keeps well under it (a session's fixtures hold a few descriptors, and
        # tests/aggregator/test_resources.py sees that stopped services keep none); more means
        # something leaks them, and its own next open() would fail, so say so here.
        in_use = len(os.listdir("/proc/self/fd"))
        assert in_use + 64 < n - 44, f"this test process already holds {in_use} descriptors"
        resource.setrlimit(resource.RLIMIT_NOFILE, (n - 44, hard))
        report = run_load(
            LoadConfig(
                rate=2 * n,
                count=6 * n,
                mode="raw",
                publishers=n,
                workers=1,
                connect_rate=n / 2,
                telemetry_interval_s=1.0,
            ),
            provisioner,
            stack.pool_path,
            run_tag=tag,
        )
        log_text = stack.broker_settings.log_file.read_text(encoding="utf-8", errors="replace")
        pool_path = stack.pool_path
        with closing(sqlite3.connect(f"file:{pool_path}?mode=ro", uri=True)) as db:
            per_device = dict(
                db.execute(
                    "SELECT device_id, COUNT(*) FROM alerts WHERE alert_id LIKE ? "
                    "GROUP BY device_id",
                    (f"{tag}-%",),
                ).fetchall()
            )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stack.stop()
    assert report.errors == []
    assert report.publishers == n
    assert report.sent == report.pooled == 6 * n
    assert report.zero_loss
    # A steady per-device rate: each device sent its 6 alerts, and each was its own device.
    assert per_device == {f"{tag}-p{i:02d}": 6 for i in range(n)}
    # Each connection authenticated as its own account, bound to its own client id.
    accounts = set(re.findall(rf" as ({tag}-p\d+) \(.*?u'({tag}-p\d+)'\)", log_text))
    assert {a for a, u in accounts if a == u} == {f"{tag}-p{i:02d}" for i in range(n)}
    assert 1 < report.connect_seconds < 30  # n at n/2 per second: about two seconds
    assert report.telemetry_sent >= n  # each device once a second for about 3 s
    assert 0 < report.latency_ms["p50"] <= report.latency_ms["p99"] < 10_000
    assert f"{n:,} connections" in report.summary()
