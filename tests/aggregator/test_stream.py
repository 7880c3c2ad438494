"""The live stream (WebSocket and SSE) fed by the real ingest pipeline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from aggregator.fanout.stream import FRAME_CHARS, ClientQueue, frame
from aggregator.service import Service

from .conftest import grid_in_community, interior, make_alert, offset, wait_until
from .operator_support import (
    COMMUNITY_A,
    COMMUNITY_B,
    PASSWORD,
    Api,
    publish,
    running_service,
)


@pytest.fixture
def service(broker: Any, tmp_path: Path) -> Iterator[Service]:
    with running_service(broker, tmp_path) as s:
        yield s


@pytest.fixture
def api(service: Service) -> Iterator[Api]:
    a = Api(service.url)
    yield a
    a.close()


def ws_url(service: Service, **params: str) -> str:
    query = httpx.QueryParams(params)
    return f"{service.url.replace('http', 'ws', 1)}/api/v1/stream?{query}"


class Items:
    """A stream socket read item by item: a frame is one item or a batch of them, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[list[dict[str, Any]]] = []
        self._pending: list[dict[str, Any]] = []

    def recv(self, timeout: float) -> dict[str, Any]:
        if not self._pending:
            message = orjson.loads(self.ws.recv(timeout=timeout))
            if message.get("kind") == "batch":
                # Only two or more go as a batch: one goes as itself.
                assert len(message["items"]) >= 2, message
                batch = message["items"]
            else:
                batch = [message]
            self.frames.append(batch)
            self._pending.extend(batch)
        return self._pending.pop(0)


@contextmanager
def stream(service: Service, token: str, **params: str) -> Iterator[Items]:
    """A WebSocket that has authenticated with its first message (the token is never in the
    URL) and been answered ``authenticated``."""
    with connect(ws_url(service, **params)) as ws:
        ws.send(orjson.dumps({"token": token}).decode())
        reply = orjson.loads(ws.recv(timeout=5))
        assert reply["kind"] == "authenticated", reply
        yield Items(ws)


def collect(items: Items, seconds: float) -> list[dict[str, Any]]:
    """Every item that arrives within ``seconds``."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            out.append(items.recv(timeout=remaining))
        except TimeoutError:
            break
    return out


def until(items: Items, pred: Any, seconds: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        msg = items.recv(timeout=remaining)
        if pred(msg):
            return msg
    raise AssertionError("no matching stream message in time")


def read_until_closed(items: Items) -> tuple[list[dict[str, Any]], ConnectionClosed]:
    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            received.append(items.recv(timeout=5))
        except ConnectionClosed as exc:
            return received, exc
    raise AssertionError("the server never closed the slow client's socket")


def test_stream_is_scoped_filtered_and_carries_events_alerts_and_lifecycle(
    broker: Any, service: Service, api: Api
) -> None:
    with (
        stream(service, api.token("comm_a"), alerts="1") as comm_a,
        stream(service, api.token("comm_b")) as comm_b,
        stream(service, api.token("admin"), type="smoke_fire", alerts="1") as admin_fire,
        stream(service, api.token("police")) as police,
    ):
        wait_until(lambda: service.hub.client_count == 4, what="four stream clients")
        lat, lon = interior(grid_in_community(0, 4))
        publish(broker, make_alert("cam-001", lat, lon, type="smoke_fire"))
        publish(broker, make_alert("cam-002", *interior(grid_in_community(1, 4)), type="gas_leak"))
        first = until(comm_a, lambda m: m["kind"] == "event")
        publish(broker, make_alert("cam-002", *offset(lat, lon, east_m=20), seq=2))  # merges

        got_a = [first, *collect(comm_a, 2.0)]
        kinds = [(m["kind"], m.get("change") or m.get("outcome")) for m in got_a]
        assert kinds.count(("event", "created")) == 1
        assert kinds.count(("event", "updated")) == 1
        assert ("alert", "accepted") in kinds
        assert ("alert", "merged") in kinds
        for m in got_a:
            code = m["event"]["grid_code"] if m["kind"] == "event" else m["grid_code"]
            assert code.startswith(COMMUNITY_A)
        notice = next(m for m in got_a if m.get("change") == "created")
        assert notice["schema"] == "event/v1"
        created = notice["event"]
        assert created["type"] == "smoke_fire"

        got_b = collect(comm_b, 0.5)
        assert {m["event"]["type"] for m in got_b if m["kind"] == "event"} == {"gas_leak"}
        assert all(
            (m["event"]["grid_code"] if m["kind"] == "event" else m["grid_code"]).startswith(
                COMMUNITY_B
            )
            for m in got_b
        )
        got_admin = collect(admin_fire, 0.5)
        assert got_admin
        assert {m["event"]["type"] if m["kind"] == "event" else m["type"] for m in got_admin} == {
            "smoke_fire"
        }
        assert collect(police, 0.5) == []  # neither fire nor gas is the police's

        # An operator's lifecycle step reaches the stream too.
        r = api.post(f"/api/v1/events/{created['event_id']}/verify", "comm_a")
        assert r.status_code == 200
        step = until(comm_a, lambda m: m["kind"] == "event" and m["change"] == "updated")
        assert step["event"]["status"] == "verified"
        assert collect(comm_b, 0.3) == []


def closed_with(ws: ClientConnection, seconds: float = 10.0) -> int | None:
    """The close code the server ends ``ws`` with (after any messages it still sends)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            message = orjson.loads(ws.recv(timeout=seconds))
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        assert message.get("kind") != "authenticated", message
    raise AssertionError("the server kept the socket open")


