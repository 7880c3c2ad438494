"""Handling metrics over cases (Longgang 8.6; Jiangsu 6.3), per community, department and person.

Pure: the caller hands in the cases (registered in the period it cares about) and ``now``.
Definitions, for the cases of one group:

* **registered** — cases registered in the period, less those closed as "not ours" (7.1: fed
  back to their source, never this community's to handle); those are counted in ``not_ours``.
* **处置率 handling rate** = handled / registered. *Handled*: closed with the feedback accepted
  (or closed by the community's own handling), and not sent back
  ``re_handle_max_rounds`` (2) times — Jiangsu 6.3 counts a second feedback that did not show
  effective handling as *not handled*, however the case ends later (``not_handled``).
* **按期处置率 on-time rate** = on time / due. *Due*: cases closed as handled (whether or not
  they count as handled) plus open cases with one of the group's deadlines already past; an
  open case whose deadlines are all ahead is not late yet and counts in neither. *On time*:
  handled cases whose every stage clock of the group's own stages stopped at or before its
  deadline (after any approved extension). A community answers for every stage of its cases;
  a department for its own (acceptance, arrival, feedback, hard problem, re-handling) only,
  so a community that whistled late does not make the department late; a person for the
  stages of the party they handled the case for.
* **按期处置率 per stage** (``stages``): for each stage clock (acceptance 30 min, on site 1 h,
  feedback 24 h, hard problem 5 working days, community 8.1, re-handling), the clock runs that
  ended on or before their deadline over the runs that ended or are running past it.
* **一次性处置率 first-time rate** = closed as handled without any send-back / closed as
  handled.
* **overdue** — open cases with a running clock past its deadline at ``now``: what supervision
  (督办) chases; per stage in ``stages``.

Groups: *community* is the grid code's first 12 digits; *department* the lead department of
whistled cases (a case the community handled itself has none); *person* the account the case
is assigned to, else the one that submitted its last feedback (a case with neither has none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from aggregator.cases.rules import (
    Case,
    ClockName,
    Lifecycle,
    Outcome,
    State,
    counts_as_not_handled,
    default_lifecycle,
)

__all__ = ["By", "Figures", "StageFigures", "case_figures", "figures_by"]


class By(StrEnum):
    COMMUNITY = "community"
    DEPARTMENT = "department"
    PERSON = "person"


@dataclass(slots=True)
class StageFigures:
    """One stage clock's runs in one group."""

    due: int = 0  # runs that ended, or are running past their deadline
    on_time: int = 0  # runs that ended on or before their deadline
    overdue: int = 0  # runs still running past their deadline

    @property
    def on_time_rate(self) -> float | None:
        return self.on_time / self.due if self.due else None


@dataclass(slots=True)
class Figures:
    """The counts of one group; the rates follow from them (None where nothing counts)."""

    key: str
    registered: int = 0
    not_ours: int = 0
    closed: int = 0  # closed as handled, including those that count as not handled
    handled: int = 0
    not_handled: int = 0  # closed or open, sent back re_handle_max_rounds times
    first_time: int = 0
    due: int = 0
    on_time: int = 0
    overdue: int = 0
    stages: dict[ClockName, StageFigures] = field(default_factory=dict)

    @property
    def handling_rate(self) -> float | None:
        return self.handled / self.registered if self.registered else None

    @property
    def on_time_rate(self) -> float | None:
        return self.on_time / self.due if self.due else None

    @property
    def first_time_rate(self) -> float | None:
        return self.first_time / self.closed if self.closed else None

    def add(
        self, case: Case, now: datetime, lifecycle: Lifecycle, owners: frozenset[str] | None
    ) -> None:
        """Count one case; ``owners``: whose stage clocks count (None: every clock)."""
        if case.outcome is Outcome.NOT_OURS:
            self.not_ours += 1
            return
        self.registered += 1
        failed = counts_as_not_handled(case, lifecycle)
        if failed:
            self.not_handled += 1
        closed = case.state is State.CLOSED and case.outcome is Outcome.HANDLED
        clocks = [
            d for d in case.clocks if owners is None or lifecycle.clocks[d.clock].owner in owners
        ]
        late = any(d.late(now) for d in clocks)
        overdue = not closed and any(d.running and d.late(now) for d in clocks)
        if closed:
            self.closed += 1
            self.due += 1
            if not failed:
                self.handled += 1
                self.on_time += not late
            self.first_time += case.send_backs == 0
        elif overdue:
            self.due += 1
            self.overdue += 1
        for d in clocks:
            stage = self.stages.setdefault(d.clock, StageFigures())
            if d.running and not d.late(now):
                continue  # still within its deadline: not due yet
            stage.due += 1
            if d.running:
                stage.overdue += 1
            elif not d.late(now):
                stage.on_time += 1


_COMMUNITY = frozenset({"community"})
_DEPARTMENT = frozenset({"department"})


def _key(by: By) -> Callable[[Case], str | None]:
    if by is By.COMMUNITY:
        return lambda c: c.community_code
    if by is By.DEPARTMENT:
        return lambda c: c.lead_department
    return lambda c: c.assignee or c.handled_by


def _owners(by: By, case: Case) -> frozenset[str] | None:
    if by is By.COMMUNITY:
        return None
    if by is By.DEPARTMENT:
        return _DEPARTMENT
    return _DEPARTMENT if case.lead_department is not None else _COMMUNITY


def case_figures(
    cases: Iterable[Case], now: datetime, *, key: str = "", lifecycle: Lifecycle | None = None
) -> Figures:
    """The figures of all ``cases`` as one group."""
    table = lifecycle or default_lifecycle()
    out = Figures(key)
    for case in cases:
        out.add(case, now, table, None)
    return out


def figures_by(
    cases: Iterable[Case],
    by: By,
    now: datetime,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    lifecycle: Lifecycle | None = None,
) -> dict[str, Figures]:
    """Figures per group, over the cases registered in ``[since, until)``; a case without a
    key for this grouping (no department, no person) is left out of it."""
    table = lifecycle or default_lifecycle()
    key_of = _key(by)
    groups: dict[str, Figures] = {}
    for case in cases:
        if since is not None and case.registered_at < since:
            continue
        if until is not None and case.registered_at >= until:
            continue
        key = key_of(case)
        if key is None:
            continue
        groups.setdefault(key, Figures(key)).add(case, now, table, _owners(by, case))
    return dict(sorted(groups.items()))
