"""The event pool on a real PostgreSQL 15: migrations, exact and semantic dedup, replicas
committing one incident at once, the same outcomes as the SQLite pool, a server restart,
the change feed and retention."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool.model import AlertIn, Batch, BatchResult, DeadLetterIn, StatusIn
from aggregator.pool.postgres import (
    CHANNEL,
    LOCK_CELL_DEG,
    ChangeListener,
    LockMode,
    PgEventPool,
    PgSnapshotStore,
    PoolUnavailableError,
    is_pg_pool_fault,
    migrate,
    migrations,
)
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import EventPool
from contract import (
    AlertV1,
    EventStatus,
    Outcome,
    RejectReason,
    Severity,
    Topics,
    default_catalogue,
)
from tests.pgsupport import PgServer

from .conftest import GRIDS, OUTSIDE, grid_in_community, interior, jpeg, make_alert, offset, past

TOPICS = Topics("cwg")
CATALOGUE = default_catalogue()


class PgHarness:
    def __init__(self, url: str, root: Path, lock: LockMode = "cell") -> None:
        self.url = url
        self.pool = PgEventPool(url, CATALOGUE, lock=lock)
        self.snapshots = SnapshotStore(root / "snapshots")
        self.pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, self.snapshots, DecodeLimits())

    def batch(self, *alerts: AlertV1, raw: tuple[tuple[str, bytes], ...] = ()) -> Batch:
        msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), time.time()) for a in alerts]
        msgs += [Inbound(topic, payload, time.time()) for topic, payload in raw]
        return self.pipeline.assemble(msgs).batch

    def send(self, *alerts: AlertV1) -> list[Outcome]:
        result = self.pool.commit_batch(self.batch(*alerts))
        return [r.outcome for r in result.alerts] + [Outcome.OUT_OF_AREA] * len(result.out_of_area)

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return [tuple(r) for r in conn.execute(query.encode(), params).fetchall()]


@pytest.fixture
def h(pg_url: str, tmp_path: Path) -> Iterator[PgHarness]:
    harness = PgHarness(pg_url, tmp_path)
    yield harness
    harness.pool.close()


def test_migrations_are_numbered_and_apply_once_under_a_lock(pg_server: PgServer) -> None:
    files = migrations()
    assert [v for v, _, _ in files] == sorted({v for v, _, _ in files})
    url = pg_server.create_database(f"m_{uuid.uuid4().hex[:12]}")  # empty, not the template
    done: list[list[int]] = []
    threads = [threading.Thread(target=lambda: done.append(migrate(url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # three "replicas" starting together: one applies everything, the others find it done
    assert sorted(done, key=len) == [[], [], [v for v, _, _ in files]]
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [v for v, _, _ in files]
    assert migrate(url) == []


def test_same_alert_id_twice_is_one_row(h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(0))
    alert = make_alert("cam-1", lat, lon)
    assert h.send(alert, alert) == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    assert h.send(alert) == [Outcome.DUPLICATE]
    assert h.rows(
        "SELECT count(*), sum(alert_count) FROM alerts JOIN events ON events.id = alerts.event_id"
    ) == [(1, 1)]
    assert h.rows("SELECT count(*) FROM alert_ids") == [(1,)]


def test_three_devices_within_radius_and_window_make_one_event(h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(2))
    # smoke_fire: 150 m radius, 1800 s window
    a = make_alert("cam-1", lat, lon, observed_at=past(600), snapshot=jpeg(1), confidence=0.6)
    b = make_alert("cam-2", *offset(lat, lon, north_m=80), observed_at=past(300), confidence=0.9,
                   snapshot=jpeg(2))  # fmt: skip
    c = make_alert("cam-3", *offset(lat, lon, east_m=-100), observed_at=past(0), confidence=0.7,
                   snapshot=jpeg(3))  # fmt: skip
    assert h.send(a) == [Outcome.ACCEPTED]
    assert h.send(b, c) == [Outcome.MERGED, Outcome.MERGED]
    [(event_id, alerts, devices, snap)] = h.rows(
        "SELECT id, alert_count, device_count, snapshot_sha256 FROM events"
    )
    assert (alerts, devices) == (3, 3)
    assert h.rows(
        "SELECT device_id FROM event_devices WHERE event_id=%s ORDER BY device_id", event_id
    ) == [("cam-1",), ("cam-2",), ("cam-3",)]
    assert snap == h.rows("SELECT snapshot_sha256 FROM alerts WHERE device_id='cam-2'")[0][0]


@pytest.mark.parametrize(
    ("north_m", "seconds_apart", "same_event"),
    [(140, 0, True), (170, 0, False), (0, 1700, True), (0, 1900, False)],
)
def test_radius_and_window_come_from_the_catalogue(
    h: PgHarness, north_m: float, seconds_apart: float, same_event: bool
) -> None:
    lat, lon = interior(grid_in_community(3))
    h.send(make_alert("cam-1", lat, lon, observed_at=past(4000)))
    second = make_alert(
        "cam-2", *offset(lat, lon, north_m=north_m), observed_at=past(4000 - seconds_apart)
    )
    assert h.send(second) == [Outcome.MERGED if same_event else Outcome.ACCEPTED]


def test_closed_event_absorbs_nothing_and_recurrence_links_to_it(h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(1))
    h.send(make_alert("cam-1", lat, lon, observed_at=past(60)))
    [(closed_id,)] = h.rows("SELECT id FROM events")
    done = h.pool.set_status(int(closed_id), EventStatus.CLOSED, actor="test", note="put out")
    assert (done["from"], done["to"]) == ("registered", "closed")
    assert h.send(make_alert("cam-2", lat, lon)) == [Outcome.ACCEPTED]
    rows = h.rows("SELECT id, status, recurrence_of, alert_count FROM events ORDER BY id")
    assert rows == [(closed_id, "closed", None, 1), (rows[1][0], "registered", closed_id, 1)]
    with pytest.raises(Exception, match="closed"):
        h.pool.set_status(int(closed_id), EventStatus.HANDLING, actor="test")


def test_out_of_area_alert_makes_no_event(h: PgHarness) -> None:
    assert h.send(make_alert("cam-1", *OUTSIDE)) == [Outcome.OUT_OF_AREA]
    assert h.rows("SELECT count(*) FROM events") == [(0,)]
    assert h.rows("SELECT device_id, out_of_area_total FROM devices") == [("cam-1", 1)]


def test_batch_is_one_transaction_and_a_rolled_back_batch_notifies_nobody(h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(0))
    batch = h.batch(*(make_alert("cam-1", lat, lon, seq=i) for i in range(3)))
    batch.alerts[2] = replace(batch.alerts[2], type="not_in_catalogue")
    with psycopg.connect(h.url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with pytest.raises(KeyError):
            h.pool.commit_batch(batch)
        assert list(listener.notifies(timeout=0.3)) == []
    for table in ("events", "alerts", "alert_ids", "devices", "batches"):
        assert h.rows(f"SELECT count(*) FROM {table}") == [(0,)], table
    # the same alerts, whole, pool afterwards: nothing of the failed try is left claimed
    batch.alerts[2] = replace(batch.alerts[2], type="smoke_fire")
    assert [r.outcome for r in h.pool.commit_batch(batch).alerts] == [
        Outcome.ACCEPTED,
        Outcome.MERGED,
        Outcome.MERGED,
    ]


def test_change_feed_notifies_committed_batches_and_lifecycle_steps(h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(2, 2))
    with psycopg.connect(h.url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        first = h.pool.commit_batch(h.batch(make_alert("cam-1", lat, lon)))
        second = h.pool.commit_batch(h.batch(make_alert("cam-2", lat, lon)))
        [event_id] = first.created
        h.pool.set_status(event_id, EventStatus.VERIFIED, actor="op")
        got = [orjson_loads(n.payload) for n in listener.notifies(timeout=5, stop_after=3)]
    assert [g.get("created") for g in got] == [[event_id], [], None]
    assert [g["updated"] for g in got] == [[], [event_id], [event_id]]
    assert second.updated == {event_id}
    changes = [g["change"] for g in got]
    assert changes == sorted(changes)
    assert len(set(changes)) == 3
    assert h.rows("SELECT change_seq FROM events") == [(changes[2],)]


def orjson_loads(text: str) -> dict[str, Any]:
    import orjson

    value: dict[str, Any] = orjson.loads(text)
    return value


def test_dead_letters_are_kept_once_with_their_key(h: PgHarness) -> None:
    raw = ((TOPICS.alert("cam-9"), b'{"schema": "alert/v1", "broken'),)
    first = h.pool.commit_batch(h.batch(raw=raw))
    again = h.pool.commit_batch(h.batch(raw=raw))
    [a], [b] = first.dead_letters, again.dead_letters
    assert (a.duplicate, b.duplicate, a.id) == (False, True, b.id)
    assert h.rows("SELECT count(*), max(payload_size) FROM dead_letters") == [(1, len(raw[0][1]))]
    assert h.rows("SELECT rejected_total FROM devices WHERE device_id='cam-9'") == [(1,)]


def test_prune_drops_old_dead_letters_and_out_of_area_rows(h: PgHarness) -> None:
    old = time.time() - 1000
    msgs = [
        Inbound(TOPICS.alert("cam-9"), b"{not json", old),
        Inbound(TOPICS.alert("cam-8"), make_alert("cam-8", *OUTSIDE).to_json(), old),
    ]
    h.pool.commit_batch(h.pipeline.assemble(msgs).batch)
    h.pool.commit_batch(h.batch(raw=((TOPICS.alert("cam-9"), b"{new"),)))
    assert h.pool.prune(time.time() - 500) == 2
    assert h.rows("SELECT count(*) FROM dead_letters") == [(1,)]
    assert h.rows("SELECT count(*) FROM out_of_area") == [(0,)]


def test_snapshots_are_shared_in_the_pool(h: PgHarness) -> None:
    store = PgSnapshotStore(h.pool)
    sha = store.put(jpeg(5))
    assert store.put(jpeg(5)) == sha
    assert store.get(sha) == jpeg(5)
    assert store.get("0" * 64) is None
    assert h.rows("SELECT count(*) FROM snapshots") == [(1,)]


def test_months_of_alerts_are_partitions_and_retention_drops_them_with_their_ids(
    h: PgHarness,
) -> None:
    lat, lon = interior(grid_in_community(3, 1))
    now = time.time()
    old = now - 120 * 86400  # four months ago: a partition made on demand
    msgs = [Inbound(TOPICS.alert("cam-1"), make_alert("cam-1", lat, lon).to_json(), old)]
    h.pool.commit_batch(h.pipeline.assemble(msgs).batch)
    h.send(make_alert("cam-2", lat, lon, type="crowd_gathering"))
    dropped = h.pool.drop_alerts_before(now - 60 * 86400)
    assert len(dropped) >= 1
    assert h.rows("SELECT device_id FROM alerts") == [("cam-2",)]
    assert h.rows("SELECT count(*) FROM alert_ids") == [(1,)]
    assert h.rows("SELECT count(*) FROM events") == [(2,)]  # events stay


# ---------------------------------------------------------------------------- replicas


def _alert(device: str, lat: float, lon: float, observed_at: float) -> AlertIn:
    return AlertIn(
        alert_id=f"{device}-{uuid.uuid4().hex}",
        device_id=device,
        seq=1,
        type="smoke_fire",
        severity=Severity.HIGH,
        confidence=0.8,
        observed_at=observed_at,
        received_at=time.time(),
        lat=lat,
        lon=lon,
        grid_code="g",
        grid_path="[]",
        address="a",
        description="d",
        snapshot_sha256=None,
        payload=b"{}",
    )


@pytest.mark.parametrize(("lock", "rounds"), [("cell", 200), ("batch", 50)])
def test_two_replicas_pooling_one_incident_at_the_same_instant_make_one_event(
    pg_url: str, lock: LockMode, rounds: int
) -> None:
    """Two writers with pools of their own commit an alert of one incident each, released by a
    barrier, ``rounds`` times; half the incidents straddle a lock cell's edge."""
    replicas = [PgEventPool(pg_url, CATALOGUE, lock=lock) for _ in range(2)]
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []
    now = time.time()

    def place(i: int) -> tuple[tuple[float, float], tuple[float, float]]:
        edge = (1100 + 2 * i) * LOCK_CELL_DEG  # incidents 4 cells (~4 km) apart
        if i % 2:  # both in one cell
            return (edge + 0.004, 114.25), (edge + 0.0045, 114.2505)
        return (edge - 0.0003, 114.25), (edge + 0.0003, 114.2502)  # ~70 m, across the edge

    def run(k: int) -> None:
        try:
            for i in range(rounds):
                (lat, lon) = place(i)[k]
                alert = _alert(f"cam-{k}", lat, lon, now)
                barrier.wait()
                result = replicas[k].commit_batch(
                    Batch(alerts=[alert], seen={alert.device_id: now})
                )
                assert result.alerts[0].outcome in (Outcome.ACCEPTED, Outcome.MERGED)
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in replicas:
        r.close()
    assert not errors, errors
    with psycopg.connect(pg_url) as conn:
        counts = conn.execute(
            "SELECT count(*), min(alert_count), max(alert_count) FROM events"
        ).fetchone()
        accepted = conn.execute("SELECT count(*) FROM alerts WHERE outcome='accepted'").fetchone()
    assert counts == (rounds, 2, 2)
    assert accepted == (rounds,)


