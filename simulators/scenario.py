"""Scenarios: devices, timed steps and expectations on the far end, in one YAML file.

A scenario is validated before anything is sent (unknown keys refused, every device, place and
warning type checked). The runner plays the steps on a simulated clock — ``observed_at`` comes
from that clock, real waiting is divided by ``time_scale`` — and then polls the event pool and
the devices' feedback until every expectation holds or ``timeout_s`` passes. A failed run reports,
per expectation, what was expected and what was found.

Example::

    name: three cameras, one fire
    time_scale: 60
    places:
      gate: {grid: "33038300100101000001"}
    devices:
      - {id: cam-1, kind: camera, at: {place: gate}}
      - {id: cam-2, kind: camera, at: {place: gate, east_m: 40}}
    steps:
      - {t: 0, device: cam-1, alert: {type: smoke_fire}}
      - {t: 30, device: cam-2, alert: {type: smoke_fire}}
    expect:
      - events: {type: smoke_fire, grid: "330383001001", count: 1, devices: 2}

Operator and department steps (on a stack running the API: ``StackOptions(api=True)``) act as
the scenario's ``accounts`` on the case a named alert became, through the real API, at their
``t`` on the gateway's case clock: the runner moves that clock (``Settings.test_clock_file``)
so that it reads the run's start plus ``t`` whatever the real wait was, so ``time_scale``
compresses deadlines too. ``case``, ``sla`` and ``handling`` expectations then check the SLA
outcome::

    accounts:
      longxiang: {level: community, scope: "330383001001"}
      police: {level: department, department: police}
    steps:
      - {t: 0, device: cam-1, alert: {type: fire_lane_occupied, alert_id: lane}}
      - {t: 60, as: longxiang, case: lane, do: verify}
      - {t: 120, as: longxiang, case: lane, do: whistle, departments: [police]}
      - {t: 2520, as: police, case: lane, do: accept}   # 40 min after the whistle
      - {t: 2600, as: police, case: lane, do: arrive, refused: 409}
    expect:
      - case: {case: lane, state: dept_handling, late: [accept]}
      - handling: {by: department, key: police, stages: {accept: {due: 1, on_time: 0}}}
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aggregator.broker.registry import DeviceKind
from aggregator.cases import ClockName, State
from aggregator.cases import Outcome as CaseOutcome
from aggregator.clock import OffsetFileClock
from aggregator.grids import GridIndex, default_grid_file
from contract import (
    Catalogue,
    DeviceState,
    Outcome,
    RejectReason,
    Severity,
    default_catalogue,
)
from contract.messages import DEVICE_ID_PATTERN
from simulators.desk import Account, Desk, StepRefused, action_of
from simulators.device import SimDevice
from simulators.errors import ScenarioError
from simulators.messages import BadKind, bad_payload, make_alert, offset_m, snapshot_jpeg
from simulators.poolview import PoolView
from simulators.stack import DeviceSpec, Provisioner

__all__ = [
    "Check",
    "OperatorSide",
    "Scenario",
    "ScenarioResult",
    "ScenarioRunner",
    "load_scenario",
]

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Point(_Strict):
    """A position: ``lat``/``lon``, a grid code (its centroid), or a named place; plus an
    offset in metres east/north of it."""

    lat: float | None = Field(default=None, ge=-90, le=90, description="WGS-84 latitude")
    lon: float | None = Field(default=None, ge=-180, le=180, description="WGS-84 longitude")
    grid: str | None = Field(default=None, description="grid code: the grid's centroid")
    place: str | None = Field(default=None, description="a name from the scenario's places")
    east_m: float = Field(default=0, description="metres east of the base point")
    north_m: float = Field(default=0, description="metres north of the base point")

    @model_validator(mode="after")
    def _one_base(self) -> Self:
        bases = [self.lat is not None or self.lon is not None, self.grid, self.place]
        if sum(bool(b) for b in bases) != 1:
            raise ValueError("give exactly one of lat+lon, grid, or place")
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon go together")
        return self


class DeviceDecl(_Strict):
    id: str = Field(pattern=DEVICE_ID_PATTERN, description="device id within the scenario")
    kind: Literal["camera", "sensor"]
    at: Point | None = Field(
        default=None, description="where it is installed (default alert position)"
    )
    clock_skew_s: float = Field(default=0, description="device clock minus true time, seconds")


class AlertStep(_Strict):
    type: str = Field(description="warning type code from the catalogue")
    at: Point | None = Field(default=None, description="where; default: the device's position")
    confidence: float = Field(default=0.85, ge=0, le=1)
    severity: Severity | None = None
    snapshot: bool = Field(default=False, description="attach a generated JPEG")
    description: str = ""
    alert_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$",
        description="name the alert; the same name twice sends the same alert_id (a redelivery)",
    )


class BadStep(_Strict):
    kind: BadKind = Field(description="what is wrong with the message")
    type: str | None = Field(default=None, description="type of the alert it spoils (default: any)")


class AccountDecl(_Strict):
    """An operator account the scenario acts as: an area account (community, street, county)
    with its grid code prefix, or a department account with its catalogue department."""

    level: Literal["community", "street", "county", "department"]
    scope: str | None = Field(
        default=None, pattern=r"^[0-9]{6,20}$", description="grid code prefix (area accounts)"
    )
    department: str | None = Field(default=None, description="department code (departments)")

    @model_validator(mode="after")
    def _fits(self) -> Self:
        if self.level == "department":
            if not self.department:
                raise ValueError("a department account names its department")
        elif not self.scope or self.department:
            raise ValueError(f"a {self.level} account has a scope and no department")
        return self


class Step(_Strict):
    """A device step (``device`` with one of alert, bad, offline, online) or an operator step
    (``as`` an account, ``do`` an action on the ``case`` that a named alert became)."""

    t: float = Field(ge=0, description="simulated seconds after the scenario starts")
    device: str | None = None
    alert: AlertStep | None = None
    bad: BadStep | None = None
    offline: bool = Field(
        default=False, description="drop the link (the broker sends the Last Will)"
    )
    online: bool = Field(default=False, description="reconnect and flush what was raised meanwhile")
    # -- operator and department steps, through the gateway's API --
    as_: str | None = Field(default=None, alias="as", description="the account taking the step")
    do: str | None = Field(
        default=None,
        description="a lifecycle action (verify, whistle, accept_off_site, accept_on_site, "
        "arrive, handle, send_back, accept_feedback, apply_extension, approve_extension, "
        "refuse_extension, self_handle, not_ours) or an alias: accept, extend, approve, "
        "refuse, close",
    )
    case: str | None = Field(
        default=None, description="the case: the event of the alert of this alert_id name"
    )
    departments: list[str] = Field(
        default_factory=list, max_length=16, description="whistle: the lead department first"
    )
    reason: str | None = None
    note: str | None = None
    summary: str | None = Field(default=None, description="handling feedback's text evidence")
    photos: int = Field(default=0, ge=0, le=4, description="generated photos uploaded as evidence")
    until_s: float | None = Field(
        default=None, gt=0, description="extension: the deadline asked for, seconds after the step"
    )
    refused: Literal[403, 409, 422] | None = Field(
        default=None, description="expect the API to refuse the step with this status"
    )

    @model_validator(mode="after")
    def _one_action(self) -> Self:
        device_acts = [self.alert is not None, self.bad is not None, self.offline, self.online]
        if self.do is not None:
            if any(device_acts) or self.device is not None:
                raise ValueError("an operator step (do) takes no device action")
            if self.as_ is None or self.case is None:
                raise ValueError("an operator step names the account (as) and the case")
            try:
                action_of(self.do)  # a typo fails at load time, naming the actions
            except ScenarioError as exc:
                raise ValueError(str(exc)) from None
            return self
        if self.as_ is not None or self.case is not None:
            raise ValueError("as and case go with do")
        if self.device is None:
            raise ValueError("a step names a device, or is an operator step (as, do, case)")
        if sum(device_acts) != 1:
            raise ValueError("a step does exactly one of: alert, bad, offline, online")
        return self

    @property
    def is_operator(self) -> bool:
        return self.do is not None


class EventsExpect(_Strict):
    type: str | None = None
    grid: str | None = Field(default=None, description="grid code or a prefix of it")
    count: int = Field(ge=0, description="exactly this many matching events")
    devices: int | None = Field(default=None, ge=1, description="each has this many devices")
    alerts: int | None = Field(default=None, ge=1, description="each has this many alerts")
    severity: Severity | None = None
    department: str | None = None
    device: str | None = Field(default=None, description="only events this device contributed to")


class FeedbackExpect(_Strict):
    device: str
    outcome: Outcome
    reason: RejectReason | None = None
    count: int | None = Field(
        default=None, ge=0, description="exactly this many (default: at least 1)"
    )


class DeadLetterExpect(_Strict):
    reason: RejectReason
    device: str | None = None
    count: int | None = Field(
        default=None, ge=0, description="exactly this many (default: at least 1)"
    )


class OutOfAreaExpect(_Strict):
    device: str | None = None
    count: int = Field(ge=0)


class DeviceStateExpect(_Strict):
    device: str
    state: DeviceState


class CaseExpect(_Strict):
    """One case as the gateway holds it at the end (read through the API)."""

    case: str = Field(description="the alert_id name whose event the case is")
    state: State | None = None
    outcome: CaseOutcome | None = None
    lead_department: str | None = None
    send_backs: int | None = Field(default=None, ge=0)
    late: list[ClockName] | None = Field(
        default=None,
        description="exactly these stage clocks ended (or still run) past their deadline",
    )
    on_time: list[ClockName] = Field(
        default_factory=list, description="these stage clocks ran and none of their runs was late"
    )
    overdue: list[ClockName] | None = Field(
        default=None, description="exactly these clocks run past their deadline now"
    )


class SlaExpect(_Strict):
    """One stage clock counted over this run's cases: "the department accepts after 40 min →
    acceptance overdue, counted"."""

    clock: ClockName
    department: str | None = Field(default=None, description="only cases led by it")
    late: int | None = Field(default=None, ge=0, description="runs that ended or run late")
    on_time: int | None = Field(default=None, ge=0, description="runs stopped in time")
    overdue: int | None = Field(default=None, ge=0, description="runs still running, late")


