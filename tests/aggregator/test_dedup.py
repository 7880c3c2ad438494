"""The writer's dedup agrees with the pool across restarts, evictions and lifecycle changes
made by other connections, on SQLite (an in-memory index beside the file) and on PostgreSQL
(candidates read inside the batch's transaction)."""

from __future__ import annotations

import math
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aggregator.ingest.assemble import Inbound
from aggregator.pool.dedup import SpatialHash, haversine_m
from aggregator.pool.sqlite import EventPool, connect
from contract import AlertV1, EventNoticeV1, EventStatus, EventSummary, Outcome, event_notice_json

from .conftest import (
    GRIDS,
    PoolBackend,
    grid_in_community,
    interior,
    jpeg,
    make_alert,
    offset,
    past,
)
from .test_pool import TOPICS, Harness, sqlite_backend


def inbound(alert: AlertV1) -> Inbound:
    return Inbound(TOPICS.alert(alert.device_id), alert.to_json(), time.time())


@pytest.fixture
def h(pool_backend: PoolBackend) -> Harness:
    return Harness(pool_backend)


@pytest.mark.parametrize("ref_lat", [0.0, 27.5, 60.0])
@pytest.mark.parametrize("lat", [-45.0, 0.0, 27.55, 59.9, 75.0])
def test_spatial_hash_never_misses_a_neighbour_within_the_radius(
    ref_lat: float, lat: float
) -> None:
    radius = 100.0
    h = SpatialHash(ref_lat, {"t": radius})
    lon = 120.0
    points = []
    for k in range(72):  # a ring just inside the radius, every 5 degrees
        bearing = math.radians(k * 5)
        north, east = 0.99 * radius * math.cos(bearing), 0.99 * radius * math.sin(bearing)
        plat = lat + north / 111_320.0
        plon = lon + east / (111_320.0 * math.cos(math.radians(lat)))
        points.append((plat, plon))
        h.add("t", plat, plon, k)
    found = set(h.near("t", lat, lon))
    inside = {k for k, (a, b) in enumerate(points) if haversine_m(lat, lon, a, b) <= radius}
    assert inside
    assert inside <= found


def test_in_one_batch_alerts_at_one_spot_join_the_event_their_time_fits(h: Harness) -> None:
    """A camera sits still: its alerts repeat one position. Within a single batch, an alert
    outside the first event's window opens a second event there, and a later alert at the same
    spot joins that second event, not the first and not a third; nearer events win."""
    lat, lon = interior(grid_in_community(0, 2))
    window = h.catalogue.types["fire_lane_occupied"].merge_window_s

    def at(seconds_ago: float, seq: int, *, north_m: float = 0.0) -> AlertV1:
        return make_alert(
            "cam-1",
            *offset(lat, lon, north_m),
            seq=seq,
            type="fire_lane_occupied",
            observed_at=past(seconds_ago),
        )

    old, new, later, near = (
        at(3 * window + 60, 1),  # opens event 1
        at(60, 2),  # 3 windows later: opens event 2 at the same spot
        at(30, 3),  # joins event 2
        at(3 * window + 30, 4, north_m=5),  # 5 m away, event 1's time: joins event 1
    )
    assert h.send(old, new, later, near) == [
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
        Outcome.MERGED,
        Outcome.MERGED,
    ]
    assert h.rows("SELECT id, alert_count FROM events ORDER BY id") == [(1, 2), (2, 2)]
    assert h.rows("SELECT seq, event_id FROM alerts ORDER BY seq") == [
        (1, 1), (2, 2), (3, 2), (4, 1)
    ]  # fmt: skip


def test_restart_reloads_open_events(pool_backend: PoolBackend) -> None:
    h = Harness(pool_backend)
    lat, lon = interior(grid_in_community(0))
    h.send(make_alert("cam-1", lat, lon))
    h.pool.close()
    again = Harness(pool_backend)  # a new writer on the same pool
    assert again.send(make_alert("cam-2", *offset(lat, lon, 30))) == [Outcome.MERGED]
    assert again.rows("SELECT alert_count, device_count FROM events") == [(2, 2)]


def test_alerts_older_than_the_index_horizon_are_deduplicated_through_sql(h: Harness) -> None:
    lat, lon = interior(grid_in_community(1))
    # a manhole cover: 15 m, one day. The first alert is 20 hours old.
    h.send(make_alert("sensor-1", lat, lon, type="manhole_displaced", observed_at=past(72_000)))
    if isinstance(h.pool, EventPool):  # PostgreSQL keeps no index: it always asks SQL
        # the writer forgets everything older than a few seconds…
        h.pool._index.evict(time.time(), keep_s=-86_400 + 5)
        assert not h.pool._index.events
    # …and a backlog alert from 19 hours ago still joins the event, found through SQL
    late = make_alert("sensor-2", lat, lon, type="manhole_displaced", observed_at=past(68_400))
    assert h.send(late) == [Outcome.MERGED]
    assert h.rows("SELECT count(*), sum(alert_count) FROM events") == [(1, 2)]


