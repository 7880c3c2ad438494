"""Semantic dedup: which open event, if any, an alert joins.

The pool's single writer keeps every open event of the recent past in memory, hashed by type
and by a metric grid whose cells are as large as the type's merge radius, so that finding the
candidates of an alert is a few dictionary look-ups instead of SQL per alert. The index is a
cache of the pool, never its master: it is loaded from the pool at start, changed only after a
batch has committed, and told at each batch start (under the write lock) which events other
connections closed or moved along their lifecycle. Alerts older than what the index holds fall
back to SQL (``horizon``).

Cells are squares of the merge radius in an equirectangular projection about a reference
latitude (the pool's area). East-west, a metre at latitude φ is cos(φ_ref)/cos(φ) projected
metres, so a search spans as many cells as that stretch needs: no candidate within the radius is
ever missed, whatever the reference; the final test is the haversine distance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from contract import Severity

EARTH_RADIUS_M = 6_371_008.8
# metres of great circle per degree of latitude difference (a lower bound of any distance)
METRES_PER_DEGREE_LAT = EARTH_RADIUS_M * math.pi / 180


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


@dataclass(slots=True)
class EventState:
    """What the writer knows of one event; mirrors its row in ``events``."""

    id: int
    type: str
    status: str
    severity: Severity
    department: str
    grid_code: str
    grid_path: str
    lat: float
    lon: float
    address: str
    description: str
    first: float
    last: float
    registered_at: float
    deadline_at: float
    alert_count: int
    devices: dict[str, int]  # device_id → alerts, in order of first appearance
    snapshot_sha256: str | None
    snapshot_score: float | None
    recurrence_of: int | None
    closed_at: float | None = None

    def copy(self) -> EventState:
        # Spelled out: a batch copies every event it merges into, and building the clone from
        # its fields by name (getattr over the slots) cost five times as much.
        return EventState(
            self.id,
            self.type,
            self.status,
            self.severity,
            self.department,
            self.grid_code,
            self.grid_path,
            self.lat,
            self.lon,
            self.address,
            self.description,
            self.first,
            self.last,
            self.registered_at,
            self.deadline_at,
            self.alert_count,
            dict(self.devices),
            self.snapshot_sha256,
            self.snapshot_score,
            self.recurrence_of,
            self.closed_at,
        )


@dataclass(slots=True)
class _TypeCells:
    cell_m: float
    cells: dict[tuple[int, int], list[int]] = field(default_factory=dict)


class SpatialHash:
    """Event ids by type and metric cell."""

    def __init__(self, ref_lat: float, radius_m: dict[str, float]) -> None:
        self._cos = math.cos(math.radians(ref_lat))
        self._types = {t: _TypeCells(r) for t, r in radius_m.items()}

    def _cell(self, t: _TypeCells, lat: float, lon: float) -> tuple[int, int]:
        y = math.radians(lat) * EARTH_RADIUS_M
        x = math.radians(lon) * EARTH_RADIUS_M * self._cos
        return math.floor(x / t.cell_m), math.floor(y / t.cell_m)

    def add(self, type_: str, lat: float, lon: float, event_id: int) -> None:
        t = self._types[type_]
        t.cells.setdefault(self._cell(t, lat, lon), []).append(event_id)

    def remove(self, type_: str, lat: float, lon: float, event_id: int) -> None:
        t = self._types[type_]
        key = self._cell(t, lat, lon)
        ids = t.cells.get(key)
        if ids and event_id in ids:
            ids.remove(event_id)
            if not ids:
                del t.cells[key]

    def near(self, type_: str, lat: float, lon: float) -> list[int]:
        """The ids in the cells a circle of the type's radius about the point can touch (a
        list, not a generator: this runs once or twice per alert, and resuming a generator
        per id cost more than the look-ups)."""
        t = self._types.get(type_)
        if t is None or not t.cells:
            return []
        # Exactly the columns and rows the circle's box reaches (two or three of each), with a
        # margin of 1 % for the cap's curvature and rounding; the cell is the radius.
        cell = t.cell_m
        y = math.radians(lat) * EARTH_RADIUS_M
        x = math.radians(lon) * EARTH_RADIUS_M * self._cos
        ry = cell * 1.01
        rx = ry * self._cos / max(math.cos(math.radians(lat)), 1e-6)
        y0, y1 = math.floor((y - ry) / cell), math.floor((y + ry) / cell)
        get = t.cells.get
        out: list[int] = []
        for cx in range(math.floor((x - rx) / cell), math.floor((x + rx) / cell) + 1):
            for cy in range(y0, y1 + 1):
                ids = get((cx, cy))
                if ids:
                    out.extend(ids)
        return out


class DedupIndex:
    """Open events (and recently closed ones, for recurrence links) of the recent past."""

    def __init__(
        self, ref_lat: float, radius_m: dict[str, float], window_s: dict[str, float]
    ) -> None:
        self.radius_m = radius_m
        self.window_s = window_s
        self.ref_lat = ref_lat
        self.open = SpatialHash(ref_lat, radius_m)
        self.closed = SpatialHash(ref_lat, radius_m)
        self.events: dict[int, EventState] = {}
        # An alert observed before horizon[type] + window may belong to an event we no longer
        # hold: those alerts ask SQL instead.
        self.horizon: dict[str, float] = dict.fromkeys(radius_m, math.inf)

    def new_hash(self) -> SpatialHash:
        return SpatialHash(self.ref_lat, self.radius_m)

    def load(self, states: Iterable[EventState], since: float) -> None:
        """Take the events whose span (or closing) reaches past ``since - window``."""
        for state in states:
            self.put(state)
        for t, window in self.window_s.items():
            self.horizon[t] = since - window

    def put(self, state: EventState) -> None:
        old = self.events.get(state.id)
        if old is not None and (old.status == "closed") != (state.status == "closed"):
            (self.closed if old.status == "closed" else self.open).remove(
                old.type, old.lat, old.lon, old.id
            )
            old = None
        self.events[state.id] = state
        if old is None:
            (self.closed if state.status == "closed" else self.open).add(
                state.type, state.lat, state.lon, state.id
            )

    def covers(self, type_: str, observed_at: float) -> bool:
        """Whether every event this alert could join is in memory."""
        return observed_at - self.window_s[type_] >= self.horizon[type_]

    def candidates(self, type_: str, lat: float, lon: float, *, closed: bool = False) -> list[int]:
        return (self.closed if closed else self.open).near(type_, lat, lon)

    def evict(self, now: float, keep_s: float) -> int:
        """Forget events whose span ended long enough ago; returns how many."""
        gone = [
            s
            for s in self.events.values()
            if (s.closed_at if s.status == "closed" and s.closed_at else s.last)
            < now - keep_s - self.window_s[s.type]
        ]
        for s in gone:
            (self.closed if s.status == "closed" else self.open).remove(s.type, s.lat, s.lon, s.id)
            del self.events[s.id]
        for t, window in self.window_s.items():
            self.horizon[t] = max(self.horizon[t], now - keep_s - window)
        return len(gone)
