"""From rule intent to wire alert: ids, seq, position (device or homography), evidence."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest

from contract import AlertV1, DetectedObject, SensorReading, Severity, new_alert_id
from contract.messages import ALERT_ID_PATTERN
from edge.alerts import AlertFactory, Homography
from edge.config import Geo
from edge.rules import AlertIntent

NOW = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
H = ((4.0e-7, 0.0, 120.5376), (0.0, -4.0e-7, 27.5620), (0.0, 0.0, 1.0))


def camera_intent(anchor: tuple[float, float] | None = (384.0, 288.0)) -> AlertIntent:
    return AlertIntent(
        type="zone_intrusion",
        severity=Severity.HIGH,
        confidence=0.83,
        rule="zone_intrusion:yard",
        description="person in zone yard for 3 s",
        zone="yard",
        dwell_s=3.0,
        objects=(DetectedObject(cls="person", score=0.83, box=(370, 200, 398, 288), track_id=4),),
        anchor_px=anchor,
    )


def test_alert_ids_are_unique_and_valid() -> None:
    ids = {new_alert_id("cam-fire-lane-01") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.match(ALERT_ID_PATTERN, i) for i in ids)


def test_homography_places_the_object() -> None:
    factory = AlertFactory(device_id="cam-1", geo=Geo(lat=27.5618, lon=120.5378, homography=H))
    alert = factory.build(camera_intent(), seq=7, observed_at=NOW)
    assert alert.seq == 7
    assert alert.location.lon == pytest.approx(120.5376 + 384 * 4e-7)
    assert alert.location.lat == pytest.approx(27.5620 - 288 * 4e-7)
    # Same mapping as OpenCV's perspective transform.
    cv_pt = cv2.perspectiveTransform(np.array([[[384.0, 288.0]]]), np.array(H))[0, 0]
    assert (alert.location.lon, alert.location.lat) == pytest.approx(tuple(cv_pt), abs=1e-7)
    assert Homography(H).to_ground((0, 0)) == pytest.approx((120.5376, 27.5620))


def test_without_homography_or_anchor_the_device_position_is_used() -> None:
    geo = Geo(lat=27.5612, lon=120.5335, floor=2, accuracy_m=10)
    plain = AlertFactory(device_id="cam-1", geo=geo).build(camera_intent(), seq=0, observed_at=NOW)
    assert (plain.location.lat, plain.location.lon, plain.location.floor) == (27.5612, 120.5335, 2)
    with_h = AlertFactory(device_id="cam-1", geo=Geo(lat=27.5618, lon=120.5378, homography=H))
    no_anchor = with_h.build(camera_intent(anchor=None), seq=0, observed_at=NOW)
    assert (no_anchor.location.lat, no_anchor.location.lon) == (27.5618, 120.5378)


def test_a_wild_homography_falls_back_to_the_device() -> None:
    wild = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # pixels taken as degrees
    factory = AlertFactory(device_id="cam-1", geo=Geo(lat=27.5618, lon=120.5378, homography=wild))
    alert = factory.build(camera_intent(anchor=(700.0, 500.0)), seq=0, observed_at=NOW)
    assert (alert.location.lat, alert.location.lon) == (27.5618, 120.5378)


def test_camera_alert_carries_evidence_and_snapshot() -> None:
    ok, buf = cv2.imencode(".jpg", np.zeros((48, 64, 3), np.uint8))
    assert ok
    factory = AlertFactory(device_id="cam-1", geo=Geo(lat=27.56, lon=120.53))
    alert = factory.build(
        camera_intent(),
        seq=1,
        observed_at=NOW,
        snapshot_jpeg=buf.tobytes(),
        model=("nanodet", "3"),
    )
    again = AlertV1.model_validate_json(alert.to_json(), strict=False)
    assert again == alert
    assert again.snapshot_bytes() == buf.tobytes()
    ev = again.evidence
    assert (ev.model, ev.model_version, ev.zone, ev.dwell_s) == ("nanodet", "3", "yard", 3.0)
    assert ev.objects[0].track_id == 4
    assert again.observed_at == NOW


def test_sensor_alert_carries_the_reading_not_the_model() -> None:
    intent = AlertIntent(
        type="gas_leak",
        severity=Severity.CRITICAL,
        confidence=0.9,
        rule="gas_leak:kitchen",
        description="gas_ppm 640 ppm ≥ 500 for 5 s",
        reading=SensorReading(quantity="gas_ppm", value=640, unit="ppm", threshold=500),
    )
    factory = AlertFactory(device_id="gas-1", geo=Geo(lat=27.56, lon=120.54))
    alert = factory.build(intent, seq=3, observed_at=NOW)
    assert alert.evidence.model is None
    assert alert.evidence.reading is not None
    assert alert.evidence.reading.threshold == 500
    assert alert.severity is Severity.CRITICAL
