"""Handling metrics (8.6) over stored cases, through the running service's API and the CLI, on
both backends: a pool filled with known on-time, late, sent-back, overdue and "not ours" cases
(alerts through the broker, every step a real step in the pool at a known time) gives 处置率,
按期处置率 and 一次性处置率 equal to the values worked out by hand, per community, department
and person, each caller seeing only its scope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aggregator.access.auth import Level, Operator
from aggregator.cases import Action
from aggregator.clock import OffsetFileClock
from aggregator.pool.cases import CaseStore
from aggregator.service import Service
from contract import default_catalogue

from .conftest import PoolBackend, aggregator_settings, grid_in_community, interior, make_alert
from .operator_support import (
    COMMUNITY_A,
    COMMUNITY_B,
    FAST_HASHER,
    OPERATORS,
    PASSWORD,
    Api,
    publish,
    wait_for_events,
)

PHOTO = "ef" * 32
MIN = timedelta(minutes=1)


def person(level: Level, name: str, scope: str = "", dept: str | None = None) -> Operator:
    return Operator(
        username=name, level=level, scope_code=scope, department=dept, display_name=name
    )


COMM_A = person(Level.COMMUNITY, "comm_a1", COMMUNITY_A)
COMM_B = person(Level.COMMUNITY, "comm_b1", COMMUNITY_B)
FIRE1 = person(Level.DEPARTMENT, "fire1", dept="fire")
FIRE2 = person(Level.DEPARTMENT, "fire2", dept="fire")
POLICE1 = person(Level.DEPARTMENT, "police1", dept="police")

WHISTLE_FIRE = {"lead_department": "fire"}
HANDLED = {"summary": "done", "photos": [PHOTO]}
BACK = {"reason": "not done"}

# case → (community, type, [(minutes after the start, actor, action, payload)])
CASES: dict[str, tuple[str, str, list[tuple[int, Operator, Action, dict[str, Any]]]]] = {
    # 1: whistled, accepted in 10 min (deadline 30), handled, closed: on time, first time
    "on_time": (
        "A",
        "smoke_fire",
        [
            (0, COMM_A, Action.VERIFY, {}),
            (1, COMM_A, Action.WHISTLE, WHISTLE_FIRE),
            (10, FIRE1, Action.ACCEPT_OFF_SITE, {}),
            (60, FIRE1, Action.HANDLE, HANDLED),
            (70, COMM_A, Action.ACCEPT_FEEDBACK, {}),
        ],
    ),
    # 2: accepted 44 min after the whistle: late (the department's stage), first time
    "late": (
        "A",
        "ebike_in_lift",
        [
            (0, COMM_A, Action.VERIFY, {}),
            (1, COMM_A, Action.WHISTLE, WHISTLE_FIRE),
            (45, FIRE1, Action.ACCEPT_OFF_SITE, {}),
            (100, FIRE1, Action.HANDLE, HANDLED),
            (110, COMM_A, Action.ACCEPT_FEEDBACK, {}),
        ],
    ),
    # 3: police, sent back once, then accepted: handled on time, not first time
    "sent_back": (
        "A",
        "thrown_object",
        [
            (0, COMM_A, Action.VERIFY, {}),
            (1, COMM_A, Action.WHISTLE, {"lead_department": "police"}),
            (5, POLICE1, Action.ACCEPT_OFF_SITE, {}),
            (60, POLICE1, Action.HANDLE, HANDLED),
            (70, COMM_A, Action.SEND_BACK, BACK),
            (100, POLICE1, Action.HANDLE, HANDLED),
            (120, COMM_A, Action.ACCEPT_FEEDBACK, {}),
        ],
    ),
    # 4: sent back twice (Jiangsu 6.3): closed, but counts as not handled
    "twice_back": (
        "A",
        "crowd_gathering",
        [
            (0, COMM_A, Action.VERIFY, {}),
            (1, COMM_A, Action.WHISTLE, WHISTLE_FIRE),
            (5, FIRE2, Action.ACCEPT_OFF_SITE, {}),
            (20, FIRE2, Action.HANDLE, HANDLED),
            (30, COMM_A, Action.SEND_BACK, BACK),
            (40, FIRE2, Action.HANDLE, HANDLED),
            (50, COMM_A, Action.SEND_BACK, BACK),
            (60, FIRE2, Action.HANDLE, HANDLED),
            (70, COMM_A, Action.ACCEPT_FEEDBACK, {}),
        ],
    ),
    # 5: not this community's: counted apart
    "not_ours": (
        "A",
        "noise_over_limit",
        [
            (0, COMM_A, Action.NOT_OURS, {"reason": "next door"}),
        ],
    ),
    # 6: B handles it itself within the type's 24 h: on time, first time
    "self": (
        "B",
        "exposed_garbage",
        [
            (0, COMM_B, Action.VERIFY, {}),
            (1, COMM_B, Action.SELF_HANDLE, {}),
            (30, COMM_B, Action.HANDLE, HANDLED),
        ],
    ),
    # 7: whistled to fire, never accepted: overdue now; assigned to fire2
    "overdue": (
        "B",
        "gas_leak",
        [
            (0, COMM_B, Action.VERIFY, {}),
            (1, COMM_B, Action.WHISTLE, WHISTLE_FIRE),
        ],
    ),
}


def figures(registered: int, closed: int, handled: int, due: int, on_time: int,
            first_time: int, overdue: int, not_ours: int = 0) -> dict[str, Any]:  # fmt: skip
    return {
        "registered": registered,
        "not_ours": not_ours,
        "closed": closed,
        "handled": handled,
        "due": due,
        "on_time": on_time,
        "first_time": first_time,
        "overdue": overdue,
        "handling_rate": handled / registered if registered else None,
        "on_time_rate": on_time / due if due else None,
        "first_time_rate": first_time / closed if closed else None,
    }


# Worked out by hand from CASES (definitions: aggregator/cases/metrics.py).
EXPECTED = {
    "community": {
        # on_time, late, sent_back, twice_back (+ not_ours apart): handled 3 of 4; on time:
        # on_time and sent_back of 4 due; first time: on_time and late of 4 closed
        COMMUNITY_A: figures(4, 4, 3, 4, 2, 2, 0, not_ours=1),
        # self (closed on time) and overdue (open, past its acceptance deadline)
        COMMUNITY_B: figures(2, 1, 1, 2, 1, 1, 1),
    },
    "department": {
        # on_time, late, twice_back, overdue: only the department's own stage clocks count
        "fire": figures(4, 3, 2, 4, 1, 2, 1),
        "police": figures(1, 1, 1, 1, 1, 0, 0),
    },
    "person": {
        "comm_b1": figures(1, 1, 1, 1, 1, 1, 0),
        "fire1": figures(2, 2, 2, 2, 1, 2, 0),
        "fire2": figures(2, 1, 0, 2, 0, 0, 1),  # twice_back (handled by), overdue (assigned)
        "police1": figures(1, 1, 1, 1, 1, 0, 0),
    },
}


@dataclass
class Filled:
    service: Service
    api: Api
    backend: PoolBackend
    data_dir: Path
    start: datetime
    events: dict[str, int]
    clock_file: Path


@pytest.fixture
def filled(broker: Any, tmp_path: Path, pool_backend: PoolBackend) -> Iterator[Filled]:
    clock_file = tmp_path / "case-clock"
    settings = aggregator_settings(
        broker, tmp_path / "agg", test_clock_file=clock_file, **pool_backend.settings_overrides()
    )
    service = Service(settings, port=0, log_level="warning", password_hasher=FAST_HASHER)
    for username, (level, scope, department) in OPERATORS.items():
        service.auth.create_account(
            username, level, scope_code=scope, department=department, password=PASSWORD
        )
    service.start()
    api = Api(service.url)
    try:
        assert service.aggregator.ingest.wait_connected(5)
        spots = {
            "A": interior(grid_in_community(0, 5)),
            "B": interior(grid_in_community(1, 5)),
        }
        names = list(CASES)
        for n, name in enumerate(names):
            community, type_code, _ = CASES[name]
            lat, lon = spots[community]
            publish(broker, make_alert(f"m-cam-{n}", lat, lon, type=type_code))
        items = wait_for_events(api, len(names))
        by_type = {i["type"]: int(i["event_id"]) for i in items}
        events = {name: by_type[CASES[name][1]] for name in names}
        # every step a real step in the pool, at a known time after the start
        start = datetime.now(UTC)
        store = CaseStore(pool_backend.target, default_catalogue())
        try:
            for name, (_community, _type, steps) in CASES.items():
                for minutes, actor, action, payload in steps:
                    store.apply_step(
                        events[name], action, actor, payload, None, now=start + minutes * MIN
                    )
            store.assign(
                events["overdue"],
                "fire2",
                COMM_B,
                None,
                assignee_scope=("", "fire"),
                now=start + 5 * MIN,
            )
        finally:
            store.close()
        # the service's case clock: two days on, every step long past
        OffsetFileClock(clock_file).set(2 * 86400)
        yield Filled(service, api, pool_backend, tmp_path / "agg", start, events, clock_file)
    finally:
        api.close()
        service.stop()


def _groups(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keys = list(figures(1, 1, 1, 1, 1, 1, 1))
    return {g["key"]: {k: g[k] for k in keys} for g in body["groups"]}


def _metrics(f: Filled, who: str, **params: Any) -> dict[str, Any]:
    r = f.api.get("/api/v1/cases/metrics", who, **params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_rates_per_community_department_and_person_equal_the_hand_computed_ones(
    filled: Filled,
) -> None:
    for by, expected in EXPECTED.items():
        body = _metrics(filled, "admin", by=by)
        assert body["by"] == by
        assert _groups(body) == expected, by  # the same divisions: exactly equal floats
    # per stage: fire's acceptance clock ran 4 times: 2 on time, 1 late, 1 running late
    fire = {g["key"]: g for g in _metrics(filled, "admin", by="department")["groups"]}["fire"]
    assert fire["stages"]["accept"] == {
        "due": 4,
        "on_time": 2,
        "overdue": 1,
        "on_time_rate": 0.5,
    }
    total = _metrics(filled, "admin")["total"]
    assert (total["registered"], total["not_ours"], total["overdue"]) == (6, 1, 1)


def test_each_caller_sees_its_scope_and_period(filled: Filled) -> None:
    # a community: its own cases only
    body = _metrics(filled, "comm_a", by="community")
    assert list(_groups(body)) == [COMMUNITY_A]
    # a department: the cases whistled to it
    assert list(_groups(_metrics(filled, "fire", by="department"))) == ["fire"]
    assert list(_groups(_metrics(filled, "police", by="person"))) == ["police1"]
    # the period is the registration time's
    before = (filled.start - timedelta(hours=1)).isoformat()
    assert _metrics(filled, "admin", until=before)["groups"] == []
    assert len(_metrics(filled, "admin", since=before)["groups"]) == 2
    r = filled.api.get(
        "/api/v1/cases/metrics", "admin", since=filled.start.isoformat(), until=before
    )
    assert r.status_code == 400
    assert filled.api.get("/api/v1/cases/metrics").status_code == 401
    assert filled.api.get("/api/v1/cases/metrics", "admin", by="street").status_code == 422


def test_the_cli_prints_the_same_figures(filled: Filled) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CWG_")} | {
        f"CWG_{k.upper()}": str(v) for k, v in _pool_env(filled.backend).items()
    }
    env["CWG_TEST_CLOCK_FILE"] = str(filled.clock_file)  # "now" two days on, as the API's
    out = subprocess.run(
        [sys.executable, "-m", "aggregator.cli.main", "cases", "metrics", "--by", "department",
         "--days", "3", "--json", "--data-dir", str(filled.data_dir)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert _groups(body) == EXPECTED["department"]
    table = subprocess.run(
        [sys.executable, "-m", "aggregator.cli.main", "cases", "metrics", "--by", "department",
         "--data-dir", str(filled.data_dir)],
        capture_output=True, text=True, timeout=60, env=env | {"COLUMNS": "160"}, check=False,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    # fire: 处置率 2 of 4, 按期处置率 1 of 4, 一次性处置率 2 of 3
    fire = next(line for line in table.stdout.splitlines() if " fire " in line)
    cells = tuple(cell.strip() for cell in fire.split("│")[3:6])
    assert cells == ("50% (2/4)", "25% (1/4)", "67% (2/3)")
    assert "password" not in out.stdout + out.stderr


def _pool_env(backend: PoolBackend) -> dict[str, str]:
    if backend.is_postgres:
        return {"pool_url": backend.target}
    return {"pool_path": backend.target}