# ---------------------------------------------------------------------------- same as SQLite


def _comparable(result: BatchResult) -> dict[str, Any]:
    touched = sorted(result.created | result.updated)
    summaries = []
    for event_id in touched:
        s = dict(result.summary(event_id))
        # registered now by each pool: equal spans, different instants
        registered, deadline = s.pop("registered_at"), s.pop("deadline_at")
        s["deadline_after_s"] = round((deadline - registered).total_seconds())
        summaries.append(s)
    return {
        "alerts": [(r.alert_id, r.device_id, r.seq, r.outcome, r.event_id) for r in result.alerts],
        "dead": [
            (d.id, d.device_id, d.reason, d.detail, d.duplicate, d.seq) for d in result.dead_letters
        ],
        "out": [o.alert_id for o in result.out_of_area],
        "created": sorted(result.created),
        "updated": sorted(result.updated),
        "summaries": summaries,
    }


def test_the_same_batches_give_the_same_outcomes_as_the_sqlite_pool(
    h: PgHarness, tmp_path: Path
) -> None:
    lite = EventPool(tmp_path / "pool.db", CATALOGUE)
    try:
        g0, g1 = interior(grid_in_community(0)), interior(grid_in_community(1, 3))
        a = make_alert("cam-1", *g0, observed_at=past(900), snapshot=jpeg(1), confidence=0.6)
        bad = ((TOPICS.alert("cam-7"), b'{"schema": "alert/v1"'),)
        b = make_alert("cam-2", *offset(*g0, north_m=60), observed_at=past(600), confidence=0.9,
                       snapshot=jpeg(2), severity="critical")  # fmt: skip
        batches = [
            h.batch(a, a, make_alert("cam-3", *OUTSIDE), raw=bad),
            h.batch(b, a, make_alert("cam-4", *g1, type="crowd_gathering"), raw=bad),
            h.batch(make_alert("cam-1", *g0, observed_at=past(1700), seq=2)),  # backlog
        ]
        batches[0].statuses.append(StatusIn("cam-1", "online", None, time.time(), "camera", "{}"))
        for batch in batches:
            assert _comparable(h.pool.commit_batch(batch)) == _comparable(lite.commit_batch(batch))
        lite.set_status(1, EventStatus.CLOSED, "op")
        h.pool.set_status(1, EventStatus.CLOSED, "op")
        again = h.batch(make_alert("cam-5", *offset(*g0, east_m=20)))
        pg, sq = _comparable(h.pool.commit_batch(again)), _comparable(lite.commit_batch(again))
        assert pg == sq
        assert pg["summaries"][0]["recurrence_of"] == 1
        devices = (
            "SELECT device_id, state, last_seq, alerts_total, rejected_total, out_of_area_total"
            " FROM devices ORDER BY device_id"
        )
        assert h.rows(devices) == [tuple(r) for r in lite.reader.execute(devices)]
    finally:
        lite.close()


