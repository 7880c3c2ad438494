"""The case routes over the whole service (Mosquitto → aggregator → pool → API process), on
SQLite and on PostgreSQL: a case from registration to closing with an evidence photo and a
send-back, refusals (403 / 409 / 422) across roles, two operators racing on one case over real
HTTP, and ``gateway audit verify`` (a subprocess) finding a tampered, deleted, inserted or cut
audit row in the database."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aggregator.access.auth import Level
from aggregator.cases.audit import load_jsonl, verify
from aggregator.pool.outbox import Outbox, SubscriptionIn
from aggregator.service import Service

from .conftest import PoolBackend, grid_in_community, interior, jpeg, make_alert
from .operator_support import (
    COMMUNITY_A,
    OPERATORS,
    Api,
    publish,
    running_service,
    wait_for_events,
)

CASE_TYPES = ("smoke_fire", "exposed_garbage", "street_vending", "thrown_object")
ACCOUNTS = {
    **OPERATORS,
    "comm_a2": (Level.COMMUNITY, COMMUNITY_A, None),  # a second operator of community A
    "enforcement": (Level.DEPARTMENT, "", "enforcement"),
}


@dataclass
class Stack:
    service: Service
    api: Api
    backend: PoolBackend
    root: Path
    lat: float
    lon: float

    def new_case(self, n: int) -> int:
        # one spot in community A, a type of its own each: events of different types never merge
        alert = make_alert(f"cam-{n:03d}", self.lat, self.lon, type=CASE_TYPES[n])
        publish(self.service_broker, alert)
        items = wait_for_events(self.api, n + 1)
        return int(max(i["event_id"] for i in items))

    service_broker: Any = None

    def step(
        self,
        who: str,
        event_id: int,
        action: str,
        version: int,
        payload: dict[str, Any] | None = None,
    ) -> httpx.Response:
        return self.api.post(
            f"/api/v1/cases/{event_id}/steps",
            who,
            json={"action": action, "expected_version": version, "payload": payload or {}},
        )

    def case(self, who: str, event_id: int) -> dict[str, Any]:
        r = self.api.get(f"/api/v1/cases/{event_id}", who)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@pytest.fixture
def stack(broker: Any, tmp_path: Path, pool_backend: PoolBackend) -> Iterator[Stack]:
    with running_service(broker, tmp_path, backend=pool_backend, operators=ACCOUNTS) as service:
        api = Api(service.url)
        lat, lon = interior(grid_in_community(0, 5))
        s = Stack(service, api, pool_backend, tmp_path, lat, lon, service_broker=broker)
        try:
            yield s
        finally:
            api.close()


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_case_from_registration_to_closing_with_evidence_and_a_send_back(
    stack: Stack,
) -> None:
    event_id = stack.new_case(0)
    case = stack.case("comm_a", event_id)
    assert (case["state"], case["version"]) == ("registered", 1)
    assert case["allowed_actions"] == ["verify", "not_ours"]
    assert stack.case("admin", event_id)["allowed_actions"] == []
    # not whistled yet: no department sees it
    assert stack.api.get(f"/api/v1/cases/{event_id}", "fire").status_code == 404
    assert event_id in [c["event_id"] for c in _ok(stack.api.get(
        "/api/v1/cases", "comm_a", box="to_accept"))["items"]]  # fmt: skip

    v = 1
    for who, action, payload, state in [
        ("comm_a", "verify", {}, "assessing"),
        ("comm_a", "whistle", {"lead_department": "fire", "co_departments": ["police"]},
         "whistled"),
        ("fire", "accept_on_site", {}, "en_route"),
        ("fire", "arrive", {}, "on_site"),
    ]:  # fmt: skip
        out = _ok(stack.step(who, event_id, action, v, payload))
        v += 1
        assert (out["to_state"], out["case"]["version"], out["actor"]) == (state, v, who)
    # the co-department sees the case and may not act on it; the lead sees its deadlines
    police = stack.case("police", event_id)
    assert police["allowed_actions"] == []
    fire = stack.case("fire", event_id)
    assert fire["allowed_actions"] == ["handle"]
    running = [d for d in fire["deadlines"] if d["running"]]
    assert [d["clock"] for d in running] == ["hard_close"]
    assert running[0]["overdue"] is False
    assert [d["clock"] for d in fire["deadlines"] if d["stopped_at"]] == ["accept", "arrive"]

    photo = jpeg(7)
    r = stack.api.http.post(
        "/api/v1/evidence",
        content=photo,
        headers={"Authorization": f"Bearer {stack.api.token('fire')}",
                 "Content-Type": "image/jpeg"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    sha = r.json()["sha256"]
    out = _ok(stack.step("fire", event_id, "handle", v, {"summary": "cleared", "photos": [sha]}))
    v += 1
    assert out["to_state"] == "reviewing"
    out = _ok(stack.step("comm_a", event_id, "send_back", v, {"reason": "bikes still there"}))
    v += 1
    assert (out["to_state"], out["case"]["send_backs"]) == ("rehandling", 1)
    _ok(stack.step("fire", event_id, "handle", v, {"summary": "all removed"}))
    v += 1
    out = _ok(stack.step("comm_a", event_id, "accept_feedback", v))
    assert out["case"]["state"] == "closed"
    assert out["case"]["outcome"] == "handled"

    # the event follows the case; the closed event absorbs no new alert
    event = _ok(stack.api.get(f"/api/v1/events/{event_id}", "admin"))
    assert event["status"] == "closed"
    publish(stack.service_broker, make_alert("cam-900", stack.lat, stack.lon))
    items = wait_for_events(stack.api, 2)
    newer = [i for i in items if i["event_id"] != event_id]
    assert len(newer) == 1
    assert newer[0]["status"] == "registered"

    # the evidence photo: back byte for byte to the case's parties, hidden from others
    got = stack.api.get(f"/api/v1/evidence/{sha}", "comm_a")
    assert got.status_code == 200
    assert got.content == photo
    assert got.headers["content-type"] == "image/jpeg"
    assert stack.api.get(f"/api/v1/evidence/{sha}", "comm_b").status_code == 404
    # the trail: every step, who and what, chained; the export verifies offline
    trail = _ok(stack.api.get(f"/api/v1/cases/{event_id}/trail", "comm_a"))["rows"]
    assert [r["action"] for r in trail] == [
        "verify", "whistle", "accept_on_site", "arrive", "handle", "send_back", "handle",
        "accept_feedback",
    ]  # fmt: skip
    assert trail[4]["evidence"] == [sha]
    assert trail[5]["reason"] == "bikes still there"
    export = stack.api.get(f"/api/v1/cases/{event_id}/trail.jsonl", "comm_a")
    assert export.headers["content-type"].startswith("application/x-ndjson")
    rows = load_jsonl(export.content)
    assert verify(rows, head=trail[-1]["hash"]) == []


def test_refusals_across_roles_states_and_payloads(stack: Stack) -> None:
    event_id = stack.new_case(0)
    assert stack.step("street1", event_id, "verify", 1).status_code == 403  # level
    assert stack.step("fire", event_id, "verify", 1).status_code == 403  # department
    assert stack.step("comm_b", event_id, "verify", 1).status_code == 403  # another community
    assert stack.step("admin", event_id, "verify", 1).status_code == 403  # takes no action
    assert stack.step("comm_a", event_id, "accept_feedback", 1).status_code == 409  # state
    assert stack.step("county", event_id, "approve_extension", 1).status_code == 409
    assert stack.step("comm_a", event_id, "not_ours", 1).status_code == 422  # no reason
    assert stack.step("comm_a", event_id, "verify", 2).status_code == 409  # stale version
    assert stack.step("comm_a", 999_999, "verify", 1).status_code == 404
    bad = stack.api.post(
        f"/api/v1/cases/{event_id}/steps", "comm_a", json={"action": "fly", "expected_version": 1}
    )
    assert bad.status_code == 422
    _ok(stack.step("comm_a", event_id, "verify", 1))
    # the older step route takes case steps; where none matches it names the case route
    old_route = stack.api.post(f"/api/v1/events/{event_id}/close", "comm_a", json={"note": "x"})
    assert old_route.status_code == 409
    assert f"/api/v1/cases/{event_id}/steps" in old_route.json()["detail"]
    assert stack.step("comm_a", event_id, "whistle", 2, {}).status_code == 422  # no department
    assert (
        stack.step("comm_a", event_id, "whistle", 2, {"lead_department": "nobody"}).status_code
        == 422
    )
    _ok(stack.step("street1", event_id, "whistle", 2, {"lead_department": "police"}))
    assert stack.step("fire", event_id, "accept_off_site", 3).status_code == 403  # not the lead
    # the refusals wrote nothing: two rows in the trail
    trail = _ok(stack.api.get(f"/api/v1/cases/{event_id}/trail", "county"))["rows"]
    assert [r["action"] for r in trail] == ["verify", "whistle"]
    # assignment: a person of the community; not one of another community
    r = stack.api.post(
        f"/api/v1/cases/{event_id}/assign",
        "comm_a",
        json={"assignee": "comm_b", "expected_version": 3},
    )
    assert r.status_code == 403
    assign = {"assignee": "police", "expected_version": 3}
    out = _ok(stack.api.post(f"/api/v1/cases/{event_id}/assign", "police", json=assign))
    assert out["case"]["assignee"] == "police"
    assert out["case"]["version"] == 4
    inbox = _ok(stack.api.get("/api/v1/cases", "police", box="to_accept"))["items"]
    assert [c["event_id"] for c in inbox] == [event_id]
    assert _ok(stack.api.get("/api/v1/cases", "fire", box="to_accept"))["items"] == []


def test_two_operators_acting_at_once_one_wins_the_other_gets_409(stack: Stack) -> None:
    rounds = 3
    event_ids = [stack.new_case(n) for n in range(rounds)]
    tokens = {who: stack.api.token(who) for who in ("comm_a", "comm_a2")}
    for event_id in event_ids:
        codes: list[int] = []
        barrier = threading.Barrier(2)

        def act(
            who: str,
            eid: int = event_id,
            out: list[int] = codes,
            start: threading.Barrier = barrier,
        ) -> None:
            with httpx.Client(base_url=stack.api.base_url, timeout=15) as http:
                start.wait(10)
                r = http.post(
                    f"/api/v1/cases/{eid}/steps",
                    headers={"Authorization": f"Bearer {tokens[who]}"},
                    json={"action": "verify", "expected_version": 1, "payload": {}},
                )
                out.append(r.status_code)

        threads = [threading.Thread(target=act, args=(w,)) for w in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(codes) == [200, 409]
        assert stack.case("comm_a", event_id)["version"] == 2


# ---------------------------------------------------------------------------- audit verify


def _gateway(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CWG_")}
    env["COLUMNS"] = "200"  # rich's tables keep whole words
    if stack.backend.is_postgres:
        env["CWG_POOL_URL"] = stack.backend.target
    else:
        env["CWG_POOL_PATH"] = stack.backend.target
    return subprocess.run(
        [sys.executable, "-m", "aggregator.cli", *args, "--data-dir", str(stack.root / "cli")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _tamper(stack: Stack, *statements: str) -> None:
    """An attacker with the pool's own credentials: off with the append-only triggers, then
    change the rows."""
    target = stack.backend.target
    if stack.backend.is_postgres:
        import psycopg

        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("ALTER TABLE case_audit DISABLE TRIGGER case_audit_append_only")
            for s in statements:
                conn.execute(s.encode())
            conn.execute("ALTER TABLE case_audit ENABLE TRIGGER case_audit_append_only")
        return
    with closing(sqlite3.connect(target, isolation_level=None)) as db:
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("DROP TRIGGER IF EXISTS case_audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS case_audit_no_delete")
        for s in statements:
            db.execute(s)


def test_audit_verify_finds_a_tampered_deleted_inserted_or_cut_row(stack: Stack) -> None:
    first, second = stack.new_case(0), stack.new_case(1)
    for event_id in (first, second):
        _ok(stack.step("comm_a", event_id, "verify", 1))
        _ok(stack.step("comm_a", event_id, "self_handle", 2, {"note": "grid worker"}))
    ok = _gateway(stack, "audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact: 4 rows" in ok.stdout
    # the database refuses an ordinary UPDATE or DELETE
    with pytest.raises(Exception, match="never"):
        _plain_delete(stack)

    _tamper(stack, "UPDATE case_audit SET actor = 'someone_else' WHERE seq = 2")
    bad = _gateway(stack, "audit", "verify")
    assert bad.returncode == 1
    assert "seq 2: tampered" in bad.stdout
    _tamper(stack, "UPDATE case_audit SET actor = 'comm_a' WHERE seq = 2")
    assert _gateway(stack, "audit", "verify").returncode == 0

    saved = stack.backend.rows("SELECT * FROM case_audit WHERE seq = 3")
    _tamper(stack, "DELETE FROM case_audit WHERE seq = 3")
    bad = _gateway(stack, "audit", "verify")
    assert bad.returncode == 1
    assert "seq 4: missing" in bad.stdout

    marks = ",".join("?" * len(saved[0]))
    _restore(stack, f"INSERT INTO case_audit VALUES ({marks})", saved[0])
    assert _gateway(stack, "audit", "verify").returncode == 0

    # an inserted row: a copy of row 2 with a new seq between, as a forger would add one
    _tamper(
        stack,
        "INSERT INTO case_audit SELECT 5, event_id, case_version, actor, role, action, before,"
        " after, reason, note, evidence, detail, at, prev_hash, hash FROM case_audit"
        " WHERE seq = 2",
    )
    bad = _gateway(stack, "audit", "verify")
    assert bad.returncode == 1
    assert "seq 5" in bad.stdout
    _tamper(stack, "DELETE FROM case_audit WHERE seq = 5")
    assert _gateway(stack, "audit", "verify").returncode == 0

    # the newest row cut off: the chain alone is sound, the recorded head is not
    _tamper(stack, "DELETE FROM case_audit WHERE seq = 4")
    bad = _gateway(stack, "audit", "verify")
    assert bad.returncode == 1
    assert "head" in bad.stdout

    # export: one case's rows as JSON lines
    out = _gateway(stack, "audit", "export", str(first))
    assert out.returncode == 0, out.stderr
    assert [r.action for r in load_jsonl(out.stdout.encode())] == ["verify", "self_handle"]
    listed = _gateway(stack, "cases", "--limit", "10")
    assert listed.returncode == 0, listed.stderr
    assert "community_handling" in listed.stdout


def _plain_delete(stack: Stack) -> None:
    if stack.backend.is_postgres:
        import psycopg

        with psycopg.connect(stack.backend.target, autocommit=True) as conn:
            conn.execute("DELETE FROM case_audit WHERE seq = 2")
        return
    with closing(sqlite3.connect(stack.backend.target)) as db:
        db.execute("DELETE FROM case_audit WHERE seq = 2")


def _restore(stack: Stack, sql: str, values: tuple[Any, ...]) -> None:
    target = stack.backend.target
    if stack.backend.is_postgres:
        import psycopg

        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s").encode(), values)
        return
    with closing(sqlite3.connect(target, isolation_level=None)) as db:
        db.execute("PRAGMA busy_timeout=10000")
        db.execute(sql, values)


def test_evidence_upload_refuses_other_types_and_oversize(stack: Stack) -> None:
    token = stack.api.token("fire")
    r = stack.api.http.post(
        "/api/v1/evidence",
        content=b"GIF89a" + b"\0" * 100,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "image/gif"},
    )
    assert r.status_code == 415
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (8 * 1024 * 1024)
    r = stack.api.http.post(
        "/api/v1/evidence",
        content=big,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
    )
    assert r.status_code == 413
    assert stack.api.http.post("/api/v1/evidence", content=jpeg(1)).status_code == 401


def test_every_other_action_of_the_table_through_the_api(stack: Stack) -> None:
    """With the walk above (accept_on_site, arrive, send_back), every action of the table is
    taken once through the API: self-handling with an extension refused, then approved; not
    ours; off-site acceptance."""
    own, not_ours, off_site = stack.new_case(0), stack.new_case(1), stack.new_case(2)
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    v = 1
    for who, action, payload, state in [
        ("comm_a", "verify", {}, "assessing"),
        ("comm_a", "self_handle", {"note": "our grid worker"}, "community_handling"),
        ("comm_a", "apply_extension", {"reason": "parts on order", "until": until},
         "community_handling"),
        ("county", "refuse_extension", {"reason": "urgent"}, "community_handling"),
        ("comm_a", "apply_extension", {"reason": "still on order", "until": until},
         "community_handling"),
    ]:  # fmt: skip
        out = _ok(stack.step(who, own, action, v, payload))
        v += 1
        assert out["to_state"] == state
    review = _ok(stack.api.get("/api/v1/cases", "county", box="to_review"))["items"]
    assert [c["event_id"] for c in review] == [own]
    # a city-level account may also whistle from community handling (Longgang 7.3)
    assert review[0]["allowed_actions"] == ["whistle", "approve_extension", "refuse_extension"]
    out = _ok(stack.step("county", own, "approve_extension", v))
    v += 1
    [deadline] = [d for d in out["case"]["deadlines"] if d["running"]]
    assert deadline["extended"] is True
    assert datetime.fromisoformat(deadline["due_at"]) == datetime.fromisoformat(until)
    out = _ok(stack.step("comm_a", own, "handle", v, {"summary": "fixed by the grid worker"}))
    assert (out["case"]["state"], out["case"]["outcome"]) == ("closed", "handled")

    out = _ok(stack.step("comm_a", not_ours, "not_ours", 1, {"reason": "the next community's"}))
    assert (out["case"]["state"], out["case"]["outcome"]) == ("closed", "not_ours")

    v = 1
    for who, action, payload in [
        ("comm_a", "verify", {}),
        ("comm_a", "whistle", {"lead_department": "enforcement"}),
        ("enforcement", "accept_off_site", {}),
        ("enforcement", "handle", {"summary": "stall removed"}),
        ("comm_a", "accept_feedback", {}),
    ]:
        _ok(stack.step(who, off_site, action, v, payload))
        v += 1
    done = stack.case("enforcement", off_site)
    assert (done["state"], done["mode"]) == ("closed", "off_site")
    stopped = [d["clock"] for d in done["deadlines"]]
    assert stopped == ["accept", "feedback"]
    for event_id, status in ((own, "closed"), (not_ours, "closed"), (off_site, "closed")):
        assert _ok(stack.api.get(f"/api/v1/events/{event_id}", "admin"))["status"] == status


# ---------------------------------------------------------------------------- the older route


def old_step(stack: Stack, who: str, event_id: int, action: str, note: str = "") -> httpx.Response:
    return stack.api.post(f"/api/v1/events/{event_id}/{action}", who, json={"note": note})


def test_the_older_step_route_takes_case_steps_under_the_case_rules(stack: Stack) -> None:
    outbox = Outbox(stack.backend.target, pooled=False)
    outbox.add_subscription(SubscriptionIn(url="http://127.0.0.1:9/hook"), created_by="admin")
    event_id = stack.new_case(0)  # smoke_fire: the catalogue's department is fire
    case_route = f"/api/v1/cases/{event_id}/steps"

    # the case rules decide who may: not a department, not an administrator
    assert old_step(stack, "fire", event_id, "verify").status_code == 403
    assert old_step(stack, "admin", event_id, "verify").status_code == 403
    assert old_step(stack, "comm_b", event_id, "verify").status_code == 404  # not in scope
    # no single case step closes a registered case ("not ours" is not a closing of it)
    refused = old_step(stack, "comm_a", event_id, "close", "done")
    assert refused.status_code == 409
    assert case_route in refused.json()["detail"]

    walk = [
        ("comm_a", "verify", "seen on camera 2", "verified", "assessing"),
        ("comm_a", "dispatch", "", "dispatched", "whistled"),
        ("fire", "handle", "crew on its way", "handling", "dept_handling"),
    ]
    for who, action, note, status, state in walk:
        r = old_step(stack, who, event_id, action, note)
        assert r.status_code == 200, (action, r.text)
        assert r.json()["to_status"] == status
        assert r.json()["event"]["status"] == status
        assert stack.case("county", event_id)["state"] == state
    case = stack.case("fire", event_id)
    assert (case["lead_department"], case["mode"], case["version"]) == ("fire", "off_site", 4)
    assert old_step(stack, "comm_a", event_id, "verify").status_code == 409  # not twice
    # the department's feedback goes to the community's review, which the old route cannot say
    refused = old_step(stack, "fire", event_id, "close", "extinguished")
    assert refused.status_code == 409
    assert case_route in refused.json()["detail"]
    _ok(stack.step("fire", event_id, "handle", 4, {"summary": "extinguished, bins removed"}))
    assert old_step(stack, "comm_a", event_id, "close", "  ").status_code == 400  # 8.5
    assert old_step(stack, "fire", event_id, "close", "accepted").status_code == 403
    r = old_step(stack, "comm_a", event_id, "close", "checked on site")
    assert r.status_code == 200, r.text
    assert (r.json()["from_status"], r.json()["to_status"]) == ("handling", "closed")
    case = stack.case("comm_a", event_id)
    assert (case["state"], case["outcome"], case["version"]) == ("closed", "handled", 6)
    assert old_step(stack, "comm_a", event_id, "handle").status_code == 409  # closed stays

    # one audit chain: the old route's steps are rows like any case step's
    trail = _ok(stack.api.get(f"/api/v1/cases/{event_id}/trail", "comm_a"))["rows"]
    assert [(t["action"], t["actor"]) for t in trail] == [
        ("verify", "comm_a"),
        ("whistle", "comm_a"),
        ("accept_off_site", "fire"),
        ("handle", "fire"),
        ("accept_feedback", "comm_a"),
    ]
    assert trail[0]["note"] == "seen on camera 2"
    export = stack.api.get(f"/api/v1/cases/{event_id}/trail.jsonl", "comm_a")
    assert verify(load_jsonl(export.content), head=trail[-1]["hash"]) == []
    # and the same webhook hook: one case.step delivery per step, in order
    deliveries = stack.backend.rows(
        "SELECT message_type, payload FROM webhook_deliveries WHERE case_id = ? ORDER BY id",
        str(event_id),
    )
    steps = [orjson.loads(p)["data"] for kind, p in deliveries if kind == "case.step"]
    assert [d["action"] for d in steps] == [t["action"] for t in trail]
    assert steps[1]["departments"] == ["fire"]


def test_the_older_route_closes_a_case_the_community_handled_itself(stack: Stack) -> None:
    event_id = stack.new_case(0)
    for action, note in (("verify", ""), ("handle", "our own cleaners"), ("close", "bins gone")):
        r = old_step(stack, "comm_a", event_id, action, note)
        assert r.status_code == 200, (action, r.text)
    case = stack.case("comm_a", event_id)
    assert (case["state"], case["outcome"], case["handled_by"]) == ("closed", "handled", "comm_a")
    trail = _ok(stack.api.get(f"/api/v1/cases/{event_id}/trail", "comm_a"))["rows"]
    assert [t["action"] for t in trail] == ["verify", "self_handle", "handle"]
    assert trail[-1]["note"] == "bins gone"  # the close note is the handling summary (8.5)
    event = _ok(stack.api.get(f"/api/v1/events/{event_id}", "comm_a"))
    assert event["status"] == "closed"
    assert event["closed_at"]


def test_the_older_route_is_deprecated_in_the_openapi(stack: Stack) -> None:
    spec = stack.api.get("/openapi.json").json()
    old = spec["paths"]["/api/v1/events/{event_id}/{action}"]["post"]
    assert old["deprecated"] is True
    assert "/api/v1/cases/{id}/steps" in old["description"]
    assert "deprecated" not in spec["paths"]["/api/v1/cases/{event_id}/steps"]["post"]
