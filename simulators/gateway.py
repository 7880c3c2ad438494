"""``Gateway``: a test's handle on a running stack — provision devices, raise alerts, read the
pool, wait for conditions, run scenarios. The pytest plugin hands one to each test."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from aggregator.broker.registry import DeviceKind
from aggregator.grids import GridIndex
from contract import AlertV1, Catalogue, EventSummary, FeedbackV1, Severity, new_alert_id, utcnow
from simulators.desk import Desk
from simulators.device import SimDevice
from simulators.errors import ScenarioError
from simulators.messages import BadKind, bad_payload, make_alert
from simulators.poolview import DeadLetter, PoolView
from simulators.scenario import Scenario, ScenarioResult, ScenarioRunner, load_scenario
from simulators.stack import DeviceSpec, GatewayStack

__all__ = ["Gateway", "GatewayDevice"]

T = TypeVar("T")


class GatewayDevice:
    """A provisioned, connected device. ``alert()`` publishes and returns the AlertV1 sent."""

    def __init__(self, gateway: Gateway, name: str, sim: SimDevice, lat: float, lon: float) -> None:
        self.gateway = gateway
        self.name = name
        self.sim = sim
        self.lat = lat
        self.lon = lon
        self._seq = itertools.count(1)

    @property
    def device_id(self) -> str:
        return self.sim.device_id

    @property
    def feedback(self) -> list[FeedbackV1]:
        return list(self.sim.feedback)

    def alert(
        self,
        type: str,
        *,
        lat: float | None = None,
        lon: float | None = None,
        grid: str | None = None,
        observed_at: datetime | None = None,
        confidence: float = 0.85,
        severity: Severity | None = None,
        snapshot: bool = False,
        alert_id: str | None = None,
    ) -> AlertV1:
        wt = self.gateway.catalogue.types.get(type)
        if wt is None:
            raise ScenarioError(f"unknown warning type {type!r}")
        if grid is not None:
            lat, lon = self.gateway.centroid(grid)
        seq = next(self._seq)
        alert = make_alert(
            alert_id=alert_id or new_alert_id(self.device_id),
            device_id=self.device_id,
            seq=seq,
            wt=wt,
            observed_at=observed_at or self.gateway.observed_now(),
            lat=self.lat if lat is None else lat,
            lon=self.lon if lon is None else lon,
            confidence=confidence,
            snapshot=snapshot,
            variant=seq,
        )
        if severity is not None:
            alert = alert.model_copy(update={"severity": severity})
        self.sim.alert(alert.to_json())
        return alert

    def send_bad(self, kind: BadKind | str, type: str | None = None) -> None:
        """Publish an alert that is wrong in the way ``kind`` names."""
        wt = self.gateway.catalogue.types[type or next(iter(self.gateway.catalogue.types))]
        good = make_alert(
            alert_id=new_alert_id(self.device_id),
            device_id=self.device_id,
            seq=next(self._seq),
            wt=wt,
            observed_at=self.gateway.observed_now(),
            lat=self.lat,
            lon=self.lon,
        )
        self.sim.alert(
            bad_payload(
                BadKind(kind),
                good,
                now=utcnow(),
                max_payload_bytes=self.gateway.stack.options.max_payload_bytes,
            )
        )

    def wait_feedback(self, alert_id: str | None = None, timeout_s: float = 10.0) -> FeedbackV1:
        """The feedback for ``alert_id`` (or the next one); AssertionError if none in time."""
        seen = {id(f) for f in self.sim.feedback}
        fb = self.sim.wait_feedback(
            (lambda f: f.alert_id == alert_id)
            if alert_id is not None
            else (lambda f: id(f) not in seen),
            timeout_s,
        )
        if fb is None:
            raise AssertionError(
                f"{self.name}: no feedback for {alert_id or 'the next alert'} within "
                f"{timeout_s:.0f} s; received: {[f.outcome.value for f in self.sim.feedback]}"
            )
        return fb

    def go_offline(self) -> None:
        """Drop the link without a goodbye: the broker publishes the Last Will."""
        self.sim.close(graceful=False)

    def go_online(self) -> None:
        self.sim.connect()


class Gateway:
    """What a test sees of one stack. Device names are scoped by a per-test tag, and pool
    queries default to events this test's devices took part in.

    Isolation: tests that share a stack share its pool, and the pool merges alerts of one type
    near each other in time into one event whoever sent them. So each ``Gateway`` takes its own
    clock origin from the stack (``isolate``, the default): what its devices report as observed
    lies ``origin_shift_s`` in the past, a slot of its own further back than every merge window
    of the others, and its scenarios are played from that origin too. Only ``observed_at``
    moves; alerts are sent, pooled and answered now. ``isolate=False`` shares the present
    (``origin_shift_s`` 0) with every other such gateway."""

    def __init__(
        self,
        stack: GatewayStack,
        *,
        tag: str | None = None,
        grids: GridIndex | None = None,
        isolate: bool = True,
    ) -> None:
        self.stack = stack
        self.tag = tag or uuid.uuid4().hex[:6]
        if stack.aggregator is None:
            raise ScenarioError("the stack is not started")
        self.origin_shift_s: float = stack.claim_origin() if isolate else 0.0
        self.catalogue: Catalogue = stack.aggregator.catalogue
        self.grids: GridIndex = grids or stack.aggregator.grids
        self.pool = PoolView(stack.pool_target, self.catalogue)
        self.devices: dict[str, GatewayDevice] = {}
        self.desks: dict[str, Desk] = {}
        self._runs = 0

    def observed_now(self) -> datetime:
        """Now on this gateway's clock origin: what a device of this test reports as now."""
        return utcnow() - timedelta(seconds=self.origin_shift_s)

    def centroid(self, grid_code: str) -> tuple[float, float]:
        grid = self.grids.get(grid_code)
        if grid is None:
            raise ScenarioError(f"unknown grid code {grid_code!r}")
        return grid.centroid

    def device(
        self,
        name: str,
        kind: str = "camera",
        *,
        lat: float | None = None,
        lon: float | None = None,
        grid: str | None = None,
    ) -> GatewayDevice:
        """Provision (once) and connect a device; its position defaults to the first grid's
        centroid. The broker knows it as ``<tag>-<name>``."""
        if name in self.devices:
            return self.devices[name]
        if grid is not None:
            lat, lon = self.centroid(grid)
        if lat is None or lon is None:
            lat, lon = self.grids.grids[0].centroid
        real = f"{self.tag}-{name}"
        creds = self.stack.provision([DeviceSpec(real, DeviceKind(kind), lat, lon)])[real]
        sim = SimDevice(creds)
        sim.connect()
        dev = GatewayDevice(self, name, sim, lat, lon)
        self.devices[name] = dev
        return dev

    def raise_alert(self, device: str | GatewayDevice, type: str, **kw: object) -> FeedbackV1:
        """Publish an alert from ``device`` and return the aggregator's feedback for it."""
        dev = self.devices[device] if isinstance(device, str) else device
        alert = dev.alert(type, **kw)  # type: ignore[arg-type]
        return dev.wait_feedback(alert.alert_id)

    def events(
        self,
        *,
        type: str | None = None,
        grid_prefix: str | None = None,
        device: str | None = None,
        mine: bool = True,
    ) -> list[EventSummary]:
        """Events in the pool; with ``mine`` only those this test's devices contributed to."""
        real = self.devices[device].device_id if device is not None else None
        found = self.pool.events(type=type, grid_prefix=grid_prefix, device_id=real)
        if not mine:
            return found
        ours = {d.device_id for d in self.devices.values()}
        return [e for e in found if ours & set(e.device_ids)]

    def dead_letters(self, *, reason: str | None = None) -> list[DeadLetter]:
        ours = {d.device_id for d in self.devices.values()}
        return [d for d in self.pool.dead_letters(reason=reason) if d.device_id in ours]

    def wait_for(
        self,
        probe: Callable[[], T],
        *,
        timeout_s: float = 10.0,
        interval_s: float = 0.05,
        what: str = "condition",
    ) -> T:
        """Poll ``probe`` until it returns something truthy; return that. AssertionError with
        the last value otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what} did not hold within {timeout_s:.0f} s; last: {value!r}"
                )
            time.sleep(interval_s)

    def run_scenario(
        self,
        scenario: Path | str | Scenario,
        *,
        check: bool = True,
        timeout_s: float | None = None,
        origin_shift_s: float = 0.0,
    ) -> ScenarioResult:
        """Play a scenario on this stack; with ``check`` a failure raises AssertionError
        carrying the per-expectation diff. A scenario played twice on one stack would merge
        into its first run's events: shift the second run's clock back past the type's merge
        window with ``origin_shift_s`` (added to this gateway's own origin)."""
        sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self._runs += 1
        runner = ScenarioRunner(
            self.stack,
            self.stack.pool_target,
            catalogue=self.catalogue,
            grids=self.grids,
            max_payload_bytes=self.stack.options.max_payload_bytes,
            operators=self.stack if self.stack.service is not None else None,
        )
        result = runner.run(
            sc,
            run_tag=f"{self.tag}s{self._runs}",
            timeout_s=timeout_s,
            origin_shift_s=self._origin_for(sc) + origin_shift_s,
        )
        if check and not result.ok:
            raise AssertionError(result.report())
        return result

    # -- operators and departments (a stack with StackOptions(api=True)) ----------------------
    def operator(
        self,
        name: str,
        level: str,
        *,
        scope: str = "",
        department: str | None = None,
    ) -> Desk:
        """An operator account logged in to the API (once per name; the account is
        ``<tag>-<name>``): ``desk.step(event_id, "whistle", lead_department="police")``."""
        if name not in self.desks:
            account = self.stack.add_operator(
                f"{self.tag}-{name}", level, scope_code=scope, department=department
            )
            self.desks[name] = self.stack.desk(account)
        return self.desks[name]

    def case(self, event_id: int) -> dict[str, Any]:
        """The case as the gateway holds it (the API's view for an administrator)."""
        return self.operator("observer", "admin").case(event_id)

    def advance_clock(self, seconds: float) -> float:
        """Move the gateway's case clock forward (deadlines, overdue); returns how far ahead
        of the system clock it now runs."""
        return self.stack.clock.advance(seconds)

    def _origin_for(self, sc: Scenario) -> float:
        """This gateway's clock origin, unless a device of the scenario runs ahead of true
        time: the aggregator judges "ahead" against its own clock, so such a scenario plays at
        the present (and shares it with other such runs)."""
        if any(d.clock_skew_s > 0 for d in sc.devices):
            return 0.0
        return self.origin_shift_s

    def close(self) -> None:
        for dev in self.devices.values():
            dev.sim.close(graceful=dev.sim.connected)
        self.devices.clear()
        for desk in self.desks.values():
            desk.close()
        self.desks.clear()
