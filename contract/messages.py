"""Wire messages, version 1. Frozen pydantic models; the JSON Schema in contract/schema is
generated from them (``python -m contract.schema_export``) and a test keeps the two equal.

Decoding is strict (``model_validate_json(raw, strict=True)``): a string where a number belongs
is a rejection, not a coercion. Unknown fields are kept (``extra="allow"``), never fatal.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
)
from pydantic_core import PydanticCustomError

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ALERT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
TYPE_CODE_PATTERN = r"^[a-z][a-z0-9_]{1,63}$"
JPEG_MAGIC = b"\xff\xd8\xff"
# Snapshots are capped so that one alert stays well under the broker's packet limit.
SNAPSHOT_MAX_BYTES = 512 * 1024
# Integers that are stored (SQLite INTEGER) must fit a signed 64-bit column.
INT64_MAX = 2**63 - 1


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.LOW: 0, Severity.MEDIUM: 1, Severity.HIGH: 2, Severity.CRITICAL: 3}


def _utc(value: datetime) -> datetime:
    # 0001-01-01T00:00:00+01:00 is a valid RFC 3339 time whose UTC form is in year 0: Python
    # raises OverflowError, which pydantic would let escape instead of reporting an error.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "datetime_out_of_range",
            "time {value} has no UTC form within years 1-9999",
            {"value": value.isoformat()},
        ) from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN, description="device id, topic-safe")]


class _Message(BaseModel):
    """Frozen, keeps unknown fields, refuses NaN and infinity."""

    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", allow_inf_nan=False)


class Location(_Part):
    lat: float = Field(ge=-90, le=90, description="WGS-84 latitude, degrees")
    lon: float = Field(ge=-180, le=180, description="WGS-84 longitude, degrees")
    floor: int | None = Field(default=None, ge=-10, le=200, description="building floor")
    accuracy_m: float | None = Field(default=None, ge=0, description="position accuracy, metres")


class DetectedObject(_Part):
    cls: str = Field(max_length=64, description="detector class, e.g. car, person, motorcycle")
    score: float = Field(ge=0, le=1, description="detector confidence")
    box: tuple[float, float, float, float] | None = Field(
        default=None, description="x1, y1, x2, y2 in pixels of the snapshot"
    )
    track_id: int | None = Field(default=None, ge=0, le=INT64_MAX, description="tracker identity")


class SensorReading(_Part):
    quantity: str = Field(max_length=64, description="e.g. noise_db, water_level_m, gas_ppm")
    value: float
    unit: str = Field(max_length=16)
    threshold: float | None = Field(default=None, description="the limit that was crossed")


class Evidence(_Part):
    detector: str | None = Field(default=None, max_length=64, description="detector or rule")
    model: str | None = Field(default=None, max_length=128, description="model id")
    model_version: str | None = Field(default=None, max_length=64)
    objects: list[DetectedObject] = Field(default_factory=list, max_length=256)
    zone: str | None = Field(default=None, max_length=128, description="configured zone name")
    dwell_s: float | None = Field(default=None, ge=0, description="seconds in the zone")
    reading: SensorReading | None = None


class AlertV1(_Message):
    """One warning raised by one device (topic ``<prefix>/v1/devices/<device_id>/alert``)."""

    schema_: Literal["alert/v1"] = Field(alias="schema", default="alert/v1")
    alert_id: str = Field(pattern=ALERT_ID_PATTERN, description="globally unique; idempotency key")
    device_id: DeviceId
    seq: int = Field(ge=0, le=INT64_MAX, description="per-device, monotonic")
    type: str = Field(pattern=TYPE_CODE_PATTERN, description="code from the warning catalogue")
    severity: Severity | None = Field(default=None, description="defaults to the catalogue's")
    confidence: float = Field(ge=0, le=1)
    observed_at: UtcDatetime = Field(description="UTC, device clock, RFC 3339")
    location: Location
    description: str = Field(default="", max_length=1000)
    evidence: Evidence = Field(default_factory=Evidence)
    snapshot: str | None = Field(
        default=None,
        max_length=(SNAPSHOT_MAX_BYTES * 4) // 3 + 4,
        description="JPEG, base64 (standard alphabet)",
    )

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("snapshot")
    @classmethod
    def _snapshot_is_jpeg(cls, value: str | None) -> str | None:
        if value is not None:
            decode_snapshot(value)
        return value

    def snapshot_bytes(self) -> bytes | None:
        return None if self.snapshot is None else decode_snapshot(self.snapshot)


def decode_snapshot(value: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PydanticCustomError(
            "snapshot_not_jpeg", "snapshot is not valid base64: {err}", {"err": str(exc)}
        ) from exc
    if len(data) > SNAPSHOT_MAX_BYTES:
        raise PydanticCustomError(
            "snapshot_too_large",
            "snapshot is {size} bytes, limit {limit}",
            {"size": len(data), "limit": SNAPSHOT_MAX_BYTES},
        )
    if not data.startswith(JPEG_MAGIC):
        raise PydanticCustomError("snapshot_not_jpeg", "snapshot does not start with a JPEG SOI")
    return data


def encode_snapshot(jpeg: bytes) -> str:
    return base64.b64encode(jpeg).decode("ascii")


class Reading(_Part):
    quantity: str = Field(max_length=64)
    value: float
    unit: str = Field(max_length=16)
    observed_at: UtcDatetime | None = None


class TelemetryV1(_Message):
    """A batch of sensor readings (topic ``.../telemetry``)."""

    schema_: Literal["telemetry/v1"] = Field(alias="schema", default="telemetry/v1")
    device_id: DeviceId
    sent_at: UtcDatetime
    location: Location | None = None
    readings: list[Reading] = Field(max_length=1000)

    model_config = ConfigDict(populate_by_name=True)


class DeviceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Health(_Part):
    fps: float | None = Field(default=None, ge=0)
    inference_ms: float | None = Field(default=None, ge=0)
    outbox_depth: int | None = Field(default=None, ge=0, le=INT64_MAX)
    outbox_dropped: int | None = Field(default=None, ge=0, le=INT64_MAX)
    outbox_resent: int | None = Field(
        default=None,
        ge=0,
        le=INT64_MAX,
        description="alerts published again because the aggregator's feedback did not come in "
        "time (the outbox keeps an alert until it does)",
    )
    frames_dropped: int | None = Field(default=None, ge=0, le=INT64_MAX)
    uptime_s: float | None = Field(default=None, ge=0)
    version: str | None = Field(default=None, max_length=64)


class StatusV1(_Message):
    """Retained device status; the same topic carries the Last Will (state offline)."""

    schema_: Literal["status/v1"] = Field(alias="schema", default="status/v1")
    device_id: DeviceId
    state: DeviceState
    at: UtcDatetime | None = Field(default=None, description="absent in a Last Will")
    reason: str | None = Field(default=None, max_length=128, description="e.g. last_will")
    kind: Literal["camera", "sensor", "hub"] | None = None
    health: Health | None = None

    model_config = ConfigDict(populate_by_name=True)


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # a new event was opened
    MERGED = "merged"  # joined an open event
    DUPLICATE = "duplicate"  # this alert_id was already stored: nothing changed
    REJECTED = "rejected"  # kept as a dead letter; see reason
    OUT_OF_AREA = "out_of_area"  # outside every grid of this pool (Longgang 7.1)


class RejectReason(StrEnum):
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    SCHEMA_VIOLATION = "schema_violation"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_LOCATION = "invalid_location"
    OBSERVED_IN_FUTURE = "observed_in_future"
    DEVICE_MISMATCH = "device_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    SNAPSHOT_NOT_JPEG = "snapshot_not_jpeg"
    SNAPSHOT_TOO_LARGE = "snapshot_too_large"
    BAD_TOPIC = "bad_topic"
    # the message made the aggregator fail (a fault of ours, found by bisecting its batch): it
    # is kept so that the fault can be reproduced, and every other message went on
    INTERNAL_ERROR = "internal_error"


class FeedbackV1(_Message):
    """Aggregator → device: what became of an alert (topic ``.../feedback``)."""

    schema_: Literal["feedback/v1"] = Field(alias="schema", default="feedback/v1")
    device_id: DeviceId
    alert_id: str | None = Field(default=None, description="absent when it could not be read")
    seq: int | None = None
    outcome: Outcome
    event_id: int | None = Field(default=None, description="for accepted, merged, duplicate")
    reason: RejectReason | None = Field(default=None, description="for rejected")
    detail: str | None = Field(default=None, max_length=2000)
    dead_letter_id: int | None = Field(
        default=None, description="where the rejected message is kept: /api/v1/dead-letters/<id>"
    )
    at: UtcDatetime

    model_config = ConfigDict(populate_by_name=True)


def feedback_json(
    *,
    device_id: str,
    outcome: Outcome,
    at: datetime,
    alert_id: str | None = None,
    seq: int | None = None,
    event_id: int | None = None,
    reason: RejectReason | None = None,
    detail: str | None = None,
    dead_letter_id: int | None = None,
) -> bytes:
    """``FeedbackV1(...).to_json()`` for values that are valid already (they come from a
    validated alert and the pool): the same bytes, without building a model. It is an item of
    ``feedback_item_json`` between the envelope's fields; ``tests/contract/test_contract.py``
    checks that both agree with the models."""
    item = feedback_item_json(
        outcome=outcome,
        alert_id=alert_id,
        seq=seq,
        event_id=event_id,
        reason=reason,
        detail=detail,
        dead_letter_id=dead_letter_id,
    )
    return b'{"schema":"feedback/v1","device_id":%s,%s,"at":%s}' % (
        orjson.dumps(device_id),
        item[1:-1],
        orjson.dumps(at, option=orjson.OPT_UTC_Z),
    )


FEEDBACK_BATCH_MAX_ITEMS = 500


class FeedbackItem(_Part):
    """One alert's outcome inside a ``FeedbackBatchV1``: FeedbackV1's fields less ``schema``,
    ``device_id`` and ``at``, which the batch carries once."""

    alert_id: str | None = Field(default=None, description="absent when it could not be read")
    seq: int | None = None
    outcome: Outcome
    event_id: int | None = Field(default=None, description="for accepted, merged, duplicate")
    reason: RejectReason | None = Field(default=None, description="for rejected")
    detail: str | None = Field(default=None, max_length=2000)
    dead_letter_id: int | None = Field(
        default=None, description="where the rejected message is kept: /api/v1/dead-letters/<id>"
    )


class FeedbackBatchV1(_Message):
    """Aggregator → device: the outcomes of several of its messages committed in one
    transaction, in the order they were handled (topic ``.../feedback``, like FeedbackV1). Sent
    instead of one FeedbackV1 each when a commit holds more than one outcome for the device;
    ``parse_feedback`` reads either."""

    schema_: Literal["feedback-batch/v1"] = Field(alias="schema", default="feedback-batch/v1")
    device_id: DeviceId
    items: list[FeedbackItem] = Field(min_length=1, max_length=FEEDBACK_BATCH_MAX_ITEMS)
    at: UtcDatetime

    model_config = ConfigDict(populate_by_name=True)

    def expand(self) -> list[FeedbackV1]:
        """One FeedbackV1 per item, as if each had been sent alone."""
        return [
            FeedbackV1.model_construct(
                device_id=self.device_id,
                at=self.at,
                **dict(item),
            )
            for item in self.items
        ]


_FEEDBACK = TypeAdapter(Annotated[FeedbackV1 | FeedbackBatchV1, Field(discriminator="schema_")])


def parse_feedback(payload: bytes | bytearray | str) -> list[FeedbackV1]:
    """The outcomes in a message on a device's feedback topic, whichever of ``feedback/v1`` and
    ``feedback-batch/v1`` it is. Raises pydantic's ValidationError on anything else."""
    message = _FEEDBACK.validate_json(payload, strict=True)
    return message.expand() if isinstance(message, FeedbackBatchV1) else [message]


