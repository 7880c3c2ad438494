"""The live stream over WebSocket (``/api/v1/stream``) and Server-Sent Events
(``/api/v1/stream/sse``); the filters (``grid``, ``type``, ``severity``, ``kind``) apply on
the server, always inside the operator's own scope. Each WebSocket message or SSE event is one
frame: a lone item, or ``{"kind": "batch", "items": [...]}`` with all that was due for the
client at once (``aggregator/fanout/stream.py`` describes the items).

A token never travels in a URL, where access logs, proxies and browser history keep it. The
WebSocket authenticates with its first message, ``{"token": "…"}``, within
``AUTH_TIMEOUT_S``, and is answered ``{"kind": "authenticated", …}`` (or closed with 1008).
That was preferred to a ``Sec-WebSocket-Protocol: cwg.bearer.<token>`` subprotocol: a header
is what proxies and servers log, the server must echo the chosen subprotocol back (the token
again, in a response header), and the header's token syntax does not fit every token. The
price is one accepted socket for at most ``AUTH_TIMEOUT_S`` before it is known whose it is.
SSE takes the ``Authorization: Bearer`` header, or the HttpOnly, SameSite=Strict cookie the
login sets for the stream's paths (a browser's EventSource cannot set headers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, WebSocket, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from aggregator.access.auth import AuthError, Operator
from aggregator.api.deps import AUTH_RESPONSES, ApiContext, Ctx, bearer_token
from aggregator.api.events import GRID_PREFIX
from aggregator.api.models import Problem
from aggregator.fanout.stream import (
    DROPPED_CLOSE_CODE,
    DROPPED_MESSAGE,
    StreamClient,
    StreamFilter,
    frame,
)
from contract import Severity

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/stream", tags=["stream"])

_GRID = re.compile(GRID_PREFIX)
_TYPE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
_KINDS = {"event", "alert"}
POLICY_VIOLATION = 1008
AUTH_TIMEOUT_S = 5.0


class StreamAuth(BaseModel):
    """The first message a WebSocket client sends."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=256)


class FilterError(ValueError):
    pass


def parse_filter(
    grid: str | None, types: list[str], severities: list[str], kinds: list[str]
) -> StreamFilter:
    if grid and not _GRID.match(grid):
        raise FilterError("grid must be a grid code prefix (digits)")
    for t in types:
        if not _TYPE.match(t):
            raise FilterError(f"bad type {t!r}")
    try:
        sev = frozenset(Severity(s) for s in severities)
    except ValueError as exc:
        raise FilterError(f"severity must be one of {[s.value for s in Severity]}") from exc
    if not set(kinds) <= _KINDS:
        raise FilterError(f"kind must be among {sorted(_KINDS)}")
    return StreamFilter(
        grid=grid or "",
        types=frozenset(types),
        severities=sev,
        # Raw alert outcomes only on request (kind=alert or alerts=1): at thousands of alerts a
        # second they would swamp an operator who only watches events.
        kinds=frozenset(kinds) if kinds else frozenset({"event"}),
    )


def wanted_kinds(kinds: list[str], alerts: str | bool | None) -> list[str]:
    """``alerts=1`` adds raw alert outcomes to whatever kinds were asked for (events by default)."""
    if alerts in (True, "1", "true", "yes"):
        return sorted({*(kinds or ["event"]), "alert"})
    return kinds


def _resolve(ctx: ApiContext, token: str | None) -> Operator:
    if not token:
        raise AuthError(
            "missing token: send the bearer token in the Authorization header "
            "(or log in first: the login's cookie works for the stream)"
        )
    return ctx.auth.resolve(token)


async def _first_message_auth(websocket: WebSocket, ctx: ApiContext) -> Operator | None:
    """The operator whose token the client's first message carries; None once the socket has
    been closed with 1008 (no message in time, not the expected JSON, or a bad token)."""
    try:
        text = await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_S)
        auth = StreamAuth.model_validate_json(text)
        return await asyncio.to_thread(ctx.auth.resolve, auth.token)
    except TimeoutError:
        reason = f'send {{"token": "<bearer token>"}} within {AUTH_TIMEOUT_S:g} s'
    except (ValidationError, KeyError):
        # KeyError: a binary frame where text was expected.
        reason = 'the first message must be {"token": "<bearer token>"}'
    except AuthError as exc:
        reason = str(exc)
    except (WebSocketDisconnect, RuntimeError):
        return None  # gone before it said who it is
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await websocket.close(POLICY_VIOLATION, reason[:120])
    return None


