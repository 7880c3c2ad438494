"""Events of the community event pool: list (filters, sort, cursor), detail, and the older
(deprecated) step route, which takes its steps through the case lifecycle."""

from __future__ import annotations

import base64
import binascii
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import orjson
from fastapi import APIRouter, Body, HTTPException, Path, Query, status

from aggregator.access.auth import Level
from aggregator.api.cases import Cases, announce_step, step_refusal
from aggregator.api.deps import SCOPED_RESPONSES, ApiContext, Ctx, CurrentOperator, Db
from aggregator.api.models import (
    Action,
    AlertOut,
    EventDetail,
    EventDeviceOut,
    EventItem,
    EventPage,
    EventSort,
    Problem,
    TimelineEntry,
    TransitionOut,
    TransitionRequest,
)
from aggregator.cases import Action as CaseAction
from aggregator.cases import CalendarRangeError, CaseError, State
from aggregator.pool import cases as cases_store
from aggregator.pool import queries
from aggregator.pool.cases import CaseNotFoundError
from aggregator.pool.model import summary_from_row
from aggregator.pool.reader import Reader, Row
from contract import EventStatus, Location, Severity
from contract.messages import DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/events", tags=["events"])

GRID_PREFIX = r"^[0-9]{1,20}$"
DEPARTMENT = r"^[a-z][a-z0-9_]{0,63}$"
TYPE_CODE = r"^[a-z][a-z0-9_]{1,63}$"


def snapshot_url(sha: str | None) -> str | None:
    return None if sha is None else f"/api/v1/snapshots/{sha}"


def to_ts(value: datetime | None, name: str) -> float | None:
    """UNIX seconds; naive datetimes are read as UTC. Out-of-range dates are a 400."""
    if value is None:
        return None
    try:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    except (OverflowError, ValueError, OSError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{name}: date out of range") from exc


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def event_item(
    row: Row, devices: list[str], ctx: ApiContext, now: float | None = None
) -> EventItem:
    summary = summary_from_row(row, devices, ctx.catalogue)
    now = time.time() if now is None else now
    return EventItem(
        **summary.model_dump(),
        address=row["address"],
        device_count=row["device_count"],
        updated_at=_dt(row["updated_at"]),
        closed_at=_dt(row["closed_at"]) if row["closed_at"] is not None else None,
        overdue=row["status"] != EventStatus.CLOSED.value and row["deadline_at"] < now,
        snapshot_url=snapshot_url(row["snapshot_sha256"]),
        version=row["version"],
    )


# -- cursor ----------------------------------------------------------------------------------


def encode_cursor(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")


# SQLite stores integers in 64 bits and raises OverflowError on a larger one: a cursor is
# checked against that here, where a bad one is the caller's 400, not the server's 500.
_INT64 = range(-(2**63), 2**63)


def _fits_sqlite(value: Any) -> bool:
    if isinstance(value, bool):
        return False  # no cursor of ours holds one, and PostgreSQL will not compare it to an id
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, int):
        return value in _INT64
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_fits_sqlite(v) for v in value)
    if isinstance(value, dict):
        return all(_fits_sqlite(v) for v in value.values())
    return False


