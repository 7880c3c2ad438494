"""The operator API over a pool filled by the real pipeline (Mosquitto → aggregator → the pool,
an SQLite file and a PostgreSQL database in turn)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.broker.launcher import free_port
from aggregator.service import Service
from contract import DeviceState, Health, StatusV1

from .conftest import (
    PoolBackend,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
    offset,
    wait_until,
)
from .operator_support import (
    COMMUNITY_A,
    COMMUNITY_B,
    COMMUNITY_C,
    Api,
    publish,
    running_service,
    wait_for_events,
)


@dataclass
class Filled:
    service: Service
    api: Api
    fire: int  # smoke_fire, community A, cam-001 + cam-002 (merged), with snapshots
    lane: int  # fire_lane_occupied (police), community B
    crowd: int  # crowd_gathering (police), community C
    garbage: list[int]  # exposed_garbage (enforcement), community A, 4 grids
    fire_snapshot: bytes


@pytest.fixture
def filled(broker: Any, tmp_path: Path, pool_backend: PoolBackend) -> Iterator[Filled]:
    with running_service(broker, tmp_path, backend=pool_backend) as service:
        api = Api(service.url)
        try:
            lat, lon = interior(grid_in_community(0, 5))
            publish(broker, make_alert("cam-001", lat, lon, confidence=0.7, snapshot=jpeg(1)))
            [fire] = wait_for_events(api, 1)
            near = offset(lat, lon, north_m=10)
            best = jpeg(2)
            publish(broker, make_alert("cam-002", *near, seq=2, confidence=0.9, snapshot=best))
            publish(
                broker,
                make_alert(
                    "cam-002",
                    *interior(grid_in_community(1, 3)),
                    type="fire_lane_occupied",
                    seq=3,
                ),
            )
            publish(
                broker,
                make_alert(
                    "cam-001", *interior(grid_in_community(2, 2)), type="crowd_gathering", seq=4
                ),
            )
            for k in range(4):
                publish(
                    broker,
                    make_alert(
                        "cam-003",
                        *interior(grid_in_community(0, k)),
                        type="exposed_garbage",
                        seq=10 + k,
                    ),
                )
            events = wait_for_events(api, 7)
            wait_until(
                lambda: (
                    api.get(f"/api/v1/events/{fire['event_id']}", "admin").json()["alert_count"]
                    == 2
                ),
                what="the second camera's alert to merge",
            )
            # the events are where the backend keeps them (not in a file beside the service)
            assert pool_backend.rows("SELECT count(*) FROM events") == [(7,)]
            by_type: dict[str, list[int]] = {}
            for e in events:
                by_type.setdefault(e["type"], []).append(e["event_id"])
            yield Filled(
                service,
                api,
                fire=fire["event_id"],
                lane=by_type["fire_lane_occupied"][0],
                crowd=by_type["crowd_gathering"][0],
                garbage=sorted(by_type["exposed_garbage"]),
                fire_snapshot=best,
            )
        finally:
            api.close()


PROTECTED = [
    "/api/v1/events",
    "/api/v1/events/1",
    "/api/v1/devices",
    "/api/v1/grids",
    "/api/v1/stats",
    "/api/v1/stats/handling",
    "/api/v1/dead-letters",
    "/api/v1/auth/me",
    "/api/v1/snapshots/" + "0" * 64,
]


def test_no_or_bad_token_is_401_and_health_is_open(filled: Filled) -> None:
    api = filled.api
    for path in PROTECTED:
        r = api.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        r = api.http.get(path, headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401, path
    r = api.http.post("/api/v1/auth/token", json={"username": "admin", "password": "wrong!"})
    assert r.status_code == 401
    r = api.http.post("/api/v1/auth/token", json={"username": "nobody", "password": "x" * 12})
    assert r.status_code == 401
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"ready": True, "pool": True, "broker": True}
    assert api.get("/metrics").status_code == 401  # an admin token or the metrics token
    metrics = api.get("/metrics", "admin").text
    assert 'cwg_alerts_total{outcome="merged"} 1.0' in metrics
    assert "cwg_dedup_ratio 0.125000" in metrics  # 1 merged of 8 pooled alerts
    assert "cwg_batch_seconds_bucket" in metrics
    assert "cwg_ingest_queue_depth" in metrics


def test_filters(filled: Filled) -> None:
    api, f = filled.api, filled

    def ids(**params: Any) -> set[int]:
        r = api.get("/api/v1/events", "admin", **params)
        assert r.status_code == 200, r.text
        return {e["event_id"] for e in r.json()["items"]}

    everything = {f.fire, f.lane, f.crowd, *f.garbage}
    assert ids() == everything
    assert ids(type="smoke_fire") == {f.fire}
    assert ids(type=["smoke_fire", "crowd_gathering"]) == {f.fire, f.crowd}
    assert ids(severity="critical") == {f.fire}
    assert ids(severity="low") == set(f.garbage)
    assert ids(status="registered") == everything
    assert ids(status="closed") == set()
    assert ids(grid=COMMUNITY_A) == {f.fire, *f.garbage}
    assert ids(grid=COMMUNITY_A[:9]) == {f.fire, f.lane, *f.garbage}  # street level
    assert ids(grid=grid_in_community(0, 5).code) == {f.fire}  # one grid
    assert ids(department="police") == {f.lane, f.crowd}
    assert ids(device="cam-002") == {f.fire, f.lane}
    future = datetime.now(UTC) + timedelta(hours=1)
    assert ids(since=future.isoformat()) == set()
    assert ids(until=future.isoformat()) == everything
    r = api.get("/api/v1/events", "admin", grid="33x")
    assert r.status_code == 422
    r = api.get("/api/v1/events", "admin", severity="apocalyptic")
    assert r.status_code == 422


@pytest.mark.parametrize("sort", ["-registered_at", "registered_at", "-severity", "deadline_at"])
def test_cursor_pagination_walks_every_event_once_in_order(filled: Filled, sort: str) -> None:
    api = filled.api
    full = api.get("/api/v1/events", "admin", sort=sort, limit=500).json()["items"]
    assert len(full) == 7
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"sort": sort, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/api/v1/events", "admin", **params).json()
        seen += [e["event_id"] for e in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 4
    assert seen == [e["event_id"] for e in full]
    if sort == "-severity":
        assert full[0]["event_id"] == filled.fire
    r = api.get("/api/v1/events", "admin", cursor="bm9uc2Vuc2U")
    assert r.status_code == 400
    other = api.get("/api/v1/events", "admin", limit=2, sort="-registered_at").json()
    r = api.get("/api/v1/events", "admin", sort="severity", cursor=other["next_cursor"])
    assert r.status_code == 400  # a cursor belongs to its sort order


def test_detail_has_every_alert_device_snapshot_and_timeline(filled: Filled) -> None:
    api = filled.api
    d = api.get(f"/api/v1/events/{filled.fire}", "admin").json()
    assert d["type"] == "smoke_fire"
    assert d["alert_count"] == 2
    assert d["device_count"] == 2
    assert [a["device_id"] for a in d["alerts"]] == ["cam-001", "cam-002"]
    assert [a["outcome"] for a in d["alerts"]] == ["accepted", "merged"]
    assert d["alerts"][0]["payload"]["schema"] == "alert/v1"
    assert d["alerts"][0]["payload"]["snapshot"]["stored"] is True  # replaced by its hash
    assert {dev["device_id"] for dev in d["devices"]} == {"cam-001", "cam-002"}
    assert d["grid_path"][2]["code"] == COMMUNITY_A
    assert len(d["snapshot_urls"]) == 2
    # The event keeps the snapshot of its most confident alert.
    assert d["snapshot_url"] == d["snapshot_urls"][0] == d["alerts"][1]["snapshot_url"]
    img = api.get(d["snapshot_url"], "admin")
    assert img.status_code == 200
    assert img.headers["content-type"] == "image/jpeg"
    assert img.content == filled.fire_snapshot
    kinds = [(t["kind"], t["action"]) for t in d["timeline"]]
    assert ("log", "registered") in kinds
    assert kinds.count(("alert", "accepted")) == 1
    assert kinds.count(("alert", "merged")) == 1
    assert api.get("/api/v1/events/999999", "admin").status_code == 404
    assert api.get("/api/v1/snapshots/" + "a" * 64, "admin").status_code == 404


def test_lifecycle_steps_with_notes_and_rules(filled: Filled) -> None:
    """The older step route (deprecated) takes its steps as case steps under the case rules;
    the event's timeline logs them as such (tests/aggregator/test_cases_api.py has the rest)."""
    api, fire = filled.api, filled.fire
    path = f"/api/v1/events/{fire}"
    r = api.post(f"{path}/verify", "comm_a", json={"note": "seen on camera 2"})
    assert r.status_code == 200, r.text
    assert r.json()["from_status"] == "registered"
    assert r.json()["to_status"] == "verified"
    assert api.post(f"{path}/verify", "comm_a").status_code == 409  # not twice
    assert api.post(f"{path}/dispatch", "fire").status_code == 403  # the community's step
    assert api.post(f"{path}/dispatch", "comm_a", json={"note": "whistle"}).status_code == 200
    assert api.post(f"{path}/handle", "fire", json={"note": "crew on site"}).status_code == 200
    r = api.post(f"{path}/close", "fire", json={"note": "  "})
    assert r.status_code == 400  # Longgang 8.5: a summary is required
    # a department's feedback goes to the community's review first: a step of the case route
    r = api.post(f"{path}/close", "fire", json={"note": "extinguished"})
    assert r.status_code == 409
    assert f"/api/v1/cases/{fire}/steps" in r.json()["detail"]
    feedback = {"action": "handle", "expected_version": 4, "payload": {"summary": "out"}}
    r = api.post(f"/api/v1/cases/{fire}/steps", "fire", json=feedback)
    assert r.status_code == 200, r.text
    r = api.post(f"{path}/close", "comm_a", json={"note": "extinguished, bins removed"})
    assert r.status_code == 200
    assert r.json()["event"]["status"] == "closed"
    assert r.json()["event"]["closed_at"]
    assert api.post(f"{path}/handle", "admin").status_code == 409  # closed stays closed
    d = api.get(path, "admin").json()
    steps = [(t["action"], t["actor"]) for t in d["timeline"] if t["kind"] == "log"]
    assert steps == [
        ("registered", "aggregator"),
        ("case:verify", "comm_a"),
        ("case:whistle", "comm_a"),
        ("case:accept_off_site", "fire"),
        ("case:handle", "fire"),
        ("case:accept_feedback", "comm_a"),
    ]
    closed = api.get("/api/v1/events", "admin", status="closed").json()["items"]
    assert [e["event_id"] for e in closed] == [fire]
    # Skipping ahead is no case step: a registered case is verified first.
    r = api.post(f"/api/v1/events/{filled.garbage[0]}/handle", "comm_a")
    assert r.status_code == 409


