"""What the aggregator's MQTT I/O loop holds for the broker (``aggregator/ingest/mqtt.py``) is
bounded in bytes: while the broker is connected but slow, the pool writer waits (back-pressure)
and nothing is dropped; only while it is unreachable are the oldest dropped. Real Mosquitto;
a slow broker is a stopped one (SIGSTOP of the test's own broker process, then SIGCONT)."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
import uuid
from typing import Any

import pytest

from aggregator.config import BatchSettings, MqttSettings
from aggregator.ingest.mqtt import FrameChannel, IoLoop
from aggregator.ingest.transport import ProcessTransport, ThreadTransport

BOUND = 64 * 1024  # the smallest outgoing_max_bytes the settings accept
SIZE = 16 * 1024


def settings(broker: Any, **update: Any) -> MqttSettings:
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        password=broker.password("aggregator"),
        client_id=f"agg-{uuid.uuid4().hex[:8]}",
        topic_prefix=broker.prefix,
        keepalive_s=30,  # the broker is stopped for seconds: no ping timeout meanwhile
        outgoing_max_bytes=BOUND,
        **update,
    )


@pytest.mark.parametrize("transport_cls", [ThreadTransport, ProcessTransport])
def test_a_slow_broker_holds_the_writer_back_and_nothing_is_dropped(
    broker_factory: Any, transport_cls: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker stops taking publishes (SIGSTOP) while the worker publishes 32 MB of
    notices: the worker's publish waits instead of the loop queueing or dropping them, even
    with the Receive Maximum reached by messages the worker has not acknowledged (the loop
    must still read the broker's PUBACKs). Once the broker goes on, every message arrives, in
    order."""
    caplog.set_level(logging.WARNING, logger="aggregator.ingest.mqtt")
    broker = broker_factory(max_inflight_messages=20)  # the broker's Receive Maximum to us
    pid = broker.broker.pid
    assert pid is not None
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    receive_maximum = 50
    transport = transport_cls(
        settings(broker, receive_maximum=receive_maximum),
        BatchSettings(max_messages=100, linger_ms=5),
    )
    transport.start()
    n = 2000  # 32 MB: far beyond the bound, the window and every socket buffer on the way
    published = [0]

    def flood() -> None:
        for start in range(0, n, 10):
            transport.publish(
                [
                    (broker.topics.events, i.to_bytes(4, "big") + b"x" * SIZE, 1)
                    for i in range(start, start + 10)
                ]
            )
            published[0] = start + 10

    flooder = threading.Thread(target=flood, daemon=True)
    stopped = False
    try:
        deadline = time.monotonic() + 20
        while not transport.connected():
            assert time.monotonic() < deadline, "never connected"
            assert transport.take(0.05) == []
        # The Receive Maximum reached: alerts taken and never acknowledged.
        cam = broker.client("cam-001")
        cam.publish_many(broker.topics.alert("cam-001"), [b"%d" % i for i in range(80)])
        held: list[Any] = []
        while len(held) < receive_maximum:
            assert time.monotonic() < deadline, f"only {len(held)} alerts arrived"
            held += transport.take(0.05)
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        flooder.start()
        time.sleep(2.0)
        waiting_at = published[0]
        assert flooder.is_alive(), f"all {n} published to a stopped broker without waiting"
        assert waiting_at < n // 4, f"{waiting_at} of {n} published to a stopped broker"
        os.kill(pid, signal.SIGCONT)
        stopped = False
        got = integrator.expect(n, timeout=60)
        flooder.join(30)
        assert not flooder.is_alive()
        assert [int.from_bytes(m.payload[:4], "big") for m in got] == list(range(n))
        if transport_cls is ThreadTransport:  # the child process logs to its own stderr
            text = caplog.text
            assert "back-pressure" in text
            assert "dropped" not in text.replace("nothing dropped", "")
        transport.ack(held)
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        transport.stop()


