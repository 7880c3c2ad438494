"""The live stream under load: a client that keeps reading is never dropped at 5,000 alerts/s
(real broker, aggregator, API process and load generator), and ingest loses nothing."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from aggregator.access.auth import Level
from aggregator.config import HttpSettings
from aggregator.service import Service
from simulators.loadgen import LoadConfig, run_load
from simulators.stack import CredentialsDir

from .conftest import aggregator_settings, wait_until
from .operator_support import FAST_HASHER, PASSWORD, Api

RATE = 5000
SECONDS = 30


class Reader:
    """Reads a stream socket as fast as messages come, on a thread; notes how it ended."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.kinds: dict[str, int] = {}
        self.frames = 0
        self.closed: ConnectionClosed | None = None
        self.last: dict[str, Any] = {}
        self.updates: dict[int, list[float]] = {}  # event id → when its updates arrived
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = orjson.loads(self.ws.recv(timeout=0.5))
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                self.closed = exc
                return
            self.frames += 1
            now = time.monotonic()
            # a frame is one item or a batch of them
            for item in message["items"] if message.get("kind") == "batch" else [message]:
                kind = item.get("kind", "?")
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                self.last = item
                if kind == "event" and item.get("change") == "updated":
                    self.updates.setdefault(item["event"]["event_id"], []).append(now)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def read_to_the_end(ws: ClientConnection, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ws.recv(timeout=5)


@contextmanager
def open_stream(service: Service, token: str, **params: str) -> Iterator[ClientConnection]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    with connect(f"{service.url.replace('http', 'ws', 1)}/api/v1/stream?{query}") as ws:
        ws.send(orjson.dumps({"token": token}).decode())  # the token goes first, not in the URL
        yield ws


def test_a_reading_client_stays_connected_at_5000_alerts_per_second(
    broker: Any, tmp_path: Path
) -> None:
    settings = aggregator_settings(broker, tmp_path / "agg")
    service = Service(settings, port=0, log_level="warning", password_hasher=FAST_HASHER)
    service.auth.create_account("admin", Level.ADMIN, password=PASSWORD)
    service.start()
    api = Api(service.url)
    try:
        assert service.aggregator.ingest.wait_connected(5)
        token = api.token("admin")
        with open_stream(service, token) as ws:
            events = Reader(ws)  # every event in the pool, paced
            wait_until(lambda: service.hub.client_count == 1, what="the stream client")
            provisioner = CredentialsDir(
                tmp_path / "load-credentials",
                topic_prefix=broker.prefix,
                registry=broker.registry_path,
                broker_state=broker.settings.state_dir,
                broker_host=broker.host,
                broker_port=broker.port,
            )
            started = time.monotonic()
            report = run_load(
                LoadConfig(rate=RATE, duration_s=SECONDS, mode="raw", drain_timeout_s=90),
                provisioner,
                settings.pool,
            )
            took = time.monotonic() - started
            time.sleep(1.5)  # the last held updates go out within the interval
            events.stop()
            assert report.errors == []
            assert report.sent == RATE * SECONDS
            assert report.zero_loss, report.summary()
            assert report.send_rate > 0.8 * RATE, report.summary()
            assert events.closed is None, f"the reading client was closed: {events.closed!r}"
            assert events.kinds.get("dropped", 0) == 0
            # It saw the load, paced: event notices only, each event at most once a second.
            received = events.kinds.get("event", 0)
            assert received > 0
            assert "alert" not in events.kinds
            gaps = [
                b - a for times in events.updates.values() for a, b in itertools.pairwise(times)
            ]
            assert gaps, "no event was updated twice"
            # at most one update per event per second (arrival jitter of a poll tick allowed)
            assert min(gaps) > 0.7, sorted(gaps)[:5]
            assert service.hub.client_count == 1
            shown = api.get("/metrics", "admin").text
            assert "cwg_stream_dropped_clients_total 0" in shown
            # batched: a frame per look at the pool (4/s), not one per notice
            assert events.frames < received / 3, (events.frames, received)
            print(
                f"{report.sent} alerts in {took:.1f} s; the reader got {received} event notices "
                f"({received / took:.0f}/s) in {events.frames} frames; ingest p99 "
                f"{report.latency_ms.get('p99', 0):.0f} ms"
            )
    finally:
        api.close()
        service.stop()


@contextmanager
def silent_stream(service: Service, token: str) -> Iterator[ClientConnection]:
    """A raw-alerts stream whose socket holds little: a small fixed receive buffer (no
    autotuning), no compression and no pings, so that a client that reads nothing soon
    leaves the server with messages it cannot send."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", service.port))
    url = f"{service.url.replace('http', 'ws', 1)}/api/v1/stream?alerts=1"
    with connect(url, sock=sock, compression=None, ping_interval=None, max_queue=1) as ws:
        ws.send(orjson.dumps({"token": token}).decode())
        yield ws


def test_only_the_client_that_stops_reading_is_dropped(broker: Any, tmp_path: Path) -> None:
    # Raw alert outcomes (alerts=1) at 2,000/s fill a silent client's socket buffers in
    # seconds; the queue is made huge so that only the stall rule can drop anyone.
    settings = aggregator_settings(broker, tmp_path / "agg", http=HttpSettings(stream_stall_s=4))
    service = Service(
        settings, port=0, log_level="warning", password_hasher=FAST_HASHER, stream_queue=1_000_000
    )
    service.auth.create_account("admin", Level.ADMIN, password=PASSWORD)
    service.start()
    api = Api(service.url)
    try:
        assert service.aggregator.ingest.wait_connected(5)
        token = api.token("admin")
        with (
            open_stream(service, token, alerts="1") as reading_ws,
            silent_stream(service, token) as silent,
        ):
            reading = Reader(reading_ws)
            wait_until(lambda: service.hub.client_count == 2, what="two stream clients")
            provisioner = CredentialsDir(
                tmp_path / "load-credentials",
                topic_prefix=broker.prefix,
                registry=broker.registry_path,
                broker_state=broker.settings.state_dir,
                broker_host=broker.host,
                broker_port=broker.port,
            )
            report = run_load(
                LoadConfig(rate=2000, duration_s=15, mode="raw", drain_timeout_s=60),
                provisioner,
                settings.pool,
            )
            assert report.zero_loss, report.summary()
            # The silent one is dropped (and let go of), the reading one never.
            wait_until(lambda: service.hub.client_count == 1, 30, "the silent client dropped")
            time.sleep(1)
            reading.stop()
            assert reading.closed is None, f"the reading client was closed: {reading.closed!r}"
            assert reading.kinds.get("dropped", 0) == 0
            assert reading.kinds.get("alert", 0) >= report.sent * 0.9
            assert "cwg_stream_dropped_clients_total 1" in api.get("/metrics", "admin").text
            # What the silent client finds when it reads at last: the end of its stream.
            with pytest.raises(ConnectionClosed):
                read_to_the_end(silent, 30)
    finally:
        api.close()
        service.stop()
