"""The fleet plan is deterministic and realistic; the fleet plays it against the real stack."""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from aggregator.broker.registry import DeviceLocation, DeviceRegistry
from aggregator.grids import GridIndex, default_grid_file
from aggregator.pool.dedup import haversine_m
from aggregator.pool.sqlite import connect
from contract import AlertV1, StatusV1, TelemetryV1, default_catalogue
from simulators.cli import main
from simulators.fleet import Action, Fleet, FleetConfig, FleetPlan, devices_from_registry
from simulators.gateway import Gateway
from simulators.poolview import PoolView
from simulators.stack import GatewayStack

ORIGIN = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
GRIDS = GridIndex.from_geojson(default_grid_file())
CATALOGUE = default_catalogue()


def plan(**kw: object) -> list[Action]:
    config = FleetConfig.model_validate(
        {"duration_s": 600, "rate": 1.0, "offline_per_hour": 4, "malformed_share": 0.05} | kw
    )
    return list(FleetPlan(config, grids=GRIDS).actions(ORIGIN))


def test_same_seed_same_messages_other_seed_other_messages() -> None:
    first = [a.key() for a in plan(seed=11)]
    again = [a.key() for a in plan(seed=11)]
    other = [a.key() for a in plan(seed=12)]
    assert len(first) > 500
    assert first == again
    assert first != other
    # Another clock origin changes timestamps and alert ids, not the shape of the run.
    config = FleetConfig(seed=11, duration_s=600, offline_per_hour=4, malformed_share=0.05)
    shifted = [
        a.key() for a in FleetPlan(config, grids=GRIDS).actions(datetime(2026, 3, 2, tzinfo=UTC))
    ]
    assert [(k[0], k[1], k[3]) for k in shifted] == [(k[0], k[1], k[3]) for k in first]
    assert shifted != first


def test_plan_is_time_ordered_and_bounded() -> None:
    actions = plan(seed=3, duration_s=300, count=150, malformed_share=0.0)
    times = [a.t for a in actions]
    assert times == sorted(times)
    alerts = [a for a in actions if a.topic.endswith("/alert")]
    assert 150 <= len(alerts) <= 150 + 3  # an incident in flight may finish its 2-4 reports


def test_alert_types_follow_the_device_kind_and_payloads_are_contract_messages() -> None:
    actions = plan(seed=5, malformed_share=0.0)
    kinds = Counter()
    for a in actions:
        if a.topic.endswith("/alert"):
            alert = AlertV1.model_validate_json(a.payload, strict=True)
            assert alert.device_id == a.device_id
            source = CATALOGUE.types[alert.type].source.value
            assert ("-cam-" in a.device_id) == (source == "camera")
            kinds[source] += 1
        elif a.topic.endswith("/telemetry"):
            assert "-sen-" in a.device_id
            TelemetryV1.model_validate_json(a.payload, strict=True)
        elif a.kind == "connect":
            assert a.retain
            assert StatusV1.model_validate_json(a.payload).state == "online"
    assert kinds["camera"] > 50
    assert kinds["sensor"] > 50


def test_incidents_are_within_merge_radius_and_window() -> None:
    actions = plan(seed=8, incident_share=0.6, malformed_share=0.0, offline_per_hour=0)
    incidents: dict[str, list[AlertV1]] = {}
    for a in actions:
        if a.label.startswith("incident:"):
            incidents.setdefault(a.label, []).append(AlertV1.model_validate_json(a.payload))
    assert len(incidents) > 30
    for reports in incidents.values():
        assert 2 <= len(reports) <= 4
        assert len({r.device_id for r in reports}) == len(reports)
        wt = CATALOGUE.types[reports[0].type]
        first = reports[0]
        for r in reports:
            assert r.type == wt.code
            d = haversine_m(first.location.lat, first.location.lon, r.location.lat, r.location.lon)
            assert d <= wt.merge_radius_m
            # Device clocks differ by up to twice the maximum skew; the window is far wider.
            dt = abs((r.observed_at - first.observed_at).total_seconds())
            assert dt <= min(wt.merge_window_s / 10, 60) + 2 * 45


def test_out_of_area_positions_are_outside_every_grid() -> None:
    actions = plan(seed=9, out_of_area_share=0.3, malformed_share=0.0)
    off = [
        AlertV1.model_validate_json(a.payload)
        for a in actions
        if a.label.startswith("out_of_area:")
    ]
    assert len(off) > 20
    assert all(GRIDS.locate(a.location.lat, a.location.lon) is None for a in off)


def test_offline_periods_flush_their_backlog_on_reconnect() -> None:
    actions = plan(seed=4, offline_per_hour=30, rate=3.0, malformed_share=0.0)
    drops = [a for a in actions if a.kind == "disconnect"]
    assert drops
    flushed = 0
    for drop in drops:
        back = next(
            a
            for a in actions
            if a.kind == "connect" and a.device_id == drop.device_id and a.t > drop.t
        )
        between = [
            a
            for a in actions
            if a.device_id == drop.device_id and drop.t < a.t < back.t and a.kind == "publish"
        ]
        assert between == []  # nothing leaves a device while its link is down
        burst = [
            a
            for a in actions
            if a.device_id == drop.device_id and a.t == back.t and a.kind == "publish"
        ]
        skew = timedelta(seconds=45)  # FleetConfig.max_clock_skew_s
        for a in burst:
            if not a.topic.endswith("/alert"):
                continue
            alert = AlertV1.model_validate_json(a.payload)
            # The backlog keeps the time each alert was raised, while the link was down.
            assert ORIGIN + timedelta(seconds=drop.t) - skew <= alert.observed_at
            assert alert.observed_at <= ORIGIN + timedelta(seconds=back.t) + skew
            flushed += 1
    assert flushed > 0


