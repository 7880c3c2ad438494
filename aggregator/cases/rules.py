"""The case lifecycle engine: one table (``lifecycle.yaml``), read once, applied by one function.

:func:`apply` is pure: from a case, an action, the acting account, its payload and the time it
returns a :class:`Step` — the new case (state, version + 1, clocks started, stopped or moved),
the deadlines set and cleared, and the audit entry — or raises:

* :class:`ForbiddenError` (HTTP 403): the account's level may not take this action, or the case
  lies outside its area, or it is not the case's lead department, or (to whistle) it is not
  the community's named whistle operator;
* :class:`WrongStateError` (409): the account could take this action, but not in this state
  (or not while an extension is, or is not, pending);
* :class:`StaleVersionError` (409): the caller acted on an older version of the case;
* :class:`PayloadError` (422): something the action requires is missing or invalid.

Storage applies a step inside its write transaction with compare-and-set on ``version``
(``UPDATE … WHERE case_id = ? AND version = step.expected_version``); zero rows updated means
another operator won, which is a :class:`StaleVersionError` too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from aggregator.cases.audit import AuditEntry
from aggregator.cases.deadlines import SHANGHAI, Span, WorkCalendar, default_calendar, parse_span
from aggregator.errors import AggregatorError, ConfigError
from aggregator.grids import COMMUNITY_LENGTH

__all__ = [
    "LIFECYCLE_PATH",
    "Action",
    "Actor",
    "Case",
    "CaseError",
    "ClockName",
    "CommunityPolicy",
    "Deadline",
    "ExtensionRequest",
    "ForbiddenError",
    "Lifecycle",
    "Mode",
    "Outcome",
    "Payload",
    "PayloadError",
    "Role",
    "StaleVersionError",
    "State",
    "Step",
    "WrongStateError",
    "allowed_actions",
    "apply",
    "default_lifecycle",
    "load_lifecycle",
]

LIFECYCLE_PATH = Path(__file__).with_name("lifecycle.yaml")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DEPARTMENT = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class State(StrEnum):
    REGISTERED = "registered"  # 登记: in the event pool, not yet verified
    ASSESSING = "assessing"  # 研判: verified as this community's
    COMMUNITY_HANDLING = "community_handling"  # 社区自行处置
    WHISTLED = "whistled"  # 已吹哨: waiting for the lead department to accept
    DEPT_HANDLING = "dept_handling"  # 部门处置 (off-site matter)
    EN_ROUTE = "en_route"  # 待到场 (on-site matter accepted)
    ON_SITE = "on_site"  # 现场处置
    REVIEWING = "reviewing"  # 待验收: feedback submitted, the community reviews it
    REHANDLING = "rehandling"  # 重新处置: sent back (Jiangsu 6.3)
    CLOSED = "closed"  # 办结


class Action(StrEnum):
    VERIFY = "verify"  # 核实
    NOT_OURS = "not_ours"  # 非本社区事件, fed back to the source
    SELF_HANDLE = "self_handle"  # 自行处置
    WHISTLE = "whistle"  # 吹哨
    ACCEPT_OFF_SITE = "accept_off_site"  # 受理 (非现场)
    ACCEPT_ON_SITE = "accept_on_site"  # 受理 (现场)
    ARRIVE = "arrive"  # 到场
    HANDLE = "handle"  # 处置反馈
    ACCEPT_FEEDBACK = "accept_feedback"  # 验收通过
    SEND_BACK = "send_back"  # 退回重办
    APPLY_EXTENSION = "apply_extension"  # 申请延期
    APPROVE_EXTENSION = "approve_extension"  # 批准延期
    REFUSE_EXTENSION = "refuse_extension"  # 驳回延期


class Role(StrEnum):
    """The account levels that act on cases (aggregator.access.auth.Level, minus admin: an
    administrator runs the system and takes no step in a case)."""

    COMMUNITY = "community"
    STREET = "street"
    COUNTY = "county"
    DEPARTMENT = "department"


class ClockName(StrEnum):
    COMMUNITY_HANDLE = "community_handle"
    ACCEPT = "accept"
    FEEDBACK = "feedback"
    ARRIVE = "arrive"
    HARD_CLOSE = "hard_close"
    REHANDLE = "rehandle"


class Mode(StrEnum):
    OFF_SITE = "off_site"
    ON_SITE = "on_site"


class Outcome(StrEnum):
    HANDLED = "handled"
    NOT_OURS = "not_ours"


class Requirement(StrEnum):
    REASON = "reason"
    EVIDENCE = "evidence"  # a summary and/or photo hashes (Longgang 8.5)
    DEPARTMENTS = "departments"  # a lead department, any co-departments
    UNTIL = "until"  # a new deadline


class Guard(StrEnum):
    EXTENSION_PENDING = "extension_pending"
    NO_EXTENSION_PENDING = "no_extension_pending"


# --- errors ------------------------------------------------------------------------------------


class CaseError(AggregatorError):
    """A step was refused; the message is safe to show to the caller."""


class ForbiddenError(CaseError):
    """The account may not take this action on this case (HTTP 403)."""


class WrongStateError(CaseError):
    """The action does not apply to the case as it is now (HTTP 409)."""


class StaleVersionError(WrongStateError):
    """The caller acted on an older version of the case (HTTP 409)."""


class PayloadError(CaseError):
    """The payload lacks something the action requires, or carries something invalid (422)."""


# --- the table ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClockSpec(_Strict):
    zh: str = Field(description="the stage's Chinese name")
    ref: str = Field(description="where the standard sets it")
    owner: Literal["community", "department"] = Field(description="whose stage it is")
    span: Span | Literal["per_type"] | None = Field(
        default=None, description="how long; per_type: the type's community deadline (8.1)"
    )
    by_mode: dict[Mode, Span] | None = Field(
        default=None, description="span by how the department accepted"
    )
    anchor: Literal["step", "whistle"] = Field(description="what the clock runs from")
    extendable: bool = Field(description="whether an approved extension moves it (8.4)")

    @field_validator("span", mode="before")
    @classmethod
    def _span(cls, value: object) -> object:
        return value if value is None or value == "per_type" else parse_span(value)

    @field_validator("by_mode", mode="before")
    @classmethod
    def _by_mode(cls, value: object) -> object:
        if isinstance(value, Mapping):
            return {mode: parse_span(span) for mode, span in value.items()}
        return value

    @model_validator(mode="after")
    def _one_span(self) -> ClockSpec:
        if (self.span is None) == (self.by_mode is None):
            raise ValueError("a clock has either span or by_mode")
        if self.by_mode is not None and set(self.by_mode) != set(Mode):
            raise ValueError(f"by_mode needs every mode: {sorted(Mode)}")
        return self


class ActionSpec(_Strict):
    zh: str = Field(description="the action's Chinese name, as operators read it")
    ref: str = Field(description="where the standard sets it")


class Transition(_Strict):
    from_: State = Field(alias="from", description="the state the action applies in")
    action: Action
    to: State
    roles: tuple[Role, ...] = Field(min_length=1, description="the levels that may take it")
    requires: tuple[Requirement, ...] = ()
    optional: tuple[Requirement, ...] = ()
    starts: tuple[ClockName, ...] = ()
    stops: tuple[ClockName, ...] = ()
    guard: Guard | None = None
    outcome: Outcome | None = Field(default=None, description="how a case closed here ended")
    sets_mode: Mode | None = Field(default=None, description="how the department takes it")
    counts_send_back: bool = Field(default=False, description="one more re-handling round")

    @model_validator(mode="after")
    def _outcome_when_closing(self) -> Transition:
        if (self.to is State.CLOSED) != (self.outcome is not None):
            raise ValueError("a transition names an outcome exactly when it leads to closed")
        return self


class Lifecycle(_Strict):
    """The table, validated: every (state, action) once, every clock named exists."""

    version: int
    re_handle_max_rounds: int = Field(ge=1, le=10)
    actions: dict[Action, ActionSpec]
    clocks: dict[ClockName, ClockSpec]
    transitions: tuple[Transition, ...]
    _by_key: dict[tuple[State, Action], Transition] = PrivateAttr(default_factory=dict)
    _roles: dict[Action, frozenset[Role]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Lifecycle:
        seen: set[tuple[State, Action]] = set()
        for i, t in enumerate(self.transitions):
            key = (t.from_, t.action)
            if key in seen:
                raise ValueError(f"transitions.{i}: ({t.from_}, {t.action}) appears twice")
            seen.add(key)
            if t.from_ is State.CLOSED:
                raise ValueError(f"transitions.{i}: a closed case takes no action")
            for clock in (*t.starts, *t.stops):
                if clock not in self.clocks:
                    raise ValueError(f"transitions.{i}: unknown clock {clock}")
            if set(t.requires) & set(t.optional):
                raise ValueError(f"transitions.{i}: a field both required and optional")
        missing = set(ClockName) - set(self.clocks)
        if missing:
            raise ValueError(f"clocks: missing {sorted(missing)}")
        unnamed = set(Action) - set(self.actions)
        if unnamed:
            raise ValueError(f"actions: missing {sorted(unnamed)}")
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._by_key = {(t.from_, t.action): t for t in self.transitions}
        roles: dict[Action, set[Role]] = {}
        for t in self.transitions:
            roles.setdefault(t.action, set()).update(t.roles)
        self._roles = {action: frozenset(r) for action, r in roles.items()}

    def transition(self, state: State, action: Action) -> Transition | None:
        return self._by_key.get((state, action))

    def roles_for(self, action: Action) -> frozenset[Role]:
        """Every level that takes this action in some state."""
        return self._roles.get(action, frozenset())


def load_lifecycle(path: Path | str | None = None) -> Lifecycle:
    """Load and validate a lifecycle table; a bad file is a ConfigError naming the key path."""
    source = Path(path or LIFECYCLE_PATH)
    try:
        with source.open(encoding="utf-8") as fh:
            return Lifecycle.model_validate(yaml.safe_load(fh))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"lifecycle table {source}: {exc}") from exc


@lru_cache(maxsize=1)
def default_lifecycle() -> Lifecycle:
    return load_lifecycle()


# --- the case ----------------------------------------------------------------------------------


class Deadline(_Strict):
    """One run of one stage clock."""

    clock: ClockName
    started_at: AwareDatetime = Field(description="what the clock runs from")
    due_at: AwareDatetime = Field(description="the deadline, after any approved extension")
    stopped_at: AwareDatetime | None = Field(default=None, description="when the stage ended")
    extended: bool = Field(default=False, description="moved by an approved extension")
    round: int = Field(default=0, ge=0, description="send-backs before this run")

    @property
    def running(self) -> bool:
        return self.stopped_at is None

    def late(self, now: datetime) -> bool:
        """Stopped after its deadline, or still running past it."""
        end = self.stopped_at if self.stopped_at is not None else now
        return end > self.due_at


class ExtensionRequest(_Strict):
    by: str = Field(description="the account that applied")
    reason: str
    until: AwareDatetime | None = Field(default=None, description="the deadline asked for")
    at: AwareDatetime


class Case(_Strict):
    """A case as the lifecycle sees it; storage keeps and restores exactly these fields."""

    case_id: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1, description="compare-and-set counter, 1 at registration")
    state: State = State.REGISTERED
    grid_code: str = Field(pattern=r"^[0-9]{12,}$", description="the grid's full code")
    type_code: str = Field(min_length=1, max_length=64, description="warning type")
    appendix_item: int | None = Field(default=None, description="Longgang Appendix A item")
    community_deadline: timedelta = Field(
        default=timedelta(hours=2), description="the type's community deadline (8.1)"
    )
    registered_at: AwareDatetime
    lead_department: str | None = None
    co_departments: tuple[str, ...] = ()
    mode: Mode | None = Field(default=None, description="how the department accepted")
    whistled_at: AwareDatetime | None = None
    send_backs: int = Field(default=0, ge=0)
    extension: ExtensionRequest | None = Field(default=None, description="pending extension")
    clocks: tuple[Deadline, ...] = Field(default=(), description="every clock run, in order")
    outcome: Outcome | None = None
    closed_at: AwareDatetime | None = None
    handled_by: str | None = Field(default=None, description="who submitted the last feedback")
    assignee: str | None = Field(default=None, description="the person the case is assigned to")

    @property
    def community_code(self) -> str:
        return self.grid_code[:COMMUNITY_LENGTH]

    def running(self) -> tuple[Deadline, ...]:
        return tuple(d for d in self.clocks if d.running)


class Actor(Protocol):
    """What the lifecycle needs of an account (aggregator.access.auth.Operator fits)."""

    @property
    def username(self) -> str: ...
    @property
    def level(self) -> str: ...
    @property
    def scope_code(self) -> str: ...
    @property
    def department(self) -> str | None: ...


class CommunityPolicy(_Strict):
    """The community's own whistle list (Longgang 7.3.2) and the departments one may call."""

    whistleable_items: frozenset[int] | None = Field(
        default=None, description="Appendix A items that may become whistle events; None: all"
    )
    whistleable_types: frozenset[str] = Field(
        default=frozenset(), description="warning types whistle-able whatever their item"
    )
    departments: frozenset[str] | None = Field(
        default=None, description="department codes that may be called; None: any valid code"
    )
    whistle_operator: str | None = Field(
        default=None,
        description="the community account that blows the whistle (7.3); None: any of them",
    )

    def may_whistle(self, case: Case) -> bool:
        if case.type_code in self.whistleable_types:
            return True
        if self.whistleable_items is None:
            return True
        return case.appendix_item is not None and case.appendix_item in self.whistleable_items