class StageCounts(_Strict):
    due: int | None = Field(default=None, ge=0)
    on_time: int | None = Field(default=None, ge=0)
    overdue: int | None = Field(default=None, ge=0)


class HandlingExpect(_Strict):
    """The gateway's own handling figures (Longgang 8.6, ``GET /api/v1/cases/metrics``) for
    one group, over the cases registered since the run began. ``by: person`` names one of the
    scenario's accounts, so the figures are this run's alone; a community or a department
    counts every case of it registered meanwhile."""

    by: Literal["community", "department", "person"]
    key: str = Field(description="community code, department code, or a scenario account")
    registered: int | None = Field(default=None, ge=0, description="less the not-ours ones")
    not_ours: int | None = Field(default=None, ge=0)
    closed: int | None = Field(default=None, ge=0)
    handled: int | None = Field(default=None, ge=0)
    not_handled: int | None = Field(default=None, ge=0)
    first_time: int | None = Field(default=None, ge=0)
    due: int | None = Field(default=None, ge=0)
    on_time: int | None = Field(default=None, ge=0)
    overdue: int | None = Field(default=None, ge=0)
    stages: dict[ClockName, StageCounts] = Field(default_factory=dict)


class Expectation(_Strict):
    events: EventsExpect | None = None
    feedback: FeedbackExpect | None = None
    dead_letters: DeadLetterExpect | None = None
    out_of_area: OutOfAreaExpect | None = None
    device_state: DeviceStateExpect | None = None
    case: CaseExpect | None = None
    sla: SlaExpect | None = None
    handling: HandlingExpect | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        kinds = [
            self.events,
            self.feedback,
            self.dead_letters,
            self.out_of_area,
            self.device_state,
            self.case,
            self.sla,
            self.handling,
        ]
        if sum(k is not None for k in kinds) != 1:
            raise ValueError(
                "an expectation is exactly one of: events, feedback, dead_letters, out_of_area, "
                "device_state, case, sla, handling"
            )
        return self

    @property
    def on_cases(self) -> bool:
        """Read through the gateway's API, not the pool."""
        return self.case is not None or self.sla is not None or self.handling is not None

    def devices_named(self) -> list[str]:
        named = [
            getattr(x, "device", None)
            for x in (
                self.events,
                self.feedback,
                self.dead_letters,
                self.out_of_area,
                self.device_state,
            )
            if x is not None
        ]
        return [d for d in named if d]


