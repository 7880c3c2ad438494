"""Cases in the pool on both backends (aggregator/pool/cases.py): a step, its audit row and the
event's status in one transaction, compare-and-set on the version, hooks inside the
transaction, assignment, and dedup's "a closed event absorbs nothing"."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from aggregator.access.auth import Level, Operator
from aggregator.cases import Action, ForbiddenError, StaleVersionError, State, WrongStateError
from aggregator.cases.audit import GENESIS, verify
from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool import cases as store
from aggregator.pool.cases import CaseStore, StepRecord, Tx
from aggregator.pool.port import PoolWriter
from contract import AlertV1, Outcome, Topics, default_catalogue

from .conftest import GRIDS, PoolBackend, grid_in_community, interior, make_alert, past

TOPICS = Topics("cwg")
PHOTO = "cd" * 32


def account(level: Level, scope: str, dept: str | None = None, name: str = "") -> Operator:
    return Operator(
        username=name or f"{level.value}-{dept or scope}",
        level=level,
        scope_code=scope,
        department=dept,
        display_name=name or level.value,
    )


class Harness:
    def __init__(self, backend: PoolBackend) -> None:
        self.backend = backend
        self.catalogue = default_catalogue()
        self.pool: PoolWriter = backend.writer(self.catalogue)
        self.pipeline = Pipeline(
            TOPICS, self.catalogue, GRIDS, backend.snapshots(self.pool), DecodeLimits()
        )
        self.grid = grid_in_community(1)
        self.community = self.grid.code[:12]
        self.cases = self.store()
        self.reader = backend.reader()

    def store(self) -> CaseStore:
        s = CaseStore(self.backend.target, self.catalogue)
        self.backend._closers.append(s.close)
        return s

    def send(self, *alerts: AlertV1) -> list[tuple[Outcome, int | None]]:
        msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), time.time()) for a in alerts]
        result = self.pool.commit_batch(self.pipeline.assemble(msgs).batch)
        return [(r.outcome, r.event_id) for r in result.alerts]

    def event(self, device: str = "cam-1") -> int:
        lat, lon = interior(self.grid)
        [(outcome, event_id)] = self.send(make_alert(device, lat, lon, observed_at=past(30)))
        assert outcome is Outcome.ACCEPTED
        assert event_id is not None
        return event_id

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        return self.backend.rows(sql, *params)

    @property
    def comm(self) -> Operator:
        return account(Level.COMMUNITY, self.community, name="wang")

    @property
    def fire(self) -> Operator:
        return account(Level.DEPARTMENT, "", "fire", name="fire-li")


@pytest.fixture
def h(pool_backend: PoolBackend) -> Harness:
    return Harness(pool_backend)


def test_a_case_walks_to_closed_with_status_audit_and_change_numbers(h: Harness) -> None:
    event_id = h.event()
    [(change0,)] = h.rows("SELECT change_seq FROM events WHERE id = ?", event_id)
    row = store.case_of(h.reader, h.catalogue, event_id, h.comm)
    assert row is not None
    assert not row.stored
    assert (row.case.state, row.case.version) == (State.REGISTERED, 1)

    walk: list[tuple[Operator, Action, dict[str, Any], str, State]] = [
        (h.comm, Action.VERIFY, {}, "verified", State.ASSESSING),
        (h.comm, Action.WHISTLE, {"lead_department": "fire"}, "dispatched", State.WHISTLED),
        (h.fire, Action.ACCEPT_OFF_SITE, {}, "handling", State.DEPT_HANDLING),
        (h.fire, Action.HANDLE, {"summary": "put out", "photos": [PHOTO]}, "handling",
         State.REVIEWING),
        (h.comm, Action.ACCEPT_FEEDBACK, {}, "closed", State.CLOSED),
    ]  # fmt: skip
    changes = [int(change0)]
    for version, (who, action, payload, status, state) in enumerate(walk, start=1):
        record = h.cases.apply_step(event_id, action, who, payload, expected_version=version)
        assert (record.after, record.case.version) == (state, version + 1)
        [(ev_status, change, c_state, c_version)] = h.rows(
            "SELECT e.status, e.change_seq, c.state, c.version FROM events e"
            " JOIN cases c ON c.event_id = e.id WHERE e.id = ?",
            event_id,
        )
        assert (ev_status, c_state, c_version) == (status, state.value, version + 1)
        assert int(change) > changes[-1]
        assert record.change_seq == int(change)
        changes.append(int(change))

    trail = store.audit_rows(h.reader, event_id=event_id)
    assert [r.action for r in trail] == [a.value for _, a, _, _, _ in walk]
    assert trail[3].evidence == (PHOTO,)
    assert trail[3].note == "put out"
    assert [r.actor for r in trail] == ["wang", "wang", "fire-li", "fire-li", "wang"]
    head_seq, head_hash = store.audit_head(h.reader)
    assert (head_seq, head_hash) == (trail[-1].seq, trail[-1].hash)
    assert verify(list(store.iter_audit(h.reader)), head=head_hash) == []
    [(closed_at,)] = h.rows("SELECT closed_at FROM events WHERE id = ?", event_id)
    assert closed_at is not None
    # the whistled department sees it, another does not
    assert store.case_of(h.reader, h.catalogue, event_id, h.fire) is not None
    water = account(Level.DEPARTMENT, "", "water_affairs")
    assert store.case_of(h.reader, h.catalogue, event_id, water) is None


def test_a_closed_case_s_event_absorbs_no_new_alert(h: Harness) -> None:
    event_id = h.event()
    h.cases.apply_step(event_id, Action.NOT_OURS, h.comm, {"reason": "next door"}, 1)
    lat, lon = interior(h.grid)
    [(outcome, new_id)] = h.send(make_alert("cam-2", lat, lon))
    assert outcome is Outcome.ACCEPTED
    assert new_id != event_id
    rows = h.rows("SELECT id, status, recurrence_of, alert_count FROM events ORDER BY id")
    assert rows == [(event_id, "closed", None, 1), (new_id, "registered", event_id, 1)]


def test_a_stale_version_or_a_refused_step_writes_nothing(h: Harness) -> None:
    event_id = h.event()
    h.cases.apply_step(event_id, Action.VERIFY, h.comm, {}, 1)
    before = h.rows("SELECT count(*) FROM case_audit")
    with pytest.raises(StaleVersionError):
        h.cases.apply_step(event_id, Action.SELF_HANDLE, h.comm, {}, 1)
    with pytest.raises(WrongStateError):
        h.cases.apply_step(event_id, Action.ACCEPT_FEEDBACK, h.comm, {}, 2)
    with pytest.raises(ForbiddenError):  # a department does not self-handle for a community
        h.cases.apply_step(event_id, Action.SELF_HANDLE, h.fire, {}, 2)
    assert h.rows("SELECT count(*) FROM case_audit") == before
    assert h.rows("SELECT state, version FROM cases") == [("assessing", 2)]


def test_two_stores_racing_on_one_case_one_wins(h: Harness) -> None:
    """Two API replicas (two stores), many threads, one case: each version is won once."""
    event_id = h.event()
    stores = [h.cases, h.store()]
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def act(i: int) -> None:
        barrier.wait(10)
        try:
            stores[i % 2].apply_step(event_id, Action.VERIFY, h.comm, {}, 1)
            result = "won"
        except StaleVersionError:
            result = "stale"
        except WrongStateError:
            result = "state"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=act, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes).count("won") == 1
    assert len(outcomes) == 6
    assert h.rows("SELECT count(*) FROM case_audit") == [(1,)]


def test_hooks_run_inside_the_transaction(h: Harness) -> None:
    event_id = h.event()
    seen: list[tuple[StepRecord, int]] = []

    def hook(tx: Tx, record: StepRecord) -> None:
        # the hook reads the step's own uncommitted rows: it is in the same transaction
        [(n,)] = tx.execute(
            "SELECT count(*) FROM case_audit WHERE event_id = ?", [record.event_id]
        ).fetchall()
        seen.append((record, int(n)))

    h.cases.hooks.append(hook)
    h.cases.apply_step(event_id, Action.VERIFY, h.comm, {}, 1)
    [(record, n)] = seen
    assert (record.action, record.before, record.after, n) == (
        "verify",
        "registered",
        "assessing",
        1,
    )

    def failing(tx: Tx, record: StepRecord) -> None:
        raise RuntimeError("outbox full")

    h.cases.hooks.append(failing)
    with pytest.raises(RuntimeError):
        h.cases.apply_step(event_id, Action.SELF_HANDLE, h.comm, {}, 2)
    # rolled back whole: the case, the audit row, the head and the event status
    assert h.rows("SELECT state, version FROM cases") == [("assessing", 2)]
    assert h.rows("SELECT count(*) FROM case_audit") == [(1,)]
    assert h.rows("SELECT status FROM events") == [("verified",)]
    assert h.rows("SELECT seq FROM case_audit_head") == [(1,)]


def test_assignment_is_recorded_and_scoped(h: Harness) -> None:
    event_id = h.event()
    record = h.cases.assign(
        event_id, "zhang", h.comm, 1, assignee_scope=(h.grid.code, None), note="your grid"
    )
    assert record.case.assignee == "zhang"
    assert record.case.version == 2
    [(assignee, version)] = h.rows("SELECT assignee, version FROM cases")
    assert (assignee, version) == ("zhang", 2)
    trail = store.audit_rows(h.reader, event_id=event_id)
    assert [(r.action, r.detail) for r in trail] == [("assign", {"assignee": "zhang"})]
    # not someone of another community, nor a department the case was not whistled to
    other = grid_in_community(2).code
    with pytest.raises(ForbiddenError):
        h.cases.assign(event_id, "li", h.comm, 2, assignee_scope=(other, None))
    with pytest.raises(ForbiddenError):
        h.cases.assign(event_id, "li", h.comm, 2, assignee_scope=("", "fire"))
    # the state is untouched: the next step still applies from registered, at version 2
    h.cases.apply_step(event_id, Action.VERIFY, h.comm, {}, 2)
    head = store.audit_head(h.reader)
    assert verify(store.audit_rows(h.reader), head=head[1]) == []


def test_an_empty_trail_verifies_against_the_genesis_head(h: Harness) -> None:
    assert store.audit_head(h.reader) == (0, GENESIS)
    assert verify(store.audit_rows(h.reader), head=GENESIS) == []


def test_inbox_boxes_follow_the_work_of_each_level(h: Harness) -> None:
    registered = h.event("cam-1")
    lat, lon = interior(h.grid)
    [(_, second)] = h.send(make_alert("cam-2", lat, lon, type="exposed_garbage"))
    [(_, third)] = h.send(make_alert("cam-3", lat, lon, type="street_vending"))
    assert second is not None
    assert third is not None
    assessing, whistled = second, third
    h.cases.apply_step(assessing, Action.VERIFY, h.comm, {}, 1)
    h.cases.apply_step(whistled, Action.VERIFY, h.comm, {}, 1)
    h.cases.apply_step(whistled, Action.WHISTLE, h.comm, {"lead_department": "fire"}, 2)
    street = account(Level.STREET, h.community[:9])
    county = account(Level.COUNTY, h.community[:6])
    admin = account(Level.ADMIN, "")

    def box(who: Operator, name: str | None) -> list[int]:
        rows = store.list_cases(h.reader, h.catalogue, who, box=name)
        return sorted(r.event_id for r in rows)

    assert box(h.comm, "to_accept") == [registered]
    assert box(h.comm, "to_handle") == [assessing]
    assert box(h.fire, "to_accept") == [whistled]
    assert box(h.fire, "to_handle") == []
    assert box(street, "to_accept") == []
    assert box(street, "to_handle") == [assessing]
    assert box(county, "to_review") == []
    assert box(admin, "to_accept") == []
    assert box(admin, None) == sorted([registered, assessing, whistled])
    assert box(h.fire, None) == [whistled]
    assert box(h.comm, "overdue") == []
    # the accept clock (30 min from the whistle) is overdue an hour later
    later = time.time() + 3600
    rows = store.list_cases(h.reader, h.catalogue, h.fire, box="overdue", now=later)
    assert [r.event_id for r in rows] == [whistled]
    with pytest.raises(ValueError, match="unknown box"):
        store.list_cases(h.reader, h.catalogue, h.comm, box="everything")


def test_a_department_sees_cases_whistled_to_it_by_its_exact_code(h: Harness) -> None:
    event_id = h.event()
    h.cases.apply_step(event_id, Action.VERIFY, h.comm, {}, 1)
    whistle = {"lead_department": "water_affairs", "co_departments": ["police"]}
    h.cases.apply_step(event_id, Action.WHISTLE, h.comm, whistle, 2)
    for code, sees in (("water_affairs", True), ("police", True), ("waterxaffairs", False),
                       ("water", False), ("fire", False)):  # fmt: skip
        row = store.case_of(h.reader, h.catalogue, event_id, account(Level.DEPARTMENT, "", code))
        assert (row is not None) is sees, code