# ---------------------------------------------------------------------------- faults


def test_server_down_is_a_pool_fault_and_the_next_batch_after_a_restart_commits(
    pg_server: PgServer, pg_url: str, tmp_path: Path
) -> None:
    h = PgHarness(pg_url, tmp_path)
    h.pool.close()
    h.pool = PgEventPool(pg_url, CATALOGUE, connect_timeout_s=2)
    try:
        lat, lon = interior(grid_in_community(0, 3))
        assert h.send(make_alert("cam-1", lat, lon)) == [Outcome.ACCEPTED]
        pg_server.stop()
        try:
            batch = h.batch(make_alert("cam-2", lat, lon))
            with pytest.raises(PoolUnavailableError) as caught:
                h.pool.commit_batch(batch)
            assert is_pg_pool_fault(caught.value)
            assert isinstance(caught.value.__cause__, psycopg.Error | TimeoutError)
        finally:
            pg_server.start()
        # the same batch again, as the ingest worker retries it unacknowledged
        started = time.monotonic()
        while True:
            try:
                result = h.pool.commit_batch(batch)
                break
            except PoolUnavailableError:
                assert time.monotonic() - started < 10, "no commit within 10 s of the restart"
                time.sleep(0.2)
        assert [r.outcome for r in result.alerts] == [Outcome.MERGED]
        assert h.rows("SELECT alert_count FROM events") == [(2,)]
    finally:
        h.pool.close()