class Scenario(_Strict):
    name: str
    description: str = ""
    time_scale: float = Field(
        default=60,
        gt=0,
        description="simulated seconds per real second (60: one minute per second)",
    )
    timeout_s: float = Field(default=15, gt=0, le=600, description="how long expectations may take")
    places: dict[str, Point] = Field(default_factory=dict)
    accounts: dict[str, AccountDecl] = Field(
        default_factory=dict, description="operator accounts the operator steps act as"
    )
    devices: list[DeviceDecl] = Field(min_length=1)
    steps: list[Step] = Field(min_length=1)
    expect: list[Expectation] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Self:
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids must be unique")
        named = {s.alert.alert_id for s in self.steps if s.alert and s.alert.alert_id}
        for i, step in enumerate(self.steps):
            if step.is_operator:
                if step.as_ not in self.accounts:
                    raise ValueError(f"steps[{i}].as: unknown account {step.as_!r}")
                if step.case not in named:
                    raise ValueError(
                        f"steps[{i}].case: no alert is named {step.case!r} (alert.alert_id)"
                    )
            elif step.device not in ids:
                raise ValueError(f"steps[{i}].device: unknown device {step.device!r}")
        for i, exp in enumerate(self.expect):
            for d in exp.devices_named():
                if d not in ids:
                    raise ValueError(f"expect[{i}]: unknown device {d!r}")
            if exp.case is not None and exp.case.case not in named:
                raise ValueError(f"expect[{i}].case: no alert is named {exp.case.case!r}")
            h = exp.handling
            if h is not None and h.by == "person" and h.key not in self.accounts:
                raise ValueError(f"expect[{i}].handling: unknown account {h.key!r}")
        points = list(self.places.values()) + [d.at for d in self.devices if d.at]
        points += [s.alert.at for s in self.steps if s.alert and s.alert.at]
        for p in points:
            if p.place is not None and p.place not in self.places:
                raise ValueError(f"unknown place {p.place!r}; known: {sorted(self.places)}")
        for name, p in self.places.items():
            if p.place is not None:
                raise ValueError(f"places.{name}: a place is lat+lon or a grid, not another place")
        return self

    def check_against(self, catalogue: Catalogue, grids: GridIndex) -> None:
        """Types and grid codes exist; every alert has a position."""
        by_id = {d.id: d for d in self.devices}
        for i, step in enumerate(self.steps):
            typ = step.alert.type if step.alert else (step.bad.type if step.bad else None)
            if typ is not None and typ not in catalogue.types:
                raise ScenarioError(f"{self.name}: steps[{i}]: unknown warning type {typ!r}")
            if (
                (step.alert or step.bad)
                and step.device is not None
                and by_id[step.device].at is None
                and not (step.alert and step.alert.at)
            ):
                raise ScenarioError(
                    f"{self.name}: steps[{i}]: device {step.device!r} has no position and the "
                    "alert gives none"
                )
        points = list(self.places.values()) + [d.at for d in self.devices if d.at]
        points += [s.alert.at for s in self.steps if s.alert and s.alert.at]
        for p in points:
            if p.grid is not None and grids.get(p.grid) is None:
                raise ScenarioError(f"{self.name}: unknown grid code {p.grid!r}")
        for i, exp in enumerate(self.expect):
            if exp.events and exp.events.type and exp.events.type not in catalogue.types:
                raise ScenarioError(f"{self.name}: expect[{i}]: unknown type {exp.events.type!r}")

    @property
    def span_s(self) -> float:
        """Simulated seconds of the device steps (operator steps run on the case clock)."""
        return max((s.t for s in self.steps if not s.is_operator), default=0.0)

    @property
    def has_operator_steps(self) -> bool:
        return (
            bool(self.accounts)
            or any(s.is_operator for s in self.steps)
            or any(e.on_cases for e in self.expect)
        )


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario file; errors name the file and the key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from exc
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
        raise ScenarioError(f"{path}: invalid scenario:\n" + "\n".join(lines)) from exc


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Check:
    """One expectation's verdict: what it asked for and what the far end showed."""

    index: int
    title: str
    ok: bool
    expected: str
    actual: str


