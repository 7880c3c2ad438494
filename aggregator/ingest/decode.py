"""Decode and validate one alert message: bytes in, an ``AlertV1`` or a reasoned rejection out.

Pure: no I/O. Every way a message can be wrong maps to one ``RejectReason`` and a detail a
person can act on; the caller keeps the raw bytes as a dead letter and tells the device.

One strict parse: whatever this module accepts, every later stage accepts. JSON is read by one
parser, pydantic's (the pipeline rereads a payload with ``pydantic_core.from_json``, the parser
``model_validate_json`` uses), and one set of number rules applies anywhere in the payload,
unknown fields included (``number_problem``): no NaN or Infinity tokens (not JSON, RFC 8259),
no number that overflows a double (``1e400``), no integer outside signed 64-bit (SQLite's
INTEGER, and what orjson writes back).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from contract import AlertV1, Catalogue, RejectReason
from contract.messages import ALERT_ID_PATTERN, INT64_MAX

_INT64_MIN = -INT64_MAX - 1
_ALERT_ID = re.compile(ALERT_ID_PATTERN)

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
    problem = number_problem(alert, payload)
    if problem is not None:
        reason, detail = problem
        return Rejection(reason, detail, alert.alert_id, alert.seq)
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
    alert_id, seq = best_effort_ids(payload)
    return Rejection(reason, "; ".join(found[reason])[:2000], alert_id, seq)


def number_problem(model: BaseModel, payload: bytes) -> tuple[RejectReason, str] | None:
    """What breaks the number rules in a message that validated as ``model``, or None.

    pydantic's parser reads NaN, Infinity and ``1e400`` as floats and keeps integers of any
    size; in the fields a model declares, ``allow_inf_nan=False`` and the 64-bit bounds refuse
    them, but unknown fields (kept, at any depth) take them as they come, and orjson (which
    rewrites a payload that carries a snapshot) and SQLite refuse them later. So the unknown
    fields are walked here: a message without any costs a few attribute reads."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = []
    _unknown_fields(model, (), stack)
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, (*path, k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(node))
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int) and not _INT64_MIN <= node <= INT64_MAX:
            return RejectReason.SCHEMA_VIOLATION, (
                f"{_where(path)}: integer of {node.bit_length()} bits is outside signed 64-bit"
            )
        elif isinstance(node, float) and not math.isfinite(node):
            if math.isnan(node):  # only the token makes a NaN
                return RejectReason.INVALID_JSON, (
                    f"{_where(path)}: NaN is not a JSON number (RFC 8259)"
                )
            if b"Infinity" in payload:
                return RejectReason.INVALID_JSON, (
                    f"{_where(path)}: Infinity is not a JSON number (RFC 8259)"
                )
            return RejectReason.SCHEMA_VIOLATION, (
                f"{_where(path)}: number overflows a 64-bit float"
            )
    return None


def _unknown_fields(
    model: BaseModel, path: tuple[str | int, ...], out: list[tuple[Any, tuple[str | int, ...]]]
) -> None:
    """Push the unknown fields of ``model`` and of every model nested in it onto ``out``."""
    extra = model.__pydantic_extra__
    if extra:
        out.append((extra, path))
    for name in _nested_fields(type(model)):
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _unknown_fields(value, (*path, name), out)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _unknown_fields(item, (*path, name, i), out)


@lru_cache(maxsize=64)
def _nested_fields(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``cls`` that can hold models (their unknown fields are walked too)."""
    return tuple(n for n, f in cls.model_fields.items() if _mentions_model(f.annotation))


def _mentions_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_mentions_model(arg) for arg in get_args(annotation))


def _where(path: tuple[str | int, ...]) -> str:
    # a key is the sender's text: shown shortened, and only if it is printable
    parts = [str(p) if isinstance(p, int) or p.isprintable() else "?" for p in path]
    return ".".join(p[:64] for p in parts) or "(message)"


def best_effort_ids(payload: bytes) -> tuple[str | None, int | None]:
    """alert_id and seq from a message that failed validation, so the feedback can name it.

    Read leniently (NaN tokens, a truncated tail), because a bad latitude or a cut-off message
    must still name the alert when its id can be read; an id is reported only if it is one by
    the contract's rules, so that it is safe to write back to the device."""
    try:
        obj: Any = from_json(payload, allow_inf_nan=True, allow_partial=True)
    except ValueError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    alert_id = obj.get("alert_id")
    seq = obj.get("seq")
    return (
        alert_id if isinstance(alert_id, str) and _ALERT_ID.fullmatch(alert_id) else None,
        seq
        if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= INT64_MAX
        else None,
    )