def test_a_restart_between_batches_costs_no_batch(pg_server: PgServer, h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(1, 2))
    assert h.send(make_alert("cam-1", lat, lon)) == [Outcome.ACCEPTED]
    pg_server.restart()
    # the pool checks a connection before handing it out: the broken one is replaced
    assert h.send(make_alert("cam-2", lat, lon)) == [Outcome.MERGED]


def test_a_lifecycle_step_and_batches_merging_into_its_event_never_overlap(pg_url: str) -> None:
    """An operator closes an event while another writer keeps merging alerts into it: every
    batch that merged into the event committed before the close, and later alerts open a
    recurrence."""
    writer, operator = (PgEventPool(pg_url, CATALOGUE) for _ in range(2))
    lat, lon = 22.61, 114.05
    try:
        for round_ in range(10):
            place = (lat + round_ * 0.05, lon)
            first = writer.commit_batch(Batch(alerts=[_alert("cam-1", *place, time.time())]))
            [event_id] = first.created
            stop = threading.Event()

            def merge_until_stopped(
                place: tuple[float, float] = place, stop: threading.Event = stop
            ) -> None:
                while not stop.is_set():
                    writer.commit_batch(Batch(alerts=[_alert("cam-2", *place, time.time())]))

            merger = threading.Thread(target=merge_until_stopped)
            merger.start()
            time.sleep(0.02)
            operator.set_status(event_id, EventStatus.CLOSED, actor="op")
            time.sleep(0.02)
            stop.set()
            merger.join(10)
            with psycopg.connect(pg_url) as conn:
                late = conn.execute(
                    "SELECT count(*) FROM alerts a JOIN batches b ON b.id = a.batch_id"
                    " JOIN events e ON e.id = a.event_id"
                    " WHERE e.id = %s AND b.committed_at > e.closed_at",
                    (event_id,),
                ).fetchone()
                counted = conn.execute(
                    "SELECT e.alert_count, (SELECT count(*) FROM alerts WHERE event_id = e.id),"
                    " (SELECT count(*) FROM events WHERE recurrence_of = e.id)"
                    " FROM events e WHERE e.id = %s",
                    (event_id,),
                ).fetchone()
            assert late == (0,)
            assert counted is not None
            assert counted[0] == counted[1]
            assert counted[2] == 1  # the alerts after the close opened one recurrence
    finally:
        writer.close()
        operator.close()


