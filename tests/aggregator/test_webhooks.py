"""Outbound webhooks against a real local HTTP receiver, on both pool backends.

The receiver is a threading HTTP server on a free loopback port. It checks every request with
a Standard Webhooks verifier written here from the specification (not the sender's code):
``webhook-signature`` holds space-separated ``v1,<base64>`` signatures, each the HMAC-SHA256 of
``{webhook-id}.{webhook-timestamp}.{raw body}`` keyed with the base64-decoded part of the
``whsec_`` secret; the timestamp must be within five minutes of the receiver's clock.

Messages are enqueued through a transaction of the outbox's own, as a case step's hook does
inside the step's transaction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from aggregator.cases import Action, ForbiddenError
from aggregator.config import WebhookSettings
from aggregator.fanout.webhooks import WebhookWorker, WorkerOptions, sign
from aggregator.pool.cases import StepRecord, Tx
from aggregator.pool.outbox import (
    Delivery,
    Outbox,
    SubscriptionIn,
    WebhookMessage,
    new_secret,
    webhook_id,
)
from tests.aggregator.conftest import PoolBackend
from tests.aggregator.test_cases_store import PHOTO, Harness
from tests.pgsupport import PgServer

GRID = "440307001001000005"  # a grid code as the sample area writes them (length is free here)
TOLERANCE_S = 300


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """The Standard Webhooks check, from the specification."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not (msg_id and stamp.isdigit() and signatures):
        return False
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > TOLERANCE_S:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{stamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for part in signatures.split(" "):
        version, _, value = part.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool
    path: str = ""
    at: float = 0.0  # time.monotonic() when it arrived

    @property
    def msg(self) -> dict[str, Any]:
        loaded: dict[str, Any] = orjson.loads(self.body)
        return loaded


@dataclass
class Receiver:
    """A webhook endpoint: answers 204 to a request whose signature verifies with the secret
    of its path, 401 otherwise; ``stop()`` closes the port (connections refused) until
    ``start()`` opens it again. ``answers[path]``: scripted answers (status, headers), one
    per request, before the usual ones."""

    secrets: dict[str, str] = field(default_factory=dict)  # path → secret
    got: list[Received] = field(default_factory=list)
    answers: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                secret = receiver.secrets.get(self.path, "")
                ok = verify(secret, headers, body)
                with receiver._lock:
                    receiver.got.append(Received(headers, body, ok, self.path, time.monotonic()))
                    scripted = receiver.answers.get(self.path)
                    answer = scripted.pop(0) if scripted else (204 if ok else 401, {})
                self.send_response(answer[0])
                for name, value in answer[1].items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.got)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


def message(case: int, version: int, *, action: str = "verify", **kw: Any) -> WebhookMessage:
    return WebhookMessage(
        key=f"case:{case}:v{version}",
        type="case.step",
        case_id=str(case),
        event_type=kw.pop("event_type", "fire_lane_blocked"),
        grid_code=kw.pop("grid_code", GRID),
        action=action,
        departments=kw.pop("departments", ()),
        at=datetime(2026, 10, 1, 8, 0, tzinfo=UTC),
        data={"version": version, **kw},
    )


