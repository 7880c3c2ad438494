"""Decode and validate one alert message: bytes in, an ``AlertV1`` or a reasoned rejection out.

Pure: no I/O. Every way a message can be wrong maps to one ``RejectReason`` and a detail a
person can act on; the caller keeps the raw bytes as a dead letter and tells the device.

One strict parse: whatever this module accepts, every later stage accepts. JSON is read by one
parser, pydantic's (``pydantic_core.from_json`` is the same parser ``model_validate_json``
uses), and one set of number rules applies anywhere in the payload, unknown fields included:
no NaN or Infinity tokens (not JSON, RFC 8259), no number that overflows a double (``1e400``),
no integer outside signed 64-bit (SQLite's INTEGER, and what orjson writes back).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from contract import AlertV1, Catalogue, RejectReason
from contract.messages import ALERT_ID_PATTERN, INT64_MAX

_INT64_MIN = -INT64_MAX - 1
# Only a payload holding one of these can break the number rules: a NaN / Infinity token, an
# integer outside 64 bits (19 digits or more), or a float beyond a double (an exponent of three
# digits or more, or a mantissa of 19+ digits). The valid majority costs one regex scan.
_SUSPECT = re.compile(rb"NaN|Infinity|[0-9]{19}|[eE][+-]?[0-9]{3}")
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
    problem = number_problem(payload)
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
    alert_id, seq = _best_effort_ids(payload)
    return Rejection(reason, "; ".join(found[reason])[:2000], alert_id, seq)


def number_problem(payload: bytes) -> tuple[RejectReason, str] | None:
    """What breaks the number rules in a payload that is otherwise JSON, or None.

    pydantic's parser, as ``model_validate_json`` runs it, reads NaN, Infinity and ``1e400`` as
    floats and keeps integers of any size in fields it does not know; orjson (which rewrites a
    payload that carries a snapshot) and SQLite refuse them later. So they are refused here."""
    if _SUSPECT.search(payload) is None:
        return None
    try:
        tree = from_json(payload, allow_inf_nan=False)
    except ValueError as exc:
        # model_validate_json read this payload, so what fails now is a NaN / Infinity token
        return RejectReason.INVALID_JSON, (
            f"NaN and Infinity are not JSON numbers (RFC 8259): {exc}"[:2000]
        )
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(tree, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, (*path, k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (*path, i)) for i, v in enumerate(node))
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int) and not _INT64_MIN <= node <= INT64_MAX:
            digits = len(str(abs(node)))
            return RejectReason.SCHEMA_VIOLATION, (
                f"{_where(path)}: integer of {digits} digits is outside signed 64-bit"
            )
        elif isinstance(node, float) and not math.isfinite(node):
            return RejectReason.SCHEMA_VIOLATION, (
                f"{_where(path)}: number overflows a 64-bit float"
            )
    return None


def _where(path: tuple[str | int, ...]) -> str:
    # a key is the sender's text: shown shortened, and only if it is printable
    parts = [str(p) if isinstance(p, int) or p.isprintable() else "?" for p in path]
    return ".".join(p[:64] for p in parts) or "(message)"


def _best_effort_ids(payload: bytes) -> tuple[str | None, int | None]:
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
