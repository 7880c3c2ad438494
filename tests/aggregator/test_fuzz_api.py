"""Schemathesis fuzzes the API from its own OpenAPI document against the running service over a
pool the real pipeline filled: no 500s, responses match their documented schemas."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from aggregator.broker.launcher import BrokerSettings, MosquittoBroker
from aggregator.broker.registry import AccountRole, DeviceKind, DeviceRegistry
from aggregator.service import Service
from tests.conftest import Account, BrokerHandle

from .conftest import grid_in_community, interior, jpeg, make_alert, wait_until
from .operator_support import PASSWORD, running_service


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    # Module-scoped (the shared ``broker`` fixture is per test): schemathesis runs one test per
    # operation, and they all share one filled service.
    root = tmp_path_factory.mktemp("fuzz-broker")
    registry = DeviceRegistry(root / "registry.yaml")
    accounts: dict[str, Account] = {}
    _, password = registry.add_account("aggregator", AccountRole.AGGREGATOR)
    accounts["aggregator"] = Account("aggregator", password)
    for device in ("cam-001", "cam-002"):
        _, password = registry.add_device(device, DeviceKind.CAMERA)
        accounts[device] = Account(device, password)
    registry.save()
    broker = MosquittoBroker(BrokerSettings(state_dir=root / "state"), registry)
    broker.start()
    handle = BrokerHandle(broker, registry.path, root / "credentials", accounts)
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def fuzz_service(
    fuzz_broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_service(fuzz_broker, tmp_path_factory.mktemp("fuzz-service")) as service:
        cam = fuzz_broker.client("cam-001")
        topic = fuzz_broker.topics.alert("cam-001")
        for i, type_ in enumerate(["smoke_fire", "fire_lane_occupied", "gas_leak"]):
            alert = make_alert(
                "cam-001",
                *interior(grid_in_community(i, 2)),
                type=type_,
                seq=i,
                alert_id=f"fuzz-{uuid.uuid4().hex}",
                snapshot=jpeg(i),
            )
            cam.publish(topic, alert.to_json())
        cam.publish(topic, b"\x00\xffnot an alert")
        http = httpx.Client(base_url=service.url)
        token = http.post(
            "/api/v1/auth/token", json={"username": "admin", "password": PASSWORD}
        ).json()["access_token"]
        wait_until(
            lambda: (
                len(
                    http.get("/api/v1/events", headers={"Authorization": f"Bearer {token}"}).json()[
                        "items"
                    ]
                )
                == 3
            ),
            what="three events",
        )
        http.close()
        yield service


@pytest.fixture(scope="module")
def admin_token(fuzz_service: Service) -> str:
    r = httpx.post(
        f"{fuzz_service.url}/api/v1/auth/token",
        json={"username": "admin", "password": PASSWORD},
    )
    token: str = r.json()["access_token"]
    return token


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# The SSE stream stays open as long as it is asked to, and logging out would end the session
# the other cases use: both are exercised in their own tests instead.
SKIPPED = {("GET", "/api/v1/stream/sse"), ("POST", "/api/v1/auth/logout")}
EXAMPLES = 25


def fuzz(
    operation: Any,
    mode: GenerationMode,
    checks: list[Any],
    examples: int,
    base_url: str,
    headers: dict[str, str],
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=checks)

    run()


def test_api_conforms_to_its_openapi(fuzz_service: Service, admin_token: str) -> None:
    # schemathesis' pytest plugin (from_fixture) does not run under pytest 9, so each
    # operation's strategy is driven by hypothesis directly; failures are gathered per operation.
    schema = schemathesis.openapi.from_url(f"{fuzz_service.url}/openapi.json")
    headers = {"Authorization": f"Bearer {admin_token}"}
    failures: dict[str, str] = {}
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        tested += 1

        name = f"{operation.method.upper()} {operation.path}"
        # Valid requests must get documented answers; invalid ones (negative mode) may be
        # refused any way the API likes, except with a server error.
        for mode, checks, examples in (
            (GenerationMode.POSITIVE, CHECKS, EXAMPLES),
            (GenerationMode.NEGATIVE, [not_a_server_error], EXAMPLES // 2),
        ):
            try:
                fuzz(operation, mode, checks, examples, fuzz_service.url, headers)
            except Unsatisfiable:
                # An operation without parameters or body has no invalid form to send.
                assert mode is GenerationMode.NEGATIVE, name
            except Exception as exc:  # noqa: BLE001 - every operation runs; all failures reported
                failures[f"{name} ({mode.value})"] = str(exc)[:2000]
    assert tested >= 15
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_schemathesis_version() -> None:
    assert schemathesis.SCHEMATHESIS_VERSION.startswith("4.")
