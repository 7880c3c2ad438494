"""The operator API and dashboard: ``create_app`` wires every dependency in; no module state."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import psycopg
import psycopg_pool
from fastapi import Body, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aggregator.access.auth import (
    AuthError,
    AuthStore,
    LimiterPolicy,
    LoginThrottledError,
    Operator,
    PasswordChecker,
    RefusalPause,
    verify_login,
)
from aggregator.api import case_metrics, docs, events, live, resources, webhooks
from aggregator.api import cases as case_routes
from aggregator.api.cases import CaseOptions, open_case_store
from aggregator.api.deps import (
    AUTH_RESPONSES,
    STREAM_COOKIE,
    STREAM_COOKIE_PATH,
    ApiContext,
    Ctx,
    CurrentOperator,
    Readers,
)
from aggregator.api.models import Health, OperatorOut, Problem, Ready, TokenOut, TokenRequest
from aggregator.config import AccessSettings, WebhookSettings
from aggregator.fanout.metrics import Metrics
from aggregator.fanout.stream import StreamHub
from aggregator.grids import GridIndex
from aggregator.pool import queries
from aggregator.pool.port import LifecycleSteps, SnapshotStorage
from aggregator.pool.postgres import PoolUnavailableError, is_pg_pool_fault
from aggregator.pool.reader import is_pool_url
from aggregator.pool.sqlite import LifecycleWriter
from contract import Catalogue, EventNoticeV1

__all__ = ["SECURITY_HEADERS", "WEB_ROOT", "RedactSecrets", "create_app", "redact"]

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
API_VERSION = "1.0.0"

# Sent with every HTTP response. The dashboard has no inline script or style and loads
# nothing from elsewhere, so the policy can be this strict; blob: and data: images are the
# snapshots it fetches with the token and the empty favicon.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every HTTP response. Plain ASGI rather than Starlette's
    BaseHTTPMiddleware, which would buffer the event stream through a second task."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _RAW_HEADERS if k not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# Credentials that a client may put in a query string (we accept none there, but a client
# may still send them) or in a header that ends up in a message.
_SECRET_PARAM = re.compile(
    r"(?i)((?:^|[?&;\s])(?:access_token|token|password|passwd|secret|api_key)=)[^&\s\"']*"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """``text`` with the values of secret-looking query parameters and bearer tokens hidden."""
    return _BEARER.sub(r"\1[redacted]", _SECRET_PARAM.sub(r"\1[redacted]", text))


def _redact_arg(arg: object) -> object:
    return redact(arg) if isinstance(arg, str) else arg


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and string arguments through ``redact``. On uvicorn's
    access logger the arguments keep their shape (its formatter unpacks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, MutableMapping):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        return True


# uvicorn.access logs every request line with its query string; uvicorn.error logs each
# WebSocket's path with its query string.
REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn")


def install_log_redaction() -> None:
    """Put ``RedactSecrets`` on the loggers that print request URLs (once per process)."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def create_app(
    *,
    pool: Path | str,
    catalogue: Catalogue,
    grids: GridIndex,
    snapshots: SnapshotStorage,
    metrics: Metrics,
    hub: StreamHub,
    auth: AuthStore,
    broker_connected: Callable[[], bool] = lambda: False,
    on_notice: Callable[[EventNoticeV1], None] | None = None,
    web_root: Path | None = WEB_ROOT,
    access: AccessSettings | None = None,
    writer: LifecycleSteps | None = None,
    pool_label: str | None = None,
    case_options: CaseOptions | None = None,
    webhook_settings: WebhookSettings | None = None,
) -> FastAPI:
    """The FastAPI app over one pool: a SQLite file or a PostgreSQL URL. The pool must exist
    (the aggregator creates and migrates it).

    ``writer`` takes operators' lifecycle steps (default: a ``LifecycleWriter`` of its own on
    the SQLite file; on PostgreSQL the caller hands one in, as ``api/server.py`` does); the app
    closes it. ``pool_label`` names the pool in logs (default: the file's path).
    ``on_notice`` also receives the notice of every lifecycle step an operator takes (the live
    stream always does), e.g. to publish it on the MQTT events topic for integrators."""
    if not is_pool_url(pool):
        pool = Path(pool)
    elif writer is None:
        raise ValueError("a PostgreSQL pool needs its lifecycle writer handed in")
    access = access or AccessSettings()
    install_log_redaction()
    ctx = ApiContext(
        pool=pool,
        pool_label=pool_label or str(pool),
        catalogue=catalogue,
        grids=grids,
        snapshots=snapshots,
        metrics=metrics,
        hub=hub,
        auth=auth,
        broker_connected=broker_connected,
        on_notice=on_notice,
        readers=Readers(pool),
        writer=writer if writer is not None else LifecycleWriter(pool),
        grid_features=grids.to_geojson()["features"],
        # on PostgreSQL its counts are in the pool: a lockout holds on every replica
        limiter=auth.login_limiter(
            LimiterPolicy(
                free_failures_user=access.login_free_failures_user,
                free_failures_addr=access.login_free_failures_addr,
                base_lockout_s=access.login_lockout_base_s,
                max_lockout_s=access.login_lockout_max_s,
            )
        ),
        checker=PasswordChecker(access.login_workers, access.login_max_waiting),
        refusal_pause=RefusalPause(access.login_refusal_delay_s, access.login_refusal_max_delayed),
        metrics_token=(
            access.metrics_token.get_secret_value() if access.metrics_token is not None else None
        ),
    )

    # Case steps (aggregator/api/cases.py): its ``hooks`` run inside each step's transaction.
    case_options = case_options or CaseOptions()
    case_store = open_case_store(pool, catalogue, ctx.writer, case_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.bind(asyncio.get_running_loop())
        try:
            yield
        finally:
            hub.unbind()
            ctx.checker.close()
            ctx.readers.close()
            case_store.close()
            ctx.writer.close()

    app = FastAPI(
        title="Community warning gateway — operator API",
        version=API_VERSION,
        description=(
            "The community event pool (社区事件池) of smart-community warnings (Longgang 5.4): "
            "events, their alerts and lifecycle, devices, grids, dead letters, statistics and "
            "a live stream (WebSocket `/api/v1/stream`: the first message is "
            '`{"token": "…"}`; or SSE `/api/v1/stream/sse` with the bearer header or the '
            "cookie set at login). Every route except the health checks needs a bearer token "
            "from `/api/v1/auth/token` (`/metrics`: an admin's or the metrics token); what it "
            "returns is limited to the operator's level and scope (GB/T 34300 一级一权限). "
            "Tokens are never accepted in a URL."
        ),
        lifespan=lifespan,
        # Swagger UI is served from this process (api/docs.py): FastAPI's page needs a CDN and
        # an inline script, which the Content-Security-Policy refuses. No ReDoc.
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.cases = case_store
    app.state.case_options = case_options
    # the webhook routes' destination allow-list and secret rotation grace (api/webhooks.py)
    app.state.webhook_settings = webhook_settings or WebhookSettings()
    app.add_middleware(SecurityHeaders)

    async def pool_unreachable(request: Request, exc: Exception) -> JSONResponse:
        # An unreachable pool (PostgreSQL down or restarting) is the service's state, not a
        # bug of the request: 503, and the client may try again shortly.
        log.warning("%s %s: the pool is unreachable (%s)", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "the event pool is unreachable; try again shortly"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )

    async def pool_refused_value(request: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL refuses some values SQLite keeps (a NUL character in text): the request's
        # value, so the request's 400, not the server's 500.
        log.info("%s %s: a value the pool refuses (%s)", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "a value in the request cannot be stored or compared by the event pool"},
            status_code=status.HTTP_400_BAD_REQUEST,
        )

    if is_pool_url(pool):
        for fault in (
            PoolUnavailableError,
            psycopg.OperationalError,
            psycopg.InterfaceError,
            psycopg_pool.PoolTimeout,
        ):
            app.add_exception_handler(fault, pool_unreachable)
        app.add_exception_handler(psycopg.DataError, pool_refused_value)

    _auth_routes(app)
    _ops_routes(app)
    app.include_router(events.router)
    app.include_router(resources.router)
    app.include_router(live.router)
    app.include_router(case_metrics.router)  # before /cases/{event_id}: "metrics" is no id
    app.include_router(case_routes.router)
    app.include_router(webhooks.router)
    app.include_router(docs.router)
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
        responses={
            **AUTH_RESPONSES,
            429: {
                "model": Problem,
                "description": "too many failed logins for this user name or address (see "
                "Retry-After), or too many logins at once",
            },
        },
        tags=["auth"],
        summary="Log in: username and password for a bearer token",
        description="Also sets an HttpOnly, SameSite=Strict cookie that only the live stream "
        "paths read (for a browser's EventSource). Failed logins per user name and per client "
        "address are free up to a limit; after it each further failure doubles a lockout "
        "(429 with Retry-After) during which no password is checked.",
    )
    async def issue_token(
        ctx: Ctx, request: Request, response: Response, body: Annotated[TokenRequest, Body()]
    ) -> TokenOut:
        address = request.client.host if request.client is not None else "-"
        try:
            # The limiter answers before any hashing; argon2 then runs on the checker's own
            # bounded threads, never on the event loop or the shared thread pool.
            issued = await verify_login(
                ctx.auth, ctx.limiter, ctx.checker, body.username, body.password, address
            )
        except LoginThrottledError as exc:
            # No hashing was done; the answer waits out (part of) the lockout so that a
            # flooding client's next guess comes no sooner.
            waited = await ctx.refusal_pause.pause(exc.retry_after)
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                str(exc),
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after - waited)))},
            ) from exc
        except AuthError as exc:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
            ) from exc
        response.set_cookie(
            STREAM_COOKIE,
            issued.token,
            max_age=max(1, int(ctx.auth.token_ttl.total_seconds())),
            path=STREAM_COOKIE_PATH,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
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
    def logout(ctx: Ctx, request: Request, response: Response, operator: CurrentOperator) -> None:
        header = request.headers.get("authorization", "")
        ctx.auth.revoke(header.partition(" ")[2].strip())
        response.delete_cookie(
            STREAM_COOKIE,
            path=STREAM_COOKIE_PATH,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
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
            queries.ping(ctx.readers.get())
            pool_ok = True
        except Exception as exc:
            # an unreachable PostgreSQL is expected while it restarts: no traceback for that
            log.warning(
                "readiness: pool %s is not readable: %s",
                ctx.pool_label,
                exc,
                exc_info=not is_pg_pool_fault(exc),
            )
            pool_ok = False
        broker_ok = bool(ctx.broker_connected())
        ready = Ready(ready=pool_ok and broker_ok, pool=pool_ok, broker=broker_ok)
        return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
            **AUTH_RESPONSES,
        },
        tags=["operations"],
        summary="Prometheus metrics: ingest, rejections, dedup ratio, batch latency, queue",
        description="Needs a bearer token: the metrics token (setting "
        "`CWG_ACCESS__METRICS_TOKEN`) or an admin operator's token.",
    )
    def metrics(ctx: Ctx, request: Request) -> PlainTextResponse:
        _require_metrics_reader(ctx, request)
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


def _require_metrics_reader(ctx: ApiContext, request: Request) -> None:
    """Let the metrics token or an admin's token through; 401 for anything else."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = credentials.strip() if scheme.lower() == "bearer" else ""
    if (
        token
        and ctx.metrics_token
        and hmac.compare_digest(token.encode(), ctx.metrics_token.encode())
    ):
        return
    try:
        if token and ctx.auth.resolve(token).is_admin:
            return
    except AuthError:
        pass
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "/metrics needs the metrics token or an admin's bearer token",
        headers={"WWW-Authenticate": "Bearer"},
    )
