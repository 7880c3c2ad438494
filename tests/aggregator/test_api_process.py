"""The operator API in its own process: an operator's step reaches integrators on the events
topic through the API process's own broker connection, and its readiness follows that
connection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from aggregator.service import Service

from .conftest import grid_in_community, interior, make_alert, wait_until
from .operator_support import Api, publish, running_service


@pytest.fixture
def service(broker: Any, tmp_path: Path) -> Iterator[Service]:
    with running_service(broker, tmp_path) as s:
        yield s


def test_an_operators_step_goes_out_on_the_events_topic(broker: Any, service: Service) -> None:
    api = Api(service.url)
    try:
        integrator = broker.client("integrator")
        assert not any(c.is_failure for c in integrator.subscribe(broker.topics.events))
        publish(broker, make_alert("cam-001", *interior(grid_in_community(0, 6))))
        (created,) = integrator.expect(1)
        event = orjson.loads(created.payload)["event"]
        assert orjson.loads(created.payload)["change"] == "created"
        r = api.post(f"/api/v1/events/{event['event_id']}/verify", "comm_a")  # a case step
        assert r.status_code == 200, r.text
        (step,) = integrator.expect(1)
        notice = orjson.loads(step.payload)
        assert notice["change"] == "updated"
        assert notice["event"]["event_id"] == event["event_id"]
        assert notice["event"]["status"] == "verified"
        integrator.disconnect()
    finally:
        api.close()


def test_readiness_follows_the_api_process_broker_connection(broker: Any, service: Service) -> None:
    api = Api(service.url)
    try:
        assert api.get("/readyz").json() == {"ready": True, "pool": True, "broker": True}
        broker.stop()
        wait_until(lambda: api.get("/readyz").status_code == 503, 15, "not ready")
        assert api.get("/readyz").json() == {"ready": False, "pool": True, "broker": False}
        broker.start()
        wait_until(lambda: api.get("/readyz").status_code == 200, 20, "ready again")
    finally:
        api.close()
