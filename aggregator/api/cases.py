"""Cases: the caller's inbox, one case with what the caller may do, steps, assignment, evidence
photos and the audit trail (issue 15). Routes only: the rules are aggregator/cases/rules.py, the
storage aggregator/pool/cases.py. Scopes as for events: an area account sees the cases of its
grid prefix; a department account the cases whistled to it (lead or co-department).

Errors: 404 not in the caller's scope; 403 the caller's level, area or department may not take
this step; 409 the case is not in a state for it, or changed since the caller read it (the
version); 422 the payload lacks what the action requires.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import Response

from aggregator.access.auth import Operator
from aggregator.api.case_models import (
    ActionInputs,
    AssignRequest,
    AuditRowOut,
    CaseItem,
    CaseOut,
    CasePage,
    DeadlineOut,
    EvidenceOut,
    ExtensionOut,
    StepOut,
    StepRequest,
    Trail,
)
from aggregator.api.deps import SCOPED_RESPONSES, ApiContext, Ctx, CurrentOperator, Db
from aggregator.api.models import Problem
from aggregator.cases import (
    Action,
    CalendarRangeError,
    CaseError,
    ChinaWorkCalendar,
    CommunityPolicy,
    ForbiddenError,
    Lifecycle,
    PayloadError,
    State,
    WrongStateError,
    allowed_actions,
    default_lifecycle,
)
from aggregator.cases.audit import AuditRow, dump_jsonl
from aggregator.cases.whistle import load_whistle_lists
from aggregator.clock import clock_for
from aggregator.pool import cases as store
from aggregator.pool import queries
from aggregator.pool.cases import (
    CaseNotFoundError,
    CaseRow,
    CaseStore,
    StepRecord,
    assign_refusal,
)
from aggregator.pool.model import summary_from_row
from aggregator.pool.port import LifecycleSteps
from aggregator.pool.reader import Reader, is_pool_url
from aggregator.pool.supervision import supervision_of
from contract import Catalogue, EventNoticeV1, utcnow

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["cases"])

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True)
class CaseOptions:
    """What the case routes take from Settings."""

    holiday_file: Path | None = None
    whistle_lists: Path | None = None
    evidence_max_bytes: int = 8 * 1024 * 1024
    test_clock_file: Path | None = None  # tests only: the case clock's offset (clock.py)


def open_case_store(
    pool: Path | str, catalogue: Catalogue, writer: LifecycleSteps, options: CaseOptions
) -> CaseStore:
    """The API's case store: on PostgreSQL on the API's own lifecycle writer's connections
    (its lock mode), on SQLite a write connection of its own."""
    pg = None
    if is_pool_url(pool):
        from aggregator.pool.postgres import PgEventPool

        pg = writer if isinstance(writer, PgEventPool) else None
    if options.whistle_lists is not None:
        policy_for: Callable[[str], CommunityPolicy] = load_whistle_lists(
            options.whistle_lists, catalogue
        ).policy_for
    else:
        # Any Appendix A item may be whistled; the catalogue's departments are the ones called.
        default = CommunityPolicy(departments=frozenset(catalogue.departments))

        def policy_for(_community: str) -> CommunityPolicy:
            return default

    return CaseStore(
        pool,
        catalogue,
        pg=pg,
        calendar=ChinaWorkCalendar(options.holiday_file),
        policy_for=policy_for,
        clock=clock_for(options.test_clock_file),
    )


def get_cases(request: Request) -> CaseStore:
    cases: CaseStore = request.app.state.cases
    return cases


def get_options(request: Request) -> CaseOptions:
    options: CaseOptions = request.app.state.case_options
    return options


Cases = Annotated[CaseStore, Depends(get_cases)]
Options = Annotated[CaseOptions, Depends(get_options)]

STEP_RESPONSES: dict[int | str, dict[str, Any]] = {
    **SCOPED_RESPONSES,
    403: {"model": Problem, "description": "the caller's level, area or department may not"},
    409: {"model": Problem, "description": "wrong state, or the case changed (version)"},
    422: {"model": Problem, "description": "the payload lacks what the action requires"},
}


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _item(row: CaseRow, operator: Operator, cases: CaseStore, now: datetime) -> CaseItem:
    case = row.case
    actions = allowed_actions(
        case, operator, policy=cases.policy(case.community_code), lifecycle=cases.lifecycle
    )
    next_due = row.next_due_at
    return CaseItem(
        event_id=row.event_id,
        version=case.version,
        state=case.state,
        type=row.type_code,
        severity=row.severity,
        grid_code=case.grid_code,
        address=row.address,
        lead_department=case.lead_department,
        co_departments=list(case.co_departments),
        assignee=case.assignee,
        registered_at=case.registered_at,
        updated_at=_dt(row.updated_at),
        next_due_at=None if next_due is None else _dt(next_due),
        overdue=any(d.due_at < now for d in case.running()),
        allowed_actions=actions,
    )


def _detail(row: CaseRow, operator: Operator, cases: CaseStore) -> CaseOut:
    now = cases.clock.now()
    item = _item(row, operator, cases, now)
    case = row.case
    table = cases.lifecycle or default_lifecycle()
    ext = case.extension
    return CaseOut(
        **item.model_dump(),
        mode=case.mode,
        whistled_at=case.whistled_at,
        send_backs=case.send_backs,
        outcome=case.outcome,
        closed_at=case.closed_at,
        handled_by=case.handled_by,
        extension=None
        if ext is None
        else ExtensionOut(by=ext.by, reason=ext.reason, until=ext.until, at=ext.at),
        deadlines=[
            DeadlineOut(
                clock=d.clock,
                zh=table.clocks[d.clock].zh,
                started_at=d.started_at,
                due_at=d.due_at,
                stopped_at=d.stopped_at,
                running=d.running,
                overdue=d.running and d.due_at < now,
                late=d.late(now),
                extended=d.extended,
                round=d.round,
            )
            for d in case.clocks
        ],
        actions_zh={a.value: table.actions[a].zh for a in item.allowed_actions},
        action_inputs={a.value: _inputs(table, case.state, a) for a in item.allowed_actions},
        as_of=now,
        may_assign=assign_refusal(case, operator) is None,
    )


def _inputs(table: Lifecycle, state: State, action: Action) -> ActionInputs:
    t = table.transition(state, action)
    if t is None:  # allowed_actions comes from the same table: never
        return ActionInputs(requires=[], optional=[])
    return ActionInputs(
        requires=[r.value for r in t.requires], optional=[r.value for r in t.optional]
    )


def _scoped(conn: Reader, ctx: ApiContext, event_id: int, operator: Operator) -> CaseRow:
    row = store.case_of(conn, ctx.catalogue, event_id, operator)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no case {event_id} in your scope")
    return row


def step_refusal(exc: Exception) -> HTTPException:
    """The HTTP answer to a step the case store refused (both step routes use it)."""
    if isinstance(exc, CaseNotFoundError):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    if isinstance(exc, ForbiddenError):
        return HTTPException(status.HTTP_403_FORBIDDEN, str(exc))
    if isinstance(exc, WrongStateError):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    if isinstance(exc, CalendarRangeError):
        # the deadline reaches a year the calendar does not know: an operator's job to fix
        return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))
    if isinstance(exc, PayloadError | CaseError):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc))
    raise exc


def announce_step(ctx: ApiContext, conn: Reader, record: StepRecord) -> None:
    """The step on the live stream and (``on_notice``) the MQTT events topic (both step
    routes use it)."""
    ctx.event_pages.clear()
    row = queries.scoped_event(conn, ("1=1", []), record.event_id)
    if row is None:  # the reader has not seen the commit yet: the stream's poll will
        return
    devices = queries.devices_of(conn, [record.event_id]).get(record.event_id, [])
    notice = EventNoticeV1(
        change="closed" if record.after.value == "closed" else "updated",
        event=summary_from_row(row, devices, ctx.catalogue),
        at=utcnow(),
    )
    ctx.hub.publish_notice(notice)
    if ctx.on_notice is not None:
        try:
            ctx.on_notice(notice)
        except Exception:
            # The step is committed; a failed side channel must not turn it into an error.
            log.exception("notice hook failed for case %s", record.event_id)


def _step_out(
    ctx: ApiContext, conn: Reader, cases: CaseStore, operator: Operator, record: StepRecord
) -> StepOut:
    announce_step(ctx, conn, record)
    row = store.case_of(conn, ctx.catalogue, record.event_id, operator)
    if row is None or row.case.version < record.case.version:
        # not visible to the caller any more (an assignment elsewhere), or the reader lags:
        # answer from what the step wrote
        row = CaseRow(
            event_id=record.event_id,
            case=record.case,
            assignee=record.case.assignee,
            type_code=record.type_code,
            severity=row.severity if row else "",
            department=row.department if row else "",
            address=row.address if row else "",
            event_status=row.event_status if row else "",
            updated_at=record.at.timestamp(),
            next_due_at=None,
            stored=True,
        )
    return StepOut(
        event_id=record.event_id,
        action=record.action,
        from_state=record.before,
        to_state=record.after,
        audit_seq=record.audit.seq,
        at=record.at,
        actor=record.actor,
        case=_detail(row, operator, cases).model_copy(
            update={"supervision": supervision_of(conn, record.event_id)}
        ),
    )


@router.get(
    "/cases",
    response_model=CasePage,
    responses=SCOPED_RESPONSES,
    summary="The caller's inbox: cases in its scope, or those it has work in",
)
def list_cases(
    ctx: Ctx,
    conn: Db,
    cases: Cases,
    operator: CurrentOperator,
    box: Annotated[
        str | None,
        Query(
            pattern="^(to_accept|to_handle|to_review|overdue)$",
            description="to_accept, to_handle, to_review (a county account: pending "
            "extensions) or overdue; none: every case in scope",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> CasePage:
    now = cases.clock.now()
    rows = store.list_cases(
        conn, ctx.catalogue, operator, box=box, now=now.timestamp(), limit=limit
    )
    return CasePage(items=[_item(r, operator, cases, now) for r in rows], as_of=now)


@router.get(
    "/cases/{event_id}",
    response_model=CaseOut,
    responses=SCOPED_RESPONSES,
    summary="One case: state, version, deadlines and the actions the caller may take",
)
def get_case(
    ctx: Ctx,
    conn: Db,
    cases: Cases,
    operator: CurrentOperator,
    event_id: Annotated[int, PathParam(ge=1, le=2**62)],
) -> CaseOut:
    out = _detail(_scoped(conn, ctx, event_id, operator), operator, cases)
    return out.model_copy(update={"supervision": supervision_of(conn, event_id)})


@router.post(
    "/cases/{event_id}/steps",
    response_model=StepOut,
    responses=STEP_RESPONSES,
    summary="Take one lifecycle action on a case (compare-and-set on expected_version)",
)
def take_step(
    ctx: Ctx,
    conn: Db,
    cases: Cases,
    operator: CurrentOperator,
    event_id: Annotated[int, PathParam(ge=1, le=2**62)],
    body: Annotated[StepRequest, Body()],
) -> StepOut:
    # No scope lookup first: the rules answer 403 for a case outside the caller's area or not
    # whistled to its department (the checks), and 404 only when there is no event.
    try:
        record = cases.apply_step(
            event_id, body.action, operator, body.payload, body.expected_version
        )
    except (CaseError, CaseNotFoundError, CalendarRangeError) as exc:
        raise step_refusal(exc) from exc
    return _step_out(ctx, conn, cases, operator, record)


@router.post(
    "/cases/{event_id}/assign",
    response_model=StepOut,
    responses=STEP_RESPONSES,
    summary="Assign a case to a person of its community or of a department it was whistled to",
)
def assign_case(
    ctx: Ctx,
    conn: Db,
    cases: Cases,
    operator: CurrentOperator,
    event_id: Annotated[int, PathParam(ge=1, le=2**62)],
    body: Annotated[AssignRequest, Body()],
) -> StepOut:
    scope: tuple[str, str | None] | None = None
    if body.assignee is not None:
        account = ctx.auth.account(body.assignee)
        if account is None or account.disabled:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY, f"no active account {body.assignee!r}"
            )
        scope = (account.scope_code, account.department)
    try:
        record = cases.assign(
            event_id,
            body.assignee,
            operator,
            body.expected_version,
            assignee_scope=scope,
            note=body.note,
        )
    except (CaseError, CaseNotFoundError) as exc:
        raise step_refusal(exc) from exc
    return _step_out(ctx, conn, cases, operator, record)


def _trail(conn: Reader, ctx: ApiContext, event_id: int, operator: Operator) -> list[AuditRow]:
    _scoped(conn, ctx, event_id, operator)
    return store.audit_rows(conn, event_id=event_id)


@router.get(
    "/cases/{event_id}/trail",
    response_model=Trail,
    responses=SCOPED_RESPONSES,
    summary="The case's audit trail: every change, who, role, before and after, chained hash",
)
def case_trail(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    event_id: Annotated[int, PathParam(ge=1, le=2**62)],
) -> Trail:
    rows = _trail(conn, ctx, event_id, operator)
    return Trail(
        event_id=event_id,
        rows=[
            AuditRowOut(**{**r.model_dump(exclude={"case_id"}), "evidence": list(r.evidence)})
            for r in rows
        ],
    )


@router.get(
    "/cases/{event_id}/trail.jsonl",
    response_class=Response,
    responses={
        **SCOPED_RESPONSES,
        200: {
            "description": "one audit row per line, every field and its hash",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        },
    },
    summary="The case's audit rows as JSON lines, every field and hash (an export)",
)
def case_trail_export(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    event_id: Annotated[int, PathParam(ge=1, le=2**62)],
) -> Response:
    rows = _trail(conn, ctx, event_id, operator)
    return Response(
        dump_jsonl(rows),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="case-{event_id}-trail.jsonl"'},
    )


@router.post(
    "/evidence",
    response_model=EvidenceOut,
    responses={
        **SCOPED_RESPONSES,
        403: {"model": Problem, "description": "an administrator takes no case actions"},
        413: {"model": Problem, "description": "larger than evidence_max_bytes"},
        415: {"model": Problem, "description": "not a JPEG or PNG image"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    summary="Upload a before/after photo; name it by the returned sha256 in a step's photos",
)
async def upload_evidence(
    request: Request, ctx: Ctx, options: Options, operator: CurrentOperator
) -> EvidenceOut:
    if operator.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "an administrator takes no case actions")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > options.evidence_max_bytes:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "the photo is too large")
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > options.evidence_max_bytes:  # a body without a truthful length
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, "the photo is too large")
    media = _media_type(bytes(data[:8]))
    if media is None:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "a JPEG or PNG photo only")
    from starlette.concurrency import run_in_threadpool

    sha = await run_in_threadpool(ctx.snapshots.put, bytes(data))
    log.info("evidence %s (%s bytes) uploaded by %s", sha, len(data), operator.username)
    return EvidenceOut(sha256=sha, size=len(data), media_type=media)


def _media_type(head: bytes) -> str | None:
    if head.startswith(_JPEG):
        return "image/jpeg"
    if head.startswith(_PNG):
        return "image/png"
    return None


@router.get(
    "/evidence/{sha256}",
    response_class=Response,
    responses={
        **SCOPED_RESPONSES,
        200: {
            "description": "the photo as uploaded",
            "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    },
    summary="An evidence photo attached to a case in the caller's scope",
)
def get_evidence(
    ctx: Ctx,
    conn: Db,
    operator: CurrentOperator,
    sha256: Annotated[str, PathParam(pattern="^[0-9a-f]{64}$")],
) -> Response:
    if not store.evidence_in_scope(conn, operator, sha256):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such evidence in your scope")
    data = ctx.snapshots.get(sha256)
    media = _media_type(data[:8]) if data else None
    if data is None or media is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such evidence in your scope")
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})
