"""Handling metrics (Longgang 8.6) over the stored cases: ``GET /api/v1/cases/metrics``.

The figures are aggregator/cases/metrics.py's (its docstring defines each rate); this route
picks the cases in the caller's scope registered in the period and groups them per community,
lead department or person. Its router is included before the case routes, whose
``/cases/{event_id}`` would otherwise take ``metrics`` for an id.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from aggregator.api.cases import Cases
from aggregator.api.deps import SCOPED_RESPONSES, Ctx, CurrentOperator, Db
from aggregator.cases.metrics import By, Figures, case_figures, figures_by
from aggregator.cases.rules import ClockName
from aggregator.pool.supervision import metric_cases

router = APIRouter(prefix="/api/v1", tags=["cases"])

# The longest period one request covers (the figures are computed over every case in it).
MAX_PERIOD = timedelta(days=3660)


class StageOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    due: int = Field(description="clock runs that ended, or are running past their deadline")
    on_time: int = Field(description="runs that ended on or before their deadline")
    overdue: int = Field(description="runs still running past their deadline")
    on_time_rate: float | None


class GroupOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str = Field(description="community code, department code or account name; '' total")
    registered: int = Field(description="cases registered in the period, less 'not ours'")
    not_ours: int
    closed: int = Field(description="closed as handled (including those not counted handled)")
    handled: int
    not_handled: int = Field(description="sent back re_handle_max_rounds times (Jiangsu 6.3)")
    first_time: int = Field(description="closed as handled without any send-back")
    due: int
    on_time: int
    overdue: int = Field(description="open cases past a running deadline now")
    handling_rate: float | None = Field(description="处置率 = handled / registered")
    on_time_rate: float | None = Field(description="按期处置率 = on time / due")
    first_time_rate: float | None = Field(description="一次性处置率 = first time / closed")
    stages: dict[ClockName, StageOut] = Field(description="按期处置率 per stage clock")


class MetricsOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    by: By
    since: datetime | None
    until: datetime | None
    at: datetime = Field(description="the time the figures were computed at (overdue is now)")
    total: GroupOut = Field(description="every case in the caller's scope and the period")
    groups: list[GroupOut]


def _out(f: Figures) -> GroupOut:
    return GroupOut(
        key=f.key,
        registered=f.registered,
        not_ours=f.not_ours,
        closed=f.closed,
        handled=f.handled,
        not_handled=f.not_handled,
        first_time=f.first_time,
        due=f.due,
        on_time=f.on_time,
        overdue=f.overdue,
        handling_rate=f.handling_rate,
        on_time_rate=f.on_time_rate,
        first_time_rate=f.first_time_rate,
        stages={
            clock: StageOut(
                due=s.due, on_time=s.on_time, overdue=s.overdue, on_time_rate=s.on_time_rate
            )
            for clock, s in sorted(f.stages.items())
        },
    )


@router.get(
    "/cases/metrics",
    response_model=MetricsOut,
    responses={
        **SCOPED_RESPONSES,
        400: {"description": "since is not before until, or the period is too long"},
    },
    summary="Handling metrics (8.6): 处置率, 按期处置率, 一次性处置率 and overdue, per group",
)
def case_metrics(
    ctx: Ctx,
    conn: Db,
    cases: Cases,
    operator: CurrentOperator,
    by: Annotated[By, Query(description="community, department (lead) or person")] = By.COMMUNITY,
    since: Annotated[
        AwareDatetime | None, Query(description="cases registered at or after (ISO 8601)")
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="cases registered before (ISO 8601)")
    ] = None,
) -> MetricsOut:
    if since is not None and until is not None:
        if since >= until:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "since must be before until")
        if until - since > MAX_PERIOD:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "the period is too long")
    now = cases.clock.now()
    found = metric_cases(conn, ctx.catalogue, operator, since=since, until=until)
    groups = figures_by(found, by, now, lifecycle=cases.lifecycle)
    return MetricsOut(
        by=by,
        since=since,
        until=until,
        at=now,
        total=_out(case_figures(found, now, lifecycle=cases.lifecycle)),
        groups=[_out(f) for f in groups.values()],
    )