@router.websocket("")
async def stream_ws(websocket: WebSocket) -> None:
    ctx: ApiContext = websocket.app.state.ctx
    q = websocket.query_params
    try:
        flt = parse_filter(q.get("grid"), q.getlist("type"), q.getlist("severity"),
                           wanted_kinds(q.getlist("kind"), q.get("alerts")))  # fmt: skip
    except FilterError as exc:
        await _deny(websocket, status.HTTP_400_BAD_REQUEST, str(exc))
        return
    await websocket.accept()
    operator = await _first_message_auth(websocket, ctx)
    if operator is None:
        return
    try:
        await websocket.send_text(
            orjson.dumps({"kind": "authenticated", "username": operator.username}).decode()
        )
    except (WebSocketDisconnect, RuntimeError, OSError):
        return
    client = ctx.hub.connect(operator, flt)
    receiver = asyncio.create_task(_drain_incoming(websocket))
    try:
        while True:
            if receiver.done():
                break  # the browser went away
            if client.queue.empty():
                # Wait for messages or the browser's close, whichever comes first.
                waiter = asyncio.create_task(client.queue.wait())
                done, _ = await asyncio.wait(
                    {waiter, receiver}, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter not in done:
                    waiter.cancel()
                    break
            else:
                # More than a frame's worth waited (a backlog of raw alerts): the next frame
                # after the others' turn, so one backlog does not hold the loop.
                await asyncio.sleep(0)
            # Everything due goes in one frame: a tick's changes cost one send, not one each.
            texts = client.queue.take()
            text = frame(texts)
            await websocket.send_text(text)
            client.sent += len(texts)
            client.frames += 1
            if text is DROPPED_MESSAGE and client.dropped:
                await websocket.close(DROPPED_CLOSE_CODE, "slow consumer")
                break
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the socket closed under us; nothing left to tell
    finally:
        receiver.cancel()
        ctx.hub.disconnect(client)
        if websocket.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.close()


async def _drain_incoming(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so its close is noticed at once."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return


async def _deny(websocket: WebSocket, code: int, detail: str) -> None:
    # With the HTTP-response extension the handshake is refused with a real 401/400; otherwise
    # the socket closes with 1008 (policy violation) before it is accepted.
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        body = Problem(detail=detail).model_dump_json().encode()
        await websocket.send_denial_response(
            Response(body, status_code=code, media_type="application/json")
        )
    else:
        await websocket.close(POLICY_VIOLATION, detail[:120])


@router.get(
    "/sse",
    response_class=StreamingResponse,
    responses={
        **AUTH_RESPONSES,
        400: {"model": Problem, "description": "bad filter"},
        200: {"content": {"text/event-stream": {}}, "description": "the live stream"},
    },
    summary="The live stream as Server-Sent Events (the WebSocket's frames, one per event)",
)
async def stream_sse(
    request: Request,
    ctx: Ctx,
    grid: Annotated[str | None, Query(pattern=GRID_PREFIX)] = None,
    type_: Annotated[list[str] | None, Query(alias="type")] = None,
    severity: Annotated[list[Severity] | None, Query()] = None,
    kind: Annotated[list[str] | None, Query()] = None,
    alerts: Annotated[bool, Query(description="also raw alert outcomes")] = False,
    max_seconds: Annotated[
        float, Query(gt=0, le=86400, description="end the stream after this long")
    ] = 3600,
) -> StreamingResponse:
    try:
        operator = await asyncio.to_thread(_resolve, ctx, bearer_token(request))
    except AuthError as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from exc
    try:
        flt = parse_filter(
            grid, type_ or [], [s.value for s in severity or []], wanted_kinds(kind or [], alerts)
        )
    except FilterError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    client = ctx.hub.connect(operator, flt)
    return StreamingResponse(
        _sse(request, ctx, client, max_seconds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _sse(
    request: Request, ctx: ApiContext, client: StreamClient, max_seconds: float
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    try:
        yield ": connected\n\n"
        while loop.time() < deadline:
            try:
                await asyncio.wait_for(
                    client.queue.wait(), timeout=min(15.0, deadline - loop.time())
                )
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                continue
            # One SSE event per frame, as the WebSocket: a lone item, or a batch of them.
            texts = client.queue.take()
            text = frame(texts)
            yield f"data: {text}\n\n"
            client.sent += len(texts)
            client.frames += 1
            if text is DROPPED_MESSAGE and client.dropped:
                return
    finally:
        ctx.hub.disconnect(client)