def close_as_community(api: Api, event_id: int, summary: str) -> None:
    """Verify, handle in the community and close with a summary: three case steps."""
    for version, action, payload in (
        (1, "verify", {}),
        (2, "self_handle", {}),
        (3, "handle", {"summary": summary}),
    ):
        r = api.post(
            f"/api/v1/cases/{event_id}/steps",
            "comm_a",
            json={"action": action, "expected_version": version, "payload": payload},
        )
        assert r.status_code == 200, r.text


def test_scope_community_street_county_department(filled: Filled) -> None:
    api, f = filled.api, filled

    def ids(user: str, **params: Any) -> set[int]:
        r = api.get("/api/v1/events", user, limit=500, **params)
        assert r.status_code == 200
        return {e["event_id"] for e in r.json()["items"]}

    assert ids("comm_a") == {f.fire, *f.garbage}
    assert ids("comm_b") == {f.lane}
    assert ids("street1") == {f.fire, f.lane, *f.garbage}
    assert ids("county") == {f.fire, f.lane, f.crowd, *f.garbage}
    assert ids("police") == {f.lane, f.crowd}
    assert ids("fire") == {f.fire}
    # Asking for another area's prefix narrows to nothing rather than widening the scope.
    assert ids("comm_a", grid=COMMUNITY_B) == set()
    assert ids("police", department="fire") == set()
    # Outside the scope an event does not exist: 404, and so do its snapshots and lifecycle.
    assert api.get(f"/api/v1/events/{f.fire}", "comm_b").status_code == 404
    assert api.get(f"/api/v1/events/{f.lane}", "comm_a").status_code == 404
    assert api.get(f"/api/v1/events/{f.fire}", "police").status_code == 404
    assert api.post(f"/api/v1/events/{f.fire}/verify", "comm_b").status_code == 404
    snap = api.get(f"/api/v1/events/{f.fire}", "comm_a").json()["snapshot_url"]
    assert api.get(snap, "comm_a").status_code == 200
    assert api.get(snap, "comm_b").status_code == 404
    assert api.get(snap, "police").status_code == 404
    assert api.get(snap, "fire").status_code == 200
    # Grids and statistics are scoped too.
    grids = api.get("/api/v1/grids", "comm_a").json()
    codes = {g["id"] for g in grids["features"]}
    assert codes
    assert all(c.startswith(COMMUNITY_A) for c in codes)
    counts = {g["id"]: g["properties"]["event_count"] for g in grids["features"]}
    assert counts[grid_in_community(0, 5).code] == 1
    assert sum(counts.values()) == 5
    assert len(api.get("/api/v1/grids", "admin").json()["features"]) == 144
    stats = api.get("/api/v1/stats", "comm_a").json()
    assert stats["events"] == 5
    assert stats["alerts"] == 6
    assert {c["code"] for c in stats["by_community"]} == {COMMUNITY_A}
    assert api.get("/api/v1/stats", "police").json()["events"] == 2
    assert api.get("/api/v1/dead-letters", "comm_a").status_code == 403
    me = api.get("/api/v1/auth/me", "comm_a").json()
    assert me["level"] == "community"
    assert me["scope_code"] == COMMUNITY_A


