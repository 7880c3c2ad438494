"""From raw MQTT messages to a pool batch: decode+validate → geo-tag → (dedup happens in the pool).

``assemble`` is pure apart from writing snapshots to the content-addressed store; it never raises
on bad input: every message ends up pooled, out of area, or a dead letter with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import orjson
from pydantic import ValidationError

from aggregator.decode import DecodeLimits, Rejection, decode_alert
from aggregator.geo import Grid, GridIndex
from aggregator.pool import AlertIn, Batch, DeadLetterIn, OutOfAreaIn, StatusIn
from aggregator.snapshots import SnapshotStore
from contract import (
    AlertV1,
    Catalogue,
    DeviceChannel,
    ParsedTopic,
    RejectReason,
    StatusV1,
    TelemetryV1,
    TopicError,
    Topics,
    dump,
)

log = logging.getLogger(__name__)

_M = TypeVar("_M", StatusV1, TelemetryV1)


@dataclass(slots=True)  # not frozen: built per message, and a frozen __init__ costs ~10×
class Inbound:
    """One message as it came off the wire."""

    topic: str
    payload: bytes
    received_at: float
    mid: int = 0
    qos: int = 0
    generation: int = 0  # which broker connection it arrived on (acks go only to that one)


@dataclass(slots=True)
class Assembled:
    batch: Batch = field(default_factory=Batch)
    telemetry: list[TelemetryV1] = field(default_factory=list)
    # alert_id → the alert, for feedback and sinks after commit
    alerts: dict[str, AlertV1] = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        topics: Topics,
        catalogue: Catalogue,
        grids: GridIndex,
        snapshots: SnapshotStore,
        limits: DecodeLimits,
    ) -> None:
        self.topics = topics
        self.catalogue = catalogue
        self.grids = grids
        self.snapshots = snapshots
        self.limits = limits
        self._grid_text: dict[str, tuple[str, str]] = {}  # grid code → (path JSON, address)
        self._parsed: dict[str, ParsedTopic] = {}  # topics repeat: one per device and channel

    def assemble(self, messages: Sequence[Inbound]) -> Assembled:
        out = Assembled()
        now = datetime.now(UTC)
        pending: list[tuple[Inbound, AlertV1]] = []
        for msg in messages:
            parsed = self._parsed.get(msg.topic)
            if parsed is None:
                try:
                    parsed = self.topics.parse(msg.topic)
                except TopicError as exc:
                    self._reject(out, msg, None, Rejection(RejectReason.BAD_TOPIC, str(exc)))
                    continue
                if len(self._parsed) > 100_000:  # bounded: a fleet has fewer device topics
                    self._parsed.clear()
                self._parsed[msg.topic] = parsed
            device_id = parsed.device_id
            seen = out.batch.seen
            seen[device_id] = max(seen.get(device_id, 0.0), msg.received_at)
            if parsed.channel is DeviceChannel.ALERT:
                result = decode_alert(msg.payload, device_id, self.catalogue, now, self.limits)
                if isinstance(result, Rejection):
                    self._reject(out, msg, device_id, result)
                else:
                    pending.append((msg, result))
            elif parsed.channel is DeviceChannel.STATUS:
                self._status(out, msg, device_id)
            elif parsed.channel is DeviceChannel.TELEMETRY:
                self._telemetry(out, msg, device_id)
            # feedback is ours; we do not subscribe to it
        self._geo_tag(out, pending)
        return out

    def _geo_tag(self, out: Assembled, pending: list[tuple[Inbound, AlertV1]]) -> None:
        if not pending:
            return
        grids = self.grids.locate_many(
            [a.location.lat for _, a in pending], [a.location.lon for _, a in pending]
        )
        for (msg, alert), grid in zip(pending, grids, strict=True):
            observed = alert.observed_at.timestamp()
            if grid is None:
                out.batch.out_of_area.append(
                    OutOfAreaIn(
                        alert.alert_id,
                        alert.device_id,
                        alert.type,
                        observed,
                        msg.received_at,
                        alert.location.lat,
                        alert.location.lon,
                    )
                )
                out.alerts[alert.alert_id] = alert
                continue
            sha = None
            jpeg = alert.snapshot_bytes()
            if jpeg is not None:
                sha = self.snapshots.put(jpeg)
            wt = self.catalogue.types[alert.type]
            path_json, address = self._grid_text_of(grid)
            out.batch.alerts.append(
                AlertIn(
                    alert_id=alert.alert_id,
                    device_id=alert.device_id,
                    seq=alert.seq,
                    type=alert.type,
                    severity=alert.severity or wt.severity,
                    confidence=alert.confidence,
                    observed_at=observed,
                    received_at=msg.received_at,
                    lat=alert.location.lat,
                    lon=alert.location.lon,
                    grid_code=grid.code,
                    grid_path=path_json,
                    address=address,
                    description=alert.description,
                    snapshot_sha256=sha,
                    payload=_without_snapshot(msg.payload, alert, sha),
                )
            )
            out.alerts[alert.alert_id] = alert

    def _grid_text_of(self, grid: Grid) -> tuple[str, str]:
        text = self._grid_text.get(grid.code)
        if text is None:
            text = (
                orjson.dumps([dump(level) for level in grid.path]).decode(),
                " › ".join(level.name for level in grid.path),
            )
            self._grid_text[grid.code] = text
        return text

    def _status(self, out: Assembled, msg: Inbound, device_id: str) -> None:
        if not msg.payload:
            return  # a cleared retained status: nothing to record
        status = self._decode(out, msg, device_id, StatusV1, "status")
        if status is None:
            return
        at = status.at.timestamp() if status.at else msg.received_at
        health = orjson.dumps(dump(status.health)).decode() if status.health else None
        out.batch.statuses.append(
            StatusIn(device_id, status.state.value, status.reason, at, status.kind, health)
        )

    def _telemetry(self, out: Assembled, msg: Inbound, device_id: str) -> None:
        telemetry = self._decode(out, msg, device_id, TelemetryV1, "telemetry")
        if telemetry is not None:
            out.telemetry.append(telemetry)

    def _decode(
        self, out: Assembled, msg: Inbound, device_id: str, model: type[_M], what: str
    ) -> _M | None:
        """A status or telemetry message, or None after dead-lettering it with its reason."""
        try:
            decoded = model.model_validate_json(msg.payload, strict=True)
        except ValidationError as exc:
            self._reject(out, msg, device_id, _schema_rejection(exc))
            return None
        if decoded.device_id != device_id:
            self._reject(
                out,
                msg,
                device_id,
                Rejection(
                    RejectReason.DEVICE_MISMATCH,
                    f"{what} device_id {decoded.device_id!r} differs from the topic's "
                    f"{device_id!r}",
                ),
            )
            return None
        return decoded

    @staticmethod
    def _reject(out: Assembled, msg: Inbound, device_id: str | None, rej: Rejection) -> None:
        log.info(
            "rejected topic=%s device=%s reason=%s detail=%s",
            msg.topic,
            device_id,
            rej.reason.value,
            rej.detail[:200],
        )
        out.batch.dead_letters.append(
            DeadLetterIn(
                msg.received_at,
                msg.topic,
                device_id,
                rej.alert_id,
                rej.reason,
                rej.detail,
                msg.payload,
            )
        )


def _schema_rejection(exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return Rejection(RejectReason.INVALID_JSON, "payload is not valid JSON")
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
    return Rejection(RejectReason.SCHEMA_VIOLATION, detail[:2000])


def _without_snapshot(payload: bytes, alert: AlertV1, sha: str | None) -> bytes:
    """The message as received, with the (large) snapshot replaced by its hash."""
    if alert.snapshot is None:
        return payload
    obj = orjson.loads(payload)
    obj["snapshot"] = {"sha256": sha, "stored": True}
    return orjson.dumps(obj)