def test_every_bad_kind_appears_when_malformed_is_on() -> None:
    labels = {a.label for a in plan(seed=2, malformed_share=0.3)}
    assert {
        f"bad:{k}" for k in ("invalid_json", "nan_lat", "oversized", "device_mismatch")
    } <= labels
    assert len([x for x in labels if x.startswith("bad:")]) == 11


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="add up to more than 1"):
        FleetConfig(incident_share=0.7, out_of_area_share=0.2, malformed_share=0.2)
    with pytest.raises(ValidationError, match="Extra inputs"):
        FleetConfig.model_validate({"cameras": 1, "drones": 3})


def test_fleet_runs_against_the_real_stack(gateway_stack: GatewayStack, gateway: Gateway) -> None:
    seen: list[str] = []
    config = FleetConfig(
        seed=21,
        cameras=4,
        sensors=4,
        id_prefix="fl",
        rate=2.0,
        duration_s=120,
        time_scale=60,
        malformed_share=0.1,
        offline_per_hour=20,
    )
    fleet = Fleet(
        config,
        gateway_stack,
        on_feedback=lambda d, fb: seen.append(fb.outcome.value),
        progress=False,
    )
    stop = threading.Event()
    worker = threading.Thread(target=fleet.run, args=(stop,))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    s = fleet.summary
    assert s.alerts_sent > 150
    assert sum(s.feedback.values()) == len(seen) > 100
    assert s.feedback["rejected"] > 0
    assert s.feedback["accepted"] > 0
    assert s.feedback["merged"] > 0
    # Every alert the fleet sent is accounted for: pooled, out of area, or a dead letter.
    # (Feedback may miss some: a device that is offline when it arrives never sees it.)
    pool = PoolView(gateway_stack.pool_path)

    def accounted() -> int:
        ooa = [o for o in pool.out_of_area() if o.device_id.startswith("fl-")]
        # A rejected message redelivered after a reconnect is kept once (its topic and payload
        # are its key), so every row is one message the fleet sent.
        with closing(connect(gateway_stack.pool_path, readonly=True)) as db:
            dead = db.execute(
                "SELECT count(*) FROM dead_letters"
                " WHERE device_id LIKE 'fl-%' AND topic LIKE '%/alert'"
            ).fetchone()[0]
        return pool.alert_count(like="fl-%") + len(ooa) + int(dead)

    deadline = time.monotonic() + 15
    while accounted() != s.alerts_sent and time.monotonic() < deadline:
        time.sleep(0.1)
    assert accounted() == s.alerts_sent, (
        f"pooled {pool.alert_count(like='fl-%')}, accounted {accounted()}, sent {s.alerts_sent}, "
        f"summary {s}"
    )
    fleet_events = [e for e in pool.events() if any(d.startswith("fl-") for d in e.device_ids)]
    assert len(fleet_events) >= s.feedback["accepted"] > 0


def test_fleet_stops_when_told(gateway_stack: GatewayStack) -> None:
    config = FleetConfig(
        seed=5, cameras=2, sensors=1, id_prefix="stp", rate=5, duration_s=None, count=100_000
    )
    fleet = Fleet(config, gateway_stack, progress=False)
    stop = threading.Event()
    worker = threading.Thread(target=fleet.run, args=(stop,))
    worker.start()
    stop.wait(1.5)
    stop.set()
    worker.join(15)
    assert not worker.is_alive()
    assert fleet.summary.stopped_early
    assert 0 < fleet.summary.alerts_sent < 100


def test_cli_plan_is_reproducible(capsys: pytest.CaptureFixture[str]) -> None:
    def run(seed: str) -> tuple[str, str]:
        assert main(["fleet", "--plan-only", "--seed", seed, "--duration", "90"]) == 0
        out = capsys.readouterr()
        return out.out, out.err

    first, again, other = run("4"), run("4"), run("5")
    assert first == again
    assert first[1].startswith("plan sha256 ")
    assert other[1] != first[1]


def test_fleet_uses_the_devices_of_a_registry(tmp_path: Path) -> None:
    registry = DeviceRegistry(tmp_path / "registry.yaml")
    lat, lon = GRIDS.grids[3].centroid
    registry.add_device("gate-cam", "camera", location=DeviceLocation(lat=lat, lon=lon))
    registry.add_device("hub-1", "hub")
    registry.add_device("pond-level", "sensor", location=DeviceLocation(lat=lat, lon=lon + 0.001))
    registry.save()
    devices = devices_from_registry(registry.path, GRIDS)
    assert [d.device_id for d in devices] == ["gate-cam", "pond-level"]
    assert devices[0].grid_code == GRIDS.grids[3].code
    actions = list(
        FleetPlan(FleetConfig(duration_s=120, rate=2), grids=GRIDS, devices=devices).actions(ORIGIN)
    )
    assert {a.device_id for a in actions} == {"gate-cam", "pond-level"}