class Payload(_Strict):
    """What an operator sends with an action; only the fields the action takes may be set."""

    note: str | None = Field(default=None, max_length=4000)
    reason: str | None = Field(default=None, max_length=4000)
    summary: str | None = Field(default=None, max_length=4000, description="handling summary")
    photos: tuple[str, ...] = Field(
        default=(), max_length=16, description="sha256 of uploaded before/after photos"
    )
    lead_department: str | None = None
    co_departments: tuple[str, ...] = Field(default=(), max_length=16)
    until: AwareDatetime | None = Field(default=None, description="a new deadline")

    @field_validator("photos")
    @classmethod
    def _hashes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for h in value:
            if not _SHA256.match(h):
                raise ValueError("photos are lowercase hex sha256 digests")
        return value


_FIELDS_OF: dict[Requirement, tuple[str, ...]] = {
    Requirement.REASON: ("reason",),
    Requirement.EVIDENCE: ("summary", "photos"),
    Requirement.DEPARTMENTS: ("lead_department", "co_departments"),
    Requirement.UNTIL: ("until",),
}


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one action, for storage to write in one transaction."""

    case: Case  # the case after the step
    expected_version: int  # compare-and-set: the version the step was computed from
    before: State
    after: State
    deadlines_set: tuple[Deadline, ...]  # clocks started, or moved by an extension
    deadlines_cleared: tuple[Deadline, ...]  # clocks stopped (with stopped_at)
    audit: AuditEntry

    @property
    def version(self) -> int:
        return self.case.version


# --- the engine --------------------------------------------------------------------------------


def _role(actor: Actor) -> Role | None:
    try:
        return Role(str(actor.level))
    except ValueError:
        return None


def _party_refusal(
    case: Case, actor: Actor, role: Role, t: Transition, policy: CommunityPolicy
) -> str | None:
    """Why this account is not a party to this step of this case, or None."""
    if not case.grid_code.startswith(actor.scope_code):
        return "the case lies outside this account's area"
    if role is Role.DEPARTMENT and (
        case.lead_department is None or actor.department != case.lead_department
    ):
        return "only the case's lead department may take this step"
    if (
        role is Role.COMMUNITY
        and Requirement.DEPARTMENTS in t.requires
        and policy.whistle_operator is not None
        and actor.username != policy.whistle_operator
    ):
        return "only the community's whistle operator blows the whistle (7.3)"
    return None


def _guard_holds(guard: Guard | None, case: Case) -> bool:
    if guard is Guard.EXTENSION_PENDING:
        return case.extension is not None
    if guard is Guard.NO_EXTENSION_PENDING:
        return case.extension is None
    return True


def allowed_actions(
    case: Case,
    actor: Actor,
    *,
    policy: CommunityPolicy | None = None,
    lifecycle: Lifecycle | None = None,
) -> list[Action]:
    """The actions this account may take on this case now, in table order."""
    table = lifecycle or default_lifecycle()
    pol = policy or CommunityPolicy()
    role = _role(actor)
    if role is None:
        return []
    out: list[Action] = []
    for t in table.transitions:
        if t.from_ is not case.state or role not in t.roles:
            continue
        if _party_refusal(case, actor, role, t, pol) is None and _guard_holds(t.guard, case):
            out.append(t.action)
    return out


def _check_payload(t: Transition, payload: Payload, case: Case, policy: CommunityPolicy) -> None:
    allowed = {"note"}
    for req in (*t.requires, *t.optional):
        allowed.update(_FIELDS_OF[req])
    extra = sorted(
        name for name in payload.model_fields_set if name not in allowed and _is_set(payload, name)
    )
    if extra:
        raise PayloadError(f"{t.action} does not take {', '.join(extra)}")
    for req in t.requires:
        if req is Requirement.REASON and not (payload.reason or "").strip():
            raise PayloadError(f"{t.action} requires a reason")
        if req is Requirement.EVIDENCE and not ((payload.summary or "").strip() or payload.photos):
            raise PayloadError(f"{t.action} requires a summary or before/after photos (8.5)")
        if req is Requirement.UNTIL and payload.until is None:
            raise PayloadError(f"{t.action} requires a new deadline")
        if req is Requirement.DEPARTMENTS:
            _check_departments(payload, case, policy)


def _is_set(payload: Payload, name: str) -> bool:
    value = getattr(payload, name)
    return value not in (None, (), "")


def _check_departments(payload: Payload, case: Case, policy: CommunityPolicy) -> None:
    if not policy.may_whistle(case):
        raise PayloadError(f"{case.type_code} is not on this community's whistle list (7.3.2)")
    lead = payload.lead_department
    if not lead:
        raise PayloadError("a whistle names its lead department")
    codes = (lead, *payload.co_departments)
    for code in codes:
        if not _DEPARTMENT.match(code):
            raise PayloadError(f"{code!r} is not a department code")
        if policy.departments is not None and code not in policy.departments:
            raise PayloadError(f"unknown department {code!r}")
    if len(set(codes)) != len(codes):
        raise PayloadError("the lead and co-departments are each named once")


def _span_of(spec: ClockSpec, case: Case) -> Span:
    if spec.by_mode is not None:
        return spec.by_mode[case.mode or Mode.OFF_SITE]
    if spec.span == "per_type":
        return Span(elapsed=case.community_deadline)
    assert isinstance(spec.span, Span)  # the table validator guarantees one of the three
    return spec.span


def apply(
    case: Case,
    action: Action | str,
    actor: Actor,
    payload: Payload | Mapping[str, Any] | None,
    now: datetime,
    *,
    expected_version: int | None = None,
    policy: CommunityPolicy | None = None,
    lifecycle: Lifecycle | None = None,
    calendar: WorkCalendar | None = None,
) -> Step:
    """Take ``action`` on ``case`` as ``actor`` at ``now``; pure, raises a CaseError subclass."""
    table = lifecycle or default_lifecycle()
    cal = calendar or default_calendar()
    pol = policy or CommunityPolicy()
    if now.tzinfo is None:
        raise ValueError("a step's time must be an aware datetime")
    try:
        act = Action(action)
    except ValueError:
        raise PayloadError(f"unknown action {action!r}") from None
    role = _role(actor)
    if role is None or role not in table.roles_for(act):
        raise ForbiddenError(f"a {actor.level} account may not {act}")
    if not case.grid_code.startswith(actor.scope_code):
        raise ForbiddenError("the case lies outside this account's area")
    if expected_version is not None and expected_version != case.version:
        raise StaleVersionError(
            f"case {case.case_id} is at version {case.version}, not {expected_version}"
        )
    t = table.transition(case.state, act)
    if t is None:
        raise WrongStateError(f"{act} does not apply to a case in state {case.state}")
    if role not in t.roles:
        raise ForbiddenError(f"a {role} account may not {act} a case in state {case.state}")
    refusal = _party_refusal(case, actor, role, t, pol)
    if refusal is not None:
        raise ForbiddenError(refusal)
    if not _guard_holds(t.guard, case):
        pending = "is" if case.extension is not None else "is no"
        raise WrongStateError(f"{act} does not apply: there {pending} extension pending")
    try:
        body = (
            payload if isinstance(payload, Payload) else Payload.model_validate(dict(payload or {}))
        )
    except ValidationError as exc:
        raise PayloadError(f"invalid payload: {exc.errors(include_url=False)}") from exc
    _check_payload(t, body, case, pol)
    return _step(table, cal, case, t, actor, role, body, now)


def _step(
    table: Lifecycle,
    cal: WorkCalendar,
    case: Case,
    t: Transition,
    actor: Actor,
    role: Role,
    body: Payload,
    now: datetime,
) -> Step:
    update: dict[str, Any] = {"version": case.version + 1, "state": t.to}
    detail: dict[str, str] = {}
    if t.to is not t.from_:
        update["extension"] = None  # a pending extension lapses when the case moves on
    act = t.action
    if Requirement.DEPARTMENTS in t.requires:
        update["lead_department"] = body.lead_department
        update["co_departments"] = body.co_departments
        update["whistled_at"] = now
        detail["lead_department"] = body.lead_department or ""
        if body.co_departments:
            detail["co_departments"] = ",".join(body.co_departments)
    if Requirement.EVIDENCE in t.requires:
        update["handled_by"] = actor.username
    if t.sets_mode is not None:
        update["mode"] = t.sets_mode
    if t.counts_send_back:
        update["send_backs"] = case.send_backs + 1
    if act in (Action.APPROVE_EXTENSION, Action.REFUSE_EXTENSION):
        update["extension"] = None  # decided: the community may apply again
    elif act is Action.APPLY_EXTENSION:
        update["extension"] = ExtensionRequest(
            by=actor.username, reason=body.reason or "", until=body.until, at=now
        )
    if t.outcome is not None:
        update["closed_at"] = now
        update["outcome"] = t.outcome
    # Clocks: stop, then start, then (for an approved extension) move.
    clocks = list(case.clocks)
    cleared: list[Deadline] = []
    for i, d in enumerate(clocks):
        if d.running and (d.clock in t.stops or t.to is State.CLOSED):
            clocks[i] = d.model_copy(update={"stopped_at": now})
            cleared.append(clocks[i])
    staged = case.model_copy(update=update)
    started: list[Deadline] = []
    for name in t.starts:
        spec = table.clocks[name]
        anchor = staged.whistled_at if spec.anchor == "whistle" else now
        start = anchor or now
        due = _span_of(spec, staged).deadline(start, cal)
        started.append(Deadline(clock=name, started_at=start, due_at=due, round=staged.send_backs))
    clocks.extend(started)
    if act is Action.APPLY_EXTENSION and body.until is not None:
        _extend(table, list(clocks), body.until)  # refuse now what could never be approved
    if act is Action.APPROVE_EXTENSION:
        until = body.until or (case.extension.until if case.extension else None)
        if until is None:
            raise PayloadError("approve_extension needs a new deadline (none was asked for)")
        moved = _extend(table, clocks, until)
        started.extend(moved)
        detail["until"] = until.astimezone(SHANGHAI).isoformat()
    for d in started:
        detail[f"due.{d.clock}"] = d.due_at.astimezone(SHANGHAI).isoformat()
    new_case = staged.model_copy(update={"clocks": tuple(clocks)})
    audit = AuditEntry(
        case_id=case.case_id,
        case_version=new_case.version,
        actor=actor.username,
        role=role.value,
        action=act.value,
        before=case.state.value,
        after=t.to.value,
        reason=body.reason,
        note=body.summary if body.summary is not None else body.note,
        evidence=body.photos,
        detail=detail,
        at=now,
    )
    return Step(
        case=new_case,
        expected_version=case.version,
        before=case.state,
        after=t.to,
        deadlines_set=tuple(started),
        deadlines_cleared=tuple(cleared),
        audit=audit,
    )


def _extend(table: Lifecycle, clocks: list[Deadline], until: datetime) -> list[Deadline]:
    """Move every running extendable clock to ``until``; an extension only ever lengthens."""
    moved: list[Deadline] = []
    for i, d in enumerate(clocks):
        if not (d.running and table.clocks[d.clock].extendable):
            continue
        if until <= d.due_at:
            raise PayloadError(
                f"an extension must end after the current deadline {d.due_at.isoformat()}"
            )
        clocks[i] = d.model_copy(update={"due_at": until, "extended": True})
        moved.append(clocks[i])
    if not moved:
        raise WrongStateError("no running deadline can be extended")
    return moved


def counts_as_not_handled(case: Case, lifecycle: Lifecycle | None = None) -> bool:
    """Jiangsu 6.3: sent back ``re_handle_max_rounds`` times — the second feedback that did not
    show effective handling — counts as not handled, however the case ends."""
    table = lifecycle or default_lifecycle()
    return case.send_backs >= table.re_handle_max_rounds


def describe(lifecycle: Lifecycle | None = None) -> Sequence[Transition]:
    """The table's transitions, for documentation and the API."""
    return (lifecycle or default_lifecycle()).transitions