@dataclass(slots=True)
class ScenarioResult:
    name: str
    checks: list[Check] = field(default_factory=list)
    sent: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def report(self) -> str:
        head = "PASS" if self.ok else "FAIL"
        good = sum(c.ok for c in self.checks)
        lines = [
            f"{head} {self.name}: {good}/{len(self.checks)} expectations held "
            f"({self.sent} messages, {self.elapsed_s:.1f} s)"
        ]
        for c in self.checks:
            if c.ok:
                lines.append(f"  ok   [{c.index}] {c.title}")
            else:
                lines += [
                    f"  FAIL [{c.index}] {c.title}",
                    f"         expected: {c.expected}",
                    f"         actual:   {c.actual}",
                ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------- the runner


@dataclass(slots=True)
class _Device:
    decl: DeviceDecl
    real_id: str
    sim: SimDevice
    seq: int = 0
    online: bool = True
    backlog: list[bytes] = field(default_factory=list)
    # Alerts sent on the current connection, and feedback already held when it began: once
    # every one has its feedback, the aggregator has committed all this device sent.
    sent_here: int = 0
    feedback_before: int = 0

    def settled(self) -> bool:
        return not self.online or len(self.sim.feedback) - self.feedback_before >= self.sent_here


class OperatorSide(Protocol):
    """What operator steps need of a stack (``GatewayStack`` with ``api=True``): accounts,
    their sessions on the API, and the case clock the gateway reads."""

    clock: OffsetFileClock

    def add_operator(
        self, username: str, level: str, *, scope_code: str = "", department: str | None = None
    ) -> Account: ...

    def desk(self, account: Account) -> Desk: ...


@dataclass(slots=True)
class _OperatorRun:
    """One run's operator side: desks per account, an observer reading every case, the case
    clock's offset when the run began, and the events its named alerts became."""

    side: OperatorSide
    desks: dict[str, Desk]
    observer: Desk
    base_offset_s: float
    started: float  # time.monotonic() at simulated t = 0
    tag: str
    registered_since: datetime  # before any event of the run was registered
    events: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for desk in [*self.desks.values(), self.observer]:
            desk.close()

    def move_clock(self, t: float) -> None:
        """The case clock to the run's start plus ``t`` simulated seconds: forward only (the
        clock is the whole gateway's; another run may have moved it further)."""
        target = self.base_offset_s + t - (time.monotonic() - self.started)
        if target > self.side.clock.offset_s():
            self.side.clock.set(target)


class ScenarioRunner:
    """Plays scenarios against one stack: a provisioner for device credentials and the pool.

    ``run_tag`` keeps runs apart on a shared stack: it prefixes device ids and alert ids, and
    expectations count only what this run's devices did. ``origin_shift_s`` moves the run's
    clock back, so that a scenario repeated on one pool stays out of the earlier run's dedup
    windows (skewed device clocks move with it).
    """

    def __init__(
        self,
        provisioner: Provisioner,
        pool_path: Path | str,
        *,
        catalogue: Catalogue | None = None,
        grids: GridIndex | None = None,
        max_payload_bytes: int = 1024 * 1024,
        poll_interval_s: float = 0.1,
        operators: OperatorSide | None = None,
    ) -> None:
        self.provisioner = provisioner
        self.operators = operators
        self.pool = PoolView(pool_path, catalogue)
        self.catalogue = catalogue or default_catalogue()
        self.grids = grids or GridIndex.from_geojson(default_grid_file())
        self.max_payload_bytes = max_payload_bytes
        self.poll_interval_s = poll_interval_s

    def run(
        self,
        scenario: Scenario,
        *,
        run_tag: str | None = None,
        origin_shift_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> ScenarioResult:
        scenario.check_against(self.catalogue, self.grids)
        if scenario.has_operator_steps and self.operators is None:
            raise ScenarioError(
                f"{scenario.name}: operator steps need the gateway's API: run it on a stack "
                "with the API (StackOptions(api=True); gateway-sim scenario --start-stack)"
            )
        tag = run_tag or uuid.uuid4().hex[:8]
        started = time.monotonic()
        result = ScenarioResult(scenario.name)
        # Every observed_at lies in the past of the aggregator's clock: the run's simulated
        # origin is placed so that its last step is (almost) now.
        origin = datetime.now(UTC) - timedelta(seconds=scenario.span_s + 2 + origin_shift_s)
        devices = self._connect(scenario, tag)
        ops: _OperatorRun | None = None
        try:
            if scenario.has_operator_steps:
                ops = self._operators(scenario, tag)
            clock_real = time.monotonic()
            if ops is not None:
                ops.started = clock_real
            prev_t = 0.0
            steps: list[Check] = []
            for i, step in sorted(enumerate(scenario.steps), key=lambda x: x[1].t):
                wait = (step.t - prev_t) / scenario.time_scale
                if wait > 0:
                    clock_real += wait
                    time.sleep(max(0.0, clock_real - time.monotonic()))
                prev_t = step.t
                if step.is_operator:
                    assert ops is not None
                    steps.append(self._operate(i, step, ops, devices, tag))
                    continue
                assert step.device is not None
                result.sent += self._play(scenario, step, devices[step.device], origin, tag)
            result.checks = steps + self._await(
                scenario, devices, timeout_s or scenario.timeout_s, ops
            )
        finally:
            for dev in devices.values():
                dev.sim.close(graceful=dev.online)
            if ops is not None:
                ops.close()
        result.elapsed_s = time.monotonic() - started
        log.info("%s", result.report())
        return result

    # -- operators and departments ---------------------------------------------------------
    def _operators(self, scenario: Scenario, tag: str) -> _OperatorRun:
        side = self.operators
        assert side is not None
        desks: dict[str, Desk] = {}
        try:
            for name, decl in scenario.accounts.items():
                account = side.add_operator(
                    f"{tag}-{name}",
                    decl.level,
                    scope_code=decl.scope or "",
                    department=decl.department,
                )
                desks[name] = side.desk(account)
            observer = side.desk(side.add_operator(f"{tag}-observer", "admin"))
        except Exception:
            for desk in desks.values():
                desk.close()
            raise
        return _OperatorRun(
            side,
            desks,
            observer,
            side.clock.offset_s(),
            time.monotonic(),
            tag,
            datetime.now(UTC) - timedelta(seconds=1),
        )

    def _case_event(
        self, name: str, ops: _OperatorRun, devices: dict[str, _Device], tag: str
    ) -> int | None:
        """The event the alert named ``name`` became, from the feedback its device received
        (waits a little: the step may follow the alert closely)."""
        if name in ops.events:
            return ops.events[name]
        alert_id = f"{tag}-{name}"
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            for dev in devices.values():
                for fb in list(dev.sim.feedback):
                    if fb.alert_id == alert_id and fb.event_id is not None:
                        ops.events[name] = fb.event_id
                        return fb.event_id
            time.sleep(self.poll_interval_s / 2)
        return None

    def _operate(
        self, i: int, step: Step, ops: _OperatorRun, devices: dict[str, _Device], tag: str
    ) -> Check:
        """One operator step through the API at simulated ``t`` on the case clock."""
        assert step.do is not None
        assert step.case is not None
        assert step.as_ is not None
        action = action_of(step.do)
        title = f"step t={step.t:g} as={step.as_} do={action.value} case={step.case}"
        want = f"HTTP {step.refused}" if step.refused else "done"
        event_id = self._case_event(step.case, ops, devices, tag)
        if event_id is None:
            return Check(i, title, False, want, f"the alert {step.case!r} became no event")
        ops.move_clock(step.t)
        desk = ops.desks[step.as_]
        try:
            payload: dict[str, Any] = {
                "note": step.note,
                "reason": step.reason,
                "summary": step.summary,
            }
            if step.departments:
                payload["lead_department"] = step.departments[0]
                if step.departments[1:]:
                    payload["co_departments"] = step.departments[1:]
            if step.photos:
                payload["photos"] = [
                    desk.upload_photo(snapshot_jpeg(f"{step.case} {action.value}", k + i * 8))
                    for k in range(step.photos)
                ]
            if step.until_s is not None:
                payload["until"] = ops.side.clock.now() + timedelta(seconds=step.until_s)
            # The version as it stands, read by the observer: a department may not read a
            # case before it is whistled to it, yet its step must get the API's own answer.
            version = int(ops.observer.case(event_id)["version"])
            out = desk.step(event_id, action, expected_version=version, **payload)
        except StepRefused as exc:
            got = f"HTTP {exc.status}: {exc.detail}"
            return Check(i, title, step.refused == exc.status, want, got)
        got = f"done: {out['from_state']} → {out['to_state']}"
        return Check(i, title, step.refused is None, want, got)

    def _case_checks(
        self, scenario: Scenario, ops: _OperatorRun | None, devices: dict[str, _Device]
    ) -> list[Check]:
        checks: list[Check] = []
        for i, exp in enumerate(scenario.expect):
            if not exp.on_cases:
                continue
            if ops is None:  # no operator step: the cases are still read through the API
                checks.append(Check(i, "case", False, "the gateway's API", "no operator side"))
                continue
            try:
                if exp.case is not None:
                    checks.append(self._case(i, exp.case, ops))
                elif exp.sla is not None:
                    checks.append(self._sla(i, exp.sla, ops))
                elif exp.handling is not None:
                    checks.append(self._handling(i, exp.handling, ops))
            except StepRefused as exc:
                checks.append(Check(i, "case", False, "readable", str(exc)))
        return checks

    def _case(self, i: int, e: CaseExpect, ops: _OperatorRun) -> Check:
        title = f"case {e.case}"
        event_id = ops.events.get(e.case)
        if event_id is None:
            return Check(i, title, False, "a case", "no operator step reached this case")
        case = ops.observer.case(event_id)
        deadlines: list[dict[str, Any]] = case["deadlines"]
        late = sorted({d["clock"] for d in deadlines if d["late"]})
        overdue = sorted({d["clock"] for d in deadlines if d["overdue"]})
        ran = {d["clock"] for d in deadlines}
        want: dict[str, object] = {}
        got: dict[str, object] = {}
        ok = True

        def compare(key: str, expected: object, actual: object) -> None:
            nonlocal ok
            want[key], got[key] = expected, actual
            ok = ok and expected == actual

        if e.state is not None:
            compare("state", e.state.value, case["state"])
        if e.outcome is not None:
            compare("outcome", e.outcome.value, case["outcome"])
        if e.lead_department is not None:
            compare("lead_department", e.lead_department, case["lead_department"])
        if e.send_backs is not None:
            compare("send_backs", e.send_backs, case["send_backs"])
        if e.late is not None:
            compare("late", sorted(c.value for c in e.late), late)
        if e.overdue is not None:
            compare("overdue", sorted(c.value for c in e.overdue), overdue)
        if e.on_time:
            expected = sorted(c.value for c in e.on_time)
            compare("on_time", expected, [c for c in expected if c in ran and c not in late])
        return Check(
            i,
            title,
            ok,
            _describe(**want),
            _describe(**got) + f"; clocks: {_clocks(deadlines)}",
        )

    def _sla(self, i: int, e: SlaExpect, ops: _OperatorRun) -> Check:
        late = on_time = overdue = 0
        for event_id in sorted(set(ops.events.values())):
            case = ops.observer.case(event_id)
            if e.department is not None and case["lead_department"] != e.department:
                continue
            for d in case["deadlines"]:
                if d["clock"] != e.clock.value:
                    continue
                if d["late"]:
                    late += 1
                elif not d["running"]:
                    on_time += 1
                if d["overdue"]:
                    overdue += 1
        want = _describe(late=e.late, on_time=e.on_time, overdue=e.overdue)
        ok = all(
            x is None or x == y
            for x, y in ((e.late, late), (e.on_time, on_time), (e.overdue, overdue))
        )
        got = _describe(late=late, on_time=on_time, overdue=overdue)
        return Check(
            i, f"sla {_describe(clock=e.clock.value, department=e.department)}", ok, want, got
        )

    def _handling(self, i: int, e: HandlingExpect, ops: _OperatorRun) -> Check:
        key = f"{ops.tag}-{e.key}" if e.by == "person" else e.key
        title = f"handling by={e.by} key={e.key}"
        figures = ops.observer.metrics(e.by, since=ops.registered_since)
        group = next((g for g in figures["groups"] if g["key"] == key), None)
        if group is None:
            return Check(i, title, False, "figures", "no figures for this group")
        want: dict[str, object] = {}
        got: dict[str, object] = {}
        for name in (
            "registered",
            "not_ours",
            "closed",
            "handled",
            "not_handled",
            "first_time",
            "due",
            "on_time",
            "overdue",
        ):
            expected = getattr(e, name)
            if expected is not None:
                want[name], got[name] = expected, group[name]
        for clock, counts in e.stages.items():
            stage = group["stages"].get(clock.value, {"due": 0, "on_time": 0, "overdue": 0})
            for name in ("due", "on_time", "overdue"):
                expected = getattr(counts, name)
                if expected is not None:
                    want[f"{clock.value}.{name}"] = expected
                    got[f"{clock.value}.{name}"] = stage[name]
        ok = all(want[k] == got[k] for k in want)
        rates = ", ".join(
            f"{r}={group[r]:.2f}" if group[r] is not None else f"{r}=-"
            for r in ("handling_rate", "on_time_rate", "first_time_rate")
        )
        return Check(i, title, ok, _describe(**want), f"{_describe(**got)}; {rates}")

    # -- devices and steps -----------------------------------------------------------------
    def _connect(self, scenario: Scenario, tag: str) -> dict[str, _Device]:
        specs = []
        for d in scenario.devices:
            lat, lon = self._resolve(scenario, d.at) if d.at else (None, None)
            specs.append(DeviceSpec(f"{tag}-{d.id}", DeviceKind(d.kind), lat, lon))
        creds = self.provisioner.provision(specs)
        out: dict[str, _Device] = {}
        try:
            for d, spec in zip(scenario.devices, specs, strict=True):
                sim = SimDevice(creds[spec.device_id])
                sim.connect()
                out[d.id] = _Device(d, spec.device_id, sim)
        except Exception:
            for dev in out.values():
                dev.sim.close()
            raise
        return out

    def _resolve(self, scenario: Scenario, p: Point) -> tuple[float, float]:
        if p.place is not None:
            lat, lon = self._resolve(scenario, scenario.places[p.place])
        elif p.grid is not None:
            grid = self.grids.get(p.grid)
            if grid is None:
                raise ScenarioError(f"unknown grid code {p.grid!r}")
            lat, lon = grid.centroid
        else:
            assert p.lat is not None
            assert p.lon is not None
            lat, lon = p.lat, p.lon
        if p.east_m or p.north_m:
            lat, lon = offset_m(lat, lon, p.east_m, p.north_m)
        return lat, lon

    def _play(
        self, scenario: Scenario, step: Step, dev: _Device, origin: datetime, tag: str
    ) -> int:
        if step.offline:
            dev.sim.close(graceful=False)
            dev.online = False
            return 0
        if step.online:
            dev.feedback_before, dev.sent_here = len(dev.sim.feedback), 0
            dev.sim.connect()
            dev.online = True
            backlog, dev.backlog = dev.backlog, []
            for payload in backlog:
                dev.sim.alert(payload)
            dev.sent_here += len(backlog)
            return len(backlog)
        observed = origin + timedelta(seconds=step.t + dev.decl.clock_skew_s)
        payload = self._payload(scenario, step, dev, observed, tag)
        if not dev.online:
            dev.backlog.append(payload)  # the device's outbox keeps it until the link is back
            return 0
        dev.sim.alert(payload)
        dev.sent_here += 1
        return 1

    def _payload(
        self, scenario: Scenario, step: Step, dev: _Device, observed: datetime, tag: str
    ) -> bytes:
        a = step.alert
        typ = a.type if a else (step.bad.type if step.bad else None)
        if typ is None:
            typ = next(t for t, wt in self.catalogue.types.items() if wt.source == dev.decl.kind)
        at = a.at if a and a.at else dev.decl.at
        assert at is not None  # checked in Scenario.check_against
        lat, lon = self._resolve(scenario, at)
        dev.seq += 1
        name = a.alert_id if a and a.alert_id else f"{dev.decl.id}-{dev.seq}"
        alert = make_alert(
            alert_id=f"{tag}-{name}",
            device_id=dev.real_id,
            seq=dev.seq,
            wt=self.catalogue.types[typ],
            observed_at=observed,
            lat=lat,
            lon=lon,
            confidence=a.confidence if a else 0.8,
            snapshot=a.snapshot if a else False,
            description=a.description if a else "",
            variant=dev.seq,
        )
        if a is not None:
            if a.severity is not None:
                alert = alert.model_copy(update={"severity": a.severity})
            return alert.to_json()
        assert step.bad is not None
        return bad_payload(
            step.bad.kind,
            alert,
            now=datetime.now(UTC),
            max_payload_bytes=self.max_payload_bytes,
        )

    # -- expectations ----------------------------------------------------------------------
    def _await(
        self,
        scenario: Scenario,
        devices: dict[str, _Device],
        timeout_s: float,
        ops: _OperatorRun | None = None,
    ) -> list[Check]:
        deadline = time.monotonic() + timeout_s
        # Settle first: an exact count (or a zero) can hold by accident before the aggregator
        # has committed everything; feedback for every alert sent says it has.
        while not all(d.settled() for d in devices.values()) and time.monotonic() < deadline:
            time.sleep(self.poll_interval_s / 2)
        while True:
            checks = self.evaluate(scenario, devices)
            if scenario.has_operator_steps:
                checks = sorted(
                    checks + self._case_checks(scenario, ops, devices), key=lambda c: c.index
                )
            if all(c.ok for c in checks) or time.monotonic() > deadline:
                return checks
            time.sleep(self.poll_interval_s)

    def evaluate(self, scenario: Scenario, devices: dict[str, _Device]) -> list[Check]:
        real = {k: d.real_id for k, d in devices.items()}
        back = {v: k for k, v in real.items()}
        checks: list[Check] = []
        for i, exp in enumerate(scenario.expect):
            if exp.events:
                checks.append(self._events(i, exp.events, real, back))
            elif exp.feedback:
                checks.append(_feedback(i, exp.feedback, devices[exp.feedback.device]))
            elif exp.dead_letters:
                checks.append(self._dead_letters(i, exp.dead_letters, real))
            elif exp.out_of_area:
                checks.append(self._out_of_area(i, exp.out_of_area, real))
            elif exp.device_state:
                checks.append(self._device_state(i, exp.device_state, real))
        return checks

    def _events(self, i: int, e: EventsExpect, real: dict[str, str], back: dict[str, str]) -> Check:
        # Only events this run's devices took part in: a shared stack holds other runs' too.
        ours = set(real.values())
        found = [
            ev
            for ev in self.pool.events(
                type=e.type,
                grid_prefix=e.grid,
                device_id=real[e.device] if e.device else None,
            )
            if ours & set(ev.device_ids)
        ]
        if e.severity is not None:
            found = [ev for ev in found if ev.severity is e.severity]
        if e.department is not None:
            found = [ev for ev in found if ev.department == e.department]
        ok = len(found) == e.count
        if e.devices is not None:
            ok = ok and all(len(ev.device_ids) == e.devices for ev in found)
        if e.alerts is not None:
            ok = ok and all(ev.alert_count == e.alerts for ev in found)
        filters = _describe(
            type=e.type,
            grid=e.grid,
            device=e.device,
            severity=e.severity and e.severity.value,
            department=e.department,
        )
        want = _describe(count=e.count, devices=e.devices, alerts=e.alerts)
        got = f"count={len(found)}"
        if found:
            got += "; " + "; ".join(
                f"event {ev.event_id}: type={ev.type} grid={ev.grid_code} "
                f"devices={len(ev.device_ids)} "
                f"[{', '.join(back.get(d, d) for d in ev.device_ids)}] "
                f"alerts={ev.alert_count} severity={ev.severity.value} department={ev.department}"
                for ev in found[:10]
            )
        return Check(i, f"events {filters}", ok, want, got)

    def _dead_letters(self, i: int, e: DeadLetterExpect, real: dict[str, str]) -> Check:
        ours = set(real.values())
        dls = [
            d
            for d in self.pool.dead_letters(device_id=real[e.device] if e.device else None)
            if d.device_id in ours
        ]
        match = [d for d in dls if d.reason == e.reason.value]
        ok = len(match) == e.count if e.count is not None else len(match) >= 1
        want = f"reason={e.reason.value} " + (
            f"count={e.count}" if e.count is not None else "count>=1"
        )
        got = f"count={len(match)}"
        others = sorted({d.reason for d in dls} - {e.reason.value})
        if others:
            got += f"; this run's other dead letters: {', '.join(others)}"
        return Check(
            i, f"dead_letters {_describe(reason=e.reason.value, device=e.device)}", ok, want, got
        )

    def _out_of_area(self, i: int, e: OutOfAreaExpect, real: dict[str, str]) -> Check:
        ours = set(real.values())
        rows = [
            r
            for r in self.pool.out_of_area(device_id=real[e.device] if e.device else None)
            if r.device_id in ours
        ]
        return Check(
            i,
            f"out_of_area {_describe(device=e.device)}",
            len(rows) == e.count,
            f"count={e.count}",
            f"count={len(rows)}",
        )

    def _device_state(self, i: int, e: DeviceStateExpect, real: dict[str, str]) -> Check:
        state = self.pool.device_state(real[e.device])
        return Check(
            i,
            f"device_state device={e.device}",
            state == e.state.value,
            f"state={e.state.value}",
            f"state={state}",
        )


def _feedback(i: int, e: FeedbackExpect, dev: _Device) -> Check:
    def matches(outcome: str, reason: str | None) -> bool:
        return outcome == e.outcome.value and (e.reason is None or reason == e.reason.value)

    got = [(f.outcome.value, f.reason.value if f.reason else None) for f in list(dev.sim.feedback)]
    n = sum(matches(o, r) for o, r in got)
    ok = n == e.count if e.count is not None else n >= 1
    want = _describe(outcome=e.outcome.value, reason=e.reason and e.reason.value) + (
        f" count={e.count}" if e.count is not None else " count>=1"
    )
    seen = ", ".join(f"{o}({r})" if r else o for o, r in got) or "none"
    return Check(
        i,
        f"feedback {_describe(device=e.device, outcome=e.outcome.value)}",
        ok,
        want,
        f"count={n}; all feedback received: {seen}",
    )


def _clocks(deadlines: list[dict[str, Any]]) -> str:
    parts = []
    for d in deadlines:
        how = "late" if d["late"] else ("running" if d["running"] else "on time")
        parts.append(f"{d['clock']}(round {d['round']}) {how}")
    return ", ".join(parts) or "none"


def _describe(**kw: object) -> str:
    return " ".join(f"{k}={v}" for k, v in kw.items() if v is not None) or "(any)"


def run_files(
    runner: ScenarioRunner,
    paths: Sequence[Path],
    *,
    echo: Callable[[str], None] = print,
    timeout_s: float | None = None,
) -> list[ScenarioResult]:
    """Run each file in turn; each run gets its own tag (device and alert ids)."""
    results = []
    for path in paths:
        scenario = load_scenario(path)
        res = runner.run(scenario, timeout_s=timeout_s)
        echo(res.report())
        results.append(res)
    return results
