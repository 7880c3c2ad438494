"""Outbound webhook subscriptions and their deliveries (administrators only).

A subscription's secret (``whsec_…``) is in the answer to its creation, or to a rotation, and
nowhere else: the receiver keeps it to verify signatures. A rotation (``POST …/secret``) makes a
new one; for ``CWG_WEBHOOKS__ROTATION_GRACE_S`` deliveries are signed with both, so the
receiver can switch without losing any. Deliveries that gave up (``status=dead``) stay listed
with their last error, and can be sent again (``POST …/deliveries/{id}/retry``).

A subscription can be switched off and on and edited (``PATCH``); a disabled one gets no new
deliveries and its pending ones wait. A receiver answering ``410 Gone`` disables it too, with
that reason. Its URL must be a public destination unless ``CWG_WEBHOOKS__ALLOW_NETWORKS``
names it (aggregator/fanout/destinations.py): checked here, and again at every delivery.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from aggregator.access.auth import Operator
from aggregator.api.deps import AUTH_RESPONSES, Ctx, CurrentOperator
from aggregator.api.events import DEPARTMENT, TYPE_CODE
from aggregator.api.models import Problem
from aggregator.config import WebhookSettings
from aggregator.fanout.destinations import AllowList, RefusedDestinationError, check_destination
from aggregator.pool.outbox import Delivery, Outbox, Subscription, SubscriptionIn

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])

SUBSCRIPTION_ID = r"^wh_[0-9a-f]{16}$"
ACTION = r"^[a-z][a-z0-9_.]{0,63}$"

_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    403: {"model": Problem, "description": "not an administrator"},
    404: {"model": Problem, "description": "no such subscription"},
}


class WebhookIn(BaseModel):
    """A new subscription; a filter left empty matches everything."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(description="where deliveries are POSTed (http or https)")
    event_types: list[Annotated[str, Field(pattern=TYPE_CODE)]] = Field(
        default=[], max_length=64, description="warning type codes of the catalogue"
    )
    grid_prefix: str = Field(
        default="", pattern=r"^[0-9]{0,20}$", description="grid code prefix ('': every grid)"
    )
    department: str | None = Field(
        default=None, pattern=DEPARTMENT, description="a lead or co-department of the case"
    )
    actions: list[Annotated[str, Field(pattern=ACTION)]] = Field(
        default=[], max_length=64, description="case actions (verify, whistle, …)"
    )
    description: str = Field(default="", max_length=500)


