"""From raw MQTT messages to a pool batch: decode+validate → geo-tag → (dedup happens in the pool).

``assemble`` is pure apart from writing snapshots to the content-addressed store; it never raises
on bad input: every message ends up pooled, out of area, or a dead letter with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError
from pydantic_core import from_json

from aggregator.grids import Grid, GridIndex
from aggregator.ingest.decode import DecodeLimits, Rejection, decode_alert, number_problem
from aggregator.pool.model import AlertIn, Batch, DeadLetterIn, OutOfAreaIn, StatusIn
from aggregator.pool.port import SnapshotStorage
from contract import (
    AlertV1,
    Catalogue,
    DeviceChannel,
    ParsedTopic,
    RejectReason,
    Severity,
    StatusV1,
    TelemetryV1,
    TopicError,
    Topics,
    decode_snapshot,
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
    # what the MQTT I/O loop's Prevalidator made of it (alerts only), or None: decode here
    pre: tuple[Any, ...] | None = None


@dataclass(slots=True)
class Decoded:
    """What the pipeline needs of a valid alert: from an ``AlertV1`` decoded here, or from the
    row the MQTT I/O loop validated (``Prevalidator``), which crosses the process boundary as a
    tuple because pickling the model costs several times validating it."""

    alert_id: str
    device_id: str
    seq: int
    type: str
    severity: Severity | None
    confidence: float
    observed_at: float
    lat: float
    lon: float
    description: str
    has_snapshot: bool

    @classmethod
    def of(cls, alert: AlertV1) -> Decoded:
        return cls(
            alert.alert_id,
            alert.device_id,
            alert.seq,
            alert.type,
            alert.severity,
            alert.confidence,
            alert.observed_at.timestamp(),
            alert.location.lat,
            alert.location.lon,
            alert.description,
            alert.snapshot is not None,
        )

    @staticmethod
    def row_of(alert: AlertV1) -> tuple[Any, ...]:
        """What ``from_row`` reads: ``of(alert)`` as a plain tuple, built without the object."""
        return (
            "ok",
            alert.alert_id,
            alert.device_id,
            alert.seq,
            alert.type,
            alert.severity.value if alert.severity else None,
            alert.confidence,
            alert.observed_at.timestamp(),
            alert.location.lat,
            alert.location.lon,
            alert.description,
            alert.snapshot is not None,
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Decoded:
        _, aid, dev, seq, type_, sev, conf, obs, lat, lon, desc, snap = row
        return cls(
            aid, dev, seq, type_, Severity(sev) if sev else None, conf, obs, lat, lon, desc, snap
        )


class Prevalidator:
    """Alert validation for the MQTT I/O loop, so that the pool writer, the serial stage, only
    geo-tags and commits. Its verdicts are exactly ``decode_alert``'s."""

    def __init__(self, topics: Topics, catalogue: Catalogue, limits: DecodeLimits) -> None:
        self.topics = topics
        self.catalogue = catalogue
        self.limits = limits
        self._alert_device: dict[str, str | None] = {}  # topic → device id, None: not an alert

    def check(self, topic: str, payload: bytes, now: datetime) -> tuple[Any, ...] | None:
        """``("ok", ...)`` (a ``Decoded`` row), ``("rejected", reason, detail, alert_id, seq)``,
        or None for anything that is not an alert (the pipeline handles it)."""
        if topic not in self._alert_device:
            if len(self._alert_device) > 100_000:  # bounded: a fleet has fewer device topics
                self._alert_device.clear()
            try:
                parsed = self.topics.parse(topic)
            except TopicError:
                parsed = None
            alert = parsed is not None and parsed.channel is DeviceChannel.ALERT
            self._alert_device[topic] = parsed.device_id if parsed and alert else None
        device_id = self._alert_device[topic]
        if device_id is None:
            return None
        try:
            result = decode_alert(payload, device_id, self.catalogue, now, self.limits)
            if isinstance(result, Rejection):
                return ("rejected", result.reason.value, result.detail, result.alert_id, result.seq)
            return Decoded.row_of(result)
        except Exception as exc:  # no message may stop the I/O loop
            rej = internal_rejection(exc)
            log.error("alert on %s made validation fail: %s", topic, rej.detail, exc_info=True)
            return ("rejected", rej.reason.value, rej.detail, rej.alert_id, rej.seq)


