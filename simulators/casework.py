"""Simulated community operators and departments working the gateway's cases through its API.

Each community of the grid file gets an operator account, each catalogue department an
account, and the county an approver. Every tick each account reads its inbox and takes the
steps whose time has come: the community verifies, whistles to the type's department (or
handles the matter itself), reviews feedback and sends some back; a department accepts (some
late), goes on site, hands in feedback; the community asks for an extension now and then and
the county approves it. When each step comes is drawn once per case and state from the seed,
measured on the case clock since the case last changed, so a run is repeatable in what it
decides, while the pace follows the case clock.

The case clock (``Settings.test_clock_file``) runs ``speed`` times faster than the wall clock
(:class:`ClockDriver`), so acceptance deadlines of 30 minutes pass in seconds and the handling
figures (处置率, 按期处置率, 一次性处置率, overdue) move while one watches.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from aggregator.clock import OffsetFileClock
from aggregator.grids import GridIndex
from contract import Catalogue
from simulators.desk import Account, Desk, StepRefused
from simulators.scenario import OperatorSide

__all__ = ["CaseWorkers", "CaseworkConfig", "ClockDriver"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CaseworkConfig:
    seed: int = 7
    late_share: float = 0.2  # department steps (acceptance, arrival, feedback) taken late
    send_back_share: float = 0.25  # first feedbacks the community sends back
    self_handle_share: float = 0.2  # assessed cases the community handles itself
    not_ours_share: float = 0.05  # verified as not this community's
    on_site_share: float = 0.3  # departments that take the matter on site
    extension_share: float = 0.1  # on-site cases the community asks an extension for
    steps_per_tick: int = 12  # per account: the API is shared with people watching it
    inbox_limit: int = 100
    interval_s: float = 1.0


# Delays on the case clock, in minutes, per (state, taken late?): (low, high).
_DELAYS: dict[tuple[str, bool], tuple[float, float]] = {
    ("registered", False): (1, 8),
    ("assessing", False): (2, 12),
    ("community_handling", False): (20, 100),
    ("community_handling", True): (130, 200),
    ("whistled", False): (4, 27),
    ("whistled", True): (34, 70),
    ("en_route", False): (12, 55),
    ("en_route", True): (65, 110),
    ("dept_handling", False): (30, 360),
    ("dept_handling", True): (25 * 60, 30 * 60),
    ("on_site", False): (30, 240),
    ("rehandling", False): (30, 300),
    ("rehandling", True): (25 * 60, 28 * 60),
    ("reviewing", False): (5, 30),
    ("extension", False): (10, 60),
}


class ClockDriver:
    """Moves the case clock ``speed`` times as fast as the wall clock (speed 1: not at all)."""

    def __init__(self, clock: OffsetFileClock, speed: float) -> None:
        self.clock = clock
        self.speed = speed
        self._last = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        if self.speed > 1 and elapsed > 0:
            self.clock.advance(elapsed * (self.speed - 1))


@dataclass(slots=True)
class _Stats:
    steps: Counter[str] = field(default_factory=Counter)
    late: int = 0
    sent_back: int = 0
    refused: int = 0


class CaseWorkers:
    """The accounts and their loop; ``run(stop)`` until the event is set (or ``tick()``)."""

    def __init__(
        self,
        side: OperatorSide,
        catalogue: Catalogue,
        grids: GridIndex,
        config: CaseworkConfig | None = None,
        *,
        speed: float = 60.0,
        prefix: str = "sim",
    ) -> None:
        self.config = config or CaseworkConfig()
        self.catalogue = catalogue
        self.driver = ClockDriver(side.clock, speed)
        self.stats = _Stats()
        self.desks: dict[str, Desk] = {}
        self.communities: dict[str, str] = {}  # community code → desk key
        self.departments: dict[str, str] = {}  # department code → desk key
        county = grids.communities()[0].code[:6] if grids.communities() else ""
        accounts: list[tuple[str, str, str, str | None]] = [
            (f"{prefix}-county", "county", county, None)
        ]
        for c in grids.communities():
            accounts.append((f"{prefix}-c{c.code}", "community", c.code, None))
            self.communities[c.code] = f"{prefix}-c{c.code}"
        for d in sorted(catalogue.departments):
            accounts.append((f"{prefix}-{d}", "department", "", d))
            self.departments[d] = f"{prefix}-{d}"
        for username, level, scope, dept in accounts:
            account: Account = side.add_operator(username, level, scope_code=scope, department=dept)
            self.desks[username] = side.desk(account)
        self.county = f"{prefix}-county"
        # what the inbox does not show: cases already sent back once, extensions asked for
        self._sent_back: set[int] = set()
        self._extended: set[int] = set()

    # -- decisions ---------------------------------------------------------------------------
    def _draw(self, *key: object) -> float:
        """A number in [0, 1) fixed by the seed and the key."""
        digest = hashlib.sha256(repr((self.config.seed, *key)).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _delay(self, case: dict[str, Any], state: str, late: bool) -> timedelta:
        low, high = _DELAYS.get((state, late), _DELAYS.get((state, False), (5, 30)))
        r = self._draw(case["event_id"], state, case.get("version"), "delay")
        return timedelta(minutes=low + (high - low) * r)

    def _late(self, case: dict[str, Any], state: str) -> bool:
        return self._draw(case["event_id"], state, "late") < self.config.late_share

    def _choose(self, case: dict[str, Any], key: str, share: float) -> bool:
        return self._draw(case["event_id"], key) < share

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # a demo keeps going; the log says what went wrong
                log.exception("case workers' tick failed")
            stop.wait(max(0.0, self.config.interval_s - (time.monotonic() - started)))

    def tick(self) -> int:
        """One look by every account; returns the steps taken."""
        self.driver.tick()
        taken = 0
        for key, desk in self.desks.items():
            try:
                page = desk.inbox_page(limit=self.config.inbox_limit)
            except StepRefused as exc:
                log.warning("%s cannot read its inbox: %s", key, exc)
                continue
            now = _parse(page["as_of"]) if page.get("as_of") else None
            done = 0
            for case in page["items"]:
                if done >= self.config.steps_per_tick:
                    break
                if now is not None and self._act(desk, case, now):
                    done += 1
            taken += done
        return taken

    def _act(self, desk: Desk, case: dict[str, Any], now: datetime) -> bool:
        actions: list[str] = case["allowed_actions"]
        if not actions:
            return False
        state: str = case["state"]
        since = now - _parse(case["updated_at"])
        if desk.account.level == "county":
            if "approve_extension" in actions and since >= self._delay(case, "extension", False):
                return self._step(desk, case, "approve_extension", reason="approved")
            return False
        late = state in ("whistled", "en_route", "dept_handling", "rehandling") and self._late(
            case, state
        )
        if state == "community_handling" and self._late(case, state):
            late = True
        if since < self._delay(case, state, late):
            return False
        eid = case["event_id"]
        if state == "registered":
            if self._choose(case, "not_ours", self.config.not_ours_share):
                return self._step(desk, case, "not_ours", reason="another community's matter")
            return self._step(desk, case, "verify")
        if state == "assessing":
            if self._choose(case, "self", self.config.self_handle_share):
                return self._step(desk, case, "self_handle")
            wt = self.catalogue.types.get(case["type"])
            dept = wt.department if wt is not None else sorted(self.catalogue.departments)[0]
            return self._step(desk, case, "whistle", lead_department=dept)
        if state == "whistled":
            on_site = self._choose(case, "on_site", self.config.on_site_share)
            return self._step(
                desk, case, "accept_on_site" if on_site else "accept_off_site", late=late
            )
        if state == "en_route":
            return self._step(desk, case, "arrive", late=late)
        if (
            state == "on_site"
            and "apply_extension" in actions
            and eid not in self._extended
            and self._choose(case, "extend", self.config.extension_share)
        ):
            self._extended.add(eid)
            until = now + timedelta(days=10)
            return self._step(desk, case, "apply_extension", reason="parts on order", until=until)
        if "handle" in actions:
            return self._step(
                desk, case, "handle", summary=f"handled (case {eid}, version {case['version']})"
            )
        if state == "reviewing":
            if eid not in self._sent_back and self._choose(
                case, "send_back", self.config.send_back_share
            ):
                self._sent_back.add(eid)
                self.stats.sent_back += 1
                return self._step(desk, case, "send_back", reason="not effective yet")
            return self._step(desk, case, "accept_feedback")
        return False

    def _step(
        self, desk: Desk, case: dict[str, Any], action: str, *, late: bool = False, **payload: Any
    ) -> bool:
        try:
            desk.step(case["event_id"], action, expected_version=int(case["version"]), **payload)
        except StepRefused as exc:
            # another look (or a person at the dashboard) moved the case first: next tick
            self.stats.refused += 1
            log.debug("%s: %s", desk.username, exc)
            return False
        self.stats.steps[action] += 1
        self.stats.late += int(late)
        return True

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.steps.items()))
        return (
            f"case steps: {steps or 'none'}; late on purpose {self.stats.late}, "
            f"sent back {self.stats.sent_back}, refused {self.stats.refused}"
        )

    def close(self) -> None:
        for desk in self.desks.values():
            desk.close()


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