def test_stream_refuses_missing_bad_token_and_bad_filters(service: Service, api: Api) -> None:
    # A forged token, a message that is not {"token": …}, or a binary frame: closed with 1008.
    for first in ('{"token": "forged-token"}', "token=abc", '{"token": ""}', b"\x00\x01"):
        with connect(ws_url(service)) as ws:
            ws.send(first)
            assert closed_with(ws) == 1008, first
    assert service.hub.client_count == 0
    with (
        pytest.raises(InvalidStatus) as info,
        connect(ws_url(service, grid="x")),
    ):
        pass
    assert info.value.response.status_code == 400
    r = api.http.get("/api/v1/stream/sse", headers={"Authorization": "Bearer forged"})
    assert r.status_code == 401


def test_stream_takes_no_token_from_the_url(service: Service, api: Api) -> None:
    """A valid token in the query string is not accepted, for the WebSocket (which then waits
    for its first message and closes after the timeout) nor for SSE."""
    token = api.token("admin")
    started = time.monotonic()
    with connect(ws_url(service, token=token)) as ws:
        assert closed_with(ws, 10) == 1008
    assert 4.0 <= time.monotonic() - started < 9.0  # closed by the first-message timeout
    # A client of its own: ``api.http`` holds the login's stream cookie.
    r = httpx.get(
        f"{service.url}/api/v1/stream/sse",
        params={"token": token, "access_token": token, "max_seconds": "1"},
        timeout=10,
    )
    assert r.status_code == 401
    assert service.hub.client_count == 0


def test_slow_consumer_is_dropped_told_why_and_ingest_goes_on(broker: Any, tmp_path: Path) -> None:
    # Queue of one message: the event and the alert outcome of a single alert already overflow.
    with running_service(broker, tmp_path, stream_queue=1) as service:
        api = Api(service.url)
        try:
            with stream(service, api.token("admin")) as ws:
                wait_until(lambda: service.hub.client_count == 1, what="the stream client")
                cam = broker.client("cam-001")
                alerts = [
                    make_alert(
                        "cam-001", *interior(grid_in_community(0, i)), type="thrown_object", seq=i
                    )
                    for i in range(10)
                ]
                codes = cam.publish_many(
                    broker.topics.alert("cam-001"), [a.to_json() for a in alerts]
                )
                assert not any(c.is_failure for c in codes)
                received, closed = read_until_closed(ws)
                assert received[-1] == {"kind": "dropped", "reason": "slow consumer"}
                assert ws.frames[-1] == [received[-1]]  # the notice goes alone
                assert closed.rcvd is not None
                assert closed.rcvd.code == 1013
            # Ingest did not wait for the slow client: every alert is pooled.
            items = wait_until(
                lambda: (lambda xs: xs if len(xs) >= 10 else None)(
                    api.get("/api/v1/events", "admin", type="thrown_object").json()["items"]
                ),
                what="ten events",
            )
            assert len(items) == 10
            assert "cwg_stream_dropped_clients_total 1" in api.get("/metrics", "admin").text
        finally:
            api.close()


