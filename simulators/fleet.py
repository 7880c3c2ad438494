"""A fleet of simulated cameras and sensors placed across the grid map.

Two halves, kept apart so that the first can be tested on its own:

* ``FleetPlan`` (pure, seeded): where each device stands, and the exact sequence of actions —
  connect, publish (topic + payload bytes), disconnect — on a simulated clock. The same config
  and the same clock origin give the same sequence, byte for byte.
* ``Fleet`` (I/O): provisions the devices, connects each with its own credentials, plays the
  plan against a real broker (optionally faster than real time), counts the feedback that comes
  back, shows a progress bar and ends with a summary.

What a plan holds: alerts by catalogue type at per-type rates (camera types from cameras,
sensor types from sensors), sensor telemetry, a retained online status on every connect and a
Last Will on every link loss, JPEG snapshots, incidents several devices report (within the
type's merge radius and window), positions outside every grid, skewed device clocks, offline
periods whose backlog is flushed on reconnect, and (opt-in) each kind of malformed alert.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from shapely.geometry import Point as ShapelyPoint

from aggregator.broker.registry import DeviceKind, DeviceRegistry
from aggregator.grids import GridIndex, default_grid_file
from contract import (
    AlertV1,
    Catalogue,
    DeviceState,
    FeedbackV1,
    Health,
    Reading,
    StatusV1,
    TelemetryV1,
    Topics,
    WarningType,
    default_catalogue,
)
from simulators.device import FeedbackHook, SimDevice
from simulators.errors import DeviceError, SimulatorError
from simulators.messages import BadKind, bad_payload, make_alert, offset_m
from simulators.stack import DeviceSpec, Provisioner

__all__ = ["Action", "Fleet", "FleetConfig", "FleetDevice", "FleetPlan", "FleetSummary"]

log = logging.getLogger(__name__)

# Relative frequency of each type in a community (how often its devices raise it), so that a
# fleet sees many bins and vendors and few fires. Types not listed weigh 1.
TYPE_WEIGHTS: dict[str, float] = {
    "fire_lane_occupied": 6,
    "ebike_in_lift": 4,
    "smoke_fire": 0.5,
    "crowd_gathering": 2,
    "zone_intrusion": 2,
    "thrown_object": 1,
    "street_vending": 5,
    "exposed_garbage": 6,
    "noise_over_limit": 6,
    "smoke_alarm": 0.5,
    "water_level": 2,
    "gas_leak": 0.5,
    "manhole_displaced": 1,
    "sewage_discharge": 1,
}
# Where out-of-area positions are drawn: a ring 20–60 km from the map, outside every grid.
_OUT_OF_AREA_KM = (20.0, 60.0)
_WINDOW_S = 60.0  # the plan is generated one simulated minute at a time
_SENSOR_QUANTITY = {
    "noise_over_limit": ("noise_db", "dB(A)", 55.0),
    "smoke_alarm": ("smoke_obscuration", "%/m", 0.2),
    "water_level": ("water_level_m", "m", 0.05),
    "gas_leak": ("gas_ppm", "ppm", 20.0),
    "manhole_displaced": ("tilt_deg", "deg", 1.0),
    "sewage_discharge": ("cod_mg_l", "mg/L", 40.0),
}


class FleetConfig(BaseModel):
    """What the fleet looks like and how busy it is. Every count and duration is bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=1, description="same seed, same fleet, same message sequence")
    cameras: int = Field(default=6, ge=0, le=2000, description="simulated cameras")
    sensors: int = Field(default=6, ge=0, le=2000, description="simulated IoT sensors")
    id_prefix: str = Field(default="sim", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
    rate: float = Field(
        default=1.0, gt=0, le=10_000, description="alerts per simulated second, fleet-wide"
    )
    duration_s: float | None = Field(
        default=120, gt=0, description="simulated seconds to run (None: until count or stopped)"
    )
    count: int | None = Field(default=None, ge=1, description="stop after this many alerts")
    time_scale: float = Field(
        default=1.0, gt=0, le=10_000, description="simulated seconds per real one"
    )
    telemetry_interval_s: float = Field(default=30, gt=0, description="sensor telemetry period")
    snapshot_share: float = Field(default=0.3, ge=0, le=1, description="camera alerts with a JPEG")
    incident_share: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="alert draws that are one incident seen by 2–4 devices",
    )
    out_of_area_share: float = Field(
        default=0.02, ge=0, le=1, description="alerts placed off the map"
    )
    max_clock_skew_s: float = Field(
        default=45, ge=0, description="device clocks are off by up to ± this much"
    )
    offline_per_hour: float = Field(
        default=0.5, ge=0, description="expected offline periods per device per simulated hour"
    )
    offline_s: tuple[float, float] = Field(
        default=(20, 120), description="offline period length range"
    )
    malformed_share: float = Field(
        default=0.0, ge=0, le=1, description="opt-in: alerts sent malformed (each bad kind in turn)"
    )
    max_payload_bytes: int = Field(
        default=1024 * 1024, description="the aggregator's limit (oversized)"
    )

    @model_validator(mode="after")
    def _bounded(self) -> FleetConfig:
        if self.cameras + self.sensors == 0:
            raise ValueError("a fleet needs at least one camera or sensor")
        if self.offline_s[0] <= 0 or self.offline_s[1] < self.offline_s[0]:
            raise ValueError("offline_s is (shortest, longest), both > 0")
        if self.incident_share + self.out_of_area_share + self.malformed_share > 1:
            raise ValueError("incident, out-of-area and malformed shares add up to more than 1")
        return self