def test_a_writer_sees_what_another_replica_and_an_operator_did_to_an_event_it_holds(
    pg_url: str,
) -> None:
    a, b = (PgEventPool(pg_url, CATALOGUE) for _ in range(2))
    lat, lon, now = 22.63, 114.07, time.time()
    try:
        [event_id] = a.commit_batch(Batch(alerts=[_alert("cam-1", lat, lon, now)])).created
        assert b.commit_batch(Batch(alerts=[_alert("cam-2", lat, lon, now)])).updated == {event_id}
        third = a.commit_batch(Batch(alerts=[_alert("cam-3", lat, lon, now)]))
        summary = third.summary(event_id)
        assert (summary["alert_count"], summary["device_ids"]) == (3, ["cam-1", "cam-2", "cam-3"])
        b.set_status(event_id, EventStatus.CLOSED, actor="op")
        fourth = a.commit_batch(Batch(alerts=[_alert("cam-1", lat, lon, now)]))
        [recurrence] = fourth.created
        assert fourth.summary(recurrence)["recurrence_of"] == event_id
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(
                "SELECT alert_count, device_count, status FROM events WHERE id = %s", (event_id,)
            ).fetchone()
        assert row == (3, 3, "closed")
    finally:
        a.close()
        b.close()


def test_an_operator_on_replica_b_hears_within_a_second_what_replica_a_commits(
    pg_server: PgServer, pg_url: str
) -> None:
    a = PgEventPool(pg_url, CATALOGUE)
    b = ChangeListener(pg_url)
    try:
        assert b.poll(0.05) == []
        started = time.monotonic()
        [event_id] = a.commit_batch(
            Batch(alerts=[_alert("cam-1", 22.64, 114.08, time.time())])
        ).created
        [change] = b.poll(1.0)
        assert time.monotonic() - started < 1.0
        assert (change.created, change.updated, change.truncated) == ((event_id,), (), False)
        assert b.last_change == change.change
        # the server restarts: the listener says so, then listens again and says it reconnected
        pg_server.restart()
        with pytest.raises(PoolUnavailableError):
            b.poll(1.0)
        a.commit_batch(Batch(alerts=[_alert("cam-2", 22.64, 114.08, time.time())]))
        b.reconnected = False
        assert b.poll(0.2) == []  # reconnects; the notification sent meanwhile is gone
        assert b.reconnected
        a.commit_batch(Batch(alerts=[_alert("cam-3", 22.64, 114.08, time.time())]))
        [after] = b.poll(1.0)
        assert after.updated == (event_id,)
    finally:
        a.close()
        b.close()


def test_nul_characters_that_postgresql_text_refuses_do_not_fail_the_batch(h: PgHarness) -> None:
    lat, lon = interior(grid_in_community(0, 1))
    alert = make_alert("cam-1", lat, lon).model_copy(update={"description": "smoke\x00 here"})
    batch = h.batch(alert)
    batch.dead_letters.append(
        DeadLetterIn(
            time.time(),
            TOPICS.alert("cam-9"),
            "cam\x009",
            "a\x00",
            RejectReason.SCHEMA_VIOLATION,
            "bad \x00 byte",
            b"\x00",
        )
    )
    result = h.pool.commit_batch(batch)
    assert [r.outcome for r in result.alerts] == [Outcome.ACCEPTED]
    [event_id] = result.created
    assert result.summary(event_id)["description"] == "smoke\ufffd here"
    assert h.rows("SELECT description FROM events") == [("smoke\ufffd here",)]
    assert h.rows("SELECT device_id, alert_id, detail, payload FROM dead_letters") == [
        ("cam\ufffd9", "a\ufffd", "bad \ufffd byte", b"\x00")
    ]
