"""Three aggregator replicas on one PostgreSQL pool, everything real: one Mosquitto (dynamic
security, a provisioned account per device), one PostgreSQL 15 (a database of its own per
test), and three ``gateway run`` processes, each with its own data directory and MQTT session,
on one shared subscription (``--share-group``), writing the same pool (``CWG_POOL_URL``).

- three cameras' bursts of one fire, split by the broker over the three replicas: one event;
- two devices report each of 200 incidents at the same moment, so the two alerts of an incident
  reach two replicas together: never two events for one incident;
- one replica SIGKILLed while four devices raise 1,000 alerts/s through real edge outboxes: the
  others carry on; restarted (as a supervisor would), its session hands back what it held, and
  every alert is pooled exactly once;
- a replica lost for good: Mosquitto 2.0 goes on handing its persistent session a share of the
  group's messages, so its session is ended (a clean-start connection with its client id);
  the devices' outboxes resend what it held, and the two others pool every alert once;
- PostgreSQL restarted mid-stream: nothing lost, and ingest resumes within 10 s;
- an operator logged in on replica B's API sees on its live stream, within 1 s, an event that
  another replica committed.

``pytest -s`` prints the figures of each check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from contract import AlertV1, Location, Severity, new_alert_id, utcnow

from .ingest_kit import ROOT, AlertStream, fast_dir, wait_for
from .pg_replica_kit import (
    Replica,
    offset,
    pg_tally,
    places,
    poll,
    pooled_of,
    replicas,
    rows,
    scalar,
    try_scalar,
    wait_ready,
)

if TYPE_CHECKING:
    from tests.conftest import BrokerHandle
    from tests.pgsupport import PgServer

pytestmark = pytest.mark.slow


def alert(
    device_id: str, lat: float, lon: float, *, type_: str, seq: int, observed_at: Any = None
) -> AlertV1:
    return AlertV1(
        alert_id=new_alert_id(device_id),
        device_id=device_id,
        seq=seq,
        type=type_,
        confidence=0.9,
        observed_at=observed_at or utcnow(),
        location=Location(lat=lat, lon=lon),
    )


def figures(title: str, **values: Any) -> None:
    print(f"\n{title}: " + ", ".join(f"{k} {v}" for k, v in values.items()))


def per_replica(reps: dict[str, Replica]) -> dict[str, int]:
    return {n: r.pooled() for n, r in reps.items()}


# ---------------------------------------------------------------------------- 1


def test_three_cameras_bursts_split_over_three_replicas_make_one_event(
    broker: BrokerHandle, tmp_path: Path, pg_url: str
) -> None:
    cams = ["cam-001", "cam-002", "cam-003"]
    broker.add_device("cam-003")
    [(lat, lon)] = places(1, 500)
    bursts, per_burst = 4, 15
    with replicas(broker, tmp_path, pg_url) as reps:
        clients = {c: broker.client(c) for c in cams}

        def camera(i: int, cam: str) -> None:
            seq = 0
            for _ in range(bursts):
                payloads = []
                for k in range(per_burst):
                    here = offset(lat, lon, 30 * i, 10 * (k % 5))
                    payloads.append(alert(cam, *here, type_="smoke_fire", seq=seq).to_json())
                    seq += 1
                codes = clients[cam].publish_many(broker.topics.alert(cam), payloads)
                assert not any(c.is_failure for c in codes)
                time.sleep(0.05)

        threads = [threading.Thread(target=camera, args=(i, c)) for i, c in enumerate(cams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        total = len(cams) * bursts * per_burst
        wait_for(lambda: pooled_of(pg_url, cams) == total, 30, f"{total} alerts pooled")
        work = per_replica(reps)
        events = scalar(pg_url, "SELECT count(*) FROM events")
        row = scalar(pg_url, "SELECT array[alert_count, device_count] FROM events")
        accepted = scalar(pg_url, "SELECT count(*) FROM alerts WHERE outcome = 'accepted'")
        batches = scalar(pg_url, "SELECT count(*) FROM batches WHERE size > 0")
        figures(
            "three cameras",
            alerts=total,
            events=events,
            per_replica=work,
            batches=batches,
            alert_and_device_count=row,
        )
        # every replica took part of the stream…
        assert all(n > 0 for n in work.values()), work
        assert sum(work.values()) == total, work
        # …and together they made one event of the one fire
        assert events == 1
        assert row == [total, 3]
        assert accepted == 1


# ---------------------------------------------------------------------------- 2


def test_two_alerts_of_one_incident_at_two_replicas_at_once_make_one_event_200_times(
    broker: BrokerHandle, tmp_path: Path, pg_url: str
) -> None:
    incidents = 200
    # ebike_in_lift merges within 10 m: places 60 m apart are 200 separate incidents
    spots = places(incidents, 60)
    devices = ["cam-001", "cam-002"]
    with replicas(broker, tmp_path, pg_url) as reps:
        clients = [broker.client(d) for d in devices]
        topics = [broker.topics.alert(d) for d in devices]
        mids: list[list[int]] = [[], []]
        ids: dict[str, int] = {}
        started = time.monotonic()
        for i, (lat, lon) in enumerate(spots):
            at = utcnow()
            pair = [
                alert(devices[0], lat, lon, type_="ebike_in_lift", seq=i, observed_at=at),
                alert(devices[1], *offset(lat, lon, 3, 3), type_="ebike_in_lift", seq=i,
                      observed_at=at),
            ]  # fmt: skip
            # back to back: the broker hands consecutive messages to different members of the
            # group, so the two alerts of an incident reach two replicas at the same moment
            for k, a in enumerate(pair):
                ids[a.alert_id] = i
                mids[k].append(clients[k].paho.publish(topics[k], a.to_json(), qos=1).mid)
            # a pause between pairs: the broker reads each connection in chunks, and two
            # devices' chunks of several alerts would reach the group as A A A B B B, so that
            # both alerts of an incident could go to one replica; paused, they alternate
            time.sleep(0.003)
        sent_s = time.monotonic() - started
        total = 2 * incidents
        wait_for(lambda: pooled_of(pg_url, devices) == total, 30, f"{total} alerts pooled")
        with_pool = rows(
            pg_url,
            "SELECT a.alert_id, a.event_id, b.id, b.started_at, b.committed_at"
            " FROM alerts a JOIN batches b ON b.id = a.batch_id",
        )
        by_incident: dict[int, list[tuple[Any, ...]]] = {}
        for r in with_pool:
            by_incident.setdefault(ids[r[0]], []).append(r)
        split = concurrent = 0
        for pair_rows in by_incident.values():
            (_, _, b1, s1, c1), (_, _, b2, s2, c2) = pair_rows
            if b1 != b2:
                split += 1
                # a replica commits its batches one after another: two batches whose spans
                # overlap were two replicas' at the same time
                if s1 < c2 and s2 < c1:
                    concurrent += 1
        events = scalar(pg_url, "SELECT count(*) FROM events")
        doubled = scalar(
            pg_url,
            "SELECT count(*) FROM (SELECT event_id FROM alerts GROUP BY event_id"
            " HAVING count(*) <> 2 OR count(DISTINCT device_id) <> 2) AS x",
        )
        figures(
            "200 incidents, two reports each",
            sent_in_s=round(sent_s, 2),
            events=events,
            incidents_split_over_two_batches=split,
            of_which_batches_overlapping_in_time=concurrent,
            per_replica=per_replica(reps),
        )
        assert len(by_incident) == incidents
        assert events == incidents, "two events for one incident"
        assert doubled == 0
        # the check means something only if the pairs really met different replicas together
        assert split >= incidents * 3 // 4, split
        assert concurrent >= 40, concurrent


# ---------------------------------------------------------------------------- 3 and 4


class PlacedStream(AlertStream):
    """The edge outbox and publisher of ``ingest_kit``, for a device at a place of its own."""

    def __init__(self, broker: BrokerHandle, device_id: str, where: Path, spot: Any) -> None:
        super().__init__(broker, device_id, where / f"{device_id}.db", feedback_timeout_s=2.0)
        self.spot = spot

    def _build(self, seq: int) -> AlertV1:
        return AlertV1(
            alert_id=new_alert_id(self.device_id),
            device_id=self.device_id,
            seq=seq,
            type="noise_over_limit",
            severity=Severity.MEDIUM,
            confidence=0.9,
            observed_at=utcnow(),
            location=Location(lat=self.spot[0], lon=self.spot[1]),
        )


@contextmanager
def devices(broker: BrokerHandle, tmp_path: Path, n: int) -> Iterator[list[PlacedStream]]:
    """``n`` sensors, each at its own place (2 km apart: mostly in different lock cells), with
    real edge outboxes (in memory) and publishers, connected."""
    ids = [f"sensor-{k:03d}" for k in range(1, n + 1)]
    for d in ids:
        if d not in broker.accounts:
            broker.add_device(d, "sensor")
    with fast_dir(tmp_path / "edge") as where:
        streams = [
            PlacedStream(broker, d, where, s) for d, s in zip(ids, places(n, 2000), strict=True)
        ]
        try:
            for s in streams:
                s.start()
            for s in streams:
                wait_for(s.publisher.connected.is_set, 10, f"{s.device_id} connected")
            yield streams
        finally:
            for s in streams:
                s.stop()


def one_event_per_device(url: str, device_ids: list[str]) -> bool:
    """Each device's alerts (one place each) are one event, holding all of them."""
    events = rows(
        url,
        "SELECT e.id, count(*), min(e.alert_count) FROM events e JOIN alerts a"
        " ON a.event_id = e.id GROUP BY e.id",
    )
    per_device = rows(url, "SELECT count(DISTINCT event_id) FROM alerts GROUP BY device_id")
    assert len(events) == len(device_ids), events
    assert all(n == alert_count for _, n, alert_count in events), events
    assert [n for (n,) in per_device] == [1] * len(device_ids), per_device
    return True


