"""The case lifecycle table (Longgang 7–8, Jiangsu 6.2–6.3): every (state, action, role).

The expectations below are written out by hand from the standards, not read from
``lifecycle.yaml``: a change to the table that this file does not also make fails here.
"""

from __future__ import annotations

import functools
import itertools
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from aggregator.access.auth import Level
from aggregator.cases import (
    Action,
    Case,
    ClockName,
    CommunityPolicy,
    ForbiddenError,
    Mode,
    Outcome,
    PayloadError,
    StaleVersionError,
    State,
    WrongStateError,
    allowed_actions,
    apply,
    load_lifecycle,
)
from aggregator.cases.deadlines import SHANGHAI
from aggregator.cases.rules import LIFECYCLE_PATH, counts_as_not_handled
from aggregator.errors import ConfigError

from .case_support import (
    FULL_PAYLOAD,
    OTHER_GRID,
    PHOTO,
    T0,
    drive,
    new_case,
    operator,
)

A = Action
C, S, K, D = Level.COMMUNITY, Level.STREET, Level.COUNTY, Level.DEPARTMENT

# How to reach each starting point from registration: (action, minutes after registration).
_PATHS: dict[str, list[tuple[Action, float]]] = {
    "registered": [],
    "assessing": [(A.VERIFY, 1)],
    "community_handling": [(A.VERIFY, 1), (A.SELF_HANDLE, 2)],
    "community_handling+ext": [(A.VERIFY, 1), (A.SELF_HANDLE, 2), (A.APPLY_EXTENSION, 3)],
    "whistled": [(A.VERIFY, 1), (A.WHISTLE, 2)],
    "dept_handling": [(A.VERIFY, 1), (A.WHISTLE, 2), (A.ACCEPT_OFF_SITE, 10)],
    "dept_handling+ext": [
        (A.VERIFY, 1),
        (A.WHISTLE, 2),
        (A.ACCEPT_OFF_SITE, 10),
        (A.APPLY_EXTENSION, 20),
    ],
    "en_route": [(A.VERIFY, 1), (A.WHISTLE, 2), (A.ACCEPT_ON_SITE, 10)],
    "on_site": [(A.VERIFY, 1), (A.WHISTLE, 2), (A.ACCEPT_ON_SITE, 10), (A.ARRIVE, 40)],
    "on_site+ext": [
        (A.VERIFY, 1),
        (A.WHISTLE, 2),
        (A.ACCEPT_ON_SITE, 10),
        (A.ARRIVE, 40),
        (A.APPLY_EXTENSION, 50),
    ],
    "reviewing": [(A.VERIFY, 1), (A.WHISTLE, 2), (A.ACCEPT_OFF_SITE, 10), (A.HANDLE, 60)],
    "rehandling": [
        (A.VERIFY, 1),
        (A.WHISTLE, 2),
        (A.ACCEPT_OFF_SITE, 10),
        (A.HANDLE, 60),
        (A.SEND_BACK, 70),
    ],
    "rehandling+ext": [
        (A.VERIFY, 1),
        (A.WHISTLE, 2),
        (A.ACCEPT_OFF_SITE, 10),
        (A.HANDLE, 60),
        (A.SEND_BACK, 70),
        (A.APPLY_EXTENSION, 80),
    ],
    "closed": [
        (A.VERIFY, 1),
        (A.WHISTLE, 2),
        (A.ACCEPT_OFF_SITE, 10),
        (A.HANDLE, 60),
        (A.ACCEPT_FEEDBACK, 70),
    ],
}

_EXT = {"community_handling", "dept_handling", "on_site", "rehandling"}