def test_lifecycle_change_from_another_connection_is_seen_by_the_next_batch(h: Harness) -> None:
    lat, lon = interior(grid_in_community(2))
    h.send(make_alert("cam-1", lat, lon, type="street_vending"))
    [(event_id,)] = h.rows("SELECT id FROM events")
    operator = h.backend.lifecycle()  # e.g. the API process
    operator.set_status(int(str(event_id)), EventStatus.VERIFIED, "op-1")
    assert h.send(make_alert("cam-2", lat, lon, type="street_vending")) == [Outcome.MERGED]
    operator.set_status(int(str(event_id)), EventStatus.CLOSED, "op-1", "cleared")
    assert h.send(make_alert("cam-3", lat, lon, type="street_vending")) == [Outcome.ACCEPTED]
    rows = h.rows("SELECT id, status, alert_count, recurrence_of FROM events ORDER BY id")
    assert rows == [(event_id, "closed", 2, None), (rows[1][0], "registered", 1, event_id)]


def test_a_rolled_back_batch_leaves_the_index_untouched(tmp_path: Path) -> None:
    # SQLite only: its write lock and in-memory index (test_pgpool restarts PostgreSQL mid-batch)
    h = Harness(sqlite_backend(tmp_path))
    lat, lon = interior(grid_in_community(0))
    with closing(connect(h.pool.path)) as other:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock…
        h.pool._db.execute("PRAGMA busy_timeout=100")
        with pytest.raises(Exception, match="locked"):
            h.send(make_alert("cam-1", lat, lon))
        other.execute("ROLLBACK")
    assert not h.pool._index.events
    assert h.send(make_alert("cam-1", lat, lon)) == [Outcome.ACCEPTED]


def test_index_and_pool_agree_after_many_random_alerts(h: Harness) -> None:
    """Dedup decided by the index equals dedup decided from the rows themselves."""
    import random

    rng = random.Random(5)
    grids = GRIDS.by_prefix(GRIDS.communities()[0].code)[:4]
    alerts = []
    for i in range(300):
        lat, lon = interior(rng.choice(grids))
        north, east = rng.uniform(-200, 200), rng.uniform(-200, 200)
        kind = rng.choice(["crowd_gathering", "zone_intrusion"])
        alerts.append(make_alert(f"cam-{i % 7}", *offset(lat, lon, north, east), type=kind,
                                 observed_at=past(rng.uniform(0, 3000)), seq=i))  # fmt: skip
    for start in range(0, 300, 37):
        h.send(*alerts[start : start + 37])
    # every alert is within its type's radius and window of its event's first position/span
    cat = h.catalogue
    for atype, alat, alon, aobs, elat, elon, first, last in h.rows(
        "SELECT a.type, a.lat, a.lon, a.observed_at, e.lat, e.lon, e.first_observed_at,"
        " e.last_observed_at FROM alerts a JOIN events e ON e.id = a.event_id"
    ):
        wt = cat.types[str(atype)]
        assert haversine_m(float(alat), float(alon), float(elat), float(elon)) <= wt.merge_radius_m
        assert float(first) <= float(aobs) <= float(last)
    [(pooled,)] = h.rows("SELECT count(*) FROM alerts")
    assert h.rows("SELECT sum(alert_count) FROM events") == [(pooled,)]
    assert h.rows("SELECT count(*) FROM out_of_area") == [(300 - int(str(pooled)),)]
    assert int(str(pooled)) > 200
    if isinstance(h.pool, EventPool):  # a fresh SQLite writer rebuilds the same index
        h.pool.close()
        reloaded = EventPool(h.pool.path, cat, ref_lat=27.5)
        assert len(reloaded._index.events) == h.rows("SELECT count(*) FROM events")[0][0]
        reloaded.close()


def test_summary_from_the_writer_equals_summary_from_the_row(h: Harness) -> None:
    from aggregator.pool.queries import event_summaries

    lat, lon = interior(grid_in_community(1))
    h.send(make_alert("cam-1", lat, lon, type="smoke_fire", snapshot=jpeg(4)))
    batch_result = h.pool.commit_batch(
        h.pipeline.assemble(
            [inbound(make_alert("cam-2", *offset(lat, lon, 20), type="smoke_fire"))]
        ).batch
    )
    [event_id] = batch_result.updated
    event = batch_result.summary(event_id)
    from_writer = EventSummary.model_validate(event, strict=False)
    [from_row] = event_summaries(h.backend.reader(), [event_id], h.catalogue)
    assert from_writer.model_dump() == from_row.model_dump()
    assert from_writer.model_dump_json() == from_row.model_dump_json()
    # the notice published for it is byte for byte the model's
    at = datetime(2026, 11, 23, 8, 0, 0, 123456, tzinfo=UTC)
    model = EventNoticeV1(change="updated", event=from_row, at=at)
    assert event_notice_json("updated", event, at) == model.to_json()