def drained(streams: list[PlacedStream], timeout: float) -> None:
    """Wait until every device has heard back about every alert it raised."""
    for s in streams:
        s.finish()
    wait_for(lambda: all(s.outbox.depth() == 0 for s in streams), timeout, "every alert answered")


def test_sigkill_of_one_replica_at_1000_alerts_per_second(
    broker: BrokerHandle, tmp_path: Path, pg_url: str
) -> None:
    rate, seconds, kill_at, down_s = 1000, 14.0, 4.0, 5.0
    with replicas(broker, tmp_path, pg_url) as reps, devices(broker, tmp_path, 4) as streams:
        names = [s.device_id for s in streams]
        for s in streams:
            s.produce(rate / len(streams), seconds)
        time.sleep(kill_at)
        victim = reps["a"]
        before = pooled_of(pg_url, names) or 0
        others_before = {n: reps[n].pooled() for n in ("b", "c")}
        victim.kill()
        killed = time.monotonic()
        time.sleep(down_s)
        during = (pooled_of(pg_url, names) or 0) - before
        others_during = {n: reps[n].pooled() - others_before[n] for n in ("b", "c")}
        carry_rate = during / (time.monotonic() - killed)
        # as a supervisor would: the killed replica comes back on its own session
        victim.start()
        wait_ready(victim)
        for s in streams:
            s.join(seconds + 10)
        drained(streams, 60)
        raised = [i for s in streams for i in s.ids]
        wait_for(lambda: pooled_of(pg_url, names) == len(raised), 15, "the last commits")
        t = pg_tally(pg_url, names, raised)
        resent = sum(s.outbox.resent_total() for s in streams)
        figures(
            "SIGKILL at 1,000/s",
            raised=t.raised,
            raised_per_s=round(t.raised / seconds),
            stored=t.stored,
            lost=t.lost,
            doubled=t.doubled,
            pooled_while_a_was_down_per_s=round(carry_rate),
            b_c_while_a_down=others_during,
            resent_by_outboxes=resent,
            # what the restarted replica met, by outcome: its session had kept the alerts in
            # flight to it and those the broker went on handing to it while it was dead; the
            # outboxes had resent them meanwhile, so most come back as duplicates
            a_after_restart=victim.outcomes(),
        )
        assert (t.lost, t.doubled, t.unknown) == (0, 0, 0), t
        assert one_event_per_device(pg_url, names)
        assert t.raised >= 0.5 * rate * seconds, t  # alerts really flowed (a busy box makes fewer)
        # the others carried on without it
        assert all(v > 0 for v in others_during.values()), others_during
        assert carry_rate >= 0.4 * t.raised / seconds, carry_rate  # of the rate achieved


