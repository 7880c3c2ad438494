"""Dedup and pooling semantics on a real SQLite file and a real PostgreSQL database, through
the real decode + geo stages."""

from __future__ import annotations

import re
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from aggregator.ingest.assemble import Inbound, Pipeline
from aggregator.ingest.decode import DecodeLimits
from aggregator.pool.migrate import FOLDER, numbered
from aggregator.pool.snapshots import SnapshotStore
from aggregator.pool.sqlite import connect
from contract import AlertV1, EventStatus, Outcome, Topics, default_catalogue

from .conftest import (
    GRIDS,
    OUTSIDE,
    PoolBackend,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
    offset,
    past,
)

TOPICS = Topics("cwg")


class Harness:
    def __init__(self, backend: PoolBackend) -> None:
        self.backend = backend
        self.catalogue = default_catalogue()
        self.pool = backend.writer(self.catalogue)
        self.snapshots = backend.snapshots(self.pool)
        self.pipeline = Pipeline(TOPICS, self.catalogue, GRIDS, self.snapshots, DecodeLimits())

    def send(self, *alerts: AlertV1) -> list[Outcome]:
        msgs = [Inbound(TOPICS.alert(a.device_id), a.to_json(), time.time()) for a in alerts]
        result = self.pool.commit_batch(self.pipeline.assemble(msgs).batch)
        outcomes = [r.outcome for r in result.alerts]
        outcomes += [Outcome.OUT_OF_AREA] * len(result.out_of_area)
        outcomes += [Outcome.REJECTED] * len(result.dead_letters)
        return outcomes

    def rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        return self.backend.rows(sql, *params)


@pytest.fixture
def h(pool_backend: PoolBackend) -> Harness:
    return Harness(pool_backend)


def sqlite_backend(tmp_path: Path) -> PoolBackend:
    return PoolBackend("sqlite", str(tmp_path / "pool.db"), tmp_path)


def test_alert_registers_event_with_grid_path_department_and_deadline(h: Harness) -> None:
    grid = grid_in_community(1, 7)
    lat, lon = interior(grid)
    assert h.send(make_alert("cam-1", lat, lon, type="fire_lane_occupied")) == [Outcome.ACCEPTED]
    [(grid_code, dept, source, status, address, deadline, registered)] = h.rows(
        "SELECT grid_code, department, source, status, address, deadline_at, registered_at"
        " FROM events"
    )
    assert grid_code == grid.code
    assert dept == "police"  # Appendix A item 2 → 公安局
    assert source == "smart_community_warning"
    assert status == EventStatus.REGISTERED.value
    assert address == " › ".join(level.name for level in grid.path)
    assert deadline == pytest.approx(registered + 3600)  # fire lane: PT1H


def test_same_alert_id_twice_is_one_row(h: Harness) -> None:
    lat, lon = interior(grid_in_community(0))
    alert = make_alert("cam-1", lat, lon)
    assert h.send(alert, alert) == [Outcome.ACCEPTED, Outcome.DUPLICATE]
    assert h.send(alert) == [Outcome.DUPLICATE]
    assert h.rows(
        "SELECT count(*), sum(alert_count) FROM alerts JOIN events ON events.id = alerts.event_id"
    ) == [(1, 1)]


def test_three_devices_within_radius_and_window_make_one_event(h: Harness) -> None:
    lat, lon = interior(grid_in_community(2))
    # smoke_fire: 150 m radius, 1800 s window
    a = make_alert("cam-1", lat, lon, observed_at=past(600), snapshot=jpeg(1), confidence=0.6)
    b = make_alert("cam-2", *offset(lat, lon, north_m=80), observed_at=past(300), confidence=0.9,
                   snapshot=jpeg(2))  # fmt: skip
    c = make_alert("cam-3", *offset(lat, lon, east_m=-100), observed_at=past(0), confidence=0.7,
                   snapshot=jpeg(3))  # fmt: skip
    assert h.send(a) == [Outcome.ACCEPTED]
    assert h.send(b, c) == [Outcome.MERGED, Outcome.MERGED]
    [(event_id, alerts, devices, snap)] = h.rows(
        "SELECT id, alert_count, device_count, snapshot_sha256 FROM events"
    )
    assert (alerts, devices) == (3, 3)
    assert h.rows("SELECT device_id FROM event_devices WHERE event_id=? ORDER BY device_id",
                  event_id) == [("cam-1",), ("cam-2",), ("cam-3",)]  # fmt: skip
    # the best snapshot (most confident alert) is the one kept, and it is on disk
    assert snap == h.rows("SELECT snapshot_sha256 FROM alerts WHERE device_id='cam-2'")[0][0]
    assert h.snapshots.get(str(snap)) == jpeg(2)


