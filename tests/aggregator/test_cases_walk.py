"""Random walks through the lifecycle: what ``allowed_actions`` offers always applies, nothing
else ever does, and the case, its clocks and its audit chain stay consistent."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.access.auth import Level
from aggregator.cases import (
    Action,
    Case,
    ForbiddenError,
    State,
    WrongStateError,
    allowed_actions,
    apply,
    chain_all,
    verify,
)
from aggregator.cases.diagram import mermaid
from aggregator.cases.rules import default_lifecycle

from .case_support import FULL_PAYLOAD, new_case, operator

ACTORS = [operator(level) for level in (Level.COMMUNITY, Level.STREET, Level.COUNTY)]
ACTORS += [operator(Level.DEPARTMENT, dept="fire"), operator(Level.DEPARTMENT, dept="police")]
ACTORS.append(operator(Level.ADMIN))


def _payload(action: Action, case: Case) -> dict[str, object]:
    body = dict(FULL_PAYLOAD[action])
    if action is Action.WHISTLE:
        body = {"lead_department": "police", "co_departments": ["fire"]}
    if action is Action.APPLY_EXTENSION:
        # A day past the latest running deadline: an extension only ever lengthens.
        latest = max((d.due_at for d in case.running()), default=case.registered_at)
        body["until"] = latest + timedelta(days=1)
    return body


def _invariants(case: Case) -> None:
    running = [d.clock for d in case.clocks if d.running]
    assert len(running) == len(set(running)), running
    if case.state is State.CLOSED:
        assert running == []
        assert case.outcome is not None
        assert case.closed_at is not None
    else:
        assert case.outcome is None
    for d in case.clocks:
        assert d.due_at > d.started_at
        assert d.stopped_at is None or d.stopped_at >= d.started_at


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1000), st.integers(1, 240), st.integers(0, 1000)),
        max_size=20,
    )
)
def test_random_walk(moves: list[tuple[int, int, int]]) -> None:
    case = new_case()
    now = case.registered_at
    entries = []
    send_backs = 0
    for pick, minutes, probe in moves:
        now += timedelta(minutes=minutes)
        # Something not offered to an account is refused, as 403 or 409, never taken.
        actor = ACTORS[probe % len(ACTORS)]
        offered = allowed_actions(case, actor)
        refused = [a for a in Action if a not in offered]
        action = refused[probe % len(refused)]
        try:
            apply(case, action, actor, _payload(action, case), now)
        except (ForbiddenError, WrongStateError):
            pass
        else:
            raise AssertionError(f"{action} by {actor.username} in {case.state} was taken")
        # Something offered always applies.
        choices = [(a, act) for a in ACTORS for act in allowed_actions(case, a)]
        if not choices:
            assert case.state is State.CLOSED
            break
        actor, action = choices[pick % len(choices)]
        step = apply(
            case, action, actor, _payload(action, case), now, expected_version=case.version
        )
        assert step.version == case.version + 1
        assert step.audit.before == case.state.value
        assert step.audit.after == step.case.state.value
        send_backs += action is Action.SEND_BACK
        entries.append(step.audit)
        case = step.case
        _invariants(case)
    assert case.send_backs == send_backs
    assert verify(chain_all(entries)) == []


def test_every_action_is_offered_somewhere() -> None:
    assert {t.action for t in default_lifecycle().transitions} == set(Action)


def test_the_diagram_draws_every_transition() -> None:
    text = mermaid()
    assert text.startswith("stateDiagram-v2\n    [*] --> registered\n")
    for t in default_lifecycle().transitions:
        if t.from_ is not t.to:
            assert f"    {t.from_} --> {t.to}: {t.action} " in text
        else:
            assert f"{t.action} [" in text
    assert "starts hard_close 5 working days from the whistle" in text