def test_a_replica_lost_for_good_is_retired_and_the_others_pool_everything(
    broker: BrokerHandle, tmp_path: Path, pg_url: str
) -> None:
    """A replica whose machine is gone: Mosquitto (2.0) keeps handing its persistent session a
    share of the group's messages while it is away, so its session is ended (a clean-start
    connection with its client id, as an operator would); the alerts it held are resent by
    the devices' outboxes, and the two others pool every alert once."""
    rate, seconds, kill_at, retire_after = 1000, 10.0, 3.0, 2.0
    with replicas(broker, tmp_path, pg_url) as reps, devices(broker, tmp_path, 4) as streams:
        names = [s.device_id for s in streams]
        for s in streams:
            s.produce(rate / len(streams), seconds)
        time.sleep(kill_at)
        victim = reps["a"]
        victim.kill()
        time.sleep(retire_after)
        retire = broker.new_client("aggregator", client_id=victim.client_id, clean_start=True)
        # clean start discards the session the dead replica left (with what it held), and the
        # disconnect ends this one (no session expiry): the group is b and c from now on
        assert not retire.connect().is_failure
        retire.disconnect()
        retired = time.monotonic()
        for s in streams:
            s.join(seconds + 10)
        drained(streams, 60)
        answered_s = time.monotonic() - retired
        raised = [i for s in streams for i in s.ids]
        wait_for(lambda: pooled_of(pg_url, names) == len(raised), 15, "the last commits")
        t = pg_tally(pg_url, names, raised)
        figures(
            "replica lost for good",
            raised=t.raised,
            stored=t.stored,
            lost=t.lost,
            doubled=t.doubled,
            resent_by_outboxes=sum(s.outbox.resent_total() for s in streams),
            every_alert_answered_s_after_retiring=round(answered_s, 1),
            b_c=per_replica({n: reps[n] for n in ("b", "c")}),
        )
        assert not victim.alive()
        assert (t.lost, t.doubled, t.unknown) == (0, 0, 0), t
        assert one_event_per_device(pg_url, names)
        assert t.raised >= 0.5 * rate * seconds, t  # alerts really flowed (a busy box makes fewer)


