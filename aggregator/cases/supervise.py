"""Supervision (督办, Longgang 9.1): which reminders, overdue items and escalations a case owes.

Pure: from a case, what was raised for it already, the policy and ``now``, :func:`due_items`
returns the items to raise now and the next time anything falls due. Storage
(aggregator/pool/supervision.py) raises each item once, in a transaction that claims the case.

For every *running* stage clock run (``Case.clocks``):

* **reminder (催办)** at ``due_at − min(reminder_lead, reminder_fraction × span)``: before the
  deadline, to the clock's owner (the community or the department). None when that instant
  is not after the clock started, or when the deadline has passed by the time the timer looks
  (the overdue item says more then).
* **overdue (超期督办)** once the deadline has passed, to the clock's owner.
* **escalation** community → street → county: ``escalate_street`` at ``due_at +
  street_after`` and ``escalate_county`` at ``due_at + county_after``, to that level. The
  chain belongs to the case version at which the overdue item was raised: once the case moves
  (its version changes: a step, an assignment) the chain stops for that clock run.

Each item has a stable key (``<run>:<clock>:<kind>:<deadline>``, the deadline in UNIX seconds)
per case: raising is exactly once per key. The deadline is part of it because an approved
extension (8.4) moves a running clock's deadline: the new deadline gets its own reminder,
overdue item and chain, even when the old one had been passed and supervised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aggregator.cases.rules import Case, ClockName, Lifecycle, default_lifecycle
from contract.messages import CaseNoticeV1, SupervisionItem, SupervisionKind

__all__ = [
    "Item",
    "Kind",
    "SupervisionItemOut",
    "SupervisionNoticeV1",
    "SupervisionPolicy",
    "due_items",
    "item_key",
    "utc",
]


# The kinds are the wire contract's (case/v1): one list, named here as the timer says it.
Kind = SupervisionKind


ZH: Mapping[Kind, str] = {
    Kind.REMINDER: "催办",
    Kind.OVERDUE: "超期督办",
    Kind.ESCALATE_STREET: "升级督办(街道)",
    Kind.ESCALATE_COUNTY: "升级督办(区县)",
}


class SupervisionPolicy(BaseModel):
    """When reminders and escalations fall due (Settings.supervision passes these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reminder_lead: timedelta = Field(
        timedelta(minutes=30), gt=timedelta(0), description="longest reminder lead"
    )
    reminder_fraction: float = Field(
        0.25, gt=0, lt=1, description="the lead as a share of the clock's span, if shorter"
    )
    street_after: timedelta = Field(
        timedelta(hours=1), ge=timedelta(0), description="escalate to the street this long late"
    )
    county_after: timedelta = Field(
        timedelta(hours=4), ge=timedelta(0), description="escalate to the county this long late"
    )

    @model_validator(mode="after")
    def _street_first(self) -> SupervisionPolicy:
        if self.county_after < self.street_after:
            raise ValueError("the county escalation comes after the street's")
        return self


@dataclass(frozen=True, slots=True)
class Item:
    """One supervision item of one clock run."""

    kind: Kind
    clock: ClockName
    run: int  # index of the run in Case.clocks
    level: str  # who is chased: community, department, street, county
    due_at: datetime  # the stage deadline
    raise_at: datetime  # when the item falls due

    @property
    def key(self) -> str:
        return item_key(self.run, self.clock, self.kind, self.due_at)


def item_key(run: int, clock: ClockName | str, kind: Kind | str, due_at: datetime) -> str:
    return f"{run}:{clock}:{kind}:{int(due_at.timestamp())}"


def due_items(
    case: Case,
    raised: Mapping[str, int],
    now: datetime,
    policy: SupervisionPolicy,
    lifecycle: Lifecycle | None = None,
) -> tuple[list[Item], datetime | None]:
    """The items to raise at ``now`` (in order: a run's overdue item before its escalations)
    and the earliest later time another one falls due at this version (None: none until the
    case moves). ``raised``: item key → the case version it was raised at."""
    table = lifecycle or default_lifecycle()
    out: list[Item] = []
    upcoming: list[datetime] = []

    def consider(item: Item) -> bool:
        """Raise it now (True), or note when it will be due."""
        if item.key in raised:
            return False
        if item.raise_at <= now:
            out.append(item)
            return True
        upcoming.append(item.raise_at)
        return False

    for run, d in enumerate(case.clocks):
        if not d.running:
            continue
        owner = table.clocks[d.clock].owner
        span = d.due_at - d.started_at
        lead = min(policy.reminder_lead, span * policy.reminder_fraction)
        remind_at = d.due_at - lead
        if remind_at > d.started_at and now <= d.due_at:
            consider(Item(Kind.REMINDER, d.clock, run, owner, d.due_at, remind_at))
        # overdue strictly after the deadline, as Deadline.late counts it
        overdue_at = d.due_at + timedelta(microseconds=1)
        overdue = Item(Kind.OVERDUE, d.clock, run, owner, d.due_at, overdue_at)
        if consider(overdue):
            chain_version: int | None = case.version
        else:
            chain_version = raised.get(overdue.key)
        if chain_version != case.version:
            # not overdue yet (its escalations wait for it), or raised before the case moved:
            # the chain stops when the case moves
            continue
        for kind, level, after in (
            (Kind.ESCALATE_STREET, "street", policy.street_after),
            (Kind.ESCALATE_COUNTY, "county", policy.county_after),
        ):
            consider(Item(kind, d.clock, run, level, d.due_at, d.due_at + after))
    return out, min(upcoming) if upcoming else None


class SupervisionItemOut(SupervisionItem):
    """An item as the events topic, the webhooks and the API show it: the contract's
    ``SupervisionItem`` (contract/messages.py, ``case/v1``), its clock one of this lifecycle's."""

    clock: ClockName


# The notice the timer publishes on the events topic is the contract's ``case/v1`` message.
SupervisionNoticeV1 = CaseNoticeV1


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
