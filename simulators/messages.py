"""Building blocks shared by the fleet, the scenarios and the load generator: contract alerts
with plausible evidence, generated JPEG snapshots, positions offset in metres, and every kind of
bad input the aggregator must reject."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from enum import StrEnum
from functools import lru_cache

import cv2
import numpy as np
import orjson

from contract import (
    AlertV1,
    DetectedObject,
    Evidence,
    Location,
    RejectReason,
    SensorReading,
    WarningType,
    encode_snapshot,
)

__all__ = [
    "BAD_KIND_REASON",
    "BadKind",
    "bad_payload",
    "evidence_for",
    "make_alert",
    "offset_m",
    "snapshot_jpeg",
]

_M_PER_DEG_LAT = 111_320.0

# What a sensor of each type reports when it raises the alert: quantity, unit, typical value,
# threshold. Cameras report detected objects instead.
_SENSOR_READINGS: dict[str, tuple[str, str, float, float]] = {
    "noise_over_limit": ("noise_db", "dB(A)", 78.0, 70.0),
    "smoke_alarm": ("smoke_obscuration", "%/m", 4.2, 3.0),
    "water_level": ("water_level_m", "m", 0.45, 0.30),
    "gas_leak": ("gas_ppm", "ppm", 620.0, 400.0),
    "manhole_displaced": ("tilt_deg", "deg", 21.0, 10.0),
    "sewage_discharge": ("cod_mg_l", "mg/L", 180.0, 100.0),
}
_CAMERA_OBJECTS: dict[str, str] = {
    "fire_lane_occupied": "car",
    "ebike_in_lift": "motorcycle",
    "smoke_fire": "fire",
    "crowd_gathering": "person",
    "zone_intrusion": "person",
    "thrown_object": "object",
    "street_vending": "person",
    "exposed_garbage": "garbage",
}


def offset_m(lat: float, lon: float, east_m: float, north_m: float) -> tuple[float, float]:
    """The point ``east_m`` east and ``north_m`` north of (lat, lon); fine for < 10 km."""
    dlat = north_m / _M_PER_DEG_LAT
    dlon = east_m / (_M_PER_DEG_LAT * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


def evidence_for(wt: WarningType, value_jitter: float = 0.0, objects: int = 1) -> Evidence:
    """Plausible evidence for ``wt``: a reading over threshold, or detected objects."""
    if wt.source.value == "sensor":
        quantity, unit, value, threshold = _SENSOR_READINGS.get(wt.code, ("value", "1", 1.0, 0.5))
        return Evidence(
            detector="threshold",
            reading=SensorReading(
                quantity=quantity,
                value=round(value * (1 + value_jitter), 3),
                unit=unit,
                threshold=threshold,
            ),
        )
    cls = _CAMERA_OBJECTS.get(wt.code, "object")
    return Evidence(
        detector="yolo-rules",
        model="yolov8n-coco",
        model_version="1",
        objects=[
            DetectedObject(
                cls=cls,
                score=round(min(0.99, 0.6 + 0.05 * i + value_jitter / 4), 3),
                box=(40.0 + 30 * i, 60.0, 120.0 + 30 * i, 180.0),
                track_id=i + 1,
            )
            for i in range(objects)
        ],
        zone="zone-a",
        dwell_s=30.0,
    )


@lru_cache(maxsize=64)
def snapshot_jpeg(label: str, variant: int = 0) -> bytes:
    """A small (≈5–10 kB) JPEG of a drawn scene naming ``label``; same input, same bytes."""
    h, w = 180, 320
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (70 + 10 * (variant % 4), 90, 60)  # ground
    img[: h // 3] = (200, 160, 120)  # sky (BGR)
    cv2.rectangle(img, (20, 40), (110, 150), (90, 90, 140), -1)  # a building
    for i in range(3):
        cv2.rectangle(img, (30 + 25 * i, 55), (45 + 25 * i, 75), (170, 210, 230), -1)
    x = 150 + 20 * (variant % 5)
    cv2.rectangle(img, (x, 110), (x + 70, 150), (40, 40, 200), -1)  # the subject
    cv2.circle(img, (x + 15, 152), 8, (20, 20, 20), -1)
    cv2.circle(img, (x + 55, 152), 8, (20, 20, 20), -1)
    cv2.putText(img, label[:28], (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1)
    ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), 70])
    if not ok:  # pragma: no cover - imencode of a valid array does not fail
        raise RuntimeError("JPEG encoding failed")
    return bytes(buf)


def make_alert(
    *,
    alert_id: str,
    device_id: str,
    seq: int,
    wt: WarningType,
    observed_at: datetime,
    lat: float,
    lon: float,
    confidence: float = 0.85,
    snapshot: bool = False,
    description: str = "",
    variant: int = 0,
) -> AlertV1:
    return AlertV1(
        alert_id=alert_id,
        device_id=device_id,
        seq=seq,
        type=wt.code,
        confidence=round(confidence, 3),
        observed_at=observed_at,
        location=Location(lat=round(lat, 7), lon=round(lon, 7), accuracy_m=5.0),
        description=description or f"{wt.zh} / {wt.en}",
        evidence=evidence_for(wt, value_jitter=(variant % 7) / 20),
        snapshot=encode_snapshot(snapshot_jpeg(wt.en, variant)) if snapshot else None,
    )


class BadKind(StrEnum):
    """Each kind of bad alert the aggregator rejects, with the reason it must give."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_TYPE = "unknown_type"
    LAT_OUT_OF_RANGE = "lat_out_of_range"
    NAN_LAT = "nan_lat"
    FUTURE = "future"
    DEVICE_MISMATCH = "device_mismatch"
    OVERSIZED = "oversized"
    SNAPSHOT_NOT_JPEG = "snapshot_not_jpeg"


