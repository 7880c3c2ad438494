"""Devices, grids, dead letters, statistics and snapshots."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from aggregator.access.auth import Level, Operator
from aggregator.api.deps import AUTH_RESPONSES, SCOPED_RESPONSES, Ctx, CurrentOperator, Db
from aggregator.api.events import GRID_PREFIX, decode_cursor, encode_cursor, to_ts
from aggregator.api.models import (
    AreaCount,
    CatalogueOut,
    DeadLetterOut,
    DeadLetterPage,
    DepartmentInfo,
    DeviceList,
    DeviceOut,
    GridCollection,
    GridFeature,
    GridProperties,
    HandlingRow,
    HandlingStats,
    HourCount,
    Problem,
    Stats,
    TypeCount,
    TypeInfo,
)
from aggregator.grids import GridIndex
from aggregator.pool import queries
from aggregator.pool.handling import GroupBy, Handling, group_name
from aggregator.pool.reader import Row
from contract import Location, RejectReason
from contract.messages import DEVICE_ID_PATTERN

router = APIRouter(prefix="/api/v1")

COMMUNITY_LENGTH = 12
LIST_PREVIEW = 512


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


# -- catalogue -------------------------------------------------------------------------------


@router.get(
    "/catalogue",
    response_model=CatalogueOut,
    responses=AUTH_RESPONSES,
    tags=["catalogue"],
    summary="Warning types and departments with their Chinese and English names",
)
def catalogue(ctx: Ctx, operator: CurrentOperator) -> CatalogueOut:
    c = ctx.catalogue
    return CatalogueOut(
        version=c.version,
        types=[
            TypeInfo(
                code=wt.code,
                zh=wt.zh,
                en=wt.en,
                source=wt.source.value,
                department=wt.department,
                severity=wt.severity,
                handling_deadline_s=wt.handling_deadline.total_seconds(),
            )
            for wt in c.types.values()
        ],
        departments=[
            DepartmentInfo(code=code, zh=d.zh, en=d.en) for code, d in c.departments.items()
        ],
    )


# -- devices ---------------------------------------------------------------------------------


@router.get(
    "/devices",
    response_model=DeviceList,
    responses=AUTH_RESPONSES,
    tags=["devices"],
    summary="Devices in the caller's scope with their state, last contact and health",
)
def list_devices(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    state: Annotated[str | None, Query(pattern="^(online|offline|unknown)$")] = None,
    grid: Annotated[str | None, Query(pattern=GRID_PREFIX)] = None,
) -> DeviceList:
    linked: set[str] | None = None
    if not operator.is_admin:
        # A device is in scope where it stands in the operator's area, or where it raised an
        # event the operator may see (a department's view is its events' devices only).
        linked = queries.scoped_device_ids(conn, operator.event_filter("e"))
    items: list[DeviceOut] = []
    for r in queries.devices(conn):
        grid_code = _grid_of(ctx.grids, r["lat"], r["lon"])
        if linked is not None:
            placed = (
                operator.level is not Level.DEPARTMENT
                and grid_code is not None
                and operator.sees_grid(grid_code)
            )
            if not placed and r["device_id"] not in linked:
                continue
        if grid and (grid_code is None or not grid_code.startswith(grid)):
            continue
        if state and r["state"] != state:
            continue
        items.append(_device(r, grid_code))
    counts = {"online": 0, "offline": 0, "unknown": 0}
    for d in items:
        counts[d.state if d.state in counts else "unknown"] += 1
    return DeviceList(items=items, **counts)


def _grid_of(grids: GridIndex, lat: float | None, lon: float | None) -> str | None:
    if lat is None or lon is None:
        return None
    found = grids.locate(lat, lon)
    return found.code if found else None


def _device(r: Row, grid_code: str | None) -> DeviceOut:
    health: dict[str, Any] | None = None
    if r["health"]:
        try:
            parsed = orjson.loads(r["health"])
            health = parsed if isinstance(parsed, dict) else {"value": parsed}
        except orjson.JSONDecodeError:
            health = {"text": r["health"]}
    location = None
    if r["lat"] is not None and r["lon"] is not None:
        location = Location(lat=r["lat"], lon=r["lon"])
    last_seen = _dt(r["last_seen"])
    assert last_seen is not None
    return DeviceOut(
        device_id=r["device_id"],
        kind=r["kind"],
        state=r["state"],
        online=r["state"] == "online",
        state_reason=r["state_reason"],
        state_at=_dt(r["state_at"]),
        last_seen=last_seen,
        health=health,
        location=location,
        grid_code=grid_code,
        last_seq=r["last_seq"],
        alerts_total=r["alerts_total"],
        rejected_total=r["rejected_total"],
        out_of_area_total=r["out_of_area_total"],
    )


# -- grids -----------------------------------------------------------------------------------


@router.get(
    "/grids",
    response_model=GridCollection,
    responses=AUTH_RESPONSES,
    tags=["grids"],
    summary="Grid polygons in the caller's scope (GeoJSON) with codes, names and event counts",
)
def grids_geojson(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    prefix: Annotated[str | None, Query(pattern=GRID_PREFIX)] = None,
) -> GridCollection:
    counts = queries.grid_counts(conn, operator.event_filter("e"))
    features: list[GridFeature] = []
    west, south, east, north = 180.0, 90.0, -180.0, -90.0
    for feature in ctx.grid_features:
        code: str = feature["id"]
        if not operator.sees_grid(code) or (prefix and not code.startswith(prefix)):
            continue
        total, open_ = counts.get(code, (0, 0))
        props = dict(feature["properties"])
        props.update(event_count=total, open_event_count=open_)
        features.append(
            GridFeature(id=code, properties=GridProperties(**props), geometry=feature["geometry"])
        )
        grid = ctx.grids.get(code)
        if grid is not None:
            w, s, e, n = grid.polygon.bounds
            west, south, east, north = min(west, w), min(south, s), max(east, e), max(north, n)
    bbox = [west, south, east, north] if features else None
    return GridCollection(features=features, bbox=bbox)


# -- dead letters ----------------------------------------------------------------------------


def _require_admin(operator: Operator) -> None:
    if not operator.is_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "dead letters may hold any device's data: administrators only",
        )


def _dead_letter(r: Row, limit: int | None) -> DeadLetterOut:
    raw: bytes = bytes(r["payload"])
    # the pool keeps only the head of a long payload (dead_letters.keep_bytes), and its size
    size: int = r["payload_size"] if r["payload_size"] is not None else len(raw)
    capped = size > len(raw)
    if capped:  # the cut may split a UTF-8 sequence: drop its pieces, keep the text readable
        for cut in range(4):
            try:
                raw[: len(raw) - cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            raw = raw[: len(raw) - cut]
            break
    try:
        text = raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        text = base64.b64encode(raw).decode("ascii")
        encoding = "base64"
    truncated = capped or (limit is not None and len(text) > limit)
    return DeadLetterOut(
        id=r["id"],
        received_at=datetime.fromtimestamp(r["received_at"], UTC),
        topic=r["topic"],
        device_id=r["device_id"],
        alert_id=r["alert_id"],
        reason=r["reason"],
        detail=r["detail"],
        payload_bytes=size,
        payload_sha256=r["payload_sha256"],
        payload_encoding=encoding,
        payload=text[:limit] if truncated and limit is not None else text,
        truncated=truncated,
    )


_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **SCOPED_RESPONSES,
    400: {"model": Problem, "description": "bad cursor"},
    403: {"model": Problem, "description": "not an administrator"},
}


@router.get(
    "/dead-letters",
    response_model=DeadLetterPage,
    responses=_ADMIN_RESPONSES,
    tags=["dead letters"],
    summary="Rejected messages, newest first (payload preview)",
)
def list_dead_letters(
    conn: Db,
    operator: CurrentOperator,
    reason: RejectReason | None = None,
    device: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> DeadLetterPage:
    _require_admin(operator)
    last: int | None = None
    if cursor:
        got = decode_cursor(cursor).get("i")
        if not isinstance(got, int):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid cursor")
        last = got
    rows = queries.dead_letters(
        conn,
        reason=reason.value if reason else None,
        device_id=device,
        before_id=last,
        limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return DeadLetterPage(
        items=[_dead_letter(r, LIST_PREVIEW) for r in rows],
        next_cursor=encode_cursor({"i": rows[-1]["id"]}) if more and rows else None,
    )


@router.get(
    "/dead-letters/{dead_letter_id}",
    response_model=DeadLetterOut,
    responses=_ADMIN_RESPONSES,
    tags=["dead letters"],
    summary="One rejected message with its whole payload",
)
def get_dead_letter(
    conn: Db, operator: CurrentOperator, dead_letter_id: Annotated[int, Path(ge=1, le=2**62)]
) -> DeadLetterOut:
    _require_admin(operator)
    row = queries.dead_letter(conn, dead_letter_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {dead_letter_id}")
    return _dead_letter(row, None)


# -- statistics ------------------------------------------------------------------------------


@router.get(
    "/stats",
    response_model=Stats,
    responses={**AUTH_RESPONSES, 400: {"model": Problem, "description": "date out of range"}},
    tags=["statistics"],
    summary="Counts by type, status, severity, community, grid and hour (the caller's scope)",
)
def stats(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    grid: Annotated[str | None, Query(pattern=GRID_PREFIX)] = None,
    since: Annotated[datetime | None, Query(description="registered at or after")] = None,
    until: Annotated[datetime | None, Query(description="registered before")] = None,
) -> Stats:
    counts = queries.EventStats(
        conn,
        operator.event_filter("e"),
        grid,
        to_ts(since, "since"),
        to_ts(until, "until"),
    )
    totals = counts.totals(time.time())
    total, alerts = totals.events, totals.alerts
    by_type = []
    for code, n in counts.by_type():
        wt = ctx.catalogue.types.get(code)
        by_type.append(
            TypeCount(type=code, zh=wt.zh if wt else code, en=wt.en if wt else code, count=n)
        )
    by_community = []
    for code, n in counts.by_area(COMMUNITY_LENGTH):
        area = ctx.grids.area(code)
        by_community.append(AreaCount(code=code, name=area.name if area else code, count=n))
    by_grid = []
    for code, n in counts.by_grid()[:20]:
        g = ctx.grids.get(code)
        by_grid.append(AreaCount(code=code, name=g.name if g else code, count=n))
    return Stats(
        since=since,
        until=until,
        events=total,
        open_events=totals.open_events,
        overdue_events=totals.overdue_events,
        alerts=alerts,
        dedup_ratio=(alerts - total) / alerts if alerts else 0.0,
        by_type=by_type,
        by_status=dict(counts.by_status()),
        by_severity=dict(counts.by_severity()),
        by_community=by_community,
        by_grid=by_grid,
        by_hour=[
            HourCount(hour=datetime.fromtimestamp(h * 3600, UTC), count=n)
            for h, n in counts.by_hour()
        ],
    )


@router.get(
    "/stats/handling",
    response_model=HandlingStats,
    responses={**AUTH_RESPONSES, 400: {"model": Problem, "description": "date out of range"}},
    tags=["statistics"],
    summary="Handling rate, on-time rate and overdue events (Longgang 8.6) by department, "
    "community, grid or type",
)
def handling(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    by: GroupBy = GroupBy.DEPARTMENT,
    grid: Annotated[str | None, Query(pattern=GRID_PREFIX)] = None,
    since: Annotated[datetime | None, Query(description="registered at or after")] = None,
    until: Annotated[datetime | None, Query(description="registered before")] = None,
) -> HandlingStats:
    selection = queries.EventStats(
        conn, operator.event_filter("e"), grid, to_ts(since, "since"), to_ts(until, "until")
    )
    now = time.time()
    total, groups = selection.handling(by, now)

    def row(h: Handling, label: str) -> HandlingRow:
        return HandlingRow(
            key=h.key,
            name=label,
            registered=h.registered,
            closed=h.closed,
            closed_on_time=h.closed_on_time,
            open=h.open,
            overdue=h.overdue,
            handling_rate=h.handling_rate,
            on_time_rate=h.on_time_rate,
            median_close_s=h.median_close_s,
        )

    return HandlingStats(
        since=since,
        until=until,
        by=by.value,
        as_of=datetime.fromtimestamp(now, UTC),
        total=row(total, "all"),
        groups=[row(h, group_name(by, h.key, ctx.catalogue, ctx.grids)) for h in groups],
    )


# -- snapshots -------------------------------------------------------------------------------


@router.get(
    "/snapshots/{sha256}",
    response_class=Response,
    responses={
        **SCOPED_RESPONSES,
        200: {"content": {"image/jpeg": {}}, "description": "the JPEG"},
    },
    tags=["events"],
    summary="A snapshot (JPEG) of an event in the caller's scope",
)
def snapshot(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    sha256: Annotated[str, Path(pattern="^[0-9a-f]{64}$")],
) -> Response:
    if not operator.is_admin and not queries.scoped_snapshot(
        conn, operator.event_filter("e"), sha256
    ):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such snapshot in your scope")
    data = ctx.snapshots.get(sha256)
    if data is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such snapshot")
    # Content-addressed: the bytes behind a hash never change.
    return Response(
        data,
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