@dataclass(frozen=True, slots=True)
class FleetDevice:
    device_id: str
    kind: DeviceKind
    lat: float
    lon: float
    grid_code: str | None
    clock_skew_s: float


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """One thing a device does at simulated time ``t`` (seconds after the origin)."""

    t: float
    order: int  # tie-breaker: actions at one instant keep the order they were planned in
    device_id: str
    kind: Literal["connect", "publish", "disconnect"]
    topic: str = ""
    payload: bytes = b""
    qos: int = 1
    retain: bool = False
    # alert type, "incident:<type>:<n>", "bad:<kind>", "out_of_area:<type>", "telemetry", "status"
    label: str = ""

    def key(self) -> tuple[float, str, str, str, bytes]:
        """What makes two plans the same: time, device, action, topic and bytes."""
        return (round(self.t, 6), self.device_id, self.kind, self.topic, self.payload)


class FleetPlan:
    """Pure and seeded: devices and the action sequence for a config and a clock origin."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        grids: GridIndex | None = None,
        catalogue: Catalogue | None = None,
        topics: Topics | None = None,
        devices: Sequence[FleetDevice] | None = None,
    ) -> None:
        self.config = config
        self.grids = grids or GridIndex.from_geojson(default_grid_file())
        self.catalogue = catalogue or default_catalogue()
        self.topics = topics or Topics()
        self.devices = list(devices) if devices is not None else self._place()
        self._by_source: dict[str, list[FleetDevice]] = {
            "camera": [d for d in self.devices if d.kind is DeviceKind.CAMERA],
            "sensor": [d for d in self.devices if d.kind is DeviceKind.SENSOR],
        }
        self._types: dict[str, list[WarningType]] = {
            src: [wt for wt in self.catalogue.types.values() if wt.source.value == src]
            for src in ("camera", "sensor")
        }

    # -- devices ---------------------------------------------------------------------------
    def _place(self) -> list[FleetDevice]:
        """Each device in a random grid, at a random point inside its polygon."""
        c = self.config
        rng = random.Random(f"{c.seed}:place")
        grids = sorted(self.grids.grids, key=lambda g: g.code)
        out = []
        kinds = [DeviceKind.CAMERA] * c.cameras + [DeviceKind.SENSOR] * c.sensors
        for n, kind in enumerate(kinds):
            grid = rng.choice(grids)
            minx, miny, maxx, maxy = grid.polygon.bounds
            lat, lon = grid.centroid
            for _ in range(100):
                x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
                if grid.polygon.contains(ShapelyPoint(x, y)):
                    lat, lon = y, x
                    break
            skew = round(rng.uniform(-c.max_clock_skew_s, c.max_clock_skew_s), 3)
            prefix = "cam" if kind is DeviceKind.CAMERA else "sen"
            out.append(
                FleetDevice(
                    f"{c.id_prefix}-{prefix}-{n + 1:04d}",
                    kind,
                    round(lat, 7),
                    round(lon, 7),
                    grid.code,
                    skew,
                )
            )
        return out

    # -- actions ---------------------------------------------------------------------------
    def actions(self, origin: datetime) -> Iterator[Action]:
        """Every action in time order; bounded by the config's duration and/or count."""
        c = self.config
        state = _PlanState(origin, {d.device_id: d for d in self.devices})
        carry: list[Action] = []
        for d in self.devices:
            heapq.heappush(carry, self._connect(state, d, 0.0))
        for a in self._link_losses(state, random.Random(f"{c.seed}:offline:0.0"), 0.0, _WINDOW_S):
            heapq.heappush(carry, a)
        window = 0
        end = c.duration_s if c.duration_s is not None else math.inf
        while True:
            start = window * _WINDOW_S
            if start >= end or (c.count is not None and state.alerts >= c.count):
                break
            stop = min(start + _WINDOW_S, end)
            rng = random.Random(f"{c.seed}:window:{window}")
            for a in self._window(state, rng, start, stop):
                heapq.heappush(carry, a)
            while carry and carry[0].t < stop:
                yield heapq.heappop(carry)
            window += 1
        # Reconnects and backlogs scheduled past the end still happen: nothing is dropped.
        for a in self._reconnects(state, math.inf):
            heapq.heappush(carry, a)
        while carry:
            yield heapq.heappop(carry)

    def _window(
        self, state: _PlanState, rng: random.Random, start: float, stop: float
    ) -> list[Action]:
        c = self.config
        # Link losses are decided one window ahead: an incident report raised near the end of
        # this window may land in the next, and must know whether its device is offline then.
        out = self._link_losses(
            state, random.Random(f"{c.seed}:offline:{stop}"), stop, stop + _WINDOW_S
        )
        # Telemetry from sensors that are online.
        for d in self._by_source["sensor"]:
            k = math.ceil(start / c.telemetry_interval_s)
            while k * c.telemetry_interval_s < stop:
                t = k * c.telemetry_interval_s
                if not state.is_offline(d.device_id, t):
                    out.append(self._telemetry(state, rng, d, t))
                k += 1
        # Alerts: a Poisson process at the fleet-wide rate.
        t = start
        while True:
            t += rng.expovariate(c.rate)
            if t >= stop or (c.count is not None and state.alerts >= c.count):
                break
            out += self._draw(state, rng, t)
        return out + self._reconnects(state, stop)

    def _reconnects(self, state: _PlanState, before: float) -> list[Action]:
        """Reconnects due before ``before``: online status, then the backlog in order."""
        out = []
        due = sorted(r for r in state.reconnects if r[0] < before)
        state.reconnects = [r for r in state.reconnects if r[0] >= before]
        for t1, device_id in due:
            out.append(self._connect(state, state.devices[device_id], t1))
            # Only what was raised during this period: a later period may have begun queueing.
            queued = state.backlog.get(device_id, [])
            state.backlog[device_id] = [a for a in queued if a.t >= t1]
            for a in queued:
                if a.t < t1:
                    out.append(
                        state.action(t1, device_id, "publish", a.topic, a.payload, label=a.label)
                    )
        return out

    def _link_losses(
        self, state: _PlanState, rng: random.Random, start: float, stop: float
    ) -> list[Action]:
        """Offline periods beginning in [start, stop): a Poisson draw per device."""
        c = self.config
        end = c.duration_s if c.duration_s is not None else math.inf
        out: list[Action] = []
        p_off = 1 - math.exp(-c.offline_per_hour * (stop - start) / 3600)
        for d in self.devices:
            periods = state.offline.setdefault(d.device_id, [])
            busy = bool(periods) and periods[-1][1] >= start
            if rng.random() < p_off and not busy:
                t0 = rng.uniform(start, stop)
                if t0 >= end:
                    continue
                t1 = t0 + rng.uniform(*c.offline_s)
                periods.append((t0, t1))
                out.append(state.action(t0, d.device_id, "disconnect", label="last_will"))
                state.reconnects.append((t1, d.device_id))
        return out

    def _draw(self, state: _PlanState, rng: random.Random, t: float) -> list[Action]:
        c = self.config
        u = rng.random()
        if u < c.malformed_share:
            return self._bad(state, rng, t)
        u -= c.malformed_share
        if u < c.out_of_area_share:
            return self._out_of_area(state, rng, t)
        u -= c.out_of_area_share
        if u < c.incident_share:
            return self._incident(state, rng, t)
        d = rng.choice(self.devices)
        wt = self._pick_type(rng, d.kind.value)
        lat, lon = offset_m(d.lat, d.lon, rng.uniform(-8, 8), rng.uniform(-8, 8))
        return self._alert(state, rng, d, wt, t, lat, lon)

    def _incident(self, state: _PlanState, rng: random.Random, t: float) -> list[Action]:
        """One thing several devices see: positions within a third of the merge radius of it,
        times within a tenth of the window, so that the aggregator makes one event of them."""
        src = rng.choice([s for s in ("camera", "sensor") if self._by_source[s]])
        pool = self._by_source[src]
        wt = self._pick_type(rng, src)
        first = rng.choice(pool)
        k = min(len(pool), rng.randint(2, 4))
        # The devices nearest the incident report it (stable order for determinism).
        near = sorted(pool, key=lambda d: (_dist2(d, first), d.device_id))[:k]
        state.incidents += 1
        out = []
        for d in near:
            r = wt.merge_radius_m / 3
            lat, lon = offset_m(first.lat, first.lon, rng.uniform(-r, r), rng.uniform(-r, r))
            dt = rng.uniform(0, min(wt.merge_window_s / 10, 60.0))
            out += self._alert(
                state, rng, d, wt, t + dt, lat, lon, label=f"incident:{wt.code}:{state.incidents}"
            )
        return out

    def _out_of_area(self, state: _PlanState, rng: random.Random, t: float) -> list[Action]:
        d = rng.choice(self.devices)
        wt = self._pick_type(rng, d.kind.value)
        km = rng.uniform(*_OUT_OF_AREA_KM)
        bearing = rng.uniform(0, 2 * math.pi)
        lat, lon = offset_m(
            d.lat, d.lon, km * 1000 * math.sin(bearing), km * 1000 * math.cos(bearing)
        )
        return self._alert(state, rng, d, wt, t, lat, lon, label=f"out_of_area:{wt.code}")

    def _bad(self, state: _PlanState, rng: random.Random, t: float) -> list[Action]:
        kinds = list(BadKind)
        kind = kinds[state.bad % len(kinds)]
        state.bad += 1
        d = rng.choice(self.devices)
        wt = self._pick_type(rng, d.kind.value)
        good = self._alert_model(state, rng, d, wt, t, d.lat, d.lon)
        observed_now = state.origin + timedelta(seconds=t)
        payload = bad_payload(
            kind, good, now=observed_now, max_payload_bytes=self.config.max_payload_bytes
        )
        return self._emit(state, d, t, self.topics.alert(d.device_id), payload, f"bad:{kind}")

    def _alert(
        self,
        state: _PlanState,
        rng: random.Random,
        d: FleetDevice,
        wt: WarningType,
        t: float,
        lat: float,
        lon: float,
        label: str | None = None,
    ) -> list[Action]:
        alert = self._alert_model(state, rng, d, wt, t, lat, lon)
        return self._emit(
            state, d, t, self.topics.alert(d.device_id), alert.to_json(), label or wt.code
        )

    def _alert_model(
        self,
        state: _PlanState,
        rng: random.Random,
        d: FleetDevice,
        wt: WarningType,
        t: float,
        lat: float,
        lon: float,
    ) -> AlertV1:
        state.alerts += 1
        seq = state.next_seq(d.device_id)
        observed = state.origin + timedelta(seconds=t + d.clock_skew_s)
        snapshot = d.kind is DeviceKind.CAMERA and rng.random() < self.config.snapshot_share
        return make_alert(
            alert_id=f"{d.device_id}-{int(state.origin.timestamp())}-{seq}",
            device_id=d.device_id,
            seq=seq,
            wt=wt,
            observed_at=observed,
            lat=lat,
            lon=lon,
            confidence=rng.uniform(0.55, 0.98),
            snapshot=snapshot,
            variant=rng.randrange(20),
        )

    def _emit(
        self, state: _PlanState, d: FleetDevice, t: float, topic: str, payload: bytes, label: str
    ) -> list[Action]:
        action = state.action(t, d.device_id, "publish", topic, payload, label=label)
        if state.is_offline(d.device_id, t):
            # Raised while the link is down: kept in the device's outbox, flushed on reconnect.
            state.backlog.setdefault(d.device_id, []).append(action)
            return []
        return [action]

    def _telemetry(self, state: _PlanState, rng: random.Random, d: FleetDevice, t: float) -> Action:
        wt = self._pick_type(random.Random(d.device_id), "sensor")  # a sensor measures one thing
        quantity, unit, base = _SENSOR_QUANTITY.get(wt.code, ("value", "1", 1.0))
        at = state.origin + timedelta(seconds=t + d.clock_skew_s)
        msg = TelemetryV1(
            device_id=d.device_id,
            sent_at=at,
            readings=[
                Reading(
                    quantity=quantity,
                    value=round(base * rng.uniform(0.8, 1.2), 3),
                    unit=unit,
                    observed_at=at,
                )
            ],
        )
        return state.action(
            t,
            d.device_id,
            "publish",
            self.topics.telemetry(d.device_id),
            msg.to_json(),
            0,
            label="telemetry",
        )

    def _connect(self, state: _PlanState, d: FleetDevice, t: float) -> Action:
        status = StatusV1(
            device_id=d.device_id,
            state=DeviceState.ONLINE,
            at=state.origin + timedelta(seconds=t + d.clock_skew_s),
            kind="camera" if d.kind is DeviceKind.CAMERA else "sensor",
            health=Health(
                uptime_s=round(t, 1),
                version="sim-1",
                outbox_depth=len(state.backlog.get(d.device_id, [])),
            ),
        )
        # One action: connect, then publish this retained status (the runner does both).
        return state.action(
            t,
            d.device_id,
            "connect",
            self.topics.status(d.device_id),
            status.to_json(),
            retain=True,
            label="status",
        )

    def _pick_type(self, rng: random.Random, source: str) -> WarningType:
        types = self._types[source]
        return rng.choices(types, weights=[TYPE_WEIGHTS.get(t.code, 1.0) for t in types])[0]


