"""Turning a rule's alert intent into a wire alert (``contract.AlertV1``).

The alert gets a globally unique id that sorts by time (``contract.new_alert_id``,
``<device_id>-<UUIDv7 hex>``), the seq the outbox allocates, the device's configured position —
or, where the camera has a pixel→ground homography, the position of the object itself — and an
annotated JPEG snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np

from contract import AlertV1, Evidence, Location, encode_snapshot, new_alert_id
from edge.config import Geo
from edge.rules import AlertIntent, Point


class Homography:
    """Maps image pixels (x, y) to ground (lon, lat) with a 3×3 projective matrix."""

    def __init__(self, matrix: Sequence[Sequence[float]]) -> None:
        self.matrix = np.asarray(matrix, dtype=np.float64)
        if self.matrix.shape != (3, 3):
            raise ValueError(f"homography must be 3×3, got {self.matrix.shape}")

    def to_ground(self, point: Point) -> tuple[float, float]:
        """(lon, lat) of an image point."""
        x, y, w = self.matrix @ np.array([point[0], point[1], 1.0])
        if abs(w) < 1e-12:
            raise ValueError(f"point {point} maps to infinity")
        return float(x / w), float(y / w)


class AlertFactory:
    """Builds AlertV1 for one device; holds what every alert of the device shares."""

    def __init__(self, *, device_id: str, geo: Geo) -> None:
        self.device_id = device_id
        self.geo = geo
        self.homography = Homography(geo.homography) if geo.homography else None

    def location(self, anchor_px: Point | None) -> Location:
        lat, lon = self.geo.lat, self.geo.lon
        if self.homography is not None and anchor_px is not None:
            lon, lat = self.homography.to_ground(anchor_px)
            # A wild homography must not produce an invalid message: fall back to the device.
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                lat, lon = self.geo.lat, self.geo.lon
        return Location(
            lat=round(lat, 7),
            lon=round(lon, 7),
            floor=self.geo.floor,
            accuracy_m=self.geo.accuracy_m,
        )

    def build(
        self,
        intent: AlertIntent,
        *,
        seq: int,
        observed_at: datetime,
        snapshot_jpeg: bytes | None = None,
        model: tuple[str, str] | None = None,
        alert_id: str | None = None,
    ) -> AlertV1:
        """``model`` is the detector's (model id, version) for alerts from a camera."""
        return AlertV1(
            alert_id=alert_id or new_alert_id(self.device_id),
            device_id=self.device_id,
            seq=seq,
            type=intent.type,
            severity=intent.severity,
            confidence=round(min(max(intent.confidence, 0.0), 1.0), 4),
            observed_at=observed_at,
            location=self.location(intent.anchor_px),
            description=intent.description[:1000],
            evidence=Evidence(
                detector=intent.rule[:64],
                model=model[0] if model else None,
                model_version=model[1] if model else None,
                objects=list(intent.objects[:256]),
                zone=intent.zone,
                dwell_s=intent.dwell_s,
                reading=intent.reading,
            ),
            snapshot=encode_snapshot(snapshot_jpeg) if snapshot_jpeg else None,
        )