@pytest.mark.parametrize(
    ("north_m", "seconds_apart", "same_event"),
    [
        (140, 0, True),  # inside 150 m
        (170, 0, False),  # outside the radius
        (0, 1700, True),  # inside the 1800 s window
        (0, 1900, False),  # outside the window
    ],
)
def test_radius_and_window_come_from_the_catalogue(
    h: Harness, north_m: float, seconds_apart: float, same_event: bool
) -> None:
    lat, lon = interior(grid_in_community(3))
    first = make_alert("cam-1", lat, lon, observed_at=past(4000))
    second = make_alert(
        "cam-2", *offset(lat, lon, north_m=north_m), observed_at=past(4000 - seconds_apart)
    )
    h.send(first)
    expected = Outcome.MERGED if same_event else Outcome.ACCEPTED
    assert h.send(second) == [expected]


def test_different_types_never_merge(h: Harness) -> None:
    lat, lon = interior(grid_in_community(0))
    h.send(make_alert("cam-1", lat, lon, type="smoke_fire"))
    assert h.send(make_alert("cam-1", lat, lon, type="crowd_gathering")) == [Outcome.ACCEPTED]


def test_out_of_order_backlog_joins_the_event_it_belongs_to(h: Harness) -> None:
    lat, lon = interior(grid_in_community(0))
    h.send(make_alert("cam-1", lat, lon, observed_at=past(100)))
    # a device that was offline flushes an older alert of the same incident
    assert h.send(make_alert("cam-2", lat, lon, observed_at=past(1500))) == [Outcome.MERGED]
    [(first, last)] = h.rows("SELECT first_observed_at, last_observed_at FROM events")
    assert float(last) - float(first) == pytest.approx(1400, abs=2)


def test_closed_event_absorbs_nothing_and_recurrence_links_to_it(h: Harness) -> None:
    lat, lon = interior(grid_in_community(1))
    h.send(make_alert("cam-1", lat, lon, observed_at=past(60)))
    [(closed_id,)] = h.rows("SELECT id FROM events")
    h.pool.set_status(int(str(closed_id)), EventStatus.CLOSED, actor="test", note="put out")
    assert h.send(make_alert("cam-2", lat, lon)) == [Outcome.ACCEPTED]
    rows = h.rows("SELECT id, status, recurrence_of, alert_count FROM events ORDER BY id")
    assert rows == [(closed_id, "closed", None, 1), (rows[1][0], "registered", closed_id, 1)]


def test_out_of_area_alert_makes_no_event(h: Harness) -> None:
    assert h.send(make_alert("cam-1", *OUTSIDE)) == [Outcome.OUT_OF_AREA]
    assert h.rows("SELECT count(*) FROM events") == [(0,)]
    assert h.rows("SELECT device_id FROM out_of_area") == [("cam-1",)]


def test_severity_only_rises(h: Harness) -> None:
    lat, lon = interior(grid_in_community(0))
    h.send(make_alert("cam-1", lat, lon, type="crowd_gathering", severity="high"))
    h.send(make_alert("cam-2", lat, lon, type="crowd_gathering", severity="low"))
    assert h.rows("SELECT severity, alert_count FROM events") == [("high", 2)]


def test_snapshot_is_stored_content_addressed_and_not_in_the_payload(h: Harness) -> None:
    lat, lon = interior(grid_in_community(0))
    h.send(make_alert("cam-1", lat, lon, snapshot=jpeg(9)))
    [(sha, payload)] = h.rows("SELECT snapshot_sha256, payload FROM alerts")
    assert h.snapshots.get(str(sha)) == jpeg(9)
    if isinstance(h.snapshots, SnapshotStore):  # on SQLite, a file in a fan-out folder
        path = h.snapshots.path_of(str(sha))
        assert path.read_bytes() == jpeg(9)
        assert path.parent.name == str(sha)[:2]
    assert b"/9j/" not in bytes(payload)  # the base64 JPEG is not duplicated in the pool


def test_batch_is_one_transaction(h: Harness) -> None:
    """A batch that fails half way leaves nothing behind, so it can be retried whole."""
    lat, lon = interior(grid_in_community(0))
    msgs = [
        Inbound(TOPICS.alert("cam-1"), make_alert("cam-1", lat, lon, seq=i).to_json(), time.time())
        for i in range(3)
    ]
    batch = h.pipeline.assemble(msgs).batch
    # a pooled alert of a type this pool does not know fails after two alerts were written
    batch.alerts[2] = replace(batch.alerts[2], type="not_in_catalogue")
    with pytest.raises(KeyError):
        h.pool.commit_batch(batch)
    assert h.rows("SELECT count(*) FROM events") == [(0,)]
    assert h.rows("SELECT count(*) FROM alerts") == [(0,)]
    assert h.rows("SELECT count(*) FROM devices") == [(0,)]