def test_statistics(filled: Filled) -> None:
    s = filled.api.get("/api/v1/stats", "admin").json()
    assert s["events"] == 7
    assert s["alerts"] == 8
    assert s["open_events"] == 7
    assert s["dedup_ratio"] == pytest.approx(1 / 8)
    assert {t["type"]: t["count"] for t in s["by_type"]} == {
        "exposed_garbage": 4,
        "smoke_fire": 1,
        "fire_lane_occupied": 1,
        "crowd_gathering": 1,
    }
    smoke = next(t for t in s["by_type"] if t["type"] == "smoke_fire")
    assert smoke["zh"] == "烟火"
    assert {c["code"]: c["count"] for c in s["by_community"]} == {
        COMMUNITY_A: 5,
        COMMUNITY_B: 1,
        COMMUNITY_C: 1,
    }
    assert sum(h["count"] for h in s["by_hour"]) == 7
    assert s["by_severity"]["low"] == 4
    assert s["by_status"] == {"registered": 7}


def test_handling_metrics_by_department_and_community_in_scope(filled: Filled) -> None:
    api, f = filled.api, filled
    close_as_community(api, f.fire, "out")
    close_as_community(api, f.garbage[0], "bins emptied")
    r = api.get("/api/v1/stats/handling", "admin")
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["by"] == "department"
    total = s["total"]
    assert (total["registered"], total["closed"], total["closed_on_time"]) == (7, 2, 2)
    assert (total["open"], total["overdue"]) == (5, 0)  # deadlines are hours ahead
    assert total["handling_rate"] == pytest.approx(2 / 7)
    assert total["on_time_rate"] == pytest.approx(1.0)
    groups = {g["key"]: g for g in s["groups"]}
    assert [g["key"] for g in s["groups"]] == ["enforcement", "police", "fire"]  # most first
    assert (groups["fire"]["name"], groups["police"]["name"]) == ("消防大队", "公安局")
    assert (groups["enforcement"]["registered"], groups["enforcement"]["closed"]) == (4, 1)
    assert groups["police"]["handling_rate"] == 0.0
    assert groups["police"]["on_time_rate"] is None  # nothing due yet
    assert groups["fire"]["median_close_s"] >= 0
    # By community, in a community operator's scope: only its own events count.
    s = api.get("/api/v1/stats/handling", "comm_a", by="community").json()
    assert [g["key"] for g in s["groups"]] == [COMMUNITY_A]
    assert (s["total"]["registered"], s["total"]["closed"]) == (5, 2)
    s = api.get("/api/v1/stats/handling", "police", by="type").json()
    assert {g["key"] for g in s["groups"]} == {"fire_lane_occupied", "crowd_gathering"}
    assert s["total"]["closed"] == 0
    # A window before everything was registered holds nothing.
    empty = api.get("/api/v1/stats/handling", "admin", until="2020-01-01T00:00:00Z").json()
    assert empty["total"]["registered"] == 0
    assert empty["total"]["handling_rate"] is None
    assert api.get("/api/v1/stats/handling", "admin", by="colour").status_code == 422