BAD_KIND_REASON: dict[BadKind, RejectReason] = {
    BadKind.INVALID_JSON: RejectReason.INVALID_JSON,
    BadKind.INVALID_UTF8: RejectReason.INVALID_UTF8,
    BadKind.MISSING_FIELD: RejectReason.SCHEMA_VIOLATION,
    BadKind.WRONG_TYPE: RejectReason.SCHEMA_VIOLATION,
    BadKind.UNKNOWN_TYPE: RejectReason.UNKNOWN_TYPE,
    BadKind.LAT_OUT_OF_RANGE: RejectReason.INVALID_LOCATION,
    # JSON has no NaN, but the aggregator's parser reads the bare literal as a float and then
    # refuses it as a position that is not a finite number.
    BadKind.NAN_LAT: RejectReason.INVALID_LOCATION,
    BadKind.FUTURE: RejectReason.OBSERVED_IN_FUTURE,
    BadKind.DEVICE_MISMATCH: RejectReason.DEVICE_MISMATCH,
    BadKind.OVERSIZED: RejectReason.PAYLOAD_TOO_LARGE,
    BadKind.SNAPSHOT_NOT_JPEG: RejectReason.SNAPSHOT_NOT_JPEG,
}


def bad_payload(kind: BadKind, good: AlertV1, *, now: datetime, max_payload_bytes: int) -> bytes:
    """``good`` spoiled in the way ``kind`` names. Built from the good alert's JSON so that
    exactly one thing is wrong with it."""
    obj = orjson.loads(good.to_json())
    if kind is BadKind.INVALID_JSON:
        return good.to_json()[:-7] + b',"oops"'
    if kind is BadKind.INVALID_UTF8:
        return good.to_json().replace(b'"description":"', b'"description":"\xff\xfe', 1)
    if kind is BadKind.MISSING_FIELD:
        del obj["confidence"]
    elif kind is BadKind.WRONG_TYPE:
        obj["seq"] = str(obj["seq"])
    elif kind is BadKind.UNKNOWN_TYPE:
        obj["type"] = "alien_landing"
    elif kind is BadKind.LAT_OUT_OF_RANGE:
        obj["location"]["lat"] = 123.4
    elif kind is BadKind.NAN_LAT:
        # orjson writes NaN as null; the literal is what a careless C firmware would send.
        obj["location"]["lat"] = "__NAN__"
        return orjson.dumps(obj).replace(b'"__NAN__"', b"NaN")
    elif kind is BadKind.FUTURE:
        obj["observed_at"] = (now + timedelta(days=2)).isoformat().replace("+00:00", "Z")
    elif kind is BadKind.DEVICE_MISMATCH:
        obj["device_id"] = f"{good.device_id}-impostor"
    elif kind is BadKind.OVERSIZED:
        obj["description"] = "x" * 900
        obj["padding"] = "p" * (max_payload_bytes + 1024)
    elif kind is BadKind.SNAPSHOT_NOT_JPEG:
        obj["snapshot"] = encode_snapshot(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return orjson.dumps(obj)