def feedback_item_json(
    *,
    outcome: Outcome,
    alert_id: str | None = None,
    seq: int | None = None,
    event_id: int | None = None,
    reason: RejectReason | None = None,
    detail: str | None = None,
    dead_letter_id: int | None = None,
) -> bytes:
    """``FeedbackItem(...)``'s JSON inside a batch, for values that are valid already."""
    if (
        alert_id is not None
        and seq is not None
        and event_id is not None
        and reason is None
        and detail is None
        and dead_letter_id is None
    ):
        # accepted / merged / duplicate: ids match their patterns, nothing needs escaping
        return b'{"alert_id":"%s","seq":%d,"outcome":"%s","event_id":%d}' % (
            alert_id.encode(),
            seq,
            outcome.value.encode(),
            event_id,
        )
    out: dict[str, Any] = {}
    if alert_id is not None:
        out["alert_id"] = alert_id
    if seq is not None:
        out["seq"] = seq
    out["outcome"] = outcome.value
    if event_id is not None:
        out["event_id"] = event_id
    if reason is not None:
        out["reason"] = reason.value
    if detail is not None:
        out["detail"] = detail
    if dead_letter_id is not None:
        out["dead_letter_id"] = dead_letter_id
    return orjson.dumps(out)


def feedback_batch_json(device_id: str, items: list[bytes], at: datetime) -> bytes:
    """``FeedbackBatchV1(...).to_json()`` from items made by ``feedback_item_json``: the same
    bytes without building models (``tests/contract/test_contract.py`` checks)."""
    return b'{"schema":"feedback-batch/v1","device_id":%s,"items":[%s],"at":%s}' % (
        orjson.dumps(device_id),
        b",".join(items),
        orjson.dumps(at, option=orjson.OPT_UTC_Z),
    )


