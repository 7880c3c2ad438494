"""Response and request models of the operator API: one pydantic model for every body."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aggregator.access.auth import Level
from contract import EventStatus, EventSummary, Location, Severity


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class Problem(_Out):
    """Every error the API returns on purpose."""

    detail: str = Field(description="what went wrong, in words an operator can act on")


# -- auth ------------------------------------------------------------------------------------


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class OperatorOut(_Out):
    username: str
    level: Level
    scope_code: str = Field(description="grid code prefix this operator sees; '' = all")
    department: str | None = Field(description="department code for department accounts")
    display_name: str


class TokenOut(_Out):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme name, not a secret
    expires_at: datetime
    operator: OperatorOut


# -- events ----------------------------------------------------------------------------------


class EventSort(StrEnum):
    REGISTERED_DESC = "-registered_at"
    REGISTERED_ASC = "registered_at"
    LAST_OBSERVED_DESC = "-last_observed_at"
    LAST_OBSERVED_ASC = "last_observed_at"
    SEVERITY_DESC = "-severity"
    SEVERITY_ASC = "severity"
    DEADLINE_ASC = "deadline_at"
    DEADLINE_DESC = "-deadline_at"


class EventItem(EventSummary):
    """An event as listed: the wire summary plus what the pool knows besides."""

    address: str = Field(description="the grid path's names, county › … › grid")
    device_count: int
    updated_at: datetime
    closed_at: datetime | None = None
    overdue: bool = Field(description="open past its handling deadline (督办)")
    snapshot_url: str | None = Field(default=None, description="the event's best snapshot")
    version: int


class EventPage(_Out):
    items: list[EventItem]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class AlertOut(_Out):
    alert_id: str
    device_id: str
    seq: int
    type: str
    severity: Severity
    confidence: float
    observed_at: datetime
    received_at: datetime
    outcome: str = Field(description="accepted (opened the event) or merged")
    location: Location
    grid_code: str
    snapshot_url: str | None = None
    payload: dict[str, Any] = Field(description="the alert as received, snapshot replaced by hash")


class EventDeviceOut(_Out):
    device_id: str
    first_alert_at: datetime
    alert_count: int
    kind: str | None = None
    state: str | None = None
    last_seen: datetime | None = None


class TimelineEntry(_Out):
    at: datetime
    kind: Literal["log", "alert"]
    action: str = Field(description="registered, status:<status>, or the alert's outcome")
    actor: str = Field(description="operator username, 'aggregator', or the device id")
    detail: dict[str, Any]


class EventDetail(EventItem):
    alerts: list[AlertOut]
    alerts_truncated: bool = Field(description="more alerts than alerts_limit exist")
    devices: list[EventDeviceOut]
    snapshot_urls: list[str] = Field(description="every distinct snapshot of the event's alerts")
    timeline: list[TimelineEntry]


class Action(StrEnum):
    VERIFY = "verify"  # 核实
    DISPATCH = "dispatch"  # 吹哨 / 派单
    HANDLE = "handle"  # 处置
    CLOSE = "close"  # 办结 (a summary note is required, Longgang 8.5)

    @property
    def target(self) -> EventStatus:
        return _TARGETS[self]


_TARGETS = {
    Action.VERIFY: EventStatus.VERIFIED,
    Action.DISPATCH: EventStatus.DISPATCHED,
    Action.HANDLE: EventStatus.HANDLING,
    Action.CLOSE: EventStatus.CLOSED,
}


class TransitionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(
        "", max_length=2000, description="why; required when closing (the handling summary)"
    )


class TransitionOut(_Out):
    event_id: int
    from_status: EventStatus
    to_status: EventStatus
    at: datetime
    actor: str
    event: EventItem


# -- catalogue -------------------------------------------------------------------------------


class DepartmentInfo(_Out):
    code: str
    zh: str
    en: str


class TypeInfo(_Out):
    code: str
    zh: str
    en: str
    source: str = Field(description="camera (video AI) or sensor (IoT)")
    department: str
    severity: Severity = Field(description="default severity")
    handling_deadline_s: float = Field(description="community handling deadline (Longgang 8.1)")


class CatalogueOut(_Out):
    version: int
    types: list[TypeInfo]
    departments: list[DepartmentInfo]


# -- devices ---------------------------------------------------------------------------------


class DeviceOut(_Out):
    device_id: str
    kind: str | None
    state: str = Field(description="online, offline or unknown (no status seen yet)")
    online: bool
    state_reason: str | None = None
    state_at: datetime | None = None
    last_seen: datetime
    health: dict[str, Any] | None = Field(description="the device's last reported health")
    location: Location | None = None
    grid_code: str | None = Field(description="grid its position lies in, if any")
    last_seq: int | None = None
    alerts_total: int
    rejected_total: int
    out_of_area_total: int


class DeviceList(_Out):
    items: list[DeviceOut]
    online: int
    offline: int
    unknown: int


# -- grids -----------------------------------------------------------------------------------


class GridProperties(_Out):
    code: str
    name: str
    name_en: str
    kind: str
    households: int | None = None
    county_code: str
    county_name: str
    county_name_en: str
    street_code: str
    street_name: str
    street_name_en: str
    community_code: str
    community_name: str
    community_name_en: str
    event_count: int = Field(description="events registered in this grid (in scope)")
    open_event_count: int


class GridFeature(_Out):
    type: Literal["Feature"] = "Feature"
    id: str
    properties: GridProperties
    geometry: dict[str, Any] = Field(description="GeoJSON Polygon or MultiPolygon, WGS-84")


class GridCollection(_Out):
    type: Literal["FeatureCollection"] = "FeatureCollection"
    features: list[GridFeature]
    bbox: list[float] | None = Field(description="[west, south, east, north] of the features")


# -- dead letters ----------------------------------------------------------------------------


class DeadLetterOut(_Out):
    id: int
    received_at: datetime
    topic: str
    device_id: str | None
    alert_id: str | None
    reason: str
    detail: str
    payload_bytes: int = Field(description="the payload's full size, however much is kept")
    payload_sha256: str | None = Field(
        default=None, description="sha256 of the full payload (None in rows kept before it was)"
    )
    payload_encoding: Literal["utf-8", "base64"] = Field(
        description="utf-8 when the payload decodes as text, else base64 of the raw bytes"
    )
    payload: str
    truncated: bool = Field(
        description="payload shortened: lists show a preview, and the pool keeps only the "
        "first dead_letters.keep_bytes of a long payload"
    )


class DeadLetterPage(_Out):
    items: list[DeadLetterOut]
    next_cursor: str | None


# -- statistics ------------------------------------------------------------------------------


class TypeCount(_Out):
    type: str
    zh: str
    en: str
    count: int


class AreaCount(_Out):
    code: str
    name: str
    count: int


class HourCount(_Out):
    hour: datetime
    count: int


class Stats(_Out):
    since: datetime | None
    until: datetime | None
    events: int
    open_events: int
    overdue_events: int
    alerts: int = Field(description="alerts pooled into these events")
    dedup_ratio: float = Field(description="share of alerts that joined an existing event")
    by_type: list[TypeCount]
    by_status: dict[str, int]
    by_severity: dict[str, int]
    by_community: list[AreaCount]
    by_grid: list[AreaCount] = Field(description="the 20 grids with most events")
    by_hour: list[HourCount] = Field(description="events registered per hour (UTC), last 168")


class HandlingRow(_Out):
    key: str = Field(description="department code, community or grid code, or type code; 'all'")
    name: str = Field(description="its name (Chinese for departments and types)")
    registered: int = Field(description="events registered in the window")
    closed: int
    closed_on_time: int = Field(description="closed by their handling deadline")
    open: int
    overdue: int = Field(description="open past their handling deadline now (督办)")
    handling_rate: float | None = Field(description="处置率: closed / registered")
    on_time_rate: float | None = Field(
        description="按期处置率: closed on time / due, where due = closed + overdue (an open "
        "event whose deadline is ahead is not late yet)"
    )
    median_close_s: float | None = Field(description="median seconds from registration to close")


class HandlingStats(_Out):
    """Longgang 8.6 handling metrics of the events registered in the window (the caller's
    scope). The first-time rate (一次性处置率) is not computed: the lifecycle has no step that
    sends a handled event back for re-handling yet."""

    since: datetime | None
    until: datetime | None
    by: str = Field(description="department, community, grid or type")
    as_of: datetime = Field(description="when 'overdue' was judged")
    total: HandlingRow
    groups: list[HandlingRow] = Field(description="most registered first")


# -- health ----------------------------------------------------------------------------------


class Health(_Out):
    status: Literal["ok"] = "ok"


class Ready(_Out):
    ready: bool
    pool: bool
    broker: bool