@dataclass(slots=True)
class Assembled:
    batch: Batch = field(default_factory=Batch)
    telemetry: list[TelemetryV1] = field(default_factory=list)
    # alert_id → the alert, for feedback and sinks after commit
    alerts: dict[str, Decoded] = field(default_factory=dict)
    # where in the batch each of batch.alerts / .out_of_area / .dead_letters arrived, so that
    # feedback goes out in arrival order
    alert_pos: list[int] = field(default_factory=list)
    out_of_area_pos: list[int] = field(default_factory=list)
    dead_letter_pos: list[int] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        topics: Topics,
        catalogue: Catalogue,
        grids: GridIndex,
        snapshots: SnapshotStorage,
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
        pending: list[tuple[int, Inbound, Decoded]] = []
        for pos, msg in enumerate(messages):
            try:
                self._one(out, pos, msg, now, pending)
            except Exception as exc:  # the message's fault, not the batch's
                rej = internal_rejection(exc)
                log.error(
                    "message on %s made assembly fail: %s", msg.topic, rej.detail, exc_info=True
                )
                device_id = self._parsed[msg.topic].device_id if msg.topic in self._parsed else None
                self._reject(out, pos, msg, device_id, rej)
        self._geo_tag(out, pending)
        return out

    def _one(
        self,
        out: Assembled,
        pos: int,
        msg: Inbound,
        now: datetime,
        pending: list[tuple[int, Inbound, Decoded]],
    ) -> None:
        """Decode one message into ``pending`` (a valid alert) or ``out`` (anything else)."""
        parsed = self._parsed.get(msg.topic)
        if parsed is None:
            try:
                parsed = self.topics.parse(msg.topic)
            except TopicError as exc:
                self._reject(out, pos, msg, None, Rejection(RejectReason.BAD_TOPIC, str(exc)))
                return
            if len(self._parsed) > 100_000:  # bounded: a fleet has fewer device topics
                self._parsed.clear()
            self._parsed[msg.topic] = parsed
        device_id = parsed.device_id
        seen = out.batch.seen
        seen[device_id] = max(seen.get(device_id, 0.0), msg.received_at)
        if parsed.channel is DeviceChannel.ALERT:
            pre = msg.pre
            if pre is None:
                result = decode_alert(msg.payload, device_id, self.catalogue, now, self.limits)
                if isinstance(result, Rejection):
                    self._reject(out, pos, msg, device_id, result)
                else:
                    pending.append((pos, msg, Decoded.of(result)))
            elif pre[0] == "ok":
                pending.append((pos, msg, Decoded.from_row(pre)))
            else:
                _, reason, detail, alert_id, seq = pre
                rejection = Rejection(RejectReason(reason), detail, alert_id, seq)
                self._reject(out, pos, msg, device_id, rejection)
        elif parsed.channel is DeviceChannel.STATUS:
            self._status(out, pos, msg, device_id)
        elif parsed.channel is DeviceChannel.TELEMETRY:
            self._telemetry(out, pos, msg, device_id)
        # feedback is ours; we do not subscribe to it

    def _geo_tag(self, out: Assembled, pending: list[tuple[int, Inbound, Decoded]]) -> None:
        if not pending:
            return
        for (pos, msg, alert), grid in zip(pending, self._locate(pending), strict=True):
            out.alerts[alert.alert_id] = alert
            if grid is None:
                out.out_of_area_pos.append(pos)
                out.batch.out_of_area.append(
                    OutOfAreaIn(
                        alert.alert_id,
                        alert.device_id,
                        alert.type,
                        alert.observed_at,
                        msg.received_at,
                        alert.lat,
                        alert.lon,
                    )
                )
                continue
            sha = None
            payload = msg.payload
            if alert.has_snapshot:
                # The message as received, with the (large) snapshot replaced by its hash. Read
                # by decode's parser: what decode accepted, this reads the same way.
                obj = from_json(payload, allow_inf_nan=False)
                sha = self.snapshots.put(decode_snapshot(obj["snapshot"]))
                obj["snapshot"] = {"sha256": sha, "stored": True}
                payload = orjson.dumps(obj)
            wt = self.catalogue.types[alert.type]
            path_json, address = self._grid_text_of(grid)
            out.alert_pos.append(pos)
            out.batch.alerts.append(
                AlertIn(
                    alert_id=alert.alert_id,
                    device_id=alert.device_id,
                    seq=alert.seq,
                    type=alert.type,
                    severity=alert.severity or wt.severity,
                    confidence=alert.confidence,
                    observed_at=alert.observed_at,
                    received_at=msg.received_at,
                    lat=alert.lat,
                    lon=alert.lon,
                    grid_code=grid.code,
                    grid_path=path_json,
                    address=address,
                    description=alert.description,
                    snapshot_sha256=sha,
                    payload=payload,
                )
            )

    def _locate(self, pending: list[tuple[int, Inbound, Decoded]]) -> list[Grid | None]:
        """Each alert's grid, from one bulk tree query (``GridIndex.locate_many``) over the
        batch's distinct positions: a fixed device repeats its position in every alert."""
        keys = [(a.lat, a.lon) for _, _, a in pending]
        distinct = list(dict.fromkeys(keys))
        found = self.grids.locate_many([k[0] for k in distinct], [k[1] for k in distinct])
        if len(distinct) == len(keys):
            return found
        grid_at = dict(zip(distinct, found, strict=True))
        return [grid_at[k] for k in keys]

    def _grid_text_of(self, grid: Grid) -> tuple[str, str]:
        text = self._grid_text.get(grid.code)
        if text is None:
            text = (
                orjson.dumps([dump(level) for level in grid.path]).decode(),
                " › ".join(level.name for level in grid.path),
            )
            self._grid_text[grid.code] = text
        return text

    def _status(self, out: Assembled, pos: int, msg: Inbound, device_id: str) -> None:
        if not msg.payload:
            return  # a cleared retained status: nothing to record
        status = self._decode(out, pos, msg, device_id, StatusV1, "status")
        if status is None:
            return
        at = status.at.timestamp() if status.at else msg.received_at
        health = orjson.dumps(dump(status.health)).decode() if status.health else None
        out.batch.statuses.append(
            StatusIn(device_id, status.state.value, status.reason, at, status.kind, health)
        )

    def _telemetry(self, out: Assembled, pos: int, msg: Inbound, device_id: str) -> None:
        telemetry = self._decode(out, pos, msg, device_id, TelemetryV1, "telemetry")
        if telemetry is not None:
            out.telemetry.append(telemetry)

    def _decode(
        self, out: Assembled, pos: int, msg: Inbound, device_id: str, model: type[_M], what: str
    ) -> _M | None:
        """A status or telemetry message, or None after dead-lettering it with its reason."""
        try:
            decoded = model.model_validate_json(msg.payload, strict=True)
        except ValidationError as exc:
            self._reject(out, pos, msg, device_id, _schema_rejection(exc))
            return None
        problem = number_problem(decoded, msg.payload)  # the same number rules as alerts
        if problem is not None:
            self._reject(out, pos, msg, device_id, Rejection(*problem))
            return None
        if decoded.device_id != device_id:
            self._reject(
                out,
                pos,
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
    def _reject(
        out: Assembled, pos: int, msg: Inbound, device_id: str | None, rej: Rejection
    ) -> None:
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
                # the detail may quote the sender's text: it is stored and sent back as UTF-8
                rej.detail.encode("utf-8", "replace").decode("utf-8"),
                msg.payload,
                rej.seq,
            )
        )
        out.dead_letter_pos.append(pos)  # after the append: the two lists stay aligned


def internal_rejection(
    exc: BaseException, alert: tuple[str | None, int | None] = (None, None)
) -> Rejection:
    """An unexpected exception turned into a rejection: the class and a short message."""
    text = str(exc).encode("utf-8", "replace").decode("utf-8")
    detail = f"{type(exc).__name__}: {text}"[:500]
    return Rejection(RejectReason.INTERNAL_ERROR, detail, alert[0], alert[1])


def _schema_rejection(exc: ValidationError) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return Rejection(RejectReason.INVALID_JSON, "payload is not valid JSON")
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
    return Rejection(RejectReason.SCHEMA_VIOLATION, detail[:2000])