def _connected_loop(broker: Any) -> tuple[IoLoop, socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    loop = IoLoop(settings(broker), BatchSettings(), FrameChannel(theirs, blocking=False))
    return loop, ours, theirs


def test_while_the_broker_is_unreachable_the_oldest_beyond_the_bound_are_dropped(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No connection: what the worker publishes stays within the bound, newest kept, and the
    log says the broker is unreachable; once connected, what was kept goes out in order."""
    caplog.set_level(logging.WARNING, logger="aggregator.ingest.mqtt")
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    loop, ours, theirs = _connected_loop(broker)
    client = loop.client
    try:
        n = 40  # 640 KiB offered against a 64 KiB bound
        for i in range(n):
            loop._command(("publish", [(broker.topics.events, b"%04d" % i + b"x" * SIZE, 1)]))
            assert loop._out_bytes <= BOUND
        kept = len(loop._out)
        assert 0 < kept < n
        assert "broker unreachable" in caplog.text
        loop._connect()
        deadline = time.monotonic() + 20
        while not loop._connected or loop._out or loop._inflight:
            assert time.monotonic() < deadline, "kept messages not published"
            loop._pump_out()
            client.loop_write()
            sock = client.socket()
            assert sock is not None
            select.select([sock], [], [], 0.05)
            client.loop_read()
        got = integrator.expect(kept, timeout=10)
        assert [int(m.payload[:4]) for m in got] == list(range(n - kept, n))
        assert loop._out_bytes == 0
        assert "reachable again" in caplog.text
    finally:
        client.disconnect()
        client.loop_write()
        ours.close()
        theirs.close()


def test_a_connected_loop_keeps_what_the_worker_publishes_and_stops_reading_it(
    broker: Any,
) -> None:
    """Connected, over the bound: nothing is dropped, and the round stops reading the worker's
    channel until the broker has taken enough (what makes the worker wait)."""
    loop, ours, theirs = _connected_loop(broker)
    client = loop.client
    try:
        loop._connect()
        deadline = time.monotonic() + 10
        while not loop._connected:
            assert time.monotonic() < deadline, "no CONNACK"
            client.loop_read()
            client.loop_write()
        n = 40
        loop._command(("publish", [(broker.topics.events, b"x" * SIZE, 1) for _ in range(n)]))
        assert len(loop._out) == n
        assert loop._out_bytes > BOUND
        assert loop._hold_back()
        while loop._out or loop._inflight:
            assert time.monotonic() < deadline, "not published"
            loop._pump_out()
            client.loop_write()
            sock = client.socket()
            assert sock is not None
            select.select([sock], [], [], 0.05)
            client.loop_read()
        assert not loop._hold_back()
        assert loop._dropped_out == 0
    finally:
        client.disconnect()
        client.loop_write()
        ours.close()
        theirs.close()


def test_feedback_keeps_pace_with_a_writer_held_at_the_receive_maximum(broker_factory: Any) -> None:
    """A city's fleet: one feedback message per alert, and a writer slow enough that the
    Receive Maximum is reached between its commits. The broker's PUBACKs for our feedback
    share the socket with incoming alerts; were the socket left unread at the Receive Maximum,
    feedback would drain only a window's worth per commit and fall ever further behind
    (with more feedback per batch than that window, without bound)."""
    broker = broker_factory(max_inflight_messages=50)  # our feedback window
    integrator = broker.client("integrator")
    integrator.subscribe(broker.topics.events)
    receive_maximum, n, batch = 200, 3000, 100
    transport = ThreadTransport(
        settings(broker, receive_maximum=receive_maximum),
        BatchSettings(max_messages=batch, min_messages=batch, linger_ms=5),
    )
    transport.start()
    cam = broker.client("cam-001")
    sender = threading.Thread(
        target=cam.publish_many,
        args=(broker.topics.alert("cam-001"), [b"%05d" % i + b"x" * 200 for i in range(n)]),
    )
    try:
        deadline = time.monotonic() + 20
        while not transport.connected():
            assert time.monotonic() < deadline, "never connected"
            assert transport.take(0.05) == []
        sender.start()
        taken = 0
        deadline = time.monotonic() + 120
        while taken < n:
            assert time.monotonic() < deadline, f"only {taken} of {n} messages arrived"
            got = transport.take(0.05)
            if not got:
                continue
            time.sleep(0.03)  # the commit
            transport.ack(got)
            # one outcome per alert, as each device of a city's fleet hears after a commit
            transport.publish([(broker.topics.events, m.payload[:5], 1) for m in got])
            taken += len(got)
        time.sleep(0.2)  # what is in flight lands
        behind = n - integrator.messages.qsize()
        got_feedback = integrator.expect(n, timeout=60)
        assert [m.payload for m in got_feedback] == [b"%05d" % i for i in range(n)]
        assert behind <= 3 * batch, f"feedback {behind} messages behind the last commit"
    finally:
        sender.join(30)
        transport.stop()
