"""The operator API and dashboard: ``create_app`` wires every dependency in; no module state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Body, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aggregator.api import events, live, resources
from aggregator.api.deps import AUTH_RESPONSES, ApiContext, Ctx, CurrentOperator, Readers
from aggregator.api.models import Health, OperatorOut, Ready, TokenOut, TokenRequest
from aggregator.auth import AuthError, AuthStore, Operator
from aggregator.geo import GridIndex
from aggregator.metrics import Metrics
from aggregator.pool import LifecycleWriter
from aggregator.snapshots import SnapshotStore
from aggregator.stream import StreamHub
from contract import Catalogue, EventNoticeV1

__all__ = ["WEB_ROOT", "create_app"]

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
API_VERSION = "1.0.0"


def create_app(
    *,
    pool_path: Path,
    catalogue: Catalogue,
    grids: GridIndex,
    snapshots: SnapshotStore,
    metrics: Metrics,
    hub: StreamHub,
    auth: AuthStore,
    broker_connected: Callable[[], bool] = lambda: False,
    on_notice: Callable[[EventNoticeV1], None] | None = None,
    web_root: Path | None = WEB_ROOT,
) -> FastAPI:
    """The FastAPI app over one pool file. The pool must exist (the aggregator creates it).

    ``on_notice`` also receives the notice of every lifecycle step an operator takes (the live
    stream always does), e.g. to publish it on the MQTT events topic for integrators."""
    pool_path = Path(pool_path)
    ctx = ApiContext(
        pool_path=pool_path,
        catalogue=catalogue,
        grids=grids,
        snapshots=snapshots,
        metrics=metrics,
        hub=hub,
        auth=auth,
        broker_connected=broker_connected,
        on_notice=on_notice,
        readers=Readers(pool_path),
        writer=LifecycleWriter(pool_path),
        grid_features=grids.to_geojson()["features"],
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.bind(asyncio.get_running_loop())
        try:
            yield
        finally:
            hub.unbind()
            ctx.readers.close()
            ctx.writer.close()

    app = FastAPI(
        title="Community warning gateway — operator API",
        version=API_VERSION,
        description=(
            "The community event pool (社区事件池) of smart-community warnings (Longgang 5.4): "
            "events, their alerts and lifecycle, devices, grids, dead letters, statistics and "
            "a live stream (WebSocket `/api/v1/stream?token=…`, or SSE). Every route except "
            "the health checks and `/metrics` needs a bearer token from `/api/v1/auth/token`; "
            "what it returns is limited to the operator's level and scope (GB/T 34300 "
            "一级一权限)."
        ),
        lifespan=lifespan,
    )
    app.state.ctx = ctx

    _auth_routes(app)
    _ops_routes(app)
    app.include_router(events.router)
    app.include_router(resources.router)
    app.include_router(live.router)
    if web_root is not None and web_root.is_dir():
        app.mount("/", StaticFiles(directory=web_root, html=True), name="dashboard")
    return app


def _operator_out(op: Operator) -> OperatorOut:
    return OperatorOut(
        username=op.username,
        level=op.level,
        scope_code=op.scope_code,
        department=op.department,
        display_name=op.display_name,
    )


def _auth_routes(app: FastAPI) -> None:
    @app.post(
        "/api/v1/auth/token",
        response_model=TokenOut,
        responses=AUTH_RESPONSES,
        tags=["auth"],
        summary="Log in: username and password for a bearer token",
    )
    async def issue_token(ctx: Ctx, body: Annotated[TokenRequest, Body()]) -> TokenOut:
        try:
            # argon2 verification takes tens of milliseconds: off the event loop.
            issued = await asyncio.to_thread(ctx.auth.login, body.username, body.password)
        except AuthError as exc:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
            ) from exc
        return TokenOut(
            access_token=issued.token,
            expires_at=issued.expires_at,
            operator=_operator_out(issued.operator),
        )

    @app.get(
        "/api/v1/auth/me",
        response_model=OperatorOut,
        responses=AUTH_RESPONSES,
        tags=["auth"],
        summary="Who the token belongs to, and their scope",
    )
    def me(operator: CurrentOperator) -> OperatorOut:
        return _operator_out(operator)

    @app.post(
        "/api/v1/auth/logout",
        status_code=status.HTTP_204_NO_CONTENT,
        responses=AUTH_RESPONSES,
        tags=["auth"],
        summary="End this token's session",
    )
    def logout(ctx: Ctx, request: Request, operator: CurrentOperator) -> None:
        header = request.headers.get("authorization", "")
        ctx.auth.revoke(header.partition(" ")[2].strip())
        log.info("operator %s logged out", operator.username)


def _ops_routes(app: FastAPI) -> None:
    @app.get("/healthz", response_model=Health, tags=["operations"], summary="Liveness")
    def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz",
        response_model=Ready,
        responses={503: {"model": Ready, "description": "pool unreadable or broker away"}},
        tags=["operations"],
        summary="Readiness: the pool is readable and the broker connected",
    )
    def readyz(ctx: Ctx) -> JSONResponse:
        try:
            ctx.readers.get().execute("SELECT 1 FROM events LIMIT 1").fetchall()
            pool_ok = True
        except Exception:
            log.warning("readiness: pool %s is not readable", ctx.pool_path, exc_info=True)
            pool_ok = False
        broker_ok = bool(ctx.broker_connected())
        ready = Ready(ready=pool_ok and broker_ok, pool=pool_ok, broker=broker_ok)
        return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
        tags=["operations"],
        summary="Prometheus metrics: ingest, rejections, dedup ratio, batch latency, queue",
    )
    def metrics(ctx: Ctx) -> PlainTextResponse:
        body = generate_latest(ctx.metrics.registry).decode()
        hub = ctx.hub
        # Derived gauges are rendered here rather than registered: several apps may share
        # one Metrics registry (tests), and a registry refuses a second collector of a name.
        extra = [
            "# HELP cwg_dedup_ratio share of pooled alerts that joined an existing event",
            "# TYPE cwg_dedup_ratio gauge",
            f"cwg_dedup_ratio {ctx.metrics.dedup_ratio():.6f}",
            "# HELP cwg_stream_clients live stream clients connected",
            "# TYPE cwg_stream_clients gauge",
            f"cwg_stream_clients {hub.client_count}",
            "# HELP cwg_stream_dropped_clients_total stream clients dropped as too slow",
            "# TYPE cwg_stream_dropped_clients_total counter",
            f"cwg_stream_dropped_clients_total {hub.dropped_clients}",
        ]
        return PlainTextResponse(body + "\n".join(extra) + "\n", media_type=CONTENT_TYPE_LATEST)
