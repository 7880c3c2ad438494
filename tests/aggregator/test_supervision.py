"""Supervision (督办): reminders before a deadline, an overdue item when it passes and the
escalation chain community → street → county, each raised exactly once — by one timer, and by
two replicas' timers on one pool (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: BEGIN
IMMEDIATE) — in the audit trail, the webhooks outbox and the case's supervision list; the chain
stops when the case moves."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import psycopg
import pytest
from pydantic import ValidationError

from aggregator.access.auth import Level, Operator
from aggregator.cases import Action, Case, State
from aggregator.cases.audit import verify
from aggregator.cases.supervise import Item, Kind, SupervisionPolicy, due_items
from aggregator.clock import OffsetFileClock
from aggregator.config import Settings, SupervisionSettings
from aggregator.fanout.stream import OFFER_HORIZON_S
from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool import cases as store
from aggregator.pool import queries
from aggregator.pool.cases import CaseStore
from aggregator.pool.outbox import Outbox, SubscriptionIn
from aggregator.pool.supervision import Raised, Supervisor, supervision_of
from aggregator.service import Service
from contract import AlertV1, CaseNoticeV1, Outcome, Topics, default_catalogue
from contract.schema_export import SCHEMA_DIR

from .case_support import T0, drive, new_case
from .conftest import (
    GRIDS,
    PoolBackend,
    aggregator_settings,
    grid_in_community,
    interior,
    make_alert,
    past,
    wait_until,
)
from .operator_support import FAST_HASHER, OPERATORS, PASSWORD, Api, publish, wait_for_events
from .test_stream import collect, stream, until

TOPICS = Topics("cwg")
POLICY = SupervisionPolicy()  # reminder ≤30 min / 25 % ahead; street +1 h, county +4 h
MIN = timedelta(minutes=1)


# ---------------------------------------------------------------------------- pure decisions


def whistled(minutes: float = 0) -> Case:
    case, _ = drive(new_case(), [(Action.VERIFY, 0), (Action.WHISTLE, minutes)])
    return case


def kinds(items: list[Item]) -> list[str]:
    return [f"{i.clock}:{i.kind}" for i in items]


def test_reminder_is_a_quarter_of_a_short_span_ahead_and_thirty_minutes_of_a_long_one() -> None:
    case = whistled()  # the accept clock: 30 min from T0
    items, nxt = due_items(case, {}, T0 + 22 * MIN, POLICY)
    assert items == []
    assert nxt == T0 + timedelta(minutes=22.5)
    items, _ = due_items(case, {}, T0 + 23 * MIN, POLICY)
    assert kinds(items) == ["accept:reminder"]
    assert items[0].level == "department"
    # the feedback clock (24 h from the whistle): its reminder 30 min ahead, not 6 h
    fb, _ = drive(case, [(Action.ACCEPT_OFF_SITE, 10)])
    items, nxt = due_items(fb, {}, T0 + 10 * MIN, POLICY)
    assert items == []
    assert nxt == T0 + timedelta(hours=24) - 30 * MIN


def test_overdue_then_street_then_county_and_nothing_twice() -> None:
    case = whistled()
    raised: dict[str, int] = {}
    seen: list[str] = []
    for minutes in (23, 29, 31, 60, 91, 200, 271, 600):
        items, _ = due_items(case, raised, T0 + minutes * MIN, POLICY)
        for i in items:
            raised[i.key] = case.version
            seen.append(f"{minutes}:{i.kind}:{i.level}")
    assert seen == [
        "23:reminder:department",
        "31:overdue:department",
        "91:escalate_street:street",
        "271:escalate_county:county",
    ]


def test_a_timer_that_looks_late_raises_no_reminder_after_the_deadline() -> None:
    case = whistled()
    items, _ = due_items(case, {}, T0 + 300 * MIN, POLICY)
    assert kinds(items) == ["accept:overdue", "accept:escalate_street", "accept:escalate_county"]


def test_the_chain_stops_when_the_case_moves() -> None:
    case = whistled()
    items, _ = due_items(case, {}, T0 + 31 * MIN, POLICY)
    raised = {i.key: case.version for i in items}
    moved = case.model_copy(update={"version": case.version + 1})  # e.g. an assignment
    items, nxt = due_items(moved, raised, T0 + 500 * MIN, POLICY)
    assert items == []
    assert nxt is None
    # the clock that stopped when the department accepted owes nothing either
    accepted, _ = drive(case, [(Action.ACCEPT_OFF_SITE, 40)])
    items, _ = due_items(accepted, raised, T0 + 500 * MIN, POLICY)
    assert "accept" not in " ".join(kinds(items))


def test_an_extended_deadline_is_supervised_again() -> None:
    case, _ = drive(whistled(), [(Action.ACCEPT_OFF_SITE, 10)])  # feedback: 24 h from T0
    late = T0 + timedelta(hours=24, minutes=5)
    items, _ = due_items(case, {}, late, POLICY)
    raised = {i.key: case.version for i in items}
    assert kinds(items) == ["feedback:overdue"]
    until = T0 + timedelta(hours=48)
    extended, _ = drive(
        case,
        [
            (Action.APPLY_EXTENSION, 24 * 60 + 10, {"reason": "parts", "until": until}),
            (Action.APPROVE_EXTENSION, 24 * 60 + 20, {}),
        ],
    )
    items, nxt = due_items(extended, raised, late + 20 * MIN, POLICY)
    assert items == []
    assert nxt == until - 30 * MIN
    items, _ = due_items(extended, raised, until - 10 * MIN, POLICY)
    assert kinds(items) == ["feedback:reminder"]
    raised |= {i.key: extended.version for i in items}
    items, _ = due_items(extended, raised, until + MIN, POLICY)
    assert kinds(items) == ["feedback:overdue"]
    assert items[0].due_at == until


def test_supervision_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CWG_SUPERVISION__STREET_AFTER_S", "600")
    monkeypatch.setenv("CWG_SUPERVISION__COUNTY_AFTER_S", "1200")
    settings = Settings(data_dir=tmp_path)
    assert (settings.supervision.street_after_s, settings.supervision.county_after_s) == (
        600,
        1200,
    )
    monkeypatch.setenv("CWG_SUPERVISION__COUNTY_AFTER_S", "300")  # before the street's
    with pytest.raises(ValidationError, match="county_after_s"):
        Settings(data_dir=tmp_path)


# ---------------------------------------------------------------------------- in the pool


class Pool:
    """A pool with events from real alerts and cases moved by real steps."""

    def __init__(self, backend: PoolBackend) -> None:
        self.backend = backend
        self.catalogue = default_catalogue()
        self.pool = backend.writer(self.catalogue)
        self.pipeline = Pipeline(
            TOPICS, self.catalogue, GRIDS, backend.snapshots(self.pool), DecodeLimits()
        )
        self.cases = CaseStore(backend.target, self.catalogue)
        backend._closers.append(self.cases.close)
        self.outbox = Outbox(backend.target, pooled=False)

    def send(self, *alerts: AlertV1) -> list[int]:
        msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), time.time()) for a in alerts]
        result = self.pool.commit_batch(self.pipeline.assemble(msgs).batch)
        out = []
        for r in result.alerts:
            assert r.outcome is Outcome.ACCEPTED
            assert r.event_id is not None
            out.append(r.event_id)
        return out

    def events(self, n: int) -> list[int]:
        """``n`` events in places far enough apart never to merge (≤ 8)."""
        ids = []
        for i in range(n):
            grid = grid_in_community(i % 4, 5 + 20 * (i // 4))
            lat, lon = interior(grid)
            [event_id] = self.send(make_alert(f"cam-{i}", lat, lon, observed_at=past(30)))
            ids.append(event_id)
        assert len(set(ids)) == n
        return ids

    def whistle(self, event_id: int, at: datetime) -> None:
        row = store.case_of(self.backend.reader(), self.catalogue, event_id, EVERYONE)
        assert row is not None
        comm = account(Level.COMMUNITY, row.case.community_code, name="wang")
        self.cases.apply_step(event_id, Action.VERIFY, comm, {}, None, now=at)
        self.cases.apply_step(
            event_id, Action.WHISTLE, comm, {"lead_department": "fire"}, None, now=at
        )

    def supervisor(self, name: str = "timer", **kwargs: object) -> Supervisor:
        s = Supervisor(self.backend.target, name=name, **kwargs)  # type: ignore[arg-type]
        self.backend._closers.append(s.close)
        return s


def account(level: Level, scope: str, dept: str | None = None, name: str = "") -> Operator:
    return Operator(
        username=name or f"{level.value}-{dept or scope}",
        level=level,
        scope_code=scope,
        department=dept,
        display_name=name or level.value,
    )


EVERYONE = account(Level.COUNTY, "", name="county-all")


def test_one_timer_raises_each_item_once_into_trail_outbox_and_case(
    pool_backend: PoolBackend,
) -> None:
    p = Pool(pool_backend)
    p.outbox.add_subscription(SubscriptionIn(url="http://127.0.0.1:9/hook"), created_by="admin")
    [event_id] = p.events(1)
    t0 = datetime.now(UTC)
    p.whistle(event_id, t0)
    timer = p.supervisor()
    got: list[str] = []
    for minutes in (10, 23, 24, 31, 32, 91, 92, 271, 300):
        got += [f"{minutes}:{r.item.kind}" for r in timer.run_once(t0 + minutes * MIN)]
    assert got == ["23:reminder", "31:overdue", "91:escalate_street", "271:escalate_county"]

    reader = pool_backend.reader()
    trail = store.audit_rows(reader, event_id=event_id)
    system = [r for r in trail if r.actor == "system"]
    assert [r.action for r in system] == [
        "reminder",
        "overdue",
        "escalate_street",
        "escalate_county",
    ]
    assert {r.case_version for r in system} == {3}  # raising never moves the case
    assert {r.before for r in system} == {State.WHISTLED.value}
    assert verify(store.audit_rows(reader), head=store.audit_head(reader)[1]) == []

    items = supervision_of(reader, event_id)
    assert [(i.kind, i.level, i.clock) for i in items] == [
        (Kind.REMINDER, "department", "accept"),
        (Kind.OVERDUE, "department", "accept"),
        (Kind.ESCALATE_STREET, "street", "accept"),
        (Kind.ESCALATE_COUNTY, "county", "accept"),
    ]
    assert [i.audit_seq for i in items] == [r.seq for r in system]

    deliveries = pool_backend.rows(
        "SELECT message_type, payload FROM webhook_deliveries WHERE case_id = ? ORDER BY id",
        str(event_id),
    )
    sup = [orjson.loads(body) for kind, body in deliveries if kind == "case.supervision"]
    assert [d["data"]["action"] for d in sup] == [
        "reminder",
        "overdue",
        "escalate_street",
        "escalate_county",
    ]
    assert sup[1]["data"]["supervision"]["level"] == "department"
    assert sup[1]["type"] == "case.supervision"


def test_an_item_moves_the_events_change_number_so_followers_see_it(
    pool_backend: PoolBackend,
) -> None:
    p = Pool(pool_backend)
    [event_id, quiet] = p.events(2)
    t0 = datetime.now(UTC)
    p.whistle(event_id, t0)

    def mark(eid: int) -> tuple[int, int]:
        [(change, version)] = pool_backend.rows(
            "SELECT change_seq, version FROM events WHERE id = ?", eid
        )
        return int(change), int(version)

    listener = None
    if pool_backend.is_postgres:  # the pool's change channel, as the stream listens to it
        listener = psycopg.connect(pool_backend.target, autocommit=True)
        pool_backend._closers.append(listener.close)
        listener.execute("LISTEN cwg_pool")
    timer = p.supervisor()
    assert timer.run_once(t0 + 10 * MIN) == []
    before, version = mark(event_id)
    quiet_before = mark(quiet)
    reader = pool_backend.reader()
    assert event_id not in dict(queries.changed_events(reader, before, 100))

    [reminder] = timer.run_once(t0 + 23 * MIN)
    after, version_after = mark(event_id)
    assert after > before
    assert version_after == version + 1
    assert reminder.change_seq == after
    # a client following the pool's changes from the old number sees the event, once
    changed = queries.changed_events(reader, before, 100)
    assert changed == [(event_id, after)]
    assert mark(quiet) == quiet_before  # only the supervised event moved
    if listener is not None:
        heard = [orjson.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=1)]
        assert heard == [{"change": after, "updated": [event_id]}]
    # the case itself did not move, and a tick with nothing due moves nothing
    row = store.case_of(reader, p.catalogue, event_id, EVERYONE)
    assert row is not None
    assert row.case.version == 3
    assert timer.run_once(t0 + 24 * MIN) == []
    assert mark(event_id) == (after, version_after)
    # several items in one tick (overdue and both escalations): one move of the event
    raised = timer.run_once(t0 + 300 * MIN)
    assert [r.item.kind for r in raised] == [
        Kind.OVERDUE,
        Kind.ESCALATE_STREET,
        Kind.ESCALATE_COUNTY,
    ]
    last, last_version = mark(event_id)
    assert last > after
    assert last_version == version_after + 1
    assert {r.change_seq for r in raised} == {last}


def test_the_escalation_stops_when_the_case_moves(pool_backend: PoolBackend) -> None:
    p = Pool(pool_backend)
    a, b = p.events(2)
    t0 = datetime.now(UTC)
    p.whistle(a, t0)
    p.whistle(b, t0)
    timer = p.supervisor()
    # first look after the deadline: the overdue items, no late reminders
    assert {(r.event_id, r.item.kind) for r in timer.run_once(t0 + 31 * MIN)} == {
        (a, Kind.OVERDUE),
        (b, Kind.OVERDUE),
    }
    # case a moves (assigned: a new version, the accept clock still running)
    row = store.case_of(pool_backend.reader(), p.catalogue, a, EVERYONE)
    assert row is not None
    comm = account(Level.COMMUNITY, row.case.community_code, name="wang")
    p.cases.assign(a, None, comm, None, now=t0 + 40 * MIN)
    later = timer.run_once(t0 + 300 * MIN)
    assert sorted((r.event_id, r.item.kind.value) for r in later) == [
        (b, "escalate_county"),
        (b, "escalate_street"),
    ]
    assert timer.run_once(t0 + 600 * MIN) == []
    assert [i.kind for i in supervision_of(pool_backend.reader(), a)] == [Kind.OVERDUE]


def test_a_timer_whose_session_the_server_ended_fails_one_tick_then_goes_on(
    pg_url: str, tmp_path: Path
) -> None:
    backend = PoolBackend("postgres", pg_url, tmp_path)
    try:
        p = Pool(backend)
        [event_id] = p.events(1)
        t0 = datetime.now(UTC)
        p.whistle(event_id, t0)
        timer = p.supervisor()
        assert timer.run_once(t0 + 10 * MIN) == []  # connected, nothing due yet
        ended = backend.rows(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'cwg-supervision' AND datname = current_database()"
        )
        assert ended == [(True,)]
        with pytest.raises(psycopg.OperationalError):
            timer.run_once(t0 + 31 * MIN)
        assert [r.item.kind for r in timer.run_once(t0 + 31 * MIN)] == [Kind.OVERDUE]
    finally:
        backend.close()


def _race(sups: list[Supervisor], times: list[datetime]) -> list[Raised]:
    """Every supervisor runs at each time at once (a barrier per time); all they raised."""
    out: list[Raised] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(sups))

    def run(s: Supervisor) -> None:
        try:
            for t in times:
                barrier.wait(30)
                got = s.run_once(t)
                with lock:
                    out.extend(got)
        except Exception as exc:  # noqa: BLE001 (reported below, in the test thread)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(s,)) for s in sups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    return out


def test_two_replicas_timers_raise_each_item_exactly_once(pool_backend: PoolBackend) -> None:
    p = Pool(pool_backend)
    events = p.events(8)
    t0 = datetime.now(UTC)
    for i, event_id in enumerate(events):
        p.whistle(event_id, t0 + i * MIN)  # deadlines a minute apart
    # batches of 2: each tick is several claims, so the two timers interleave on the cases
    sups = [p.supervisor("replica-a", batch=2), p.supervisor("replica-b", batch=2)]
    times = [t0 + m * MIN for m in (20, 23, 25, 27, 29, 31, 33, 35, 37, 39, 92, 96, 100, 300)]
    raised = _race(sups, times)
    keys = Counter((r.event_id, r.item.key) for r in raised)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    # each case: reminder, overdue, street, county
    assert Counter(r.event_id for r in raised) == dict.fromkeys(events, 4)
    assert _race(sups, times) == []  # the same times again: nothing more
    stored = pool_backend.rows(
        "SELECT event_id, item, raised_by, audit_seq FROM case_supervision ORDER BY audit_seq"
    )
    assert len(stored) == 32
    assert len({(r[0], r[1]) for r in stored}) == 32
    audit = pool_backend.rows("SELECT seq FROM case_audit WHERE actor = 'system' ORDER BY seq")
    assert [r[0] for r in audit] == [r[3] for r in stored]  # one audit row per item, no more
    reader = pool_backend.reader()
    assert verify(store.audit_rows(reader), head=store.audit_head(reader)[1]) == []
    print("items raised per replica:", Counter(r[2] for r in stored))


@pytest.mark.parametrize("replicas", [3])
def test_timers_in_separate_processes_raise_each_item_once_on_postgres(
    pg_url: str, replicas: int, tmp_path: Path
) -> None:
    """Replicas are processes on other machines: the same race across processes."""
    import multiprocessing

    backend = PoolBackend("postgres", pg_url, tmp_path)
    try:
        p = Pool(backend)
        events = p.events(8)
        t0 = datetime.now(UTC)
        for i, event_id in enumerate(events):
            p.whistle(event_id, t0 + i * MIN)
        ctx = multiprocessing.get_context("spawn")
        # Replicas share one time (NTP): each step of the simulated clock is taken by all of
        # them together, so they race for the same items rather than one running ahead
        # (a timer that first looks after a deadline rightly raises no reminder for it).
        tick = ctx.Barrier(replicas, timeout=60)
        procs = [
            ctx.Process(target=_replica, args=(pg_url, f"proc-{n}", t0.timestamp(), tick))
            for n in range(replicas)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
        assert [proc.exitcode for proc in procs] == [0] * replicas
        stored = backend.rows("SELECT event_id, item, raised_by FROM case_supervision")
        assert len(stored) == 32
        assert len({(r[0], r[1]) for r in stored}) == 32
        audit = backend.rows("SELECT count(*) FROM case_audit WHERE actor = 'system'")
        assert audit == [(32,)]
        print("items raised per process:", Counter(r[2] for r in stored))
    finally:
        backend.close()


def _replica(url: str, name: str, t0: float, tick: Any) -> None:
    sup = Supervisor(url, name=name, batch=2)
    try:
        base = datetime.fromtimestamp(t0, UTC)
        for m in (20, 23, 25, 27, 29, 31, 33, 35, 37, 39, 92, 96, 100, 300):
            tick.wait()
            sup.run_once(base + m * MIN)
    finally:
        sup.close()


# ---------------------------------------------------------------------------- in the service


CASE_SCHEMA = jsonschema_rs.Draft202012Validator(
    orjson.loads((SCHEMA_DIR / "case-v1.json").read_bytes())
)


def _supervision_notices(integrator: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` supervision notices on the events topic (event notices skipped), each
    as published checked against the contract: the committed ``case-v1.json`` schema and,
    strictly, the ``CaseNoticeV1`` model."""
    got: list[dict[str, Any]] = []
    for _ in range(50):  # bounded: event notices interleave
        if len(got) == n:
            break
        (message,) = integrator.expect(1, timeout=20)
        body = orjson.loads(message.payload)
        if body.get("schema") == "case/v1":
            errors = [e.message for e in CASE_SCHEMA.iter_errors(body)]
            assert errors == [], (errors, body)
            CaseNoticeV1.model_validate_json(message.payload, strict=True)
            got.append(body)
    assert len(got) == n
    return got