def test_postgresql_restarted_mid_stream(
    broker: BrokerHandle, tmp_path: Path, pg_url: str, pg_server: PgServer
) -> None:
    rate, seconds, restart_at = 300, 10.0, 3.0
    with replicas(broker, tmp_path, pg_url), devices(broker, tmp_path, 2) as streams:
        names = [s.device_id for s in streams]
        for s in streams:
            s.produce(rate / len(streams), seconds)
        time.sleep(restart_at)
        down = time.time()
        pg_server.restart()
        up = time.time()
        resumed: float | None = None
        for _ in poll(30, 0.1):
            resumed = try_scalar(
                pg_url, "SELECT min(committed_at) FROM batches WHERE committed_at > %s", up
            )
            if resumed is not None:
                break
        assert resumed is not None, "no batch committed within 30 s of the restart"
        for s in streams:
            s.join(seconds + 10)
        drained(streams, 60)
        raised = [i for s in streams for i in s.ids]
        wait_for(lambda: pooled_of(pg_url, names) == len(raised), 15, "the last commits")
        t = pg_tally(pg_url, names, raised)
        figures(
            "PostgreSQL restarted",
            raised=t.raised,
            stored=t.stored,
            lost=t.lost,
            doubled=t.doubled,
            server_away_s=round(up - down, 2),
            next_commit_after_server_back_s=round(resumed - up, 2),
            next_commit_after_restart_began_s=round(resumed - down, 2),
        )
        assert (t.lost, t.doubled, t.unknown) == (0, 0, 0), t
        assert one_event_per_device(pg_url, names)
        assert resumed - up <= 10.0


# ---------------------------------------------------------------------------- 5

OPERATOR, OPERATOR_PASSWORD = "duty-officer", "replica b duty password"