class WebhookPatch(BaseModel):
    """What to change of a subscription; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(
        default=None,
        description="false: no new deliveries are queued and pending ones wait; true: they "
        "go on, in order, from where they stopped",
    )
    url: AnyHttpUrl | None = None
    event_types: list[Annotated[str, Field(pattern=TYPE_CODE)]] | None = Field(
        default=None, max_length=64
    )
    grid_prefix: str | None = Field(default=None, pattern=r"^[0-9]{0,20}$")
    department: str | None = Field(
        default=None, pattern=DEPARTMENT, description="null: any department"
    )
    actions: list[Annotated[str, Field(pattern=ACTION)]] | None = Field(default=None, max_length=64)
    description: str | None = Field(default=None, max_length=500)


class WebhookOut(BaseModel):
    id: str
    url: str
    event_types: list[str]
    grid_prefix: str
    department: str | None
    actions: list[str]
    description: str
    enabled: bool
    created_by: str
    created_at: datetime
    disabled_reason: str | None = Field(
        description="why it is disabled ('receiver answered 410 Gone', …); null while enabled"
    )
    disabled_at: datetime | None
    secret_rotated_at: datetime | None = Field(description="the last secret rotation")
    previous_secret_valid_until: datetime | None = Field(
        description="until then deliveries are signed with the previous secret as well"
    )
    deliveries: dict[str, int] = Field(description="deliveries by status")


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="the signing secret (whsec_…): shown here once, never again; the receiver "
        "verifies webhook-signature with it"
    )


class SecretRotated(BaseModel):
    id: str
    secret: str = Field(description="the new signing secret (whsec_…): shown here once")
    previous_secret_valid_until: datetime = Field(
        description="deliveries carry a signature with the previous secret too until then"
    )


class DeliveryOut(BaseModel):
    id: int
    webhook_id: str = Field(description="the webhook-id header: the receiver's idempotency key")
    case_id: str
    message_type: str
    status: Literal["pending", "delivered", "dead"]
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="for a pending delivery")
    finished_at: datetime | None
    last_error: str | None
    last_status: int | None = Field(description="the receiver's last HTTP status")
    payload: str = Field(description="the JSON body sent")


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_after: int | None = Field(description="pass as after= for the next page")


def _admin(operator: CurrentOperator) -> Operator:
    if not operator.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "webhooks: administrators only")
    return operator


Admin = Annotated[Operator, Depends(_admin)]


def _outbox(ctx: Ctx) -> Outbox:
    # a connection per call: subscriptions change rarely, and nothing is left to close
    return Outbox(ctx.pool, pooled=False)


Box = Annotated[Outbox, Depends(_outbox)]


def _hook_settings(request: Request) -> WebhookSettings:
    settings: WebhookSettings = request.app.state.webhook_settings
    return settings


HookSettings = Annotated[WebhookSettings, Depends(_hook_settings)]


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _opt_ts(value: float | None) -> datetime | None:
    return None if value is None else _ts(value)


def _check_url(url: str, settings: WebhookSettings) -> None:
    """422 for a destination that is not public and not allowed (resolving its name)."""
    try:
        check_destination(url, AllowList.parse(settings.allow_networks))
    except RefusedDestinationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None


def _unknown_types(ctx: Ctx, types: list[str]) -> None:
    unknown = sorted(set(types) - set(ctx.catalogue.types))
    if unknown:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY, f"unknown warning types: {', '.join(unknown)}"
        )


def _out(sub: Subscription, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": sub.id,
        "url": sub.url,
        "event_types": list(sub.event_types),
        "grid_prefix": sub.grid_prefix,
        "department": sub.department,
        "actions": list(sub.actions),
        "description": sub.description,
        "enabled": sub.enabled,
        "created_by": sub.created_by,
        "created_at": _ts(sub.created_at),
        "disabled_reason": sub.disabled_reason,
        "disabled_at": _opt_ts(sub.disabled_at),
        "secret_rotated_at": _opt_ts(sub.secret_rotated_at),
        "previous_secret_valid_until": _opt_ts(sub.previous_secret_until),
        "deliveries": counts,
    }


def _delivery(d: Delivery) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        webhook_id=d.webhook_id,
        case_id=d.case_id,
        message_type=d.message_type,
        status=d.status,
        attempts=d.attempts,
        created_at=_ts(d.created_at),
        next_attempt_at=_ts(d.next_attempt_at) if d.status == "pending" else None,
        finished_at=_ts(d.finished_at) if d.finished_at is not None else None,
        last_error=d.last_error,
        last_status=d.last_status,
        payload=d.payload,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    responses={
        **_RESPONSES,
        422: {"model": Problem, "description": "unknown warning type, or a refused destination"},
    },
    summary="Subscribe a URL to case steps; the answer holds the signing secret, once",
)
def create_webhook(
    body: WebhookIn, ctx: Ctx, admin: Admin, outbox: Box, settings: HookSettings
) -> WebhookCreated:
    _unknown_types(ctx, body.event_types)
    _check_url(str(body.url), settings)
    sub, secret = outbox.add_subscription(
        SubscriptionIn(
            url=str(body.url),
            event_types=tuple(body.event_types),
            grid_prefix=body.grid_prefix,
            department=body.department,
            actions=tuple(body.actions),
            description=body.description,
        ),
        created_by=admin.username,
    )
    return WebhookCreated(**_out(sub, {"pending": 0, "delivered": 0, "dead": 0}), secret=secret)


@router.get(
    "",
    response_model=list[WebhookOut],
    responses=_RESPONSES,
    summary="Every subscription (without secrets) with its deliveries by status",
)
def list_webhooks(_: Admin, outbox: Box) -> list[WebhookOut]:
    return [WebhookOut(**_out(s, outbox.counts(s.id))) for s in outbox.subscriptions()]


@router.get(
    "/{webhook_id}",
    response_model=WebhookOut,
    responses=_RESPONSES,
    summary="One subscription (without its secret)",
)
def get_webhook(
    _: Admin, outbox: Box, webhook_id: Annotated[str, Path(pattern=SUBSCRIPTION_ID)]
) -> WebhookOut:
    sub = outbox.subscription(webhook_id)
    if sub is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {webhook_id}")
    return WebhookOut(**_out(sub, outbox.counts(sub.id)))


@router.patch(
    "/{webhook_id}",
    response_model=WebhookOut,
    responses={
        **_RESPONSES,
        422: {"model": Problem, "description": "unknown warning type, or a refused destination"},
    },
    summary="Enable, disable or edit a subscription (URL, filters, description)",
)
def patch_webhook(
    body: WebhookPatch,
    ctx: Ctx,
    admin: Admin,
    outbox: Box,
    settings: HookSettings,
    webhook_id: Annotated[str, Path(pattern=SUBSCRIPTION_ID)],
) -> WebhookOut:
    changes: dict[str, Any] = {}
    for name in body.model_fields_set:
        value = getattr(body, name)
        if value is None and name != "department":
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"{name} may not be null")
        changes[name] = value
    if "event_types" in changes:
        _unknown_types(ctx, changes["event_types"])
    if "url" in changes:
        changes["url"] = str(changes["url"])
        _check_url(changes["url"], settings)
    sub = outbox.update_subscription(
        webhook_id, changes, disabled_reason=f"disabled by {admin.username}"
    )
    if sub is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {webhook_id}")
    return WebhookOut(**_out(sub, outbox.counts(sub.id)))


@router.post(
    "/{webhook_id}/secret",
    response_model=SecretRotated,
    responses=_RESPONSES,
    summary="Rotate the signing secret: the new one is in the answer, once; the old one "
    "still signs for the grace period",
)
def rotate_secret(
    _: Admin,
    outbox: Box,
    settings: HookSettings,
    webhook_id: Annotated[str, Path(pattern=SUBSCRIPTION_ID)],
) -> SecretRotated:
    now = time.time()
    secret = outbox.rotate_secret(webhook_id, settings.rotation_grace_s, now=now)
    if secret is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {webhook_id}")
    return SecretRotated(
        id=webhook_id,
        secret=secret,
        previous_secret_valid_until=_ts(now + settings.rotation_grace_s),
    )


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_RESPONSES,
    summary="Remove a subscription and its deliveries (pending ones are not sent)",
)
def delete_webhook(
    _: Admin, outbox: Box, webhook_id: Annotated[str, Path(pattern=SUBSCRIPTION_ID)]
) -> Response:
    if not outbox.delete_subscription(webhook_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {webhook_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryPage,
    responses=_RESPONSES,
    summary="A subscription's deliveries in enqueue order; status=dead: those that gave up",
)
def list_deliveries(
    _: Admin,
    outbox: Box,
    webhook_id: Annotated[str, Path(pattern=SUBSCRIPTION_ID)],
    status_: Annotated[
        Literal["pending", "delivered", "dead"] | None, Query(alias="status")
    ] = None,
    after: Annotated[int, Query(ge=0, le=2**62, description="the last id of a page")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> DeliveryPage:
    if outbox.subscription(webhook_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook {webhook_id}")
    rows = outbox.deliveries(webhook_id, status_, limit=limit + 1, after_id=after)
    more = len(rows) > limit
    rows = rows[:limit]
    return DeliveryPage(
        items=[_delivery(d) for d in rows], next_after=rows[-1].id if more and rows else None
    )


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/retry",
    response_model=DeliveryOut,
    responses={
        **_RESPONSES,
        404: {"model": Problem, "description": "no such subscription or delivery"},
        409: {"model": Problem, "description": "the delivery is pending already"},
    },
    summary="Send a dead (or delivered) delivery again, now, with the same webhook-id",
)
def retry_delivery(
    _: Admin,
    outbox: Box,
    webhook_id: Annotated[str, Path(pattern=SUBSCRIPTION_ID)],
    delivery_id: Annotated[int, Path(ge=1, le=2**62)],
) -> DeliveryOut:
    found = outbox.redeliver(webhook_id, delivery_id)
    if found is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no delivery {delivery_id} of webhook {webhook_id}"
        )
    if found == "pending":
        raise HTTPException(status.HTTP_409_CONFLICT, f"delivery {delivery_id} is pending already")
    return _delivery(found)