@pytest.mark.parametrize("auth", ["header", "cookie"])
def test_server_sent_events(broker: Any, service: Service, auth: str) -> None:
    http = httpx.Client(base_url=service.url, timeout=10)
    r = http.post("/api/v1/auth/token", json={"username": "comm_a", "password": PASSWORD})
    assert r.status_code == 200
    # The login's cookie: HttpOnly, SameSite=Strict, sent only to the stream's paths.
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/api/v1/stream" in cookie
    headers = {}
    if auth == "header":
        http.cookies.clear()
        headers["Authorization"] = f"Bearer {r.json()['access_token']}"
    with http.stream(
        "GET", "/api/v1/stream/sse", params={"max_seconds": "5"}, headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        assert next(lines) == ": connected"
        publish(
            broker, make_alert("cam-001", *interior(grid_in_community(0, 1)), type="smoke_alarm")
        )
        for line in lines:
            if line.startswith("data: "):
                message = orjson.loads(line[6:])
                break
        else:
            raise AssertionError("the stream ended without a message")
    http.close()
    # One SSE event per frame: an item, or a batch of them (the alert's event and outcome).
    got = message["items"] if message["kind"] == "batch" else [message]
    assert {m["kind"] for m in got} <= {"event", "alert"}
    assert any(m["kind"] == "event" and m["change"] == "created" for m in got), got
    assert service.hub.client_count == 0 or wait_until(
        lambda: service.hub.client_count == 0, what="SSE client gone"
    )


def test_a_tick_of_changes_is_one_frame(broker: Any, service: Service, api: Api) -> None:
    """Ten alerts committed together make ten events: the client gets them as a batch frame
    (or a few, if the commit straddles a look at the pool), not a frame each."""
    with stream(service, api.token("admin")) as ws:
        wait_until(lambda: service.hub.client_count == 1, what="the stream client")
        cam = broker.client("cam-001")
        alerts = [
            make_alert("cam-001", *interior(grid_in_community(0, i)), type="gas_leak", seq=i)
            for i in range(10)
        ]
        codes = cam.publish_many(broker.topics.alert("cam-001"), [a.to_json() for a in alerts])
        assert not any(c.is_failure for c in codes)
        got = [until(ws, lambda m: m.get("change") == "created", 5.0)]
        got += collect(ws, 1.5)
        created = [m for m in got if m["kind"] == "event" and m["change"] == "created"]
        assert len({m["event"]["event_id"] for m in created}) == 10
        assert len(created) == 10
        assert len(ws.frames) <= 4, [len(f) for f in ws.frames]
        assert max(len(f) for f in ws.frames) >= 3


def test_a_frame_keeps_queue_order_and_is_capped() -> None:
    queue = ClientQueue(maxsize=100)
    texts = [orjson.dumps({"kind": "alert", "n": i, "pad": "x" * 90}).decode() for i in range(50)]
    for i, text in enumerate(texts):
        assert queue.offer(("alert", i), text)
    # a waiting item that changes again keeps its place and carries its latest text
    newer = orjson.dumps({"kind": "alert", "n": 3, "pad": "newer"}).decode()
    assert queue.offer(("alert", 3), newer)
    expected = [*texts[:3], newer, *texts[4:]]
    first = queue.take(max_chars=1000)
    assert 1 <= len(first) < 50
    assert sum(len(t) + 1 for t in first) <= 1000 + 1
    rest = queue.take(max_chars=FRAME_CHARS)
    assert first + rest == expected
    assert queue.empty()
    # a frame of one is the item itself; a batch is valid JSON with the items in order
    assert frame(first[:1]) == first[0]
    assert orjson.loads(frame(rest))["items"] == [orjson.loads(t) for t in rest]
    assert orjson.loads(frame(rest))["kind"] == "batch"
    # an item larger than the cap still goes, alone
    huge = "y" * 2000
    queue.offer("huge", huge)
    queue.offer("small", "z")
    assert queue.take(max_chars=1000) == [huge]
    assert queue.take(max_chars=1000) == ["z"]