def wait_for(what: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return what()


def opened(backend: PoolBackend) -> Outbox:
    backend.writer()  # opening the pool migrates it (a SQLite file is made here)
    outbox = Outbox(backend.target)
    backend._closers.append(outbox.close)
    return outbox


# the receivers here listen on loopback, which a deployment refuses unless it allows it
LOOPBACK = WebhookSettings(allow_networks=["127.0.0.0/8"])


def sample(w: WebhookWorker, name: str, **labels: str) -> float | None:
    """A value of the worker's metrics, as Prometheus would scrape it."""
    return w.metrics.registry.get_sample_value(name, labels)


def worker(backend: PoolBackend, **options: Any) -> WebhookWorker:
    options.setdefault("allow_networks", tuple(LOOPBACK.allow_networks))
    options.setdefault("schedule_s", (0.2, 0.2))
    options.setdefault("poll_s", 0.05)
    options.setdefault("timeout_s", 2.0)
    options.setdefault("jitter", 0.0)
    w = WebhookWorker(backend.target, WorkerOptions(**options))
    w.start()
    backend._closers.append(w.stop)
    return w


# ---------------------------------------------------------------------------- signatures


def test_signature_is_the_standard_webhooks_one() -> None:
    """The example of the specification's reference libraries, recomputed by both sides."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = '{"test": 2432232314}'
    header = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert header == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert verify(
        secret,
        {
            "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "webhook-timestamp": "1614265330",
            "webhook-signature": f"v1,bm9wZQ== {header}",
        },
        body.encode(),
        now=1614265330,
    )
    assert new_secret().startswith("whsec_")
    assert len(base64.b64decode(new_secret()[6:])) == 32


def test_deliveries_verify_and_follow_the_filters(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    everything, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/all")), "root")
    receiver.secrets["/all"] = secret
    narrow, narrow_secret = outbox.add_subscription(
        SubscriptionIn(
            url=receiver.url("/narrow"),
            event_types=("fire_lane_blocked",),
            grid_prefix=GRID[:12],
            department="urban_management",
            actions=("whistle",),
        ),
        "root",
    )
    receiver.secrets["/narrow"] = narrow_secret
    # a third subscriber whose secret the receiver does not hold: its signatures must fail
    other, _ = outbox.add_subscription(SubscriptionIn(url=receiver.url("/wrong")), "root")
    receiver.secrets["/wrong"] = new_secret()
    assert {s.id for s in outbox.subscriptions()} == {everything.id, narrow.id, other.id}

    assert outbox.enqueue(message(1, 2, action="verify")) == 2  # not the narrow one
    assert outbox.enqueue(message(1, 3, action="whistle", departments=("urban_management",))) == 3
    assert outbox.enqueue(message(2, 2, action="whistle", departments=("water",))) == 2
    assert outbox.enqueue(message(3, 2, action="whistle", grid_code="440307002001000001")) == 2
    assert outbox.enqueue(message(1, 2, action="verify")) == 0  # the same message: once

    w = worker(pool_backend, schedule_s=(0.2,))
    assert wait_for(lambda: outbox.counts()["pending"] == 0, 20), outbox.counts()
    w.stop()
    got = receiver.received()
    ok = [r for r in got if r.verified]
    # every delivery to the two subscribers whose secret the receiver holds arrived once and
    # verified; each of the four to /wrong was tried twice and refused
    assert len(got) == 5 + 4 * 2
    ids = {r.headers["webhook-id"] for r in ok}
    assert len(ids) == len(ok) == 5
    assert ids == {webhook_id(everything.id, k) for k in ("case:1:v2", "case:1:v3")} | {
        webhook_id(everything.id, k) for k in ("case:2:v2", "case:3:v2")
    } | {webhook_id(narrow.id, "case:1:v3")}
    first = next(r for r in ok if r.headers["webhook-id"] == webhook_id(narrow.id, "case:1:v3"))
    assert first.msg == {
        "type": "case.step",
        "timestamp": "2026-10-01T08:00:00Z",
        "data": {
            "case_id": "1",
            "event_type": "fire_lane_blocked",
            "grid_code": GRID,
            "action": "whistle",
            "departments": ["urban_management"],
            "version": 3,
        },
    }
    assert first.headers["content-type"] == "application/json"
    assert first.headers["webhook-signature"].startswith("v1,")
    # the receiver refused every try to /wrong (bad signature): dead after its one retry
    dead = outbox.deliveries(other.id, "dead")
    assert len(dead) == 4
    assert all(
        d.attempts == 2 and d.last_status == 401 and d.last_error == "HTTP 401" for d in dead
    )
    delivered = outbox.deliveries(everything.id, "delivered")
    assert [d.case_id for d in delivered] == ["1", "1", "2", "3"]
    assert all(d.attempts == 1 and d.last_status == 204 for d in delivered)
    assert outbox.counts() == {"pending": 0, "delivered": 5, "dead": 4}
    # retention deletes finished deliveries only: pending ones wait for their receiver
    assert outbox.enqueue(message(9, 2)) == 2
    assert outbox.prune(time.time() - 3600) == 0
    assert outbox.prune(time.time() + 1, limit=5) == 5
    assert outbox.prune(time.time() + 1) == 4
    assert outbox.counts() == {"pending": 2, "delivered": 0, "dead": 0}


def test_a_receiver_that_never_answers_ends_dead(pool_backend: PoolBackend) -> None:
    """Accepts the connection, reads nothing, answers nothing: each try times out, and after
    the schedule's retries the delivery is dead; the case's next message then goes too."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        port = silent.getsockname()[1]
        outbox = opened(pool_backend)
        sub, _ = outbox.add_subscription(
            SubscriptionIn(url=f"http://127.0.0.1:{port}/hook"), "root"
        )
        outbox.enqueue(message(7, 2))
        outbox.enqueue(message(7, 3))
        started = time.monotonic()
        worker(pool_backend, schedule_s=(0.2, 0.3), timeout_s=0.5)
        assert wait_for(lambda: len(outbox.deliveries(sub.id, "dead")) == 2, 30)
        elapsed = time.monotonic() - started
        dead = outbox.deliveries(sub.id, "dead")
        assert [d.webhook_id for d in dead] == [
            webhook_id(sub.id, "case:7:v2"),
            webhook_id(sub.id, "case:7:v3"),
        ]
        assert all(d.attempts == 3 and d.last_error == "ReadTimeout" for d in dead)
        assert all(d.last_status is None and d.finished_at is not None for d in dead)
        # two deliveries one after the other, three tries of 0.5 s and two waits each
        assert elapsed >= 2 * (3 * 0.5 + 0.5)
        assert outbox.counts() == {"pending": 0, "delivered": 0, "dead": 2}
    finally:
        silent.close()


# ---------------------------------------------------------------------------- workers


def test_many_workers_deliver_each_once_and_each_case_in_order(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    """Two workers of four threads each (two replicas) on one pool: every delivery arrives
    once, each case's steps in order, though the claims interleave across cases."""
    outbox = opened(pool_backend)
    _sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    cases, steps = 20, 5
    for version in range(1, steps + 1):
        for case in range(cases):
            outbox.enqueue(message(case, version))
    for _ in range(2):
        worker(pool_backend, workers=4, batch=4)
    assert wait_for(lambda: outbox.counts()["delivered"] == cases * steps, 60), outbox.counts()
    time.sleep(0.3)  # a second post of anything would land now
    got = receiver.received()
    assert all(r.verified for r in got)
    ids = [r.headers["webhook-id"] for r in got]
    assert len(ids) == len(set(ids)) == cases * steps
    for case in range(cases):
        versions = [r.msg["data"]["version"] for r in got if r.msg["data"]["case_id"] == str(case)]
        assert versions == list(range(1, steps + 1)), (case, versions)


def test_a_lease_left_by_a_dead_worker_runs_out_and_another_delivers(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    outbox.enqueue(message(5, 2))
    outbox.enqueue(message(5, 3))
    [held] = outbox.claim(10, lease_s=1.5)  # a worker that then died: only the case's head
    assert held.webhook_id == webhook_id(sub.id, "case:5:v2")
    assert outbox.claim(10, lease_s=1.5) == []  # leased, and v3 waits behind it
    started = time.monotonic()
    worker(pool_backend)
    assert wait_for(lambda: outbox.counts()["delivered"] == 2, 20)
    assert time.monotonic() - started >= 1.0  # not before the lease ran out
    assert [r.msg["data"]["version"] for r in receiver.received()] == [2, 3]
    # the dead worker, come back, marks nothing: its lease is gone
    assert not outbox.mark_dead(held, "late", None)
    assert outbox.counts() == {"pending": 0, "delivered": 2, "dead": 0}


def test_a_receiver_back_gets_its_backlog_without_waiting_out_the_delays(
    pool_backend: PoolBackend,
) -> None:
    """Deliveries that failed wait a minute before their retry; the first delivery that gets
    through to the receiver makes them due at once."""
    receiver = Receiver()
    receiver.start()
    receiver.stop()  # its port is known and closed: connections are refused
    try:
        outbox = opened(pool_backend)
        sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
        receiver.secrets["/hook"] = secret
        outbox.enqueue(message(1, 2))
        outbox.enqueue(message(2, 2))
        outbox.enqueue(message(1, 3))  # waits behind case 1's first
        worker(pool_backend, schedule_s=(60.0, 60.0), jitter=0.0)
        waiting = lambda: [d.attempts for d in outbox.deliveries(sub.id, "pending")]  # noqa: E731
        assert wait_for(lambda: waiting() == [1, 1, 0], 10), waiting()
        receiver.start()
        back = time.monotonic()
        outbox.enqueue(message(3, 2))  # new: tried at once, and it gets through
        assert wait_for(lambda: outbox.counts()["delivered"] == 4, 15), outbox.counts()
        assert time.monotonic() - back < 15  # not the minute of the schedule
        versions = [
            (r.msg["data"]["case_id"], r.msg["data"]["version"]) for r in receiver.received()
        ]
        assert versions[0] == ("3", 2)
        assert sorted(versions) == [("1", 2), ("1", 3), ("2", 2), ("3", 2)]
        assert versions.index(("1", 2)) < versions.index(("1", 3))
    finally:
        receiver.stop()


# ---------------------------------------------------------------------------- case steps


def test_case_steps_enqueue_in_their_transaction_and_arrive_in_order(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    """The case store's hook: each committed step is one delivery to each matching subscriber;
    a refused step, or one a later hook rolls back, leaves none."""
    h = Harness(pool_backend)
    outbox = Outbox(pool_backend.target)
    pool_backend._closers.append(outbox.close)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/all")), "root")
    receiver.secrets["/all"] = secret
    fire_only, fire_secret = outbox.add_subscription(
        SubscriptionIn(url=receiver.url("/fire"), department="fire"), "root"
    )
    receiver.secrets["/fire"] = fire_secret
    event_id = h.event()

    h.cases.apply_step(event_id, Action.VERIFY, h.comm, {}, 1)
    with pytest.raises(ForbiddenError):  # a department may not whistle: nothing enqueued
        h.cases.apply_step(event_id, Action.WHISTLE, h.fire, {"lead_department": "fire"}, 2)
    h.cases.apply_step(event_id, Action.WHISTLE, h.comm, {"lead_department": "fire"}, 2)

    def failing(tx: Tx, record: StepRecord) -> None:
        raise RuntimeError("after the outbox")

    h.cases.hooks.append(failing)
    with pytest.raises(RuntimeError):
        h.cases.apply_step(event_id, Action.ACCEPT_OFF_SITE, h.fire, {}, 3)
    h.cases.hooks.remove(failing)
    assert outbox.counts() == {"pending": 2 + 1, "delivered": 0, "dead": 0}
    h.cases.apply_step(event_id, Action.ACCEPT_OFF_SITE, h.fire, {}, 3)
    h.cases.apply_step(
        event_id, Action.HANDLE, h.fire, {"summary": "cleared", "photos": [PHOTO]}, 4
    )
    h.cases.apply_step(event_id, Action.ACCEPT_FEEDBACK, h.comm, {}, 5)

    worker(pool_backend, workers=2)
    assert wait_for(lambda: outbox.counts()["delivered"] == 5 + 4, 20), outbox.counts()
    got = receiver.received()
    assert all(r.verified for r in got)
    mine = [r.msg["data"] for r in got if r.headers["webhook-id"].startswith("msg_")]
    to_all = [
        r.msg["data"]
        for r in got
        if r.headers["webhook-id"]
        in {webhook_id(sub.id, f"case:{event_id}:v{v}") for v in range(2, 7)}
    ]
    assert len(mine) == 9
    assert [(d["action"], d["before"], d["after"], d["version"]) for d in to_all] == [
        ("verify", "registered", "assessing", 2),
        ("whistle", "assessing", "whistled", 3),
        ("accept_off_site", "whistled", "dept_handling", 4),
        ("handle", "dept_handling", "reviewing", 5),
        ("accept_feedback", "reviewing", "closed", 6),
    ]
    handled = to_all[3]
    assert handled["actor"] == "fire-li"
    assert handled["note"] == "cleared"
    assert handled["evidence"] == [PHOTO]
    assert handled["departments"] == ["fire"]
    assert handled["case_id"] == str(event_id)
    assert [d["clock"] for d in to_all[2]["deadlines"]] == ["feedback"]
    fire_got = outbox.deliveries(fire_only.id, "delivered")
    assert len(fire_got) == 4  # from the whistle on, when the case names the department


# ---------------------------------------------------------------------------- outage


def _backends(tmp_path: Path, pg_url: str) -> list[PoolBackend]:
    return [
        PoolBackend("sqlite", str(tmp_path / "pool.db"), tmp_path),
        PoolBackend("postgres", pg_url, tmp_path),
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_receiver_down_two_minutes_gets_everything_once_in_order(
    tmp_path: Path, pg_url: str, pg_server: PgServer
) -> None:
    """One receiver, down for two real minutes while cases keep stepping, then back: it gets
    every delivery, each ``webhook-id`` once, each case's steps in order. Both backends run at
    once (one outage, not two); on PostgreSQL two workers stand for two replicas, so the
    order also holds across workers that claim with SKIP LOCKED."""
    del pg_server
    backends = _backends(tmp_path, pg_url)
    receiver = Receiver()
    receiver.start()
    # the delays grow to 15 s and their sum (~200 s) outlasts the outage
    schedule = (1.0, 2.0, 4.0, 8.0, *([15.0] * 12))
    cases, steps = 12, 6
    try:
        outboxes = []
        for b in backends:
            outbox = opened(b)
            sub, secret = outbox.add_subscription(
                SubscriptionIn(url=receiver.url(f"/{b.name}")), "root"
            )
            receiver.secrets[f"/{b.name}"] = secret
            outboxes.append((b, outbox, sub))
            for _ in range(2 if b.is_postgres else 1):
                worker(b, schedule_s=schedule, jitter=0.2, poll_s=0.2, workers=2)

        def step(version: int) -> None:
            for _, outbox, _ in outboxes:
                for case in range(1, cases + 1):
                    outbox.enqueue(message(case, version, action=f"step{version}"))

        step(1)  # delivered while the receiver is up
        assert wait_for(lambda: len(receiver.received()) == 2 * cases, 20)
        receiver.stop()
        down_at = time.monotonic()
        for version in range(2, steps + 1):  # steps taken during the outage
            step(version)
            time.sleep(20)
        assert time.monotonic() - down_at >= 100
        time.sleep(max(0.0, 120 - (time.monotonic() - down_at)))
        for _, outbox, _ in outboxes:  # nothing got through, nothing gave up
            assert outbox.counts()["delivered"] == cases
            assert outbox.counts()["dead"] == 0
        receiver.start()  # the same port
        total = 2 * cases * steps
        assert wait_for(lambda: len(receiver.received()) >= total, 60, step=0.5), (
            len(receiver.received()),
            [o.counts() for _, o, _ in outboxes],
        )
        time.sleep(1.0)  # anything sent twice would arrive now
        got = receiver.received()
        assert all(r.verified for r in got)
        ids = [r.headers["webhook-id"] for r in got]
        assert len(ids) == len(set(ids)) == total
        for b, outbox, sub in outboxes:
            mine = [
                r
                for r in got
                if r.headers["webhook-id"]
                in {
                    webhook_id(sub.id, f"case:{c}:v{v}")
                    for c in range(1, cases + 1)
                    for v in range(1, steps + 1)
                }
            ]
            assert len(mine) == cases * steps, b.name
            for case in range(1, cases + 1):
                versions = [
                    r.msg["data"]["version"] for r in mine if r.msg["data"]["case_id"] == str(case)
                ]
                assert versions == list(range(1, steps + 1)), (b.name, case, versions)
            assert outbox.counts() == {"pending": 0, "delivered": cases * steps, "dead": 0}
            retried = [
                d for d in outbox.deliveries(sub.id, "delivered", limit=1000) if d.attempts > 1
            ]
            assert retried  # the outage made them retry
    finally:
        receiver.stop()
        for b in backends:
            b.close()


def test_the_readme_verification_example_verifies_the_specification_vector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The receiver's example in the README is run as written: the specification's signed
    example passes, an altered body or an old timestamp does not."""
    readme = (Path(__file__).parents[2] / "README.md").read_text("utf-8")
    start = readme.index("```python", readme.index("Verifying a delivery"))
    code = readme[start + len("```python") : readme.index("```", start + 9)]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README's example
    readme_verify = scope["verify"]
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,bm9wZQ== v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    body = b'{"test": 2432232314}'
    monkeypatch.setattr(time, "time", lambda: 1614265330.0)
    assert readme_verify(secret, headers, body)
    assert not readme_verify(secret, headers, b'{"test": 2432232315}')
    monkeypatch.setattr(time, "time", lambda: 1614265330.0 + 301)
    assert not readme_verify(secret, headers, body)


# ---------------------------------------------------------------------------- switching off


def test_a_disabled_subscription_queues_nothing_and_its_pending_deliveries_wait(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    assert outbox.enqueue(message(1, 2)) == 1  # queued while enabled
    off = outbox.update_subscription(sub.id, {"enabled": False}, disabled_reason="by root")
    assert off is not None
    assert not off.enabled
    assert off.disabled_reason == "by root"
    assert off.disabled_at is not None
    # disabling again keeps the first reason
    again = outbox.update_subscription(sub.id, {"enabled": False}, disabled_reason="later")
    assert again is not None
    assert again.disabled_reason == "by root"
    assert outbox.enqueue(message(1, 3)) == 0  # nothing new for a disabled one
    assert outbox.enqueue(message(2, 2)) == 0
    w = worker(pool_backend)
    time.sleep(1.0)  # the worker polls every 0.05 s: it would have posted by now
    assert receiver.received() == []
    [waiting] = outbox.deliveries(sub.id, "pending")
    assert waiting.attempts == 0  # not claimed, not dead: it waits
    assert sample(w, "cwg_webhook_pending") == 1
    on = outbox.update_subscription(sub.id, {"enabled": True, "description": "back"})
    assert on is not None
    assert on.enabled
    assert on.disabled_reason is None
    assert on.disabled_at is None
    assert on.description == "back"
    assert wait_for(lambda: outbox.counts()["delivered"] == 1, 15), outbox.counts()
    [got] = receiver.received()
    assert got.verified
    assert got.headers["webhook-id"] == webhook_id(sub.id, "case:1:v2")
    # edits: the filters and the URL
    edited = outbox.update_subscription(
        sub.id, {"event_types": ["smoke_fire"], "department": "fire", "url": receiver.url("/x")}
    )
    assert edited is not None
    assert (edited.event_types, edited.department, edited.url) == (
        ("smoke_fire",),
        "fire",
        receiver.url("/x"),
    )
    assert outbox.enqueue(message(3, 2)) == 0  # not smoke_fire
    assert outbox.update_subscription("wh_0000000000000000", {"enabled": False}) is None
    with pytest.raises(ValueError, match="not editable"):
        outbox.update_subscription(sub.id, {"secret": "whsec_x"})


def test_410_gone_disables_the_subscription_and_its_deliveries_wait(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    other, other_secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/other")), "r")
    receiver.secrets["/other"] = other_secret
    receiver.answers["/hook"] = [(410, {})]
    outbox.enqueue(message(1, 2))
    outbox.enqueue(message(2, 2))
    w = worker(pool_backend, workers=1, batch=1)
    assert wait_for(lambda: not outbox.subscription(sub.id).enabled, 15)  # type: ignore[union-attr]
    assert wait_for(lambda: outbox.counts(other.id)["delivered"] == 2, 15)
    time.sleep(0.5)  # the other case's delivery to /hook would have gone by now
    gone = outbox.subscription(sub.id)
    assert gone is not None
    assert gone.disabled_reason == "receiver answered 410 Gone"
    assert gone.disabled_at is not None
    assert [r.path for r in receiver.received()].count("/hook") == 1  # nothing after the 410
    pending = outbox.deliveries(sub.id, "pending")
    assert len(pending) == 2  # waiting, not dead
    assert sorted((d.attempts, d.last_status) for d in pending) == [(0, None), (1, 410)]
    assert sample(w, "cwg_webhook_deliveries_total", outcome="gone") == 1
    assert outbox.enqueue(message(3, 2)) == 1  # only to the other one
    outbox.update_subscription(sub.id, {"enabled": True})  # the receiver is back
    assert wait_for(lambda: outbox.counts(sub.id)["delivered"] == 2, 15), outbox.counts(sub.id)
    assert outbox.counts(sub.id) == {"pending": 0, "delivered": 2, "dead": 0}


# ---------------------------------------------------------------------------- answers


def test_parse_retry_after() -> None:
    from aggregator.fanout.webhooks import parse_retry_after

    now = 1_800_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    date = "Fri, 15 Jan 2027 08:00:30 GMT"  # 30 s after 08:00:00 GMT of that day
    at = datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after(date, at) == 30.0
    assert parse_retry_after(date, at + 60) == 0.0  # in the past: now
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None


@pytest.mark.parametrize("code", [429, 503])
def test_retry_after_puts_the_next_attempt_no_earlier(
    pool_backend: PoolBackend, receiver: Receiver, code: int
) -> None:
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    slow, slow_secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/slow")), "r")
    receiver.secrets["/slow"] = slow_secret
    capped, capped_secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/cap")), "r")
    receiver.secrets["/cap"] = capped_secret
    when = datetime.fromtimestamp(time.time() + 2.5, UTC)
    receiver.answers["/hook"] = [(code, {"retry-after": "2"})]  # delta seconds
    receiver.answers["/slow"] = [
        (code, {"retry-after": when.strftime("%a, %d %b %Y %H:%M:%S GMT")})
    ]
    receiver.answers["/cap"] = [(code, {"retry-after": "86400"})]  # a day: capped to 3 s
    outbox.enqueue(message(1, 2))
    worker(pool_backend, schedule_s=(0.2, 0.2), retry_after_max_s=3.0)
    assert wait_for(lambda: outbox.counts()["delivered"] == 3, 20), outbox.counts()
    got = receiver.received()
    for path, at_least, at_most in (("/hook", 2.0, 6.0), ("/slow", 1.3, 6.0), ("/cap", 3.0, 6.0)):
        first, second = (r for r in got if r.path == path)
        # the HTTP-date has whole seconds: up to one earlier than asked
        assert at_least <= second.at - first.at <= at_most, (path, second.at - first.at)
        assert second.verified
        assert second.headers["webhook-id"] == first.headers["webhook-id"]
    [hook] = outbox.deliveries(sub.id, "delivered")
    assert (hook.attempts, hook.last_status) == (2, 204)
    del slow, capped


def test_retry_after_shorter_than_the_schedule_does_not_shorten_it(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    receiver.answers["/hook"] = [(503, {"retry-after": "1"})]
    outbox.enqueue(message(1, 2))
    before = time.time()
    worker(pool_backend, schedule_s=(30.0, 30.0))
    assert wait_for(lambda: [d.attempts for d in outbox.deliveries(sub.id, "pending")] == [1], 10)
    [waiting] = outbox.deliveries(sub.id, "pending")
    assert waiting.next_attempt_at >= before + 30.0
    assert waiting.last_error == "HTTP 503"


def test_a_redirect_is_a_failure_and_is_not_followed(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/moved")), "root")
    receiver.secrets["/moved"] = receiver.secrets["/new"] = secret
    receiver.answers["/moved"] = [(302, {"location": receiver.url("/new")})] * 2
    receiver.answers["/moved"] += [(301, {"location": receiver.url("/new")})]
    outbox.enqueue(message(1, 2))
    w = worker(pool_backend, schedule_s=(0.1, 0.1))
    assert wait_for(lambda: outbox.counts()["dead"] == 1, 15), outbox.counts()
    assert [r.path for r in receiver.received()] == ["/moved"] * 3  # /new never asked
    [dead] = outbox.deliveries(sub.id, "dead")
    assert (dead.attempts, dead.last_status, dead.last_error) == (3, 301, "HTTP 301")
    assert sample(w, "cwg_webhook_deliveries_total", outcome="failed") == 2
    assert sample(w, "cwg_webhook_deliveries_total", outcome="dead") == 1
    assert sample(w, "cwg_webhook_attempt_seconds_count") == 3


# ---------------------------------------------------------------------------- rotation


def test_a_rotated_secret_signs_beside_the_old_one_for_the_grace_period(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    sub, old = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = old
    outbox.enqueue(message(1, 2))
    worker(pool_backend)
    assert wait_for(lambda: len(receiver.received()) == 1, 15)
    assert receiver.received()[0].headers["webhook-signature"].count("v1,") == 1
    new = outbox.rotate_secret(sub.id, grace_s=2.0)
    assert new is not None
    assert new.startswith("whsec_")
    assert new != old
    rotated = outbox.subscription(sub.id)
    assert rotated is not None
    assert rotated.secret_rotated_at is not None
    assert rotated.previous_secret_until == pytest.approx(rotated.secret_rotated_at + 2.0)
    outbox.enqueue(message(1, 3))  # in the grace period: both keys sign
    assert wait_for(lambda: len(receiver.received()) == 2, 15)
    during = receiver.received()[1]
    assert during.verified  # the receiver still has the old secret
    assert during.headers["webhook-signature"].count("v1,") == 2
    assert verify(new, during.headers, during.body)
    receiver.secrets["/hook"] = new  # the receiver switches
    until = rotated.previous_secret_until
    assert until is not None
    time.sleep(max(0.0, until - time.time()) + 0.2)
    outbox.enqueue(message(1, 4))  # after it: the new key only
    assert wait_for(lambda: len(receiver.received()) == 3, 15)
    after = receiver.received()[2]
    assert after.verified
    assert after.headers["webhook-signature"].count("v1,") == 1
    assert not verify(old, after.headers, after.body)
    assert outbox.rotate_secret("wh_0000000000000000", 1.0) is None


# ---------------------------------------------------------------------------- redelivery


def test_a_dead_delivery_sent_again_keeps_its_webhook_id(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    receiver.answers["/hook"] = [(500, {})] * 2
    outbox.enqueue(message(1, 2))
    worker(pool_backend, schedule_s=(0.1,))
    assert wait_for(lambda: outbox.counts()["dead"] == 1, 15)
    [dead] = outbox.deliveries(sub.id, "dead")
    assert outbox.redeliver(other := "wh_0000000000000000", dead.id) is None, other
    again = outbox.redeliver(sub.id, dead.id)
    assert isinstance(again, Delivery)
    assert (again.status, again.attempts, again.finished_at) == ("pending", 0, None)
    assert wait_for(lambda: outbox.counts()["delivered"] == 1, 15), outbox.counts()
    got = receiver.received()
    assert [r.headers["webhook-id"] for r in got] == [dead.webhook_id] * 3
    assert got[-1].verified
    assert got[-1].body == got[0].body
    # a delivered one may be sent again too (a receiver that lost it); a pending one may not
    assert isinstance(outbox.redeliver(sub.id, dead.id), Delivery)
    assert outbox.redeliver(sub.id, dead.id) == "pending"
    assert wait_for(lambda: len(receiver.received()) == 4, 15)


# ---------------------------------------------------------------------------- destinations


def test_destinations_that_are_not_public_are_refused() -> None:
    from aggregator.fanout.destinations import (
        AllowList,
        RefusedDestinationError,
        check_destination,
    )

    def resolving(*addresses: str) -> Callable[[str, int], list[str]]:
        return lambda host, port: list(addresses)

    none = AllowList()
    refused = {
        "http://127.0.0.1:8080/x": "loopback",
        "http://10.0.0.5/x": "private",
        "http://172.16.3.4/x": "private",
        "http://192.168.1.1/x": "private",
        "http://169.254.169.254/latest/meta-data": "link-local",
        "http://0.0.0.0/x": "unspecified",
        "http://[::1]/x": "loopback",
        "http://[::]/x": "unspecified",
        "http://[fd12:3456::1]/x": "private",
        "http://[fe80::1]/x": "link-local",
        "http://[::ffff:127.0.0.1]/x": "loopback",
        "http://100.64.1.1/x": "shared",
        "http://224.0.0.1/x": "multicast",
    }
    for url, why in refused.items():
        with pytest.raises(RefusedDestinationError, match=why):
            check_destination(url, none)
    # a name is judged by what it resolves to: every address must pass
    with pytest.raises(RefusedDestinationError, match=r"hooks\.example \(10\.1\.2\.3\)"):
        check_destination("https://hooks.example/x", none, resolving("10.1.2.3"))
    with pytest.raises(RefusedDestinationError, match="private"):
        check_destination("https://hooks.example/x", none, resolving("93.184.216.34", "10.0.0.1"))
    with pytest.raises(RefusedDestinationError, match="does not resolve"):
        check_destination("https://nowhere.invalid/x", none, resolving())
    with pytest.raises(RefusedDestinationError, match="http and https"):
        check_destination("ftp://93.184.216.34/x", none)
    # a public one passes, pinned to the address that was checked
    pinned = check_destination(
        "https://user:pw@hooks.example:8443/in?a=1", none, resolving("93.184.216.34")
    )
    assert pinned.url == "https://user:pw@93.184.216.34:8443/in?a=1"
    assert (pinned.host_header, pinned.server_name) == ("hooks.example:8443", "hooks.example")
    six = check_destination("http://[2606:4700::1111]/x", none)
    assert six.url == "http://[2606:4700::1111]/x"
    assert six.server_name is None
    # the allow-list: networks, addresses, host names
    allow = AllowList.parse(["127.0.0.0/8", "fd00::/8", "10.9.8.7", "Intranet.Example"])
    assert check_destination("http://127.0.0.1:9/x", allow).address == "127.0.0.1"
    assert check_destination("http://[fd12::1]/x", allow).address == "fd12::1"
    assert check_destination("http://10.9.8.7/x", allow).address == "10.9.8.7"
    assert check_destination("http://intranet.example/x", allow, resolving("10.0.0.1")).url == (
        "http://10.0.0.1/x"
    )
    with pytest.raises(RefusedDestinationError):
        check_destination("http://10.9.8.8/x", allow)
    with pytest.raises(RefusedDestinationError):  # ::1 is not in 127.0.0.0/8
        check_destination("http://[::1]/x", allow)
    with pytest.raises(ValueError, match="not a network"):
        AllowList.parse(["not a host"])


def test_a_refused_destination_is_not_posted_to_at_delivery(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    """A subscription whose URL became a loopback one (it was made straight in the pool,
    or its name resolves elsewhere now) is checked again at each delivery: nothing is sent."""
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    outbox.enqueue(message(1, 2))
    w = worker(pool_backend, allow_networks=(), schedule_s=(0.1,))
    assert wait_for(lambda: outbox.counts()["dead"] == 1, 15), outbox.counts()
    assert receiver.received() == []
    [dead] = outbox.deliveries(sub.id, "dead")
    assert (dead.last_error, dead.last_status) == ("destination refused", None)
    assert sample(w, "cwg_webhook_deliveries_total", outcome="dead") == 1


def test_a_host_name_is_delivered_to_the_address_it_was_checked_at(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    found = {i[4][0] for i in socket.getaddrinfo("localhost", receiver.port, socket.AF_UNSPEC)}
    if found != {"127.0.0.1"}:  # the receiver listens on 127.0.0.1 only
        pytest.skip(f"localhost resolves to {sorted(found)} here, not 127.0.0.1 alone")
    outbox = opened(pool_backend)
    url = f"http://localhost:{receiver.port}/hook"
    sub, secret = outbox.add_subscription(SubscriptionIn(url=url), "root")
    receiver.secrets["/hook"] = secret
    outbox.enqueue(message(1, 2))
    worker(pool_backend)  # 127.0.0.0/8 allowed; localhost resolves there (and to ::1 maybe)
    assert wait_for(lambda: len(receiver.received()) >= 1, 15)
    [got] = receiver.received()
    assert got.verified
    assert got.headers["host"] == f"localhost:{receiver.port}"
    del sub


def test_a_receiver_back_does_not_wake_what_it_rate_limited(
    pool_backend: PoolBackend, receiver: Receiver
) -> None:
    """A delivery that got through makes the subscription's deliveries waiting out a failure
    due at once, except those the receiver answered 429: it asked for fewer, not more."""
    outbox = opened(pool_backend)
    sub, secret = outbox.add_subscription(SubscriptionIn(url=receiver.url("/hook")), "root")
    receiver.secrets["/hook"] = secret
    receiver.answers["/hook"] = [(429, {"retry-after": "30"}), (500, {})]
    outbox.enqueue(message(1, 2))  # 429, wait 30 s
    outbox.enqueue(message(2, 2))  # 500, wait the schedule's 30 s
    before = time.time()
    worker(pool_backend, schedule_s=(30.0, 30.0), workers=1, batch=1)
    assert wait_for(lambda: len(receiver.received()) == 2, 10)
    outbox.enqueue(message(3, 2))  # gets through: wakes case 2, not case 1
    assert wait_for(lambda: outbox.counts()["delivered"] == 2, 10), outbox.counts()
    [waiting] = outbox.deliveries(sub.id, "pending")
    assert (waiting.case_id, waiting.last_status) == ("1", 429)
    assert waiting.next_attempt_at >= before + 30.0
    assert [r.msg["data"]["case_id"] for r in receiver.received()] == ["1", "2", "3", "2"]


def _tls_receiver(
    tmp_path: Path, names: list[str], secret: str
) -> tuple[ThreadingHTTPServer, Path, list[tuple[str | None, Received]]]:
    """An https receiver on 127.0.0.1 with a certificate for ``names`` from a CA of its own;
    records the TLS server name each request came with."""
    from aggregator.broker import devca

    ca = tmp_path / "ca.pem"
    devca.ensure(ca, tmp_path / "ca.key", tmp_path / "srv.pem", tmp_path / "srv.key", names)
    got: list[tuple[str | None, Received]] = []
    sni: dict[int, str | None] = {}
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")

    def on_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
        sni[id(sock)] = name

    context.sni_callback = on_sni  # type: ignore[assignment]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            ok = verify(secret, headers, body)
            got.append((sni.get(id(self.connection)), Received(headers, body, ok, self.path)))
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class TlsServer(ThreadingHTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            return context.wrap_socket(sock, server_side=True), addr

    server = TlsServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, ca, got


def test_https_to_a_name_goes_to_the_checked_address_and_checks_the_certificate_for_the_name(
    pool_backend: PoolBackend, tmp_path: Path
) -> None:
    """Posted to the address the name was checked at, the request still carries the name in
    TLS (SNI) and in Host, and the certificate must be the name's: one issued for another
    name is refused."""
    found = {i[4][0] for i in socket.getaddrinfo("localhost", 443, socket.AF_UNSPEC)}
    if found != {"127.0.0.1"}:
        pytest.skip(f"localhost resolves to {sorted(found)} here, not 127.0.0.1 alone")
    outbox = opened(pool_backend)
    good, good_ca, good_got = _tls_receiver(tmp_path / "good", ["localhost"], "")
    wrong, wrong_ca, wrong_got = _tls_receiver(tmp_path / "wrong", ["other.example"], "")
    try:
        port = good.server_address[1]
        sub, secret = outbox.add_subscription(
            SubscriptionIn(url=f"https://localhost:{port}/hook"), "root"
        )
        outbox.enqueue(message(1, 2))
        first = worker(pool_backend, ca_file=good_ca)
        assert wait_for(lambda: outbox.counts()["delivered"] == 1, 15), outbox.counts()
        first.stop()  # the next one trusts the other CA: its only fault is the name
        [(server_name, got)] = good_got
        assert server_name == "localhost"
        assert got.headers["host"] == f"localhost:{port}"
        assert verify(secret, got.headers, got.body)
        # the same, to a receiver whose certificate names another host: refused by TLS
        wrong_port = wrong.server_address[1]
        bad, _ = outbox.add_subscription(
            SubscriptionIn(url=f"https://localhost:{wrong_port}/hook"), "root"
        )
        outbox.update_subscription(sub.id, {"enabled": False})
        outbox.enqueue(message(2, 2))
        worker(pool_backend, ca_file=wrong_ca, schedule_s=(0.1,))
        assert wait_for(lambda: outbox.counts(bad.id)["dead"] == 1, 15), outbox.counts(bad.id)
        assert wrong_got == []
        [dead] = outbox.deliveries(bad.id, "dead")
        assert dead.last_error == "ConnectError"
    finally:
        for server in (good, wrong):
            server.shutdown()
            server.server_close()
