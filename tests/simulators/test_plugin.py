"""What an integrator writes with the ``gateway`` fixture."""

from __future__ import annotations

from contract import Outcome, RejectReason
from simulators.gateway import Gateway

LANE = "33038300200101000005"


def test_fire_lane(gateway: Gateway) -> None:
    cam = gateway.device("cam-1", grid=LANE)
    fb = gateway.raise_alert(cam, "fire_lane_occupied")
    assert fb.outcome is Outcome.ACCEPTED
    (event,) = gateway.events(type="fire_lane_occupied", grid_prefix=LANE[:12])
    assert event.department == "police"
    assert event.device_ids == [cam.device_id]

    cam2 = gateway.device("cam-2", grid=LANE)
    assert gateway.raise_alert(cam2, "fire_lane_occupied").outcome is Outcome.MERGED
    merged = gateway.wait_for(
        lambda: [e for e in gateway.events(type="fire_lane_occupied") if e.alert_count == 2],
        what="the event to hold both alerts",
    )
    assert len(merged[0].device_ids) == 2


def test_bad_input_and_out_of_area(gateway: Gateway) -> None:
    sensor = gateway.device("gas-1", "sensor", grid=LANE)
    sensor.send_bad("nan_lat", "gas_leak")
    fb = sensor.wait_feedback()
    assert fb.outcome is Outcome.REJECTED
    assert fb.reason is RejectReason.INVALID_LOCATION
    assert gateway.dead_letters(reason="invalid_location")
    fb = gateway.raise_alert(sensor, "gas_leak", lat=31.23, lon=121.47)
    assert fb.outcome is Outcome.OUT_OF_AREA
    assert gateway.events() == []


def test_last_will_marks_the_device_offline(gateway: Gateway) -> None:
    cam = gateway.device("cam-lw", grid=LANE)
    gateway.wait_for(lambda: gateway.pool.device_state(cam.device_id) == "online", what="online")
    cam.go_offline()
    gateway.wait_for(lambda: gateway.pool.device_state(cam.device_id) == "offline", what="offline")
    cam.go_online()
    gateway.wait_for(lambda: gateway.pool.device_state(cam.device_id) == "online", what="back")
