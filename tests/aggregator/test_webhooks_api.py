"""The webhook API (administrators only) on the running service, on both pool backends: the
secret shown once, subscriptions listed without it, the service's own delivery worker posting
to a real local receiver, dead deliveries listed, subscriptions removed."""

from __future__ import annotations

import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from aggregator.pool.outbox import Outbox, webhook_id

from .conftest import PoolBackend, grid_in_community, interior, make_alert
from .operator_support import Api, publish, running_service, wait_for_events
from .test_webhooks import Receiver, message, verify, wait_for


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
    monkeypatch.setenv("CWG_WEBHOOKS__ROTATION_GRACE_S", "600")
    receiver = Receiver()
    receiver.start()
    try:
        with running_service(broker, tmp_path, backend=pool_backend) as service:
            assert service.webhooks is not None
            api = Api(service.url)
            try:
                _check(api, receiver, pool_backend)
                _case_steps(api, receiver, broker)
                _lifecycle(api, receiver, pool_backend)
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


def _lifecycle(api: Api, receiver: Receiver, backend: PoolBackend) -> None:
    """Destinations refused, PATCH (switch, filters, URL), secret rotation, redelivery and the
    delivery metrics, through the API process and the service's own worker."""
    [hook] = api.get("/api/v1/webhooks", "admin").json()
    hooks = f"/api/v1/webhooks/{hook['id']}"
    outbox = Outbox(backend.target, pooled=False)
    grid = "330383001001000005"

    # -- destinations: only public ones, unless allowed (127.0.0.0/8 is, here)
    for url, why in (
        ("http://10.1.2.3/x", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:9/x", "loopback"),
        ("http://0.0.0.0:9/x", "unspecified"),
        ("http://[fd00::7]/x", "private"),
    ):
        r = api.post("/api/v1/webhooks", "admin", json={"url": url})
        assert r.status_code == 422, (url, r.text)
        assert why in r.text, r.text
        assert "CWG_WEBHOOKS__ALLOW_NETWORKS" in r.text
    public = api.post("/api/v1/webhooks", "admin", json={"url": "https://93.184.216.34/in"})
    assert public.status_code == 201, public.text
    token = {"Authorization": f"Bearer {api.token('admin')}"}
    assert (
        api.http.delete(f"/api/v1/webhooks/{public.json()['id']}", headers=token).status_code == 204
    )

    # -- PATCH: the switch
    def patch(body: dict[str, Any], as_: str = "admin", path: str = hooks) -> Any:
        return api.http.patch(
            path, json=body, headers={"Authorization": f"Bearer {api.token(as_)}"}
        )

    off = patch({"enabled": False})
    assert off.status_code == 200, off.text
    assert off.json()["enabled"] is False
    assert off.json()["disabled_reason"] == "disabled by admin"
    assert off.json()["disabled_at"] is not None
    assert outbox.enqueue(message(42, 2, event_type="smoke_fire", grid_code=grid)) == 0
    listed = {h["id"]: h for h in api.get("/api/v1/webhooks", "admin").json()}
    assert listed[hook["id"]]["enabled"] is False
    assert listed[hook["id"]]["disabled_reason"] == "disabled by admin"
    on = patch({"enabled": True, "grid_prefix": "", "event_types": [], "description": "12345"})
    assert on.status_code == 200, on.text
    assert (on.json()["enabled"], on.json()["disabled_reason"], on.json()["disabled_at"]) == (
        True,
        None,
        None,
    )
    assert (on.json()["grid_prefix"], on.json()["event_types"]) == ("", [])
    assert on.json()["description"] == "12345"
    # refused: other fields, nulls, unknown types, a destination not allowed, not an admin
    assert patch({"secret": "whsec_x"}).status_code == 422
    assert patch({"enabled": None}).status_code == 422
    assert patch({"event_types": ["no_such_type"]}).status_code == 422
    bad = patch({"url": "http://169.254.169.254/latest/"})
    assert bad.status_code == 422
    assert "link-local" in bad.text
    assert patch({"enabled": False}, as_="comm_a").status_code == 403
    assert patch({"enabled": False}, path="/api/v1/webhooks/wh_0000000000000000").status_code == 404
    assert api.get(hooks, "admin").json()["enabled"] is True

    # -- rotation: the new secret once; both keys sign for the grace period (600 s here)
    old_secret = receiver.secrets["/hook"]
    rotated = api.post(f"{hooks}/secret", "admin")
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret.startswith("whsec_")
    assert new_secret != old_secret
    until = datetime.fromisoformat(rotated.json()["previous_secret_valid_until"]).timestamp()
    assert 590 < until - time.time() <= 600
    shown = api.get(hooks, "admin")
    assert new_secret not in shown.text
    assert old_secret not in shown.text
    assert shown.json()["secret_rotated_at"] is not None
    assert new_secret not in api.get("/api/v1/webhooks", "admin").text
    assert api.post(f"{hooks}/secret", "comm_a").status_code == 403
    assert api.post("/api/v1/webhooks/wh_0000000000000000/secret", "admin").status_code == 404
    before = len(receiver.received())
    assert outbox.enqueue(message(43, 2, grid_code=grid)) == 1
    assert wait_for(lambda: len(receiver.received()) == before + 1, 15)
    got = receiver.received()[-1]
    assert got.verified  # with the old secret, which the receiver still holds
    assert verify(new_secret, got.headers, got.body)
    assert got.headers["webhook-signature"].count("v1,") == 2

    # -- redelivery: a dead one back to pending, the same webhook-id
    dead_url = f"http://127.0.0.1:{_refused_port()}/later"
    later = api.post("/api/v1/webhooks", "admin", json={"url": dead_url}).json()
    receiver.secrets["/later"] = later["secret"]
    later_path = f"/api/v1/webhooks/{later['id']}"
    assert outbox.enqueue(message(44, 2, grid_code=grid)) == 2

    def deliveries(status: str) -> list[dict[str, Any]]:
        page = api.get(f"{later_path}/deliveries", "admin", status=status)
        items: list[dict[str, Any]] = page.json()["items"]
        return items

    assert wait_for(lambda: len(deliveries("dead")) == 1, 15)
    [dead] = deliveries("dead")
    assert patch({"enabled": False}, path=later_path).status_code == 200  # so it waits
    again = api.post(f"{later_path}/deliveries/{dead['id']}/retry", "admin")
    assert again.status_code == 200, again.text
    assert (again.json()["status"], again.json()["attempts"]) == ("pending", 0)
    assert again.json()["webhook_id"] == dead["webhook_id"]
    assert again.json()["next_attempt_at"] is not None
    assert api.post(f"{later_path}/deliveries/{dead['id']}/retry", "admin").status_code == 409
    assert api.post(f"{hooks}/deliveries/{dead['id']}/retry", "admin").status_code == 404
    assert api.post(f"{later_path}/deliveries/0/retry", "admin").status_code == 422
    assert api.post(f"{later_path}/deliveries/{dead['id']}/retry", "comm_a").status_code == 403
    # the receiver is found at last: a new URL, enabled again; the same webhook-id arrives
    moved = patch({"url": receiver.url("/later"), "enabled": True}, path=later_path)
    assert moved.status_code == 200, moved.text
    assert wait_for(lambda: len(deliveries("delivered")) == 1, 15)
    arrived = [r for r in receiver.received() if r.path == "/later"]
    assert [r.headers["webhook-id"] for r in arrived] == [dead["webhook_id"]]
    assert arrived[0].verified

    # -- the delivery metrics, on the service's registry as /metrics shows them
    def value(text: str, sample: str) -> float:
        # a sample line is "name{labels} value"
        for line in text.splitlines():
            key, _, number = line.rpartition(" ")
            if key == sample:
                return float(number)
        raise AssertionError(f"{sample} not in /metrics")

    metrics = api.get("/metrics", "admin")
    assert metrics.status_code == 200
    text = metrics.text
    assert value(text, 'cwg_webhook_deliveries_total{outcome="delivered"}') >= 6
    assert value(text, 'cwg_webhook_deliveries_total{outcome="dead"}') >= 3
    assert value(text, 'cwg_webhook_deliveries_total{outcome="failed"}') >= 6
    assert value(text, 'cwg_webhook_deliveries_total{outcome="gone"}') == 0
    assert value(text, "cwg_webhook_attempt_seconds_count") >= 15
    assert value(text, "cwg_webhook_pending") >= 0