def decode_cursor(cursor: str) -> dict[str, Any]:
    """The cursor's fields; a 400 for anything that is not a cursor this API could have made
    (its numbers are bounded to what the pool stores, and none is a boolean)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid cursor") from exc
    if not isinstance(data, dict) or not _fits_sqlite(data):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid cursor")
    return data


# -- routes ----------------------------------------------------------------------------------


@router.get(
    "",
    response_model=EventPage,
    responses={**SCOPED_RESPONSES, 400: {"model": Problem, "description": "bad cursor or date"}},
    summary="List events in the caller's scope",
)
def list_events(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    status_: Annotated[
        list[EventStatus] | None,
        Query(alias="status", max_length=10, description="any of these statuses"),
    ] = None,
    type_: Annotated[
        list[Annotated[str, Query(pattern=TYPE_CODE)]] | None,
        Query(alias="type", max_length=100, description="warning type codes"),
    ] = None,
    severity: Annotated[list[Severity] | None, Query(max_length=10)] = None,
    grid: Annotated[
        str | None,
        Query(pattern=GRID_PREFIX, description="grid code prefix: county, street, community, grid"),
    ] = None,
    department: Annotated[str | None, Query(pattern=DEPARTMENT)] = None,
    device: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    since: Annotated[datetime | None, Query(description="observed at or after (RFC 3339)")] = None,
    until: Annotated[datetime | None, Query(description="observed before (RFC 3339)")] = None,
    open_only: Annotated[bool, Query(alias="open", description="only events not closed")] = False,
    sort: EventSort = EventSort.REGISTERED_DESC,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> EventPage:
    descending = sort.value.startswith("-")
    after: tuple[float, int] | None = None
    if cursor:
        data = decode_cursor(cursor)
        value, last_id = data.get("v"), data.get("i")
        if (
            data.get("s") != sort.value
            or not isinstance(value, int | float)
            or not isinstance(last_id, int)
        ):
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, "invalid cursor (or sort changed between pages)"
            )
        after = (value, last_id)
    wanted = queries.EventFilter(
        statuses=[s.value for s in status_ or ()],
        open_only=open_only,
        types=type_ or (),
        severities=[s.value for s in severity or ()],
        grid_prefix=grid,
        department=department,
        device_id=device,
        since=to_ts(since, "since"),
        until=to_ts(until, "until"),
        sort=sort.value.lstrip("-"),
        descending=descending,
        after=after,
        limit=limit + 1,
    )
    scope = operator.event_filter("e")
    # What decides the answer, and nothing else: the account's level and scope (never its
    # token) and the query with its lists as sets, so equal questions share one entry.
    key = (
        operator.level.value,
        operator.scope_code,
        operator.department if operator.level is Level.DEPARTMENT else None,
        scope[0],
        tuple(scope[1]),
        frozenset(wanted.statuses),
        wanted.open_only,
        frozenset(wanted.types),
        frozenset(wanted.severities),
        wanted.grid_prefix,
        wanted.department,
        wanted.device_id,
        wanted.since,
        wanted.until,
        sort.value,
        wanted.after,
        limit,
    )
    return ctx.event_pages.get(key, lambda: _event_page(ctx, conn, scope, wanted, sort, limit))


def _event_page(
    ctx: ApiContext,
    conn: Reader,
    scope: queries.Scope,
    wanted: queries.EventFilter,
    sort: EventSort,
    limit: int,
) -> EventPage:
    rows = queries.list_events(conn, scope, wanted)
    more = len(rows) > limit
    rows = rows[:limit]
    devices = queries.devices_of(conn, [r["id"] for r in rows])
    now = time.time()
    items = [event_item(r, devices.get(r["id"], []), ctx, now) for r in rows]
    next_cursor = None
    if more and rows:
        last = rows[-1]
        next_cursor = encode_cursor({"s": sort.value, "v": last["sort_value"], "i": last["id"]})
    return EventPage(items=items, next_cursor=next_cursor)


@router.get(
    "/{event_id}",
    response_model=EventDetail,
    responses=SCOPED_RESPONSES,
    summary="One event with its alerts, devices, snapshots and timeline",
)
def get_event(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    event_id: Annotated[int, Path(ge=1, le=2**62)],
    alerts_limit: Annotated[int, Query(ge=1, le=2000)] = 200,
) -> EventDetail:
    row = queries.scoped_event(conn, operator.event_filter("e"), event_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no event {event_id} in your scope")
    return _detail(ctx, conn, row, alerts_limit)


def _detail(ctx: ApiContext, conn: Reader, row: Row, limit: int) -> EventDetail:
    event_id = row["id"]
    alert_rows = queries.event_alerts(conn, event_id, limit + 1)
    truncated = len(alert_rows) > limit
    alert_rows = alert_rows[:limit]
    alerts = [
        AlertOut(
            alert_id=a["alert_id"],
            device_id=a["device_id"],
            seq=a["seq"],
            type=a["type"],
            severity=Severity(a["severity"]),
            confidence=a["confidence"],
            observed_at=_dt(a["observed_at"]),
            received_at=_dt(a["received_at"]),
            outcome=a["outcome"],
            location=Location(lat=a["lat"], lon=a["lon"]),
            grid_code=a["grid_code"],
            snapshot_url=snapshot_url(a["snapshot_sha256"]),
            payload=_payload(a["payload"]),
        )
        for a in alert_rows
    ]
    device_rows = queries.event_devices(conn, event_id)
    devices = [
        EventDeviceOut(
            device_id=d["device_id"],
            first_alert_at=_dt(d["first_alert_at"]),
            alert_count=d["alert_count"],
            kind=d["kind"],
            state=d["state"],
            last_seen=_dt(d["last_seen"]) if d["last_seen"] is not None else None,
        )
        for d in device_rows
    ]
    shas = queries.event_snapshots(conn, event_id)
    if row["snapshot_sha256"] and row["snapshot_sha256"] not in shas:
        shas.insert(0, row["snapshot_sha256"])
    elif row["snapshot_sha256"]:
        shas.remove(row["snapshot_sha256"])
        shas.insert(0, row["snapshot_sha256"])
    timeline = [
        TimelineEntry(
            at=_dt(r["at"]),
            kind="log",
            action=r["action"],
            actor=r["actor"],
            detail=_json_object(r["detail"]),
        )
        for r in queries.event_log(conn, event_id)
    ]
    timeline += [
        TimelineEntry(
            at=a.observed_at,
            kind="alert",
            action=a.outcome,
            actor=a.device_id,
            detail={"alert_id": a.alert_id, "confidence": a.confidence, "seq": a.seq},
        )
        for a in alerts
    ]
    timeline.sort(key=lambda t: t.at)
    item = event_item(row, [d.device_id for d in devices], ctx)
    return EventDetail(
        **item.model_dump(),
        alerts=alerts,
        alerts_truncated=truncated,
        devices=devices,
        snapshot_urls=[u for u in (snapshot_url(s) for s in shas) if u],
        timeline=timeline,
    )


def _json_object(raw: str | bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"text": raw if isinstance(raw, str) else raw.decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"value": value}


def _payload(raw: bytes) -> dict[str, Any]:
    return _json_object(raw)


# -- the older step route ---------------------------------------------------------------------
# POST /api/v1/events/{id}/{verify|dispatch|handle|close} came before the case lifecycle. It is
# kept for clients written against it, but it no longer moves an event by itself: each of its
# actions is taken as the one case step that brings the case from its present state to the
# action's event status, through the case store (the same rules, audit chain link, webhook
# outbox and version compare-and-set as POST /api/v1/cases/{id}/steps). Where no single step
# does — a department's feedback goes to the community's review before closing, the community
# cannot close a case it has not handled — it answers 409 and names the case route.


@dataclass(frozen=True, slots=True)
class OldStep:
    """The case step an older action stands for in one case state."""

    action: CaseAction
    whistle_to_catalogue: bool = False  # dispatch: the type's catalogue department leads
    note_is_summary: bool = False  # close: the note is the handling summary (Longgang 8.5)


OLD_STEPS: Final[Mapping[tuple[Action, State], OldStep]] = {
    (Action.VERIFY, State.REGISTERED): OldStep(CaseAction.VERIFY),
    (Action.DISPATCH, State.ASSESSING): OldStep(CaseAction.WHISTLE, whistle_to_catalogue=True),
    (Action.DISPATCH, State.COMMUNITY_HANDLING): OldStep(
        CaseAction.WHISTLE, whistle_to_catalogue=True
    ),
    (Action.HANDLE, State.ASSESSING): OldStep(CaseAction.SELF_HANDLE),
    (Action.HANDLE, State.WHISTLED): OldStep(CaseAction.ACCEPT_OFF_SITE),
    (Action.CLOSE, State.COMMUNITY_HANDLING): OldStep(CaseAction.HANDLE, note_is_summary=True),
    (Action.CLOSE, State.REVIEWING): OldStep(CaseAction.ACCEPT_FEEDBACK),
}


@dataclass(frozen=True, slots=True)
class _AnyScope:
    """Reads a case wherever it lies: the route has already found the event in the caller's
    scope, and the step is then taken as the caller (the rules check the caller again)."""

    username: str = ""
    level: str = Level.COUNTY.value
    scope_code: str = ""
    department: str | None = None


def _old_payload(step: OldStep, note: str, department: str) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if step.note_is_summary:
        payload["summary"] = note
    elif note:
        payload["note"] = note
    if step.whistle_to_catalogue:
        payload["lead_department"] = department
    return payload


@router.post(
    "/{event_id}/{action}",
    response_model=TransitionOut,
    responses={
        **SCOPED_RESPONSES,
        400: {"model": Problem, "description": "closing without a handling summary"},
        403: {"model": Problem, "description": "the case rules refuse this account the step"},
        409: {
            "model": Problem,
            "description": "no case step does this from the case's state (the message names "
            "the case route), or the case changed meanwhile",
        },
        422: {"model": Problem, "description": "the case step lacks what it requires"},
    },
    summary="Deprecated: take a case step by its older name (verify, dispatch, handle, close)",
    description="Use `POST /api/v1/cases/{id}/steps`. Each action is taken as the case step "
    "that brings the case to the action's status from its present state: verify → verify "
    "(registered); dispatch → whistle to the type's catalogue department (assessing, "
    "community handling); handle → self_handle (assessing) or accept_off_site (whistled); "
    "close → handle with the note as its summary (community handling) or accept_feedback "
    "(reviewing). Anything else is a 409 naming the case route.",
    deprecated=True,
)
def transition(
    ctx: Ctx,
    conn: Db,
    cases: Cases,
    operator: CurrentOperator,
    event_id: Annotated[int, Path(ge=1, le=2**62)],
    action: Action,
    body: Annotated[TransitionRequest | None, Body()] = None,
) -> TransitionOut:
    note = (body.note if body else "").strip()
    row = queries.scoped_event(conn, operator.event_filter("e"), event_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no event {event_id} in your scope")
    if action is Action.CLOSE and not note:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            "closing needs a handling summary in 'note' (Longgang 8.5)",
        )
    case_row = cases_store.case_of(conn, ctx.catalogue, event_id, _AnyScope())
    case_route = (
        f"use POST /api/v1/cases/{event_id}/steps (GET /api/v1/cases/{event_id} lists the "
        "actions you may take)"
    )
    if case_row is None or (not case_row.stored and row["status"] == EventStatus.CLOSED.value):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"event {event_id} is closed; it cannot {action.value}"
        )
    case = case_row.case
    step = OLD_STEPS.get((action, case.state))
    if step is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"event {event_id} is a case in state {case.state.value}; no case step does"
            f" '{action.value}' from there: {case_route}",
        )
    try:
        record = cases.apply_step(
            event_id,
            step.action,
            operator,
            _old_payload(step, note, row["department"]),
            # the state the step was chosen for: if the case moved meanwhile, a 409
            case.version,
        )
    except (CaseError, CaseNotFoundError, CalendarRangeError) as exc:
        raise step_refusal(exc) from exc
    log.info(
        "event %s %s (case %s) by %s (deprecated route)",
        event_id,
        action.value,
        step.action.value,
        operator.username,
    )
    announce_step(ctx, conn, record)  # the live stream and the events topic, as a case step
    fresh = queries.scoped_event(conn, operator.event_filter("e"), event_id) or row
    item = event_item(fresh, queries.devices_of(conn, [event_id]).get(event_id, []), ctx)
    return TransitionOut(
        event_id=event_id,
        from_status=cases_store.EVENT_STATUS[record.before],
        to_status=cases_store.EVENT_STATUS[record.after],
        at=record.at,
        actor=operator.username,
        event=item,
    )
