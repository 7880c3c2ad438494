"""Retention of raw alerts (``gateway retention``, aggregator/pool/retention.py) on both pool
backends: old alerts, dead letters and out-of-area rows go, newer ones stay; every other table
(events, cases, audit, supervision, snapshots…) is untouched and events still read whole
through the read model; a dry run changes nothing; a running SQLite writer keeps committing
while 50,000 old alerts are pruned."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aggregator.cli.main import main as cli_main
from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool import queries
from aggregator.pool.model import AlertIn, Batch
from aggregator.pool.retention import apply_retention
from aggregator.pool.snapshots import SnapshotStore
from contract import EventStatus, Severity, Topics, default_catalogue

from .conftest import (
    GRIDS,
    OUTSIDE,
    PoolBackend,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
    wait_until,
)
from .operator_support import Api, running_service

TOPICS = Topics("cwg")
CATALOGUE = default_catalogue()
DAY = 86400.0
KEEP_DAYS = 30
# what retention may change; every other table must read the same before and after
PRUNED = {"alerts", "alert_ids", "dead_letters", "out_of_area"}


def _tables(backend: PoolBackend) -> list[str]:
    if backend.is_postgres:
        # the partitioned parent, not its partitions (a dropped month is not a lost table)
        rows = backend.rows(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
        )
    else:
        rows = backend.rows("SELECT name FROM sqlite_master WHERE type = 'table'")
    return sorted(r[0] for r in rows)


def _counts(backend: PoolBackend) -> dict[str, int]:
    return {t: backend.rows(f'SELECT count(*) FROM "{t}"')[0][0] for t in _tables(backend)}


class Filler:
    """Alerts, dead letters and out-of-area rows through the real ingest path (decode,
    geo-tag, dedup, the pool writer), each message with the receive time a test gives it."""

    def __init__(self, backend: PoolBackend, snapshot_dir: Path | None = None) -> None:
        self.pool = backend.writer()
        store = (
            SnapshotStore(snapshot_dir)
            if snapshot_dir is not None and not backend.is_postgres
            else backend.snapshots(self.pool)
        )
        self.pipeline = Pipeline(TOPICS, CATALOGUE, GRIDS, store, DecodeLimits())

    def send(self, received_at: float, *messages: tuple[str, bytes]) -> Any:
        batch = self.pipeline.assemble(
            [Inbound(topic, payload, received_at) for topic, payload in messages]
        ).batch
        return self.pool.commit_batch(batch)

    def alerts(self, received_at: float, device: str, grid: int, n: int, **kw: Any) -> Any:
        lat, lon = interior(grid_in_community(grid, 1))
        at = datetime.fromtimestamp(received_at, UTC)
        return self.send(
            received_at,
            *(
                (TOPICS.alert(device), make_alert(device, lat, lon, observed_at=at, **kw).to_json())
                for _ in range(n)
            ),
        )


def _fill(backend: PoolBackend, snapshot_dir: Path | None = None) -> tuple[Filler, dict[str, Any]]:
    """Three ages of alerts: four months old (on PostgreSQL a month that is dropped whole), a
    day past the cut (a partly old month, deleted row by row), and a day old (kept)."""
    now = time.time()
    f = Filler(backend, snapshot_dir)
    ancient = f.alerts(now - 120 * DAY, "cam-1", 0, 3, snapshot=jpeg(1))
    old = f.alerts(now - (KEEP_DAYS + 1) * DAY, "cam-2", 1, 4, snapshot=jpeg(2))
    f.send(
        now - (KEEP_DAYS + 1) * DAY,
        (TOPICS.alert("cam-2"), b"{not json"),
        (
            TOPICS.alert("cam-2"),
            make_alert(
                "cam-2", *OUTSIDE, observed_at=datetime.fromtimestamp(now - 31 * DAY, UTC)
            ).to_json(),
        ),
    )
    new = f.alerts(now - DAY, "cam-3", 2, 2)
    f.send(now - DAY, (TOPICS.alert("cam-3"), b"{still not json"))
    events = {
        "ancient": ancient.alerts[0].event_id,
        "old": old.alerts[0].event_id,
        "new": new.alerts[0].event_id,
    }
    assert len(set(events.values())) == 3
    # an operator's step on an old event: its log must outlive the alerts
    backend.lifecycle().set_status(events["old"], EventStatus.VERIFIED, "op-1", "seen")
    return f, events


def test_retention_removes_old_alerts_and_keeps_events_whole(pool_backend: PoolBackend) -> None:
    _, events = _fill(pool_backend)
    before = _counts(pool_backend)
    assert before["alerts"] == 9
    assert before["dead_letters"] == 2
    assert before["out_of_area"] == 1
    cut = time.time() - KEEP_DAYS * DAY

    dry = apply_retention(pool_backend.target, cut, dry_run=True)
    assert _counts(pool_backend) == before  # a dry run changes nothing
    assert dry.alerts + dry.partition_rows == 7
    assert (dry.dead_letters, dry.out_of_area) == (1, 1)
    if pool_backend.is_postgres:
        assert dry.partitions, "the month four months back ends before the cut"

    # two rows a step: chunks that end inside the old alerts, and one that holds old and new
    done = apply_retention(pool_backend.target, cut, pause_s=0, batch_rows=2)
    assert (done.alerts + done.partition_rows, done.dead_letters, done.out_of_area) == (7, 1, 1)
    assert done.steps == -(-done.alerts // 2)
    assert [p.name for p in done.partitions] == [p.name for p in dry.partitions]
    after = _counts(pool_backend)
    assert {t: n for t, n in after.items() if t not in PRUNED} == {
        t: n for t, n in before.items() if t not in PRUNED
    }
    assert pool_backend.rows("SELECT device_id, count(*) FROM alerts GROUP BY device_id") == [
        ("cam-3", 2)
    ]
    assert (after["dead_letters"], after["out_of_area"]) == (1, 0)
    if pool_backend.is_postgres:
        assert after["alert_ids"] == 2  # the removed alerts' ids went with them

    # events read whole through the read model the API and the CLI use
    db = pool_backend.reader()
    rows = queries.list_events(db, queries.EVERYTHING, queries.EventFilter(limit=10))
    assert sorted(r["id"] for r in rows) == sorted(events.values())
    counts = {r["id"]: r["alert_count"] for r in rows}
    assert (counts[events["ancient"]], counts[events["old"]], counts[events["new"]]) == (3, 4, 2)
    summaries = queries.event_summaries(db, events.values(), CATALOGUE)
    assert [(s.device_ids, s.alert_count) for s in summaries] == [
        (["cam-1"], 3),
        (["cam-2"], 4),
        (["cam-3"], 2),
    ]
    old_row = queries.scoped_event(db, queries.EVERYTHING, events["old"])
    assert old_row is not None
    assert old_row["status"] == "verified"
    assert old_row["snapshot_sha256"] is not None  # the event keeps its 实时照片
    assert queries.event_alerts(db, events["old"], 10) == []
    assert len(queries.event_alerts(db, events["new"], 10)) == 2
    assert [r["action"] for r in queries.event_log(db, events["old"])] == [
        "registered",
        "status:verified",
    ]
    assert queries.EventStats(db, queries.EVERYTHING).totals(time.time()).alerts == 9

    # a second run finds nothing left
    again = apply_retention(pool_backend.target, cut, pause_s=0)
    assert (again.alerts, again.partitions, again.dead_letters) == (0, [], 0)


def test_events_whose_alerts_are_gone_still_show_in_the_api(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> None:
    with running_service(broker, tmp_path, backend=pool_backend) as service:
        api = Api(service.url)
        try:
            _, events = _fill(pool_backend, service.settings.snapshots)
            apply_retention(pool_backend.target, time.time() - KEEP_DAYS * DAY, pause_s=0)
            items = api.get("/api/v1/events", "admin", limit=50).json()["items"]
            assert sorted(e["event_id"] for e in items) == sorted(events.values())
            r = api.get(f"/api/v1/events/{events['old']}", "admin")
            assert r.status_code == 200, r.text
            detail = r.json()
            assert (detail["alert_count"], detail["alerts"], detail["status"]) == (
                4,
                [],
                "verified",
            )
            assert [d["device_id"] for d in detail["devices"]] == ["cam-2"]
            # the event's own snapshot (its 实时照片) still opens
            [url] = detail["snapshot_urls"]
            assert api.get(url, "admin").content == jpeg(2)
            kept = api.get(f"/api/v1/events/{events['new']}", "admin").json()
            assert len(kept["alerts"]) == 2
        finally:
            api.close()


def test_the_command_on_either_backend(
    pool_backend: PoolBackend,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fill(pool_backend)
    data_dir = pool_backend.root
    if pool_backend.is_postgres:
        monkeypatch.setenv("CWG_POOL_URL", pool_backend.target)
        data_dir = pool_backend.root / "elsewhere"  # the URL is what counts
    argv = ["retention", "--data-dir", str(data_dir)]

    monkeypatch.delenv("CWG_RETENTION__ALERT_DAYS", raising=False)
    assert cli_main(argv) == 2  # how many days? it says so, and removes nothing
    assert "--keep-days N, or set CWG_RETENTION__ALERT_DAYS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*argv, "--keep-days", "0"])
    capsys.readouterr()

    assert cli_main([*argv, "--keep-days", str(KEEP_DAYS), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing was changed" in out
    assert "kept: events (their alert and device counts as stored" in out
    assert pool_backend.rows("SELECT count(*) FROM alerts") == [(9,)]

    monkeypatch.setenv("CWG_RETENTION__ALERT_DAYS", str(KEEP_DAYS))
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "dead letters: 1, out-of-area rows: 1 removed" in out
    if pool_backend.is_postgres:
        assert "dropped whole" in out
    assert pool_backend.rows("SELECT count(*) FROM alerts") == [(2,)]
    if pool_backend.is_postgres:
        assert not data_dir.exists()  # nothing made where no pool is
    assert cli_main(["events", "--data-dir", str(data_dir)]) == 0  # every event still lists
    assert capsys.readouterr().out.count(CATALOGUE.types["smoke_fire"].zh) == 3


def test_no_pool_is_refused_and_names_the_place(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["retention", "--data-dir", str(tmp_path / "none"), "--keep-days", "30"]
    assert cli_main(argv) == 2
    assert "no event pool at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing made on the way


def test_a_second_job_on_postgresql_stops_and_says_to_run_again(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    from aggregator.pool.postgres import migrate
    from aggregator.pool.retention import _JOB_LOCK

    migrate(pg_url)
    monkeypatch.setenv("CWG_POOL_URL", pg_url)
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (_JOB_LOCK,))
        assert cli_main(["retention", "--keep-days", "30"]) == 1
    assert "another retention job is running" in capsys.readouterr().err
    assert cli_main(["retention", "--keep-days", "30"]) == 0


def _alert_in(device: str, lat: float, lon: float, received_at: float, i: int) -> AlertIn:
    return AlertIn(
        alert_id=f"{device}-{i:08d}-{uuid.uuid4().hex[:8]}",
        device_id=device,
        seq=i,
        type="smoke_fire",
        severity=Severity.HIGH,
        confidence=0.8,
        observed_at=time.time(),
        received_at=received_at,
        lat=lat,
        lon=lon,
        grid_code=grid_in_community(0, 1).code,
        grid_path="[]",
        address="a",
        description="d",
        snapshot_sha256=None,
        payload=b'{"schema":"alert/v1"}',
    )


def test_a_running_sqlite_writer_keeps_committing_through_a_large_prune(
    tmp_path: Any,
) -> None:
    from aggregator.pool.sqlite import EventPool

    path = tmp_path / "pool.db"
    pool = EventPool(path, CATALOGUE)
    lat, lon = interior(grid_in_community(0, 1))
    old = time.time() - 40 * DAY
    n_old, per_batch = 50_000, 1_000
    for b in range(n_old // per_batch):
        pool.commit_batch(
            Batch(
                alerts=[
                    _alert_in("cam-old", lat, lon, old, b * per_batch + i) for i in range(per_batch)
                ]
            )
        )

    stop = threading.Event()
    commits: list[float] = []  # seconds each of the writer's commits took
    errors: list[Exception] = []
    steps_at: list[int] = []  # the writer's commits so far, at the end of each step

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set() and i < 10_000:  # bounded in count and (below) time
                batch = Batch(
                    alerts=[
                        _alert_in("cam-live", lat, lon, time.time(), i * 10 + k) for k in range(10)
                    ]
                )
                began = time.monotonic()
                pool.commit_batch(batch)
                commits.append(time.monotonic() - began)
                i += 1
                time.sleep(0.01)
        except Exception as exc:  # noqa: BLE001  (the test thread reports any failure)
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        began = time.monotonic()
        report = apply_retention(
            path,
            time.time() - KEEP_DAYS * DAY,
            batch_rows=5_000,
            progress=lambda _: steps_at.append(len(commits)),
        )
        took = time.monotonic() - began
        during = len(commits)
    finally:
        stop.set()
        thread.join(30)
        pool.close()
    assert not errors, errors
    assert report.alerts == n_old
    assert report.steps == n_old // 5_000
    assert took < 120
    # the writer went on committing all along, never held up for long by a step
    assert during >= report.steps, (during, report.steps)
    assert max(commits) < 2.0, max(commits)
    # … and took its turn between every two steps (the pause outlasts its busy handler's sleep)
    assert all(b > a for a, b in itertools.pairwise(steps_at)), steps_at
    from contextlib import closing

    from aggregator.pool.sqlite import connect

    with closing(connect(path, readonly=True)) as db:
        assert (
            db.execute("SELECT count(*) FROM alerts WHERE device_id='cam-old'").fetchone()[0] == 0
        )
        live = db.execute("SELECT count(*) FROM alerts WHERE device_id='cam-live'").fetchone()[0]
    assert live == len(commits) * 10


def test_the_daily_timer_runs_the_same_job_and_stops_promptly(pool_backend: PoolBackend) -> None:
    from aggregator.pool.retention import RetentionTimer

    _fill(pool_backend)
    timer = RetentionTimer(pool_backend.target, KEEP_DAYS, first_after_s=0, every_s=3600)
    timer.start()
    try:
        wait_until(lambda: timer.runs >= 1, 30, "a retention run")
    finally:
        began = time.monotonic()
        timer.stop()
        assert time.monotonic() - began < 5  # waiting for its next day ends at once
    assert timer.last is not None
    assert timer.last.alerts + timer.last.partition_rows == 7
    assert pool_backend.rows("SELECT count(*) FROM alerts") == [(2,)]


def test_the_service_runs_retention_when_a_keep_time_is_set(
    broker: Any, tmp_path: Path, pool_backend: PoolBackend
) -> None:
    from aggregator.access.auth import Level
    from aggregator.config import RetentionSettings

    keep = RetentionSettings(alert_days=KEEP_DAYS, first_run_after_s=0)
    _fill(pool_backend)  # before the service: its first run is at once, the next a day later
    with running_service(broker, tmp_path, backend=pool_backend, retention=keep) as service:
        timer = service.retention
        assert timer is not None
        wait_until(lambda: pool_backend.rows("SELECT count(*) FROM alerts") == [(2,)], 30, "prune")
        assert timer.runs >= 1
    assert service.retention is None  # stopped with the service
    again = {"admin-2": (Level.ADMIN, "", None)}  # the pool already holds the first's accounts
    with running_service(
        broker, tmp_path / "unset", backend=pool_backend, operators=again
    ) as service:
        assert service.retention is None  # no keep time: the service keeps every alert


def test_a_partition_held_by_a_reader_is_left_for_the_next_run(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from aggregator.pool import retention
    from aggregator.pool.postgres import PoolUnavailableError

    backend = PoolBackend("postgres", pg_url, tmp_path)
    try:
        _fill(backend)
        monkeypatch.setattr(retention, "DROP_ATTEMPTS", 1)
        cut = time.time() - KEEP_DAYS * DAY
        with psycopg.connect(pg_url) as reader:  # a transaction reading the alerts, held open
            reader.execute("SELECT count(*) FROM alerts").fetchone()
            began = time.monotonic()
            with pytest.raises(PoolUnavailableError, match="lock timeout"):
                apply_retention(pg_url, cut, pause_s=0)
            assert time.monotonic() - began < 10  # it gave up instead of queueing ingest
        assert backend.rows("SELECT count(*) FROM alerts") == [(9,)]  # nothing half done
        done = apply_retention(pg_url, cut, pause_s=0)
        assert done.alerts + done.partition_rows == 7
        assert backend.rows("SELECT count(*) FROM alert_ids") == [(2,)]
    finally:
        backend.close()
