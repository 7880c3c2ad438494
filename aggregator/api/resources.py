"""Devices, grids, dead letters, statistics and snapshots."""

from __future__ import annotations

import base64
import sqlite3
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
from aggregator.pool.handling import GroupBy, Handling, group_name, handling_stats
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
        scope, params = operator.event_filter("e")
        linked = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT d.device_id FROM event_devices d"
                f" JOIN events e ON e.id = d.event_id WHERE {scope}",
                params,
            )
        }
    items: list[DeviceOut] = []
    for r in conn.execute("SELECT * FROM devices ORDER BY device_id"):
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


def _device(r: sqlite3.Row, grid_code: str | None) -> DeviceOut:
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
    scope, params = operator.event_filter("e")
    counts = {
        r[0]: (r[1], r[2])
        for r in conn.execute(
            "SELECT e.grid_code, count(*), sum(e.status != 'closed') FROM events e"
            f" WHERE {scope} GROUP BY e.grid_code",
            params,
        )
    }
    features: list[GridFeature] = []
    west, south, east, north = 180.0, 90.0, -180.0, -90.0
    for feature in ctx.grid_features:
        code: str = feature["id"]
        if not operator.sees_grid(code) or (prefix and not code.startswith(prefix)):
            continue
        total, open_ = counts.get(code, (0, 0))
        props = dict(feature["properties"])
        props.update(event_count=total, open_event_count=open_ or 0)
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


def _dead_letter(r: sqlite3.Row, limit: int | None) -> DeadLetterOut:
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
    where: list[str] = ["1=1"]
    args: list[Any] = []
    if reason:
        where.append("reason = ?")
        args.append(reason.value)
    if device:
        where.append("device_id = ?")
        args.append(device)
    if cursor:
        last = decode_cursor(cursor).get("i")
        if not isinstance(last, int):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid cursor")
        where.append("id < ?")
        args.append(last)
    rows = conn.execute(
        f"SELECT * FROM dead_letters WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        [*args, limit + 1],
    ).fetchall()
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
    row = conn.execute("SELECT * FROM dead_letters WHERE id = ?", (dead_letter_id,)).fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {dead_letter_id}")
    return _dead_letter(row, None)


# -- statistics ------------------------------------------------------------------------------


def _selection(
    operator: Operator, grid: str | None, since: datetime | None, until: datetime | None
) -> tuple[list[str], list[Any]]:
    """SQL conditions on events ``e`` (and their parameters): the operator's scope, a grid
    prefix and the registration window."""
    scope, params = operator.event_filter("e")
    where: list[str] = [scope]
    args: list[Any] = list(params)
    if grid:
        where.append(f"substr(e.grid_code, 1, {len(grid)}) = ?")
        args.append(grid)
    t0, t1 = to_ts(since, "since"), to_ts(until, "until")
    if t0 is not None:
        where.append("e.registered_at >= ?")
        args.append(t0)
    if t1 is not None:
        where.append("e.registered_at < ?")
        args.append(t1)
    return where, args


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
    where, args = _selection(operator, grid, since, until)
    cond = " AND ".join(where)
    now = time.time()
    total, open_, overdue, alerts = conn.execute(
        "SELECT count(*), coalesce(sum(e.status != 'closed'), 0),"
        " coalesce(sum(e.status != 'closed' AND e.deadline_at < ?), 0),"
        f" coalesce(sum(e.alert_count), 0) FROM events e WHERE {cond}",
        [now, *args],
    ).fetchone()

    def grouped(expr: str) -> list[tuple[Any, int]]:
        return [
            (r[0], r[1])
            for r in conn.execute(
                f"SELECT {expr} AS k, count(*) AS n FROM events e WHERE {cond}"
                " GROUP BY k ORDER BY n DESC, k",
                args,
            )
        ]

    by_type = []
    for code, n in grouped("e.type"):
        wt = ctx.catalogue.types.get(code)
        by_type.append(
            TypeCount(type=code, zh=wt.zh if wt else code, en=wt.en if wt else code, count=n)
        )
    by_community = []
    for code, n in grouped(f"substr(e.grid_code, 1, {COMMUNITY_LENGTH})"):
        area = ctx.grids.area(code)
        by_community.append(AreaCount(code=code, name=area.name if area else code, count=n))
    by_grid = []
    for code, n in grouped("e.grid_code")[:20]:
        g = ctx.grids.get(code)
        by_grid.append(AreaCount(code=code, name=g.name if g else code, count=n))
    hours = conn.execute(
        "SELECT CAST(e.registered_at / 3600 AS INTEGER) AS h, count(*) FROM events e"
        f" WHERE {cond} GROUP BY h ORDER BY h DESC LIMIT 168",
        args,
    ).fetchall()
    return Stats(
        since=since,
        until=until,
        events=total,
        open_events=open_,
        overdue_events=overdue,
        alerts=alerts,
        dedup_ratio=(alerts - total) / alerts if alerts else 0.0,
        by_type=by_type,
        by_status=dict(grouped("e.status")),
        by_severity=dict(grouped("e.severity")),
        by_community=by_community,
        by_grid=by_grid,
        by_hour=[
            HourCount(hour=datetime.fromtimestamp(h * 3600, UTC), count=n)
            for h, n in reversed(hours)
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
    where, args = _selection(operator, grid, since, until)
    now = time.time()
    total, groups = handling_stats(conn, by, now, where=where, params=args)

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
    if not operator.is_admin:
        scope, params = operator.event_filter("e")
        hit = conn.execute(
            f"SELECT 1 FROM events e WHERE e.snapshot_sha256 = ? AND {scope}"
            " UNION ALL SELECT 1 FROM alerts a JOIN events e ON e.id = a.event_id"
            f" WHERE a.snapshot_sha256 = ? AND {scope} LIMIT 1",
            [sha256, *params, sha256, *params],
        ).fetchone()
        if hit is None:
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