# (starting point, action) → (levels that may take it, state after). Everything else is refused.
EXPECTED: dict[tuple[str, Action], tuple[frozenset[Level], State]] = {
    ("registered", A.VERIFY): (frozenset({C}), State.ASSESSING),
    ("registered", A.NOT_OURS): (frozenset({C}), State.CLOSED),
    ("assessing", A.SELF_HANDLE): (frozenset({C}), State.COMMUNITY_HANDLING),
    ("assessing", A.WHISTLE): (frozenset({C, S, K}), State.WHISTLED),
    ("community_handling", A.WHISTLE): (frozenset({C, S, K}), State.WHISTLED),
    ("community_handling", A.HANDLE): (frozenset({C}), State.CLOSED),
    ("whistled", A.ACCEPT_OFF_SITE): (frozenset({D}), State.DEPT_HANDLING),
    ("whistled", A.ACCEPT_ON_SITE): (frozenset({D}), State.EN_ROUTE),
    ("en_route", A.ARRIVE): (frozenset({D}), State.ON_SITE),
    ("dept_handling", A.HANDLE): (frozenset({D}), State.REVIEWING),
    ("on_site", A.HANDLE): (frozenset({D}), State.REVIEWING),
    ("rehandling", A.HANDLE): (frozenset({D}), State.REVIEWING),
    ("reviewing", A.ACCEPT_FEEDBACK): (frozenset({C}), State.CLOSED),
    ("reviewing", A.SEND_BACK): (frozenset({C}), State.REHANDLING),
}
for _state in _EXT:
    EXPECTED[(_state, A.APPLY_EXTENSION)] = (frozenset({C}), State(_state))
    EXPECTED[(_state + "+ext", A.APPROVE_EXTENSION)] = (frozenset({K}), State(_state))
    EXPECTED[(_state + "+ext", A.REFUSE_EXTENSION)] = (frozenset({K}), State(_state))
    # A pending extension does not stop the case from moving on.
    for (start, action), (levels, to) in list(EXPECTED.items()):
        if start == _state and action is not A.APPLY_EXTENSION:
            EXPECTED[(_state + "+ext", action)] = (levels, to)

_TAKES: dict[Action, frozenset[Level]] = {}
for (_, _action), (_levels, _) in EXPECTED.items():
    _TAKES[_action] = _TAKES.get(_action, frozenset()) | _levels


@functools.cache
def case_at(start: str) -> Case:
    case, _ = drive(new_case(), _PATHS[start])
    return case


def _now(case: Case) -> datetime:
    return case.registered_at + timedelta(hours=3)


def _payload(action: Action, case: Case) -> dict[str, object]:
    body = dict(FULL_PAYLOAD[action])
    if action is A.APPROVE_EXTENSION:
        body["until"] = "2026-11-30T18:00:00+08:00"
    return body


@pytest.mark.parametrize(
    ("start", "action", "level"),
    list(itertools.product(_PATHS, Action, [C, S, K, D, Level.ADMIN])),
)
def test_every_state_action_role(start: str, action: Action, level: Level) -> None:
    case = case_at(start)
    actor = operator(level)
    expected = EXPECTED.get((start, action))
    allowed = allowed_actions(case, actor)
    if expected is not None and level in expected[0]:
        step = apply(case, action, actor, _payload(action, case), _now(case))
        assert step.after is expected[1]
        assert step.case.state is expected[1]
        assert step.version == case.version + 1
        assert step.expected_version == case.version
        assert step.audit.action == action.value
        assert step.audit.before == case.state.value
        assert step.audit.after == expected[1].value
        assert step.audit.role == level.value
        assert step.audit.actor == actor.username
        assert action in allowed
        return
    assert action not in allowed
    if level not in _TAKES[action] or expected is not None:
        error: type[Exception] = ForbiddenError  # wrong role: 403
    else:
        error = WrongStateError  # the role takes this action, but not now: 409
    with pytest.raises(error):
        apply(case, action, actor, _payload(action, case), _now(case))


def test_allowed_actions_per_role_on_a_whistled_case() -> None:
    case = case_at("whistled")
    assert allowed_actions(case, operator(D)) == [A.ACCEPT_OFF_SITE, A.ACCEPT_ON_SITE]
    assert allowed_actions(case, operator(D, dept="police")) == []  # a co-department
    assert allowed_actions(case, operator(C)) == []
    assert allowed_actions(case_at("dept_handling"), operator(C)) == [A.APPLY_EXTENSION]
    assert allowed_actions(case_at("dept_handling+ext"), operator(K)) == [
        A.APPROVE_EXTENSION,
        A.REFUSE_EXTENSION,
    ]


@pytest.mark.parametrize(
    ("start", "action", "actor"),
    [
        ("registered", A.VERIFY, operator(C, scope="330383101002")),  # the next community
        ("assessing", A.WHISTLE, operator(S, scope="330383102")),  # another street
        ("dept_handling+ext", A.APPROVE_EXTENSION, operator(K, scope="330384")),  # county
        ("whistled", A.ACCEPT_OFF_SITE, operator(D, dept="police")),  # a co-department
        ("whistled", A.ACCEPT_OFF_SITE, operator(D, scope="330383102")),  # outside its prefix
    ],
)
def test_outside_the_area_or_not_the_lead_is_forbidden(
    start: str, action: Action, actor: object
) -> None:
    case = case_at(start)
    assert action not in allowed_actions(case, actor)  # type: ignore[arg-type]
    with pytest.raises(ForbiddenError):
        apply(case, action, actor, _payload(action, case), _now(case))  # type: ignore[arg-type]


