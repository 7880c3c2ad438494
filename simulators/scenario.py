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
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aggregator.broker.registry import DeviceKind
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
from simulators.device import SimDevice
from simulators.errors import ScenarioError
from simulators.messages import BadKind, bad_payload, make_alert, offset_m
from simulators.poolview import PoolView
from simulators.stack import DeviceSpec, Provisioner

__all__ = [
    "Check",
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


class Step(_Strict):
    t: float = Field(ge=0, description="simulated seconds after the scenario starts")
    device: str
    alert: AlertStep | None = None
    bad: BadStep | None = None
    offline: bool = Field(
        default=False, description="drop the link (the broker sends the Last Will)"
    )
    online: bool = Field(default=False, description="reconnect and flush what was raised meanwhile")

    @model_validator(mode="after")
    def _one_action(self) -> Self:
        if sum([self.alert is not None, self.bad is not None, self.offline, self.online]) != 1:
            raise ValueError("a step does exactly one of: alert, bad, offline, online")
        return self


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


class Expectation(_Strict):
    events: EventsExpect | None = None
    feedback: FeedbackExpect | None = None
    dead_letters: DeadLetterExpect | None = None
    out_of_area: OutOfAreaExpect | None = None
    device_state: DeviceStateExpect | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        kinds = [self.events, self.feedback, self.dead_letters, self.out_of_area, self.device_state]
        if sum(k is not None for k in kinds) != 1:
            raise ValueError(
                "an expectation is exactly one of: events, feedback, dead_letters, out_of_area, "
                "device_state"
            )
        return self

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
    devices: list[DeviceDecl] = Field(min_length=1)
    steps: list[Step] = Field(min_length=1)
    expect: list[Expectation] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Self:
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids must be unique")
        for i, step in enumerate(self.steps):
            if step.device not in ids:
                raise ValueError(f"steps[{i}].device: unknown device {step.device!r}")
        for i, exp in enumerate(self.expect):
            for d in exp.devices_named():
                if d not in ids:
                    raise ValueError(f"expect[{i}]: unknown device {d!r}")
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
        return max(s.t for s in self.steps)


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
    ) -> None:
        self.provisioner = provisioner
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
        tag = run_tag or uuid.uuid4().hex[:8]
        started = time.monotonic()
        result = ScenarioResult(scenario.name)
        # Every observed_at lies in the past of the aggregator's clock: the run's simulated
        # origin is placed so that its last step is (almost) now.
        origin = datetime.now(UTC) - timedelta(seconds=scenario.span_s + 2 + origin_shift_s)
        devices = self._connect(scenario, tag)
        try:
            clock_real = time.monotonic()
            prev_t = 0.0
            for step in sorted(scenario.steps, key=lambda s: s.t):
                wait = (step.t - prev_t) / scenario.time_scale
                if wait > 0:
                    clock_real += wait
                    time.sleep(max(0.0, clock_real - time.monotonic()))
                prev_t = step.t
                result.sent += self._play(scenario, step, devices[step.device], origin, tag)
            result.checks = self._await(scenario, devices, timeout_s or scenario.timeout_s)
        finally:
            for dev in devices.values():
                dev.sim.close(graceful=dev.online)
        result.elapsed_s = time.monotonic() - started
        log.info("%s", result.report())
        return result

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
        self, scenario: Scenario, devices: dict[str, _Device], timeout_s: float
    ) -> list[Check]:
        deadline = time.monotonic() + timeout_s
        # Settle first: an exact count (or a zero) can hold by accident before the aggregator
        # has committed everything; feedback for every alert sent says it has.
        while not all(d.settled() for d in devices.values()) and time.monotonic() < deadline:
            time.sleep(self.poll_interval_s / 2)
        while True:
            checks = self.evaluate(scenario, devices)
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
