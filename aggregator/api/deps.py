"""What every route needs, handed in by ``create_app`` and reached through FastAPI dependencies."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aggregator.access.auth import (
    AuthError,
    AuthStore,
    LoginLimiter,
    Operator,
    PasswordChecker,
    RefusalPause,
)
from aggregator.api.cache import MicroCache
from aggregator.api.models import EventPage, Problem
from aggregator.fanout.metrics import Metrics
from aggregator.fanout.stream import StreamHub
from aggregator.grids import GridIndex
from aggregator.pool.port import LifecycleSteps, SnapshotStorage
from aggregator.pool.reader import Reader, open_reader
from contract import Catalogue, EventNoticeV1


class Readers:
    """Read-only pool connections, one per server thread (SQLite WAL, or PostgreSQL's MVCC:
    reads never wait for ingest)."""

    def __init__(self, target: Path | str) -> None:
        self.target = target
        self._local = threading.local()
        self._all: list[Reader] = []
        self._lock = threading.Lock()

    def get(self) -> Reader:
        conn: Reader | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_reader(self.target)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


@dataclass
class ApiContext:
    pool: Path | str  # the SQLite file or the PostgreSQL URL (holds its password: never log it)
    pool_label: str  # the pool as logs name it
    catalogue: Catalogue
    grids: GridIndex
    snapshots: SnapshotStorage
    metrics: Metrics
    hub: StreamHub
    auth: AuthStore
    broker_connected: Callable[[], bool]
    on_notice: Callable[[EventNoticeV1], None] | None
    readers: Readers
    # Lifecycle writes go through a writer connection of the API's own: the ingest writer's
    # connection is busy inside its batch transactions on another thread.
    writer: LifecycleSteps
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    grid_features: list[dict[str, Any]] = field(default_factory=list)
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    checker: PasswordChecker = field(default_factory=PasswordChecker)
    refusal_pause: RefusalPause = field(default_factory=RefusalPause)
    # Besides an admin operator's token, this one may read /metrics (a scraper's own secret).
    metrics_token: str | None = None
    # Event-list answers by (scope, normalized query), shared for up to a second by the many
    # operators of one scope who poll the same list (aggregator/api/cache.py).
    event_pages: MicroCache[EventPage] = field(default_factory=MicroCache)


async def get_ctx(request: Request) -> ApiContext:
    # async: an attribute read, not worth a hop to the thread pool on every request
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(get_ctx)]

_bearer = HTTPBearer(auto_error=False, description="token from POST /api/v1/auth/token")

UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    "missing or invalid bearer token: log in with POST /api/v1/auth/token",
    headers={"WWW-Authenticate": "Bearer"},
)


def current_operator(
    ctx: Ctx, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Operator:
    if creds is None or creds.scheme.lower() != "bearer":
        raise UNAUTHORIZED
    try:
        return ctx.auth.resolve(creds.credentials)
    except AuthError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from exc


CurrentOperator = Annotated[Operator, Depends(current_operator)]

# The stream's cookie (set at login, HttpOnly, SameSite=Strict, only sent to the stream's
# paths): what a browser's EventSource, which cannot set headers, authenticates with.
STREAM_COOKIE = "cwg_stream"
STREAM_COOKIE_PATH = "/api/v1/stream"


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, else of the stream cookie."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.cookies.get(STREAM_COOKIE) or None


def db(ctx: Ctx) -> Reader:
    return ctx.readers.get()


Db = Annotated[Reader, Depends(db)]

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no token, or an invalid or expired one"},
}
SCOPED_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: {"model": Problem, "description": "no such item in the caller's scope"},
}