def test_window_is_by_observed_at_not_arrival(h: Harness) -> None:
    lat, lon = interior(grid_in_community(0))
    # ebike_in_lift: 10 m, 300 s. Both arrive now, but were observed 20 minutes apart.
    h.send(make_alert("cam-1", lat, lon, type="ebike_in_lift", observed_at=past(1300)))
    assert h.send(make_alert("cam-1", lat, lon, type="ebike_in_lift", observed_at=past(100))) == [
        Outcome.ACCEPTED
    ]
    assert default_catalogue().types["ebike_in_lift"].merge_window_s == 300


def test_a_pool_made_with_the_old_device_index_loses_it_and_keeps_its_alerts(
    tmp_path: Path,
) -> None:
    # SQLite only: pools made before numbered migrations existed only as SQLite files
    h = Harness(sqlite_backend(tmp_path))
    lat, lon = interior(grid_in_community(1, 3))
    assert h.send(make_alert("cam-1", lat, lon)) == [Outcome.ACCEPTED]
    h.pool.close()
    with closing(connect(tmp_path / "pool.db")) as db:  # as pools were made before
        db.execute("CREATE INDEX alerts_device ON alerts(device_id, seq)")
        # ... which was before migrations were numbered: version 1's tables and nothing newer
        version_1 = set(
            re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", numbered(FOLDER / "sqlite")[0].sql)
        )
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for newer in sorted(tables - version_1 - {"sqlite_sequence"}):
            db.execute(f"DROP TABLE {newer}")
        db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
    again = Harness(sqlite_backend(tmp_path))
    indexes = {r[0] for r in again.rows("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "alerts_device" not in indexes
    assert {"alerts_event", "events_open"} <= indexes
    assert again.rows("SELECT count(*) FROM alerts") == [(1,)]
    again.pool.close()


def test_a_pool_made_before_dead_letters_had_a_key_gains_it_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    # SQLite only: pools made before numbered migrations existed only as SQLite files
    path = tmp_path / "pool.db"
    with closing(connect(path)) as db:  # dead_letters as pools made it before
        db.execute(
            "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, received_at REAL NOT NULL,"
            " topic TEXT NOT NULL, device_id TEXT, alert_id TEXT, reason TEXT NOT NULL,"
            " detail TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        db.execute(
            "INSERT INTO dead_letters(received_at, topic, device_id, reason, detail, payload)"
            " VALUES (1, 't', 'cam-1', 'invalid_json', 'old', x'7b')"
        )
    h = Harness(sqlite_backend(tmp_path))
    bad = Inbound(TOPICS.alert("cam-1"), b"{nope", time.time())
    first = h.pool.commit_batch(h.pipeline.assemble([bad, bad]).batch).dead_letters
    again = h.pool.commit_batch(h.pipeline.assemble([bad]).batch).dead_letters
    assert [d.duplicate for d in first + again] == [False, True, True]
    assert len({d.id for d in first + again}) == 1
    assert h.rows("SELECT detail FROM dead_letters ORDER BY id")[0] == ("old",)
    assert h.rows("SELECT count(*) FROM dead_letters") == [(2,)]
    assert h.rows("SELECT rejected_total FROM devices WHERE device_id='cam-1'") == [(1,)]
    h.pool.close()


def test_alerts_repeating_positions_in_a_batch_each_get_their_grid(h: Harness) -> None:
    """Positions are looked up once per batch (devices repeat theirs); every alert still gets
    the grid of its own position, out-of-area ones included, in order."""
    spots = [interior(grid_in_community(c, k)) for c, k in [(0, 1), (1, 3), (2, 4)]]
    spots = [spots[0], OUTSIDE, spots[1], spots[0], spots[2], OUTSIDE, spots[1], spots[0]]
    msgs = [
        Inbound(TOPICS.alert("cam-1"), make_alert("cam-1", lat, lon).to_json(), time.time())
        for lat, lon in spots
    ]
    batch = h.pipeline.assemble(msgs).batch
    expected = [GRIDS.locate(*s) for s in spots if s != OUTSIDE]
    assert [a.grid_code for a in batch.alerts] == [g.code for g in expected if g]
    assert [(a.lat, a.lon) for a in batch.alerts] == [s for s in spots if s != OUTSIDE]
    assert [(o.lat, o.lon) for o in batch.out_of_area] == [OUTSIDE, OUTSIDE]
