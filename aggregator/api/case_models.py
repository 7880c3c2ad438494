"""Request and response models of the case routes (aggregator/api/cases.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aggregator.cases import Action, ClockName, Mode, Outcome, State
from aggregator.cases.supervise import SupervisionItemOut


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeadlineOut(_Out):
    clock: ClockName
    zh: str = Field(description="the stage's Chinese name")
    started_at: datetime
    due_at: datetime = Field(description="the deadline, after any approved extension")
    stopped_at: datetime | None
    running: bool
    overdue: bool = Field(description="still running past its deadline now")
    late: bool = Field(description="stopped after its deadline, or running past it")
    extended: bool
    round: int = Field(description="send-backs before this run")


class ExtensionOut(_Out):
    by: str
    reason: str
    until: datetime | None
    at: datetime


class CaseItem(_Out):
    """A case in a list (the inbox)."""

    event_id: int
    version: int = Field(description="send it back as expected_version with the next step")
    state: State
    type: str
    severity: str
    grid_code: str
    address: str
    lead_department: str | None
    co_departments: list[str]
    assignee: str | None
    registered_at: datetime
    updated_at: datetime
    next_due_at: datetime | None = Field(description="the earliest running deadline")
    overdue: bool
    allowed_actions: list[Action] = Field(description="what the caller may do now")


class CasePage(_Out):
    items: list[CaseItem]
    as_of: datetime | None = Field(
        default=None, description="the case clock's now: what overdue and countdowns run from"
    )


class ActionInputs(_Out):
    """What one allowed action takes besides a note, from the lifecycle table: ``reason``,
    ``evidence`` (a summary and/or photos), ``departments`` (a lead and any co-departments),
    ``until`` (a new deadline)."""

    requires: list[str]
    optional: list[str]


class CaseOut(CaseItem):
    """One case with its deadlines and what the caller may do."""

    mode: Mode | None
    whistled_at: datetime | None
    send_backs: int
    outcome: Outcome | None
    closed_at: datetime | None
    handled_by: str | None
    extension: ExtensionOut | None = Field(description="a pending extension request")
    deadlines: list[DeadlineOut]
    actions_zh: dict[str, str] = Field(description="the allowed actions' Chinese names")
    as_of: datetime | None = Field(
        default=None, description="the case clock's now: what overdue and countdowns run from"
    )
    may_assign: bool = Field(
        default=False, description="whether the caller may assign the case (POST …/assign)"
    )
    action_inputs: dict[str, ActionInputs] = Field(
        default_factory=dict,
        description="per allowed action, what its payload requires and may carry: the forms "
        "a client shows come from here, not from rules of its own",
    )
    supervision: list[SupervisionItemOut] = Field(
        default_factory=list,
        description="supervision (督办) raised on the case, oldest first: reminders before a "
        "deadline, overdue items, escalations to the street and the county",
    )


class StepRequest(_In):
    action: Action
    expected_version: int = Field(ge=1, description="the case version the caller acted on")
    payload: dict[str, Any] = Field(
        default_factory=dict,
        description="note, reason, summary, photos (sha256 from POST /api/v1/evidence), "
        "lead_department, co_departments, until: as the action requires",
    )


class AssignRequest(_In):
    assignee: str | None = Field(
        min_length=1, max_length=64, description="an account's username; null: unassign"
    )
    expected_version: int = Field(ge=1)
    note: str | None = Field(default=None, max_length=4000)


class StepOut(_Out):
    event_id: int
    action: str
    from_state: State
    to_state: State
    audit_seq: int
    at: datetime
    actor: str
    case: CaseOut


class AuditRowOut(_Out):
    seq: int
    case_version: int
    actor: str
    role: str
    action: str
    before: str
    after: str
    reason: str | None
    note: str | None
    evidence: list[str]
    detail: dict[str, str]
    at: datetime
    prev_hash: str
    hash: str


class Trail(_Out):
    event_id: int
    rows: list[AuditRowOut]


class EvidenceOut(_Out):
    sha256: str = Field(description="name the photo by this in a step's payload.photos")
    size: int
    media_type: str