def _dist2(a: FleetDevice, b: FleetDevice) -> float:
    return (a.lat - b.lat) ** 2 + ((a.lon - b.lon) * math.cos(math.radians(a.lat))) ** 2


@dataclass(slots=True)
class _PlanState:
    origin: datetime
    devices: dict[str, FleetDevice]
    alerts: int = 0
    bad: int = 0
    incidents: int = 0
    order: int = 0
    seqs: dict[str, int] = field(default_factory=dict)
    offline: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    reconnects: list[tuple[float, str]] = field(default_factory=list)
    backlog: dict[str, list[Action]] = field(default_factory=dict)

    def next_seq(self, device_id: str) -> int:
        self.seqs[device_id] = self.seqs.get(device_id, 0) + 1
        return self.seqs[device_id]

    def is_offline(self, device_id: str, t: float) -> bool:
        return any(t0 <= t < t1 for t0, t1 in self.offline.get(device_id, ()))

    def action(
        self,
        t: float,
        device_id: str,
        kind: Literal["connect", "publish", "disconnect"],
        topic: str = "",
        payload: bytes = b"",
        qos: int = 1,
        *,
        retain: bool = False,
        label: str = "",
    ) -> Action:
        self.order += 1
        return Action(t, self.order, device_id, kind, topic, payload, qos, retain, label)


