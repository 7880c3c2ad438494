"""Operators and departments at their desks: accounts of the gateway's API taking case steps.

A :class:`Desk` is one account logged in to the operator API (``/api/v1``): it reads a case
(state, version, deadlines, the actions it may take), takes a step with compare-and-set on the
version it read, and uploads evidence photos. Every refusal comes back as a
:class:`StepRefused` carrying the HTTP status (403 wrong role or area, 409 wrong state or a
stale version, 422 a payload lacking what the action requires) and the API's reason.

Actions are the lifecycle table's names (``aggregator/cases/lifecycle.yaml``); the scenario
language also takes the everyday words of the issue (:data:`ACTION_ALIASES`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from aggregator.cases import Action
from simulators.errors import ScenarioError

__all__ = ["ACTION_ALIASES", "Desk", "StepRefused", "action_of"]

# The words the issue uses for the steps, onto the table's actions.
ACTION_ALIASES: dict[str, Action] = {
    "accept": Action.ACCEPT_OFF_SITE,
    "extend": Action.APPLY_EXTENSION,
    "approve": Action.APPROVE_EXTENSION,
    "refuse": Action.REFUSE_EXTENSION,
    "close": Action.ACCEPT_FEEDBACK,
}


def action_of(name: str) -> Action:
    """A table action by its name or its alias; ScenarioError naming both lists otherwise."""
    if name in ACTION_ALIASES:
        return ACTION_ALIASES[name]
    try:
        return Action(name)
    except ValueError:
        raise ScenarioError(
            f"unknown action {name!r}; actions: {', '.join(a.value for a in Action)}; "
            f"aliases: {', '.join(sorted(ACTION_ALIASES))}"
        ) from None


class StepRefused(ScenarioError):  # noqa: N818 - a refusal, not a fault of the caller's code
    """The API refused a step (or a read): ``status`` and the reason it gave."""

    def __init__(self, status: int, detail: str, action: str = "") -> None:
        super().__init__(f"{action or 'request'} refused: HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    password: str
    level: str
    scope_code: str = ""
    department: str | None = None


class Desk:
    """One account's session on the API; thread-safe (one lock around its HTTP client)."""

    def __init__(self, base_url: str, account: Account, *, timeout_s: float = 10.0) -> None:
        self.account = account
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s)
        self._token: str | None = None
        self._lock = threading.Lock()

    @property
    def username(self) -> str:
        return self.account.username

    def _headers(self) -> dict[str, str]:
        if self._token is None:
            r = self._http.post(
                "/api/v1/auth/token",
                json={"username": self.account.username, "password": self.account.password},
            )
            if r.status_code != 200:
                raise StepRefused(r.status_code, _detail(r), "login")
            self._token = str(r.json()["access_token"])
        return {"Authorization": f"Bearer {self._token}"}

    def _call(
        self, method: str, path: str, what: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        with self._lock:
            r = self._http.request(
                method, path, headers={**self._headers(), **(headers or {})}, **kw
            )
        if r.status_code >= 300:
            raise StepRefused(r.status_code, _detail(r), what)
        return r.json()

    def case(self, event_id: int) -> dict[str, Any]:
        """The case as this account sees it (``CaseOut``: state, version, deadlines …)."""
        out: dict[str, Any] = self._call("GET", f"/api/v1/cases/{event_id}", "read")
        return out

    def inbox_page(self, box: str | None = None, *, limit: int = 100) -> dict[str, Any]:
        """The account's inbox (``CasePage``: items, most recently changed first, and
        ``as_of``, the case clock's now)."""
        params: dict[str, Any] = {"limit": limit}
        if box:
            params["box"] = box
        page: dict[str, Any] = self._call("GET", "/api/v1/cases", "inbox", params=params)
        return page

    def inbox(self, box: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.inbox_page(box)["items"]
        return items

    def metrics(self, by: str, *, since: datetime | None = None) -> dict[str, Any]:
        """The handling figures per ``by`` (community, department, person) over the cases
        registered since ``since`` (``GET /api/v1/cases/metrics``)."""
        params: dict[str, Any] = {"by": by}
        if since is not None:
            params["since"] = since.isoformat()
        out: dict[str, Any] = self._call("GET", "/api/v1/cases/metrics", "metrics", params=params)
        return out

    def step(
        self,
        event_id: int,
        action: Action | str,
        *,
        expected_version: int | None = None,
        **payload: Any,
    ) -> dict[str, Any]:
        """Take ``action`` on the case; without ``expected_version`` the version is read
        first. Returns the API's ``StepOut`` (with the case after the step)."""
        act = action if isinstance(action, Action) else action_of(action)
        if expected_version is None:
            expected_version = int(self.case(event_id)["version"])
        body = {
            "action": act.value,
            "expected_version": expected_version,
            "payload": {k: _json(v) for k, v in payload.items() if v is not None},
        }
        out: dict[str, Any] = self._call(
            "POST", f"/api/v1/cases/{event_id}/steps", act.value, json=body
        )
        return out

    def upload_photo(self, jpeg: bytes) -> str:
        """Store an evidence photo; returns the sha256 a step names it by."""
        out = self._call(
            "POST",
            "/api/v1/evidence",
            "evidence",
            content=jpeg,
            headers={"Content-Type": "image/jpeg"},
        )
        return str(out["sha256"])

    def close(self) -> None:
        self._http.close()


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    return value


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:300]