class EventStatus(StrEnum):
    REGISTERED = "registered"  # 登记 (7.1)
    VERIFIED = "verified"  # 核实 (7.1)
    DISPATCHED = "dispatched"  # 吹哨 / 派单 (7.3)
    HANDLING = "handling"  # 处置中 (8)
    CLOSED = "closed"  # 办结 (8.5); a closed event absorbs nothing

    @property
    def is_open(self) -> bool:
        return self is not EventStatus.CLOSED


class GridLevel(_Part):
    level: Literal["county", "street", "community", "grid"]
    code: str
    name: str


class EventSummary(_Part):
    event_id: int
    source: Literal["smart_community_warning"] = "smart_community_warning"
    type: str
    type_zh: str
    type_en: str
    severity: Severity
    status: EventStatus
    department: str
    grid_code: str
    grid_path: list[GridLevel]
    location: Location
    description: str
    first_observed_at: UtcDatetime
    last_observed_at: UtcDatetime
    registered_at: UtcDatetime
    deadline_at: UtcDatetime
    alert_count: int
    device_ids: list[str]
    snapshot_sha256: str | None = None
    recurrence_of: int | None = Field(default=None, description="the closed event this repeats")


class EventNoticeV1(_Message):
    """Aggregator → integrators: an event was created, updated or closed (topic ``.../events``)."""

    schema_: Literal["event/v1"] = Field(alias="schema", default="event/v1")
    change: Literal["created", "updated", "closed"]
    event: EventSummary
    at: UtcDatetime

    model_config = ConfigDict(populate_by_name=True)


