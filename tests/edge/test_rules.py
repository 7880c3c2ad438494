"""Warning rules as tables: a timeline of tracks or readings in, the alerts that come out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time
from zoneinfo import ZoneInfo

import pytest

from contract import SensorReading, Severity, default_catalogue
from edge.rules import (
    ActiveHours,
    CrowdRule,
    ThresholdRule,
    ZoneDwellRule,
    ground_point,
    point_in_polygon,
)

SQUARE = [(100.0, 100.0), (300.0, 100.0), (300.0, 300.0), (100.0, 300.0)]
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()


@dataclass(frozen=True)
class T:
    """A confirmed track as the tracker hands it over (only what the rules read)."""

    track_id: int
    cls: str
    box: tuple[float, float, float, float]
    score: float = 0.9


def inside(tid: int, cls: str) -> T:
    # Box whose bottom-centre (200, 250) is inside SQUARE, while its top pokes out.
    return T(tid, cls, (180.0, 50.0, 220.0, 250.0))


def outside(tid: int, cls: str) -> T:
    return T(tid, cls, (500.0, 50.0, 540.0, 250.0))


@pytest.mark.parametrize(
    ("point", "expected"),
    [((200, 200), True), ((50, 200), False), ((299, 101), True), ((301, 200), False)],
)
def test_point_in_polygon(point: tuple[float, float], expected: bool) -> None:
    assert point_in_polygon(point, SQUARE) is expected


def test_ground_point_is_bottom_centre() -> None:
    assert ground_point((10, 20, 30, 80)) == (20, 80)


def fire_lane(**kw: object) -> ZoneDwellRule:
    args: dict[str, object] = {
        "name": "fire-lane",
        "type_code": "fire_lane_occupied",
        "zone_name": "lane",
        "polygon": SQUARE,
        "classes": frozenset({"car", "truck", "bus", "motorcycle"}),
        "min_dwell_s": 60,
        "cooldown_s": 600,
    }
    args.update(kw)
    return ZoneDwellRule(**args)  # type: ignore[arg-type]


# (timeline of (seconds after T0, tracks), seconds at which an alert is expected)
FIRE_LANE_CASES = [
    pytest.param([(t, [inside(1, "car")]) for t in range(0, 121, 5)], [60], id="parked-car-once"),
    pytest.param([(t, [inside(1, "person")]) for t in range(0, 121, 5)], [], id="person-ignored"),
    pytest.param([(t, [outside(1, "car")]) for t in range(0, 121, 5)], [], id="outside-lane"),
    pytest.param([(t, [inside(1, "car")]) for t in range(0, 50, 5)], [], id="leaves-before-dwell"),
    pytest.param(
        [(t, [inside(1, "truck")]) for t in range(0, 1300, 10)],
        [60, 660, 1260],
        id="cooldown-repeats",
    ),
    pytest.param(
        [(t, [inside(1, "car"), inside(2, "bus")]) for t in range(0, 70, 5)],
        [60, 60],
        id="two-vehicles-two-alerts",
    ),
    pytest.param(
        [(t, [inside(1, "car")]) for t in range(0, 30, 5)]
        + [(t, []) for t in range(30, 60, 5)]
        + [(t, [inside(1, "car")]) for t in range(60, 125, 5)],
        [120],
        id="dwell-restarts-after-leaving",
    ),
    pytest.param(
        [(t, [inside(1, "car")]) for t in range(0, 30, 5)]
        + [(32, [])]
        + [(t, [inside(1, "car")]) for t in range(35, 65, 5)],
        [60],
        id="one-missed-frame-keeps-dwell",
    ),
]


@pytest.mark.parametrize(("timeline", "expected_at"), FIRE_LANE_CASES)
def test_fire_lane(timeline: list[tuple[int, list[T]]], expected_at: list[int]) -> None:
    rule = fire_lane()
    fired: list[int] = []
    for t, tracks in timeline:
        for intent in rule.evaluate(tracks, T0 + t):
            assert intent.type == "fire_lane_occupied"
            assert intent.severity is Severity.HIGH
            assert intent.zone == "lane"
            assert intent.dwell_s is not None
            assert intent.dwell_s >= 60
            assert intent.objects
            assert intent.objects[0].track_id is not None
            fired.append(t)
    assert fired == expected_at


def test_fire_lane_zone_scope_and_min_score() -> None:
    rule = fire_lane(cooldown_scope="zone", min_score=0.5, min_dwell_s=0)
    weak = T(3, "car", (180.0, 50.0, 220.0, 250.0), score=0.3)
    assert rule.evaluate([weak], T0) == []
    out = rule.evaluate([inside(1, "car"), inside(2, "car")], T0 + 1)
    assert len(out) == 1
    assert {o.track_id for o in out[0].objects} == {1, 2}
    assert rule.evaluate([inside(1, "car"), inside(4, "car")], T0 + 2) == []


@pytest.mark.parametrize(
    ("cls", "expected"),
    [("bicycle", 1), ("motorcycle", 1), ("person", 0), ("car", 0)],
)
def test_ebike_in_lift(cls: str, expected: int) -> None:
    rule = ZoneDwellRule(
        name="lift",
        type_code="ebike_in_lift",
        zone_name="lift-car",
        polygon=SQUARE,
        classes=frozenset({"bicycle", "motorcycle"}),
        min_dwell_s=1,
        cooldown_s=300,
        cooldown_scope="zone",
    )
    fired = []
    for t in range(0, 10):
        fired += rule.evaluate([inside(7, cls)], T0 + t * 0.5)
    assert len(fired) == expected
    if expected:
        assert fired[0].type == "ebike_in_lift"
        assert fired[0].objects[0].cls == cls


@pytest.mark.parametrize(
    ("people", "seconds", "expected"),
    [
        (5, 40, 1),  # 5 ≥ 4 for 30 s
        (3, 100, 0),  # never enough
        (4, 20, 0),  # enough people, not long enough
        (6, 400, 2),  # cooldown 300 s: again at 330
    ],
)
def test_crowd_gathering(people: int, seconds: int, expected: int) -> None:
    rule = CrowdRule(
        name="crowd",
        zone_name="square",
        polygon=SQUARE,
        min_count=4,
        min_duration_s=30,
        cooldown_s=300,
    )
    fired = []
    for t in range(0, seconds + 1, 5):
        fired += rule.evaluate([inside(i, "person") for i in range(people)], T0 + t)
    assert len(fired) == expected
    for intent in fired:
        assert intent.type == "crowd_gathering"
        assert len(intent.objects) == people


def test_crowd_count_must_hold() -> None:
    rule = CrowdRule(
        name="crowd", zone_name="sq", polygon=SQUARE, min_count=3, min_duration_s=10, cooldown_s=60
    )
    crowd = [inside(i, "person") for i in range(3)]
    assert rule.evaluate(crowd, T0) == []
    assert rule.evaluate(crowd[:2], T0 + 5) == []  # the count dropped: the clock restarts
    assert rule.evaluate(crowd, T0 + 8) == []
    assert rule.evaluate(crowd, T0 + 15) == []
    assert len(rule.evaluate(crowd, T0 + 18)) == 1


def local(hh: int, mm: int) -> float:
    return datetime(2026, 11, 23, hh, mm, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp()


@pytest.mark.parametrize(
    ("start", "end", "at", "active"),
    [
        (time(22, 0), time(6, 0), (23, 30), True),  # crosses midnight
        (time(22, 0), time(6, 0), (2, 0), True),
        (time(22, 0), time(6, 0), (6, 0), False),  # end is exclusive
        (time(22, 0), time(6, 0), (12, 0), False),
        (time(9, 0), time(17, 0), (12, 0), True),
        (time(9, 0), time(17, 0), (18, 0), False),
        (time(0, 0), time(0, 0), (18, 0), True),  # equal bounds: all day
    ],
)
def test_active_hours(start: time, end: time, at: tuple[int, int], active: bool) -> None:
    assert ActiveHours(start, end).contains(local(*at)) is active


@pytest.mark.parametrize(
    ("at", "expected"),
    [((23, 0), 1), ((12, 0), 0), ((5, 59), 1)],
)
def test_zone_intrusion_only_in_hours(at: tuple[int, int], expected: int) -> None:
    rule = ZoneDwellRule(
        name="night-yard",
        type_code="zone_intrusion",
        zone_name="yard",
        polygon=SQUARE,
        classes=frozenset({"person"}),
        min_dwell_s=0,
        cooldown_s=120,
        cooldown_scope="zone",
        active=ActiveHours(time(22, 0), time(6, 0)),
    )
    now = local(*at)
    fired = []
    for k in range(10):  # ten people walk through within a minute: one alert per zone
        fired += rule.evaluate([inside(k, "person")], now + k * 5)
    assert len(fired) == expected
    if expected:
        assert fired[0].type == "zone_intrusion"
        assert fired[0].severity is Severity.HIGH


def smoke(**kw: object) -> ThresholdRule:
    args: dict[str, object] = {
        "name": "smoke",
        "type_code": "smoke_alarm",
        "sensor": "smoke-1",
        "quantity": "smoke",
        "unit": "",
        "on_at": 1.0,
        "off_below": 1.0,
    }
    args.update(kw)
    return ThresholdRule(**args)  # type: ignore[arg-type]


def gas(**kw: object) -> ThresholdRule:
    args: dict[str, object] = {
        "name": "gas",
        "type_code": "gas_leak",
        "sensor": "gas-1",
        "quantity": "gas_ppm",
        "unit": "ppm",
        "on_at": 500,
        "off_below": 300,
        "hold_s": 3,
        "cooldown_s": 60,
    }
    args.update(kw)
    return ThresholdRule(**args)  # type: ignore[arg-type]


def noise(**kw: object) -> ThresholdRule:
    args: dict[str, object] = {
        "name": "noise",
        "type_code": "noise_over_limit",
        "sensor": "mic-1",
        "quantity": "noise_db",
        "unit": "dB",
        "on_at": 70,
        "off_below": 65,
        "hold_s": 60,
        "cooldown_s": 600,
    }
    args.update(kw)
    return ThresholdRule(**args)  # type: ignore[arg-type]


def water(**kw: object) -> ThresholdRule:
    args: dict[str, object] = {
        "name": "water",
        "type_code": "water_level",
        "sensor": "level-1",
        "quantity": "water_level_m",
        "unit": "m",
        "on_at": 0.3,
        "off_below": 0.2,
        "hold_s": 0,
        "cooldown_s": 0,
    }
    args.update(kw)
    return ThresholdRule(**args)  # type: ignore[arg-type]


def tilt(**kw: object) -> ThresholdRule:
    args: dict[str, object] = {
        "name": "tilt",
        "type_code": "manhole_displaced",
        "sensor": "cover-1",
        "quantity": "tilt_deg",
        "unit": "deg",
        "on_at": 15,
        "off_below": 5,
        "hold_s": 2,
        "cooldown_s": 3600,
    }
    args.update(kw)
    return ThresholdRule(**args)  # type: ignore[arg-type]


# (rule, readings as (seconds, value), seconds at which an alert is expected)
THRESHOLD_CASES = [
    pytest.param(
        smoke(), [(0, 0), (1, 1), (2, 1), (3, 0), (4, 1)], [1, 4], id="smoke-each-episode"
    ),
    pytest.param(gas(), [(0, 600), (1, 600), (2, 600), (3, 600), (4, 600)], [3], id="gas-debounce"),
    pytest.param(
        gas(), [(0, 600), (1, 600), (2, 450), (3, 600), (4, 600)], [], id="gas-dip-resets"
    ),
    pytest.param(
        gas(),
        [(0, 600), (3, 600), (5, 400), (7, 600), (10, 600), (12, 250), (70, 600), (73, 600)],
        [3, 73],
        id="gas-hysteresis-then-new-episode",
    ),
    pytest.param(
        gas(), [(0, 600), (3, 600), (10, 100), (20, 600), (23, 600)], [3], id="gas-cooldown"
    ),
    pytest.param(
        noise(),
        [(t, 75) for t in range(0, 121, 10)],
        [60],
        id="noise-over-limit-for-60s",
    ),
    pytest.param(
        noise(),
        [(t, 75 if t % 40 else 60) for t in range(0, 200, 10)],
        [],
        id="noise-interrupted-never-60s",
    ),
    pytest.param(
        noise(repeat_s=120),
        [(t, 80) for t in range(0, 400, 10)],
        [60, 180, 300],
        id="noise-repeats-while-loud",
    ),
    pytest.param(
        water(),
        [(0, 0.1), (1, 0.31), (2, 0.29), (3, 0.31), (4, 0.25), (5, 0.35), (6, 0.1), (7, 0.4)],
        [1, 7],
        id="water-level-hysteresis-no-flap",
    ),
    pytest.param(tilt(), [(0, 40), (1, 40), (2, 40), (3, 40)], [2], id="manhole-tilt"),
    pytest.param(tilt(), [(0, 40), (1, 3), (2, 40), (3, 3)], [], id="manhole-bounce-debounced"),
]


@pytest.mark.parametrize(("rule", "readings", "expected_at"), THRESHOLD_CASES)
def test_threshold(
    rule: ThresholdRule, readings: list[tuple[float, float]], expected_at: list[float]
) -> None:
    fired = []
    for t, value in readings:
        for intent in rule.evaluate(
            SensorReading(quantity=rule.quantity, value=value, unit=rule.unit), T0 + t
        ):
            assert intent.type == rule.type_code
            assert intent.reading is not None
            assert intent.reading.threshold == rule.on_at
            assert intent.reading.value == value
            assert 0 <= intent.confidence <= 1
            assert intent.severity is default_catalogue().types[rule.type_code].severity
            fired.append(t)
    assert fired == expected_at


def test_threshold_ignores_other_quantities() -> None:
    rule = gas(hold_s=0)
    reading = SensorReading(quantity="temperature_c", value=900, unit="C")
    assert rule.evaluate(reading, T0) == []


def test_threshold_severity_override_and_bad_hysteresis() -> None:
    assert water(severity=Severity.CRITICAL).severity is Severity.CRITICAL
    with pytest.raises(ValueError, match="off_below"):
        water(off_below=0.5)


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="catalogue"):
        fire_lane(type_code="not_a_type")
