"""Helpers for the operator-side tests (API, stream, browser): the whole service on the test
broker, operator accounts of every level, and an HTTP client that logs in as any of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from argon2 import PasswordHasher

from aggregator.access.auth import Level
from aggregator.fanout.timeseries import TimeSeriesSettings
from aggregator.service import Service
from contract import AlertV1

from .conftest import GRIDS, PoolBackend, aggregator_settings, wait_until

COMMUNITY_A = GRIDS.communities()[0].code  # 龙翔社区 330383001001
COMMUNITY_B = GRIDS.communities()[1].code  # 海港社区 330383001002 (same street)
COMMUNITY_C = GRIDS.communities()[2].code  # 江滨社区 330383002001 (another street)
STREET_1 = COMMUNITY_A[:9]
COUNTY = COMMUNITY_A[:6]
PASSWORD = "correct horse battery"
# The library default (64 MiB, 3 passes) takes ~0.5 s per hash on a shared 2-core machine; tests
# check the behaviour, not the cost, so they use a small cost.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)

# username → (level, scope, department)
OPERATORS: dict[str, tuple[Level, str, str | None]] = {
    "admin": (Level.ADMIN, "", None),
    "county": (Level.COUNTY, COUNTY, None),
    "street1": (Level.STREET, STREET_1, None),
    "comm_a": (Level.COMMUNITY, COMMUNITY_A, None),
    "comm_b": (Level.COMMUNITY, COMMUNITY_B, None),
    "police": (Level.DEPARTMENT, "", "police"),
    "fire": (Level.DEPARTMENT, "", "fire"),
}


@contextmanager
def running_service(
    broker: Any,
    root: Path,
    *,
    timeseries: TimeSeriesSettings | None = None,
    stream_queue: int = 256,
    operators: dict[str, tuple[Level, str, str | None]] | None = None,
    backend: PoolBackend | None = None,
    **settings: Any,
) -> Iterator[Service]:
    """Broker-connected aggregator + API on a free port, with operator accounts provisioned;
    on ``backend``'s pool when given (``pool_backend``), else on the default SQLite file.
    ``settings``: further ``Settings`` fields (e.g. ``retention=RetentionSettings(…)``)."""
    overrides = backend.settings_overrides() if backend is not None else {}
    overrides.update(settings)
    service = Service(
        aggregator_settings(broker, root / "agg", **overrides),
        port=0,
        timeseries=timeseries,
        log_level="warning",
        stream_queue=stream_queue,
        password_hasher=FAST_HASHER,
    )
    for username, (level, scope, department) in (operators or OPERATORS).items():
        service.auth.create_account(
            username, level, scope_code=scope, department=department, password=PASSWORD
        )
    service.start()
    try:
        assert service.aggregator.ingest.wait_connected(5), "aggregator did not connect"
        yield service
    finally:
        service.stop()


@dataclass
class Api:
    """HTTP against the running service; ``as_(username)`` logs in once and reuses the token."""

    base_url: str
    http: httpx.Client = field(init=False)
    tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base_url, timeout=10)

    def token(self, username: str) -> str:
        if username not in self.tokens:
            r = self.http.post(
                "/api/v1/auth/token", json={"username": username, "password": PASSWORD}
            )
            assert r.status_code == 200, r.text
            self.tokens[username] = r.json()["access_token"]
        return self.tokens[username]

    def get(self, path: str, as_: str | None = None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token(as_)}"} if as_ else {}
        return self.http.get(path, params=params, headers=headers)

    def post(
        self, path: str, as_: str | None = None, json: Any = None, **params: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token(as_)}"} if as_ else {}
        return self.http.post(path, params=params, headers=headers, json=json)

    def close(self) -> None:
        self.http.close()


def publish(broker: Any, alert: AlertV1) -> None:
    """Publish as the alert's device (provisioned on the fly), waiting for the PUBACK."""
    if alert.device_id not in broker.accounts:
        broker.add_device(alert.device_id)
    client = broker.client(alert.device_id)
    try:
        reason = client.publish(broker.topics.alert(alert.device_id), alert.to_json())
        assert not reason.is_failure, reason
    finally:
        client.disconnect()


def wait_for_events(api: Api, n: int, timeout: float = 10.0, **params: Any) -> list[Any]:
    def enough() -> list[Any] | None:
        items: list[Any] = api.get("/api/v1/events", "admin", limit=500, **params).json()["items"]
        return items if len(items) >= n else None

    result: list[Any] = wait_until(enough, timeout, f"{n} events")
    return result
