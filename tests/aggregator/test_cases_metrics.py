"""Handling metrics (Longgang 8.6): cases with known late, on-time and sent-back steps give
hand-computed 处置率, 按期处置率 and 一次性处置率 per community, department and person."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from aggregator.access.auth import Level, Operator
from aggregator.cases import Action, Case, ClockName
from aggregator.cases.metrics import By, case_figures, figures_by

from .case_support import COMMUNITY, GRID, OTHER_COMMUNITY, OTHER_GRID, T0, drive, new_case

A = Action
NOW = T0 + timedelta(days=3)  # Thursday 5 November 2026, 09:00


def person(username: str, level: Level, *, scope: str = "", dept: str | None = None) -> Operator:
    return Operator(username, level, scope, dept, username)


LI = person("li", Level.COMMUNITY, scope=COMMUNITY)  # community A's operator
QIAN = person("qian", Level.COMMUNITY, scope=OTHER_COMMUNITY)  # community B's operator
ZHANG = person("zhang", Level.DEPARTMENT, dept="fire")
ZHAO = person("zhao", Level.DEPARTMENT, dept="police")

_COMMUNITY_ACTIONS = (
    A.VERIFY,
    A.NOT_OURS,
    A.SELF_HANDLE,
    A.WHISTLE,
    A.ACCEPT_FEEDBACK,
    A.SEND_BACK,
)
_DEPT_ACTIONS = (A.ACCEPT_OFF_SITE, A.ACCEPT_ON_SITE, A.ARRIVE, A.HANDLE)


def _actors(community: Operator, dept: Operator | None) -> dict[Action, Operator]:
    out = dict.fromkeys(_COMMUNITY_ACTIONS, community)
    out.update(dict.fromkeys(_DEPT_ACTIONS, dept or community))
    return out


def _case(
    case_id: str,
    at: datetime,
    steps: list[Any],
    *,
    other: bool = False,
    dept: Operator | None = None,
) -> Case:
    grid = OTHER_GRID if other else GRID
    community = QIAN if other else LI
    case, _ = drive(new_case(case_id, grid=grid, at=at), steps, actors=_actors(community, dept))
    return case


POLICE = {"lead_department": "police"}


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    # smoke_fire: the community has 15 min (8.1); a department 30 min to accept, 24 h to feed
    # back, 1 h to arrive, 5 working days for a hard problem.
    return [
        # Community A: handled by itself on time, and late.
        _case("c1", T0, [(A.VERIFY, 1), (A.SELF_HANDLE, 2), (A.HANDLE, 10)]),
        _case("c2", T0 + timedelta(hours=1), [(A.VERIFY, 1), (A.SELF_HANDLE, 2), (A.HANDLE, 30)]),
        # Community A, whistled to fire: everything on time, first time.
        _case(
            "c3",
            T0 + timedelta(hours=2),
            [
                (A.VERIFY, 1),
                (A.WHISTLE, 2),
                (A.ACCEPT_OFF_SITE, 20),
                (A.HANDLE, 300),
                (A.ACCEPT_FEEDBACK, 320),
            ],
            dept=ZHANG,
        ),
        # Community A, whistled to fire: accepted after 40 min (late), sent back once.
        _case(
            "c4",
            T0 + timedelta(hours=3),
            [
                (A.VERIFY, 1),
                (A.WHISTLE, 2),
                (A.ACCEPT_OFF_SITE, 42),
                (A.HANDLE, 300),
                (A.SEND_BACK, 310),
                (A.HANDLE, 600),
                (A.ACCEPT_FEEDBACK, 620),
            ],
            dept=ZHANG,
        ),
        # Community B, whistled to police on site: sent back twice → counts as not handled.
        _case(
            "c5",
            T0 + timedelta(hours=4),
            [
                (A.VERIFY, 1),
                (A.WHISTLE, 2, POLICE),
                (A.ACCEPT_ON_SITE, 10),
                (A.ARRIVE, 40),
                (A.HANDLE, 120),
                (A.SEND_BACK, 130),
                (A.HANDLE, 200),
                (A.SEND_BACK, 210),
                (A.HANDLE, 300),
                (A.ACCEPT_FEEDBACK, 310),
            ],
            other=True,
            dept=ZHAO,
        ),
        # Community B, police accepted off-site and never fed back: overdue now; assigned.
        _case(
            "c6",
            T0 + timedelta(hours=5),
            [(A.VERIFY, 1), (A.WHISTLE, 2, POLICE), (A.ACCEPT_OFF_SITE, 10)],
            other=True,
            dept=ZHAO,
        ).model_copy(update={"assignee": "zhao"}),
        # Community B: not ours.
        _case("c7", T0 + timedelta(hours=6), [(A.NOT_OURS, 1)], other=True),
        # Community B: registered ten minutes ago, being handled, not due yet.
        _case("c8", NOW - timedelta(minutes=10), [(A.VERIFY, 1), (A.SELF_HANDLE, 2)], other=True),
        # Community A, before the period: late, left out by `since`.
        _case("c9", T0 - timedelta(days=1), [(A.VERIFY, 1), (A.SELF_HANDLE, 2), (A.HANDLE, 100)]),
    ]


def _rates(f: Any) -> tuple[float | None, float | None, float | None]:
    return f.handling_rate, f.on_time_rate, f.first_time_rate


def test_per_community(cases: list[Case]) -> None:
    got = figures_by(cases, By.COMMUNITY, NOW, since=T0)
    assert list(got) == [COMMUNITY, OTHER_COMMUNITY]
    a, b = got[COMMUNITY], got[OTHER_COMMUNITY]
    counts = ("registered", "not_ours", "closed", "handled", "not_handled", "due", "on_time")
    assert [getattr(a, k) for k in counts] == [4, 0, 4, 4, 0, 4, 2]
    assert (a.first_time, a.overdue) == (3, 0)
    assert _rates(a) == (1.0, 0.5, 0.75)
    assert [getattr(b, k) for k in counts] == [3, 1, 1, 0, 1, 2, 0]
    assert (b.first_time, b.overdue) == (0, 1)
    assert _rates(b) == (0.0, 0.0, 0.0)
    # Per stage: 8.1 community handling, 8.3 acceptance / feedback / arrival / hard problem.
    stage = {k: (v.due, v.on_time, v.overdue) for k, v in a.stages.items()}
    assert stage == {
        ClockName.COMMUNITY_HANDLE: (2, 1, 0),
        ClockName.ACCEPT: (2, 1, 0),
        ClockName.FEEDBACK: (2, 2, 0),
        ClockName.REHANDLE: (1, 1, 0),
    }
    stage = {k: (v.due, v.on_time, v.overdue) for k, v in b.stages.items()}
    assert stage == {
        ClockName.ACCEPT: (2, 2, 0),
        ClockName.ARRIVE: (1, 1, 0),
        ClockName.HARD_CLOSE: (1, 1, 0),
        ClockName.REHANDLE: (2, 2, 0),
        ClockName.FEEDBACK: (1, 0, 1),
        ClockName.COMMUNITY_HANDLE: (0, 0, 0),  # c8's clock still runs within its deadline
    }
    assert b.stages[ClockName.FEEDBACK].on_time_rate == 0.0
    assert b.stages[ClockName.COMMUNITY_HANDLE].on_time_rate is None


def test_per_department(cases: list[Case]) -> None:
    got = figures_by(cases, By.DEPARTMENT, NOW, since=T0)
    assert list(got) == ["fire", "police"]  # self-handled cases have no department
    fire, police = got["fire"], got["police"]
    assert (fire.registered, fire.handled, fire.due, fire.on_time, fire.first_time) == (
        2,
        2,
        2,
        1,
        1,
    )
    assert _rates(fire) == (1.0, 0.5, 0.5)
    assert fire.stages[ClockName.ACCEPT].on_time_rate == 0.5
    assert (police.registered, police.closed, police.handled, police.not_handled) == (2, 1, 0, 1)
    assert (police.due, police.overdue) == (2, 1)
    assert _rates(police) == (0.0, 0.0, 0.0)


def test_per_person(cases: list[Case]) -> None:
    got = figures_by(cases, By.PERSON, NOW, since=T0)
    # c1, c2 handled by li; c3, c4 by zhang; c5 by zhao and c6 assigned to zhao; c7, c8 nobody.
    assert list(got) == ["li", "zhang", "zhao"]
    assert _rates(got["li"]) == (1.0, 0.5, 1.0)
    assert _rates(got["zhang"]) == (1.0, 0.5, 0.5)
    zhao = got["zhao"]
    assert (zhao.registered, zhao.closed, zhao.handled, zhao.due, zhao.overdue) == (2, 1, 0, 2, 1)
    assert _rates(zhao) == (0.0, 0.0, 0.0)


def test_the_period(cases: list[Case]) -> None:
    everything = figures_by(cases, By.COMMUNITY, NOW)
    assert everything[COMMUNITY].registered == 5  # c9 counts without `since`
    assert everything[COMMUNITY].on_time_rate == pytest.approx(2 / 5)
    before_c8 = figures_by(cases, By.COMMUNITY, NOW, since=T0, until=NOW - timedelta(minutes=30))
    assert before_c8[OTHER_COMMUNITY].registered == 2
    total = case_figures([c for c in cases if c.registered_at >= T0], NOW)
    assert (total.registered, total.not_ours, total.handled, total.overdue) == (7, 1, 4, 1)
    assert total.handling_rate == pytest.approx(4 / 7)
    assert total.on_time_rate == pytest.approx(2 / 6)
    assert total.first_time_rate == pytest.approx(3 / 5)
    empty = case_figures([], NOW)
    assert _rates(empty) == (None, None, None)


def test_later_on_the_open_case_is_still_not_due(cases: list[Case]) -> None:
    c8 = cases[7]
    # Ten minutes on it is still within its 15 minutes; an hour later it is overdue.
    assert case_figures([c8], NOW).overdue == 0
    assert case_figures([c8], NOW + timedelta(hours=1)).overdue == 1


def test_a_late_whistle_is_the_community_s_not_the_department_s() -> None:
    # The community kept the case past its 15 minutes, then whistled; fire did everything in
    # time. The community is late, the department and its handler are not.
    case = _case(
        "late-whistle",
        T0,
        [
            (A.VERIFY, 1),
            (A.SELF_HANDLE, 2),
            (A.WHISTLE, 40),
            (A.ACCEPT_OFF_SITE, 50),
            (A.HANDLE, 100),
            (A.ACCEPT_FEEDBACK, 110),
        ],
        dept=ZHANG,
    )
    assert figures_by([case], By.COMMUNITY, NOW)[COMMUNITY].on_time_rate == 0.0
    fire = figures_by([case], By.DEPARTMENT, NOW)["fire"]
    assert fire.on_time_rate == 1.0
    assert ClockName.COMMUNITY_HANDLE not in fire.stages
    assert figures_by([case], By.PERSON, NOW)["zhang"].on_time_rate == 1.0
    assert case_figures([case], NOW).on_time_rate == 0.0