def test_two_operators_at_once_one_wins_the_other_is_stale() -> None:
    case = case_at("reviewing")
    first = apply(
        case, A.ACCEPT_FEEDBACK, operator(C), {}, _now(case), expected_version=case.version
    )
    assert first.case.state is State.CLOSED
    # The second operator computed from the same version; storage hands it the new row.
    with pytest.raises(StaleVersionError):
        apply(
            first.case,
            A.SEND_BACK,
            operator(C),
            FULL_PAYLOAD[A.SEND_BACK],
            _now(case),
            expected_version=case.version,
        )
    with pytest.raises(StaleVersionError):
        apply(
            case,
            A.SEND_BACK,
            operator(C),
            FULL_PAYLOAD[A.SEND_BACK],
            _now(case),
            expected_version=case.version - 1,
        )


@pytest.mark.parametrize(
    ("start", "action", "payload", "message"),
    [
        ("registered", A.NOT_OURS, {}, "requires a reason"),
        ("registered", A.NOT_OURS, {"reason": "   "}, "requires a reason"),
        ("registered", A.VERIFY, {"reason": "x", "lead_department": "fire"}, "does not take"),
        ("assessing", A.WHISTLE, {}, "lead department"),
        ("assessing", A.WHISTLE, {"lead_department": "Fire!"}, "not a department code"),
        ("assessing", A.WHISTLE, {"lead_department": "fire", "co_departments": ["fire"]}, "once"),
        ("dept_handling", A.HANDLE, {}, "summary or before/after photos"),
        ("dept_handling", A.HANDLE, {"photos": ["not-a-hash"]}, "sha256"),
        ("reviewing", A.SEND_BACK, {}, "requires a reason"),
        ("dept_handling", A.APPLY_EXTENSION, {}, "requires a reason"),
        ("dept_handling+ext", A.APPROVE_EXTENSION, {"until": "2026-11-02T10:00:00+08:00"}, "after"),
        ("dept_handling+ext", A.REFUSE_EXTENSION, {}, "requires a reason"),
        (
            "dept_handling",
            A.APPLY_EXTENSION,
            {"reason": "x", "until": "2026-11-02T12:00:00+08:00"},
            "must end after",
        ),
        ("assessing", "escalate_to_mars", {}, "unknown action"),
    ],
)
def test_requirements(start: str, action: str, payload: dict[str, object], message: str) -> None:
    case = case_at(start)
    level = {A.HANDLE: D, A.APPROVE_EXTENSION: K, A.REFUSE_EXTENSION: K}.get(action, C)  # type: ignore[call-overload]
    with pytest.raises(PayloadError, match=message):
        apply(case, action, operator(level), payload, _now(case))


def test_whistle_list_and_departments_of_the_community() -> None:
    case = case_at("assessing")  # smoke_fire, Appendix A item 30
    payload = FULL_PAYLOAD[A.WHISTLE]
    listed = CommunityPolicy(
        whistleable_items=frozenset({30}), departments=frozenset({"fire", "police"})
    )
    assert apply(case, A.WHISTLE, operator(C), payload, T0, policy=listed).after is State.WHISTLED
    unlisted = CommunityPolicy(whistleable_items=frozenset({2, 4}))
    with pytest.raises(PayloadError, match="whistle list"):
        apply(case, A.WHISTLE, operator(C), payload, T0, policy=unlisted)
    by_type = CommunityPolicy(
        whistleable_items=frozenset(), whistleable_types=frozenset({"smoke_fire"})
    )
    assert apply(case, A.WHISTLE, operator(C), payload, T0, policy=by_type).after is State.WHISTLED
    no_police = CommunityPolicy(departments=frozenset({"fire"}))
    with pytest.raises(PayloadError, match="unknown department 'police'"):
        apply(case, A.WHISTLE, operator(C), payload, T0, policy=no_police)
    step = apply(case, A.WHISTLE, operator(C), payload, T0)
    assert (step.case.lead_department, step.case.co_departments) == ("fire", ("police",))
    assert step.audit.detail["co_departments"] == "police"


def _clock(case: Case, name: ClockName) -> tuple[datetime, datetime | None]:
    runs = [d for d in case.clocks if d.clock is name]
    assert runs, f"no {name} clock"
    return runs[-1].due_at, runs[-1].stopped_at


