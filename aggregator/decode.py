"""Decode and validate one alert message: bytes in, an ``AlertV1`` or a reasoned rejection out.

Pure: no I/O. Every way a message can be wrong maps to one ``RejectReason`` and a detail a
person can act on; the caller keeps the raw bytes as a dead letter and tells the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from contract import AlertV1, Catalogue, RejectReason

_LOCATION_ERRORS = {"greater_than_equal", "less_than_equal", "finite_number"}
# When a message is wrong in several ways, the most basic fault is reported.
_PRIORITY = [
    RejectReason.INVALID_JSON,
    RejectReason.UNSUPPORTED_SCHEMA,
    RejectReason.SNAPSHOT_TOO_LARGE,
    RejectReason.SNAPSHOT_NOT_JPEG,
    RejectReason.INVALID_LOCATION,
    RejectReason.SCHEMA_VIOLATION,
]


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str
    alert_id: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_payload_bytes: int = 1024 * 1024
    max_clock_skew: timedelta = timedelta(seconds=300)


def decode_alert(
    payload: bytes,
    topic_device_id: str,
    catalogue: Catalogue,
    now: datetime,
    limits: DecodeLimits,
) -> AlertV1 | Rejection:
    if len(payload) > limits.max_payload_bytes:
        return Rejection(
            RejectReason.PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes, limit {limits.max_payload_bytes}; "
            "shrink the snapshot (JPEG quality or size)",
        )
    try:
        alert = AlertV1.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        # The JSON parser refuses invalid UTF-8 too; tell that case apart only on failure, so
        # the valid majority is not decoded twice.
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as bad:
            return Rejection(
                RejectReason.INVALID_UTF8, f"payload is not UTF-8: {bad.reason} at byte {bad.start}"
            )
        return _classify(exc, payload)
    if alert.device_id != topic_device_id:
        return Rejection(
            RejectReason.DEVICE_MISMATCH,
            f"payload device_id {alert.device_id!r} differs from the topic's "
            f"{topic_device_id!r}; a device publishes only as itself",
            alert.alert_id,
            alert.seq,
        )
    if alert.type not in catalogue.types:
        return Rejection(
            RejectReason.UNKNOWN_TYPE,
            f"type {alert.type!r} is not in the warning catalogue; known: "
            + ", ".join(sorted(catalogue.types)),
            alert.alert_id,
            alert.seq,
        )
    if alert.observed_at > now + limits.max_clock_skew:
        ahead = (alert.observed_at - now).total_seconds()
        return Rejection(
            RejectReason.OBSERVED_IN_FUTURE,
            f"observed_at {alert.observed_at.isoformat()} is {ahead:.0f} s ahead of the "
            f"aggregator clock (allowed skew {limits.max_clock_skew.total_seconds():.0f} s); "
            "sync the device clock (NTP)",
            alert.alert_id,
            alert.seq,
        )
    return alert


def _classify(exc: ValidationError, payload: bytes) -> Rejection:
    found: dict[RejectReason, list[str]] = {}
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        where = ".".join(str(p) for p in loc) or "(message)"
        if kind == "json_invalid":
            reason = RejectReason.INVALID_JSON
        elif loc[:1] == ("schema",):
            reason = RejectReason.UNSUPPORTED_SCHEMA
        elif kind in ("snapshot_too_large", "snapshot_not_jpeg"):
            reason = RejectReason(kind)
        elif loc[:1] == ("snapshot",) and kind == "string_too_long":
            reason = RejectReason.SNAPSHOT_TOO_LARGE
        elif loc[:1] == ("location",) and kind in _LOCATION_ERRORS:
            reason = RejectReason.INVALID_LOCATION
        else:
            reason = RejectReason.SCHEMA_VIOLATION
        found.setdefault(reason, []).append(f"{where}: {err['msg']}")
    if not found:  # pragma: no cover - pydantic always reports at least one error
        found[RejectReason.SCHEMA_VIOLATION] = [str(exc)]
    reason = min(found, key=_PRIORITY.index)
    if reason is RejectReason.UNSUPPORTED_SCHEMA:
        found[reason].append("this aggregator reads schema 'alert/v1'")
    alert_id, seq = (
        _best_effort_ids(payload) if reason is not RejectReason.INVALID_JSON else (None, None)
    )
    return Rejection(reason, "; ".join(found[reason])[:2000], alert_id, seq)


def _best_effort_ids(payload: bytes) -> tuple[str | None, int | None]:
    """alert_id and seq from a message that failed validation, so the feedback can name it."""
    try:
        obj: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    alert_id = obj.get("alert_id")
    seq = obj.get("seq")
    return (
        alert_id if isinstance(alert_id, str) and len(alert_id) <= 128 else None,
        seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )
