"""Warning rules: pure functions of (tracks or readings, time) → alert intents.

No I/O here. A rule keeps only the state it needs to measure dwell, duration and cooldown; time
always comes in as an argument (seconds since the epoch), so tests replay any timeline.

Zones are polygons in pixel coordinates of the camera image. An object stands where its box
touches the ground: the bottom-centre point of the box.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

from contract import DetectedObject, SensorReading, Severity, default_catalogue

logger = logging.getLogger(__name__)

Point = tuple[float, float]
Polygon = Sequence[Point]
CooldownScope = Literal["object", "zone"]

VEHICLE_CLASSES: frozenset[str] = frozenset({"car", "truck", "bus", "motorcycle"})
TWO_WHEELER_CLASSES: frozenset[str] = frozenset({"bicycle", "motorcycle"})
# Forget an object's zone entry when it has not been seen for this long: the tracker has lost
# it, and a new track id will start a new dwell.
_FORGET_AFTER_S = 10.0


class TrackLike(Protocol):
    """What the rules need of a confirmed track (edge.tracker.Track satisfies it)."""

    @property
    def track_id(self) -> int: ...
    @property
    def cls(self) -> str: ...
    @property
    def box(self) -> tuple[float, float, float, float]: ...
    @property
    def score(self) -> float: ...


@dataclass(frozen=True, slots=True)
class AlertIntent:
    """What a rule decided; the agent turns it into an AlertV1 (id, seq, location, snapshot)."""

    type: str
    severity: Severity
    confidence: float
    rule: str
    description: str
    zone: str | None = None
    dwell_s: float | None = None
    objects: tuple[DetectedObject, ...] = ()
    reading: SensorReading | None = None
    # Ground-contact pixel of the object that triggered the rule, for the homography.
    anchor_px: Point | None = None


def ground_point(box: tuple[float, float, float, float]) -> Point:
    """Bottom-centre of an x1, y1, x2, y2 box: where the object touches the ground."""
    x1, _y1, x2, y2 = box
    return ((x1 + x2) / 2.0, max(_y1, y2))


def tracks_in_zone(
    tracks: Sequence[TrackLike],
    classes: frozenset[str],
    min_score: float,
    polygon: Polygon,
) -> list[TrackLike]:
    """Tracks of the given classes whose ground point (bottom centre) lies in the polygon."""
    return [
        t
        for t in tracks
        if t.cls in classes
        and t.score >= min_score
        and point_in_polygon(ground_point(t.box), polygon)
    ]


def point_in_polygon(point: Point, polygon: Polygon) -> bool:
    """Even-odd ray casting; points exactly on an edge may fall either way."""
    x, y = point
    inside = False
    n = len(polygon)
    j = n - 1
    for i in range(n):
        xi, yi = polygon[i]
        xj, yj = polygon[j]
        if (yi > y) != (yj > y):
            x_cross = xi + (y - yi) * (xj - xi) / (yj - yi)
            if x < x_cross:
                inside = not inside
        j = i
    return inside


def default_severity(type_code: str) -> Severity:
    wt = default_catalogue().get(type_code)
    if wt is None:
        raise ValueError(f"warning type {type_code!r} is not in the catalogue")
    return wt.severity


def _as_object(track: TrackLike) -> DetectedObject:
    x1, y1, x2, y2 = track.box
    return DetectedObject(
        cls=track.cls,
        score=round(min(max(track.score, 0.0), 1.0), 4),
        box=(round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)),
        track_id=track.track_id,
    )


class Cooldown:
    """Remembers when each key last fired; a key may fire again only after ``period_s``."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._last: dict[object, float] = {}

    def ready(self, key: object, now: float) -> bool:
        last = self._last.get(key)
        return last is None or now - last >= self.period_s

    def fire(self, key: object, now: float) -> None:
        self._last[key] = now
        # Keep the map small: entries older than the period no longer block anything.
        if len(self._last) > 4096:
            self._last = {k: t for k, t in self._last.items() if now - t < self.period_s}


class CameraRule(Protocol):
    name: str

    def evaluate(self, tracks: Sequence[TrackLike], now: float) -> list[AlertIntent]: ...


class SensorRule(Protocol):
    name: str
    sensor: str

    def evaluate(self, reading: SensorReading, now: float) -> list[AlertIntent]: ...