def test_each_stage_has_its_own_clock() -> None:
    registered = T0
    case, steps = drive(new_case(), [(A.VERIFY, 1), (A.SELF_HANDLE, 5)])
    # 8.1: the type's community deadline (15 min for smoke_fire) from the self-handle step.
    assert _clock(case, ClockName.COMMUNITY_HANDLE) == (registered + timedelta(minutes=20), None)
    whistled, steps = drive(case, [(A.WHISTLE, 10)])
    assert _clock(whistled, ClockName.COMMUNITY_HANDLE)[1] == registered + timedelta(minutes=10)
    assert [d.clock for d in steps[0].deadlines_cleared] == [ClockName.COMMUNITY_HANDLE]
    # 8.3: acceptance within 30 min of the whistle.
    assert _clock(whistled, ClockName.ACCEPT) == (registered + timedelta(minutes=40), None)
    off, _ = drive(whistled, [(A.ACCEPT_OFF_SITE, 25)])
    assert off.mode is Mode.OFF_SITE
    assert _clock(off, ClockName.FEEDBACK) == (registered + timedelta(minutes=10, hours=24), None)
    on, _ = drive(whistled, [(A.ACCEPT_ON_SITE, 25), (A.ARRIVE, 55)])
    # On site within 1 h of the whistle; a hard problem within 5 working days of it:
    # Mon 2 Nov 09:10 → Tue, Wed, Thu, Fri, Mon 9 Nov → 24:00 on Monday 9 November.
    assert _clock(on, ClockName.ARRIVE) == (
        registered + timedelta(minutes=70),
        registered + timedelta(minutes=55),
    )
    assert _clock(on, ClockName.HARD_CLOSE) == (datetime(2026, 11, 10, tzinfo=SHANGHAI), None)
    # Re-handling gets the stage's own span again, from the send-back.
    back, _ = drive(off, [(A.HANDLE, 60), (A.SEND_BACK, 120)])
    assert _clock(back, ClockName.FEEDBACK)[1] == registered + timedelta(minutes=60)
    assert _clock(back, ClockName.REHANDLE) == (registered + timedelta(minutes=120, hours=24), None)
    assert back.clocks[-1].round == 1
    on_back, _ = drive(on, [(A.HANDLE, 60), (A.SEND_BACK, 120)])
    assert _clock(on_back, ClockName.REHANDLE)[0] == datetime(2026, 11, 10, tzinfo=SHANGHAI)
    closed, _ = drive(back, [(A.HANDLE, 200), (A.ACCEPT_FEEDBACK, 210)])
    assert closed.running() == ()
    assert (closed.outcome, closed.closed_at) == (
        Outcome.HANDLED,
        registered + timedelta(minutes=210),
    )


def test_whistled_on_the_thursday_before_national_day() -> None:
    # Thursday 24 September 2026, 16:00: Mid-Autumn (25–27 Sep) and National Day (1–7 Oct)
    # follow. Working days after it: 28, 29, 30 Sep, 8 and 9 Oct → 24:00 on Friday 9 October.
    thursday = datetime(2026, 9, 24, 15, 0, tzinfo=SHANGHAI)
    case, _ = drive(
        new_case(at=thursday),
        [(A.VERIFY, 10), (A.WHISTLE, 60), (A.ACCEPT_ON_SITE, 70), (A.ARRIVE, 100)],
    )
    assert _clock(case, ClockName.HARD_CLOSE) == (datetime(2026, 10, 10, tzinfo=SHANGHAI), None)


def test_an_approved_extension_sets_the_new_deadline() -> None:
    case, _ = drive(
        new_case(),
        [(A.VERIFY, 1), (A.WHISTLE, 2), (A.ACCEPT_ON_SITE, 10), (A.ARRIVE, 40)],
    )
    asked = {"reason": "a new pump is needed", "until": "2026-11-16T00:00:00+08:00"}
    applied, _ = drive(case, [(A.APPLY_EXTENSION, 60, asked)])
    assert applied.extension is not None
    assert applied.extension.reason == asked["reason"]
    assert _clock(applied, ClockName.HARD_CLOSE)[0] == datetime(2026, 11, 10, tzinfo=SHANGHAI)
    # The city-level account approves what was asked for …
    approved, steps = drive(applied, [(A.APPROVE_EXTENSION, 90, {})])
    assert approved.extension is None
    assert _clock(approved, ClockName.HARD_CLOSE)[0] == datetime(2026, 11, 16, tzinfo=SHANGHAI)
    assert approved.clocks[-1].extended
    assert [d.clock for d in steps[0].deadlines_set] == [ClockName.HARD_CLOSE]
    # … or its own date.
    own, _ = drive(applied, [(A.APPROVE_EXTENSION, 90, {"until": "2026-11-13T00:00:00+08:00"})])
    assert _clock(own, ClockName.HARD_CLOSE)[0] == datetime(2026, 11, 13, tzinfo=SHANGHAI)
    refused, _ = drive(applied, [(A.REFUSE_EXTENSION, 90)])
    assert refused.extension is None
    assert _clock(refused, ClockName.HARD_CLOSE)[0] == datetime(2026, 11, 10, tzinfo=SHANGHAI)
    # An extension that was never decided lapses when the case moves on.
    moved, _ = drive(applied, [(A.HANDLE, 100)])
    assert (moved.state, moved.extension) == (State.REVIEWING, None)
    # Approving without a date when none was asked for is refused.
    plain, _ = drive(case, [(A.APPLY_EXTENSION, 60, {"reason": "weather"})])
    with pytest.raises(PayloadError, match="new deadline"):
        drive(plain, [(A.APPROVE_EXTENSION, 90, {})])


