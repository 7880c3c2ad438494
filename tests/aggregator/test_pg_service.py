"""The gateway on PostgreSQL (``CWG_POOL_URL``): a real aggregator and its API process on the
session's PostgreSQL through the real Mosquitto. Alerts become events in the database and their
devices hear of them; the pool restarted mid-stream loses nothing and ingest resumes; readiness
fails while the pool is down; the API and the CLI read the same pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from aggregator.cli import main as cli_main
from aggregator.config import Settings
from aggregator.pool.postgres import PgEventPool, PgSnapshotStore
from aggregator.pool.reader import is_pool_url, open_reader
from aggregator.service import Aggregator, Service, build_aggregator
from contract import Outcome
from tests.pgsupport import PgServer

from .conftest import (
    GRIDS,
    aggregator_settings,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
    offset,
    wait_until,
)
from .operator_support import COMMUNITY_C, FAST_HASHER, PASSWORD, Api, publish, wait_for_events


def pg_settings(broker: Any, data_dir: Path, url: str, **overrides: Any) -> Settings:
    return aggregator_settings(broker, data_dir, pool_url=SecretStr(url), **overrides)


def rows(url: str, sql: str, *params: Any) -> list[Any]:
    with closing(open_reader(url)) as db:
        return list(db.execute(sql, params).fetchall())


def device(broker: Any, device_id: str) -> Any:
    if device_id not in broker.accounts:
        broker.add_device(device_id)
    client = broker.client(device_id)
    client.subscribe(broker.topics.feedback(device_id))
    return client


@pytest.fixture
def pg_aggregator(broker: Any, tmp_path: Path, pg_url: str) -> Iterator[Aggregator]:
    agg = build_aggregator(pg_settings(broker, tmp_path / "agg", pg_url), grids=GRIDS)
    agg.start()
    try:
        assert agg.ingest.wait_connected(5), "aggregator did not connect to the test broker"
        yield agg
    finally:
        agg.stop()


# ---------------------------------------------------------------------------- settings


def test_pool_url_selects_postgresql_and_never_shows_its_password() -> None:
    url = "postgresql://cwg:s3cret-pw@db.example:5433/pool?sslmode=require&password=other"
    settings = Settings(pool_url=SecretStr(url))
    assert settings.pool_target == url
    assert settings.pool_label == "postgresql://cwg@db.example:5433/pool"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in settings.model_dump_json()
    assert Settings().pool_target == Path("var/pool.db")  # unset: the SQLite file
    with pytest.raises(ValidationError) as refused:
        Settings(pool_url=SecretStr("mysql://cwg:s3cret-pw@db.example/pool"))
    assert "pool_url must be a PostgreSQL URL" in str(refused.value)
    assert "s3cret" not in str(refused.value)
    # an upper-case scheme is accepted and handed on lower-cased: libpq matches it exactly
    upper = Settings(pool_url=SecretStr("POSTGRESQL://cwg:s3cret-pw@db.example/pool"))
    assert upper.pool_target == "postgresql://cwg:s3cret-pw@db.example/pool"
    assert is_pool_url(upper.pool_target)


def test_pool_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CWG_POOL_URL", "postgres://u:pw@127.0.0.1:1/db")
    assert Settings().pool_target == "postgres://u:pw@127.0.0.1:1/db"
    monkeypatch.setenv("CWG_POOL_URL", "sqlite:///var/pool.db")
    with pytest.raises(ValidationError):
        Settings()


def test_postgresql_faults_are_the_pools_and_bad_values_are_the_messages() -> None:
    import psycopg

    from aggregator.ingest.worker import is_pool_fault
    from aggregator.pool.postgres import PoolUnavailableError

    # retried unacknowledged: the server is away, restarting or shutting down
    assert is_pool_fault(PoolUnavailableError("PostgreSQL pool: connection refused"))
    assert is_pool_fault(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert is_pool_fault(psycopg.errors.AdminShutdown())
    # bisected down to the message: a value or constraint the message brought
    assert not is_pool_fault(psycopg.errors.UniqueViolation())
    assert not is_pool_fault(psycopg.errors.CharacterNotInRepertoire())
    assert not is_pool_fault(ValueError("bad"))


# ---------------------------------------------------------------------------- ingest


def test_alerts_become_events_in_postgresql_and_devices_hear_of_them(
    broker: Any, pg_aggregator: Aggregator, pg_url: str, tmp_path: Path
) -> None:
    assert isinstance(pg_aggregator.pool, PgEventPool)
    assert isinstance(pg_aggregator.snapshots, PgSnapshotStore)
    cam1, cam2 = device(broker, "cam-001"), device(broker, "cam-002")
    lat, lon = interior(grid_in_community(1, 4))
    picture = jpeg(3)
    first = make_alert("cam-001", lat, lon, seq=1, snapshot=picture, confidence=0.9)
    second = make_alert("cam-002", *offset(lat, lon, north_m=10), seq=1)
    other = make_alert("cam-001", *offset(lat, lon, east_m=5), seq=2, type="ebike_in_lift")
    for client, alert in ((cam1, first), (cam2, second), (cam1, other)):
        assert not client.publish(broker.topics.alert(alert.device_id), alert.to_json()).is_failure

    heard = {f.alert_id: f for f in cam1.expect_feedback(2) + cam2.expect_feedback(1)}
    assert heard[first.alert_id].outcome is Outcome.ACCEPTED
    assert heard[second.alert_id].outcome is Outcome.MERGED
    assert heard[other.alert_id].outcome is Outcome.ACCEPTED
    assert heard[first.alert_id].event_id == heard[second.alert_id].event_id  # one incident
    assert heard[other.alert_id].event_id != heard[first.alert_id].event_id

    events = rows(pg_url, "SELECT id, type, alert_count, snapshot_sha256 FROM events ORDER BY id")
    assert [(r["type"], r["alert_count"]) for r in events] == [
        ("smoke_fire", 2),
        ("ebike_in_lift", 1),
    ]
    assert events[0]["id"] == heard[first.alert_id].event_id
    stored = rows(pg_url, "SELECT jpeg FROM snapshots WHERE sha256 = ?", events[0][3])
    assert [bytes(r[0]) for r in stored] == [picture]  # in the table every replica reads
    assert rows(pg_url, "SELECT count(*) FROM alerts")[0][0] == 3
    # the data directory holds no pool of its own
    assert not (tmp_path / "agg" / "pool.db").exists()
    assert not list((tmp_path / "agg").glob("snapshots/*/*.jpg"))


def test_postgresql_restarted_mid_stream_loses_nothing_and_ingest_resumes(
    broker: Any, pg_aggregator: Aggregator, pg_url: str, pg_server: PgServer
) -> None:
    """A device publishes 600 alerts at ~200/s while the pool restarts: every alert is pooled
    exactly once, and the device hears of each one."""
    n, rate = 600, 200.0
    cam = device(broker, "cam-001")
    lat, lon = interior(grid_in_community(0, 3))
    alerts = [
        make_alert("cam-001", *offset(lat, lon, north_m=i % 10), seq=i, type="crowd_gathering")
        for i in range(n)
    ]
    published = threading.Event()
    failures: list[str] = []

    def send() -> None:
        # paho's own queue and in-flight window: no wait for each PUBACK, so the pace holds
        start = time.monotonic()
        infos = []
        for i, alert in enumerate(alerts):
            infos.append(cam.paho.publish(broker.topics.alert("cam-001"), alert.to_json(), qos=1))
            time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
        for info in infos:
            info.wait_for_publish(10)
            if not info.is_published():
                failures.append(f"mid {info.mid} not acknowledged by the broker")
        published.set()

    sender = threading.Thread(target=send, name="test-sender", daemon=True)
    sender.start()
    wait_until(
        lambda: rows(pg_url, "SELECT count(*) FROM alerts")[0][0] >= 100, 15, "the first alerts"
    )
    try:
        pg_server.restart()
    finally:
        back = time.monotonic()

    # ingest resumes: alerts are committed again within seconds of the pool's return
    def pooled() -> int:
        return int(rows(pg_url, "SELECT count(*) FROM alerts")[0][0])

    before = pooled()
    assert before < n, "the stream ended before the pool restarted"
    wait_until(lambda: pooled() > before, 10, "ingest to resume")
    resumed = time.monotonic() - back
    sender.join(30)
    assert published.is_set()
    assert not failures
    wait_until(lambda: pooled() == n, 30, f"all {n} alerts pooled")
    ids = [r[0] for r in rows(pg_url, "SELECT alert_id FROM alerts")]
    assert sorted(ids) == sorted(a.alert_id for a in alerts)  # none lost, none twice
    heard = cam.expect_feedback(n, timeout=30)
    assert {f.alert_id for f in heard} == {a.alert_id for a in alerts}
    assert {f.outcome for f in heard} <= {Outcome.ACCEPTED, Outcome.MERGED, Outcome.DUPLICATE}
    print(f"ingest resumed {resumed:.2f} s after the pool came back")
    assert resumed < 10


# ---------------------------------------------------------------------------- API and CLI


@pytest.fixture
def pg_service(broker: Any, tmp_path: Path, pg_url: str) -> Iterator[Service]:
    service = Service(
        pg_settings(broker, tmp_path / "agg", pg_url),
        port=0,
        log_level="warning",
        password_hasher=FAST_HASHER,
    )
    service.auth.create_account("admin", "admin", password=PASSWORD)
    service.start()
    try:
        assert service.aggregator.ingest.wait_connected(5), "aggregator did not connect"
        yield service
    finally:
        service.stop()


def test_the_api_process_on_postgresql_lists_steps_and_follows_the_pool(
    broker: Any, pg_service: Service, pg_server: PgServer, pg_url: str
) -> None:
    api = Api(pg_service.url)
    try:
        lat, lon = interior(grid_in_community(2, 5))
        publish(broker, make_alert("cam-001", lat, lon, snapshot=jpeg(5)))
        publish(
            broker,
            make_alert("cam-002", *interior(grid_in_community(0, 7)), type="crowd_gathering"),
        )
        items = wait_for_events(api, 2)
        assert {i["type"] for i in items} == {"smoke_fire", "crowd_gathering"}
        fire = next(i for i in items if i["type"] == "smoke_fire")
        # a case step: the community's account (an administrator takes none)
        pg_service.auth.create_account(
            "comm_c", "community", scope_code=COMMUNITY_C, password=PASSWORD
        )
        r = api.post(f"/api/v1/events/{fire['event_id']}/verify", "comm_c")
        assert r.status_code == 200, r.text
        [(status,)] = rows(pg_url, "SELECT status FROM events WHERE id = ?", fire["event_id"])
        assert status == "verified"
        # the snapshot comes from the pool's table, where the ingest process stored it
        assert fire["snapshot_url"] is not None
        picture = api.get(fire["snapshot_url"], "admin")
        assert picture.status_code == 200, picture.text
        assert picture.content == jpeg(5)

        # text PostgreSQL cannot hold is the request's fault, not the server's
        r = api.http.post("/api/v1/auth/token", json={"username": "ad\x00min", "password": "x"})
        assert r.status_code in (400, 401), r.text

        assert api.get("/readyz").json() == {"ready": True, "pool": True, "broker": True}
        pg_server.stop()
        try:
            wait_until(lambda: api.get("/readyz").status_code == 503, 15, "not ready")
            assert api.get("/readyz").json() == {"ready": False, "pool": False, "broker": True}
            # a route that needs the pool says so, rather than failing with a 500, and soon:
            # an operator hears it before an HTTP client would give up on the request
            began = time.monotonic()
            assert api.get("/api/v1/events", "admin").status_code == 503
            assert time.monotonic() - began < 8.0
        finally:
            pg_server.start()
        wait_until(lambda: api.get("/readyz").status_code == 200, 20, "ready again")
        assert len(api.get("/api/v1/events", "admin").json()["items"]) == 2
    finally:
        api.close()


def test_cli_commands_find_the_postgresql_pool_through_the_environment(
    broker: Any,
    pg_aggregator: Aggregator,
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    cam = device(broker, "cam-001")
    alert = make_alert("cam-001", *interior(grid_in_community(0, 2)), type="ebike_in_lift")
    assert not cam.publish(broker.topics.alert("cam-001"), alert.to_json()).is_failure
    assert not cam.publish(broker.topics.alert("cam-001"), b"{not json").is_failure
    cam.expect_feedback(2)

    empty = tmp_path / "elsewhere"  # no pool.db here: the URL is what counts
    monkeypatch.setenv("CWG_POOL_URL", pg_url)
    assert cli_main(["events", "--data-dir", str(empty)]) == 0
    assert "电动车入梯" in capsys.readouterr().out
    assert cli_main(["dead-letters", "--data-dir", str(empty)]) == 0
    assert "invalid_json" in capsys.readouterr().out
    assert cli_main(["handling", "--data-dir", str(empty), "--by", "type"]) == 0
    assert "ebike_in_lift" in capsys.readouterr().out
    assert not empty.exists()
    monkeypatch.setenv("CWG_POOL_URL", "mysql://cwg:s3cret-pw@127.0.0.1/pool")
    assert cli_main(["events", "--data-dir", str(empty)]) == 2  # refused, and not shown
    assert "pool_url must be a PostgreSQL URL" in caplog.text
    assert "s3cret" not in caplog.text + capsys.readouterr().err
    monkeypatch.delenv("CWG_POOL_URL")
    with pytest.raises(SystemExit, match="no event pool"):
        cli_main(["events", "--data-dir", str(empty)])