@dataclass
class ZoneDwellRule:
    """An object of ``classes`` standing in ``zone`` for at least ``min_dwell_s`` seconds.

    Serves fire lanes (vehicles), lifts (two-wheelers) and restricted zones (people, optionally
    only within ``active`` hours of local time).
    """

    name: str
    type_code: str
    zone_name: str
    polygon: Polygon
    classes: frozenset[str]
    min_dwell_s: float
    cooldown_s: float
    cooldown_scope: CooldownScope = "object"
    min_score: float = 0.0
    severity: Severity | None = None
    active: ActiveHours | None = None
    description: str = ""
    _entered: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _seen: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _cooldown: Cooldown = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cooldown = Cooldown(self.cooldown_s)
        if self.severity is None:
            self.severity = default_severity(self.type_code)

    def evaluate(self, tracks: Sequence[TrackLike], now: float) -> list[AlertIntent]:
        in_zone = tracks_in_zone(tracks, self.classes, self.min_score, self.polygon)
        for t in in_zone:
            self._entered.setdefault(t.track_id, now)
            self._seen[t.track_id] = now
        present = {t.track_id for t in in_zone}
        for tid in [tid for tid in self._entered if tid not in present]:
            # Left the zone (or briefly unseen): keep the entry for a moment so that one missed
            # detection does not restart the dwell, then forget it.
            if now - self._seen[tid] > _FORGET_AFTER_S:
                del self._entered[tid]
                del self._seen[tid]
        if self.active is not None and not self.active.contains(now):
            return []
        due = [t for t in in_zone if now - self._entered[t.track_id] >= self.min_dwell_s]
        if not due:
            return []
        if self.cooldown_scope == "zone":
            if not self._cooldown.ready(self.zone_name, now):
                return []
            self._cooldown.fire(self.zone_name, now)
            lead = max(due, key=lambda t: now - self._entered[t.track_id])
            return [self._intent(lead, due, now)]
        out: list[AlertIntent] = []
        for t in due:
            if self._cooldown.ready(t.track_id, now):
                self._cooldown.fire(t.track_id, now)
                out.append(self._intent(t, [t], now))
        return out

    def _intent(self, lead: TrackLike, objs: Sequence[TrackLike], now: float) -> AlertIntent:
        dwell = now - self._entered[lead.track_id]
        assert self.severity is not None
        text = self.description or f"{lead.cls} in zone {self.zone_name}"
        return AlertIntent(
            type=self.type_code,
            severity=self.severity,
            confidence=min(max(lead.score, 0.0), 1.0),
            rule=self.name,
            description=f"{text} for {dwell:.0f} s",
            zone=self.zone_name,
            dwell_s=round(dwell, 2),
            objects=tuple(_as_object(t) for t in objs),
            anchor_px=ground_point(lead.box),
        )


@dataclass
class CrowdRule:
    """At least ``min_count`` people in ``zone`` for ``min_duration_s`` seconds."""

    name: str
    zone_name: str
    polygon: Polygon
    min_count: int
    min_duration_s: float
    cooldown_s: float
    classes: frozenset[str] = frozenset({"person"})
    min_score: float = 0.0
    severity: Severity | None = None
    description: str = ""
    type_code: str = "crowd_gathering"
    _since: float | None = field(default=None, init=False, repr=False)
    _cooldown: Cooldown = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cooldown = Cooldown(self.cooldown_s)
        if self.severity is None:
            self.severity = default_severity(self.type_code)

    def evaluate(self, tracks: Sequence[TrackLike], now: float) -> list[AlertIntent]:
        people = tracks_in_zone(tracks, self.classes, self.min_score, self.polygon)
        if len(people) < self.min_count:
            self._since = None
            return []
        if self._since is None:
            self._since = now
        lasted = now - self._since
        if lasted < self.min_duration_s or not self._cooldown.ready(self.zone_name, now):
            return []
        self._cooldown.fire(self.zone_name, now)
        assert self.severity is not None
        xs = [ground_point(t.box) for t in people]
        centre = (sum(p[0] for p in xs) / len(xs), sum(p[1] for p in xs) / len(xs))
        text = self.description or f"{len(people)} people gathered in zone {self.zone_name}"
        return [
            AlertIntent(
                type=self.type_code,
                severity=self.severity,
                confidence=sum(t.score for t in people) / len(people),
                rule=self.name,
                description=f"{text} for {lasted:.0f} s",
                zone=self.zone_name,
                dwell_s=round(lasted, 2),
                objects=tuple(_as_object(t) for t in people),
                anchor_px=centre,
            )
        ]