# ----------------------------------------------------------------------------- running


@dataclass(slots=True)
class FleetSummary:
    """What a run sent and what came back."""

    sent: Counter[str] = field(default_factory=Counter)
    feedback: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    stopped_early: bool = False

    @property
    def alerts_sent(self) -> int:
        return sum(n for k, n in self.sent.items() if k.startswith(("alert", "bad")))

    def table(self) -> Table:
        t = Table(title="fleet run", show_header=True)
        t.add_column("what")
        t.add_column("count", justify="right")
        for k, n in sorted(self.sent.items()):
            t.add_row(f"sent {k}", str(n))
        for k, n in sorted(self.feedback.items()):
            t.add_row(f"feedback {k}", str(n))
        t.add_row("link losses (Last Will)", str(self.disconnects))
        t.add_row("reconnects", str(self.reconnects))
        t.add_row("elapsed", f"{self.elapsed_s:.1f} s")
        return t


class Fleet:
    """Plays a ``FleetPlan`` against a real broker, one MQTT session per device.

    ``run(stop_event)`` returns when the plan ends or ``stop_event`` is set; it can run in a
    background thread. ``on_feedback`` sees every feedback message; ``summary.feedback`` counts
    them by outcome.
    """

    def __init__(
        self,
        config: FleetConfig,
        provisioner: Provisioner,
        *,
        plan: FleetPlan | None = None,
        on_feedback: FeedbackHook | None = None,
        console: Console | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.provisioner = provisioner
        self.plan = plan or FleetPlan(config, topics=provisioner.topics)
        self.on_feedback = on_feedback
        self.console = console or Console(stderr=True)
        self.progress = progress
        self.summary = FleetSummary()
        self._lock = threading.Lock()
        self._sims: dict[str, SimDevice] = {}

    def _feedback(self, device_id: str, fb: FeedbackV1) -> None:
        with self._lock:
            self.summary.feedback[fb.outcome.value] += 1
        if self.on_feedback is not None:
            self.on_feedback(device_id, fb)

    def origin(self) -> datetime:
        """The simulated clock's origin for a live run: observed_at never runs ahead of now."""
        c = self.config
        now = datetime.now(UTC).replace(microsecond=0)
        if c.time_scale <= 1 or c.duration_s is None:
            return now
        return now - timedelta(seconds=c.duration_s * (1 - 1 / c.time_scale))

    def run(self, stop_event: threading.Event | None = None) -> FleetSummary:
        stop = stop_event or threading.Event()
        c = self.config
        specs = [DeviceSpec(d.device_id, d.kind, d.lat, d.lon) for d in self.plan.devices]
        creds = self.provisioner.provision(specs)
        self._sims = {d: SimDevice(creds[d], on_feedback=self._feedback) for d in creds}
        origin = self.origin()
        started = time.monotonic()
        total = c.count or (int(c.rate * c.duration_s) if c.duration_s else None)
        bar = Progress(
            TextColumn("[bold]fleet"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("alerts · {task.fields[feedback]} feedback"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.progress,
        )
        try:
            with bar:
                task = bar.add_task("alerts", total=total, feedback=0)
                for action in self.plan.actions(origin):
                    due = started + action.t / c.time_scale
                    while (left := due - time.monotonic()) > 0:
                        if stop.wait(min(left, 0.5)):
                            break
                    if stop.is_set():
                        self.summary.stopped_early = True
                        break
                    self._do(action)
                    if action.kind == "publish" and action.label not in ("telemetry", "status"):
                        bar.update(
                            task,
                            completed=self.summary.alerts_sent,
                            feedback=sum(self.summary.feedback.values()),
                        )
            # Give the last feedback a moment to arrive before the sessions close.
            stop.wait(min(2.0, 0.5 + self.summary.alerts_sent / 2000))
        finally:
            for sim in self._sims.values():
                sim.close(graceful=True)
        self.summary.elapsed_s = time.monotonic() - started
        return self.summary

    def _do(self, action: Action) -> None:
        sim = self._sims[action.device_id]
        try:
            if action.kind == "connect":
                if action.t > 0:
                    self.summary.reconnects += 1
                sim.connect(announce=False)
                sim.publish(action.topic, action.payload, qos=1, retain=True, wait=False)
                self.summary.sent["status"] += 1
            elif action.kind == "disconnect":
                self.summary.disconnects += 1
                sim.close(graceful=False)
            else:
                sim.publish(action.topic, action.payload, qos=action.qos, wait=False)
                self.summary.sent[_summary_key(action.label)] += 1
        except DeviceError as exc:
            log.warning("fleet: %s", exc)

    def print_summary(self) -> None:
        self.console.print(self.summary.table())


def devices_from_registry(path: Path, grids: GridIndex | None = None) -> list[FleetDevice]:
    """Cameras and sensors of a device registry that have a position (hubs are skipped)."""
    grids = grids or GridIndex.from_geojson(default_grid_file())
    registry = DeviceRegistry.load(path)
    out = []
    for d in registry.devices:
        if d.location is None or d.kind is DeviceKind.HUB:
            continue
        grid = grids.locate(d.location.lat, d.location.lon)
        out.append(
            FleetDevice(
                d.device_id,
                d.kind,
                d.location.lat,
                d.location.lon,
                d.grid_code or (grid.code if grid else None),
                0.0,
            )
        )
    if not out:
        raise SimulatorError(f"{path}: no camera or sensor with a location")
    return out


def _summary_key(label: str) -> str:
    head = label.split(":", 1)[0]
    if head in ("telemetry", "bad"):
        return label if head == "bad" else head
    if head == "out_of_area":
        return "alert out_of_area"
    if head == "incident":
        return "alert incident"
    return "alert"
