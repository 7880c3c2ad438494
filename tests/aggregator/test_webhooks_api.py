"""The webhook API (administrators only) on the running service, on both pool backends: the
secret shown once, subscriptions listed without it, the service's own delivery worker posting
to a real local receiver, dead deliveries listed, subscriptions removed."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from aggregator.pool.outbox import Outbox, webhook_id

from .conftest import PoolBackend, grid_in_community, interior, make_alert
from .operator_support import Api, publish, running_service, wait_for_events
from .test_webhooks import Receiver, message, wait_for


def _refused_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_webhook_api_and_the_services_worker(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the service reads these as any deployment would (CWG_WEBHOOKS__*): a short schedule
    monkeypatch.setenv("CWG_WEBHOOKS__SCHEDULE_S", "[0.2, 0.2]")
    monkeypatch.setenv("CWG_WEBHOOKS__POLL_S", "0.1")
    monkeypatch.setenv("CWG_WEBHOOKS__TIMEOUT_S", "2")
    # the receivers listen on loopback, which is refused unless allowed (IPv6's ::1 is not)
    monkeypatch.setenv("CWG_WEBHOOKS__ALLOW_NETWORKS", '["127.0.0.0/8"]')
    receiver = Receiver()
    receiver.start()
    try:
        with running_service(broker, tmp_path, backend=pool_backend) as service:
            assert service.webhooks is not None
            api = Api(service.url)
            try:
                _check(api, receiver, pool_backend)
                _case_steps(api, receiver, broker)
            finally:
                api.close()
        assert service.webhooks is None  # stopped with the service
    finally:
        receiver.stop()


def _check(api: Api, receiver: Receiver, backend: PoolBackend) -> None:
    body = {"url": receiver.url("/hook"), "event_types": ["smoke_fire"], "grid_prefix": "3303"}
    assert api.http.post("/api/v1/webhooks", json=body).status_code == 401
    assert api.post("/api/v1/webhooks", "comm_a", json=body).status_code == 403
    assert api.get("/api/v1/webhooks", "police").status_code == 403
    bad = api.post("/api/v1/webhooks", "admin", json={**body, "event_types": ["no_such_type"]})
    assert bad.status_code == 422
    assert api.post("/api/v1/webhooks", "admin", json={"url": "ftp://x"}).status_code == 422
    assert api.post("/api/v1/webhooks", "admin", json={**body, "x": 1}).status_code == 422

    made = api.post("/api/v1/webhooks", "admin", json=body)
    assert made.status_code == 201, made.text
    hook = made.json()
    secret = hook["secret"]
    assert secret.startswith("whsec_")
    receiver.secrets["/hook"] = secret
    assert hook["created_by"] == "admin"
    assert hook["event_types"] == ["smoke_fire"]
    dead_url = f"http://127.0.0.1:{_refused_port()}/gone"
    gone = api.post("/api/v1/webhooks", "admin", json={"url": dead_url}).json()

    listed = api.get("/api/v1/webhooks", "admin")
    assert listed.status_code == 200
    assert {h["id"] for h in listed.json()} == {hook["id"], gone["id"]}
    assert secret not in listed.text  # shown once, at creation
    assert "secret" not in api.get(f"/api/v1/webhooks/{hook['id']}", "admin").json()

    # a step's message, enqueued as the case store's hook does; the service's worker posts it
    outbox = Outbox(backend.target, pooled=False)
    grid = "330383001001000005"
    assert outbox.enqueue(message(41, 2, event_type="smoke_fire", grid_code=grid)) == 2
    assert outbox.enqueue(message(41, 3, event_type="crowd_gathering", grid_code=grid)) == 1
    assert wait_for(lambda: len(receiver.received()) == 1, 15)
    [got] = receiver.received()
    assert got.verified
    assert got.headers["webhook-id"] == webhook_id(hook["id"], "case:41:v2")

    def dead() -> list[dict[str, Any]]:
        page = api.get(f"/api/v1/webhooks/{gone['id']}/deliveries", "admin", status="dead")
        assert page.status_code == 200, page.text
        items: list[dict[str, Any]] = page.json()["items"]
        return items

    assert wait_for(lambda: len(dead()) == 2, 15)
    first, second = dead()
    assert first["webhook_id"] == webhook_id(gone["id"], "case:41:v2")
    assert second["webhook_id"] == webhook_id(gone["id"], "case:41:v3")
    assert (first["attempts"], first["last_error"], first["last_status"]) == (
        3,
        "ConnectError",
        None,
    )
    assert first["next_attempt_at"] is None
    assert first["finished_at"] is not None
    counts = api.get(f"/api/v1/webhooks/{gone['id']}", "admin").json()["deliveries"]
    assert counts == {"pending": 0, "delivered": 0, "dead": 2}
    delivered = api.get(
        f"/api/v1/webhooks/{hook['id']}/deliveries", "admin", status="delivered", limit=1
    ).json()
    assert [d["case_id"] for d in delivered["items"]] == ["41"]
    assert delivered["next_after"] is None
    assert api.get("/api/v1/webhooks/wh_0000000000000000/deliveries", "admin").status_code == 404
    assert api.get("/api/v1/webhooks/nope/deliveries", "admin").status_code == 422

    token = {"Authorization": f"Bearer {api.token('admin')}"}
    assert api.http.delete(f"/api/v1/webhooks/{gone['id']}", headers=token).status_code == 204
    assert api.http.delete(f"/api/v1/webhooks/{gone['id']}", headers=token).status_code == 404
    assert api.get(f"/api/v1/webhooks/{gone['id']}", "admin").status_code == 404
    assert outbox.deliveries(gone["id"]) == []


def _case_steps(api: Api, receiver: Receiver, broker: Any) -> None:
    """The whole way: an alert becomes an event, operators step its case through the API
    process, whose case store enqueues in the step's transaction, and this process's worker
    delivers each step, signed, in order."""
    [hook] = api.get("/api/v1/webhooks", "admin").json()
    before = len(receiver.received())
    publish(broker, make_alert("cam-wh1", *interior(grid_in_community(0, 5)), type="smoke_fire"))
    [event] = wait_for_events(api, 1)
    event_id = event["event_id"]
    steps = [
        ("comm_a", "verify", {}),
        ("comm_a", "whistle", {"lead_department": "fire"}),
        ("fire", "accept_off_site", {}),
    ]
    for version, (who, action, payload) in enumerate(steps, start=1):
        r = api.post(
            f"/api/v1/cases/{event_id}/steps",
            who,
            json={"action": action, "expected_version": version, "payload": payload},
        )
        assert r.status_code == 200, r.text
    refused = api.post(  # a refused step (the wrong role) is not delivered
        f"/api/v1/cases/{event_id}/steps",
        "police",
        json={"action": "handle", "expected_version": 4, "payload": {"summary": "x"}},
    )
    assert refused.status_code == 403
    assert wait_for(lambda: len(receiver.received()) == before + 3, 15)
    got = receiver.received()[before:]
    assert all(r.verified for r in got)
    assert [r.headers["webhook-id"] for r in got] == [
        webhook_id(hook["id"], f"case:{event_id}:v{v}") for v in (2, 3, 4)
    ]
    data = [r.msg["data"] for r in got]
    assert [(d["action"], d["actor"], d["after"]) for d in data] == [
        ("verify", "comm_a", "assessing"),
        ("whistle", "comm_a", "whistled"),
        ("accept_off_site", "fire", "dept_handling"),
    ]
    assert data[1]["departments"] == ["fire"]
    assert all(d["event_type"] == "smoke_fire" for d in data)