@dataclass(frozen=True)
class ActiveHours:
    """A daily window of local time; ``start > end`` crosses midnight (22:00–06:00)."""

    start: time
    end: time
    tz: str = "Asia/Shanghai"

    def contains(self, now: float) -> bool:
        local = datetime.fromtimestamp(now, ZoneInfo(self.tz)).time()
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


@dataclass
class ThresholdRule:
    """A sensor quantity over a limit: hysteresis, debounce and cooldown.

    The rule arms when the value has stayed at or above ``on_at`` for ``hold_s`` seconds, raises
    one alert, and re-arms only after the value has dropped below ``off_below`` (hysteresis, so
    a value hovering at the limit does not flap). While still over the limit it raises again
    every ``repeat_s`` seconds if that is set. ``cooldown_s`` keeps a new episode that starts
    soon after the last alert quiet.
    """

    name: str
    type_code: str
    sensor: str
    quantity: str
    unit: str
    on_at: float
    off_below: float
    hold_s: float = 0.0
    cooldown_s: float = 0.0
    repeat_s: float | None = None
    severity: Severity | None = None
    description: str = ""
    confidence: float | None = None  # fixed confidence (e.g. a certified alarm contact)
    _over_since: float | None = field(default=None, init=False, repr=False)
    _active: bool = field(default=False, init=False, repr=False)
    _last_alert: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.off_below > self.on_at:
            raise ValueError(f"{self.name}: off_below {self.off_below} > on_at {self.on_at}")
        if self.severity is None:
            self.severity = default_severity(self.type_code)

    @property
    def active(self) -> bool:
        return self._active

    def evaluate(self, reading: SensorReading, now: float) -> list[AlertIntent]:
        if reading.quantity != self.quantity:
            return []
        value = reading.value
        if value < self.off_below:
            # Hysteresis: only a drop below the lower limit ends an episode.
            self._over_since = None
            self._active = False
            return []
        if value < self.on_at:
            # Between the two limits: an episode in progress goes on; none starts.
            if not self._active:
                self._over_since = None
            return []
        if self._over_since is None:
            self._over_since = now
        if now - self._over_since < self.hold_s:
            return []
        if self._active:
            if self.repeat_s is None or self._last_alert is None:
                return []
            if now - self._last_alert < self.repeat_s:
                return []
        elif self._last_alert is not None and now - self._last_alert < self.cooldown_s:
            self._active = True  # this episode stays quiet; it was announced moments ago
            return []
        self._active = True
        self._last_alert = now
        return [self._intent(value, now)]

    def _intent(self, value: float, now: float) -> AlertIntent:
        assert self.severity is not None
        held = now - (self._over_since if self._over_since is not None else now)
        text = self.description or f"{self.quantity} {value:g} {self.unit} ≥ {self.on_at:g}"
        if self.confidence is not None:
            confidence = self.confidence
        else:
            # Grows with how far the value is past the limit; a bare crossing is 0.6.
            span = abs(self.on_at) if self.on_at else 1.0
            confidence = min(1.0, 0.6 + 0.4 * max(0.0, value - self.on_at) / span)
        return AlertIntent(
            type=self.type_code,
            severity=self.severity,
            confidence=round(confidence, 3),
            rule=self.name,
            description=f"{text} for {held:.0f} s" if held >= 1 else text,
            dwell_s=round(held, 2),
            reading=SensorReading(
                quantity=self.quantity, value=value, unit=self.unit, threshold=self.on_at
            ),
        )


def evaluate_camera(
    rules: Iterable[CameraRule], tracks: Sequence[TrackLike], now: float
) -> list[AlertIntent]:
    out: list[AlertIntent] = []
    for rule in rules:
        out.extend(rule.evaluate(tracks, now))
    return out


def evaluate_sensor(
    rules_by_sensor: Mapping[str, Sequence[SensorRule]],
    sensor: str,
    reading: SensorReading,
    now: float,
) -> list[AlertIntent]:
    out: list[AlertIntent] = []
    for rule in rules_by_sensor.get(sensor, ()):
        out.extend(rule.evaluate(reading, now))
    return out