def test_devices_and_dead_letters(filled: Filled, broker: Any) -> None:
    api = filled.api
    cam = broker.client("cam-001")
    status = StatusV1(
        device_id="cam-001",
        state=DeviceState.ONLINE,
        at=datetime.now(UTC),
        kind="camera",
        health=Health(fps=9.5, inference_ms=41.0, version="1.2.0"),
    )
    cam.publish(broker.topics.status("cam-001"), status.to_json())
    cam.publish(broker.topics.alert("cam-001"), b"{not json")
    cam.publish(broker.topics.alert("cam-001"), b"\xff\xfe\x00binary")

    def online() -> dict[str, Any] | None:
        items = api.get("/api/v1/devices", "admin").json()["items"]
        return next((d for d in items if d["device_id"] == "cam-001" and d["online"]), None)

    dev = wait_until(online, what="cam-001 online")
    assert dev["health"]["fps"] == 9.5
    assert dev["kind"] == "camera"
    assert dev["alerts_total"] == 2
    board = api.get("/api/v1/devices", "admin").json()
    assert board["online"] == 1
    assert board["online"] + board["unknown"] == len(board["items"])
    offline = api.get("/api/v1/devices", "admin", state="offline").json()["items"]
    assert offline == []
    # A department sees the devices of its own events only.
    assert {d["device_id"] for d in api.get("/api/v1/devices", "police").json()["items"]} == {
        "cam-001",
        "cam-002",
    }
    assert {d["device_id"] for d in api.get("/api/v1/devices", "comm_b").json()["items"]} == {
        "cam-002"
    }

    letters = wait_until(
        lambda: (lambda items: items if len(items) >= 2 else None)(
            api.get("/api/v1/dead-letters", "admin").json()["items"]
        ),
        what="two dead letters",
    )
    binary, text = letters[0], letters[1]  # newest first
    assert text["reason"] == "invalid_json"
    assert text["payload_encoding"] == "utf-8"
    assert text["payload"] == "{not json"
    assert text["device_id"] == "cam-001"
    assert binary["reason"] == "invalid_utf8"
    assert binary["payload_encoding"] == "base64"
    assert base64.b64decode(binary["payload"]) == b"\xff\xfe\x00binary"
    one = api.get(f"/api/v1/dead-letters/{text['id']}", "admin").json()
    assert one["payload"] == "{not json"
    assert one["truncated"] is False
    page = api.get("/api/v1/dead-letters", "admin", limit=1).json()
    assert page["next_cursor"]
    nxt = api.get("/api/v1/dead-letters", "admin", limit=1, cursor=page["next_cursor"]).json()
    assert nxt["items"][0]["id"] == text["id"]
    assert api.get("/api/v1/dead-letters/99999", "admin").status_code == 404
    assert api.get("/api/v1/dead-letters", "admin", reason="invalid_utf8").json()["items"] == [
        binary
    ]