def add_operator(pg_url: str, data_dir: Path) -> None:
    """``gateway accounts add`` against the replicas' pool, as an administrator would."""
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "accounts", "--data-dir", str(data_dir),
         "add", OPERATOR, "--level", "admin", "--password-stdin"],
        input=OPERATOR_PASSWORD + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CWG_POOL_URL": pg_url},
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout


def test_an_operator_on_replica_b_sees_live_what_replica_a_committed(
    broker: BrokerHandle, tmp_path: Path, pg_url: str
) -> None:
    with replicas(broker, tmp_path, pg_url, http=("b",)) as reps:
        add_operator(pg_url, tmp_path / "admin")
        b = reps["b"]
        base = f"http://127.0.0.1:{b.http_port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            wait_for(lambda: _up(http), 30, f"replica b's API\n{b.output()}")
            r = http.post(
                "/api/v1/auth/token", json={"username": OPERATOR, "password": OPERATOR_PASSWORD}
            )
            assert r.status_code == 200, r.text
            token = r.json()["access_token"]
        device = "sensor-001"
        client = broker.client(device)
        spots = places(12, 400)
        seen: list[tuple[str, float]] = []  # (replica that committed it, commit → on B's stream)
        with connect(f"ws://127.0.0.1:{b.http_port}/api/v1/stream") as ws:
            ws.send(orjson.dumps({"token": token}).decode())
            assert orjson.loads(ws.recv(timeout=5))["kind"] == "authenticated"
            for seq, (lat, lon) in enumerate(spots):
                if sum(1 for n, _ in seen if n != "b") >= 3:
                    break
                created = {n: r.events_created() for n, r in reps.items()}
                a = alert(device, lat, lon, type_="smoke_alarm", seq=seq)
                assert not client.publish(broker.topics.alert(device), a.to_json()).is_failure
                event = _event_on_stream(ws, a.location, 5.0)
                arrived = time.time()
                committed = scalar(
                    pg_url,
                    "SELECT b.committed_at FROM alerts a JOIN batches b ON b.id = a.batch_id"
                    " WHERE a.alert_id = %s",
                    a.alert_id,
                )
                by = _creator(reps, created)
                seen.append((by, arrived - float(committed)))
                assert event["event_id"] == scalar(
                    pg_url, "SELECT event_id FROM alerts WHERE alert_id = %s", a.alert_id
                )
        figures(
            "operator on replica b",
            events=len(seen),
            commit_to_stream_s={f"{n}#{i}": round(s, 3) for i, (n, s) in enumerate(seen)},
        )
        # replicas share nothing but the broker and PostgreSQL: no pool file beside any of them
        local = sorted(
            str(f.relative_to(tmp_path))
            for d in [*(r.data_dir for r in reps.values()), tmp_path / "admin"]
            if d.exists()
            for f in d.rglob("*")
            if f.name.startswith("pool.db") or f.parent.name == "snapshots"
        )
        assert local == [], local
        others = [s for n, s in seen if n != "b"]
        assert others, f"no event was committed by another replica than b: {seen}"
        assert max(others) < 1.0, seen


def _up(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def _event_on_stream(ws: Any, where: Location, timeout: float) -> dict[str, Any]:
    """The ``created`` event notice at ``where`` on the stream (other items are skipped)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        message = orjson.loads(ws.recv(timeout=remaining))
        items = message["items"] if message.get("kind") == "batch" else [message]
        for item in items:
            event = item.get("event") if item.get("kind") == "event" else None
            if (
                event is not None
                and item.get("change") == "created"
                and abs(event["location"]["lat"] - where.lat) < 1e-9
                and abs(event["location"]["lon"] - where.lon) < 1e-9
            ):
                return dict(event)
    raise AssertionError(f"no created event at {where} on replica b's stream within {timeout} s")


def _creator(reps: dict[str, Replica], before: dict[str, int]) -> str:
    """The replica whose events_created counter moved since ``before``."""
    for _ in poll(5):
        moved = [n for n, r in reps.items() if r.events_created() > before[n]]
        if moved:
            assert len(moved) == 1, moved
            return moved[0]
    raise AssertionError("no replica counted the event it created")