def event_notice_json(change: str, event: dict[str, Any], at: datetime) -> bytes:
    """``EventNoticeV1(change=..., event=EventSummary(**event), at=at).to_json()`` for an event
    given as the summary's JSON-ready dict (wire names, no nulls, datetimes as aware
    datetimes): the same bytes without building models. The aggregator sends one per touched
    event per batch; ``tests/contract`` and ``tests/aggregator/test_dedup.py`` check both agree."""
    return orjson.dumps(
        {"schema": "event/v1", "change": change, "event": event, "at": at},
        option=orjson.OPT_UTC_Z,
    )


# -- case/v1 ---------------------------------------------------------------------------------

CASE_STATE_PATTERN = r"^[a-z][a-z_]{0,31}$"
CLOCK_PATTERN = r"^[a-z][a-z_]{0,31}$"


class SupervisionKind(StrEnum):
    """What a supervision item (督办, Longgang 9.1) is."""

    REMINDER = "reminder"  # 催办: before a stage deadline
    OVERDUE = "overdue"  # 超期督办: the deadline passed
    ESCALATE_STREET = "escalate_street"  # 升级督办(街道)
    ESCALATE_COUNTY = "escalate_county"  # 升级督办(区县)


class SupervisionItem(_Part):
    """One supervision item of a case, as the events topic, the webhooks and the API show it."""

    item: str = Field(
        max_length=200,
        description="the item's key in the case: '<run>:<clock>:<kind>:<deadline UNIX s>'",
    )
    kind: SupervisionKind
    kind_zh: str = Field(max_length=64, description="the kind as operators read it: 催办, …")
    clock: str = Field(
        pattern=CLOCK_PATTERN,
        description="the stage clock: community_handle, accept, feedback, arrive, hard_close, "
        "rehandle (the lifecycle table may add more)",
    )
    level: Literal["community", "department", "street", "county"] = Field(
        description="who is chased"
    )
    due_at: UtcDatetime = Field(description="the stage deadline")
    raised_at: UtcDatetime
    case_version: int = Field(ge=1, le=INT64_MAX, description="the case's version when raised")
    audit_seq: int = Field(ge=1, le=INT64_MAX, description="its row in the case audit trail")


class CaseNoticeV1(_Message):
    """Aggregator → integrators, on the events topic beside ``event/v1``: something happened to
    a case that did not change it (today: a supervision item was raised; a consumer tells the
    two apart by ``schema`` and ignores a ``change`` it does not know)."""

    schema_: Literal["case/v1"] = Field(alias="schema", default="case/v1")
    change: Literal["supervision"] = "supervision"
    event_id: int = Field(ge=1, le=INT64_MAX, description="the case's event")
    state: str = Field(
        pattern=CASE_STATE_PATTERN,
        description="the case state: registered, assessing, community_handling, whistled, "
        "dept_handling, en_route, on_site, reviewing, rehandling, closed",
    )
    version: int = Field(ge=1, le=INT64_MAX, description="the case's version (unchanged)")
    grid_code: str = Field(max_length=32)
    type: str = Field(pattern=TYPE_CODE_PATTERN, description="warning type code")
    departments: list[str] = Field(
        max_length=17, description="the lead department, then co-departments; empty before"
    )
    supervision: SupervisionItem
    at: UtcDatetime

    model_config = ConfigDict(populate_by_name=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


MESSAGE_MODELS: dict[str, type[_Message]] = {
    "alert": AlertV1,
    "telemetry": TelemetryV1,
    "status": StatusV1,
    "feedback": FeedbackV1,
    "feedback-batch": FeedbackBatchV1,
    "event": EventNoticeV1,
    "case": CaseNoticeV1,
}


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict with wire names (``schema``, not ``schema_``)."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