def test_openapi_documents_every_route_with_a_model(filled: Filled) -> None:
    spec = filled.api.get("/openapi.json").json()
    paths = spec["paths"]
    for path in [
        "/api/v1/events",
        "/api/v1/events/{event_id}",
        "/api/v1/events/{event_id}/{action}",
        "/api/v1/devices",
        "/api/v1/grids",
        "/api/v1/dead-letters",
        "/api/v1/dead-letters/{dead_letter_id}",
        "/api/v1/stats",
        "/api/v1/catalogue",
        "/api/v1/snapshots/{sha256}",
        "/api/v1/auth/token",
        "/healthz",
        "/readyz",
        "/metrics",
    ]:
        assert path in paths, path
    for path, ops in paths.items():
        for method, op in ops.items():
            ok = next((r for code, r in op["responses"].items() if code.startswith("2")), None)
            assert ok, (method, path)  # its success answer (200, 201 for a creation, 204)
            content = ok.get("content", {})
            if "application/json" in content:
                assert content["application/json"]["schema"], (method, path)
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_run_service_serves_and_stops_cleanly_on_sigterm(broker: Any, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CWG_DEV": "1",
        "CWG_DATA_DIR": str(tmp_path / "data"),
        "CWG_MQTT__HOST": broker.host,
        "CWG_MQTT__PORT": str(broker.port),
        "CWG_MQTT__PASSWORD": broker.password("aggregator"),
        "CWG_MQTT__TOPIC_PREFIX": broker.prefix,
        "CWG_MQTT__CLIENT_ID": "agg-run-service",
    }
    code = (
        "import sys\n"
        "from aggregator.service import run_service\n"
        "from aggregator.config import Settings\n"
        "sys.exit(run_service(Settings(), port=int(sys.argv[1]), log_level='warning'))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{base}/readyz"), 20, "the service to be ready")
        assert "<title>" in httpx.get(f"{base}/").text  # the dashboard
        r = httpx.post(f"{base}/api/v1/auth/token", json={"username": "admin", "password": "admin"})
        assert r.status_code == 200  # the development-mode demo account
        token = r.json()["access_token"]
        publish(broker, make_alert("cam-001", *interior(grid_in_community(3, 1)), type="gas_leak"))
        wait_until(
            lambda: httpx.get(
                f"{base}/api/v1/events", headers={"Authorization": f"Bearer {token}"}
            ).json()["items"],
            what="the event through the served API",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "admin/admin" in output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