def test_the_services_timer_reaches_the_events_topic_the_api_and_the_trail(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> None:
    clock_file = tmp_path / "case-clock"
    settings = aggregator_settings(
        broker,
        tmp_path / "agg",
        test_clock_file=clock_file,
        supervision=SupervisionSettings(interval_s=0.2),
        **pool_backend.settings_overrides(),
    )
    service = Service(settings, port=0, log_level="warning", password_hasher=FAST_HASHER)
    for username, (level, scope, department) in OPERATORS.items():
        service.auth.create_account(
            username, level, scope_code=scope, department=department, password=PASSWORD
        )
    service.start()
    api = Api(service.url)
    integrator = broker.client("integrator")
    try:
        assert service.aggregator.ingest.wait_connected(5)
        assert not any(c.is_failure for c in integrator.subscribe(broker.topics.events))
        publish(broker, make_alert("sup-cam", *interior(grid_in_community(0, 7))))
        (item,) = wait_for_events(api, 1)
        event_id = int(item["event_id"])
        for version, action, payload in (
            (1, "verify", {}),
            (2, "whistle", {"lead_department": "fire"}),
        ):
            r = api.post(
                f"/api/v1/cases/{event_id}/steps",
                "comm_a",
                json={"action": action, "expected_version": version, "payload": payload},
            )
            assert r.status_code == 200, r.text
        clock = OffsetFileClock(clock_file)
        with stream(service, api.token("comm_a")) as live:
            wait_until(lambda: service.hub.client_count == 1, what="a stream client")
            # the steps' own updates, if still on their way, and past the time the stream
            # holds an offered step to recognise its commit (an item leaves the same state)
            collect(live, OFFER_HORIZON_S + 0.5)
            clock.set(23 * 60)  # 23 min after the whistle: the acceptance reminder (7.5 min ahead)
            [reminder] = _supervision_notices(integrator, 1)
            # the item moved the event's change number: the live list refreshes the event
            refreshed = until(
                live,
                lambda m: m["kind"] == "event" and m["event"]["event_id"] == event_id,
                seconds=10,
            )
            assert refreshed["change"] == "updated"
        clock.set(31 * 60)  # past the 30 min acceptance deadline
        [overdue] = _supervision_notices(integrator, 1)
        assert (reminder["change"], reminder["event_id"]) == ("supervision", event_id)
        assert reminder["supervision"]["kind"] == "reminder"
        assert overdue["supervision"]["kind"] == "overdue"
        assert overdue["supervision"]["level"] == "department"
        assert overdue["departments"] == ["fire"]
        # the dashboard's view: the case lists both; the trail has them as the system's
        case = api.get(f"/api/v1/cases/{event_id}", "fire").json()
        assert [s["kind"] for s in case["supervision"]] == ["reminder", "overdue"]
        assert case["version"] == 3  # supervision never moves the case
        trail = api.get(f"/api/v1/cases/{event_id}/trail", "comm_a").json()["rows"]
        assert [(r["actor"], r["action"]) for r in trail][-2:] == [
            ("system", "reminder"),
            ("system", "overdue"),
        ]
        integrator.expect_nothing(1.0)  # nothing twice, nothing else
        assert service.supervision is not None
        assert service.supervision.raised == 2
    finally:
        integrator.disconnect()
        api.close()
        service.stop()
