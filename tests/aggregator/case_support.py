"""Helpers for the case-lifecycle tests: real operator accounts and cases driven by real steps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from aggregator.access.auth import Level, Operator
from aggregator.cases import Action, Case, Step, apply
from aggregator.cases.deadlines import SHANGHAI

COUNTY = "330383"
STREET = "330383101"
COMMUNITY = "330383101001"
OTHER_COMMUNITY = "330383101002"
GRID = COMMUNITY + "01000005"  # 20 digits: county › street › community › kind › grid
OTHER_GRID = OTHER_COMMUNITY + "01000007"
PHOTO = "ab" * 32  # a sha256, as the snapshot store names photos

# Monday 2 November 2026, 09:00 in Shanghai: an ordinary working week.
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=SHANGHAI)


def operator(level: Level | str, *, scope: str | None = None, dept: str | None = None) -> Operator:
    lvl = Level(level)
    default_scope = {
        Level.COUNTY: COUNTY,
        Level.STREET: STREET,
        Level.COMMUNITY: COMMUNITY,
        Level.DEPARTMENT: "",
        Level.ADMIN: "",
    }[lvl]
    department = dept if dept is not None else ("fire" if lvl is Level.DEPARTMENT else None)
    name = f"{lvl.value}-{department or scope or default_scope}"
    return Operator(
        username=name,
        level=lvl,
        scope_code=default_scope if scope is None else scope,
        department=department,
        display_name=name,
    )


def new_case(
    case_id: str = "case-1",
    *,
    grid: str = GRID,
    at: datetime = T0,
    type_code: str = "smoke_fire",
    appendix_item: int | None = 30,
    community_deadline: timedelta = timedelta(minutes=15),
) -> Case:
    return Case(
        case_id=case_id,
        version=1,
        grid_code=grid,
        type_code=type_code,
        appendix_item=appendix_item,
        community_deadline=community_deadline,
        registered_at=at,
    )


# A payload that satisfies each action's requirements.
FULL_PAYLOAD: dict[Action, dict[str, Any]] = {
    Action.VERIFY: {},
    Action.NOT_OURS: {"reason": "the address lies in the next community"},
    Action.SELF_HANDLE: {"note": "the grid worker goes"},
    Action.WHISTLE: {"lead_department": "fire", "co_departments": ["police"]},
    Action.ACCEPT_OFF_SITE: {},
    Action.ACCEPT_ON_SITE: {},
    Action.ARRIVE: {},
    Action.HANDLE: {"summary": "extinguished; lift cleared", "photos": [PHOTO]},
    Action.ACCEPT_FEEDBACK: {},
    Action.SEND_BACK: {"reason": "the photo shows the bike still in the lift"},
    Action.APPLY_EXTENSION: {"reason": "parts on order", "until": "2026-11-20T18:00:00+08:00"},
    Action.APPROVE_EXTENSION: {},
    Action.REFUSE_EXTENSION: {"reason": "the matter is urgent"},
}

ACTOR_OF: dict[Action, Level] = {
    Action.VERIFY: Level.COMMUNITY,
    Action.NOT_OURS: Level.COMMUNITY,
    Action.SELF_HANDLE: Level.COMMUNITY,
    Action.WHISTLE: Level.COMMUNITY,
    Action.ACCEPT_OFF_SITE: Level.DEPARTMENT,
    Action.ACCEPT_ON_SITE: Level.DEPARTMENT,
    Action.ARRIVE: Level.DEPARTMENT,
    Action.HANDLE: Level.DEPARTMENT,
    Action.ACCEPT_FEEDBACK: Level.COMMUNITY,
    Action.SEND_BACK: Level.COMMUNITY,
    Action.APPLY_EXTENSION: Level.COMMUNITY,
    Action.APPROVE_EXTENSION: Level.COUNTY,
    Action.REFUSE_EXTENSION: Level.COUNTY,
}


def drive(
    case: Case,
    steps: Sequence[tuple[Action, float] | tuple[Action, float, dict[str, Any]]],
    *,
    actors: dict[Action, Operator] | None = None,
) -> tuple[Case, list[Step]]:
    """Apply ``(action, minutes after registration[, payload])`` steps with the usual actor of
    each action (a community handles a case it kept itself)."""
    taken: list[Step] = []
    for item in steps:
        action, minutes = item[0], item[1]
        payload = item[2] if len(item) == 3 else FULL_PAYLOAD[action]  # type: ignore[misc]
        level = ACTOR_OF[action]
        if action is Action.HANDLE and case.lead_department is None:
            level = Level.COMMUNITY
        actor = (actors or {}).get(action) or operator(
            level, dept=case.lead_department if level is Level.DEPARTMENT else None
        )
        step = apply(case, action, actor, payload, case.registered_at + timedelta(minutes=minutes))
        taken.append(step)
        case = step.case
    return case, taken