def test_second_ineffective_feedback_counts_as_not_handled() -> None:
    case = case_at("rehandling")
    assert case.send_backs == 1
    assert not counts_as_not_handled(case)
    again, _ = drive(case, [(A.HANDLE, 100), (A.SEND_BACK, 110)])
    assert again.send_backs == 2
    assert counts_as_not_handled(again)
    assert again.state is State.REHANDLING  # the work is still owed


def test_not_ours_closes_with_its_reason() -> None:
    step = apply(new_case(), A.NOT_OURS, operator(C), FULL_PAYLOAD[A.NOT_OURS], T0)
    assert (step.case.state, step.case.outcome) == (State.CLOSED, Outcome.NOT_OURS)
    assert step.audit.reason == FULL_PAYLOAD[A.NOT_OURS]["reason"]


def test_handle_records_evidence_and_handler() -> None:
    case = case_at("dept_handling")
    step = apply(case, A.HANDLE, operator(D), FULL_PAYLOAD[A.HANDLE], _now(case))
    assert step.audit.evidence == (PHOTO,)
    assert step.audit.note == FULL_PAYLOAD[A.HANDLE]["summary"]
    assert step.case.handled_by == operator(D).username


def test_naive_time_and_other_community_case() -> None:
    with pytest.raises(ValueError, match="aware"):
        apply(new_case(), A.VERIFY, operator(C), {}, datetime(2026, 11, 2, 9))
    other = new_case(grid=OTHER_GRID)
    assert allowed_actions(other, operator(C)) == []
    assert allowed_actions(other, operator(S)) == []  # same street: street takes no verify


def test_the_shipped_table_reaches_every_state() -> None:
    table = load_lifecycle()
    reached = {State.REGISTERED}
    frontier = [State.REGISTERED]
    while frontier:
        state = frontier.pop()
        for t in table.transitions:
            if t.from_ is state and t.to not in reached:
                reached.add(t.to)
                frontier.append(t.to)
    assert reached == set(State)
    assert table.re_handle_max_rounds == 2


def test_a_bad_table_names_the_key(tmp_path: Path) -> None:
    text = LIFECYCLE_PATH.read_text(encoding="utf-8")
    bad = tmp_path / "lifecycle.yaml"
    bad.write_text(
        text.replace("to: assessing, roles: [community]", "to: assessing, roles: [mayor]")
    )
    with pytest.raises(ConfigError, match="roles"):
        load_lifecycle(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text(
        text.replace(
            "  - {from: registered, action: not_ours, to: closed",
            "  - {from: registered, action: verify, to: closed",
        )
    )
    with pytest.raises(ConfigError, match="appears twice"):
        load_lifecycle(twice)


def test_a_closing_transition_names_its_outcome(tmp_path: Path) -> None:
    text = LIFECYCLE_PATH.read_text(encoding="utf-8")
    bad = tmp_path / "lifecycle.yaml"
    bad.write_text(
        text.replace(
            "to: closed, outcome: handled, roles: [community]}", "to: closed, roles: [community]}"
        )
    )
    with pytest.raises(ConfigError, match="outcome exactly when"):
        load_lifecycle(bad)


def test_a_case_round_trips_through_json() -> None:
    # Storage keeps a case as JSON (or columns): what comes back must equal what went in.
    case, _ = drive(
        new_case(),
        [
            (A.VERIFY, 1),
            (A.WHISTLE, 2),
            (A.ACCEPT_ON_SITE, 10),
            (A.ARRIVE, 40),
            (A.APPLY_EXTENSION, 50),
            (A.HANDLE, 60),
            (A.SEND_BACK, 70),
        ],
    )
    again = Case.model_validate_json(case.model_dump_json())
    assert again == case
    assert again.clocks[-1].due_at == case.clocks[-1].due_at
